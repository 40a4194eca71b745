//! The NodeShaping status the agent writes: pure, from a reconcile outcome.

use egressguard_crds::node_shaping::NodeShapingStatus;
use egressguard_crds::NodeShaping;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::PassReport;

use egressguard_crds::conditions::types;
pub use egressguard_crds::node_shaping::reasons;

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    gen: Option<i64>,
    previous: Option<&NodeShapingStatus>,
    now: &Time,
) -> Condition {
    let previous = previous.map_or(&[][..], |p| p.conditions.as_slice());
    egressguard_crds::conditions::condition(type_, ok, reason, message, gen, previous, || {
        now.clone()
    })
}

/// The status for `obj` after `outcome`; `previous` keeps transition times stable.
pub fn status_for(
    obj: &NodeShaping,
    outcome: &PassReport,
    previous: Option<&NodeShapingStatus>,
) -> NodeShapingStatus {
    let gen = obj.metadata.generation;
    let now = Time(outcome.at.parse().unwrap_or_default());
    let failed: Vec<String> = outcome
        .interfaces
        .iter()
        .filter_map(|i| i.error.as_ref().map(|e| format!("{}: {e}", i.name)))
        .chain(outcome.error.clone())
        .collect();
    let (ready, reason, message) = if let Some(w) = &outcome.waiting {
        (false, reasons::WAITING, w.clone())
    } else if let Some(e) = &outcome.error {
        let r = if e.starts_with("invalid plan") {
            reasons::INVALID_PLAN
        } else {
            reasons::APPLY_FAILED
        };
        (false, r, e.clone())
    } else if !failed.is_empty() {
        (false, reasons::APPLY_FAILED, failed.join("; "))
    } else if let Some(d) = &outcome.dry_run {
        (true, reasons::DRY_RUN, d.clone())
    } else if outcome.removed {
        (
            true,
            reasons::REMOVED,
            "no shaping is planned for this node, and none is installed".into(),
        )
    } else {
        let names: Vec<&str> = outcome.interfaces.iter().map(|i| i.name.as_str()).collect();
        (
            true,
            reasons::ENFORCED,
            format!("enforced on {}", names.join(", ")),
        )
    };
    let fallbacks: Vec<String> = outcome
        .interfaces
        .iter()
        .filter_map(|i| i.fallback.as_ref().map(|f| format!("{}: {f}", i.name)))
        .collect();
    let rebuilt: Vec<String> = outcome
        .interfaces
        .iter()
        .filter_map(|i| i.rebuilt.as_ref().map(|r| format!("{}: {r}", i.name)))
        .collect();
    let (degraded, dreason, dmsg) = if outcome.waiting.is_some() {
        (false, reasons::AS_PLANNED, String::new())
    } else if !failed.is_empty() || outcome.error.is_some() {
        (true, reason, message.clone())
    } else if !rebuilt.is_empty() {
        (true, reasons::REBUILT, rebuilt.join("; "))
    } else if !fallbacks.is_empty() {
        (true, reasons::FALLBACK, fallbacks.join("; "))
    } else {
        (false, reasons::AS_PLANNED, String::new())
    };
    NodeShapingStatus {
        by_reference: true,
        observed_generation: gen,
        interfaces: outcome.interfaces.clone(),
        conditions: vec![
            condition(types::READY, ready, reason, message, gen, previous, &now),
            condition(
                types::DEGRADED,
                degraded,
                dreason,
                dmsg,
                gen,
                previous,
                &now,
            ),
        ],
        last_apply_time: Some(now),
    }
}

/// The status without what changes on every pass (counters, times), to decide
/// whether a write is needed.
pub fn essence(s: &NodeShapingStatus) -> NodeShapingStatus {
    let mut e = s.clone();
    e.last_apply_time = None;
    for i in &mut e.interfaces {
        i.counters.clear();
    }
    for c in &mut e.conditions {
        c.last_transition_time = Time(Default::default());
    }
    e
}
