//! Automatic quarantine end to end, with the real programs: a real control
//! plane, the operator, two agents shaping real interfaces, real Prometheus
//! and Alertmanager, and an exporter whose values the test sets. Every
//! assertion is what an on-call engineer would check: `kubectl get egq`,
//! the guard's conditions and Events, and tc state on each node.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use egressguard_e2e::cluster::{self, condition as cond};
use egressguard_e2e::monitoring::{self, Exporter, Ports};
use egressguard_e2e::site::{add_node, available, wait_for, Cluster};
use serde_json::Value;

const PORTS: Ports = Ports {
    exporter: 19100,
    prometheus: 19090,
    alertmanager: 19093,
    receiver: 19466,
};
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

struct Lab {
    c: Cluster,
    exporter: Exporter,
    token_file: PathBuf,
}

impl Lab {
    fn new() -> Lab {
        let mut c = Cluster::new(2);
        add_node(&c, "node-1", "idc-a", "10.230.1.2");
        add_node(&c, "node-2", "idc-a", "10.230.2.2");
        c.start_agent(1);
        c.start_agent(2);
        let (exporter, child) = Exporter::start(&c.api, &c.dir, PORTS.exporter);
        c.others.push(child);
        exporter.set(&[("node-1", 1e6), ("node-2", 1e6)]);
        monitoring::prometheus_config(&c.dir, PORTS, 5e6);
        let p = monitoring::start_prometheus(&c.api, &c.dir, PORTS);
        c.others.push(p);
        let token_file = c.dir.join("webhook-token");
        std::fs::write(&token_file, TOKEN).expect("token");
        let am = monitoring::start_alertmanager(&c.api, &c.dir, PORTS, &token_file);
        c.others.push(am);
        start_operator(&mut c, &token_file, "op-a");
        Lab {
            c,
            exporter,
            token_file,
        }
    }

    fn egq(&self) -> Vec<Value> {
        let out = self.c.cp.kubectl_ok(&["get", "quarantines", "-o", "json"]);
        let v: Value = serde_json::from_str(&out).expect("json");
        v["items"].as_array().cloned().unwrap_or_default()
    }

    fn phase_of(&self, node: &str, phase: &str) -> Vec<Value> {
        self.egq()
            .into_iter()
            .filter(|q| q["spec"]["nodeName"] == node && q["status"]["phase"] == phase)
            .collect()
    }

    /// Events with `reason`, one line each: `Kind/name: message`.
    fn events(&self, reason: &str) -> String {
        let out = self.c.cp.kubectl_ok(&[
            "get",
            "events",
            "-A",
            "--field-selector",
            &format!("reason={reason}"),
            "-o",
            "json",
        ]);
        let v: Value = serde_json::from_str(&out).unwrap_or_default();
        v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                format!(
                    "{}/{}: {}\n",
                    e["involvedObject"]["kind"].as_str().unwrap_or_default(),
                    e["involvedObject"]["name"].as_str().unwrap_or_default(),
                    e["message"].as_str().unwrap_or_default()
                )
            })
            .collect()
    }

    fn post(&self, auth: Option<&str>, body_file: &std::path::Path) -> u16 {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.c.api,
            "curl",
            "-s",
            "-o",
            "/dev/null",
        ])
        .args(["-w", "%{http_code}", "--max-time", "10", "-X", "POST"])
        .args(["-H", "Content-Type: application/json"]);
        if let Some(a) = auth {
            cmd.args(["-H", &format!("Authorization: Bearer {a}")]);
        }
        cmd.arg("--data-binary")
            .arg(format!("@{}", body_file.display()))
            .arg(format!("http://127.0.0.1:{}/alertmanager", PORTS.receiver));
        let o = cmd.output().expect("curl");
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

/// The value of counter `name` with `outcome`, 0 when absent.
fn counter(metrics: &str, name: &str, outcome: &str) -> f64 {
    let prefix = format!("{name}{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn start_operator(c: &mut Cluster, token_file: &std::path::Path, identity: &str) {
    let flags = monitoring::operator_flags(PORTS, token_file);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    c.start_operator_with(identity, &flags);
}

fn guard(name: &str, quarantine: &str) -> String {
    format!(
        "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: {name}}}\nspec:\n  nodeSelector: {{matchLabels: {{site: idc-a}}}}\n  interfaces: [eg0]\n  uplink: {{rate: 20Mbit}}\n  throttle: {{rate: 1Mbit, destinations: [{{protocol: TCP, port: 443}}]}}\n  mode: Auto\n  quarantine:\n{quarantine}"
    )
}

#[test]
fn e2e_a_prometheus_breach_quarantines_only_that_node_and_calm_releases_it() {
    if !available() {
        return;
    }
    let mut lab = Lab::new();
    let t_all = Instant::now();
    // Flapping must never quarantine: the breach has to hold for `for`.
    lab.c.apply(&guard(
        "site",
        "    triggers:\n      - {name: uplink, prometheus: {query: 'max by (node) (egressguard_test_transmit_bits)', above: 5e6, for: 3s, nodeLabel: node}}\n    release: {after: 6s, below: 2e6}\n    limits: {maxQuarantinedNodes: 1, cooldown: 30s}\n",
    ));
    wait_for(
        &lab.c,
        "the guard watches both nodes with metrics available",
        90,
        || {
            lab.c.get("eg", "site").is_some_and(|g| {
                cond(&g, "MetricsAvailable").0 == "True"
                    && g["status"]["selectedNodes"] == 2
                    && cond(&g, "Ready").1 == "Watching"
            })
        },
    );
    assert!(
        !lab.c.shaped(1) && !lab.c.shaped(2),
        "Auto must not shape a calm node"
    );
    for i in 0..8 {
        let v = if i % 2 == 0 { 9e6 } else { 1e6 };
        lab.exporter.set(&[("node-1", 1e6), ("node-2", v)]);
        std::thread::sleep(Duration::from_millis(1000));
    }
    lab.exporter.set(&[("node-1", 1e6), ("node-2", 1e6)]);
    assert!(
        lab.egq().is_empty(),
        "a flapping metric quarantined: {:?}",
        lab.egq()
    );

    // A held breach on node-1: quarantined, throttled in its kernel, node-2 untouched.
    let t0 = Instant::now();
    lab.exporter.set(&[("node-1", 9e6), ("node-2", 1e6)]);
    wait_for(&lab.c, "node-1 is throttled in the kernel", 60, || {
        lab.c.shaped(1)
    });
    let breach_to_kernel = t0.elapsed().as_secs_f64();
    assert!(
        breach_to_kernel >= 3.0,
        "quarantined after {breach_to_kernel:.1}s, before `for: 3s` held"
    );
    let active = lab.phase_of("node-1", "Active");
    assert_eq!(active.len(), 1, "{:?}", lab.egq());
    assert_eq!(active[0]["spec"]["trigger"], "uplink");
    assert_eq!(active[0]["spec"]["guard"], "site");
    assert!(active[0]["spec"]["evidence"]["value"]
        .as_str()
        .is_some_and(|v| v.starts_with('9')));
    assert!(!lab.c.shaped(2), "node-2 was throttled with node-1");
    let ns1 = lab.c.get("egns", "node-1").expect("plan");
    assert_eq!(ns1["spec"]["enforce"], true);
    // Prometheus (its scrapes release quarantines) is protected on every plan.
    assert!(
        ns1["spec"]["protected"].to_string().contains("Prometheus"),
        "{ns1}"
    );
    wait_for(&lab.c, "quarantinedNodes 1", 30, || {
        lab.c
            .get("eg", "site")
            .is_some_and(|g| g["status"]["quarantinedNodes"] == 1)
    });
    assert!(
        lab.events("Quarantined").contains("Node/node-1"),
        "{}",
        lab.events("Quarantined")
    );

    // node-2 breaches too: the cap (1) refuses, with an Event, and it stays unthrottled.
    lab.exporter.set(&[("node-1", 9e6), ("node-2", 9e6)]);
    wait_for(&lab.c, "a cap refusal for node-2", 60, || {
        lab.events("QuarantineRefused").contains("the cap is 1")
    });
    assert!(!lab.c.shaped(2));
    assert_eq!(lab.phase_of("node-2", "Active").len(), 0);
    lab.exporter.set(&[("node-1", 9e6), ("node-2", 1e6)]);

    // The operator restarts mid-quarantine: the quarantine and the throttle stay.
    let pid = lab.c.operators[0].1.id();
    cluster::signal(pid, "TERM");
    std::thread::sleep(Duration::from_secs(2));
    lab.c.stop_operator("op-a");
    let token = lab.token_file.clone();
    start_operator(&mut lab.c, &token, "op-a");
    std::thread::sleep(Duration::from_secs(8));
    assert!(lab.c.shaped(1), "a restart released node-1");
    assert_eq!(lab.phase_of("node-1", "Active").len(), 1, "{:?}", lab.egq());

    // Prometheus dies and node-1 calms down: unknown is not calm, nothing is released.
    let prom = lab.c.others.remove(1);
    let mut prom = prom;
    let _ = prom.kill();
    let _ = prom.wait();
    lab.exporter.set(&[("node-1", 1e6), ("node-2", 1e6)]);
    wait_for(&lab.c, "MetricsAvailable=False", 30, || {
        lab.c
            .get("eg", "site")
            .is_some_and(|g| cond(&g, "MetricsAvailable").0 == "False")
    });
    std::thread::sleep(Duration::from_secs(10));
    assert!(lab.c.shaped(1), "released while Prometheus was down");
    assert_eq!(lab.phase_of("node-1", "Active").len(), 1);

    // Prometheus returns: calm for `after` releases node-1, by the policy.
    let t_back = Instant::now();
    let p = monitoring::start_prometheus(&lab.c.api, &lab.c.dir, PORTS);
    lab.c.others.push(p);
    wait_for(&lab.c, "node-1 released and unthrottled", 90, || {
        !lab.c.shaped(1) && lab.phase_of("node-1", "Released").len() == 1
    });
    assert!(
        t_back.elapsed() >= Duration::from_secs(6),
        "released before the calm window"
    );
    let rel = &lab.phase_of("node-1", "Released")[0];
    assert!(
        rel["status"]["releasedBy"]
            .as_str()
            .is_some_and(|b| b.starts_with("policy:")),
        "{rel}"
    );
    assert!(lab.events("Released").contains("Node/node-1"));

    // Cooldown: a new breach right after the release is refused.
    lab.exporter.set(&[("node-1", 9e6), ("node-2", 1e6)]);
    wait_for(&lab.c, "a cooldown refusal", 60, || {
        lab.events("QuarantineRefused").contains("cooldown")
    });
    assert!(!lab.c.shaped(1));
    let metrics = lab.c.metrics(0);
    assert!(
        metrics.contains(
            "egressguard_quarantines_released_total{guard=\"site\",trigger=\"uplink\"} 1"
        ),
        "{metrics}"
    );
    eprintln!(
        "LATENCY prometheus breach sample -> kernel throttle: {breach_to_kernel:.2}s (for: 3s, scrape and evaluation 1s); scenario {:.0}s",
        t_all.elapsed().as_secs_f64()
    );
}

#[test]
fn e2e_alerts_and_people_quarantine_through_one_authenticated_door() {
    if !available() {
        return;
    }
    let lab = Lab::new();
    lab.c.apply(&guard(
        "site",
        "    triggers:\n      - {name: alert, alertmanager: {matchers: {alertname: NodeEgressSaturated}, nodeLabel: node}}\n    release: {after: 4s}\n    limits: {maxQuarantinedNodes: 2, cooldown: 1s}\n",
    ));
    wait_for(&lab.c, "the guard watches both nodes", 90, || {
        lab.c
            .get("eg", "site")
            .is_some_and(|g| cond(&g, "Ready").1 == "Watching")
    });

    // The real chain: Prometheus alert -> Alertmanager -> receiver -> Quarantine -> kernel.
    lab.exporter.set(&[("node-1", 1e6), ("node-2", 9e6)]);
    wait_for(&lab.c, "node-2 throttled through Alertmanager", 90, || {
        lab.c.shaped(2)
    });
    let q = lab.phase_of("node-2", "Active");
    assert_eq!(q.len(), 1, "{:?}", lab.egq());
    assert_eq!(
        q[0]["spec"]["evidence"]["labels"]["alertname"],
        "NodeEgressSaturated"
    );
    assert!(!lab.c.shaped(1));

    // The alert resolves; the policy (not the resolve itself) releases after 4s of calm.
    lab.exporter.set(&[("node-1", 1e6), ("node-2", 1e6)]);
    wait_for(
        &lab.c,
        "node-2 released after the alert resolved",
        90,
        || !lab.c.shaped(2) && lab.phase_of("node-2", "Released").len() == 1,
    );
    let rel = &lab.phase_of("node-2", "Released")[0];
    assert!(rel["status"]["alertResolvedAt"].is_string(), "{rel}");

    // Abuse of the receiver changes nothing.
    let dir = &lab.c.dir;
    let body = |name: &str, node: &str, starts: &str| {
        let path = dir.join(name);
        std::fs::write(&path, format!(r#"{{"version":"4","status":"firing","receiver":"x","groupLabels":{{}},"commonLabels":{{}},"commonAnnotations":{{}},"externalURL":"","truncatedAlerts":0,"groupKey":"k","alerts":[{{"status":"firing","labels":{{"alertname":"NodeEgressSaturated","node":"{node}"}},"annotations":{{}},"startsAt":"{starts}","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"f{node}"}}]}}"#)).expect("body");
        path
    };
    let n1 = body("n1.json", "node-1", "2026-11-23T10:00:00Z");
    let before = lab.egq().len();
    assert_eq!(lab.post(None, &n1), 401);
    assert_eq!(
        lab.post(Some("wrong-token-wrong-token-wrong-tok"), &n1),
        401
    );
    let garbage = dir.join("garbage.json");
    std::fs::write(&garbage, "{\"version\": \"4\", \"alerts\": [").expect("garbage");
    assert_eq!(lab.post(Some(TOKEN), &garbage), 400);
    let v3 = dir.join("v3.json");
    std::fs::write(&v3, r#"{"version":"3","alerts":[]}"#).expect("v3");
    assert_eq!(lab.post(Some(TOKEN), &v3), 400);
    let huge = dir.join("huge.json");
    std::fs::write(&huge, vec![b' '; 2 << 20]).expect("huge");
    assert_eq!(lab.post(Some(TOKEN), &huge), 413);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        lab.egq().len(),
        before,
        "a refused request changed something"
    );
    assert!(!lab.c.shaped(1));

    // A notification with the right token, for a node Prometheus does not
    // see firing: not corroborated, nothing stored. The same alert posted
    // straight to Alertmanager's unauthenticated API: the same.
    assert_eq!(lab.post(Some(TOKEN), &n1), 200);
    let am_alert = r#"[{"labels":{"alertname":"NodeEgressSaturated","node":"node-1"}}]"#;
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.c.api,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args([
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data",
            am_alert,
        ])
        .arg(format!(
            "http://127.0.0.1:{}/api/v2/alerts",
            PORTS.alertmanager
        ))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "200");
    wait_for(
        &lab.c,
        "the forged alerts refused as uncorroborated",
        30,
        || {
            counter(
                &lab.c.metrics(0),
                "egressguard_webhook_alerts_total",
                "uncorroborated",
            ) >= 2.0
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(lab.egq().len(), before, "a forged alert stored something");
    assert!(!lab.c.shaped(1));

    // node-1 really floods: the real chain quarantines it.
    let t0 = Instant::now();
    lab.exporter.set(&[("node-1", 9e6), ("node-2", 1e6)]);
    wait_for(&lab.c, "node-1 throttled through Alertmanager", 60, || {
        lab.c.shaped(1)
    });
    let alert_to_kernel = t0.elapsed().as_secs_f64();
    // 5,000 distinct fingerprints for node-1, in notifications of 1,000:
    // still one record, each answered in well under a second.
    let mut slowest = 0f64;
    let total = |m: &str, name: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let m0 = lab.c.metrics(0);
    for batch in 0..5 {
        let path = dir.join(format!("many-{batch}.json"));
        let alerts: Vec<String> = (0..1000)
            .map(|i| format!(r#"{{"status":"firing","labels":{{"alertname":"NodeEgressSaturated","node":"node-1","i":"{batch}-{i}"}},"annotations":{{}},"startsAt":"2026-11-23T10:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"m{batch}x{i}"}}"#))
            .collect();
        std::fs::write(&path, format!(r#"{{"version":"4","status":"firing","receiver":"x","groupLabels":{{}},"commonLabels":{{}},"commonAnnotations":{{}},"externalURL":"","truncatedAlerts":0,"groupKey":"k","alerts":[{}]}}"#, alerts.join(","))).expect("body");
        let t = Instant::now();
        assert_eq!(lab.post(Some(TOKEN), &path), 200);
        slowest = slowest.max(t.elapsed().as_secs_f64());
    }
    let node1: Vec<Value> = lab
        .egq()
        .into_iter()
        .filter(|q| q["spec"]["nodeName"] == "node-1")
        .collect();
    assert_eq!(
        node1.len(),
        1,
        "5,000 fingerprints left {} records",
        node1.len()
    );
    assert!(
        slowest < 1.0,
        "a 1,000-alert notification took {slowest:.2}s"
    );
    std::thread::sleep(Duration::from_secs(2));
    let m1 = lab.c.metrics(0);
    let passes = total(&m1, "egressguard_operator_reconciles_total")
        - total(&m0, "egressguard_operator_reconciles_total");
    let pass_time = (total(&m1, "egressguard_operator_reconcile_seconds_total")
        - total(&m0, "egressguard_operator_reconcile_seconds_total"))
        / passes.max(1.0);
    assert!(
        passes >= 1.0 && pass_time < 1.0,
        "{passes} passes, {pass_time:.3}s each"
    );
    let over = dir.join("over.json");
    let alerts = vec![r#"{"status":"firing","labels":{}}"#; 1001].join(",");
    std::fs::write(&over, format!(r#"{{"version":"4","alerts":[{alerts}]}}"#)).expect("over");
    assert_eq!(lab.post(Some(TOKEN), &over), 413);
    let metrics = lab.c.metrics(0);
    for (name, outcome, at_least) in [
        ("egressguard_webhook_requests_total", "unauthorized", 2.0),
        ("egressguard_webhook_requests_total", "bad_request", 2.0),
        ("egressguard_webhook_requests_total", "too_large", 2.0),
        ("egressguard_webhook_requests_total", "duplicate", 5.0),
    ] {
        assert!(
            counter(&metrics, name, outcome) >= at_least,
            "{name} {outcome} in\n{metrics}"
        );
    }

    // A person releases it with an annotation; the alert keeps firing, and
    // its repeats are counted on the released record, never re-quarantining.
    let name = lab.phase_of("node-1", "Active")[0]["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    lab.c.cp.kubectl_ok(&[
        "annotate",
        "egq",
        &name,
        "egressguard.io/release=false positive, checked by on-call",
    ]);
    wait_for(&lab.c, "node-1 released by a person", 60, || {
        !lab.c.shaped(1)
    });
    let rel = lab.c.get("egq", &name).expect("record kept");
    assert!(
        rel["status"]["releasedBy"]
            .as_str()
            .is_some_and(|b| b.contains("false positive")),
        "{rel}"
    );
    let n1b = body("n1b.json", "node-1", "2026-11-23T11:00:00Z");
    assert_eq!(lab.post(Some(TOKEN), &n1b), 200);
    std::thread::sleep(Duration::from_secs(3));
    assert!(!lab.c.shaped(1), "a repeat undid the person's release");
    assert_eq!(lab.phase_of("node-1", "Active").len(), 0);
    let rel = lab.c.get("egq", &name).expect("record kept");
    assert!(
        rel["status"]["alertRepeats"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{rel}"
    );

    // The alert resolves, then fires again on a node now excluded (by a
    // label a kubelet cannot set): a new episode, refused.
    lab.c.cp.kubectl_ok(&[
        "label",
        "node",
        "node-1",
        "node-restriction.kubernetes.io/egressguard-exclude=true",
    ]);
    lab.exporter.set(&[("node-1", 1e6), ("node-2", 1e6)]);
    wait_for(&lab.c, "the resolution recorded", 60, || {
        lab.c
            .get("egq", &name)
            .is_some_and(|q| q["status"]["alertResolvedAt"].is_string())
    });
    lab.exporter.set(&[("node-1", 9e6), ("node-2", 1e6)]);
    wait_for(
        &lab.c,
        "the excluded node's new episode refused",
        60,
        || {
            lab.phase_of("node-1", "Refused").iter().any(|q| {
                q["status"]["releasedBy"]
                    .as_str()
                    .is_some_and(|b| b.contains("NodeExcluded"))
            })
        },
    );
    assert!(!lab.c.shaped(1));
    lab.exporter.set(&[("node-1", 1e6), ("node-2", 1e6)]);
    // A person may still quarantine it by hand...
    lab.c.apply("apiVersion: egressguard.io/v1alpha1\nkind: Quarantine\nmetadata: {name: by-hand}\nspec: {nodeName: node-1, guard: site, trigger: manual, reason: investigating}\n");
    wait_for(&lab.c, "node-1 throttled by hand", 60, || lab.c.shaped(1));
    // ...whose spec is the record: immutable.
    let o = lab.c.cp.kubectl(&[
        "patch",
        "egq",
        "by-hand",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"nodeName":"node-2"}}"#,
    ]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("immutable"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // ...and releases with kubectl delete: the finalizer releases first and
    // a record of the release stays.
    lab.c
        .cp
        .kubectl_ok(&["delete", "egq", "by-hand", "--wait=true", "--timeout=60s"]);
    wait_for(&lab.c, "node-1 released by delete", 60, || !lab.c.shaped(1));
    assert!(lab.c.get("egq", "by-hand").is_none());
    wait_for(&lab.c, "a Released Event naming the deletion", 20, || {
        lab.events("Released").contains("was deleted")
    });
    wait_for(
        &lab.c,
        "the release remembered after the delete",
        20,
        || {
            lab.phase_of("node-1", "Released").iter().any(|q| {
                q["status"]["releasedBy"]
                    .as_str()
                    .is_some_and(|b| b.contains("deleted Quarantine by-hand"))
            })
        },
    );

    // A dry run only reports.
    lab.c.cp.kubectl_ok(&[
        "patch",
        "eg",
        "site",
        "--type",
        "merge",
        "-p",
        "{\"spec\":{\"mode\":\"DryRun\"}}",
    ]);
    std::thread::sleep(Duration::from_secs(3));
    let count = lab.egq().len();
    lab.exporter.set(&[("node-1", 1e6), ("node-2", 9e6)]);
    wait_for(&lab.c, "a WouldQuarantine Event", 60, || {
        lab.events("WouldQuarantine").contains("node-2")
    });
    assert_eq!(lab.egq().len(), count);
    assert!(!lab.c.shaped(2));
    eprintln!("LATENCY exporter value -> Prometheus -> Alertmanager -> receiver (corroborated) -> kernel throttle: {alert_to_kernel:.2}s");
    eprintln!("RECEIVER slowest 1,000-alert notification: {slowest:.3}s; operator passes meanwhile {pass_time:.3}s each");
}
