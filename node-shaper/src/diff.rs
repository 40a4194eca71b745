//! Observed shape + desired shape → the fewest kernel operations. Pure.
//!
//! Ordering is what makes updates hitless and failures recoverable: additions
//! and in-place changes first (parents before children, hash-table entries
//! before the links that lead to them), deletions last (filters before tables
//! before classes). A failure part-way therefore leaves only additions and
//! changes to undo.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::model::*;
pub use crate::op::Op;

/// Full kernel handle of an observed node.
pub fn filter_handle(prio: &Prio, n: &Filter) -> u32 {
    let htid = match n.table {
        Table::Root => prio.root_handle.unwrap_or(0),
        Table::User(h) => h,
    };
    htid | (u32::from(n.bucket) << 12) | n.id.unwrap_or(0)
}

/// A diff's operations by phase, in the order they are sent
/// ([`Phases::into_ops`], after the sweeps of hidden tables).
#[derive(Default)]
struct Phases {
    /// Deletions that must come first: the root being rebuilt, prios
    /// removed whole to be created again, filters holding an id needed now.
    pre: Vec<Op>,
    /// Our root qdisc.
    root: Vec<Op>,
    /// Classes, parents before children.
    classes: Vec<Op>,
    /// Leaf qdiscs.
    leaves: Vec<Op>,
    /// Hash tables.
    tables: Vec<Op>,
    /// Filters inside hash tables.
    user_nodes: Vec<Op>,
    /// Links inside hash tables, after the entries of the tables they lead to.
    user_links: Vec<Op>,
    /// Filters of the root tables (links to the hash tables among them), and
    /// changes in place.
    root_nodes: Vec<Op>,
    /// Filter deletions and unlinks.
    node_dels: Vec<Op>,
    /// Table deletions.
    table_dels: Vec<Op>,
    /// Whole-prio deletions.
    prio_dels: Vec<Op>,
    /// Class deletions, children before parents.
    class_dels: Vec<Op>,
}

/// Operations that turn `observed` (our tree, or empty) into `desired`.
pub fn diff(observed: &Shape, desired: &Shape) -> Vec<Op> {
    diff_rebuilding(observed, desired, &BTreeSet::new())
}

/// Like [`diff`], on an interface whose root may be a foreign qdisc
/// (`foreign_root`, read from the kernel): our root then replaces it
/// (grafts) instead of failing on the one already there.
pub fn diff_onto(observed: &Shape, desired: &Shape, foreign_root: bool) -> Vec<Op> {
    plan_ops(observed, desired, &BTreeSet::new(), foreign_root)
}

/// Like [`diff`], but the prios in `rebuild` are removed whole and created
/// again rather than changed in place: the fallback when the kernel refused
/// an incremental change to them in a way a rollback could not undo.
pub fn diff_rebuilding(observed: &Shape, desired: &Shape, rebuild: &BTreeSet<u16>) -> Vec<Op> {
    plan_ops(observed, desired, rebuild, false)
}

fn plan_ops(
    observed: &Shape,
    desired: &Shape,
    rebuild: &BTreeSet<u16>,
    foreign_root: bool,
) -> Vec<Op> {
    plan_ops_from(
        observed,
        desired,
        desired.prios.iter().cloned(),
        rebuild,
        foreign_root,
    )
}

/// Like [`diff_onto`], with the desired prios handed over one at a time
/// (ascending) instead of held in `desired` (whose own prios are ignored):
/// each is diffed and its filters moved into the operations or dropped, so
/// a 100,000-entry plan is never held twice, nor next to a full copy of its
/// operations.
///
/// `filters` is how many filters the prios hold in all (a hint): building
/// from nothing, the additions are reserved once at that size, so the
/// buffer of 100,000 operations is never reallocated (copied) while it grows.
pub fn diff_onto_streamed(
    observed: &Shape,
    desired: &Shape,
    prios: impl IntoIterator<Item = Prio>,
    foreign_root: bool,
    filters: usize,
) -> Vec<Op> {
    let mut ph = Phases::default();
    if observed.prios.is_empty() {
        // Every filter is an addition, plus tables, classes, leaves, root.
        ph.user_nodes.reserve_exact(filters + 1024);
    }
    plan_ops_into(ph, observed, desired, prios, &BTreeSet::new(), foreign_root)
}

fn plan_ops_from(
    observed: &Shape,
    desired: &Shape,
    prios: impl IntoIterator<Item = Prio>,
    rebuild: &BTreeSet<u16>,
    foreign_root: bool,
) -> Vec<Op> {
    plan_ops_into(
        Phases::default(),
        observed,
        desired,
        prios,
        rebuild,
        foreign_root,
    )
}

/// Plans the operations from `observed` to `desired` (with `prios` as its
/// prios) into the phases `ph`, and lays them out in order.
fn plan_ops_into(
    mut ph: Phases,
    observed: &Shape,
    desired: &Shape,
    prios: impl IntoIterator<Item = Prio>,
    rebuild: &BTreeSet<u16>,
    foreign_root: bool,
) -> Vec<Op> {
    let empty = Shape::default();
    let observed =
        if observed.root.is_some() && observed.root != desired.root && desired.root.is_some() {
            // Root parameters (defcls, r2q) cannot change in place: rebuild.
            ph.pre.push(Op::DelRoot);
            &empty
        } else {
            observed
        };
    match (&observed.root, &desired.root) {
        (None, Some(r)) => ph.root.push(Op::AddRoot {
            root: r.clone(),
            graft: foreign_root,
        }),
        (Some(_), None) => {
            ph.pre.push(Op::DelRoot);
            return ph.pre;
        }
        _ => {}
    }
    diff_classes(observed, desired, &mut ph);
    for l in &desired.leaves {
        if observed.leaves.iter().find(|o| o.parent == l.parent) != Some(l) {
            ph.leaves.push(Op::PutLeaf(l.clone()));
        }
    }
    diff_prios(observed, prios, rebuild, &mut ph);
    let sweeps = sweep_hidden_tables(observed, &ph);
    ph.into_ops(sweeps)
}

/// Diffs each desired prio against the observed one (a prio whose
/// protocol or tables changed, or that is to be rebuilt, is removed whole
/// first and created again), then removes the observed prios not desired.
fn diff_prios(
    observed: &Shape,
    prios: impl IntoIterator<Item = Prio>,
    rebuild: &BTreeSet<u16>,
    ph: &mut Phases,
) {
    let mut wanted = BTreeSet::new();
    for p in prios {
        wanted.insert(p.prio);
        let obs = observed.prios.iter().find(|o| o.prio == p.prio);
        let obs = match obs {
            Some(o)
                if o.protocol != p.protocol
                    || tables_conflict(o, &p)
                    || rebuild.contains(&o.prio) =>
            {
                ph.pre.extend(remove_prio(o));
                None
            }
            other => other,
        };
        diff_prio(obs, p, ph);
    }
    for o in &observed.prios {
        if !wanted.contains(&o.prio) {
            for op in remove_prio(o) {
                match op {
                    Op::Unlink { .. } => ph.node_dels.push(op),
                    Op::DelTable { .. } => ph.table_dels.push(op),
                    _ => ph.prio_dels.push(op),
                }
            }
        }
    }
}

impl Phases {
    /// The operations in the order they must be sent: `sweeps` first, then
    /// each phase in declaration order.
    fn into_ops(self, sweeps: Vec<Op>) -> Vec<Op> {
        let Phases {
            pre,
            root,
            classes,
            leaves,
            tables,
            user_nodes,
            user_links,
            root_nodes,
            node_dels,
            table_dels,
            prio_dels,
            class_dels,
        } = self;
        let mut phases = [
            sweeps, pre, root, classes, leaves, tables, user_nodes, user_links, root_nodes,
            node_dels, table_dels, prio_dels, class_dels,
        ];
        // The biggest phase (100,000 additions of a fresh whitelist) becomes
        // the result in place: the others are moved in around it, so its
        // buffer is never copied next to itself.
        let total: usize = phases.iter().map(Vec::len).sum();
        let big = (0..phases.len())
            .max_by_key(|&i| phases[i].len())
            .unwrap_or(0);
        let mut out = std::mem::take(&mut phases[big]);
        if out.capacity() < total {
            out.reserve_exact(total - out.len());
        }
        let before: Vec<Op> = phases[..big].iter_mut().flat_map(std::mem::take).collect();
        out.splice(0..0, before);
        for phase in &mut phases[big + 1..] {
            out.append(phase);
        }
        out
    }
}

/// Before creating a table no visible prio holds, delete any invisible table
/// under that handle (see [`Op::SweepTable`]). Orphans can only exist while
/// some u32 prio of the qdisc does (the kernel frees them with the last one),
/// so there is always a prio to reach them through.
fn sweep_hidden_tables(observed: &Shape, ph: &Phases) -> Vec<Op> {
    let mut sweeps = Vec::new();
    let Some(via) = observed.prios.first() else {
        return sweeps;
    };
    for op in &ph.tables {
        if let Op::AddTable { table, .. } = op {
            let visible = observed
                .prios
                .iter()
                .any(|p| p.tables.iter().any(|t| t.handle == table.handle));
            if !visible {
                sweeps.push(Op::SweepTable {
                    prio: via.prio,
                    protocol: via.protocol,
                    handle: table.handle,
                });
            }
        }
    }
    sweeps
}

/// Removing a prio must remove its hash tables explicitly: tables live in the
/// qdisc-wide u32 state, and deleting the prio alone would orphan them
/// (invisible in dumps, their ids taken). Deleting the links instead can let
/// the kernel drop the emptied prio first, with the same effect. So: unlink
/// (the nodes stay), delete the tables, then delete the prio.
fn remove_prio(o: &Prio) -> Vec<Op> {
    let (prio, protocol) = (o.prio, o.protocol);
    let mut ops: Vec<Op> = o
        .filters
        .iter()
        .filter(|n| n.link.is_some())
        .map(|n| Op::Unlink {
            prio,
            protocol,
            handle: filter_handle(o, n),
        })
        .collect();
    ops.extend(o.tables.iter().map(|t| Op::DelTable {
        prio,
        protocol,
        handle: t.handle,
    }));
    ops.push(Op::DelPrio { prio, protocol });
    ops
}

fn tables_conflict(o: &Prio, p: &Prio) -> bool {
    p.tables.iter().any(|t| {
        o.tables
            .iter()
            .any(|ot| ot.handle == t.handle && ot.divisor != t.divisor)
    })
}

fn diff_classes(observed: &Shape, desired: &Shape, ph: &mut Phases) {
    for c in &desired.classes {
        if observed.classes.iter().find(|o| o.classid == c.classid) != Some(c) {
            ph.classes.push(Op::PutClass(c.clone()));
        }
    }
    // Children before parents: deeper classes first.
    let depth = |mut id: u32| {
        let mut d = 0;
        while let Some(c) = observed.classes.iter().find(|c| c.classid == id) {
            id = c.parent;
            d += 1;
            if d > 8 {
                break;
            }
        }
        d
    };
    let mut extra: Vec<&Class> = observed
        .classes
        .iter()
        .filter(|o| !desired.classes.iter().any(|c| c.classid == o.classid))
        .collect();
    extra.sort_by_key(|c| std::cmp::Reverse(depth(c.classid)));
    ph.class_dels
        .extend(extra.into_iter().map(|c| Op::DelClass(c.classid)));
}

/// Diffs one desired prio `p` against the observed one (`None`: absent or
/// to be rebuilt): its tables, then its filters, kept where the kernel
/// already holds the same rule, changed in place where it holds the same
/// selector, added otherwise; what is left over is deleted.
fn diff_prio(obs: Option<&Prio>, p: Prio, ph: &mut Phases) {
    let (prio, protocol) = (p.prio, p.protocol);
    let empty = Prio {
        prio,
        protocol,
        root_handle: None,
        tables: vec![],
        filters: vec![],
    };
    let obs = obs.unwrap_or(&empty);
    for t in &p.tables {
        if !obs.tables.contains(t) {
            ph.tables.push(Op::AddTable {
                prio,
                protocol,
                table: *t,
            });
        }
    }
    let mut m = Matcher::new(obs, prio, protocol);
    let mut pending = m.claim_fixed_ids(&p.filters, ph);
    let Prio {
        tables, filters, ..
    } = p;
    let changes = m.match_the_rest(filters, &mut pending);
    m.add(pending, ph);
    ph.root_nodes.extend(changes);
    m.delete_unmatched(&tables, ph);
}

/// The observed filters of one prio, indexed for matching desired ones.
///
/// Observed filters are sorted by (table, bucket), so matching costs one
/// bucket walk per desired filter; `used` marks the ones kept (or already
/// scheduled for deletion). One vector of (bucket, index): a map of small
/// vectors and id sets per bucket cost ~4 MiB at 100,000 filters.
struct Matcher<'o> {
    obs: &'o Prio,
    prio: u16,
    protocol: u16,
    order: Vec<(u64, u32)>,
    used: Vec<bool>,
}

impl<'o> Matcher<'o> {
    /// Indexes `obs`, the observed prio `prio`/`protocol` (or an empty one).
    fn new(obs: &'o Prio, prio: u16, protocol: u16) -> Matcher<'o> {
        let mut order: Vec<(u64, u32)> = (0..obs.filters.len())
            .map(|i| (bucket_key(&obs.filters[i]), i as u32))
            .collect();
        order.sort_unstable();
        Matcher {
            obs,
            prio,
            protocol,
            order,
            used: vec![false; obs.filters.len()],
        }
    }

    /// Where bucket `b` of table `t` is in `order`.
    fn bucket(&self, t: Table, b: u8) -> std::ops::Range<usize> {
        let k = key_of(t, b);
        let lo = self.order.partition_point(|e| e.0 < k);
        let n = self.order[lo..].iter().take_while(|e| e.0 == k).count();
        lo..lo + n
    }

    /// Indexes into `obs.filters` of the filters in `range` of `order`.
    fn filters_in(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = usize> + '_ {
        self.order[range].iter().map(|&(_, i)| i as usize)
    }

    /// Marks and returns the first unused filter in `range` that `pred` accepts.
    fn claim(
        &mut self,
        range: std::ops::Range<usize>,
        pred: impl Fn(&Filter) -> bool,
    ) -> Option<usize> {
        let i = self
            .filters_in(range)
            .find(|&i| !self.used[i] && pred(&self.obs.filters[i]))?;
        self.used[i] = true;
        Some(i)
    }

    /// The kernel handle of observed filter `i`.
    fn handle(&self, i: usize) -> u32 {
        filter_handle(self.obs, &self.obs.filters[i])
    }

    /// Desired filters with a fixed id (a rollback to a snapshot) claim
    /// their id first: kept if the same rule holds it, changed in place if
    /// the same selector does, else that filter is deleted early and the
    /// desired one added. Returns the ones to add.
    fn claim_fixed_ids(&mut self, desired: &[Filter], ph: &mut Phases) -> Vec<Filter> {
        let (prio, protocol) = (self.prio, self.protocol);
        let mut pending = Vec::new();
        for d in desired.iter().filter(|d| d.id.is_some()) {
            let range = self.bucket(d.table, d.bucket);
            let at = self
                .filters_in(range)
                .find(|&i| self.obs.filters[i].id == d.id);
            match at {
                Some(i) if self.obs.filters[i].same_rule(d) => self.used[i] = true,
                Some(i) if self.obs.filters[i].sel == d.sel => {
                    self.used[i] = true;
                    ph.root_nodes.push(Op::ChangeFilter {
                        prio,
                        protocol,
                        handle: self.handle(i),
                        filter: d.clone(),
                    });
                }
                Some(i) => {
                    self.used[i] = true;
                    ph.pre.push(Op::DelFilter {
                        prio,
                        protocol,
                        handle: self.handle(i),
                    });
                    pending.push(d.clone());
                }
                None => pending.push(d.clone()),
            }
        }
        pending
    }

    /// Desired filters without an id: kept where an unused observed filter
    /// holds the same rule, changed in place where one holds the same
    /// selector in the same bucket (returned, sent with the root's
    /// filters), else added to `pending`.
    fn match_the_rest(&mut self, desired: Vec<Filter>, pending: &mut Vec<Filter>) -> Vec<Op> {
        let (prio, protocol) = (self.prio, self.protocol);
        let mut changes = Vec::new();
        for d in desired.into_iter().filter(|d| d.id.is_none()) {
            let candidates = self.bucket(d.table, d.bucket);
            if self
                .claim(candidates.clone(), |o| o.same_rule(&d))
                .is_some()
            {
                continue;
            }
            let same_sel =
                |o: &Filter| o.table == d.table && o.bucket == d.bucket && o.sel == d.sel;
            if let Some(i) = self.claim(candidates, same_sel) {
                changes.push(Op::ChangeFilter {
                    prio,
                    protocol,
                    handle: self.handle(i),
                    filter: d,
                });
                continue;
            }
            pending.push(d);
        }
        changes
    }

    /// Adds `pending`, each with the lowest id free in its bucket (or its
    /// own fixed one): root filters with the root's, links inside a table
    /// after that table's entries, the rest with the user tables' entries.
    fn add(&mut self, pending: Vec<Filter>, ph: &mut Phases) {
        // Ids in use, per bucket, only in buckets that get additions.
        let mut taken: HashMap<(Table, u8), BTreeSet<u32>> = HashMap::new();
        if ph.user_nodes.capacity() - ph.user_nodes.len() < pending.len() {
            ph.user_nodes.reserve_exact(pending.len());
        }
        for mut d in pending {
            let key = (d.table, d.bucket);
            let ids = taken.entry(key).or_insert_with(|| {
                let range = self.bucket(d.table, d.bucket);
                self.filters_in(range)
                    .map(|i| self.obs.filters[i].id.unwrap_or(0))
                    .collect()
            });
            let id = match d.id {
                Some(id) => id,
                // Lowest id free in this bucket; ids of nodes about to be deleted
                // stay taken because deletions run after additions.
                None => match lowest_free(ids) {
                    Some(id) => id,
                    None => {
                        // The bucket's 12-bit id space is full of nodes we keep
                        // plus nodes we are about to delete: delete this bucket's
                        // unwanted nodes first (they are unwanted, so nothing
                        // that stays loses a rule), which frees their ids.
                        free_bucket_early(self.obs, key, &mut self.used, &mut taken, ph);
                        lowest_free(taken.entry(key).or_default()).unwrap_or(0xfff)
                    }
                },
            };
            taken.entry(key).or_default().insert(id);
            d.id = Some(id);
            let phase = match (&d.table, &d.link) {
                (Table::Root, _) => &mut ph.root_nodes,
                // A link inside a table (a spilled bucket) goes in after the
                // entries of the table it leads to.
                (Table::User(_), Some(_)) => &mut ph.user_links,
                (Table::User(_), None) => &mut ph.user_nodes,
            };
            phase.push(Op::AddFilter {
                prio: self.prio,
                protocol: self.protocol,
                filter: d,
            });
        }
    }

    /// Deletes the observed filters nothing matched, and the observed
    /// tables the desired prio (`tables`) does not have.
    fn delete_unmatched(&self, tables: &[HashTable], ph: &mut Phases) {
        let (prio, protocol) = (self.prio, self.protocol);
        for (i, o) in self.obs.filters.iter().enumerate() {
            if !self.used[i] {
                ph.node_dels.push(Op::DelFilter {
                    prio,
                    protocol,
                    handle: filter_handle(self.obs, o),
                });
            }
        }
        for t in &self.obs.tables {
            if !tables.iter().any(|d| d.handle == t.handle) {
                ph.table_dels.push(Op::DelTable {
                    prio,
                    protocol,
                    handle: t.handle,
                });
            }
        }
    }
}

/// Sort key of a filter's (table, bucket).
fn bucket_key(n: &Filter) -> u64 {
    key_of(n.table, n.bucket)
}

fn key_of(table: Table, bucket: u8) -> u64 {
    let t = match table {
        Table::Root => 0,
        Table::User(h) => u64::from(h),
    };
    (t << 8) | u64::from(bucket)
}

fn lowest_free(ids: &BTreeSet<u32>) -> Option<u32> {
    (1..0x1000).find(|i| !ids.contains(i))
}

/// Schedules the deletion of a bucket's unwanted observed nodes ahead of the
/// additions and releases their ids.
fn free_bucket_early(
    obs: &Prio,
    key: (Table, u8),
    used: &mut [bool],
    taken: &mut HashMap<(Table, u8), BTreeSet<u32>>,
    ph: &mut Phases,
) {
    for (i, o) in obs.filters.iter().enumerate() {
        if used[i] || (o.table, o.bucket) != key || o.link.is_some() {
            continue;
        }
        used[i] = true;
        if let Some(ids) = taken.get_mut(&key) {
            ids.remove(&o.id.unwrap_or(0));
        }
        ph.pre.push(Op::DelFilter {
            prio: obs.prio,
            protocol: obs.protocol,
            handle: filter_handle(obs, o),
        });
    }
}

/// Counts nodes whose bucket would overflow the kernel's 12-bit node ids.
pub fn overfull_buckets(shape: &Shape) -> Vec<(u16, Table, u8, usize)> {
    shape.prios.iter().flat_map(overfull_buckets_of).collect()
}

/// [`overfull_buckets`] of one prio.
pub fn overfull_buckets_of(p: &Prio) -> Vec<(u16, Table, u8, usize)> {
    let mut counts: BTreeMap<(Table, u8), usize> = BTreeMap::new();
    for n in &p.filters {
        *counts.entry((n.table, n.bucket)).or_default() += 1;
    }
    counts
        .into_iter()
        .filter(|(_, c)| *c > 0xffe)
        .map(|((t, b), c)| (p.prio, t, b, c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{plan, LeafChoice};
    use egressguard_crds::{load::parse_str, validate};

    fn shape(uplink: &str, whitelist: &str, leaf: LeafChoice) -> Shape {
        let g = parse_str(&format!(
            "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: t}}\nspec:\n  uplink: {{rate: {uplink}}}\n  throttle:\n    rate: 1Mbit\n    destinations: [{{protocol: TCP, port: 80}}, {{protocol: TCP, port: 443}}]\n  whitelist: [{whitelist}]\n"
        ))
        .expect("parse");
        plan(&validate(&g[0].spec).expect("valid"), leaf)
    }

    fn incident() -> Shape {
        shape(
            "20Mbit",
            "203.0.113.10/32, 198.51.100.0/24",
            LeafChoice::Sfq,
        )
    }

    /// What the kernel holds once `desired` was built from nothing: the
    /// filters with the ids diff gave them, each prio with its root table.
    fn installed(desired: &Shape) -> Shape {
        let mut s = desired.clone();
        for (i, p) in s.prios.iter_mut().enumerate() {
            p.root_handle = Some((0x800 + i as u32) << 20);
            p.filters.clear();
        }
        for op in diff(&Shape::default(), desired) {
            if let Op::AddFilter {
                prio,
                protocol,
                filter,
            } = op
            {
                let p = s
                    .prios
                    .iter_mut()
                    .find(|p| p.prio == prio && p.protocol == protocol);
                p.expect("a planned prio").filters.push(filter);
            }
        }
        s
    }

    /// The variant's name.
    fn kind(op: &Op) -> &'static str {
        match op {
            Op::AddRoot { .. } => "AddRoot",
            Op::DelRoot => "DelRoot",
            Op::PutClass(_) => "PutClass",
            Op::DelClass(_) => "DelClass",
            Op::PutLeaf(_) => "PutLeaf",
            Op::AddTable { .. } => "AddTable",
            Op::DelTable { .. } => "DelTable",
            Op::AddFilter { .. } => "AddFilter",
            Op::ChangeFilter { .. } => "ChangeFilter",
            Op::Unlink { .. } => "Unlink",
            Op::DelFilter { .. } => "DelFilter",
            Op::SweepTable { .. } => "SweepTable",
            Op::DelPrio { .. } => "DelPrio",
        }
    }

    /// Operation kinds and how many of each.
    fn kinds(ops: &[Op]) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for op in ops {
            *out.entry(kind(op).to_string()).or_default() += 1;
        }
        out
    }

    /// A deletion of anything.
    fn deletes(op: &Op) -> bool {
        match op {
            Op::DelRoot
            | Op::DelClass(_)
            | Op::DelTable { .. }
            | Op::DelFilter { .. }
            | Op::SweepTable { .. }
            | Op::DelPrio { .. } => true,
            Op::AddRoot { .. }
            | Op::PutClass(_)
            | Op::PutLeaf(_)
            | Op::AddTable { .. }
            | Op::AddFilter { .. }
            | Op::ChangeFilter { .. }
            | Op::Unlink { .. } => false,
        }
    }

    #[test]
    fn diff_writes_only_what_differs() {
        let built = installed(&incident());
        // (case, observed, desired, the operation kinds expected, exactly)
        type Case = (&'static str, Shape, Shape, Vec<(&'static str, usize)>);
        let cases: Vec<Case> = vec![
            (
                "installed as planned: nothing",
                built.clone(),
                incident(),
                vec![],
            ),
            (
                "uplink rate changed: the classes it bounds, in place",
                built.clone(),
                shape(
                    "30Mbit",
                    "203.0.113.10/32, 198.51.100.0/24",
                    LeafChoice::Sfq,
                ),
                // uplink, whitelist, default, and the protected lane (a tenth
                // of the uplink, ceil the uplink); the SSH lane stays at 5Mbit
                vec![("PutClass", 4)],
            ),
            (
                "one whitelist entry swapped: one filter out, one in",
                built.clone(),
                shape(
                    "20Mbit",
                    "203.0.113.11/32, 198.51.100.0/24",
                    LeafChoice::Sfq,
                ),
                vec![("AddFilter", 1), ("DelFilter", 1)],
            ),
            (
                "sfq refused: the leaves only",
                built.clone(),
                shape(
                    "20Mbit",
                    "203.0.113.10/32, 198.51.100.0/24",
                    LeafChoice::PfifoFallback,
                ),
                vec![("PutLeaf", 5)],
            ),
            (
                "removal: the root, and everything under it with it",
                built.clone(),
                Shape::default(),
                vec![("DelRoot", 1)],
            ),
        ];
        for (case, observed, desired, expected) in cases {
            let ops = diff(&observed, &desired);
            let expected: BTreeMap<String, usize> = expected
                .into_iter()
                .map(|(k, n)| (k.to_string(), n))
                .collect();
            assert_eq!(kinds(&ops), expected, "{case}: {ops:#?}");
        }
    }

    #[test]
    fn the_root_is_grafted_only_over_a_foreign_one() {
        let desired = incident();
        let first = |ops: Vec<Op>| match ops.into_iter().next() {
            Some(Op::AddRoot { graft, .. }) => graft,
            other => panic!("the root comes first: {other:?}"),
        };
        assert!(!first(diff_onto(&Shape::default(), &desired, false)));
        assert!(first(diff_onto(&Shape::default(), &desired, true)));
        // Building from nothing deletes nothing.
        let ops = diff(&Shape::default(), &desired);
        assert!(!ops.iter().any(deletes), "{ops:#?}");
    }

    /// Filters with a fixed id (a rollback to a snapshot) claim it: kept
    /// when the same rule holds it, changed in place when the same selector
    /// does, deleted first and added again otherwise; the rest takes the
    /// lowest free id, and what nothing claimed is deleted.
    #[test]
    fn fixed_ids_are_claimed_before_free_ones_are_given() {
        let table = Table::User(0x101 << 20);
        let sel = |v: u32| Selector {
            keys: vec![Key {
                mask: u32::MAX,
                val: v,
                off: 16,
                offmask: 0,
            }],
            ..Selector::default()
        };
        let filter = |id: Option<u32>, v: u32, class: u32| Filter {
            table,
            bucket: 5,
            id,
            sel: sel(v),
            classid: Some(class),
            link: None,
            origin: Origin::Unknown,
        };
        let prio = |filters: Vec<Filter>| Prio {
            prio: 12,
            protocol: ETH_P_IP,
            root_handle: Some(0x800 << 20),
            tables: vec![HashTable {
                handle: 0x101 << 20,
                divisor: 256,
            }],
            filters,
        };
        let observed = prio(vec![
            filter(Some(1), 1, 0x00e9_0030),
            filter(Some(2), 2, 0x00e9_0030),
            filter(Some(3), 3, 0x00e9_0030),
            filter(Some(4), 4, 0x00e9_0030),
        ]);
        let desired = prio(vec![
            filter(Some(1), 1, 0x00e9_0030),
            filter(Some(2), 2, 0x00e9_0010),
            filter(Some(3), 9, 0x00e9_0030),
            filter(None, 7, 0x00e9_0030),
        ]);
        let mut ph = Phases::default();
        diff_prio(Some(&observed), desired, &mut ph);
        let ids = |ops: &[Op]| -> Vec<(&'static str, u32)> {
            ops.iter()
                .map(|op| match op {
                    Op::AddFilter { filter, .. } => (kind(op), filter.id.unwrap_or(0)),
                    Op::ChangeFilter { handle, .. } | Op::DelFilter { handle, .. } => {
                        (kind(op), handle & 0xfff)
                    }
                    other => panic!("unexpected {other:?}"),
                })
                .collect()
        };
        assert_eq!(ids(&ph.root_nodes), [("ChangeFilter", 2)]);
        assert_eq!(ids(&ph.pre), [("DelFilter", 3)]);
        // Id 3 is taken again by its new rule; the free one gets 5 (4 is
        // deleted only after the additions).
        assert_eq!(ids(&ph.user_nodes), [("AddFilter", 3), ("AddFilter", 5)]);
        assert_eq!(ids(&ph.node_dels), [("DelFilter", 4)]);
        assert!(ph.tables.is_empty() && ph.table_dels.is_empty());
    }
}
