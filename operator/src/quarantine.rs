//! Which nodes are quarantined, by which guard, and what changes now. Pure:
//! the guards, the nodes, the Quarantine objects, the evaluated signals and
//! the clock in; one [`QuarantinePlan`] of writes and Events out.
//!
//! # Rules
//! - A Quarantine object is the only record of a quarantine: an alert (stored
//!   by the receiver as a Pending object), a person (`kubectl create`, trigger
//!   `manual`) and a confirmed Prometheus breach all go through one admission.
//! - Admission checks the rails, in this order: the guard exists, is valid,
//!   is in mode Auto and carries the node's plan; then, for automatic
//!   quarantines only, `paused`, the `egressguard.io/exclude` label, the
//!   cooldown since the node's last release, and the cap. A refusal is kept
//!   as a `Refused` record (objects) or an Event (Prometheus breaches, which
//!   repeat every evaluation, so they are not stored).
//! - Release: a person (annotation or delete), the guard or node going away,
//!   or the policy: every trigger calm for the node for `release.after`, with
//!   the calm window stored in `status.calmSince` so a restart does not lose
//!   it. Unknown interrupts the window: it never releases. Quarantines a
//!   person started are released only by a person.
//! - Released and Refused records are deleted after the retention.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use egressguard_crds::conditions::events;
use egressguard_crds::quarantine::ReleaseCause;
use egressguard_crds::quarantine::{
    EscalationAction, Origin, QuarantineRules, Refusal, ReleaseAfter, TriggerRule, EXCLUDE_LABEL,
    LEGACY_EXCLUDE_LABEL, RELEASE_ANNOTATION, RELEASE_FINALIZER,
};
use egressguard_crds::{EgressGuard, Mode, Phase, Quarantine, QuarantineSpec, QuarantineStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::enforcement::{self, NodeChange, NodeReport};
use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;
use kube::ResourceExt;

/// How `status.releasedBy` starts when a person released the quarantine.
pub const PERSON: &str = "person:";
/// Label of the record a person's delete leaves behind.
pub const TOMBSTONE_LABEL: &str = "egressguard.io/tombstone";

/// What the operator knows about a guard for quarantine decisions.
#[derive(Debug, Clone)]
pub struct GuardFacts<'a> {
    /// The guard.
    pub guard: &'a EgressGuard,
    /// Its checked quarantine policy; `None` when it has none or is invalid.
    pub rules: Option<QuarantineRules>,
    /// Nodes carrying this guard's plan.
    pub planned: BTreeSet<String>,
    /// How many nodes the guard selects (for a percentage cap).
    pub selected: usize,
}

/// A Prometheus breach that held for its trigger's `for`.
#[derive(Debug, Clone, PartialEq)]
pub struct Breach {
    /// The trigger.
    pub trigger: String,
    /// Its query.
    pub query: String,
    /// The value that confirmed it.
    pub value: String,
    /// When the streak began.
    pub since: Timestamp,
    /// The confirming sample's time.
    pub sample: Timestamp,
}

/// What the evaluated Prometheus triggers say about one node for one guard.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Signals {
    /// A confirmed breach, if any.
    pub breach: Option<Breach>,
    /// Every Prometheus trigger is calm for the node (vacuously true without any).
    pub calm: bool,
    /// Why the reading is unknown, if any trigger is.
    pub unknown: Option<String>,
}

/// Who an Event is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Subject {
    /// An EgressGuard.
    Guard(String),
    /// A Node.
    Node(String),
}

/// An Event to publish on each subject.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// The objects it is about.
    pub subjects: Vec<Subject>,
    /// Warning (a refusal) or Normal.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// The text.
    pub note: String,
    /// Set for notices that recur every evaluation while a condition holds:
    /// the executor publishes them once per continuous run of the key.
    pub once: Option<String>,
    /// The Quarantine object it concerns (the Event's related object, which
    /// also keeps Events of different quarantines from merging into one series).
    pub quarantine: Option<String>,
}

/// The writes and Events of one pass.
#[derive(Debug, Clone, Default)]
pub struct QuarantinePlan {
    /// New quarantines (from confirmed breaches), already admitted.
    pub create: Vec<Quarantine>,
    /// Status to write, by object name.
    pub status: Vec<(String, QuarantineStatus)>,
    /// Objects that get the release finalizer.
    pub add_finalizer: Vec<String>,
    /// Objects whose release finalizer goes (after the plans are written).
    pub remove_finalizer: Vec<String>,
    /// Records past their retention.
    pub delete: Vec<String>,
    /// Events.
    pub notices: Vec<Notice>,
    /// Quarantined nodes per guard after this pass.
    pub active: BTreeMap<String, BTreeSet<String>>,
    /// (guard, trigger) of quarantines started in this pass.
    pub started: Vec<(String, String)>,
    /// (guard, trigger) of quarantines released in this pass.
    pub released: Vec<(String, String)>,
    /// Escalations to apply to nodes, and the ones to undo.
    pub node_changes: Vec<(String, NodeChange)>,
    /// The resourceVersion each record was decided from: status writes are
    /// fenced on it, so a receiver's write in between (an alert firing
    /// again) is never overwritten by a decision that did not see it.
    pub versions: BTreeMap<String, String>,
}

/// Everything the planner reads.
#[derive(Debug)]
pub struct World<'a> {
    /// Guards by name.
    pub guards: BTreeMap<String, GuardFacts<'a>>,
    /// Labels of every Node, by name.
    pub nodes: BTreeMap<String, &'a BTreeMap<String, String>>,
    /// Every Quarantine object.
    pub quarantines: &'a [Arc<Quarantine>],
    /// Prometheus signals per (guard, node).
    pub signals: BTreeMap<(String, String), Signals>,
    /// Now.
    pub now: Timestamp,
    /// How long Released and Refused records are kept.
    pub retention: Duration,
    /// What each node's agent and Node object report about enforcement.
    pub enforcement: BTreeMap<String, NodeReport>,
}

fn secs_since(now: Timestamp, t: &Time) -> f64 {
    now.duration_since(t.0).as_secs_f64()
}

fn has_finalizer(q: &Quarantine) -> bool {
    q.finalizers().iter().any(|f| f == RELEASE_FINALIZER)
}

/// Does the trigger fire through Alertmanager (resolved by its alerts) rather
/// than by the operator's own evaluation (calm by its readings)? Every kind
/// is named: a new one must say which it is.
fn alert_kind(t: &TriggerRule) -> bool {
    match t {
        TriggerRule::Alertmanager { .. } => true,
        TriggerRule::Prometheus { .. } => false,
    }
}

fn is_alert(rules: Option<&QuarantineRules>, trigger: &str) -> bool {
    rules.is_some_and(|r| {
        r.triggers
            .iter()
            .any(|(n, t)| n == trigger && alert_kind(t))
    })
}

/// FNV-1a over the parts, NUL-separated: stable across versions and
/// platforms, unlike std's hasher.
fn fnv64(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, p) in parts.iter().enumerate() {
        let sep = (i > 0).then_some(0u8);
        for b in sep.into_iter().chain(p.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// A deterministic, DNS-safe object name for a quarantine (any replica that
/// computes it for the same event gets the same name, so duplicates collide).
/// The full 64-bit hash is kept: a name is also what a conflicting object
/// could squat on.
pub fn object_name(guard: &str, node: &str, key: &str) -> String {
    let h = fnv64(&[guard, node, key]);
    let name = format!("{guard}-{node}-{h:016x}");
    if name.len() <= 253 {
        name
    } else {
        format!("egq-{h:016x}")
    }
}

/// `value` as a label value: itself when it is one (at most 63 characters
/// of `[A-Za-z0-9._-]`, alphanumeric at both ends), else a hash of it. Node
/// and guard names may be 253 characters long; labels may not.
pub fn label_value(value: &str) -> String {
    let ok = value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && value
            .bytes()
            .next()
            .is_none_or(|b| b.is_ascii_alphanumeric())
        && value
            .bytes()
            .last()
            .is_none_or(|b| b.is_ascii_alphanumeric());
    if ok {
        value.to_string()
    } else {
        format!("h-{:016x}", fnv64(&[value]))
    }
}

/// The labels of a Quarantine record, for `kubectl get egq -l`.
pub fn record_labels(guard: &str, node: &str, episode: Option<u64>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        ("egressguard.io/guard".to_string(), label_value(guard)),
        ("egressguard.io/node".to_string(), label_value(node)),
    ]);
    if let Some(e) = episode {
        l.insert(
            egressguard_crds::quarantine::EPISODE_LABEL.to_string(),
            e.to_string(),
        );
    }
    l
}

struct Admission<'w, 'a> {
    world: &'w World<'a>,
    active: BTreeMap<String, BTreeSet<String>>,
}

impl Admission<'_, '_> {
    /// Why `node` may not be quarantined by `guard` now, if it may not.
    fn refusal(&self, guard: &str, node: &str, trigger: &str) -> Option<(Refusal, String)> {
        let Some(g) = self.world.guards.get(guard) else {
            return Some((
                Refusal::GuardNotFound,
                format!("EgressGuard {guard} does not exist"),
            ));
        };
        if g.guard.metadata.deletion_timestamp.is_some() {
            return Some((
                Refusal::GuardDeleting,
                format!("EgressGuard {guard} is being deleted"),
            ));
        }
        let Some(rules) = &g.rules else {
            return Some((Refusal::GuardNotAuto,
                format!("EgressGuard {guard} has no valid quarantine policy (spec.mode Auto with spec.quarantine)"),
            ));
        };
        match g.guard.spec.mode {
            Mode::Auto => {}
            Mode::DryRun => return Some((Refusal::DryRun, format!("EgressGuard {guard} is a dry run: would quarantine {node}"))),
            Mode::Enforce => return Some((Refusal::GuardNotAuto, format!("EgressGuard {guard} is in mode Enforce: every selected node is throttled already"))),
        }
        if !g.planned.contains(node) {
            return Some((Refusal::NodeNotSelected, format!("node {node} does not carry EgressGuard {guard}'s plan (not selected, gone, or claimed by an older guard)")));
        }
        if self.active.get(guard).is_some_and(|s| s.contains(node)) {
            return Some((
                Refusal::AlreadyQuarantined,
                format!("node {node} is already quarantined by EgressGuard {guard}"),
            ));
        }
        let trigger = match Origin::of(trigger) {
            // A person's quarantine: the automatic rails below do not apply.
            Origin::Manual => return None,
            Origin::Trigger(name) => name,
        };
        if !rules.triggers.iter().any(|(n, _)| n == trigger) {
            return Some((Refusal::UnknownTrigger, format!("EgressGuard {guard} has no trigger {trigger:?}; a person uses trigger `manual`")));
        }
        if rules.paused {
            return Some((Refusal::Paused, format!("EgressGuard {guard} is paused (spec.quarantine.paused): no new automatic quarantines")));
        }
        if self
            .world
            .nodes
            .get(node)
            .and_then(|l| l.get(EXCLUDE_LABEL))
            .is_some_and(|v| v == "true")
        {
            return Some((
                Refusal::NodeExcluded,
                format!(
                    "node {node} is labelled {EXCLUDE_LABEL}=true: never quarantined automatically"
                ),
            ));
        }
        let last_release = self
            .world
            .quarantines
            .iter()
            .filter(|q| q.spec.guard == guard && q.spec.node_name == node)
            .filter(|q| q.status.as_ref().and_then(|s| s.phase) == Some(Phase::Released))
            .filter_map(|q| q.status.as_ref().and_then(|s| s.released_at.clone()))
            .max_by_key(|t| t.0);
        if let Some(t) = last_release {
            let since = secs_since(self.world.now, &t);
            if since < rules.cooldown.as_secs_f64() {
                return Some((Refusal::Cooldown, format!("node {node} was released {since:.0}s ago; the cooldown is {}s (spec.quarantine.limits.cooldown)", rules.cooldown.as_secs())));
            }
        }
        let cap = rules.cap.of(g.selected);
        let now = self.active.get(guard).map_or(0, BTreeSet::len);
        if now >= cap {
            return Some((Refusal::CapReached, format!("{now} of EgressGuard {guard}'s nodes are quarantined, the cap is {cap} (spec.quarantine.limits.maxQuarantinedNodes)")));
        }
        None
    }

    fn admit(&mut self, guard: &str, node: &str) {
        self.active
            .entry(guard.to_string())
            .or_default()
            .insert(node.to_string());
    }
}

fn who(q: &Quarantine) -> Vec<Subject> {
    vec![
        Subject::Guard(q.spec.guard.clone()),
        Subject::Node(q.spec.node_name.clone()),
    ]
}

fn describe(q: &Quarantine) -> String {
    match &q.spec.evidence {
        Some(e) if e.query.is_some() => format!(
            "trigger {} (value {} since {})",
            q.spec.trigger,
            e.value.as_deref().unwrap_or("?"),
            e.breach_since
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default()
        ),
        Some(e) if e.fingerprint.is_some() => format!(
            "trigger {} (alert {} {}, fingerprint {})",
            q.spec.trigger,
            e.labels.get("alertname").map(String::as_str).unwrap_or("?"),
            e.starts_at.as_deref().unwrap_or(""),
            e.fingerprint.as_deref().unwrap_or("")
        ),
        _ => format!(
            "trigger {}{}",
            q.spec.trigger,
            q.spec
                .reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
    }
}

/// Plans one pass.
pub fn plan(world: &World<'_>) -> QuarantinePlan {
    let mut qs: Vec<&Arc<Quarantine>> = world.quarantines.iter().collect();
    // Oldest first: the first quarantine of a node wins, whatever order the
    // cache lists them in.
    qs.sort_by_key(|q| {
        (
            q.metadata.creation_timestamp.as_ref().map(|t| t.0),
            q.name_any(),
        )
    });
    let mut pl = Planner::new(world);
    // Active ones first, so admission sees every node already quarantined.
    for q in qs.iter().filter(|q| phase(q) == Some(Phase::Active)) {
        if q.metadata.deletion_timestamp.is_none() {
            pl.adm.admit(&q.spec.guard, &q.spec.node_name);
        }
    }
    for q in &qs {
        pl.record(q);
    }
    // Confirmed Prometheus breaches start new quarantines.
    for ((guard, node), s) in &world.signals {
        if let Some(b) = &s.breach {
            pl.breach(guard, node, b);
        }
    }
    pl.legacy_exclude_labels();
    pl.finish()
}

fn phase(q: &Quarantine) -> Option<Phase> {
    q.status.as_ref().and_then(|s| s.phase)
}

/// One pass's quarantine plan as it is built: the plan, the admissions so
/// far, and the nodes Active quarantines escalate.
struct Planner<'w, 'a> {
    world: &'w World<'a>,
    p: QuarantinePlan,
    adm: Admission<'w, 'a>,
    /// Nodes an Active quarantine escalates: (action, the quarantine).
    escalate: BTreeMap<String, (EscalationAction, String)>,
    now: Time,
}

impl<'w, 'a> Planner<'w, 'a> {
    fn new(world: &'w World<'a>) -> Self {
        Planner {
            world,
            p: QuarantinePlan {
                versions: world
                    .quarantines
                    .iter()
                    .filter_map(|q| Some((q.name_any(), q.resource_version()?)))
                    .collect(),
                ..QuarantinePlan::default()
            },
            adm: Admission {
                world,
                active: BTreeMap::new(),
            },
            escalate: BTreeMap::new(),
            now: Time(world.now),
        }
    }

    fn finish(mut self) -> QuarantinePlan {
        self.p.active = self.adm.active;
        self.p.node_changes = node_changes(self.world, &self.escalate, &mut self.p.notices);
        settle(self.world, &mut self.p);
        self.p
    }

    /// What becomes of one stored record this pass.
    fn record(&mut self, q: &Quarantine) {
        let st = q.status.clone().unwrap_or_default();
        if q.metadata.deletion_timestamp.is_some() {
            return self.deleted(q, &st);
        }
        let rules = self
            .world
            .guards
            .get(&q.spec.guard)
            .and_then(|g| g.rules.as_ref());
        match st.phase {
            // A release record whose status write was lost is still a
            // release, never a quarantine to admit.
            None if q.labels().contains_key(TOMBSTONE_LABEL) => {
                let mut next = st;
                next.phase = Some(Phase::Released);
                next.released_at = Some(self.now.clone());
                next.released_by = Some(format!("{PERSON} deleted a quarantine of this node"));
                next.release_cause = Some(ReleaseCause::Person);
                self.p.status.push((q.name_any(), next));
            }
            // A rail refused it, but its alert has not resolved: admitted once
            // the rail clears (cap freed, cooldown over, unpaused), as a
            // Prometheus breach is re-checked at every evaluation.
            Some(Phase::Refused)
                if is_alert(rules, &q.spec.trigger)
                    && st.alert_resolved_at.is_none()
                    && self
                        .adm
                        .refusal(&q.spec.guard, &q.spec.node_name, &q.spec.trigger)
                        .is_none() =>
            {
                self.start(
                    q,
                    st,
                    ", refused before; its alert still fires and the rail cleared",
                );
            }
            None | Some(Phase::Pending) => {
                match self
                    .adm
                    .refusal(&q.spec.guard, &q.spec.node_name, &q.spec.trigger)
                {
                    Some((reason, why)) => self.refuse(q, st, reason, &why),
                    None => self.start(q, st, ""),
                }
            }
            Some(Phase::Active) => self.active(q, st),
            Some(Phase::Released | Phase::Refused) => {
                let name = q.name_any();
                if has_finalizer(q) {
                    self.p.remove_finalizer.push(name.clone());
                }
                if expired(self.world, q, rules) {
                    self.p.delete.push(name);
                }
            }
        }
    }

    /// A record being deleted: an Active one is released first (a release
    /// record keeps the memory), then its finalizer goes.
    fn deleted(&mut self, q: &Quarantine, st: &QuarantineStatus) {
        if !has_finalizer(q) {
            return;
        }
        let name = q.name_any();
        if st.phase == Some(Phase::Active) {
            if let Some(s) = self.adm.active.get_mut(&q.spec.guard) {
                s.remove(&q.spec.node_name);
            }
            self.p.notices.push(Notice {
                subjects: who(q),
                warning: false,
                reason: events::RELEASED,
                note: format!(
                    "node {} released from EgressGuard {}: Quarantine {name} was deleted",
                    q.spec.node_name, q.spec.guard
                ),
                once: None,
                quarantine: Some(name.clone()),
            });
            self.p
                .released
                .push((q.spec.guard.clone(), q.spec.trigger.clone()));
            self.p.create.push(tombstone(q, &self.now));
        }
        self.p.remove_finalizer.push(name);
    }

    /// Admits `q`: Active from now, finalizer added, announced (`why`
    /// completes the note).
    fn start(&mut self, q: &Quarantine, st: QuarantineStatus, why: &str) {
        let name = q.name_any();
        self.adm.admit(&q.spec.guard, &q.spec.node_name);
        let mut next = st;
        next.phase = Some(Phase::Active);
        next.since = Some(self.now.clone());
        next.released_at = None;
        next.released_by = None;
        next.release_cause = None;
        self.p.add_finalizer.push(name.clone());
        self.p
            .started
            .push((q.spec.guard.clone(), q.spec.trigger.clone()));
        self.p.notices.push(Notice {
            subjects: who(q),
            warning: true,
            reason: events::QUARANTINED,
            note: format!(
                "node {} quarantined by EgressGuard {}: {} (Quarantine {name}{why})",
                q.spec.node_name,
                q.spec.guard,
                describe(q)
            ),
            once: None,
            quarantine: Some(name.clone()),
        });
        self.p.status.push((name, next));
    }

    /// Refuses `q` by the first rail it hit.
    fn refuse(&mut self, q: &Quarantine, st: QuarantineStatus, reason: Refusal, why: &str) {
        let name = q.name_any();
        let mut next = st;
        next.phase = Some(Phase::Refused);
        next.released_at = Some(self.now.clone());
        next.released_by = Some(format!("refused ({reason}): {why}"));
        next.release_cause = Some(ReleaseCause::Refused);
        crate::quarantine_progress::refused(&mut next, &reason.to_string(), why, self.world.now);
        self.p.notices.push(Notice {
            subjects: who(q),
            warning: reason != Refusal::DryRun,
            reason: refusal_event(reason),
            note: format!(
                "Quarantine {name} of node {} by {}: {why}",
                q.spec.node_name,
                describe(q)
            ),
            once: None,
            quarantine: Some(name.clone()),
        });
        self.p.status.push((name, next));
    }

    /// An Active quarantine: released when a person, a deletion or the
    /// release policy says so; otherwise its enforcement is checked.
    fn active(&mut self, q: &Quarantine, st: QuarantineStatus) {
        let name = q.name_any();
        if !has_finalizer(q) {
            self.p.add_finalizer.push(name.clone());
        }
        let mut next = st.clone();
        let released_by = self
            .forced_release(q)
            .or_else(|| self.policy_release(q, &mut next));
        if let Some((cause, by)) = released_by {
            self.release(q, &mut next, cause, by);
        }
        if next.phase == Some(Phase::Active) {
            let rules = self
                .world
                .guards
                .get(&q.spec.guard)
                .and_then(|g| g.rules.as_ref());
            enforced(
                self.world,
                q,
                rules,
                &mut next,
                &mut self.p,
                &mut self.escalate,
            );
        }
        if next != st {
            self.p.status.push((name, next));
        }
    }

    /// A release nobody's policy decides: a person's annotation, the guard
    /// or the node deleted.
    fn forced_release(&self, q: &Quarantine) -> Option<(ReleaseCause, String)> {
        if let Some(why) = q.annotations().get(RELEASE_ANNOTATION) {
            Some((
                ReleaseCause::Person,
                format!("{PERSON} annotation {RELEASE_ANNOTATION}={why:?}"),
            ))
        } else if !self.world.guards.contains_key(&q.spec.guard) {
            Some((
                ReleaseCause::GuardDeleted,
                format!("EgressGuard {} was deleted", q.spec.guard),
            ))
        } else if !self.world.nodes.contains_key(&q.spec.node_name) {
            Some((
                ReleaseCause::NodeDeleted,
                format!("node {} was deleted", q.spec.node_name),
            ))
        } else {
            None
        }
    }

    /// The release policy: every trigger calm for `release.after`. Keeps
    /// `next.calmSince` up to date on the way.
    fn policy_release(
        &self,
        q: &Quarantine,
        next: &mut QuarantineStatus,
    ) -> Option<(ReleaseCause, String)> {
        let (calm, window) = calm(self.world, q);
        next.calm_since = if calm {
            next.calm_since.clone().or(Some(self.now.clone()))
        } else {
            None
        };
        match (window, &next.calm_since) {
            (Some(after), Some(since))
                if secs_since(self.world.now, since) >= after.as_secs_f64() =>
            {
                Some((
                    ReleaseCause::Policy,
                    format!(
                        "policy: every trigger calm for node {} since {} (release.after {}s)",
                        q.spec.node_name,
                        since.0,
                        after.as_secs()
                    ),
                ))
            }
            _ => None,
        }
    }

    /// Ends `q` now, `by` whom or what.
    fn release(
        &mut self,
        q: &Quarantine,
        next: &mut QuarantineStatus,
        cause: ReleaseCause,
        by: String,
    ) {
        let name = q.name_any();
        next.phase = Some(Phase::Released);
        next.released_at = Some(self.now.clone());
        next.released_by = Some(by.clone());
        next.release_cause = Some(cause);
        if let Some(s) = self.adm.active.get_mut(&q.spec.guard) {
            s.remove(&q.spec.node_name);
        }
        self.p.remove_finalizer.push(name.clone());
        self.p
            .released
            .push((q.spec.guard.clone(), q.spec.trigger.clone()));
        self.p.notices.push(Notice {
            subjects: who(q),
            warning: false,
            reason: events::RELEASED,
            note: format!(
                "node {} released from EgressGuard {} (Quarantine {name}): {by}",
                q.spec.node_name, q.spec.guard
            ),
            once: None,
            quarantine: Some(name),
        });
    }

    /// A confirmed breach on `node`: a new quarantine, unless the node is
    /// quarantined by the guard already, not planned by it, or a rail says no.
    fn breach(&mut self, guard: &str, node: &str, b: &Breach) {
        let Some(g) = self.world.guards.get(guard) else {
            return;
        };
        if self.adm.active.get(guard).is_some_and(|a| a.contains(node)) || !g.planned.contains(node)
        {
            return;
        }
        if let Some((reason, why)) = self.adm.refusal(guard, node, &b.trigger) {
            self.p.notices.push(Notice {
                subjects: vec![Subject::Guard(guard.into()), Subject::Node(node.into())],
                warning: reason != Refusal::DryRun,
                reason: refusal_event(reason),
                note: format!(
                    "trigger {} in breach on node {} (value {}): {why}",
                    b.trigger, node, b.value
                ),
                once: Some(format!("{guard}/{node}/{reason}")),
                quarantine: None,
            });
            return;
        }
        self.adm.admit(guard, node);
        let release = g.guard.spec.quarantine.as_ref().map(|q| q.release.clone());
        let obj = breach_record(guard, node, b, release, &self.now);
        let name = obj.name_any();
        self.p.started.push((guard.into(), b.trigger.clone()));
        self.p.notices.push(Notice {
            subjects: vec![Subject::Guard(guard.into()), Subject::Node(node.into())],
            warning: true,
            reason: events::QUARANTINED,
            note: format!(
                "node {node} quarantined by EgressGuard {guard}: {} (Quarantine {name})",
                describe(&obj)
            ),
            once: None,
            quarantine: Some(name),
        });
        self.p.create.push(obj);
    }

    /// Said once per node while it lasts: the old exclusion label exempts
    /// nothing now, and whoever set it should know.
    fn legacy_exclude_labels(&mut self) {
        for (node, labels) in &self.world.nodes {
            if labels
                .get(LEGACY_EXCLUDE_LABEL)
                .is_some_and(|v| v == "true")
            {
                self.p.notices.push(Notice {
                    subjects: vec![Subject::Node(node.clone())],
                    warning: true,
                    reason: events::LEGACY_EXCLUDE_LABEL,
                    note: format!("node {node} is labelled {LEGACY_EXCLUDE_LABEL}=true, which no longer exempts it from automatic quarantine (a node's own kubelet can set it); use {EXCLUDE_LABEL}"),
                    once: Some(format!("legacy-exclude/{node}")),
                    quarantine: None,
                });
            }
        }
    }
}

/// The Event reason of a refusal: a dry run's is an announcement.
fn refusal_event(reason: Refusal) -> &'static str {
    match reason {
        Refusal::DryRun => events::WOULD_QUARANTINE,
        _ => events::QUARANTINE_REFUSED,
    }
}

/// The record of a quarantine a confirmed breach starts.
fn breach_record(
    guard: &str,
    node: &str,
    b: &Breach,
    release: Option<egressguard_crds::quarantine::ReleasePolicy>,
    now: &Time,
) -> Quarantine {
    let name = object_name(
        guard,
        node,
        &format!("{}/{}", b.trigger, b.since.as_second()),
    );
    Quarantine {
        metadata: ObjectMeta {
            name: Some(name),
            finalizers: Some(vec![RELEASE_FINALIZER.into()]),
            labels: Some(record_labels(guard, node, None)),
            ..Default::default()
        },
        spec: QuarantineSpec {
            node_name: node.into(),
            guard: guard.into(),
            trigger: b.trigger.clone(),
            evidence: Some(egressguard_crds::quarantine::Evidence {
                query: Some(b.query.clone()),
                value: Some(b.value.clone()),
                breach_since: Some(Time(b.since)),
                sample_time: Some(Time(b.sample)),
                ..Default::default()
            }),
            release,
            reason: None,
        },
        status: Some(QuarantineStatus {
            phase: Some(Phase::Active),
            since: Some(now.clone()),
            ..Default::default()
        }),
    }
}

/// Is a closed record past keeping? Past the retention, and also past its
/// guard's cooldown (the record is the memory of a release: deleting it
/// sooner would let the next alert quarantine the node again at once), and
/// not the record of an alert still firing (its repeats are counted on it;
/// a new record would start a new episode).
fn expired(world: &World<'_>, q: &Quarantine, rules: Option<&QuarantineRules>) -> bool {
    let st = q.status.clone().unwrap_or_default();
    let keep = world
        .retention
        .max(rules.map_or(Duration::ZERO, |r| r.cooldown))
        .as_secs_f64();
    let ended = st
        .released_at
        .as_ref()
        .or(q.metadata.creation_timestamp.as_ref());
    let old = |t: Option<&Time>| t.is_none_or(|t| secs_since(world.now, t) > keep);
    ended.is_some_and(|t| old(Some(t))) && old(st.last_alert_at.as_ref())
}

/// The record left when a person deletes an Active quarantine: the release
/// is remembered (for the cooldown, and for the episode of an alert that
/// keeps firing) even though its object is gone.
fn tombstone(q: &Quarantine, now: &Time) -> Quarantine {
    let name = q.name_any();
    let st = q.status.clone().unwrap_or_default();
    Quarantine {
        metadata: ObjectMeta {
            name: Some(object_name(
                &q.spec.guard,
                &q.spec.node_name,
                &format!("deleted/{name}"),
            )),
            labels: Some({
                let mut l = q.labels().clone();
                l.insert(TOMBSTONE_LABEL.into(), "true".into());
                l
            }),
            ..Default::default()
        },
        spec: QuarantineSpec {
            reason: Some(egressguard_crds::conditions::bounded(
                &format!(
                    "record of Quarantine {name}, deleted by a person{}",
                    q.spec
                        .reason
                        .as_ref()
                        .map(|r| format!(" (it said: {r})"))
                        .unwrap_or_default()
                ),
                512,
            )),
            ..q.spec.clone()
        },
        status: Some(QuarantineStatus {
            phase: Some(Phase::Released),
            released_at: Some(now.clone()),
            released_by: Some(format!("{PERSON} deleted Quarantine {name}")),
            release_cause: Some(ReleaseCause::Person),
            conditions: Vec::new(),
            ..st
        }),
    }
}

/// Sets the `Enforced` condition of an Active quarantine, with a warning
/// when it stops holding, and records the escalation its guard asks for.
fn enforced(
    world: &World<'_>,
    q: &Quarantine,
    rules: Option<&QuarantineRules>,
    next: &mut QuarantineStatus,
    p: &mut QuarantinePlan,
    escalate: &mut BTreeMap<String, (EscalationAction, String)>,
) {
    let node = &q.spec.node_name;
    let name = q.name_any();
    let report = world.enforcement.get(node);
    let (status, reason, message) = match report.map(|r| r.plan_guard.as_deref()) {
        // A quarantine that cannot be enforced says so; it is never counted
        // as holding.
        Some(other) if other != Some(q.spec.guard.as_str()) => (
            "False",
            enforcement::reasons::NOT_PLANNED,
            format!(
                "node {node} carries {}: EgressGuard {}'s throttle is not applied there",
                other.map_or("no plan".to_string(), |o| format!("EgressGuard {o}'s plan")),
                q.spec.guard
            ),
        ),
        _ => enforcement::verdict(node, report, world.now),
    };
    let prev = next
        .conditions
        .iter()
        .find(|c| c.type_ == enforcement::ENFORCED_CONDITION)
        .cloned();
    let since = match &prev {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(world.now),
    };
    if status != "True" && prev.as_ref().is_some_and(|c| c.status == "True") {
        p.notices.push(Notice {
            subjects: who(q),
            warning: true,
            reason: events::QUARANTINE_NOT_ENFORCED,
            note: format!("Quarantine {name} of node {node} is not enforced: {message}"),
            once: None,
            quarantine: Some(name.clone()),
        });
    }
    next.conditions
        .retain(|c| c.type_ != enforcement::ENFORCED_CONDITION);
    next.conditions.push(Condition {
        type_: enforcement::ENFORCED_CONDITION.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: q.metadata.generation,
        last_transition_time: since.clone(),
    });
    let Some((action, after)) = rules.map(|r| r.escalation) else {
        return;
    };
    let already = report.is_some_and(|r| {
        r.cordoned_by.as_deref() == Some(&name) || r.tainted_by.as_deref() == Some(&name)
    });
    let overdue = status != "True" && secs_since(world.now, &since) >= after.as_secs_f64();
    if action != EscalationAction::None && (overdue || already) {
        escalate.entry(node.clone()).or_insert((action, name));
    }
}

/// Settles every record the plan writes or creates, and writes the records
/// whose stored status lacks them (records from before, or whose verdict
/// changed nothing else).
fn settle(world: &World<'_>, p: &mut QuarantinePlan) {
    for q in &mut p.create {
        // A created object's first generation.
        if let Some(st) = q.status.as_mut() {
            crate::quarantine_progress::with_progress(st, Some(1), world.now);
        }
    }
    let generation: BTreeMap<String, Option<i64>> = world
        .quarantines
        .iter()
        .map(|q| (q.name_any(), q.metadata.generation))
        .collect();
    for (name, st) in &mut p.status {
        crate::quarantine_progress::with_progress(
            st,
            generation.get(name).copied().flatten(),
            world.now,
        );
    }
    for q in world.quarantines {
        let name = q.name_any();
        if p.status.iter().any(|(n, _)| *n == name) || p.delete.contains(&name) {
            continue;
        }
        let stored = q.status.clone().unwrap_or_default();
        let mut next = stored.clone();
        crate::quarantine_progress::with_progress(&mut next, q.metadata.generation, world.now);
        if next != stored {
            p.status.push((name, next));
        }
    }
}

/// The node writes that make each node's escalation what the Active
/// quarantines ask for: escalate the ones asked, undo what the operator did
/// where nothing asks any more.
fn node_changes(
    world: &World<'_>,
    escalate: &BTreeMap<String, (EscalationAction, String)>,
    notices: &mut Vec<Notice>,
) -> Vec<(String, NodeChange)> {
    let mut out = Vec::new();
    for (node, r) in &world.enforcement {
        let want = escalate.get(node);
        let wants = |a: EscalationAction| want.filter(|(w, _)| *w == a).map(|(_, q)| q.clone());
        match (wants(EscalationAction::Cordon), &r.cordoned_by) {
            // Cordoned by someone else already: theirs to undo, not ours.
            (Some(_), None) if r.unschedulable => {}
            (Some(q), None) => {
                notices.push(escalated(node, &q, "cordoned (no new pods)"));
                out.push((node.clone(), NodeChange::Cordon(q)));
            }
            (None, Some(_)) => out.push((node.clone(), NodeChange::Uncordon)),
            _ => {}
        }
        match (wants(EscalationAction::Taint), &r.tainted_by) {
            (Some(q), None) => {
                notices.push(escalated(
                    node,
                    &q,
                    &format!(
                        "tainted {}:NoExecute (pods without a toleration are evicted)",
                        enforcement::TAINT_KEY
                    ),
                ));
                out.push((node.clone(), NodeChange::Taint(q)));
            }
            (None, Some(_)) => out.push((node.clone(), NodeChange::Untaint)),
            _ => {}
        }
    }
    out
}

fn escalated(node: &str, quarantine: &str, what: &str) -> Notice {
    Notice {
        subjects: vec![Subject::Node(node.to_string())],
        warning: true,
        reason: events::QUARANTINE_ESCALATED,
        note: format!("node {node} {what}: Quarantine {quarantine} is not enforced (spec.quarantine.escalation of its guard)"),
        once: None,
        quarantine: Some(quarantine.to_string()),
    }
}

/// Is the node calm for this quarantine's guard, and after how long does
/// calm release it (`None`: only a person releases)?
fn calm(world: &World<'_>, q: &Quarantine) -> (bool, Option<Duration>) {
    let g = world.guards.get(&q.spec.guard);
    let rules = g.and_then(|g| g.rules.as_ref());
    let after = match q.spec.release.as_ref().map(|r| r.release_after()) {
        Some(Ok(ReleaseAfter::Manual)) => None,
        Some(Ok(ReleaseAfter::Calm(d))) => Some(d),
        // The schema refuses a bad duration; a record from before that
        // waits for a person rather than guessing.
        Some(Err(_)) => None,
        None => rules.and_then(|r| r.release_after),
    };
    if q.spec.is_manual() {
        return (false, None);
    }
    let key = (q.spec.guard.clone(), q.spec.node_name.clone());
    let prom_calm = world
        .signals
        .get(&key)
        .is_none_or(|s| s.calm && s.unknown.is_none() && s.breach.is_none());
    let has_prom = rules.is_some_and(|r| r.triggers.iter().any(|(_, t)| !alert_kind(t)));
    // Without evaluated signals for a guard that has Prometheus triggers, we
    // do not know: not calm.
    let prom_calm = prom_calm && (!has_prom || world.signals.contains_key(&key));
    // Alerts: every alert-triggered record for this node since this
    // quarantine began must have been reported resolved.
    let began = q.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let alerts_calm = world
        .quarantines
        .iter()
        .filter(|o| o.spec.guard == q.spec.guard && o.spec.node_name == q.spec.node_name)
        .filter(|o| is_alert(rules, &o.spec.trigger))
        .filter(|o| o.metadata.creation_timestamp.as_ref().map(|t| t.0) >= began)
        .filter(|o| o.status.as_ref().and_then(|s| s.phase) != Some(Phase::Released))
        .all(|o| {
            o.status
                .as_ref()
                .is_some_and(|s| s.alert_resolved_at.is_some())
        });
    (prom_calm && alerts_calm, after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use egressguard_crds::load::parse_str;
    use egressguard_crds::quarantine::MANUAL;

    const GUARD: &str = "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: site, uid: u1}\nspec:\n  mode: Auto\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{port: 443}]}\n  quarantine:\n    triggers:\n      - {name: uplink, prometheus: {query: q, above: 10, for: 1m}}\n      - {name: alert, alertmanager: {matchers: {alertname: X}}}\n    release: {after: 5m}\n    limits: {maxQuarantinedNodes: 1, cooldown: 10m}\n";

    fn guard(extra: &str) -> EgressGuard {
        let text = GUARD.replace("    limits:", &format!("{extra}    limits:"));
        parse_str(&text).expect("guard").remove(0)
    }

    fn t(s: &str) -> Timestamp {
        s.parse().expect("time")
    }

    fn q(
        name: &str,
        node: &str,
        trigger: &str,
        phase: Option<Phase>,
        created: &str,
    ) -> Arc<Quarantine> {
        let mut o = Quarantine::new(
            name,
            QuarantineSpec {
                node_name: node.into(),
                guard: "site".into(),
                trigger: trigger.into(),
                evidence: None,
                release: None,
                reason: None,
            },
        );
        o.metadata.creation_timestamp = Some(Time(t(created)));
        o.status = phase.map(|p| QuarantineStatus {
            phase: Some(p),
            since: Some(Time(t(created))),
            ..Default::default()
        });
        if phase == Some(Phase::Active) {
            o.metadata.finalizers = Some(vec![RELEASE_FINALIZER.into()]);
        }
        Arc::new(o)
    }

    /// A Released record of an `uplink` quarantine.
    fn released(name: &str, node: &str, created: &str, at: &str) -> Arc<Quarantine> {
        let mut o = (*q(name, node, "uplink", Some(Phase::Released), created)).clone();
        if let Some(st) = o.status.as_mut() {
            st.released_at = Some(Time(t(at)));
        }
        Arc::new(o)
    }

    fn breach(since: &str) -> Signals {
        Signals {
            breach: Some(Breach {
                trigger: "uplink".into(),
                query: "q".into(),
                value: "42".into(),
                since: t(since),
                sample: t(since),
            }),
            calm: false,
            unknown: None,
        }
    }

    fn calm() -> Signals {
        Signals {
            breach: None,
            calm: true,
            unknown: None,
        }
    }

    struct Fixture {
        guard: EgressGuard,
        labels: BTreeMap<String, BTreeMap<String, String>>,
        reports: std::cell::RefCell<BTreeMap<String, NodeReport>>,
    }

    /// An agent that renewed its heartbeat at `at` and enforces its plan.
    fn healthy(at: &str) -> NodeReport {
        NodeReport {
            heartbeat: Some((t(at), Duration::from_secs(15))),
            current: true,
            enforce: true,
            plan_guard: Some("site".into()),
            ready: Some((
                true,
                egressguard_crds::node_shaping::reasons::ENFORCED.into(),
                "enforced on eth0".into(),
            )),
            ..Default::default()
        }
    }

    impl Fixture {
        fn with_cooldown(mut self, cooldown: &str) -> Fixture {
            if let Some(q) = self.guard.spec.quarantine.as_mut() {
                q.limits.cooldown = cooldown.into();
            }
            self
        }

        fn new(extra: &str) -> Fixture {
            let mut labels = BTreeMap::new();
            for n in ["n1", "n2", "n3"] {
                labels.insert(n.to_string(), BTreeMap::new());
            }
            Fixture {
                guard: guard(extra),
                labels,
                reports: Default::default(),
            }
        }

        fn report(&self, node: &str, r: NodeReport) {
            self.reports.borrow_mut().insert(node.to_string(), r);
        }

        fn run(
            &self,
            qs: &[Arc<Quarantine>],
            signals: &[(&str, Signals)],
            now: &str,
        ) -> QuarantinePlan {
            let rules = egressguard_crds::quarantine::rules(
                self.guard.spec.quarantine.as_ref(),
                self.guard.spec.mode,
            )
            .expect("rules");
            let world = World {
                guards: BTreeMap::from([(
                    "site".to_string(),
                    GuardFacts {
                        guard: &self.guard,
                        rules,
                        planned: self.labels.keys().cloned().collect(),
                        selected: 3,
                    },
                )]),
                nodes: self.labels.iter().map(|(k, v)| (k.clone(), v)).collect(),
                quarantines: qs,
                signals: signals
                    .iter()
                    .map(|(n, s)| (("site".to_string(), n.to_string()), s.clone()))
                    .collect(),
                now: t(now),
                retention: Duration::from_secs(3600),
                // Unless a test says otherwise, every agent is alive and enforcing.
                enforcement: self
                    .labels
                    .keys()
                    .map(|n| {
                        let r = self.reports.borrow().get(n).cloned();
                        (n.clone(), r.unwrap_or_else(|| healthy(now)))
                    })
                    .collect(),
            };
            plan(&world)
        }
    }

    fn active(p: &QuarantinePlan) -> Vec<&str> {
        p.active
            .get("site")
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect()
    }

    fn reasons(p: &QuarantinePlan) -> Vec<&str> {
        p.notices.iter().map(|n| n.reason).collect()
    }

    #[test]
    fn a_confirmed_breach_quarantines_one_node_and_the_cap_refuses_the_next() {
        let f = Fixture::new("");
        let p = f.run(
            &[],
            &[
                ("n1", breach("2026-11-23T10:00:00Z")),
                ("n2", breach("2026-11-23T10:00:00Z")),
                ("n3", calm()),
            ],
            "2026-11-23T10:01:00Z",
        );
        assert_eq!(active(&p), ["n1"]);
        assert_eq!(p.create.len(), 1);
        assert_eq!(p.create[0].spec.node_name, "n1");
        assert_eq!(
            p.create[0].status.as_ref().and_then(|s| s.phase),
            Some(Phase::Active)
        );
        assert_eq!(reasons(&p), ["Quarantined", "QuarantineRefused"]);
        let refusal = &p.notices[1];
        assert!(refusal.note.contains("the cap is 1"), "{}", refusal.note);
        assert_eq!(refusal.once.as_deref(), Some("site/n2/CapReached"));
        // The same breach again (the object now exists) starts nothing new.
        let created = Arc::new(p.create[0].clone());
        let p = f.run(
            &[created],
            &[("n1", breach("2026-11-23T10:00:00Z"))],
            "2026-11-23T10:02:00Z",
        );
        assert!(p.create.is_empty());
        assert_eq!(active(&p), ["n1"]);
    }

    #[test]
    fn rails_refuse_paused_excluded_and_cooling_down_nodes() {
        let paused = Fixture::new("    paused: true\n");
        let p = paused.run(
            &[],
            &[("n1", breach("2026-11-23T10:00:00Z"))],
            "2026-11-23T10:05:00Z",
        );
        assert!(p.create.is_empty() && p.notices[0].note.contains("paused"));
        let mut excluded = Fixture::new("");
        excluded.labels.insert(
            "n1".into(),
            BTreeMap::from([(EXCLUDE_LABEL.to_string(), "true".to_string())]),
        );
        let p = excluded.run(
            &[],
            &[("n1", breach("2026-11-23T10:00:00Z"))],
            "2026-11-23T10:05:00Z",
        );
        assert!(
            p.create.is_empty()
                && p.notices[0].reason == "QuarantineRefused"
                && p.notices[0].note.contains(EXCLUDE_LABEL)
        );
        // A person may still quarantine an excluded node.
        let manual = q("by-hand", "n1", MANUAL, None, "2026-11-23T10:04:00Z");
        let p = excluded.run(&[manual], &[], "2026-11-23T10:05:00Z");
        assert_eq!(active(&p), ["n1"]);
        // Released 2 minutes ago, cooldown 10m.
        let f = Fixture::new("");
        let old = released("old", "n1", "2026-11-23T09:00:00Z", "2026-11-23T10:03:00Z");
        let p = f.run(
            &[old],
            &[("n1", breach("2026-11-23T10:00:00Z"))],
            "2026-11-23T10:05:00Z",
        );
        assert!(p.create.is_empty());
        assert!(p.notices[0].note.contains("cooldown"), "{:?}", p.notices);
    }

    fn enforced_of<'a>(p: &'a QuarantinePlan, name: &str) -> Option<(&'a str, &'a str)> {
        p.status
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, s)| s.conditions.iter().find(|c| c.type_ == "Enforced"))
            .map(|c| (c.status.as_str(), c.reason.as_str()))
    }

    /// The Active quarantine `a` of n1 after `p`'s status writes.
    fn after(a: &Arc<Quarantine>, p: &QuarantinePlan) -> Arc<Quarantine> {
        let mut o = (**a).clone();
        if let Some((_, st)) = p.status.iter().find(|(n, _)| *n == a.name_any()) {
            o.status = Some(st.clone());
        }
        Arc::new(o)
    }

    #[test]
    fn an_active_quarantine_says_whether_it_is_enforced() {
        let f = Fixture::new("");
        let a = q(
            "a",
            "n1",
            MANUAL,
            Some(Phase::Active),
            "2026-11-23T10:00:00Z",
        );
        let now = "2026-11-23T10:01:00Z";
        let p = f.run(std::slice::from_ref(&a), &[], now);
        assert_eq!(enforced_of(&p, "a"), Some(("True", "Enforced")));
        // SIGSTOP: the heartbeat is 16 s old, it held for 15.
        f.report("n1", healthy("2026-11-23T10:00:44Z"));
        let a = after(&a, &p);
        let p = f.run(std::slice::from_ref(&a), &[], now);
        assert_eq!(
            enforced_of(&p, "a"),
            Some(("Unknown", "AgentHeartbeatMissing"))
        );
        assert_eq!(
            reasons(&p),
            ["QuarantineNotEnforced"],
            "a warning when it stops holding"
        );
        assert!(
            p.node_changes.is_empty(),
            "no escalation unless the guard asks"
        );
        // Tampering reported by the agent.
        f.report(
            "n1",
            NodeReport {
                tampered: Some((
                    "RootRemoved".into(),
                    "eth0: the root qdisc e9: was deleted; put back".into(),
                )),
                ..healthy(now)
            },
        );
        let p = f.run(std::slice::from_ref(&after(&a, &p)), &[], now);
        assert_eq!(enforced_of(&p, "a"), Some(("False", "Tampered")));
    }

    #[test]
    fn an_unenforced_quarantine_escalates_after_its_grace_and_release_undoes_it() {
        let f = Fixture::new("    escalation: {action: Cordon, after: 30s}\n");
        let a = q(
            "a",
            "n1",
            MANUAL,
            Some(Phase::Active),
            "2026-11-23T10:00:00Z",
        );
        f.report("n1", healthy("2026-11-23T09:00:00Z"));
        // First seen unenforced at 10:01:00: not yet 30 s.
        let p = f.run(std::slice::from_ref(&a), &[], "2026-11-23T10:01:00Z");
        assert_eq!(
            enforced_of(&p, "a"),
            Some(("Unknown", "AgentHeartbeatMissing"))
        );
        assert!(p.node_changes.is_empty(), "within the grace");
        let a = after(&a, &p);
        let p = f.run(std::slice::from_ref(&a), &[], "2026-11-23T10:01:31Z");
        assert_eq!(
            p.node_changes,
            [("n1".to_string(), NodeChange::Cordon("a".into()))]
        );
        assert!(reasons(&p).contains(&"QuarantineEscalated"));
        // Cordoned by us: nothing more to do while it lasts, even once the
        // agent is back (the cordon holds until the release).
        f.report(
            "n1",
            NodeReport {
                cordoned_by: Some("a".into()),
                unschedulable: true,
                ..healthy("2026-11-23T10:01:40Z")
            },
        );
        let a = after(&a, &p);
        let p = f.run(std::slice::from_ref(&a), &[], "2026-11-23T10:01:41Z");
        assert!(p.node_changes.is_empty(), "{:?}", p.node_changes);
        // Released by a person: the cordon goes.
        let mut released = (*a).clone();
        released
            .annotations_mut()
            .insert(RELEASE_ANNOTATION.into(), "fixed".into());
        let p = f.run(&[Arc::new(released)], &[], "2026-11-23T10:02:00Z");
        assert_eq!(p.node_changes, [("n1".to_string(), NodeChange::Uncordon)]);
        // A node a person cordoned is never uncordoned by the operator.
        f.report(
            "n1",
            NodeReport {
                unschedulable: true,
                ..healthy("2026-11-23T10:01:40Z")
            },
        );
        let p = f.run(&[], &[], "2026-11-23T10:03:00Z");
        assert!(p.node_changes.is_empty());
    }

    #[test]
    fn a_taint_escalation_is_removed_at_release() {
        let f = Fixture::new("    escalation: {action: Taint, after: 0s}\n");
        let a = q(
            "a",
            "n1",
            MANUAL,
            Some(Phase::Active),
            "2026-11-23T10:00:00Z",
        );
        f.report("n1", healthy("2026-11-23T09:00:00Z"));
        let p = f.run(std::slice::from_ref(&a), &[], "2026-11-23T10:01:00Z");
        assert_eq!(
            p.node_changes,
            [("n1".to_string(), NodeChange::Taint("a".into()))]
        );
        f.report(
            "n1",
            NodeReport {
                tainted_by: Some("a".into()),
                ..healthy("2026-11-23T09:00:00Z")
            },
        );
        let p = f.run(&[], &[], "2026-11-23T10:02:00Z");
        assert_eq!(p.node_changes, [("n1".to_string(), NodeChange::Untaint)]);
    }

    /// An Active alert quarantine a person is deleting (since 12:00).
    fn being_deleted(name: &str, node: &str) -> Arc<Quarantine> {
        let mut d = (*q(
            name,
            node,
            "alert",
            Some(Phase::Active),
            "2026-11-23T10:00:00Z",
        ))
        .clone();
        d.metadata.deletion_timestamp = Some(Time(t("2026-11-23T12:00:00Z")));
        Arc::new(d)
    }

    #[test]
    fn a_deleted_quarantine_leaves_a_record_and_records_outlive_cooldown_and_firing_alerts() {
        let f = Fixture::new("");
        let p = f.run(&[being_deleted("d", "n1")], &[], "2026-11-23T12:00:00Z");
        assert_eq!(p.create.len(), 1, "the release is remembered");
        let tomb = &p.create[0];
        let st = tomb.status.as_ref().expect("status");
        assert_eq!(st.phase, Some(Phase::Released));
        assert!(st
            .released_by
            .as_deref()
            .is_some_and(|b| b.contains("deleted Quarantine d")));
        // It keeps the breach path in its cooldown (10m) like any release.
        let p = f.run(
            &[Arc::new(tomb.clone())],
            &[("n1", breach("2026-11-23T12:01:00Z"))],
            "2026-11-23T12:05:00Z",
        );
        assert!(
            p.create.is_empty() && p.notices[0].note.contains("cooldown"),
            "{:?}",
            p.notices
        );
        // Retention 1h, cooldown 10m: a record of an alert still firing is
        // kept past both; it goes once the alert is quiet for the retention.
        let mut firing =
            (*released("r", "n2", "2026-11-23T08:00:00Z", "2026-11-23T09:00:00Z")).clone();
        if let Some(st) = firing.status.as_mut() {
            st.last_alert_at = Some(Time(t("2026-11-23T11:30:00Z")));
        }
        let p = f.run(&[Arc::new(firing.clone())], &[], "2026-11-23T12:00:00Z");
        assert!(p.delete.is_empty());
        let p = f.run(&[Arc::new(firing)], &[], "2026-11-23T12:31:00Z");
        assert_eq!(p.delete, ["r"]);
        // A cooldown longer than the retention keeps the record as long.
        let long = Fixture::new("").with_cooldown("3h");
        let old = released("o", "n3", "2026-11-23T08:00:00Z", "2026-11-23T10:00:00Z");
        let p = long.run(std::slice::from_ref(&old), &[], "2026-11-23T12:00:00Z");
        assert!(p.delete.is_empty());
        let p = long.run(&[old], &[], "2026-11-23T13:01:00Z");
        assert_eq!(p.delete, ["o"]);
    }

    #[test]
    fn a_refused_alert_still_firing_is_admitted_once_the_rail_clears() {
        let f = Fixture::new("");
        let mut refused = (*q(
            "r",
            "n2",
            "alert",
            Some(Phase::Refused),
            "2026-11-23T10:00:00Z",
        ))
        .clone();
        if let Some(st) = refused.status.as_mut() {
            st.released_by = Some("refused (CapReached): the cap is 1".into());
            st.released_at = Some(Time(t("2026-11-23T10:00:00Z")));
            // As the pass that refused it left it (Ready, Stalled).
            let at = t("2026-11-23T10:00:00Z");
            crate::quarantine_progress::refused(st, "CapReached", "the cap is 1", at);
            crate::quarantine_progress::with_progress(st, None, at);
        }
        let refused = Arc::new(refused);
        // n1 holds the cap: still refused, nothing written.
        let holder = q(
            "a",
            "n1",
            "alert",
            Some(Phase::Active),
            "2026-11-23T09:00:00Z",
        );
        let p = f.run(&[holder, refused.clone()], &[], "2026-11-23T10:05:00Z");
        assert_eq!(active(&p), ["n1"]);
        assert!(p.status.iter().all(|(n, _)| n != "r"), "{:?}", p.status);
        // The cap frees: the same record is admitted, its release fields cleared.
        let p = f.run(std::slice::from_ref(&refused), &[], "2026-11-23T10:06:00Z");
        assert_eq!(active(&p), ["n2"]);
        let st = &p.status.iter().find(|(n, _)| n == "r").expect("written").1;
        assert_eq!(st.phase, Some(Phase::Active));
        assert_eq!(
            (st.released_at.clone(), st.released_by.clone()),
            (None, None)
        );
        // Its alert resolved meanwhile: a refusal stays final.
        let mut resolved = (*refused).clone();
        if let Some(st) = resolved.status.as_mut() {
            st.alert_resolved_at = Some(Time(t("2026-11-23T10:05:30Z")));
        }
        let p = f.run(&[Arc::new(resolved)], &[], "2026-11-23T10:06:00Z");
        assert!(active(&p).is_empty());
    }

    #[test]
    fn a_release_record_that_lost_its_status_is_never_admitted() {
        let f = Fixture::new("");
        let p = f.run(&[being_deleted("d", "n1")], &[], "2026-11-23T12:00:00Z");
        let mut tomb = p.create[0].clone();
        tomb.status = None;
        let p = f.run(&[Arc::new(tomb)], &[], "2026-11-23T12:00:01Z");
        assert!(active(&p).is_empty());
        assert_eq!(p.status[0].1.phase, Some(Phase::Released));
    }

    #[test]
    fn a_quarantine_on_a_node_carrying_another_plan_is_not_enforced() {
        let f = Fixture::new("");
        let a = q(
            "a",
            "n1",
            MANUAL,
            Some(Phase::Active),
            "2026-11-23T10:00:00Z",
        );
        f.report(
            "n1",
            NodeReport {
                plan_guard: Some("older".into()),
                ..healthy("2026-11-23T10:00:59Z")
            },
        );
        let p = f.run(&[a], &[], "2026-11-23T10:01:00Z");
        assert_eq!(enforced_of(&p, "a"), Some(("False", "NotPlanned")));
    }

    #[test]
    fn stored_alerts_are_admitted_once_and_duplicates_refused() {
        let f = Fixture::new("");
        let a = q("a", "n2", "alert", None, "2026-11-23T10:00:00Z");
        let b = q(
            "b",
            "n2",
            "alert",
            Some(Phase::Pending),
            "2026-11-23T10:00:01Z",
        );
        let bogus = q("c", "n3", "nope", None, "2026-11-23T10:00:02Z");
        let p = f.run(&[b, bogus, a], &[], "2026-11-23T10:01:00Z");
        assert_eq!(active(&p), ["n2"]);
        let phases: BTreeMap<&str, (Option<Phase>, Option<&str>)> = p
            .status
            .iter()
            .map(|(n, s)| (n.as_str(), (s.phase, s.released_by.as_deref())))
            .collect();
        assert_eq!(phases["a"].0, Some(Phase::Active));
        assert_eq!(phases["b"].0, Some(Phase::Refused));
        assert!(phases["b"]
            .1
            .is_some_and(|m| m.contains("AlreadyQuarantined")));
        assert!(phases["c"].1.is_some_and(|m| m.contains("UnknownTrigger")));
        assert_eq!(p.add_finalizer, ["a"]);
    }

    #[test]
    fn calm_releases_after_the_window_and_unknown_never_does() {
        let f = Fixture::new("");
        let a = q(
            "a",
            "n1",
            "uplink",
            Some(Phase::Active),
            "2026-11-23T10:00:00Z",
        );
        // Calm starts the window.
        let p = f.run(
            std::slice::from_ref(&a),
            &[("n1", calm())],
            "2026-11-23T10:10:00Z",
        );
        let st = &p.status[0].1;
        assert_eq!(st.calm_since, Some(Time(t("2026-11-23T10:10:00Z"))));
        assert_eq!(active(&p), ["n1"]);
        let mut waiting = (*a).clone();
        waiting.status = Some(st.clone());
        let waiting = Arc::new(waiting);
        // Unknown (Prometheus down) ends the window, whatever its length.
        let unknown = Signals {
            breach: None,
            calm: false,
            unknown: Some("unreachable".into()),
        };
        let p = f.run(
            std::slice::from_ref(&waiting),
            &[("n1", unknown)],
            "2026-11-23T11:00:00Z",
        );
        assert_eq!(p.status[0].1.calm_since, None);
        assert_eq!(active(&p), ["n1"]);
        // No signal at all for a guard with Prometheus triggers: not calm either.
        let p = f.run(std::slice::from_ref(&waiting), &[], "2026-11-23T11:00:00Z");
        assert_eq!(active(&p), ["n1"]);
        // Calm for 5 minutes: released by the policy, finalizer released.
        let p = f.run(&[waiting], &[("n1", calm())], "2026-11-23T10:15:00Z");
        assert!(active(&p).is_empty());
        let st = &p.status[0].1;
        assert_eq!(st.phase, Some(Phase::Released));
        assert!(st
            .released_by
            .as_deref()
            .is_some_and(|b| b.starts_with("policy:")));
        assert_eq!(p.remove_finalizer, ["a"]);
        assert_eq!(p.released, [("site".to_string(), "uplink".to_string())]);
    }

    #[test]
    fn people_release_by_annotation_or_delete_and_records_expire() {
        let f = Fixture::new("");
        let mut m = (*q(
            "m",
            "n1",
            MANUAL,
            Some(Phase::Active),
            "2026-11-23T10:00:00Z",
        ))
        .clone();
        // Calm does not release what a person started.
        let p = f.run(
            &[Arc::new(m.clone())],
            &[("n1", calm())],
            "2026-11-23T12:00:00Z",
        );
        assert_eq!(active(&p), ["n1"]);
        m.metadata.annotations = Some(BTreeMap::from([(
            RELEASE_ANNOTATION.to_string(),
            "fixed".to_string(),
        )]));
        let p = f.run(&[Arc::new(m.clone())], &[], "2026-11-23T12:00:00Z");
        assert!(active(&p).is_empty());
        assert!(p.status[0]
            .1
            .released_by
            .as_deref()
            .is_some_and(|b| b.contains("fixed")));
        let mut d = (*q(
            "d",
            "n2",
            "alert",
            Some(Phase::Active),
            "2026-11-23T10:00:00Z",
        ))
        .clone();
        d.metadata.deletion_timestamp = Some(Time(t("2026-11-23T12:00:00Z")));
        let p = f.run(&[Arc::new(d)], &[], "2026-11-23T12:00:00Z");
        assert!(active(&p).is_empty());
        assert_eq!(p.remove_finalizer, ["d"]);
        assert_eq!(reasons(&p), ["Released"]);
        let old = released("old", "n3", "2026-11-23T08:00:00Z", "2026-11-23T09:00:00Z");
        let p = f.run(&[old], &[], "2026-11-23T12:00:00Z");
        assert_eq!(p.delete, ["old"]);
    }
}
