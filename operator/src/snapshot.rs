//! A pass's reads: the caches as they stand at its start (owned, so the
//! decision can borrow freely), with the facts the decision takes from them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use egressguard_crds::node_shaping::{NodeShapingSpec, ProtectedEntry};
use egressguard_crds::{EgressGuard, NodeShaping, Phase, Quarantine};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};

use crate::context::{api_endpoints, Ctx};
use crate::decide::{decide_with, Decision, Extras, NodeFacts};
use crate::enforcement::NodeReport;
use crate::index::{GroupFacts, ParsedGuard};
use crate::intent::{intend, Intent, Observed};
use crate::quarantine::{GuardFacts, World};
use crate::status::GuardQuarantine;

/// The caches at the start of a pass, owned so the pass can borrow freely.
pub(crate) struct Snapshot {
    pub(crate) guards: Vec<Arc<EgressGuard>>,
    /// The CRDs the API server did not serve, read once for the whole pass.
    pub(crate) missing_kinds: Vec<&'static str>,
    /// The guards as parsed once per change (the index's view).
    pub(crate) parsed: BTreeMap<String, ParsedGuard>,
    /// The CIDRGroups' facts, parsed once per change.
    pub(crate) groups: BTreeMap<String, GroupFacts>,
    /// Node facts after the node address policy.
    pub(crate) nodes: Vec<NodeFacts>,
    pub(crate) ignored: Vec<crate::decide::IgnoredAddress>,
    pub(crate) node_names: BTreeSet<String>,
    pub(crate) node_objs: Vec<Arc<Node>>,
    pub(crate) endpoints: Vec<IpAddr>,
    /// The plans: the cache, with this replica's writes it has not seen yet.
    pub(crate) shapings: BTreeMap<String, Arc<NodeShaping>>,
    /// Each plan's version in the cache itself, recorded with the writes.
    pub(crate) cached_rv: BTreeMap<String, Option<String>>,
    pub(crate) quarantines: Vec<Arc<Quarantine>>,
    /// The agents' heartbeats, by node (the Lease's holder).
    pub(crate) heartbeats: BTreeMap<String, Arc<Lease>>,
    /// Event targets by guard name.
    pub(crate) refs: BTreeMap<String, ObjectReference>,
}

impl Snapshot {
    pub(crate) fn take(ctx: &Ctx) -> Snapshot {
        let guards = ctx.caches.guards.state();
        let (parsed, groups) = {
            let mut index = ctx.index.lock().unwrap_or_else(|p| p.into_inner());
            let parsed = index.guards(&guards);
            let groups = index.groups(&ctx.caches.groups.state());
            ctx.metrics.lock().unwrap_or_else(|p| p.into_inner()).parses = index.parses;
            (parsed, groups)
        };
        let node_objs = ctx.caches.nodes.state();
        let reported: Vec<NodeFacts> = node_objs.iter().map(|n| NodeFacts::of(n)).collect();
        let (nodes, ignored) = crate::decide::limit_node_addresses(&reported, &ctx.node_addresses);
        let mut shapings: BTreeMap<String, Arc<NodeShaping>> = ctx
            .caches
            .shapings
            .state()
            .into_iter()
            .map(|s| (s.name_any(), s))
            .collect();
        let cached_rv = shapings
            .iter()
            .map(|(n, s)| (n.clone(), s.resource_version()))
            .collect();
        ctx.own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .overlay(&mut shapings);
        Snapshot {
            missing_kinds: ctx.caches.missing(),
            node_names: nodes.iter().map(|n| n.name.clone()).collect(),
            refs: guards
                .iter()
                .map(|g| (g.name_any(), g.object_ref(&())))
                .collect(),
            guards,
            parsed,
            groups,
            nodes,
            ignored,
            node_objs,
            endpoints: api_endpoints(&ctx.caches.slices.state()),
            shapings,
            cached_rv,
            quarantines: ctx.caches.quarantines.state(),
            heartbeats: ctx
                .caches
                .heartbeats
                .state()
                .into_iter()
                .filter_map(|l| {
                    let node = l.spec.as_ref()?.holder_identity.clone()?;
                    Some((node, l))
                })
                .collect(),
        }
    }

    /// The decision's inputs beyond guards and nodes; quarantines as stored.
    pub(crate) fn extras(&self, ctx: &Ctx) -> Extras {
        let prometheus = ctx.quarantine.prometheus.as_ref().and_then(|p| p.address());
        Extras {
            quarantined: stored_active(&self.quarantines),
            protected: prometheus
                .map(|ip| ProtectedEntry {
                    cidr: ipnet::IpNet::from(ip).to_string(),
                    reason: "Prometheus (its scrapes release quarantines)".into(),
                })
                .into_iter()
                .collect(),
            groups: self.groups.clone(),
            parsed: self.parsed.clone(),
            // Agents from before plans by reference get the spec copied.
            legacy_agents: self.agents_lacking(|st| st.by_reference),
            // Agents from before digests in the guard's status get them in the plan.
            digests_in_plan: self.agents_lacking(|st| st.digests_from_guard),
        }
    }

    /// Nodes whose agent reported a status without `feature`: an agent
    /// from before it, whose plans must keep the older form until it rolls.
    fn agents_lacking(
        &self,
        feature: impl Fn(&egressguard_crds::NodeShapingStatus) -> bool,
    ) -> BTreeSet<String> {
        self.shapings
            .iter()
            .filter(|(_, s)| {
                s.status
                    .as_ref()
                    .is_some_and(|st| agent_wrote(st) && !feature(st))
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub(crate) fn decide(&self, extras: &Extras) -> Decision {
        // Borrowed, not cloned: plans can be large and this runs every pass.
        let current: BTreeMap<&str, &NodeShapingSpec> = self
            .shapings
            .iter()
            .map(|(n, s)| (n.as_str(), &s.spec))
            .collect();
        decide_with(&self.guards, &self.nodes, &self.endpoints, &current, extras)
    }

    /// What `crate::quarantine` decides from.
    pub(crate) fn world<'a>(&'a self, ctx: &Ctx, d: &'a Decision) -> World<'a> {
        let signals = ctx
            .eval
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .signals
            .clone();
        World {
            guards: self
                .guards
                .iter()
                .map(|g| {
                    let out = d.guards.get(&g.name_any());
                    let rules = self.parsed.get(&g.name_any()).and_then(|p| p.rules.clone());
                    let facts = GuardFacts {
                        guard: g,
                        rules,
                        planned: out
                            .map(|o| o.planned.iter().cloned().collect())
                            .unwrap_or_default(),
                        selected: out.map_or(0, |o| o.selected.len()),
                    };
                    (g.name_any(), facts)
                })
                .collect(),
            nodes: self
                .node_objs
                .iter()
                .map(|n| (n.name_any(), n.labels()))
                .collect(),
            quarantines: &self.quarantines,
            signals,
            now: Timestamp::now(),
            retention: ctx.quarantine.retention,
            enforcement: self
                .node_objs
                .iter()
                .map(|n| {
                    let name = n.name_any();
                    let lease = self.heartbeats.get(&name);
                    let r = NodeReport::of(
                        Some(n),
                        self.shapings.get(&name).map(|s| &**s),
                        lease.map(|l| &**l),
                        lease.map(|l| heartbeat_seen(ctx, &name, l)),
                    );
                    (name, r)
                })
                .collect(),
        }
    }

    /// Each guard's quarantine facts for its status.
    pub(crate) fn guard_quarantine(
        &self,
        ctx: &Ctx,
        extras: &Extras,
    ) -> BTreeMap<String, GuardQuarantine> {
        let available = ctx
            .eval
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .available
            .clone();
        self.guards
            .iter()
            .map(|g| {
                let name = g.name_any();
                let q = GuardQuarantine {
                    active: extras.quarantined.get(&name).map_or(0, |s| s.len()),
                    metrics: available.get(&name).cloned(),
                    missing_kinds: self.missing_kinds.clone(),
                };
                (name, q)
            })
            .collect()
    }

    /// Plans, guard statuses, finalizers and releases for the decision
    /// under `extras` (whose `quarantined` says which quarantines hold).
    pub(crate) fn intent(&self, ctx: &Ctx, extras: &Extras, now: Timestamp) -> Intent {
        let quarantine = self.guard_quarantine(ctx, extras);
        let observed = Observed {
            guards: &self.guards,
            shapings: &self.shapings,
            nodes: &self.node_names,
            quarantine: &quarantine,
            now,
            cleanup_timeout: ctx.cleanup_timeout,
        };
        intend(&observed, self.decide(extras))
    }
}

/// An agent wrote this status: it observed a generation (1 or more). The
/// schema's default, `observedGeneration: 0`, is nobody's report.
fn agent_wrote(st: &egressguard_crds::NodeShapingStatus) -> bool {
    st.observed_generation.is_some_and(|g| g > 0)
}

/// Guard → nodes with an Active quarantine, as stored.
/// When this operator first saw `node`'s heartbeat Lease at its current
/// resourceVersion: the operator's clock only, as leader election does, so
/// a skewed node clock neither fakes nor hides a renewal.
fn heartbeat_seen(ctx: &Ctx, node: &str, lease: &Lease) -> Timestamp {
    let rv = lease.resource_version().unwrap_or_default();
    let mut seen = ctx.heartbeat_seen.lock().unwrap_or_else(|p| p.into_inner());
    match seen.get(node) {
        Some((v, at)) if *v == rv => *at,
        _ => {
            let now = Timestamp::now();
            seen.insert(node.to_string(), (rv, now));
            now
        }
    }
}

/// Guard → nodes with an Active quarantine, as stored.
fn stored_active(qs: &[Arc<Quarantine>]) -> BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut out: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for q in qs {
        if q.metadata.deletion_timestamp.is_none()
            && q.status.as_ref().and_then(|s| s.phase) == Some(Phase::Active)
        {
            out.entry(q.spec.guard.clone())
                .or_default()
                .insert(q.spec.node_name.clone());
        }
    }
    out
}
