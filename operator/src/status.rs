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

use crate::decide::{Decision, Held};

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

fn cond(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    gen: Option<i64>,
    prev: Option<&EgressGuardStatus>,
) -> Condition {
    let previous = prev.map_or(&[][..], |p| p.conditions.as_slice());
    egressguard_crds::conditions::condition(type_, ok, reason, message, gen, previous, || {
        Time(Timestamp::now())
    })
}

/// A guard's quarantine facts for its status.
#[derive(Debug, Clone, Default)]
pub struct GuardQuarantine {
    /// Nodes quarantined now.
    pub active: usize,
    /// For guards with Prometheus triggers: Ok, or why metrics are unavailable.
    pub metrics: Option<Result<(), String>>,
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
            "cidrgroups.egressguard.io" => !g.spec.whitelist_groups.is_empty(),
            "quarantines.egressguard.io" => g.spec.mode == Mode::Auto,
            _ => true,
        })
        .collect()
}

/// The status a guard should have now.
pub fn guard_status(
    g: &EgressGuard,
    d: &Decision,
    shapings: &BTreeMap<String, Arc<NodeShaping>>,
    q: &GuardQuarantine,
) -> EgressGuardStatus {
    let name = g.name_any();
    let out = d.guards.get(&name).cloned().unwrap_or_default();
    let prev = g.status.as_ref();
    let gen = g.metadata.generation;
    let mut nodes: Vec<NodeState> = out
        .planned
        .iter()
        .map(|n| {
            let mut s = node_state(shapings.get(n).map(|a| a.as_ref()), g);
            s.name = n.clone();
            s
        })
        .collect();
    if g.spec.mode == Mode::Auto {
        // An Auto guard programs only quarantined nodes: the others watch.
        for n in &mut nodes {
            n.state = match n.state {
                NodePhase::DryRun => NodePhase::Watching,
                NodePhase::Enforced => NodePhase::Quarantined,
                other => other,
            };
        }
    }
    nodes.extend(out.conflicts.iter().map(|c| NodeState {
        name: c.node.clone(),
        state: NodePhase::Conflict,
        message: format!("node carries EgressGuard {}'s plan (older)", c.winner),
    }));
    // A dry run enforces nothing: only programmed nodes count.
    let enforced = nodes
        .iter()
        .filter(|n| matches!(n.state, NodePhase::Enforced | NodePhase::Quarantined))
        .count();
    let count = |p: NodePhase| nodes.iter().filter(|n| n.state == p).count();
    let (watching, dry_run, pending) = (
        count(NodePhase::Watching),
        count(NodePhase::DryRun),
        count(NodePhase::Pending),
    );
    let failed: Vec<&NodeState> = nodes
        .iter()
        .filter(|n| n.state == NodePhase::Failed)
        .collect();
    let conditions = if let Some(held) = &out.held {
        let (reason, why) = match held {
            Held::Deleting => (guard::DELETING, "being deleted".to_string()),
            Held::Invalid(why) => (guard::INVALID_SPEC, why.clone()),
            Held::Unresolved(why) => (
                guard::WHITELIST_UNRESOLVED,
                format!("{why}\nnodes keep the plans they had; nodes without one get none until every reference resolves"),
            ),
        };
        vec![
            cond(types::READY, false, reason, why.clone(), gen, prev),
            cond(types::DEGRADED, true, reason, why, gen, prev),
            cond(
                types::CONFLICT,
                false,
                guard::NO_CONFLICT,
                String::new(),
                gen,
                prev,
            ),
        ]
    } else {
        let ready = failed.is_empty() && pending == 0;
        let (reason, msg) = if !failed.is_empty() {
            (
                guard::NODES_FAILED,
                egressguard_crds::conditions::bounded(
                    &failed
                        .iter()
                        .map(|n| format!("{}: {}", n.name, n.message))
                        .collect::<Vec<_>>()
                        .join("; "),
                    MAX_FAILED_MESSAGE,
                ),
            )
        } else if pending > 0 {
            (
                guard::PROGRESSING,
                format!("{pending} of {} nodes not confirmed yet", out.planned.len()),
            )
        } else if g.spec.mode == Mode::Auto {
            (
                guard::WATCHING,
                format!(
                    "{} of {} selected nodes quarantined (throttled); {watching} watched",
                    q.active,
                    out.selected.len()
                ),
            )
        } else if g.spec.mode == Mode::DryRun {
            (
                guard::DRY_RUN,
                format!(
                    "dry run: {dry_run} of {} selected nodes would be shaped; nothing is programmed",
                    out.selected.len()
                ),
            )
        } else {
            (
                guard::ENFORCED,
                format!(
                    "{enforced} of {} selected nodes enforce this guard",
                    out.selected.len()
                ),
            )
        };
        vec![
            cond(types::READY, ready, reason, msg, gen, prev),
            cond(
                types::DEGRADED,
                !failed.is_empty(),
                if failed.is_empty() {
                    guard::AS_PLANNED
                } else {
                    guard::NODES_FAILED
                },
                String::new(),
                gen,
                prev,
            ),
            cond(
                types::CONFLICT,
                !out.conflicts.is_empty(),
                if out.conflicts.is_empty() {
                    guard::NO_CONFLICT
                } else {
                    guard::NODE_CLAIMED
                },
                out.conflicts
                    .iter()
                    .map(|c| format!("{} is enforced by {}", c.node, c.winner))
                    .collect::<Vec<_>>()
                    .join("; "),
                gen,
                prev,
            ),
        ]
    };
    let mut conditions = conditions;
    // Whether references resolve is known only when they were resolved: not
    // for a guard held as invalid or being deleted.
    let resolved_known = matches!(out.held, None | Some(Held::Unresolved(_)));
    if !g.spec.whitelist_groups.is_empty() && resolved_known {
        conditions.push(match &out.held {
            Some(Held::Unresolved(why)) => cond(
                types::WHITELIST_RESOLVED,
                false,
                guard::GROUP_UNRESOLVED,
                why.clone(),
                gen,
                prev,
            ),
            _ => cond(
                types::WHITELIST_RESOLVED,
                true,
                guard::RESOLVED,
                "every whitelistGroups reference resolves to valid CIDRGroups".into(),
                gen,
                prev,
            ),
        });
    }
    if let Some(m) = &q.metrics {
        conditions.push(match m {
            Ok(()) => cond(
                types::METRICS_AVAILABLE,
                true,
                guard::EVALUATED,
                "every Prometheus trigger returned a value for every node".into(),
                gen,
                prev,
            ),
            Err(why) => cond(
                types::METRICS_AVAILABLE,
                false,
                guard::UNKNOWN,
                format!("{why}; unknown readings neither quarantine nor release"),
                gen,
                prev,
            ),
        });
    }
    if g.spec.node_selector.is_some() {
        let keys = node_writable_selector_keys(g);
        conditions.push(if keys.is_empty() {
            cond(
                types::SELECTOR_NODE_WRITABLE,
                false,
                guard::RESTRICTED_LABELS,
                "spec.nodeSelector uses only labels a node's kubelet cannot set".into(),
                gen,
                prev,
            )
        } else {
            cond(
                types::SELECTOR_NODE_WRITABLE,
                true,
                guard::KUBELET_SETTABLE,
                format!(
                    "spec.nodeSelector uses labels a node's own kubelet can set ({}): a compromised node can leave or join this guard by relabelling itself (a quarantined node stays quarantined whatever its labels); select with node-restriction.kubernetes.io/ labels, which the NodeRestriction admission plugin keeps from kubelets",
                    keys.join(", ")
                ),
                gen,
                prev,
            )
        });
    }
    let (mut progress, mut reason) = progress(out.held.as_ref(), !failed.is_empty(), pending);
    let missing = missing_for(g, &q.missing_kinds);
    if !missing.is_empty() {
        // Ready says what is in force: an Auto guard that cannot record a
        // quarantine, or a guard whose groups cannot be read, is not.
        let why = crate::kinds::missing_message(&missing);
        (progress, reason) = (Progress::Stalled, guard::CRD_MISSING);
        conditions.retain(|c| c.type_ != types::READY);
        conditions.push(cond(types::READY, false, reason, why.clone(), gen, prev));
        conditions.push(cond(types::CRDS_INSTALLED, false, reason, why, gen, prev));
    }
    let ready_message = conditions
        .iter()
        .find(|c| c.type_ == types::READY)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    let previous = prev.map_or(&[][..], |p| p.conditions.as_slice());
    conditions.extend(
        progress.condition(reason, ready_message, gen, previous, || {
            Time(Timestamp::now())
        }),
    );
    let failed_count = failed.len() as i32;
    nodes.truncate(MAX_NODES_IN_STATUS);
    EgressGuardStatus {
        observed_generation: gen,
        conditions,
        selected_nodes: out.selected.len() as i32,
        enforced_nodes: enforced as i32,
        quarantined_nodes: q.active as i32,
        failed_nodes: failed_count,
        nodes,
        // While held, the groups the kept plans were made from stay named.
        groups: out
            .groups
            .clone()
            .unwrap_or_else(|| prev.map(|p| p.groups.clone()).unwrap_or_default()),
    }
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
    use crate::decide::{Conflict, GuardOutcome};
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
