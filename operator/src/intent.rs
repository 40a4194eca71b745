//! What one pass intends to write, as one value.
//!
//! [`intend`] is pure: from the observed objects and the [`Decision`] it
//! computes every write of a pass (finalizers to add, plans, removals,
//! deletions, guard statuses with their Events, finalizers to release).
//! `run.rs` executes that value in a fixed order and decides nothing, so
//! every rule below is unit-tested without an API server.
//!
//! Every write of an existing object names the resourceVersion it was
//! computed from: a fence. A write that a stalled network delivers after
//! another replica took over (and changed the object) is refused with 409
//! instead of undoing the new leader's work; the next pass recomputes from
//! the caches. A plan's creation has no version to name (server-side apply
//! has no "must not exist" precondition); [`crate::own_writes`] keeps a
//! replica from recomputing one for a plan it created while its cache lags.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use egressguard_crds::conditions::events;
use egressguard_crds::conditions::types::is_bad;
use egressguard_crds::node_shaping::NodeShapingSpec;
use egressguard_crds::{EgressGuard, EgressGuardStatus, NodeShaping};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::decide::Decision;
use crate::status::{guard_status, removal, removal_confirmed, GuardQuarantine};

/// The finalizer that holds a guard until its shaping is gone from every node.
pub const FINALIZER: &str = "egressguard.io/cleanup";

/// What a pass reads: the caches' objects and the clock.
#[derive(Debug)]
pub struct Observed<'a> {
    /// Every guard, including those being deleted.
    pub guards: &'a [Arc<EgressGuard>],
    /// The stored plans by node name.
    pub shapings: &'a BTreeMap<String, Arc<NodeShaping>>,
    /// Nodes that exist.
    pub nodes: &'a BTreeSet<String>,
    /// Each guard's quarantine facts for its status.
    pub quarantine: &'a BTreeMap<String, GuardQuarantine>,
    /// Now, for the cleanup timeout.
    pub now: Timestamp,
    /// How long a deleted guard waits for its nodes.
    pub cleanup_timeout: Duration,
}

/// A guard's new finalizer list, fenced by the version it was computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finalizers {
    /// The guard.
    pub guard: String,
    /// The whole list to store.
    pub finalizers: Vec<String>,
    /// The guard's resourceVersion this list was computed from.
    pub resource_version: Option<String>,
}

/// A plan to store (server-side apply).
#[derive(Debug, Clone, PartialEq)]
pub struct PlanWrite {
    /// The node (and the object's name).
    pub node: String,
    /// The whole spec.
    pub spec: NodeShapingSpec,
    /// The stored plan's resourceVersion; `None` creates (a second create is 409).
    pub resource_version: Option<String>,
}

/// A plan to delete, fenced by the version that showed it done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    /// The node (and the object's name).
    pub node: String,
    /// The stored plan's resourceVersion.
    pub resource_version: Option<String>,
}

/// An Event on a guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardEvent {
    /// Warning rather than Normal.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: String,
    /// The human-readable note.
    pub note: String,
}

/// A guard status to store, with the Events its changed conditions raise.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusWrite {
    /// The guard.
    pub guard: String,
    /// The whole status.
    pub status: EgressGuardStatus,
    /// The guard's resourceVersion as observed (the executor uses the newer one
    /// its own finalizer write returned, if it made one this pass).
    pub resource_version: Option<String>,
    /// One per condition whose status or reason changed.
    pub events: Vec<GuardEvent>,
}

/// A deleted guard's cleanup is over: its finalizer goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The list without [`FINALIZER`], fenced.
    pub finalizers: Finalizers,
    /// Set when the timeout ran out with nodes still shaped (a Warning Event).
    pub gave_up: Option<GuardEvent>,
}

/// Every write of one pass, in the order they must happen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Intent {
    /// First, so no guard can vanish with shaping left behind.
    pub add_finalizers: Vec<Finalizers>,
    /// New and changed plans, removals included.
    pub plans: Vec<PlanWrite>,
    /// Plans that did their job: the node is gone or confirmed its removal.
    pub deletions: Vec<Deletion>,
    /// Guard statuses that changed.
    pub statuses: Vec<StatusWrite>,
    /// Last, once the nodes are clean (or the timeout ran out).
    pub releases: Vec<Release>,
}

/// The writes that bring the cluster to `d`.
pub fn intend(obs: &Observed<'_>, d: Decision) -> Intent {
    let add_finalizers = obs
        .guards
        .iter()
        .filter(|g| g.metadata.deletion_timestamp.is_none() && !holds(g))
        .map(|g| {
            let mut finalizers = g.finalizers().to_vec();
            finalizers.push(FINALIZER.into());
            Finalizers {
                guard: g.name_any(),
                finalizers,
                resource_version: g.resource_version(),
            }
        })
        .collect();
    let statuses = obs
        .guards
        .iter()
        .filter_map(|g| status(obs, &d, g))
        .collect();
    let (removals, deletions) = unplanned(obs, &d);
    let releases = obs
        .guards
        .iter()
        .filter_map(|g| release(obs, g, &removals))
        .collect();
    let mut plans: Vec<PlanWrite> = d
        .plans
        .into_iter()
        .filter(|(node, spec)| obs.shapings.get(node).is_none_or(|s| &s.spec != spec))
        .map(|(node, spec)| PlanWrite {
            resource_version: obs.shapings.get(&node).and_then(|s| s.resource_version()),
            node,
            spec,
        })
        .collect();
    plans.extend(removals);
    Intent {
        add_finalizers,
        plans,
        deletions,
        statuses,
        releases,
    }
}

fn holds(g: &EgressGuard) -> bool {
    g.finalizers().iter().any(|f| f == FINALIZER)
}

/// The guard's status, when it differs from the stored one.
fn status(obs: &Observed<'_>, d: &Decision, g: &EgressGuard) -> Option<StatusWrite> {
    let q = obs
        .quarantine
        .get(&g.name_any())
        .cloned()
        .unwrap_or_default();
    let status = guard_status(g, d, obs.shapings, &q);
    let before = g.status.clone().unwrap_or_default();
    if before == status {
        return None;
    }
    let events = status
        .conditions
        .iter()
        .filter(|c| {
            let was = before.conditions.iter().find(|p| p.type_ == c.type_);
            was.map(|w| (&w.status, &w.reason)) != Some((&c.status, &c.reason))
        })
        .map(|c| GuardEvent {
            warning: is_bad(&c.type_, &c.status),
            reason: c.reason.clone(),
            note: format!("{} is {}: {}", c.type_, c.status, c.message),
        })
        .collect();
    Some(StatusWrite {
        guard: g.name_any(),
        status,
        resource_version: g.resource_version(),
        events,
    })
}

/// Stored plans no guard wants any more: a removal for the node's agent to
/// carry out, or, once the node is gone or its agent confirmed, a deletion.
fn unplanned(obs: &Observed<'_>, d: &Decision) -> (Vec<PlanWrite>, Vec<Deletion>) {
    let mut removals = vec![];
    let mut deletions = vec![];
    for (node, s) in obs.shapings {
        if d.plans.contains_key(node) {
            continue;
        }
        if !obs.nodes.contains(node) || removal_confirmed(s) {
            deletions.push(Deletion {
                node: node.clone(),
                resource_version: s.resource_version(),
            });
        } else if s.spec != removal(node) {
            removals.push(PlanWrite {
                node: node.clone(),
                spec: removal(node),
                resource_version: s.resource_version(),
            });
        }
    }
    (removals, deletions)
}

/// A guard being deleted lets go once no existing node is left shaped by it
/// (or by a plan that names no guard), or when the cleanup timeout ran out.
fn release(obs: &Observed<'_>, g: &EgressGuard, removals: &[PlanWrite]) -> Option<Release> {
    let since = g.metadata.deletion_timestamp.as_ref()?;
    if !holds(g) {
        return None;
    }
    let name = g.name_any();
    // A removal written in this pass is not confirmed yet: it counts as left.
    let mut left: BTreeSet<String> = obs
        .shapings
        .iter()
        .filter(|(n, s)| obs.nodes.contains(*n) && !removal_confirmed(s))
        .filter(|(_, s)| s.spec.guard.as_ref().is_none_or(|r| r.name == name))
        .map(|(n, _)| n.clone())
        .collect();
    left.extend(removals.iter().map(|r| r.node.clone()));
    let waited = obs.now.duration_since(since.0).as_secs();
    let timed_out = waited >= obs.cleanup_timeout.as_secs() as i64;
    if !left.is_empty() && !timed_out {
        return None;
    }
    let gave_up = (!left.is_empty()).then(|| GuardEvent {
        warning: true,
        reason: events::CLEANUP_TIMED_OUT.into(),
        note: format!(
            "gave up waiting after {}s; shaping may remain on: {}",
            obs.cleanup_timeout.as_secs(),
            left.into_iter().collect::<Vec<_>>().join(", ")
        ),
    });
    Some(Release {
        finalizers: Finalizers {
            guard: name,
            finalizers: g
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect(),
            resource_version: g.resource_version(),
        },
        gave_up,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::GuardOutcome;
    use egressguard_crds::conditions::types;
    use egressguard_crds::load::parse_str;
    use egressguard_crds::node_shaping::{GuardRef, NodeShapingStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    const NOW: i64 = 1_800_000_000;

    fn guard(name: &str, finalizers: &[&str], deleting_for: Option<i64>) -> EgressGuard {
        let mut g = parse_str(&format!(
            "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: {name}}}\nspec:\n  uplink: {{rate: 20Mbit}}\n  throttle: {{rate: 1Mbit, destinations: [{{port: 443}}]}}\n"
        ))
        .expect("guard")
        .remove(0);
        g.metadata.generation = Some(1);
        g.metadata.resource_version = Some(format!("{name}-rv"));
        g.metadata.finalizers = Some(finalizers.iter().map(|f| f.to_string()).collect());
        g.metadata.deletion_timestamp =
            deleting_for.map(|s| Time(Timestamp::from_second(NOW - s).expect("time")));
        g
    }

    fn spec(node: &str, guard: &str) -> NodeShapingSpec {
        NodeShapingSpec {
            guard: Some(GuardRef {
                name: guard.into(),
                uid: String::new(),
                generation: 1,
            }),
            enforce: true,
            ..removal(node)
        }
    }

    /// A stored plan; `ready` is what its agent reports at the current
    /// generation (`None`: nothing yet).
    fn stored(s: NodeShapingSpec, ready: Option<bool>) -> (String, Arc<NodeShaping>) {
        let node = s.node_name.clone();
        let mut ns = NodeShaping::new(&node, s);
        ns.metadata.generation = Some(3);
        ns.metadata.resource_version = Some(format!("{node}-rv"));
        ns.status = ready.map(|ok| NodeShapingStatus {
            observed_generation: Some(3),
            conditions: vec![Condition {
                type_: types::READY.into(),
                status: if ok { "True" } else { "False" }.into(),
                reason: "Test".into(),
                message: String::new(),
                observed_generation: Some(3),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
            }],
            ..NodeShapingStatus::default()
        });
        (node, Arc::new(ns))
    }

    struct World {
        guards: Vec<Arc<EgressGuard>>,
        shapings: BTreeMap<String, Arc<NodeShaping>>,
        nodes: BTreeSet<String>,
        quarantine: BTreeMap<String, GuardQuarantine>,
    }

    impl World {
        fn new(guards: Vec<EgressGuard>, shapings: Vec<(String, Arc<NodeShaping>)>) -> Self {
            World {
                guards: guards.into_iter().map(Arc::new).collect(),
                shapings: shapings.into_iter().collect(),
                nodes: ["a", "b", "c"].map(String::from).into(),
                quarantine: BTreeMap::new(),
            }
        }

        fn intend(&self, d: Decision) -> Intent {
            intend(
                &Observed {
                    guards: &self.guards,
                    shapings: &self.shapings,
                    nodes: &self.nodes,
                    quarantine: &self.quarantine,
                    now: Timestamp::from_second(NOW).expect("time"),
                    cleanup_timeout: Duration::from_secs(300),
                },
                d,
            )
        }
    }

    fn plans(p: &[(&str, &str)]) -> Decision {
        Decision {
            plans: p.iter().map(|(n, g)| (n.to_string(), spec(n, g))).collect(),
            guards: BTreeMap::new(),
        }
    }

    fn nodes(p: &[PlanWrite]) -> Vec<(&str, bool, Option<&str>)> {
        p.iter()
            .map(|w| {
                (
                    w.node.as_str(),
                    w.spec.is_removal(),
                    w.resource_version.as_deref(),
                )
            })
            .collect()
    }

    #[test]
    fn finalizers_are_added_once_and_fenced() {
        let w = World::new(
            vec![
                guard("new", &["other.io/x"], None),
                guard("held", &[FINALIZER], None),
                guard("going", &[], Some(10)),
            ],
            vec![],
        );
        let i = w.intend(Decision::default());
        assert_eq!(
            i.add_finalizers,
            vec![Finalizers {
                guard: "new".into(),
                finalizers: vec!["other.io/x".into(), FINALIZER.into()],
                resource_version: Some("new-rv".into()),
            }]
        );
    }

    #[test]
    fn plans_are_written_only_when_they_change() {
        let w = World::new(
            vec![],
            vec![
                stored(spec("a", "g"), Some(true)),
                stored(spec("b", "old"), Some(true)),
            ],
        );
        let i = w.intend(plans(&[("a", "g"), ("b", "g"), ("c", "g")]));
        assert_eq!(
            nodes(&i.plans),
            [
                ("b", false, Some("b-rv")),
                // A creation carries no version.
                ("c", false, None),
            ]
        );
        assert!(i.deletions.is_empty());
    }

    /// (case, stored plan, node exists, agent says Ready, removal written, deleted)
    type Unplanned = (
        &'static str,
        NodeShapingSpec,
        bool,
        Option<bool>,
        bool,
        bool,
    );

    #[test]
    fn unwanted_plans_become_removals_then_deletions() {
        let cases: Vec<Unplanned> = vec![
            (
                "shaped node: ask for removal",
                spec("a", "g"),
                true,
                Some(true),
                true,
                false,
            ),
            (
                "removal asked, agent not done: wait",
                removal("a"),
                true,
                Some(false),
                false,
                false,
            ),
            (
                "removal asked, agent silent: wait",
                removal("a"),
                true,
                None,
                false,
                false,
            ),
            (
                "removal confirmed: delete",
                removal("a"),
                true,
                Some(true),
                false,
                true,
            ),
            (
                "node gone: delete",
                spec("a", "g"),
                false,
                Some(true),
                false,
                true,
            ),
        ];
        for (case, s, exists, ready, removes, deletes) in cases {
            let mut w = World::new(vec![], vec![stored(s, ready)]);
            if !exists {
                w.nodes.remove("a");
            }
            let i = w.intend(Decision::default());
            let removal_written = nodes(&i.plans) == [("a", true, Some("a-rv"))];
            assert_eq!(removal_written, removes, "{case}: {:?}", i.plans);
            let deleted = i.deletions
                == [Deletion {
                    node: "a".into(),
                    resource_version: Some("a-rv".into()),
                }];
            assert_eq!(deleted, deletes, "{case}: {:?}", i.deletions);
        }
    }

    #[test]
    fn a_deleted_guard_is_released_only_when_its_nodes_are_clean_or_time_ran_out() {
        let deleting = |secs| vec![guard("g", &[FINALIZER, "other.io/x"], Some(secs))];
        // Its node still enforces: a removal is written, the guard is held.
        let w = World::new(deleting(10), vec![stored(spec("a", "g"), Some(true))]);
        let i = w.intend(Decision::default());
        assert_eq!(nodes(&i.plans), [("a", true, Some("a-rv"))]);
        assert!(i.releases.is_empty());
        // Removal asked, not confirmed: still held.
        let w = World::new(deleting(10), vec![stored(removal("a"), Some(false))]);
        assert!(w.intend(Decision::default()).releases.is_empty());
        // Another guard's node does not hold it; a confirmed removal does not either.
        let w = World::new(
            deleting(10),
            vec![
                stored(spec("b", "other"), Some(true)),
                stored(removal("a"), Some(true)),
            ],
        );
        let i = w.intend(plans(&[("b", "other")]));
        assert_eq!(
            i.releases,
            vec![Release {
                finalizers: Finalizers {
                    guard: "g".into(),
                    finalizers: vec!["other.io/x".into()],
                    resource_version: Some("g-rv".into()),
                },
                gave_up: None,
            }]
        );
        let deleted: Vec<&str> = i.deletions.iter().map(|d| d.node.as_str()).collect();
        assert_eq!(deleted, ["a"]);
        // The timeout lets go, with a Warning naming the nodes left.
        let w = World::new(deleting(301), vec![stored(removal("a"), Some(false))]);
        let i = w.intend(Decision::default());
        assert_eq!(i.releases.len(), 1);
        let gave_up = i.releases[0].gave_up.clone().expect("a warning");
        assert!(gave_up.warning);
        assert_eq!(gave_up.reason, "CleanupTimedOut", "the documented reason");
        assert_eq!(
            gave_up.note,
            "gave up waiting after 300s; shaping may remain on: a"
        );
        // A guard without our finalizer is not ours to release.
        let w = World::new(vec![guard("g", &["other.io/x"], Some(10))], vec![]);
        assert!(w.intend(Decision::default()).releases.is_empty());
    }

    #[test]
    fn statuses_are_written_when_they_change_with_one_event_per_changed_condition() {
        let d = || Decision {
            plans: BTreeMap::new(),
            guards: BTreeMap::from([(
                "g".to_string(),
                GuardOutcome {
                    selected: vec!["a".into()],
                    planned: vec!["a".into()],
                    ..GuardOutcome::default()
                },
            )]),
        };
        let mut w = World::new(
            vec![guard("g", &[FINALIZER], None)],
            vec![stored(spec("a", "g"), None)],
        );
        let i = w.intend(d());
        assert_eq!(i.statuses.len(), 1);
        let first = i.statuses[0].clone();
        assert_eq!(first.resource_version.as_deref(), Some("g-rv"));
        let ready: Vec<&GuardEvent> = first
            .events
            .iter()
            .filter(|e| e.note.starts_with("Ready is False"))
            .collect();
        assert_eq!(ready.len(), 1, "{:?}", first.events);
        assert!(ready[0].warning);
        assert_eq!(first.events.len(), first.status.conditions.len());
        // Stored as computed: nothing to write, nothing to announce.
        Arc::make_mut(&mut w.guards[0]).status = Some(first.status.clone());
        assert!(w.intend(d()).statuses.is_empty());
        // The agent reports Ready: Ready turns True (a Normal Event), the
        // other conditions did not change (no Event).
        w.shapings = [stored(spec("a", "g"), Some(true))].into_iter().collect();
        let i = w.intend(d());
        let events = &i.statuses[0].events;
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(!events[0].warning);
        assert!(events[0].note.starts_with("Ready is True"), "{events:?}");
    }
}
