//! The `EgressGuard` custom resource (`egressguard.io/v1alpha1`, cluster-scoped).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::mode::Mode;
use crate::quarantine_policy::QuarantinePolicy;

/// Desired egress shaping for the nodes a guard selects.
///
/// Rates use tc's bit units (`20Mbit`), sizes tc's byte units (`15k`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "egressguard.io",
    version = "v1alpha1",
    kind = "EgressGuard",
    plural = "egressguards",
    shortname = "eg",
    status = "EgressGuardStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.selectedNodes"}"#,
    printcolumn = r#"{"name":"Enforced","type":"integer","jsonPath":".status.enforcedNodes"}"#,
    printcolumn = r#"{"name":"Quarantined","type":"integer","jsonPath":".status.quarantinedNodes"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EgressGuardSpec {
    /// Nodes this guard applies to; empty or absent selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// Interfaces to shape; absent means the interfaces of the host's default
    /// routes. Never `lo`: shaping loopback throttles the node's own processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interfaces: Option<Vec<String>>,
    /// The whole egress budget of each shaped interface.
    pub uplink: Uplink,
    /// Traffic to abnormal destinations, squeezed into a small class.
    pub throttle: Throttle,
    /// Destination CIDRs that are never throttled and are served first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub whitelist: Vec<String>,
    /// Accept `0.0.0.0/0` or `::/0` in `whitelist`: every destination of
    /// that family is then exempt, so the guard throttles nothing there.
    /// Refused unless this says it is meant (staging a guard, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whitelist_all_destinations: Option<bool>,
    /// I know this whitelist/protect entry exempts a large part of the
    /// internet. Without it, validation refuses a whitelist (with its
    /// CIDRGroups) covering half an address family or more, CIDRGroup
    /// entries shorter than /8 (IPv4) or /16 (IPv6), and `protect` entries
    /// without ports shorter than /16 (IPv4) or /48 (IPv6). Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_wide_ranges: bool,
    /// CIDRGroups whose networks join the whitelist, by name or label
    /// selector. A reference that resolves to no group holds the guard's
    /// plans where they are (condition `WhitelistResolved=False`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub whitelist_groups: Vec<GroupRef>,
    /// How the operator enforces this guard.
    #[serde(default)]
    pub mode: Mode,
    /// Also whitelist the other nodes' InternalIPs (the API server endpoints always are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protect_cluster_traffic: Option<bool>,
    /// Never shape SSH replies (TCP from source port 22), so a guard cannot
    /// lock people out of the node; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protect_ssh_replies: Option<bool>,
    /// Destinations this guard never throttles (DNS resolvers, the metrics
    /// pipeline, a bastion): like the API server, they go to the protected
    /// lane, which has a guaranteed rate of its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protect: Vec<ProtectEntry>,
    /// The guaranteed lanes of protected traffic and SSH: no traffic is ever
    /// unlimited, and no flood takes these lanes' guarantees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lanes: Option<Lanes>,
    /// When mode `Auto` quarantines a node (required then), and when it
    /// releases it. In `DryRun`, what would be quarantined is reported only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<QuarantinePolicy>,
}

/// Guaranteed lanes (HTB classes under the uplink, served before the
/// whitelist) for traffic a guard must never starve.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lanes {
    /// The control plane, the other nodes and `spec.protect`. Default: rate
    /// max(1Mbit, a tenth of the uplink), ceil the uplink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected: Option<Lane>,
    /// SSH replies (TCP from source port 22 of the host's own addresses).
    /// Default: rate 1Mbit, ceil max(5Mbit, a tenth of the uplink).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<Lane>,
}

/// One lane's guaranteed rate and ceiling; either may be left to its default.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lane {
    /// Guaranteed rate, e.g. `2Mbit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(deserialize_with = "quantity::optional")]
    #[schemars(schema_with = "quantity::rate_schema")]
    pub rate: Option<String>,
    /// Most the lane may borrow up to, at most the uplink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(deserialize_with = "quantity::optional")]
    #[schemars(schema_with = "quantity::rate_schema")]
    pub ceil: Option<String>,
}

/// A destination a guard protects: a whole network, or only some ports of it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "!has(self.endPort) || (has(self.port) && self.endPort >= self.port)", "message": "endPort needs port and must be at least port"}]))]
pub struct ProtectEntry {
    /// IPv4 or IPv6 network (host bits clear) or address.
    pub cidr: String,
    /// Why, shown by `explain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Protect only this transport protocol's `port`..`endPort` (default TCP
    /// when a port is set); absent with no port: every packet to `cidr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Destination port, 1..65535: protect only traffic to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i64>,
    /// Last port of an inclusive range starting at `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i64>,
}

/// The egress budget of an interface.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Uplink {
    /// Rate in tc bit units, e.g. `20Mbit`.
    #[serde(deserialize_with = "quantity::required")]
    #[schemars(schema_with = "quantity::rate_schema")]
    pub rate: String,
    /// Burst in tc byte units, e.g. `15k`; default max(1600 bytes, 1 ms at rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(deserialize_with = "quantity::optional")]
    #[schemars(schema_with = "quantity::size_schema")]
    pub burst: Option<String>,
}

/// The throttled class and what goes into it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Throttle {
    /// Guaranteed rate of throttled traffic, e.g. `1Mbit`.
    #[serde(deserialize_with = "quantity::required")]
    #[schemars(schema_with = "quantity::rate_schema")]
    pub rate: String,
    /// Most throttled traffic may borrow up to; defaults to `rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(deserialize_with = "quantity::optional")]
    #[schemars(schema_with = "quantity::rate_schema")]
    pub ceil: Option<String>,
    /// Burst in tc byte units; default max(1600 bytes, 1 ms at rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(deserialize_with = "quantity::optional")]
    #[schemars(schema_with = "quantity::size_schema")]
    pub burst: Option<String>,
    /// Abnormal destinations: traffic matching any of them is throttled.
    #[schemars(length(min = 1))]
    pub destinations: Vec<Destination>,
    /// Packets whose ports cannot be read: IPv4 fragments after the first and
    /// IPv6 packets with an extension header before TCP/UDP. `Throttle` (the
    /// default) sends them to the throttled class unless their destination is
    /// whitelisted or protected, so large datagrams to a throttled port cannot
    /// ride past the throttle in fragments. `Pass` leaves them in the default
    /// class (the guard can then be evaded; `plan` warns).
    #[serde(default, skip_serializing_if = "is_default")]
    pub portless: PortlessPolicy,
}

/// tc quantities may be written as YAML numbers: tc reads a bare number as
/// bits per second for a rate and bytes for a size, and so does validation
/// (`burst: 1600` is 1600 bytes). Kept as the text they stand for.
mod quantity {
    use std::fmt;

    use schemars::{json_schema, Schema, SchemaGenerator};
    use serde::de::{self, Deserializer, Visitor};

    struct Text;

    impl Visitor<'_> for Text {
        type Value = String;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a tc quantity such as 20Mbit or 15k, or a bare number")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }

    struct MaybeText;

    impl<'de> Visitor<'de> for MaybeText {
        type Value = Option<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            Text.expecting(f)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            required(d).map(Some)
        }
    }

    pub fn required<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        d.deserialize_any(Text)
    }

    pub fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_option(MaybeText)
    }

    /// An int-or-string, as the API server accepts one, whose text is a rate.
    pub fn rate_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "x-kubernetes-int-or-string": true,
            // The pattern applies to strings only, as for resource quantities.
            "pattern": "(?i)^[0-9]+(\\.[0-9]+)?(([kmgt]i?)?bit)?$"
        })
    }

    /// An int-or-string whose text is a size.
    pub fn size_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "x-kubernetes-int-or-string": true,
            // The pattern applies to strings only, as for resource quantities.
            "pattern": "(?i)^[0-9]+(\\.[0-9]+)?([kmg]b?|b)?$"
        })
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// What to do with packets whose destination port cannot be read.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PortlessPolicy {
    /// Throttle them (unless whitelisted or protected).
    #[default]
    Throttle,
    /// Leave them in the default class.
    Pass,
}

/// A destination port or inclusive port range.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "!has(self.endPort) || self.endPort >= self.port", "message": "endPort must be at least port (it is the last port of an inclusive range)"}]))]
pub struct Destination {
    /// Transport protocol; `Any` means TCP or UDP.
    #[serde(default)]
    pub protocol: Protocol,
    /// Destination port, 1..65535.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i64,
    /// Last port of an inclusive range starting at `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i64>,
}

/// Transport protocol of a destination.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Protocol {
    /// TCP only.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP only.
    #[serde(rename = "UDP")]
    Udp,
    /// TCP and UDP.
    Any,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Any => "Any",
        })
    }
}

/// Where one node stands with a guard.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum NodePhase {
    /// The plan is written; its agent has not confirmed it (or waits for
    /// the guard and CIDRGroups it names).
    #[default]
    Pending,
    /// The agent reports the plan in the kernel.
    Enforced,
    /// DryRun: computed and reported, nothing programmed.
    DryRun,
    /// The agent reports an error.
    Failed,
    /// An older guard's plan holds the node.
    Conflict,
    /// Auto: watched, not quarantined, nothing programmed.
    Watching,
    /// Auto: quarantined, the plan is in the kernel.
    Quarantined,
}

/// What the operator observed about a guard.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressGuardStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: Ready, Degraded, Conflict, MetricsAvailable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Nodes the selector matches.
    #[serde(default)]
    pub selected_nodes: i32,
    /// Nodes whose agent reports the plan enforced.
    #[serde(default)]
    pub enforced_nodes: i32,
    /// Nodes quarantined by a metric or alert.
    #[serde(default)]
    pub quarantined_nodes: i32,
    /// Nodes whose agent reports an error.
    #[serde(default)]
    pub failed_nodes: i32,
    /// Per-node state, at most 100 entries (counts above are complete).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeState>,
    /// The CIDRGroups `spec.whitelistGroups` resolves to, each at the digest
    /// the nodes enforce: an agent programs a plan only when the groups it
    /// holds have these digests and `observedGeneration` is the guard's.
    /// Always written, empty included: a merge patch must be able to clear it.
    #[serde(default)]
    pub groups: Vec<ResolvedGroup>,
}

/// One node's state for a guard.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    /// Node name.
    pub name: String,
    /// Where the node stands.
    pub state: NodePhase,
    /// Details (errors, the guard that won a conflict).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// A guard's reference to CIDR groups: exactly one of a name or a selector.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "has(self.name) != has(self.selector)", "message": "set exactly one of name and selector"}]))]
pub struct GroupRef {
    /// One group, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Every group whose labels match (at least one must).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// One CIDRGroup a guard uses, at one content version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedGroup {
    /// Group name.
    pub name: String,
    // This text is also the CRD's description, so it names the digest as
    // before the type moved here; the kind it links to sits above this module.
    #[allow(rustdoc::broken_intra_doc_links)]
    /// [`CidrGroupSpec::digest`] of the content. In a guard's status: the
    /// version its nodes enforce. In a plan: empty when the agent takes it
    /// from the guard's status (a group edit then rewrites one status per
    /// guard, not every plan); set for agents from before that.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
}
