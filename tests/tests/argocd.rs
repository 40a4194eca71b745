//! The Argo CD health checks the chart ships (`charts/egressguard/files/argocd`):
//! every fixture in `tests/argocd/fixtures` gets the status
//! `tests/argocd/expected.json` names, every kind has a fixture for every
//! branch of the mapping, the four files are one script, and the chart renders
//! them, byte for byte, as the keys Argo CD reads (real Helm).

use std::collections::{BTreeMap, BTreeSet};

use egressguard_e2e::argocd::{check_file, config_map_key, health, KINDS};
use egressguard_e2e::cluster::root;
use egressguard_e2e::tools;
use serde_json::{json, Value};

/// The cases every kind must have: each branch of the mapping, and the
/// Reconciling/Stalled conditions present with status False.
const EVERY_KIND: [(&str, &str); 12] = [
    ("deleting", "Progressing"),
    ("no-status", "Progressing"),
    ("default-status", "Progressing"),
    ("old-generation", "Progressing"),
    ("stalled", "Degraded"),
    ("reconciling", "Progressing"),
    ("tampered", "Degraded"),
    ("ready", "Healthy"),
    ("settled-false-conditions", "Healthy"),
    ("ready-false", "Progressing"),
    ("ready-unknown", "Progressing"),
    ("no-ready", "Progressing"),
];

fn expected() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(root().join("tests/argocd/expected.json"))
        .expect("tests/argocd/expected.json");
    serde_json::from_str(&text).expect("expected.json: case -> status")
}

fn fixture(case: &str) -> Value {
    let path = root().join(format!("tests/argocd/fixtures/{case}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `kind/case` of every fixture file.
fn fixture_cases() -> BTreeSet<String> {
    let dir = root().join("tests/argocd/fixtures");
    let mut cases = BTreeSet::new();
    for kind in std::fs::read_dir(&dir).expect("fixtures") {
        let kind = kind.expect("entry").path();
        for file in std::fs::read_dir(&kind).expect("a kind's fixtures") {
            let file = file.expect("entry").path();
            assert_eq!(
                file.extension().and_then(|e| e.to_str()),
                Some("json"),
                "{}",
                file.display()
            );
            let name = |p: &std::path::Path| p.file_stem().unwrap().to_string_lossy().into_owned();
            cases.insert(format!("{}/{}", name(&kind), name(&file)));
        }
    }
    cases
}

#[test]
fn every_fixture_gets_its_expected_status() {
    let expected = expected();
    let files = fixture_cases();
    let listed: BTreeSet<String> = expected.keys().cloned().collect();
    assert_eq!(
        files, listed,
        "every fixture needs an entry in expected.json, every entry a fixture"
    );
    let mut wrong = Vec::new();
    for (case, want) in &expected {
        let obj = fixture(case);
        let dir = case.split('/').next().unwrap();
        let kind = obj["kind"].as_str().expect("kind");
        assert_eq!(
            dir,
            kind.to_lowercase(),
            "{case}: fixture in the wrong kind's directory"
        );
        assert_eq!(obj["apiVersion"], "egressguard.io/v1alpha1", "{case}");
        let (status, message) = health(&obj);
        assert!(!message.is_empty(), "{case}: {status} without a message");
        if &status != want {
            wrong.push(format!("{case}: {status} ({message}), expected {want}"));
        }
    }
    assert!(wrong.is_empty(), "wrong health:\n{}", wrong.join("\n"));
}

#[test]
fn every_kind_covers_every_branch() {
    let expected = expected();
    for kind in KINDS {
        for (case, status) in EVERY_KIND {
            let key = format!("{}/{case}", kind.to_lowercase());
            assert_eq!(
                expected.get(&key).map(String::as_str),
                Some(status),
                "{key}: missing or not {status}"
            );
        }
    }
    // The kind-specific branches.
    for (case, status) in [
        ("egressguard/auto-paused", "Suspended"),
        ("egressguard/paused-not-auto", "Healthy"),
        ("egressguard/auto-paused-stalled", "Degraded"),
        ("egressguard/auto-paused-reconciling", "Progressing"),
        ("quarantine/refused-paused", "Suspended"),
        ("quarantine/refused-cooldown", "Degraded"),
        ("quarantine/pending", "Progressing"),
        ("quarantine/released", "Healthy"),
        ("nodeshaping/tampered-while-reconciling", "Progressing"),
    ] {
        assert_eq!(
            expected.get(case).map(String::as_str),
            Some(status),
            "{case}"
        );
    }
}

#[test]
fn messages_say_why() {
    let cases = [
        ("egressguard/deleting", "being deleted"),
        (
            "egressguard/old-generation",
            "waiting for the operator to observe generation 4",
        ),
        (
            "quarantine/default-status",
            "waiting for the operator to observe generation 1",
        ),
        (
            "nodeshaping/no-status",
            "waiting for the node agent to observe generation 1",
        ),
        (
            "egressguard/stalled",
            "InvalidSpec: throttle.ceil 30Mbit exceeds uplink.rate 20Mbit",
        ),
        ("egressguard/auto-paused", "automatic quarantine paused"),
        (
            "quarantine/refused-paused",
            "Paused: automatic quarantine of idc-auto is paused",
        ),
        ("nodeshaping/ready-unknown", "AgentStarting"),
    ];
    for (case, message) in cases {
        assert_eq!(health(&fixture(case)).1, message, "{case}");
    }
}

/// A JSON null reads as absent, as in Argo; an object without generation
/// still waits for a first status.
#[test]
fn nulls_and_missing_generation() {
    let mut obj = fixture("egressguard/ready");
    obj["metadata"]["deletionTimestamp"] = Value::Null;
    assert_eq!(health(&obj).0, "Healthy");
    obj["status"]["observedGeneration"] = Value::Null;
    assert_eq!(health(&obj).0, "Progressing");
    let bare = json!({"apiVersion": "egressguard.io/v1alpha1", "kind": "Quarantine",
                      "metadata": {"name": "q"}});
    assert_eq!(
        health(&bare),
        (
            "Progressing".to_string(),
            "waiting for the operator to write a status".to_string()
        )
    );
}

/// One script serves the four kinds (so the fixtures of every kind test the
/// logic Argo runs for each), and the chart has no other file there.
#[test]
fn one_script_serves_the_four_kinds() {
    for kind in KINDS {
        assert_eq!(check_file(kind), check_file(KINDS[0]));
    }
    let files: BTreeSet<String> = std::fs::read_dir(root().join("charts/egressguard/files/argocd"))
        .expect("files/argocd")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, BTreeSet::from(["health.lua".to_string()]));
}

/// Renders the chart with real Helm (the CLI `scripts/build-tools.sh` builds):
/// the documents of `helm template` and the report of `helm lint --strict`.
fn render(argocd: Value) -> (Vec<Value>, Value) {
    let values = json!({
        "operator": {"quarantine": {"webhook": {"token": "0123456789abcdef0123456789abcdef"}}},
        "argocd": argocd,
    });
    let chart = root().join("charts/egressguard");
    let manifests =
        tools::helm_template(&chart, &values, &[]).unwrap_or_else(|e| panic!("helm render: {e}"));
    (
        tools::documents(&manifests),
        tools::helm_lint(&chart, &values),
    )
}

fn config_maps(docs: &[Value]) -> Vec<&Value> {
    docs.iter()
        .filter(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "argocd"
        })
        .collect()
}

#[test]
fn the_chart_renders_the_checks_for_argocd_cm() {
    let (docs, lint) = render(json!({}));
    assert_eq!(lint["errors"], json!([]), "helm lint: {lint}");
    assert!(config_maps(&docs).is_empty(), "off by default");

    let (docs, lint) = render(json!({"healthChecks": {"enabled": true}}));
    assert_eq!(lint["errors"], json!([]), "helm lint: {lint}");
    let cms = config_maps(&docs);
    assert_eq!(cms.len(), 1, "one ConfigMap");
    let cm = cms[0];
    assert_eq!(cm["metadata"]["name"], "argocd-cm");
    assert_eq!(cm["metadata"]["namespace"], "argocd");
    let data = cm["data"].as_object().expect("data");
    let keys: BTreeSet<String> = data.keys().cloned().collect();
    let want: BTreeSet<String> = KINDS.iter().map(|k| config_map_key(k)).collect();
    assert_eq!(keys, want);
    for kind in KINDS {
        let file = std::fs::read_to_string(check_file(kind)).expect("check");
        assert!(
            data[&config_map_key(kind)].as_str() == Some(file.as_str()),
            "{}: not the file's contents",
            config_map_key(kind)
        );
    }

    let (docs, _) = render(json!({"healthChecks": {"enabled": true,
        "configMap": {"name": "argocd-cm-egressguard", "namespace": "gitops"}}}));
    let cms = config_maps(&docs);
    assert_eq!(cms.len(), 1);
    assert_eq!(cms[0]["metadata"]["name"], "argocd-cm-egressguard");
    assert_eq!(cms[0]["metadata"]["namespace"], "gitops");
}
