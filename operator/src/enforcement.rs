//! Is a quarantine in force on its node? Decided from what the node's agent
//! reports — its heartbeat Lease and its NodeShaping's conditions — and
//! what the node object shows of an escalation. Pure.
//!
//! # Rules
//! - No heartbeat, or one older than the validity the agent declared
//!   (`leaseDurationSeconds`): `Enforced=Unknown` (`AgentHeartbeatMissing`).
//!   A stopped or removed agent enforces nothing new and repairs nothing.
//! - The agent reports `Tampered=True`: `Enforced=False` (`Tampered`), the
//!   agent's reason and words after it.
//! - The plan does not enforce yet, or the agent does not report it Ready:
//!   `Enforced=False` (`NotEnforced`).
//! - Otherwise `Enforced=True`.
//! - A guard's `quarantine.escalation` acts on a node whose quarantine has
//!   not been enforced for `after`: cordon, or a `NoExecute` taint. What the
//!   operator did is undone when no Active quarantine asks for it any more
//!   (a cordon only if the operator's annotation says it cordoned).

use std::time::Duration;

use egressguard_crds::conditions::types;
use egressguard_crds::node_shaping::{reasons as agent, NodeShaping};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;

/// A Quarantine's condition: is it in force on the node?
pub const ENFORCED_CONDITION: &str = "Enforced";
/// The annotation on a Node the operator cordoned: the Quarantine's name.
pub const CORDONED_BY: &str = "egressguard.io/cordoned-by";
/// The `NoExecute` taint of a node whose quarantine is not enforced.
pub const TAINT_KEY: &str = "egressguard.io/unenforced-quarantine";
/// The label on the agents' heartbeat Leases.
pub const HEARTBEAT_LABEL: &str = "egressguard.io/heartbeat";

/// Reasons of a Quarantine's `Enforced` condition.
pub mod reasons {
    /// The agent reports the plan in the kernel and nothing tampered.
    pub const ENFORCED: &str = "Enforced";
    /// The agent's heartbeat is missing or stale.
    pub const HEARTBEAT_MISSING: &str = "AgentHeartbeatMissing";
    /// The agent reports tampering.
    pub const TAMPERED: &str = "Tampered";
    /// The plan is not (yet) in the kernel.
    pub const NOT_ENFORCED: &str = "NotEnforced";
    /// The node carries another guard's plan, or none: this quarantine's
    /// throttle cannot be applied there.
    pub const NOT_PLANNED: &str = "NotPlanned";
}

/// What the cluster shows of one node's enforcement.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeReport {
    /// When the operator first saw the heartbeat's current version, and how
    /// long the agent said a renewal holds. The operator's own clock on both
    /// ends: a node's skewed clock cannot fake or hide a stale heartbeat.
    pub heartbeat: Option<(Timestamp, Duration)>,
    /// The agent's status describes the plan's current generation.
    pub current: bool,
    /// The plan asks the agent to enforce.
    pub enforce: bool,
    /// The guard whose plan the node carries.
    pub plan_guard: Option<String>,
    /// The agent's Ready condition: True?, reason, message.
    pub ready: Option<(bool, String, String)>,
    /// The agent's Tampered condition when True: reason, message.
    pub tampered: Option<(String, String)>,
    /// The Quarantine named by the operator's cordon annotation.
    pub cordoned_by: Option<String>,
    /// The node is unschedulable.
    pub unschedulable: bool,
    /// The Quarantine named by the operator's NoExecute taint on the node.
    pub tainted_by: Option<String>,
}

impl NodeReport {
    /// Gathers what the agent and the node say; `seen` is when the operator
    /// first saw the Lease at its current resourceVersion.
    pub fn of(
        node: Option<&Node>,
        plan: Option<&NodeShaping>,
        lease: Option<&Lease>,
        seen: Option<Timestamp>,
    ) -> Self {
        let cond = |t: &str| {
            plan.and_then(|p| p.status.as_ref())
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == t))
        };
        let spec = node.and_then(|n| n.spec.as_ref());
        NodeReport {
            heartbeat: lease.and_then(|l| l.spec.as_ref()).and_then(|s| {
                let valid = u64::try_from(s.lease_duration_seconds?).ok()?;
                Some((seen?, Duration::from_secs(valid)))
            }),
            current: plan.is_some_and(|p| {
                p.status.as_ref().and_then(|s| s.observed_generation) == p.metadata.generation
            }),
            enforce: plan.is_some_and(|p| p.spec.enforce),
            plan_guard: plan
                .and_then(|p| p.spec.guard.as_ref())
                .map(|g| g.name.clone()),
            ready: cond(types::READY)
                .map(|c| (c.status == "True", c.reason.clone(), bounded(&c.message))),
            tampered: cond(types::TAMPERED)
                .filter(|c| c.status == "True")
                .map(|c| (c.reason.clone(), bounded(&c.message))),
            cordoned_by: node
                .and_then(|n| n.metadata.annotations.as_ref())
                .and_then(|a| a.get(CORDONED_BY).cloned()),
            unschedulable: spec.and_then(|s| s.unschedulable).unwrap_or(false),
            tainted_by: spec
                .and_then(|s| s.taints.as_ref())
                .and_then(|t| t.iter().find(|t| t.key == TAINT_KEY))
                .map(|t| t.value.clone().unwrap_or_default()),
        }
    }
}

/// A node-written message, bounded before it reaches another object.
fn bounded(m: &str) -> String {
    egressguard_crds::conditions::bounded(m, 512)
}

/// The `Enforced` condition's status, reason and message for `node`.
pub fn verdict(
    node: &str,
    r: Option<&NodeReport>,
    now: Timestamp,
) -> (&'static str, &'static str, String) {
    let Some(r) = r else {
        return (
            "Unknown",
            reasons::HEARTBEAT_MISSING,
            format!("node {node}: no agent heartbeat and no plan seen"),
        );
    };
    match r.heartbeat {
        None => {
            return (
                "Unknown",
                reasons::HEARTBEAT_MISSING,
                format!(
                "node-shaper on {node} has never renewed its heartbeat Lease: it may not run there"
            ),
            )
        }
        Some((at, valid)) => {
            let age = now.duration_since(at).as_secs_f64();
            if age > valid.as_secs_f64() {
                return (
                    "Unknown",
                    reasons::HEARTBEAT_MISSING,
                    format!(
                        "node-shaper on {node} has not renewed its heartbeat since {at} (as this operator saw it; valid for {}s): stopped, hung, killed or cut off; nothing on the node repairs the shaping",
                        valid.as_secs()
                    ),
                );
            }
        }
    }
    if let Some((why, msg)) = &r.tampered {
        return (
            "False",
            reasons::TAMPERED,
            format!("node-shaper on {node} reports tampering ({why}): {msg}"),
        );
    }
    match (&r.ready, r.enforce) {
        (Some((true, why, _)), true) if why == agent::ENFORCED && !r.current => (
            "False",
            reasons::NOT_ENFORCED,
            format!("node-shaper on {node} has not reported the plan's current generation yet"),
        ),
        (Some((true, why, _)), true) if why == agent::ENFORCED => (
            "True",
            reasons::ENFORCED,
            format!("node-shaper on {node} enforces the plan"),
        ),
        (_, false) => (
            "False",
            reasons::NOT_ENFORCED,
            format!("the plan for {node} does not enforce yet"),
        ),
        (Some((_, why, msg)), true) => (
            "False",
            reasons::NOT_ENFORCED,
            format!("node-shaper on {node}: {why}: {msg}"),
        ),
        (None, true) => (
            "False",
            reasons::NOT_ENFORCED,
            format!("node-shaper on {node} has not reported the plan yet"),
        ),
    }
}

/// What to do to a node this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeChange {
    /// Cordon it on behalf of this Quarantine.
    Cordon(String),
    /// Add the NoExecute taint on behalf of this Quarantine.
    Taint(String),
    /// Undo the operator's cordon.
    Uncordon,
    /// Remove the operator's taint.
    Untaint,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs_ago: i64, now: Timestamp) -> Timestamp {
        now - jiff_secs(secs_ago)
    }

    fn jiff_secs(s: i64) -> k8s_openapi::jiff::SignedDuration {
        k8s_openapi::jiff::SignedDuration::from_secs(s)
    }

    #[test]
    fn verdicts() {
        let now = Timestamp::now();
        let ok = NodeReport {
            heartbeat: Some((at(3, now), Duration::from_secs(15))),
            current: true,
            enforce: true,
            ready: Some((true, agent::ENFORCED.into(), "enforced on eth0".into())),
            ..Default::default()
        };
        // (case, report, status, reason)
        let cases: Vec<(&str, Option<NodeReport>, &str, &str)> = vec![
            ("enforced", Some(ok.clone()), "True", reasons::ENFORCED),
            ("nothing known", None, "Unknown", reasons::HEARTBEAT_MISSING),
            (
                "no heartbeat ever",
                Some(NodeReport {
                    heartbeat: None,
                    ..ok.clone()
                }),
                "Unknown",
                reasons::HEARTBEAT_MISSING,
            ),
            (
                "stale heartbeat (SIGSTOP)",
                Some(NodeReport {
                    heartbeat: Some((at(16, now), Duration::from_secs(15))),
                    ..ok.clone()
                }),
                "Unknown",
                reasons::HEARTBEAT_MISSING,
            ),
            (
                "tampered beats ready",
                Some(NodeReport {
                    tampered: Some((agent::ROOT_REMOVED.into(), "eth0: deleted".into())),
                    ..ok.clone()
                }),
                "False",
                reasons::TAMPERED,
            ),
            (
                "Ready for an older generation of the plan",
                Some(NodeReport {
                    current: false,
                    ..ok.clone()
                }),
                "False",
                reasons::NOT_ENFORCED,
            ),
            (
                "plan not enforcing yet",
                Some(NodeReport {
                    enforce: false,
                    ..ok.clone()
                }),
                "False",
                reasons::NOT_ENFORCED,
            ),
            (
                "agent waiting for inputs",
                Some(NodeReport {
                    ready: Some((false, agent::WAITING.into(), "reading".into())),
                    ..ok.clone()
                }),
                "False",
                reasons::NOT_ENFORCED,
            ),
            (
                "agent removed the shaping",
                Some(NodeReport {
                    ready: Some((true, agent::REMOVED.into(), String::new())),
                    ..ok.clone()
                }),
                "False",
                reasons::NOT_ENFORCED,
            ),
        ];
        for (case, r, status, reason) in cases {
            let (s, why, msg) = verdict("n1", r.as_ref(), now);
            assert_eq!((s, why), (status, reason), "{case}: {msg}");
        }
        let long = "x".repeat(5000);
        assert!(bounded(&long).len() <= 512);
    }
}
