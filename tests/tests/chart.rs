//! The Helm chart, linted and rendered with the real Helm CLI (v4, built from
//! its Go module by `scripts/build-tools.sh`). Rendered manifests must parse as the Kubernetes types,
//! grant exactly the RBAC the code uses, and run node-shaper with NET_ADMIN
//! only; the operator runs on trusted nodes only, and its admission policy
//! is proven on a real API server.

use std::collections::BTreeSet;

use egressguard_e2e::tools;
use egressguard_operator::rbac::{self, Rule};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
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

/// The Alertmanager receiver token the offline renders set (`render`).
const TEST_TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// Renders like `helm template` (no cluster). The chart refuses that without
/// a webhook token or an existing Secret (a random token would change on
/// every render), so this sets `TEST_TOKEN` unless the values choose.
fn render(values: &str) -> Rendered {
    let mut v: Value = serde_json::from_str(values).expect("values JSON");
    let webhook = &v["operator"]["quarantine"]["webhook"];
    if webhook["token"].is_null() && webhook["existingSecret"].is_null() {
        v["operator"]["quarantine"]["webhook"]["token"] = TEST_TOKEN.into();
    }
    try_render(&v.to_string()).unwrap_or_else(|e| panic!("helm render failed: {e}"))
}

/// Renders the values exactly as given (`helm template`, then `helm lint
/// --strict`); Err carries Helm's message.
fn try_render(values: &str) -> Result<Rendered, String> {
    let v: Value = serde_json::from_str(values).expect("values JSON");
    let chart = root().join("charts/egressguard");
    let manifests = tools::helm_template(&chart, &v, &[])?;
    Ok(Rendered {
        docs: tools::documents(&manifests),
        lint: tools::helm_lint(&chart, &v),
    })
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
    let policies = |values: &str| -> Vec<String> {
        render(values)
            .docs
            .iter()
            .filter(|d| d["kind"] == "ValidatingAdmissionPolicy")
            .filter_map(|d| d["metadata"]["name"].as_str().map(str::to_string))
            .collect()
    };
    assert!(
        policies("{\"nodeShaper\": {\"ownNodePolicy\": false}}")
            .iter()
            .all(|n| !n.starts_with("eg-node-shaper")),
        "ownNodePolicy: false still renders the policy"
    );
    // The operator may not write guards' specs (on by default; proven on the
    // API server in chart_admission_policy_keeps_the_operator_off_guard_specs).
    assert!(policies("{}").contains(&"eg-operator-read-only-guards".to_string()));
    assert!(
        !policies("{\"operator\": {\"readOnlyGuardsPolicy\": false}}")
            .contains(&"eg-operator-read-only-guards".to_string()),
        "readOnlyGuardsPolicy: false still renders the policy"
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
        let chart = std::fs::read_to_string(root().join("charts/egressguard/files/crds").join(f))
            .unwrap_or_default();
        let generated = std::fs::read_to_string(root().join("crds").join(f)).unwrap_or_default();
        assert!(
            !generated.is_empty() && chart == generated,
            "charts/egressguard/files/crds/{f} is stale: run scripts/gen-crds.sh"
        );
    }
}

/// The quarantine wiring: the receiver token mounted into the operator, the
/// receiver Service, and (when enabled) the alert rule whose name the example
/// guard's alertmanager trigger matches.
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
    assert_eq!(token, b64(TEST_TOKEN));
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

/// Standard base64 (Secret data), for comparing with what the chart stores.
fn b64(s: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn operator_pod(r: &Rendered) -> k8s_openapi::api::core::v1::PodSpec {
    let deployments: Vec<Deployment> = of_kind(r, "Deployment");
    deployments[0]
        .spec
        .template
        .spec
        .clone()
        .expect("operator pod spec")
}

/// Tolerations as (key, operator, effect).
fn tolerations(pod: &k8s_openapi::api::core::v1::PodSpec) -> Vec<(String, String, String)> {
    pod.tolerations
        .iter()
        .flatten()
        .map(|t| {
            (
                t.key.clone().unwrap_or_default(),
                t.operator.clone().unwrap_or_default(),
                t.effect.clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// Issue #19, "the operator is not a soft target": its token must not sit on
/// an ordinary worker. By default it runs on control-plane nodes only (their
/// label, tolerations for their taints), its replicas prefer different nodes
/// and a PodDisruptionBudget lets a drain take one at a time; a value opts
/// out or names a trusted pool instead.
#[test]
fn chart_places_the_operator_on_trusted_nodes() {
    let r = render("{}");
    let pod = operator_pod(&r);
    let selector = pod.node_selector.clone().unwrap_or_default();
    assert_eq!(
        selector.into_iter().collect::<Vec<_>>(),
        [(
            "node-role.kubernetes.io/control-plane".to_string(),
            String::new()
        )],
        "the operator's nodeSelector"
    );
    let t = tolerations(&pod);
    for key in [
        "node-role.kubernetes.io/control-plane",
        "node-role.kubernetes.io/master",
    ] {
        assert!(
            t.contains(&(key.into(), "Exists".into(), "NoSchedule".into())),
            "no toleration for {key}:NoSchedule in {t:?}"
        );
    }
    assert_eq!(t.len(), 2, "{t:?}");
    let labels = r
        .docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .map(|d| d["spec"]["template"]["metadata"]["labels"].clone())
        .expect("pod labels");
    let anti = |pod: &k8s_openapi::api::core::v1::PodSpec| {
        let terms = pod
            .affinity
            .as_ref()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| {
                a.preferred_during_scheduling_ignored_during_execution
                    .clone()
            })
            .unwrap_or_default();
        assert_eq!(
            terms.len(),
            1,
            "one preferred anti-affinity term: {terms:?}"
        );
        let term = &terms[0].pod_affinity_term;
        assert_eq!(term.topology_key, "kubernetes.io/hostname");
        let m = term
            .label_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone())
            .unwrap_or_default();
        assert_eq!(serde_json::to_value(m).expect("labels"), labels);
    };
    anti(&pod);
    assert!(
        pod.affinity
            .as_ref()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .is_some_and(|a| a
                .required_during_scheduling_ignored_during_execution
                .is_none()),
        "anti-affinity must be preferred only: one control-plane node must still run both"
    );
    let pdbs: Vec<PodDisruptionBudget> = of_kind(&r, "PodDisruptionBudget");
    assert_eq!(pdbs.len(), 1, "one PodDisruptionBudget");
    let pdb = pdbs[0].spec.clone().expect("PDB spec");
    assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(pdb.min_available, None);
    assert_eq!(
        pdbs[0].metadata.namespace.as_deref(),
        Some("egressguard-system")
    );
    assert_eq!(
        serde_json::to_value(pdb.selector.and_then(|s| s.match_labels)).expect("selector"),
        labels,
        "the PDB selects the operator's pods"
    );

    // Opt out: no selector, no tolerations; the replicas still spread.
    let any =
        render(r#"{"operator": {"placement": {"trusted": "any"}, "podDisruptionBudget": false}}"#);
    let pod = operator_pod(&any);
    assert_eq!(pod.node_selector, None);
    assert_eq!(pod.tolerations, None);
    anti(&pod);
    assert!(
        any.docs.iter().all(|d| d["kind"] != "PodDisruptionBudget"),
        "podDisruptionBudget: false still renders one"
    );

    // A declared trusted pool instead of the control plane.
    let pool = render(
        r#"{"operator": {"placement": {"trusted": "nodeSelector", "nodeSelector": {"pool": "system"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}]}}}"#,
    );
    let pod = operator_pod(&pool);
    assert_eq!(
        pod.node_selector
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect::<Vec<_>>(),
        [("pool".to_string(), "system".to_string())]
    );
    assert_eq!(
        tolerations(&pod),
        [("dedicated".into(), "Equal".into(), "NoSchedule".into())]
    );

    // Refused: a pool with no selector, an unknown mode, the old values.
    for (values, says) in [
        (
            r#"{"operator": {"placement": {"trusted": "nodeSelector"}}}"#,
            "needs operator.placement.nodeSelector",
        ),
        (
            r#"{"operator": {"placement": {"trusted": "workers"}}}"#,
            "must be controlPlane, nodeSelector or any",
        ),
        (
            r#"{"operator": {"nodeSelector": {"pool": "system"}}}"#,
            "set operator.placement",
        ),
    ] {
        let mut v: Value = serde_json::from_str(values).expect("json");
        v["operator"]["quarantine"]["webhook"]["token"] = TEST_TOKEN.into();
        match try_render(&v.to_string()) {
            Ok(_) => panic!("{values} rendered"),
            Err(e) => assert!(e.contains(says), "{values}: {e}"),
        }
    }
}

/// `helm template` (Argo CD, Flux's kustomize path) has no cluster to read
/// the generated webhook token back from: a random one would change on
/// every render and Alertmanager would get 401s. The chart refuses, naming
/// the values to set; with them the render is stable.
#[test]
fn chart_webhook_token_is_stable_or_refused_without_a_cluster() {
    let err = match try_render("{}") {
        Ok(_) => panic!("rendered without a cluster, a token or an existing Secret"),
        Err(e) => e,
    };
    for says in [
        "operator.quarantine.webhook.existingSecret",
        "operator.quarantine.webhook.token",
        "helm template",
    ] {
        assert!(err.contains(says), "the message lacks {says:?}: {err}");
    }
    // `helm lint` on the default values reports the message, it does not fail.
    let lint = tools::helm_lint(&root().join("charts/egressguard"), &serde_json::json!({}));
    assert_eq!(lint["errors"], serde_json::json!([]), "helm lint: {lint}");
    // Stable: the same values render the same manifests, byte for byte.
    let manifests = |values: &str| {
        let v: Value = serde_json::from_str(values).expect("values JSON");
        tools::helm_template(&root().join("charts/egressguard"), &v, &[])
            .unwrap_or_else(|e| panic!("{values}: {e}"))
    };
    for values in [
        r#"{"operator": {"quarantine": {"webhook": {"existingSecret": "x"}}}}"#,
        r#"{"operator": {"quarantine": {"webhook": {"token": "0123456789abcdef0123456789abcdef"}}}}"#,
    ] {
        let first = manifests(values);
        assert_eq!(first, manifests(values), "{values}: two renders differ");
    }
    let r = render(r#"{"operator": {"quarantine": {"webhook": {"existingSecret": "x"}}}}"#);
    assert!(r.docs.iter().all(|d| d["kind"] != "Secret"));
    let vol = operator_pod(&r).volumes.unwrap_or_default();
    assert!(vol.iter().any(|v| v.name == "webhook-token"
        && v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("x")));
    let r = render(&format!(
        r#"{{"operator": {{"quarantine": {{"webhook": {{"token": "{TEST_TOKEN}"}}}}}}}}"#
    ));
    let secret = r
        .docs
        .iter()
        .find(|d| d["kind"] == "Secret")
        .expect("the token Secret");
    assert_eq!(secret["metadata"]["name"], "eg-operator-webhook-token");
    assert_eq!(secret["data"]["token"], b64(TEST_TOKEN).as_str());
    // The operator refuses tokens under 16 bytes: so does the chart.
    let short = try_render(r#"{"operator": {"quarantine": {"webhook": {"token": "short"}}}}"#);
    assert!(
        short.as_ref().is_err_and(|e| e.contains("shorter than 16")),
        "a short token rendered: {:?}",
        short.err()
    );
}

/// kstatus (sigs.k8s.io/cli-utils) of a rendered chart: what the API server
/// serves as is (RBAC, ServiceAccounts, Services) is Current; the workloads,
/// never rolled out, are InProgress.
#[test]
fn kstatus_of_the_rendered_chart() {
    let r = render("{}");
    let s = tools::kstatus(&Value::Array(r.docs.clone()));
    assert_eq!(s.len(), r.docs.len(), "one status per object: {s:?}");
    let of =
        |kind: &str| -> Vec<&tools::ObjectStatus> { s.iter().filter(|o| o.kind == kind).collect() };
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
    ] {
        assert!(
            !of(kind).is_empty() && of(kind).iter().all(|o| o.status == "Current"),
            "{kind}: {s:?}"
        );
    }
    for kind in ["Deployment", "DaemonSet"] {
        assert!(
            of(kind).iter().all(|o| o.status == "InProgress"),
            "{kind}: {s:?}"
        );
    }
}

/// On a real API server, with the chart installed by real Helm (no token
/// values: a real install still generates one, and an upgrade's render reads
/// it back), the operator's ServiceAccount may write a guard's finalizers and
/// status, but not create, delete or change the spec of guards and CIDRGroups
/// — even when RBAC would let it.
#[test]
fn chart_admission_policy_keeps_the_operator_off_guard_specs() {
    use egressguard_e2e::cluster::{self, ControlPlane, Options};
    let dir = std::env::temp_dir().join(format!("eg-chart-{}", cluster::unique()));
    let cp = ControlPlane::start(&dir, Options::default());
    cp.helm_install(&serde_json::json!({}));

    let token = || {
        cp.kubectl_ok(&[
            "get",
            "secret",
            "-n",
            cluster::NAMESPACE,
            "eg-operator-webhook-token",
            "-o",
            "jsonpath={.data.token}",
        ])
    };
    // Installed without token values: a random token, kept by an upgrade.
    let stored = token();
    assert!(stored.len() >= 32, "generated token: {stored:?}");
    // An upgrade's render against the cluster (lookup reads the Secret back).
    let upgrade = cp
        .command(tools::helm())
        .args(["template", cluster::RELEASE])
        .arg(root().join("charts/egressguard"))
        .args([
            "--namespace",
            cluster::NAMESPACE,
            "--is-upgrade",
            "--dry-run=server",
        ])
        .arg("--kubeconfig")
        .arg(&cp.kubeconfig)
        .output()
        .expect("helm template against the cluster");
    assert!(
        upgrade.status.success(),
        "cluster-aware render: {}",
        String::from_utf8_lossy(&upgrade.stderr)
    );
    let secret = tools::documents(&String::from_utf8_lossy(&upgrade.stdout))
        .into_iter()
        .find(|d| d["kind"] == "Secret")
        .expect("the Secret in an upgrade's render");
    assert_eq!(
        secret["data"]["token"].as_str(),
        Some(stored.as_str()),
        "an upgrade would rotate the token"
    );
    // The real upgrade keeps it, and so does a rollback to the install.
    let chart = root().join("charts/egressguard");
    for (what, o) in [
        (
            "helm upgrade",
            cp.helm_upgrade(&chart, &serde_json::json!({})),
        ),
        ("helm rollback 1", cp.helm_rollback(1)),
    ] {
        assert!(
            o.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(token(), stored, "{what} rotated the token");
    }
    // The chart's CRDs are served: kstatus says Current for each.
    cluster::wait_for(
        "the chart's CRDs Current",
        30,
        || {
            let list: Value =
                serde_json::from_str(&cp.kubectl_ok(&["get", "crd", "-o", "json"])).expect("CRDs");
            let s = tools::kstatus(&list);
            s.len() >= 4 && s.iter().all(|c| c.status == "Current")
        },
        || cp.kubectl_ok(&["get", "crd", "-o", "json"]),
    );

    cp.apply(
        "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: g1}\nspec:\n  nodeSelector: {matchLabels: {site: a}}\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{protocol: TCP, port: 443}]}\n  whitelist: [203.0.113.10/32]\n---\napiVersion: egressguard.io/v1alpha1\nkind: CIDRGroup\nmetadata: {name: cg1}\nspec: {cidrs: [198.51.100.0/24]}\n",
    );
    let sa = format!(
        "--as=system:serviceaccount:{}:{}-operator",
        cluster::NAMESPACE,
        cluster::RELEASE
    );
    let as_operator = |args: &[&str]| {
        let mut a = vec![sa.as_str()];
        a.extend_from_slice(args);
        cp.kubectl(&a)
    };
    let ok = |args: &[&str]| {
        let o = as_operator(args);
        assert!(
            o.status.success(),
            "as the operator, {args:?} refused: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    // `kubectl patch` reads the object first; the operator itself never
    // does (its reflector has it). Reading grants no write.
    cp.apply(&format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: eg-test-kubectl-get}}\nrules:\n- apiGroups: [egressguard.io]\n  resources: [egressguards, egressguards/status, cidrgroups]\n  verbs: [get]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: eg-test-kubectl-get}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: eg-test-kubectl-get}}\nsubjects:\n- {{kind: ServiceAccount, name: {}-operator, namespace: {}}}\n",
        cluster::RELEASE,
        cluster::NAMESPACE
    ));
    // What the operator does, under the chart's own RBAC: a finalizer
    // (merge patch of metadata on the guard) and its status.
    ok(&[
        "patch",
        "eg",
        "g1",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"finalizers":["egressguard.io/cleanup"]}}"#,
    ]);
    ok(&[
        "patch",
        "eg",
        "g1",
        "--subresource=status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"observedGeneration":1}}"#,
    ]);

    // RBAC as wide as a mistake could make it: only the policy stands.
    cp.apply(&format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: eg-test-too-wide}}\nrules:\n- apiGroups: [egressguard.io]\n  resources: [egressguards, cidrgroups]\n  verbs: [get, create, update, patch, delete]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: eg-test-too-wide}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: eg-test-too-wide}}\nsubjects:\n- {{kind: ServiceAccount, name: {}-operator, namespace: {}}}\n",
        cluster::RELEASE,
        cluster::NAMESPACE
    ));
    let refused = |args: &[&str], says: &str| {
        let o = as_operator(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "as the operator, {args:?} was allowed");
        assert!(
            err.contains("eg-operator-read-only-guards") && err.contains(says),
            "as the operator, {args:?}: not the policy's refusal: {err}"
        );
    };
    let guard_b = "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: g2}\nspec:\n  nodeSelector: {matchLabels: {site: a}}\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{protocol: TCP, port: 80}]}\n";
    let group_b = "apiVersion: egressguard.io/v1alpha1\nkind: CIDRGroup\nmetadata: {name: cg2}\nspec: {cidrs: [0.0.0.0/0]}\n";
    for (i, text) in [guard_b, group_b].iter().enumerate() {
        let f = dir.join(format!("new-{i}.yaml"));
        std::fs::write(&f, text).expect("manifest");
        refused(&["create", "-f", &f.to_string_lossy()], "may not create");
    }
    refused(
        &[
            "patch",
            "eg",
            "g1",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"whitelist":["0.0.0.0/0"]}}"#,
        ],
        "may not change the spec of EgressGuard g1",
    );
    refused(
        &[
            "patch",
            "egcg",
            "cg1",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"cidrs":["0.0.0.0/0"]}}"#,
        ],
        "may not change the spec of CIDRGroup cg1",
    );
    refused(&["delete", "eg", "g1", "--wait=false"], "may not delete");
    refused(&["delete", "egcg", "cg1", "--wait=false"], "may not delete");
    // Metadata stays the operator's to write, on groups too.
    ok(&[
        "patch",
        "egcg",
        "cg1",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"labels":{"seen":"yes"}}}"#,
    ]);
    // Nothing changed the guard's spec; people still may.
    let g = cp.get("eg", "g1").expect("g1");
    assert_eq!(
        g["spec"]["whitelist"],
        serde_json::json!(["203.0.113.10/32"])
    );
    assert_eq!(g["metadata"]["generation"], 1);
    cp.kubectl_ok(&[
        "patch",
        "eg",
        "g1",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"whitelist":["203.0.113.11/32"]}}"#,
    ]);
    assert!(cp.get("egcg", "cg1").is_some() && cp.get("egcg", "cg2").is_none());
}
