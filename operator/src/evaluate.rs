//! Three-valued evaluation of Prometheus triggers: every selected node is in
//! Breach, OK or Unknown, and only a breach that held for the trigger's `for`
//! counts. Pure: query answers and the clock in, readings out.
//!
//! Unknown is its own outcome, never a default: an unreachable Prometheus, an
//! error, an empty result for a node, NaN/Inf, a stale sample or a series that
//! names no Node all say "we do not know", which neither quarantines nor
//! releases (missing data read as healthy is how autoscalers scaled to zero
//! during outages). Series are mapped to nodes by label, never by position:
//! Prometheus does not order vectors.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::decide::NodeFacts;
use crate::prom::{QueryError, Series};
use crate::quarantine::{Breach, Signals};

/// A node's reading for one trigger at one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    /// Past the breach threshold.
    Breach {
        /// The value, as Prometheus wrote it.
        value: String,
    },
    /// Not a breach; `calm` when also past the release threshold.
    Ok {
        /// Below the calm (release) threshold.
        calm: bool,
    },
    /// No trustworthy value; why.
    Unknown(String),
}

impl Reading {
    /// `breach`, `ok` or `unknown`, for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Reading::Breach { .. } => "breach",
            Reading::Ok { .. } => "ok",
            Reading::Unknown(_) => "unknown",
        }
    }
}

/// Finds the Node a series names: by name, or by an InternalIP in `host:port`.
///
/// Addresses come from the nodes themselves (each kubelet writes its own
/// status), so an address two Nodes claim names neither: attributing it to
/// whichever came first would let one node make another's alerts its own.
#[derive(Debug, Default)]
pub struct NodeIndex {
    names: BTreeSet<String>,
    by_ip: BTreeMap<IpAddr, String>,
    ambiguous: BTreeMap<IpAddr, BTreeSet<String>>,
}

/// The label that names a node when a trigger does not say: the scrape
/// target Prometheus itself attaches (an exporter controls its own labels,
/// `node` included, unless Prometheus is told to honour them).
pub const DEFAULT_NODE_LABEL: &str = "instance";

/// Longest problem text kept from one answer: label values are Prometheus's
/// (and an exporter's) to choose, and the text reaches the guard's status.
const MAX_PROBLEM: usize = 512;

impl NodeIndex {
    /// Indexes nodes by name and InternalIP. Pass the facts after
    /// [`crate::decide::limit_node_addresses`], as every path does, so the
    /// receiver and the evaluation agree on which addresses count.
    pub fn new(nodes: &[NodeFacts]) -> NodeIndex {
        let mut ix = NodeIndex::default();
        for n in nodes {
            ix.names.insert(n.name.clone());
            for ip in &n.internal_ips {
                if let Some(claimants) = ix.ambiguous.get_mut(ip) {
                    claimants.insert(n.name.clone());
                    continue;
                }
                match ix.by_ip.get(ip) {
                    Some(other) if *other != n.name => {
                        let first = other.clone();
                        ix.by_ip.remove(ip);
                        ix.ambiguous
                            .insert(*ip, BTreeSet::from([first, n.name.clone()]));
                    }
                    _ => {
                        ix.by_ip.insert(*ip, n.name.clone());
                    }
                }
            }
        }
        ix
    }

    /// The Nodes claiming `ip` when more than one does.
    pub fn claimants(&self, ip: &IpAddr) -> Option<&BTreeSet<String>> {
        self.ambiguous.get(ip)
    }

    /// Why `value` names no node, for a log line or a status message.
    pub fn why_unresolved(&self, value: &str) -> String {
        let host = strip_port(value);
        match host
            .parse::<IpAddr>()
            .ok()
            .and_then(|ip| self.claimants(&ip))
        {
            Some(c) => format!(
                "address {host} is claimed by {} Nodes ({}{}): ambiguous, attributed to none",
                c.len(),
                c.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
                if c.len() > 3 {
                    format!(" and {} more", c.len() - 3)
                } else {
                    String::new()
                }
            ),
            None => format!("{value:?} is neither a Node name nor a Node's InternalIP"),
        }
    }

    /// The node a label value names: a node name, an address, or either with
    /// a `:port` (node-exporter's `instance` label).
    pub fn resolve(&self, value: &str) -> Option<String> {
        if self.names.contains(value) {
            return Some(value.to_string());
        }
        let host = strip_port(value);
        if self.names.contains(host) {
            return Some(host.to_string());
        }
        host.parse::<IpAddr>()
            .ok()
            .and_then(|ip| self.by_ip.get(&ip).cloned())
    }

    /// The node named by `labels` under `label` (default [`DEFAULT_NODE_LABEL`]).
    pub fn node_of(
        &self,
        labels: &BTreeMap<String, String>,
        label: Option<&str>,
    ) -> Option<String> {
        labels
            .get(label.unwrap_or(DEFAULT_NODE_LABEL))
            .and_then(|v| self.resolve(v))
    }
}

fn strip_port(v: &str) -> &str {
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match v.rsplit_once(':') {
        // One colon: host:port. More: a bare IPv6 address.
        Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => v,
    }
}

/// How a trigger reads values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Breach above (`true`) or below the threshold.
    pub above: bool,
    /// Breach threshold.
    pub breach: f64,
    /// Calm threshold (release).
    pub calm: f64,
}

impl Thresholds {
    fn read(&self, v: f64, raw: &str) -> Reading {
        let (breach, calm) = if self.above {
            (v > self.breach, v < self.calm)
        } else {
            (v < self.breach, v > self.calm)
        };
        if breach {
            Reading::Breach {
                value: raw.to_string(),
            }
        } else {
            Reading::Ok { calm }
        }
    }
}

/// One trigger's readings for the nodes it watches, and what could not be read.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Readings {
    /// Reading per node (every watched node is present).
    pub nodes: BTreeMap<String, Reading>,
    /// Problems to report on the guard (unmapped series, the query's error).
    pub problems: Vec<String>,
}

/// Reads one query answer for `watched` nodes at time `now` (unix seconds).
/// A sample older than `stale_after` seconds is Unknown.
pub fn read(
    answer: &Result<Vec<Series>, QueryError>,
    t: Thresholds,
    node_label: Option<&str>,
    watched: &[String],
    index: &NodeIndex,
    now: f64,
    stale_after: f64,
) -> Readings {
    let mut out = Readings::default();
    let series = match answer {
        Ok(s) => s,
        Err(e) => {
            let why = egressguard_crds::conditions::bounded(&e.to_string(), MAX_PROBLEM);
            for n in watched {
                out.nodes.insert(n.clone(), Reading::Unknown(why.clone()));
            }
            out.problems.push(why);
            return out;
        }
    };
    let watched_set: BTreeSet<&String> = watched.iter().collect();
    let mut per_node: BTreeMap<String, Vec<Reading>> = BTreeMap::new();
    for s in series {
        let Some(node) = index.node_of(&s.labels, node_label) else {
            let label = node_label.unwrap_or(DEFAULT_NODE_LABEL);
            let why = s.labels.get(label).map_or_else(
                || {
                    if node_label.is_none() && s.labels.contains_key("node") {
                        format!("no label {label} (it has `node`: set nodeLabel: node on the trigger if that label is trusted, or aggregate by instance)")
                    } else {
                        format!("no label {label}")
                    }
                },
                |v| index.why_unresolved(v),
            );
            out.problems.push(egressguard_crds::conditions::bounded(
                &format!(
                    "series {} names no Node by {label}: {why}",
                    render_labels(&s.labels)
                ),
                MAX_PROBLEM,
            ));
            continue;
        };
        if !watched_set.contains(&node) {
            continue;
        }
        let o = match s.value.parse::<f64>() {
            Ok(v) if v.is_finite() && (now - s.time).abs() <= stale_after => t.read(v, &s.value),
            Ok(v) if v.is_finite() => {
                Reading::Unknown(format!("stale sample ({:.0}s old)", now - s.time))
            }
            _ => Reading::Unknown(format!("value {} is not a finite number", s.value)),
        };
        per_node.entry(node).or_default().push(o);
    }
    for n in watched {
        let outcome = match per_node.remove(n) {
            None => Reading::Unknown("no series for this node in the result".into()),
            // Several series for one node (one per device, say): any breach
            // is a breach; otherwise any unknown makes the node unknown.
            Some(v) => v
                .iter()
                .find(|o| matches!(o, Reading::Breach { .. }))
                .or_else(|| v.iter().find(|o| matches!(o, Reading::Unknown(_))))
                .cloned()
                .unwrap_or(Reading::Ok {
                    calm: v.iter().all(|o| matches!(o, Reading::Ok { calm: true })),
                }),
        };
        out.nodes.insert(n.clone(), outcome);
    }
    out
}

fn render_labels(l: &BTreeMap<String, String>) -> String {
    let inner: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{{{}}}", inner.join(","))
}

/// Breach streaks across evaluations, per (guard, trigger, node): when the
/// current run of consecutive breaches began. Any other outcome ends it.
#[derive(Debug, Default, Clone)]
pub struct Streaks {
    since: BTreeMap<(String, String, String), f64>,
}

impl Streaks {
    /// Records one evaluation; returns when the breach streak began, if any.
    pub fn record(
        &mut self,
        guard: &str,
        trigger: &str,
        node: &str,
        o: &Reading,
        now: f64,
    ) -> Option<f64> {
        let key = (guard.to_string(), trigger.to_string(), node.to_string());
        if matches!(o, Reading::Breach { .. }) {
            Some(*self.since.entry(key).or_insert(now))
        } else {
            self.since.remove(&key);
            None
        }
    }

    /// Forgets guards and triggers that no longer exist.
    pub fn retain(&mut self, keep: impl Fn(&str, &str) -> bool) {
        self.since.retain(|(g, t, _), _| keep(g, t));
    }
}

/// Folds one node's reading for one trigger into its signals: a breach
/// counts once its streak (begun at `since`, unix seconds) held for the
/// trigger's `for`; calm only if every trigger reads calm. Returns why the
/// reading is unknown, if it is.
fn judge<'r>(
    s: &mut Signals,
    a: &Answer,
    o: &'r Reading,
    since: f64,
    now: Timestamp,
) -> Option<&'r str> {
    let now_s = now.as_millisecond() as f64 / 1000.0;
    match o {
        Reading::Breach { value } => {
            s.calm = false;
            if now_s - since >= a.hold.as_secs_f64() && s.breach.is_none() {
                s.breach = Some(Breach {
                    trigger: a.trigger.clone(),
                    query: a.query.clone(),
                    value: value.clone(),
                    since: Timestamp::from_millisecond((since * 1000.0) as i64).unwrap_or(now),
                    sample: now,
                });
            }
            None
        }
        Reading::Ok { calm } => {
            s.calm &= calm;
            None
        }
        Reading::Unknown(why) => {
            s.calm = false;
            if s.unknown.is_none() {
                s.unknown = Some(format!("trigger {}: {why}", a.trigger));
            }
            Some(why)
        }
    }
}

/// One trigger's answer from Prometheus, with what judging it takes.
#[derive(Debug)]
pub struct Answer {
    /// The guard.
    pub guard: String,
    /// The trigger's name.
    pub trigger: String,
    /// The PromQL asked.
    pub query: String,
    /// How its values read.
    pub thresholds: Thresholds,
    /// How long a breach must hold (`for`).
    pub hold: Duration,
    /// The series label naming the node.
    pub node_label: Option<String>,
    /// What Prometheus answered.
    pub answer: Result<Vec<Series>, QueryError>,
}

/// Why a guard's Prometheus readings are not all known: the first problem,
/// in words (for its `MetricsAvailable` condition).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MetricsUnavailable(pub String);

/// What the evaluations found, kept between passes by the leader.
#[derive(Debug, Default)]
pub struct EvalState {
    streaks: Streaks,
    /// Signals per (guard, node).
    pub signals: BTreeMap<(String, String), Signals>,
    /// Per guard with Prometheus triggers: Ok, or why metrics are unavailable.
    pub available: BTreeMap<String, Result<(), MetricsUnavailable>>,
    last: Option<Timestamp>,
}

impl EvalState {
    /// Is an evaluation due at `now`?
    pub fn due(&self, every: Duration, now: Timestamp) -> bool {
        self.last
            .is_none_or(|t| now.duration_since(t).as_secs_f64() >= every.as_secs_f64())
    }
}

/// Judges one evaluation's `answers` for the nodes each guard plans
/// (`planned`) and updates `state`: a breach counts once it held for its
/// trigger's `for` (its streak is kept across evaluations), a node is calm
/// only when every trigger reads calm, and a guard's metrics are available
/// only when every trigger read every node. Returns how many readings had
/// each outcome.
pub fn fold(
    state: &mut EvalState,
    answers: &[Answer],
    planned: &BTreeMap<String, Vec<String>>,
    index: &NodeIndex,
    interval: Duration,
    now: Timestamp,
) -> BTreeMap<&'static str, u64> {
    let now_s = now.as_millisecond() as f64 / 1000.0;
    // A sample older than two evaluations (or a minute) is stale.
    let stale_after = (2.0 * interval.as_secs_f64()).max(60.0);
    let mut signals: BTreeMap<(String, String), Signals> = BTreeMap::new();
    let mut available: BTreeMap<String, Result<(), MetricsUnavailable>> = BTreeMap::new();
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
    let none = Vec::new();
    for a in answers {
        let (guard, trigger) = (&a.guard, &a.trigger);
        seen.insert((guard.clone(), trigger.clone()));
        let nodes = planned.get(guard).unwrap_or(&none);
        let r = read(
            &a.answer,
            a.thresholds,
            a.node_label.as_deref(),
            nodes,
            index,
            now_s,
            stale_after,
        );
        let entry = available.entry(guard.clone()).or_insert(Ok(()));
        if let Some(p) = r.problems.first() {
            if entry.is_ok() {
                *entry = Err(MetricsUnavailable(format!("trigger {trigger}: {p}")));
            }
        }
        for (node, o) in &r.nodes {
            *counts.entry(o.label()).or_default() += 1;
            let s = signals
                .entry((guard.clone(), node.clone()))
                .or_insert(Signals {
                    calm: true,
                    ..Default::default()
                });
            let began = state.streaks.record(guard, trigger, node, o, now_s);
            let unknown = judge(s, a, o, began.unwrap_or(now_s), now);
            if let (Some(why), true) = (unknown, entry.is_ok()) {
                *entry = Err(MetricsUnavailable(format!(
                    "trigger {trigger}: node {node}: {why}"
                )));
            }
        }
    }
    state
        .streaks
        .retain(|g, t| seen.contains(&(g.to_string(), t.to_string())));
    state.signals = signals;
    state.available = available;
    state.last = Some(now);
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fact(name: &str, ip: &str) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            labels: Default::default(),
            internal_ips: vec![ip.parse().unwrap()],
        }
    }

    fn nodes() -> NodeIndex {
        NodeIndex::new(&[fact("worker-1", "10.0.0.1"), fact("worker-2", "fd00::2")])
    }

    fn series(labels: &[(&str, &str)], value: &str, time: f64) -> Series {
        Series {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            time,
            value: value.into(),
        }
    }

    const T: Thresholds = Thresholds {
        above: true,
        breach: 15e6,
        calm: 10e6,
    };

    #[test]
    fn instance_labels_map_to_nodes_by_name_or_address() {
        let ix = nodes();
        for (v, want) in [
            ("worker-1", Some("worker-1")),
            ("worker-1:9100", Some("worker-1")),
            ("10.0.0.1:9100", Some("worker-1")),
            ("[fd00::2]:9100", Some("worker-2")),
            ("fd00::2", Some("worker-2")),
            ("10.0.0.9:9100", None),
        ] {
            assert_eq!(ix.resolve(v).as_deref(), want, "{v}");
        }
    }

    #[test]
    fn every_node_is_breach_ok_or_unknown_whatever_the_order() {
        let ix = nodes();
        let watched = vec!["worker-1".to_string(), "worker-2".to_string()];
        let a = Ok(vec![
            series(&[("instance", "[fd00::2]:9100")], "12e6", 100.0),
            series(&[("instance", "10.0.0.1:9100")], "2e7", 100.0),
            series(&[("instance", "192.0.2.1:9100")], "1", 100.0),
        ]);
        let r = read(&a, T, None, &watched, &ix, 100.0, 60.0);
        assert_eq!(
            r.nodes["worker-1"],
            Reading::Breach {
                value: "2e7".into()
            }
        );
        // Between the thresholds: not a breach, not calm (hysteresis).
        assert_eq!(r.nodes["worker-2"], Reading::Ok { calm: false });
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        // Reversed order, same readings.
        let mut b = a.as_ref().unwrap().clone();
        b.reverse();
        assert_eq!(read(&Ok(b), T, None, &watched, &ix, 100.0, 60.0), r);
    }

    #[test]
    fn a_claimed_address_or_an_exporters_own_node_label_names_no_node() {
        let mut facts = vec![fact("worker-1", "10.0.0.1"), fact("worker-2", "10.0.0.2")];
        // worker-2's kubelet claims worker-1's address too.
        facts[1].internal_ips.push("10.0.0.1".parse().unwrap());
        let ix = NodeIndex::new(&facts);
        assert_eq!(ix.resolve("10.0.0.1:9100"), None);
        assert_eq!(ix.resolve("10.0.0.2:9100").as_deref(), Some("worker-2"));
        let watched = vec!["worker-1".to_string()];
        let a = Ok(vec![
            series(&[("instance", "10.0.0.1:9100")], "2e7", 100.0),
            // A series whose exporter writes node="worker-1" itself.
            series(
                &[("instance", "10.0.0.2:9100"), ("node", "worker-1")],
                "2e7",
                100.0,
            ),
        ]);
        let r = read(&a, T, None, &watched, &ix, 100.0, 60.0);
        assert!(matches!(&r.nodes["worker-1"], Reading::Unknown(_)), "{r:?}");
        assert!(
            r.problems
                .iter()
                .any(|p| p.contains("claimed by 2 Nodes (worker-1, worker-2)")),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn missing_data_is_unknown_never_ok() {
        let ix = nodes();
        let watched = vec!["worker-1".to_string(), "worker-2".to_string()];
        let down: Result<Vec<Series>, QueryError> =
            Err(QueryError::Unreachable("connection refused".into()));
        let r = read(&down, T, None, &watched, &ix, 100.0, 60.0);
        assert!(r.nodes.values().all(|o| matches!(o, Reading::Unknown(_))));
        let a = Ok(vec![
            series(&[("instance", "worker-1")], "NaN", 100.0),
            series(&[("instance", "worker-2")], "1", 10.0),
        ]);
        let r = read(&a, T, None, &watched, &ix, 100.0, 60.0);
        assert!(matches!(&r.nodes["worker-1"], Reading::Unknown(m) if m.contains("NaN")));
        assert!(matches!(&r.nodes["worker-2"], Reading::Unknown(m) if m.contains("stale")));
        let r = read(&Ok(vec![]), T, None, &watched, &ix, 100.0, 60.0);
        assert!(matches!(&r.nodes["worker-1"], Reading::Unknown(m) if m.contains("no series")));
        // One device breaching, another unknown: a breach.
        let a = Ok(vec![
            series(&[("instance", "worker-1"), ("device", "a")], "+Inf", 100.0),
            series(&[("instance", "worker-1"), ("device", "b")], "2e7", 100.0),
        ]);
        let r = read(&a, T, None, &watched, &ix, 100.0, 60.0);
        assert!(matches!(r.nodes["worker-1"], Reading::Breach { .. }));
    }

    #[test]
    fn a_streak_survives_only_consecutive_breaches() {
        let mut s = Streaks::default();
        let b = Reading::Breach { value: "1".into() };
        assert_eq!(s.record("g", "t", "n", &b, 10.0), Some(10.0));
        assert_eq!(s.record("g", "t", "n", &b, 20.0), Some(10.0));
        assert_eq!(
            s.record("g", "t", "n", &Reading::Unknown("x".into()), 30.0),
            None
        );
        assert_eq!(s.record("g", "t", "n", &b, 40.0), Some(40.0));
    }
}
