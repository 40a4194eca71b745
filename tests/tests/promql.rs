//! The chart's PromQL, checked with promtool (Debian's `prometheus` package,
//! which `scripts/install-deps.sh` installs): the alert rules the chart
//! renders pass the unit tests in `tests/promtool/rules_test.yaml` (breach
//! held, flapping, missing series), and every rule and dashboard expression
//! parses. That each returns data from a real Prometheus is the incident
//! lab's check (`egressguard_e2e::lab`, run by `tests/tests/incident.rs`).
//! The dashboard ships in a labelled ConfigMap behind `grafanaDashboard.enabled`.

use std::path::{Path, PathBuf};
use std::process::Command;

use egressguard_e2e::cluster::{self, root, TempDir};
use egressguard_e2e::lab::{self, ChartPromql, Expr};
use egressguard_e2e::tools;
use serde_json::{json, Value};

fn promtool() -> PathBuf {
    let p =
        std::env::var_os("EG_PROMTOOL").map_or_else(|| PathBuf::from("promtool"), PathBuf::from);
    let ok = Command::new(&p)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "promtool not found: install Debian's prometheus package (scripts/install-deps.sh does)"
    );
    p
}

/// Runs promtool in `dir`; Err carries everything it printed.
fn run_promtool(dir: &Path, args: &[&str]) -> Result<String, String> {
    let o = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    let text = format!(
        "promtool {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if o.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

fn temp_dir() -> TempDir {
    let dir = std::env::temp_dir().join(format!("egpromql-{}", cluster::unique()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    TempDir(dir)
}

fn chart(values: Value) -> ChartPromql {
    lab::chart_promql(&values).unwrap_or_else(|e| panic!("helm render: {e}"))
}

/// `helm template` with `values` (a webhook token Secret named, as rendering
/// without a cluster requires), parsed.
fn render(mut values: Value) -> Vec<Value> {
    values["operator"]["quarantine"]["webhook"]["existingSecret"] = "unused".into();
    let manifests = tools::helm_template(&root().join("charts/egressguard"), &values, &[])
        .unwrap_or_else(|e| panic!("helm template: {e}"));
    tools::documents(&manifests)
}

fn alerts(groups: &Value) -> Vec<String> {
    groups
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect()
}

/// The chart's alert rules (default values), written as a rules file next to
/// a copy of `tests/promtool/rules_test.yaml`, pass `promtool test rules`.
#[test]
fn promtool_unit_tests_the_chart_alert_rules() {
    let rendered = chart(json!({}));
    let dir = temp_dir();
    let test_text = std::fs::read_to_string(root().join("tests/promtool/rules_test.yaml"))
        .expect("tests/promtool/rules_test.yaml");
    let tests: Value = serde_yaml::from_str(&test_text).expect("rules_test.yaml parses");
    assert_eq!(
        tests["rule_files"],
        json!(["rules.yaml"]),
        "rules_test.yaml must read the rendered rules.yaml"
    );
    let rules = json!({"groups": rendered.rule_groups});
    std::fs::write(dir.0.join("rules.yaml"), rules.to_string()).expect("rules.yaml");
    std::fs::write(dir.0.join("rules_test.yaml"), &test_text).expect("rules_test.yaml");

    // Every alert the chart renders is tested: fired (with its labels) in
    // one test group, silent in others whose series exist (flapping) or
    // do not (missing).
    let names = alerts(&rendered.rule_groups);
    assert!(names.len() >= 2, "the chart's alerts: {names:?}");
    let groups = tests["tests"].as_array().expect("tests");
    for name in &names {
        let cases: Vec<(&Value, Vec<&Value>)> = groups
            .iter()
            .map(|g| {
                let checks = g["alert_rule_test"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|t| t["alertname"] == name.as_str())
                    .collect();
                (g, checks)
            })
            .filter(|(_, checks): &(&Value, Vec<&Value>)| !checks.is_empty())
            .collect();
        let fires = |c: &&Value| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
        assert!(
            cases.iter().any(|(_, c)| c.iter().any(fires)),
            "no test in rules_test.yaml where {name} fires"
        );
        let silent: Vec<&Value> = cases
            .iter()
            .filter(|(_, c)| !c.iter().any(fires))
            .map(|(g, _)| *g)
            .collect();
        assert!(
            silent.len() >= 2,
            "{name} needs test groups where it never fires (flapping, missing series): {}",
            silent.len()
        );
        for (g, c) in &cases {
            assert!(
                c.iter().all(|t| t["eval_time"].is_string()),
                "a test of {name} without eval_time in {}",
                g["name"]
            );
        }
    }
    match run_promtool(&dir.0, &["test", "rules", "rules_test.yaml"]) {
        Ok(out) => eprintln!("{out}"),
        Err(out) => panic!("the chart's alert rules fail their unit tests:\n{out}"),
    }
}

/// Every rule expression (promtool check rules on the rendered rules) and
/// every dashboard query (each as a recording rule, its variables given the
/// values Grafana would interpolate) parses.
#[test]
fn promtool_parses_every_rule_and_dashboard_expression() {
    let dir = temp_dir();
    // The rules with the defaults and with other values (the lab's).
    for (i, values) in [
        json!({}),
        json!({"prometheusRule": {"thresholdBitsPerSecond": "20e6", "for": "3s", "rateWindow": "5s", "excludeDevices": "lo|wg0"}}),
    ]
    .into_iter()
    .enumerate()
    {
        let r = chart(values);
        let file = format!("rules-{i}.yaml");
        std::fs::write(dir.0.join(&file), json!({"groups": r.rule_groups}).to_string())
            .expect("rules");
        if let Err(out) = run_promtool(&dir.0, &["check", "rules", &file]) {
            panic!("the chart's rules do not pass promtool check rules:\n{out}");
        }
        // Each alert has a condition the lab can take apart.
        for e in lab::rule_exprs(&r.rule_groups) {
            assert!(
                lab::without_threshold(&e.expr).is_some(),
                "{} does not end in a comparison with a number: {}",
                e.source,
                e.expr
            );
        }
    }

    let r = chart(json!({}));
    let exprs = lab::dashboard_exprs(&r.dashboard);
    assert!(exprs.len() >= 20, "dashboard queries: {}", exprs.len());
    let defaults = lab::dashboard_defaults(&r.dashboard);
    // Grafana's interpolations: "All" (the variables' allValue), one node
    // (a multi-value variable's value is regex-escaped, and again for the
    // PromQL string), several nodes.
    let choices: [[(&str, &str); 3]; 3] = [
        [("node", ".+"), ("operator_job", ".+"), ("agent_job", ".+")],
        [
            ("node", r"10\\.0\\.0\\.1"),
            ("operator_job", "eg-operator-metrics"),
            ("agent_job", "eg-node-shaper-metrics"),
        ],
        [
            ("node", r"(10\\.0\\.0\\.1|worker-2|\\[fd00::2\\])"),
            ("operator_job", "(eg-operator-metrics|other)"),
            ("agent_job", "(eg-node-shaper-metrics|other)"),
        ],
    ];
    let mut rules = vec![];
    for (c, choice) in choices.iter().enumerate() {
        let mut vars: Vec<(&str, &str)> = defaults
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        vars.extend_from_slice(choice);
        vars.extend([
            ("__rate_interval", "1m"),
            ("__interval", "15s"),
            ("__range", "1h"),
        ]);
        for (i, Expr { source, expr }) in exprs.iter().enumerate() {
            let q = lab::substitute(expr, &vars).unwrap_or_else(|e| panic!("{source}: {e}"));
            rules.push(json!({"record": format!("dashboard:query_{c}_{i}"), "expr": q}));
        }
    }
    std::fs::write(
        dir.0.join("dashboard.yaml"),
        json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .expect("dashboard rules");
    if let Err(out) = run_promtool(&dir.0, &["check", "rules", "dashboard.yaml"]) {
        // Name the queries promtool refused.
        let named: Vec<String> = exprs
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                (0..choices.len()).any(|c| out.contains(&format!("\"dashboard:query_{c}_{i}\"")))
            })
            .map(|(_, e)| format!("{}: {}", e.source, e.expr))
            .collect();
        panic!(
            "dashboard queries do not parse:\n{}\n{out}",
            named.join("\n")
        );
    }

    // Only metrics that exist: each egressguard_* name is one the operator
    // or the agent writes (counters with `_total`, which the encoder adds).
    let mut sources = String::new();
    for dir in ["operator/src", "node-shaper/src", "crds/src"] {
        read_rs(&root().join(dir), &mut sources);
    }
    let mut all: Vec<&Expr> = exprs.iter().collect();
    let rule_exprs = lab::rule_exprs(&r.rule_groups);
    all.extend(rule_exprs.iter());
    for e in all {
        for name in metric_names(&e.expr) {
            let base = name.strip_suffix("_total").unwrap_or(&name);
            assert!(
                sources.contains(&format!("\"{base}\"")),
                "{}: no metric {name} in operator/src or node-shaper/src",
                e.source
            );
        }
    }
}

fn read_rs(dir: &Path, into: &mut String) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            read_rs(&p, into);
        } else if p.extension().is_some_and(|e| e == "rs") {
            into.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
}

/// The `egressguard_*` metric names an expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = vec![];
    let mut rest = expr;
    while let Some(i) = rest.find("egressguard_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The dashboard: off by default; on, one ConfigMap with the sidecar's
/// label (configurable) holding `egressguard.json` exactly as shipped.
#[test]
fn grafana_dashboard_ships_in_a_labelled_configmap_behind_its_value() {
    let is_dashboard =
        |d: &&Value| d["kind"] == "ConfigMap" && d["data"]["egressguard.json"].is_string();
    assert!(
        !render(json!({})).iter().any(|d| is_dashboard(&d)),
        "the dashboard ConfigMap renders while grafanaDashboard.enabled is false"
    );
    let file =
        std::fs::read_to_string(root().join("charts/egressguard/files/grafana/egressguard.json"))
            .expect("the dashboard file");
    let shipped: Value = serde_json::from_str(&file).expect("the dashboard is JSON");

    let docs = render(json!({"grafanaDashboard": {"enabled": true}}));
    let cms: Vec<&Value> = docs.iter().filter(is_dashboard).collect();
    assert_eq!(cms.len(), 1);
    let cm = cms[0];
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["namespace"], cluster::NAMESPACE);
    let data = cm["data"].as_object().expect("data");
    assert_eq!(
        data.len(),
        1,
        "one dashboard per ConfigMap: {:?}",
        data.keys()
    );
    let text = cm["data"]["egressguard.json"].as_str().unwrap_or_default();
    assert_eq!(
        text.trim_end(),
        file.trim_end(),
        "the ConfigMap's JSON is the file's"
    );

    let docs = render(
        json!({"grafanaDashboard": {"enabled": true, "label": "example.com/dashboard", "labelValue": "egress", "namespace": "monitoring", "annotations": {"grafana_folder": "EgressGuard"}}}),
    );
    let cm = docs
        .iter()
        .find(is_dashboard)
        .expect("the dashboard ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["example.com/dashboard"], "egress");
    assert!(cm["metadata"]["labels"]["grafana_dashboard"].is_null());
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(
        cm["metadata"]["annotations"]["grafana_folder"],
        "EgressGuard"
    );
    let lint = tools::helm_lint(
        &root().join("charts/egressguard"),
        &json!({"grafanaDashboard": {"enabled": true}, "operator": {"quarantine": {"webhook": {"existingSecret": "unused"}}}}),
    );
    assert_eq!(lint["errors"], json!([]), "helm lint: {lint}");

    // The dashboard: a Prometheus data source chosen in Grafana, used by
    // every panel and query; the variables the queries use.
    let d = &shipped;
    assert_eq!(d["uid"], "egressguard");
    assert!(
        d["schemaVersion"].as_i64() >= Some(36),
        "schemaVersion {}",
        d["schemaVersion"]
    );
    let vars = d["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["node", "operator_job", "agent_job"] {
        assert_eq!(var(name)["type"], "query", "{name}");
        assert_eq!(var(name)["datasource"]["uid"], "${datasource}", "{name}");
    }
    let mut ids = std::collections::BTreeSet::new();
    let mut titles = vec![];
    for p in d["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(p["id"].as_i64()),
            "duplicate panel id {}",
            p["id"]
        );
        if p["type"] == "row" {
            continue;
        }
        titles.push(p["title"].as_str().unwrap_or_default().to_string());
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {}",
            p["title"]
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "panel {}",
                p["title"]
            );
        }
    }
    // What the dashboard is for: per-node egress, per-class bytes and drops,
    // quarantines, the operator's health.
    let queries: String = lab::dashboard_exprs(d)
        .iter()
        .map(|e| e.expr.clone() + "\n")
        .collect();
    for metric in [
        "node_network_transmit_bytes_total",
        "egressguard_class_bytes_total",
        "egressguard_class_drops_total",
        "egressguard_quarantined_nodes",
        "egressguard_quarantines_started_total",
        "egressguard_webhook_requests_total",
        "egressguard_tampered",
        "egressguard_operator_leader",
        "egressguard_operator_reconcile_errors_total",
        "egressguard_operator_reconcile_seconds_total",
        "up{",
    ] {
        assert!(queries.contains(metric), "no panel reads {metric}");
    }
    assert!(titles.len() >= 15, "panels: {titles:?}");
}

/// The helpers the lab and these tests share.
#[test]
fn variables_and_thresholds_are_taken_apart() {
    assert_eq!(
        lab::without_threshold("sum by (instance) (rate(x[1m])) * 8 > 1.5e+07\n").as_deref(),
        Some("sum by (instance) (rate(x[1m])) * 8")
    );
    assert_eq!(
        lab::without_threshold("max by (instance) (egressguard_tampered) == 1").as_deref(),
        Some("max by (instance) (egressguard_tampered)")
    );
    assert_eq!(lab::without_threshold("x >= 2").as_deref(), Some("x"));
    assert_eq!(lab::without_threshold("absent(up{job=\"a\"})"), None);
    let vars = [("node", "a"), ("node_job", "b"), ("__rate_interval", "1m")];
    assert_eq!(
        lab::substitute(
            "x{i=~\"$node\", j=\"${node_job}\"}[$__rate_interval] [[node]]",
            &vars
        )
        .as_deref(),
        Ok("x{i=~\"a\", j=\"b\"}[1m] a")
    );
    assert!(lab::substitute("x[$__range]", &vars).is_err());
    assert!(lab::substitute("x{a=~\"b$\"}", &vars).is_ok());
}
