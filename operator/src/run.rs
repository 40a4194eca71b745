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

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egressguard_crds::node_shaping::NodeShapingSpec;
use egressguard_crds::{EgressGuard, NodeShaping, Phase, Quarantine};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::decide::{decide_with, Decision, Extras, GroupFacts, NodeFacts};
use crate::enforcement::NodeReport;
use crate::evaluate::NodeIndex;
use crate::intent::{intend, Finalizers, GuardEvent, Intent, Observed, PlanWrite};
use crate::kinds::Served;
use crate::leader::Leader;
use crate::own_writes::OwnWrites;
use crate::quarantine::{GuardFacts, World};
use crate::remediate::Watched;
use crate::status::GuardQuarantine;
use egressguard_crds::node_shaping::ProtectedEntry;
use egressguard_crds::quarantine::rules;
use egressguard_crds::serve::prometheus_client::encoding::DescriptorEncoder;
use egressguard_crds::serve::prometheus_client::registry::Registry;
use egressguard_crds::serve::{self, counter, gauge, Scrape};
use egressguard_crds::validate;

pub use crate::intent::FINALIZER;
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
    /// `/healthz` and `/readyz` alone, for the kubelet: a listener with
    /// connection slots of its own, which no scrape can take.
    pub probe_addr: SocketAddr,
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
    /// Plans written (created, changed, or turned into removals).
    pub plan_writes: u64,
    /// Request bytes of those writes: what one guard or group edit costs the API.
    pub plan_write_bytes: u64,
}

impl Scrape for OpMetrics {
    fn scrape(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        counter(
            e,
            "egressguard_operator_reconciles",
            "Reconcile passes.",
            self.reconciles,
        )?;
        counter(
            e,
            "egressguard_operator_reconcile_errors",
            "Failed reconcile passes.",
            self.errors,
        )?;
        counter(
            e,
            "egressguard_operator_reconcile_seconds",
            "Time spent reconciling.",
            self.seconds,
        )?;
        gauge(
            e,
            "egressguard_operator_leader",
            "Whether this replica holds the lease.",
            i64::from(self.leader),
        )?;
        gauge(
            e,
            "egressguard_operator_ignored_node_addresses",
            "Node InternalIPs not protected (outside the node ranges, or over the per-node limit).",
            self.ignored_node_addresses as i64,
        )?;
        counter(
            e,
            "egressguard_operator_plan_writes",
            "NodeShaping plans written.",
            self.plan_writes,
        )?;
        counter(
            e,
            "egressguard_operator_plan_write_bytes",
            "Request body bytes of NodeShaping plan writes.",
            self.plan_write_bytes,
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
    /// The agents' heartbeat Leases (in this release's namespace).
    heartbeats: Store<Lease>,
    /// Whether the Quarantine and CIDRGroup CRDs are installed: kinds added
    /// after the first release, which an upgrade may have left out.
    quarantines_served: Served,
    groups_served: Served,
}

impl Caches {
    /// Every cache has listed once, or (for the kinds later releases added)
    /// found its CRD missing. Waits for the kinds every release had.
    async fn ready(&self) -> bool {
        let optional = |store_ready: Option<Result<(), _>>, served: &Served| {
            served.missing() || matches!(store_ready, Some(Ok(())))
        };
        self.guards.wait_until_ready().await.is_ok()
            && self.nodes.wait_until_ready().await.is_ok()
            && self.shapings.wait_until_ready().await.is_ok()
            && self.slices.wait_until_ready().await.is_ok()
            && self.heartbeats.wait_until_ready().await.is_ok()
            && optional(
                self.quarantines.wait_until_ready().now_or_never(),
                &self.quarantines_served,
            )
            && optional(
                self.groups.wait_until_ready().now_or_never(),
                &self.groups_served,
            )
    }

    /// The kinds whose CRD the API server does not serve.
    fn missing(&self) -> Vec<&'static str> {
        [
            (&self.quarantines_served, "quarantines.egressguard.io"),
            (&self.groups_served, "cidrgroups.egressguard.io"),
        ]
        .into_iter()
        .filter(|(s, _)| s.missing())
        .map(|(_, name)| name)
        .collect()
    }
}

fn spawn_reflector<K>(api: Api<K>, cfg: watcher::Config, notify: Arc<Notify>) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    spawn_served_reflector(api, cfg, notify, Served::default())
}

/// A reflector whose watch steps also tell `served` whether the kind exists.
fn spawn_served_reflector<K>(
    api: Api<K>,
    cfg: watcher::Config,
    notify: Arc<Notify>,
    served: Served,
) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher::watcher(api, cfg)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            served.observe(&ev);
            match ev {
                Ok(_) => notify.notify_one(),
                Err(e) => warn!(error = %e, "watch failed; retrying with backoff"),
            }
        }
    });
    reader
}

/// The API server's addresses: only from the EndpointSlice the API server
/// itself keeps (`default/kubernetes`). Anyone allowed to create
/// EndpointSlices in `default` could label another one for the service and
/// have its addresses protected on every node.
fn api_endpoints(slices: &[Arc<EndpointSlice>]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = slices
        .iter()
        .filter(|s| s.metadata.name.as_deref() == Some(API_SLICE))
        .flat_map(|s| s.endpoints.iter().flatten())
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The EndpointSlice the API server writes for the `kubernetes` Service.
const API_SLICE: &str = "kubernetes";

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
    /// Plans written that the cache has not caught up with.
    own: Mutex<OwnWrites>,
    /// Each node's heartbeat Lease version and when this replica first saw it.
    heartbeat_seen: Mutex<BTreeMap<String, (String, Timestamp)>>,
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
        let node_ref = crate::remediate::node_ref(&i.node);
        let ev = Event {
            type_: EventType::Warning,
            reason: egressguard_crds::conditions::events::NODE_ADDRESS_NOT_PROTECTED.into(),
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

async fn event(ctx: &Ctx, guard: Option<&ObjectReference>, e: &GuardEvent) {
    let Some(guard) = guard else {
        return;
    };
    let ev = Event {
        type_: if e.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: e.reason.clone(),
        note: Some(e.note.clone()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, guard).await {
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

/// The caches at the start of a pass, owned so the pass can borrow freely.
struct Snapshot {
    guards: Vec<EgressGuard>,
    /// Node facts after the node address policy.
    nodes: Vec<NodeFacts>,
    ignored: Vec<crate::decide::IgnoredAddress>,
    node_names: BTreeSet<String>,
    node_objs: Vec<Arc<Node>>,
    endpoints: Vec<IpAddr>,
    /// The plans: the cache, with this replica's writes it has not seen yet.
    shapings: BTreeMap<String, Arc<NodeShaping>>,
    /// Each plan's version in the cache itself, recorded with the writes.
    cached_rv: BTreeMap<String, Option<String>>,
    quarantines: Vec<Arc<Quarantine>>,
    /// The agents' heartbeats, by node (the Lease's holder).
    heartbeats: BTreeMap<String, Arc<Lease>>,
    /// Event targets by guard name.
    refs: BTreeMap<String, ObjectReference>,
}

impl Snapshot {
    fn take(ctx: &Ctx) -> Snapshot {
        let guards: Vec<EgressGuard> = ctx
            .caches
            .guards
            .state()
            .iter()
            .map(|g| (**g).clone())
            .collect();
        let node_objs = ctx.caches.nodes.state();
        let reported: Vec<NodeFacts> = node_objs.iter().map(|n| NodeFacts::of(n)).collect();
        let (nodes, ignored) = crate::decide::limit_node_addresses(&reported, &ctx.node_addresses);
        let mut shapings: BTreeMap<String, Arc<NodeShaping>> = ctx
            .caches
            .shapings
            .state()
            .into_iter()
            .map(|s| (s.name_any(), s))
            .collect();
        let cached_rv = shapings
            .iter()
            .map(|(n, s)| (n.clone(), s.resource_version()))
            .collect();
        ctx.own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .overlay(&mut shapings);
        Snapshot {
            node_names: nodes.iter().map(|n| n.name.clone()).collect(),
            refs: guards
                .iter()
                .map(|g| (g.name_any(), g.object_ref(&())))
                .collect(),
            guards,
            nodes,
            ignored,
            node_objs,
            endpoints: api_endpoints(&ctx.caches.slices.state()),
            shapings,
            cached_rv,
            quarantines: ctx.caches.quarantines.state(),
            heartbeats: ctx
                .caches
                .heartbeats
                .state()
                .into_iter()
                .filter_map(|l| {
                    let node = l.spec.as_ref()?.holder_identity.clone()?;
                    Some((node, l))
                })
                .collect(),
        }
    }

    /// The decision's inputs beyond guards and nodes; quarantines as stored.
    fn extras(&self, ctx: &Ctx) -> Extras {
        let prometheus = ctx.quarantine.prometheus.as_ref().and_then(|p| p.address());
        Extras {
            quarantined: stored_active(&self.quarantines),
            protected: prometheus
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
            // Agents from before plans by reference get the spec copied.
            legacy_agents: self
                .shapings
                .iter()
                .filter(|(_, s)| {
                    s.status
                        .as_ref()
                        .is_some_and(|st| agent_wrote(st) && !st.by_reference)
                })
                .map(|(n, _)| n.clone())
                .collect(),
            // Agents from before digests in the guard's status get them in the plan.
            digests_in_plan: self
                .shapings
                .iter()
                .filter(|(_, s)| {
                    s.status
                        .as_ref()
                        .is_some_and(|st| agent_wrote(st) && !st.digests_from_guard)
                })
                .map(|(n, _)| n.clone())
                .collect(),
        }
    }

    fn decide(&self, extras: &Extras) -> Decision {
        // Borrowed, not cloned: plans can be large and this runs every pass.
        let current: BTreeMap<&str, &NodeShapingSpec> = self
            .shapings
            .iter()
            .map(|(n, s)| (n.as_str(), &s.spec))
            .collect();
        decide_with(&self.guards, &self.nodes, &self.endpoints, &current, extras)
    }

    /// What `crate::quarantine` decides from.
    fn world<'a>(&'a self, ctx: &Ctx, d: &'a Decision) -> World<'a> {
        let signals = ctx
            .eval
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .signals
            .clone();
        World {
            guards: self
                .guards
                .iter()
                .map(|g| {
                    let out = d.guards.get(&g.name_any());
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
                    (g.name_any(), facts)
                })
                .collect(),
            nodes: self
                .node_objs
                .iter()
                .map(|n| (n.name_any(), n.labels()))
                .collect(),
            quarantines: &self.quarantines,
            signals,
            now: Timestamp::now(),
            retention: ctx.quarantine.retention,
            enforcement: self
                .node_objs
                .iter()
                .map(|n| {
                    let name = n.name_any();
                    let lease = self.heartbeats.get(&name);
                    let r = NodeReport::of(
                        Some(n),
                        self.shapings.get(&name).map(|s| &**s),
                        lease.map(|l| &**l),
                        lease.map(|l| heartbeat_seen(ctx, &name, l)),
                    );
                    (name, r)
                })
                .collect(),
        }
    }

    /// Each guard's quarantine facts for its status.
    fn guard_quarantine(&self, ctx: &Ctx, extras: &Extras) -> BTreeMap<String, GuardQuarantine> {
        let available = ctx
            .eval
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .available
            .clone();
        self.guards
            .iter()
            .map(|g| {
                let name = g.name_any();
                let q = GuardQuarantine {
                    active: extras.quarantined.get(&name).map_or(0, |s| s.len()),
                    metrics: available.get(&name).cloned(),
                    missing_kinds: ctx.caches.missing(),
                };
                (name, q)
            })
            .collect()
    }
}

/// An agent wrote this status: it observed a generation (1 or more). The
/// schema's default, `observedGeneration: 0`, is nobody's report.
fn agent_wrote(st: &egressguard_crds::NodeShapingStatus) -> bool {
    st.observed_generation.is_some_and(|g| g > 0)
}

/// One full pass: decide, then write the differences. A failed write is
/// logged and the pass goes on (one bad object must not block the others);
/// the first error is returned so the pass is retried with backoff.
async fn reconcile_all(ctx: &Ctx, stop_writing: Instant) -> Result<Pass, kube::Error> {
    let seen = Snapshot::take(ctx);
    report_ignored(ctx, &seen.ignored).await;
    // Quarantines first (crate::quarantine admits, starts and releases them);
    // the plans then enforce exactly the Active ones.
    let mut extras = seen.extras(ctx);
    let before = seen.decide(&extras);
    evaluate_if_due(ctx, &seen, &before).await;
    // Without the Quarantine CRD (an upgrade that left it out) there is
    // nothing to record a quarantine in: plans and guards still go on.
    let qp = if ctx.caches.quarantines_served.missing() {
        Default::default()
    } else {
        crate::quarantine::plan(&seen.world(ctx, &before))
    };
    let q_written = crate::remediate::write_changes(&ctx.client, &qp).await;
    let q_ok = q_written.is_ok();
    if q_written.is_ok() {
        extras.quarantined = qp.active.clone();
        count_quarantines(ctx, &qp);
    }
    // A quarantine whose record could not be written is not enforced (nor
    // released) on its say-so: the next pass retries from the stored objects.
    let mut first = None;
    note(&mut first, "write quarantines", q_written);
    let quarantine = seen.guard_quarantine(ctx, &extras);
    let observed = Observed {
        guards: &seen.guards,
        shapings: &seen.shapings,
        nodes: &seen.node_names,
        quarantine: &quarantine,
        now: Timestamp::now(),
        cleanup_timeout: ctx.cleanup_timeout,
    };
    let intent = intend(&observed, seen.decide(&extras));
    let pass = execute(ctx, &seen, intent, &mut first, stop_writing).await;
    write_group_statuses(ctx, &extras).await;
    // Quarantine Events, then finalizer removals and expired records, now
    // that the plans are written.
    publish_notices(ctx, &seen.refs, &qp).await;
    // Finalizers go only after every record this pass decided was written:
    // a deleted quarantine's release record must exist before the quarantine
    // itself may go.
    if q_ok {
        let r = crate::remediate::write_cleanup(&ctx.client, &qp).await;
        note(&mut first, "release quarantine finalizers", r);
    }
    first.map_or(Ok(pass), Err)
}

/// How a pass ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Everything decided was written.
    Done,
    /// Plan writes were left for the next pass, which starts at once: a
    /// pass that would outlive the leadership deadline is cut, and a cut
    /// loses the writes in flight; one that stops starting new writes in
    /// time loses nothing (a full resync of thousands of nodes).
    More,
}

/// Queries Prometheus for the evaluated guards when the interval is due.
async fn evaluate_if_due(ctx: &Ctx, seen: &Snapshot, d: &Decision) {
    let every = ctx.quarantine.evaluation_interval;
    if !ctx
        .eval
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .due(every)
    {
        return;
    }
    let watched: Vec<Watched> = seen
        .guards
        .iter()
        .filter(|g| crate::remediate::evaluated(g))
        .map(|g| Watched {
            guard: g,
            nodes: d
                .guards
                .get(&g.name_any())
                .map(|o| o.planned.clone())
                .unwrap_or_default(),
        })
        .collect();
    let mut st = std::mem::take(&mut *ctx.eval.lock().unwrap_or_else(|p| p.into_inner()));
    let index = NodeIndex::new(&seen.nodes);
    crate::remediate::evaluate(
        ctx.quarantine.prometheus.as_ref(),
        &watched,
        &index,
        every,
        &mut st,
        &ctx.q_metrics,
    )
    .await;
    *ctx.eval.lock().unwrap_or_else(|p| p.into_inner()) = st;
}

fn count_quarantines(ctx: &Ctx, qp: &crate::quarantine::QuarantinePlan) {
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

/// Publishes the quarantine notices; recurring ones once per continuous run.
async fn publish_notices(
    ctx: &Ctx,
    refs: &BTreeMap<String, ObjectReference>,
    qp: &crate::quarantine::QuarantinePlan,
) {
    let fresh: Vec<&crate::quarantine::Notice> = {
        let mut seen = ctx.noticed.lock().unwrap_or_else(|p| p.into_inner());
        let now: BTreeSet<String> = qp.notices.iter().filter_map(|n| n.once.clone()).collect();
        let fresh = qp
            .notices
            .iter()
            .filter(|n| n.once.as_ref().is_none_or(|k| !seen.contains(k)))
            .collect();
        *seen = now;
        fresh
    };
    for n in fresh {
        crate::remediate::publish(&ctx.recorder, n, refs).await;
    }
}

/// Writes the CIDRGroup statuses that changed. Informational (nothing is
/// enforced from them), so a failure is logged, not retried at once: a
/// release rolled back to RBAC without `cidrgroups/status` must not turn
/// every pass into an error.
async fn write_group_statuses(ctx: &Ctx, extras: &Extras) {
    let api: Api<egressguard_crds::CIDRGroup> = Api::all(ctx.client.clone());
    let now = Timestamp::now();
    let groups = ctx.caches.groups.state();
    let writes = groups.iter().filter_map(|g| {
        let facts = extras.groups.get(&g.name_any())?;
        let status = crate::group_status::group_status(g, facts, now)?;
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": g.resource_version()},
            "status": status,
        });
        let api = &api;
        Some(async move {
            let name = g.name_any();
            match api
                .patch_status(&name, &merge_params(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                // The next pass reads the newer version and writes again.
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => warn!(group = %name, error = %e, "CIDRGroup status not written"),
            }
        })
    });
    parallel(writes).await;
}

/// Executes an [`Intent`] in its order, deciding nothing; plan writes not
/// started by `stop_writing` are left to the next pass.
async fn execute(
    ctx: &Ctx,
    seen: &Snapshot,
    intent: Intent,
    first: &mut Option<kube::Error>,
    stop_writing: Instant,
) -> Pass {
    let refs = &seen.refs;
    let guards: Api<EgressGuard> = Api::all(ctx.client.clone());
    let plans: Api<NodeShaping> = Api::all(ctx.client.clone());
    // The versions these writes return fence this pass's later writes of the
    // same guard (its status after its finalizer, its release after its status).
    let mut fresh_rv: BTreeMap<String, Option<String>> = BTreeMap::new();
    for f in &intent.add_finalizers {
        let r = write_finalizers(&guards, f).await;
        if let Ok(rv) = &r {
            fresh_rv.insert(f.guard.clone(), rv.clone());
        }
        note(first, "add finalizer", r.map(|_| ()));
    }
    // Plans are independent objects: write several at once. One request at a
    // time made a 2,000-node resync take 14 s on the real API server (each
    // request's round trip, not the server's throughput, was the limit).
    let writes = intent.plans.into_iter().map(|w| {
        let plans = &plans;
        async move {
            if Instant::now() >= stop_writing {
                return Ok(Pass::More);
            }
            let cached = seen.cached_rv.get(&w.node).cloned().flatten();
            write_plan(ctx, plans, cached, w).await.map(|()| Pass::Done)
        }
    });
    let mut pass = Pass::Done;
    for r in parallel(writes).await {
        match r {
            Ok(Pass::More) => pass = Pass::More,
            r => note(first, "write plan", r.map(drop)),
        }
    }
    for d in &intent.deletions {
        let fenced = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: d.resource_version.clone(),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        let r = plans.delete(&d.node, &fenced).await;
        let gone = match &r {
            Ok(_) => true,
            Err(kube::Error::Api(e)) => e.code == 404,
            Err(_) => false,
        };
        if gone {
            ctx.own
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .forget(&d.node);
        }
        match r {
            Ok(_) => info!(node = %d.node, "plan deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => note(first, "delete plan", Err(e)),
        }
    }
    // Statuses and their Events, several guards at once like the plans.
    let writes = intent.statuses.into_iter().map(|mut w| {
        let (guards, fresh_rv) = (&guards, &fresh_rv);
        async move {
            for e in &w.events {
                event(ctx, refs.get(&w.guard), e).await;
            }
            if let Some(rv) = fresh_rv.get(&w.guard) {
                w.resource_version = rv.clone();
            }
            let patch = serde_json::json!({
                "metadata": {"resourceVersion": w.resource_version},
                "status": w.status,
            });
            let new = guards
                .patch_status(&w.guard, &merge_params(), &Patch::Merge(&patch))
                .await?;
            Ok((w.guard, new.resource_version()))
        }
    });
    for r in parallel(writes).await {
        if let Ok((guard, rv)) = &r {
            fresh_rv.insert(guard.clone(), rv.clone());
        }
        note(first, "write guard status", r.map(|_| ()));
    }
    for mut rel in intent.releases {
        if let Some(e) = &rel.gave_up {
            event(ctx, refs.get(&rel.finalizers.guard), e).await;
        }
        if let Some(rv) = fresh_rv.get(&rel.finalizers.guard) {
            rel.finalizers.resource_version = rv.clone();
        }
        let r = write_finalizers(&guards, &rel.finalizers).await;
        if r.is_ok() {
            info!(guard = %rel.finalizers.guard, "cleanup done; finalizer removed");
        }
        note(first, "remove finalizer", r.map(|_| ()));
    }
    pass
}

async fn parallel<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    futures::stream::iter(futs)
        .buffer_unordered(PARALLEL_WRITES)
        .collect()
        .await
}

fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    }
}

/// Stores a guard's finalizer list; the resourceVersion makes it a
/// compare-and-swap (409 when another controller changed the list
/// meanwhile: the next pass recomputes, never dropping its finalizer).
async fn write_finalizers(
    api: &Api<EgressGuard>,
    f: &Finalizers,
) -> Result<Option<String>, kube::Error> {
    let patch = serde_json::json!({"metadata": {"finalizers": f.finalizers, "resourceVersion": f.resource_version}});
    let new = api
        .patch(&f.guard, &merge_params(), &Patch::Merge(&patch))
        .await?;
    Ok(new.resource_version())
}

/// Server-side applies one plan, fenced by its resourceVersion, and keeps
/// what was stored until the cache (at `cached` now) has seen it.
async fn write_plan(
    ctx: &Ctx,
    api: &Api<NodeShaping>,
    cached: Option<String>,
    w: PlanWrite,
) -> Result<(), kube::Error> {
    let removal = w.spec.is_removal();
    let guard = w.spec.guard.as_ref().map(|g| g.name.clone());
    let obj = NodeShaping {
        metadata: ObjectMeta {
            name: Some(w.node.clone()),
            resource_version: w.resource_version,
            ..Default::default()
        },
        spec: w.spec,
        status: None,
    };
    // Never a default: a forced apply of an empty object would take every
    // field this manager owns away from the plan.
    let mut value = serde_json::to_value(&obj).map_err(kube::Error::SerdeError)?;
    value["apiVersion"] = "egressguard.io/v1alpha1".into();
    value["kind"] = "NodeShaping".into();
    // Always a server-side apply, creation included: a plain create would
    // record its fields under an Update entry of the same manager, and a
    // later apply that leaves a field out (a plan's groups emptied, its copy
    // of the spec dropped) would not remove it.
    let apply = PatchParams::apply(MANAGER).force();
    let written = api.patch(&w.node, &apply, &Patch::Apply(&value)).await;
    let stored = match written {
        Ok(stored) => stored,
        Err(e) => {
            ctx.own
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .forget(&w.node);
            return Err(e);
        }
    };
    ctx.own
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .wrote(cached, stored);
    if removal {
        info!(node = %w.node, "removal written");
    } else {
        info!(node = %w.node, guard = ?guard, "plan written");
    }
    let mut m = ctx.metrics.lock().unwrap_or_else(|p| p.into_inner());
    m.plan_writes += 1;
    m.plan_write_bytes += serde_json::to_vec(&value).map_or(0, |v| v.len() as u64);
    Ok(())
}

/// Guard → nodes with an Active quarantine, as stored.
/// When this operator first saw `node`'s heartbeat Lease at its current
/// resourceVersion: the operator's clock only, as leader election does, so
/// a skewed node clock neither fakes nor hides a renewal.
fn heartbeat_seen(ctx: &Ctx, node: &str, lease: &Lease) -> Timestamp {
    let rv = lease.resource_version().unwrap_or_default();
    let mut seen = ctx.heartbeat_seen.lock().unwrap_or_else(|p| p.into_inner());
    match seen.get(node) {
        Some((v, at)) if *v == rv => *at,
        _ => {
            let now = Timestamp::now();
            seen.insert(node.to_string(), (rv, now));
            now
        }
    }
}

/// How often Active quarantines' heartbeats are checked.
const HEARTBEAT_CHECK: Duration = Duration::from_millis(500);

fn any_active(ctx: &Ctx) -> bool {
    ctx.caches
        .quarantines
        .state()
        .iter()
        .any(|q| q.status.as_ref().and_then(|s| s.phase) == Some(Phase::Active))
}

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
    let mut registry = Registry::default();
    serve::register(&mut registry, metrics.clone());
    serve::register(&mut registry, q_metrics.clone());
    let probes = tokio::net::TcpListener::bind(cfg.probe_addr)
        .await
        .map_err(|e| OperatorError::Listen(cfg.probe_addr, e))?;
    let ready = |m: &Mutex<OpMetrics>| match m.lock().unwrap_or_else(|p| p.into_inner()).ready {
        true => Ok(()),
        false => Err("caches not synced yet".to_string()),
    };
    let (registry, m) = (Arc::new(registry), metrics.clone());
    tokio::spawn(serve::serve(listener, move |req| {
        // Read (and unlock) before `probes`: its collector locks the same mutex.
        let ready = ready(&m);
        let reply = serve::probes(&req, &registry, ready)
            .unwrap_or_else(|| serve::text(serve::StatusCode::NOT_FOUND, "not found\n"));
        async move { reply }
    }));
    let m = metrics.clone();
    tokio::spawn(serve::serve_with(
        probes,
        move |req| {
            let reply = serve::health(&req, Ok(()), ready(&m));
            async move { reply }
        },
        serve::Limits::probes(),
    ));
    let notify = Arc::new(Notify::new());
    let (quarantines_served, groups_served) = (Served::default(), Served::default());
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
            watcher::Config::default()
                .labels("kubernetes.io/service-name=kubernetes")
                .fields(&format!("metadata.name={API_SLICE}")),
            notify.clone(),
        ),
        quarantines: spawn_served_reflector(
            Api::<Quarantine>::all(client.clone()),
            watcher::Config::default(),
            notify.clone(),
            quarantines_served.clone(),
        ),
        groups: spawn_served_reflector(
            Api::<egressguard_crds::CIDRGroup>::all(client.clone()),
            watcher::Config::default(),
            notify.clone(),
            groups_served.clone(),
        ),
        heartbeats: spawn_reflector(
            Api::<Lease>::namespaced(client.clone(), &cfg.namespace),
            watcher::Config::default().labels(&format!(
                "{}=node-shaper",
                crate::enforcement::HEARTBEAT_LABEL
            )),
            // Every agent renews every few seconds: a pass per renewal would
            // be a pass per node per period. Staleness is a matter of time,
            // read by the passes the tick below schedules.
            Arc::new(Notify::new()),
        ),
        quarantines_served,
        groups_served,
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
            let receiver = Arc::new(crate::receiver::Receiver {
                client: client.clone(),
                guards: caches.guards.clone(),
                nodes: caches.nodes.clone(),
                shapings: caches.shapings.clone(),
                quarantines: caches.quarantines.clone(),
                node_addresses: cfg.node_addresses.clone(),
                prometheus: cfg.quarantine.prometheus.clone(),
                token: crate::receiver::TokenFile::new(token.0.clone(), token.1.clone()),
                recorder: recorder.clone(),
                metrics: q_metrics.clone(),
            });
            info!(%addr, "Alertmanager receiver listening on /alertmanager");
            tokio::spawn(serve::serve(l, move |req| receiver.clone().handle(req)));
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
        own: Mutex::new(OwnWrites::default()),
        heartbeat_seen: Mutex::default(),
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
        if leading && any_active(&ctx) {
            // An Active quarantine's heartbeat can go stale at any moment.
            tick = tick.min(HEARTBEAT_CHECK);
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
        if !ctx.caches.ready().await {
            // A kind still listing: its watch wakes this loop when it has.
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
        // New plan writes stop well before the cut, and the next pass goes on.
        let stop_writing = Instant::now() + bound.mul_f64(0.6);
        let res = match tokio::time::timeout(bound, reconcile_all(&ctx, stop_writing)).await {
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
            Ok(Pass::Done) => backoff = Duration::from_millis(200),
            Ok(Pass::More) => {
                backoff = Duration::from_millis(200);
                notify.notify_one();
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::Endpoint;

    fn slice(name: &str, addresses: &[&str]) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    [(
                        "kubernetes.io/service-name".to_string(),
                        "kubernetes".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(vec![Endpoint {
                addresses: addresses.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            }]),
            ports: None,
        })
    }

    #[test]
    fn only_the_api_servers_own_slice_names_api_endpoints() {
        let got = api_endpoints(&[
            slice("kubernetes", &["10.96.0.10"]),
            // Labelled for the service by whoever may create slices in default.
            slice("kubernetes-extra", &["203.0.113.7"]),
        ]);
        assert_eq!(got, vec!["10.96.0.10".parse::<IpAddr>().expect("ip")]);
    }
}
