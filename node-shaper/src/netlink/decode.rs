//! Reading an interface's tc state back from the kernel into a [`Shape`],
//! with per-class counters.

use std::io;

use netlink_packet_core::Nla;
use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage, TcOption, TcStats2};
use netlink_packet_route::RouteNetlinkMessage;
use serde::Serialize;

use super::encode::TC_H_ROOT;
use super::socket::Netlink;
use crate::layout::ROOT;
use crate::model::*;

/// Who owns the root qdisc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootState {
    /// The device default (handle 0: noqueue, pfifo_fast, fq_codel, mq...).
    Default(String),
    /// Ours (`htb e9:`).
    Owned,
    /// Somebody else's root qdisc.
    Foreign {
        /// Its kind.
        kind: String,
        /// Its handle.
        handle: u32,
    },
}

/// Counters of one class (HTB's STATS2), like `tc -s class show`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Bytes sent, Ethernet header included.
    pub bytes: u64,
    /// Packets sent (GSO segments counted separately).
    pub packets: u64,
    /// Packets dropped.
    pub drops: u32,
    /// Times the class was over its rate.
    pub overlimits: u32,
    /// Bytes queued now.
    pub backlog: u32,
    /// Packets queued now.
    pub qlen: u32,
}

/// Everything read from one interface.
#[derive(Clone, Debug)]
pub struct Observed {
    /// Root ownership.
    pub root: RootState,
    /// Our tree (empty unless `root` is `Owned`).
    pub shape: Shape,
    /// Counters per class id.
    pub counters: Vec<(u32, Counters)>,
    /// Counters of the root qdisc (bytes through the interface's shaper).
    pub root_counters: Counters,
    /// Packets HTB sent through its direct queue (`direct_packets_stat`):
    /// no filter of ours classifies there, so any are a bypass of every
    /// class (a socket priority set to `e9:0`, or a filter someone added).
    pub direct_packets: u32,
    /// Hooks on the interface that run before the root qdisc and can send
    /// packets around it (a clsact's egress filters) or that someone added
    /// next to it (an ingress or clsact qdisc). Never ours.
    pub hooks: Vec<Hook>,
    /// The interface's own addresses: where its SSH replies come from.
    pub local: Vec<std::net::IpAddr>,
}

/// The addresses of interface `ifindex`, host-scoped ones excluded.
pub fn local_addresses(nl: &mut Netlink, ifindex: i32) -> io::Result<Vec<std::net::IpAddr>> {
    use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
    let mut out = Vec::new();
    for m in nl.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))? {
        let RouteNetlinkMessage::NewAddress(a) = m else {
            continue;
        };
        if i64::from(a.header.index) != i64::from(ifindex) || a.header.scope == AddressScope::Host {
            continue;
        }
        // IFA_LOCAL is the local end on point-to-point links, where
        // IFA_ADDRESS is the peer; elsewhere they are the same.
        let local = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = local.or(address) {
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A tc hook on an interface that node-shaper did not create.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Hook {
    /// A `clsact` qdisc: its egress filters run before the root qdisc.
    Clsact,
    /// An `ingress` qdisc (ingress only; reported, it cannot bypass egress).
    Ingress,
    /// A filter on the clsact egress hook: it sees every packet before HTB
    /// and may redirect or drop it (`tc filter add dev X egress ...`).
    EgressFilter {
        /// Classifier kind (`bpf`, `u32`, `matchall`...).
        classifier: String,
        /// Its prio.
        prio: u16,
    },
}

impl Hook {
    /// Can it send packets around the HTB root? Only a filter on the egress
    /// hook can; a clsact or ingress qdisc alone cannot (CNIs leave them on
    /// every node), so those are reported, not counted as tampering.
    pub fn can_bypass(&self) -> bool {
        matches!(self, Hook::EgressFilter { .. })
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hook::Clsact => f.write_str("clsact qdisc"),
            Hook::Ingress => f.write_str("ingress qdisc"),
            Hook::EgressFilter { classifier, prio } => write!(
                f,
                "{classifier} filter prio {prio} on the clsact egress hook (runs before the HTB root; can send packets around it)"
            ),
        }
    }
}

/// `TC_H_INGRESS`/`TC_H_CLSACT`: the parent of ingress and clsact qdiscs.
const TC_H_CLSACT: u32 = 0xffff_fff1;
/// `TC_H_MIN_EGRESS` under clsact: the parent of egress-hook filters.
const CLSACT_EGRESS: u32 = 0xffff_fff3;

/// The clsact/ingress qdiscs among `qdiscs`, and the egress filters of a clsact.
fn hooks(nl: &mut Netlink, ifindex: i32, qdiscs: &[TcMessage]) -> io::Result<Vec<Hook>> {
    let mut out = Vec::new();
    for q in qdiscs {
        if u32::from(q.header.parent) != TC_H_CLSACT {
            continue;
        }
        match kind_of(&q.attributes).as_str() {
            "clsact" => {
                out.push(Hook::Clsact);
                let mut req = TcMessage::with_index(ifindex);
                req.header.parent = TcHandle::from(CLSACT_EGRESS);
                for m in nl.dump(RouteNetlinkMessage::GetTrafficFilter(req))? {
                    if let RouteNetlinkMessage::NewTrafficFilter(f) = m {
                        let hook = Hook::EgressFilter {
                            classifier: kind_of(&f.attributes),
                            prio: (f.header.info >> 16) as u16,
                        };
                        // A filter shows once per handle; one line per prio is enough.
                        if !out.contains(&hook) {
                            out.push(hook);
                        }
                    }
                }
            }
            _ => out.push(Hook::Ingress),
        }
    }
    Ok(out)
}

fn kind_of(attrs: &[TcAttribute]) -> String {
    attrs
        .iter()
        .find_map(|a| match a {
            TcAttribute::Kind(k) => Some(k.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// The raw TCA_OPTIONS payload of a kind netlink-packet-route does not know.
fn raw_options(attrs: &[TcAttribute]) -> Option<Vec<u8>> {
    attrs.iter().find_map(|a| match a {
        TcAttribute::Options(opts) => opts.iter().find_map(|o| match o {
            TcOption::Other(nla) => {
                let mut v = vec![0u8; nla.value_len()];
                nla.emit_value(&mut v);
                Some(v)
            }
            _ => None,
        }),
        _ => None,
    })
}

/// Walks a buffer of netlink attributes.
fn attrs(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= buf.len() {
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & 0x3fff;
        if len < 4 || off + len > buf.len() {
            break;
        }
        out.push((kind, &buf[off + 4..off + len]));
        off += (len + 3) & !3;
    }
    out
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .map_or(0, |s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_of(b: &[u8]) -> Option<u64> {
    let s: [u8; 8] = b.get(0..8)?.try_into().ok()?;
    Some(u64::from_ne_bytes(s))
}

fn counters(attrs: &[TcAttribute]) -> Counters {
    let mut c = Counters::default();
    for a in attrs {
        if let TcAttribute::Stats2(stats) = a {
            for s in stats {
                match s {
                    TcStats2::Basic(b) => {
                        c.bytes = b.bytes;
                        c.packets = u64::from(b.packets);
                    }
                    TcStats2::Queue(q) => {
                        c.drops = q.drops;
                        c.overlimits = q.overlimits;
                        c.backlog = q.backlog;
                        c.qlen = q.qlen;
                    }
                    _ => {}
                }
            }
        }
    }
    c
}

fn decode_class(msg: &TcMessage) -> Option<Class> {
    let opts = raw_options(&msg.attributes)?;
    let mut rate64 = None;
    let mut ceil64 = None;
    let mut parms = None;
    for (kind, v) in attrs(&opts) {
        match kind {
            1 => parms = Some(v),
            6 => rate64 = u64_of(v),
            7 => ceil64 = u64_of(v),
            _ => {}
        }
    }
    let p = parms?;
    if p.len() < 44 {
        return None;
    }
    Some(Class {
        classid: u32::from(msg.header.handle),
        // Root classes report TC_H_ROOT as parent; we name the qdisc.
        parent: match u32::from(msg.header.parent) {
            TC_H_ROOT => ROOT,
            p => p,
        },
        rate: rate64.unwrap_or(u64::from(u32_at(p, 8))),
        ceil: ceil64.unwrap_or(u64::from(u32_at(p, 20))),
        buffer: u32_at(p, 24),
        cbuffer: u32_at(p, 28),
        quantum: u32_at(p, 32),
        prio: u32_at(p, 40),
    })
}

/// The HTB classes of `ifindex` with their counters (one class dump).
fn dump_classes(nl: &mut Netlink, ifindex: i32) -> io::Result<Vec<(Class, Counters)>> {
    let mut req = TcMessage::with_index(ifindex);
    req.header.parent = TcHandle::from(0);
    let mut out = Vec::new();
    for m in nl.dump(RouteNetlinkMessage::GetTrafficClass(req))? {
        if let RouteNetlinkMessage::NewTrafficClass(c) = m {
            if kind_of(&c.attributes) == "htb" {
                if let Some(class) = decode_class(&c) {
                    out.push((class, counters(&c.attributes)));
                }
            }
        }
    }
    Ok(out)
}

/// An HTB root's `struct tc_htb_glob { version, rate2quantum, defcls, debug,
/// direct_pkts }` (TCA_HTB_INIT), empty when absent.
fn htb_glob(q: &TcMessage) -> Vec<u8> {
    let init = raw_options(&q.attributes).unwrap_or_default();
    attrs(&init)
        .into_iter()
        .find(|(k, _)| *k == 2)
        .map(|(_, v)| v.to_vec())
        .unwrap_or_default()
}

/// HTB's direct-queue counter of our root on `ifindex` (0 without our
/// root), from the qdisc dump alone: the baseline after a pass that wrote,
/// since a tree being built sends packets there until its default class exists.
pub fn direct_packets(nl: &mut Netlink, ifindex: i32) -> io::Result<u32> {
    for m in nl.dump(RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()))? {
        let RouteNetlinkMessage::NewQueueDiscipline(q) = m else {
            continue;
        };
        if q.header.index != ifindex
            || u32::from(q.header.parent) != TC_H_ROOT
            || u32::from(q.header.handle) != ROOT
        {
            continue;
        }
        return Ok(u32_at(&htb_glob(&q), 16));
    }
    Ok(0)
}

/// Counters per class id, without reading qdiscs or filters: what a periodic
/// status or metrics refresh needs, at a fraction of a full `observe`.
pub fn class_counters(nl: &mut Netlink, ifindex: i32) -> io::Result<Vec<(u32, Counters)>> {
    Ok(dump_classes(nl, ifindex)?
        .into_iter()
        .map(|(c, k)| (c.classid, k))
        .collect())
}

/// Whose root this is. Handle 0 is the kernel's default (noqueue,
/// pfifo_fast, fq_codel, or mq on a multi-queue NIC) and may be replaced —
/// unless it is an mq whose per-queue children someone configured (a child
/// with a handle of its own: `tc qdisc replace dev X parent :1 handle 10: fq`):
/// that is someone's setup, foreign like any other. `children` are
/// (parent, handle) of the non-root qdiscs.
pub fn root_state(kind: &str, handle: u32, children: &[(u32, u32)]) -> RootState {
    let customised_mq = kind == "mq"
        && children
            .iter()
            .any(|&(parent, h)| parent >> 16 == handle >> 16 && h != 0);
    if handle == 0 && !customised_mq {
        RootState::Default(kind.to_string())
    } else if handle == ROOT && kind == "htb" {
        RootState::Owned
    } else {
        RootState::Foreign {
            kind: kind.to_string(),
            handle,
        }
    }
}

#[cfg(test)]
mod root_tests {
    use super::*;

    #[test]
    fn a_customised_default_mq_is_foreign() {
        let default_children = [(0x0000_0001, 0), (0x0000_0002, 0)];
        assert_eq!(
            root_state("mq", 0, &default_children),
            RootState::Default("mq".into())
        );
        let customised = [(0x0000_0001, 0x0010_0000), (0x0000_0002, 0)];
        assert_eq!(
            root_state("mq", 0, &customised),
            RootState::Foreign {
                kind: "mq".into(),
                handle: 0
            }
        );
        assert_eq!(
            root_state("noqueue", 0, &[]),
            RootState::Default("noqueue".into())
        );
        assert_eq!(root_state("htb", ROOT, &[]), RootState::Owned);
        assert!(matches!(
            root_state("mq", 0x8001_0000, &[]),
            RootState::Foreign { .. }
        ));
    }

    /// Classes read back come out parents first, whatever the dump's order;
    /// an orphan keeps its place at the end.
    #[test]
    fn classes_read_back_are_ordered_parents_first() {
        let class = |classid: u32, parent: u32| Class {
            classid,
            parent,
            rate: 0,
            ceil: 0,
            buffer: 0,
            cbuffer: 0,
            quantum: 0,
            prio: 0,
        };
        let dumped = vec![
            class(0x00e9_0010, 0x00e9_0001),
            class(0x00e9_0077, 0x00e9_0066),
            class(0x00e9_0001, ROOT),
            class(0x00e9_0020, 0x00e9_0001),
        ];
        let ids: Vec<u32> = parents_first(dumped).iter().map(|c| c.classid).collect();
        assert_eq!(ids, [0x00e9_0001, 0x00e9_0010, 0x00e9_0020, 0x00e9_0077]);
    }
}

/// Reads root, classes, leaves and filters of `ifindex`.
pub fn observe(nl: &mut Netlink, ifindex: i32) -> io::Result<Observed> {
    let mut obs = observe_light(nl, ifindex)?;
    if obs.root != RootState::Owned {
        return Ok(obs);
    }
    let mut req = TcMessage::with_index(ifindex);
    req.header.parent = TcHandle::from(ROOT);
    let prios = &mut obs.shape.prios;
    nl.dump_with(RouteNetlinkMessage::GetTrafficFilter(req), |raw| {
        if let Some(f) = U32Filter::parse(raw) {
            add_filter(prios, f);
        }
        Ok(())
    })?;
    obs.shape.prios.sort_by_key(|p| p.prio);
    // Grown by doubling while the dump arrived: a 33,000-filter prio held
    // room for 65,536 (3.6 MiB unused). Freed now, it is reused by the
    // plan and the diff that follow.
    for p in &mut obs.shape.prios {
        p.filters.shrink_to_fit();
    }
    Ok(obs)
}

/// [`observe`] without the filters (`shape.prios` stays empty): the root,
/// classes, leaves, counters, hooks and addresses, a few small dumps
/// whatever the whitelist. The filter dump is what costs at 100,000
/// entries (the kernel re-walks a u32 prio for every 32 KiB batch).
pub fn observe_light(nl: &mut Netlink, ifindex: i32) -> io::Result<Observed> {
    let qdiscs = qdiscs_of(nl, ifindex)?;
    let root_msg = qdiscs
        .iter()
        .find(|q| u32::from(q.header.parent) == TC_H_ROOT);
    let mut obs = Observed {
        root: root_state_of(root_msg, &qdiscs),
        shape: Shape::default(),
        counters: vec![],
        root_counters: root_msg
            .map(|q| counters(&q.attributes))
            .unwrap_or_default(),
        direct_packets: 0,
        hooks: hooks(nl, ifindex, &qdiscs)?,
        local: local_addresses(nl, ifindex)?,
    };
    if obs.root != RootState::Owned {
        return Ok(obs);
    }
    if let Some(q) = root_msg {
        let glob = htb_glob(q);
        obs.shape.root = Some(Root {
            handle: ROOT,
            r2q: u32_at(&glob, 4),
            defcls: u32_at(&glob, 8),
        });
        obs.direct_packets = u32_at(&glob, 16);
    }
    obs.shape.leaves = leaves_of(&qdiscs);
    let mut classes = Vec::new();
    for (class, c) in dump_classes(nl, ifindex)? {
        obs.counters.push((class.classid, c));
        classes.push(class);
    }
    obs.shape.classes = parents_first(classes);
    Ok(obs)
}

/// The qdiscs of interface `ifindex` (the dump holds every interface's).
fn qdiscs_of(nl: &mut Netlink, ifindex: i32) -> io::Result<Vec<TcMessage>> {
    let mut qdiscs = Vec::new();
    for m in nl.dump(RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()))? {
        if let RouteNetlinkMessage::NewQueueDiscipline(q) = m {
            if q.header.index == ifindex {
                qdiscs.push(q);
            }
        }
    }
    Ok(qdiscs)
}

/// Whose root qdisc `root` is (none: `noop`), judged with the qdiscs
/// under it.
fn root_state_of(root: Option<&TcMessage>, qdiscs: &[TcMessage]) -> RootState {
    let kind = root
        .map(|q| kind_of(&q.attributes))
        .unwrap_or_else(|| "noop".into());
    let handle = root.map_or(0, |q| u32::from(q.header.handle));
    let children: Vec<(u32, u32)> = qdiscs
        .iter()
        .filter(|q| u32::from(q.header.parent) != TC_H_ROOT)
        .map(|q| (u32::from(q.header.parent), u32::from(q.header.handle)))
        .collect();
    root_state(&kind, handle, &children)
}

/// The leaf qdiscs under our classes.
fn leaves_of(qdiscs: &[TcMessage]) -> Vec<Leaf> {
    let mut leaves = Vec::new();
    for q in qdiscs {
        let parent = u32::from(q.header.parent);
        if parent == TC_H_ROOT || parent >> 16 != ROOT >> 16 {
            continue;
        }
        let kind = match kind_of(&q.attributes).as_str() {
            "sfq" => {
                let perturb = raw_options(&q.attributes).map_or(0, |o| u32_at(&o, 4) as i32);
                LeafKind::Sfq { perturb }
            }
            "pfifo" => LeafKind::Pfifo,
            other => LeafKind::Other(other.to_string()),
        };
        leaves.push(Leaf {
            handle: u32::from(q.header.handle),
            parent,
            kind,
        });
    }
    leaves
}

/// `classes` with parents before children, as plans list them (classes
/// whose parent never appears keep their order, last).
fn parents_first(classes: Vec<Class>) -> Vec<Class> {
    let mut ordered: Vec<Class> = Vec::new();
    let mut rest = classes;
    while !rest.is_empty() {
        let before = rest.len();
        let (ready, later): (Vec<Class>, Vec<Class>) = rest.into_iter().partition(|c| {
            c.parent == ROOT
                || c.parent == TC_H_ROOT
                || ordered.iter().any(|o| o.classid == c.parent)
        });
        ordered.extend(ready);
        rest = later;
        if rest.len() == before {
            ordered.append(&mut rest);
        }
    }
    ordered
}

/// One u32 filter message of a dump, read in place.
///
/// Filter dumps are the hot path (10,000+ messages on a big whitelist); a
/// direct reader of the few attributes we use is several times faster than
/// building netlink-packet-route's generic attribute trees. The encoder side
/// still uses those types, and the conformance tests pin both.
#[derive(Debug, Default)]
struct U32Filter {
    prio: u16,
    protocol: u16,
    handle: u32,
    divisor: Option<u32>,
    classid: Option<u32>,
    link: Option<u32>,
    sel: Option<Selector>,
}

fn be32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

fn ne32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

fn ne16(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(o..o + 2)?.try_into().ok()?))
}

impl U32Filter {
    /// `raw` is a whole RTM_NEWTFILTER message: nlmsghdr, tcmsg, attributes.
    fn parse(raw: &[u8]) -> Option<U32Filter> {
        const RTM_NEWTFILTER: u16 = 44;
        if ne16(raw, 4)? != RTM_NEWTFILTER {
            return None;
        }
        let info = ne32(raw, 32)?;
        let mut f = U32Filter {
            prio: (info >> 16) as u16,
            protocol: u16::from_be((info & 0xffff) as u16),
            handle: ne32(raw, 24)?,
            ..U32Filter::default()
        };
        let mut is_u32 = false;
        for (kind, v) in attrs(raw.get(36..)?) {
            match kind {
                1 => is_u32 = v.starts_with(b"u32\0"),
                2 => {
                    for (k, o) in attrs(v) {
                        match k {
                            1 => f.classid = ne32(o, 0),
                            3 => f.link = ne32(o, 0).filter(|l| *l != 0),
                            4 => f.divisor = ne32(o, 0),
                            5 => f.sel = parse_sel(o),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if !is_u32 {
            // Another classifier in our qdisc: mark the prio foreign (protocol
            // 0 never matches a plan) so the differ removes it whole.
            f.protocol = 0;
            f.handle = 0;
        }
        Some(f)
    }
}

/// `struct tc_u32_sel` and its keys.
fn parse_sel(o: &[u8]) -> Option<Selector> {
    let nkeys = *o.get(2)? as usize;
    let mut keys = Vec::with_capacity(nkeys);
    for k in 0..nkeys {
        let b = 16 + 16 * k;
        keys.push(Key {
            mask: be32(o, b)?,
            val: be32(o, b + 4)?,
            off: ne32(o, b + 8)? as i32,
            offmask: ne32(o, b + 12)? as i32,
        });
    }
    Some(Selector {
        flags: *o.first()?,
        offshift: *o.get(1)?,
        offmask: u16::from_be_bytes(o.get(4..6)?.try_into().ok()?),
        off: ne16(o, 6)?,
        offoff: ne16(o, 8)? as i16,
        hoff: ne16(o, 10)? as i16,
        hmask: be32(o, 12)?,
        keys,
    })
}

fn add_filter(prios: &mut Vec<Prio>, f: U32Filter) {
    let idx = match prios.iter().position(|p| p.prio == f.prio) {
        Some(i) => i,
        None => {
            prios.push(Prio {
                prio: f.prio,
                protocol: f.protocol,
                root_handle: None,
                tables: vec![],
                filters: vec![],
            });
            prios.len() - 1
        }
    };
    let p = &mut prios[idx];
    if f.protocol == 0 {
        p.protocol = 0;
    }
    if f.handle == 0 {
        return;
    }
    let htid = f.handle & 0xfff0_0000;
    let is_root_table = htid >> 20 >= 0x800;
    if f.handle & 0x000f_ffff == 0 {
        if is_root_table {
            p.root_handle = Some(htid);
        } else {
            p.tables.push(HashTable {
                handle: htid,
                divisor: f.divisor.unwrap_or(1),
            });
        }
        return;
    }
    if is_root_table {
        p.root_handle = Some(htid);
    }
    p.filters.push(Filter {
        table: if is_root_table {
            Table::Root
        } else {
            Table::User(htid)
        },
        bucket: ((f.handle >> 12) & 0xff) as u8,
        id: Some(f.handle & 0xfff),
        sel: f.sel.unwrap_or_default(),
        classid: f.classid,
        link: f.link,
        origin: Origin::Unknown,
    });
}
