//! End to end: what GitOps tools conclude about each kind, on the real API
//! server with the real operator and agent. kstatus itself (cli-utils
//! v0.37.2, the library Flux and Helm's `--wait` use, through the Go helper
//! `scripts/build-tools.sh` builds) and the chart's Argo CD health checks
//! (Lua 5.1) judge the objects as the server returns them, at each
//! transition: not processed yet, rolling out, in force, edited, invalid,
//! waiting for a reference, quarantined, refused, released, paused, deleting.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use egressguard_e2e::argocd;
use egressguard_e2e::cluster::condition as cond;
use egressguard_e2e::site::{add_node, available, sh, wait_for, Cluster};
use egressguard_e2e::tools::kstatus;

const GROUP: &str = "apiVersion: egressguard.io/v1alpha1\nkind: CIDRGroup\nmetadata: {name: partners}\nspec: {cidrs: [198.51.100.0/24]}\n";

fn guard(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: {name}}}\nspec:\n  interfaces: [eg0]\n  uplink: {{rate: 20Mbit}}\n  throttle: {{rate: 1Mbit, destinations: [{{protocol: TCP, port: 443}}]}}\n{extra}"
    )
}

/// The table the test prints: kind, transition, kstatus, Argo CD.
struct Table(Vec<[String; 4]>);

impl Table {
    /// Judges `obj` with both tools and checks what each concluded.
    fn judge(&mut self, obj: &serde_json::Value, transition: &str, want: (&str, &str)) {
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let k = kstatus(obj);
        let (argo, message) = argocd::health(obj);
        let got = (k[0].status.as_str(), argo.as_str());
        assert_eq!(
            got,
            want,
            "{kind} {transition}: kstatus says {:?} ({}), Argo CD {argo} ({message}); object status: {}",
            k[0].status,
            k[0].message,
            obj["status"]
        );
        self.0
            .push([kind, transition.into(), k[0].status.clone(), argo]);
    }

    /// Waits until `what`'s controller has observed its generation and
    /// kstatus judges it as `want`, then judges it with both tools.
    fn settle(
        &mut self,
        c: &Cluster,
        what: (&str, &str),
        transition: &str,
        want: (&str, &str),
        secs: u64,
    ) {
        let mut last = String::new();
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(o) = c.get(what.0, what.1) {
                let k = kstatus(&o);
                // Processed by its controller (not the schema's default),
                // and judged as expected.
                let observed = o["status"]["observedGeneration"] == o["metadata"]["generation"];
                if k[0].status == want.0 && (observed || want.0 == "Terminating") {
                    break;
                }
                last = format!(
                    "kstatus {} ({}); status {}",
                    k[0].status, k[0].message, o["status"]
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} {} {transition}: not {} after {secs}s; last: {last}\noperator log:\n{}",
                what.0,
                what.1,
                want.0,
                c.operator_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let obj = c.get(what.0, what.1).expect("object");
        self.judge(&obj, transition, want);
    }
}

/// `kubectl apply -o json`: the object as the server stored it, before any
/// controller could react.
fn applied(c: &Cluster, yaml: &str) -> serde_json::Value {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = c
        .dir
        .join(format!("apply-{}.yaml", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, yaml).expect("write");
    let out = c.kubectl_ok(&["apply", "-o", "json", "-f", &path.to_string_lossy()]);
    serde_json::from_str(&out).expect("applied object")
}

#[test]
fn e2e_kstatus_and_argo_cd_read_every_kind_and_transition() {
    if !available() {
        return;
    }
    let mut c = Cluster::new(1);
    add_node(&c, "node-1", "a", "10.230.1.2");
    let mut t = Table(vec![]);
    let progressing = ("InProgress", "Progressing");
    let current = ("Current", "Healthy");
    let failed = ("Failed", "Degraded");

    // Nobody has processed them: the schema's default status says so.
    let g = applied(&c, GROUP);
    assert_eq!(g["status"]["observedGeneration"], 0, "{g}");
    t.judge(&g, "created, operator not running", progressing);
    let idc = guard(
        "idc",
        "  nodeSelector: {matchLabels: {site: a}}\n  whitelistGroups: [{name: partners}]\n",
    );
    let g = applied(&c, &idc);
    t.judge(&g, "created, operator not running", progressing);

    // The operator plans; no agent runs yet: rolling out.
    c.start_operator("op-1");
    t.settle(&c, ("cidrgroup", "partners"), "valid", current, 30);
    t.settle(
        &c,
        ("eg", "idc"),
        "planned, agent not confirmed",
        progressing,
        30,
    );
    let ns = c.get("egns", "node-1").expect("plan");
    t.judge(&ns, "planned, agent not running", progressing);
    let g = c.get("eg", "idc").expect("guard");
    assert_eq!(
        cond(&g, "Reconciling"),
        ("True".into(), "Progressing".into())
    );

    // The agent enforces it: in force.
    c.start_agent(1);
    t.settle(&c, ("egns", "node-1"), "enforced by the agent", current, 40);
    t.settle(&c, ("eg", "idc"), "enforced on every node", current, 40);

    // An edit: the stored object is behind until the operator observes it.
    let edited = idc.replace("rate: 1Mbit", "rate: 2Mbit");
    let g = applied(&c, &edited);
    assert_eq!(g["metadata"]["generation"], 2);
    t.judge(&g, "edited, not observed yet", progressing);
    t.settle(&c, ("eg", "idc"), "edit enforced", current, 40);

    // A group whose list is invalid: only an edit fixes it.
    c.apply("apiVersion: egressguard.io/v1alpha1\nkind: CIDRGroup\nmetadata: {name: broken}\nspec: {cidrs: [198.51.100.1/24]}\n");
    t.settle(&c, ("cidrgroup", "broken"), "invalid entries", failed, 30);
    let b = c.get("cidrgroup", "broken").expect("group");
    assert_eq!(
        cond(&b, "Stalled"),
        ("True".into(), "InvalidEntries".into())
    );

    // A guard the operator refuses (a whitelist entry with host bits set): Failed, and how
    // long the first status took (the window the schema default closes).
    let start = Instant::now();
    c.apply(&guard(
        "wide",
        "  nodeSelector: {matchLabels: {site: nowhere}}\n  whitelist: [198.51.100.1/24]\n",
    ));
    t.settle(&c, ("eg", "wide"), "invalid spec", failed, 30);
    eprintln!(
        "first status of a new guard: {} ms after the apply returned",
        start.elapsed().as_millis()
    );
    let w = c.get("eg", "wide").expect("guard");
    assert_eq!(cond(&w, "Stalled"), ("True".into(), "InvalidSpec".into()));
    assert_eq!(cond(&w, "Ready").0, "False");

    // A reference the pipeline has not applied yet: waiting, not failed.
    c.apply(&guard(
        "later",
        "  nodeSelector: {matchLabels: {site: nowhere}}\n  whitelistGroups: [{name: not-yet}]\n",
    ));
    t.settle(
        &c,
        ("eg", "later"),
        "group not created yet",
        progressing,
        30,
    );
    let l = c.get("eg", "later").expect("guard");
    assert_eq!(
        cond(&l, "Reconciling"),
        ("True".into(), "WhitelistUnresolved".into())
    );

    // The node's guard becomes Auto: a manual quarantine goes Pending ->
    // Active and enforced (in force is the desired state), a second one for
    // the same node is refused, a release is final.
    let auto = guard(
        "idc",
        "  nodeSelector: {matchLabels: {site: a}}\n  whitelistGroups: [{name: partners}]\n  mode: Auto\n  quarantine:\n    triggers: [{name: alert, alertmanager: {matchers: {alertname: NodeEgressSaturated}}}]\n    release: {after: manual}\n",
    );
    c.apply(&auto);
    t.settle(&c, ("eg", "idc"), "Auto, watching", current, 30);
    let q = applied(&c, "apiVersion: egressguard.io/v1alpha1\nkind: Quarantine\nmetadata: {name: by-hand}\nspec: {nodeName: node-1, guard: idc, trigger: manual, reason: investigating}\n");
    t.judge(&q, "created, not admitted yet", progressing);
    t.settle(&c, ("egq", "by-hand"), "Active, enforced", current, 40);
    assert_eq!(
        c.get("egq", "by-hand")
            .map(|q| q["status"]["phase"].clone()),
        Some("Active".into())
    );
    c.apply("apiVersion: egressguard.io/v1alpha1\nkind: Quarantine\nmetadata: {name: again}\nspec: {nodeName: node-1, guard: idc, trigger: manual, reason: twice}\n");
    t.settle(
        &c,
        ("egq", "again"),
        "refused (already quarantined)",
        failed,
        30,
    );
    let a = c.get("egq", "again").expect("record");
    assert_eq!(
        cond(&a, "Stalled"),
        ("True".into(), "AlreadyQuarantined".into())
    );

    // Paused automatic quarantine: kstatus has no such state (Current);
    // Argo CD shows Suspended.
    c.apply(&auto.replace("  quarantine:\n", "  quarantine:\n    paused: true\n"));
    t.settle(
        &c,
        ("eg", "idc"),
        "automatic quarantine paused",
        ("Current", "Suspended"),
        30,
    );

    c.kubectl_ok(&[
        "annotate",
        "egq",
        "by-hand",
        "egressguard.io/release=checked by on-call",
    ]);
    // An annotation moves no generation: wait for the release itself.
    wait_for(&c, "the quarantine released", 30, || {
        c.get("egq", "by-hand")
            .is_some_and(|q| q["status"]["phase"] == "Released")
    });
    let q = c.get("egq", "by-hand").expect("record");
    t.judge(&q, "released", current);

    // Deleting while the node's agent is stopped: the finalizer holds the
    // guard until the node's shaping is gone.
    let pid = c.agents[0].id().to_string();
    sh(&["kill", "-STOP", &pid]);
    c.kubectl_ok(&["delete", "eg", "idc", "--wait=false"]);
    std::thread::sleep(Duration::from_millis(500));
    let d = c.get("eg", "idc").expect("held by its finalizer");
    t.judge(
        &d,
        "deleting, node not cleaned yet",
        ("Terminating", "Progressing"),
    );
    sh(&["kill", "-CONT", &pid]);
    wait_for(&c, "the guard's deletion completes", 40, || {
        c.get("eg", "idc").is_none()
    });

    eprintln!("| kind | transition | kstatus | Argo CD |\n|---|---|---|---|");
    for [kind, transition, k, a] in &t.0 {
        eprintln!("| {kind} | {transition} | {k} | {a} |");
    }
}
