//! What leaves the node besides the NodeShaping status: a heartbeat Lease,
//! renewed while the agent runs, and a Warning Event on the Node for each
//! piece of tamper evidence.
//!
//! The operator reads the Lease to tell a quarantine enforced from one whose
//! agent stopped (SIGSTOP, a crash loop, a node cut off): nothing on such a
//! node repairs the shaping. Kubernetes' own node Leases say the kubelet
//! lives, not that this agent does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use tracing::{info, warn};

use super::reconcile::Tampering;

/// When the agent last finished a reconcile pass: the heartbeat is renewed
/// only while passes keep finishing, so a hung kernel thread or main loop
/// stops it too (a live process that repairs nothing is no heartbeat).
#[derive(Debug, Clone)]
pub struct Progress {
    start: Instant,
    millis: Arc<AtomicU64>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            start: Instant::now(),
            millis: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Progress {
    /// A pass finished now.
    pub fn mark(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.millis.store(ms, Ordering::Relaxed);
    }

    /// Since the last pass finished (or since start, before the first).
    pub fn age(&self) -> Duration {
        let last = Duration::from_millis(self.millis.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// The label the operator selects heartbeat Leases by.
pub const LABEL: &str = "egressguard.io/heartbeat";

/// The Lease of `node`: `node-shaper-<node>`, or for a name too long for
/// that, a prefix and an FNV-1a hash of the whole name (the operator matches
/// Leases by `holderIdentity`, never by name).
pub fn lease_name(node: &str) -> String {
    let name = format!("node-shaper-{node}");
    if name.len() <= 253 {
        return name;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut prefix = &name[..200];
    while prefix.ends_with('.') || prefix.ends_with('-') {
        prefix = &prefix[..prefix.len() - 1];
    }
    format!("{prefix}-{h:016x}")
}

/// How long a renewal holds: one and a half periods, so one late renewal
/// is not an outage and a stopped agent shows within two periods.
pub fn valid_for(period: Duration) -> i32 {
    i32::try_from((period.as_secs() * 3).div_ceil(2).max(period.as_secs() + 1)).unwrap_or(i32::MAX)
}

fn lease(node: &str, period: Duration, rv: Option<String>) -> Lease {
    let now = MicroTime(Timestamp::now());
    Lease {
        metadata: ObjectMeta {
            name: Some(lease_name(node)),
            labels: Some([(LABEL.to_string(), "node-shaper".to_string())].into()),
            resource_version: rv,
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.to_string()),
            lease_duration_seconds: Some(valid_for(period)),
            renew_time: Some(now),
            ..Default::default()
        }),
    }
}

/// Renews `node`'s heartbeat Lease in `namespace` every `period`, forever,
/// while `progress` shows a pass finished within `silence`. A refused or
/// failed renewal is logged and retried next period: the operator sees the
/// gap, which is the point.
pub async fn run(
    client: kube::Client,
    namespace: String,
    node: String,
    period: Duration,
    progress: Progress,
    silence: Duration,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let name = lease_name(&node);
    let mut rv: Option<String> = None;
    let mut ticker = tokio::time::interval(period);
    info!(lease = %name, namespace = %namespace, period_seconds = period.as_secs(), "heartbeat Lease renewed every period");
    loop {
        ticker.tick().await;
        if progress.age() > silence {
            warn!(
                seconds = progress.age().as_secs(),
                "no reconcile pass has finished for too long; not renewing the heartbeat, so the operator sees this agent as down"
            );
            continue;
        }
        let result = match &rv {
            Some(_) => {
                api.replace(
                    &name,
                    &PostParams::default(),
                    &lease(&node, period, rv.clone()),
                )
                .await
            }
            None => match api.get_opt(&name).await {
                Ok(Some(l)) => {
                    api.replace(
                        &name,
                        &PostParams::default(),
                        &lease(&node, period, l.metadata.resource_version),
                    )
                    .await
                }
                Ok(None) => {
                    api.create(&PostParams::default(), &lease(&node, period, None))
                        .await
                }
                Err(e) => Err(e),
            },
        };
        rv = match result {
            Ok(l) => l.metadata.resource_version,
            Err(e) => {
                warn!(lease = %name, error = %e, "cannot renew the heartbeat Lease; retrying");
                None
            }
        };
    }
}

/// Publishes one Warning Event on the Node per piece of tamper evidence.
pub async fn report_tampering(recorder: &Recorder, node: &str, evidence: &[Tampering]) {
    let node_ref = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.into()),
        ..Default::default()
    };
    for t in evidence {
        let ev = Event {
            type_: EventType::Warning,
            reason: egressguard_crds::conditions::events::TAMPERED.into(),
            note: Some(format!("{} ({})", t, t.kind.reason())),
            action: "Enforce".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &node_ref).await {
            warn!(error = %e, "cannot publish the tamper Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_fit_any_node_name() {
        assert_eq!(lease_name("eg-node-1"), "node-shaper-eg-node-1");
        let long = "n".repeat(253);
        let name = lease_name(&long);
        assert!(name.len() <= 253, "{}", name.len());
        assert_ne!(name, lease_name(&"m".repeat(253)));
        assert_eq!(valid_for(Duration::from_secs(10)), 15);
        assert_eq!(valid_for(Duration::from_secs(1)), 2);
    }
}
