//! End to end: the real `node-shaper run` agent against the Kubernetes-API
//! stand-in (not Kubernetes; see `egressguard_e2e::standin`), driven with the
//! machine's `kubectl`, asserting on kernel state, the NodeShaping status and
//! `/metrics`. The agent, the stand-in and kubectl all run inside the test's
//! own network namespace and talk over its loopback.

#[path = "../../node-shaper/tests/lab/mod.rs"]
mod lab;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lab::*;
use serde_json::Value;

struct Cluster {
    lab: Lab,
    standin: Child,
    agent: Option<Child>,
    kubeconfig: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(a) = &mut self.agent {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = self.standin.kill();
        let _ = self.standin.wait();
    }
}

fn bin(name: &str) -> std::path::PathBuf {
    if name == "k8s-standin" {
        return env!("CARGO_BIN_EXE_k8s-standin").into();
    }
    shaper_bin()
}

impl Cluster {
    fn start(tag: &str) -> Cluster {
        let lab = Lab::new(tag);
        let kubeconfig = lab.dir.join("kubeconfig").to_string_lossy().into_owned();
        let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
        let mut standin = Command::new("ip")
            .args(["netns", "exec", &lab.cli])
            .arg(bin("k8s-standin"))
            .args([
                "--crds",
                &crds.to_string_lossy(),
                "--kubeconfig",
                &kubeconfig,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("stand-in");
        let mut line = String::new();
        if let Some(out) = standin.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        assert!(
            line.starts_with("listening on"),
            "stand-in did not start: {line:?}"
        );
        Cluster {
            lab,
            standin,
            agent: None,
            kubeconfig,
        }
    }

    fn start_agent(&mut self) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.lab.cli])
            .arg(bin("node-shaper"))
            .args([
                "run",
                "--node-name",
                "node-a",
                "--metrics-addr",
                "127.0.0.1:9464",
                "--resync-seconds",
                "2",
            ])
            .env("KUBECONFIG", &self.kubeconfig)
            .env("EGRESSGUARD_STATE_DIR", &self.lab.dir)
            .env("RUST_LOG", "node_shaper=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agent");
        self.agent = Some(child);
    }

    /// Sends SIGTERM and returns the exit status and the agent's log.
    fn stop_agent(&mut self) -> (Option<i32>, String) {
        let mut a = self.agent.take().expect("agent running");
        // `ip netns exec` replaces itself with the agent, so the pid is the agent's.
        let _ = Command::new("kill")
            .args(["-TERM", &a.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Ok(Some(s)) = a.try_wait() {
                break s.code();
            }
            if Instant::now() > deadline {
                let _ = a.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut log = String::new();
        if let Some(mut e) = a.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut log);
        }
        (status, log)
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        let mut v = vec![
            "netns",
            "exec",
            &self.lab.cli,
            "kubectl",
            "--kubeconfig",
            &self.kubeconfig,
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
        let f = self.lab.write_guard("obj.yaml", yaml);
        self.kubectl_ok(&["apply", "--validate=false", "-f", &f]);
    }

    fn node_shaping(&self) -> Option<Value> {
        let o = self.kubectl(&["get", "nodeshapings.egressguard.io", "node-a", "-o", "json"]);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).expect("json"))
    }

    fn http(&self, path: &str) -> String {
        let o = self.lab.in_cli(&[
            "curl",
            "-sS",
            "--max-time",
            "3",
            &format!("http://127.0.0.1:9464{path}"),
        ]);
        if !o.status.success() {
            eprintln!("curl {path}: {}", String::from_utf8_lossy(&o.stderr));
        }
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn root_qdisc(&self) -> String {
        String::from_utf8_lossy(&self.lab.in_cli(&["tc", "qdisc", "show", "dev", DEV]).stdout)
            .into_owned()
    }
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {secs}s waiting for: {what}");
}

fn condition(ns: &Value, t: &str) -> (String, String) {
    let c = ns["status"]["conditions"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["type"] == t))
        .cloned()
        .unwrap_or_default();
    (
        c["status"].as_str().unwrap_or_default().to_string(),
        c["reason"].as_str().unwrap_or_default().to_string(),
    )
}

fn plan(rate: &str, whitelist: &str) -> String {
    format!(
        "apiVersion: egressguard.io/v1alpha1\nkind: NodeShaping\nmetadata: {{name: node-a}}\nspec:\n  nodeName: node-a\n  enforce: true\n  guard: {{name: idc, uid: u1, generation: 1}}\n  shaping:\n    interfaces: [{DEV}]\n    uplink: {{rate: 20Mbit}}\n    throttle: {{rate: {rate}, destinations: [{{port: 443}}]}}\n    whitelist: {whitelist}\n  protected:\n    - {{cidr: {SERVER4}/32, reason: kubernetes API endpoint}}\n"
    )
}

fn generation_applied(c: &Cluster, gen: i64) -> bool {
    c.node_shaping().is_some_and(|n| {
        n["status"]["observedGeneration"] == gen && n["metadata"]["generation"] == gen
    })
}

#[test]
fn e2e_agent_enforces_repairs_updates_survives_restarts_and_removes() {
    if !available() {
        return;
    }
    let mut c = Cluster::start("agent");
    c.start_agent();
    wait_for("agent /readyz", 20, || c.http("/readyz") == "ok\n");
    assert!(
        !c.root_qdisc().contains("e9:"),
        "shaping without a plan: {}",
        c.root_qdisc()
    );

    // A plan arrives: the kernel gets it, the status says so.
    c.apply(&plan("1Mbit", &format!("[{WHITE4}/32]")));
    wait_for(
        "tree in the kernel and status observedGeneration 1",
        20,
        || c.root_qdisc().contains("qdisc htb e9: root") && generation_applied(&c, 1),
    );
    let ns = c.node_shaping().expect("object");
    assert_eq!(condition(&ns, "Ready"), ("True".into(), "Enforced".into()));
    let iface = &ns["status"]["interfaces"][0];
    assert_eq!(iface["name"], DEV);
    assert_eq!(iface["enforced"], true);
    if iface["leaf"] == "pfifo" {
        // This kernel has no sch_sfq: degraded, visibly.
        assert_eq!(
            condition(&ns, "Degraded"),
            ("True".into(), "QdiscFallback".into())
        );
    }
    let metrics = c.http("/metrics");
    assert!(
        metrics.contains(&format!("egressguard_enforced{{interface=\"{DEV}\"}} 1")),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("egressguard_class_bytes_total{{guard=\"idc\",interface=\"{DEV}\",class=\"throttled\"}}")), "{metrics}");

    // Drift: someone deletes the root qdisc; the next resync repairs it.
    c.lab.in_cli(&["tc", "qdisc", "del", "dev", DEV, "root"]);
    assert!(!c.root_qdisc().contains("e9:"));
    wait_for("drift repaired", 15, || {
        c.root_qdisc().contains("qdisc htb e9: root")
    });

    // An update changes the class in place.
    c.apply(&plan("2Mbit", &format!("[{WHITE4}/32]")));
    wait_for("generation 2 applied", 20, || generation_applied(&c, 2));
    let classes =
        String::from_utf8_lossy(&c.lab.in_cli(&["tc", "class", "show", "dev", DEV]).stdout)
            .into_owned();
    assert!(
        classes.contains("class htb e9:10 parent e9:1") && classes.contains("rate 2Mbit"),
        "{classes}"
    );

    // API faults: failed requests and dropped watches do not touch the kernel,
    // and the agent converges once the API answers again.
    let before = c.lab.tc_dump();
    let faults = c
        .lab
        .write_guard("faults.json", "{\"failNext\": 5, \"code\": 500}");
    c.kubectl_ok(&["create", "--raw", "/standin/faults", "-f", &faults]);
    c.kubectl_ok(&["create", "--raw", "/standin/drop-watches", "-f", &faults]);
    // Compaction: the agent's watch resumes from a forgotten resourceVersion,
    // gets 410 Gone, and must re-list.
    c.kubectl_ok(&["create", "--raw", "/standin/compact", "-f", &faults]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.lab.tc_dump(), before, "API faults changed the kernel");
    c.apply(&plan("3Mbit", &format!("[{WHITE4}/32]")));
    wait_for("generation 3 applied after faults", 30, || {
        generation_applied(&c, 3)
    });

    // SIGTERM leaves enforcement in place; a restarted agent writes nothing new.
    let (code, log) = c.stop_agent();
    assert_eq!(code, Some(0), "agent exit: {log}");
    assert!(log.contains("leaving enforcement in place"), "{log}");
    assert!(
        c.root_qdisc().contains("qdisc htb e9: root"),
        "SIGTERM removed shaping"
    );
    let kept = c.lab.tc_dump();
    c.start_agent();
    wait_for("restarted agent ready", 20, || c.http("/readyz") == "ok\n");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.lab.tc_dump(), kept, "a restart disturbed the tree");

    // An invalid plan (passes the schema, fails validation: throttle above the
    // uplink) leaves the kernel as it is.
    c.apply(&plan("30Mbit", &format!("[{WHITE4}/32]")));
    wait_for("invalid plan reported", 20, || {
        c.node_shaping().is_some_and(|n| {
            n["status"]["observedGeneration"] == 4
                && condition(&n, "Ready") == ("False".into(), "InvalidPlan".into())
        })
    });
    assert_eq!(c.lab.tc_dump(), kept, "an invalid plan changed the kernel");

    // The plan goes away: shaping is removed.
    c.kubectl_ok(&["delete", "nodeshapings.egressguard.io", "node-a"]);
    wait_for("shaping removed", 20, || !c.root_qdisc().contains("e9:"));
}

#[test]
fn standin_refuses_invalid_objects_and_stale_writes() {
    if !available() {
        return;
    }
    let c = Cluster::start("standin");
    let bad = "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: bad}\nspec:\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{port: 70000}]}\n";
    let f = c.lab.write_guard("bad.yaml", bad);
    let o = c.kubectl(&["create", "--validate=false", "-f", &f]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "spec.throttle.destinations[0].port in body should be less than or equal to 65535"
        ),
        "{err}"
    );
    // Schema patterns: a byte-rate unit is refused by the API itself.
    let mbps = "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: mbps}\nspec:\n  uplink: {rate: 20mbps}\n  throttle: {rate: 1Mbit, destinations: [{port: 443}]}\n";
    let f = c.lab.write_guard("mbps.yaml", mbps);
    let o = c.kubectl(&["create", "--validate=false", "-f", &f]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("spec.uplink.rate in body should match"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let good = "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: good}\nspec:\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{port: 443}]}\n";
    let f = c.lab.write_guard("good.yaml", good);
    c.kubectl_ok(&["create", "--validate=false", "-f", &f]);
    let rv0: Value = serde_json::from_str(&c.kubectl_ok(&[
        "get",
        "egressguards.egressguard.io",
        "good",
        "-o",
        "json",
    ]))
    .expect("json");
    let rv0 = rv0["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // Spec changes bump the generation; status writes do not.
    c.kubectl_ok(&[
        "patch",
        "egressguards.egressguard.io",
        "good",
        "--type",
        "merge",
        "-p",
        "{\"spec\":{\"throttle\":{\"rate\":\"2Mbit\"}}}",
    ]);
    // A write carrying the old resourceVersion is a conflict.
    let stale = format!("{{\"metadata\":{{\"resourceVersion\":\"{rv0}\"}},\"spec\":{{\"throttle\":{{\"rate\":\"5Mbit\"}}}}}}");
    let o = c.kubectl(&[
        "patch",
        "egressguards.egressguard.io",
        "good",
        "--type",
        "merge",
        "-p",
        &stale,
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("the object has been modified"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    c.kubectl_ok(&[
        "patch",
        "egressguards.egressguard.io",
        "good",
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        "{\"status\":{\"selectedNodes\":3}}",
    ]);
    let v: Value = serde_json::from_str(&c.kubectl_ok(&[
        "get",
        "egressguards.egressguard.io",
        "good",
        "-o",
        "json",
    ]))
    .expect("json");
    assert_eq!(v["metadata"]["generation"], 2);
    assert_eq!(v["status"]["selectedNodes"], 3);
    // Finalizers hold deletion until they are removed.
    c.kubectl_ok(&[
        "patch",
        "egressguards.egressguard.io",
        "good",
        "--type",
        "merge",
        "-p",
        "{\"metadata\":{\"finalizers\":[\"egressguard.io/cleanup\"]}}",
    ]);
    c.kubectl_ok(&[
        "delete",
        "egressguards.egressguard.io",
        "good",
        "--wait=false",
    ]);
    let v: Value = serde_json::from_str(&c.kubectl_ok(&[
        "get",
        "egressguards.egressguard.io",
        "good",
        "-o",
        "json",
    ]))
    .expect("json");
    assert!(v["metadata"]["deletionTimestamp"].is_string());
    c.kubectl_ok(&[
        "patch",
        "egressguards.egressguard.io",
        "good",
        "--type",
        "merge",
        "-p",
        "{\"metadata\":{\"finalizers\":null}}",
    ]);
    assert!(!c
        .kubectl(&["get", "egressguards.egressguard.io", "good"])
        .status
        .success());
}
