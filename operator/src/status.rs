//! What a guard's status says: pure, from the decision, the plans and
//! what their agents report. `run.rs` writes it.

use std::collections::BTreeMap;
use std::sync::Arc;

use egressguard_crds::conditions::{guard, types, Progress};
use egressguard_crds::node_shaping::{reasons, NodeShapingSpec};
use egressguard_crds::{EgressGuard, EgressGuardStatus, Mode, NodePhase, NodeShaping, NodeState};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::decide::{Decision, GuardOutcome, Held};

/// At most this many nodes are listed in a guard's status.
const MAX_NODES_IN_STATUS: usize = 100;

/// A node's state for a guard, from its NodeShaping.
pub fn node_state(ns: Option<&NodeShaping>, guard: &EgressGuard) -> NodeState {
    let name = ns.map(|n| n.name_any()).unwrap_or_default();
    let Some(ns) = ns else {
        return NodeState {
            name,
            state: NodePhase::Pending,
            message: String::new(),
        };
    };
    let current = ns
        .spec
        .guard
        .as_ref()
        .is_some_and(|g| g.generation == guard.metadata.generation.unwrap_or_default());
    let st = ns.status.as_ref();
    let observed = st.and_then(|s| s.observed_generation) == ns.metadata.generation;
    let ready = st.and_then(|s| s.conditions.iter().find(|c| c.type_ == types::READY));
    let (state, message) = match ready {
        // The agent has the plan but not yet the guard or groups it names.
        Some(c) if current && observed && c.reason == reasons::WAITING => {
            (NodePhase::Pending, node_message(&c.message))
        }
        Some(c) if current && observed && c.status == "True" && c.reason == reasons::DRY_RUN => {
            (NodePhase::DryRun, node_message(&c.message))
        }
        Some(c) if current && observed && c.status == "True" => {
            (NodePhase::Enforced, String::new())
        }
        Some(c) if current && observed => (NodePhase::Failed, node_message(&c.message)),
        _ => (NodePhase::Pending, String::new()),
    };
    NodeState {
        name,
        state,
        message,
    }
}

/// A message an agent wrote, bounded before it is copied into the guard
/// (which every agent watches): a node must not bloat every other node's cache.
fn node_message(m: &str) -> String {
    egressguard_crds::conditions::bounded(m, 256)
}

/// The longest `NodesFailed` message: the first failures, then a count.
const MAX_FAILED_MESSAGE: usize = 2048;

/// The guard's selector keys a node's kubelet can set on itself.
pub fn node_writable_selector_keys(g: &EgressGuard) -> Vec<String> {
    let Some(sel) = g.spec.node_selector.as_ref() else {
        return Vec::new();
    };
    let mut keys: Vec<String> = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .chain(
            sel.match_expressions
                .iter()
                .flatten()
                .map(|e| e.key.clone()),
        )
        .filter(|k| egressguard_crds::node_labels::kubelet_settable(k))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// What every condition of one status write shares: the generation it
/// describes, and the previous conditions, whose transition times a
/// condition keeps while its status does not change.
#[derive(Clone, Copy)]
struct Stamp<'a> {
    gen: Option<i64>,
    previous: &'a [Condition],
}

impl<'a> Stamp<'a> {
    /// The stamp of a status written over `prev` for generation `gen`.
    fn new(gen: Option<i64>, prev: Option<&'a EgressGuardStatus>) -> Self {
        Stamp {
            gen,
            previous: prev.map_or(&[][..], |p| p.conditions.as_slice()),
        }
    }

    /// A condition of `type_`, True when `ok`.
    fn cond(&self, type_: &str, ok: bool, reason: &str, message: String) -> Condition {
        egressguard_crds::conditions::condition(
            type_,
            ok,
            reason,
            message,
            self.gen,
            self.previous,
            || Time(Timestamp::now()),
        )
    }

    /// The kstatus condition (Reconciling or Stalled) of `progress`, none when Done.
    fn progress(&self, progress: Progress, reason: &str, message: String) -> Option<Condition> {
        progress.condition(reason, message, self.gen, self.previous, || {
            Time(Timestamp::now())
        })
    }
}

/// A guard's quarantine facts for its status.
#[derive(Debug, Clone, Default)]
pub struct GuardQuarantine {
    /// Nodes quarantined now.
    pub active: usize,
    /// For guards with Prometheus triggers: Ok, or why metrics are unavailable.
    pub metrics: Option<Result<(), crate::evaluate::MetricsUnavailable>>,
    /// CRDs of the API the server does not serve (an upgrade that left
    /// them out), by name: reported on every guard they affect.
    pub missing_kinds: Vec<&'static str>,
}

/// Where a guard stands for GitOps tools: the kstatus pair's reason and
/// message, from the conditions just computed.
fn progress(held: Option<&Held>, failed: bool, pending: usize) -> (Progress, &'static str) {
    match held {
        // kstatus reads a deletion from deletionTimestamp first.
        Some(Held::Deleting) => (Progress::Done, guard::DELETING),
        // Only an edit of the spec fixes it.
        Some(Held::Invalid(_)) => (Progress::Stalled, guard::INVALID_SPEC),
        // A group the pipeline has not applied yet may come.
        Some(Held::Unresolved(_)) => (Progress::Reconciling, guard::WHITELIST_UNRESOLVED),
        // An agent's error (an interface missing, a refused plan) needs a
        // person; the agent retries, and Stalled clears when it succeeds.
        None if failed => (Progress::Stalled, guard::NODES_FAILED),
        None if pending > 0 => (Progress::Reconciling, guard::PROGRESSING),
        None => (Progress::Done, guard::ENFORCED),
    }
}

/// The missing CRDs that stop this guard from doing what it asks.
fn missing_for(g: &EgressGuard, missing: &[&'static str]) -> Vec<&'static str> {
    missing
        .iter()
        .copied()
        .filter(|kind| match *kind {
            crate::kinds::CIDR_GROUPS => !g.spec.whitelist_groups.is_empty(),
            crate::kinds::QUARANTINES => g.spec.mode == Mode::Auto,
            _ => true,
        })
        .collect()
}

/// The status a guard should have now.
///
/// Reads top to bottom: the nodes' states, the conditions of a held guard or
/// of its outcome, the conditions that depend on the spec alone, what a
/// missing CRD overrides, and the kstatus pair last (it repeats Ready's
/// message).
pub fn guard_status(
    g: &EgressGuard,
    d: &Decision,
    shapings: &BTreeMap<String, Arc<NodeShaping>>,
    q: &GuardQuarantine,
) -> EgressGuardStatus {
    let out = d.guards.get(&g.name_any()).cloned().unwrap_or_default();
    let prev = g.status.as_ref();
    let stamp = Stamp::new(g.metadata.generation, prev);
    let mut nodes = node_states(g, &out, shapings);
    let counts = NodeCounts::of(&nodes);
    let mut conditions = match &out.held {
        Some(held) => held_conditions(held, &stamp),
        None => outcome_conditions(g, &out, q, &nodes, &counts, &stamp),
    };
    conditions.extend(whitelist_resolved(g, out.held.as_ref(), &stamp));
    conditions.extend(metrics_available(q, &stamp));
    conditions.extend(selector_node_writable(g, &stamp));
    let missing = missing_for(g, &q.missing_kinds);
    let (progress, reason) = if missing.is_empty() {
        progress(out.held.as_ref(), counts.failed > 0, counts.pending)
    } else {
        crds_missing(&mut conditions, &missing, &stamp)
    };
    conditions.extend(stamp.progress(progress, reason, ready_message(&conditions)));
    nodes.truncate(MAX_NODES_IN_STATUS);
    EgressGuardStatus {
        observed_generation: g.metadata.generation,
        conditions,
        selected_nodes: out.selected.len() as i32,
        enforced_nodes: counts.enforced as i32,
        quarantined_nodes: q.active as i32,
        failed_nodes: counts.failed as i32,
        nodes,
        // While held, the groups the kept plans were made from stay named.
        groups: out
            .groups
            .unwrap_or_else(|| prev.map(|p| p.groups.clone()).unwrap_or_default()),
    }
}

/// Every node the guard plans, in its agent's words, then every node it
/// lost to an older guard.
fn node_states(
    g: &EgressGuard,
    out: &GuardOutcome,
    shapings: &BTreeMap<String, Arc<NodeShaping>>,
) -> Vec<NodeState> {
    let planned = out.planned.iter().map(|n| {
        let mut s = node_state(shapings.get(n).map(|a| a.as_ref()), g);
        s.name = n.clone();
        if g.spec.mode == Mode::Auto {
            s.state = as_auto(s.state);
        }
        s
    });
    let conflicts = out.conflicts.iter().map(|c| NodeState {
        name: c.node.clone(),
        state: NodePhase::Conflict,
        message: format!("node carries EgressGuard {}'s plan (older)", c.winner),
    });
    planned.chain(conflicts).collect()
}

/// A node's phase under an Auto guard, which programs only quarantined
/// nodes: the others watch.
fn as_auto(p: NodePhase) -> NodePhase {
    match p {
        NodePhase::DryRun => NodePhase::Watching,
        NodePhase::Enforced => NodePhase::Quarantined,
        other => other,
    }
}

/// The nodes of a guard counted by phase (before the list is truncated).
#[derive(Debug, Default, PartialEq, Eq)]
struct NodeCounts {
    /// Programmed nodes (Enforced or Quarantined): a dry run enforces nothing.
    enforced: usize,
    /// Nodes an Auto guard watches but does not throttle.
    watching: usize,
    /// Nodes a DryRun guard would shape.
    dry_run: usize,
    /// Nodes whose agent has not confirmed the plan.
    pending: usize,
    /// Nodes whose agent failed to apply the plan.
    failed: usize,
}

impl NodeCounts {
    /// Counts `nodes` by phase.
    fn of(nodes: &[NodeState]) -> Self {
        let mut c = NodeCounts::default();
        for n in nodes {
            match n.state {
                NodePhase::Enforced | NodePhase::Quarantined => c.enforced += 1,
                NodePhase::Watching => c.watching += 1,
                NodePhase::DryRun => c.dry_run += 1,
                NodePhase::Pending => c.pending += 1,
                NodePhase::Failed => c.failed += 1,
                // Counted by the guard's outcome, not by its plans.
                NodePhase::Conflict => {}
            }
        }
        c
    }
}

/// Ready, Degraded and Conflict of a guard that plans nothing new.
fn held_conditions(held: &Held, stamp: &Stamp<'_>) -> Vec<Condition> {
    let (reason, why) = match held {
        Held::Deleting => (guard::DELETING, "being deleted".to_string()),
        Held::Invalid(why) => (guard::INVALID_SPEC, why.clone()),
        Held::Unresolved(why) => (
            guard::WHITELIST_UNRESOLVED,
            format!("{why}\nnodes keep the plans they had; nodes without one get none until every reference resolves"),
        ),
    };
    vec![
        stamp.cond(types::READY, false, reason, why.clone()),
        stamp.cond(types::DEGRADED, true, reason, why),
        stamp.cond(types::CONFLICT, false, guard::NO_CONFLICT, String::new()),
    ]
}

/// Ready, Degraded and Conflict of a guard that planned its nodes: what
/// the agents report of the plans, and the nodes lost to older guards.
fn outcome_conditions(
    g: &EgressGuard,
    out: &GuardOutcome,
    q: &GuardQuarantine,
    nodes: &[NodeState],
    counts: &NodeCounts,
    stamp: &Stamp<'_>,
) -> Vec<Condition> {
    let ready = counts.failed == 0 && counts.pending == 0;
    let (reason, message) = ready_reason(g, out, q, nodes, counts);
    let degraded = if counts.failed == 0 {
        guard::AS_PLANNED
    } else {
        guard::NODES_FAILED
    };
    let conflict = if out.conflicts.is_empty() {
        guard::NO_CONFLICT
    } else {
        guard::NODE_CLAIMED
    };
    vec![
        stamp.cond(types::READY, ready, reason, message),
        stamp.cond(types::DEGRADED, counts.failed > 0, degraded, String::new()),
        stamp.cond(
            types::CONFLICT,
            !out.conflicts.is_empty(),
            conflict,
            conflict_message(out),
        ),
    ]
}

/// Ready's reason and message for a guard that is not held: failed nodes
/// first, then nodes not confirmed yet, then what the mode makes of the rest.
fn ready_reason(
    g: &EgressGuard,
    out: &GuardOutcome,
    q: &GuardQuarantine,
    nodes: &[NodeState],
    counts: &NodeCounts,
) -> (&'static str, String) {
    let selected = out.selected.len();
    if counts.failed > 0 {
        return (guard::NODES_FAILED, failed_message(nodes));
    }
    if counts.pending > 0 {
        let pending = counts.pending;
        let planned = out.planned.len();
        return (
            guard::PROGRESSING,
            format!("{pending} of {planned} nodes not confirmed yet"),
        );
    }
    match g.spec.mode {
        Mode::Auto => (
            guard::WATCHING,
            format!(
                "{} of {selected} selected nodes quarantined (throttled); {} watched",
                q.active, counts.watching
            ),
        ),
        Mode::DryRun => (
            guard::DRY_RUN,
            format!(
                "dry run: {} of {selected} selected nodes would be shaped; nothing is programmed",
                counts.dry_run
            ),
        ),
        Mode::Enforce => (
            guard::ENFORCED,
            format!(
                "{} of {selected} selected nodes enforce this guard",
                counts.enforced
            ),
        ),
    }
}

/// Every failed node with its agent's words, bounded.
fn failed_message(nodes: &[NodeState]) -> String {
    let failed: Vec<String> = nodes
        .iter()
        .filter(|n| n.state == NodePhase::Failed)
        .map(|n| format!("{}: {}", n.name, n.message))
        .collect();
    egressguard_crds::conditions::bounded(&failed.join("; "), MAX_FAILED_MESSAGE)
}

/// Which older guard enforces each node this guard lost.
fn conflict_message(out: &GuardOutcome) -> String {
    out.conflicts
        .iter()
        .map(|c| format!("{} is enforced by {}", c.node, c.winner))
        .collect::<Vec<_>>()
        .join("; ")
}

/// WhitelistResolved, for a guard that names groups. Whether references
/// resolve is known only when they were resolved: not for a guard held as
/// invalid or being deleted.
fn whitelist_resolved(
    g: &EgressGuard,
    held: Option<&Held>,
    stamp: &Stamp<'_>,
) -> Option<Condition> {
    if g.spec.whitelist_groups.is_empty() {
        return None;
    }
    match held {
        Some(Held::Deleting | Held::Invalid(_)) => None,
        Some(Held::Unresolved(why)) => Some(stamp.cond(
            types::WHITELIST_RESOLVED,
            false,
            guard::GROUP_UNRESOLVED,
            why.clone(),
        )),
        None => Some(stamp.cond(
            types::WHITELIST_RESOLVED,
            true,
            guard::RESOLVED,
            "every whitelistGroups reference resolves to valid CIDRGroups".into(),
        )),
    }
}

/// MetricsAvailable, for a guard with Prometheus triggers.
fn metrics_available(q: &GuardQuarantine, stamp: &Stamp<'_>) -> Option<Condition> {
    let cond = match q.metrics.as_ref()? {
        Ok(()) => stamp.cond(
            types::METRICS_AVAILABLE,
            true,
            guard::EVALUATED,
            "every Prometheus trigger returned a value for every node".into(),
        ),
        Err(why) => stamp.cond(
            types::METRICS_AVAILABLE,
            false,
            guard::UNKNOWN,
            format!("{why}; unknown readings neither quarantine nor release"),
        ),
    };
    Some(cond)
}

/// SelectorNodeWritable, for a guard with a node selector: can a node's own
/// kubelet move the node into or out of the guard?
fn selector_node_writable(g: &EgressGuard, stamp: &Stamp<'_>) -> Option<Condition> {
    g.spec.node_selector.as_ref()?;
    let keys = node_writable_selector_keys(g);
    let cond = if keys.is_empty() {
        stamp.cond(
            types::SELECTOR_NODE_WRITABLE,
            false,
            guard::RESTRICTED_LABELS,
            "spec.nodeSelector uses only labels a node's kubelet cannot set".into(),
        )
    } else {
        stamp.cond(
            types::SELECTOR_NODE_WRITABLE,
            true,
            guard::KUBELET_SETTABLE,
            format!(
                "spec.nodeSelector uses labels a node's own kubelet can set ({}): a compromised node can leave or join this guard by relabelling itself (a quarantined node stays quarantined whatever its labels); select with node-restriction.kubernetes.io/ labels, which the NodeRestriction admission plugin keeps from kubelets",
                keys.join(", ")
            ),
        )
    };
    Some(cond)
}

/// Reports CRDs the guard needs and the server does not serve: Ready is
/// replaced by a False one, CRDsInstalled added, and the guard is Stalled.
/// Ready says what is in force: an Auto guard that cannot record a
/// quarantine, or a guard whose groups cannot be read, is not.
fn crds_missing(
    conditions: &mut Vec<Condition>,
    missing: &[&'static str],
    stamp: &Stamp<'_>,
) -> (Progress, &'static str) {
    let why = crate::kinds::missing_message(missing);
    let reason = guard::CRD_MISSING;
    conditions.retain(|c| c.type_ != types::READY);
    conditions.push(stamp.cond(types::READY, false, reason, why.clone()));
    conditions.push(stamp.cond(types::CRDS_INSTALLED, false, reason, why));
    (Progress::Stalled, reason)
}

/// The Ready condition's message (the kstatus pair repeats it).
fn ready_message(conditions: &[Condition]) -> String {
    conditions
        .iter()
        .find(|c| c.type_ == types::READY)
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// The plan that asks a node's agent to remove its shaping.
pub fn removal(node: &str) -> NodeShapingSpec {
    NodeShapingSpec {
        node_name: node.into(),
        guard: None,
        shaping: None,
        groups: vec![],
        protected: vec![],
        enforce: false,
    }
}

/// Removal confirmed by the agent: it acted on the current generation,
/// nothing is enforced, no removal failed, and it says Ready.
pub fn removal_confirmed(ns: &NodeShaping) -> bool {
    let st = ns.status.as_ref();
    ns.spec.is_removal()
        && st.and_then(|s| s.observed_generation) == ns.metadata.generation
        && st.is_some_and(|s| {
            s.interfaces
                .iter()
                .all(|i| !i.enforced && i.error.is_none())
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == types::READY && c.status == "True")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Conflict;
    use egressguard_crds::load::parse_str;
    use egressguard_crds::node_shaping::{GuardRef, NodeShapingStatus};

    fn guard(extra: &str) -> EgressGuard {
        let mut g = parse_str(&format!(
            "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: idc}}\nspec:\n  uplink: {{rate: 20Mbit}}\n  throttle: {{rate: 1Mbit, destinations: [{{port: 443}}]}}\n{extra}"
        ))
        .expect("guard")
        .remove(0);
        g.metadata.generation = Some(2);
        g
    }

    /// A node's plan for generation 2 of the guard, and what its agent says
    /// (`None`: nothing yet).
    fn plan(node: &str, ready: Option<(bool, &str, &str)>) -> (String, Arc<NodeShaping>) {
        let mut ns = NodeShaping::new(
            node,
            NodeShapingSpec {
                node_name: node.into(),
                guard: Some(GuardRef {
                    name: "idc".into(),
                    uid: String::new(),
                    generation: 2,
                }),
                shaping: None,
                groups: vec![],
                protected: vec![],
                enforce: true,
            },
        );
        ns.metadata.generation = Some(1);
        ns.status = ready.map(|(ok, reason, message)| NodeShapingStatus {
            observed_generation: Some(1),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: if ok { "True" } else { "False" }.into(),
                reason: reason.into(),
                message: message.into(),
                observed_generation: Some(1),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
            }],
            ..NodeShapingStatus::default()
        });
        (node.to_string(), Arc::new(ns))
    }

    fn decision(out: GuardOutcome) -> Decision {
        Decision {
            guards: BTreeMap::from([("idc".to_string(), out)]),
            ..Decision::default()
        }
    }

    fn planned(nodes: &[&str]) -> GuardOutcome {
        GuardOutcome {
            selected: nodes.iter().map(|n| n.to_string()).collect(),
            planned: nodes.iter().map(|n| n.to_string()).collect(),
            ..GuardOutcome::default()
        }
    }

    /// (type, status, reason, message) of every condition.
    fn conditions(s: &EgressGuardStatus) -> Vec<(String, String, String, String)> {
        s.conditions
            .iter()
            .map(|c| {
                (
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.message.clone(),
                )
            })
            .collect()
    }

    fn ready(s: &EgressGuardStatus) -> (String, String, String) {
        let c = conditions(s).remove(0);
        (c.1, c.2, c.3)
    }

    /// Name, the plans, the Ready condition expected, enforced and failed counts.
    type Case = (
        &'static str,
        Vec<(String, Arc<NodeShaping>)>,
        (&'static str, &'static str, &'static str),
        i32,
        i32,
    );

    #[test]
    fn guard_status_follows_what_the_agents_report() {
        let g = guard("");
        let q = GuardQuarantine::default();
        let enforced = (true, reasons::ENFORCED, "enforced on eth0");
        let cases: Vec<Case> = vec![
            (
                "both enforced",
                vec![plan("n1", Some(enforced)), plan("n2", Some(enforced))],
                (
                    "True",
                    "Enforced",
                    "2 of 2 selected nodes enforce this guard",
                ),
                2,
                0,
            ),
            (
                "one failed",
                vec![
                    plan("n1", Some(enforced)),
                    plan("n2", Some((false, reasons::APPLY_FAILED, "eth0: refused"))),
                ],
                ("False", "NodesFailed", "n2: eth0: refused"),
                1,
                1,
            ),
            (
                "one not reported yet",
                vec![plan("n1", Some(enforced)), plan("n2", None)],
                ("False", "Progressing", "1 of 2 nodes not confirmed yet"),
                1,
                0,
            ),
            (
                "one waiting for its inputs",
                vec![
                    plan("n1", Some(enforced)),
                    plan(
                        "n2",
                        Some((false, reasons::WAITING, "reading CIDRGroup partners")),
                    ),
                ],
                ("False", "Progressing", "1 of 2 nodes not confirmed yet"),
                1,
                0,
            ),
        ];
        for (name, shapings, want, enforced_nodes, failed_nodes) in cases {
            let shapings: BTreeMap<String, Arc<NodeShaping>> = shapings.into_iter().collect();
            let s = guard_status(&g, &decision(planned(&["n1", "n2"])), &shapings, &q);
            let (status, reason, message) = ready(&s);
            assert_eq!(
                (status.as_str(), reason.as_str(), message.as_str()),
                want,
                "{name}"
            );
            assert_eq!(s.enforced_nodes, enforced_nodes, "{name}");
            assert_eq!(s.failed_nodes, failed_nodes, "{name}");
            assert_eq!(s.selected_nodes, 2, "{name}");
            assert_eq!(s.observed_generation, Some(2), "{name}");
        }
        // The waiting node is Pending with the agent's words.
        let shapings: BTreeMap<String, Arc<NodeShaping>> = [plan(
            "n2",
            Some((false, reasons::WAITING, "reading CIDRGroup partners")),
        )]
        .into_iter()
        .collect();
        let s = guard_status(&g, &decision(planned(&["n2"])), &shapings, &q);
        assert_eq!(s.nodes[0].state, NodePhase::Pending);
        assert_eq!(s.nodes[0].message, "reading CIDRGroup partners");
    }

    #[test]
    fn auto_guards_watch_and_quarantine() {
        let g = guard("  mode: Auto\n  quarantine: {triggers: [{name: a, alertmanager: {matchers: {alertname: X}}}]}\n");
        let shapings: BTreeMap<String, Arc<NodeShaping>> = [
            plan(
                "n1",
                Some((true, reasons::DRY_RUN, "dry run: would program")),
            ),
            plan("n2", Some((true, reasons::ENFORCED, "enforced on eth0"))),
        ]
        .into_iter()
        .collect();
        let q = GuardQuarantine {
            active: 1,
            ..Default::default()
        };
        let s = guard_status(&g, &decision(planned(&["n1", "n2"])), &shapings, &q);
        let states: Vec<NodePhase> = s.nodes.iter().map(|n| n.state).collect();
        assert_eq!(states, [NodePhase::Watching, NodePhase::Quarantined]);
        assert_eq!(
            ready(&s),
            (
                "True".into(),
                "Watching".into(),
                "1 of 2 selected nodes quarantined (throttled); 1 watched".into()
            )
        );
        assert_eq!((s.quarantined_nodes, s.enforced_nodes), (1, 1));
    }

    #[test]
    fn held_guards_and_conflicts_say_why() {
        let g = guard("  whitelistGroups: [{name: partners}]\n");
        let q = GuardQuarantine::default();
        let held = GuardOutcome {
            held: Some(Held::Unresolved("CIDRGroup partners does not exist".into())),
            ..GuardOutcome::default()
        };
        let s = guard_status(&g, &decision(held), &BTreeMap::new(), &q);
        let c = conditions(&s);
        assert_eq!(
            (c[0].1.as_str(), c[0].2.as_str()),
            ("False", "WhitelistUnresolved")
        );
        assert!(c[0]
            .3
            .starts_with("CIDRGroup partners does not exist\nnodes keep the plans they had"));
        let resolved = c
            .iter()
            .find(|c| c.0 == "WhitelistResolved")
            .expect("condition");
        assert_eq!(
            (
                resolved.1.as_str(),
                resolved.2.as_str(),
                resolved.3.as_str()
            ),
            (
                "False",
                "GroupUnresolved",
                "CIDRGroup partners does not exist"
            )
        );

        let mut out = planned(&["n1"]);
        out.conflicts.push(Conflict {
            node: "n2".into(),
            winner: "old".into(),
        });
        let shapings: BTreeMap<String, Arc<NodeShaping>> =
            [plan("n1", Some((true, reasons::ENFORCED, "")))]
                .into_iter()
                .collect();
        let s = guard_status(&guard(""), &decision(out), &shapings, &q);
        let conflict = conditions(&s)
            .into_iter()
            .find(|c| c.0 == "Conflict")
            .expect("c");
        assert_eq!(
            (
                conflict.1.as_str(),
                conflict.2.as_str(),
                conflict.3.as_str()
            ),
            ("True", "NodeClaimedByOlderGuard", "n2 is enforced by old")
        );
        assert_eq!(s.nodes[1].state, NodePhase::Conflict);
        assert_eq!(
            s.nodes[1].message,
            "node carries EgressGuard old's plan (older)"
        );
    }

    #[test]
    fn nodes_are_counted_by_phase() {
        let node = |state| NodeState {
            name: "n".into(),
            state,
            message: String::new(),
        };
        let nodes: Vec<NodeState> = [
            NodePhase::Enforced,
            NodePhase::Quarantined,
            NodePhase::Watching,
            NodePhase::DryRun,
            NodePhase::Pending,
            NodePhase::Failed,
            NodePhase::Conflict,
        ]
        .into_iter()
        .map(node)
        .collect();
        assert_eq!(
            NodeCounts::of(&nodes),
            NodeCounts {
                enforced: 2,
                watching: 1,
                dry_run: 1,
                pending: 1,
                failed: 1,
            }
        );
    }

    #[test]
    fn whitelist_resolved_is_reported_only_when_references_were_resolved() {
        let stamp = Stamp::new(Some(2), None);
        let named = guard("  whitelistGroups: [{name: partners}]\n");
        let status = |g: &EgressGuard, held: Option<Held>| {
            whitelist_resolved(g, held.as_ref(), &stamp).map(|c| (c.status, c.reason))
        };
        assert_eq!(status(&guard(""), None), None, "no groups named");
        assert_eq!(
            status(&named, None),
            Some(("True".into(), guard::RESOLVED.into()))
        );
        assert_eq!(
            status(&named, Some(Held::Unresolved("gone".into()))),
            Some(("False".into(), guard::GROUP_UNRESOLVED.into()))
        );
        assert_eq!(status(&named, Some(Held::Deleting)), None);
        assert_eq!(status(&named, Some(Held::Invalid("bad".into()))), None);
    }

    #[test]
    fn metrics_and_selector_conditions_say_what_they_know() {
        let stamp = Stamp::new(Some(2), None);
        let metrics = |m: Option<Result<(), crate::evaluate::MetricsUnavailable>>| {
            let q = GuardQuarantine {
                metrics: m,
                ..Default::default()
            };
            metrics_available(&q, &stamp).map(|c| (c.status, c.reason, c.message))
        };
        assert_eq!(metrics(None), None, "no Prometheus triggers");
        assert_eq!(metrics(Some(Ok(()))).map(|c| c.0), Some("True".to_string()));
        assert_eq!(
            metrics(Some(Err(crate::evaluate::MetricsUnavailable(
                "prometheus down".into()
            )))),
            Some((
                "False".into(),
                guard::UNKNOWN.into(),
                "prometheus down; unknown readings neither quarantine nor release".into()
            ))
        );
        let writable = |extra: &str| {
            selector_node_writable(&guard(extra), &stamp).map(|c| (c.status, c.reason))
        };
        assert_eq!(writable(""), None, "no selector");
        assert_eq!(
            writable("  nodeSelector: {matchLabels: {site: a}}\n"),
            Some(("True".into(), guard::KUBELET_SETTABLE.into()))
        );
        assert_eq!(
            writable("  nodeSelector: {matchLabels: {node-restriction.kubernetes.io/site: a}}\n"),
            Some(("False".into(), guard::RESTRICTED_LABELS.into()))
        );
    }

    #[test]
    fn each_mode_says_what_its_ready_nodes_do() {
        let enforced = (true, reasons::ENFORCED, "enforced on eth0");
        let shapings: BTreeMap<String, Arc<NodeShaping>> =
            [plan("n1", Some((true, reasons::DRY_RUN, "dry run")))]
                .into_iter()
                .collect();
        let g = guard("  mode: DryRun\n");
        let s = guard_status(
            &g,
            &decision(planned(&["n1"])),
            &shapings,
            &GuardQuarantine::default(),
        );
        assert_eq!(
            ready(&s),
            (
                "True".into(),
                "DryRun".into(),
                "dry run: 1 of 1 selected nodes would be shaped; nothing is programmed".into()
            )
        );
        assert_eq!(s.enforced_nodes, 0);
        let shapings: BTreeMap<String, Arc<NodeShaping>> =
            [plan("n1", Some(enforced))].into_iter().collect();
        let s = guard_status(
            &guard(""),
            &decision(planned(&["n1"])),
            &shapings,
            &GuardQuarantine::default(),
        );
        assert_eq!(ready(&s).1, "Enforced");
        assert_eq!(s.enforced_nodes, 1);
    }

    #[test]
    fn a_missing_crd_stalls_the_guard_it_affects() {
        let g = guard("  whitelistGroups: [{name: partners}]\n");
        let q = GuardQuarantine {
            missing_kinds: vec!["cidrgroups.egressguard.io", "quarantines.egressguard.io"],
            ..Default::default()
        };
        let s = guard_status(&g, &decision(planned(&[])), &BTreeMap::new(), &q);
        let c = conditions(&s);
        let ready: Vec<_> = c.iter().filter(|c| c.0 == "Ready").collect();
        assert_eq!(ready.len(), 1, "Ready is replaced, not repeated");
        assert_eq!(
            (ready[0].1.as_str(), ready[0].2.as_str()),
            ("False", guard::CRD_MISSING)
        );
        // An Enforce guard needs no Quarantine kind: only the groups' is named.
        assert!(ready[0].3.contains("cidrgroups.egressguard.io"));
        assert!(!ready[0].3.contains("quarantines.egressguard.io"));
        let installed = c.iter().find(|c| c.0 == "CRDsInstalled").expect("c");
        assert_eq!(installed.1, "False");
        let stalled = c.iter().find(|c| c.0 == "Stalled").expect("stalled");
        assert_eq!(
            (stalled.2.as_str(), &stalled.3),
            (guard::CRD_MISSING, &ready[0].3)
        );
    }

    #[test]
    fn removal_is_confirmed_only_by_a_ready_agent_at_the_current_generation() {
        let mut ns = NodeShaping::new("n1", removal("n1"));
        ns.metadata.generation = Some(3);
        assert!(!removal_confirmed(&ns), "no status yet");
        ns.status = Some(NodeShapingStatus {
            observed_generation: Some(3),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: reasons::REMOVED.into(),
                message: String::new(),
                observed_generation: Some(3),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
            }],
            ..NodeShapingStatus::default()
        });
        assert!(removal_confirmed(&ns));
        ns.metadata.generation = Some(4);
        assert!(!removal_confirmed(&ns), "an older generation's report");
    }
}
