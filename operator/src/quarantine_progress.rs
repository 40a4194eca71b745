//! A Quarantine record's Ready, Reconciling and Stalled conditions (and its
//! `observedGeneration`), from its phase and `Enforced` verdict: what GitOps
//! tools read. A quarantine in force and a release are the states the
//! record asks for (Ready); a stored record not admitted yet, or an Active
//! one its node has not confirmed, is on its way (Reconciling); a refusal,
//! and an Active one whose node stopped enforcing it, need a person
//! (Stalled). Pure; the pass writes what changed.

use egressguard_crds::conditions::{condition, quarantine as reasons, types, Progress};
use egressguard_crds::{Phase, QuarantineStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::enforcement::{self, ENFORCED_CONDITION};

/// Reason of a refusal's Stalled condition when the record predates it.
const REFUSED: &str = "Refused";

/// Marks `st` refused by `rail`: the rail is the Stalled reason
/// [`with_progress`] keeps.
pub fn refused(st: &mut QuarantineStatus, rail: &str, why: &str, now: Timestamp) {
    let previous = std::mem::take(&mut st.conditions);
    st.conditions = previous
        .iter()
        .filter(|c| c.type_ != types::STALLED)
        .cloned()
        .collect();
    st.conditions.push(condition(
        types::STALLED,
        true,
        rail,
        why.to_string(),
        st.observed_generation,
        &previous,
        || Time(now),
    ));
}

/// Sets `st`'s observedGeneration, Ready and Reconciling/Stalled.
pub fn with_progress(st: &mut QuarantineStatus, generation: Option<i64>, now: Timestamp) {
    st.observed_generation = generation;
    let find = |type_: &str| st.conditions.iter().find(|c| c.type_ == type_).cloned();
    let enforced = find(ENFORCED_CONDITION);
    let released_by = st.released_by.clone().unwrap_or_default();
    let (ready, progress, reason, message) = match st.phase {
        None | Some(Phase::Pending) => (
            false,
            Progress::Reconciling,
            reasons::PENDING.to_string(),
            "stored; the operator's leader admits or refuses it".to_string(),
        ),
        Some(Phase::Active) => match enforced {
            Some(c) if c.status == "True" => {
                (true, Progress::Done, reasons::ENFORCED.into(), c.message)
            }
            // The agent has not confirmed the plan yet, or retries an error.
            Some(c) if c.reason == enforcement::reasons::NOT_ENFORCED => (
                false,
                Progress::Reconciling,
                reasons::ENFORCING.into(),
                c.message,
            ),
            // Tampered, heartbeat missing, another guard's plan on the node.
            Some(c) => (false, Progress::Stalled, c.reason, c.message),
            None => (
                false,
                Progress::Reconciling,
                reasons::ENFORCING.into(),
                "waiting for the node's agent".into(),
            ),
        },
        Some(Phase::Released) => (true, Progress::Done, reasons::RELEASED.into(), released_by),
        Some(Phase::Refused) => {
            let rail = find(types::STALLED).map_or(REFUSED.to_string(), |c| c.reason);
            (false, Progress::Stalled, rail, released_by)
        }
    };
    let previous = std::mem::take(&mut st.conditions);
    st.conditions = previous
        .iter()
        .filter(|c| ![types::READY, types::RECONCILING, types::STALLED].contains(&c.type_.as_str()))
        .cloned()
        .collect();
    let at = || Time(now);
    st.conditions.push(condition(
        types::READY,
        ready,
        &reason,
        message.clone(),
        generation,
        &previous,
        at,
    ));
    st.conditions
        .extend(progress.condition(&reason, message, generation, &previous, at));
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn now() -> Timestamp {
        Timestamp::from_second(2_000_000).expect("time")
    }

    fn enforced(status: &str, reason: &str) -> Condition {
        Condition {
            type_: ENFORCED_CONDITION.into(),
            status: status.into(),
            reason: reason.into(),
            message: format!("{status} {reason}"),
            observed_generation: Some(1),
            last_transition_time: Time(now()),
        }
    }

    fn settled(phase: Option<Phase>, e: Option<Condition>) -> QuarantineStatus {
        let mut st = QuarantineStatus {
            phase,
            released_by: Some("policy".into()),
            conditions: e.into_iter().collect(),
            ..Default::default()
        };
        with_progress(&mut st, Some(1), now());
        st
    }

    /// (Ready, its reason, the kstatus condition set True, if any).
    fn read(st: &QuarantineStatus) -> (String, String, Option<String>) {
        let ready = st
            .conditions
            .iter()
            .find(|c| c.type_ == types::READY)
            .expect("Ready");
        let progress = st
            .conditions
            .iter()
            .find(|c| c.type_ == types::RECONCILING || c.type_ == types::STALLED)
            .map(|c| c.type_.clone());
        (ready.status.clone(), ready.reason.clone(), progress)
    }

    #[test]
    fn a_quarantine_in_force_is_ready_and_one_its_node_does_not_enforce_is_stalled() {
        use enforcement::reasons as e;
        let cases = [
            (None, None, ("False", "Pending", Some("Reconciling"))),
            (
                Some(Phase::Pending),
                None,
                ("False", "Pending", Some("Reconciling")),
            ),
            (
                Some(Phase::Active),
                None,
                ("False", "Enforcing", Some("Reconciling")),
            ),
            (
                Some(Phase::Active),
                Some(enforced("False", e::NOT_ENFORCED)),
                ("False", "Enforcing", Some("Reconciling")),
            ),
            (
                Some(Phase::Active),
                Some(enforced("True", e::ENFORCED)),
                ("True", "Enforced", None),
            ),
            (
                Some(Phase::Active),
                Some(enforced("Unknown", e::HEARTBEAT_MISSING)),
                ("False", e::HEARTBEAT_MISSING, Some("Stalled")),
            ),
            (
                Some(Phase::Active),
                Some(enforced("False", e::TAMPERED)),
                ("False", e::TAMPERED, Some("Stalled")),
            ),
            (Some(Phase::Released), None, ("True", "Released", None)),
            (
                Some(Phase::Refused),
                None,
                ("False", "Refused", Some("Stalled")),
            ),
        ];
        for (phase, e, (ready, reason, progress)) in cases {
            let st = settled(phase, e.clone());
            assert_eq!(
                read(&st),
                (
                    ready.to_string(),
                    reason.to_string(),
                    progress.map(String::from)
                ),
                "{phase:?} {e:?}"
            );
            assert_eq!(st.observed_generation, Some(1));
        }
    }

    #[test]
    fn a_refusal_keeps_its_rail_as_the_reason_and_settling_twice_changes_nothing() {
        let mut st = QuarantineStatus {
            phase: Some(Phase::Refused),
            released_by: Some("refused (Paused): paused".into()),
            ..Default::default()
        };
        refused(&mut st, "Paused", "spec.quarantine.paused", now());
        with_progress(&mut st, Some(1), now());
        assert_eq!(
            read(&st),
            ("False".into(), "Paused".into(), Some("Stalled".into()))
        );
        let once = st.clone();
        with_progress(&mut st, Some(1), now());
        assert_eq!(st, once);
        // Admitted later: the rail's condition goes.
        st.phase = Some(Phase::Active);
        st.conditions
            .push(enforced("True", enforcement::reasons::ENFORCED));
        with_progress(&mut st, Some(1), now());
        assert_eq!(read(&st), ("True".into(), "Enforced".into(), None));
        assert!(!st.conditions.iter().any(|c| c.type_ == types::STALLED));
    }
}
