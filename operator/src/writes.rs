//! The pass's writes at the level of one API call each (a plan, a
//! finalizer list, a group status, an Event), and how a pass keeps its
//! failures: every one, by stage.

use std::sync::Mutex;

use egressguard_crds::{CidrGroupStatus, EgressGuard, NodeShaping};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::ResourceExt;
use tracing::{info, warn};

use crate::context::{Ctx, OpMetrics};
use crate::decide::IgnoredAddress;
use crate::intent::{Finalizers, GuardEvent, PlanWrite};

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

/// Field manager for server-side apply.
pub const MANAGER: &str = "egressguard-operator";
/// Plan writes in flight at once (the API server's default max-in-flight is
/// 400 and APF gives a workload controller several seats; 16 is modest).
const PARALLEL_WRITES: usize = 16;

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
pub(crate) struct Errors(Vec<(Stage, kube::Error)>);

impl Errors {
    /// Keeps `r`'s error; true when it succeeded.
    pub(crate) fn note<T>(&mut self, stage: Stage, r: Result<T, kube::Error>) -> bool {
        match r {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, stage = stage.label(), "write failed; continuing with the other objects");
                self.0.push((stage, e));
                false
            }
        }
    }

    pub(crate) fn count(&self, metrics: &Mutex<OpMetrics>) {
        let mut m = metrics.lock().unwrap_or_else(|p| p.into_inner());
        for (stage, _) in &self.0 {
            *m.write_errors.entry(stage.label()).or_default() += 1;
        }
    }

    pub(crate) fn into_result(self, pass: Pass) -> Result<Pass, PassError> {
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
pub(crate) async fn report_ignored(ctx: &Ctx, (count, fresh): (usize, Vec<IgnoredAddress>)) {
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
pub(crate) async fn write_group_statuses(
    ctx: &Ctx,
    groups: Vec<(String, Option<String>, CidrGroupStatus)>,
) {
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

/// Publishes a guard's Event.
pub(crate) async fn event(ctx: &Ctx, guard: Option<&ObjectReference>, e: &GuardEvent) {
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

pub(crate) async fn parallel<F: std::future::Future>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    futures::stream::iter(futs)
        .buffer_unordered(PARALLEL_WRITES)
        .collect()
        .await
}

pub(crate) fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    }
}

/// Stores a guard's finalizer list; the resourceVersion makes it a
/// compare-and-swap (409 when another controller changed the list
/// meanwhile: the next pass recomputes, never dropping its finalizer).
pub(crate) async fn write_finalizers(
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
pub(crate) async fn write_plan(
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
