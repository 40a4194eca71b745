//! End to end: CIDRGroups referenced from a guard, against a real control
//! plane with the chart's RBAC, one real agent in its own network namespace.
//! The plan names the guard and the groups, the guard's status the groups'
//! digests; the agent reads them (with its own read-only watches) and
//! programs their entries; a group edit reaches the kernel without a plan
//! rewrite; a missing group holds what runs.

use std::time::Duration;

use egressguard_e2e::cluster::condition as cond;
use egressguard_e2e::site::{add_node, available, sh, target_bin, wait_for, Cluster};

const GUARD: &str = "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: idc}\nspec:\n  interfaces: [eg0]\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{protocol: TCP, port: 443}]}\n  whitelist: [203.0.113.10/32]\n  whitelistGroups:\n  - name: payment-partners\n  - selector: {matchLabels: {egressguard.io/whitelist: business}}\n";

fn group(name: &str, labels: &str, cidrs: &[&str]) -> String {
    format!(
        "apiVersion: egressguard.io/v1alpha1\nkind: CIDRGroup\nmetadata: {{name: {name}, labels: {{{labels}}}}}\nspec:\n  cidrs: [{}]\n",
        cidrs.join(", ")
    )
}

fn message(g: &serde_json::Value, t: &str) -> String {
    g["status"]["conditions"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["type"] == t))
        .and_then(|c| c["message"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// `node-shaper explain` on node 1, as an on-call engineer runs it there.
fn explain(c: &Cluster, dst: &str) -> String {
    let state = c.dir.join("state-1");
    let o = sh(&[
        "ip",
        "netns",
        "exec",
        &c.nodes[0],
        "env",
        &format!("EGRESSGUARD_STATE_DIR={}", state.display()),
        &target_bin("node-shaper").to_string_lossy(),
        "explain",
        "--interface",
        "eg0",
        dst,
    ]);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn e2e_guard_whitelists_cidr_groups_by_reference() {
    if !available() {
        return;
    }
    let mut c = Cluster::new(1);
    add_node(&c, "node-1", "a", "10.230.1.2");
    c.start_operator("op-1");
    c.start_agent(1);

    // Created before its group: nothing is planned, and the guard says why.
    c.apply(GUARD);
    wait_for(&c, "WhitelistResolved=False naming the group", 30, || {
        c.get("eg", "idc").is_some_and(|g| {
            cond(&g, "WhitelistResolved") == ("False".into(), "GroupUnresolved".into())
                && message(&g, "WhitelistResolved")
                    .contains("CIDRGroup \"payment-partners\" does not exist")
                && cond(&g, "Ready").0 == "False"
        })
    });
    assert!(
        c.get("egns", "node-1").is_none(),
        "a plan was written with a smaller whitelist"
    );
    assert!(!c.shaped(1));

    c.apply(&group(
        "payment-partners",
        "",
        &["198.51.100.0/24", "192.0.2.0/25"],
    ));
    c.apply(&group(
        "cdn",
        "egressguard.io/whitelist: business",
        &["2001:db8:5::/48", "198.18.0.0/15"],
    ));
    wait_for(
        &c,
        "the node enforces the guard with both groups",
        40,
        || {
            c.shaped(1)
                && c.get("eg", "idc").is_some_and(|g| {
                    cond(&g, "Ready").0 == "True" && cond(&g, "WhitelistResolved").0 == "True"
                })
        },
    );
    // The plan names the guard and the groups; it copies neither.
    let plan = c.get("egns", "node-1").expect("plan");
    assert!(plan["spec"].get("shaping").is_none(), "{}", plan["spec"]);
    let groups: Vec<&str> = plan["spec"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    assert_eq!(groups, ["cdn", "payment-partners"]);
    let e = explain(&c, "198.51.100.7");
    assert!(
        e.contains("whitelist: destination 198.51.100.7 is inside 198.51.100.0/24, CIDRGroup payment-partners[0]"),
        "{e}"
    );
    let e = explain(&c, "198.19.4.4");
    assert!(e.contains("CIDRGroup cdn[1]"), "{e}");
    assert!(explain(&c, "203.0.113.99").contains("throttled"));

    // The plan names the groups; the guard's status, which the agent also
    // reads, names the digests the nodes enforce.
    assert!(plan["spec"]["groups"][1]["digest"].is_null(), "{plan}");
    let digest_of = |name: &str| {
        c.get("eg", "idc").and_then(|g| {
            g["status"]["groups"]
                .as_array()
                .and_then(|a| a.iter().find(|r| r["name"] == name).cloned())
                .map(|r| r["digest"].clone())
        })
    };
    let before = digest_of("payment-partners").expect("the status names the group");
    let plan_generation = plan["metadata"]["generation"].clone();

    // One group edit: the status's digest moves and the kernel follows; the
    // plan is not rewritten.
    c.apply(&group(
        "payment-partners",
        "",
        &["198.51.100.0/24", "192.0.2.0/25", "203.0.113.0/24"],
    ));
    wait_for(&c, "the edited group reaches the kernel", 30, || {
        explain(&c, "203.0.113.99").contains("CIDRGroup payment-partners[2]")
    });
    assert_ne!(digest_of("payment-partners"), Some(before));
    let plan = c.get("egns", "node-1").expect("plan");
    assert_eq!(
        plan["metadata"]["generation"], plan_generation,
        "a group edit rewrote the plan"
    );

    // The group goes away: the guard says so, the node keeps what it had.
    c.kubectl_ok(&["delete", "cidrgroup", "payment-partners"]);
    wait_for(&c, "WhitelistUnresolved reported", 30, || {
        c.get("eg", "idc")
            .is_some_and(|g| cond(&g, "Ready") == ("False".into(), "WhitelistUnresolved".into()))
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(c.shaped(1), "a missing group removed shaping");
    assert!(explain(&c, "203.0.113.99").contains("CIDRGroup payment-partners[2]"));
}
