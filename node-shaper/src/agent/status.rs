//! The NodeShaping status the agent writes: pure, from a pass report.

use egressguard_crds::node_shaping::NodeShapingStatus;
use egressguard_crds::NodeShaping;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::PassReport;

use egressguard_crds::conditions::{types, Progress};
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
        let r = if outcome.invalid {
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
    let (tampered, treason, tmsg) = match &outcome.tampered {
        // The operator copies it into the Quarantine: at most 1 KiB.
        Some((kind, why)) => (
            true,
            kind.reason(),
            egressguard_crds::conditions::bounded(why, 1024),
        ),
        None => (
            false,
            reasons::NO_TAMPERING,
            "nothing foreign on the shaped interfaces".to_string(),
        ),
    };
    // For GitOps tools (kstatus, Argo CD): waiting for the guard's status
    // or a group is on the way; a refused plan or a kernel error needs a
    // person (the agent still retries, and Stalled clears when it succeeds).
    let progress = if outcome.waiting.is_some() {
        Progress::Reconciling
    } else if ready {
        Progress::Done
    } else {
        Progress::Stalled
    };
    let previous_conditions = previous.map_or(&[][..], |p| p.conditions.as_slice());
    let progress = progress.condition(reason, message.clone(), gen, previous_conditions, || {
        now.clone()
    });
    NodeShapingStatus {
        by_reference: true,
        digests_from_guard: true,
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
            condition(
                types::TAMPERED,
                tampered,
                treason,
                tmsg,
                gen,
                previous,
                &now,
            ),
        ]
        .into_iter()
        .chain(progress)
        .collect(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use egressguard_crds::node_shaping::{InterfaceStatus, NodeShapingSpec};

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
                    r.error = Some("invalid plan: spec.uplink.rate: missing".into());
                    r.invalid = true;
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
                report(|r| r.waiting = Some("EgressGuard idc generation 3 (holding 2)".into())),
                (
                    "False",
                    reasons::WAITING,
                    "EgressGuard idc generation 3 (holding 2)",
                ),
                ("False", reasons::AS_PLANNED, ""),
            ),
            (
                "dry run",
                report(|r| r.dry_run = Some("would shape eth0".into())),
                ("True", reasons::DRY_RUN, "would shape eth0"),
                ("False", reasons::AS_PLANNED, ""),
            ),
            (
                "removed",
                report(|r| r.removed = true),
                (
                    "True",
                    reasons::REMOVED,
                    "no shaping is planned for this node, and none is installed",
                ),
                ("False", reasons::AS_PLANNED, ""),
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
}
