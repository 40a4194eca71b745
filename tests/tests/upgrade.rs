//! End to end: `helm upgrade` from the previous chart version and `helm
//! rollback` to it, with live guards, a CIDRGroup and an Active quarantine,
//! on the real API server with the real Helm CLI. The kernel of every node is
//! polled every 100 ms throughout: it is never unshaped.
//!
//! The previous chart is the one at [`PREVIOUS`], the last commit before the
//! CRDs became templates (chart 0.1.0, which installed them from `crds/`, a
//! folder Helm never upgrades).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egressguard_e2e::cluster::{condition as cond, root, unique, TempDir};
use egressguard_e2e::site::{add_node, available, sh, wait_for, Cluster};

/// The commit whose chart is "the previous version" (chart 0.1.0).
const PREVIOUS: &str = "8d6cd30";

const GROUP: &str = "apiVersion: egressguard.io/v1alpha1\nkind: CIDRGroup\nmetadata: {name: partners}\nspec: {cidrs: [198.51.100.0/24]}\n";

/// node-1 under an Auto guard (quarantined below), node-2 under an Enforce
/// guard; both whitelist the group.
const GUARDS: &str = "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: auto}\nspec:\n  nodeSelector: {matchLabels: {site: a}}\n  interfaces: [eg0]\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{protocol: TCP, port: 443}]}\n  whitelistGroups: [{name: partners}]\n  mode: Auto\n  quarantine:\n    triggers: [{name: alert, alertmanager: {matchers: {alertname: NodeEgressSaturated}}}]\n    release: {after: manual}\n---\napiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: enforce}\nspec:\n  nodeSelector: {matchLabels: {site: b}}\n  interfaces: [eg0]\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{protocol: TCP, port: 443}]}\n  whitelistGroups: [{name: partners}]\n";

const QUARANTINE: &str = "apiVersion: egressguard.io/v1alpha1\nkind: Quarantine\nmetadata: {name: held}\nspec: {nodeName: node-1, guard: auto, trigger: manual, reason: upgrade test}\n";

/// The chart of [`PREVIOUS`], extracted from git into `dir`.
fn previous_chart(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("dir");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "git -C '{}' archive {PREVIOUS} charts/egressguard | tar -x -C '{}'",
            root().display(),
            dir.display()
        ))
        .output()
        .expect("git archive");
    assert!(
        out.status.success(),
        "the previous chart (commit {PREVIOUS}) could not be read from git: {} (a shallow clone? fetch the history)",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("charts/egressguard")
}

/// Polls every node's root qdisc every 100 ms until dropped; counts samples
/// and remembers every moment a node was unshaped.
struct Poller {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl Poller {
    fn start(nodes: Vec<String>) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut samples, mut unshaped) = (0, vec![]);
            let t0 = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                for ns in &nodes {
                    let o = sh(&[
                        "ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", "eg0",
                    ]);
                    if !String::from_utf8_lossy(&o.stdout).contains("qdisc htb e9: root") {
                        unshaped.push(format!("{ns} at {:.1}s", t0.elapsed().as_secs_f64()));
                    }
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            (samples, unshaped)
        });
        Poller {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn phase(c: &Cluster) -> String {
    c.get("egq", "held")
        .and_then(|q| q["status"]["phase"].as_str().map(String::from))
        .unwrap_or_default()
}

fn helm_ok(what: &str, out: std::process::Output) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn e2e_helm_upgrade_and_rollback_keep_quarantine_and_shaping() {
    if !available() {
        return;
    }
    let tmp = TempDir(std::env::temp_dir().join(format!("egchart-{}", unique())));
    let previous = previous_chart(&tmp.0);
    let mut c = Cluster::with_chart(2, &previous);
    add_node(&c, "node-1", "a", "10.230.1.2");
    add_node(&c, "node-2", "b", "10.230.2.2");
    c.apply(GROUP);
    c.apply(GUARDS);
    c.start_operator("op-1");
    c.start_agent(1);
    c.start_agent(2);
    c.apply(QUARANTINE);
    wait_for(&c, "node-1 quarantined and node-2 enforced", 60, || {
        phase(&c) == "Active"
            && c.shaped(1)
            && c.shaped(2)
            && c.get("eg", "enforce")
                .is_some_and(|g| cond(&g, "Ready").0 == "True")
    });
    // Under the old CRD the CIDRGroup has no status subresource.
    let crd = c.kubectl_ok(&["get", "crd", "cidrgroups.egressguard.io", "-o", "json"]);
    assert!(
        !crd.contains("\"status\": {}"),
        "the previous CRD already had a status subresource"
    );

    let poll = Poller::start(c.nodes.clone());
    let chart = root().join("charts/egressguard");
    // Chart 0.1.0 installed the CRDs from crds/, without Helm's ownership
    // labels: this upgrade takes them over (README, "Upgrading").
    helm_ok(
        "helm upgrade",
        c.cp.helm(
            &[
                "upgrade",
                egressguard_e2e::cluster::RELEASE,
                "--take-ownership",
            ],
            Some((&chart, &serde_json::json!({}))),
        ),
    );
    // The new schema is in force: the operator writes the group's status.
    wait_for(
        &c,
        "the CIDRGroup's status under the upgraded CRD",
        60,
        || {
            c.get("cidrgroup", "partners")
                .is_some_and(|g| cond(&g, "Ready") == ("True".into(), "Valid".into()))
        },
    );
    let crd: serde_json::Value = serde_json::from_str(&c.kubectl_ok(&[
        "get",
        "crd",
        "egressguards.egressguard.io",
        "-o",
        "json",
    ]))
    .expect("crd");
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "the CRDs are now the release's, kept on uninstall and rollback"
    );
    wait_for(&c, "the quarantine is Ready after the upgrade", 30, || {
        c.get("egq", "held")
            .is_some_and(|q| cond(&q, "Ready") == ("True".into(), "Enforced".into()))
    });
    assert_eq!(phase(&c), "Active");

    helm_ok("helm rollback", c.cp.helm_rollback(1));
    // The rolled-back release has no CRD templates; keep leaves them.
    for crd in [
        "egressguards.egressguard.io",
        "nodeshapings.egressguard.io",
        "quarantines.egressguard.io",
        "cidrgroups.egressguard.io",
    ] {
        c.kubectl_ok(&["get", "crd", crd]);
    }
    // A few passes under the old RBAC (no cidrgroups/status): enforcement
    // goes on.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(phase(&c), "Active", "the quarantine survived the rollback");
    let q = c.get("egq", "held").expect("quarantine");
    assert_eq!(cond(&q, "Enforced").0, "True", "{}", q["status"]);
    let ns = c.get("egns", "node-1").expect("plan");
    assert_eq!(ns["spec"]["enforce"], true, "{}", ns["spec"]);
    let (samples, unshaped) = poll.finish();
    eprintln!(
        "upgrade and rollback: {samples} polls of {} nodes every 100 ms, unshaped in {}",
        c.nodes.len(),
        unshaped.len()
    );
    assert!(samples > 50, "only {samples} polls");
    assert!(unshaped.is_empty(), "a node was unshaped: {unshaped:?}");
}

/// A cluster upgraded without the CRDs added since its first release: the
/// operator reconciles what it can and says what is missing, instead of
/// waiting for caches that never sync.
#[test]
fn e2e_missing_crds_are_reported_not_waited_for() {
    if !available() {
        return;
    }
    let mut c = Cluster::new(2);
    add_node(&c, "node-1", "a", "10.230.1.2");
    add_node(&c, "node-2", "b", "10.230.2.2");
    c.kubectl_ok(&[
        "delete",
        "crd",
        "cidrgroups.egressguard.io",
        "quarantines.egressguard.io",
    ]);
    let guards = GUARDS.replace("  whitelistGroups: [{name: partners}]\n", "");
    c.apply(&guards);
    c.start_operator("op-1");
    c.start_agent(1);
    c.start_agent(2);
    wait_for(
        &c,
        "the Enforce guard enforced without the new kinds",
        40,
        || {
            c.shaped(2)
                && c.get("eg", "enforce")
                    .is_some_and(|g| cond(&g, "Ready").0 == "True")
        },
    );
    let g = c.get("eg", "auto").expect("guard");
    wait_for(&c, "the Auto guard names the missing CRD", 30, || {
        c.get("eg", "auto").is_some_and(|g| {
            cond(&g, "CRDsInstalled") == ("False".into(), "CRDMissing".into())
                && cond(&g, "Stalled") == ("True".into(), "CRDMissing".into())
        })
    });
    let msg = c
        .get("eg", "auto")
        .map(|g| g["status"].to_string())
        .unwrap_or_default();
    assert!(
        msg.contains("quarantines.egressguard.io"),
        "{msg} (was {})",
        g["status"]
    );
    assert!(
        !msg.contains("cidrgroups.egressguard.io"),
        "the Auto guard names no group: {msg}"
    );
    // Installed again: the operator picks the kinds up and the condition goes.
    c.kubectl_ok(&[
        "apply",
        "-f",
        &root()
            .join("crds/egressguard.io_quarantines.yaml")
            .to_string_lossy(),
        "-f",
        &root()
            .join("crds/egressguard.io_cidrgroups.yaml")
            .to_string_lossy(),
    ]);
    wait_for(
        &c,
        "the Auto guard Ready once the CRDs are back",
        60,
        || {
            c.get("eg", "auto").is_some_and(|g| {
                cond(&g, "Ready").0 == "True" && cond(&g, "CRDsInstalled").0.is_empty()
            })
        },
    );
}
