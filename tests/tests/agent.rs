//! End to end: the real `node-shaper run` agent against a real control plane
//! (etcd, kube-apiserver, kube-controller-manager from `scripts/dev-cluster.sh`)
//! with the chart installed by real Helm, the agent authenticated as the chart's
//! ServiceAccount, asserting on kernel state, the NodeShaping status and
//! `/metrics`. The agent, the control plane and kubectl all run inside the
//! test's own network namespace and talk over its loopback.

#[path = "../../node-shaper/tests/lab/mod.rs"]
mod lab;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use egressguard_e2e::cluster::{self, condition, ControlPlane, Options};
use lab::*;
use serde_json::Value;

struct Cluster {
    agent: Option<Child>,
    // Declared before `lab`: the control plane stops before its namespace goes.
    cp: ControlPlane,
    lab: Lab,
    kubeconfig: std::path::PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(a) = &mut self.agent {
            let _ = a.kill();
            let _ = a.wait();
        }
    }
}

impl Cluster {
    fn start(tag: &str) -> Cluster {
        let lab = Lab::new(tag);
        let cp = ControlPlane::start(
            &lab.dir.join("cp"),
            Options {
                netns: Some(lab.cli.clone()),
                ..Options::default()
            },
        );
        cp.helm_install(&serde_json::json!({}));
        cp.add_node("node-a", "", None);
        let kubeconfig = cp.agent_kubeconfig("node-a", &cp.server);
        Cluster {
            agent: None,
            cp,
            lab,
            kubeconfig,
        }
    }

    fn start_agent(&mut self) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.lab.cli])
            .arg(shaper_bin())
            .args([
                "run",
                "--node-name",
                "node-a",
                "--metrics-addr",
                "127.0.0.1:9464",
                "--probe-addr",
                "127.0.0.1:9465",
                "--resync-seconds",
                "2",
            ])
            .env("KUBECONFIG", &self.kubeconfig)
            .env("EGRESSGUARD_STATE_DIR", &self.lab.dir)
            .env(
                "EGRESSGUARD_DAEMONSET",
                format!("{}/{}-node-shaper", cluster::NAMESPACE, cluster::RELEASE),
            )
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
        cluster::signal(a.id(), "TERM");
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

    fn node_shaping(&self) -> Option<Value> {
        self.cp.get("nodeshapings.egressguard.io", "node-a")
    }

    fn http(&self, path: &str) -> String {
        let o = self.lab.in_cli(&[
            "curl",
            "-sS",
            "--max-time",
            "3",
            &format!("http://127.0.0.1:9464{path}"),
        ]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// GET on the probe listener, as the kubelet sends it.
    fn probe(&self, path: &str) -> String {
        let o = self.lab.in_cli(&[
            "curl",
            "-sS",
            "--max-time",
            "3",
            &format!("http://127.0.0.1:9465{path}"),
        ]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn root_qdisc(&self) -> String {
        String::from_utf8_lossy(&self.lab.in_cli(&["tc", "qdisc", "show", "dev", DEV]).stdout)
            .into_owned()
    }
}

fn wait_for(what: &str, secs: u64, f: impl FnMut() -> bool) {
    cluster::wait_for(what, secs, f, String::new);
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
    c.cp.apply(&plan("1Mbit", &format!("[{WHITE4}/32]")));
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

    // Drift: someone deletes the root qdisc; the kernel's tc notification
    // has the agent repair it at once (not at the next resync), and say so.
    c.lab.in_cli(&["tc", "qdisc", "del", "dev", DEV, "root"]);
    wait_for("drift repaired", 15, || {
        c.root_qdisc().contains("qdisc htb e9: root")
    });
    wait_for("Tampered=True reason RootRemoved", 15, || {
        c.node_shaping()
            .is_some_and(|n| condition(&n, "Tampered") == ("True".into(), "RootRemoved".into()))
    });

    // An update changes the class in place.
    c.cp.apply(&plan("2Mbit", &format!("[{WHITE4}/32]")));
    wait_for("generation 2 applied", 20, || generation_applied(&c, 2));
    let classes =
        String::from_utf8_lossy(&c.lab.in_cli(&["tc", "class", "show", "dev", DEV]).stdout)
            .into_owned();
    assert!(
        classes.contains("class htb e9:10 parent e9:1") && classes.contains("rate 2Mbit"),
        "{classes}"
    );

    // API faults with the real processes: etcd paused (requests hang), the
    // API server killed and restarted (watches end, requests fail), and etcd
    // compacted past the agent's resourceVersion before a restart, so its watch
    // resumes into 410 Gone and must re-list. None of it touches the kernel.
    let before = c.lab.tc_dump();
    c.cp.signal("etcd", "STOP");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(c.lab.tc_dump(), before, "etcd paused: kernel changed");
    c.cp.signal("etcd", "CONT");
    c.cp.restart_apiserver(Duration::from_secs(2));
    assert_eq!(
        c.lab.tc_dump(),
        before,
        "API server restart: kernel changed"
    );
    let old_rv = c.node_shaping().expect("plan")["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    c.cp.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bump, namespace: default}\n");
    c.cp.compact_etcd();
    c.cp.restart_apiserver(Duration::from_secs(1));
    // The fault is real: a watch from the old resourceVersion is gone.
    let gone = c.cp.kubectl_ok(&[
        "get",
        "--raw",
        &format!("/apis/egressguard.io/v1alpha1/nodeshapings?watch=1&resourceVersion={old_rv}&timeoutSeconds=2"),
    ]);
    assert!(
        gone.contains("\"code\":410"),
        "no 410 after compaction: {gone}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.lab.tc_dump(), before, "API faults changed the kernel");
    c.cp.apply(&plan("3Mbit", &format!("[{WHITE4}/32]")));
    // Watches reconnect with kube-runtime's backoff (up to 30 s between
    // attempts after repeated failures while the server was away).
    wait_for("generation 3 applied after faults", 90, || {
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
    c.cp.apply(&plan("30Mbit", &format!("[{WHITE4}/32]")));
    wait_for("invalid plan reported", 20, || {
        c.node_shaping().is_some_and(|n| {
            n["status"]["observedGeneration"] == 4
                && condition(&n, "Ready") == ("False".into(), "InvalidPlan".into())
        })
    });
    assert_eq!(c.lab.tc_dump(), kept, "an invalid plan changed the kernel");

    // The plan goes away: shaping is removed.
    c.cp.kubectl_ok(&["delete", "nodeshapings.egressguard.io", "node-a"]);
    wait_for("shaping removed", 20, || !c.root_qdisc().contains("e9:"));
}

/// What the CRD promises is enforced by the real API server: OpenAPI ranges and
/// patterns, the CEL rule, the status subresource, printer columns.
#[test]
fn api_server_enforces_the_crd_schema_cel_and_printer_columns() {
    if !available() {
        return;
    }
    let c = Cluster::start("schema");
    let refused = |name: &str, spec: &str, expect: &str| {
        let yaml = format!(
            "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: {name}}}\nspec:\n{spec}"
        );
        let o = c.cp.apply_output(&yaml);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success(), "{name} was accepted");
        assert!(err.contains(expect), "{name}: expected {expect:?} in {err}");
    };
    refused(
        "port",
        "  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{port: 70000}]}\n",
        "spec.throttle.destinations[0].port: Invalid value: 70000: spec.throttle.destinations[0].port in body should be less than or equal to 65535",
    );
    refused(
        "mbps",
        "  uplink: {rate: 20mbps}\n  throttle: {rate: 1Mbit, destinations: [{port: 443}]}\n",
        "spec.uplink.rate: Invalid value: \"20mbps\": spec.uplink.rate in body should match",
    );
    refused(
        "protectport",
        "  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{port: 443}]}\n  protect: [{cidr: 192.0.2.1/32, endPort: 80}]\n",
        "spec.protect[0]: Invalid value",
    );
    // The CEL rule is evaluated by the server, with its message and field path.
    refused(
        "range",
        "  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{port: 443, endPort: 80}]}\n",
        "spec.throttle.destinations[0]: Invalid value: endPort must be at least port",
    );
    c.cp.apply("apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: good}\nspec:\n  mode: DryRun\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{port: 443}]}\n");
    // Bare numbers, as tc reads them (bits per second, bytes), are stored as written.
    c.cp.apply("apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: numbers}\nspec:\n  mode: DryRun\n  uplink: {rate: 20000000, burst: 1600}\n  throttle: {rate: 1Mbit, destinations: [{port: 443}]}\n");
    let n = c.cp.get("eg", "numbers").expect("guard");
    assert_eq!(n["spec"]["uplink"]["burst"], 1600);
    // Status is a subresource: a status write leaves the generation alone, a
    // spec write through the main resource cannot set status.
    c.cp.kubectl_ok(&[
        "patch",
        "eg",
        "good",
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        "{\"status\":{\"selectedNodes\":3,\"enforcedNodes\":2}}",
    ]);
    c.cp.kubectl_ok(&[
        "patch",
        "eg",
        "good",
        "--type",
        "merge",
        "-p",
        "{\"spec\":{\"throttle\":{\"rate\":\"2Mbit\"}},\"status\":{\"selectedNodes\":9}}",
    ]);
    let g = c.cp.get("eg", "good").expect("guard");
    assert_eq!(g["metadata"]["generation"], 2);
    assert_eq!(g["status"]["selectedNodes"], 3);
    // Printer columns, rendered by the server (short names included).
    let table = c.cp.kubectl_ok(&["get", "eg"]);
    let mut lines = table.lines();
    let head: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        head,
        ["NAME", "MODE", "NODES", "ENFORCED", "QUARANTINED", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(&row[..4], ["good", "DryRun", "3", "2"], "{table}");
    c.cp.apply(&plan("1Mbit", &format!("[{WHITE4}/32]")));
    let table = c.cp.kubectl_ok(&["get", "egns"]);
    let head: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        head,
        ["NAME", "GUARD", "ENFORCE", "APPLIED", "AGE"],
        "{table}"
    );
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("node-a ")
                && l.contains(" idc ")
                && l.contains(" true ")),
        "{table}"
    );
}

/// A plan with a large whitelist (so an apply takes tens of milliseconds and
/// kills land inside it), derived from `seed`.
fn big_plan(seed: u32, rate: &str) -> String {
    let wl: Vec<String> = (0..4_000u32)
        .map(|i| {
            let v = seed * 7919 + i;
            format!("{}.{}.{}.0/24", 20 + v / 65536 % 60, v / 256 % 256, v % 256)
        })
        .chain((0..800u32).map(|i| format!("2001:db8:{seed:x}:{i:x}::/64")))
        .collect();
    plan(rate, &format!("[{}]", wl.join(", ")))
}

/// Crash safety end to end: the agent is SIGKILLed 20 times while plan
/// updates alternate between two large whitelists; started again, it
/// converges by itself, reports Ready, and the kernel holds exactly the plan.
#[test]
fn e2e_agent_converges_after_20_sigkills_during_plan_updates() {
    if !available() {
        return;
    }
    let mut c = Cluster::start("kills");
    let plans = [big_plan(1, "1Mbit"), big_plan(2, "2Mbit")];
    let mut rng = 0x9e37_79b9_u32;
    for kill in 0..20 {
        c.cp.apply(&plans[kill % 2]);
        c.start_agent();
        // Somewhere inside the start-up apply or the next update.
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        std::thread::sleep(Duration::from_millis(u64::from(20 + rng % 400)));
        if kill % 3 == 0 {
            c.cp.apply(&plans[(kill + 1) % 2]);
            std::thread::sleep(Duration::from_millis(u64::from(rng % 60)));
        }
        let mut a = c.agent.take().expect("agent");
        cluster::signal(a.id(), "KILL");
        let _ = a.wait();
    }
    // The last word is plan 0; the agent comes back and converges alone.
    c.cp.apply(&plans[0]);
    let gen = c.node_shaping().expect("plan")["metadata"]["generation"].clone();
    c.start_agent();
    wait_for("Ready after 20 kills", 60, || {
        c.node_shaping().is_some_and(|n| {
            n["status"]["observedGeneration"] == gen
                && condition(&n, "Ready") == ("True".into(), "Enforced".into())
        })
    });
    // The kernel holds exactly the plan: a verified apply of the same plan
    // as a file writes nothing.
    // (The agent also protects the API server it talks to, 127.0.0.1 here.)
    let f = c.lab.write_guard(
        "final.yaml",
        &format!(
            "{}    - {{cidr: 127.0.0.1/32, reason: API server of this agent}}\n",
            plans[0]
        ),
    );
    let o = c
        .lab
        .shaper(&["apply", "-f", &f, "--interface", DEV, "--verify"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("0 writes") || out.contains("no changes"),
        "{out}"
    );
    // And traffic is shaped: the throttled port gets the 1 Mbit class
    // (WHITE4 is in neither big whitelist; SERVER4 plays the protected API server).
    c.lab.serve(443);
    let r = c.lab.measure(WHITE4, 443, 4, &[]);
    let l2 = l2_rate(r.goodput, false);
    eprintln!(
        "after 20 kills: throttled flow {:.2} Mbit/s (class 1 Mbit)",
        l2 / 1e6
    );
    assert!(l2 < 1.15e6, "throttle not enforced: {l2}");
}

/// The chart's ValidatingAdmissionPolicy: an agent's token (bound to its
/// node, as a DaemonSet pod's is) may write its own node's NodeShaping
/// status and is refused on another node's; RBAC alone would allow both.
#[test]
fn an_agent_cannot_write_another_nodes_status() {
    if !available() {
        return;
    }
    let c = Cluster::start("vap");
    c.cp.add_node("node-b", "", None);
    for n in ["node-a", "node-b"] {
        c.cp.apply(&format!(
            "apiVersion: egressguard.io/v1alpha1\nkind: NodeShaping\nmetadata: {{name: {n}}}\nspec: {{nodeName: {n}, enforce: false}}\n"
        ));
    }
    let token =
        c.cp.token(&format!("{}-node-shaper", cluster::RELEASE), Some("node-a"));
    let patch = |node: &str, dry: bool| -> Value {
        let o =
            c.cp.command("curl")
                .args(["-sS", "--cacert"])
                .arg(c.cp.dir.join("pki/ca.crt"))
                .args([
                    "-H",
                    &format!("Authorization: Bearer {token}"),
                    "-H",
                    "Content-Type: application/merge-patch+json",
                    "-X",
                    "PATCH",
                    "-d",
                    "{\"status\":{\"observedGeneration\":1}}",
                    &format!(
                        "{}/apis/egressguard.io/v1alpha1/nodeshapings/{node}/status{}",
                        c.cp.server,
                        if dry { "?dryRun=All" } else { "" }
                    ),
                ])
                .output()
                .expect("curl");
        serde_json::from_slice(&o.stdout).expect("json")
    };
    // The API server loads admission policies asynchronously after they are
    // created: wait until a dry run (admitted, never stored) is refused.
    let deadline = Instant::now() + Duration::from_secs(60);
    while patch("node-b", true)["code"] != 422 {
        assert!(Instant::now() < deadline, "the policy never took effect");
        std::thread::sleep(Duration::from_millis(200));
    }
    let own = patch("node-a", false);
    assert_eq!(own["kind"], "NodeShaping", "own status refused: {own}");
    let other = patch("node-b", false);
    assert_eq!(other["code"], 422, "{other}");
    assert!(
        other["message"].as_str().is_some_and(
            |m| m.contains("node-shaper on node-a may only write its own node's NodeShaping")
        ),
        "{other}"
    );
    // The refused write changed nothing: only the schema's default status.
    assert!(c
        .cp
        .get("egns", "node-b")
        .is_some_and(|n| n["status"] == serde_json::json!({"observedGeneration": 0})));
}

/// The agents write Leases (their heartbeats) in the release namespace, where
/// the operator's leader Lease lives too. The chart's policy lets an agent
/// write only its own node's heartbeat: not the leader Lease, not another
/// node's heartbeat, and it cannot hand its own over.
#[test]
fn an_agent_writes_only_its_own_heartbeat_lease() {
    if !available() {
        return;
    }
    let c = Cluster::start("vaplease");
    let token =
        c.cp.token(&format!("{}-node-shaper", cluster::RELEASE), Some("node-a"));
    let leases = format!(
        "{}/apis/coordination.k8s.io/v1/namespaces/{}/leases",
        c.cp.server,
        cluster::NAMESPACE
    );
    // (method, URL, Lease name, holder, resourceVersion) -> the API server's answer.
    let send = |method: &str, url: &str, name: &str, holder: &str, rv: &str| -> Value {
        let rv = if rv.is_empty() {
            String::new()
        } else {
            format!(",\"resourceVersion\":\"{rv}\"")
        };
        let body = format!(
            "{{\"apiVersion\":\"coordination.k8s.io/v1\",\"kind\":\"Lease\",\"metadata\":{{\"name\":\"{name}\"{rv}}},\"spec\":{{\"holderIdentity\":\"{holder}\",\"leaseDurationSeconds\":15}}}}"
        );
        let o =
            c.cp.command("curl")
                .args(["-sS", "--cacert"])
                .arg(c.cp.dir.join("pki/ca.crt"))
                .args([
                    "-H",
                    &format!("Authorization: Bearer {token}"),
                    "-H",
                    "Content-Type: application/json",
                    "-X",
                    method,
                    "-d",
                    &body,
                    url,
                ])
                .output()
                .expect("curl");
        serde_json::from_slice(&o.stdout).expect("json")
    };
    let create = |name: &str, holder: &str| send("POST", &leases, name, holder, "");
    let deadline = Instant::now() + Duration::from_secs(60);
    let dry = format!("{leases}?dryRun=All");
    while send("POST", &dry, "egressguard-operator", "mallory", "")["code"] != 422 {
        assert!(Instant::now() < deadline, "the policy never took effect");
        std::thread::sleep(Duration::from_millis(200));
    }
    let refused = |v: &Value| {
        v["code"] == 422
            && v["message"].as_str().is_some_and(|m| {
                m.contains("node-shaper on node-a may only write its own heartbeat Lease")
            })
    };
    let leader = create("egressguard-operator", "node-a");
    assert!(refused(&leader), "the leader Lease: {leader}");
    let other = create("node-shaper-node-b", "node-b");
    assert!(refused(&other), "another node's heartbeat: {other}");
    let disguised = create("node-shaper-node-b", "node-a");
    assert!(refused(&disguised), "another node's name: {disguised}");
    let own = create("node-shaper-node-a", "node-a");
    assert_eq!(own["kind"], "Lease", "own heartbeat refused: {own}");
    // Renewing it is allowed; handing it over to another node is not.
    let url = format!("{leases}/node-shaper-node-a");
    let rv = own["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default();
    let renewed = send("PUT", &url, "node-shaper-node-a", "node-a", rv);
    assert_eq!(renewed["kind"], "Lease", "renewal refused: {renewed}");
    let rv = renewed["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default();
    let handed = send("PUT", &url, "node-shaper-node-a", "node-b", rv);
    assert!(refused(&handed), "holder handed over: {handed}");
}

/// The uninstall story: `helm uninstall` (real Helm, real API server) removes
/// the DaemonSet; the agent's SIGTERM then removes the shaping instead of
/// leaving the node shaped with nothing left to manage it. (While the
/// DaemonSet exists, SIGTERM keeps it: see the first test.)
#[test]
fn e2e_helm_uninstall_leaves_no_node_shaped() {
    if !available() {
        return;
    }
    let mut c = Cluster::start("uninstall");
    c.start_agent();
    c.cp.apply(&plan("1Mbit", &format!("[{WHITE4}/32]")));
    wait_for("shaped", 30, || {
        c.root_qdisc().contains("qdisc htb e9: root")
    });
    let o = c.cp.helm_uninstall();
    assert!(
        o.status.success(),
        "helm uninstall: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ds = c.cp.kubectl(&[
        "get",
        "daemonset",
        "-n",
        cluster::NAMESPACE,
        "eg-node-shaper",
    ]);
    assert!(
        String::from_utf8_lossy(&ds.stderr).contains("NotFound"),
        "the DaemonSet survived the uninstall: {}",
        String::from_utf8_lossy(&ds.stdout)
    );
    // The kubelet would now stop the pod.
    let (code, log) = c.stop_agent();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("the chart was uninstalled"), "{log}");
    // Helm deleted the agent's ServiceAccount and Role too: what its watch
    // saw decides, not a read on SIGTERM (which would be refused).
    assert!(
        log.contains("the watch saw this agent's DaemonSet"),
        "{log}"
    );
    assert!(
        !c.root_qdisc().contains("e9:"),
        "node left shaped after uninstall: {}",
        c.root_qdisc()
    );
}

/// Waits until the API server refuses the agent's own credentials to read
/// its DaemonSet with `refusal` in kubectl's message ("Forbidden",
/// "Unauthorized").
fn wait_refused(c: &Cluster, refusal: &str) {
    wait_for(&format!("the agent's credentials: {refusal}"), 30, || {
        let o = c.cp.kubectl_as(
            &c.kubeconfig,
            &[
                "get",
                "daemonset",
                "-n",
                cluster::NAMESPACE,
                "eg-node-shaper",
            ],
        );
        String::from_utf8_lossy(&o.stderr).contains(refusal)
    });
}

/// Fail safe on SIGTERM: an RBAC mistake is not an uninstall. With the
/// agent's bindings deleted (its requests get 403) and then its
/// ServiceAccount deleted (its token gets 401), SIGTERM keeps the shaping
/// and says why; the DaemonSet never went away.
#[test]
fn e2e_sigterm_with_refused_credentials_keeps_the_shaping() {
    if !available() {
        return;
    }
    let mut c = Cluster::start("rbac");
    c.start_agent();
    c.cp.apply(&plan("1Mbit", &format!("[{WHITE4}/32]")));
    wait_for("shaped", 30, || {
        c.root_qdisc().contains("qdisc htb e9: root")
    });
    assert!(c.probe("/healthz").contains("ok"), "probe listener");
    // An upgrade that breaks the agent's RBAC: both bindings gone.
    c.cp.kubectl_ok(&[
        "delete",
        "rolebinding",
        "-n",
        cluster::NAMESPACE,
        "eg-node-shaper",
    ]);
    c.cp.kubectl_ok(&["delete", "clusterrolebinding", "eg-node-shaper"]);
    wait_refused(&c, "Forbidden");
    let (code, log) = c.stop_agent();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("keeping the shaping") && log.contains("(403)"),
        "{log}"
    );
    assert!(!log.contains("the chart was uninstalled"), "{log}");
    assert!(
        c.root_qdisc().contains("qdisc htb e9: root"),
        "403 on SIGTERM unshaped the node: {}",
        c.root_qdisc()
    );
    // Started again without rights (it reads nothing, changes nothing), then
    // its ServiceAccount deleted: the token itself is refused.
    c.start_agent();
    wait_for("probe listener up", 30, || {
        c.probe("/healthz").contains("ok")
    });
    c.cp.kubectl_ok(&[
        "delete",
        "serviceaccount",
        "-n",
        cluster::NAMESPACE,
        "eg-node-shaper",
    ]);
    wait_refused(&c, "Unauthorized");
    let (code, log) = c.stop_agent();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("keeping the shaping") && log.contains("(401)"),
        "{log}"
    );
    assert!(
        c.root_qdisc().contains("qdisc htb e9: root"),
        "401 on SIGTERM unshaped the node: {}",
        c.root_qdisc()
    );
}

/// Creates objects with one `kubectl create` (a List manifest).
fn create_all(cp: &ControlPlane, items: Vec<Value>) {
    let f = cp.dir.join(format!("list-{}.json", cluster::unique()));
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    std::fs::write(&f, list.to_string()).expect("write list");
    let o = cp.kubectl(&["create", "-f", &f.to_string_lossy(), "-o", "name"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Polls `http://127.0.0.1:PORT/PATH` (argv 1 and 2) every 20 ms from
/// inside the agent's network namespace, each request on a new connection
/// as the kubelet's probes are; prints `ok|fail MILLISECONDS SENT_AT_MS`.
const POLLER: &str = r#"
import socket, sys, time
port, path = int(sys.argv[1]), sys.argv[2]
t0 = time.monotonic()
while True:
    t = time.monotonic()
    ok = False
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        d = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            d += c
        s.close()
        ok = d.startswith(b"HTTP/1.1 200")
    except OSError:
        pass
    print("ok" if ok else "fail", round((time.monotonic() - t) * 1000, 2), round((t - t0) * 1000), flush=True)
    time.sleep(0.02)
"#;

/// A [`POLLER`] running in the lab's client namespace.
struct Poller(ChildGuard);

impl Poller {
    fn start(lab: &Lab, port: u16, path: &str) -> Poller {
        Poller(ChildGuard(
            Command::new("ip")
                .args(["netns", "exec", &lab.cli, "python3", "-c", POLLER])
                .args([&port.to_string(), path])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("poller"),
        ))
    }

    /// Stops it; every request as (answered 200, milliseconds, sent at
    /// milliseconds after the poller started).
    fn stop(mut self) -> Vec<(bool, f64, f64)> {
        let _ = self.0 .0.kill();
        let mut out = String::new();
        if let Some(mut o) = self.0 .0.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut o, &mut out);
        }
        out.lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                let ok = f.next()? == "ok";
                Some((ok, f.next()?.parse().ok()?, f.next()?.parse().ok()?))
            })
            .collect()
    }
}

/// Netlink off the runtime: while the agent applies a whitelist of
/// `EG_BIG_APPLY` (default 100,000) entries read from CIDRGroups, `/healthz`
/// polled every 20 ms on the probe listener answers every time within
/// 100 ms, and `/metrics`, served by the agent's own runtime, within 1 s
/// (the apply alone takes seconds: on the runtime, it would hold a scrape
/// that long).
#[test]
fn e2e_probes_answer_within_100ms_during_a_big_apply() {
    if !available() {
        return;
    }
    let entries: usize = std::env::var("EG_BIG_APPLY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut c = Cluster::start("bigapply");
    c.start_agent();
    wait_for("probe listener up", 30, || {
        c.probe("/healthz").contains("ok")
    });
    let v6 = entries * 3 / 100;
    let wl = whitelist(entries - v6, v6);
    // 25,000 entries a group keeps each object far below etcd's 1.5 MiB.
    let mut groups = Vec::new();
    let mut refs = Vec::new();
    for (i, chunk) in wl.chunks(25_000).enumerate() {
        let name = format!("big-{i}");
        let digest = egressguard_crds::CidrGroupSpec {
            cidrs: chunk.to_vec(),
        }
        .digest();
        refs.push(serde_json::json!({"name": name, "digest": digest}));
        groups.push(
            serde_json::json!({"apiVersion": "egressguard.io/v1alpha1", "kind": "CIDRGroup",
            "metadata": {"name": name, "labels": {"test": "big"}}, "spec": {"cidrs": chunk}}),
        );
    }
    create_all(&c.cp, groups);
    create_all(
        &c.cp,
        vec![serde_json::json!({
        "apiVersion": "egressguard.io/v1alpha1", "kind": "EgressGuard", "metadata": {"name": "big"},
        "spec": {"interfaces": [DEV], "uplink": {"rate": "1gbit"}, "throttle": {"rate": "10mbit", "destinations": [{"port": 443}]},
                 "whitelistGroups": [{"selector": {"matchLabels": {"test": "big"}}}]}})],
    );
    let g = c.cp.get("eg", "big").expect("guard");
    let plan = serde_json::json!({
        "apiVersion": "egressguard.io/v1alpha1", "kind": "NodeShaping", "metadata": {"name": "node-a"},
        "spec": {"nodeName": "node-a", "enforce": true,
                 "guard": {"name": "big", "uid": g["metadata"]["uid"], "generation": g["metadata"]["generation"]},
                 "groups": refs}
    });
    let healthz = Poller::start(&c.lab, 9465, "/healthz");
    let metrics = Poller::start(&c.lab, 9464, "/metrics");
    // Some requests before the plan, then the plan and its whole apply.
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    create_all(&c.cp, vec![plan]);
    wait_for(&format!("{entries} entries enforced"), 300, || {
        let n = c.node_shaping().unwrap_or_default();
        n["status"]["interfaces"][0]["enforced"] == true
            && n["status"]["interfaces"][0]["filters"].as_u64() >= Some(entries as u64)
    });
    let applied = start.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let summary = |what: &str, polled: &[(bool, f64, f64)]| {
        let worst = polled.iter().map(|p| p.1).fold(0.0, f64::max);
        let failed = polled.iter().filter(|p| !p.0).count();
        let mut slowest = polled.to_vec();
        slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
        slowest.truncate(3);
        eprintln!(
            "{what} during the {entries}-entry apply ({:.1} s from plan to enforced status): {} requests, {failed} failed, slowest {worst:.1} ms; slowest three (ok, ms, sent at ms, the plan at about 500): {slowest:?}",
            applied.as_secs_f64(),
            polled.len()
        );
        assert!(
            polled.len() as f64 >= applied.as_secs_f64() * 5.0,
            "{what}: too few requests measured: {}",
            polled.len()
        );
        assert_eq!(failed, 0, "{what}: failed requests during the apply");
        worst
    };
    let healthz = summary("/healthz on the probe listener", &healthz.stop());
    let metrics = summary("/metrics on the agent's runtime", &metrics.stop());
    assert!(
        healthz < 100.0,
        "a probe took {healthz} ms during the apply"
    );
    assert!(
        metrics < 1000.0,
        "a scrape took {metrics} ms during the apply: the runtime was held"
    );
}

/// Kills and reaps a child on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
