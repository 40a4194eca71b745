//! The guard's quarantine policy (`spec.quarantine`): when a guard in mode
//! `Auto` quarantines a node and when it lets it go, as written, and
//! [`rules`], the one check that turns it into [`QuarantineRules`].

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::parse_duration;
use crate::errors::FieldError;
use crate::mode::Mode;

/// Trigger name of a quarantine a person asked for.
pub const MANUAL: &str = "manual";

/// When a guard in mode `Auto` quarantines a node, and when it lets it go.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuarantinePolicy {
    /// No new automatic quarantines; existing ones keep their release policy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// What puts a node in quarantine; any one trigger in breach is enough.
    #[serde(default)]
    pub triggers: Vec<Trigger>,
    /// When a quarantined node is let go.
    #[serde(default)]
    pub release: ReleasePolicy,
    /// Rails against quarantine storms.
    #[serde(default)]
    pub limits: Limits,
    /// What a quarantined node's throttle covers; default `AllButWhitelisted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<QuarantineThrottle>,
    /// What the operator does when a quarantine is not enforced (the node's
    /// agent stopped renewing its heartbeat, or reports its shaping tampered
    /// with); default nothing but the `Enforced` condition and an Event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation: Option<Escalation>,
}

/// The escalation of a quarantine that is not enforced.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Escalation {
    /// `None` (the default), `Cordon`, or `Taint` (a `NoExecute` taint
    /// `egressguard.io/unenforced-quarantine` that moves workloads off the node).
    #[serde(default)]
    pub action: EscalationAction,
    /// How long `Enforced` must have been False or Unknown first, e.g. `30s`
    /// (default): a plan being programmed is not yet enforced either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// What an escalation does to the node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum EscalationAction {
    /// Report only.
    #[default]
    None,
    /// Mark the node unschedulable (undone at release if the operator did it).
    Cordon,
    /// Taint the node `NoExecute`: its pods without a toleration are evicted
    /// (the taint is removed at release).
    Taint,
}

/// What a quarantine throttles.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum QuarantineThrottle {
    /// Every packet except whitelisted and protected destinations (and SSH
    /// replies, and IPv6 neighbour discovery), whatever its port or protocol:
    /// a compromised node cannot escape by moving from 443 to 8443 or to UDP.
    #[default]
    AllButWhitelisted,
    /// Only `spec.throttle.destinations`, as in mode `Enforce`.
    ListedPorts,
}

/// One condition that quarantines a node; exactly one of `prometheus` and
/// `alertmanager` is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Trigger {
    /// Unique within the guard; recorded on each Quarantine.
    pub name: String,
    /// A PromQL query the operator evaluates itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusTrigger>,
    /// Alerts Alertmanager sends to the operator's receiver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alertmanager: Option<AlertmanagerTrigger>,
}

/// A PromQL instant query returning one series per node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusTrigger {
    /// The query; it must return a value for every node it watches (a node
    /// missing from the result is Unknown, never OK).
    pub query: String,
    /// A value above this is a breach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    /// A value below this is a breach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    /// How long the breach must hold (consecutive evaluations), e.g. `2m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#for: Option<String>,
    /// Result label naming the node (default `instance`, the scrape target
    /// Prometheus sets, whose `host:port` is matched to a Node by name or
    /// InternalIP; a series' own `node` label is the exporter's to set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_label: Option<String>,
}

/// Alerts from Alertmanager's webhook that quarantine the node they name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertmanagerTrigger {
    /// Equality matchers on the alert's labels; all must match.
    #[serde(default)]
    pub matchers: BTreeMap<String, String>,
    /// Alert label naming the node (default `instance`, the scrape target
    /// Prometheus sets; an exporter controls its own `node` label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_label: Option<String>,
    /// Admit an alert only if the operator's Prometheus agrees: the alert is
    /// firing there for that node (`ALERTS`). Default: on when the operator
    /// has a Prometheus (`--prometheus-url`), off without one. `true` without
    /// a Prometheus refuses every alert of this trigger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corroborate: Option<bool>,
}

/// When a quarantine ends by itself.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReleasePolicy {
    /// Every trigger OK (never Unknown) for this long releases the node, e.g.
    /// `30m`; `manual` means only a person releases.
    #[serde(default = "default_after")]
    pub after: String,
    /// Lower release threshold for `above` triggers (hysteresis): the node is
    /// calm only below it. For `below` triggers, the value must rise above it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
}

fn default_after() -> String {
    "30m".into()
}

impl Default for ReleasePolicy {
    fn default() -> Self {
        ReleasePolicy {
            after: default_after(),
            below: None,
        }
    }
}

/// Rails against quarantine storms.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// At most this many of the guard's nodes in quarantine at once: a number,
    /// or a percentage of the selected nodes (`10%`, rounded down, at least 1).
    #[serde(default = "default_max")]
    pub max_quarantined_nodes: IntOrString,
    /// A released node is not automatically quarantined again sooner.
    #[serde(default = "default_cooldown")]
    pub cooldown: String,
}

fn default_max() -> IntOrString {
    IntOrString::Int(1)
}

fn default_cooldown() -> String {
    "10m".into()
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_quarantined_nodes: default_max(),
            cooldown: default_cooldown(),
        }
    }
}

/// A trigger after validation.
#[derive(Debug, Clone, PartialEq)]
pub enum TriggerRule {
    /// Evaluated by the operator against Prometheus.
    Prometheus {
        /// The query.
        query: String,
        /// Breach when the value is above (`true`) or below (`false`) `threshold`.
        above: bool,
        /// The breach threshold.
        threshold: f64,
        /// The calm threshold (hysteresis); equal to `threshold` when unset.
        calm: f64,
        /// How long a breach must hold.
        hold: std::time::Duration,
        /// Result label naming the node, if set.
        node_label: Option<String>,
    },
    /// Fired by Alertmanager's webhook.
    Alertmanager {
        /// Equality matchers on the alert's labels.
        matchers: BTreeMap<String, String>,
        /// Alert label naming the node, if set.
        node_label: Option<String>,
        /// Corroboration by Prometheus: `None` follows the operator.
        corroborate: Option<bool>,
    },
}

/// The cap on quarantined nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// At most this many nodes.
    Nodes(u32),
    /// At most this percentage of the selected nodes (rounded down, at least 1).
    Percent(u32),
}

impl Cap {
    /// The cap for a guard that selects `selected` nodes.
    pub fn of(self, selected: usize) -> usize {
        match self {
            Cap::Nodes(n) => n as usize,
            Cap::Percent(p) => (selected * p as usize / 100).max(1),
        }
    }
}

/// A guard's quarantine policy after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct QuarantineRules {
    /// No new automatic quarantines.
    pub paused: bool,
    /// Triggers by name, in spec order.
    pub triggers: Vec<(String, TriggerRule)>,
    /// Calm this long releases; `None` means only a person releases.
    pub release_after: Option<std::time::Duration>,
    /// At most this many quarantined nodes.
    pub cap: Cap,
    /// No automatic re-quarantine sooner than this after a release.
    pub cooldown: std::time::Duration,
    /// What to do to a node whose quarantine is not enforced, and after how long.
    pub escalation: (EscalationAction, std::time::Duration),
}

/// Checks `spec.quarantine` against `spec.mode`; every problem has its path.
pub fn rules(
    policy: Option<&QuarantinePolicy>,
    mode: Mode,
) -> Result<Option<QuarantineRules>, Vec<FieldError>> {
    let mut errs = Vec::new();
    let mut push = |path: String, message: String| errs.push(FieldError { path, message });
    let Some(p) = policy else {
        if mode == Mode::Auto {
            push(
                "spec.quarantine".into(),
                "is required when spec.mode is Auto: list at least one trigger, or use mode Enforce to throttle every selected node".into(),
            );
            return Err(errs);
        }
        return Ok(None);
    };
    if mode == Mode::Enforce {
        push(
            "spec.quarantine".into(),
            "only applies in mode Auto (or DryRun, to report what it would do); mode Enforce throttles every selected node already".into(),
        );
    }
    if p.triggers.is_empty() {
        push(
            "spec.quarantine.triggers".into(),
            "is empty; add a prometheus or alertmanager trigger".into(),
        );
    }
    let release_after = match p.release.after.trim() {
        MANUAL => None,
        s => match parse_duration(s) {
            Ok(d) if d.as_secs_f64() >= 1.0 => Some(d),
            Ok(_) => {
                push(
                    "spec.quarantine.release.after".into(),
                    format!("{s:?} is shorter than 1s; a release needs a calm window"),
                );
                None
            }
            Err(m) => {
                push(
                    "spec.quarantine.release.after".into(),
                    format!("{m}, or `manual`"),
                );
                None
            }
        },
    };
    let escalation = p.escalation.clone().unwrap_or_default();
    let escalate_after = match escalation.after.as_deref().map(parse_duration) {
        None => std::time::Duration::from_secs(30),
        Some(Ok(d)) => d,
        Some(Err(m)) => {
            push("spec.quarantine.escalation.after".into(), m.to_string());
            Default::default()
        }
    };
    let cooldown = match parse_duration(&p.limits.cooldown) {
        Ok(d) => d,
        Err(m) => {
            push("spec.quarantine.limits.cooldown".into(), m.to_string());
            Default::default()
        }
    };
    let cap = match &p.limits.max_quarantined_nodes {
        IntOrString::Int(n) if *n >= 1 => Cap::Nodes(*n as u32),
        IntOrString::Int(n) => {
            push("spec.quarantine.limits.maxQuarantinedNodes".into(), format!("{n} must be at least 1; pause the guard (spec.quarantine.paused) to stop new quarantines"));
            Cap::Nodes(1)
        }
        IntOrString::String(s) => match s.strip_suffix('%').map(str::parse::<u32>) {
            Some(Ok(p)) if (1..=100).contains(&p) => Cap::Percent(p),
            _ => {
                push(
                    "spec.quarantine.limits.maxQuarantinedNodes".into(),
                    format!("{s:?} is neither a number of nodes nor a percentage from 1% to 100%"),
                );
                Cap::Nodes(1)
            }
        },
    };
    let mut triggers = Vec::new();
    for (i, t) in p.triggers.iter().enumerate() {
        let base = format!("spec.quarantine.triggers[{i}]");
        if t.name.is_empty() || t.name == MANUAL || t.name.len() > 63 {
            push(
                format!("{base}.name"),
                format!(
                    "{:?} must be 1 to 63 characters and not `manual` (reserved for people)",
                    t.name
                ),
            );
        } else if p.triggers[..i].iter().any(|o| o.name == t.name) {
            push(
                format!("{base}.name"),
                format!(
                    "{:?} is used by an earlier trigger; names must be unique",
                    t.name
                ),
            );
        }
        let rule = match (&t.prometheus, &t.alertmanager) {
            (Some(pr), None) => {
                if pr.query.trim().is_empty() {
                    push(
                        format!("{base}.prometheus.query"),
                        "is empty; write a PromQL query returning one series per node".into(),
                    );
                }
                let (above, threshold) = match (pr.above, pr.below) {
                    (Some(a), None) => (true, a),
                    (None, Some(b)) => (false, b),
                    _ => {
                        push(
                            format!("{base}.prometheus"),
                            "set exactly one of `above` and `below`".into(),
                        );
                        (true, 0.0)
                    }
                };
                if !threshold.is_finite() {
                    push(
                        format!("{base}.prometheus"),
                        "the threshold must be a finite number".into(),
                    );
                }
                let calm = p.release.below.unwrap_or(threshold);
                if let Some(rb) = p.release.below {
                    if above && rb > threshold {
                        push("spec.quarantine.release.below".into(), format!("{rb} is above trigger {:?}'s threshold {threshold}; the calm threshold must not exceed the breach threshold", t.name));
                    }
                }
                let hold = match pr.r#for.as_deref().map(parse_duration) {
                    None => Default::default(),
                    Some(Ok(d)) => d,
                    Some(Err(m)) => {
                        push(format!("{base}.prometheus.for"), m.to_string());
                        Default::default()
                    }
                };
                TriggerRule::Prometheus {
                    query: pr.query.clone(),
                    above,
                    threshold,
                    calm,
                    hold,
                    node_label: pr.node_label.clone().filter(|l| !l.is_empty()),
                }
            }
            (None, Some(am)) => {
                if am.matchers.is_empty() {
                    push(format!("{base}.alertmanager.matchers"), "is empty; match at least the alert name, e.g. {alertname: NodeEgressSaturated}".into());
                }
                // The matchers also select the trigger's `ALERTS` in Prometheus
                // (corroboration): each key must be a Prometheus label name.
                let label_name = |k: &str| {
                    let mut c = k.chars();
                    c.next()
                        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
                        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
                };
                for k in am.matchers.keys().filter(|k| !label_name(k)) {
                    push(
                        format!("{base}.alertmanager.matchers.{k}"),
                        "is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)".into(),
                    );
                }
                TriggerRule::Alertmanager {
                    matchers: am.matchers.clone(),
                    node_label: am.node_label.clone().filter(|l| !l.is_empty()),
                    corroborate: am.corroborate,
                }
            }
            _ => {
                push(
                    base.clone(),
                    "set exactly one of `prometheus` and `alertmanager`".into(),
                );
                continue;
            }
        };
        triggers.push((t.name.clone(), rule));
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Some(QuarantineRules {
        paused: p.paused,
        triggers,
        release_after,
        cap,
        cooldown,
        escalation: (escalation.action, escalate_after),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_matchers_must_be_prometheus_label_names() {
        let policy = |key: &str| QuarantinePolicy {
            triggers: vec![Trigger {
                name: "alert".into(),
                alertmanager: Some(AlertmanagerTrigger {
                    matchers: BTreeMap::from([(key.to_string(), "x".to_string())]),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(rules(Some(&policy("alertname")), Mode::Auto).is_ok());
        let errs = rules(Some(&policy("team.name")), Mode::Auto).expect_err("a dotted key");
        assert_eq!(
            errs[0].path,
            "spec.quarantine.triggers[0].alertmanager.matchers.team.name"
        );
        assert!(errs[0].message.contains("Prometheus label name"));
    }
}
