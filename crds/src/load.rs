//! Reading EgressGuards from YAML files, as `kubectl apply -f` users write them.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::guard::EgressGuard;
use crate::node_shaping::NodeShaping;

/// Why a file could not be turned into guards.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read. The reason is part of the message and
    /// not a `source`, so a printed error chain does not say it twice.
    #[error("cannot read {path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: std::io::Error,
    },
    /// The YAML does not parse or does not fit the schema.
    #[error("{path}: document {doc}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based document index in the file.
        doc: usize,
        /// What went wrong, with the field where known.
        message: String,
    },
    /// The file holds no EgressGuard.
    #[error("{path}: no EgressGuard found (expected apiVersion: egressguard.io/v1alpha1, kind: EgressGuard)")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// A document node-shaper can enforce.
#[derive(Debug, Clone)]
pub enum Manifest {
    /// An EgressGuard.
    Guard(EgressGuard),
    /// The operator's plan for one node (what the agent enforces).
    NodeShaping(NodeShaping),
    /// A list of networks guards whitelist by reference.
    Group(crate::cidr_group::CIDRGroup),
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|reason| LoadError::Io {
        path: path.to_path_buf(),
        reason,
    })
}

/// Loads every EgressGuard in a YAML file (documents of other kinds are skipped).
pub fn load_file(path: &Path) -> Result<Vec<EgressGuard>, LoadError> {
    let guards: Vec<EgressGuard> = load_manifests(path)?
        .into_iter()
        .filter_map(|m| match m {
            Manifest::Guard(g) => Some(g),
            _ => None,
        })
        .collect();
    if guards.is_empty() {
        return Err(LoadError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(guards)
}

/// Loads every EgressGuard, NodeShaping and CIDRGroup in a YAML file.
pub fn load_manifests(path: &Path) -> Result<Vec<Manifest>, LoadError> {
    let text = read(path)?;
    let found = parse_manifests(&text).map_err(|(doc, message)| LoadError::Parse {
        path: path.to_path_buf(),
        doc,
        message,
    })?;
    if found.is_empty() {
        return Err(LoadError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(found)
}

/// Parses EgressGuards from YAML text; errors carry the 1-based document index.
pub fn parse_str(text: &str) -> Result<Vec<EgressGuard>, (usize, String)> {
    Ok(parse_manifests(text)?
        .into_iter()
        .filter_map(|m| match m {
            Manifest::Guard(g) => Some(g),
            _ => None,
        })
        .collect())
}

fn typed<T: serde::de::DeserializeOwned + serde::Serialize + schemars::JsonSchema>(
    n: usize,
    value: &Value,
) -> Result<T, (usize, String)> {
    // Unknown fields by the schema, with the closest known name: reported
    // next to a type error too, since a misspelt required field (`uplnk:`)
    // otherwise shows only as "missing field `uplink`".
    let schema = serde_json::to_value(schemars::schema_for!(T)).unwrap_or_default();
    let mut misspelt = Vec::new();
    // The spec only: the root's own schema leaves out apiVersion, kind and metadata.
    if let (Some(spec), Some(spec_schema)) = (
        value.get("spec"),
        schema.get("properties").and_then(|p| p.get("spec")),
    ) {
        schema_unknown(spec, spec_schema, &schema, "spec", &mut misspelt);
    }
    let say = |path: &str| match misspelt.iter().find(|(p, _)| p == path) {
        Some((_, Some(known))) => format!("{path}: unknown field; did you mean `{known}`?"),
        _ => format!("{path}: unknown field; check its spelling against the API reference"),
    };
    let obj: T = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let first = format!("{}: {}", e.path(), e.inner());
        let all: Vec<String> = std::iter::once(first)
            .chain(misspelt.iter().map(|(p, _)| say(p)))
            .collect();
        (n, all.join("\n"))
    })?;
    let round = serde_json::to_value(&obj).map_err(|e| (n, e.to_string()))?;
    let mut unknown = Vec::new();
    unknown_fields(value, &round, "", &mut unknown);
    if !unknown.is_empty() {
        let list: Vec<String> = unknown.iter().map(|p| say(p)).collect();
        return Err((n, list.join("\n")));
    }
    Ok(obj)
}

/// The subschema `schema` stands for, through `$ref` and nullable `anyOf`.
fn resolve<'a>(schema: &'a Value, root: &'a Value) -> &'a Value {
    let mut s = schema;
    for _ in 0..8 {
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            let name = r.rsplit('/').next().unwrap_or_default();
            match root
                .get("$defs")
                .or_else(|| root.get("definitions"))
                .and_then(|d| d.get(name))
            {
                Some(next) => s = next,
                None => return s,
            }
        } else if let Some(branches) = s.get("anyOf").and_then(Value::as_array) {
            match branches
                .iter()
                .find(|b| b.get("type").and_then(Value::as_str) != Some("null"))
            {
                Some(b) => s = b,
                None => return s,
            }
        } else {
            return s;
        }
    }
    s
}

/// Fields of `input` that `schema` does not declare, each with the closest
/// declared name when one is close enough to be a typo.
fn schema_unknown(
    input: &Value,
    schema: &Value,
    root: &Value,
    path: &str,
    out: &mut Vec<(String, Option<String>)>,
) {
    let schema = resolve(schema, root);
    match input {
        Value::Object(fields) => {
            let Some(props) = schema.get("properties").and_then(Value::as_object) else {
                return;
            };
            // Open objects (labels, annotations, matchLabels) take any key.
            if schema
                .get("additionalProperties")
                .is_some_and(|a| a != &Value::Bool(false))
            {
                return;
            }
            for (k, v) in fields {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match props.get(k) {
                    Some(sub) => schema_unknown(v, sub, root, &p, out),
                    None if is_empty(v) => {}
                    None => out.push((p, closest(k, props.keys()))),
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    schema_unknown(v, item, root, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// The known name within two edits of `word`, if any.
fn closest<'a>(word: &str, known: impl Iterator<Item = &'a String>) -> Option<String> {
    known
        .map(|k| (edit_distance(word, k), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| k.clone())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Parses EgressGuards, NodeShapings and CIDRGroups from YAML text; other kinds are skipped.
pub fn parse_manifests(text: &str) -> Result<Vec<Manifest>, (usize, String)> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let value = Value::deserialize(doc).map_err(|e| (n, e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let api = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !matches!(kind, "EgressGuard" | "NodeShaping" | "CIDRGroup") {
            continue;
        }
        if api != "egressguard.io/v1alpha1" {
            return Err((
                n,
                format!("apiVersion: {api:?} is not served; use egressguard.io/v1alpha1"),
            ));
        }
        out.push(match kind {
            "EgressGuard" => Manifest::Guard(typed(n, &value)?),
            "CIDRGroup" => Manifest::Group(typed(n, &value)?),
            _ => Manifest::NodeShaping(typed(n, &value)?),
        });
    }
    Ok(out)
}

/// Collects paths present in the input but dropped by the typed round trip.
fn unknown_fields(input: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (input, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    Some(tv) => unknown_fields(v, tv, &p, out),
                    None if is_empty(v) => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, tv)) in a.iter().zip(b).enumerate() {
                unknown_fields(v, tv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}
