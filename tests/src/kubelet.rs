//! A cluster with real kubelet nodes for one test: `scripts/dev-cluster.sh up
//! --nodes N` run inside the test's own network namespace, so the nodes'
//! bridge, the API server's and the registry's addresses never touch the
//! machine's. The chart is installed with the real Helm CLI from images the
//! script built and pushed to its registry; the kubelets run its pods.
//! Everything is removed on drop, also when the test panics.

use std::process::Output;
use std::time::{Duration, Instant};

use crate::cluster::{self, root, ControlPlane, Options, NAMESPACE, RELEASE};
use crate::site::{must, sh, Netns};

/// The chart's appVersion: the tag `dev-cluster.sh` pushes the images under.
pub const APP_VERSION: &str = "0.1.0";

/// The nodes' network, as `dev-cluster.sh` recorded it (DIR/network).
#[derive(Debug, Clone)]
pub struct Network {
    /// The bridge's address: the API server and the registry listen there.
    pub gateway: String,
    /// The bridge (in the test's namespace).
    pub bridge: String,
    /// Third octet of the nodes' 10.231.x.0/24.
    pub octet: u8,
    /// Names prefix: node K's namespace is `PREFIX-nK`.
    pub prefix: String,
    /// `HOST:PORT` of the image registry.
    pub registry: String,
}

/// A control plane with kubelet nodes; field order is drop order.
pub struct Nodes {
    /// The control plane (in `api`), stopped with the nodes on drop.
    pub cp: ControlPlane,
    _netns: Netns,
    /// The test's namespace: control plane, bridge, kubectl, helm.
    pub api: String,
    /// The nodes' network.
    pub net: Network,
    /// `eg-node-1`, ...
    pub names: Vec<String>,
    _dir: Option<cluster::TempDir>,
}

impl Nodes {
    /// Starts a control plane and `n` kubelet nodes, all Ready, with names
    /// unique to this test.
    pub fn up(n: usize) -> Nodes {
        let id = cluster::unique();
        let dir = std::env::temp_dir().join(format!("egk-{id}"));
        // Removed even when the start panics.
        let guard = cluster::TempDir(dir.clone());
        let mut nodes = Nodes::create(&format!("egk-{id}"), &dir, None, n);
        nodes._dir = Some(guard);
        nodes
    }

    /// Starts a control plane in network namespace `api` (created here) with
    /// its files in `dir/cp` (removed on drop; the rest of `dir` is the
    /// caller's) and `n` kubelet nodes; `prefix` fixes the nodes' names
    /// (`PREFIX-n1`, ...; `EG_NODES_PREFIX`).
    pub fn create(api: &str, dir: &std::path::Path, prefix: Option<&str>, n: usize) -> Nodes {
        std::fs::create_dir_all(dir).expect("dir");
        must(&["ip", "netns", "add", api]);
        let netns = Netns(vec![api.to_string()]);
        must(&["ip", "-n", api, "link", "set", "lo", "up"]);
        let cp = ControlPlane::start(
            &dir.join("cp"),
            Options {
                netns: Some(api.to_string()),
                nodes: n,
                nodes_prefix: prefix.map(String::from),
                ..Options::default()
            },
        );
        let net = read_network(&cp.dir.join("network"));
        Nodes {
            cp,
            _netns: netns,
            api: api.to_string(),
            net,
            names: (1..=n).map(|k| format!("eg-node-{k}")).collect(),
            _dir: None,
        }
    }

    /// Node K's network namespace.
    pub fn node_ns(&self, k: usize) -> String {
        format!("{}-n{k}", self.net.prefix)
    }

    /// Node K's address (eth0).
    pub fn node_ip(&self, k: usize) -> String {
        format!("10.231.{}.{}", self.net.octet, 10 + k)
    }

    /// A command in node `name`'s network namespace (`dev-cluster.sh exec`).
    pub fn exec(&self, name: &str, args: &[&str]) -> Output {
        std::process::Command::new("bash")
            .arg(root().join("scripts/dev-cluster.sh"))
            .args(["exec"])
            .arg(&self.cp.dir)
            .args([name, "--"])
            .args(args)
            .output()
            .expect("dev-cluster.sh exec")
    }

    /// `dev-cluster.sh node-stop` / `node-start` of a node.
    pub fn node(&self, verb: &str, name: &str) {
        let o = std::process::Command::new("bash")
            .arg(root().join("scripts/dev-cluster.sh"))
            .arg(format!("node-{verb}"))
            .arg(&self.cp.dir)
            .arg(name)
            .output()
            .expect("dev-cluster.sh node-");
        assert!(
            o.status.success(),
            "node-{verb} {name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// The root qdisc of node `name`'s eth0 is EgressGuard's HTB.
    pub fn shaped(&self, name: &str) -> bool {
        let o = self.exec(name, &["tc", "qdisc", "show", "dev", "eth0"]);
        String::from_utf8_lossy(&o.stdout).contains("qdisc htb e9: root")
    }

    /// The chart's values for these nodes: the images from the registry, the
    /// API server's address (no Service proxy here), no AppArmor (the kernel
    /// has none), the operator on any node (no control-plane nodes here).
    pub fn values(&self, tag: &str) -> serde_json::Value {
        let image = |name: &str| {
            serde_json::json!({
                "repository": format!("{}/egressguard/{name}", self.net.registry),
                "tag": tag,
                "pullPolicy": "IfNotPresent",
            })
        };
        serde_json::json!({
            "kubernetesApi": {"host": self.net.gateway, "port": self.cp.port.to_string()},
            "appArmorProfile": "",
            "operator": {"image": image("egressguard-operator"), "placement": {"trusted": "any"}},
            "nodeShaper": {"image": image("node-shaper")},
        })
    }

    /// `helm install --wait` of charts/egressguard with `values`.
    pub fn install(&self, values: &serde_json::Value) -> Output {
        self.cp.helm(
            &["install", RELEASE, "--create-namespace", "--wait"],
            Some((&root().join("charts/egressguard"), values)),
        )
    }

    /// The chart's pods of a component (`node-shaper`, `operator`) as JSON;
    /// panics when kubectl fails (an empty list must mean no pods).
    pub fn pods(&self, component: &str) -> Vec<serde_json::Value> {
        let o = self.cp.kubectl(&[
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            &format!("app.kubernetes.io/component={component}"),
            "-o",
            "json",
        ]);
        assert!(
            o.status.success(),
            "kubectl get pods: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .ok()
            .and_then(|v| v["items"].as_array().cloned())
            .expect("kubectl get pods -o json: a list")
    }

    /// The agent pod on node `name`, if any.
    pub fn agent_pod(&self, name: &str) -> Option<serde_json::Value> {
        self.pods("node-shaper")
            .into_iter()
            .find(|p| p["spec"]["nodeName"] == name && p["metadata"]["deletionTimestamp"].is_null())
    }

    /// Logs of every node component and the chart's pods, for a failure message.
    pub fn context(&self) -> String {
        let mut s = String::new();
        for name in &self.names {
            for c in ["kubelet", "containerd"] {
                let log =
                    std::fs::read_to_string(self.cp.dir.join(format!("nodes/{name}/{c}.log")))
                        .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                s.push_str(&format!("--- {name} {c} (last lines)\n"));
                for l in tail.into_iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        let o = self.cp.kubectl(&["get", "pods", "-A", "-o", "wide"]);
        s.push_str(&String::from_utf8_lossy(&o.stdout));
        let o = self
            .cp
            .kubectl(&["get", "events", "-A", "--sort-by=.lastTimestamp"]);
        let ev = String::from_utf8_lossy(&o.stdout);
        let tail: Vec<&str> = ev.lines().rev().take(25).collect();
        for l in tail.into_iter().rev() {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// Polls `f` every 250 ms until it holds; panics with the nodes' context.
    pub fn wait_for(&self, what: &str, secs: u64, f: impl FnMut() -> bool) {
        cluster::wait_for(what, secs, f, || self.context());
    }

    /// A network namespace on the bridge at 10.231.x.200 that no guard
    /// protects (not a node, not the API server): where traffic is measured.
    pub fn receiver(&self) -> Receiver {
        let ns = format!("{}-rx", self.api);
        must(&["ip", "netns", "add", &ns]);
        let guard = Netns(vec![ns.clone()]);
        let veth = format!("r{}", &self.net.prefix[2..]);
        must(&[
            "ip", "-n", &self.api, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ]);
        must(&[
            "ip",
            "-n",
            &self.api,
            "link",
            "set",
            &veth,
            "master",
            &self.net.bridge,
            "up",
        ]);
        let addr = format!("10.231.{}.200", self.net.octet);
        must(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        must(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        Receiver {
            _netns: guard,
            ns,
            addr,
        }
    }

    /// Waits until every node's agent pod is Ready and the operator has a leader.
    pub fn wait_agents_ready(&self, secs: u64) {
        let n = self.names.len();
        self.wait_for("every agent pod Ready", secs, || {
            self.pods("node-shaper").iter().filter(|p| ready(p)).count() == n
        });
    }
}

/// A receiving namespace on the nodes' bridge; removed on drop.
pub struct Receiver {
    _netns: Netns,
    /// Its namespace.
    pub ns: String,
    /// Its address.
    pub addr: String,
}

impl Receiver {
    /// Starts `iperf3 -s` on `port` (one test; killed with the namespace).
    pub fn iperf3_server(&self, port: u16) {
        let child = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "iperf3",
                "-s",
                "-J",
                "-p",
                &port.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("iperf3 -s");
        std::mem::forget(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let o = sh(&["ip", "netns", "exec", &self.ns, "ss", "-ltn"]);
            if String::from_utf8_lossy(&o.stdout).contains(&format!(":{port} ")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("iperf3 -s did not listen on {port}");
    }
}

/// Keeps `n` idle TCP connections open to `addr:port`, from ten addresses
/// of the receiver (the agent admits 32 per client address and closes idle
/// ones after 10 s; each closed one is opened again at once).
const HOLDER: &str = r#"
import os, select, signal, socket, sys, time
addr, port, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sources = sys.argv[5].split(",")
socks, opened = {}, 0
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    for i in range(n):
        if i not in socks:
            s = socket.socket()
            s.settimeout(2)
            try:
                s.bind((sources[i % len(sources)], 0))
                s.connect((addr, port))
                socks[i] = s
                opened += 1
            except OSError:
                s.close()
    r, _, _ = select.select(list(socks.values()), [], [], 0.5)
    for i, s in list(socks.items()):
        if s in r:
            try:
                data = s.recv(1, socket.MSG_PEEK)
            except OSError:
                data = b""
            if not data:
                s.close()
                del socks[i]
    with open(out + ".tmp", "w") as f:
        f.write(f"{len(socks)} {opened}\n")
    os.replace(out + ".tmp", out)
"#;

/// Idle connections held open by a process in the receiver's namespace.
pub struct Holder {
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl Holder {
    /// Connections open now (0 once the holder is gone: its file outlives it).
    pub fn held(&mut self) -> usize {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return 0;
        }
        std::fs::read_to_string(&self.file)
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
    }
}

impl Receiver {
    /// Holds `n` idle connections open to `addr:port` (see [`HOLDER`]).
    pub fn hold_idle(&self, addr: &str, port: u16, n: usize) -> Holder {
        let base = self
            .addr
            .rsplit_once('.')
            .map(|(b, _)| b.to_string())
            .expect("ipv4");
        let mut sources = vec![];
        for i in 1..=10 {
            let a = format!("{base}.{}", 200 + i);
            must(&[
                "ip",
                "-n",
                &self.ns,
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                "eth0",
            ]);
            sources.push(a);
        }
        let file = std::env::temp_dir().join(format!("egk-holder-{}", cluster::unique()));
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .args([
                "python3",
                "-c",
                HOLDER,
                addr,
                &port.to_string(),
                &n.to_string(),
            ])
            .arg(&file)
            .arg(sources.join(","))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("python3");
        let mut h = Holder { child, file };
        let deadline = Instant::now() + Duration::from_secs(20);
        while h.held() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        h
    }
}

/// Whether a pod's Ready condition is True.
pub fn ready(pod: &serde_json::Value) -> bool {
    cluster::condition(pod, "Ready").0 == "True"
}

/// A pod's containers' restart count, summed.
pub fn restarts(pod: &serde_json::Value) -> u64 {
    pod["status"]["containerStatuses"]
        .as_array()
        .map(|cs| cs.iter().filter_map(|c| c["restartCount"].as_u64()).sum())
        .unwrap_or(0)
}

fn read_network(path: &std::path::Path) -> Network {
    let text = std::fs::read_to_string(path).expect("DIR/network");
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} missing in {}", path.display()))
            .to_string()
    };
    Network {
        gateway: get("gateway"),
        bridge: get("bridge"),
        octet: get("octet").parse().expect("octet"),
        prefix: get("prefix"),
        registry: get("registry"),
    }
}
