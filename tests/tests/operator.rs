//! End to end: the real `egressguard-operator` and two real `node-shaper run`
//! agents against a real control plane (etcd, kube-apiserver and
//! kube-controller-manager from `scripts/dev-cluster.sh`), with the chart
//! installed by real Helm and every component authenticated as the chart's
//! ServiceAccount, so the chart's RBAC authorizes each call. Driven with kubectl.
//!
//! Topology, all created and removed by the test: an "api" network namespace
//! runs the control plane, the operator and kubectl; each node is its own
//! network namespace whose uplink `eg0` is a veth into the api namespace, so
//! every agent reaches the API server through the interface it shapes — which
//! is why the API endpoints must be (and are checked to be) protected.

use std::process::Command;
use std::time::{Duration, Instant};

use egressguard_e2e::cluster::{self, condition as cond};
use egressguard_e2e::site::{add_node, available, target_bin, wait_for, Cluster};
use serde_json::Value;

fn guard(name: &str, site: &str) -> String {
    format!(
        "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: {name}}}\nspec:\n  nodeSelector: {{matchLabels: {{site: {site}}}}}\n  interfaces: [eg0]\n  uplink: {{rate: 20Mbit}}\n  throttle: {{rate: 1Mbit, destinations: [{{protocol: TCP, port: 443}}]}}\n  whitelist: [203.0.113.10/32]\n"
    )
}

#[test]
fn e2e_operator_selects_protects_moves_resolves_conflicts_and_cleans_up() {
    if !available() {
        return;
    }
    let mut c = Cluster::new(2);
    // Nodes as kubelets would register them; node-3 has no agent here.
    add_node(&c, "node-1", "a", "10.230.1.2");
    add_node(&c, "node-2", "a", "10.230.2.2");
    add_node(&c, "node-3", "b", "10.230.3.2");
    // A kubelet that lies: its "InternalIP" is an internet address.
    add_node(&c, "liar", "b", "198.51.100.66");
    c.start_operator("op-1");
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
    // The real server's conditions serve `kubectl wait`.
    c.kubectl_ok(&["wait", "--for=condition=Ready", "eg/idc", "--timeout=30s"]);
    // Server-side apply ownership: a person edits a field of a plan the
    // operator owns (an update, as `kubectl edit` does); the operator takes it back.
    c.kubectl_ok(&[
        "patch",
        "egns",
        "node-1",
        "--type",
        "merge",
        "-p",
        "{\"spec\":{\"enforce\":false}}",
    ]);
    cluster::wait_for(
        "the operator restores spec.enforce and owns it again",
        20,
        || {
            let o = c.kubectl(&[
                "get",
                "egns",
                "node-1",
                "-o",
                "json",
                "--show-managed-fields",
            ]);
            serde_json::from_slice::<Value>(&o.stdout).is_ok_and(|p| {
                p["spec"]["enforce"] == true
                    && p["metadata"]["managedFields"].as_array().is_some_and(|m| {
                        m.iter().any(|f| {
                            f["manager"] == "egressguard-operator"
                                && f["operation"] == "Apply"
                                && f["fieldsV1"]["f:spec"]["f:enforce"].is_object()
                        })
                    })
            })
        },
        || format!("plan: {}\n{}", plan_with_managers(&c), c.operator_log()),
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
    // The liar's address is not protected anywhere, and that is reported on its Node.
    assert!(
        !protected
            .iter()
            .any(|(cidr, _)| cidr.starts_with("198.51.100.")),
        "a node widened the protected list: {protected:?}"
    );
    wait_for(&c, "NodeAddressNotProtected event on the liar", 20, || {
        c.kubectl_ok(&["get", "events.events.k8s.io", "-A", "-o", "json"])
            .contains("NodeAddressNotProtected")
    });
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

    // The real API server is killed and restarted (watches end, requests
    // fail), then etcd is paused and resumed: nothing changes, the controllers
    // reconnect and keep converging.
    c.cp.restart_apiserver(Duration::from_secs(2));
    c.cp.signal("etcd", "STOP");
    std::thread::sleep(Duration::from_secs(3));
    c.cp.signal("etcd", "CONT");
    std::thread::sleep(Duration::from_secs(4));
    assert!(c.shaped(1));
    assert_eq!(
        c.get("nodeshapings.egressguard.io", "node-1").expect("p")["metadata"]["generation"],
        plan_rv1,
        "API faults made the operator rewrite a plan"
    );

    // The operator dies and comes back: nothing is lost, nothing is rewritten.
    c.stop_operator("op-1");
    c.start_operator("op-1");
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

/// The chart's RBAC is what authorizes the operator: with one rule taken out
/// of its ClusterRole the operator reports the 403 (log, error metric, no
/// status written); with the rule back it converges.
#[test]
fn e2e_operator_runs_under_the_charts_rbac() {
    if !available() {
        return;
    }
    let mut c = Cluster::new(1);
    add_node(&c, "node-1", "a", "10.230.1.2");
    let role = format!("{}-operator", cluster::RELEASE);
    let original = c.kubectl_ok(&["get", "clusterrole", &role, "-o", "json"]);
    let mut cut: Value = serde_json::from_str(&original).expect("role json");
    let rules = cut["rules"].as_array_mut().expect("rules");
    let before = rules.len();
    rules.retain(|r| r["resources"] != serde_json::json!(["egressguards/status"]));
    assert_eq!(
        rules.len(),
        before - 1,
        "the chart grants egressguards/status"
    );
    cut["metadata"]["resourceVersion"] = Value::Null;
    c.apply(&cut.to_string());
    c.start_operator("op-1");
    c.start_agent(1);
    c.apply(&guard("idc", "a"));
    wait_for(
        &c,
        "the 403 reported in the log and the error metric",
        40,
        || {
            let log = c.operator_log();
            (log.contains("403") || log.to_lowercase().contains("forbidden"))
                && c.metrics(0)
                    .lines()
                    .find_map(|l| l.strip_prefix("egressguard_operator_reconcile_errors_total "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .is_some_and(|n| n > 0)
        },
    );
    // Only the schema's default status (nothing observed, no conditions).
    assert!(
        c.get("eg", "idc").is_some_and(
            |g| g["status"]["observedGeneration"] == 0 && g["status"]["conditions"].is_null()
        ),
        "status written without the rule"
    );
    // The rule back (the chart's own ClusterRole): the operator converges.
    let mut back: Value = serde_json::from_str(&original).expect("role json");
    back["metadata"]["resourceVersion"] = Value::Null;
    c.apply(&back.to_string());
    wait_for(&c, "Ready with the rule restored", 60, || {
        c.get("eg", "idc")
            .is_some_and(|g| cond(&g, "Ready").0 == "True" && g["status"]["enforcedNodes"] == 1)
    });
    assert!(c.shaped(1));
}

/// The operator Lease's holder.
fn holder(c: &Cluster) -> Option<String> {
    let o = c.kubectl(&[
        "get",
        "lease",
        "egressguard-operator",
        "-n",
        cluster::NAMESPACE,
        "-o",
        "json",
    ]);
    let l: Value = serde_json::from_slice(&o.stdout).ok()?;
    l["spec"]["holderIdentity"].as_str().map(str::to_string)
}

/// Two operators on the real `coordination.k8s.io` Lease: one leads, the
/// other takes over within the lease duration once the leader is killed.
#[test]
fn e2e_operator_leader_failover_on_a_real_lease() {
    if !available() {
        return;
    }
    let mut c = Cluster::new(1);
    add_node(&c, "node-1", "a", "10.230.1.2");
    c.start_operator("op-a");
    c.start_operator("op-b");
    wait_for(&c, "a leader", 30, || holder(&c).is_some());
    let leader = holder(&c).expect("leader");
    let other = if leader == "op-a" { "op-b" } else { "op-a" };
    let leader_index = if leader == "op-a" { 0 } else { 1 };
    assert!(c
        .metrics(leader_index)
        .contains("egressguard_operator_leader 1"));
    assert!(c
        .metrics(1 - leader_index)
        .contains("egressguard_operator_leader 0"));
    // The leader dies without releasing the Lease (SIGKILL).
    let killed = Instant::now();
    c.stop_operator(&leader);
    wait_for(&c, "the other replica takes the Lease", 30, || {
        holder(&c).as_deref() == Some(other)
    });
    let takeover = killed.elapsed();
    eprintln!("leader failover: {:.1} s", takeover.as_secs_f64());
    // The lease lasts 15 s from the last renewal (at most 5 s before the
    // kill); a follower looks every 2 s; slack for a loaded 2-core machine.
    assert!(
        takeover <= Duration::from_secs(22),
        "takeover took {takeover:?}, more than the 15 s lease plus a retry"
    );
    // And it works as the leader: a guard gets its plan.
    c.start_agent(1);
    c.apply(&guard("idc", "a"));
    wait_for(&c, "the new leader enforces", 40, || c.shaped(1));
}

/// node-1's plan as YAML with its managed fields: who wrote what, for failures.
fn plan_with_managers(c: &Cluster) -> String {
    c.kubectl_ok(&[
        "get",
        "egns",
        "node-1",
        "-o",
        "yaml",
        "--show-managed-fields",
    ])
}

fn set_rate(c: &Cluster, rate: &str) {
    let patch = format!(r#"{{"spec":{{"throttle":{{"rate":"{rate}"}}}}}}"#);
    c.cp.kubectl_ok(&["patch", "eg", "idc", "--type", "merge", "-p", &patch]);
}

/// Two writers: the leader's requests stall in the network (a proxy holds
/// them for 30 s, then delivers them), another replica takes over and moves
/// the plan on, and the old leader's late write must not land. The old
/// leader stops acting at its renew deadline (10 s, before the 15 s lease
/// can expire) and every write carries the resourceVersion it was computed
/// from, so the late one is refused with 409.
#[test]
fn e2e_a_stalled_old_leader_cannot_write_after_a_takeover() {
    if !available() {
        return;
    }
    let mut c = Cluster::new(1);
    add_node(&c, "node-1", "a", "10.230.1.2");
    let flag = c.dir.join("stall");
    let proxy = Command::new("ip")
        .args(["netns", "exec", &c.api, "python3"])
        .arg(egressguard_e2e::cluster::root().join("tests/tools/slow_proxy.py"))
        .args(["16443", "127.0.0.1", &c.cp.port.to_string()])
        .arg(&flag)
        .arg("30")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(c.dir.join("proxy.log")).expect("log"))
        .spawn()
        .expect("proxy");
    c.others.push(proxy);
    std::thread::sleep(Duration::from_millis(500));
    c.start_operator_at("op-old", "https://127.0.0.1:16443", &[]);
    wait_for(&c, "op-old leads", 30, || {
        holder(&c).as_deref() == Some("op-old")
    });
    c.start_operator("op-new");
    // The plan names the guard generation it was made from; the guard is
    // created at 1Mbit and each edit below adds 1Mbit: generation N is N Mbit.
    let rate = |c: &Cluster| {
        c.get("egns", "node-1").and_then(|p| {
            p["spec"]["guard"]["generation"]
                .as_i64()
                .map(|g| format!("{g}Mbit"))
        })
    };
    c.apply(&guard("idc", "a"));
    wait_for(&c, "the first plan", 30, || {
        rate(&c).as_deref() == Some("1Mbit")
    });

    // The old leader's path stalls; the edit it sees (watches still flow to
    // it) makes it write a plan that the network holds.
    std::fs::write(&flag, "").expect("flag");
    let stalled = Instant::now();
    set_rate(&c, "2Mbit");
    wait_for(&c, "op-new takes over", 40, || {
        holder(&c).as_deref() == Some("op-new")
    });
    wait_for(&c, "op-new writes the 2Mbit plan", 20, || {
        rate(&c).as_deref() == Some("2Mbit")
    });
    set_rate(&c, "3Mbit");
    wait_for(&c, "op-new writes the 3Mbit plan", 20, || {
        rate(&c).as_deref() == Some("3Mbit")
    });
    assert!(
        stalled.elapsed() < Duration::from_secs(30),
        "the takeover came after the held writes were delivered"
    );
    let generation = c
        .get("egns", "node-1")
        .map(|p| p["metadata"]["generation"].clone());
    // The held writes arrive; the plan must not move.
    while stalled.elapsed() < Duration::from_secs(36) {
        assert_eq!(
            rate(&c).as_deref(),
            Some("3Mbit"),
            "a late write of the old leader landed\n{}\nplan: {}",
            c.operator_log(),
            plan_with_managers(&c)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        c.get("egns", "node-1")
            .map(|p| p["metadata"]["generation"].clone()),
        generation
    );
    let _ = std::fs::remove_file(&flag);
    let log = c.operator_log();
    let old = log.split("--- operator op-new").next().unwrap_or_default();
    assert!(
        old.contains("no longer leads"),
        "the old leader never stopped acting:\n{old}"
    );
    // Its pass was stuck on a write the proxy held; the proxy delivered it
    // (late), and the plan above did not move: the server refused it.
    assert!(
        old.contains("reconcile pass abandoned"),
        "the old leader had no write in flight:\n{old}"
    );
    let proxy_log = std::fs::read_to_string(c.dir.join("proxy.log")).unwrap_or_default();
    assert!(
        proxy_log.lines().any(|l| l.starts_with("delivered")),
        "the held requests were never delivered late:\n{proxy_log}"
    );
}

/// Fail-safe and honest: an edit the schema admits but the validation
/// refuses keeps the last valid plan enforced (Ready=False, InvalidSpec);
/// a DryRun guard says DryRun, counts no enforced nodes and never keeps a
/// newer Enforce guard off a node.
#[test]
fn e2e_invalid_edit_keeps_shaping_and_dry_run_is_reported_as_such() {
    if !available() {
        return;
    }
    let mut c = Cluster::new(1);
    add_node(&c, "node-1", "a", "10.230.1.2");
    c.start_operator("op-1");
    c.start_agent(1);
    c.apply(&guard("old-dry", "a").replace("spec:\n", "spec:\n  mode: DryRun\n"));
    wait_for(&c, "the dry run reported", 40, || {
        c.get("eg", "old-dry").is_some_and(|g| {
            cond(&g, "Ready") == ("True".into(), "DryRun".into())
                && g["status"]["enforcedNodes"] == 0
        })
    });
    assert!(!c.shaped(1), "a dry run programmed the node");
    // A newer Enforce guard takes the node from the older dry run.
    c.apply(&guard("idc", "a"));
    wait_for(&c, "the Enforce guard shapes the node", 40, || {
        c.shaped(1)
            && c.get("eg", "idc")
                .is_some_and(|g| cond(&g, "Ready").0 == "True" && cond(&g, "Conflict").0 == "False")
    });
    let plan = c.get("egns", "node-1").expect("plan")["spec"].clone();
    // Throttle above the uplink: admitted by the schema, refused by validation.
    c.kubectl_ok(&[
        "patch",
        "eg",
        "idc",
        "--type",
        "merge",
        "-p",
        "{\"spec\":{\"throttle\":{\"rate\":\"30Mbit\"}}}",
    ]);
    wait_for(&c, "InvalidSpec reported", 30, || {
        c.get("eg", "idc")
            .is_some_and(|g| cond(&g, "Ready") == ("False".into(), "InvalidSpec".into()))
    });
    std::thread::sleep(Duration::from_secs(4));
    assert!(c.shaped(1), "an invalid edit removed shaping (fail-open)");
    assert_eq!(
        c.get("egns", "node-1").expect("plan")["spec"],
        plan,
        "plan changed"
    );
}
