//! The Go tools the tests drive, built from `tests/tools` by
//! `scripts/build-tools.sh` (cached in `~/.cache/egressguard/tools/<hash>`):
//! the real Helm CLI (v4.3.2) and `kstatus`, which computes the kstatus of
//! Kubernetes objects (sigs.k8s.io/cli-utils' `status.Compute`).
//!
//! `EG_HELM` and `EG_KSTATUS` name binaries to use instead. Otherwise the
//! script runs once per process (a cache hit prints the directory at once; a
//! miss builds, with progress on stderr, into a temporary directory renamed
//! into place, so concurrent test processes never see half a build).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::cluster::root;

/// The directory holding `helm` and `kstatus`, built (or found in the cache)
/// by `scripts/build-tools.sh`; Err carries the script's failure.
pub fn tools_dir() -> Result<PathBuf, String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new("bash")
            .arg(root().join("scripts/build-tools.sh"))
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("run scripts/build-tools.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "scripts/build-tools.sh failed ({}); its messages are above",
                out.status
            ));
        }
        let dir = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .map(str::trim)
            .unwrap_or_default()
            .to_string();
        if dir.is_empty() {
            return Err("scripts/build-tools.sh printed no directory".into());
        }
        Ok(PathBuf::from(dir))
    })
    .clone()
}

fn tool(env: &str, name: &str) -> Result<PathBuf, String> {
    match std::env::var_os(env) {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => tools_dir().map(|d| d.join(name)),
    }
}

/// The Helm CLI (`EG_HELM`, else the one `scripts/build-tools.sh` built).
pub fn try_helm() -> Result<PathBuf, String> {
    tool("EG_HELM", "helm")
}

/// The Helm CLI; panics when it cannot be built.
pub fn helm() -> PathBuf {
    try_helm().unwrap_or_else(|e| panic!("helm: {e}"))
}

/// The kstatus helper (`EG_KSTATUS`, else the one `scripts/build-tools.sh` built);
/// panics when it cannot be built.
pub fn kstatus_bin() -> PathBuf {
    tool("EG_KSTATUS", "kstatus").unwrap_or_else(|e| panic!("kstatus: {e}"))
}

/// One object's kstatus.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ObjectStatus {
    pub kind: String,
    pub name: String,
    /// `InProgress`, `Failed`, `Current`, `Terminating`, `NotFound` or `Unknown`.
    pub status: String,
    pub message: String,
}

/// The kstatus of each object in `objects` (one object, a List such as
/// `kubectl get ... -o json` prints, or an array of objects), in order.
/// Panics when the helper refuses the input.
pub fn kstatus(objects: &serde_json::Value) -> Vec<ObjectStatus> {
    let input = match objects {
        serde_json::Value::Array(items) => {
            serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items})
        }
        other => other.clone(),
    };
    let mut child = Command::new(kstatus_bin())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kstatus");
    let mut stdin = child.stdin.take().expect("kstatus stdin");
    let text = input.to_string();
    // A writer thread: the helper answers while it reads, so a large input
    // must not wait for its output to be drained.
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child.wait_with_output().expect("kstatus output");
    let _ = writer.join();
    assert!(
        out.status.success(),
        "kstatus: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("kstatus line {l:?}: {e}")))
        .collect()
}

/// The release name and namespace offline renders use (`helm template`).
const RENDER_AS: [&str; 3] = [
    crate::cluster::RELEASE,
    "--namespace",
    crate::cluster::NAMESPACE,
];

/// Runs the Helm CLI with `values` (JSON is YAML) on its stdin as `-f -`.
fn helm_with_values(args: &[&str], values: &serde_json::Value) -> std::process::Output {
    let mut child = Command::new(helm())
        .args(args)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run helm");
    let mut stdin = child.stdin.take().expect("helm stdin");
    let text = values.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child.wait_with_output().expect("helm output");
    let _ = writer.join();
    out
}

/// `helm template eg CHART --namespace egressguard-system -f VALUES [extra...]`
/// (templates only, not `crds/`): the manifests as Helm prints them, or
/// Helm's message when it refuses.
pub fn helm_template(
    chart: &std::path::Path,
    values: &serde_json::Value,
    extra: &[&str],
) -> Result<String, String> {
    let chart = chart.to_string_lossy();
    let mut args = vec!["template"];
    args.extend(RENDER_AS);
    args.push(&chart);
    args.extend(extra);
    let out = helm_with_values(&args, values);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The YAML documents of a render, parsed (empty documents dropped); panics
/// on a document that does not parse.
pub fn documents(manifests: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(manifests)
        .map(|doc| {
            <serde_json::Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}"))
        })
        .filter(|d| !d.is_null())
        .collect()
}

/// `helm lint --strict CHART -f VALUES`, as Helm's lint result:
/// `{"errors": [...], "messages": [{"severity", "path", "message"}]}`, where
/// severity is Helm's (0 unknown, 1 info, 2 warning, 3 error) and, strict,
/// `errors` holds every warning and error (and a chart that cannot be loaded).
pub fn helm_lint(chart: &std::path::Path, values: &serde_json::Value) -> serde_json::Value {
    let chart = chart.to_string_lossy();
    let args = [
        "lint",
        "--strict",
        "--namespace",
        crate::cluster::NAMESPACE,
        &chart,
    ];
    let out = helm_with_values(&args, values);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut messages: Vec<serde_json::Value> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    const SEVERITIES: [&str; 4] = ["UNKNOWN", "INFO", "WARNING", "ERROR"];
    for line in stdout.lines() {
        let parsed = line.strip_prefix('[').and_then(|rest| {
            let (sev, rest) = rest.split_once("] ")?;
            let severity = SEVERITIES.iter().position(|s| *s == sev)?;
            let (path, message) = rest.split_once(": ").unwrap_or(("", rest));
            Some((severity, path, message))
        });
        if let Some((severity, path, message)) = parsed {
            messages.push(serde_json::json!({
                "severity": severity,
                "path": path,
                "message": message,
            }));
            if severity >= 2 {
                errors.push(line.to_string());
            }
        } else if let Some(e) = line.strip_prefix("Error ") {
            // A chart that could not be linted at all.
            errors.push(e.to_string());
        } else if !line.is_empty() && !line.starts_with("==> ") && !line.contains("chart(s) linted")
        {
            // A message that spans lines.
            if let Some(m) = messages.last_mut() {
                let text = format!("{}\n{line}", m["message"].as_str().unwrap_or_default());
                m["message"] = text.into();
                if m["severity"].as_u64() >= Some(2) {
                    if let Some(e) = errors.last_mut() {
                        e.push('\n');
                        e.push_str(line);
                    }
                }
            }
        }
    }
    if !out.status.success() && errors.is_empty() {
        errors.push(format!(
            "helm lint failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::json!({"errors": errors, "messages": messages})
}
