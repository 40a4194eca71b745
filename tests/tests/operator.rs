//! End to end: the real `egressguard-operator` and two real `node-shaper run`
//! agents against the Kubernetes-API stand-in (not Kubernetes; see
//! `egressguard_e2e::standin`), driven with kubectl.
//!
//! Topology, all created and removed by the test: an "api" network namespace
//! runs the stand-in, the operator and kubectl; each node is its own network
//! namespace whose uplink `eg0` is a veth into the api namespace, so every
//! agent reaches the API server through the interface it shapes — which is
//! why the API endpoints must be (and are checked to be) protected.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

static N: AtomicU32 = AtomicU32::new(0);

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn must(args: &[&str]) {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn target_bin(name: &str) -> std::path::PathBuf {
    if name == "k8s-standin" {
        return env!("CARGO_BIN_EXE_k8s-standin").into();
    }
    let exe = std::env::current_exe().expect("test binary");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join(name);
    assert!(
        bin.exists(),
        "{} missing: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

fn available() -> bool {
    let root = sh(&["id", "-u"]).stdout.starts_with(b"0");
    if !root {
        eprintln!("skipping: needs root for network namespaces");
    }
    root
}

struct Cluster {
    api: String,
    nodes: Vec<String>,
    dir: std::path::PathBuf,
    standin: Option<Child>,
    operator: Option<Child>,
    agents: Vec<Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self
            .agents
            .iter_mut()
            .chain(self.operator.iter_mut())
            .chain(self.standin.iter_mut())
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.nodes.iter().chain(std::iter::once(&self.api)) {
            if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const PORT: &str = "6443";

impl Cluster {
    fn new(nodes: usize) -> Cluster {
        let id = format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(format!("egop-{id}"));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut c = Cluster {
            api: format!("ega-{id}"),
            nodes: vec![],
            dir,
            standin: None,
            operator: None,
            agents: vec![],
        };
        must(&["ip", "netns", "add", &c.api]);
        must(&["ip", "-n", &c.api, "link", "set", "lo", "up"]);
        for i in 1..=nodes {
            let ns = format!("egn{i}-{id}");
            must(&["ip", "netns", "add", &ns]);
            c.nodes.push(ns.clone());
            let up = format!("n{i}");
            must(&[
                "ip", "-n", &ns, "link", "add", "name", "eg0", "type", "veth", "peer", "name", &up,
                "netns", &c.api,
            ]);
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            must(&["ip", "-n", &ns, "link", "set", "eg0", "up"]);
            must(&["ip", "-n", &c.api, "link", "set", &up, "up"]);
            must(&[
                "ip",
                "-n",
                &c.api,
                "addr",
                "add",
                &format!("10.230.{i}.1/24"),
                "dev",
                &up,
            ]);
            must(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.230.{i}.2/24"),
                "dev",
                "eg0",
            ]);
        }
        c
    }

    fn kubeconfig(&self, server: &str) -> String {
        let p = self.dir.join(format!("kc-{server}"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: s\n  cluster:\n    server: http://{server}:{PORT}\ncontexts:\n- name: s\n  context:\n    cluster: s\n    user: s\n    namespace: default\ncurrent-context: s\nusers:\n- name: s\n  user: {{}}\n"
        );
        std::fs::write(&p, text).expect("kubeconfig");
        p.to_string_lossy().into_owned()
    }

    fn start_standin(&mut self) {
        let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.api])
            .arg(target_bin("k8s-standin"))
            .args([
                "--listen",
                &format!("0.0.0.0:{PORT}"),
                "--crds",
                &crds.to_string_lossy(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("stand-in");
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        assert!(line.starts_with("listening on"), "stand-in: {line:?}");
        self.standin = Some(child);
    }

    fn start_operator(&mut self) {
        let kc = self.kubeconfig("127.0.0.1");
        let log = std::fs::File::create(self.dir.join("operator.log")).expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.api])
            .arg(target_bin("egressguard-operator"))
            .args([
                "run",
                "--namespace",
                "default",
                "--metrics-addr",
                "127.0.0.1:9465",
                "--cleanup-timeout-seconds",
                "30",
                "--identity",
                "op-1",
            ])
            .env("KUBECONFIG", kc)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("operator");
        self.operator = Some(child);
    }

    fn start_agent(&mut self, i: usize) {
        let kc = self.kubeconfig(&format!("10.230.{i}.1"));
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
            .stderr(Stdio::null())
            .spawn()
            .expect("agent");
        self.agents.push(child);
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        let kc = self.kubeconfig("127.0.0.1");
        let mut v = vec![
            "netns",
            "exec",
            &self.api,
            "kubectl",
            "--kubeconfig",
            &kc,
            "--request-timeout=5s",
        ];
        v.extend_from_slice(args);
        Command::new("ip").args(v).output().expect("kubectl")
    }

    fn kubectl_ok(&self, args: &[&str]) -> String {
        let o = self.kubectl(args);
        assert!(
            o.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn apply(&self, yaml: &str) {
        let f = self
            .dir
            .join(format!("obj-{}.yaml", N.fetch_add(1, Ordering::SeqCst)));
        std::fs::write(&f, yaml).expect("write");
        self.kubectl_ok(&["apply", "--validate=false", "-f", &f.to_string_lossy()]);
    }

    fn get(&self, what: &str, name: &str) -> Option<Value> {
        let o = self.kubectl(&["get", what, name, "-o", "json"]);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).expect("json"))
    }

    fn shaped(&self, i: usize) -> bool {
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

    fn operator_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("operator.log")).unwrap_or_default()
    }
}

fn wait_for(c: &Cluster, what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!(
        "timed out after {secs}s waiting for: {what}\noperator log:\n{}",
        c.operator_log()
    );
}

/// Registers a node as a kubelet would: the object, then its status.
fn add_node(c: &Cluster, name: &str, site: &str, ip: &str) {
    c.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{site: {site}}}}}\n"
    ));
    let status = format!(
        "{{\"status\":{{\"addresses\":[{{\"type\":\"InternalIP\",\"address\":\"{ip}\"}}]}}}}"
    );
    c.kubectl_ok(&[
        "patch",
        "node",
        name,
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        &status,
    ]);
}

fn guard(name: &str, site: &str) -> String {
    format!(
        "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: {name}}}\nspec:\n  nodeSelector: {{matchLabels: {{site: {site}}}}}\n  interfaces: [eg0]\n  uplink: {{rate: 20Mbit}}\n  throttle: {{rate: 1Mbit, destinations: [{{protocol: TCP, port: 443}}]}}\n  whitelist: [203.0.113.10/32]\n"
    )
}

fn cond(v: &Value, t: &str) -> (String, String) {
    let c = v["status"]["conditions"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["type"] == t))
        .cloned()
        .unwrap_or_default();
    (
        c["status"].as_str().unwrap_or_default().to_string(),
        c["reason"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn e2e_operator_selects_protects_moves_resolves_conflicts_and_cleans_up() {
    if !available() {
        return;
    }
    let mut c = Cluster::new(2);
    c.start_standin();
    // Nodes as kubelets would register them; node-3 has no agent here.
    add_node(&c, "node-1", "a", "10.230.1.2");
    add_node(&c, "node-2", "a", "10.230.2.2");
    add_node(&c, "node-3", "b", "10.230.3.2");
    c.apply("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: kubernetes, namespace: default, labels: {kubernetes.io/service-name: kubernetes}}\naddressType: IPv4\nendpoints: [{addresses: [10.230.1.1, 10.230.2.1]}]\nports: [{name: https, port: 6443, protocol: TCP}]\n");
    c.start_operator();
    c.start_agent(1);
    c.start_agent(2);

    // A guard selecting site=a: both nodes get a plan, the agents enforce it.
    c.apply(&guard("idc", "a"));
    wait_for(
        &c,
        "both nodes shaped and the guard Ready with 2 enforced nodes",
        40,
        || {
            c.shaped(1)
                && c.shaped(2)
                && c.get("egressguards.egressguard.io", "idc")
                    .is_some_and(|g| {
                        g["status"]["enforcedNodes"] == 2 && cond(&g, "Ready").0 == "True"
                    })
        },
    );
    let g = c.get("egressguards.egressguard.io", "idc").expect("guard");
    assert_eq!(g["status"]["selectedNodes"], 2);
    assert!(g["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "egressguard.io/cleanup")));
    // The plan protects the API endpoints and the other nodes.
    let ns1 = c
        .get("nodeshapings.egressguard.io", "node-1")
        .expect("plan");
    let protected: Vec<(String, String)> = ns1["spec"]["protected"]
        .as_array()
        .expect("protected")
        .iter()
        .map(|p| {
            (
                p["cidr"].as_str().unwrap_or_default().into(),
                p["reason"].as_str().unwrap_or_default().into(),
            )
        })
        .collect();
    for (cidr, why) in [
        ("10.230.1.1/32", "kubernetes API endpoint"),
        ("10.230.2.2/32", "node node-2 InternalIP"),
        ("10.230.3.2/32", "node node-3 InternalIP"),
    ] {
        assert!(
            protected.contains(&(cidr.to_string(), why.to_string())),
            "{cidr} missing from {protected:?}"
        );
    }
    // Throttling 443 never catches the API server: the agent classifies it as protected.
    let e = Command::new("ip")
        .args(["netns", "exec", &c.nodes[0]])
        .arg(target_bin("node-shaper"))
        .args([
            "explain",
            "--interface",
            "eg0",
            "10.230.1.1",
            "--port",
            "443",
        ])
        .env("EGRESSGUARD_STATE_DIR", c.dir.join("state-1"))
        .output()
        .expect("explain");
    let text = String::from_utf8_lossy(&e.stdout).into_owned();
    assert!(
        text.starts_with("protected:"),
        "API endpoint not protected: {text} {}",
        String::from_utf8_lossy(&e.stderr)
    );
    // Events were recorded for the guard.
    let events = c.kubectl_ok(&["get", "events.events.k8s.io", "-n", "default", "-o", "json"]);
    assert!(
        events.contains("\"reason\":\"Enforced\"") || events.contains("\"reason\": \"Enforced\""),
        "{events}"
    );

    // Labels change: node-2 leaves the selection and loses its shaping.
    c.kubectl_ok(&["label", "node", "node-2", "site=b", "--overwrite"]);
    wait_for(&c, "node-2 unshaped and its plan deleted", 40, || {
        !c.shaped(2) && c.get("nodeshapings.egressguard.io", "node-2").is_none()
    });
    assert!(c.shaped(1));
    wait_for(&c, "guard counts one node", 20, || {
        c.get("egressguards.egressguard.io", "idc")
            .is_some_and(|g| g["status"]["selectedNodes"] == 1)
    });

    // A newer guard on the same nodes: Conflict on it, the older keeps the node, no flapping.
    c.apply(&guard("newer", "a"));
    wait_for(&c, "Conflict on the newer guard", 20, || {
        c.get("egressguards.egressguard.io", "newer")
            .is_some_and(|g| {
                cond(&g, "Conflict") == ("True".into(), "NodeClaimedByOlderGuard".into())
            })
    });
    let rv1 = c.get("egressguards.egressguard.io", "newer").expect("g")["metadata"]
        ["resourceVersion"]
        .clone();
    let plan_rv1 = c.get("nodeshapings.egressguard.io", "node-1").expect("p")["metadata"]
        ["generation"]
        .clone();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        c.get("egressguards.egressguard.io", "newer").expect("g")["metadata"]["resourceVersion"],
        rv1,
        "status flapping"
    );
    assert_eq!(
        c.get("nodeshapings.egressguard.io", "node-1").expect("p")["metadata"]["generation"],
        plan_rv1,
        "plan flapping"
    );
    assert_eq!(
        c.get("nodeshapings.egressguard.io", "node-1").expect("p")["spec"]["guard"]["name"],
        "idc"
    );

    // The API server "restarts" (watches end, 503s for 2 s): nothing changes, the
    // controllers reconnect and keep converging.
    let restart = c.dir.join("restart.json");
    std::fs::write(&restart, "{\"downSeconds\": 2}").expect("write");
    c.kubectl_ok(&[
        "create",
        "--raw",
        "/standin/restart",
        "-f",
        &restart.to_string_lossy(),
    ]);
    std::thread::sleep(Duration::from_secs(4));
    assert!(c.shaped(1));

    // The operator dies and comes back: nothing is lost, nothing is rewritten.
    if let Some(mut op) = c.operator.take() {
        let _ = op.kill();
        let _ = op.wait();
    }
    c.start_operator();
    std::thread::sleep(Duration::from_secs(4));
    assert!(c.shaped(1));
    assert_eq!(
        c.get("nodeshapings.egressguard.io", "node-1").expect("p")["metadata"]["generation"],
        plan_rv1
    );

    // Deleting the guards: shaping leaves node-1 before the guard object goes.
    c.kubectl_ok(&[
        "delete",
        "egressguards.egressguard.io",
        "newer",
        "--wait=false",
    ]);
    wait_for(&c, "newer gone", 20, || {
        c.get("egressguards.egressguard.io", "newer").is_none()
    });
    c.kubectl_ok(&[
        "delete",
        "egressguards.egressguard.io",
        "idc",
        "--wait=false",
    ]);
    wait_for(&c, "guard idc gone", 40, || {
        c.get("egressguards.egressguard.io", "idc").is_none()
    });
    // The finalizer is released only after the agent confirmed removal.
    assert!(
        !c.shaped(1),
        "guard disappeared with shaping left on node-1"
    );
    wait_for(&c, "node-1 plan deleted", 20, || {
        c.get("nodeshapings.egressguard.io", "node-1").is_none()
    });
}
