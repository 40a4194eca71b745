//! The guard's quarantine policy (`spec.quarantine`): when a guard in mode
//! `Auto` quarantines a node and when it lets it go, as written, and
//! [`rules`], the one check that turns it into [`QuarantineRules`].

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::{parse_duration, DurationError};
use crate::errors::FieldError;
use crate::mode::Mode;

/// Trigger name of a quarantine a person asked for, and the `release.after`
/// of a policy under which only a person releases. Read through [`Origin`]
/// and [`ReleasePolicy::release_after`] rather than compared.
pub const MANUAL: &str = "manual";

/// Who started a quarantine: a person, or one of the guard's triggers. The
/// one reading of a Quarantine's `spec.trigger` and of a trigger's `name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin<'a> {
    /// A person ([`MANUAL`], a name no trigger may take).
    Manual,
    /// The guard's trigger of this name.
    Trigger(&'a str),
}

impl<'a> Origin<'a> {
    /// What the trigger name `trigger` stands for.
    pub fn of(trigger: &'a str) -> Self {
        if trigger == MANUAL {
            Origin::Manual
        } else {
            Origin::Trigger(trigger)
        }
    }

    /// Did a person start it?
    pub fn is_manual(self) -> bool {
        self == Origin::Manual
    }
}

/// When a quarantine ends by itself, as a policy's `release.after` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseAfter {
    /// `manual`: never; only a person releases.
    Manual,
    /// Once every trigger has been calm this long.
    Calm(Duration),
}

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

impl ReleasePolicy {
    /// `after` read: [`MANUAL`], or a duration; blanks around it ignored.
    pub fn release_after(&self) -> Result<ReleaseAfter, DurationError> {
        match self.after.trim() {
            MANUAL => Ok(ReleaseAfter::Manual),
            s => parse_duration(s).map(ReleaseAfter::Calm),
        }
    }
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
        hold: Duration,
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
    pub release_after: Option<Duration>,
    /// At most this many quarantined nodes.
    pub cap: Cap,
    /// No automatic re-quarantine sooner than this after a release.
    pub cooldown: Duration,
    /// What to do to a node whose quarantine is not enforced, and after how long.
    pub escalation: (EscalationAction, Duration),
}

/// Checks `spec.quarantine` against `spec.mode`; every problem has its path.
///
/// Each part of the policy has its check below, in the order they run here;
/// problems are reported in that order, which the bad-input tests pin.
pub fn rules(
    policy: Option<&QuarantinePolicy>,
    mode: Mode,
) -> Result<Option<QuarantineRules>, Vec<FieldError>> {
    let Some(p) = policy else {
        return match mode {
            Mode::Auto => Err(vec![FieldError::new(
                "spec.quarantine",
                "is required when spec.mode is Auto: list at least one trigger, or use mode Enforce to throttle every selected node",
            )]),
            _ => Ok(None),
        };
    };
    let mut errs = Vec::new();
    check_mode(mode, &mut errs);
    check_has_triggers(p, &mut errs);
    let release_after = release_after(&p.release, &mut errs);
    let escalation = escalation(p.escalation.as_ref(), &mut errs);
    let cooldown = cooldown(&p.limits, &mut errs);
    let cap = cap(&p.limits.max_quarantined_nodes, &mut errs);
    let triggers = (p.triggers.iter().enumerate())
        .filter_map(|(i, t)| trigger(p, i, t, &mut errs))
        .collect();
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Some(QuarantineRules {
        paused: p.paused,
        triggers,
        release_after,
        cap,
        cooldown,
        escalation,
    }))
}

/// `spec.mode`: a policy means nothing in mode Enforce.
fn check_mode(mode: Mode, errs: &mut Vec<FieldError>) {
    if mode == Mode::Enforce {
        errs.push(FieldError::new(
            "spec.quarantine",
            "only applies in mode Auto (or DryRun, to report what it would do); mode Enforce throttles every selected node already",
        ));
    }
}

/// `spec.quarantine.triggers`: at least one.
fn check_has_triggers(p: &QuarantinePolicy, errs: &mut Vec<FieldError>) {
    if p.triggers.is_empty() {
        errs.push(FieldError::new(
            "spec.quarantine.triggers",
            "is empty; add a prometheus or alertmanager trigger",
        ));
    }
}

/// `spec.quarantine.release.after`: `manual` (`None`), or a calm window of
/// at least a second.
fn release_after(release: &ReleasePolicy, errs: &mut Vec<FieldError>) -> Option<Duration> {
    let path = "spec.quarantine.release.after";
    match release.release_after() {
        Ok(ReleaseAfter::Manual) => None,
        Ok(ReleaseAfter::Calm(d)) if d.as_secs_f64() >= 1.0 => Some(d),
        Ok(ReleaseAfter::Calm(_)) => {
            let s = release.after.trim();
            errs.push(FieldError::new(
                path,
                format!("{s:?} is shorter than 1s; a release needs a calm window"),
            ));
            None
        }
        Err(m) => {
            errs.push(FieldError::new(path, format!("{m}, or `manual`")));
            None
        }
    }
}

/// `spec.quarantine.escalation`: its action, and how long a quarantine may
/// go unenforced first (default 30s).
fn escalation(
    escalation: Option<&Escalation>,
    errs: &mut Vec<FieldError>,
) -> (EscalationAction, Duration) {
    let escalation = escalation.cloned().unwrap_or_default();
    let after = match escalation.after.as_deref().map(parse_duration) {
        None => Duration::from_secs(30),
        Some(Ok(d)) => d,
        Some(Err(m)) => {
            errs.push(FieldError::new(
                "spec.quarantine.escalation.after",
                m.to_string(),
            ));
            Duration::default()
        }
    };
    (escalation.action, after)
}

/// `spec.quarantine.limits.cooldown`: a duration.
fn cooldown(limits: &Limits, errs: &mut Vec<FieldError>) -> Duration {
    parse_duration(&limits.cooldown).unwrap_or_else(|m| {
        errs.push(FieldError::new(
            "spec.quarantine.limits.cooldown",
            m.to_string(),
        ));
        Duration::default()
    })
}

/// `spec.quarantine.limits.maxQuarantinedNodes`: at least one node, or a
/// percentage from 1% to 100%.
fn cap(max: &IntOrString, errs: &mut Vec<FieldError>) -> Cap {
    let path = "spec.quarantine.limits.maxQuarantinedNodes";
    match max {
        IntOrString::Int(n) if *n >= 1 => Cap::Nodes(*n as u32),
        IntOrString::Int(n) => {
            errs.push(FieldError::new(path, format!("{n} must be at least 1; pause the guard (spec.quarantine.paused) to stop new quarantines")));
            Cap::Nodes(1)
        }
        IntOrString::String(s) => match s.strip_suffix('%').map(str::parse::<u32>) {
            Some(Ok(p)) if (1..=100).contains(&p) => Cap::Percent(p),
            _ => {
                errs.push(FieldError::new(
                    path,
                    format!("{s:?} is neither a number of nodes nor a percentage from 1% to 100%"),
                ));
                Cap::Nodes(1)
            }
        },
    }
}

/// `spec.quarantine.triggers[i]`: its name, then its one source. `None`
/// when it names no source or both.
fn trigger(
    p: &QuarantinePolicy,
    i: usize,
    t: &Trigger,
    errs: &mut Vec<FieldError>,
) -> Option<(String, TriggerRule)> {
    let base = format!("spec.quarantine.triggers[{i}]");
    check_trigger_name(&p.triggers[..i], t, &base, errs);
    let rule = match (&t.prometheus, &t.alertmanager) {
        (Some(pr), None) => prometheus_rule(pr, &p.release, &t.name, &base, errs),
        (None, Some(am)) => alertmanager_rule(am, &base, errs),
        _ => {
            errs.push(FieldError::new(
                base,
                "set exactly one of `prometheus` and `alertmanager`",
            ));
            return None;
        }
    };
    Some((t.name.clone(), rule))
}

/// `triggers[i].name`: 1 to 63 characters, not `manual`, and not the name
/// of an `earlier` trigger.
fn check_trigger_name(earlier: &[Trigger], t: &Trigger, base: &str, errs: &mut Vec<FieldError>) {
    let path = format!("{base}.name");
    if t.name.is_empty() || Origin::of(&t.name).is_manual() || t.name.len() > 63 {
        errs.push(FieldError::new(
            path,
            format!(
                "{:?} must be 1 to 63 characters and not `manual` (reserved for people)",
                t.name
            ),
        ));
    } else if earlier.iter().any(|o| o.name == t.name) {
        errs.push(FieldError::new(
            path,
            format!(
                "{:?} is used by an earlier trigger; names must be unique",
                t.name
            ),
        ));
    }
}

/// `triggers[i].prometheus`: a query, exactly one finite threshold, a calm
/// threshold (`release.below`) on the calm side of it, and a hold duration.
fn prometheus_rule(
    pr: &PrometheusTrigger,
    release: &ReleasePolicy,
    name: &str,
    base: &str,
    errs: &mut Vec<FieldError>,
) -> TriggerRule {
    if pr.query.trim().is_empty() {
        errs.push(FieldError::new(
            format!("{base}.prometheus.query"),
            "is empty; write a PromQL query returning one series per node",
        ));
    }
    let (above, threshold) = match (pr.above, pr.below) {
        (Some(a), None) => (true, a),
        (None, Some(b)) => (false, b),
        _ => {
            errs.push(FieldError::new(
                format!("{base}.prometheus"),
                "set exactly one of `above` and `below`",
            ));
            (true, 0.0)
        }
    };
    if !threshold.is_finite() {
        errs.push(FieldError::new(
            format!("{base}.prometheus"),
            "the threshold must be a finite number",
        ));
    }
    if let Some(rb) = release.below {
        if above && rb > threshold {
            errs.push(FieldError::new("spec.quarantine.release.below", format!("{rb} is above trigger {name:?}'s threshold {threshold}; the calm threshold must not exceed the breach threshold")));
        }
    }
    let hold = match pr.r#for.as_deref().map(parse_duration) {
        None => Duration::default(),
        Some(Ok(d)) => d,
        Some(Err(m)) => {
            errs.push(FieldError::new(
                format!("{base}.prometheus.for"),
                m.to_string(),
            ));
            Duration::default()
        }
    };
    TriggerRule::Prometheus {
        query: pr.query.clone(),
        above,
        threshold,
        calm: release.below.unwrap_or(threshold),
        hold,
        node_label: pr.node_label.clone().filter(|l| !l.is_empty()),
    }
}

/// `triggers[i].alertmanager`: at least one matcher, each keyed by a
/// Prometheus label name.
fn alertmanager_rule(
    am: &AlertmanagerTrigger,
    base: &str,
    errs: &mut Vec<FieldError>,
) -> TriggerRule {
    if am.matchers.is_empty() {
        errs.push(FieldError::new(
            format!("{base}.alertmanager.matchers"),
            "is empty; match at least the alert name, e.g. {alertname: NodeEgressSaturated}",
        ));
    }
    // The matchers also select the trigger's `ALERTS` in Prometheus
    // (corroboration): each key must be a Prometheus label name.
    for k in am.matchers.keys().filter(|k| !is_label_name(k)) {
        errs.push(FieldError::new(
            format!("{base}.alertmanager.matchers.{k}"),
            "is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)",
        ));
    }
    TriggerRule::Alertmanager {
        matchers: am.matchers.clone(),
        node_label: am.node_label.clone().filter(|l| !l.is_empty()),
        corroborate: am.corroborate,
    }
}

/// Is `k` a Prometheus label name (`[a-zA-Z_][a-zA-Z0-9_]*`)?
fn is_label_name(k: &str) -> bool {
    let mut c = k.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_is_read_in_one_place() {
        assert_eq!(Origin::of("manual"), Origin::Manual);
        assert!(Origin::of(MANUAL).is_manual());
        assert_eq!(Origin::of("uplink"), Origin::Trigger("uplink"));
        assert!(!Origin::of("Manual").is_manual());
        let after = |a: &str| {
            ReleasePolicy {
                after: a.into(),
                below: None,
            }
            .release_after()
        };
        assert_eq!(after(" manual "), Ok(ReleaseAfter::Manual));
        assert_eq!(
            after("2m"),
            Ok(ReleaseAfter::Calm(Duration::from_secs(120)))
        );
        assert!(after("soon").is_err());
    }

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
