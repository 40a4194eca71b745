//! The Alertmanager receiver (`POST /alertmanager`): the I/O around
//! [`crate::webhook`], which decides. Authenticated by a token file re-read
//! on every request (a rotated Secret takes effect without a restart);
//! bounded (body size, alerts per notification, one record per episode);
//! corroborated with Prometheus when the trigger asks; and one alert that
//! cannot be stored never drops the rest of its notification.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use egressguard_crds::{EgressGuard, NodeShaping, Quarantine};
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
    retry: Option<String>,
}

impl Tally {
    fn add(&mut self, outcome: &'static str) {
        *self.counts.entry(outcome).or_default() += 1;
    }

    fn render(&self) -> String {
        self.counts
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
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

    /// Handles one request.
    pub async fn handle(self: Arc<Self>, req: hyper::Request<hyper::body::Incoming>) -> Reply {
        if req.uri().path() != "/alertmanager" {
            return text(
                StatusCode::NOT_FOUND,
                "not found; Alertmanager posts to /alertmanager\n",
            );
        }
        if req.method() != hyper::Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
        }
        let auth = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .map(|v| v.as_bytes().to_vec());
        if !webhook::authorized(auth.as_deref(), &self.token.current()) {
            self.count("unauthorized");
            return text(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
        }
        let body = match read_body(req, webhook::MAX_BODY).await {
            Ok(b) => b,
            Err(code) => {
                self.count(if code == StatusCode::PAYLOAD_TOO_LARGE {
                    "too_large"
                } else {
                    "bad_request"
                });
                return text(
                    code,
                    format!("body refused: {code} (limit {} bytes)\n", webhook::MAX_BODY),
                );
            }
        };
        let n = match webhook::parse(&body) {
            Ok(n) => n,
            Err(e @ webhook::BadRequest::TooManyAlerts(_)) => {
                self.count("too_large");
                warn!("{e}");
                return text(StatusCode::PAYLOAD_TOO_LARGE, format!("{e}\n"));
            }
            Err(e) => {
                self.count("bad_request");
                return text(StatusCode::BAD_REQUEST, format!("{e}\n"));
            }
        };
        if n.truncated_alerts > 0 {
            warn!(truncated = n.truncated_alerts, "Alertmanager truncated this notification (max_alerts); the missing alerts arrive on a later send");
        }
        let stores_ready = self.guards.wait_until_ready().await.is_ok()
            && self.nodes.wait_until_ready().await.is_ok()
            && self.shapings.wait_until_ready().await.is_ok()
            && self.quarantines.wait_until_ready().await.is_ok();
        if !stores_ready {
            self.count("unavailable");
            return text(StatusCode::SERVICE_UNAVAILABLE, "caches not ready; retry\n");
        }
        let guards: Vec<EgressGuard> = self.guards.state().iter().map(|g| (**g).clone()).collect();
        let reported: Vec<_> = self
            .nodes
            .state()
            .iter()
            .map(|n| crate::decide::NodeFacts::of(n))
            .collect();
        let (facts, _) = crate::decide::limit_node_addresses(&reported, &self.node_addresses);
        let index = NodeIndex::new(&facts);
        let mut planned: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for s in self.shapings.state() {
            if let Some(g) = &s.spec.guard {
                planned
                    .entry(g.name.clone())
                    .or_default()
                    .insert(s.spec.node_name.clone());
            }
        }
        let records = self.quarantines.state();
        let wanted = webhook::corroborations(&n, &guards, self.prometheus.is_some());
        let firing = match self.ask_prometheus(&wanted, &index).await {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, "cannot corroborate alerts with Prometheus; Alertmanager will retry");
                self.count("unavailable");
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("cannot corroborate the alerts with Prometheus: {e}\n"),
                );
            }
        };
        let intents = webhook::intents(
            &n,
            &webhook::Facts {
                guards: &guards,
                index: &index,
                planned: &planned,
                records: &records,
                has_prometheus: self.prometheus.is_some(),
                firing: &firing,
            },
        );
        let mut tally = Tally::default();
        for intent in intents {
            self.carry_out(intent, &guards, &mut tally).await;
        }
        {
            let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
            for (k, v) in &tally.counts {
                *m.alerts.entry(k).or_default() += v;
            }
        }
        if let Some(e) = &tally.retry {
            self.count("unavailable");
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{}; every other alert was handled ({})\n",
                    e,
                    tally.render()
                ),
            );
        }
        let changed = ["started", "resolved", "rearmed"]
            .iter()
            .any(|k| tally.counts.contains_key(k));
        self.count(if changed || !tally.counts.contains_key("repeat") {
            "accepted"
        } else {
            "duplicate"
        });
        text(StatusCode::OK, format!("{}\n", tally.render()))
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

    async fn carry_out(&self, intent: Intent, guards: &[EgressGuard], tally: &mut Tally) {
        let api: Api<Quarantine> = Api::all(self.client.clone());
        let params = PatchParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        };
        let mut retry = |what: String| {
            warn!("{what}; Alertmanager will retry");
            tally.retry.get_or_insert(what);
        };
        match intent {
            Intent::Start(q) => {
                let name = q.name_any();
                let pp = PostParams {
                    field_manager: Some(MANAGER.into()),
                    ..Default::default()
                };
                match api.create(&pp, &q).await {
                    Ok(_) => {
                        info!(quarantine = %name, node = %q.spec.node_name, guard = %q.spec.guard, "alert stored as a pending quarantine");
                        tally.add("started");
                    }
                    // Another replica, or an earlier send, stored it first;
                    // or something else holds the name, which is never touched.
                    Err(kube::Error::Api(e)) if e.code == 409 => match api.get_opt(&name).await {
                        Ok(Some(held)) if same_episode(&held, &q) => tally.add("repeat"),
                        Ok(_) => {
                            warn!(quarantine = %name, "another object holds this quarantine's name; the alert is not stored");
                            tally.add("name_conflict");
                        }
                        Err(e) => retry(format!("cannot read quarantine {name}: {e}")),
                    },
                    Err(e) => retry(format!("cannot store the quarantine request {name}: {e}")),
                }
            }
            Intent::Repeat {
                name,
                alerts,
                rearm,
            } => {
                let cached = self
                    .quarantines
                    .state()
                    .iter()
                    .find(|q| q.name_any() == name)
                    .and_then(|q| q.status.clone())
                    .unwrap_or_default();
                let prev = cached.alert_repeats.unwrap_or(0);
                // Counted as a re-arm only when it had resolved; the null is
                // written on every firing of an open record either way.
                let rearmed = rearm && cached.alert_resolved_at.is_some();
                let mut status = serde_json::json!({
                    "alertRepeats": prev.saturating_add(alerts),
                    "lastAlertAt": Time(Timestamp::now()),
                });
                if rearm {
                    // Firing again after resolving: the calm window must start over.
                    status["alertResolvedAt"] = serde_json::Value::Null;
                }
                match api
                    .patch_status(
                        &name,
                        &params,
                        &Patch::Merge(&serde_json::json!({"status": status})),
                    )
                    .await
                {
                    Ok(_) => tally.add(if rearmed { "rearmed" } else { "repeat" }),
                    Err(kube::Error::Api(e)) if e.code == 404 => tally.add("repeat"),
                    Err(e) => retry(format!("cannot count the repeat on {name}: {e}")),
                }
            }
            Intent::Resolved(name) => {
                let patch =
                    serde_json::json!({"status": {"alertResolvedAt": Time(Timestamp::now())}});
                match api
                    .patch_status(&name, &params, &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => tally.add("resolved"),
                    Err(kube::Error::Api(e)) if e.code == 404 => tally.add("repeat"),
                    Err(e) => retry(format!("cannot record the resolution on {name}: {e}")),
                }
            }
            Intent::WouldQuarantine(Triple {
                guard,
                node,
                trigger,
            }) => {
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
                tally.add("would_quarantine");
            }
            Intent::Uncorroborated { triple: t, firing } => {
                if firing {
                    warn!(guard = %t.guard, node = %t.node, trigger = %t.trigger,
                        "alert not corroborated: Prometheus does not have it firing for this node; ignored");
                    tally.add("uncorroborated");
                } else {
                    // Alertmanager sends a resolve once: dropped, the episode
                    // would never end by policy. A Prometheus that lags the one
                    // that raised the alert catches up; Alertmanager retries.
                    retry(format!(
                        "Prometheus still has trigger {}'s alert firing for node {}; the resolve is not recorded yet",
                        t.trigger, t.node
                    ));
                    tally.add("uncorroborated");
                }
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
}

/// Is `held` (the object holding the name) the record `want` would create?
fn same_episode(held: &Quarantine, want: &Quarantine) -> bool {
    held.spec.guard == want.spec.guard
        && held.spec.node_name == want.spec.node_name
        && held.spec.trigger == want.spec.trigger
        && webhook::episode_of(held) == webhook::episode_of(want)
}
