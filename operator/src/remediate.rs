//! The I/O around automatic quarantine: evaluating Prometheus triggers,
//! carrying out a [`QuarantinePlan`], and the Alertmanager receiver. The
//! decisions themselves are in [`crate::evaluate`] and [`crate::quarantine`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use egressguard_crds::quarantine::{TriggerRule, RELEASE_FINALIZER};
use egressguard_crds::{EgressGuard, Mode, Quarantine};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use crate::evaluate::{Answer, Thresholds};
use crate::prom::Prometheus;
use crate::quarantine::{Notice, QuarantinePlan, Subject};
use egressguard_crds::serve::prometheus_client::encoding::DescriptorEncoder;
use egressguard_crds::serve::{counters, gauges, Scrape};

/// Field manager for quarantine writes.
const MANAGER: &str = "egressguard-operator";

/// How automatic quarantine runs.
#[derive(Debug, Clone)]
pub struct QuarantineConfig {
    /// Where Prometheus triggers are evaluated; `None`: they stay Unknown.
    pub prometheus: Option<Prometheus>,
    /// How often Prometheus triggers are evaluated.
    pub evaluation_interval: Duration,
    /// The Alertmanager receiver's address.
    pub webhook_addr: Option<SocketAddr>,
    /// The receiver's bearer token file and its content at start; without
    /// one the receiver does not start.
    pub webhook_token: Option<(std::path::PathBuf, Vec<u8>)>,
    /// How long Released and Refused records are kept.
    pub retention: Duration,
}

/// Quarantine counters for `/metrics`.
#[derive(Debug, Default)]
pub struct QuarantineMetrics {
    /// Quarantines started, by (guard, trigger).
    pub started: BTreeMap<(String, String), u64>,
    /// Quarantines released, by (guard, trigger).
    pub released: BTreeMap<(String, String), u64>,
    /// Nodes quarantined now, by guard.
    pub quarantined: BTreeMap<String, usize>,
    /// Node evaluations by outcome.
    pub evaluations: BTreeMap<&'static str, u64>,
    /// Webhook requests by outcome.
    pub webhook: BTreeMap<&'static str, u64>,
    /// Alerts (folded per guard, node and trigger) by outcome.
    pub alerts: BTreeMap<&'static str, u64>,
}

impl Scrape for QuarantineMetrics {
    fn scrape(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let by_trigger =
            |counts: &BTreeMap<(String, String), u64>| -> Vec<([(&'static str, String); 2], u64)> {
                counts
                    .iter()
                    .map(|((g, t), n)| ([("guard", g.clone()), ("trigger", t.clone())], *n))
                    .collect()
            };
        counters(
            e,
            "egressguard_quarantines_started",
            "Quarantines started.",
            by_trigger(&self.started),
        )?;
        counters(
            e,
            "egressguard_quarantines_released",
            "Quarantines released.",
            by_trigger(&self.released),
        )?;
        let rows = self
            .quarantined
            .iter()
            .map(|(g, n)| ([("guard", g.as_str())], *n as i64));
        gauges(
            e,
            "egressguard_quarantined_nodes",
            "Nodes quarantined now.",
            rows,
        )?;
        let outcomes = |counts: &BTreeMap<&'static str, u64>,
                        all: &[&'static str]|
         -> Vec<([(&'static str, &'static str); 1], u64)> {
            all.iter()
                .map(|o| ([("outcome", *o)], counts.get(o).copied().unwrap_or(0)))
                .collect()
        };
        counters(
            e,
            "egressguard_trigger_evaluations",
            "Per-node trigger evaluations by outcome.",
            outcomes(&self.evaluations, &["breach", "ok", "unknown"]),
        )?;
        counters(
            e,
            "egressguard_webhook_requests",
            "Alertmanager receiver requests by outcome.",
            outcomes(
                &self.webhook,
                &[
                    "accepted",
                    "duplicate",
                    "unauthorized",
                    "bad_request",
                    "too_large",
                    "unavailable",
                ],
            ),
        )?;
        counters(
            e,
            "egressguard_webhook_alerts",
            "Alerts received, folded per guard, node and trigger, by outcome.",
            outcomes(
                &self.alerts,
                &[
                    "started",
                    "repeat",
                    "rearmed",
                    "resolved",
                    "uncorroborated",
                    "not_planned",
                    "unmapped",
                    "would_quarantine",
                    "name_conflict",
                ],
            ),
        )
    }
}

/// Prometheus queries in flight at once during an evaluation.
pub const MAX_CONCURRENT_QUERIES: usize = 4;

/// Asks Prometheus every trigger of the evaluated `guards` once (at most
/// [`MAX_CONCURRENT_QUERIES`] at a time): the reads of an evaluation, which
/// `evaluate::fold` then judges.
pub async fn query_triggers(prom: Option<&Prometheus>, guards: &[&EgressGuard]) -> Vec<Answer> {
    let mut jobs = Vec::new();
    for g in guards {
        let Ok(Some(rules)) =
            egressguard_crds::quarantine::rules(g.spec.quarantine.as_ref(), g.spec.mode)
        else {
            continue;
        };
        for (trigger, rule) in rules.triggers {
            // Every kind named: a new one must be decided here, not skipped.
            let (query, above, threshold, calm, hold, node_label) = match rule {
                TriggerRule::Prometheus {
                    query,
                    above,
                    threshold,
                    calm,
                    hold,
                    node_label,
                } => (query, above, threshold, calm, hold, node_label),
                // Alerts arrive at the receiver; nothing to ask Prometheus.
                TriggerRule::Alertmanager { .. } => continue,
            };
            let guard = g.name_any();
            jobs.push(async move {
                let answer = match prom {
                    Some(p) => p.query(&query).await,
                    None => Err(crate::prom::QueryError::Config(
                        "no --prometheus-url is set".into(),
                    )),
                };
                Answer {
                    guard,
                    trigger,
                    query,
                    thresholds: Thresholds {
                        above,
                        breach: threshold,
                        calm,
                    },
                    hold,
                    node_label,
                    answer,
                }
            });
        }
    }
    // A few queries at a time: a hundred guards must not open a hundred
    // connections to Prometheus at once, nor wait for each other in turn.
    use futures::StreamExt;
    futures::stream::iter(jobs)
        .buffered(MAX_CONCURRENT_QUERIES)
        .collect()
        .await
}

/// A reference to a Node for Events.
pub fn node_ref(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

/// Publishes one notice on each of its subjects.
pub async fn publish(recorder: &Recorder, n: &Notice, guards: &BTreeMap<String, ObjectReference>) {
    let ev = Event {
        type_: if n.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: n.reason.into(),
        note: Some(n.note.clone()),
        action: "Quarantine".into(),
        // The Quarantine as the related object: Events of different
        // quarantines of one node must not merge into one series.
        secondary: n.quarantine.as_ref().map(|name| ObjectReference {
            api_version: Some("egressguard.io/v1alpha1".into()),
            kind: Some("Quarantine".into()),
            name: Some(name.clone()),
            ..Default::default()
        }),
    };
    for s in &n.subjects {
        let r = match s {
            Subject::Guard(g) => match guards.get(g) {
                Some(r) => r.clone(),
                None => continue,
            },
            Subject::Node(node) => node_ref(node),
        };
        if let Err(e) = recorder.publish(&ev, &r).await {
            warn!(error = %e, "cannot publish event");
        }
    }
    info!(reason = n.reason, "{}", n.note);
}

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    }
}

/// The writes that start, change and release quarantines (everything but
/// the finalizer removals and deletions, which follow the plan writes).
pub async fn write_changes(client: &Client, p: &QuarantinePlan) -> Result<(), kube::Error> {
    let api: Api<Quarantine> = Api::all(client.clone());
    let mut first = None;
    for q in &p.create {
        let name = q.name_any();
        match api
            .create(
                &PostParams {
                    field_manager: Some(MANAGER.into()),
                    ..Default::default()
                },
                q,
            )
            .await
        {
            Ok(_) => {}
            // Ours from an earlier pass whose status write failed; or
            // something else holding the name, which is never patched.
            Err(kube::Error::Api(e)) if e.code == 409 => match api.get_opt(&name).await {
                Ok(Some(held))
                    if held.spec.guard == q.spec.guard
                        && held.spec.node_name == q.spec.node_name
                        && held.spec.trigger == q.spec.trigger =>
                {
                    if held.status.as_ref().and_then(|s| s.phase).is_some() {
                        continue;
                    }
                }
                Ok(_) => {
                    warn!(quarantine = %name, "another object holds this quarantine's name; not written");
                    continue;
                }
                Err(e) => {
                    first.get_or_insert(e);
                    continue;
                }
            },
            Err(e) => {
                first.get_or_insert(e);
                continue;
            }
        }
        let patch = serde_json::json!({"status": q.status});
        if let Err(e) = api
            .patch_status(&name, &params(), &Patch::Merge(&patch))
            .await
        {
            first.get_or_insert(e);
        }
    }
    for (name, status) in &p.status {
        let written = match status_patch(status) {
            Ok(mut patch) => {
                if let Some(rv) = p.versions.get(name) {
                    patch["metadata"] = serde_json::json!({"resourceVersion": rv});
                }
                api.patch_status(name, &params(), &Patch::Merge(&patch))
                    .await
                    .map(drop)
            }
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            first.get_or_insert(e);
        }
    }
    for name in &p.add_finalizer {
        if let Err(e) = set_finalizer(&api, name, true).await {
            first.get_or_insert(e);
        }
    }
    for (node, change) in &p.node_changes {
        if let Err(e) = write_node_change(client, node, change).await {
            warn!(node, ?change, error = %e, "cannot apply the quarantine escalation to the node");
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// A cordon, a taint, or their undoing ([`crate::enforcement`]).
async fn write_node_change(
    client: &Client,
    node: &str,
    change: &crate::enforcement::NodeChange,
) -> Result<(), kube::Error> {
    use crate::enforcement::{NodeChange, CORDONED_BY, TAINT_KEY};
    use k8s_openapi::api::core::v1::{Node, Taint};
    let api: Api<Node> = Api::all(client.clone());
    // Every change is fenced on the version read, so a person's cordon
    // made meanwhile is never taken for the operator's, nor undone by it.
    let n = api.get(node).await?;
    let rv = n.metadata.resource_version.clone();
    let spec = n.spec.clone().unwrap_or_default();
    let ours = n
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(CORDONED_BY));
    let patch = match change {
        // Already unschedulable (a person's cordon, or a drain): theirs.
        NodeChange::Cordon(_) if spec.unschedulable == Some(true) => return Ok(()),
        NodeChange::Cordon(q) => serde_json::json!({
            "metadata": {"resourceVersion": rv, "annotations": {CORDONED_BY: q}},
            "spec": {"unschedulable": true},
        }),
        NodeChange::Uncordon if !ours => return Ok(()),
        NodeChange::Uncordon => serde_json::json!({
            "metadata": {"resourceVersion": rv, "annotations": {CORDONED_BY: null}},
            "spec": {"unschedulable": null},
        }),
        NodeChange::Taint(_) | NodeChange::Untaint => {
            // A merge patch replaces the whole list.
            let mut taints: Vec<Taint> = spec
                .taints
                .unwrap_or_default()
                .into_iter()
                .filter(|t| t.key != TAINT_KEY)
                .collect();
            if let NodeChange::Taint(q) = change {
                taints.push(Taint {
                    key: TAINT_KEY.into(),
                    value: Some(q.clone()),
                    effect: "NoExecute".into(),
                    time_added: None,
                });
            }
            serde_json::json!({
                "metadata": {"resourceVersion": rv},
                "spec": {"taints": taints},
            })
        }
    };
    api.patch(node, &params(), &Patch::Merge(&patch)).await?;
    info!(node, ?change, "quarantine escalation applied to the node");
    Ok(())
}

/// A merge patch that sets `status`, clearing the calm window when it ended.
/// (An absent field leaves the stored value in place; only null removes it,
/// and a calm window that outlived a breach would release a node too early.)
pub fn status_patch(
    status: &egressguard_crds::QuarantineStatus,
) -> Result<serde_json::Value, kube::Error> {
    let mut v = serde_json::to_value(status).map_err(kube::Error::SerdeError)?;
    // A refused record admitted later loses its release fields too.
    for (absent, key) in [
        (status.calm_since.is_none(), "calmSince"),
        (status.released_at.is_none(), "releasedAt"),
        (status.released_by.is_none(), "releasedBy"),
        (status.release_cause.is_none(), "releaseCause"),
    ] {
        if absent {
            v[key] = serde_json::Value::Null;
        }
    }
    // The receiver's fields: a pass's copy may predate the receiver's write
    // (a re-armed alert written back as resolved would release the node).
    if let Some(o) = v.as_object_mut() {
        for k in ["alertResolvedAt", "alertRepeats", "lastAlertAt"] {
            o.remove(k);
        }
    }
    Ok(serde_json::json!({ "status": v }))
}

/// Finalizer removals and expired records, after the plans were written.
pub async fn write_cleanup(client: &Client, p: &QuarantinePlan) -> Result<(), kube::Error> {
    let api: Api<Quarantine> = Api::all(client.clone());
    let mut first = None;
    for name in &p.remove_finalizer {
        if let Err(e) = set_finalizer(&api, name, false).await {
            first.get_or_insert(e);
        }
    }
    for name in &p.delete {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => info!(quarantine = %name, "record past its retention deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(()), Err)
}

/// Adds or removes the release finalizer as a compare-and-swap on the
/// resourceVersion, so another controller's finalizer is never dropped. The
/// object is read fresh (this pass may just have written its status) and the
/// swap retried on a conflict.
async fn set_finalizer(
    api: &Api<Quarantine>,
    name: &str,
    present: bool,
) -> Result<(), kube::Error> {
    let mut attempt = 0;
    loop {
        let Some(q) = api.get_opt(name).await? else {
            return Ok(());
        };
        let has = q.finalizers().iter().any(|f| f == RELEASE_FINALIZER);
        if has == present {
            return Ok(());
        }
        let mut fins: Vec<String> = q
            .finalizers()
            .iter()
            .filter(|f| *f != RELEASE_FINALIZER)
            .cloned()
            .collect();
        if present {
            fins.push(RELEASE_FINALIZER.into());
        }
        let patch = serde_json::json!({"metadata": {"finalizers": fins, "resourceVersion": q.resource_version()}});
        match api.patch(name, &params(), &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 && attempt < 3 => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Guards with Prometheus triggers that are evaluated (Auto, and DryRun to
/// report what would happen).
pub fn evaluated(g: &EgressGuard) -> bool {
    if g.metadata.deletion_timestamp.is_some() || !matches!(g.spec.mode, Mode::Auto | Mode::DryRun)
    {
        return false;
    }
    let Ok(Some(rules)) =
        egressguard_crds::quarantine::rules(g.spec.quarantine.as_ref(), g.spec.mode)
    else {
        return false;
    };
    rules.triggers.iter().any(|(_, t)| match t {
        TriggerRule::Prometheus { .. } => true,
        TriggerRule::Alertmanager { .. } => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ended_calm_window_is_cleared_not_left_in_place() {
        let st = egressguard_crds::QuarantineStatus {
            phase: Some(egressguard_crds::Phase::Active),
            ..Default::default()
        };
        let p = status_patch(&st).expect("patch");
        assert_eq!(p["status"]["calmSince"], serde_json::Value::Null);
        assert!(p["status"]
            .as_object()
            .is_some_and(|o| o.contains_key("calmSince")));
        assert_eq!(p["status"]["phase"], "Active");
    }
}

#[cfg(test)]
mod concurrency {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A Prometheus stand-in that answers every query after 100 ms and
    /// records how many were in flight at once.
    async fn slow_prometheus(peak: Arc<AtomicUsize>) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let now = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let (now, peak) = (now.clone(), peak.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    let body = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn triggers_are_queried_a_few_at_a_time() {
        let peak = Arc::new(AtomicUsize::new(0));
        let url = slow_prometheus(peak.clone()).await;
        let prom = Prometheus::new(&url, None, None, Duration::from_secs(5)).expect("client");
        let triggers: String = (0..12)
            .map(|i| format!("      - {{name: t{i}, prometheus: {{query: q{i}, above: 1}}}}\n"))
            .collect();
        let g = egressguard_crds::load::parse_str(&format!("apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: g}}\nspec:\n  mode: Auto\n  uplink: {{rate: 20Mbit}}\n  throttle: {{rate: 1Mbit, destinations: [{{port: 443}}]}}\n  quarantine:\n    triggers:\n{triggers}")).expect("guard").remove(0);
        let answers = query_triggers(Some(&prom), &[&g]).await;
        let peak = peak.load(Ordering::SeqCst);
        assert!(
            (2..=MAX_CONCURRENT_QUERIES).contains(&peak),
            "{peak} queries in flight at once"
        );
        assert_eq!(answers.len(), 12);
        // Judged for a planned node, each empty answer reads Unknown.
        let mut state = crate::evaluate::EvalState::default();
        let planned = [("g".to_string(), vec!["n1".to_string()])].into();
        let counts = crate::evaluate::fold(
            &mut state,
            &answers,
            &planned,
            &crate::evaluate::NodeIndex::default(),
            Duration::from_secs(1),
            k8s_openapi::jiff::Timestamp::now(),
        );
        assert_eq!(counts["unknown"], 12);
    }
}
