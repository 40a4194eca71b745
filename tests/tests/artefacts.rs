//! Generated artefacts are current, and every shipped example is valid.

use egressguard_crds::{load::load_file, validate, EgressGuard};
use kube::CustomResourceExt;

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The CRD YAML under `crds/` is generated from the Rust types; regenerate with
/// `scripts/gen-crds.sh`.
#[test]
fn committed_crd_yaml_is_current() {
    for (file, crd) in [
        ("crds/egressguard.io_egressguards.yaml", EgressGuard::crd()),
        (
            "crds/egressguard.io_nodeshapings.yaml",
            egressguard_crds::NodeShaping::crd(),
        ),
    ] {
        let path = root().join(file);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        let generated = serde_yaml::to_string(&crd).expect("serialize CRD");
        assert!(
            committed == generated,
            "{} is stale: run scripts/gen-crds.sh",
            path.display()
        );
    }
}

#[test]
fn crd_has_the_api_users_type() {
    let crd = serde_json::to_value(EgressGuard::crd()).expect("crd json");
    assert_eq!(crd["spec"]["group"], "egressguard.io");
    assert_eq!(crd["spec"]["scope"], "Cluster");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "eg");
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert!(v["subresources"]["status"].is_object());
    let cols: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(cols, ["Mode", "Nodes", "Enforced", "Quarantined", "Age"]);
    let port = &v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["throttle"]
        ["properties"]["destinations"]["items"]["properties"]["port"];
    assert_eq!(
        (port["minimum"].as_f64(), port["maximum"].as_f64()),
        (Some(1.0), Some(65535.0))
    );
}

#[test]
fn shipped_examples_are_valid() {
    let dir = root().join("examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("examples dir") {
        let p = entry.expect("entry").path();
        if p.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        for g in load_file(&p).unwrap_or_else(|e| panic!("{e}")) {
            validate(&g.spec).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 1);
}
