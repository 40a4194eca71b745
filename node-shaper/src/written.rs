//! The tree the agent last wrote, kept between passes so that a pass
//! driven by a plan change can skip reading 100,000 filters back.
//!
//! A pass that read the tree back knows every filter in it: what it read,
//! plus what it added (each with the handle it gave the kernel, which the
//! kernel acknowledged), minus what it deleted. [`Written`] keeps the part
//! the next plan can change cheaply: the skeleton (root, classes, leaves,
//! every prio but the whitelist's) as planned, the whitelist's [`Layout`]
//! (linear entries, split and spilled buckets), and one handle per hashed
//! whitelist entry. The next plan is compared entry set against entry set
//! ([`Written::delta`]): a one-entry change is one add and one delete,
//! found without planning or diffing the other 99,999.
//!
//! Trusting it is the caller's decision: only a pass triggered by a plan
//! change, with the tc-notification monitor running and no foreign change
//! notified since (`netlink::monitor::Watch::take_foreign`). The periodic
//! resync and any foreign change read the kernel back, as before.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::diff::{diff, filter_handle};
use crate::hashing::{FastMap as HashMap, FastSet as HashSet};
use crate::layout::{V4_GROUPS, V6_GROUPS};
use crate::model::*;
use crate::netlink::Observed;
use crate::op::Op;
use crate::plan::{entry_selector, plan_skeleton, Group, Layout, LeafChoice, Place, WhitelistPlan};
use crate::target::Target;

/// One hashed whitelist entry's filter in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    /// Full u32 handle (user table | bucket | id).
    handle: u32,
    /// The class it sends to.
    classid: u32,
    /// Its prio.
    prio: u16,
    /// Marked while a delta walks the new plan.
    seen: bool,
}

/// What the agent remembers of the tree it last wrote on one interface.
#[derive(Debug, Clone)]
pub struct Written {
    /// The interface it was written to (a recreated interface has a new index).
    pub ifindex: i32,
    skeleton: Shape,
    layout: Layout,
    entries: HashMap<IpNet, Slot>,
    /// Ids in user tables of whitelist prios held by filters that are not
    /// entries (the links into second-level tables): (table, bucket, id).
    others: Vec<(u32, u8, u32)>,
    filters: usize,
}

/// The operations from the written tree to a new plan, and what they change.
#[derive(Debug)]
pub struct Delta {
    /// Additions, class changes, then deletions (the differ's order).
    pub ops: Vec<Op>,
    added: Vec<(IpNet, Slot)>,
    changed: Vec<ClassChange>,
    removed: Vec<IpNet>,
}

/// A hashed entry the plan adds: its network, class and place.
type Addition = (IpNet, u32, Place);

/// A remembered entry whose class changes: its network and new class.
type ClassChange = (IpNet, u32);

/// What a pass's operations did to the whitelist prios of the tree it
/// read: what [`Written::after`] must not carry over as read.
#[derive(Default)]
struct Effects {
    /// Filters deleted, by (prio, handle).
    deleted: HashSet<(u16, u32)>,
    /// Filters changed in place, by (prio, handle), and what they hold now.
    changed: HashMap<(u16, u32), Filter>,
    /// Prios deleted whole.
    dead: BTreeSet<u16>,
    /// The root was deleted (and everything under it).
    root_gone: bool,
}

impl Effects {
    /// The effects of `ops`.
    fn of(ops: &[Op]) -> Effects {
        let mut e = Effects::default();
        for op in ops {
            match op {
                Op::DelRoot => e.root_gone = true,
                Op::DelPrio { prio, .. } => {
                    e.dead.insert(*prio);
                }
                Op::DelFilter { prio, handle, .. } if is_whitelist_prio(*prio) => {
                    e.deleted.insert((*prio, *handle));
                }
                Op::ChangeFilter {
                    prio,
                    handle,
                    filter,
                    ..
                } if is_whitelist_prio(*prio) => {
                    e.changed.insert((*prio, *handle), filter.clone());
                }
                _ => {}
            }
        }
        e
    }
}

fn is_whitelist_prio(prio: u16) -> bool {
    V4_GROUPS
        .iter()
        .chain(V6_GROUPS.iter())
        .any(|g| g.prio == prio)
}

fn is_entry(f: &Filter) -> bool {
    matches!(f.table, Table::User(_)) && f.link.is_none() && f.classid.is_some()
}

/// The destination network a whitelist entry's selector matches (the
/// inverse of `plan::dst_keys`), if it is one.
pub fn net_of(sel: &Selector, protocol: u16) -> Option<IpNet> {
    if sel.flags != U32_TERMINAL || sel.hmask != 0 || sel.hoff != 0 || sel.off != 0 {
        return None;
    }
    let contiguous =
        |mask: u32| mask == u32::MAX.checked_shl(32 - mask.leading_ones()).unwrap_or(0);
    match protocol {
        ETH_P_IP => match sel.keys.as_slice() {
            [k] if k.off == 16 && k.offmask == 0 && contiguous(k.mask) && k.val & !k.mask == 0 => {
                Ipv4Net::new(Ipv4Addr::from(k.val), k.mask.leading_ones() as u8)
                    .ok()
                    .map(IpNet::V4)
            }
            _ => None,
        },
        ETH_P_IPV6 => {
            let mut bits = 0u128;
            let mut len = 0u32;
            for (w, k) in sel.keys.iter().enumerate() {
                let full_before = len == 32 * w as u32;
                if k.off != 24 + 4 * w as i32
                    || k.offmask != 0
                    || !contiguous(k.mask)
                    || k.val & !k.mask != 0
                    || !full_before
                    || w > 3
                {
                    return None;
                }
                bits |= u128::from(k.val) << (96 - 32 * w);
                len += k.mask.leading_ones();
            }
            if sel.keys.is_empty() {
                return None;
            }
            Ipv6Net::new(Ipv6Addr::from(bits), len as u8)
                .ok()
                .map(IpNet::V6)
        }
        _ => None,
    }
}

fn split(handle: u32) -> (u32, u8, u32) {
    (
        handle & 0xfff0_0000,
        ((handle >> 12) & 0xff) as u8,
        handle & 0xfff,
    )
}

impl Written {
    /// The tree after a clean pass: `before` (read back) with `ops` (all
    /// acknowledged) applied, for `target` with leaf `choice`; `filters` in
    /// all. `None` when it does not account for the plan's every entry
    /// exactly (the next pass then reads back).
    pub fn after(
        ifindex: i32,
        before: &Observed,
        ops: &[Op],
        target: &Target,
        plan: &WhitelistPlan<'_>,
        choice: LeafChoice,
        filters: usize,
    ) -> Option<Written> {
        let effects = Effects::of(ops);
        let hashed = plan
            .entries()
            .filter(|(_, _, g)| matches!(g, Group::Hashed(_)))
            .count();
        let mut w = Written {
            ifindex,
            skeleton: plan_skeleton(&target.valid, choice, &before.local),
            layout: Layout::default(),
            entries: HashMap::with_capacity_and_hasher(hashed, Default::default()),
            others: Vec::new(),
            filters,
        };
        if !effects.root_gone {
            w.keep_surviving(before, &effects)?;
        }
        w.keep_added(ops)?;
        if !w.holds_exactly(plan, hashed) {
            return None;
        }
        w.layout = plan.layout();
        Some(w)
    }

    /// Remembers one filter of a whitelist prio: an entry by its network
    /// (`None` if it is not one the plan can have made, or a second filter
    /// for the same network), any other filter in a user table by its id.
    fn keep(&mut self, prio: u16, protocol: u16, handle: u32, f: &Filter) -> Option<()> {
        let (table, bucket, id) = split(handle);
        if is_entry(f) {
            let net = net_of(&f.sel, protocol)?;
            let slot = Slot {
                handle,
                classid: f.classid?,
                prio,
                seen: false,
            };
            if self.entries.insert(net, slot).is_some() {
                return None;
            }
        } else if matches!(f.table, Table::User(_)) {
            self.others.push((table, bucket, id));
        }
        Some(())
    }

    /// Remembers the filters of `before`'s whitelist prios that the pass
    /// left in place (changed ones as changed).
    fn keep_surviving(&mut self, before: &Observed, effects: &Effects) -> Option<()> {
        for p in before.shape.prios.iter() {
            if !is_whitelist_prio(p.prio) || effects.dead.contains(&p.prio) {
                continue;
            }
            for f in &p.filters {
                let handle = filter_handle(p, f);
                if effects.deleted.contains(&(p.prio, handle)) {
                    continue;
                }
                match effects.changed.get(&(p.prio, handle)) {
                    Some(new) => self.keep(p.prio, p.protocol, handle, new)?,
                    None => self.keep(p.prio, p.protocol, handle, f)?,
                }
            }
        }
        Some(())
    }

    /// Remembers the filters the pass added to user tables of whitelist
    /// prios, under the handles it gave them.
    fn keep_added(&mut self, ops: &[Op]) -> Option<()> {
        for op in ops {
            let Op::AddFilter {
                prio,
                protocol,
                filter,
            } = op
            else {
                continue;
            };
            if !is_whitelist_prio(*prio) {
                continue;
            }
            if let (Table::User(t), Some(id)) = (filter.table, filter.id) {
                let handle = t | (u32::from(filter.bucket) << 12) | id;
                self.keep(*prio, *protocol, handle, filter)?;
            }
        }
        Some(())
    }

    /// Every hashed entry of the plan (`hashed` of them) is remembered
    /// where the plan puts it, and nothing else.
    fn holds_exactly(&self, plan: &WhitelistPlan<'_>, hashed: usize) -> bool {
        let placed = plan.entries().all(|(net, class, g)| {
            let Group::Hashed(gi) = g else { return true };
            let Some(slot) = self.entries.get(&net) else {
                return false;
            };
            let p = plan.place(&net, gi);
            let (table, bucket, _) = split(slot.handle);
            slot.classid == class && (p.prio, p.table, p.bucket) == (slot.prio, table, bucket)
        });
        placed && hashed == self.entries.len()
    }

    /// Filters in the written tree.
    pub fn filters(&self) -> usize {
        self.filters
    }

    /// The operations that take the written tree to `target` (leaf `choice`,
    /// with `light`, what [`crate::netlink::decode::observe_light`] read:
    /// its root, classes, leaves and addresses). `None` when anything but
    /// hashed whitelist entries would change (the skeleton, the layout, a
    /// class or leaf in the kernel), or a bucket has no free id: those take
    /// the full pass.
    pub fn delta(
        &mut self,
        target: &Target,
        choice: LeafChoice,
        light: &Observed,
    ) -> Option<Delta> {
        let plan = self.same_outline(target, choice, light)?;
        let (added, changed) = self.compare(&plan);
        let removed = self.unseen();
        let mut ops = Vec::with_capacity(added.len() + changed.len() + removed.len());
        let new_slots = self.add(added, &mut ops)?;
        for (net, class) in &changed {
            let slot = self.entries[net];
            let (table, bucket, id) = split(slot.handle);
            ops.push(Op::ChangeFilter {
                prio: slot.prio,
                protocol: protocol_of(net),
                handle: slot.handle,
                filter: entry_filter(net, *class, table, bucket, id),
            });
        }
        for net in &removed {
            let slot = self.entries[net];
            ops.push(Op::DelFilter {
                prio: slot.prio,
                protocol: protocol_of(net),
                handle: slot.handle,
            });
        }
        Some(Delta {
            ops,
            added: new_slots,
            changed,
            removed,
        })
    }

    /// The plan of `target`'s whitelist, when everything around its entries
    /// is as written: the skeleton, the classes and leaves the kernel holds
    /// (`light`), and the whitelist's layout.
    fn same_outline<'t>(
        &self,
        target: &'t Target,
        choice: LeafChoice,
        light: &Observed,
    ) -> Option<WhitelistPlan<'t>> {
        let skeleton = plan_skeleton(&target.valid, choice, &light.local);
        if skeleton != self.skeleton {
            return None;
        }
        let bare = Shape {
            prios: vec![],
            ..skeleton
        };
        if !diff(&light.shape, &bare).is_empty() {
            return None;
        }
        let plan = WhitelistPlan::new(&target.valid, &target.protected);
        (plan.layout() == self.layout).then_some(plan)
    }

    /// The plan's hashed entries not remembered (with where they go), and
    /// the remembered ones whose class changed; marks every remembered one
    /// the plan has as seen.
    fn compare(&mut self, plan: &WhitelistPlan<'_>) -> (Vec<Addition>, Vec<ClassChange>) {
        let mut added = Vec::new();
        let mut changed = Vec::new();
        for (net, class, g) in plan.entries() {
            let Group::Hashed(gi) = g else { continue };
            match self.entries.get_mut(&net) {
                Some(slot) => {
                    slot.seen = true;
                    if slot.classid != class {
                        changed.push((net, class));
                    }
                }
                None => added.push((net, class, plan.place(&net, gi))),
            }
        }
        (added, changed)
    }

    /// The remembered entries [`Written::compare`] did not see (clearing
    /// every mark for the next delta).
    fn unseen(&mut self) -> Vec<IpNet> {
        let mut removed = Vec::new();
        for (net, slot) in self.entries.iter_mut() {
            if !std::mem::take(&mut slot.seen) {
                removed.push(*net);
            }
        }
        removed
    }

    /// Pushes an addition for each of `added` with the lowest id free in
    /// its bucket, and returns their slots; `None` when a bucket is full.
    /// Ids of entries about to be deleted stay taken (deletions run last).
    fn add(&self, added: Vec<Addition>, ops: &mut Vec<Op>) -> Option<Vec<(IpNet, Slot)>> {
        let buckets: HashSet<(u32, u8)> =
            added.iter().map(|(_, _, p)| (p.table, p.bucket)).collect();
        let mut taken: HashMap<(u32, u8), BTreeSet<u32>> = HashMap::default();
        let slots = self.entries.values().map(|s| split(s.handle));
        for (table, bucket, id) in slots.chain(self.others.iter().copied()) {
            if buckets.contains(&(table, bucket)) {
                taken.entry((table, bucket)).or_default().insert(id);
            }
        }
        let mut new_slots = Vec::with_capacity(added.len());
        for (net, class, p) in added {
            let ids = taken.entry((p.table, p.bucket)).or_default();
            let id = (1..0xfff).find(|i| !ids.contains(i))?;
            ids.insert(id);
            let handle = p.table | (u32::from(p.bucket) << 12) | id;
            new_slots.push((
                net,
                Slot {
                    handle,
                    classid: class,
                    prio: p.prio,
                    seen: false,
                },
            ));
            ops.push(Op::AddFilter {
                prio: p.prio,
                protocol: p.protocol,
                filter: entry_filter(&net, class, p.table, p.bucket, id),
            });
        }
        Some(new_slots)
    }

    /// Records a delta the kernel acknowledged in full.
    pub fn commit(&mut self, d: Delta) {
        for net in &d.removed {
            self.entries.remove(net);
        }
        for (net, class) in d.changed {
            if let Some(s) = self.entries.get_mut(&net) {
                s.classid = class;
            }
        }
        self.filters = (self.filters + d.added.len()).saturating_sub(d.removed.len());
        self.entries.extend(d.added);
    }

    /// Hashed whitelist entries remembered.
    pub fn entries(&self) -> usize {
        self.entries.len()
    }
}

fn protocol_of(net: &IpNet) -> u16 {
    match net {
        IpNet::V4(_) => ETH_P_IP,
        IpNet::V6(_) => ETH_P_IPV6,
    }
}

fn entry_filter(net: &IpNet, classid: u32, table: u32, bucket: u8, id: u32) -> Filter {
    Filter {
        table: Table::User(table),
        bucket,
        id: Some(id),
        sel: entry_selector(net),
        classid: Some(classid),
        link: None,
        origin: Origin::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::diff_onto;
    use crate::engine::prepare;
    use crate::layout::{CLASS_PROTECTED, CLASS_WHITELIST};
    use crate::netlink::RootState;
    use crate::plan::{dst_keys, plan_host};

    fn target(whitelist: &[String], uplink: &str) -> Target {
        let g = egressguard_crds::load::parse_str(&format!(
            "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: t}}\nspec:\n  uplink: {{rate: {uplink}}}\n  throttle: {{rate: 1Mbit, destinations: [{{port: 443}}]}}\n  whitelist: [{}]\n",
            whitelist.join(", ")
        ))
        .expect("guard")
        .remove(0);
        Target::new("t", &g.spec, &[]).expect("valid")
    }

    /// /32s, /24s and /16s, IPv6 /48s and /128s; 80 /32s share their last
    /// byte (that bucket splits), and one /4 sits in the linear prio.
    fn list() -> Vec<String> {
        let mut v: Vec<String> = (0..80).map(|i| format!("198.{}.7.9/32", 18 + i)).collect();
        v.extend((0..200).map(|i| format!("203.0.{}.{}/32", i % 200, 1 + i % 250)));
        v.extend((0..100).map(|i| format!("100.{}.{}.0/24", 64 + i % 50, i)));
        v.extend((0..50).map(|i| format!("172.{}.0.0/16", 16 + i % 16 + 16 * (i / 16))));
        v.extend((0..40).map(|i| format!("2001:db8:{i:x}::/48")));
        v.extend((0..40).map(|i| format!("2001:db8:1:2::{:x}/128", i + 1)));
        v.push("64.0.0.0/4".into());
        v
    }

    fn observed(shape: Shape) -> Observed {
        Observed {
            root: if shape.root.is_some() {
                RootState::Owned
            } else {
                RootState::Default("noqueue".into())
            },
            shape,
            counters: vec![],
            root_counters: Default::default(),
            direct_packets: 0,
            hooks: vec![],
            local: vec![],
        }
    }

    /// What the kernel holds after `ops` on `tree` (root tables numbered
    /// 0x800 + n, as the kernel does).
    fn kernel(mut tree: Shape, ops: &[Op]) -> Shape {
        for op in ops {
            match op {
                Op::AddRoot { root, .. } => tree.root = Some(root.clone()),
                Op::PutClass(c) => {
                    tree.classes.retain(|o| o.classid != c.classid);
                    tree.classes.push(c.clone());
                }
                Op::PutLeaf(l) => {
                    tree.leaves.retain(|o| o.parent != l.parent);
                    tree.leaves.push(l.clone());
                }
                Op::AddTable {
                    prio,
                    protocol,
                    table,
                } => prio_mut(&mut tree, *prio, *protocol).tables.push(*table),
                Op::AddFilter {
                    prio,
                    protocol,
                    filter,
                } => {
                    let mut f = filter.clone();
                    f.origin = Origin::Unknown;
                    prio_mut(&mut tree, *prio, *protocol).filters.push(f);
                }
                Op::ChangeFilter {
                    prio,
                    handle,
                    filter,
                    ..
                } => {
                    let p = tree
                        .prios
                        .iter_mut()
                        .find(|p| p.prio == *prio)
                        .expect("prio");
                    let ph = p.clone();
                    let f = p
                        .filters
                        .iter_mut()
                        .find(|f| filter_handle(&ph, f) == *handle)
                        .expect("changed filter exists");
                    f.classid = filter.classid;
                }
                Op::DelFilter { prio, handle, .. } => {
                    let p = tree
                        .prios
                        .iter_mut()
                        .find(|p| p.prio == *prio)
                        .expect("prio");
                    let ph = p.clone();
                    let n = p.filters.len();
                    p.filters.retain(|f| filter_handle(&ph, f) != *handle);
                    assert_eq!(p.filters.len(), n - 1, "deleted filter {handle:#x} exists");
                }
                other => panic!("not expected here: {other:?}"),
            }
        }
        tree.prios.sort_by_key(|p| p.prio);
        tree
    }

    fn prio_mut(tree: &mut Shape, prio: u16, protocol: u16) -> &mut Prio {
        if !tree.prios.iter().any(|p| p.prio == prio) {
            let n = tree.prios.len() as u32;
            tree.prios.push(Prio {
                prio,
                protocol,
                root_handle: Some((0x800 + n) << 20),
                tables: vec![],
                filters: vec![],
            });
        }
        tree.prios
            .iter_mut()
            .find(|p| p.prio == prio)
            .expect("prio")
    }

    /// Installs `t` from nothing; what the kernel holds and what is remembered.
    fn install(t: &Target) -> (Shape, Written) {
        let before = observed(Shape::default());
        let (ops, filters) = prepare(&before, t, LeafChoice::Sfq, "eth0").expect("plan");
        let tree = kernel(Shape::default(), &ops);
        let plan = WhitelistPlan::new(&t.valid, &t.protected);
        let w = Written::after(7, &before, &ops, t, &plan, LeafChoice::Sfq, filters)
            .expect("remembered");
        (tree, w)
    }

    fn kinds(ops: &[Op]) -> Vec<&'static str> {
        ops.iter()
            .map(|o| match o {
                Op::AddFilter { .. } => "add",
                Op::ChangeFilter { .. } => "change",
                Op::DelFilter { .. } => "del",
                _ => "other",
            })
            .collect()
    }

    /// Only deletions and changes in whitelist prios are carried as such;
    /// a deleted prio or root is noted whatever it held.
    #[test]
    fn the_effects_of_a_pass_on_the_whitelist_prios() {
        let f = entry_filter(
            &"198.51.100.0/24".parse().expect("net"),
            0x00e9_0030,
            0x103 << 20,
            100,
            1,
        );
        let ops = [
            Op::DelFilter {
                prio: 13,
                protocol: ETH_P_IP,
                handle: 1,
            },
            Op::DelFilter {
                prio: 40,
                protocol: ETH_P_IP,
                handle: 2,
            },
            Op::ChangeFilter {
                prio: 13,
                protocol: ETH_P_IP,
                handle: 3,
                filter: f.clone(),
            },
            Op::ChangeFilter {
                prio: 40,
                protocol: ETH_P_IP,
                handle: 4,
                filter: f.clone(),
            },
            Op::DelPrio {
                prio: 40,
                protocol: ETH_P_IP,
            },
        ];
        let e = Effects::of(&ops);
        assert_eq!(e.deleted, HashSet::from_iter([(13, 1)]));
        assert_eq!(e.changed.keys().copied().collect::<Vec<_>>(), [(13, 3)]);
        assert_eq!(e.dead, BTreeSet::from([40]));
        assert!(!e.root_gone);
        assert!(Effects::of(&[Op::DelRoot]).root_gone);
    }

    #[test]
    fn selectors_read_back_as_the_networks_they_match() {
        for n in [
            "198.51.100.7/32",
            "198.51.100.0/24",
            "10.0.0.0/8",
            "2001:db8::/32",
            "2001:db8:1::/48",
            "2001:db8:1:2::/64",
            "2001:db8::1/128",
            "2001:db8:1:2:3::/80",
        ] {
            let net: IpNet = n.parse().expect("net");
            let proto = protocol_of(&net);
            assert_eq!(net_of(&entry_selector(&net), proto), Some(net), "{n}");
            assert_eq!(dst_keys(&net), entry_selector(&net).keys);
        }
        // Not an entry: a link's selector, or the other family's offsets.
        let link = crate::plan::l4_link(true, 6, 0x200 << 20);
        assert_eq!(net_of(&link.sel, ETH_P_IP), None);
        let v4: IpNet = "198.51.100.7/32".parse().expect("net");
        assert_eq!(net_of(&entry_selector(&v4), ETH_P_IPV6), None);
    }

    /// The remembered tree and the entry-set difference give what the full
    /// differ would: the kernel ends up holding exactly the new plan.
    #[test]
    fn a_one_entry_change_is_one_add_and_one_delete_against_the_remembered_tree() {
        let old = list();
        let t = target(&old, "20Mbit");
        let (tree, mut w) = install(&t);
        assert_eq!(w.filters(), tree.filter_count());
        assert_eq!(
            w.entries(),
            old.len() - 1,
            "every hashed entry (the /4 is linear)"
        );
        let light = observed(Shape {
            prios: vec![],
            ..tree.clone()
        });
        // Unchanged: nothing to send.
        let d = w.delta(&t, LeafChoice::Sfq, &light).expect("delta");
        assert!(d.ops.is_empty(), "{:?}", d.ops);
        w.commit(d);
        // One entry swapped (in the split bucket, and in an ordinary one).
        for (at, new) in [
            (3, "198.99.7.9/32"),
            (150, "203.1.2.3/32"),
            (300, "100.99.1.0/24"),
        ] {
            let mut list = old.clone();
            list[at] = new.to_string();
            let t2 = target(&list, "20Mbit");
            let mut w2 = w.clone();
            let d = w2.delta(&t2, LeafChoice::Sfq, &light).expect("delta");
            assert_eq!(kinds(&d.ops), ["add", "del"], "{new}");
            let after = kernel(tree.clone(), &d.ops);
            let want = plan_host(&t2.valid, &t2.protected, LeafChoice::Sfq, &[]);
            assert_eq!(diff_onto(&after, &want, false), vec![], "{new}");
            w2.commit(d);
            // And back: the remembered tree followed.
            let d = w2.delta(&t, LeafChoice::Sfq, &light).expect("delta");
            assert_eq!(kinds(&d.ops), ["add", "del"]);
            let back = kernel(after, &d.ops);
            let want = plan_host(&t.valid, &t.protected, LeafChoice::Sfq, &[]);
            assert_eq!(diff_onto(&back, &want, false), vec![]);
        }
        // A whitelisted network becoming protected changes its class in place.
        let mut t3 = t.clone();
        t3.protected.push(crate::plan::Protected {
            net: old[150].parse().expect("net"),
            reason: "kubernetes API endpoint".into(),
        });
        let d = w
            .clone()
            .delta(&t3, LeafChoice::Sfq, &light)
            .expect("delta");
        assert_eq!(kinds(&d.ops), ["change"]);
        let after = kernel(tree.clone(), &d.ops);
        let want = plan_host(&t3.valid, &t3.protected, LeafChoice::Sfq, &[]);
        assert_eq!(diff_onto(&after, &want, false), vec![]);
        assert!(
            matches!(&d.ops[0], Op::ChangeFilter { filter, .. } if filter.classid == Some(CLASS_PROTECTED))
        );
        assert_ne!(CLASS_PROTECTED, CLASS_WHITELIST);
    }

    /// Anything but hashed entries changing takes the full pass.
    #[test]
    fn what_the_remembered_tree_does_not_cover_reads_back() {
        let old = list();
        let t = target(&old, "20Mbit");
        let (tree, w) = install(&t);
        let light = observed(Shape {
            prios: vec![],
            ..tree.clone()
        });
        let none =
            |t: &Target, light: &Observed| w.clone().delta(t, LeafChoice::Sfq, light).is_none();
        assert!(!none(&t, &light));
        assert!(none(&target(&old, "30Mbit"), &light), "classes change");
        let mut more = old.clone();
        more.push("198.99.7.9/32".into());
        more.push("198.98.7.10/32".into());
        assert!(!none(&target(&more, "20Mbit"), &light), "entries added");
        let mut linear = old.clone();
        linear.push("32.0.0.0/4".into());
        assert!(none(&target(&linear, "20Mbit"), &light), "a linear entry");
        let few: Vec<String> = old.iter().skip(20).cloned().collect();
        assert!(
            none(&target(&few, "20Mbit"), &light),
            "a split bucket merges back"
        );
        let mut altered = light.clone();
        altered.shape.classes[1].rate += 1;
        assert!(none(&t, &altered), "a class differs in the kernel");
        let mut pfifo = light.clone();
        pfifo.shape.leaves.clear();
        assert!(none(&t, &pfifo), "leaves differ");
    }
}
