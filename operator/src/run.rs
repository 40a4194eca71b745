//! The operator process: watches guards, nodes, the API server's endpoints
//! and its own NodeShapings, and on every change recomputes the whole
//! decision ([`crate::decide`]) and writes only what differs.
//!
//! # Guarantees
//! - Only status and the operator's own objects (NodeShapings, Events, its
//!   Lease, the guard finalizer) are written; guard specs belong to GitOps.
//! - Recomputing from the caches makes every pass idempotent: a restart, a
//!   lost watch or a second replica that becomes leader converges to the
//!   same writes.
//! - A guard being deleted keeps its finalizer until every node confirmed the
//!   removal, or `cleanup_timeout` passed (then a Warning Event lists the nodes).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egressguard_crds::node_shaping::NodeShapingSpec;
use egressguard_crds::{EgressGuard, NodeShaping, Phase, Quarantine};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::decide::{decide_with, Extras, GroupFacts, NodeFacts};
use crate::evaluate::NodeIndex;
use crate::leader::Leader;
use crate::quarantine::{GuardFacts, World};
use crate::remediate::Watched;
use crate::status::{guard_status, removal, removal_confirmed, GuardQuarantine};
use egressguard_crds::node_shaping::ProtectedEntry;
use egressguard_crds::quarantine::rules;
use egressguard_crds::validate;

/// The finalizer that holds a guard until its shaping is gone from every node.
pub const FINALIZER: &str = "egressguard.io/cleanup";
/// Field manager for server-side apply.
pub const MANAGER: &str = "egressguard-operator";
/// Plan writes in flight at once (the API server's default max-in-flight is
/// 400 and APF gives a workload controller several seats; 16 is modest).
const PARALLEL_WRITES: usize = 16;

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Namespace of the leader-election Lease.
    pub namespace: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics_addr: SocketAddr,
    /// How long a deleted guard waits for its nodes before giving up.
    pub cleanup_timeout: Duration,
    /// Recompute at least this often.
    pub resync: Duration,
    /// Which node addresses may be protected.
    pub node_addresses: crate::decide::NodeAddressPolicy,
    /// Automatic quarantine.
    pub quarantine: crate::remediate::QuarantineConfig,
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// No usable kubeconfig / in-cluster config.
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// The metrics port could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, #[source] std::io::Error),
    /// Signal handling could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signal(#[source] std::io::Error),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct OpMetrics {
    /// Reconcile passes.
    pub reconciles: u64,
    /// Failed passes.
    pub errors: u64,
    /// Sum of pass durations.
    pub seconds: f64,
    /// This replica leads.
    pub leader: bool,
    /// Caches are synced.
    pub ready: bool,
    /// Node addresses left out of the protected list by the node address policy.
    pub ignored_node_addresses: usize,
    /// Plans written (created or changed).
    pub plan_writes: u64,
    /// Request bytes of those writes: what one guard or group edit costs the API.
    pub plan_write_bytes: u64,
}

impl OpMetrics {
    fn render(&self) -> String {
        format!(
            "# HELP egressguard_operator_reconciles_total Reconcile passes.\n# TYPE egressguard_operator_reconciles_total counter\negressguard_operator_reconciles_total {}\n\
             # HELP egressguard_operator_reconcile_errors_total Failed reconcile passes.\n# TYPE egressguard_operator_reconcile_errors_total counter\negressguard_operator_reconcile_errors_total {}\n\
             # HELP egressguard_operator_reconcile_duration_seconds Time spent reconciling.\n# TYPE egressguard_operator_reconcile_duration_seconds summary\negressguard_operator_reconcile_duration_seconds_sum {:.6}\negressguard_operator_reconcile_duration_seconds_count {}\n\
             # HELP egressguard_operator_leader Whether this replica holds the lease.\n# TYPE egressguard_operator_leader gauge\negressguard_operator_leader {}\n\
             # HELP egressguard_operator_ignored_node_addresses Node InternalIPs not protected (outside the node ranges, or over the per-node limit).\n# TYPE egressguard_operator_ignored_node_addresses gauge\negressguard_operator_ignored_node_addresses {}\n\
             # HELP egressguard_operator_plan_writes_total NodeShaping plans written.\n# TYPE egressguard_operator_plan_writes_total counter\negressguard_operator_plan_writes_total {}\n\
             # HELP egressguard_operator_plan_write_bytes_total Request body bytes of NodeShaping plan writes.\n# TYPE egressguard_operator_plan_write_bytes_total counter\negressguard_operator_plan_write_bytes_total {}\n",
            self.reconciles,
            self.errors,
            self.seconds,
            self.reconciles,
            u8::from(self.leader),
            self.ignored_node_addresses,
            self.plan_writes,
            self.plan_write_bytes
        )
    }
}

struct Caches {
    guards: Store<EgressGuard>,
    nodes: Store<Node>,
    shapings: Store<NodeShaping>,
    slices: Store<EndpointSlice>,
    quarantines: Store<Quarantine>,
    groups: Store<egressguard_crds::CIDRGroup>,
}

fn spawn_reflector<K>(api: Api<K>, cfg: watcher::Config, notify: Arc<Notify>) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher::watcher(api, cfg)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => notify.notify_one(),
                Err(e) => warn!(error = %e, "watch failed; retrying with backoff"),
            }
        }
    });
    reader
}

/// What the decisions need to know about a Node.
pub fn facts(n: &Node) -> NodeFacts {
    NodeFacts {
        name: n.name_any(),
        labels: n.labels().clone(),
        internal_ips: n
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect(),
    }
}

fn api_endpoints(slices: &[Arc<EndpointSlice>]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

struct Ctx {
    client: Client,
    caches: Caches,
    recorder: Recorder,
    cleanup_timeout: Duration,
    node_addresses: crate::decide::NodeAddressPolicy,
    /// Ignored node addresses already reported (an Event once per change).
    reported: Mutex<std::collections::BTreeSet<crate::decide::IgnoredAddress>>,
    metrics: Arc<Mutex<OpMetrics>>,
    quarantine: crate::remediate::QuarantineConfig,
    q_metrics: Arc<Mutex<crate::remediate::QuarantineMetrics>>,
    /// The leader's Prometheus evaluation state.
    eval: Mutex<crate::remediate::EvalState>,
    /// Recurring notices already published (once per continuous run).
    noticed: Mutex<std::collections::BTreeSet<String>>,
}

/// Node addresses left unprotected: a gauge, and a Warning Event on the Node
/// (and a log line) when one first appears.
async fn report_ignored(ctx: &Ctx, ignored: &[crate::decide::IgnoredAddress]) {
    ctx.metrics
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .ignored_node_addresses = ignored.len();
    let fresh: Vec<crate::decide::IgnoredAddress> = {
        let mut seen = ctx.reported.lock().unwrap_or_else(|p| p.into_inner());
        let now: std::collections::BTreeSet<_> = ignored.iter().cloned().collect();
        let fresh = now.difference(&seen).cloned().collect();
        *seen = now;
        fresh
    };
    for i in fresh {
        warn!(node = %i.node, address = %i.address, reason = %i.reason, "node address not protected");
        let node_ref = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(i.node.clone()),
            ..Default::default()
        };
        let ev = Event {
            type_: EventType::Warning,
            reason: "NodeAddressNotProtected".into(),
            note: Some(format!(
                "InternalIP {} is not protected on other nodes: {}",
                i.address, i.reason
            )),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &node_ref).await {
            warn!(error = %e, "cannot publish event");
        }
    }
}

async fn event(ctx: &Ctx, g: &EgressGuard, type_: EventType, reason: &str, note: String) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &g.object_ref(&())).await {
        warn!(error = %e, "cannot publish event");
    }
}

/// Keeps the first error of a pass; one bad object must not block the others.
fn note(first: &mut Option<kube::Error>, what: &str, r: Result<(), kube::Error>) {
    if let Err(e) = r {
        warn!(error = %e, what, "write failed; continuing with the other objects");
        if first.is_none() {
            *first = Some(e);
        }
    }
}

/// One full pass: decide, then write the differences. A failed write is
/// logged and the pass goes on (one bad object must not block the others);
/// the first error is returned so the pass is retried with backoff.
async fn reconcile_all(ctx: &Ctx) -> Result<(), kube::Error> {
    let mut first: Option<kube::Error> = None;
    let guards: Vec<EgressGuard> = ctx
        .caches
        .guards
        .state()
        .iter()
        .map(|g| (**g).clone())
        .collect();
    let reported: Vec<NodeFacts> = ctx.caches.nodes.state().iter().map(|n| facts(n)).collect();
    let (nodes, ignored) = crate::decide::limit_node_addresses(&reported, &ctx.node_addresses);
    report_ignored(ctx, &ignored).await;
    let node_names: std::collections::BTreeSet<String> =
        nodes.iter().map(|n| n.name.clone()).collect();
    let endpoints = api_endpoints(&ctx.caches.slices.state());
    let shapings: BTreeMap<String, Arc<NodeShaping>> = ctx
        .caches
        .shapings
        .state()
        .into_iter()
        .map(|s| (s.name_any(), s))
        .collect();
    // Borrowed, not cloned: plans can be large and this runs every pass.
    let current: BTreeMap<&str, &NodeShapingSpec> = shapings
        .iter()
        .map(|(n, s)| (n.as_str(), &s.spec))
        .collect();
    // Quarantines: admit, start, release (crate::quarantine decides; the
    // plans below then enforce exactly the Active ones).
    let quarantines = ctx.caches.quarantines.state();
    let mut extras = Extras {
        quarantined: stored_active(&quarantines),
        protected: ctx
            .quarantine
            .prometheus
            .as_ref()
            .and_then(|p| p.address())
            .map(|ip| ProtectedEntry {
                cidr: ipnet::IpNet::from(ip).to_string(),
                reason: "Prometheus (its scrapes release quarantines)".into(),
            })
            .into_iter()
            .collect(),
        groups: ctx
            .caches
            .groups
            .state()
            .iter()
            .map(|g| (g.name_any(), GroupFacts::of(g)))
            .collect(),
        legacy_agents: shapings
            .iter()
            .filter(|(_, s)| {
                s.status
                    .as_ref()
                    .is_some_and(|st| st.observed_generation.is_some() && !st.by_reference)
            })
            .map(|(n, _)| n.clone())
            .collect(),
    };
    let before = decide_with(&guards, &nodes, &endpoints, &current, &extras);
    let due = ctx
        .eval
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .due(ctx.quarantine.evaluation_interval);
    if due {
        let watched: Vec<Watched> = guards
            .iter()
            .filter(|g| crate::remediate::evaluated(g))
            .map(|g| Watched {
                guard: g,
                nodes: before
                    .guards
                    .get(&g.name_any())
                    .map(|o| o.planned.clone())
                    .unwrap_or_default(),
            })
            .collect();
        let mut st = std::mem::take(&mut *ctx.eval.lock().unwrap_or_else(|p| p.into_inner()));
        crate::remediate::evaluate(
            ctx.quarantine.prometheus.as_ref(),
            &watched,
            &NodeIndex::new(&nodes),
            ctx.quarantine.evaluation_interval,
            &mut st,
            &ctx.q_metrics,
        )
        .await;
        *ctx.eval.lock().unwrap_or_else(|p| p.into_inner()) = st;
    }
    let (signals, available) = {
        let st = ctx.eval.lock().unwrap_or_else(|p| p.into_inner());
        (st.signals.clone(), st.available.clone())
    };
    let node_objs = ctx.caches.nodes.state();
    let world = World {
        guards: guards
            .iter()
            .map(|g| {
                let name = g.name_any();
                let out = before.guards.get(&name);
                let rules = validate(&g.spec).ok().and_then(|_| {
                    rules(g.spec.quarantine.as_ref(), g.spec.mode)
                        .ok()
                        .flatten()
                });
                let facts = GuardFacts {
                    guard: g,
                    rules,
                    planned: out
                        .map(|o| o.planned.iter().cloned().collect())
                        .unwrap_or_default(),
                    selected: out.map_or(0, |o| o.selected.len()),
                };
                (name, facts)
            })
            .collect(),
        nodes: node_objs
            .iter()
            .map(|n| (n.name_any(), n.labels()))
            .collect(),
        quarantines: &quarantines,
        signals,
        now: Timestamp::now(),
        retention: ctx.quarantine.retention,
    };
    let qp = crate::quarantine::plan(&world);
    let q_written = crate::remediate::write_changes(&ctx.client, &qp).await;
    if q_written.is_ok() {
        extras.quarantined = qp.active.clone();
        let mut m = ctx.q_metrics.lock().unwrap_or_else(|p| p.into_inner());
        for k in &qp.started {
            *m.started.entry(k.clone()).or_default() += 1;
        }
        for k in &qp.released {
            *m.released.entry(k.clone()).or_default() += 1;
        }
        m.quarantined = qp
            .active
            .iter()
            .map(|(g, n)| (g.clone(), n.len()))
            .collect();
    }
    // A quarantine whose record could not be written is not enforced (nor
    // released) on its say-so: the next pass retries from the stored objects.
    note(&mut first, "write quarantines", q_written);
    let d = decide_with(&guards, &nodes, &endpoints, &current, &extras);
    let g_api: Api<EgressGuard> = Api::all(ctx.client.clone());
    let ns_api: Api<NodeShaping> = Api::all(ctx.client.clone());
    let apply = PatchParams::apply(MANAGER).force();
    let mut removals_written: std::collections::BTreeSet<String> =
        std::collections::BTreeSet::new();

    // Finalizers first, so no guard can vanish with shaping left behind.
    // The resourceVersions they return fence this pass's status writes.
    let mut fresh_rv: BTreeMap<String, Option<String>> = BTreeMap::new();
    for g in guards.iter().filter(|g| {
        g.metadata.deletion_timestamp.is_none() && !g.finalizers().iter().any(|f| f == FINALIZER)
    }) {
        let mut fins = g.finalizers().to_vec();
        fins.push(FINALIZER.into());
        let patch = serde_json::json!({"metadata": {"finalizers": fins, "resourceVersion": g.resource_version()}});
        let r = g_api
            .patch(
                &g.name_any(),
                &PatchParams {
                    field_manager: Some(MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(&patch),
            )
            .await
            .map(|new| {
                fresh_rv.insert(g.name_any(), new.resource_version());
            });
        note(&mut first, "add finalizer", r);
    }

    // Plans.
    // Every write names the resourceVersion it was computed from: a fence.
    // A write that a stalled network delivers after another replica took
    // over (and changed the object) is refused with 409 instead of undoing
    // the new leader's work. Creations carry none (a second create is 409).
    let as_value = |node: &str, spec: NodeShapingSpec| {
        let obj = NodeShaping {
            metadata: ObjectMeta {
                name: Some(node.to_string()),
                resource_version: shapings.get(node).and_then(|s| s.resource_version()),
                ..Default::default()
            },
            spec,
            status: None,
        };
        let mut value = serde_json::to_value(&obj).unwrap_or_default();
        value["apiVersion"] = "egressguard.io/v1alpha1".into();
        value["kind"] = "NodeShaping".into();
        value
    };
    // Plans are independent objects: write several at once. One request at a
    // time made a 2,000-node resync take 14 s on the real API server (each
    // request's round trip, not the server's throughput, was the limit).
    let writes = d
        .plans
        .iter()
        .filter(|(node, spec)| !shapings.get(*node).is_some_and(|s| &s.spec == *spec))
        .map(|(node, spec)| {
            let (ns_api, apply) = (&ns_api, &apply);
            let value = as_value(node, spec.clone());
            let metrics = &ctx.metrics;
            async move {
                let r = ns_api
                    .patch(node, apply, &Patch::Apply(&value))
                    .await
                    .map(|_| ());
                if r.is_ok() {
                    info!(node, guard = ?spec.guard.as_ref().map(|g| &g.name), "plan written");
                    let mut m = metrics.lock().unwrap_or_else(|p| p.into_inner());
                    m.plan_writes += 1;
                    m.plan_write_bytes += serde_json::to_vec(&value).map_or(0, |v| v.len() as u64);
                }
                r
            }
        });
    let results: Vec<Result<(), kube::Error>> = futures::stream::iter(writes)
        .buffer_unordered(PARALLEL_WRITES)
        .collect()
        .await;
    for r in results {
        note(&mut first, "write plan", r);
    }
    for (node, s) in &shapings {
        if d.plans.contains_key(node) {
            continue;
        }
        if !node_names.contains(node) || removal_confirmed(s) {
            // Node gone, or the agent confirmed: the object has done its job.
            match ns_api.delete(node, &DeleteParams::default()).await {
                Ok(_) => info!(node, "plan deleted"),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => note(&mut first, "delete plan", Err(e)),
            }
        } else if s.spec != removal(node) {
            let r = ns_api
                .patch(node, &apply, &Patch::Apply(&as_value(node, removal(node))))
                .await
                .map(|_| ());
            if r.is_ok() {
                info!(node, "removal written");
            }
            note(&mut first, "write removal", r);
            removals_written.insert(node.clone());
        }
    }

    // Guard statuses and their Events: independent per guard, written
    // several at once like the plans (one at a time, 50 guards' statuses and
    // Events were a second of a 2,000-node resync).
    let status_writes = guards.iter().map(|g| {
        let (g_api, fresh_rv, extras, available, d, shapings) =
            (&g_api, &fresh_rv, &extras, &available, &d, &shapings);
        async move {
            let gq = GuardQuarantine {
                active: extras.quarantined.get(&g.name_any()).map_or(0, |s| s.len()),
                metrics: available.get(&g.name_any()).cloned(),
            };
            let status = guard_status(g, d, shapings, &gq);
            let before = g.status.clone().unwrap_or_default();
            if before == status {
                return Ok(());
            }
            for c in &status.conditions {
                let was = before.conditions.iter().find(|p| p.type_ == c.type_);
                if was.map(|w| (&w.status, &w.reason)) != Some((&c.status, &c.reason)) {
                    let bad = egressguard_crds::conditions::types::is_bad(&c.type_, &c.status);
                    let t = if bad {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    };
                    event(
                        ctx,
                        g,
                        t,
                        &c.reason,
                        format!("{} is {}: {}", c.type_, c.status, c.message),
                    )
                    .await;
                }
            }
            let patch = serde_json::json!({
                "metadata": {"resourceVersion": fresh_rv.get(&g.name_any()).cloned().unwrap_or_else(|| g.resource_version())},
                "status": status,
            });
            g_api
                .patch_status(
                    &g.name_any(),
                    &PatchParams {
                        field_manager: Some(MANAGER.into()),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(&patch),
                )
                .await
                .map(|_| ())
        }
    });
    let results: Vec<Result<(), kube::Error>> = futures::stream::iter(status_writes)
        .buffer_unordered(PARALLEL_WRITES)
        .collect()
        .await;
    for r in results {
        note(&mut first, "write guard status", r);
    }

    // The finalizer release of guards being deleted.
    for g in &guards {
        let Some(ts) = &g.metadata.deletion_timestamp else {
            continue;
        };
        if !g.finalizers().iter().any(|f| f == FINALIZER) {
            continue;
        }
        // Removals written in this pass are not in the cache yet: they count as left.
        let mut left: Vec<String> = shapings
            .values()
            .filter(|s| node_names.contains(&s.name_any()) && !removal_confirmed(s))
            .filter(|s| {
                s.spec
                    .guard
                    .as_ref()
                    .is_some_and(|r| r.name == g.name_any())
                    || s.spec.guard.is_none()
            })
            .map(|s| s.name_any())
            .collect();
        for n in &removals_written {
            if !left.contains(n) {
                left.push(n.clone());
            }
        }
        let waited = Timestamp::now().duration_since(ts.0);
        let timed_out = waited.as_secs() >= ctx.cleanup_timeout.as_secs() as i64;
        if left.is_empty() || timed_out {
            if !left.is_empty() {
                let note_text = format!(
                    "gave up waiting after {}s; shaping may remain on: {}",
                    ctx.cleanup_timeout.as_secs(),
                    left.join(", ")
                );
                event(ctx, g, EventType::Warning, "CleanupTimedOut", note_text).await;
            }
            let fins: Vec<String> = g
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            // The resourceVersion makes this a compare-and-swap: if another
            // controller changed the list meanwhile, the write fails with 409
            // and the next pass recomputes, never dropping its finalizer.
            let patch = serde_json::json!({"metadata": {"finalizers": fins, "resourceVersion": g.resource_version()}});
            let r = g_api
                .patch(
                    &g.name_any(),
                    &PatchParams {
                        field_manager: Some(MANAGER.into()),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(&patch),
                )
                .await
                .map(|_| ());
            if r.is_ok() {
                info!(guard = %g.name_any(), "cleanup done; finalizer removed");
            }
            note(&mut first, "remove finalizer", r);
        }
    }
    // Quarantine Events (recurring ones once per continuous run), then the
    // finalizer removals and expired records, now that the plans are written.
    let guard_refs: BTreeMap<String, k8s_openapi::api::core::v1::ObjectReference> = guards
        .iter()
        .map(|g| (g.name_any(), g.object_ref(&())))
        .collect();
    let fresh: Vec<&crate::quarantine::Notice> = {
        let mut seen = ctx.noticed.lock().unwrap_or_else(|p| p.into_inner());
        let now: std::collections::BTreeSet<String> =
            qp.notices.iter().filter_map(|n| n.once.clone()).collect();
        let fresh = qp
            .notices
            .iter()
            .filter(|n| n.once.as_ref().is_none_or(|k| !seen.contains(k)))
            .collect();
        *seen = now;
        fresh
    };
    for n in fresh {
        crate::remediate::publish(&ctx.recorder, n, &guard_refs).await;
    }
    let r = crate::remediate::write_cleanup(&ctx.client, &qp).await;
    note(&mut first, "release quarantine finalizers", r);
    first.map_or(Ok(()), Err)
}

/// Guard → nodes with an Active quarantine, as stored.
fn stored_active(qs: &[Arc<Quarantine>]) -> BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut out: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for q in qs {
        if q.metadata.deletion_timestamp.is_none()
            && q.status.as_ref().and_then(|s| s.phase) == Some(Phase::Active)
        {
            out.entry(q.spec.guard.clone())
                .or_default()
                .insert(q.spec.node_name.clone());
        }
    }
    out
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(cfg: OperatorConfig) -> Result<(), OperatorError> {
    let client = Client::try_default().await.map_err(OperatorError::Client)?;
    let metrics = Arc::new(Mutex::new(OpMetrics::default()));
    let q_metrics = Arc::new(Mutex::new(crate::remediate::QuarantineMetrics::default()));
    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .map_err(|e| OperatorError::Listen(cfg.metrics_addr, e))?;
    let (m, qm) = (metrics.clone(), q_metrics.clone());
    tokio::spawn(crate::http::serve(listener, move |req| {
        let (m, qm) = (m.clone(), qm.clone());
        async move {
            use hyper::StatusCode;
            match req.uri().path() {
                "/metrics" => {
                    let mut body = m.lock().unwrap_or_else(|p| p.into_inner()).render();
                    body.push_str(&qm.lock().unwrap_or_else(|p| p.into_inner()).render());
                    crate::http::text(StatusCode::OK, body)
                }
                "/healthz" => crate::http::text(StatusCode::OK, "ok\n"),
                "/readyz" if m.lock().unwrap_or_else(|p| p.into_inner()).ready => {
                    crate::http::text(StatusCode::OK, "ok\n")
                }
                "/readyz" => crate::http::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
                _ => crate::http::text(StatusCode::NOT_FOUND, "not found\n"),
            }
        }
    }));
    let notify = Arc::new(Notify::new());
    let caches = Caches {
        guards: spawn_reflector(
            Api::<EgressGuard>::all(client.clone()),
            watcher::Config::default(),
            notify.clone(),
        ),
        nodes: spawn_reflector(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            notify.clone(),
        ),
        shapings: spawn_reflector(
            Api::<NodeShaping>::all(client.clone()),
            watcher::Config::default(),
            notify.clone(),
        ),
        slices: spawn_reflector(
            Api::<EndpointSlice>::namespaced(client.clone(), "default"),
            watcher::Config::default().labels("kubernetes.io/service-name=kubernetes"),
            notify.clone(),
        ),
        quarantines: spawn_reflector(
            Api::<Quarantine>::all(client.clone()),
            watcher::Config::default(),
            notify.clone(),
        ),
        groups: spawn_reflector(
            Api::<egressguard_crds::CIDRGroup>::all(client.clone()),
            watcher::Config::default(),
            notify.clone(),
        ),
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: Some(cfg.identity.clone()),
        },
    );
    match (&cfg.quarantine.webhook_addr, &cfg.quarantine.webhook_token) {
        (Some(addr), Some(token)) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| OperatorError::Listen(*addr, e))?;
            let receiver = Arc::new(crate::remediate::Receiver {
                client: client.clone(),
                guards: caches.guards.clone(),
                nodes: caches.nodes.clone(),
                token: token.clone(),
                recorder: recorder.clone(),
                metrics: q_metrics.clone(),
            });
            info!(%addr, "Alertmanager receiver listening on /alertmanager");
            tokio::spawn(crate::http::serve(l, move |req| receiver.clone().handle(req)));
        }
        (Some(_), None) => warn!(
            "no --webhook-token-file: the Alertmanager receiver stays off (an unauthenticated receiver would let anyone quarantine nodes)"
        ),
        _ => {}
    }
    let ctx = Ctx {
        client: client.clone(),
        caches,
        recorder,
        cleanup_timeout: cfg.cleanup_timeout,
        node_addresses: cfg.node_addresses.clone(),
        reported: Mutex::new(Default::default()),
        metrics: metrics.clone(),
        quarantine: cfg.quarantine.clone(),
        q_metrics,
        eval: Mutex::new(Default::default()),
        noticed: Mutex::new(Default::default()),
    };
    let leader = Leader::new(
        client,
        &cfg.namespace,
        "egressguard-operator",
        &cfg.identity,
    );
    let (stop_renewing, stop_rx) = tokio::sync::oneshot::channel();
    let (leadership, renewals) = crate::leader::spawn(leader, notify.clone(), stop_rx);

    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).map_err(OperatorError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(OperatorError::Signal)?;
    let mut backoff = Duration::from_millis(200);
    info!(identity = %cfg.identity, "egressguard-operator started");
    let mut leading = false;
    loop {
        // The renewal task wakes this loop when leadership changes.
        let mut tick = Duration::from_secs(if leading { 5 } else { 2 });
        if leading && cfg.quarantine.prometheus.is_some() {
            // Prometheus triggers are evaluated in passes: wake for each evaluation.
            tick = tick.min(cfg.quarantine.evaluation_interval);
        }
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(cfg.resync.min(tick)) => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        let leads = leadership.is_leading();
        if leading && !leads {
            warn!(
                deadline_seconds = crate::leader::RENEW_DEADLINE.as_secs(),
                "this replica no longer leads (another holds the Lease, or the renew deadline passed without a renewal); it stops acting"
            );
        }
        leading = leads;
        metrics.lock().unwrap_or_else(|p| p.into_inner()).leader = leads;
        if !leads {
            continue;
        }
        // Let a burst of events settle before recomputing.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let ready = ctx.caches.guards.wait_until_ready().await.is_ok()
            && ctx.caches.nodes.wait_until_ready().await.is_ok()
            && ctx.caches.shapings.wait_until_ready().await.is_ok()
            && ctx.caches.slices.wait_until_ready().await.is_ok()
            && ctx.caches.quarantines.wait_until_ready().await.is_ok()
            && ctx.caches.groups.wait_until_ready().await.is_ok();
        if !ready {
            continue;
        }
        let t = Instant::now();
        // A pass may not outlive this replica's leadership: it is cut at the
        // renew deadline, which comes before the lease can expire and another
        // replica take over. A write a stalled network still delivers later is
        // refused by its resourceVersion (see reconcile_all).
        let Some(bound) = leadership.remaining() else {
            continue;
        };
        let res = match tokio::time::timeout(bound, reconcile_all(&ctx)).await {
            Ok(r) => r,
            Err(_) => {
                warn!(
                    seconds = bound.as_secs_f64(),
                    "reconcile pass abandoned: it would outlive the renew deadline"
                );
                Err(kube::Error::Service(
                    format!("reconcile pass exceeded {:.1}s", bound.as_secs_f64()).into(),
                ))
            }
        };
        tracing::debug!(
            ms = t.elapsed().as_millis() as u64,
            ok = res.is_ok(),
            "reconcile pass"
        );
        {
            let mut m = metrics.lock().unwrap_or_else(|p| p.into_inner());
            m.ready = true;
            m.reconciles += 1;
            m.seconds += t.elapsed().as_secs_f64();
            m.errors += u64::from(res.is_err());
        }
        match res {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "reconcile failed; retrying");
                tokio::time::sleep(backoff).await;
                // Capped well below the lease duration, so the lease is renewed in time.
                backoff = (backoff * 2).min(Duration::from_secs(5));
                notify.notify_one();
            }
        }
    }
    // The renewal task releases the lease, so a successor need not wait for it to expire.
    let _ = stop_renewing.send(());
    let _ = renewals.await;
    info!("egressguard-operator stopped");
    Ok(())
}
