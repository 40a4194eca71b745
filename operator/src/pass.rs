//! One reconcile pass of the operator's leader, top to bottom:
//!
//! 1. **Gather** every read: the caches (guards, nodes, plans, quarantines,
//!    groups, heartbeats, the API server's endpoints) and, when an
//!    evaluation is due, Prometheus's answers to every trigger.
//! 2. **Decide**, without I/O: the evaluation's breach, calm and
//!    availability rules ([`crate::evaluate::fold`]), the quarantines
//!    ([`crate::quarantine::plan`]), the plans, guard statuses, finalizers
//!    and releases ([`crate::decide`], [`crate::intent`]), Events and group
//!    statuses: a [`PassPlan`].
//! 3. **Execute** the plan's writes in order, deciding nothing: quarantine
//!    records first (the plans enforce exactly the recorded ones), then
//!    plans, statuses, releases, group statuses, notices, and the quarantine
//!    finalizers last.
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
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egressguard_crds::node_shaping::{NodeShapingSpec, ProtectedEntry};
use egressguard_crds::serve::prometheus_client::encoding::DescriptorEncoder;
use egressguard_crds::serve::{counter, counters, gauge, Scrape};
use egressguard_crds::{CidrGroupStatus, EgressGuard, NodeShaping, Phase, Quarantine};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use tracing::{field, info, info_span, warn, Instrument};

use crate::decide::{decide_with, Decision, Extras, IgnoredAddress, NodeFacts};
use crate::enforcement::NodeReport;
use crate::evaluate::{Answer, EvalState, NodeIndex};
use crate::index::{GroupFacts, Index, ParsedGuard};
use crate::intent::{intend, Finalizers, GuardEvent, Intent, Observed, PlanWrite};
use crate::kinds::Served;
use crate::own_writes::OwnWrites;
use crate::quarantine::{GuardFacts, Notice, QuarantinePlan, World};
use crate::status::GuardQuarantine;

/// Field manager for server-side apply.
pub const MANAGER: &str = "egressguard-operator";
/// Plan writes in flight at once (the API server's default max-in-flight is
/// 400 and APF gives a workload controller several seats; 16 is modest).
const PARALLEL_WRITES: usize = 16;

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
    /// Failed writes by [`Stage`] label: every error of every pass, not only
    /// the first.
    pub write_errors: BTreeMap<&'static str, u64>,
    /// Guards and groups parsed (per change, not per pass).
    pub parses: u64,
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
        )?;
        counter(
            e,
            "egressguard_operator_parses",
            "Guards and CIDRGroups parsed and validated (once per change, not per pass).",
            self.parses,
        )?;
        counters(
            e,
            "egressguard_operator_write_errors",
            "Failed writes of reconcile passes, by stage.",
            self.write_errors
                .iter()
                .map(|(stage, n)| ([("stage", *stage)], *n)),
        )
    }
}

pub(crate) struct Caches {
    pub(crate) guards: Store<EgressGuard>,
    pub(crate) nodes: Store<Node>,
    pub(crate) shapings: Store<NodeShaping>,
    pub(crate) slices: Store<EndpointSlice>,
    pub(crate) quarantines: Store<Quarantine>,
    pub(crate) groups: Store<egressguard_crds::CIDRGroup>,
    /// The agents' heartbeat Leases (in this release's namespace).
    pub(crate) heartbeats: Store<Lease>,
    /// Whether the Quarantine and CIDRGroup CRDs are installed: kinds added
    /// after the first release, which an upgrade may have left out.
    pub(crate) quarantines_served: Served,
    pub(crate) groups_served: Served,
}

impl Caches {
    /// Every cache has listed once, or (for the kinds later releases added)
    /// found its CRD missing. Waits for the kinds every release had.
    pub(crate) async fn ready(&self) -> bool {
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

/// The API server's addresses: only from the EndpointSlice the API server
/// itself keeps (`default/kubernetes`). Anyone allowed to create
/// EndpointSlices in `default` could label another one for the service and
/// have its addresses protected on every node.
pub(crate) fn api_endpoints(slices: &[Arc<EndpointSlice>]) -> Vec<IpAddr> {
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
pub(crate) const API_SLICE: &str = "kubernetes";

pub(crate) struct Ctx {
    pub(crate) client: Client,
    pub(crate) caches: Caches,
    pub(crate) recorder: Recorder,
    pub(crate) cleanup_timeout: Duration,
    pub(crate) node_addresses: crate::decide::NodeAddressPolicy,
    /// Ignored node addresses already reported (an Event once per change).
    pub(crate) reported: Mutex<std::collections::BTreeSet<crate::decide::IgnoredAddress>>,
    pub(crate) metrics: Arc<Mutex<OpMetrics>>,
    pub(crate) quarantine: crate::remediate::QuarantineConfig,
    pub(crate) q_metrics: Arc<Mutex<crate::remediate::QuarantineMetrics>>,
    /// The leader's Prometheus evaluation state.
    pub(crate) eval: Mutex<EvalState>,
    /// Recurring notices already published (once per continuous run).
    pub(crate) noticed: Mutex<std::collections::BTreeSet<String>>,
    /// Plans written that the cache has not caught up with.
    pub(crate) own: Mutex<OwnWrites>,
    /// Guards and groups parsed once per change.
    pub(crate) index: Mutex<Index>,
    /// Each node's heartbeat Lease version and when this replica first saw it.
    pub(crate) heartbeat_seen: Mutex<BTreeMap<String, (String, Timestamp)>>,
}

/// How a pass ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Everything decided was written.
    Done,
    /// Plan writes were left for the next pass, which starts at once: a
    /// pass that would outlive the leadership deadline is cut, and a cut
    /// loses the writes in flight; one that stops starting new writes in
    /// time loses nothing (a full resync of thousands of nodes).
    More,
}

/// One pass: gather every read, decide every write (pure), execute the
/// writes in order. A failed write is logged and counted, and the pass goes
/// on (one bad object must not block the others); the failures are returned
/// so the pass is retried with backoff.
pub(crate) async fn reconcile(ctx: &Ctx, stop_writing: Instant) -> Result<Pass, PassError> {
    let span = info_span!("pass", guards = field::Empty, nodes = field::Empty);
    async {
        // 1. Gather: the caches, then Prometheus when an evaluation is due.
        let seen = Snapshot::take(ctx);
        let span = tracing::Span::current();
        span.record("guards", seen.guards.len());
        span.record("nodes", seen.nodes.len());
        let answers = gather_answers(ctx, &seen).await;
        // 2. Decide: every write of the pass, before the first one.
        let plan = decide(ctx, &seen, answers);
        // 3. Execute, in order, deciding nothing.
        let mut errors = Errors::default();
        let pass = execute(ctx, &seen, plan, &mut errors, stop_writing).await;
        errors.count(&ctx.metrics);
        errors.into_result(pass)
    }
    .instrument(span)
    .await
}

/// The Prometheus answers of an evaluation, when one is due.
async fn gather_answers(ctx: &Ctx, seen: &Snapshot) -> Option<Vec<Answer>> {
    let every = ctx.quarantine.evaluation_interval;
    let due = ctx
        .eval
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .due(every, Timestamp::now());
    if !due {
        return None;
    }
    let evaluated: Vec<&EgressGuard> = seen
        .guards
        .iter()
        .map(|g| &**g)
        .filter(|g| crate::remediate::evaluated(g))
        .collect();
    Some(crate::remediate::query_triggers(ctx.quarantine.prometheus.as_ref(), &evaluated).await)
}

/// Everything one pass writes, decided before the first write.
struct PassPlan {
    /// Node addresses left unprotected (a gauge), and those not reported yet
    /// (a Warning Event each).
    ignored: (usize, Vec<IgnoredAddress>),
    /// Quarantine records to create and update, node escalations, cleanup.
    quarantines: QuarantinePlan,
    /// Plans, guard statuses, finalizers and releases, with the quarantines
    /// as this pass decides them...
    intent: Intent,
    /// ...and with the quarantines as stored, carried out instead when the
    /// Quarantine writes fail: a quarantine whose record could not be
    /// written is neither enforced nor released on its say-so.
    if_unrecorded: Option<Intent>,
    /// Quarantine notices not published yet in this run.
    notices: Vec<Notice>,
    /// CIDRGroup statuses that changed: (name, fence, status).
    groups: Vec<(String, Option<String>, CidrGroupStatus)>,
    /// Readings of this pass's evaluation per outcome, for metrics.
    readings: BTreeMap<&'static str, u64>,
}

/// The pass's decision: pure but for the leader's memory (evaluation
/// streaks, what was already reported), which it reads and updates.
fn decide(ctx: &Ctx, seen: &Snapshot, answers: Option<Vec<Answer>>) -> PassPlan {
    let now = Timestamp::now();
    let mut extras = seen.extras(ctx);
    let stored = seen.decide(&extras);
    // The evaluation judges the nodes each guard plans now.
    let readings = answers.map_or_else(BTreeMap::new, |answers| {
        let planned = stored
            .guards
            .iter()
            .map(|(g, o)| (g.clone(), o.planned.clone()))
            .collect();
        let mut st = ctx.eval.lock().unwrap_or_else(|p| p.into_inner());
        crate::evaluate::fold(
            &mut st,
            &answers,
            &planned,
            &NodeIndex::new(&seen.nodes),
            ctx.quarantine.evaluation_interval,
            now,
        )
    });
    let quarantines = if ctx.caches.quarantines_served.missing() {
        // Without the CRD there is nothing to record a quarantine in.
        QuarantinePlan::default()
    } else {
        crate::quarantine::plan(&seen.world(ctx, &stored))
    };
    // The fallback differs only when this pass starts or ends a quarantine.
    let if_unrecorded =
        (quarantines.active != extras.quarantined).then(|| seen.intent(ctx, &extras, now));
    extras.quarantined = quarantines.active.clone();
    let intent = seen.intent(ctx, &extras, now);
    PassPlan {
        ignored: (
            seen.ignored.len(),
            once(&ctx.reported, &seen.ignored, |i| i.clone()),
        ),
        notices: once_notices(&ctx.noticed, &quarantines.notices),
        groups: group_statuses(ctx, &extras, now),
        quarantines,
        intent,
        if_unrecorded,
        readings,
    }
}

/// The items of `all` not in `memory`; `memory` becomes `all` (so an item
/// that goes and comes back is reported again).
fn once<T: Clone + Ord, K: Ord>(
    memory: &Mutex<BTreeSet<K>>,
    all: &[T],
    key: impl Fn(&T) -> K,
) -> Vec<T> {
    let mut seen = memory.lock().unwrap_or_else(|p| p.into_inner());
    let now: BTreeSet<K> = all.iter().map(&key).collect();
    let fresh = all
        .iter()
        .filter(|t| !seen.contains(&key(t)))
        .cloned()
        .collect();
    *seen = now;
    fresh
}

/// Notices to publish: every one-off, and each recurring one once per
/// continuous run.
fn once_notices(memory: &Mutex<BTreeSet<String>>, notices: &[Notice]) -> Vec<Notice> {
    let mut seen = memory.lock().unwrap_or_else(|p| p.into_inner());
    let now: BTreeSet<String> = notices.iter().filter_map(|n| n.once.clone()).collect();
    let fresh = notices
        .iter()
        .filter(|n| n.once.as_ref().is_none_or(|k| !seen.contains(k)))
        .cloned()
        .collect();
    *seen = now;
    fresh
}

/// The CIDRGroup statuses that changed, fenced on the version read.
fn group_statuses(
    ctx: &Ctx,
    extras: &Extras,
    now: Timestamp,
) -> Vec<(String, Option<String>, CidrGroupStatus)> {
    ctx.caches
        .groups
        .state()
        .iter()
        .filter_map(|g| {
            let facts = extras.groups.get(&g.name_any())?;
            let status = crate::group_status::group_status(g, facts, now)?;
            Some((g.name_any(), g.resource_version(), status))
        })
        .collect()
}

/// Carries out a [`PassPlan`] in its order. The one choice it makes is the
/// one the plan spells out: the intent for recorded quarantines when their
/// writes succeeded, the one for the stored quarantines when not.
async fn execute(
    ctx: &Ctx,
    seen: &Snapshot,
    plan: PassPlan,
    errors: &mut Errors,
    stop_writing: Instant,
) -> Pass {
    report_ignored(ctx, plan.ignored).await;
    {
        let mut m = ctx.q_metrics.lock().unwrap_or_else(|p| p.into_inner());
        for (k, v) in &plan.readings {
            *m.evaluations.entry(k).or_default() += v;
        }
    }
    let recorded = crate::remediate::write_changes(&ctx.client, &plan.quarantines).await;
    let recorded = errors.note(Stage::Quarantines, recorded);
    let intent = match (recorded, plan.if_unrecorded) {
        (false, Some(stored)) => stored,
        _ => plan.intent,
    };
    if recorded {
        count_quarantines(ctx, &plan.quarantines);
    }
    let pass = execute_intent(ctx, seen, intent, errors, stop_writing).await;
    write_group_statuses(ctx, plan.groups).await;
    for n in &plan.notices {
        crate::remediate::publish(&ctx.recorder, n, &seen.refs).await;
    }
    // Finalizers go only after every record this pass decided was written:
    // a deleted quarantine's release record must exist before the
    // quarantine itself may go.
    if recorded {
        let r = crate::remediate::write_cleanup(&ctx.client, &plan.quarantines).await;
        errors.note(Stage::QuarantineCleanup, r);
    }
    pass
}

/// Where in a pass a write failed: the label of the error counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Quarantine records and their status, node escalations.
    Quarantines,
    /// A guard's finalizer (added, or removed after cleanup).
    Finalizer,
    /// A NodeShaping plan.
    Plan,
    /// A NodeShaping deleted after its removal was confirmed.
    PlanDeletion,
    /// A guard's status.
    GuardStatus,
    /// Quarantine finalizers and expired records.
    QuarantineCleanup,
}

impl Stage {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Quarantines => "quarantines",
            Stage::Finalizer => "finalizer",
            Stage::Plan => "plan",
            Stage::PlanDeletion => "plan_deletion",
            Stage::GuardStatus => "guard_status",
            Stage::QuarantineCleanup => "quarantine_cleanup",
        }
    }
}

/// Every failed write of a pass, by stage.
#[derive(Debug, Default)]
struct Errors(Vec<(Stage, kube::Error)>);

impl Errors {
    /// Keeps `r`'s error; true when it succeeded.
    fn note<T>(&mut self, stage: Stage, r: Result<T, kube::Error>) -> bool {
        match r {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, stage = stage.label(), "write failed; continuing with the other objects");
                self.0.push((stage, e));
                false
            }
        }
    }

    fn count(&self, metrics: &Mutex<OpMetrics>) {
        let mut m = metrics.lock().unwrap_or_else(|p| p.into_inner());
        for (stage, _) in &self.0 {
            *m.write_errors.entry(stage.label()).or_default() += 1;
        }
    }

    fn into_result(self, pass: Pass) -> Result<Pass, PassError> {
        if self.0.is_empty() {
            Ok(pass)
        } else {
            Err(PassError::Writes(self.0))
        }
    }
}

/// Why a pass is retried.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// Some writes failed (each was logged and counted by stage).
    #[error("{} writes failed, the first ({}): {}", .0.len(), .0[0].0.label(), .0[0].1)]
    Writes(Vec<(Stage, kube::Error)>),
    /// The pass would have outlived this replica's leadership.
    #[error("reconcile pass exceeded {0:.1}s")]
    Timeout(f64),
}

/// Node addresses left unprotected: a gauge, and a Warning Event on the
/// Node (and a log line) for each the pass found new.
async fn report_ignored(ctx: &Ctx, (count, fresh): (usize, Vec<IgnoredAddress>)) {
    ctx.metrics
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .ignored_node_addresses = count;
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

/// Writes the CIDRGroup statuses that changed. Informational (nothing is
/// enforced from them), so a failure is logged, not retried at once: a
/// release rolled back to RBAC without `cidrgroups/status` must not turn
/// every pass into an error.
async fn write_group_statuses(ctx: &Ctx, groups: Vec<(String, Option<String>, CidrGroupStatus)>) {
    let api: Api<egressguard_crds::CIDRGroup> = Api::all(ctx.client.clone());
    let writes = groups.into_iter().map(|(name, rv, status)| {
        let api = &api;
        async move {
            let patch = serde_json::json!({
                "metadata": {"resourceVersion": rv},
                "status": status,
            });
            match api
                .patch_status(&name, &merge_params(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                // The next pass reads the newer version and writes again.
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => warn!(group = %name, error = %e, "CIDRGroup status not written"),
            }
        }
    });
    parallel(writes).await;
}

/// The caches at the start of a pass, owned so the pass can borrow freely.
struct Snapshot {
    guards: Vec<Arc<EgressGuard>>,
    /// The guards as parsed once per change (the index's view).
    parsed: BTreeMap<String, ParsedGuard>,
    /// The CIDRGroups' facts, parsed once per change.
    groups: BTreeMap<String, GroupFacts>,
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
        let guards = ctx.caches.guards.state();
        let (parsed, groups) = {
            let mut index = ctx.index.lock().unwrap_or_else(|p| p.into_inner());
            let parsed = index.guards(&guards);
            let groups = index.groups(&ctx.caches.groups.state());
            ctx.metrics.lock().unwrap_or_else(|p| p.into_inner()).parses = index.parses;
            (parsed, groups)
        };
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
            parsed,
            groups,
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
            groups: self.groups.clone(),
            parsed: self.parsed.clone(),
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
                    let rules = self.parsed.get(&g.name_any()).and_then(|p| p.rules.clone());
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

    /// Plans, guard statuses, finalizers and releases for the decision
    /// under `extras` (whose `quarantined` says which quarantines hold).
    fn intent(&self, ctx: &Ctx, extras: &Extras, now: Timestamp) -> Intent {
        let quarantine = self.guard_quarantine(ctx, extras);
        let observed = Observed {
            guards: &self.guards,
            shapings: &self.shapings,
            nodes: &self.node_names,
            quarantine: &quarantine,
            now,
            cleanup_timeout: ctx.cleanup_timeout,
        };
        intend(&observed, self.decide(extras))
    }
}

/// An agent wrote this status: it observed a generation (1 or more). The
/// schema's default, `observedGeneration: 0`, is nobody's report.
fn agent_wrote(st: &egressguard_crds::NodeShapingStatus) -> bool {
    st.observed_generation.is_some_and(|g| g > 0)
}

/// Executes an [`Intent`] in its order; plan writes not started by
/// `stop_writing` are left to the next pass. A write to a guard this pass
/// already wrote is fenced on the version that write returned (its status
/// after its finalizer, its release after its status), not the one read.
async fn execute_intent(
    ctx: &Ctx,
    seen: &Snapshot,
    intent: Intent,
    errors: &mut Errors,
    stop_writing: Instant,
) -> Pass {
    let guards: Api<EgressGuard> = Api::all(ctx.client.clone());
    // The versions these writes return fence this pass's later writes of the
    // same guard (its status after its finalizer, its release after its status).
    let mut fresh_rv: BTreeMap<String, Option<String>> = BTreeMap::new();
    for f in &intent.add_finalizers {
        let r = write_finalizers(&guards, f).await;
        if let Ok(rv) = &r {
            fresh_rv.insert(f.guard.clone(), rv.clone());
        }
        errors.note(Stage::Finalizer, r);
    }
    let pass = write_plans(ctx, seen, intent.plans, errors, stop_writing).await;
    delete_plans(ctx, &intent.deletions, errors).await;
    write_guard_statuses(ctx, seen, intent.statuses, &mut fresh_rv, errors).await;
    for mut rel in intent.releases {
        if let Some(e) = &rel.gave_up {
            event(ctx, seen.refs.get(&rel.finalizers.guard), e).await;
        }
        if let Some(rv) = fresh_rv.get(&rel.finalizers.guard) {
            rel.finalizers.resource_version = rv.clone();
        }
        let r = write_finalizers(&guards, &rel.finalizers).await;
        if r.is_ok() {
            info!(guard = %rel.finalizers.guard, "cleanup done; finalizer removed");
        }
        errors.note(Stage::Finalizer, r);
    }
    pass
}

/// Plans are independent objects: several are written at once. One request
/// at a time made a 2,000-node resync take 14 s on the real API server (each
/// request's round trip, not the server's throughput, was the limit).
async fn write_plans(
    ctx: &Ctx,
    seen: &Snapshot,
    plans: Vec<PlanWrite>,
    errors: &mut Errors,
    stop_writing: Instant,
) -> Pass {
    let api: Api<NodeShaping> = Api::all(ctx.client.clone());
    let writes = plans.into_iter().map(|w| {
        let api = &api;
        async move {
            if Instant::now() >= stop_writing {
                return Ok(Pass::More);
            }
            let cached = seen.cached_rv.get(&w.node).cloned().flatten();
            let span = info_span!(
                "plan",
                node = %w.node,
                guard = w.spec.guard.as_ref().map_or("", |g| g.name.as_str())
            );
            write_plan(ctx, api, cached, w)
                .instrument(span)
                .await
                .map(|()| Pass::Done)
        }
    });
    let mut pass = Pass::Done;
    for r in parallel(writes).await {
        match r {
            Ok(Pass::More) => pass = Pass::More,
            r => {
                errors.note(Stage::Plan, r);
            }
        }
    }
    pass
}

/// Deletes the plans whose removal their agent confirmed (or whose node is
/// gone), each fenced on the version read.
async fn delete_plans(ctx: &Ctx, deletions: &[crate::intent::Deletion], errors: &mut Errors) {
    let api: Api<NodeShaping> = Api::all(ctx.client.clone());
    for d in deletions {
        let fenced = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: d.resource_version.clone(),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        let r = api.delete(&d.node, &fenced).await;
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
            Err(e) => {
                errors.note(Stage::PlanDeletion, Err::<(), _>(e));
            }
        }
    }
}

/// Guard statuses and their Events, several guards at once like the plans;
/// each write's new version goes to `fresh_rv` for the release after it.
async fn write_guard_statuses(
    ctx: &Ctx,
    seen: &Snapshot,
    statuses: Vec<crate::intent::StatusWrite>,
    fresh_rv: &mut BTreeMap<String, Option<String>>,
    errors: &mut Errors,
) {
    let guards: Api<EgressGuard> = Api::all(ctx.client.clone());
    let refs = &seen.refs;
    let writes = statuses.into_iter().map(|mut w| {
        let (guards, fresh_rv) = (&guards, &*fresh_rv);
        let span = info_span!("guard_status", guard = %w.guard);
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
        .instrument(span)
    });
    for r in parallel(writes).await {
        if let Ok((guard, rv)) = &r {
            fresh_rv.insert(guard.clone(), rv.clone());
        }
        errors.note(Stage::GuardStatus, r);
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
pub(crate) const HEARTBEAT_CHECK: Duration = Duration::from_millis(500);

pub(crate) fn any_active(ctx: &Ctx) -> bool {
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
