//! The Helm chart, linted and rendered with real Helm (helm-python-sdk embeds
//! Helm v4's Go SDK). Rendered manifests must parse as the Kubernetes types,
//! grant exactly the RBAC the code uses, and run node-shaper with NET_ADMIN
//! only.

use std::collections::BTreeSet;
use std::process::Command;

use egressguard_operator::rbac::{self, Rule};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Rendered {
    docs: Vec<Value>,
    lint: Value,
}

fn render(values: &str) -> Rendered {
    let out = Command::new(egressguard_e2e::cluster::helm_python())
        .arg(root().join("tests/helm/render.py"))
        .arg(root().join("charts/egressguard"))
        .arg(values)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "helm render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("render output");
    let mut docs = Vec::new();
    for text in v["manifests"].as_object().expect("manifests").values() {
        for doc in serde_yaml::Deserializer::from_str(text.as_str().unwrap_or_default()) {
            let d: Value = serde::Deserialize::deserialize(doc).expect("rendered YAML parses");
            if !d.is_null() {
                docs.push(d);
            }
        }
    }
    Rendered {
        docs,
        lint: v["lint"].clone(),
    }
}

fn of_kind<T: serde::de::DeserializeOwned>(r: &Rendered, kind: &str) -> Vec<T> {
    r.docs
        .iter()
        .filter(|d| d["kind"] == kind)
        .map(|d| {
            serde_json::from_value(d.clone())
                .unwrap_or_else(|e| panic!("{kind} does not parse as the Kubernetes type: {e}"))
        })
        .collect()
}

fn rules_set(rules: &[PolicyRule]) -> BTreeSet<(String, String, Vec<String>)> {
    rules
        .iter()
        .flat_map(|r| {
            let groups = r.api_groups.clone().unwrap_or_default();
            let resources = r.resources.clone().unwrap_or_default();
            let mut verbs = r.verbs.clone();
            verbs.sort();
            groups.into_iter().flat_map(move |g| {
                let verbs = verbs.clone();
                resources
                    .clone()
                    .into_iter()
                    .map(move |res| (g.clone(), res, verbs.clone()))
            })
        })
        .collect()
}

fn expected(rules: &[Rule]) -> BTreeSet<(String, String, Vec<String>)> {
    rules
        .iter()
        .map(|(g, r, v)| {
            let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
            v.sort();
            (g.to_string(), r.to_string(), v)
        })
        .collect()
}

#[test]
fn chart_lints_and_renders_with_real_helm() {
    let r = render("{}");
    assert_eq!(
        r.lint["errors"],
        serde_json::json!([]),
        "helm lint: {}",
        r.lint
    );
    let severe: Vec<&Value> = r.lint["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["severity"].as_i64() >= Some(2))
        .collect();
    assert!(severe.is_empty(), "helm lint warnings: {severe:?}");

    // Every manifest parses as its Kubernetes type.
    let deployments: Vec<Deployment> = of_kind(&r, "Deployment");
    let daemonsets: Vec<DaemonSet> = of_kind(&r, "DaemonSet");
    let _: Vec<ServiceAccount> = of_kind(&r, "ServiceAccount");
    let _: Vec<Service> = of_kind(&r, "Service");
    let cluster_roles: Vec<ClusterRole> = of_kind(&r, "ClusterRole");
    let _: Vec<ClusterRoleBinding> = of_kind(&r, "ClusterRoleBinding");
    let roles: Vec<Role> = of_kind(&r, "Role");
    let _: Vec<RoleBinding> = of_kind(&r, "RoleBinding");
    assert_eq!(deployments.len(), 1);
    assert_eq!(daemonsets.len(), 1);
    assert!(
        r.docs.iter().all(|d| d["kind"] != "ServiceMonitor"),
        "ServiceMonitor rendered while disabled"
    );
    // Agents may write only their own node's NodeShaping (on by default).
    assert!(
        r.docs
            .iter()
            .any(|d| d["kind"] == "ValidatingAdmissionPolicy"
                && d["spec"]["validations"][0]["expression"]
                    .as_str()
                    .is_some_and(|e| e.contains("authentication.kubernetes.io/node-name"))),
        "the own-node admission policy is missing"
    );
    assert!(
        render("{\"nodeShaper\": {\"ownNodePolicy\": false}}")
            .docs
            .iter()
            .all(|d| d["kind"] != "ValidatingAdmissionPolicy"),
        "ownNodePolicy: false still renders the policy"
    );

    // RBAC: exactly what the code calls.
    let role = |name: &str| {
        cluster_roles
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .expect(name)
            .rules
            .clone()
            .unwrap_or_default()
    };
    assert_eq!(
        rules_set(&role("eg-operator")),
        expected(rbac::OPERATOR_CLUSTER)
    );
    assert_eq!(
        rules_set(&role("eg-node-shaper")),
        expected(rbac::AGENT_CLUSTER)
    );
    let ns_role = |name: &str| {
        roles
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .expect(name)
            .clone()
    };
    let ep = ns_role("eg-operator-endpoints");
    assert_eq!(ep.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(
        rules_set(&ep.rules.unwrap_or_default()),
        expected(rbac::OPERATOR_DEFAULT_NS)
    );
    let own = ns_role("eg-node-shaper");
    assert_eq!(
        own.metadata.namespace.as_deref(),
        Some("egressguard-system")
    );
    assert_eq!(
        rules_set(&own.rules.unwrap_or_default()),
        expected(rbac::AGENT_OWN_NS)
    );
    let lease = ns_role("eg-operator-lease");
    assert_eq!(
        lease.metadata.namespace.as_deref(),
        Some("egressguard-system")
    );
    assert_eq!(
        rules_set(&lease.rules.unwrap_or_default()),
        expected(rbac::OPERATOR_OWN_NS)
    );

    // node-shaper: host network, NET_ADMIN only, not privileged, read-only root, on every node.
    let ds = daemonsets[0].spec.template.spec.clone().expect("pod spec");
    assert_eq!(ds.host_network, Some(true));
    let c = &ds.containers[0];
    let sc = c.security_context.clone().expect("securityContext");
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.expect("capabilities");
    assert_eq!(caps.add, Some(vec!["NET_ADMIN".to_string()]));
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    assert!(ds
        .tolerations
        .unwrap_or_default()
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
    assert_eq!(
        c.args.as_ref().and_then(|a| a.first()).map(String::as_str),
        Some("run")
    );
    let env = c.env.clone().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
    assert!(
        c.image.as_deref().is_some_and(|i| i.ends_with(":0.1.0")),
        "{:?}",
        c.image
    );
    // Metrics on the node's own address, probes on loopback with a listener
    // of their own (the agent is on the host network).
    let args = c.args.clone().unwrap_or_default();
    assert!(
        args.iter().any(|a| a == "--metrics-addr=$(HOST_IP):9464"),
        "{args:?}"
    );
    assert!(
        args.iter().any(|a| a == "--probe-addr=127.0.0.1:9465"),
        "{args:?}"
    );
    let field = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(field("HOST_IP").as_deref(), Some("status.hostIP"));
    assert!(
        env.iter()
            .any(|e| e.name == "MALLOC_ARENA_MAX" && e.value.as_deref() == Some("2")),
        "{env:?}"
    );
    for (kind, probe, path) in [
        ("liveness", &c.liveness_probe, "/healthz"),
        ("readiness", &c.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.clone())
            .unwrap_or_else(|| panic!("no {kind} httpGet"));
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"), "{kind}");
        assert_eq!(get.path.as_deref(), Some(path), "{kind}");
        assert_eq!(get.port, IntOrString::Int(9465), "{kind}");
    }

    // The operator: two replicas (leader election), non-root, read-only root.
    let op = &deployments[0].spec;
    assert_eq!(op.replicas, Some(2));
    let oc = &op.template.spec.as_ref().expect("pod").containers[0];
    assert_eq!(
        oc.security_context
            .as_ref()
            .and_then(|s| s.read_only_root_filesystem),
        Some(true)
    );
    assert!(oc
        .env
        .clone()
        .unwrap_or_default()
        .iter()
        .any(|e| e.name == "POD_NAMESPACE"));
    // The operator's probes: a port of their own, not the metrics port.
    assert!(oc
        .args
        .clone()
        .unwrap_or_default()
        .iter()
        .any(|a| a == "--probe-addr=0.0.0.0:9467"));
    assert!(oc
        .ports
        .clone()
        .unwrap_or_default()
        .iter()
        .any(|p| p.name.as_deref() == Some("probes") && p.container_port == 9467));
    for probe in [&oc.liveness_probe, &oc.readiness_probe] {
        let port = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|g| g.port.clone());
        assert_eq!(port, Some(IntOrString::String("probes".into())));
    }
}

#[test]
fn chart_values_images_and_servicemonitor() {
    let r = render(
        r#"{"nodeShaper": {"image": {"tag": "v9"}}, "serviceMonitor": {"enabled": true, "labels": {"release": "prom"}}}"#,
    );
    let ds: Vec<DaemonSet> = of_kind(&r, "DaemonSet");
    let image = ds[0]
        .spec
        .template
        .spec
        .as_ref()
        .map(|p| p.containers[0].image.clone());
    assert_eq!(
        image.flatten().as_deref(),
        Some("ghcr.io/egressguard/node-shaper:v9")
    );
    let sm: Vec<&Value> = r
        .docs
        .iter()
        .filter(|d| d["kind"] == "ServiceMonitor")
        .collect();
    assert_eq!(sm.len(), 1);
    assert_eq!(sm[0]["metadata"]["labels"]["release"], "prom");
}

#[test]
fn chart_ships_the_generated_crds() {
    for f in [
        "egressguard.io_egressguards.yaml",
        "egressguard.io_nodeshapings.yaml",
        "egressguard.io_quarantines.yaml",
        "egressguard.io_cidrgroups.yaml",
    ] {
        let chart = std::fs::read_to_string(root().join("charts/egressguard/crds").join(f))
            .unwrap_or_default();
        let generated = std::fs::read_to_string(root().join("crds").join(f)).unwrap_or_default();
        assert!(
            !generated.is_empty() && chart == generated,
            "charts/egressguard/crds/{f} is stale: run scripts/gen-crds.sh"
        );
    }
}

/// The quarantine wiring: a generated receiver token mounted into the
/// operator, the receiver Service, and (when enabled) the alert rule whose
/// name the example guard's alertmanager trigger matches.
#[test]
fn chart_wires_the_alertmanager_receiver_and_the_alert_rule() {
    let r = render(
        r#"{"prometheusRule": {"enabled": true}, "operator": {"quarantine": {"prometheusUrl": "http://10.0.0.5:9090"}}}"#,
    );
    assert_eq!(
        r.lint["errors"],
        serde_json::json!([]),
        "helm lint: {}",
        r.lint
    );
    let secret = r
        .docs
        .iter()
        .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == "eg-operator-webhook-token")
        .expect("the webhook token Secret");
    let token = secret["data"]["token"].as_str().unwrap_or_default();
    assert!(token.len() >= 32, "token too short: {token}");
    let deployments: Vec<Deployment> = of_kind(&r, "Deployment");
    let pod = deployments[0]
        .spec
        .template
        .spec
        .as_ref()
        .expect("pod spec");
    let args = pod.containers[0].args.clone().unwrap_or_default();
    for want in [
        "--webhook-token-file=/var/run/egressguard/webhook/token",
        "--webhook-addr=0.0.0.0:9466",
        "--prometheus-url=http://10.0.0.5:9090",
    ] {
        assert!(
            args.iter().any(|a| a == want),
            "{want} missing from {args:?}"
        );
    }
    let vol = pod.volumes.clone().unwrap_or_default();
    assert!(vol
        .iter()
        .any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref())
            == Some("eg-operator-webhook-token")));
    let services: Vec<Service> = of_kind(&r, "Service");
    assert!(services.iter().any(|s| s
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .is_some_and(|p| p.iter().any(|p| p.port == 9466))));
    let rule = r
        .docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("PrometheusRule when enabled");
    let alert = &rule["spec"]["groups"][0]["rules"][0];
    let guard = egressguard_crds::load::load_file(&root().join("examples/quarantine/guard.yaml"))
        .expect("example guard");
    let triggers = &guard[0]
        .spec
        .quarantine
        .as_ref()
        .expect("quarantine")
        .triggers;
    let am = triggers
        .iter()
        .find_map(|t| t.alertmanager.as_ref())
        .expect("alert trigger");
    assert_eq!(
        alert["alert"].as_str(),
        am.matchers.get("alertname").map(String::as_str)
    );
    // The agent's tamper gauge has an alert of its own.
    let tampered = &rule["spec"]["groups"][0]["rules"][1];
    assert_eq!(tampered["alert"], "EgressGuardShapingTampered");
    assert!(tampered["expr"]
        .as_str()
        .is_some_and(|e| e.contains("egressguard_tampered")));
    // An existing Secret replaces the generated one.
    let r = render(r#"{"operator": {"quarantine": {"webhook": {"existingSecret": "mine"}}}}"#);
    assert!(!r.docs.iter().any(|d| d["kind"] == "Secret"));
    assert!(r.docs.iter().all(|d| d["kind"] != "PrometheusRule"));
}
