//! Which node enforces what: guards + nodes + control-plane endpoints in,
//! one plan per node and one outcome per guard out. Pure, deterministic.
//!
//! # Rules
//! - A guard that fails validation selects nothing and reports why.
//! - A guard being deleted no longer plans anything.
//! - A node carries at most one guard's plan. When several guards select a
//!   node, the oldest guard (creation time, then name) wins and the others
//!   report a `Conflict` for that node. The winner never depends on the order
//!   objects arrive in, so the choice never flaps.
//! - Every plan protects the API server endpoints; unless the guard sets
//!   `protectClusterTraffic: false`, also the nodes' InternalIPs (all of them,
//!   the node's own included, aggregated into prefixes: one small list for
//!   every plan instead of N lists of N addresses).
//! - `Enforce` programs; `DryRun` computes and reports only; `Auto` programs
//!   only the nodes it has quarantined ([`crate::quarantine`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use egressguard_crds::node_shaping::{GuardRef, NodeShapingSpec, ProtectedEntry, ResolvedGroup};
use egressguard_crds::{EgressGuard, Mode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// What the operator knows about a node (from a metadata-only watch plus addresses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    /// Node name.
    pub name: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// `status.addresses` of type InternalIP.
    pub internal_ips: Vec<IpAddr>,
}

impl NodeFacts {
    /// What the decisions need to know about a Node: its name, labels and
    /// InternalIPs (what its own kubelet reports; see [`limit_node_addresses`]).
    pub fn of(n: &k8s_openapi::api::core::v1::Node) -> NodeFacts {
        NodeFacts {
            name: n.metadata.name.clone().unwrap_or_default(),
            labels: n.metadata.labels.clone().unwrap_or_default(),
            internal_ips: n
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse().ok())
                .collect(),
        }
    }
}

/// Which self-reported node addresses may become protected destinations.
///
/// A node's kubelet writes its own Node status, so a compromised node could
/// list its command-and-control server as an InternalIP and have every other
/// node exempt it from shaping. Only addresses inside the cluster's node
/// ranges count, and only a few per node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddressPolicy {
    /// Ranges node addresses must fall in.
    pub ranges: Vec<ipnet::IpNet>,
    /// At most this many addresses per node (in the order the Node lists them).
    pub max_per_node: usize,
}

impl Default for NodeAddressPolicy {
    /// Private and shared address space (RFC 1918, RFC 6598, ULA), 4 per node.
    fn default() -> Self {
        NodeAddressPolicy {
            ranges: DEFAULT_NODE_RANGES
                .iter()
                .filter_map(|r| r.parse().ok())
                .collect(),
            max_per_node: 4,
        }
    }
}

/// The default node ranges.
pub const DEFAULT_NODE_RANGES: [&str; 5] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
];

/// A node address left out of the protected list, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IgnoredAddress {
    /// Node name.
    pub node: String,
    /// The address.
    pub address: IpAddr,
    /// Why it is not protected.
    pub reason: String,
}

/// Applies `policy` to the nodes' addresses: the facts to plan with, and
/// what was left out.
pub fn limit_node_addresses(
    nodes: &[NodeFacts],
    policy: &NodeAddressPolicy,
) -> (Vec<NodeFacts>, Vec<IgnoredAddress>) {
    let mut ignored = Vec::new();
    // An address more than one Node claims is nobody's: protected for none
    // and attributed to none (a node could otherwise claim another's, or
    // the site's proxy that every node talks to).
    let mut claims: BTreeMap<IpAddr, BTreeSet<&str>> = BTreeMap::new();
    for n in nodes {
        for ip in &n.internal_ips {
            claims.entry(*ip).or_default().insert(n.name.as_str());
        }
    }
    let kept = nodes
        .iter()
        .map(|n| {
            let mut keep = Vec::new();
            for ip in &n.internal_ips {
                let claimants = claims.get(ip).map_or(0, BTreeSet::len);
                let reason = if claimants > 1 {
                    // The first few names: an address a whole fleet shares (a
                    // NAT default) must not cost every node a list of all.
                    let some: Vec<&str> = claims[ip].iter().copied().take(3).collect();
                    let more = claimants.saturating_sub(some.len());
                    Some(format!(
                        "claimed by {claimants} Nodes ({}{}): ambiguous",
                        some.join(", "),
                        if more > 0 {
                            format!(" and {more} more")
                        } else {
                            String::new()
                        }
                    ))
                } else if !policy.ranges.iter().any(|r| r.contains(ip)) {
                    Some("outside the configured node address ranges".to_string())
                } else if keep.len() >= policy.max_per_node {
                    Some(format!(
                        "more than {} addresses on one node",
                        policy.max_per_node
                    ))
                } else {
                    None
                };
                match reason {
                    Some(reason) => ignored.push(IgnoredAddress {
                        node: n.name.clone(),
                        address: *ip,
                        reason,
                    }),
                    None => keep.push(*ip),
                }
            }
            NodeFacts {
                internal_ips: keep,
                ..n.clone()
            }
        })
        .collect();
    (kept, ignored)
}

/// A node a guard selects but does not get, and who has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The node.
    pub node: String,
    /// The guard whose plan the node carries.
    pub winner: String,
}

/// What happened to one guard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuardOutcome {
    /// Nodes the selector matches.
    pub selected: Vec<String>,
    /// Nodes that carry this guard's plan.
    pub planned: Vec<String>,
    /// Nodes lost to an older guard.
    pub conflicts: Vec<Conflict>,
    /// Why the guard plans nothing new, if it does not.
    pub held: Option<Held>,
    /// The groups it resolves to, at their digests (for its status, where
    /// agents read them); `None` while held (the status keeps what it had).
    pub groups: Option<Vec<ResolvedGroup>>,
}

/// Why a guard plans nothing new. While held, the nodes keep the plans the
/// guard last wrote (removing them would fail open), and get no new ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    /// The guard is being deleted: its plans are being removed.
    Deleting,
    /// The spec fails validation (every problem, one per line).
    Invalid(String),
    /// A `whitelistGroups` reference resolves to no group, or a group it
    /// resolves to is invalid: enforcing a smaller whitelist would throttle
    /// traffic the owner meant to allow.
    Unresolved(String),
}

pub use crate::index::{GroupFacts, ParsedGuard};

/// Why a guard's `whitelistGroups` give it no groups it may plan with. The
/// message is what the guard's status says (one problem per line).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// A reference itself is wrong, or selects or names no group.
    #[error("{0}")]
    References(egressguard_crds::ValidationErrors),
    /// Groups the references name are missing or invalid.
    #[error("{}", lines(.0))]
    Groups(Vec<GroupProblem>),
    /// The groups widen the guard past what it allows (prefixes shorter
    /// than /8 or /16, or a union over half an address family).
    #[error("{0}")]
    TooWide(egressguard_crds::ValidationErrors),
}

/// One group a guard names that it cannot use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GroupProblem {
    /// No CIDRGroup has this name.
    #[error("CIDRGroup {0} does not exist")]
    Missing(String),
    /// The group's content fails validation.
    #[error("CIDRGroup {name} is invalid: {}", .why.replace('\n', "; "))]
    Invalid {
        /// The group's name.
        name: String,
        /// Every problem, one per line (as the group's validation says).
        why: String,
    },
}

/// The problems, one per line.
fn lines(problems: &[GroupProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A guard's node selector that cannot be matched (an operator the API
/// server would refuse).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("spec.nodeSelector.{0}")]
pub struct NodeSelectorError(#[from] pub egressguard_crds::validate::SelectorError);

/// Refuses groups that widen the guard past what it allows (prefixes
/// shorter than /8 or /16, or a union over half an address family).
fn wide_groups(
    valid: &egressguard_crds::ValidSpec,
    resolved: &[ResolvedGroup],
    groups: &BTreeMap<String, GroupFacts>,
) -> Result<(), GroupError> {
    let lists: Vec<(&str, &[ipnet::IpNet])> = resolved
        .iter()
        .filter_map(|r| groups.get(&r.name).map(|f| (r.name.as_str(), &*f.entries)))
        .collect();
    egressguard_crds::cidr_group::check_resolved(valid, &lists)
        .map_err(|e| GroupError::TooWide(egressguard_crds::ValidationErrors(e)))
}

/// The groups a guard's `whitelistGroups` resolve to, with their digests;
/// every unresolved reference or invalid group otherwise.
pub fn resolve_groups(
    spec: &egressguard_crds::EgressGuardSpec,
    groups: &BTreeMap<String, GroupFacts>,
) -> Result<Vec<ResolvedGroup>, GroupError> {
    if spec.whitelist_groups.is_empty() {
        return Ok(vec![]);
    }
    let names = egressguard_crds::cidr_group::resolve(
        &spec.whitelist_groups,
        groups.iter().map(|(n, f)| (n.as_str(), &f.labels)),
    )
    .map_err(|e| GroupError::References(egressguard_crds::ValidationErrors(e)))?;
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for name in names {
        match groups.get(&name).map(|f| &f.digest) {
            Some(Ok(digest)) => out.push(ResolvedGroup {
                name,
                digest: digest.clone(),
            }),
            Some(Err(why)) => bad.push(GroupProblem::Invalid {
                name,
                why: why.to_string(),
            }),
            None => bad.push(GroupProblem::Missing(name)),
        }
    }
    if bad.is_empty() {
        Ok(out)
    } else {
        Err(GroupError::Groups(bad))
    }
}

/// The decision for the whole cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    /// Desired NodeShaping spec per node name; nodes absent here get no shaping.
    pub plans: BTreeMap<String, NodeShapingSpec>,
    /// Outcome per guard name.
    pub guards: BTreeMap<String, GuardOutcome>,
}

/// Does `selector` match `labels`? An absent or empty selector matches every node.
pub fn selects(
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
) -> Result<bool, NodeSelectorError> {
    match selector {
        None => Ok(true),
        Some(sel) => Ok(egressguard_crds::validate::selects(sel, labels)?),
    }
}

fn host_cidr(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// Node InternalIPs as few prefixes as cover exactly them, IPv4 and IPv6
/// alike: consecutive addresses (as IPAM hands them out) merge into aligned
/// blocks. A block of one node names it; a larger block counts its nodes.
pub fn aggregate_nodes(nodes: &[NodeFacts]) -> Vec<ProtectedEntry> {
    let mut v4: Vec<(u128, &str)> = Vec::new();
    let mut v6: Vec<(u128, &str)> = Vec::new();
    for n in nodes {
        for ip in &n.internal_ips {
            match ip {
                IpAddr::V4(a) => v4.push((u128::from(u32::from(*a)), n.name.as_str())),
                IpAddr::V6(a) => v6.push((u128::from(*a), n.name.as_str())),
            }
        }
    }
    let mut out = aggregate(v4, 32);
    out.extend(aggregate(v6, 128));
    out.sort();
    out
}

/// Splits the sorted runs of consecutive addresses of one family (`bits`
/// long) into aligned power-of-two blocks.
fn aggregate(mut addrs: Vec<(u128, &str)>, bits: u32) -> Vec<ProtectedEntry> {
    addrs.sort();
    addrs.dedup_by_key(|(a, _)| *a);
    let render = |a: u128, len: u32| {
        if bits == 32 {
            format!("{}/{len}", std::net::Ipv4Addr::from(a as u32))
        } else {
            format!("{}/{len}", std::net::Ipv6Addr::from(a))
        }
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < addrs.len() {
        let mut j = i;
        while j + 1 < addrs.len() && addrs[j + 1].0 == addrs[j].0 + 1 {
            j += 1;
        }
        let (mut lo, hi) = (addrs[i].0, addrs[j].0);
        loop {
            // The largest aligned block starting at `lo` that stays within the run.
            let mut log = lo.trailing_zeros().min(bits);
            while log > 0 && (lo + ((1u128 << log) - 1) > hi || log >= 127) {
                log -= 1;
            }
            let size = 1u128 << log;
            let first = i + (lo - addrs[i].0) as usize;
            let reason = if size == 1 {
                format!("node {} InternalIP", addrs[first].1)
            } else {
                // Every plan carries this list: names of the first and last
                // node would cost 5,000 plans a megabyte for little.
                format!("InternalIPs of {size} nodes")
            };
            out.push(ProtectedEntry {
                cidr: render(lo, bits - log),
                reason,
            });
            match (lo + size - 1).cmp(&hi) {
                std::cmp::Ordering::Less => lo += size,
                _ => break,
            }
        }
        i = j + 1;
    }
    out
}

/// Age order: older first; objects without a creation time sort last.
fn age_key(g: &EgressGuard) -> (bool, Option<String>, String) {
    let created = g
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string());
    (
        created.is_none(),
        created,
        g.metadata.name.clone().unwrap_or_default(),
    )
}

/// Computes every node's plan and every guard's outcome, with nothing
/// quarantined and no extra protected destinations.
pub fn decide(
    guards: &[EgressGuard],
    nodes: &[NodeFacts],
    api_endpoints: &[IpAddr],
    current: &BTreeMap<&str, &NodeShapingSpec>,
) -> Decision {
    decide_with(guards, nodes, api_endpoints, current, &Extras::default())
}

/// What besides guards and nodes shapes the plans.
#[derive(Clone, Debug, Default)]
pub struct Extras {
    /// Quarantined nodes per guard: an `Auto` guard programs only these.
    pub quarantined: BTreeMap<String, BTreeSet<String>>,
    /// Protected on every node (the Prometheus server whose metrics release
    /// quarantines: throttling its scrapes would blind the release).
    pub protected: Vec<ProtectedEntry>,
    /// The CIDRGroups that exist, by name.
    pub groups: BTreeMap<String, GroupFacts>,
    /// The guards as parsed once per change, by name (a guard missing here
    /// is validated on the spot).
    pub parsed: BTreeMap<String, ParsedGuard>,
    /// Nodes whose agent predates plans by reference (it reported a status
    /// without `byReference`): their plans also carry the guard's spec, as
    /// that agent needs, until it rolls.
    pub legacy_agents: BTreeSet<String>,
    /// Nodes whose agent reported a status without `digestsFromGuard`: their
    /// plans carry each group's digest, as that agent needs, until it rolls.
    pub digests_in_plan: BTreeSet<String>,
}

fn quarantined(extras: &Extras, guard: &str, node: &str) -> bool {
    extras
        .quarantined
        .get(guard)
        .is_some_and(|q| q.contains(node))
}

/// [`decide`], with quarantines and extra protected destinations.
///
/// Guards claim nodes in [`claim_order`]; nodes a guard quarantined are its
/// own before that order decides anything ([`Claims::quarantined`]); then
/// each guard either keeps the plans it had (held: [`Planner::keep`]) or
/// plans the nodes it selects ([`Planner::plan`]).
pub fn decide_with<G: std::borrow::Borrow<EgressGuard>>(
    guards: &[G],
    nodes: &[NodeFacts],
    api_endpoints: &[IpAddr],
    current: &BTreeMap<&str, &NodeShapingSpec>,
    extras: &Extras,
) -> Decision {
    let ordered = claim_order(guards);
    let mut claims = Claims::quarantined(&ordered, nodes, extras);
    let planner = Planner {
        nodes,
        api_endpoints,
        current,
        extras,
        // One list for every plan (a node's own address is harmless to
        // protect), aggregated into prefixes so plans stay small on big
        // clusters.
        node_entries: aggregate_nodes(nodes),
    };
    let mut d = Decision::default();
    for g in ordered {
        let name = g.metadata.name.clone().unwrap_or_default();
        let out = d.guards.entry(name.clone()).or_default();
        planner.guard(g, &name, &mut claims, out, &mut d.plans);
    }
    d
}

/// The order guards claim nodes in: guards that program (Enforce, Auto)
/// before guards that only report (DryRun), so a dry run never keeps a real
/// guard off a node; then by age ([`age_key`]), so the winner never depends
/// on the order objects arrive in.
fn claim_order<G: std::borrow::Borrow<EgressGuard>>(guards: &[G]) -> Vec<&EgressGuard> {
    let mut ordered: Vec<&EgressGuard> = guards.iter().map(|g| g.borrow()).collect();
    ordered.sort_by_key(|g| (g.spec.mode == Mode::DryRun, age_key(g)));
    ordered
}

/// Which guard has claimed each node so far.
#[derive(Debug, Default)]
struct Claims(BTreeMap<String, String>);

impl Claims {
    /// A quarantined node belongs to the guard that quarantined it, before
    /// age decides anything: relabelled to match an older guard, it would
    /// otherwise leave the quarantine for that guard's plan. Only Auto
    /// guards not being deleted quarantine, and only existing nodes count.
    fn quarantined(ordered: &[&EgressGuard], nodes: &[NodeFacts], extras: &Extras) -> Claims {
        let existing: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        let mut claims = Claims::default();
        for g in ordered {
            if g.spec.mode != Mode::Auto || g.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let name = g.metadata.name.clone().unwrap_or_default();
            for node in extras.quarantined.get(&name).into_iter().flatten() {
                if existing.contains(node.as_str()) {
                    claims.0.entry(node.clone()).or_insert_with(|| name.clone());
                }
            }
        }
        claims
    }

    /// The other guard that claimed `node`, if one did.
    fn taken_by(&self, node: &str, guard: &str) -> Option<&String> {
        self.0.get(node).filter(|w| *w != guard)
    }

    /// Records that `guard` plans `node`.
    fn take(&mut self, node: &str, guard: &str) {
        self.0.insert(node.to_string(), guard.to_string());
    }
}

/// The group lists a guard's plans carry.
struct PlanGroups {
    /// With their digests: for agents that predate digests in the guard's status.
    with_digests: Vec<ResolvedGroup>,
    /// Names only: plans name the groups, whose digests live in the guard's
    /// status, so a group edit is one status write per guard instead of a
    /// rewrite of every plan.
    names_only: Vec<ResolvedGroup>,
}

impl PlanGroups {
    /// The lists for `groups`.
    fn of(groups: &[ResolvedGroup]) -> PlanGroups {
        PlanGroups {
            with_digests: groups.to_vec(),
            names_only: groups
                .iter()
                .map(|r| ResolvedGroup {
                    name: r.name.clone(),
                    digest: String::new(),
                })
                .collect(),
        }
    }
}

/// What every guard's plans are made from, for one decision.
struct Planner<'a> {
    nodes: &'a [NodeFacts],
    api_endpoints: &'a [IpAddr],
    current: &'a BTreeMap<&'a str, &'a NodeShapingSpec>,
    extras: &'a Extras,
    /// Every node's InternalIPs, aggregated ([`aggregate_nodes`]).
    node_entries: Vec<ProtectedEntry>,
}

impl Planner<'_> {
    /// Decides one guard: held (deleted, invalid, groups unresolved) it keeps
    /// the plans it had; otherwise it plans the nodes it selects.
    fn guard(
        &self,
        g: &EgressGuard,
        name: &str,
        claims: &mut Claims,
        out: &mut GuardOutcome,
        plans: &mut BTreeMap<String, NodeShapingSpec>,
    ) {
        if g.metadata.deletion_timestamp.is_some() {
            out.held = Some(Held::Deleting);
            return;
        }
        match self.groups(g, name) {
            Ok(groups) => self.plan(g, name, &groups, claims, out, plans),
            Err(held) => {
                self.keep(g, name, claims, out, plans);
                out.held = Some(held);
            }
        }
    }

    /// The groups the guard plans with, or why it is held. The shared
    /// validation also refuses a bad selector operator, so the guard is
    /// invalid whatever the nodes' labels are.
    fn groups(&self, g: &EgressGuard, name: &str) -> Result<Vec<ResolvedGroup>, Held> {
        let parsed = match self.extras.parsed.get(name) {
            Some(p) => p.valid.clone(),
            None => ParsedGuard::of(g).valid,
        };
        let valid = match &*parsed {
            Ok(valid) => valid,
            Err(e) => return Err(Held::Invalid(e.to_string())),
        };
        let unresolved = |e: GroupError| Held::Unresolved(e.to_string());
        let groups = resolve_groups(&g.spec, &self.extras.groups).map_err(unresolved)?;
        wide_groups(valid, &groups, &self.extras.groups).map_err(unresolved)?;
        Ok(groups)
    }

    /// Fail safe: a held guard keeps the plans its last valid generation
    /// wrote (removing them would fail open) on the nodes no other guard
    /// claimed. Quarantines still start and end while the guard is held:
    /// an Auto guard's kept plans follow them.
    fn keep(
        &self,
        g: &EgressGuard,
        name: &str,
        claims: &mut Claims,
        out: &mut GuardOutcome,
        plans: &mut BTreeMap<String, NodeShapingSpec>,
    ) {
        let uid = g.metadata.uid.clone().unwrap_or_default();
        let its_own = self
            .current
            .iter()
            .filter(|(_, spec)| spec.guard.as_ref().is_some_and(|r| r.uid == uid));
        for (&node, &spec) in its_own {
            if claims.taken_by(node, name).is_some() {
                continue;
            }
            claims.take(node, name);
            out.planned.push(node.to_string());
            let mut kept = spec.clone();
            if g.spec.mode == Mode::Auto {
                kept.enforce = quarantined(self.extras, name, node);
            }
            plans.insert(node.to_string(), kept);
        }
    }

    /// Plans the nodes the guard selects and no other guard claimed; the
    /// others are its conflicts.
    fn plan(
        &self,
        g: &EgressGuard,
        name: &str,
        groups: &[ResolvedGroup],
        claims: &mut Claims,
        out: &mut GuardOutcome,
        plans: &mut BTreeMap<String, NodeShapingSpec>,
    ) {
        out.groups = Some(groups.to_vec());
        let selected = match self.select(g, name) {
            Ok(selected) => selected,
            Err(e) => {
                out.held = Some(Held::Invalid(e.to_string()));
                Vec::new()
            }
        };
        out.selected = selected.iter().map(|n| n.name.clone()).collect();
        let groups = PlanGroups::of(groups);
        let protected = self.protected(g);
        for n in selected {
            if let Some(winner) = claims.taken_by(&n.name, name) {
                out.conflicts.push(Conflict {
                    node: n.name.clone(),
                    winner: winner.clone(),
                });
                continue;
            }
            claims.take(&n.name, name);
            out.planned.push(n.name.clone());
            if let Some(plan) = self.node_plan(g, name, n, &groups, &protected) {
                plans.insert(n.name.clone(), plan);
            }
        }
    }

    /// The nodes the guard's selector matches. A quarantined node stays
    /// selected whatever its labels: its own kubelet may relabel it, and
    /// must not unshape itself.
    fn select(&self, g: &EgressGuard, name: &str) -> Result<Vec<&NodeFacts>, NodeSelectorError> {
        let mut selected = Vec::new();
        for n in self.nodes {
            let matches = selects(g.spec.node_selector.as_ref(), &n.labels)?;
            if matches || (g.spec.mode == Mode::Auto && quarantined(self.extras, name, &n.name)) {
                selected.push(n);
            }
        }
        Ok(selected)
    }

    /// What every plan of the guard protects: the API server endpoints,
    /// the nodes' InternalIPs unless the guard opts out, and the extras.
    fn protected(&self, g: &EgressGuard) -> Vec<ProtectedEntry> {
        let mut protected: BTreeSet<ProtectedEntry> = self
            .api_endpoints
            .iter()
            .map(|ip| ProtectedEntry {
                cidr: host_cidr(ip),
                reason: "kubernetes API endpoint".into(),
            })
            .collect();
        if g.spec.protect_cluster_traffic.unwrap_or(true) {
            protected.extend(self.node_entries.iter().cloned());
        }
        protected.extend(self.extras.protected.iter().cloned());
        protected.into_iter().collect()
    }

    /// The plan for node `n` of the guard; `None` keeps the node without
    /// one. An agent from before CIDRGroups would enforce a guard that names
    /// groups without them: it keeps its current plan until it rolls.
    fn node_plan(
        &self,
        g: &EgressGuard,
        name: &str,
        n: &NodeFacts,
        groups: &PlanGroups,
        protected: &[ProtectedEntry],
    ) -> Option<NodeShapingSpec> {
        let legacy = self.extras.legacy_agents.contains(&n.name);
        if legacy && !g.spec.whitelist_groups.is_empty() {
            return self.current.get(n.name.as_str()).map(|&cur| cur.clone());
        }
        let enforce = match g.spec.mode {
            Mode::Enforce => true,
            Mode::Auto => quarantined(self.extras, name, &n.name),
            Mode::DryRun => false,
        };
        Some(NodeShapingSpec {
            node_name: n.name.clone(),
            guard: Some(GuardRef {
                name: name.to_string(),
                uid: g.metadata.uid.clone().unwrap_or_default(),
                generation: g.metadata.generation.unwrap_or_default(),
            }),
            // An agent from before plans by reference reads only this.
            shaping: legacy.then(|| g.spec.clone()),
            groups: if self.extras.digests_in_plan.contains(&n.name) {
                groups.with_digests.clone()
            } else {
                groups.names_only.clone()
            },
            protected: protected.to_vec(),
            enforce,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egressguard_crds::load::parse_str;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, Time};
    use kube::ResourceExt;

    fn guard(name: &str, created: &str, extra: &str) -> EgressGuard {
        let text = format!(
            "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: {name}}}\nspec:\n  uplink: {{rate: 20Mbit}}\n  throttle: {{rate: 1Mbit, destinations: [{{port: 443}}]}}\n{extra}"
        );
        let mut g = parse_str(&text).expect("guard").remove(0);
        g.metadata.creation_timestamp = Some(Time(created.parse().expect("time")));
        g.metadata.uid = Some(format!("uid-{name}"));
        g.metadata.generation = Some(3);
        g
    }

    fn node(name: &str, site: &str, ip: &str) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            labels: [("site".to_string(), site.to_string())]
                .into_iter()
                .collect(),
            internal_ips: vec![ip.parse().expect("ip")],
        }
    }

    fn nodes() -> Vec<NodeFacts> {
        vec![
            node("a1", "idc-a", "10.0.0.1"),
            node("a2", "idc-a", "10.0.0.2"),
            node("b1", "idc-b", "10.0.1.1"),
        ]
    }

    const API: [IpAddr; 1] = [IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 1))];

    #[test]
    fn selector_picks_nodes_and_protects_control_plane_and_peers() {
        let g = guard(
            "idc",
            "2026-01-01T00:00:00Z",
            "  nodeSelector: {matchLabels: {site: idc-a}}\n",
        );
        let d = decide(&[g], &nodes(), &API, &BTreeMap::new());
        assert_eq!(d.plans.keys().collect::<Vec<_>>(), ["a1", "a2"]);
        let a1 = &d.plans["a1"];
        assert!(a1.enforce);
        assert_eq!(
            a1.guard.as_ref().map(|r| (r.name.as_str(), r.generation)),
            Some(("idc", 3))
        );
        let cidrs: Vec<(&str, &str)> = a1
            .protected
            .iter()
            .map(|p| (p.cidr.as_str(), p.reason.as_str()))
            .collect();
        assert_eq!(
            cidrs,
            [
                ("10.0.0.1/32", "node a1 InternalIP"),
                ("10.0.0.2/32", "node a2 InternalIP"),
                ("10.0.1.1/32", "node b1 InternalIP"),
                ("10.96.0.1/32", "kubernetes API endpoint"),
            ]
        );
        assert_eq!(d.guards["idc"].selected, ["a1", "a2"]);
    }

    #[test]
    fn consecutive_node_addresses_aggregate() {
        let ns: Vec<NodeFacts> = (0..2000u32)
            .map(|i| NodeFacts {
                name: format!("n{i}"),
                labels: BTreeMap::new(),
                internal_ips: vec![IpAddr::from((0x0a00_0000u32 + 256 + i).to_be_bytes())],
            })
            .collect();
        let agg = aggregate_nodes(&ns);
        assert!(agg.len() <= 8, "{agg:?}");
        // The blocks cover exactly the 2,000 addresses.
        let covered: u64 = agg
            .iter()
            .map(|p| {
                1u64 << (32
                    - p.cidr
                        .split('/')
                        .nth(1)
                        .and_then(|l| l.parse::<u32>().ok())
                        .unwrap_or(32))
            })
            .sum();
        assert_eq!(covered, 2000);
        assert_eq!(agg[0].cidr, "10.0.1.0/24");
        assert_eq!(agg[0].reason, "InternalIPs of 256 nodes");
    }

    #[test]
    fn opting_out_of_cluster_protection_keeps_the_api_server() {
        let g = guard(
            "idc",
            "2026-01-01T00:00:00Z",
            "  protectClusterTraffic: false\n",
        );
        let d = decide(&[g], &nodes(), &API, &BTreeMap::new());
        assert_eq!(
            d.plans["b1"].protected,
            vec![ProtectedEntry {
                cidr: "10.96.0.1/32".into(),
                reason: "kubernetes API endpoint".into()
            }]
        );
    }

    #[test]
    fn the_older_guard_wins_whatever_the_input_order() {
        let old = guard("zz-old", "2026-01-01T00:00:00Z", "");
        let new = guard(
            "aa-new",
            "2026-02-01T00:00:00Z",
            "  nodeSelector: {matchLabels: {site: idc-a}}\n",
        );
        for input in [
            vec![old.clone(), new.clone()],
            vec![new.clone(), old.clone()],
        ] {
            let d = decide(&input, &nodes(), &API, &BTreeMap::new());
            assert!(d
                .plans
                .values()
                .all(|p| p.guard.as_ref().map(|g| g.name.as_str()) == Some("zz-old")));
            let lost = &d.guards["aa-new"];
            assert_eq!(lost.planned, Vec::<String>::new());
            assert_eq!(
                lost.conflicts,
                vec![
                    Conflict {
                        node: "a1".into(),
                        winner: "zz-old".into()
                    },
                    Conflict {
                        node: "a2".into(),
                        winner: "zz-old".into()
                    }
                ]
            );
        }
        // Same creation time: the name decides.
        let a = guard("a", "2026-01-01T00:00:00Z", "");
        let b = guard("b", "2026-01-01T00:00:00Z", "");
        let d = decide(&[b, a], &nodes(), &API, &BTreeMap::new());
        assert_eq!(
            d.plans["a1"].guard.as_ref().map(|g| g.name.as_str()),
            Some("a")
        );
    }

    #[test]
    fn invalid_and_deleted_guards_plan_nothing() {
        let mut bad = guard("bad", "2026-01-01T00:00:00Z", "");
        bad.spec.throttle.rate = "1mbps".into();
        let mut gone = guard("gone", "2025-01-01T00:00:00Z", "");
        gone.metadata.deletion_timestamp =
            Some(Time("2026-03-01T00:00:00Z".parse().expect("time")));
        let d = decide(&[bad, gone], &nodes(), &API, &BTreeMap::new());
        assert!(d.plans.is_empty());
        assert!(matches!(&d.guards["bad"].held,
            Some(Held::Invalid(m)) if m.starts_with("spec.throttle.rate: \"1mbps\" uses \"mbps\"")));
        assert_eq!(d.guards["gone"].held, Some(Held::Deleting));
    }

    fn group(cidrs: &[&str], labels: &[(&str, &str)]) -> GroupFacts {
        GroupFacts::of(&egressguard_crds::CIDRGroup {
            metadata: kube::api::ObjectMeta {
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: egressguard_crds::CidrGroupSpec {
                cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
            },
            status: None,
        })
    }

    fn with_groups(groups: &[(&str, GroupFacts)]) -> Extras {
        Extras {
            groups: groups
                .iter()
                .map(|(n, f)| (n.to_string(), f.clone()))
                .collect(),
            ..Extras::default()
        }
    }

    #[test]
    fn plans_name_groups_by_digest_not_by_copy() {
        let g = guard(
            "idc",
            "2026-01-01T00:00:00Z",
            "  whitelistGroups:\n  - name: payment-partners\n  - selector: {matchLabels: {egressguard.io/whitelist: business}}\n",
        );
        let partners = group(&["198.51.100.0/24"], &[]);
        let cdn = group(
            &["192.0.2.0/24"],
            &[("egressguard.io/whitelist", "business")],
        );
        let extras = with_groups(&[("payment-partners", partners.clone()), ("cdn", cdn.clone())]);
        let d = decide_with(
            std::slice::from_ref(&g),
            &nodes(),
            &API,
            &BTreeMap::new(),
            &extras,
        );
        let plan = &d.plans["a1"];
        assert_eq!(plan.shaping, None, "the plan must not copy the guard");
        let named = |groups: &[ResolvedGroup]| -> Vec<(String, String)> {
            groups
                .iter()
                .map(|r| (r.name.clone(), r.digest.clone()))
                .collect()
        };
        let (pd, cd) = (
            partners.digest.clone().expect("valid"),
            cdn.digest.clone().expect("valid"),
        );
        // The plan names the groups; the guard's status carries the digests.
        assert_eq!(
            named(&plan.groups),
            [
                ("cdn".into(), String::new()),
                ("payment-partners".into(), String::new())
            ]
        );
        let status_groups = d.guards["idc"].groups.clone().expect("resolved");
        assert_eq!(
            named(&status_groups),
            [
                ("cdn".into(), cd.clone()),
                ("payment-partners".into(), pd.clone())
            ]
        );

        // One group edit changes only the guard's status, not a single plan.
        let edited = group(&["198.51.100.0/24", "203.0.113.0/24"], &[]);
        let extras2 = with_groups(&[("payment-partners", edited.clone()), ("cdn", cdn.clone())]);
        let d2 = decide_with(
            std::slice::from_ref(&g),
            &nodes(),
            &API,
            &BTreeMap::new(),
            &extras2,
        );
        assert_eq!(d2.plans, d.plans, "a group edit rewrote plans");
        let status2 = d2.guards["idc"].groups.clone().expect("resolved");
        assert_eq!(status2[1].digest, edited.digest.clone().expect("valid"));
        assert_eq!(status2[0], status_groups[0]);

        // An agent from before digests in the status gets them in its plan.
        let mut old_agent = extras2;
        old_agent.digests_in_plan = BTreeSet::from(["a1".to_string()]);
        let d3 = decide_with(&[g], &nodes(), &API, &BTreeMap::new(), &old_agent);
        assert_eq!(named(&d3.plans["a1"].groups), named(&status2));
        assert!(d3.plans["a2"].groups.iter().all(|r| r.digest.is_empty()));
    }

    /// During an upgrade, agents that predate plans by reference still get
    /// the spec they need; a guard with groups they cannot enforce leaves
    /// their current plan alone; agents that read references get none.
    #[test]
    fn agents_from_before_plans_by_reference_keep_working_through_an_upgrade() {
        let plain = guard("idc", "2026-01-01T00:00:00Z", "");
        let extras = Extras {
            legacy_agents: BTreeSet::from(["a1".to_string()]),
            ..Extras::default()
        };
        let d = decide_with(
            std::slice::from_ref(&plain),
            &nodes(),
            &API,
            &BTreeMap::new(),
            &extras,
        );
        assert_eq!(d.plans["a1"].shaping.as_ref(), Some(&plain.spec));
        assert_eq!(d.plans["a2"].shaping, None);
        let grouped = guard(
            "idc",
            "2026-01-01T00:00:00Z",
            "  whitelistGroups: [{name: partners}]\n",
        );
        let extras = Extras {
            legacy_agents: BTreeSet::from(["a1".to_string()]),
            ..with_groups(&[("partners", group(&["198.51.100.0/24"], &[]))])
        };
        let old = d.plans["a1"].clone();
        let current: BTreeMap<&str, &NodeShapingSpec> = BTreeMap::from([("a1", &old)]);
        let d = decide_with(&[grouped], &nodes(), &API, &current, &extras);
        assert_eq!(d.plans["a1"], old, "an old agent's plan was replaced");
        assert_eq!(d.plans["a2"].shaping, None);
        assert_eq!(d.plans["a2"].groups.len(), 1);
    }

    #[test]
    fn an_unresolved_group_holds_the_plans_where_they_are() {
        let g = guard(
            "idc",
            "2026-01-01T00:00:00Z",
            "  whitelistGroups:\n  - name: payment-partners\n",
        );
        // A new guard with a missing group plans nothing: a smaller
        // whitelist would throttle traffic its owner meant to allow.
        let d = decide_with(
            std::slice::from_ref(&g),
            &nodes(),
            &API,
            &BTreeMap::new(),
            &Extras::default(),
        );
        assert!(d.plans.is_empty());
        assert_eq!(
            d.guards["idc"].held,
            Some(Held::Unresolved(
                "spec.whitelistGroups[0].name: CIDRGroup \"payment-partners\" does not exist; create it (kubectl apply -f) or fix the name".into()
            ))
        );
        // Once it resolved, losing the group keeps what the nodes had.
        let ok = with_groups(&[("payment-partners", group(&["198.51.100.0/24"], &[]))]);
        let before = decide_with(
            std::slice::from_ref(&g),
            &nodes(),
            &API,
            &BTreeMap::new(),
            &ok,
        );
        let current: BTreeMap<&str, &NodeShapingSpec> =
            before.plans.iter().map(|(n, s)| (n.as_str(), s)).collect();
        let after = decide_with(
            std::slice::from_ref(&g),
            &nodes(),
            &API,
            &current,
            &Extras::default(),
        );
        assert_eq!(after.plans, before.plans);
        // So does a group edited into an invalid list, and the reason names the entry.
        let bad = with_groups(&[("payment-partners", group(&["198.51.100.1/24"], &[]))]);
        let after = decide_with(&[g], &nodes(), &API, &current, &bad);
        assert_eq!(after.plans, before.plans);
        assert_eq!(
            after.guards["idc"].held,
            Some(Held::Unresolved(
                "CIDRGroup payment-partners is invalid: spec.cidrs[0]: 198.51.100.1/24 has host bits set; the network is 198.51.100.0/24".into()
            ))
        );
    }

    #[test]
    fn modes_decide_whether_agents_program() {
        let dry = guard("dry", "2026-01-01T00:00:00Z", "  mode: DryRun\n");
        assert!(decide(&[dry], &nodes(), &API, &BTreeMap::new())
            .plans
            .values()
            .all(|p| !p.enforce));
        let auto = guard(
            "auto",
            "2026-01-01T00:00:00Z",
            "  mode: Auto\n  quarantine: {triggers: [{name: a, alertmanager: {matchers: {alertname: X}}}]}\n",
        );
        let d = decide(
            std::slice::from_ref(&auto),
            &nodes(),
            &API,
            &BTreeMap::new(),
        );
        assert!(!d.plans.is_empty() && d.plans.values().all(|p| !p.enforce));
        // Auto programs exactly the quarantined nodes, and protects Prometheus.
        let extras = Extras {
            quarantined: BTreeMap::from([("auto".into(), BTreeSet::from(["a1".to_string()]))]),
            protected: vec![ProtectedEntry {
                cidr: "10.9.9.9/32".into(),
                reason: "Prometheus".into(),
            }],
            ..Extras::default()
        };
        let d = decide_with(&[auto], &nodes(), &API, &BTreeMap::new(), &extras);
        let enforced: Vec<&str> = d
            .plans
            .iter()
            .filter(|(_, p)| p.enforce)
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(enforced, ["a1"]);
        assert!(d
            .plans
            .values()
            .all(|p| p.protected.iter().any(|e| e.cidr == "10.9.9.9/32")));
    }

    #[test]
    fn an_invalid_edit_keeps_the_last_valid_plans() {
        let good = guard(
            "idc",
            "2026-01-01T00:00:00Z",
            "  nodeSelector: {matchLabels: {site: idc-a}}\n",
        );
        let before = decide(
            std::slice::from_ref(&good),
            &nodes(),
            &API,
            &BTreeMap::new(),
        );
        assert_eq!(before.plans.len(), 2);
        let mut bad = good;
        bad.spec.throttle.rate = "1mbps".into();
        bad.metadata.generation = Some(4);
        let current = before.plans.iter().map(|(n, p)| (n.as_str(), p)).collect();
        let after = decide(&[bad], &nodes(), &API, &current);
        assert_eq!(after.plans, before.plans, "an invalid edit removed shaping");
        assert!(matches!(after.guards["idc"].held, Some(Held::Invalid(_))));
        assert_eq!(after.guards["idc"].planned, vec!["a1", "a2"]);
        // Another guard's plans are not adopted.
        let mut other = guard("other", "2026-01-01T00:00:00Z", "");
        other.spec.throttle.rate = "1mbps".into();
        assert!(decide(&[other], &nodes(), &API, &current).plans.is_empty());
    }

    fn auto(name: &str) -> EgressGuard {
        guard(
            name,
            "2026-01-01T00:00:00Z",
            "  nodeSelector: {matchLabels: {site: idc-a}}\n  mode: Auto\n  quarantine:\n    triggers: [{name: a, alertmanager: {matchers: {alertname: X}}}]\n",
        )
    }

    fn quarantined(guard: &str, node: &str) -> Extras {
        Extras {
            quarantined: BTreeMap::from([(guard.to_string(), BTreeSet::from([node.to_string()]))]),
            ..Default::default()
        }
    }

    #[test]
    fn a_quarantined_node_stays_planned_and_enforced_whatever_its_labels() {
        let g = auto("idc");
        let mut ns = nodes();
        // a1's kubelet drops the selector label while a1 is quarantined.
        ns[0].labels.clear();
        let d = decide_with(
            std::slice::from_ref(&g),
            &ns,
            &API,
            &BTreeMap::new(),
            &quarantined("idc", "a1"),
        );
        assert!(d.plans["a1"].enforce, "{:?}", d.plans.keys());
        assert!(!d.plans["a2"].enforce);
        // Not quarantined: the label decides, as always.
        let d = decide_with(&[g], &ns, &API, &BTreeMap::new(), &Extras::default());
        assert!(!d.plans.contains_key("a1"));
    }

    #[test]
    fn a_quarantined_node_cannot_escape_to_an_older_guard() {
        // "old" (Enforce, older) selects idc-b; "idc" (Auto) quarantined a1,
        // whose kubelet now relabels it to idc-b.
        let old = guard(
            "old",
            "2025-01-01T00:00:00Z",
            "  nodeSelector: {matchLabels: {site: idc-b}}\n",
        );
        let g = auto("idc");
        let mut ns = nodes();
        ns[0].labels.insert("site".into(), "idc-b".into());
        let d = decide_with(
            &[old, g],
            &ns,
            &API,
            &BTreeMap::new(),
            &quarantined("idc", "a1"),
        );
        let plan = &d.plans["a1"];
        assert_eq!(plan.guard.as_ref().map(|r| r.name.as_str()), Some("idc"));
        assert!(plan.enforce);
        assert_eq!(d.guards["old"].conflicts.len(), 1);
        assert_eq!(
            d.plans["b1"].guard.as_ref().map(|r| r.name.as_str()),
            Some("old")
        );
    }

    #[test]
    fn a_held_guard_still_follows_its_quarantines() {
        let g = auto("idc");
        let before = decide(std::slice::from_ref(&g), &nodes(), &API, &BTreeMap::new());
        let current = before.plans.iter().map(|(n, p)| (n.as_str(), p)).collect();
        let mut bad = g;
        bad.spec.throttle.rate = "1mbps".into();
        let after = decide_with(&[bad], &nodes(), &API, &current, &quarantined("idc", "a2"));
        assert!(matches!(after.guards["idc"].held, Some(Held::Invalid(_))));
        assert!(
            after.plans["a2"].enforce,
            "a new quarantine not enforced while held"
        );
        assert!(!after.plans["a1"].enforce);
    }

    #[test]
    fn an_address_two_nodes_claim_is_protected_for_neither() {
        let mut ns = nodes();
        ns[2].internal_ips.push("10.0.0.1".parse().expect("ip"));
        let (kept, ignored) = limit_node_addresses(&ns, &NodeAddressPolicy::default());
        assert!(kept
            .iter()
            .all(|n| !n.internal_ips.contains(&"10.0.0.1".parse().expect("ip"))));
        assert_eq!(ignored.len(), 2, "{ignored:?}");
        assert!(
            ignored[0].reason.contains("claimed by 2 Nodes (a1, b1)"),
            "{ignored:?}"
        );
    }

    #[test]
    fn dual_stack_addresses_aggregate_and_plans_stay_small_at_2000_nodes() {
        let ns: Vec<NodeFacts> = (0..2000u32)
            .map(|i| NodeFacts {
                name: format!("node-{i:04}"),
                labels: BTreeMap::new(),
                internal_ips: vec![
                    IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
                    IpAddr::V6(std::net::Ipv6Addr::from(
                        0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + u128::from(i),
                    )),
                ],
            })
            .collect();
        let agg = aggregate_nodes(&ns);
        // 0..2000 is 1024 + 512 + 256 + 128 + 64 + 16: six blocks per family.
        assert_eq!(agg.len(), 12, "{agg:?}");
        assert!(agg.iter().any(|e| e.cidr == "fd00::/118"), "{agg:?}");
        assert!(agg.iter().any(|e| e.cidr == "10.0.0.0/22"), "{agg:?}");
        let g = guard("all", "2026-01-01T00:00:00Z", "  mode: Enforce\n");
        let d = decide(&[g], &ns, &API, &BTreeMap::new());
        let bytes: usize = d
            .plans
            .values()
            .map(|p| serde_json::to_vec(p).map_or(0, |v| v.len()))
            .sum();
        eprintln!("PLANS 2,000 dual-stack nodes: {bytes} bytes in storage");
        assert!(bytes < 10 << 20, "{bytes} bytes");
    }

    #[test]
    fn dry_run_guards_never_keep_a_real_guard_off_a_node() {
        let dry = guard("dry", "2025-01-01T00:00:00Z", "  mode: DryRun\n");
        let real = guard("real", "2026-06-01T00:00:00Z", "");
        let d = decide(&[dry, real], &nodes(), &API, &BTreeMap::new());
        assert!(d.guards["real"].conflicts.is_empty());
        assert_eq!(d.guards["real"].planned.len(), 3);
        assert!(d.plans.values().all(|p| p.enforce));
        assert_eq!(d.guards["dry"].conflicts.len(), 3);
    }

    #[test]
    fn a_node_cannot_widen_the_protected_list() {
        let mut evil = node("evil", "idc-a", "10.0.0.9");
        evil.internal_ips.push("198.51.100.66".parse().expect("ip"));
        evil.internal_ips
            .extend((10..20).map(|i| IpAddr::from([10, 0, 9, i])));
        let policy = NodeAddressPolicy::default();
        let (kept, ignored) = limit_node_addresses(&[evil], &policy);
        assert_eq!(kept[0].internal_ips.len(), 4);
        assert!(!kept[0]
            .internal_ips
            .contains(&"198.51.100.66".parse().expect("ip")));
        assert_eq!(ignored.len(), 1 + 7);
        assert_eq!(
            ignored[0].reason,
            "outside the configured node address ranges"
        );
        let d = decide(
            &[guard("g", "2026-01-01T00:00:00Z", "")],
            &kept,
            &API,
            &BTreeMap::new(),
        );
        assert!(d.plans.values().all(|p| p
            .protected
            .iter()
            .all(|e| !e.cidr.starts_with("198.51.100."))));
    }

    #[test]
    fn match_expressions() {
        let labels: BTreeMap<String, String> = [
            ("site".into(), "idc-a".into()),
            ("tier".into(), "edge".into()),
        ]
        .into_iter()
        .collect();
        let expr = |key: &str, op: &str, values: &[&str]| LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: Some(values.iter().map(|v| v.to_string()).collect()),
            }]),
            ..Default::default()
        };
        assert_eq!(
            selects(Some(&expr("site", "In", &["idc-a", "idc-b"])), &labels),
            Ok(true)
        );
        assert_eq!(
            selects(Some(&expr("site", "NotIn", &["idc-a"])), &labels),
            Ok(false)
        );
        assert_eq!(
            selects(Some(&expr("gpu", "DoesNotExist", &[])), &labels),
            Ok(true)
        );
        assert_eq!(
            selects(Some(&expr("tier", "Exists", &[])), &labels),
            Ok(true)
        );
        assert_eq!(
            selects(Some(&expr("tier", "Matches", &[])), &labels)
                .map_err(|e| e.to_string()),
            Err("spec.nodeSelector.matchExpressions[0].operator: \"Matches\" is not one of In, NotIn, Exists, DoesNotExist".into())
        );
        assert_eq!(selects(None, &labels), Ok(true));
        assert_eq!(selects(Some(&LabelSelector::default()), &labels), Ok(true));
    }

    #[test]
    fn group_errors_say_every_problem_one_per_line() {
        let mut groups = BTreeMap::new();
        groups.insert("bad".to_string(), group(&["198.51.100.1/24"], &[]));
        groups.insert("worse".to_string(), group(&["not-a-cidr"], &[]));
        let g = guard(
            "idc",
            "2026-01-01T00:00:00Z",
            "  whitelistGroups: [{name: bad}, {name: worse}]\n",
        );
        let e = resolve_groups(&g.spec, &groups).expect_err("unresolved");
        let GroupError::Groups(problems) = &e else {
            panic!("{e:?}");
        };
        assert!(matches!(
            &problems[..],
            [GroupProblem::Invalid { name: a, .. }, GroupProblem::Invalid { name: b, .. }]
                if a == "bad" && b == "worse"
        ));
        let text = e.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(
            lines[0],
            "CIDRGroup bad is invalid: spec.cidrs[0]: 198.51.100.1/24 has host bits set; the network is 198.51.100.0/24"
        );
        assert!(
            lines[1].starts_with("CIDRGroup worse is invalid: "),
            "{text}"
        );
        // A group's own problems share its line.
        let invalid = GroupProblem::Invalid {
            name: "g".into(),
            why: "one\ntwo".into(),
        };
        assert_eq!(invalid.to_string(), "CIDRGroup g is invalid: one; two");
        assert_eq!(
            GroupProblem::Missing("gone".into()).to_string(),
            "CIDRGroup gone does not exist"
        );
        // A reference that names no group is the shared validation's words.
        let e = resolve_groups(&g.spec, &BTreeMap::new()).expect_err("missing");
        assert!(matches!(e, GroupError::References(_)), "{e:?}");
        let none = guard("idc", "2026-01-01T00:00:00Z", "");
        assert_eq!(resolve_groups(&none.spec, &groups), Ok(vec![]));
    }

    #[test]
    fn programming_guards_claim_before_dry_runs_then_by_age() {
        let guards = [
            guard("dry-old", "2025-01-01T00:00:00Z", "  mode: DryRun\n"),
            guard("young", "2026-02-01T00:00:00Z", ""),
            guard("old", "2026-01-01T00:00:00Z", ""),
        ];
        let order: Vec<_> = claim_order(&guards).iter().map(|g| g.name_any()).collect();
        assert_eq!(order, ["old", "young", "dry-old"]);
    }

    #[test]
    fn only_live_auto_guards_claim_their_quarantined_nodes_first() {
        let mut deleting = auto("deleting");
        deleting.metadata.deletion_timestamp = deleting.metadata.creation_timestamp.clone();
        let enforce = guard("enforce", "2026-01-01T00:00:00Z", "");
        let live = auto("live");
        let mut extras = Extras::default();
        for (g, n) in [
            ("deleting", "a1"),
            ("enforce", "a2"),
            ("live", "b1"),
            ("live", "gone"),
        ] {
            extras
                .quarantined
                .entry(g.into())
                .or_default()
                .insert(n.into());
        }
        let ordered = [&deleting, &enforce, &live];
        let claims = Claims::quarantined(&ordered, &nodes(), &extras);
        assert_eq!(
            claims.0,
            BTreeMap::from([("b1".to_string(), "live".to_string())])
        );
        assert_eq!(claims.taken_by("b1", "live"), None, "its own claim");
        assert_eq!(
            claims.taken_by("b1", "enforce").map(String::as_str),
            Some("live")
        );
    }

    #[test]
    fn a_selector_that_cannot_be_matched_holds_the_guard() {
        // Parsed (valid) before an edit the cache has not seen yet: the
        // selector's unknown operator is found when it is matched.
        let valid = guard("idc", "2026-01-01T00:00:00Z", "");
        let g = guard(
            "idc",
            "2026-01-01T00:00:00Z",
            "  nodeSelector: {matchExpressions: [{key: site, operator: Matches}]}\n",
        );
        let extras = Extras {
            parsed: BTreeMap::from([("idc".to_string(), ParsedGuard::of(&valid))]),
            ..Extras::default()
        };
        let d = decide_with(&[g], &nodes(), &API, &BTreeMap::new(), &extras);
        assert!(d.plans.is_empty());
        assert_eq!(
            d.guards["idc"],
            GuardOutcome {
                held: Some(Held::Invalid(
                    "spec.nodeSelector.matchExpressions[0].operator: \"Matches\" is not one of In, NotIn, Exists, DoesNotExist".into()
                )),
                groups: Some(vec![]),
                ..GuardOutcome::default()
            }
        );
    }
}
