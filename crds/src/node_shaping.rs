//! `NodeShaping` (`egressguard.io/v1alpha1`, cluster-scoped): what one node's
//! agent must enforce. The operator owns the spec (one object per node, named
//! after the node); the node's agent owns the status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::guard::EgressGuardSpec;

/// The plan for one node.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "egressguard.io",
    version = "v1alpha1",
    kind = "NodeShaping",
    plural = "nodeshapings",
    shortname = "egns",
    status = "NodeShapingStatus",
    printcolumn = r#"{"name":"Guard","type":"string","jsonPath":".spec.guard.name"}"#,
    printcolumn = r#"{"name":"Enforce","type":"boolean","jsonPath":".spec.enforce"}"#,
    printcolumn = r#"{"name":"Applied","type":"integer","jsonPath":".status.observedGeneration"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeShapingSpec {
    /// The node this plan is for (also the object's name).
    pub node_name: String,
    /// The guard the plan comes from; absent means "remove all shaping".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardRef>,
    /// The guard's spec, copied so the agent never needs to read guards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shaping: Option<EgressGuardSpec>,
    /// Destinations the agent must never throttle, with why (control plane, other nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protected: Vec<ProtectedEntry>,
    /// False for DryRun (and Auto while not quarantined): compute and report, program nothing.
    #[serde(default)]
    pub enforce: bool,
}

/// Which guard, at which generation, a plan was computed from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuardRef {
    /// Guard name.
    pub name: String,
    /// Guard UID, so a re-created guard of the same name is a new plan.
    #[serde(default)]
    pub uid: String,
    /// `metadata.generation` of the guard.
    #[serde(default)]
    pub generation: i64,
}

/// A destination that is always whitelisted, and the reason.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtectedEntry {
    /// CIDR (a host route for endpoints and nodes).
    pub cidr: String,
    /// Why, e.g. `kubernetes API endpoint` or `node worker-2 InternalIP`.
    pub reason: String,
}

/// What the agent did with the plan.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeShapingStatus {
    /// `metadata.generation` of the NodeShaping the agent last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Per-interface outcome.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceStatus>,
    /// Standard conditions: Ready, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When the kernel was last written or confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_apply_time: Option<Time>,
}

/// The outcome on one interface.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStatus {
    /// Interface name.
    pub name: String,
    /// The plan is in the kernel.
    pub enforced: bool,
    /// Leaf qdisc in use (`sfq`, or `pfifo` when sfq is missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaf: Option<String>,
    /// Set when running degraded (e.g. sfq missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Set when the last apply could neither change the kernel incrementally
    /// nor undo the attempt, and rebuilt part of the tree instead (a brief
    /// disruption of the traffic that part classifies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuilt: Option<String>,
    /// The last error, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// u32 filters installed.
    #[serde(default)]
    pub filters: i64,
    /// Counters per class, at the time of the status write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub counters: Vec<ClassCounters>,
}

/// A snapshot of one class's counters.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClassCounters {
    /// uplink, whitelist, default or throttled.
    pub role: String,
    /// Bytes sent.
    pub bytes: i64,
    /// Packets sent.
    pub packets: i64,
    /// Packets dropped.
    pub drops: i64,
    /// Times over rate.
    pub overlimits: i64,
}
