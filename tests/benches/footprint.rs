//! Footprint benchmark (performance issue, target 3), against a real control
//! plane (`scripts/dev-cluster.sh`), components authenticated as the chart's
//! ServiceAccounts:
//! - `node-shaper run` idle RSS with a 10,000-entry plan enforced (< 20 MiB);
//! - `egressguard-operator run` with 2,000 nodes and 50 guards: time from
//!   process start to every plan and guard status written (< 10 s), and RSS
//!   afterwards (< 150 MiB).
//!
//! `cargo build --release --workspace --bins && cargo bench -p egressguard-e2e --bench footprint`
//! (`-- --smoke` uses 200 nodes, 10 guards and 1,000 entries and enforces nothing but function).

#[path = "../../node-shaper/tests/lab/mod.rs"]
mod lab;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use egressguard_e2e::cluster::{self, rss_mib, ControlPlane, Options};
use lab::*;
use serde_json::{json, Value};

fn release_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("bench binary");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join(name);
    if !bin.exists() {
        eprintln!(
            "{} missing: run `cargo build --release --workspace --bins` first",
            bin.display()
        );
        std::process::exit(2);
    }
    bin
}

struct Kill(Vec<Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Creates many objects with one kubectl call (a List manifest).
fn create_all(cp: &ControlPlane, items: Vec<Value>) {
    let f = cp.dir.join(format!("list-{}.json", cluster::unique()));
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    std::fs::write(&f, list.to_string()).expect("write list");
    let o = cp.kubectl(&["create", "-f", &f.to_string_lossy(), "-o", "name"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn agent_rss(entries: usize) -> f64 {
    let lab = Lab::new("fp");
    let cp = ControlPlane::start(
        &lab.dir.join("cp"),
        Options {
            netns: Some(lab.cli.clone()),
            ..Options::default()
        },
    );
    cp.helm_install(&json!({}));
    cp.add_node("node-a", "", None);
    let kc = cp.agent_kubeconfig("node-a", &cp.server);
    let wl: Vec<String> = (0..entries)
        .map(|i| format!("{}.{}.{}.0/24", 11 + i / 65536, (i / 256) % 256, i % 256))
        .collect();
    let plan = json!({
        "apiVersion": "egressguard.io/v1alpha1", "kind": "NodeShaping", "metadata": {"name": "node-a"},
        "spec": {"nodeName": "node-a", "enforce": true,
                 "shaping": {"interfaces": [DEV], "uplink": {"rate": "1gbit"}, "throttle": {"rate": "10mbit", "destinations": [{"port": 443}]},
                             "whitelist": wl}}
    });
    create_all(&cp, vec![plan]);
    let agent = Command::new("ip")
        .args(["netns", "exec", &lab.cli])
        .arg(release_bin("node-shaper"))
        .args([
            "run",
            "--node-name",
            "node-a",
            "--metrics-addr",
            "127.0.0.1:9464",
        ])
        .env("KUBECONFIG", &kc)
        .env("EGRESSGUARD_STATE_DIR", &lab.dir)
        .stderr(Stdio::null())
        .spawn()
        .expect("agent");
    let pid = agent.id();
    let _procs = Kill(vec![agent]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = cp.kubectl(&[
            "get",
            "nodeshapings.egressguard.io",
            "node-a",
            "-o",
            "jsonpath={.status.interfaces[0].enforced}",
        ]);
        if String::from_utf8_lossy(&o.stdout) == "true" {
            break;
        }
        assert!(Instant::now() < deadline, "agent never enforced the plan");
        std::thread::sleep(Duration::from_millis(300));
    }
    // Idle: let a resync pass and allocator caches settle.
    std::thread::sleep(Duration::from_secs(5));
    rss_mib(pid)
}

/// Returns (seconds to converge, operator RSS MiB, control plane RSS MiB).
fn operator_resync(nodes: usize, guards: usize) -> (f64, f64, f64) {
    let dir = std::env::temp_dir().join(format!("egfp-{}", cluster::unique()));
    let cp = ControlPlane::start(&dir, Options::default());
    cp.helm_install(&json!({}));
    let kc = cp.service_account_kubeconfig(&format!("{}-operator", cluster::RELEASE), &cp.server);
    // Nodes as kubelets register them: status (addresses) included on create.
    let items = (0..nodes)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(0x0a64_0000u32 + 10 + i as u32);
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": format!("node-{i}"), "labels": {"group": format!("g{}", i % guards)}},
                   "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]}})
        })
        .collect();
    create_all(&cp, items);
    let items = (0..guards)
        .map(|g| json!({"apiVersion": "egressguard.io/v1alpha1", "kind": "EgressGuard", "metadata": {"name": format!("guard-{g}")},
            "spec": {"nodeSelector": {"matchLabels": {"group": format!("g{g}")}}, "uplink": {"rate": "1gbit"},
                     "throttle": {"rate": "10mbit", "destinations": [{"port": 443}, {"port": 80}]}, "whitelist": ["203.0.113.0/24"]}}))
        .collect();
    create_all(&cp, items);
    let start = Instant::now();
    let op = Command::new(release_bin("egressguard-operator"))
        .args([
            "run",
            "--namespace",
            cluster::NAMESPACE,
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", &kc)
        .env(
            "RUST_LOG",
            std::env::var("EG_OPERATOR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(
            std::fs::File::create(dir.join("operator.log"))
                .map_or_else(|_| Stdio::null(), Stdio::from),
        )
        .spawn()
        .expect("operator");
    let pid = op.id();
    let _procs = Kill(vec![op]);
    let per_guard = (nodes / guards) as u64;
    loop {
        let plans = cp
            .kubectl_ok(&["get", "egns", "-o", "name"])
            .lines()
            .count();
        let gs: Value =
            serde_json::from_str(&cp.kubectl_ok(&["get", "eg", "-o", "json"])).unwrap_or_default();
        let done = gs["items"].as_array().is_some_and(|a| {
            a.iter()
                .all(|g| g["status"]["selectedNodes"].as_u64() == Some(per_guard))
        });
        if plans == nodes && done {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "operator did not converge: {plans} plans\n{}",
            std::fs::read_to_string(dir.join("operator.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let secs = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(3));
    let rss = rss_mib(pid);
    let cp_rss = ["etcd", "kube-apiserver", "kube-controller-manager"]
        .iter()
        .map(|c| cp.rss_mib(c))
        .sum();
    if std::env::var("EG_OPERATOR_LOG").is_ok() {
        let _ = std::fs::copy(
            dir.join("operator.log"),
            "/tmp/egressguard-operator-bench.log",
        );
    }
    (secs, rss, cp_rss)
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    if !available() {
        std::process::exit(2);
    }
    let (entries, nodes, guards) = if smoke {
        (1_000, 200, 10)
    } else {
        (10_000, 2_000, 50)
    };
    println!(
        "footprint benchmark ({}) against a real control plane",
        if smoke { "smoke" } else { "full" }
    );
    let mut missed = 0;
    let mut check = |what: &str, value: String, target: &str, ok: bool| {
        println!(
            "{what:<62} {value:>12}  target {target:<10} {}",
            if ok { "met" } else { "MISSED" }
        );
        missed += usize::from(!ok);
    };
    let a = agent_rss(entries);
    check(
        &format!("node-shaper run idle RSS, {entries}-entry plan enforced (MiB)"),
        format!("{a:.1}"),
        "< 20",
        smoke || a < 20.0,
    );
    let (secs, rss, cp_rss) = operator_resync(nodes, guards);
    println!(
        "{:<62} {cp_rss:>12.1}",
        "control plane RSS (etcd + apiserver + controller-manager, MiB)"
    );
    check(
        &format!("operator full resync, {nodes} nodes / {guards} guards (s)"),
        format!("{secs:.2}"),
        "< 10",
        smoke || secs < 10.0,
    );
    check(
        &format!("operator RSS after resync, {nodes} nodes / {guards} guards (MiB)"),
        format!("{rss:.1}"),
        "< 150",
        smoke || rss < 150.0,
    );
    if missed > 0 {
        std::process::exit(1);
    }
}
