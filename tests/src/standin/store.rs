//! Objects, resource versions, the event log, selectors, patches and CRD
//! schema checks: the API server semantics the stand-in honours.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{json, Map, Value};

/// A served resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Res {
    /// API group ("" for core).
    pub group: &'static str,
    /// Version.
    pub version: &'static str,
    /// Plural (URL segment).
    pub plural: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Namespaced?
    pub namespaced: bool,
    /// Has a status subresource (spec changes bump generation, status is separate).
    pub status: bool,
    /// Short names for discovery.
    pub short: &'static [&'static str],
}

impl Res {
    /// `apiVersion` value.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Everything the stand-in serves.
pub const RESOURCES: &[Res] = &[
    Res {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
        status: true,
        short: &["no"],
    },
    Res {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        status: true,
        short: &["ns"],
    },
    Res {
        group: "",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status: false,
        short: &["ev"],
    },
    Res {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status: false,
        short: &[],
    },
    Res {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status: false,
        short: &[],
    },
    Res {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
        status: false,
        short: &[],
    },
    Res {
        group: "egressguard.io",
        version: "v1alpha1",
        plural: "egressguards",
        kind: "EgressGuard",
        namespaced: false,
        status: true,
        short: &["eg"],
    },
    Res {
        group: "egressguard.io",
        version: "v1alpha1",
        plural: "nodeshapings",
        kind: "NodeShaping",
        namespaced: false,
        status: true,
        short: &["egns"],
    },
];

/// A watch event as sent on the wire.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    /// Resource version of the change.
    pub rv: u64,
    /// Index into [`RESOURCES`].
    pub res: usize,
    /// ADDED, MODIFIED, DELETED.
    pub kind: &'static str,
    /// The object after the change (before, for DELETED).
    pub object: Value,
}

/// An API error, rendered as a `Status`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP code.
    pub code: u16,
    /// Status reason (NotFound, Conflict, Invalid, ...).
    pub reason: &'static str,
    /// Message.
    pub message: String,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }
    /// The `Status` body.
    pub fn status(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code})
    }
}

/// The object store. Every write gets the next resource version and an event.
#[derive(Debug, Default)]
pub struct Store {
    /// Last resource version handed out.
    pub rv: u64,
    objects: BTreeMap<(usize, String, String), Value>,
    /// Recent events, for watches resuming from a resource version.
    pub log: VecDeque<WatchEvent>,
    /// Oldest resource version a watch may resume from.
    pub compacted: u64,
    uid: u64,
    /// Validation schemas by kind (CRDs' openAPIV3Schema).
    pub schemas: BTreeMap<String, Value>,
}

const LOG_CAP: usize = 10_000;

fn now() -> String {
    // RFC 3339, whole seconds, as the API server writes metav1.Time.
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn meta(o: &Value) -> &Value {
    &o["metadata"]
}

fn labels_of(o: &Value) -> BTreeMap<String, String> {
    meta(o)["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Label selector matching (`a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`).
pub fn label_match(selector: &str, o: &Value) -> bool {
    let labels = labels_of(o);
    let mut terms = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in selector.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    terms.push(cur);
    terms
        .iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .all(|t| {
            let set = |s: &str| -> Vec<String> {
                s.trim()
                    .trim_start_matches('(')
                    .trim_end_matches(')')
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .collect()
            };
            if let Some((k, v)) = t.split_once(" notin ") {
                !labels.get(k.trim()).is_some_and(|x| set(v).contains(x))
            } else if let Some((k, v)) = t.split_once(" in ") {
                labels.get(k.trim()).is_some_and(|x| set(v).contains(x))
            } else if let Some((k, v)) = t.split_once("!=") {
                labels.get(k.trim()).map(String::as_str) != Some(v.trim())
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                labels.get(k.trim()).map(String::as_str) == Some(v.trim())
            } else if let Some(k) = t.strip_prefix('!') {
                !labels.contains_key(k.trim())
            } else {
                labels.contains_key(t)
            }
        })
}

/// Field selector matching for metadata.name / metadata.namespace (`=`, `==`, `!=`).
pub fn field_match(selector: &str, o: &Value) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|t| {
            let (k, v, neg) = if let Some((k, v)) = t.split_once("!=") {
                (k, v, true)
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                (k, v, false)
            } else {
                return true;
            };
            let have = match k.trim() {
                "metadata.name" => meta(o)["name"].as_str().unwrap_or_default(),
                "metadata.namespace" => meta(o)["namespace"].as_str().unwrap_or_default(),
                _ => return true,
            };
            (have == v.trim()) != neg
        })
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn pointer_parts(path: &str) -> Vec<String> {
    path.split('/')
        .skip(1)
        .map(|p| p.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// RFC 6902 JSON patch (add, remove, replace, test).
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    for op in ops.as_array().ok_or("JSON patch must be an array")? {
        let path = op["path"].as_str().ok_or("op without path")?;
        let parts = pointer_parts(path);
        let (last, parents) = parts.split_last().ok_or("empty path")?;
        let mut cur = &mut *target;
        for p in parents {
            cur = match cur {
                Value::Object(m) => m.get_mut(p).ok_or(format!("{path}: missing {p}"))?,
                Value::Array(a) => a
                    .get_mut(
                        p.parse::<usize>()
                            .map_err(|_| format!("{path}: bad index"))?,
                    )
                    .ok_or(format!("{path}: index out of range"))?,
                _ => return Err(format!("{path}: not a container")),
            };
        }
        let value = op.get("value").cloned().unwrap_or(Value::Null);
        match (op["op"].as_str().unwrap_or_default(), cur) {
            ("add" | "replace", Value::Object(m)) => {
                m.insert(last.clone(), value);
            }
            ("add", Value::Array(a)) => {
                if last == "-" {
                    a.push(value);
                } else {
                    let i: usize = last.parse().map_err(|_| format!("{path}: bad index"))?;
                    a.insert(i.min(a.len()), value);
                }
            }
            ("replace", Value::Array(a)) => {
                let i: usize = last.parse().map_err(|_| format!("{path}: bad index"))?;
                *a.get_mut(i).ok_or(format!("{path}: index out of range"))? = value;
            }
            ("remove", Value::Object(m)) => {
                m.remove(last).ok_or(format!("{path}: nothing to remove"))?;
            }
            ("remove", Value::Array(a)) => {
                let i: usize = last.parse().map_err(|_| format!("{path}: bad index"))?;
                if i >= a.len() {
                    return Err(format!("{path}: index out of range"));
                }
                a.remove(i);
            }
            ("test", Value::Object(m)) => {
                if m.get(last) != Some(&value) {
                    return Err(format!("{path}: test failed"));
                }
            }
            (other, _) => return Err(format!("unsupported JSON patch op {other:?}")),
        }
    }
    Ok(())
}

/// Validates `v` against a structural schema, pruning unknown fields as the
/// API server does; returns field errors in the API server's words.
pub fn validate_schema(schema: &Value, v: &mut Value, path: &str, errs: &mut Vec<String>) {
    if v.is_null() {
        if !schema["nullable"].as_bool().unwrap_or(false) && !path.is_empty() {
            errs.push(format!(
                "{path}: Invalid value: \"null\": {path} in body must be of type {}",
                schema["type"].as_str().unwrap_or("object")
            ));
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"]
        .as_bool()
        .unwrap_or(false)
    {
        return;
    }
    let ty = schema["type"].as_str().unwrap_or("");
    let ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    };
    if !ok {
        errs.push(format!(
            "{path}: Invalid value: \"{}\": {path} in body must be of type {ty}",
            json_type(v)
        ));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(v) {
            let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
            errs.push(format!(
                "{path}: Unsupported value: {v}: supported values: {}",
                list.join(", ")
            ));
        }
    }
    if let (Some(pat), Some(text)) = (schema["pattern"].as_str(), v.as_str()) {
        if regex::Regex::new(pat).is_ok_and(|re| !re.is_match(text)) {
            errs.push(format!(
                "{path}: Invalid value: \"{text}\": {path} in body should match '{pat}'"
            ));
        }
    }
    if let (Some(min), Some(a)) = (schema["minItems"].as_u64(), v.as_array()) {
        if (a.len() as u64) < min {
            errs.push(format!(
                "{path}: Invalid value: {}: {path} in body should have at least {min} items",
                a.len()
            ));
        }
    }
    if let Some(n) = v.as_f64() {
        if let Some(max) = schema["maximum"].as_f64() {
            if n > max {
                errs.push(format!("{path}: Invalid value: {v}: {path} in body should be less than or equal to {max}"));
            }
        }
        if let Some(min) = schema["minimum"].as_f64() {
            if n < min {
                errs.push(format!("{path}: Invalid value: {v}: {path} in body should be greater than or equal to {min}"));
            }
        }
    }
    match v {
        Value::Object(m) => {
            for r in schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if !m.contains_key(r) {
                    errs.push(format!("{}: Required value", join(path, r)));
                }
            }
            let preserve = schema["x-kubernetes-preserve-unknown-fields"]
                .as_bool()
                .unwrap_or(false);
            if let Some(props) = schema["properties"].as_object() {
                let keys: Vec<String> = m.keys().cloned().collect();
                for k in keys {
                    match props.get(&k) {
                        Some(s) => {
                            if let Some(child) = m.get_mut(&k) {
                                validate_schema(s, child, &join(path, &k), errs);
                            }
                        }
                        None if !preserve && !path.is_empty() && k != "metadata" => {
                            m.remove(&k);
                        }
                        None => {}
                    }
                }
            } else if let Some(ap) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for (k, child) in m.iter_mut() {
                    validate_schema(ap, child, &join(path, k), errs);
                }
            }
        }
        Value::Array(a) => {
            if let Some(items) = schema.get("items") {
                for (i, child) in a.iter_mut().enumerate() {
                    validate_schema(items, child, &format!("{path}[{i}]"), errs);
                }
            }
        }
        _ => {}
    }
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() {
        k.to_string()
    } else {
        format!("{path}.{k}")
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn spec_part(o: &Value) -> Value {
    let mut c = o.clone();
    if let Some(m) = c.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    c
}

impl Store {
    fn key(res: usize, ns: &str, name: &str) -> (usize, String, String) {
        (res, ns.to_string(), name.to_string())
    }

    fn record(&mut self, res: usize, kind: &'static str, object: Value) {
        self.log.push_back(WatchEvent {
            rv: self.rv,
            res,
            kind,
            object,
        });
        while self.log.len() > LOG_CAP {
            if let Some(e) = self.log.pop_front() {
                self.compacted = e.rv;
            }
        }
    }

    /// Forgets the event log: watches resuming from before now get 410 Gone.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.log.clear();
    }

    fn check_schema(&self, res: usize, obj: &mut Value) -> Result<(), ApiError> {
        let r = &RESOURCES[res];
        let Some(schema) = self.schemas.get(r.kind) else {
            return Ok(());
        };
        let mut errs = Vec::new();
        validate_schema(schema, obj, "", &mut errs);
        if errs.is_empty() {
            Ok(())
        } else {
            let name = meta(obj)["name"].as_str().unwrap_or_default().to_string();
            Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "{}.{} {name:?} is invalid: [{}]",
                    r.kind,
                    r.group,
                    errs.join(", ")
                ),
            ))
        }
    }

    /// GET one object.
    pub fn get(&self, res: usize, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&Self::key(res, ns, name))
            .cloned()
            .ok_or_else(|| not_found(res, name))
    }

    /// Objects of a type, filtered.
    pub fn list(&self, res: usize, ns: Option<&str>, labels: &str, fields: &str) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((r, n, _), o)| {
                *r == res
                    && ns.is_none_or(|ns| ns == n)
                    && label_match(labels, o)
                    && field_match(fields, o)
            })
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// POST.
    pub fn create(&mut self, res: usize, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        let r = &RESOURCES[res];
        if !obj.is_object() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "body is not a JSON object",
            ));
        }
        let mut name = meta(&obj)["name"].as_str().unwrap_or_default().to_string();
        if name.is_empty() {
            if let Some(prefix) = meta(&obj)["generateName"].as_str() {
                self.uid += 1;
                name = format!("{prefix}{:05x}", self.uid);
            } else {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "{}.{} is invalid: metadata.name: Required value",
                        r.kind, r.group
                    ),
                ));
            }
        }
        if self.objects.contains_key(&Self::key(res, ns, &name)) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{}.{} {name:?} already exists", r.plural, r.group),
            ));
        }
        self.check_schema(res, &mut obj)?;
        self.rv += 1;
        self.uid += 1;
        let m = obj["metadata"]
            .as_object_mut()
            .ok_or_else(|| ApiError::new(400, "BadRequest", "metadata missing"))?;
        m.insert("name".into(), json!(name));
        if r.namespaced {
            m.insert("namespace".into(), json!(ns));
        } else {
            m.remove("namespace");
        }
        m.insert(
            "uid".into(),
            json!(format!("00000000-0000-4000-8000-{:012x}", self.uid)),
        );
        m.insert("resourceVersion".into(), json!(self.rv.to_string()));
        m.insert("creationTimestamp".into(), json!(now()));
        m.insert("generation".into(), json!(1));
        m.remove("deletionTimestamp");
        obj["apiVersion"] = json!(r.api_version());
        obj["kind"] = json!(r.kind);
        if r.status {
            if let Some(o) = obj.as_object_mut() {
                o.remove("status");
            }
        }
        self.objects.insert(Self::key(res, ns, &name), obj.clone());
        self.record(res, "ADDED", obj.clone());
        Ok(obj)
    }

    /// PUT (main resource or `/status`), with optimistic concurrency.
    pub fn update(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        mut obj: Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        let r = &RESOURCES[res];
        let old = self.get(res, ns, name)?;
        let want_rv = meta(&obj)["resourceVersion"].as_str().unwrap_or_default();
        if !want_rv.is_empty()
            && want_rv != meta(&old)["resourceVersion"].as_str().unwrap_or_default()
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!("Operation cannot be fulfilled on {}.{} {name:?}: the object has been modified; please apply your changes to the latest version and try again", r.plural, r.group),
            ));
        }
        if r.status {
            // The status subresource and the main resource each own their part.
            let mut merged = old.clone();
            if status {
                merged["status"] = obj.get("status").cloned().unwrap_or(Value::Null);
            } else {
                let keep = old.get("status").cloned();
                merged = obj.clone();
                match keep {
                    Some(s) => merged["status"] = s,
                    None => {
                        if let Some(m) = merged.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            obj = merged;
        }
        self.check_schema(res, &mut obj)?;
        // Server-owned metadata survives any update.
        for k in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "generation",
            "namespace",
            "name",
        ] {
            match old["metadata"].get(k) {
                Some(v) => obj["metadata"][k] = v.clone(),
                None => {
                    if let Some(m) = obj["metadata"].as_object_mut() {
                        m.remove(k);
                    }
                }
            }
        }
        if spec_part(&obj) != spec_part(&old) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            obj["metadata"]["generation"] = json!(g);
        }
        obj["apiVersion"] = json!(r.api_version());
        obj["kind"] = json!(r.kind);
        if obj == old.clone_with_rv(&obj) {
            return Ok(old);
        }
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let finalizers_empty = obj["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty);
        if obj["metadata"].get("deletionTimestamp").is_some() && finalizers_empty {
            self.objects.remove(&Self::key(res, ns, name));
            self.record(res, "DELETED", obj.clone());
        } else {
            self.objects.insert(Self::key(res, ns, name), obj.clone());
            self.record(res, "MODIFIED", obj.clone());
        }
        Ok(obj)
    }

    /// PATCH: merge, JSON patch, apply (treated as a merge of the sent object).
    pub fn patch(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        content_type: &str,
        body: &[u8],
        status: bool,
    ) -> Result<Value, ApiError> {
        let patch: Value = if content_type.contains("yaml") {
            serde_yaml::from_slice(body)
                .map_err(|e| ApiError::new(400, "BadRequest", e.to_string()))?
        } else {
            serde_json::from_slice(body)
                .map_err(|e| ApiError::new(400, "BadRequest", e.to_string()))?
        };
        let existing = self.get(res, ns, name);
        let mut obj = match (existing, content_type.contains("apply-patch")) {
            (Ok(o), _) => o,
            // Server-side apply creates.
            (Err(_), true) if !status => {
                let mut p = patch.clone();
                p["metadata"]["name"] = json!(name);
                return self.create(res, ns, p);
            }
            (Err(e), _) => return Err(e),
        };
        if content_type.contains("json-patch") {
            json_patch(&mut obj, &patch).map_err(|e| ApiError::new(422, "Invalid", e))?;
        } else if content_type.contains("apply-patch") {
            // Server-side apply, assuming one field manager: the sections the
            // applied configuration names (spec, status, ...) are replaced, so
            // fields it no longer sets disappear; metadata is merged.
            if let (Some(o), Some(p)) = (obj.as_object_mut(), patch.as_object()) {
                for (k, v) in p {
                    match k.as_str() {
                        "metadata" => merge_patch(o.entry("metadata").or_insert(Value::Null), v),
                        "apiVersion" | "kind" => {}
                        _ => {
                            o.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
        } else {
            merge_patch(&mut obj, &patch);
        }
        if patch["metadata"].get("resourceVersion").is_none() {
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
        }
        self.update(res, ns, name, obj, status)
    }

    /// DELETE: with finalizers, only marks deletion.
    pub fn delete(&mut self, res: usize, ns: &str, name: &str) -> Result<Value, ApiError> {
        let mut obj = self.get(res, ns, name)?;
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if has_finalizers {
            if obj["metadata"].get("deletionTimestamp").is_none() {
                obj["metadata"]["deletionTimestamp"] = json!(now());
            }
            self.objects.insert(Self::key(res, ns, name), obj.clone());
            self.record(res, "MODIFIED", obj.clone());
        } else {
            self.objects.remove(&Self::key(res, ns, name));
            self.record(res, "DELETED", obj.clone());
        }
        Ok(obj)
    }
}

trait CloneWithRv {
    fn clone_with_rv(&self, other: &Value) -> Value;
}

impl CloneWithRv for Value {
    /// `self` with `other`'s resourceVersion, to detect no-op writes.
    fn clone_with_rv(&self, other: &Value) -> Value {
        let mut c = self.clone();
        c["metadata"]["resourceVersion"] = other["metadata"]
            .get("resourceVersion")
            .cloned()
            .unwrap_or(Value::Null);
        if other["metadata"].get("resourceVersion").is_none() {
            if let Some(m) = c["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
        }
        c
    }
}

fn not_found(res: usize, name: &str) -> ApiError {
    let r = &RESOURCES[res];
    let what = if r.group.is_empty() {
        r.plural.to_string()
    } else {
        format!("{}.{}", r.plural, r.group)
    };
    ApiError::new(404, "NotFound", format!("{what} {name:?} not found"))
}

/// An empty JSON object.
pub fn empty() -> Value {
    Value::Object(Map::new())
}
