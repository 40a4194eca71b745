//! Footprint benchmark (performance issue, target 3), against the
//! Kubernetes-API stand-in (not Kubernetes):
//! - `node-shaper run` idle RSS with a 10,000-entry plan enforced (< 20 MiB);
//! - `egressguard-operator run` with 2,000 nodes and 50 guards: time from
//!   process start to every plan and guard status written (< 10 s), and RSS
//!   afterwards (< 150 MiB).
//!
//! `cargo build --release --workspace --bins && cargo bench -p egressguard-e2e --bench footprint`
//! (`-- --smoke` uses 200 nodes, 10 guards and 1,000 entries and enforces nothing but function).

#[path = "../../node-shaper/tests/lab/mod.rs"]
mod lab;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lab::*;
use serde_json::{json, Value};

fn release_bin(name: &str) -> std::path::PathBuf {
    if name == "k8s-standin" {
        return env!("CARGO_BIN_EXE_k8s-standin").into();
    }
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

fn rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// One HTTP/1.1 request to the stand-in on loopback.
fn http(addr: &str, method: &str, path: &str, ctype: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).expect("connect stand-in");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("write");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read");
    let text = String::from_utf8_lossy(&resp);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn spawn_standin(netns: Option<&str>, kubeconfig: &str) -> (Child, String) {
    let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns])
                .arg(release_bin("k8s-standin"));
            c
        }
        None => Command::new(release_bin("k8s-standin")),
    };
    let mut child = cmd
        .args([
            "--crds",
            &crds.to_string_lossy(),
            "--kubeconfig",
            kubeconfig,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("stand-in");
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let addr = line.trim().trim_start_matches("listening on ").to_string();
    (child, addr)
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

fn agent_rss(entries: usize) -> f64 {
    let lab = Lab::new("fp");
    let kc = lab.dir.join("kc").to_string_lossy().into_owned();
    let (standin, _) = spawn_standin(Some(&lab.cli), &kc);
    let mut procs = Kill(vec![standin]);
    let wl: Vec<String> = (0..entries)
        .map(|i| {
            format!(
                "\"{}.{}.{}.0/24\"",
                11 + i / 65536,
                (i / 256) % 256,
                i % 256
            )
        })
        .collect();
    let plan = json!({
        "apiVersion": "egressguard.io/v1alpha1", "kind": "NodeShaping", "metadata": {"name": "node-a"},
        "spec": {"nodeName": "node-a", "enforce": true,
                 "shaping": {"interfaces": [DEV], "uplink": {"rate": "1gbit"}, "throttle": {"rate": "10mbit", "destinations": [{"port": 443}]},
                             "whitelist": serde_json::from_str::<Value>(&format!("[{}]", wl.join(","))).unwrap_or_default()}}
    });
    let f = lab.write_guard("plan.json", &plan.to_string());
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.cli,
            "kubectl",
            "--kubeconfig",
            &kc,
            "--request-timeout=20s",
            "create",
            "--validate=false",
            "-f",
            &f,
        ])
        .output()
        .expect("kubectl");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
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
    procs.0.push(agent);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.cli,
                "kubectl",
                "--kubeconfig",
                &kc,
                "--request-timeout=5s",
                "get",
                "nodeshapings.egressguard.io",
                "node-a",
                "-o",
                "jsonpath={.status.interfaces[0].enforced}",
            ])
            .output()
            .expect("kubectl");
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

fn operator_resync(nodes: usize, guards: usize) -> (f64, f64) {
    let dir = std::env::temp_dir().join(format!("egfp-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let kc = dir.join("kc").to_string_lossy().into_owned();
    let (standin, addr) = spawn_standin(None, &kc);
    let mut procs = Kill(vec![standin]);
    for i in 0..nodes {
        let ip = std::net::Ipv4Addr::from(0x0a64_0000u32 + 10 + i as u32);
        let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{i}"), "labels": {"group": format!("g{}", i % guards)}}});
        let (c, _) = http(
            &addr,
            "POST",
            "/api/v1/nodes",
            "application/json",
            &node.to_string(),
        );
        assert_eq!(c, 201);
        let st =
            json!({"status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]}});
        http(
            &addr,
            "PATCH",
            &format!("/api/v1/nodes/node-{i}/status"),
            "application/merge-patch+json",
            &st.to_string(),
        );
    }
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubernetes"}}, "addressType": "IPv4", "endpoints": [{"addresses": ["10.96.0.1"]}]});
    http(
        &addr,
        "POST",
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
        "application/json",
        &slice.to_string(),
    );
    for g in 0..guards {
        let guard = json!({"apiVersion": "egressguard.io/v1alpha1", "kind": "EgressGuard", "metadata": {"name": format!("guard-{g}")},
            "spec": {"nodeSelector": {"matchLabels": {"group": format!("g{g}")}}, "uplink": {"rate": "1gbit"},
                     "throttle": {"rate": "10mbit", "destinations": [{"port": 443}, {"port": 80}]}, "whitelist": ["203.0.113.0/24"]}});
        let (c, _) = http(
            &addr,
            "POST",
            "/apis/egressguard.io/v1alpha1/egressguards",
            "application/json",
            &guard.to_string(),
        );
        assert_eq!(c, 201);
    }
    let start = Instant::now();
    let op = Command::new(release_bin("egressguard-operator"))
        .args([
            "run",
            "--namespace",
            "default",
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
    procs.0.push(op);
    let per_guard = nodes / guards;
    loop {
        let (_, ns) = http(
            &addr,
            "GET",
            "/apis/egressguard.io/v1alpha1/nodeshapings",
            "application/json",
            "",
        );
        let (_, gs) = http(
            &addr,
            "GET",
            "/apis/egressguard.io/v1alpha1/egressguards",
            "application/json",
            "",
        );
        let plans = ns["items"].as_array().map_or(0, Vec::len);
        let done = gs["items"].as_array().is_some_and(|a| {
            a.iter()
                .all(|g| g["status"]["selectedNodes"].as_u64() == Some(per_guard as u64))
        });
        if plans == nodes && done {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "operator did not converge: {plans} plans"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let secs = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(3));
    let rss = rss_mib(pid);
    if std::env::var("EG_OPERATOR_LOG").is_ok() {
        let _ = std::fs::copy(
            dir.join("operator.log"),
            "/tmp/egressguard-operator-bench.log",
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    (secs, rss)
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
        "footprint benchmark ({}) against the Kubernetes-API stand-in",
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
    let (secs, rss) = operator_resync(nodes, guards);
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
