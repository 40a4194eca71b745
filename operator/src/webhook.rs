//! The Alertmanager receiver (`POST /alertmanager`): authenticated, bounded,
//! idempotent. It never quarantines by itself: it stores the intent as a
//! Pending Quarantine object named after the alert (guard, node, trigger,
//! fingerprint, startsAt), so Alertmanager's retries and HA duplicates hit
//! the same name, any replica can receive, and the leader admits or refuses
//! it with the same rails as every other quarantine.
//!
//! Answers: 200 once every intent is stored (or was already), 401 without
//! the token, 400 for malformed JSON or another webhook version, 413 over
//! 1 MiB, 503 while the API cannot store the intent (Alertmanager retries).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use egressguard_crds::conditions::bounded;
use egressguard_crds::quarantine::{Evidence, ReleaseCause, TriggerRule, EPISODE_LABEL};
use egressguard_crds::{EgressGuard, Mode, Phase, Quarantine, QuarantineSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::ObjectMeta;
use kube::ResourceExt;
use serde::Deserialize;

use crate::evaluate::{NodeIndex, DEFAULT_NODE_LABEL};
use crate::quarantine::{object_name, record_labels};

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY: usize = 1 << 20;
/// Notifications with more alerts than this are refused with 413: set
/// `max_alerts` on the Alertmanager receiver (and group by node).
pub const MAX_ALERTS: usize = 1000;

/// Alertmanager's webhook payload (version 4).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    /// Must be "4".
    pub version: String,
    /// Alerts in the group.
    #[serde(default)]
    pub alerts: Vec<Alert>,
    /// Alerts cut by `max_alerts`.
    #[serde(default)]
    pub truncated_alerts: u64,
}

/// One alert.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// `firing` or `resolved`.
    pub status: String,
    /// The alert's labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// When it started firing.
    #[serde(default)]
    pub starts_at: String,
    /// Hash of the label set.
    #[serde(default)]
    pub fingerprint: String,
}

/// Why a body was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadRequest {
    /// Not JSON of the expected shape.
    #[error("malformed Alertmanager notification: {0}")]
    Malformed(String),
    /// Another webhook version.
    #[error("webhook version {0:?} is not supported; Alertmanager 0.x sends \"4\"")]
    Version(String),
    /// More alerts than [`MAX_ALERTS`].
    #[error("{0} alerts in one notification, at most {MAX_ALERTS}: set max_alerts: {MAX_ALERTS} on the Alertmanager webhook receiver and group alerts by node")]
    TooManyAlerts(usize),
}

/// Parses a webhook body.
pub fn parse(body: &[u8]) -> Result<Notification, BadRequest> {
    let n: Notification =
        serde_json::from_slice(body).map_err(|e| BadRequest::Malformed(e.to_string()))?;
    if n.version != "4" {
        return Err(BadRequest::Version(n.version));
    }
    if n.alerts.len() > MAX_ALERTS {
        return Err(BadRequest::TooManyAlerts(n.alerts.len()));
    }
    Ok(n)
}

/// What one notification asks of one (guard, node, trigger): alerts are
/// folded per triple first, so thousands of fingerprints for one node are
/// one request, not thousands.
#[derive(Debug, Clone, PartialEq)]
pub enum Intent {
    /// A new episode: store this Pending quarantine.
    Start(Box<Quarantine>),
    /// The episode's alert fires again (a repeat, an HA duplicate, another
    /// fingerprint): counted on its record, and re-armed if it had resolved.
    Repeat {
        /// The episode's record.
        name: String,
        /// Firing alerts for the triple in this notification.
        alerts: u64,
        /// The record had been resolved: clear that (firing again).
        rearm: bool,
    },
    /// The episode's alert resolved.
    Resolved(String),
    /// A DryRun guard would quarantine the node: an Event only.
    WouldQuarantine(Triple),
    /// The node does not carry the guard's plan: nothing is stored.
    NotPlanned(Triple),
    /// Prometheus does not agree (a forged firing alert, or a forged
    /// resolve of an alert still firing): nothing is stored.
    Uncorroborated {
        /// Whose alert.
        triple: Triple,
        /// It claimed firing (`true`) or resolved.
        firing: bool,
    },
    /// A matching alert names no node (or an ambiguous one): nothing is stored.
    Unmapped {
        /// Guard.
        guard: String,
        /// Trigger.
        trigger: String,
        /// Why, with the alert's labels.
        why: String,
    },
}

/// One guard's trigger about one node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Triple {
    /// Guard.
    pub guard: String,
    /// Node.
    pub node: String,
    /// Trigger.
    pub trigger: String,
}

/// What a trigger's alerts must be corroborated with before they count.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Corroboration {
    /// The trigger's matchers: the `ALERTS` series to look for.
    pub matchers: BTreeMap<String, String>,
    /// The label naming the node.
    pub node_label: Option<String>,
}

impl Corroboration {
    /// The PromQL selecting the trigger's alerts firing in Prometheus.
    pub fn query(&self) -> String {
        let mut sel = vec![r#"alertstate="firing""#.to_string()];
        for (k, v) in &self.matchers {
            // Label names are `[a-zA-Z_][a-zA-Z0-9_]*` by Prometheus's rules;
            // the value is a quoted string, escaped as PromQL reads it.
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            sel.push(format!("{k}=\"{v}\""));
        }
        format!("ALERTS{{{}}}", sel.join(","))
    }
}

/// What the receiver knows when it folds a notification.
pub struct Facts<'a> {
    /// Every guard.
    pub guards: &'a [EgressGuard],
    /// Node names and addresses, after the node address policy.
    pub index: &'a NodeIndex,
    /// Nodes carrying each guard's plan (from the stored NodeShapings).
    pub planned: &'a BTreeMap<String, BTreeSet<String>>,
    /// Every Quarantine record.
    pub records: &'a [Arc<Quarantine>],
    /// The operator has a Prometheus to corroborate with.
    pub has_prometheus: bool,
    /// What Prometheus answered for each [`corroborations`] query: the
    /// nodes it has the trigger's alert firing for. A query missing here
    /// (no Prometheus) corroborates no firing alert.
    pub firing: &'a BTreeMap<Corroboration, BTreeSet<String>>,
}

/// One alertmanager trigger of a guard that takes alerts now.
struct AlertTrigger<'g> {
    guard: &'g EgressGuard,
    name: String,
    matchers: BTreeMap<String, String>,
    node_label: Option<String>,
    check: Option<Corroboration>,
}

fn alert_triggers(guards: &[EgressGuard], has_prometheus: bool) -> Vec<AlertTrigger<'_>> {
    let mut out = Vec::new();
    for g in guards {
        if g.metadata.deletion_timestamp.is_some() || g.spec.mode == Mode::Enforce {
            continue;
        }
        let Ok(Some(rules)) =
            egressguard_crds::quarantine::rules(g.spec.quarantine.as_ref(), g.spec.mode)
        else {
            continue;
        };
        for (name, rule) in rules.triggers {
            match rule {
                TriggerRule::Alertmanager {
                    matchers,
                    node_label,
                    corroborate,
                } => out.push(AlertTrigger {
                    guard: g,
                    name,
                    check: corroborate
                        .unwrap_or(has_prometheus)
                        .then(|| Corroboration {
                            matchers: matchers.clone(),
                            node_label: node_label.clone(),
                        }),
                    matchers,
                    node_label,
                }),
                TriggerRule::Prometheus { .. } => {}
            }
        }
    }
    out
}

/// The Prometheus queries that corroborate this notification's alerts:
/// one per trigger that some alert matches and that asks for corroboration.
pub fn corroborations(
    n: &Notification,
    guards: &[EgressGuard],
    has_prometheus: bool,
) -> BTreeSet<Corroboration> {
    alert_triggers(guards, has_prometheus)
        .into_iter()
        .filter(|t| {
            n.alerts
                .iter()
                .any(|a| t.matchers.iter().all(|(k, v)| a.labels.get(k) == Some(v)))
        })
        .filter_map(|t| t.check)
        .collect()
}

/// The latest record of a triple: highest episode, then newest.
fn latest<'r>(records: &'r [Arc<Quarantine>], t: &Triple) -> Option<&'r Arc<Quarantine>> {
    records
        .iter()
        .filter(|q| {
            q.spec.guard == t.guard && q.spec.node_name == t.node && q.spec.trigger == t.trigger
        })
        .max_by_key(|q| {
            (
                episode_of(q),
                q.metadata.creation_timestamp.as_ref().map(|c| c.0),
            )
        })
}

/// A record's episode number (0 for records from before episodes).
pub fn episode_of(q: &Quarantine) -> u64 {
    q.labels()
        .get(EPISODE_LABEL)
        .and_then(|e| e.parse().ok())
        .unwrap_or(0)
}

fn is_open(q: &Quarantine) -> bool {
    matches!(
        q.status.as_ref().and_then(|s| s.phase),
        None | Some(Phase::Pending | Phase::Active)
    )
}

/// A release a person made (annotation or delete): it holds against the
/// alert it overrode for as long as that alert keeps firing. Read from
/// `releaseCause`; a record released before that field existed says it
/// only in `releasedBy`'s words.
pub fn released_by_person(q: &Quarantine) -> bool {
    let Some(s) = q.status.as_ref() else {
        return false;
    };
    if s.phase != Some(Phase::Released) {
        return false;
    }
    match s.release_cause {
        Some(ReleaseCause::Person) => true,
        Some(
            ReleaseCause::Policy
            | ReleaseCause::GuardDeleted
            | ReleaseCause::NodeDeleted
            | ReleaseCause::Refused,
        ) => false,
        None => s
            .released_by
            .as_deref()
            .is_some_and(|b| b.starts_with(crate::quarantine::PERSON)),
    }
}

fn is_refused(q: &Quarantine) -> bool {
    q.status.as_ref().and_then(|s| s.phase) == Some(Phase::Refused)
}

fn resolved_at(q: &Quarantine) -> Option<Time> {
    q.status.as_ref().and_then(|s| s.alert_resolved_at.clone())
}

/// The alerts of one triple in one notification, after corroboration.
#[derive(Default)]
struct Folded<'n> {
    firing: u64,
    first: Option<&'n Alert>,
    resolved: bool,
}

/// What the notification asks of each guard's alertmanager triggers. Each
/// alert is corroborated first (a forged firing alert must neither start
/// an episode nor hide a real resolution), then alerts are folded per
/// (guard, node, trigger).
pub fn intents(n: &Notification, f: &Facts<'_>) -> Vec<Intent> {
    let mut out = Vec::new();
    for t in alert_triggers(f.guards, f.has_prometheus) {
        let guard = t.guard.name_any();
        let mut per_node: BTreeMap<String, Folded<'_>> = BTreeMap::new();
        for a in &n.alerts {
            if !t.matchers.iter().all(|(k, v)| a.labels.get(k) == Some(v)) {
                continue;
            }
            let firing = match a.status.as_str() {
                "firing" => true,
                "resolved" => false,
                _ => continue,
            };
            let label = t.node_label.as_deref().unwrap_or(DEFAULT_NODE_LABEL);
            let Some(node) = f.index.node_of(&a.labels, t.node_label.as_deref()) else {
                let why = a.labels.get(label).map_or_else(
                    || format!("the alert has no label {label}"),
                    |v| f.index.why_unresolved(v),
                );
                out.push(Intent::Unmapped {
                    guard: guard.clone(),
                    trigger: t.name.clone(),
                    why: bounded(&why, 256),
                });
                continue;
            };
            if let Some(c) = &t.check {
                // Firing needs Prometheus to have it firing; a resolve needs
                // it not to (a forged resolve must not release either).
                let seen = f.firing.get(c).is_some_and(|s| s.contains(&node));
                if seen != firing {
                    out.push(Intent::Uncorroborated {
                        triple: Triple {
                            guard: guard.clone(),
                            node,
                            trigger: t.name.clone(),
                        },
                        firing,
                    });
                    continue;
                }
            }
            let e = per_node.entry(node).or_default();
            if firing {
                e.firing += 1;
                e.first.get_or_insert(a);
            } else {
                e.resolved = true;
            }
        }
        for (node, folded) in per_node {
            let triple = Triple {
                guard: guard.clone(),
                node,
                trigger: t.name.clone(),
            };
            // A resolve always reaches the record it ends, planned or not.
            let planned = f
                .planned
                .get(&guard)
                .is_some_and(|p| p.contains(&triple.node));
            if !planned && folded.first.is_some() {
                out.push(Intent::NotPlanned(triple));
                continue;
            }
            out.extend(episode(t.guard, triple, &folded, f.records));
        }
    }
    out
}

/// What a triple's folded alerts do to its episode.
fn episode(
    g: &EgressGuard,
    t: Triple,
    folded: &Folded<'_>,
    records: &[Arc<Quarantine>],
) -> Option<Intent> {
    let last = latest(records, &t);
    let Some(a) = folded.first else {
        // Only resolutions: they end the latest episode.
        return last
            .filter(|q| folded.resolved && resolved_at(q).is_none())
            .map(|q| Intent::Resolved(q.name_any()));
    };
    if g.spec.mode == Mode::DryRun {
        return Some(Intent::WouldQuarantine(t));
    }
    // The episode goes on: an open record; a refused one whose alert never
    // resolved (the leader admits it once the rail that refused it clears);
    // or one a person released while its alert kept firing (the release
    // holds against that alert). A release for any other reason (the guard
    // or the node gone) ends the episode: the next firing starts another.
    let goes_on = |q: &Quarantine| {
        is_open(q) || (resolved_at(q).is_none() && (is_refused(q) || released_by_person(q)))
    };
    if let Some(q) = last.filter(|q| goes_on(q)) {
        return Some(Intent::Repeat {
            name: q.name_any(),
            alerts: folded.firing,
            // Always on an open record: idempotent, and right even when this
            // replica's cache has not seen a resolution yet.
            rearm: is_open(q),
        });
    }
    // An episode number someone set absurdly high starts nothing new (a
    // wrap to 0 would collide with the first episode forever).
    let episode = last.map_or(0, |q| episode_of(q)).checked_add(1)?;
    let name = object_name(&t.guard, &t.node, &format!("{}#{episode}", t.trigger));
    Some(Intent::Start(Box::new(Quarantine {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some(record_labels(&t.guard, &t.node, Some(episode))),
            ..Default::default()
        },
        spec: QuarantineSpec {
            evidence: Some(Evidence {
                fingerprint: Some(bounded(&a.fingerprint, 64)),
                labels: a
                    .labels
                    .iter()
                    .take(MAX_EVIDENCE_LABELS)
                    .map(|(k, v)| (bounded(k, 128), bounded(v, 256)))
                    .collect(),
                starts_at: Some(bounded(&a.starts_at, 64)),
                ..Default::default()
            }),
            release: g.spec.quarantine.as_ref().map(|q| q.release.clone()),
            reason: None,
            node_name: t.node,
            guard: t.guard,
            trigger: t.trigger,
        },
        status: None,
    })))
}

/// At most this many of an alert's labels are copied into a record.
const MAX_EVIDENCE_LABELS: usize = 32;

/// Compares the presented `Authorization` header with the token in constant time.
pub fn authorized(header: Option<&[u8]>, token: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    let Some(h) = header else { return false };
    let Some(presented) = h.strip_prefix(b"Bearer ") else {
        return false;
    };
    // Unequal lengths fail without comparing; the token's length is not a secret.
    !token.is_empty() && presented.ct_eq(token).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::NodeFacts;
    use egressguard_crds::load::parse_str;
    use egressguard_crds::QuarantineStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const GUARD: &str = "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: site}\nspec:\n  mode: Auto\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{port: 443}]}\n  quarantine:\n    triggers: [{name: alert, alertmanager: {matchers: {alertname: NodeEgressSaturated}EXTRA}}]\n";
    const LONG: &str = "a-node-name-that-is-seventy-characters-long-0123456789-abcdefghijklmn";

    fn guards(extra: &str) -> Vec<EgressGuard> {
        parse_str(&GUARD.replace("EXTRA", extra)).expect("guard")
    }

    /// A notification of `alerts`: (status, labels as JSON, fingerprint).
    fn notification(alerts: &[(&str, String, String)]) -> Notification {
        let items: Vec<String> = alerts
            .iter()
            .map(|(st, labels, fp)| {
                format!(r#"{{"status":"{st}","labels":{labels},"annotations":{{}},"startsAt":"2026-11-23T10:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"{fp}"}}"#)
            })
            .collect();
        let body = format!(
            r#"{{"version":"4","status":"firing","receiver":"eg","groupLabels":{{}},"commonLabels":{{}},"commonAnnotations":{{}},"externalURL":"http://am","truncatedAlerts":0,"alerts":[{}]}}"#,
            items.join(",")
        );
        parse(body.as_bytes()).expect("notification")
    }

    fn alert(status: &str, instance: &str, fp: &str) -> (&'static str, String, String) {
        let st = if status == "firing" {
            "firing"
        } else {
            "resolved"
        };
        (
            st,
            format!(r#"{{"alertname":"NodeEgressSaturated","instance":"{instance}"}}"#),
            fp.to_string(),
        )
    }

    fn nodes() -> Vec<NodeFacts> {
        let n = |name: &str, ip: &str| NodeFacts {
            name: name.into(),
            labels: Default::default(),
            internal_ips: vec![ip.parse().expect("ip")],
        };
        vec![
            n("worker-1", "10.0.0.1"),
            n("worker-2", "10.0.0.2"),
            n(LONG, "10.0.0.3"),
            // Two nodes claiming one address: it names neither.
            n("worker-4", "10.0.0.9"),
            n("worker-5", "10.0.0.9"),
        ]
    }

    struct World {
        guards: Vec<EgressGuard>,
        index: NodeIndex,
        planned: BTreeMap<String, BTreeSet<String>>,
        records: Vec<Arc<Quarantine>>,
        prometheus: bool,
        firing: BTreeMap<Corroboration, BTreeSet<String>>,
    }

    impl World {
        fn new(extra: &str) -> World {
            World {
                guards: guards(extra),
                index: NodeIndex::new(&nodes()),
                planned: BTreeMap::from([(
                    "site".to_string(),
                    ["worker-1", LONG, "worker-4", "worker-5"]
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                )]),
                records: Vec::new(),
                prometheus: false,
                firing: BTreeMap::new(),
            }
        }

        fn run(&self, n: &Notification) -> Vec<Intent> {
            intents(
                n,
                &Facts {
                    guards: &self.guards,
                    index: &self.index,
                    planned: &self.planned,
                    records: &self.records,
                    has_prometheus: self.prometheus,
                    firing: &self.firing,
                },
            )
        }

        /// Stores the record a Start asked for, in `phase`, resolved or not.
        fn store(&mut self, c: &Intent, phase: Option<Phase>, resolved: bool) -> String {
            let Intent::Start(q) = c else {
                panic!("not a start: {c:?}")
            };
            let mut q = (**q).clone();
            q.status = Some(QuarantineStatus {
                phase,
                alert_resolved_at: resolved
                    .then(|| Time("2026-11-23T11:00:00Z".parse().expect("t"))),
                ..Default::default()
            });
            let name = q.name_any();
            self.records.push(Arc::new(q));
            name
        }
    }

    #[test]
    fn thousands_of_fingerprints_for_one_node_are_one_episode() {
        let mut w = World::new("");
        let many: Vec<_> = (0..MAX_ALERTS)
            .map(|i| alert("firing", "10.0.0.1:9100", &format!("f{i}")))
            .collect();
        let n = notification(&many);
        let out = w.run(&n);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(
            out,
            w.run(&n),
            "the same notification names the same object"
        );
        let name = w.store(&out[0], Some(Phase::Active), false);
        assert!(name.ends_with(&format!("{:016x}", fnv_of("site", "worker-1", "alert#1"))));
        // Every later send, with any fingerprints, is counted on that record.
        let out = w.run(&n);
        assert_eq!(
            out,
            [Intent::Repeat {
                name: name.clone(),
                alerts: MAX_ALERTS as u64,
                rearm: true
            }]
        );
        // One more than the cap is refused whole, with the fix named.
        let over: String = (0..=MAX_ALERTS)
            .map(|i| format!(r#"{{"status":"firing","labels":{{}},"fingerprint":"f{i}"}}"#))
            .collect::<Vec<_>>()
            .join(",");
        let err = parse(format!(r#"{{"version":"4","alerts":[{over}]}}"#).as_bytes())
            .expect_err("too many");
        assert!(err.to_string().contains("max_alerts"), "{err}");
    }

    fn fnv_of(g: &str, n: &str, k: &str) -> u64 {
        let name = object_name(g, n, k);
        u64::from_str_radix(&name[name.len() - 16..], 16).expect("hex")
    }

    #[test]
    fn resolve_then_fire_rearms_the_same_record_and_a_new_episode_follows_a_resolved_release() {
        let mut w = World::new("");
        let fire = notification(&[alert("firing", "10.0.0.1:9100", "a")]);
        let name = w.store(&w.run(&fire)[0], Some(Phase::Active), false);
        let resolve = notification(&[alert("resolved", "10.0.0.1:9100", "a")]);
        assert_eq!(w.run(&resolve), [Intent::Resolved(name.clone())]);
        // Resolved, still Active (calm window running): firing again re-arms it.
        w.records.clear();
        let _ = w.store(&w.run(&fire)[0], Some(Phase::Active), true);
        assert_eq!(
            w.run(&fire),
            [Intent::Repeat {
                name: name.clone(),
                alerts: 1,
                rearm: true
            }]
        );
        // Released by a person while the alert kept firing: the repeat is
        // counted there, never a new quarantine.
        let by = |w: &mut World, who: &str| {
            if let Some(q) = w.records.last_mut() {
                let mut o = (**q).clone();
                if let Some(st) = o.status.as_mut() {
                    st.released_by = Some(who.to_string());
                }
                *q = Arc::new(o);
            }
        };
        w.records.clear();
        let _ = w.store(&w.run(&fire)[0], Some(Phase::Released), false);
        by(
            &mut w,
            "person: annotation egressguard.io/release=\"checked\"",
        );
        assert!(matches!(
            w.run(&fire)[0],
            Intent::Repeat { rearm: false, .. }
        ));
        // Released because its guard or node went away: the episode is over,
        // the next firing starts another.
        w.records.clear();
        let _ = w.store(&w.run(&fire)[0], Some(Phase::Released), false);
        by(&mut w, "EgressGuard site was deleted");
        assert!(matches!(w.run(&fire)[0], Intent::Start(_)));
        // Refused (say the cap) while it fires: counted there; the leader
        // admits that record once the rail clears.
        w.records.clear();
        let _ = w.store(&w.run(&fire)[0], Some(Phase::Refused), false);
        assert!(matches!(
            w.run(&fire)[0],
            Intent::Repeat { rearm: false, .. }
        ));
        // A resolve still reaches a record of a node no longer planned.
        w.planned.clear();
        let resolve = notification(&[alert("resolved", "10.0.0.1:9100", "a")]);
        assert!(matches!(w.run(&resolve)[0], Intent::Resolved(_)));
        assert!(matches!(w.run(&fire)[0], Intent::NotPlanned(_)));
        w.planned = World::new("").planned;
        // Released after the alert resolved: a new firing is a new episode.
        w.records.clear();
        let _ = w.store(&w.run(&fire)[0], Some(Phase::Released), true);
        let next = w.run(&fire);
        let Intent::Start(q) = &next[0] else {
            panic!("{next:?}")
        };
        assert_eq!(episode_of(q), 2);
        assert_ne!(q.name_any(), name);
    }

    #[test]
    fn a_person_s_release_is_read_from_its_cause_and_from_the_words_of_older_records() {
        let released = |cause: Option<ReleaseCause>, by: &str| {
            let mut q = Quarantine::new(
                "q",
                QuarantineSpec {
                    node_name: "n1".into(),
                    guard: "site".into(),
                    trigger: "alert".into(),
                    evidence: None,
                    release: None,
                    reason: None,
                },
            );
            q.status = Some(egressguard_crds::QuarantineStatus {
                phase: Some(Phase::Released),
                released_by: Some(by.into()),
                release_cause: cause,
                ..Default::default()
            });
            released_by_person(&q)
        };
        let person = "person: deleted Quarantine q";
        assert!(released(Some(ReleaseCause::Person), person));
        assert!(!released(
            Some(ReleaseCause::GuardDeleted),
            "EgressGuard site was deleted"
        ));
        assert!(!released(
            Some(ReleaseCause::Policy),
            "policy: every trigger calm"
        ));
        // Records from before releaseCause: the words say it.
        assert!(released(None, person));
        assert!(!released(None, "node n1 was deleted"));
    }

    #[test]
    fn only_planned_nodes_named_by_the_scrape_target_and_unambiguously_count() {
        let w = World::new("");
        let out = w.run(&notification(&[
            alert("firing", "10.0.0.2:9100", "x"),
            alert("firing", "10.0.0.9:9100", "y"),
            (
                "firing",
                r#"{"alertname":"NodeEgressSaturated","node":"worker-1"}"#.into(),
                "z".into(),
            ),
        ]));
        let got: Vec<String> = out
            .iter()
            .map(|c| match c {
                Intent::NotPlanned(t) => format!("not planned {}", t.node),
                Intent::Unmapped { why, .. } => format!("unmapped: {why}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got.contains(&"not planned worker-2".to_string()), "{got:?}");
        assert!(
            got.iter()
                .any(|g| g.contains("claimed by 2 Nodes (worker-4, worker-5)")),
            "{got:?}"
        );
        assert!(
            got.iter().any(|g| g.contains("no label instance")),
            "an exporter's own node label is not trusted by default: {got:?}"
        );
        // Unless the trigger names it.
        let w = World::new(", nodeLabel: node");
        let out = w.run(&notification(&[(
            "firing",
            r#"{"alertname":"NodeEgressSaturated","node":"worker-1"}"#.into(),
            "z".into(),
        )]));
        assert!(matches!(out[0], Intent::Start(_)), "{out:?}");
    }

    #[test]
    fn alerts_count_only_as_far_as_prometheus_agrees() {
        let mut w = World::new("");
        let fire = notification(&[alert("firing", "10.0.0.1:9100", "a")]);
        // Without a Prometheus, the token is all there is.
        assert!(corroborations(&fire, &w.guards, false).is_empty());
        assert!(matches!(w.run(&fire)[0], Intent::Start(_)));
        // With one, the trigger's alert must be firing there for the node.
        w.prometheus = true;
        let wanted = corroborations(&fire, &w.guards, true);
        let c = wanted.iter().next().expect("one query").clone();
        assert_eq!(
            c.query(),
            r#"ALERTS{alertstate="firing",alertname="NodeEgressSaturated"}"#
        );
        assert!(matches!(
            w.run(&fire)[0],
            Intent::Uncorroborated { firing: true, .. }
        ));
        w.firing
            .insert(c.clone(), BTreeSet::from(["worker-1".to_string()]));
        let name = w.store(&w.run(&fire)[0], Some(Phase::Active), false);
        // A forged firing alert in the same notification as the real
        // resolution (Alertmanager groups them) hides nothing.
        w.firing.clear();
        w.firing.insert(c.clone(), BTreeSet::new());
        let mixed = notification(&[
            alert("resolved", "10.0.0.1:9100", "a"),
            (
                "firing",
                r#"{"alertname":"NodeEgressSaturated","instance":"10.0.0.1:9100","forged":"1"}"#
                    .into(),
                "b".into(),
            ),
        ]);
        let out = w.run(&mixed);
        assert!(out.contains(&Intent::Resolved(name.clone())), "{out:?}");
        // A forged resolve of an alert still firing releases nothing.
        w.firing.insert(c, BTreeSet::from(["worker-1".to_string()]));
        let resolve = notification(&[alert("resolved", "10.0.0.1:9100", "a")]);
        assert!(matches!(
            w.run(&resolve)[0],
            Intent::Uncorroborated { firing: false, .. }
        ));
        // A trigger that opts out is never corroborated.
        let w = World::new(", corroborate: false");
        assert!(corroborations(&fire, &w.guards, true).is_empty());
        let quoted = Corroboration {
            matchers: BTreeMap::from([("a".to_string(), "x\"} or vector(1) #".to_string())]),
            node_label: None,
        };
        assert_eq!(
            quoted.query(),
            r#"ALERTS{alertstate="firing",a="x\"} or vector(1) #"}"#
        );
    }

    #[test]
    fn any_legal_node_name_gets_a_valid_record() {
        let w = World::new("");
        let out = w.run(&notification(&[alert("firing", "10.0.0.3:9100", "a")]));
        let Intent::Start(q) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(q.spec.node_name, LONG);
        let name = q.name_any();
        assert!(name.len() <= 253, "{name}");
        for v in q.labels().values() {
            assert!(v.len() <= 63, "label value {v}");
        }
        assert_eq!(
            q.labels()["egressguard.io/node"],
            crate::quarantine::label_value(LONG)
        );
        assert!(q.labels()["egressguard.io/node"].starts_with("h-"));
    }

    #[test]
    fn bad_bodies_and_tokens_are_refused() {
        assert!(matches!(parse(b"{not json"), Err(BadRequest::Malformed(_))));
        assert_eq!(
            parse(br#"{"version":"3","alerts":[]}"#).unwrap_err(),
            BadRequest::Version("3".into())
        );
        assert!(authorized(Some(b"Bearer s3cret"), b"s3cret"));
        assert!(!authorized(Some(b"Bearer s3creT"), b"s3cret"));
        assert!(!authorized(Some(b"s3cret"), b"s3cret"));
        assert!(!authorized(None, b"s3cret"));
        assert!(!authorized(Some(b"Bearer "), b""));
    }
}
