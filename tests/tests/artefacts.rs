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
    let files = [
        "crds/egressguard.io_egressguards.yaml",
        "crds/egressguard.io_nodeshapings.yaml",
        "crds/egressguard.io_quarantines.yaml",
        "crds/egressguard.io_cidrgroups.yaml",
    ];
    for (file, crd) in files.into_iter().zip(egressguard_crds::definitions()) {
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
    // The quarantine example: the guard validates, the manual Quarantine
    // parses as the kind, and the Alertmanager snippet posts to the receiver.
    let q = root().join("examples/quarantine");
    let guards = load_file(&q.join("guard.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let v = validate(&guards[0].spec).unwrap_or_else(|e| panic!("guard.yaml: {e}"));
    assert_eq!(guards[0].spec.mode, egressguard_crds::Mode::Auto);
    assert!(!v.protect.is_empty());
    let manual: egressguard_crds::Quarantine =
        serde_yaml::from_str(&std::fs::read_to_string(q.join("manual.yaml")).expect("manual.yaml"))
            .expect("manual.yaml is a Quarantine");
    assert_eq!(manual.spec.trigger, "manual");
    assert_eq!(
        manual.spec.guard,
        guards[0].metadata.name.clone().unwrap_or_default()
    );
    // The CIDRGroup example: the group validates, and the guard resolves to it
    // both by name and by label, as node-shaper resolves a file of both.
    let w = root().join("examples/whitelist-groups");
    let text = [
        std::fs::read_to_string(w.join("guard.yaml")).expect("guard.yaml"),
        std::fs::read_to_string(w.join("payment-partners.yaml")).expect("group"),
    ]
    .join("---\n");
    let docs = egressguard_crds::load::parse_manifests(&text).expect("parse");
    let group = docs
        .iter()
        .find_map(|m| match m {
            egressguard_crds::load::Manifest::Group(g) => Some(g),
            _ => None,
        })
        .expect("a CIDRGroup");
    assert_eq!(group.spec.validate().expect("valid group").len(), 3);
    let guard = load_file(&w.join("guard.yaml")).expect("guard").remove(0);
    validate(&guard.spec).expect("valid guard");
    let labels = group.metadata.labels.clone().unwrap_or_default();
    let names = egressguard_crds::cidr_group::resolve(
        &guard.spec.whitelist_groups,
        [("payment-partners", &labels)],
    )
    .expect("resolves");
    assert_eq!(names, ["payment-partners"]);
    let am: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(q.join("alertmanager.yaml")).expect("alertmanager.yaml"),
    )
    .expect("alertmanager.yaml parses");
    let url = am["receivers"][1]["webhook_configs"][0]["url"]
        .as_str()
        .unwrap_or_default();
    assert!(url.ends_with(":9466/alertmanager"), "{url}");
}

/// Numeric flags have ranges: values that used to panic (a resync near
/// u64::MAX) or wrap negative (a cleanup timeout above i64::MAX, releasing
/// the finalizer at once) are refused with exit code 2 and the range.
#[test]
fn numeric_flags_are_range_checked() {
    let bin = |name: &str| {
        let exe = std::env::current_exe().expect("test binary");
        exe.parent()
            .and_then(|d| d.parent())
            .expect("target dir")
            .join(name)
    };
    for (b, args) in [
        (
            "node-shaper",
            vec![
                "run",
                "--node-name",
                "n",
                "--resync-seconds",
                "18446744073709551615",
            ],
        ),
        (
            "node-shaper",
            vec!["run", "--node-name", "n", "--resync-seconds", "0"],
        ),
        (
            "egressguard-operator",
            vec!["run", "--cleanup-timeout-seconds", "9223372036854775808"],
        ),
    ] {
        let o = std::process::Command::new(bin(b))
            .args(&args)
            .output()
            .expect(b);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{b} {args:?}: {err}");
        assert!(err.contains("is not in 1..=86400"), "{err}");
    }
}

/// The images ship stripped binaries (15.1 MB node-shaper, 15.9 MB operator
/// measured with `strip`, against 129 and 132 MB with the workspace's debug
/// info): each Dockerfile turns debug info off and strips before building.
#[test]
fn images_ship_stripped_binaries() {
    for f in ["node-shaper/Dockerfile", "operator/Dockerfile"] {
        let text = std::fs::read_to_string(root().join(f)).expect("Dockerfile");
        let env = text
            .find("ENV CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols")
            .unwrap_or_else(|| panic!("{f} does not strip"));
        let build = text.find("RUN cargo build --release").expect("build");
        assert!(env < build, "{f}: strip is set after the build");
    }
}
