//! The compromised node as the adversary, end to end on the real API server
//! with NodeRestriction on: the node acts with its own kubelet credential (a
//! `system:node:NAME` client certificate) and tries to exempt itself, to
//! unshape itself while quarantined, and to claim another node's address.

use std::process::Command;
use std::time::Duration;

use egressguard_e2e::cluster::condition as cond;
use egressguard_e2e::site::{add_node, available, wait_for, Cluster};
use serde_json::Value;

const RECEIVER: u16 = 19566;
const TOKEN: &str = "fedcba9876543210fedcba9876543210";
/// A legal node name longer than a label value may be.
const LONG: &str = "a-node-name-that-is-seventy-characters-long-0123456789-abcdefghijklmn";

fn post(c: &Cluster, node: &str, fingerprint: &str) -> u16 {
    post_with(c, node, fingerprint, TOKEN)
}

fn post_with(c: &Cluster, node: &str, fingerprint: &str, token: &str) -> u16 {
    let path = c.dir.join(format!("alert-{fingerprint}.json"));
    std::fs::write(&path, format!(r#"{{"version":"4","status":"firing","receiver":"x","groupLabels":{{}},"commonLabels":{{}},"commonAnnotations":{{}},"externalURL":"","truncatedAlerts":0,"groupKey":"k","alerts":[{{"status":"firing","labels":{{"alertname":"NodeEgressSaturated","node":"{node}"}},"annotations":{{}},"startsAt":"2026-11-23T10:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"{fingerprint}"}}]}}"#)).expect("body");
    let o = Command::new("ip")
        .args(["netns", "exec", &c.api, "curl", "-s", "-o", "/dev/null"])
        .args(["-w", "%{http_code}", "--max-time", "10", "-X", "POST"])
        .args(["-H", "Content-Type: application/json"])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg("--data-binary")
        .arg(format!("@{}", path.display()))
        .arg(format!("http://127.0.0.1:{RECEIVER}/alertmanager"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn records(c: &Cluster, node: &str) -> Vec<Value> {
    let out = c.cp.kubectl_ok(&["get", "quarantines", "-o", "json"]);
    let v: Value = serde_json::from_str(&out).expect("json");
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|q| q["spec"]["nodeName"] == node)
        .cloned()
        .collect()
}

fn active(c: &Cluster, node: &str) -> bool {
    records(c, node)
        .iter()
        .any(|q| q["status"]["phase"] == "Active")
}

#[test]
fn e2e_a_node_cannot_exempt_unshape_or_impersonate_itself() {
    if !available() {
        return;
    }
    let mut c = Cluster::new(2);
    add_node(&c, "node-1", "idc-a", "10.230.1.2");
    add_node(&c, "node-2", "idc-a", "10.230.2.2");
    c.cp.add_node(LONG, "site: idc-a", Some("10.230.3.2"));
    c.start_agent(1);
    c.start_agent(2);
    let token_file = c.dir.join("webhook-token");
    std::fs::write(&token_file, TOKEN).expect("token");
    let receiver = format!("127.0.0.1:{RECEIVER}");
    c.start_operator_with(
        "op-trust",
        &[
            "--webhook-addr",
            &receiver,
            "--webhook-token-file",
            &token_file.display().to_string(),
        ],
    );
    // No Prometheus here: alerts are taken on the token alone (corroboration
    // is on by default only when the operator has a Prometheus).
    c.apply("apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: site}\nspec:\n  nodeSelector: {matchLabels: {site: idc-a}}\n  interfaces: [eg0]\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{protocol: TCP, port: 443}]}\n  mode: Auto\n  quarantine:\n    triggers: [{name: alert, alertmanager: {matchers: {alertname: NodeEgressSaturated}, nodeLabel: node}}]\n    release: {after: manual}\n    limits: {maxQuarantinedNodes: 3, cooldown: 1m}\n");
    // The long-named node has no agent: it stays Pending, the others watch.
    wait_for(&c, "the guard watches node-1 and node-2", 90, || {
        c.get("eg", "site").is_some_and(|g| {
            let watching = |n: &str| {
                g["status"]["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| s["name"] == n && s["state"] == "Watching")
            };
            watching("node-1") && watching("node-2")
        })
    });
    let g = c.get("eg", "site").expect("guard");
    let (status, reason) = cond(&g, "SelectorNodeWritable");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "KubeletSettableLabels"),
        "{g}"
    );

    let as_node = |node: &str, args: &[&str]| {
        let kc = c.cp.node_kubeconfig(node);
        c.cp.kubectl_as(&kc, args)
    };
    // The exemption label is out of a kubelet's reach (NodeRestriction)...
    let o = as_node(
        "node-1",
        &[
            "label",
            "node",
            "node-1",
            "node-restriction.kubernetes.io/egressguard-exclude=true",
        ],
    );
    assert!(!o.status.success(), "a kubelet set the exclusion label");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // ...and the old one, which it can still set, no longer exempts anything.
    let o = as_node(
        "node-1",
        &["label", "node", "node-1", "egressguard.io/exclude=true"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(post(&c, "node-1", "f1"), 200);
    wait_for(&c, "node-1 quarantined despite its own label", 60, || {
        active(&c, "node-1") && c.shaped(1)
    });
    wait_for(
        &c,
        "a Warning that the old label exempts nothing",
        30,
        || {
            c.cp.kubectl_ok(&[
                "get",
                "events",
                "-A",
                "--field-selector",
                "reason=LegacyExcludeLabelIgnored",
                "-o",
                "name",
            ])
            .lines()
            .count()
                >= 1
        },
    );

    // Quarantined, node-1 drops the guard's selector label: still shaped.
    let o = as_node("node-1", &["label", "node", "node-1", "site-"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        c.shaped(1),
        "a quarantined node unshaped itself by relabelling"
    );
    let plan = c.get("nodeshaping", "node-1").expect("plan kept");
    assert_eq!(plan["spec"]["enforce"], true, "{plan}");
    // The Quarantine says it holds.
    let q = records(&c, "node-1")
        .into_iter()
        .find(|q| q["status"]["phase"] == "Active")
        .expect("active");
    wait_for(&c, "Enforced=True on node-1's quarantine", 30, || {
        c.get("egq", q["metadata"]["name"].as_str().unwrap_or_default())
            .is_some_and(|q| cond(&q, "Enforced").0 == "True")
    });

    // node-2 claims node-1's address with its own credential: ambiguous.
    let patch = r#"{"status":{"addresses":[{"type":"InternalIP","address":"10.230.2.2"},{"type":"InternalIP","address":"10.230.1.2"}]}}"#;
    let kc2 = c.cp.node_kubeconfig("node-2");
    assert_eq!(
        c.cp.as_kubelet(&kc2, "PATCH", "/api/v1/nodes/node-2/status", patch),
        200
    );
    wait_for(&c, "the claimed address leaves every plan", 60, || {
        c.get("nodeshaping", "node-2").is_some_and(|p| {
            let protected = p["spec"]["protected"].to_string();
            !protected.contains("10.230.1.2") && protected.contains("10.230.2.2")
        })
    });
    let events = c.cp.kubectl_ok(&[
        "get",
        "events",
        "-A",
        "--field-selector",
        "reason=NodeAddressNotProtected",
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    assert!(events.contains("claimed by 2 Nodes"), "{events}");
    // An alert naming that address quarantines nobody.
    assert_eq!(post(&c, "10.230.1.2", "f2"), 200);

    // A 70-character node name is quarantined like any other.
    assert_eq!(post(&c, LONG, "f3"), 200);
    wait_for(&c, "the long-named node quarantined", 60, || {
        active(&c, LONG)
    });
    let long = records(&c, LONG);
    assert_eq!(long.len(), 1, "{long:?}");
    assert!(long[0]["metadata"]["labels"]["egressguard.io/node"]
        .as_str()
        .is_some_and(|v| v.starts_with("h-") && v.len() <= 63));
    // An object squatting on the name the next episode would take is never
    // written over; the rest of the notification is handled all the same.
    let squat = egressguard_operator::quarantine::object_name("site", "node-2", "alert#1");
    c.apply(&format!("apiVersion: egressguard.io/v1alpha1\nkind: Quarantine\nmetadata: {{name: {squat}}}\nspec: {{nodeName: node-1, guard: site, trigger: manual, reason: squatter}}\n"));
    assert_eq!(post(&c, "node-2", "f4"), 200);
    std::thread::sleep(Duration::from_secs(2));
    let held = c.get("egq", &squat).expect("the squatter");
    assert_eq!(held["spec"]["nodeName"], "node-1", "{held}");
    assert!(
        c.metrics(0)
            .contains("egressguard_webhook_alerts_total{outcome=\"name_conflict\"} 1"),
        "{}",
        c.metrics(0)
    );
    c.cp.kubectl_ok(&["delete", "egq", &squat, "--wait=true", "--timeout=60s"]);

    // The token Secret rotates (the kubelet swaps the file): the new token
    // works at once, the old one no longer does, without a restart.
    let rotated = "0123456789abcdef0123456789abcdef-rotated";
    std::fs::write(c.dir.join("webhook-token.new"), rotated).expect("token");
    std::fs::rename(c.dir.join("webhook-token.new"), &token_file).expect("rotate");
    assert_eq!(post(&c, "node-2", "f5"), 401);
    assert_eq!(post_with(&c, "node-2", "f5", rotated), 200);
    wait_for(
        &c,
        "node-2 quarantined through the rotated token",
        60,
        || active(&c, "node-2"),
    );
    assert_eq!(records(&c, "node-2").len(), 1);
    let metrics = c.metrics(0);
    assert!(
        metrics.contains("egressguard_webhook_alerts_total{outcome=\"unmapped\"} 1"),
        "{metrics}"
    );

    // The guard is held (it names a CIDRGroup that does not exist): its
    // kept plans still follow the quarantines. A person releases node-1.
    c.cp.kubectl_ok(&[
        "patch",
        "eg",
        "site",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"whitelistGroups":[{"name":"not-there"}]}}"#,
    ]);
    wait_for(&c, "the guard held", 30, || {
        c.get("eg", "site")
            .is_some_and(|g| cond(&g, "Ready").1 == "WhitelistUnresolved")
    });
    assert!(c.shaped(1));
    let name = records(&c, "node-1")
        .into_iter()
        .find(|q| q["status"]["phase"] == "Active")
        .and_then(|q| q["metadata"]["name"].as_str().map(String::from))
        .expect("node-1's quarantine");
    c.cp.kubectl_ok(&[
        "annotate",
        "egq",
        &name,
        "egressguard.io/release=checked while the guard is held",
    ]);
    wait_for(&c, "node-1 released while its guard is held", 60, || {
        !c.shaped(1)
    });
}
