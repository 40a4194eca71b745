//! The chart's Argo CD health checks (`charts/egressguard/files/argocd`), run
//! the way Argo CD runs a check from `argocd-cm`: Lua 5.1 (Debian's `lua5.1`
//! and `lua-cjson`, installed by `scripts/install-deps.sh`) through
//! `tests/argocd/run.lua`, which sets the global `obj`, opens only the
//! libraries Argo opens and prints the `hs` the check returns.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::cluster::root;

/// The kinds with a health check, in the group `egressguard.io`.
pub const KINDS: [&str; 4] = ["CIDRGroup", "EgressGuard", "NodeShaping", "Quarantine"];

/// The check of `kind` shipped in the chart.
pub fn check_file(_kind: &str) -> PathBuf {
    // One script serves every kind (the chart renders it under each key).
    root().join("charts/egressguard/files/argocd/health.lua")
}

/// Its key in `argocd-cm`.
pub fn config_map_key(kind: &str) -> String {
    format!("resource.customizations.health.egressguard.io_{kind}")
}

/// Argo CD's health of `obj` by the chart's check for its `kind`: (status,
/// message). Panics when the kind has no check or the check fails to run.
pub fn health(obj: &serde_json::Value) -> (String, String) {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let kind = obj["kind"].as_str().expect("the object has a kind");
    assert!(
        KINDS.contains(&kind),
        "no Argo CD health check for kind {kind}"
    );
    let path = std::env::temp_dir().join(format!(
        "egressguard-argocd-{}-{}.json",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, serde_json::to_vec(obj).expect("JSON")).expect("write the object");
    let out = Command::new("lua5.1")
        .arg(root().join("tests/argocd/run.lua"))
        .arg(check_file(kind))
        .arg(&path)
        .output();
    let _ = std::fs::remove_file(&path);
    let out = out.expect("lua5.1 (scripts/install-deps.sh installs lua5.1 and lua-cjson)");
    assert!(
        out.status.success(),
        "the {kind} health check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "run.lua printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let field = |name: &str| hs[name].as_str().unwrap_or_default().to_string();
    (field("status"), field("message"))
}
