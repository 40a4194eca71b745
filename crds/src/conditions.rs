//! Condition types and reasons: the contract between the agent (which
//! writes NodeShaping conditions), the operator (which reads them and writes
//! the guard's) and the people, dashboards and `kubectl wait` that read both.
//! Reasons of the agent's conditions are in [`crate::node_shaping::reasons`].

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// A condition of `type_`, keeping the transition time of the same
/// condition in `previous` while its status stays the same (`now` otherwise).
pub fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: &[Condition],
    now: impl FnOnce() -> Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(now, |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// `message` cut to at most `max` bytes (on a character boundary, `...`
/// marking the cut): what one component writes is bounded before another
/// copies it into an object everyone watches.
pub fn bounded(message: &str, max: usize) -> String {
    if message.len() <= max {
        return message.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

/// Condition types.
pub mod types {
    /// The object is doing what it asks for.
    pub const READY: &str = "Ready";
    /// It runs, but not as planned (failed nodes, a fallback, an invalid edit).
    pub const DEGRADED: &str = "Degraded";
    /// A guard lost a node to an older guard.
    pub const CONFLICT: &str = "Conflict";
    /// Every Prometheus trigger of the guard returned a value for every node.
    pub const METRICS_AVAILABLE: &str = "MetricsAvailable";
    /// Every `whitelistGroups` reference resolves to valid CIDRGroups.
    pub const WHITELIST_RESOLVED: &str = "WhitelistResolved";
    /// Someone altered or bypassed a node's shaping (NodeShaping, from its agent).
    pub const TAMPERED: &str = "Tampered";
    /// The guard selects nodes by labels their own kubelets can set (a warning).
    pub const SELECTOR_NODE_WRITABLE: &str = "SelectorNodeWritable";
    /// A CRD the object needs is served (written only when one is not).
    pub const CRDS_INSTALLED: &str = "CRDsInstalled";
    /// Work toward the spec is under way (kstatus: InProgress). Written only
    /// while True, as kstatus and Flux expect of this "abnormal-true" type.
    pub const RECONCILING: &str = "Reconciling";
    /// The spec cannot be met until someone changes something: a retry will
    /// not help (kstatus: Failed; always with Ready=False). Written only
    /// while True.
    pub const STALLED: &str = "Stalled";

    /// Is `status` the troubling one for condition `type_`? `Degraded`,
    /// `Conflict`, `Tampered`, `SelectorNodeWritable` and `Stalled` are bad
    /// when True, `Reconciling` never, the others when False.
    pub fn is_bad(type_: &str, status: &str) -> bool {
        if type_ == RECONCILING {
            return false;
        }
        (status == "True")
            == matches!(
                type_,
                DEGRADED | CONFLICT | TAMPERED | SELECTOR_NODE_WRITABLE | STALLED
            )
    }
}

/// Where an object is on its way to what its spec asks, as GitOps tools
/// (kstatus: Flux, Helm's `--wait`; Argo CD's health checks) read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// In force: `Ready=True`, neither Reconciling nor Stalled.
    Done,
    /// On its way: `Reconciling=True` (kstatus InProgress).
    Reconciling,
    /// Stuck until someone acts: `Stalled=True` (kstatus Failed).
    Stalled,
}

impl Progress {
    /// The Reconciling or Stalled condition of this progress (none when
    /// Done: both are abnormal-true types, absent when not True).
    pub fn condition(
        self,
        reason: &str,
        message: String,
        generation: Option<i64>,
        previous: &[Condition],
        now: impl FnOnce() -> Time,
    ) -> Option<Condition> {
        let type_ = match self {
            Progress::Done => return None,
            Progress::Reconciling => types::RECONCILING,
            Progress::Stalled => types::STALLED,
        };
        Some(condition(
            type_, true, reason, message, generation, previous, now,
        ))
    }
}

/// Reasons of an EgressGuard's conditions.
pub mod guard {
    /// Ready: every selected node enforces the guard.
    pub const ENFORCED: &str = "Enforced";
    /// Ready: DryRun, nothing is programmed.
    pub const DRY_RUN: &str = "DryRun";
    /// Ready: Auto, nodes are watched (and some may be quarantined).
    pub const WATCHING: &str = "Watching";
    /// Ready=False: some agents have not confirmed the plan yet.
    pub const PROGRESSING: &str = "Progressing";
    /// Ready=False, Degraded: some agents report an error.
    pub const NODES_FAILED: &str = "NodesFailed";
    /// Ready=False, Degraded: the spec fails validation; plans are kept.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// Ready=False, Degraded: a `whitelistGroups` reference does not resolve.
    pub const WHITELIST_UNRESOLVED: &str = "WhitelistUnresolved";
    /// Ready=False: the guard is being deleted.
    pub const DELETING: &str = "Deleting";
    /// Degraded=False.
    pub const AS_PLANNED: &str = "AsPlanned";
    /// Conflict=False.
    pub const NO_CONFLICT: &str = "NoConflict";
    /// Conflict=True.
    pub const NODE_CLAIMED: &str = "NodeClaimedByOlderGuard";
    /// MetricsAvailable=True.
    pub const EVALUATED: &str = "Evaluated";
    /// MetricsAvailable=False.
    pub const UNKNOWN: &str = "Unknown";
    /// WhitelistResolved=True.
    pub const RESOLVED: &str = "Resolved";
    /// WhitelistResolved=False.
    pub const GROUP_UNRESOLVED: &str = "GroupUnresolved";
    /// SelectorNodeWritable=True.
    pub const KUBELET_SETTABLE: &str = "KubeletSettableLabels";
    /// SelectorNodeWritable=False.
    pub const RESTRICTED_LABELS: &str = "RestrictedLabels";
    /// Ready=False, Stalled, CRDsInstalled=False: a kind the guard needs
    /// (CIDRGroup, Quarantine) is not installed.
    pub const CRD_MISSING: &str = "CRDMissing";
}

/// Reasons of a CIDRGroup's conditions.
pub mod group {
    /// Ready: every entry parses.
    pub const VALID: &str = "Valid";
    /// Ready=False, Stalled: some entries do not (the message names them).
    pub const INVALID_ENTRIES: &str = "InvalidEntries";
}

/// Reasons of a Quarantine's Ready, Reconciling and Stalled conditions
/// (Refused records use the rail's name, [`crate::quarantine::Refusal`]).
pub mod quarantine {
    /// Reconciling: stored, not admitted yet.
    pub const PENDING: &str = "Pending";
    /// Reconciling: Active, the node's agent has not confirmed the plan yet.
    pub const ENFORCING: &str = "Enforcing";
    /// Ready: Active and enforced on the node.
    pub const ENFORCED: &str = "Enforced";
    /// Ready: over; the record is kept.
    pub const RELEASED: &str = "Released";
}

/// Event reasons the operator emits, for alerts and `kubectl get events
/// --field-selector reason=...`.
pub mod events {
    /// A deleted guard stopped waiting for its nodes; shaping may remain.
    pub const CLEANUP_TIMED_OUT: &str = "CleanupTimedOut";
    /// A node InternalIP is not protected on other nodes.
    pub const NODE_ADDRESS_NOT_PROTECTED: &str = "NodeAddressNotProtected";
    /// A node was quarantined.
    pub const QUARANTINED: &str = "Quarantined";
    /// A quarantine ended.
    pub const RELEASED: &str = "Released";
    /// A DryRun guard would have quarantined a node.
    pub const WOULD_QUARANTINE: &str = "WouldQuarantine";
    /// A quarantine was asked for and refused (the note says which rule).
    pub const QUARANTINE_REFUSED: &str = "QuarantineRefused";
    /// An Active quarantine stopped being enforced on its node (Warning).
    pub const QUARANTINE_NOT_ENFORCED: &str = "QuarantineNotEnforced";
    /// A node was cordoned or tainted because its quarantine is not enforced (Warning).
    pub const QUARANTINE_ESCALATED: &str = "QuarantineEscalated";
    /// node-shaper found its shaping tampered with (Warning, on the Node).
    pub const TAMPERED: &str = "Tampered";
    /// A node carries the exclusion label of earlier releases, which no longer
    /// exempts it (its own kubelet can set it).
    pub const LEGACY_EXCLUDE_LABEL: &str = "LegacyExcludeLabelIgnored";
}

#[cfg(test)]
mod tests {
    use super::types::*;

    #[test]
    fn the_troubling_status_depends_on_the_condition() {
        assert!(is_bad(READY, "False") && !is_bad(READY, "True"));
        assert!(is_bad(WHITELIST_RESOLVED, "False") && is_bad(METRICS_AVAILABLE, "False"));
        assert!(is_bad(DEGRADED, "True") && !is_bad(DEGRADED, "False"));
        assert!(is_bad(CONFLICT, "True") && !is_bad(CONFLICT, "False"));
        assert!(is_bad(STALLED, "True") && !is_bad(RECONCILING, "True"));
    }
}

#[cfg(test)]
mod bounded_tests {
    #[test]
    fn bounded_cuts_on_a_character_boundary() {
        assert_eq!(super::bounded("short", 10), "short");
        let cut = super::bounded(&"é".repeat(600), 512);
        assert!(cut.len() <= 512 && cut.ends_with("..."), "{}", cut.len());
    }
}
