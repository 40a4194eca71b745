//! `NodeShaping` (`egressguard.io/v1alpha1`, cluster-scoped): what one node's
//! agent must enforce. The operator owns the spec (one object per node, named
//! after the node); the node's agent owns the status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::guard::EgressGuardSpec;

/// Reasons of the agent's NodeShaping conditions (the operator reads them
/// back into the guard's per-node state).
pub mod reasons {
    /// The plan is in the kernel on every interface.
    pub const ENFORCED: &str = "Enforced";
    /// The plan asks for no shaping, and there is none.
    pub const REMOVED: &str = "Removed";
    /// DryRun: computed, not programmed.
    pub const DRY_RUN: &str = "DryRun";
    /// The kernel refused, or an interface is missing.
    pub const APPLY_FAILED: &str = "ApplyFailed";
    /// The plan does not validate; the kernel was left as it was.
    pub const INVALID_PLAN: &str = "InvalidPlan";
    /// Running with a fallback (e.g. pfifo leaves instead of sfq).
    pub const FALLBACK: &str = "QdiscFallback";
    /// The last apply rebuilt part of the tree (a brief disruption).
    pub const REBUILT: &str = "Rebuilt";
    /// The plan names a guard generation or CIDRGroup version the agent does
    /// not hold yet; the kernel stays as it was until they arrive.
    pub const WAITING: &str = "WaitingForInputs";
    /// Nothing degraded.
    pub const AS_PLANNED: &str = "AsPlanned";
    /// Tampered: our root qdisc was deleted (and put back).
    pub const ROOT_REMOVED: &str = "RootRemoved";
    /// Tampered: our tree was altered (classes, leaves or filters changed or
    /// added by someone else) and repaired, with the plan unchanged.
    pub const TREE_ALTERED: &str = "TreeAltered";
    /// Tampered: another root qdisc replaced ours; node-shaper never removes
    /// it, so the interface is not shaped until a person does.
    pub const FOREIGN_ROOT: &str = "ForeignRoot";
    /// Tampered: a hook on a shaped interface (a clsact egress filter, a BPF
    /// program) can send packets around the HTB root.
    pub const FOREIGN_HOOK: &str = "ForeignHook";
    /// Tampered: packets went through HTB's direct queue, which no filter of
    /// ours uses (a socket priority set to the root's handle, or a filter).
    pub const DIRECT_QUEUE_BYPASS: &str = "DirectQueueBypass";
    /// Not tampered: nothing foreign on the shaped interfaces.
    pub const NO_TAMPERING: &str = "NoTampering";
    /// Reported, not tampering: a clsact or ingress qdisc without egress
    /// filters (CNIs leave them; it cannot bypass the root by itself).
    pub const FOREIGN_QDISC: &str = "ForeignQdisc";
}

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
    /// A spec carried inline (standalone files and hand-written plans). The
    /// operator leaves it out: the agent reads the guard `guard` names, so a
    /// plan stays small whatever the size of the guard's whitelist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shaping: Option<EgressGuardSpec>,
    /// The CIDRGroups the guard's `whitelistGroups` resolved to, with the
    /// digest of each one's content. The agent enforces the plan only with
    /// exactly these versions, so a node never runs a half-updated whitelist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<ResolvedGroup>,
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

pub use crate::guard::ResolvedGroup;

impl NodeShapingSpec {
    /// Does the plan ask for its node's shaping to be removed?
    pub fn is_removal(&self) -> bool {
        self.guard.is_none() && self.shaping.is_none()
    }
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
    /// Standard conditions: Ready, Degraded, and Tampered (True while
    /// something foreign can bypass the shaping, and for a while after the
    /// agent repaired a tree someone altered).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When the kernel was last written or confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_apply_time: Option<Time>,
    /// The agent reads the guard and CIDRGroups a plan names. Agents from
    /// before CIDRGroups never set it; the operator keeps copying the spec
    /// into their plans (`shaping`) so an upgrade never unshapes a node
    /// whose agent has not rolled yet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_reference: bool,
    /// The agent takes the digests of the groups a plan names from the
    /// guard's `status.groups` when the plan leaves them out. Agents from
    /// before never set it; their plans keep the digests.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub digests_from_guard: bool,
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
