//! The NodeShaping status the agent writes: pure, from a pass report.

use egressguard_crds::conditions::{types, Progress};
use egressguard_crds::node_shaping::{InterfaceStatus, NodeShapingStatus};
use egressguard_crds::NodeShaping;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use std::time::{Duration, Instant};

use super::reconcile::Outcome;
use super::PassReport;

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
    let ready = ready(outcome);
    let degraded = degraded(outcome, &ready);
    let tampered = tampered(outcome);
    let previous_conditions = previous.map_or(&[][..], |p| p.conditions.as_slice());
    let progress = progress(&outcome.outcome, ready.ok).condition(
        ready.reason,
        ready.message.clone(),
        gen,
        previous_conditions,
        || now.clone(),
    );
    let conditions = [
        (types::READY, ready),
        (types::DEGRADED, degraded),
        (types::TAMPERED, tampered),
    ]
    .into_iter()
    .map(|(type_, r)| condition(type_, r.ok, r.reason, r.message, gen, previous, &now))
    .chain(progress)
    .collect();
    NodeShapingStatus {
        by_reference: true,
        digests_from_guard: true,
        observed_generation: gen,
        interfaces: outcome.interfaces.clone(),
        conditions,
        last_apply_time: Some(now),
    }
}

/// One condition's value: True or False, the reason, and why in words.
struct Reading {
    ok: bool,
    reason: &'static str,
    message: String,
}

impl Reading {
    fn new(ok: bool, reason: &'static str, message: impl Into<String>) -> Reading {
        Reading {
            ok,
            reason,
            message: message.into(),
        }
    }
}

/// `name: what` for each interface whose result is `field`'s `Some`.
fn per_interface(
    outcome: &PassReport,
    field: impl Fn(&InterfaceStatus) -> Option<&String>,
) -> Vec<String> {
    outcome
        .interfaces
        .iter()
        .filter_map(|i| field(i).map(|v| format!("{}: {v}", i.name)))
        .collect()
}

/// Ready: what the pass came to, unless an interface failed.
fn ready(outcome: &PassReport) -> Reading {
    let failed = per_interface(outcome, |i| i.error.as_ref());
    match &outcome.outcome {
        Outcome::Waiting(why) => Reading::new(false, reasons::WAITING, why),
        Outcome::Invalid(e) => Reading::new(false, reasons::INVALID_PLAN, e),
        Outcome::Failed(e) => Reading::new(false, reasons::APPLY_FAILED, e),
        Outcome::Enforced | Outcome::Removed | Outcome::DryRun(_) if !failed.is_empty() => {
            Reading::new(false, reasons::APPLY_FAILED, failed.join("; "))
        }
        Outcome::DryRun(what) => Reading::new(true, reasons::DRY_RUN, what),
        Outcome::Removed => Reading::new(
            true,
            reasons::REMOVED,
            "no shaping is planned for this node, and none is installed",
        ),
        Outcome::Enforced => {
            let names: Vec<&str> = outcome.interfaces.iter().map(|i| i.name.as_str()).collect();
            Reading::new(
                true,
                reasons::ENFORCED,
                format!("enforced on {}", names.join(", ")),
            )
        }
    }
}

/// Degraded: a failure says what Ready says; otherwise a rebuilt tree or
/// the pfifo fallback. Waiting is not degraded: the kernel runs what it ran.
fn degraded(outcome: &PassReport, ready: &Reading) -> Reading {
    let as_planned = || Reading::new(false, reasons::AS_PLANNED, "");
    match &outcome.outcome {
        Outcome::Waiting(_) => as_planned(),
        Outcome::Invalid(_) | Outcome::Failed(_) => {
            Reading::new(true, ready.reason, ready.message.clone())
        }
        Outcome::Enforced | Outcome::Removed | Outcome::DryRun(_) if !ready.ok => {
            Reading::new(true, ready.reason, ready.message.clone())
        }
        Outcome::Enforced | Outcome::Removed | Outcome::DryRun(_) => {
            let rebuilt = per_interface(outcome, |i| i.rebuilt.as_ref());
            let fallbacks = per_interface(outcome, |i| i.fallback.as_ref());
            if !rebuilt.is_empty() {
                Reading::new(true, reasons::REBUILT, rebuilt.join("; "))
            } else if !fallbacks.is_empty() {
                Reading::new(true, reasons::FALLBACK, fallbacks.join("; "))
            } else {
                as_planned()
            }
        }
    }
}

/// Tampered: the worst evidence still in force, bounded (the operator
/// copies it into the Quarantine: at most 1 KiB).
fn tampered(outcome: &PassReport) -> Reading {
    match &outcome.tampered {
        Some((kind, why)) => Reading::new(
            true,
            kind.reason(),
            egressguard_crds::conditions::bounded(why, 1024),
        ),
        None => Reading::new(
            false,
            reasons::NO_TAMPERING,
            "nothing foreign on the shaped interfaces",
        ),
    }
}

/// For GitOps tools (kstatus, Argo CD): waiting for the guard's status or
/// a group is on the way; a refused plan or a kernel error needs a person
/// (the agent still retries, and Stalled clears when it succeeds).
fn progress(outcome: &Outcome, ready: bool) -> Progress {
    match outcome {
        Outcome::Waiting(_) => Progress::Reconciling,
        Outcome::Enforced
        | Outcome::Removed
        | Outcome::DryRun(_)
        | Outcome::Invalid(_)
        | Outcome::Failed(_) => {
            if ready {
                Progress::Done
            } else {
                Progress::Stalled
            }
        }
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

/// A status that differs from the last one written only in counters and
/// timestamps is written at most this often.
pub const REFRESH: Duration = Duration::from_secs(300);

/// Whether `status`, after a pass that `wrote` to the kernel or not, is
/// worth a write, given the `last` one written and when: counters and
/// timestamps change every pass, so a status that differs only in them
/// waits for [`REFRESH`]; anything else is written at once.
pub fn due(
    last: Option<(&NodeShapingStatus, Instant)>,
    status: &NodeShapingStatus,
    wrote: bool,
) -> bool {
    match last {
        None => true,
        Some((last, at)) => at.elapsed() > REFRESH || wrote || essence(last) != essence(status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egressguard_crds::node_shaping::NodeShapingSpec;

    fn plan() -> NodeShaping {
        let mut ns = NodeShaping::new(
            "n1",
            NodeShapingSpec {
                node_name: "n1".into(),
                guard: None,
                shaping: None,
                groups: vec![],
                protected: vec![],
                enforce: true,
            },
        );
        ns.metadata.generation = Some(4);
        ns
    }

    fn iface(
        name: &str,
        error: Option<&str>,
        fallback: Option<&str>,
        rebuilt: Option<&str>,
    ) -> InterfaceStatus {
        InterfaceStatus {
            name: name.into(),
            enforced: error.is_none(),
            error: error.map(String::from),
            fallback: fallback.map(String::from),
            rebuilt: rebuilt.map(String::from),
            ..InterfaceStatus::default()
        }
    }

    fn report(f: impl FnOnce(&mut PassReport)) -> PassReport {
        let mut r = PassReport {
            at: "2026-11-23T20:00:00Z".into(),
            ..PassReport::default()
        };
        f(&mut r);
        r
    }

    /// (status, reason, message) of a condition.
    fn cond(s: &NodeShapingStatus, type_: &str) -> (String, String, String) {
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition");
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    #[test]
    fn ready_and_degraded_say_what_the_pass_did() {
        type Case = (
            &'static str,
            PassReport,
            (&'static str, &'static str, &'static str),
            (&'static str, &'static str, &'static str),
        );
        let cases: Vec<Case> = vec![
            (
                "enforced",
                report(|r| {
                    r.interfaces = vec![
                        iface("eth0", None, None, None),
                        iface("wg0", None, None, None),
                    ]
                }),
                ("True", reasons::ENFORCED, "enforced on eth0, wg0"),
                ("False", reasons::AS_PLANNED, ""),
            ),
            (
                "sfq missing: still Ready, visibly Degraded",
                report(|r| {
                    r.interfaces = vec![iface(
                        "eth0",
                        None,
                        Some("sfq unavailable; using pfifo leaves"),
                        None,
                    )]
                }),
                ("True", reasons::ENFORCED, "enforced on eth0"),
                (
                    "True",
                    reasons::FALLBACK,
                    "eth0: sfq unavailable; using pfifo leaves",
                ),
            ),
            (
                "rebuilt after a refused change",
                report(|r| r.interfaces = vec![iface("eth0", None, None, Some("prio 10 rebuilt"))]),
                ("True", reasons::ENFORCED, "enforced on eth0"),
                ("True", reasons::REBUILT, "eth0: prio 10 rebuilt"),
            ),
            (
                "one interface failed",
                report(|r| {
                    r.interfaces = vec![
                        iface("eth0", None, None, None),
                        iface("wg0", Some("File exists"), None, None),
                    ]
                }),
                ("False", reasons::APPLY_FAILED, "wg0: File exists"),
                ("True", reasons::APPLY_FAILED, "wg0: File exists"),
            ),
            (
                "invalid plan",
                report(|r| {
                    r.outcome = Outcome::Invalid("invalid plan: spec.uplink.rate: missing".into())
                }),
                (
                    "False",
                    reasons::INVALID_PLAN,
                    "invalid plan: spec.uplink.rate: missing",
                ),
                (
                    "True",
                    reasons::INVALID_PLAN,
                    "invalid plan: spec.uplink.rate: missing",
                ),
            ),
            (
                "waiting for the guard's generation: not degraded, kernel untouched",
                report(|r| {
                    r.outcome = Outcome::Waiting("EgressGuard idc generation 3 (holding 2)".into())
                }),
                (
                    "False",
                    reasons::WAITING,
                    "EgressGuard idc generation 3 (holding 2)",
                ),
                ("False", reasons::AS_PLANNED, ""),
            ),
            (
                "dry run",
                report(|r| r.outcome = Outcome::DryRun("would shape eth0".into())),
                ("True", reasons::DRY_RUN, "would shape eth0"),
                ("False", reasons::AS_PLANNED, ""),
            ),
            (
                "removed",
                report(|r| r.outcome = Outcome::Removed),
                (
                    "True",
                    reasons::REMOVED,
                    "no shaping is planned for this node, and none is installed",
                ),
                ("False", reasons::AS_PLANNED, ""),
            ),
            (
                "the node could not use the plan: the node's fault, not the plan's",
                report(|r| r.outcome = Outcome::Failed("cannot open rtnetlink: EPERM".into())),
                (
                    "False",
                    reasons::APPLY_FAILED,
                    "cannot open rtnetlink: EPERM",
                ),
                (
                    "True",
                    reasons::APPLY_FAILED,
                    "cannot open rtnetlink: EPERM",
                ),
            ),
            (
                "dry run whose removal failed on an interface",
                report(|r| {
                    r.outcome = Outcome::DryRun("would shape eth0".into());
                    r.interfaces = vec![iface("eth0", Some("Device or resource busy"), None, None)];
                }),
                (
                    "False",
                    reasons::APPLY_FAILED,
                    "eth0: Device or resource busy",
                ),
                (
                    "True",
                    reasons::APPLY_FAILED,
                    "eth0: Device or resource busy",
                ),
            ),
        ];
        for (case, r, ready, degraded) in cases {
            let s = status_for(&plan(), &r, None);
            let own = |t: (&str, &str, &str)| (t.0.to_string(), t.1.to_string(), t.2.to_string());
            assert_eq!(cond(&s, types::READY), own(ready), "{case}: Ready");
            assert_eq!(cond(&s, types::DEGRADED), own(degraded), "{case}: Degraded");
            assert_eq!(s.observed_generation, Some(4), "{case}");
            assert!(s.by_reference, "{case}: the operator relies on this flag");
            // kstatus: Reconciling while waiting, Stalled when not Ready
            // otherwise, neither when Ready.
            let progress: Vec<&str> = s
                .conditions
                .iter()
                .filter(|c| c.type_ == types::RECONCILING || c.type_ == types::STALLED)
                .map(|c| c.type_.as_str())
                .collect();
            let want: &[&str] = match ready.0 {
                "True" => &[],
                _ if ready.1 == reasons::WAITING => &[types::RECONCILING],
                _ => &[types::STALLED],
            };
            assert_eq!(progress, want, "{case}: kstatus conditions");
        }
    }

    #[test]
    fn transition_times_move_only_when_the_status_flips() {
        let ok = report(|r| r.interfaces = vec![iface("eth0", None, None, None)]);
        let first = status_for(&plan(), &ok, None);
        let later = PassReport {
            at: "2026-11-23T21:00:00Z".into(),
            ..ok.clone()
        };
        let again = status_for(&plan(), &later, Some(&first));
        let ready = |s: &NodeShapingStatus| s.conditions[0].last_transition_time.clone();
        assert_eq!(ready(&again), ready(&first));
        assert_eq!(essence(&again), essence(&first), "nothing to write");
        let failed = PassReport {
            interfaces: vec![iface("eth0", Some("No such device"), None, None)],
            ..later
        };
        let broken = status_for(&plan(), &failed, Some(&again));
        assert_ne!(ready(&broken), ready(&first));
        assert_ne!(essence(&broken), essence(&again));
    }

    /// A status is written at once when it changed or the kernel was
    /// written; one that differs only in counters and times waits.
    #[test]
    fn status_writes_wait_only_for_counters_and_times() {
        let at = |t: &str| report(|r| r.at = t.into());
        let first = status_for(&plan(), &at("2026-11-23T20:00:00Z"), None);
        assert!(due(None, &first, false), "never written");
        let last = Some((&first, Instant::now()));
        let later = status_for(&plan(), &at("2026-11-23T20:00:30Z"), Some(&first));
        assert!(!due(last, &later, false), "only the time moved");
        assert!(due(last, &later, true), "the kernel was written");
        let waiting = report(|r| r.outcome = Outcome::Waiting("reading EgressGuard idc".into()));
        let changed = status_for(&plan(), &waiting, Some(&first));
        assert!(due(last, &changed, false), "Ready changed");
        let long_ago = Instant::now().checked_sub(REFRESH + Duration::from_secs(1));
        if let Some(t) = long_ago {
            assert!(due(Some((&first, t)), &later, false), "refreshed");
        }
    }
}
