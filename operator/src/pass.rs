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
use std::sync::Mutex;
use std::time::Instant;

use egressguard_crds::{CidrGroupStatus, EgressGuard, NodeShaping};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, Preconditions};
use kube::ResourceExt;
use tracing::{field, info, info_span, Instrument};

use crate::context::Ctx;
use crate::decide::{Extras, IgnoredAddress};
use crate::evaluate::{Answer, NodeIndex};
use crate::intent::{Intent, PlanWrite};
use crate::quarantine::{Notice, QuarantinePlan};
use crate::snapshot::Snapshot;
use crate::writes::{
    event, merge_params, parallel, report_ignored, write_finalizers, write_group_statuses,
    write_plan, Errors, Stage,
};
pub use crate::writes::{Pass, PassError};

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
    let quarantines = if seen.missing_kinds.contains(&crate::kinds::QUARANTINES) {
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

/// The quarantine counters and gauge, once the records are written.
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
