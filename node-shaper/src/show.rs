//! `node-shaper show`: what is enforced, with counters labelled by role.

use serde::Serialize;

use crate::layout::Role;
use crate::model::{fmt_handle, Filter, Origin, Shape};
use crate::netlink::{Counters, Observed, RootState};
use crate::plan::{plan_protected, LeafChoice};
use crate::target::Target;

/// One class in the report.
#[derive(Debug, Clone, Serialize)]
pub struct ClassRow {
    /// Role (uplink, throttled, whitelist, default) or `foreign`.
    pub role: String,
    /// Class id.
    pub class: String,
    /// Rate, tc units.
    pub rate: String,
    /// Ceil, tc units.
    pub ceil: String,
    /// Leaf qdisc kind.
    pub leaf: Option<String>,
    /// Counters.
    pub counters: Counters,
}

/// A protected destination and whether the kernel holds its filter.
#[derive(Debug, Clone, Serialize)]
pub struct ProtectedRow {
    /// Network.
    pub cidr: String,
    /// Why it is protected.
    pub reason: String,
    /// Its filter is in the kernel.
    pub installed: bool,
}

/// The report for one interface.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Interface.
    pub interface: String,
    /// `enforced`, `not shaped (default root qdisc X)` or `foreign root qdisc`.
    pub state: String,
    /// Classes.
    pub classes: Vec<ClassRow>,
    /// u32 filter nodes installed.
    pub filters: usize,
    /// Filter prios present.
    pub prios: Vec<u16>,
    /// User whitelist entries of the applied guard (when known).
    pub whitelist_entries: Option<usize>,
    /// Protected destinations (control plane, other nodes), distinct from the user's whitelist.
    pub protected: Vec<ProtectedRow>,
}

fn rate(bytes: u64) -> String {
    egressguard_crds::units::Rate::from_bits_per_sec(bytes * 8).to_string()
}

/// Builds the report from observed state; `target` (what was applied, when
/// known) labels whitelist entries as the user's or protected.
pub fn report(interface: &str, obs: &Observed, target: Option<&Target>) -> Report {
    let state = match &obs.root {
        RootState::Owned => "enforced".to_string(),
        RootState::Default(k) => format!("not shaped (device default root qdisc {k})"),
        RootState::Foreign { kind, handle } => format!(
            "foreign root qdisc {kind} {} (not managed by node-shaper)",
            fmt_handle(*handle)
        ),
    };
    let shape: &Shape = &obs.shape;
    // Layout order (parent, then by who is served first), foreign classes last.
    let rank = |id: u32| match Role::of(id) {
        Some(Role::Uplink) => 0,
        Some(Role::Protected) => 1,
        Some(Role::Ssh) => 2,
        Some(Role::Whitelist) => 3,
        Some(Role::Default) => 4,
        Some(Role::Throttled) => 5,
        None => 6,
    };
    let mut sorted: Vec<_> = shape.classes.iter().collect();
    sorted.sort_by_key(|c| (rank(c.classid), c.classid));
    let classes = sorted
        .into_iter()
        .map(|c| ClassRow {
            role: Role::of(c.classid).map_or("foreign".to_string(), |r| r.name().to_string()),
            class: fmt_handle(c.classid),
            rate: rate(c.rate),
            ceil: rate(c.ceil),
            leaf: shape
                .leaves
                .iter()
                .find(|l| l.parent == c.classid)
                .map(|l| l.kind.kind().to_string()),
            counters: obs
                .counters
                .iter()
                .find(|(id, _)| *id == c.classid)
                .map(|(_, k)| k.clone())
                .unwrap_or_default(),
        })
        .collect();
    Report {
        interface: interface.to_string(),
        state,
        classes,
        filters: shape.filter_count(),
        prios: shape.prios.iter().map(|p| p.prio).collect(),
        whitelist_entries: target.map(|t| t.valid.whitelist.len()),
        protected: target.map_or_else(Vec::new, |t| protected_rows(shape, t)),
    }
}

fn protected_rows(observed: &Shape, t: &Target) -> Vec<ProtectedRow> {
    let desired = plan_protected(&t.valid, &t.protected, LeafChoice::Sfq);
    let installed: Vec<&Filter> = observed.prios.iter().flat_map(|p| &p.filters).collect();
    desired
        .prios
        .iter()
        .flat_map(|p| &p.filters)
        .filter_map(|n| match n.origin {
            Origin::Protected(i) => t.protected.get(i).map(|p| ProtectedRow {
                cidr: p.net.to_string(),
                reason: p.reason.clone(),
                installed: installed.iter().any(|o| o.same_rule(n)),
            }),
            _ => None,
        })
        .collect()
}

/// Text rendering, one row per class like `tc -s class show`.
pub fn render(r: &Report) -> String {
    let mut s = format!("{}: {}\n", r.interface, r.state);
    if r.classes.is_empty() {
        return s;
    }
    s.push_str(&format!(
        "  {:<10} {:<6} {:>10} {:>10} {:<6} {:>14} {:>10} {:>8} {:>10} {:>8}\n",
        "ROLE",
        "CLASS",
        "RATE",
        "CEIL",
        "LEAF",
        "BYTES",
        "PACKETS",
        "DROPS",
        "OVERLIMITS",
        "BACKLOG"
    ));
    for c in &r.classes {
        s.push_str(&format!(
            "  {:<10} {:<6} {:>10} {:>10} {:<6} {:>14} {:>10} {:>8} {:>10} {:>7}b\n",
            c.role,
            c.class,
            c.rate,
            c.ceil,
            c.leaf.as_deref().unwrap_or("-"),
            c.counters.bytes,
            c.counters.packets,
            c.counters.drops,
            c.counters.overlimits,
            c.counters.backlog
        ));
    }
    s.push_str(&format!(
        "  filters: {} u32 filters in prios {:?}\n",
        r.filters, r.prios
    ));
    if let Some(n) = r.whitelist_entries {
        s.push_str(&format!(
            "  whitelist: {n} entries from the guard, {} protected\n",
            r.protected.len()
        ));
    }
    for p in &r.protected {
        let state = if p.installed { "" } else { "  (NOT INSTALLED)" };
        s.push_str(&format!(
            "    protected {:<20} {}{state}\n",
            p.cidr, p.reason
        ));
    }
    s
}
