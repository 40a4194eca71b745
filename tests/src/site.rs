//! A small cluster for end-to-end tests: a real control plane in an "api"
//! network namespace and N node namespaces whose uplink `eg0` is a veth into
//! it, plus the operator and agents as processes. Everything is removed on
//! drop, even when a test panics.

use std::process::{Child, Command, Output, Stdio};

use crate::cluster::{self, ControlPlane, Options};
use serde_json::Value;

pub fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

pub fn must(args: &[&str]) {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A binary of this workspace next to the running one (a bin in
/// `target/<profile>/`) or one level up (a test in `target/<profile>/deps/`).
pub fn target_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let dir = exe.parent().expect("target dir");
    let bin = [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|b| b.exists())
        .unwrap_or_else(|| dir.join(name));
    assert!(
        bin.exists(),
        "{} missing: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

pub fn available() -> bool {
    let root = sh(&["id", "-u"]).stdout.starts_with(b"0");
    if !root {
        eprintln!("skipping: needs root for network namespaces");
    }
    root
}

/// Network namespaces, removed on drop (after the control plane stopped).
pub struct Netns(pub Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

pub struct Cluster {
    /// Operator processes by identity.
    pub operators: Vec<(String, Child)>,
    /// Agent processes.
    pub agents: Vec<Child>,
    /// Other processes the test started (Prometheus, Alertmanager, exporters).
    pub others: Vec<Child>,
    // Field order is drop order: processes, then the control plane, then namespaces.
    /// The control plane, in the api namespace.
    pub cp: ControlPlane,
    _netns: Netns,
    /// The api namespace (control plane, operator, kubectl).
    pub api: String,
    /// The node namespaces, node-1 first.
    pub nodes: Vec<String>,
    /// The test's directory.
    pub dir: std::path::PathBuf,
    _dir: Option<cluster::TempDir>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self
            .agents
            .iter_mut()
            .chain(self.others.iter_mut())
            .chain(self.operators.iter_mut().map(|(_, c)| c))
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What a cluster's namespaces are called and where its files go.
pub struct Names {
    /// The api namespace.
    pub api: String,
    /// One namespace per node.
    pub nodes: Vec<String>,
    /// Logs, control plane state.
    pub dir: std::path::PathBuf,
    /// Keep `dir` after the cluster is gone (the incident lab's output).
    pub keep_dir: bool,
}

impl Cluster {
    /// A cluster with `nodes` nodes and names unique to this test.
    pub fn new(nodes: usize) -> Cluster {
        let id = cluster::unique();
        Cluster::create(Names {
            api: format!("ega-{id}"),
            nodes: (1..=nodes).map(|i| format!("egn{i}-{id}")).collect(),
            dir: std::env::temp_dir().join(format!("egop-{id}")),
            keep_dir: false,
        })
    }

    /// A cluster with `nodes` nodes and the release installed from `chart`
    /// (an earlier version's chart, for upgrade tests).
    pub fn with_chart(nodes: usize, chart: &std::path::Path) -> Cluster {
        let id = cluster::unique();
        Cluster::create_from(
            Names {
                api: format!("ega-{id}"),
                nodes: (1..=nodes).map(|i| format!("egn{i}-{id}")).collect(),
                dir: std::env::temp_dir().join(format!("egop-{id}")),
                keep_dir: false,
            },
            Some(chart),
        )
    }

    /// A cluster with the given names.
    pub fn create(n: Names) -> Cluster {
        Cluster::create_from(n, None)
    }

    /// A cluster with the given names, the release installed from `chart`
    /// (default: this repository's).
    fn create_from(n: Names, chart: Option<&std::path::Path>) -> Cluster {
        let Names {
            api,
            nodes: node_names,
            dir,
            keep_dir,
        } = n;
        let nodes = node_names.len();
        std::fs::create_dir_all(&dir).expect("dir");
        let mut netns = Netns(vec![]);
        must(&["ip", "netns", "add", &api]);
        netns.0.push(api.clone());
        must(&["ip", "-n", &api, "link", "set", "lo", "up"]);
        let mut names = vec![];
        for i in 1..=nodes {
            let ns = node_names[i - 1].clone();
            must(&["ip", "netns", "add", &ns]);
            netns.0.push(ns.clone());
            names.push(ns.clone());
            let up = format!("n{i}");
            must(&[
                "ip", "-n", &ns, "link", "add", "name", "eg0", "type", "veth", "peer", "name", &up,
                "netns", &api,
            ]);
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            must(&["ip", "-n", &ns, "link", "set", "eg0", "up"]);
            must(&["ip", "-n", &api, "link", "set", &up, "up"]);
            let a = format!("10.230.{i}.1/24");
            must(&["ip", "-n", &api, "addr", "add", &a, "dev", &up]);
            let n = format!("10.230.{i}.2/24");
            must(&["ip", "-n", &ns, "addr", "add", &n, "dev", "eg0"]);
        }
        // The API server listens on every address of the api namespace and
        // publishes 10.230.1.1 in the `kubernetes` EndpointSlice.
        let cp = ControlPlane::start(
            &dir.join("cp"),
            Options {
                netns: Some(api.clone()),
                bind: Some("0.0.0.0".into()),
                advertise: Some("10.230.1.1".into()),
                sans: (1..=nodes).map(|i| format!("10.230.{i}.1")).collect(),
                ..Options::default()
            },
        );
        match chart {
            None => {
                cp.helm_install(&serde_json::json!({}));
            }
            Some(chart) => {
                let values = serde_json::json!({});
                let out = cp.helm(
                    &["install", cluster::RELEASE, "--create-namespace"],
                    Some((chart, &values)),
                );
                assert!(
                    out.status.success(),
                    "helm install of {}: {}",
                    chart.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Cluster {
            operators: vec![],
            agents: vec![],
            others: vec![],
            cp,
            _netns: netns,
            api,
            nodes: names,
            dir: dir.clone(),
            _dir: (!keep_dir).then(|| cluster::TempDir(dir)),
        }
    }

    pub fn start_operator(&mut self, identity: &str) {
        self.start_operator_with(identity, &[]);
    }

    /// Starts an operator with extra flags.
    pub fn start_operator_with(&mut self, identity: &str, extra: &[&str]) {
        let server = self.cp.server.clone();
        self.start_operator_at(identity, &server, extra);
    }

    /// Starts an operator that reaches the API server at `server` (a proxy, say).
    pub fn start_operator_at(&mut self, identity: &str, server: &str, extra: &[&str]) {
        let kc = self
            .cp
            .service_account_kubeconfig(&format!("{}-operator", cluster::RELEASE), server);
        let log =
            std::fs::File::create(self.dir.join(format!("operator-{identity}.log"))).expect("log");
        let port = 9465 + self.operators.len();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.api])
            .arg(target_bin("egressguard-operator"))
            .args([
                "run",
                "--namespace",
                cluster::NAMESPACE,
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
                "--probe-addr",
                &format!("127.0.0.1:{}", port + 100),
                "--cleanup-timeout-seconds",
                "30",
                "--identity",
                identity,
            ])
            .args(extra)
            .env("KUBECONFIG", kc)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("operator");
        self.operators.push((identity.to_string(), child));
    }

    pub fn stop_operator(&mut self, identity: &str) {
        if let Some(i) = self.operators.iter().position(|(id, _)| id == identity) {
            let (_, mut c) = self.operators.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_agent(&mut self, i: usize) {
        let server = format!("https://10.230.{i}.1:{}", self.cp.port);
        let kc = self.cp.agent_kubeconfig(&format!("node-{i}"), &server);
        let child = Command::new("ip")
            .args(["netns", "exec", &self.nodes[i - 1]])
            .arg(target_bin("node-shaper"))
            .args([
                "run",
                "--node-name",
                &format!("node-{i}"),
                "--metrics-addr",
                "127.0.0.1:9464",
                "--resync-seconds",
                "2",
            ])
            .env("KUBECONFIG", kc)
            .env("EGRESSGUARD_STATE_DIR", self.dir.join(format!("state-{i}")))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join(format!("agent-{i}.log"))).expect("log"))
            .spawn()
            .expect("agent");
        self.agents.push(child);
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.cp.kubectl(args)
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        self.cp.kubectl_ok(args)
    }

    pub fn apply(&self, yaml: &str) {
        self.cp.apply(yaml);
    }

    pub fn get(&self, what: &str, name: &str) -> Option<Value> {
        self.cp.get(what, name)
    }

    pub fn shaped(&self, i: usize) -> bool {
        let o = sh(&[
            "ip",
            "netns",
            "exec",
            &self.nodes[i - 1],
            "tc",
            "qdisc",
            "show",
            "dev",
            "eg0",
        ]);
        String::from_utf8_lossy(&o.stdout).contains("qdisc htb e9: root")
    }

    pub fn operator_log(&self) -> String {
        let mut all = String::new();
        for (id, _) in &self.operators {
            let log = std::fs::read_to_string(self.dir.join(format!("operator-{id}.log")))
                .unwrap_or_default();
            all.push_str(&format!("--- operator {id}\n{log}"));
        }
        all
    }

    pub fn metrics(&self, index: usize) -> String {
        let o = sh(&[
            "ip",
            "netns",
            "exec",
            &self.api,
            "curl",
            "-sS",
            "--max-time",
            "3",
            &format!("http://127.0.0.1:{}/metrics", 9465 + index),
        ]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

pub fn wait_for(c: &Cluster, what: &str, secs: u64, f: impl FnMut() -> bool) {
    cluster::wait_for(what, secs, f, || {
        format!("operator log:\n{}", c.operator_log())
    });
}

/// Registers a node as a kubelet would: the object, then its status.
pub fn add_node(c: &Cluster, name: &str, site: &str, ip: &str) {
    c.cp.add_node(name, &format!("site: {site}"), Some(ip));
}
