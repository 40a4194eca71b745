//! What the leader reads a pass from and keeps between passes: the caches
//! (each kind's watch), the pass metrics, the memories of what was already
//! reported or evaluated, and the index of parsed guards and groups.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use egressguard_crds::serve::prometheus_client::encoding::DescriptorEncoder;
use egressguard_crds::serve::{counter, counters, gauge, Scrape};
use egressguard_crds::{EgressGuard, NodeShaping, Phase, Quarantine};
use futures::FutureExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use kube::Client;

use crate::evaluate::EvalState;
use crate::index::Index;
use crate::kinds::Served;
use crate::own_writes::OwnWrites;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct OpMetrics {
    /// Reconcile passes.
    pub reconciles: u64,
    /// Failed passes.
    pub errors: u64,
    /// Sum of pass durations.
    pub seconds: f64,
    /// This replica leads.
    pub leader: bool,
    /// Caches are synced.
    pub ready: bool,
    /// Node addresses left out of the protected list by the node address policy.
    pub ignored_node_addresses: usize,
    /// Plans written (created, changed, or turned into removals).
    pub plan_writes: u64,
    /// Request bytes of those writes: what one guard or group edit costs the API.
    pub plan_write_bytes: u64,
    /// Failed writes by [`Stage`] label: every error of every pass, not only
    /// the first.
    pub write_errors: BTreeMap<&'static str, u64>,
    /// Guards and groups parsed (per change, not per pass).
    pub parses: u64,
}

impl Scrape for OpMetrics {
    fn scrape(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        counter(
            e,
            "egressguard_operator_reconciles",
            "Reconcile passes.",
            self.reconciles,
        )?;
        counter(
            e,
            "egressguard_operator_reconcile_errors",
            "Failed reconcile passes.",
            self.errors,
        )?;
        counter(
            e,
            "egressguard_operator_reconcile_seconds",
            "Time spent reconciling.",
            self.seconds,
        )?;
        gauge(
            e,
            "egressguard_operator_leader",
            "Whether this replica holds the lease.",
            i64::from(self.leader),
        )?;
        gauge(
            e,
            "egressguard_operator_ignored_node_addresses",
            "Node InternalIPs not protected (outside the node ranges, or over the per-node limit).",
            self.ignored_node_addresses as i64,
        )?;
        counter(
            e,
            "egressguard_operator_plan_writes",
            "NodeShaping plans written.",
            self.plan_writes,
        )?;
        counter(
            e,
            "egressguard_operator_plan_write_bytes",
            "Request body bytes of NodeShaping plan writes.",
            self.plan_write_bytes,
        )?;
        counter(
            e,
            "egressguard_operator_parses",
            "Guards and CIDRGroups parsed and validated (once per change, not per pass).",
            self.parses,
        )?;
        counters(
            e,
            "egressguard_operator_write_errors",
            "Failed writes of reconcile passes, by stage.",
            self.write_errors
                .iter()
                .map(|(stage, n)| ([("stage", *stage)], *n)),
        )
    }
}

pub(crate) struct Caches {
    pub(crate) guards: Store<EgressGuard>,
    pub(crate) nodes: Store<Node>,
    pub(crate) shapings: Store<NodeShaping>,
    pub(crate) slices: Store<EndpointSlice>,
    pub(crate) quarantines: Store<Quarantine>,
    pub(crate) groups: Store<egressguard_crds::CIDRGroup>,
    /// The agents' heartbeat Leases (in this release's namespace).
    pub(crate) heartbeats: Store<Lease>,
    /// Whether the Quarantine and CIDRGroup CRDs are installed: kinds added
    /// after the first release, which an upgrade may have left out.
    pub(crate) quarantines_served: Served,
    pub(crate) groups_served: Served,
}

impl Caches {
    /// Every cache has listed once, or (for the kinds later releases added)
    /// found its CRD missing. Waits for the kinds every release had.
    pub(crate) async fn ready(&self) -> bool {
        let optional = |store_ready: Option<Result<(), _>>, served: &Served| {
            served.missing() || matches!(store_ready, Some(Ok(())))
        };
        self.guards.wait_until_ready().await.is_ok()
            && self.nodes.wait_until_ready().await.is_ok()
            && self.shapings.wait_until_ready().await.is_ok()
            && self.slices.wait_until_ready().await.is_ok()
            && self.heartbeats.wait_until_ready().await.is_ok()
            && optional(
                self.quarantines.wait_until_ready().now_or_never(),
                &self.quarantines_served,
            )
            && optional(
                self.groups.wait_until_ready().now_or_never(),
                &self.groups_served,
            )
    }

    /// The kinds whose CRD the API server does not serve.
    pub(crate) fn missing(&self) -> Vec<&'static str> {
        [
            (&self.quarantines_served, crate::kinds::QUARANTINES),
            (&self.groups_served, crate::kinds::CIDR_GROUPS),
        ]
        .into_iter()
        .filter(|(s, _)| s.missing())
        .map(|(_, name)| name)
        .collect()
    }
}

/// The API server's addresses: only from the EndpointSlice the API server
/// itself keeps (`default/kubernetes`). Anyone allowed to create
/// EndpointSlices in `default` could label another one for the service and
/// have its addresses protected on every node.
pub(crate) fn api_endpoints(slices: &[Arc<EndpointSlice>]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = slices
        .iter()
        .filter(|s| s.metadata.name.as_deref() == Some(API_SLICE))
        .flat_map(|s| s.endpoints.iter().flatten())
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The EndpointSlice the API server writes for the `kubernetes` Service.
pub(crate) const API_SLICE: &str = "kubernetes";

/// The leader's state: what every pass reads and the memories it keeps.
pub(crate) struct Ctx {
    pub(crate) client: Client,
    pub(crate) caches: Caches,
    pub(crate) recorder: Recorder,
    pub(crate) cleanup_timeout: Duration,
    pub(crate) node_addresses: crate::decide::NodeAddressPolicy,
    /// Ignored node addresses already reported (an Event once per change).
    pub(crate) reported: Mutex<std::collections::BTreeSet<crate::decide::IgnoredAddress>>,
    pub(crate) metrics: Arc<Mutex<OpMetrics>>,
    pub(crate) quarantine: crate::remediate::QuarantineConfig,
    pub(crate) q_metrics: Arc<Mutex<crate::remediate::QuarantineMetrics>>,
    /// The leader's Prometheus evaluation state.
    pub(crate) eval: Mutex<EvalState>,
    /// Recurring notices already published (once per continuous run).
    pub(crate) noticed: Mutex<std::collections::BTreeSet<String>>,
    /// Plans written that the cache has not caught up with.
    pub(crate) own: Mutex<OwnWrites>,
    /// Guards and groups parsed once per change.
    pub(crate) index: Mutex<Index>,
    /// Each node's heartbeat Lease version and when this replica first saw it.
    pub(crate) heartbeat_seen: Mutex<BTreeMap<String, (String, Timestamp)>>,
}

/// How often Active quarantines' heartbeats are checked.
pub(crate) const HEARTBEAT_CHECK: Duration = Duration::from_millis(500);

pub(crate) fn any_active(ctx: &Ctx) -> bool {
    ctx.caches
        .quarantines
        .state()
        .iter()
        .any(|q| q.status.as_ref().and_then(|s| s.phase) == Some(Phase::Active))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::Endpoint;

    fn slice(name: &str, addresses: &[&str]) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    [(
                        "kubernetes.io/service-name".to_string(),
                        "kubernetes".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(vec![Endpoint {
                addresses: addresses.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            }]),
            ports: None,
        })
    }

    #[test]
    fn only_the_api_servers_own_slice_names_api_endpoints() {
        let got = api_endpoints(&[
            slice("kubernetes", &["10.96.0.10"]),
            // Labelled for the service by whoever may create slices in default.
            slice("kubernetes-extra", &["203.0.113.7"]),
        ]);
        assert_eq!(got, vec!["10.96.0.10".parse::<IpAddr>().expect("ip")]);
    }
}
