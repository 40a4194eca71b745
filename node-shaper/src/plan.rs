//! From a validated spec to the desired [`Shape`] of one interface. Pure.

use std::collections::BTreeSet;
use std::net::IpAddr;

use egressguard_crds::units::{Rate, Size};
use egressguard_crds::validate::{burst_ticks, ValidSpec};
use egressguard_crds::Protocol;
use ipnet::IpNet;

use crate::layout::*;
use crate::model::*;
use crate::ports;

/// Which leaf qdisc the kernel can give us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafChoice {
    /// `sfq perturb 10`, what production kernels have.
    Sfq,
    /// `pfifo`, when this kernel lacks `sch_sfq`.
    PfifoFallback,
}

/// SFQ's hash perturbation period, as in the incident's hand-typed script.
pub const SFQ_PERTURB: i32 = 10;
/// Smallest quantum: one full-size Ethernet frame.
const MIN_QUANTUM: u64 = 1514;
/// HTB's own upper clamp for computed quanta.
const MAX_QUANTUM: u64 = 200_000;
/// iproute2's default burst when none is given is rate/HZ + MTU; one MTU plus
/// one millisecond at rate keeps GSO bursts from starving low rates.
const MIN_BURST: u64 = 1600;

fn default_burst(rate: Rate) -> Size {
    Size::from_bytes(MIN_BURST.max(rate.bytes_per_sec() / 1000))
}

fn ticks(burst: Size, rate: Rate) -> u32 {
    // Validation rejected bursts that overflow; saturate rather than panic.
    burst_ticks(burst, rate)
        .and_then(|t| u32::try_from(t).ok())
        .unwrap_or(u32::MAX)
}

fn class(
    classid: u32,
    parent: u32,
    rate: Rate,
    ceil: Rate,
    burst: Option<Size>,
    prio: u32,
) -> Class {
    let b = burst.unwrap_or_else(|| default_burst(rate));
    let cb = burst.unwrap_or_else(|| default_burst(ceil));
    let quantum = (rate.bytes_per_sec() / u64::from(R2Q)).clamp(MIN_QUANTUM, MAX_QUANTUM);
    Class {
        classid,
        parent,
        rate: rate.bytes_per_sec(),
        ceil: ceil.bytes_per_sec(),
        buffer: ticks(b, rate),
        cbuffer: ticks(cb, ceil),
        quantum: quantum as u32,
        prio,
    }
}

/// What the throttle and the lanes leave of the uplink (`rest`, bit/s),
/// split into the whitelist's and the default class's guarantees: default
/// gets a tenth, at least min(1Mbit, half), enough for ARP, neighbour
/// discovery and the node's ordinary traffic; the whitelist the rest. So a
/// flood that lands in the default class (random unlisted ports) cannot hold
/// more than that tenth against a whitelisted flow: HTB serves a class below
/// its own rate before any class borrows, so an even split let such a flood
/// keep half of the rest whatever the priorities. The two always add up to
/// `rest` (at least 16 bit/s), so the children never exceed the uplink.
fn split_rest(rest: u64) -> (Rate, Rate) {
    let rest = rest.max(16);
    let def = (rest / 10).max((rest / 2).min(DEFAULT_FLOOR)).max(8);
    (
        Rate::from_bits_per_sec(rest - def),
        Rate::from_bits_per_sec(def),
    )
}

/// The default class's guarantee is at least this much (or half of what the
/// throttle and the lanes leave, when that is less).
const DEFAULT_FLOOR: u64 = 1_000_000;

/// The desired shape for a spec.
pub fn plan(spec: &ValidSpec, leaf: LeafChoice) -> Shape {
    plan_protected(spec, &[], leaf)
}

/// The desired shape for a spec plus destinations that are always
/// protected, with SSH replies matched from any source address.
pub fn plan_protected(spec: &ValidSpec, protected: &[Protected], leaf: LeafChoice) -> Shape {
    plan_host(spec, protected, leaf, &[])
}

/// The desired shape on an interface whose own addresses are `local`: SSH
/// replies are matched from those (TCP source port 22 and a source address
/// of the interface), as narrowly as u32 can tell SSH apart.
pub fn plan_host(
    spec: &ValidSpec,
    protected: &[Protected],
    leaf: LeafChoice,
    local: &[IpAddr],
) -> Shape {
    let mut shape = plan_skeleton(spec, leaf, local);
    shape
        .prios
        .extend(WhitelistPlan::new(spec, protected).prios());
    shape.prios.sort_by_key(|p| p.prio);
    shape
}

/// Everything [`plan_host`] plans but the whitelist prios (the root, the
/// classes, the leaves and every other prio): small, whatever the list.
pub fn plan_skeleton(spec: &ValidSpec, leaf: LeafChoice, local: &[IpAddr]) -> Shape {
    let up = spec.uplink_rate;
    // Children's rates must add up to at most the parent's, or HTB lets green
    // children exceed the uplink. The throttle and the two lanes keep their
    // own rates; of what they leave, the default class is guaranteed a small
    // share and the whitelist the rest, both allowed to borrow up to the
    // uplink (the whitelist first). Nothing goes to HTB's direct queue:
    // every packet is under the uplink and a class's ceiling.
    let (pl, ssh) = (spec.protected_lane, spec.ssh_lane);
    let rest = up
        .bits_per_sec()
        .saturating_sub(spec.throttle_rate.bits_per_sec())
        .saturating_sub(pl.rate.bits_per_sec())
        .saturating_sub(ssh.rate.bits_per_sec())
        .max(16);
    let (wl, def) = split_rest(rest);
    let classes = vec![
        class(CLASS_UPLINK, ROOT, up, up, spec.uplink_burst, 0),
        class(CLASS_PROTECTED, CLASS_UPLINK, pl.rate, pl.ceil, None, 0),
        class(CLASS_SSH, CLASS_UPLINK, ssh.rate, ssh.ceil, None, 1),
        class(CLASS_WHITELIST, CLASS_UPLINK, wl, up, spec.uplink_burst, 1),
        class(CLASS_DEFAULT, CLASS_UPLINK, def, up, spec.uplink_burst, 2),
        class(
            CLASS_THROTTLED,
            CLASS_UPLINK,
            spec.throttle_rate,
            spec.throttle_ceil,
            spec.throttle_burst,
            3,
        ),
    ];
    let sfq = leaf == LeafChoice::Sfq;
    let leaves = [
        CLASS_PROTECTED,
        CLASS_SSH,
        CLASS_WHITELIST,
        CLASS_DEFAULT,
        CLASS_THROTTLED,
    ]
    .into_iter()
    .map(|c| Leaf {
        handle: leaf_handle(c, sfq),
        parent: c,
        kind: if sfq {
            LeafKind::Sfq {
                perturb: SFQ_PERTURB,
            }
        } else {
            LeafKind::Pfifo
        },
    })
    .collect();
    let mut prios = protect_port_prios(spec);
    if spec.protect_ssh_replies {
        prios.extend(ssh_prios(local));
    }
    prios.extend(throttle_prios(spec));
    if spec.throttle_portless && !spec.destinations.is_empty() {
        prios.extend(portless_prios());
    }
    if spec.throttle_all {
        prios.extend(catch_all_prios());
    }
    Shape {
        root: Some(Root {
            handle: ROOT,
            defcls: DEFCLS,
            r2q: R2Q,
        }),
        classes,
        leaves,
        prios,
    }
}

/// Keys matching destination `net`: IPv4 dst at 16, IPv6 dst at 24..40.
pub fn dst_keys(net: &IpNet) -> Vec<Key> {
    let len = u32::from(net.prefix_len());
    match net.network() {
        IpAddr::V4(a) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            vec![Key {
                mask,
                val: u32::from(a) & mask,
                off: 16,
                offmask: 0,
            }]
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let mut keys = Vec::new();
            for w in 0..4u32 {
                let covered = len.saturating_sub(32 * w).min(32);
                if covered == 0 {
                    continue;
                }
                let mask = u32::MAX << (32 - covered);
                let word = (bits >> (96 - 32 * w)) as u32;
                keys.push(Key {
                    mask,
                    val: word & mask,
                    off: 24 + 4 * w as i32,
                    offmask: 0,
                });
            }
            if keys.is_empty() {
                // ::/0 matches everything; tc spells that `match u32 0 0`.
                keys.push(Key {
                    mask: 0,
                    val: 0,
                    off: 0,
                    offmask: 0,
                });
            }
            keys
        }
    }
}

/// The selector of a whitelist entry's filter: its destination, terminal.
pub fn entry_selector(net: &IpNet) -> Selector {
    terminal(dst_keys(net))
}

fn terminal(keys: Vec<Key>) -> Selector {
    Selector {
        flags: U32_TERMINAL,
        keys,
        ..Selector::default()
    }
}

/// The hash group an entry belongs to, or `None` for the linear group.
pub fn group_of(net: &IpNet) -> Option<HashGroup> {
    let groups: &[HashGroup] = match net {
        IpNet::V4(_) => &V4_GROUPS,
        IpNet::V6(_) => &V6_GROUPS,
    };
    groups
        .iter()
        .rev()
        .find(|g| net.prefix_len() >= g.min_len)
        .copied()
}

/// Word offset and mask the kernel hashes for a group (`hashkey mask M at O`).
pub fn hash_key(net_is_v4: bool, byte: usize) -> (i16, u32) {
    let base = if net_is_v4 { 16 } else { 24 };
    let word = base + (byte / 4) * 4;
    let shift = 8 * (3 - (byte % 4));
    (word as i16, 0xff << shift)
}

fn addr_byte(net: &IpNet, byte: usize) -> u8 {
    match net.network() {
        IpAddr::V4(a) => a.octets()[byte],
        IpAddr::V6(a) => a.octets()[byte],
    }
}

/// A node that matches every packet and continues in `to`, at the bucket
/// destination byte `byte` picks. After a miss there, u32 resumes after
/// this node (it is not terminal).
fn hash_link(table: Table, bucket: u8, v4: bool, byte: usize, to: u32) -> Filter {
    let (hoff, hmask) = hash_key(v4, byte);
    Filter {
        table,
        bucket,
        id: None,
        sel: Selector {
            hoff,
            hmask,
            keys: vec![Key {
                mask: 0,
                val: 0,
                off: 0,
                offmask: 0,
            }],
            ..Selector::default()
        },
        classid: None,
        link: Some(to),
        origin: Origin::Link("whitelist hash"),
    }
}

/// A destination that must never be throttled whatever the guard says
/// (the control plane, the other nodes), with the reason shown to users.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Protected {
    /// The network.
    pub net: IpNet,
    /// Why, e.g. `kubernetes API endpoint`.
    pub reason: String,
}

/// A prio of link filters (in its root table) and the port tables they link
/// to; `None` when there are no tables.
fn linked_prio(
    prio: u16,
    protocol: u16,
    tables: Vec<HashTable>,
    mut links: Vec<Filter>,
    port_filters: Vec<Filter>,
) -> Option<Prio> {
    if tables.is_empty() {
        return None;
    }
    links.extend(port_filters);
    Some(Prio {
        prio,
        protocol,
        root_handle: None,
        tables,
        filters: links,
    })
}

/// A node in a port table (keys relative to the transport header, after the
/// link's `eat`): destination ports `(value, mask)` go to `classid`.
fn port_filter(table: u32, (value, mask): (u16, u16), classid: u32, origin: Origin) -> Filter {
    Filter {
        table: Table::User(table),
        bucket: 0,
        id: None,
        sel: terminal(vec![Key {
            mask: u32::from(mask),
            val: u32::from(value),
            off: 0,
            offmask: 0,
        }]),
        classid: Some(classid),
        link: None,
        origin,
    }
}

/// `spec.protect` entries with ports: per entry, a link on destination and
/// protocol into its own table of destination-port blocks, each sent to
/// the protected lane. Entries are few (at most 16), so a linear walk is fine.
fn protect_port_prios(spec: &ValidSpec) -> Vec<Prio> {
    let mut prios = Vec::new();
    for v4 in [true, false] {
        let (prio, protocol) = if v4 {
            (PRIO_V4_PROTECT_PORTS, ETH_P_IP)
        } else {
            (PRIO_V6_PROTECT_PORTS, ETH_P_IPV6)
        };
        let mut tables = Vec::new();
        let mut links = Vec::new();
        let mut port_filters = Vec::new();
        for (i, p) in spec.protect_ports.iter().enumerate() {
            if p.net.network().is_ipv4() != v4 {
                continue;
            }
            let table = table_protect_ports(i);
            tables.push(HashTable {
                handle: table,
                divisor: 1,
            });
            for (proto, wants) in [
                (IPPROTO_TCP, [Protocol::Tcp, Protocol::Any]),
                (IPPROTO_UDP, [Protocol::Udp, Protocol::Any]),
            ] {
                if !wants.contains(&p.protocol) {
                    continue;
                }
                let mut link = l4_link(v4, proto, table);
                // The destination is matched before the link's `eat`, at its
                // fixed offset in the IP header.
                link.sel.keys.extend(dst_keys(&p.net));
                link.origin = Origin::Link("protected ports");
                links.push(link);
            }
            for block in ports::blocks(p.first, p.last) {
                port_filters.push(port_filter(
                    table,
                    block,
                    CLASS_PROTECTED,
                    Origin::ProtectedPort(p.index),
                ));
            }
        }
        prios.extend(linked_prio(prio, protocol, tables, links, port_filters));
    }
    prios
}

/// SSH replies (TCP from source port 22) go to the SSH lane, whose guarantee
/// no flood takes, so no guard can lock people out of the node. Any local
/// process may send from port 22 (a pod may bind it without privileges), so
/// the lane has a ceiling: it is a guarantee, not a way around the throttle.
///
/// With the interface's addresses known, a link per address (its source
/// address, TCP, first fragment) leads to the port-22 table; a family with
/// no address, or more than [`MAX_SSH_SOURCES`], matches any source.
fn ssh_prios(local: &[IpAddr]) -> Vec<Prio> {
    [
        (true, PRIO_V4_SSH, ETH_P_IP, TABLE_V4_SSH),
        (false, PRIO_V6_SSH, ETH_P_IPV6, TABLE_V6_SSH),
    ]
    .into_iter()
    .map(|(v4, prio, protocol, table)| {
        let own: Vec<&IpAddr> = local.iter().filter(|a| a.is_ipv4() == v4).collect();
        let mut links: Vec<Filter> = Vec::new();
        if own.is_empty() || own.len() > MAX_SSH_SOURCES {
            let mut link = l4_link(v4, IPPROTO_TCP, table);
            link.origin = Origin::Link("tcp source ports");
            links.push(link);
        } else {
            for a in own {
                let mut link = l4_link(v4, IPPROTO_TCP, table);
                link.sel.keys.extend(src_keys(a));
                link.origin = Origin::Link("tcp source ports of this interface's addresses");
                links.push(link);
            }
        }
        links.push(Filter {
            table: Table::User(table),
            bucket: 0,
            id: None,
            sel: terminal(vec![Key {
                mask: 0xffff_0000,
                val: 22 << 16,
                off: 0,
                offmask: 0,
            }]),
            classid: Some(CLASS_SSH),
            link: None,
            origin: Origin::SshReplies,
        });
        Prio {
            prio,
            protocol,
            root_handle: None,
            tables: vec![HashTable {
                handle: table,
                divisor: 1,
            }],
            filters: links,
        }
    })
    .collect()
}

/// More addresses than this on one interface (an IPVS dummy holds every
/// ClusterIP) would make every TCP packet walk that many links: SSH replies
/// are then matched from any source.
pub const MAX_SSH_SOURCES: usize = 16;

/// Keys matching source address `a` exactly: IPv4 src at 12, IPv6 src at 8..24.
fn src_keys(a: &IpAddr) -> Vec<Key> {
    let words: Vec<u32> = match a {
        IpAddr::V4(v) => vec![u32::from(*v)],
        IpAddr::V6(v) => v
            .octets()
            .chunks(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    let base = if a.is_ipv4() { 12 } else { 8 };
    words
        .into_iter()
        .enumerate()
        .map(|(i, w)| Key {
            mask: u32::MAX,
            val: w,
            off: base + 4 * i as i32,
            offmask: 0,
        })
        .collect()
}

/// Where a whitelist entry goes: the linear prio of its family, or a hash group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// The family's linear prio (IPv4 shorter than /8, IPv6 shorter than /16).
    Linear,
    /// A hash group, by index in [`V4_GROUPS`] or [`V6_GROUPS`].
    Hashed(u8),
}

/// The filter slot of a hashed whitelist entry: prio, ethertype, table, bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Place {
    /// Filter prio.
    pub prio: u16,
    /// Ethertype.
    pub protocol: u16,
    /// User table handle.
    pub table: u32,
    /// Bucket in it.
    pub bucket: u8,
}

/// The shape of the whitelist prios apart from the entries themselves: the
/// linear prios' entries (few) and, per non-empty hash group, which buckets
/// split or spill. Two whitelists with the same layout have the same tables
/// and link filters, so they differ only in entry filters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Entries of the linear prios with their class, in plan order.
    pub linear: Vec<(IpNet, u32)>,
    /// (prio, buckets that split, buckets that spill) of each non-empty group.
    pub groups: Vec<(u16, [u64; 4], [u64; 4])>,
}

/// The whitelist-class entries of a spec (protected first, then the user's;
/// a network listed twice counts at its first mention), planned without
/// copying the list: one pass counts, each prio is built on demand.
pub struct WhitelistPlan<'a> {
    spec: &'a ValidSpec,
    protected: &'a [Protected],
    groups: Vec<std::sync::Arc<str>>,
    /// Per entry (protected, then whitelist): its family (bit 7: IPv4) and
    /// group (low bits; [`LINEAR`]), or [`DUPLICATE`].
    slot: Vec<u8>,
    /// Entries per bucket of each group: IPv4 groups, then IPv6 groups.
    counts: Vec<[u32; 256]>,
}

const DUPLICATE: u8 = 0xff;
const LINEAR: u8 = 0x0f;
const V4: u8 = 0x80;

impl<'a> WhitelistPlan<'a> {
    /// One pass over the entries: duplicates, groups, bucket counts.
    pub fn new(spec: &'a ValidSpec, protected: &'a [Protected]) -> WhitelistPlan<'a> {
        let mut seen = crate::hashing::FastSet::with_capacity_and_hasher(
            protected.len() + spec.whitelist.len(),
            Default::default(),
        );
        let mut counts = vec![[0u32; 256]; V4_GROUPS.len() + V6_GROUPS.len()];
        let nets = protected
            .iter()
            .map(|p| p.net.trunc())
            .chain(spec.whitelist.iter().map(|e| e.net));
        let slot = nets
            .map(|net| {
                if !seen.insert(net) {
                    return DUPLICATE;
                }
                let fam = if net.network().is_ipv4() { V4 } else { 0 };
                match group_index(&net) {
                    Some(gi) => {
                        let g = group_at(fam == V4, gi);
                        counts[count_index(fam == V4, gi)][usize::from(addr_byte(&net, g.byte))] +=
                            1;
                        fam | gi
                    }
                    None => fam | LINEAR,
                }
            })
            .collect();
        WhitelistPlan {
            spec,
            protected,
            groups: spec.groups.iter().map(|g| g.as_str().into()).collect(),
            slot,
            counts,
        }
    }

    /// Entries kept (first mentions).
    pub fn len(&self) -> usize {
        self.slot.iter().filter(|s| **s != DUPLICATE).count()
    }

    /// No entries at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn net(&self, i: usize) -> IpNet {
        match self.protected.get(i) {
            Some(p) => p.net.trunc(),
            None => self.spec.whitelist[i - self.protected.len()].net,
        }
    }

    fn origin(&self, i: usize) -> Origin {
        if i < self.protected.len() {
            return Origin::Protected(i);
        }
        let e = &self.spec.whitelist[i - self.protected.len()];
        Origin::Whitelist {
            group: e.group.and_then(|g| self.groups.get(g as usize).cloned()),
            index: e.index,
        }
    }

    /// The class an entry's filter classifies into.
    fn class(&self, i: usize) -> u32 {
        if i < self.protected.len() {
            CLASS_PROTECTED
        } else {
            CLASS_WHITELIST
        }
    }

    /// Every entry (first mentions only): network, class and group.
    pub fn entries(&self) -> impl Iterator<Item = (IpNet, u32, Group)> + '_ {
        self.slot
            .iter()
            .enumerate()
            .filter(|(_, s)| **s != DUPLICATE)
            .map(|(i, &s)| {
                let g = match s & !V4 {
                    LINEAR => Group::Linear,
                    gi => Group::Hashed(gi),
                };
                (self.net(i), self.class(i), g)
            })
    }

    fn splits(&self, v4: bool, gi: u8, b: u8) -> bool {
        let g = group_at(v4, gi);
        g.split != 0 && self.counts[count_index(v4, gi)][usize::from(b)] as usize > SPLIT_AT
    }

    fn spills(&self, v4: bool, gi: u8, b: u8) -> bool {
        let g = group_at(v4, gi);
        g.spill != 0 && self.counts[count_index(v4, gi)][usize::from(b)] as usize > SPILL_AT
    }

    /// Where a hashed entry's filter goes (group `gi` of its family).
    pub fn place(&self, net: &IpNet, gi: u8) -> Place {
        let v4 = net.network().is_ipv4();
        let g = group_at(v4, gi);
        let first = addr_byte(net, g.byte);
        let (table, bucket) = if self.splits(v4, gi, first) {
            (g.split_table(first), addr_byte(net, g.byte - 1))
        } else if self.spills(v4, gi, first) {
            (g.spill, addr_byte(net, g.byte - 1))
        } else {
            (g.table, first)
        };
        Place {
            prio: g.prio,
            protocol: if v4 { ETH_P_IP } else { ETH_P_IPV6 },
            table,
            bucket,
        }
    }

    /// The layout of the whitelist prios (see [`Layout`]).
    pub fn layout(&self) -> Layout {
        let mut out = Layout::default();
        for (i, &s) in self.slot.iter().enumerate() {
            if s != DUPLICATE && s & !V4 == LINEAR {
                out.linear.push((self.net(i), self.class(i)));
            }
        }
        for v4 in [true, false] {
            let n = if v4 { V4_GROUPS.len() } else { V6_GROUPS.len() };
            for gi in 0..n as u8 {
                if self.counts[count_index(v4, gi)].iter().all(|c| *c == 0) {
                    continue;
                }
                let (mut split, mut spill) = ([0u64; 4], [0u64; 4]);
                for b in 0..=255u8 {
                    if self.splits(v4, gi, b) {
                        split[usize::from(b >> 6)] |= 1 << (b & 63);
                    }
                    if self.spills(v4, gi, b) {
                        spill[usize::from(b >> 6)] |= 1 << (b & 63);
                    }
                }
                out.groups.push((group_at(v4, gi).prio, split, spill));
            }
        }
        out
    }

    /// The whitelist prios, ascending, each built when asked for.
    pub fn prios(&self) -> impl Iterator<Item = Prio> + '_ {
        let v4 = (0..V4_GROUPS.len() as u8).map(|g| (true, Group::Hashed(g)));
        let v6 = (0..V6_GROUPS.len() as u8).map(|g| (false, Group::Hashed(g)));
        std::iter::once((true, Group::Linear))
            .chain(v4)
            .chain(std::iter::once((false, Group::Linear)))
            .chain(v6)
            .filter_map(|(v4, g)| self.prio(v4, g))
    }

    fn members(&self, v4: bool, g: Group) -> impl Iterator<Item = usize> + '_ {
        let want = (if v4 { V4 } else { 0 })
            | match g {
                Group::Linear => LINEAR,
                Group::Hashed(gi) => gi,
            };
        self.slot
            .iter()
            .enumerate()
            .filter(move |(_, s)| **s == want)
            .map(|(i, _)| i)
    }

    fn entry_filter(&self, i: usize, table: Table, bucket: u8) -> Filter {
        Filter {
            table,
            bucket,
            id: None,
            sel: terminal(dst_keys(&self.net(i))),
            classid: Some(self.class(i)),
            link: None,
            origin: self.origin(i),
        }
    }

    fn prio(&self, v4: bool, g: Group) -> Option<Prio> {
        let proto = if v4 { ETH_P_IP } else { ETH_P_IPV6 };
        let gi = match g {
            Group::Linear => {
                let linear: Vec<Filter> = self
                    .members(v4, g)
                    .map(|i| self.entry_filter(i, Table::Root, 0))
                    .collect();
                return (!linear.is_empty()).then(|| Prio {
                    prio: if v4 {
                        PRIO_V4_WHITELIST
                    } else {
                        PRIO_V6_WHITELIST
                    },
                    protocol: proto,
                    root_handle: None,
                    tables: vec![],
                    filters: linear,
                });
            }
            Group::Hashed(gi) => gi,
        };
        let g = group_at(v4, gi);
        let count = self.counts[count_index(v4, gi)]
            .iter()
            .map(|c| *c as usize)
            .sum::<usize>();
        if count == 0 {
            return None;
        }
        // A long bucket moves whole into a second-level table behind one
        // link filter: its own (split, to keep walks short) or, in groups
        // that do not split, the group's spill table (only when too full
        // for u32's 12-bit node ids). Both second levels are keyed on the
        // byte before (always covered by the prefix too).
        let mut tables = vec![HashTable {
            handle: g.table,
            divisor: 256,
        }];
        for b in (0..=255u8).filter(|b| self.splits(v4, gi, *b)) {
            tables.push(HashTable {
                handle: g.split_table(b),
                divisor: 256,
            });
        }
        if (0..=255u8).any(|b| self.spills(v4, gi, b)) {
            tables.push(HashTable {
                handle: g.spill,
                divisor: 256,
            });
        }
        let mut nodes = Vec::with_capacity(count + 257);
        nodes.push(hash_link(Table::Root, 0, v4, g.byte, g.table));
        nodes.extend(self.members(v4, Group::Hashed(gi)).map(|i| {
            let p = self.place(&self.net(i), gi);
            self.entry_filter(i, Table::User(p.table), p.bucket)
        }));
        nodes.extend((0..=255u8).filter_map(|b| {
            let to = if self.splits(v4, gi, b) {
                g.split_table(b)
            } else if self.spills(v4, gi, b) {
                g.spill
            } else {
                return None;
            };
            Some(hash_link(Table::User(g.table), b, v4, g.byte - 1, to))
        }));
        Some(Prio {
            prio: g.prio,
            protocol: proto,
            root_handle: None,
            tables,
            filters: nodes,
        })
    }
}

fn group_index(net: &IpNet) -> Option<u8> {
    let groups: &[HashGroup] = match net {
        IpNet::V4(_) => &V4_GROUPS,
        IpNet::V6(_) => &V6_GROUPS,
    };
    groups
        .iter()
        .rposition(|g| net.prefix_len() >= g.min_len)
        .map(|i| i as u8)
}

fn group_at(v4: bool, gi: u8) -> HashGroup {
    if v4 {
        V4_GROUPS[usize::from(gi)]
    } else {
        V6_GROUPS[usize::from(gi)]
    }
}

fn count_index(v4: bool, gi: u8) -> usize {
    if v4 {
        usize::from(gi)
    } else {
        V4_GROUPS.len() + usize::from(gi)
    }
}

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// The node in a prio's root table that sends TCP or UDP packets to a port table.
///
/// IPv4: matches the protocol and "not a later fragment" (only first fragments
/// carry ports), then moves past the header using IHL so IP options are handled
/// (`offset at 0 mask 0x0f00 shift 6 eat`). IPv6: next header, fixed 40 bytes
/// (packets with extension headers before TCP/UDP are not matched).
pub fn l4_link(v4: bool, ipproto: u32, table: u32) -> Filter {
    let sel = if v4 {
        Selector {
            flags: U32_VAROFFSET | U32_EAT,
            offshift: 6,
            offmask: 0x0f00,
            keys: vec![
                Key {
                    mask: 0x00ff_0000,
                    val: ipproto << 16,
                    off: 8,
                    offmask: 0,
                },
                Key {
                    mask: 0x0000_1fff,
                    val: 0,
                    off: 4,
                    offmask: 0,
                },
            ],
            ..Selector::default()
        }
    } else {
        Selector {
            flags: U32_OFFSET | U32_EAT,
            off: 40,
            keys: vec![Key {
                mask: 0x0000_ff00,
                val: ipproto << 8,
                off: 4,
                offmask: 0,
            }],
            ..Selector::default()
        }
    };
    Filter {
        table: Table::Root,
        bucket: 0,
        id: None,
        sel,
        classid: None,
        link: Some(table),
        origin: Origin::Link(if ipproto == IPPROTO_TCP {
            "tcp ports"
        } else {
            "udp ports"
        }),
    }
}

/// IPv6 next-header values that can stand between the fixed header and
/// TCP/UDP (hop-by-hop, routing, fragment, ESP, AH, destination options,
/// mobility, HIP, shim6): behind them the port is out of a fixed-offset
/// match's reach.
pub const IPV6_EXTENSION_HEADERS: [u32; 9] = [0, 43, 44, 50, 51, 60, 135, 139, 140];

/// Packets a port rule cannot see go to the throttled class. They come after
/// the whitelist prios, so whitelisted and protected destinations keep them.
///
/// IPv4: one node per bit of the 13-bit fragment offset (u32 keys only test
/// equality under a mask, so "offset != 0" is thirteen single-bit matches;
/// order-independent, and a first fragment never matches). IPv6: one node per
/// extension header type in the next-header byte.
fn portless_prios() -> Vec<Prio> {
    let node = |key: Key, what: &'static str| Filter {
        table: Table::Root,
        bucket: 0,
        id: None,
        sel: terminal(vec![key]),
        classid: Some(CLASS_THROTTLED),
        link: None,
        origin: Origin::Portless(what),
    };
    let v4 = (0..13)
        .map(|bit| {
            node(
                Key {
                    mask: 1 << bit,
                    val: 1 << bit,
                    off: 4,
                    offmask: 0,
                },
                "later ipv4 fragment",
            )
        })
        .collect();
    let v6 = IPV6_EXTENSION_HEADERS
        .iter()
        .map(|nh| {
            node(
                Key {
                    mask: 0x0000_ff00,
                    val: nh << 8,
                    off: 4,
                    offmask: 0,
                },
                "ipv6 extension header",
            )
        })
        .collect();
    vec![
        Prio {
            prio: PRIO_V4_PORTLESS,
            protocol: ETH_P_IP,
            root_handle: None,
            tables: vec![],
            filters: v4,
        },
        Prio {
            prio: PRIO_V6_PORTLESS,
            protocol: ETH_P_IPV6,
            root_handle: None,
            tables: vec![],
            filters: v6,
        },
    ]
}

/// A quarantine's `AllButWhitelisted`: every IPv4 and IPv6 packet that no
/// earlier prio classified (whitelist, protected, SSH) goes to the throttled
/// class, whatever its port or protocol. IPv6 neighbour discovery (ICMPv6
/// 133-137) stays in the default class first: without it the node loses its
/// neighbours, the control plane included. ARP is neither protocol and is
/// never matched here.
fn catch_all_prios() -> Vec<Prio> {
    let every = Key {
        mask: 0,
        val: 0,
        off: 0,
        offmask: 0,
    };
    let to_throttled = |keys: Vec<Key>, what: &'static str| Filter {
        table: Table::Root,
        bucket: 0,
        id: None,
        sel: terminal(keys),
        classid: Some(CLASS_THROTTLED),
        link: None,
        origin: Origin::Quarantine(what),
    };
    let mut v6: Vec<Filter> = (133u32..=137)
        .map(|icmp_type| Filter {
            classid: Some(CLASS_DEFAULT),
            ..to_throttled(
                vec![
                    Key {
                        mask: 0x0000_ff00,
                        val: IPPROTO_ICMPV6 << 8,
                        off: 4,
                        offmask: 0,
                    },
                    Key {
                        mask: 0xff00_0000,
                        val: icmp_type << 24,
                        off: 40,
                        offmask: 0,
                    },
                ],
                "ipv6 neighbour discovery",
            )
        })
        .collect();
    v6.push(to_throttled(vec![every], "every other ipv6 packet"));
    vec![
        Prio {
            prio: PRIO_V4_ALL,
            protocol: ETH_P_IP,
            root_handle: None,
            tables: vec![],
            filters: vec![to_throttled(vec![every], "every other ipv4 packet")],
        },
        Prio {
            prio: PRIO_V6_ALL,
            protocol: ETH_P_IPV6,
            root_handle: None,
            tables: vec![],
            filters: v6,
        },
    ]
}

const IPPROTO_ICMPV6: u32 = 58;

fn throttle_prios(spec: &ValidSpec) -> Vec<Prio> {
    let mut prios = Vec::new();
    for v4 in [true, false] {
        let (prio, protocol, tcp_t, udp_t) = if v4 {
            (PRIO_V4_THROTTLE, ETH_P_IP, TABLE_V4_TCP, TABLE_V4_UDP)
        } else {
            (PRIO_V6_THROTTLE, ETH_P_IPV6, TABLE_V6_TCP, TABLE_V6_UDP)
        };
        let mut tables = Vec::new();
        let mut links = Vec::new();
        let mut port_filters = Vec::new();
        for (proto, table, wants) in [
            (IPPROTO_TCP, tcp_t, [Protocol::Tcp, Protocol::Any]),
            (IPPROTO_UDP, udp_t, [Protocol::Udp, Protocol::Any]),
        ] {
            let mut seen = BTreeSet::new();
            let mut nodes = Vec::new();
            for d in spec
                .destinations
                .iter()
                .filter(|d| wants.contains(&d.protocol))
            {
                for block in ports::blocks(d.first, d.last) {
                    if !seen.insert(block) {
                        continue;
                    }
                    nodes.push(port_filter(
                        table,
                        block,
                        CLASS_THROTTLED,
                        Origin::Destination(d.index),
                    ));
                }
            }
            if nodes.is_empty() {
                continue;
            }
            tables.push(HashTable {
                handle: table,
                divisor: 1,
            });
            links.push(l4_link(v4, proto, table));
            port_filters.extend(nodes);
        }
        prios.extend(linked_prio(prio, protocol, tables, links, port_filters));
    }
    prios
}
