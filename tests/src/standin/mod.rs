//! A Kubernetes-API **stand-in** for end-to-end tests on machines where no
//! real API server can run. It is not Kubernetes and is never shipped: it
//! imitates, over plain HTTP on loopback, the parts of the API that kube-rs
//! and kubectl use against EgressGuard's objects.
//!
//! Honoured: discovery (`/api`, `/apis`, per group-version resource lists,
//! `/version`); get/list/create/update/patch/delete for nodes, namespaces,
//! events, leases, endpointslices, egressguards and nodeshapings; list and
//! watch with resource versions, bookmarks and `410 Gone` for compacted
//! versions; `409` on a stale resourceVersion; merge and JSON patches, and
//! server-side apply for a single field manager (the sections an applied
//! configuration names are replaced, metadata is merged);
//! the status subresource (spec changes bump `metadata.generation`, status
//! writes touch only status); finalizers and `deletionTimestamp`; label and
//! field selectors; CRD `openAPIV3Schema` validation (types, required, enum,
//! minimum/maximum, pattern, minItems) with pruning of unknown fields (from
//! `crds/*.yaml`); fault injection (`POST /standin/faults {"failNext": N,
//! "code": 500}`, `POST /standin/drop-watches`, `POST /standin/compact`,
//! `POST /standin/restart {"downSeconds": N}`: watches end and every request
//! gets 503 for N seconds with the data kept, as clients see an API restart).
//!
//! Not imitated: authentication and RBAC, admission, CEL rules
//! (`x-kubernetes-validations`), server-side printer columns (kubectl shows
//! NAME and AGE only), strategic
//! merge semantics (treated as merge patch), managed fields, server-side
//! apply conflicts, pagination (`limit` is ignored), protobuf, HTTP/2, TLS,
//! aggregated discovery, OpenAPI documents, garbage collection by owner.

pub mod http;
pub mod store;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

use http::{read_request, respond, Request};
use store::{ApiError, Store, WatchEvent, RESOURCES};

/// Shared server state.
pub struct Server {
    store: Mutex<Store>,
    events: broadcast::Sender<WatchEvent>,
    drop_watches: broadcast::Sender<()>,
    faults: Mutex<(u32, u16)>,
    down_until: Mutex<Option<std::time::Instant>>,
}

impl Server {
    /// A server with CRD schemas loaded from `crd_dir` (every `*.yaml` CRD in it).
    pub fn new(crd_dir: Option<&Path>) -> Arc<Server> {
        let mut store = Store::default();
        if let Some(dir) = crd_dir {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                    continue;
                }
                let Ok(text) = std::fs::read_to_string(&path) else {
                    continue;
                };
                for doc in serde_yaml::Deserializer::from_str(&text) {
                    // A parse error ends the stream (the iterator would repeat it).
                    let Ok(v) = <Value as serde::Deserialize>::deserialize(doc) else {
                        break;
                    };
                    if v["kind"] != "CustomResourceDefinition" {
                        continue;
                    }
                    let kind = v["spec"]["names"]["kind"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    let schema = v["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
                    store.schemas.insert(kind, schema);
                }
            }
        }
        let (events, _) = broadcast::channel(65_536);
        let (drop_watches, _) = broadcast::channel(16);
        Arc::new(Server {
            store: Mutex::new(store),
            events,
            drop_watches,
            faults: Mutex::new((0, 500)),
            down_until: Mutex::new(None),
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a write and publishes the events it produced.
    fn write<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let mut s = self.store();
        let before = s.log.back().map_or(0, |e| e.rv);
        let out = f(&mut s);
        for e in s.log.iter().filter(|e| e.rv > before) {
            let _ = self.events.send(e.clone());
        }
        out
    }
}

/// Writes a kubeconfig pointing at `addr` (plain HTTP, no credentials).
pub fn write_kubeconfig(path: &Path, addr: std::net::SocketAddr) -> std::io::Result<()> {
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\n    namespace: default\ncurrent-context: standin\nusers:\n- name: standin\n  user: {{}}\n"
        ),
    )
}

/// Accepts connections forever.
pub async fn serve(listener: TcpListener, server: Arc<Server>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(connection(sock, server.clone()));
    }
}

/// Where a request points.
struct Target {
    res: usize,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

fn route(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", v, rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, status) = match rest {
        [p] => (*p, None, false),
        [p, n] => (*p, Some(n.to_string()), false),
        [p, n, "status"] => (*p, Some(n.to_string()), true),
        _ => return None,
    };
    let res = RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)?;
    Some(Target {
        res,
        ns,
        name,
        status,
    })
}

fn discovery(path: &str) -> Option<Value> {
    let p = path.trim_end_matches('/');
    if p == "/version" {
        return Some(
            json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-egressguard-standin", "platform": "linux/amd64"}),
        );
    }
    if p == "/api" {
        return Some(
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        );
    }
    if p == "/apis" {
        let mut groups: Vec<Value> = Vec::new();
        for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
            if groups.iter().any(|g| g["name"] == r.group) {
                continue;
            }
            let gv = json!({"groupVersion": r.api_version(), "version": r.version});
            groups.push(json!({"name": r.group, "versions": [gv.clone()], "preferredVersion": gv}));
        }
        return Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}));
    }
    let gv = p
        .strip_prefix("/api/")
        .or_else(|| p.strip_prefix("/apis/"))?;
    let mut resources = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.api_version() == gv) {
        let verbs = [
            "create", "delete", "get", "list", "patch", "update", "watch",
        ];
        resources.push(json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                              "kind": r.kind, "verbs": verbs, "shortNames": r.short}));
        if r.status {
            resources.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
                                  "kind": r.kind, "verbs": ["get", "patch", "update"]}));
        }
    }
    if resources.is_empty() {
        return None;
    }
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

async fn connection(sock: TcpStream, server: Arc<Server>) {
    let _ = sock.set_nodelay(true);
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    while let Ok(Some(req)) = read_request(&mut r).await {
        let close = req.header("connection").eq_ignore_ascii_case("close");
        let watch = matches!(req.q("watch"), "true" | "1");
        let result = if watch && req.method == "GET" {
            // A watch owns the connection until it ends.
            let _ = run_watch(&req, &server, &mut w).await;
            return;
        } else {
            handle(&req, &server)
        };
        let (code, body) = match result {
            Ok((code, body)) => (code, body),
            Err(e) => (e.code, e.status()),
        };
        if respond(&mut w, code, &body).await.is_err() || close {
            return;
        }
    }
}

fn injected(server: &Server, path: &str) -> Option<ApiError> {
    if path.starts_with("/standin/") {
        return None;
    }
    let down = server.down_until.lock().unwrap_or_else(|p| p.into_inner());
    if down.is_some_and(|t| std::time::Instant::now() < t) {
        return Some(ApiError {
            code: 503,
            reason: "ServiceUnavailable",
            message: "the stand-in is restarting".into(),
        });
    }
    drop(down);
    let mut f = server.faults.lock().unwrap_or_else(|p| p.into_inner());
    if f.0 > 0 {
        f.0 -= 1;
        return Some(ApiError {
            code: f.1,
            reason: "InternalError",
            message: "injected fault (stand-in)".into(),
        });
    }
    None
}

fn handle(req: &Request, server: &Server) -> Result<(u16, Value), ApiError> {
    if let Some(e) = injected(server, &req.path) {
        return Err(e);
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/standin/faults") => {
            let v: Value = serde_json::from_slice(&req.body).unwrap_or_default();
            let n = v["failNext"].as_u64().unwrap_or(1) as u32;
            let code = v["code"].as_u64().unwrap_or(500) as u16;
            *server.faults.lock().unwrap_or_else(|p| p.into_inner()) = (n, code);
            return Ok((200, json!({"failNext": n, "code": code})));
        }
        ("POST", "/standin/restart") => {
            // What clients see of an API server restart: every connection's
            // watch ends and requests fail until it is back; the data survives.
            let v: Value = serde_json::from_slice(&req.body).unwrap_or_default();
            let secs = v["downSeconds"].as_u64().unwrap_or(2);
            *server.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(std::time::Instant::now() + Duration::from_secs(secs));
            let _ = server.drop_watches.send(());
            return Ok((200, json!({"downSeconds": secs})));
        }
        ("POST", "/standin/drop-watches") => {
            let _ = server.drop_watches.send(());
            return Ok((200, json!({"dropped": true})));
        }
        ("POST", "/standin/compact") => {
            server.store().compact();
            let _ = server.drop_watches.send(());
            return Ok((200, json!({"compacted": true})));
        }
        ("GET", "/standin/healthz") | ("GET", "/healthz") | ("GET", "/readyz") => {
            return Ok((200, json!("ok")))
        }
        _ => {}
    }
    if req.method == "GET" {
        if let Some(d) = discovery(&req.path) {
            return Ok((200, d));
        }
    }
    let t = route(&req.path).ok_or_else(|| ApiError {
        code: 404,
        reason: "NotFound",
        message: format!(
            "the server could not find the requested resource ({})",
            req.path
        ),
    })?;
    let r = &RESOURCES[t.res];
    let ns = if r.namespaced {
        t.ns.clone().unwrap_or_default()
    } else {
        String::new()
    };
    match (req.method.as_str(), &t.name) {
        ("GET", None) => {
            let s = server.store();
            let items = s.list(
                t.res,
                t.ns.as_deref().filter(|_| r.namespaced),
                req.q("labelSelector"),
                req.q("fieldSelector"),
            );
            Ok((
                200,
                json!({"apiVersion": r.api_version(), "kind": format!("{}List", r.kind),
                            "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
            ))
        }
        ("GET", Some(name)) => server.store().get(t.res, &ns, name).map(|o| (200, o)),
        ("POST", None) => {
            let obj: Value = parse_body(req)?;
            server
                .write(|s| s.create(t.res, &ns, obj))
                .map(|o| (201, o))
        }
        ("PUT", Some(name)) => {
            let obj: Value = parse_body(req)?;
            server
                .write(|s| s.update(t.res, &ns, name, obj, t.status))
                .map(|o| (200, o))
        }
        ("PATCH", Some(name)) => {
            let ct = req.header("content-type").to_string();
            server
                .write(|s| s.patch(t.res, &ns, name, &ct, &req.body, t.status))
                .map(|o| (200, o))
        }
        ("DELETE", Some(name)) => server
            .write(|s| s.delete(t.res, &ns, name))
            .map(|o| (200, o)),
        _ => Err(ApiError {
            code: 405,
            reason: "MethodNotAllowed",
            message: format!("{} is not supported on {}", req.method, req.path),
        }),
    }
}

fn parse_body(req: &Request) -> Result<Value, ApiError> {
    if req.header("content-type").contains("yaml") {
        serde_yaml::from_slice(&req.body).map_err(|e| ApiError {
            code: 400,
            reason: "BadRequest",
            message: e.to_string(),
        })
    } else {
        serde_json::from_slice(&req.body).map_err(|e| ApiError {
            code: 400,
            reason: "BadRequest",
            message: e.to_string(),
        })
    }
}

async fn run_watch(
    req: &Request,
    server: &Server,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
) -> std::io::Result<()> {
    if let Some(e) = injected(server, &req.path) {
        return respond(w, e.code, &e.status()).await;
    }
    let Some(t) = route(&req.path) else {
        return respond(
            w,
            404,
            &json!({"kind": "Status", "code": 404, "reason": "NotFound"}),
        )
        .await;
    };
    let r = &RESOURCES[t.res];
    let ns_filter = t.ns.clone().filter(|_| r.namespaced);
    let (labels, fields) = (
        req.q("labelSelector").to_string(),
        req.q("fieldSelector").to_string(),
    );
    let bookmarks = req.q("allowWatchBookmarks") == "true";
    let timeout = req
        .q("timeoutSeconds")
        .parse::<u64>()
        .unwrap_or(300)
        .min(600);
    let mut live = server.events.subscribe();
    let mut dropped = server.drop_watches.subscribe();
    let since = req.q("resourceVersion").parse::<u64>().unwrap_or(0);
    let matches = |e: &WatchEvent| {
        e.res == t.res
            && ns_filter
                .as_deref()
                .is_none_or(|ns| e.object["metadata"]["namespace"].as_str() == Some(ns))
            && store::label_match(&labels, &e.object)
            && store::field_match(&fields, &e.object)
    };
    // Backlog: everything after `since`, or the current objects for a fresh watch.
    let (backlog, mut last_rv, expired) = {
        let s = server.store();
        if since == 0 {
            let objs = s.list(t.res, ns_filter.as_deref(), &labels, &fields);
            let evs: Vec<WatchEvent> = objs
                .into_iter()
                .map(|o| WatchEvent {
                    rv: s.rv,
                    res: t.res,
                    kind: "ADDED",
                    object: o,
                })
                .collect();
            (evs, s.rv, false)
        } else if since < s.compacted {
            (vec![], s.rv, true)
        } else {
            (
                s.log
                    .iter()
                    .filter(|e| e.rv > since && matches(e))
                    .cloned()
                    .collect(),
                since.max(s.log.back().map_or(s.rv, |e| e.rv)),
                false,
            )
        }
    };
    http::start_stream(w).await?;
    if expired {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired",
                            "message": format!("too old resource version: {since} ({})", server.store().compacted)});
        http::stream_line(w, &json!({"type": "ERROR", "object": status})).await?;
        return http::end_stream(w).await;
    }
    for e in backlog {
        http::stream_line(w, &json!({"type": e.kind, "object": e.object})).await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    loop {
        tokio::select! {
            ev = live.recv() => match ev {
                Ok(e) => {
                    if e.rv > last_rv && matches(&e) {
                        http::stream_line(w, &json!({"type": e.kind, "object": e.object})).await?;
                    }
                    last_rv = last_rv.max(e.rv);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => return http::end_stream(w).await,
                Err(broadcast::error::RecvError::Closed) => return http::end_stream(w).await,
            },
            _ = dropped.recv() => return Ok(()),
            _ = tick.tick() => {
                if bookmarks {
                    let rv = last_rv;
                    let bm = json!({"type": "BOOKMARK", "object": {"apiVersion": r.api_version(), "kind": r.kind,
                                    "metadata": {"resourceVersion": rv.to_string()}}});
                    http::stream_line(w, &bm).await?;
                }
            }
            _ = tokio::time::sleep_until(deadline) => return http::end_stream(w).await,
        }
    }
}
