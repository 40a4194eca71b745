//! The Alertmanager receiver (`POST /alertmanager`): the I/O around
//! [`crate::webhook`], which decides. Authenticated by a token file re-read
//! on every request (a rotated Secret takes effect without a restart);
//! bounded (body size, alerts per notification, one record per episode);
//! corroborated with Prometheus when the trigger asks; and one alert that
//! cannot be stored never drops the rest of its notification.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use egressguard_crds::{EgressGuard, NodeShaping, Quarantine, QuarantineStatus};
use hyper::StatusCode;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::evaluate::NodeIndex;
use crate::prom::Prometheus;
use crate::quarantine::{Notice, Subject};
use crate::remediate::{publish, QuarantineMetrics};
use crate::webhook::{self, Corroboration, Intent, Triple};
use egressguard_crds::serve::{read_body, text, Reply};

/// Field manager for the receiver's writes.
const MANAGER: &str = "egressguard-operator";

/// A bearer token kept in a file (a mounted Secret), read again on every
/// request: the kubelet swaps a rotated Secret in place, and a receiver that
/// kept the old token would answer Alertmanager 401 until restarted.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    last: Mutex<Vec<u8>>,
}

impl TokenFile {
    /// A token file whose current content (already checked) is `token`.
    pub fn new(path: PathBuf, token: Vec<u8>) -> TokenFile {
        TokenFile {
            path,
            last: Mutex::new(token),
        }
    }

    /// The token now. A file that cannot be read, or holds less than 16
    /// bytes (mid-rotation), leaves the last good token in force.
    pub fn current(&self) -> Vec<u8> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match std::fs::read_to_string(&self.path) {
            Ok(t) if t.trim().len() >= 16 => {
                let t = t.trim().as_bytes().to_vec();
                if *last != t {
                    info!(path = %self.path.display(), "webhook token changed; using the new one");
                    *last = t;
                }
            }
            Ok(_) => {
                warn!(path = %self.path.display(), "webhook token file holds under 16 bytes; keeping the previous token")
            }
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "cannot read the webhook token file; keeping the previous token")
            }
        }
        last.clone()
    }
}

/// What the receiver needs; shared by every connection.
pub struct Receiver {
    /// API client.
    pub client: Client,
    /// Guards.
    pub guards: Store<EgressGuard>,
    /// Nodes.
    pub nodes: Store<Node>,
    /// The plans: which nodes each guard plans.
    pub shapings: Store<NodeShaping>,
    /// The Quarantine records (episodes).
    pub quarantines: Store<Quarantine>,
    /// Which node addresses count (the same policy as the plans').
    pub node_addresses: crate::decide::NodeAddressPolicy,
    /// Prometheus, to corroborate alerts with.
    pub prometheus: Option<Prometheus>,
    /// The bearer token.
    pub token: TokenFile,
    /// Event recorder (DryRun "would quarantine").
    pub recorder: Recorder,
    /// Counters.
    pub metrics: Arc<Mutex<QuarantineMetrics>>,
}

/// What became of the alerts of one notification.
#[derive(Debug, Default)]
struct Tally {
    counts: BTreeMap<&'static str, u64>,
    /// A write or read failed: Alertmanager must retry (every write is idempotent).
    retry: Option<Retry>,
}

impl Tally {
    fn add(&mut self, outcome: &'static str) {
        *self.counts.entry(outcome).or_default() += 1;
    }

    /// Keeps the first reason to have Alertmanager send again.
    fn retry(&mut self, why: Retry) {
        warn!("{why}; Alertmanager will retry");
        self.retry.get_or_insert(why);
    }

    /// Counts the outcome of a write, or keeps why it must be retried.
    fn settle(&mut self, result: Result<&'static str, Retry>) {
        match result {
            Ok(outcome) => self.add(outcome),
            Err(why) => self.retry(why),
        }
    }

    fn render(&self) -> String {
        self.counts
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The answer to Alertmanager and how the request counts: 503 when
    /// something must be retried, else 200 (a duplicate when it changed
    /// nothing and only repeated what was stored).
    fn answer(&self) -> (StatusCode, &'static str, String) {
        if let Some(e) = &self.retry {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("{e}; every other alert was handled ({})\n", self.render()),
            );
        }
        let changed = ["started", "resolved", "rearmed"]
            .iter()
            .any(|k| self.counts.contains_key(k));
        let outcome = if changed || !self.counts.contains_key("repeat") {
            "accepted"
        } else {
            "duplicate"
        };
        (StatusCode::OK, outcome, format!("{}\n", self.render()))
    }
}

/// Why Alertmanager must send a notification again: a read or write the
/// API refused for now, or a resolve Prometheus does not agree with yet.
#[derive(Debug, thiserror::Error)]
enum Retry {
    /// The record holding an episode's name could not be read.
    #[error("cannot read quarantine {name}: {source}")]
    Read {
        /// The record's name.
        name: String,
        /// The API's error.
        source: kube::Error,
    },
    /// A new episode's record could not be created.
    #[error("cannot store the quarantine request {name}: {source}")]
    Store {
        /// The record's name.
        name: String,
        /// The API's error.
        source: kube::Error,
    },
    /// A repeat could not be counted on its record.
    #[error("cannot count the repeat on {name}: {source}")]
    Repeat {
        /// The record's name.
        name: String,
        /// The API's error.
        source: kube::Error,
    },
    /// A resolution could not be recorded.
    #[error("cannot record the resolution on {name}: {source}")]
    Resolution {
        /// The record's name.
        name: String,
        /// The API's error.
        source: kube::Error,
    },
    /// Alertmanager sends a resolve once: dropped, the episode would never
    /// end by policy. A Prometheus that lags the one that raised the alert
    /// catches up; Alertmanager retries.
    #[error("Prometheus still has trigger {trigger}'s alert firing for node {node}; the resolve is not recorded yet")]
    StillFiring {
        /// The trigger.
        trigger: String,
        /// The node.
        node: String,
    },
}

/// What the caches hold when a notification arrives.
struct Snapshot {
    /// Every guard.
    guards: Vec<EgressGuard>,
    /// Node names and addresses, after the node address policy.
    index: NodeIndex,
    /// Nodes carrying each guard's plan.
    planned: BTreeMap<String, BTreeSet<String>>,
    /// Every Quarantine record.
    records: Vec<Arc<Quarantine>>,
}

/// The nodes carrying each guard's plan, by guard name.
fn planned_by_guard(shapings: &[Arc<NodeShaping>]) -> BTreeMap<String, BTreeSet<String>> {
    let mut planned: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in shapings {
        if let Some(g) = &s.spec.guard {
            planned
                .entry(g.name.clone())
                .or_default()
                .insert(s.spec.node_name.clone());
        }
    }
    planned
}

impl Receiver {
    fn count(&self, outcome: &'static str) {
        *self
            .metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .webhook
            .entry(outcome)
            .or_default() += 1;
    }

    /// Counts the request as `outcome` and answers it.
    fn refuse(&self, outcome: &'static str, code: StatusCode, body: impl Into<String>) -> Reply {
        self.count(outcome);
        text(code, body)
    }

    /// Handles one request: admit it, read the caches, corroborate with
    /// Prometheus, decide ([`webhook::intents`]), carry out, answer.
    pub async fn handle(self: Arc<Self>, req: hyper::Request<hyper::body::Incoming>) -> Reply {
        let n = match self.admit(req).await {
            Ok(n) => n,
            Err(reply) => return reply,
        };
        let Some(snap) = self.snapshot().await else {
            return self.refuse(
                "unavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                "caches not ready; retry\n",
            );
        };
        let wanted = webhook::corroborations(&n, &snap.guards, self.prometheus.is_some());
        let firing = match self.ask_prometheus(&wanted, &snap.index).await {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, "cannot corroborate alerts with Prometheus; Alertmanager will retry");
                return self.refuse(
                    "unavailable",
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("cannot corroborate the alerts with Prometheus: {e}\n"),
                );
            }
        };
        let facts = webhook::Facts {
            guards: &snap.guards,
            index: &snap.index,
            planned: &snap.planned,
            records: &snap.records,
            has_prometheus: self.prometheus.is_some(),
            firing: &firing,
        };
        let mut tally = Tally::default();
        for intent in webhook::intents(&n, &facts) {
            self.carry_out(intent, &snap.guards, &mut tally).await;
        }
        self.count_alerts(&tally);
        let (code, outcome, body) = tally.answer();
        self.count(outcome);
        text(code, body)
    }

    /// The notification in an authorized POST to `/alertmanager`, or the
    /// answer refusing the request (counted by why).
    async fn admit(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<webhook::Notification, Reply> {
        if req.uri().path() != "/alertmanager" {
            return Err(text(
                StatusCode::NOT_FOUND,
                "not found; Alertmanager posts to /alertmanager\n",
            ));
        }
        if req.method() != hyper::Method::POST {
            return Err(text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"));
        }
        let auth = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .map(|v| v.as_bytes().to_vec());
        if !webhook::authorized(auth.as_deref(), &self.token.current()) {
            return Err(self.refuse(
                "unauthorized",
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token\n",
            ));
        }
        let body = match read_body(req, webhook::MAX_BODY).await {
            Ok(b) => b,
            Err(code) => {
                let outcome = if code == StatusCode::PAYLOAD_TOO_LARGE {
                    "too_large"
                } else {
                    "bad_request"
                };
                let why = format!("body refused: {code} (limit {} bytes)\n", webhook::MAX_BODY);
                return Err(self.refuse(outcome, code, why));
            }
        };
        let n = match webhook::parse(&body) {
            Ok(n) => n,
            Err(e @ webhook::BadRequest::TooManyAlerts(_)) => {
                warn!("{e}");
                return Err(self.refuse(
                    "too_large",
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("{e}\n"),
                ));
            }
            Err(e) => {
                return Err(self.refuse("bad_request", StatusCode::BAD_REQUEST, format!("{e}\n")))
            }
        };
        if n.truncated_alerts > 0 {
            warn!(truncated = n.truncated_alerts, "Alertmanager truncated this notification (max_alerts); the missing alerts arrive on a later send");
        }
        Ok(n)
    }

    /// What the caches hold now; `None` until every one has synced.
    async fn snapshot(&self) -> Option<Snapshot> {
        let stores_ready = self.guards.wait_until_ready().await.is_ok()
            && self.nodes.wait_until_ready().await.is_ok()
            && self.shapings.wait_until_ready().await.is_ok()
            && self.quarantines.wait_until_ready().await.is_ok();
        if !stores_ready {
            return None;
        }
        let reported: Vec<_> = self
            .nodes
            .state()
            .iter()
            .map(|n| crate::decide::NodeFacts::of(n))
            .collect();
        let (facts, _) = crate::decide::limit_node_addresses(&reported, &self.node_addresses);
        Some(Snapshot {
            guards: self.guards.state().iter().map(|g| (**g).clone()).collect(),
            index: NodeIndex::new(&facts),
            planned: planned_by_guard(&self.shapings.state()),
            records: self.quarantines.state(),
        })
    }

    /// The nodes each corroboration query finds firing in Prometheus.
    async fn ask_prometheus(
        &self,
        wanted: &BTreeSet<Corroboration>,
        index: &NodeIndex,
    ) -> Result<BTreeMap<Corroboration, BTreeSet<String>>, crate::prom::QueryError> {
        let mut out = BTreeMap::new();
        let Some(p) = &self.prometheus else {
            return Ok(out);
        };
        for c in wanted {
            let nodes = p
                .query(&c.query())
                .await?
                .iter()
                .filter_map(|s| index.node_of(&s.labels, c.node_label.as_deref()))
                .collect();
            out.insert(c.clone(), nodes);
        }
        Ok(out)
    }

    /// Adds the notification's alert outcomes to the counters.
    fn count_alerts(&self, tally: &Tally) {
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        for (k, v) in &tally.counts {
            *m.alerts.entry(k).or_default() += v;
        }
    }

    /// Carries out one intent: a write to its record, an Event, or a log
    /// line; counted in `tally`.
    async fn carry_out(&self, intent: Intent, guards: &[EgressGuard], tally: &mut Tally) {
        let api: Api<Quarantine> = Api::all(self.client.clone());
        match intent {
            Intent::Start(q) => tally.settle(start(&api, &q).await),
            Intent::Repeat {
                name,
                alerts,
                rearm,
            } => {
                let cached = self.cached_status(&name);
                let now = Time(Timestamp::now());
                tally.settle(repeat(&api, &name, &cached, alerts, rearm, now).await)
            }
            Intent::Resolved(name) => {
                tally.settle(resolve(&api, &name, Time(Timestamp::now())).await)
            }
            Intent::WouldQuarantine(t) => {
                self.would_quarantine(t, guards).await;
                tally.add("would_quarantine");
            }
            Intent::Uncorroborated { triple: t, firing } => {
                if firing {
                    warn!(guard = %t.guard, node = %t.node, trigger = %t.trigger,
                        "alert not corroborated: Prometheus does not have it firing for this node; ignored");
                } else {
                    tally.retry(Retry::StillFiring {
                        trigger: t.trigger,
                        node: t.node,
                    });
                }
                tally.add("uncorroborated");
            }
            Intent::NotPlanned(t) => {
                warn!(guard = %t.guard, node = %t.node, trigger = %t.trigger, "alert for a node the guard does not plan; nothing stored");
                tally.add("not_planned");
            }
            Intent::Unmapped {
                guard,
                trigger,
                why,
            } => {
                warn!(%guard, %trigger, %why, "a matching alert names no node; ignored");
                tally.add("unmapped");
            }
        }
    }

    /// The cached status of the record `name` (empty when not cached).
    fn cached_status(&self, name: &str) -> QuarantineStatus {
        self.quarantines
            .state()
            .iter()
            .find(|q| q.name_any() == name)
            .and_then(|q| q.status.clone())
            .unwrap_or_default()
    }

    /// A DryRun guard's trigger fired: an Event on the guard and the node says
    /// what would have been quarantined.
    async fn would_quarantine(&self, t: Triple, guards: &[EgressGuard]) {
        let Triple {
            guard,
            node,
            trigger,
        } = t;
        let refs: BTreeMap<String, ObjectReference> = guards
            .iter()
            .filter(|g| g.name_any() == guard)
            .map(|g| (guard.clone(), g.object_ref(&())))
            .collect();
        let note = Notice {
            subjects: vec![Subject::Guard(guard.clone()), Subject::Node(node.clone())],
            warning: false,
            reason: egressguard_crds::conditions::events::WOULD_QUARANTINE,
            note: format!("alert trigger {trigger} fired for node {node}; EgressGuard {guard} is a dry run, so nothing is quarantined"),
            once: None,
            quarantine: None,
        };
        publish(&self.recorder, &note, &refs).await;
    }
}

/// The receiver's write options.
fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    }
}

/// Stores a new episode's Pending record. Idempotent: a record of the same
/// episode already there (another replica, or an earlier send, stored it
/// first) is a repeat; something else holding the name is never touched.
async fn start(api: &Api<Quarantine>, q: &Quarantine) -> Result<&'static str, Retry> {
    let name = q.name_any();
    let pp = PostParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    };
    match api.create(&pp, q).await {
        Ok(_) => {
            info!(quarantine = %name, node = %q.spec.node_name, guard = %q.spec.guard, "alert stored as a pending quarantine");
            Ok("started")
        }
        Err(kube::Error::Api(e)) if e.code == 409 => match api.get_opt(&name).await {
            Ok(Some(held)) if same_episode(&held, q) => Ok("repeat"),
            Ok(_) => {
                warn!(quarantine = %name, "another object holds this quarantine's name; the alert is not stored");
                Ok("name_conflict")
            }
            Err(source) => Err(Retry::Read { name, source }),
        },
        Err(source) => Err(Retry::Store { name, source }),
    }
}

/// The status patch counting `alerts` more firings on a record whose cached
/// status is `cached`, and whether it re-arms a resolved record. Counted as
/// a re-arm only when it had resolved; the null is written on every firing
/// of an open record (`rearm`) either way.
fn repeat_patch(
    cached: &QuarantineStatus,
    alerts: u64,
    rearm: bool,
    now: Time,
) -> (serde_json::Value, bool) {
    let prev = cached.alert_repeats.unwrap_or(0);
    let rearmed = rearm && cached.alert_resolved_at.is_some();
    let mut status = serde_json::json!({
        "alertRepeats": prev.saturating_add(alerts),
        "lastAlertAt": now,
    });
    if rearm {
        // Firing again after resolving: the calm window must start over.
        status["alertResolvedAt"] = serde_json::Value::Null;
    }
    (serde_json::json!({ "status": status }), rearmed)
}

/// Counts a repeat on the record `name`. A record gone meanwhile counts as
/// a repeat: there is nothing left to count on.
async fn repeat(
    api: &Api<Quarantine>,
    name: &str,
    cached: &QuarantineStatus,
    alerts: u64,
    rearm: bool,
    now: Time,
) -> Result<&'static str, Retry> {
    let (patch, rearmed) = repeat_patch(cached, alerts, rearm, now);
    match api
        .patch_status(name, &patch_params(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(if rearmed { "rearmed" } else { "repeat" }),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok("repeat"),
        Err(source) => Err(Retry::Repeat {
            name: name.to_string(),
            source,
        }),
    }
}

/// Records that the episode `name`'s alert resolved at `now`; a record
/// gone meanwhile counts as a repeat.
async fn resolve(api: &Api<Quarantine>, name: &str, now: Time) -> Result<&'static str, Retry> {
    let patch = serde_json::json!({"status": {"alertResolvedAt": now}});
    match api
        .patch_status(name, &patch_params(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok("resolved"),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok("repeat"),
        Err(source) => Err(Retry::Resolution {
            name: name.to_string(),
            source,
        }),
    }
}

/// Is `held` (the object holding the name) the record `want` would create?
fn same_episode(held: &Quarantine, want: &Quarantine) -> bool {
    held.spec.guard == want.spec.guard
        && held.spec.node_name == want.spec.node_name
        && held.spec.trigger == want.spec.trigger
        && webhook::episode_of(held) == webhook::episode_of(want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use egressguard_crds::node_shaping::{GuardRef, NodeShapingSpec};
    use egressguard_crds::quarantine::EPISODE_LABEL;
    use egressguard_crds::QuarantineSpec;
    use http::{Request, Response};
    use kube::api::ObjectMeta;
    use kube::client::Body;
    use serde_json::{json, Value};
    use tower_test::mock::Handle;

    const RECORDS: &str = "/apis/egressguard.io/v1alpha1/quarantines";

    fn record(name: &str, guard: &str, episode: u64) -> Quarantine {
        Quarantine {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([(EPISODE_LABEL.to_string(), episode.to_string())].into()),
                ..Default::default()
            },
            spec: QuarantineSpec {
                node_name: "n1".into(),
                guard: guard.into(),
                trigger: "alert".into(),
                evidence: None,
                release: None,
                reason: None,
            },
            status: None,
        }
    }

    fn at(t: &str) -> Time {
        Time(t.parse().expect("time"))
    }

    fn respond(code: u16, v: &Value) -> Response<Body> {
        Response::builder()
            .status(code)
            .body(Body::from(v.to_string().into_bytes()))
            .expect("response")
    }

    fn status(code: u16) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "message": format!("answered {code}")})
    }

    type Server = Handle<Request<Body>, Response<Body>>;

    /// An API whose server answers each expected (method, path) in turn.
    fn api(
        answers: Vec<(&'static str, String, u16, Value)>,
    ) -> (Api<Quarantine>, tokio::task::JoinHandle<Server>) {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            for (method, path, code, body) in answers {
                let (req, send) = handle.next_request().await.expect("request");
                assert_eq!(
                    (req.method().as_str(), req.uri().path()),
                    (method, path.as_str())
                );
                send.send_response(respond(code, &body));
            }
            handle
        });
        (Api::all(kube::Client::new(mock, "default")), server)
    }

    #[tokio::test]
    async fn a_new_episode_is_stored_once_and_a_foreign_name_is_left_alone() {
        let q = record("site-n1-alert-1", "site", 1);
        let created = serde_json::to_value(&q).expect("json");
        let (a, server) = api(vec![("POST", RECORDS.into(), 201, created.clone())]);
        assert_eq!(start(&a, &q).await.expect("stored"), "started");
        server.await.expect("server");

        // Already stored by another replica: a repeat.
        let path = format!("{RECORDS}/site-n1-alert-1");
        let (a, server) = api(vec![
            ("POST", RECORDS.into(), 409, status(409)),
            ("GET", path.clone(), 200, created),
        ]);
        assert_eq!(start(&a, &q).await.expect("repeat"), "repeat");
        server.await.expect("server");

        // Another guard's record holds the name: not touched.
        let other = serde_json::to_value(record("site-n1-alert-1", "other", 1)).expect("json");
        let (a, server) = api(vec![
            ("POST", RECORDS.into(), 409, status(409)),
            ("GET", path.clone(), 200, other),
        ]);
        assert_eq!(start(&a, &q).await.expect("conflict"), "name_conflict");
        server.await.expect("server");

        // The API cannot store it now: Alertmanager retries.
        let (a, server) = api(vec![("POST", RECORDS.into(), 500, status(500))]);
        let e = start(&a, &q).await.expect_err("retry");
        assert!(matches!(e, Retry::Store { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("cannot store the quarantine request site-n1-alert-1: "),
            "{e}"
        );
        server.await.expect("server");
        let (a, server) = api(vec![
            ("POST", RECORDS.into(), 409, status(409)),
            ("GET", path, 500, status(500)),
        ]);
        let e = start(&a, &q).await.expect_err("retry");
        assert!(
            e.to_string()
                .starts_with("cannot read quarantine site-n1-alert-1: "),
            "{e}"
        );
        server.await.expect("server");
    }

    #[tokio::test]
    async fn repeats_and_resolutions_patch_the_status_and_a_gone_record_is_a_repeat() {
        let path = format!("{RECORDS}/r/status");
        let now = at("2026-11-23T10:00:00Z");
        let ok = serde_json::to_value(record("r", "site", 1)).expect("json");
        let resolved = QuarantineStatus {
            alert_resolved_at: Some(at("2026-11-23T09:00:00Z")),
            ..Default::default()
        };
        let (a, server) = api(vec![
            ("PATCH", path.clone(), 200, ok.clone()),
            ("PATCH", path.clone(), 200, ok.clone()),
            ("PATCH", path.clone(), 404, status(404)),
            ("PATCH", path.clone(), 500, status(500)),
            ("PATCH", path.clone(), 200, ok),
            ("PATCH", path.clone(), 404, status(404)),
            ("PATCH", path, 500, status(500)),
        ]);
        let cached = QuarantineStatus::default();
        assert_eq!(
            repeat(&a, "r", &resolved, 1, true, now.clone())
                .await
                .expect("ok"),
            "rearmed"
        );
        assert_eq!(
            repeat(&a, "r", &cached, 1, true, now.clone())
                .await
                .expect("ok"),
            "repeat"
        );
        assert_eq!(
            repeat(&a, "r", &cached, 1, false, now.clone())
                .await
                .expect("gone"),
            "repeat"
        );
        let e = repeat(&a, "r", &cached, 1, false, now.clone())
            .await
            .expect_err("retry");
        assert!(
            e.to_string().starts_with("cannot count the repeat on r: "),
            "{e}"
        );
        assert_eq!(resolve(&a, "r", now.clone()).await.expect("ok"), "resolved");
        assert_eq!(resolve(&a, "r", now.clone()).await.expect("gone"), "repeat");
        let e = resolve(&a, "r", now).await.expect_err("retry");
        assert!(
            e.to_string()
                .starts_with("cannot record the resolution on r: "),
            "{e}"
        );
        server.await.expect("server");
    }

    #[test]
    fn a_repeat_counts_alerts_and_rearms_only_what_resolved() {
        let now = at("2026-11-23T10:00:00Z");
        let resolved = QuarantineStatus {
            alert_repeats: Some(u64::MAX - 1),
            alert_resolved_at: Some(at("2026-11-23T09:00:00Z")),
            ..Default::default()
        };
        let (patch, rearmed) = repeat_patch(&resolved, 5, true, now.clone());
        assert!(rearmed);
        assert_eq!(
            patch,
            json!({"status": {"alertRepeats": u64::MAX, "lastAlertAt": "2026-11-23T10:00:00Z", "alertResolvedAt": null}})
        );
        // An open record: the null is written all the same, but it is no re-arm.
        let (patch, rearmed) = repeat_patch(&QuarantineStatus::default(), 2, true, now.clone());
        assert!(!rearmed);
        assert_eq!(patch["status"]["alertRepeats"], 2);
        assert!(patch["status"]["alertResolvedAt"].is_null());
        // Not re-arming: the resolution stays.
        let (patch, rearmed) = repeat_patch(&resolved, 1, false, now);
        assert!(!rearmed);
        assert!(patch["status"].get("alertResolvedAt").is_none());
    }

    #[test]
    fn the_answer_says_what_changed_and_what_must_be_retried() {
        let tally = |outcomes: &[&'static str]| {
            let mut t = Tally::default();
            for o in outcomes {
                t.add(o);
            }
            t
        };
        let answer = |t: &Tally| {
            let (code, outcome, body) = t.answer();
            (code.as_u16(), outcome, body)
        };
        assert_eq!(answer(&tally(&[])), (200, "accepted", "\n".into()));
        assert_eq!(
            answer(&tally(&["started", "repeat"])),
            (200, "accepted", "repeat 1, started 1\n".into())
        );
        assert_eq!(
            answer(&tally(&["repeat", "repeat"])),
            (200, "duplicate", "repeat 2\n".into())
        );
        assert_eq!(answer(&tally(&["rearmed", "repeat"])).1, "accepted");
        let mut t = tally(&["started"]);
        t.retry(Retry::StillFiring {
            trigger: "alert".into(),
            node: "n1".into(),
        });
        t.retry(Retry::StillFiring {
            trigger: "later".into(),
            node: "n2".into(),
        });
        t.add("uncorroborated");
        assert_eq!(
            answer(&t),
            (
                503,
                "unavailable",
                "Prometheus still has trigger alert's alert firing for node n1; the resolve is not recorded yet; every other alert was handled (started 1, uncorroborated 1)\n".into()
            )
        );
    }

    #[test]
    fn plans_are_grouped_by_guard() {
        let plan = |node: &str, guard: Option<&str>| {
            Arc::new(NodeShaping::new(
                node,
                NodeShapingSpec {
                    node_name: node.into(),
                    guard: guard.map(|g| GuardRef {
                        name: g.into(),
                        uid: String::new(),
                        generation: 1,
                    }),
                    shaping: None,
                    groups: vec![],
                    protected: vec![],
                    enforce: false,
                },
            ))
        };
        let planned = planned_by_guard(&[
            plan("n1", Some("a")),
            plan("n2", Some("a")),
            plan("n3", Some("b")),
            plan("n4", None),
        ]);
        assert_eq!(
            planned,
            BTreeMap::from([
                (
                    "a".to_string(),
                    BTreeSet::from(["n1".to_string(), "n2".to_string()])
                ),
                ("b".to_string(), BTreeSet::from(["n3".to_string()])),
            ])
        );
    }
}
