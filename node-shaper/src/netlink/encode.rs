//! Operations → rtnetlink messages, byte-compatible with what iproute2's `tc`
//! sends for the same command (see `tests/conformance.rs` and its fixtures).
//!
//! netlink-packet-route has no HTB or SFQ options and no way to set a u32
//! node's handle through rtnetlink's builders, so we build `TcMessage`s from
//! parts and encode the qdisc-specific payloads here.

use netlink_packet_core::{
    DefaultNla, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::tc::{
    TcAttribute, TcFilterU32Option, TcHandle, TcHeader, TcMessage, TcOption, TcU32Key,
    TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;

use crate::diff::Op;
use crate::layout::ROOT;
use crate::model::*;

const TCA_OPTIONS: u16 = 2;
const TCA_HTB_PARMS: u16 = 1;
const TCA_HTB_INIT: u16 = 2;
const TCA_HTB_RATE64: u16 = 6;
const TCA_HTB_CEIL64: u16 = 7;
const TC_HTB_PROTOVER: u32 = 3;
/// `TC_H_ROOT`.
pub const TC_H_ROOT: u32 = 0xffff_ffff;
/// `TC_LINKLAYER_ETHERNET`: lets HTB compute times without rate tables.
const LINKLAYER_ETHERNET: u8 = 1;

/// An encoded request plus a human name for error messages.
#[derive(Debug, Clone)]
pub struct Request {
    /// The message, sequence number unset.
    pub message: NetlinkMessage<RouteNetlinkMessage>,
    /// What it does, e.g. `create htb class e9:10`.
    pub what: String,
}

fn nla(kind: u16, payload: Vec<u8>) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut v = Vec::with_capacity((len + 3) & !3);
    v.extend_from_slice(&(len as u16).to_ne_bytes());
    v.extend_from_slice(&kind.to_ne_bytes());
    v.extend(payload);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v
}

fn raw_options(payload: Vec<u8>) -> TcAttribute {
    // TCA_OPTIONS without NLA_F_NESTED, as tc sends it.
    TcAttribute::Other(DefaultNla::new(TCA_OPTIONS, payload))
}

/// `struct tc_htb_glob` inside TCA_HTB_INIT.
pub fn htb_init(root: &Root) -> Vec<u8> {
    let mut glob = Vec::with_capacity(20);
    for v in [TC_HTB_PROTOVER, root.r2q, root.defcls, 0, 0] {
        glob.extend_from_slice(&v.to_ne_bytes());
    }
    nla(TCA_HTB_INIT, glob)
}

fn ratespec(rate: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(12);
    r.push(3); // cell_log: tc's value for its (unused) rate table
    r.push(LINKLAYER_ETHERNET);
    r.extend_from_slice(&0u16.to_ne_bytes()); // overhead
    r.extend_from_slice(&(-1i16).to_ne_bytes()); // cell_align
    r.extend_from_slice(&0u16.to_ne_bytes()); // mpu
    r.extend_from_slice(&(rate.min(u64::from(u32::MAX)) as u32).to_ne_bytes());
    r
}

/// TCA_OPTIONS payload of an HTB class: [RATE64] [CEIL64] PARMS, tc's order.
pub fn htb_class_options(c: &Class) -> Vec<u8> {
    let mut out = Vec::new();
    if c.rate >= 1 << 32 {
        out.extend(nla(TCA_HTB_RATE64, c.rate.to_ne_bytes().to_vec()));
    }
    if c.ceil >= 1 << 32 {
        out.extend(nla(TCA_HTB_CEIL64, c.ceil.to_ne_bytes().to_vec()));
    }
    let mut opt = Vec::with_capacity(44);
    opt.extend(ratespec(c.rate));
    opt.extend(ratespec(c.ceil));
    for v in [c.buffer, c.cbuffer, c.quantum, 0, c.prio] {
        opt.extend_from_slice(&v.to_ne_bytes());
    }
    out.extend(nla(TCA_HTB_PARMS, opt));
    out
}

/// `struct tc_sfq_qopt_v1` (72 bytes, raw in TCA_OPTIONS): only perturb set.
pub fn sfq_options(perturb: i32) -> Vec<u8> {
    let mut v = vec![0u8; 72];
    v[4..8].copy_from_slice(&perturb.to_ne_bytes());
    v
}

fn header(ifindex: i32, handle: u32, parent: u32, info: u32) -> TcHeader {
    TcHeader {
        index: ifindex,
        handle: TcHandle::from(handle),
        parent: TcHandle::from(parent),
        info,
        ..Default::default()
    }
}

/// `tcm_info` of a filter: prio in the high half, ethertype in network order.
pub fn filter_info(prio: u16, protocol: u16) -> u32 {
    (u32::from(prio) << 16) | u32::from(protocol.to_be())
}

fn selector(sel: &Selector) -> TcU32Selector {
    let mut s = TcU32Selector::default();
    s.flags = TcU32SelectorFlags::from_bits_retain(sel.flags);
    s.offshift = sel.offshift;
    s.nkeys = sel.keys.len() as u8;
    s.offmask = sel.offmask;
    s.off = sel.off;
    s.offoff = sel.offoff;
    s.hoff = sel.hoff;
    s.hmask = sel.hmask;
    s.keys = sel
        .keys
        .iter()
        .map(|k| {
            let mut key = TcU32Key::default();
            key.mask = k.mask;
            key.val = k.val & k.mask;
            key.off = k.off;
            key.offmask = k.offmask;
            key
        })
        .collect();
    s
}

fn filter_options(node: &Filter) -> Vec<TcOption> {
    let mut opts = Vec::new();
    if let Some(c) = node.classid {
        opts.push(TcOption::U32(TcFilterU32Option::ClassId(TcHandle::from(c))));
    }
    if let Some(l) = node.link {
        opts.push(TcOption::U32(TcFilterU32Option::Link(l)));
    }
    if let Table::User(t) = node.table {
        opts.push(TcOption::U32(TcFilterU32Option::Hash(
            t | (u32::from(node.bucket) << 12),
        )));
    }
    opts.push(TcOption::U32(TcFilterU32Option::Selector(selector(
        &node.sel,
    ))));
    opts
}

/// Handle to create a filter with: full for user tables; for the root table
/// only the filter id, because its table id is chosen by the kernel.
pub fn new_filter_handle(node: &Filter) -> u32 {
    let id = node.id.unwrap_or(0);
    match node.table {
        Table::Root => id,
        Table::User(t) => t | (u32::from(node.bucket) << 12) | id,
    }
}

fn message(inner: RouteNetlinkMessage, flags: u16) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut h = NetlinkHeader::default();
    h.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut m = NetlinkMessage::new(h, NetlinkPayload::InnerMessage(inner));
    m.finalize();
    m
}

/// Deletes the root qdisc with `handle` (ours, or a foreign one `reset
/// --force` removes), restoring the device default.
pub fn del_root(handle: u32, ifindex: i32, dev: &str) -> Request {
    let msg = TcMessage::from_parts(header(ifindex, handle, TC_H_ROOT, 0), vec![]);
    Request {
        message: message(RouteNetlinkMessage::DelQueueDiscipline(msg), 0),
        what: format!("delete root qdisc {} on {dev}", fmt_handle(handle)),
    }
}

/// Encodes one operation for the interface `ifindex` (named `dev` in messages).
pub fn encode(op: &Op, ifindex: i32, dev: &str) -> Request {
    let (inner, flags) = match op {
        Op::AddRoot { root, graft } => add_root(ifindex, root, *graft),
        Op::DelRoot => return del_root(ROOT, ifindex, dev),
        Op::PutClass(c) => put_class(ifindex, c),
        Op::DelClass(id) => del_class(ifindex, *id),
        Op::PutLeaf(l) => put_leaf(ifindex, l),
        Op::AddTable {
            prio,
            protocol,
            table,
        } => add_table(ifindex, filter_info(*prio, *protocol), table),
        // The same request for a table, a hidden table and a filter: each
        // is a u32 node by handle. A sweep only reads differently (and its
        // "not found" is expected, see engine::run).
        Op::DelTable {
            prio,
            protocol,
            handle,
        }
        | Op::SweepTable {
            prio,
            protocol,
            handle,
        }
        | Op::DelFilter {
            prio,
            protocol,
            handle,
        } => del_filter(ifindex, filter_info(*prio, *protocol), *handle),
        Op::AddFilter {
            prio,
            protocol,
            filter,
        } => add_filter(ifindex, filter_info(*prio, *protocol), filter),
        Op::ChangeFilter {
            prio,
            protocol,
            handle,
            filter,
        } => change_filter(ifindex, filter_info(*prio, *protocol), *handle, filter),
        Op::Unlink {
            prio,
            protocol,
            handle,
        } => unlink(ifindex, filter_info(*prio, *protocol), *handle),
        Op::DelPrio { prio, protocol } => del_prio(ifindex, filter_info(*prio, *protocol)),
    };
    Request {
        message: message(inner, flags),
        what: format!("{op} on {dev}"),
    }
}

/// An encoded request's message and its `NLM_F_*` flags beyond REQUEST|ACK.
type Encoded = (RouteNetlinkMessage, u16);

/// `TCA_KIND`.
fn kind(k: &str) -> TcAttribute {
    TcAttribute::Kind(k.to_string())
}

/// `tc qdisc add dev DEV root handle e9: htb default 20 r2q 10`, or with
/// `graft`, `tc qdisc replace` (over a foreign root, `--force`).
fn add_root(ifindex: i32, root: &Root, graft: bool) -> Encoded {
    let msg = TcMessage::from_parts(
        header(ifindex, root.handle, TC_H_ROOT, 0),
        vec![kind("htb"), raw_options(htb_init(root))],
    );
    let flags = if graft {
        NLM_F_CREATE | NLM_F_REPLACE
    } else {
        NLM_F_CREATE | NLM_F_EXCL
    };
    (RouteNetlinkMessage::NewQueueDiscipline(msg), flags)
}

/// `tc class replace dev DEV parent P classid C htb rate R ceil C ...`
/// (created if missing, changed in place otherwise).
fn put_class(ifindex: i32, c: &Class) -> Encoded {
    let msg = TcMessage::from_parts(
        header(ifindex, c.classid, c.parent, 0),
        vec![kind("htb"), raw_options(htb_class_options(c))],
    );
    (RouteNetlinkMessage::NewTrafficClass(msg), NLM_F_CREATE)
}

/// `tc class del dev DEV classid C`.
fn del_class(ifindex: i32, classid: u32) -> Encoded {
    let msg = TcMessage::from_parts(header(ifindex, classid, 0, 0), vec![]);
    (RouteNetlinkMessage::DelTrafficClass(msg), 0)
}

/// `tc qdisc replace dev DEV parent C handle H: sfq perturb 10` (or `pfifo`).
fn put_leaf(ifindex: i32, l: &Leaf) -> Encoded {
    let mut attrs = vec![kind(l.kind.kind())];
    if let LeafKind::Sfq { perturb } = l.kind {
        attrs.push(raw_options(sfq_options(perturb)));
    }
    let msg = TcMessage::from_parts(header(ifindex, l.handle, l.parent, 0), attrs);
    (
        RouteNetlinkMessage::NewQueueDiscipline(msg),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
}

/// `tc filter add dev DEV parent e9: prio P protocol X handle T: u32 divisor N`.
fn add_table(ifindex: i32, info: u32, table: &HashTable) -> Encoded {
    let msg = TcMessage::from_parts(
        header(ifindex, table.handle, ROOT, info),
        vec![
            kind("u32"),
            TcAttribute::Options(vec![TcOption::U32(TcFilterU32Option::Divisor(
                table.divisor,
            ))]),
        ],
    );
    (
        RouteNetlinkMessage::NewTrafficFilter(msg),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// `tc filter del dev DEV parent e9: prio P protocol X handle H u32`.
fn del_filter(ifindex: i32, info: u32, handle: u32) -> Encoded {
    let msg = TcMessage::from_parts(header(ifindex, handle, ROOT, info), vec![kind("u32")]);
    (RouteNetlinkMessage::DelTrafficFilter(msg), 0)
}

/// `tc filter add dev DEV parent e9: prio P protocol X handle T:B:N u32
/// classid C (or link L:) ht T:B: match ...`.
fn add_filter(ifindex: i32, info: u32, node: &Filter) -> Encoded {
    let msg = TcMessage::from_parts(
        header(ifindex, new_filter_handle(node), ROOT, info),
        vec![kind("u32"), TcAttribute::Options(filter_options(node))],
    );
    (
        RouteNetlinkMessage::NewTrafficFilter(msg),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// `tc filter replace dev DEV parent e9: prio P protocol X handle H u32 ...`:
/// the node's classid and link (without `ht`: the kernel keeps its place).
fn change_filter(ifindex: i32, info: u32, handle: u32, node: &Filter) -> Encoded {
    let mut opts = filter_options(node);
    opts.retain(|o| !matches!(o, TcOption::U32(TcFilterU32Option::Hash(_))));
    let msg = TcMessage::from_parts(
        header(ifindex, handle, ROOT, info),
        vec![kind("u32"), TcAttribute::Options(opts)],
    );
    (RouteNetlinkMessage::NewTrafficFilter(msg), NLM_F_CREATE)
}

/// `tc filter change dev DEV parent e9: prio P protocol X handle H u32 link 0`:
/// the link filter stays and releases its table.
fn unlink(ifindex: i32, info: u32, handle: u32) -> Encoded {
    let msg = TcMessage::from_parts(
        header(ifindex, handle, ROOT, info),
        vec![
            kind("u32"),
            TcAttribute::Options(vec![TcOption::U32(TcFilterU32Option::Link(0))]),
        ],
    );
    (RouteNetlinkMessage::NewTrafficFilter(msg), NLM_F_CREATE)
}

/// `tc filter del dev DEV parent e9: prio P protocol X`: every filter of the prio.
fn del_prio(ifindex: i32, info: u32) -> Encoded {
    let msg = TcMessage::from_parts(header(ifindex, 0, ROOT, info), vec![]);
    (RouteNetlinkMessage::DelTrafficFilter(msg), 0)
}
