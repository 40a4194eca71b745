//! Automatic quarantine: the `Quarantine` kind (`egressguard.io/v1alpha1`,
//! cluster-scoped, `egq`), one object per quarantine of one node, kept after
//! release as the audit trail, and the names the operator and people share
//! about it. The guard's policy (`spec.quarantine`) is in
//! [`crate::quarantine_policy`], re-exported here.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// Kept at their paths of before the policy had a module of its own.
pub use crate::duration::{parse_duration, DurationError};
pub use crate::quarantine_policy::{
    rules, AlertmanagerTrigger, Cap, Escalation, EscalationAction, Limits, Origin,
    PrometheusTrigger, QuarantinePolicy, QuarantineRules, QuarantineThrottle, ReleaseAfter,
    ReleasePolicy, Trigger, TriggerRule, MANUAL,
};

/// Node label that keeps a node out of automatic quarantine. Its prefix is
/// one the NodeRestriction admission plugin refuses to a kubelet: a node must
/// not be able to exempt itself before it floods.
pub const EXCLUDE_LABEL: &str = "node-restriction.kubernetes.io/egressguard-exclude";
/// The exclusion label of earlier releases, which a node's own credential can
/// set: no longer honoured, reported when seen.
pub const LEGACY_EXCLUDE_LABEL: &str = "egressguard.io/exclude";
/// Label naming a Quarantine's alert episode (1, 2, ...) per (guard, node, trigger).
pub const EPISODE_LABEL: &str = "egressguard.io/episode";
/// Annotation a person sets on a Quarantine to release it (the value says why).
pub const RELEASE_ANNOTATION: &str = "egressguard.io/release";
/// Finalizer that lets the operator release a quarantine before it is deleted.
pub const RELEASE_FINALIZER: &str = "egressguard.io/release";

/// Why a quarantine was refused: the first safety rail it hit. Written into
/// the record's `status.releasedBy` and the Event's note.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The guard named does not exist.
    GuardNotFound,
    /// The guard is being deleted.
    GuardDeleting,
    /// The guard has no valid quarantine policy, or is in mode Enforce.
    GuardNotAuto,
    /// The guard is a dry run: the quarantine is only announced.
    DryRun,
    /// The node does not carry the guard's plan.
    NodeNotSelected,
    /// The node is quarantined by this guard already.
    AlreadyQuarantined,
    /// The guard has no such trigger.
    UnknownTrigger,
    /// `spec.quarantine.paused`.
    Paused,
    /// The node is labelled [`EXCLUDE_LABEL`].
    NodeExcluded,
    /// The node was released less than the cooldown ago.
    Cooldown,
    /// The guard's cap of quarantined nodes is reached.
    CapReached,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// One node's quarantine by one guard, and its record after release.
///
/// A person quarantines a node by creating one with `trigger: manual`, and
/// releases it with `kubectl delete egq NAME` or
/// `kubectl annotate egq NAME egressguard.io/release="why"`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "egressguard.io",
    version = "v1alpha1",
    kind = "Quarantine",
    plural = "quarantines",
    shortname = "egq",
    derive = "PartialEq",
    status = "QuarantineStatus",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Guard","type":"string","jsonPath":".spec.guard"}"#,
    printcolumn = r#"{"name":"Trigger","type":"string","jsonPath":".spec.trigger"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "a Quarantine's spec is immutable (it is the record of what happened); release it and create a new one"}]))]
pub struct QuarantineSpec {
    /// The quarantined node.
    #[schemars(length(min = 1))]
    pub node_name: String,
    /// The guard whose throttle applies (it must be in mode `Auto`).
    #[schemars(length(min = 1))]
    pub guard: String,
    /// The trigger that fired, or `manual`.
    #[schemars(length(min = 1))]
    pub trigger: String,
    /// What the trigger saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
    /// The release policy, copied from the guard when the quarantine began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleasePolicy>,
    /// Why, in a person's words (manual quarantines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl QuarantineSpec {
    /// Who started this quarantine: a person or the trigger `spec.trigger`.
    pub fn origin(&self) -> Origin<'_> {
        Origin::of(&self.trigger)
    }

    /// Did a person ask for it (`trigger: manual`)?
    pub fn is_manual(&self) -> bool {
        self.origin().is_manual()
    }
}

/// What a trigger saw when it fired.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Evidence {
    /// The PromQL query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The value that breached, as Prometheus returned it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// When the breach began (first breaching sample of the streak).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breach_since: Option<Time>,
    /// The sample that confirmed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_time: Option<Time>,
    /// Alertmanager's fingerprint of the alert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The alert's labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The alert's `startsAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starts_at: Option<String>,
}

/// Where a quarantine is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Stored, not yet admitted by the operator's leader.
    Pending,
    /// The node's abnormal traffic is throttled.
    Active,
    /// Over; kept as a record until the retention passes.
    Released,
    /// Never started (a safety rail said no); kept as a record.
    Refused,
}

/// What ended a quarantine.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ReleaseCause {
    /// A person: the release annotation, or the deletion of the record.
    Person,
    /// The release policy: every trigger calm for `release.after`.
    Policy,
    /// Its guard was deleted.
    GuardDeleted,
    /// Its node was deleted.
    NodeDeleted,
    /// A safety rail refused it (`Stalled`'s reason names the rail).
    Refused,
}

/// What became of a quarantine.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuarantineStatus {
    /// The generation this status describes (a Quarantine's spec is
    /// immutable: 1 once the operator has seen it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Active, Released or Refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// When it became Active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Since when every trigger has been OK for the node (the calm window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calm_since: Option<Time>,
    /// When Alertmanager reported the alert resolved (alert triggers);
    /// cleared when it fires again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_resolved_at: Option<Time>,
    /// Firing notifications of this episode after the first (Alertmanager's
    /// repeats, HA duplicates, other fingerprints for the same node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_repeats: Option<u64>,
    /// When the episode's alert was last seen firing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_alert_at: Option<Time>,
    /// When it was released or refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at: Option<Time>,
    /// Who or what released it: the policy with the calm window's evidence,
    /// or the person's request; for Refused, the rail that refused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_by: Option<String>,
    /// What ended it, for machines (`releasedBy` says it for people):
    /// absent while it lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_cause: Option<ReleaseCause>,
    /// Standard conditions: Enforced, Ready (the record's state is what it
    /// should be: Active and enforced, or Released), Reconciling (Pending,
    /// or Active but not confirmed yet) and Stalled (refused, or not
    /// enforced on its node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
