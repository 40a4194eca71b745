//! Planning, diffing and classification, without a kernel.
//!
//! `Kernel` below is a small model of how the kernel stores what we send (u32
//! nodes by full handle, classes by id); it lets us check idempotence,
//! incremental updates and leak-freedom over many cycles in microseconds. The
//! datapath tests check the same properties against the real kernel.

use std::net::IpAddr;

use egressguard_crds::{load::parse_str, validate, ValidSpec};
use node_shaper::diff::{diff, filter_handle, Op};
use node_shaper::layout::*;
use node_shaper::model::*;
use node_shaper::plan::{plan, LeafChoice};
use node_shaper::sim::{classify, Packet, L4};

fn spec_with(whitelist: &[String], dests: &str) -> ValidSpec {
    let wl = whitelist
        .iter()
        .map(|w| format!("'{w}'"))
        .collect::<Vec<_>>()
        .join(", ");
    // Random lists may hold a whole family (0.0.0.0/0) or half of one: the
    // planner must classify those too, so they are accepted here as meant.
    let text = format!(
        "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: t}}\nspec:\n  uplink: {{rate: 20Mbit, burst: 15k}}\n  throttle:\n    rate: 1Mbit\n    destinations: {dests}\n  whitelist: [{wl}]\n  whitelistAllDestinations: true\n  allowWideRanges: true\n"
    );
    let g = parse_str(&text).expect("parse");
    validate(&g[0].spec).expect("valid")
}

fn incident() -> ValidSpec {
    spec_with(
        &["203.0.113.10/32".into(), "198.51.100.0/24".into(), "2001:db8:1::/48".into()],
        "[{protocol: TCP, port: 80}, {protocol: TCP, port: 443}, {protocol: UDP, port: 8000, endPort: 8100}]",
    )
}

/// What the kernel would hold after our requests.
#[derive(Default)]
struct Kernel {
    shape: Shape,
    next_root_table: u32,
}

impl Kernel {
    fn prio(&mut self, prio: u16, protocol: u16) -> &mut Prio {
        if !self.shape.prios.iter().any(|p| p.prio == prio) {
            self.next_root_table += 1;
            self.shape.prios.push(Prio {
                prio,
                protocol,
                root_handle: Some((0x800 + self.next_root_table) << 20),
                tables: vec![],
                filters: vec![],
            });
            self.shape.prios.sort_by_key(|p| p.prio);
        }
        self.shape
            .prios
            .iter_mut()
            .find(|p| p.prio == prio)
            .expect("just inserted")
    }

    fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            match op {
                Op::AddRoot { root, .. } => self.shape.root = Some(root.clone()),
                Op::DelRoot => self.shape = Shape::default(),
                Op::PutClass(c) => match self
                    .shape
                    .classes
                    .iter_mut()
                    .find(|o| o.classid == c.classid)
                {
                    Some(o) => *o = c.clone(),
                    None => self.shape.classes.push(c.clone()),
                },
                Op::DelClass(id) => self.shape.classes.retain(|c| c.classid != *id),
                Op::PutLeaf(l) => {
                    self.shape.leaves.retain(|o| o.parent != l.parent);
                    self.shape.leaves.push(l.clone());
                }
                Op::AddTable {
                    prio,
                    protocol,
                    table,
                } => self.prio(*prio, *protocol).tables.push(*table),
                Op::DelTable { prio, handle, .. } => {
                    let linked = self
                        .shape
                        .prios
                        .iter()
                        .flat_map(|p| &p.filters)
                        .any(|n| n.link == Some(*handle));
                    assert!(
                        !linked,
                        "deleting table {handle:#x} while a node links to it (kernel: EBUSY)"
                    );
                    if let Some(p) = self.shape.prios.iter_mut().find(|p| p.prio == *prio) {
                        p.tables.retain(|t| t.handle != *handle);
                        p.filters.retain(|n| n.table != Table::User(*handle));
                    }
                }
                Op::AddFilter {
                    prio,
                    protocol,
                    filter: node,
                } => {
                    let p = self.prio(*prio, *protocol);
                    let mut n = node.clone();
                    n.origin = Origin::Unknown;
                    assert!(
                        !p.filters
                            .iter()
                            .any(|o| o.table == n.table && o.bucket == n.bucket && o.id == n.id),
                        "node id reused while taken: {n:?}"
                    );
                    p.filters.push(n);
                }
                Op::ChangeFilter {
                    prio,
                    handle,
                    filter: node,
                    ..
                } => {
                    let p = self
                        .shape
                        .prios
                        .iter_mut()
                        .find(|p| p.prio == *prio)
                        .expect("prio");
                    let i = (0..p.filters.len())
                        .find(|&i| filter_handle(p, &p.filters[i]) == *handle)
                        .expect("node");
                    p.filters[i].classid = node.classid;
                    p.filters[i].link = node.link;
                }
                Op::DelFilter { prio, handle, .. } => {
                    let p = self
                        .shape
                        .prios
                        .iter_mut()
                        .find(|p| p.prio == *prio)
                        .expect("prio");
                    let before = p.filters.len();
                    let keep: Vec<Filter> = p
                        .filters
                        .iter()
                        .filter(|n| filter_handle(p, n) != *handle)
                        .cloned()
                        .collect();
                    assert_eq!(
                        keep.len() + 1,
                        before,
                        "deleting a node that does not exist"
                    );
                    p.filters = keep;
                }
                Op::Unlink { prio, handle, .. } => {
                    let p = self
                        .shape
                        .prios
                        .iter_mut()
                        .find(|p| p.prio == *prio)
                        .expect("prio");
                    let i = (0..p.filters.len())
                        .find(|&i| filter_handle(p, &p.filters[i]) == *handle)
                        .expect("node");
                    p.filters[i].link = None;
                }
                Op::DelPrio { prio, .. } => self.shape.prios.retain(|p| p.prio != *prio),
                // The model has no hidden tables: nothing to sweep.
                Op::SweepTable { .. } => {}
            }
        }
    }

    fn converge(&mut self, desired: &Shape) -> Vec<Op> {
        let ops = diff(&self.shape, desired);
        self.apply(&ops);
        ops
    }
}

/// Whitelist and default split what the throttle and the lanes leave: the
/// default class a tenth, at least min(1Mbit, half); never more than the
/// uplink in all, on uplinks from 1Mbit to 100gbit.
#[test]
fn whitelist_takes_what_the_guarantees_leave_but_a_small_default_share() {
    for (uplink, throttle, wl_bits, def_bits) in [
        // 1Mbit: lanes shrink to a quarter of 0.5 each (125k); 250k left.
        ("1Mbit", "500kbit", 125_000, 125_000),
        // 4Mbit: the lanes shrink to a quarter of 3 each; 1.5Mbit left,
        // default half of it (a tenth would be under 1Mbit).
        ("4Mbit", "1Mbit", 750_000, 750_000),
        // 20Mbit: 16Mbit left, default 1.6.
        ("20Mbit", "1Mbit", 14_400_000, 1_600_000),
        // 100gbit: protected 10gbit, SSH 1Mbit; default a tenth of the rest.
        ("100gbit", "1gbit", 80_099_100_000, 8_899_900_000),
    ] {
        let text = format!("apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: t}}\nspec:\n  uplink: {{rate: {uplink}}}\n  throttle: {{rate: {throttle}, destinations: [{{port: 443}}]}}\n");
        let g = parse_str(&text).expect("parse");
        let s = plan(&validate(&g[0].spec).expect("valid"), LeafChoice::Sfq);
        let class = |id: u32| s.classes.iter().find(|c| c.classid == id).expect("class");
        assert_eq!(
            (class(CLASS_WHITELIST).rate, class(CLASS_DEFAULT).rate),
            (wl_bits / 8, def_bits / 8),
            "uplink {uplink}"
        );
        let sum: u64 = s.classes[1..].iter().map(|c| c.rate).sum();
        assert_eq!(sum, class(CLASS_UPLINK).rate, "uplink {uplink}");
    }
}

#[test]
fn incident_plan_has_the_documented_layout() {
    let s = plan(&incident(), LeafChoice::Sfq);
    let ids: Vec<u32> = s.classes.iter().map(|c| c.classid).collect();
    assert_eq!(
        ids,
        vec![
            CLASS_UPLINK,
            CLASS_PROTECTED,
            CLASS_SSH,
            CLASS_WHITELIST,
            CLASS_DEFAULT,
            CLASS_THROTTLED
        ]
    );
    let class = |id: u32| s.classes.iter().find(|c| c.classid == id).expect("class");
    let uplink = class(CLASS_UPLINK);
    assert_eq!((uplink.rate, uplink.ceil), (2_500_000, 2_500_000));
    // Children's guaranteed rates never exceed the parent's.
    let sum: u64 = s.classes[1..].iter().map(|c| c.rate).sum();
    assert!(sum <= uplink.rate, "children rates {sum} exceed uplink");
    let thr = class(CLASS_THROTTLED);
    assert_eq!((thr.rate, thr.ceil, thr.prio), (125_000, 125_000, 3));
    // The lanes: protected max(1Mbit, uplink/10) = 2Mbit up to the uplink,
    // SSH 1Mbit up to max(5Mbit, uplink/10) = 5Mbit. No class is unbounded.
    let p = class(CLASS_PROTECTED);
    assert_eq!((p.rate, p.ceil, p.prio), (250_000, 2_500_000, 0));
    let ssh = class(CLASS_SSH);
    assert_eq!((ssh.rate, ssh.ceil), (125_000, 625_000));
    // Of the 16 Mbit the throttle and the lanes leave, default keeps a tenth
    // and the whitelist the rest (not half each: a flood landing in default
    // would hold its half against a whitelisted flow); both borrow up to the
    // uplink, and the children's rates add up to exactly the uplink.
    let (wl, def) = (class(CLASS_WHITELIST), class(CLASS_DEFAULT));
    assert_eq!((wl.rate, wl.ceil, wl.prio), (1_800_000, 2_500_000, 1));
    assert_eq!((def.rate, def.ceil, def.prio), (200_000, 2_500_000, 2));
    assert_eq!(
        (wl.quantum, def.quantum, thr.quantum),
        (180_000, 20_000, 12_500)
    );
    assert_eq!(sum, uplink.rate);
    assert!(
        class(CLASS_WHITELIST).prio < class(CLASS_DEFAULT).prio,
        "whitelist borrows before default"
    );
    assert!(s.classes.iter().all(|c| c.ceil <= uplink.ceil));
    // Quanta are explicit and inside HTB's range, so the kernel never warns.
    assert!(s
        .classes
        .iter()
        .all(|c| (1514..=200_000).contains(&c.quantum)));
    assert_eq!(s.leaves.len(), 5, "every class under the uplink has a leaf");
    assert!(s
        .leaves
        .iter()
        .all(|l| matches!(l.kind, LeafKind::Sfq { perturb: 10 })));
    let prios: Vec<(u16, u16)> = s.prios.iter().map(|p| (p.prio, p.protocol)).collect();
    assert_eq!(
        prios,
        vec![
            (13, ETH_P_IP),
            (14, ETH_P_IP),
            (23, ETH_P_IPV6),
            (30, ETH_P_IP),
            (31, ETH_P_IPV6),
            (40, ETH_P_IP),
            (41, ETH_P_IPV6),
            (42, ETH_P_IP),
            (43, ETH_P_IPV6)
        ]
    );
    let fallback = plan(&incident(), LeafChoice::PfifoFallback);
    assert!(fallback
        .leaves
        .iter()
        .all(|l| l.kind == LeafKind::Pfifo && l.handle >> 16 >= 0x110));
}

#[test]
fn applying_twice_sends_nothing_the_second_time() {
    let desired = plan(&incident(), LeafChoice::Sfq);
    let mut k = Kernel::default();
    let first = k.converge(&desired);
    assert!(matches!(first[0], Op::AddRoot { .. }), "root first");
    assert!(diff(&k.shape, &desired).is_empty());
}

#[test]
fn one_whitelist_entry_changes_with_at_most_two_writes() {
    let mut wl: Vec<String> = (0..10_000u32)
        .map(|i| format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 0xff, i & 0xff))
        .collect();
    let mut k = Kernel::default();
    k.converge(&plan(&spec_with(&wl, "[{port: 443}]"), LeafChoice::Sfq));
    let nodes = k.shape.filter_count();
    wl[1234] = "172.16.9.9/32".into();
    let ops = k.converge(&plan(&spec_with(&wl, "[{port: 443}]"), LeafChoice::Sfq));
    assert_eq!(ops.len(), 2, "{ops:?}");
    assert!(
        matches!(ops[0], Op::AddFilter { .. }) && matches!(ops[1], Op::DelFilter { .. }),
        "add before delete"
    );
    assert_eq!(k.shape.filter_count(), nodes);
    // A rate change is one in-place class update; the root is never touched.
    let mut spec = spec_with(&wl, "[{port: 443}]");
    spec.throttle_rate = egressguard_crds::units::Rate::from_bits_per_sec(2_000_000);
    spec.throttle_ceil = spec.throttle_rate;
    let ops = k.converge(&plan(&spec, LeafChoice::Sfq));
    assert!(ops.iter().all(|o| matches!(o, Op::PutClass(_))), "{ops:?}");
}

/// Two lists of 3,000 /32 entries that share one hash bucket (the last two
/// address bytes: one bucket of the /32 table, then one of its second
/// level) need 6,000 node ids at once if every addition precedes every
/// deletion; a bucket has 4,095. This wedged real interfaces ("Filter already
/// exists"): the bucket's unwanted nodes must go first, and no id may repeat.
#[test]
fn switching_a_full_bucket_frees_ids_before_adding() {
    let list = |first: u32| -> Vec<String> {
        (0..3_000u32)
            .map(|i| format!("{}.{}.0.7/32", first * 12 + i / 256, i % 256))
            .collect()
    };
    let mut k = Kernel::default();
    k.converge(&plan(
        &spec_with(&list(10), "[{port: 443}]"),
        LeafChoice::Sfq,
    ));
    let desired = plan(&spec_with(&list(11), "[{port: 443}]"), LeafChoice::Sfq);
    let ops = k.converge(&desired);
    let first_add = ops
        .iter()
        .position(|o| matches!(o, Op::AddFilter { .. }))
        .expect("additions");
    let early_dels = ops[..first_add]
        .iter()
        .filter(|o| matches!(o, Op::DelFilter { .. }))
        .count();
    assert!(
        early_dels >= 3_000 - (0xfff - 3_000),
        "{early_dels} deletions first"
    );
    assert!(diff(&k.shape, &desired).is_empty(), "did not converge");
    // A small change in the same full bucket stays add-before-delete.
    let mut wl = list(11);
    wl[5] = "12.0.0.7/32".into();
    let ops = k.converge(&plan(&spec_with(&wl, "[{port: 443}]"), LeafChoice::Sfq));
    assert_eq!(ops.len(), 2, "{ops:?}");
    assert!(matches!(ops[0], Op::AddFilter { .. }), "{ops:?}");
}

#[test]
fn cycles_never_grow_beyond_the_plan() {
    let specs = [
        incident(),
        spec_with(
            &["10.0.0.0/8".into(), "2001:db8::/32".into()],
            "[{protocol: Any, port: 1, endPort: 1024}]",
        ),
        spec_with(&[], "[{port: 443}]"),
    ];
    let mut k = Kernel::default();
    for round in 0..20 {
        let s = &specs[round % specs.len()];
        let desired = plan(
            s,
            if round % 2 == 0 {
                LeafChoice::Sfq
            } else {
                LeafChoice::PfifoFallback
            },
        );
        k.converge(&desired);
        assert_eq!(
            k.shape.filter_count(),
            desired.filter_count(),
            "round {round}"
        );
        assert_eq!(k.shape.classes.len(), desired.classes.len());
        assert_eq!(k.shape.leaves.len(), desired.leaves.len());
        let tables: usize = k.shape.prios.iter().map(|p| p.tables.len()).sum();
        let want: usize = desired.prios.iter().map(|p| p.tables.len()).sum();
        assert_eq!(tables, want, "round {round}");
        assert!(diff(&k.shape, &desired).is_empty());
    }
}

/// xorshift: deterministic, dependency-free randomness.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_net(r: &mut Rng) -> ipnet::IpNet {
    if r.below(3) == 0 {
        let len = [0, 8, 15, 16, 31, 32, 47, 48, 63, 64, 100, 127, 128][r.below(13) as usize];
        let a =
            u128::from(0x2001_0db8u32) << 96 | u128::from(r.next()) << 32 | u128::from(r.below(4));
        ipnet::IpNet::new(IpAddr::from(a.to_be_bytes()), len)
            .expect("len")
            .trunc()
    } else {
        let len = [0, 1, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32][r.below(13) as usize];
        let a = 0x0a00_0000u32
            | (r.below(4) as u32) << 16
            | (r.below(4) as u32) << 8
            | r.below(8) as u32;
        ipnet::IpNet::new(IpAddr::from(a.to_be_bytes()), len)
            .expect("len")
            .trunc()
    }
}

/// The hashed layout classifies exactly like a flat "first match" list would:
/// random whitelists with prefixes from /0 to /32 and /128, entries that share
/// and straddle buckets, packets with and without IPv4 options, TCP and UDP.
#[test]
fn hashed_layout_classifies_like_a_flat_list() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    for case in 0..60 {
        let n = 1 + r.below(40) as usize;
        let wl: Vec<ipnet::IpNet> = (0..n).map(|_| random_net(&mut r)).collect();
        let spec = spec_with(
            &wl.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "[{protocol: TCP, port: 443}, {protocol: UDP, port: 8000, endPort: 8100}, {protocol: Any, port: 53}]",
        );
        let shape = plan(&spec, LeafChoice::Sfq);
        // Run the sim on what the kernel would hold (ids assigned, root tables numbered).
        let mut k = Kernel::default();
        k.converge(&shape);
        for _ in 0..300 {
            let dst = if r.below(2) == 0 {
                wl[r.below(n as u64) as usize].network()
            } else {
                random_net(&mut r).network()
            };
            let dst = match dst {
                IpAddr::V4(a) => IpAddr::from((u32::from(a) | r.below(4) as u32).to_be_bytes()),
                IpAddr::V6(a) => {
                    IpAddr::from((u128::from(a) | u128::from(r.below(4))).to_be_bytes())
                }
            };
            let l4 = if r.below(2) == 0 { L4::Tcp } else { L4::Udp };
            let port = [443, 8000, 8050, 8100, 8101, 53, 80, 7999][r.below(8) as usize];
            let whitelisted = wl.iter().any(|w| w.contains(&dst));
            let throttled = match l4 {
                L4::Tcp => port == 443 || port == 53,
                L4::Udp => (8000..=8100).contains(&port) || port == 53,
                L4::Icmp(_) => false,
            };
            let want = if whitelisted {
                Some(CLASS_WHITELIST)
            } else if throttled {
                Some(CLASS_THROTTLED)
            } else {
                None
            };
            for options in [0, 3] {
                if options > 0 && dst.is_ipv6() {
                    continue;
                }
                let pkt = Packet::new(dst, l4, port, options);
                let got = classify(&k.shape, &pkt).and_then(|v| v.node.classid);
                assert_eq!(
                    got, want,
                    "case {case}: {dst} {l4:?} {port} options {options} whitelist {wl:?}"
                );
            }
        }
    }
}

#[test]
fn plan_prints_reviewable_tc_commands() {
    let desired = plan(&incident(), LeafChoice::Sfq);
    let cmds: Vec<String> = diff(&Shape::default(), &desired)
        .iter()
        .map(|op| node_shaper::render::tc_command(op, "enp1s0"))
        .collect();
    assert_eq!(
        cmds[0],
        "tc qdisc add dev enp1s0 root handle e9: htb default 20 r2q 10"
    );
    assert!(cmds
        .iter()
        .any(|c| c == "tc qdisc replace dev enp1s0 parent e9:10 handle 10: sfq perturb 10"));
    assert!(
        cmds.iter().any(|c| c.contains(
            "classid e9:30 ht 104:a: match u32 0xcb00710a 0xffffffff at 16  # spec.whitelist[0]"
        )),
        "{cmds:#?}"
    );
    assert!(cmds
        .iter()
        .any(|c| c.contains("link 200: offset at 0 mask 0x0f00 shift 6 eat")));
}

#[test]
fn a_long_bucket_splits_into_its_own_second_level_table() {
    // 5,000 hosts that all end in .1 would fill one bucket of the /32 table
    // (beyond u32's 4,094 node ids): they move into that bucket's own
    // table, keyed on the third byte.
    let wl: Vec<String> = (0..5000u32)
        .map(|i| format!("10.{}.{}.1/32", i >> 8, i & 0xff))
        .collect();
    let shape = plan(&spec_with(&wl, "[{port: 443}]"), LeafChoice::Sfq);
    assert!(node_shaper::diff::overfull_buckets(&shape).is_empty());
    let p14 = shape.prios.iter().find(|p| p.prio == 14).expect("prio 14");
    assert_eq!(p14.tables.len(), 2);
    let spill = p14.tables[1].handle;
    assert_eq!(spill, 0x501 << 20);
    let links: Vec<_> = p14
        .filters
        .iter()
        .filter(|n| n.link == Some(spill))
        .collect();
    assert_eq!(links.len(), 1, "one link, in bucket 1 of the first level");
    assert_eq!(
        (links[0].table, links[0].bucket),
        (Table::User(0x104 << 20), 1)
    );
    // Every listed host is whitelisted, the hosts around them are not.
    for (dst, want) in [
        ("10.0.0.1", Some(CLASS_WHITELIST)),
        ("10.19.135.1", Some(CLASS_WHITELIST)),
        ("10.19.136.1", Some(CLASS_THROTTLED)),
        ("10.0.0.2", Some(CLASS_THROTTLED)),
    ] {
        let got = classify(
            &shape,
            &Packet::new(dst.parse().expect("ip"), L4::Tcp, 443, 0),
        )
        .and_then(|v| v.node.classid);
        assert_eq!(got, want, "{dst}");
    }
    // Entries that share both bytes still cannot fit: reported, not planned wrong.
    let same: Vec<String> = (0..5000u32)
        .map(|i| format!("{}.{}.0.1/32", 11 + i / 250, i % 250))
        .collect();
    let shape = plan(&spec_with(&same, "[{port: 443}]"), LeafChoice::Sfq);
    let full = node_shaper::diff::overfull_buckets(&shape);
    assert_eq!(full.len(), 1);
    assert_eq!(
        (full[0].0, full[0].1, full[0].2, full[0].3),
        (14, Table::User(0x501 << 20), 0, 5000)
    );
    // From scratch, the entries go in before the link that leads to them.
    let ops = diff(
        &Shape::default(),
        &plan(&spec_with(&wl, "[{port: 443}]"), LeafChoice::Sfq),
    );
    let pos = |f: &dyn Fn(&Op) -> bool| ops.iter().position(f).expect("op");
    let link =
        pos(&|o| matches!(o, Op::AddFilter { filter: node, .. } if node.link == Some(spill)));
    let entry = ops
        .iter()
        .rposition(
            |o| matches!(o, Op::AddFilter { filter: node, .. } if node.table == Table::User(spill)),
        )
        .expect("entry");
    assert!(entry < link);
}

/// `spec.protect` entries with ports: only those ports of those destinations
/// bypass every class (HTB direct), ahead of the whitelist and the throttle;
/// other ports of the same destination are classified as usual.
#[test]
fn protected_ports_go_direct_and_nothing_else_does() {
    let text = "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: t}\nspec:\n  uplink: {rate: 20Mbit}\n  throttle:\n    rate: 1Mbit\n    destinations: [{protocol: TCP, port: 443}, {protocol: Any, port: 53}]\n  whitelist: [198.51.100.0/24]\n  protect:\n    - {cidr: 198.51.100.7/32, protocol: TCP, port: 443, reason: partner API}\n    - {cidr: 2001:db8:53::/48, protocol: Any, port: 53, reason: resolvers}\n    - {cidr: 203.0.113.0/24, port: 8000, endPort: 8100}\n";
    let g = parse_str(text).expect("parse");
    let spec = validate(&g[0].spec).expect("valid");
    assert_eq!(spec.protect_ports.len(), 3);
    let shape = plan(&spec, LeafChoice::Sfq);
    let cases: &[(&str, L4, u16, Option<u32>)] = &[
        // A whitelisted network's protected port: direct, ahead of the whitelist.
        ("198.51.100.7", L4::Tcp, 443, Some(CLASS_PROTECTED)),
        ("198.51.100.7", L4::Tcp, 80, Some(CLASS_WHITELIST)),
        ("198.51.100.8", L4::Tcp, 443, Some(CLASS_WHITELIST)),
        ("198.51.100.7", L4::Udp, 443, Some(CLASS_WHITELIST)),
        ("2001:db8:53::1", L4::Udp, 53, Some(CLASS_PROTECTED)),
        ("2001:db8:53::1", L4::Tcp, 53, Some(CLASS_PROTECTED)),
        ("2001:db8:54::1", L4::Udp, 53, Some(CLASS_THROTTLED)),
        ("2001:db8:53::1", L4::Tcp, 443, Some(CLASS_THROTTLED)),
        ("203.0.113.9", L4::Tcp, 8050, Some(CLASS_PROTECTED)),
        ("203.0.113.9", L4::Udp, 8050, None),
        ("203.0.113.9", L4::Tcp, 8101, None),
        ("192.0.2.1", L4::Tcp, 443, Some(CLASS_THROTTLED)),
    ];
    for (dst, l4, port, want) in cases {
        let dst: IpAddr = dst.parse().expect("address");
        for options in [0, 3] {
            if options > 0 && dst.is_ipv6() {
                continue;
            }
            let got = classify(&shape, &Packet::new(dst, *l4, *port, options))
                .and_then(|v| v.node.classid);
            assert_eq!(got, *want, "{dst} {l4:?} {port} options {options}");
        }
    }
    // Idempotent: planning the same spec twice diffs to nothing.
    assert!(diff(&shape, &plan(&spec, LeafChoice::Sfq)).is_empty());
}

/// A fleet-sized mixed list (/16, /24, /32, IPv6 /48, /64, /128): long
/// buckets split into their own tables, and classification through both
/// levels is exact: every listed network is whitelisted, its neighbours are not.
#[test]
fn split_buckets_classify_exactly() {
    let mut wl = Vec::new();
    // Hashed bytes take 40 values, so buckets hold ~125 entries and split.
    for i in 0..30_000u32 {
        let (a, b, c) = (11 + i % 200, (i * 7) % 40, (i * 13) % 40);
        let w = (i % 40) | (((i / 40) % 256) << 8);
        wl.push(match i % 6 {
            0 => format!("{a}.{}.{}.{}/32", i % 256, (i / 256) % 256, i % 40),
            1 => format!("{a}.{}.{c}.0/24", (i / 7) % 256),
            2 => format!("{a}.{b}.0.0/16"),
            3 => format!("2001:db8:{w:x}::/48"),
            4 => format!("2001:db8:{:x}:{w:x}::/64", i % 4096),
            _ => format!("2001:db8:1:2::{w:x}/128"),
        });
    }
    wl.sort();
    wl.dedup();
    let shape = plan(&spec_with(&wl, "[{port: 443}]"), LeafChoice::Sfq);
    assert!(node_shaper::diff::overfull_buckets(&shape).is_empty());
    let split_tables: usize = shape
        .prios
        .iter()
        .map(|p| {
            p.tables
                .iter()
                .filter(|t| (t.handle >> 20) < 0x101 || (t.handle >> 20) >= 0x300)
                .count()
        })
        .sum();
    assert!(split_tables >= 80, "only {split_tables} split tables");
    let class = |dst: &str| {
        classify(
            &shape,
            &Packet::new(dst.parse().expect("ip"), L4::Tcp, 443, 0),
        )
        .and_then(|v| v.node.classid)
    };
    for w in wl.iter().step_by(7) {
        let (addr, _) = w.split_once('/').expect("cidr");
        assert_eq!(class(addr), Some(CLASS_WHITELIST), "{w}");
    }
    for miss in ["223.1.2.3", "10.0.0.1", "2001:db8:ffff::1", "2001:db9::1"] {
        assert_eq!(class(miss), Some(CLASS_THROTTLED), "{miss}");
    }
}

fn spec_from(extra: &str) -> ValidSpec {
    let text = format!("apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: t}}\nspec:\n  uplink: {{rate: 20Mbit}}\n  throttle:\n    rate: 1Mbit\n    destinations: [{{protocol: TCP, port: 443}}]\n  whitelist: [198.51.100.0/24, 2001:db8:1::/48]\n  protect: [{{cidr: 192.0.2.53/32}}]\n{extra}");
    let g = parse_str(&text).expect("parse");
    validate(&g[0].spec).expect("valid")
}

/// The plan as the agent makes it: `spec.protect` joins the protected list.
fn plan_as_enforced(spec: &ValidSpec, extra: &[(&str, &str)]) -> Shape {
    let protected: Vec<_> = extra
        .iter()
        .map(|(net, why)| (net.parse().expect("net"), why.to_string()))
        .chain(spec.protect.iter().cloned())
        .map(|(net, reason)| node_shaper::plan::Protected { net, reason })
        .collect();
    node_shaper::plan::plan_protected(spec, &protected, LeafChoice::Sfq)
}

/// No filter sends anything to HTB's direct queue (`e9:0`, held to no rate):
/// protected destinations and SSH replies have lanes with ceilings.
#[test]
fn nothing_is_classified_to_the_unlimited_direct_queue() {
    for extra in ["", "  mode: Auto\n  quarantine: {triggers: [{name: a, alertmanager: {matchers: {alertname: X}}}]}\n"] {
        let s = plan_as_enforced(&spec_from(extra), &[("10.96.0.1/32", "kubernetes API endpoint")]);
        let to_root: Vec<_> = s
            .prios
            .iter()
            .flat_map(|p| p.filters.iter())
            .filter(|f| f.classid == Some(ROOT))
            .collect();
        assert!(to_root.is_empty(), "{to_root:#?}");
        let ask = |dst: &str, l4: L4, port: u16, from: u16| {
            let pkt = Packet::new(dst.parse().expect("address"), l4, port, 0).from_port(from);
            classify(&s, &pkt).and_then(|v| v.node.classid)
        };
        assert_eq!(ask("10.96.0.1", L4::Tcp, 6443, 40000), Some(CLASS_PROTECTED));
        assert_eq!(ask("192.0.2.53", L4::Udp, 53, 40000), Some(CLASS_PROTECTED));
        // A reply from local port 22, even to a throttled destination: the SSH lane.
        assert_eq!(ask("203.0.113.9", L4::Tcp, 443, 22), Some(CLASS_SSH));
        assert_eq!(ask("2001:db8:9::1", L4::Tcp, 443, 22), Some(CLASS_SSH));
        assert_eq!(ask("203.0.113.9", L4::Udp, 443, 22), None.or(s.prios.iter().any(|p| p.prio == PRIO_V4_ALL).then_some(CLASS_THROTTLED)));
    }
}

/// `quarantine.throttle: AllButWhitelisted` (the default in Auto): every
/// packet to an unlisted port or protocol is throttled, the whitelist,
/// protected destinations, SSH and IPv6 neighbour discovery are not.
#[test]
fn a_quarantine_throttles_every_port_and_protocol_but_the_whitelist() {
    let auto = "  mode: Auto\n  quarantine: {triggers: [{name: a, alertmanager: {matchers: {alertname: X}}}]}\n";
    let all = plan_as_enforced(&spec_from(auto), &[]);
    let listed = plan_as_enforced(
        &spec_from(&auto.replace("triggers:", "throttle: ListedPorts, triggers:")),
        &[],
    );
    // (destination, l4, port, class under AllButWhitelisted, under ListedPorts)
    type Case = (&'static str, L4, u16, Option<u32>, Option<u32>);
    let cases: &[Case] = &[
        (
            "203.0.113.9",
            L4::Tcp,
            443,
            Some(CLASS_THROTTLED),
            Some(CLASS_THROTTLED),
        ),
        ("203.0.113.9", L4::Tcp, 8443, Some(CLASS_THROTTLED), None),
        ("203.0.113.9", L4::Udp, 53, Some(CLASS_THROTTLED), None),
        ("203.0.113.9", L4::Icmp(8), 0, Some(CLASS_THROTTLED), None),
        ("2001:db8:9::1", L4::Udp, 4500, Some(CLASS_THROTTLED), None),
        (
            "2001:db8:9::1",
            L4::Icmp(128),
            0,
            Some(CLASS_THROTTLED),
            None,
        ),
        // Neighbour solicitation and advertisement stay ordinary.
        (
            "ff02::1:ff00:1",
            L4::Icmp(135),
            0,
            Some(CLASS_DEFAULT),
            None,
        ),
        ("fe80::1", L4::Icmp(136), 0, Some(CLASS_DEFAULT), None),
        (
            "198.51.100.7",
            L4::Udp,
            9999,
            Some(CLASS_WHITELIST),
            Some(CLASS_WHITELIST),
        ),
        (
            "198.51.100.7",
            L4::Icmp(8),
            0,
            Some(CLASS_WHITELIST),
            Some(CLASS_WHITELIST),
        ),
        (
            "2001:db8:1::5",
            L4::Tcp,
            8443,
            Some(CLASS_WHITELIST),
            Some(CLASS_WHITELIST),
        ),
        (
            "192.0.2.53",
            L4::Udp,
            53,
            Some(CLASS_PROTECTED),
            Some(CLASS_PROTECTED),
        ),
    ];
    for (dst, l4, port, want_all, want_listed) in cases {
        let pkt = Packet::new(dst.parse().expect("address"), *l4, *port, 0);
        let got = |s| classify(s, &pkt).and_then(|v| v.node.classid);
        assert_eq!(
            got(&all),
            *want_all,
            "AllButWhitelisted: {dst} {l4:?} {port}"
        );
        assert_eq!(
            got(&listed),
            *want_listed,
            "ListedPorts: {dst} {l4:?} {port}"
        );
    }
}

/// With the interface's addresses known, the SSH lane takes TCP from port 22
/// of those addresses only; from any other source (a forwarded or routed
/// pod's packet) port 22 is ordinary traffic, throttled like any other.
#[test]
fn ssh_replies_come_from_the_interfaces_own_addresses() {
    let spec = spec_from("");
    let from22 =
        |dst: &str| Packet::new(dst.parse().expect("address"), L4::Tcp, 443, 0).from_port(22);
    // The simulator's packets come from 192.0.2.1 and 2000::.
    let own: Vec<IpAddr> = vec![
        "192.0.2.1".parse().expect("ip"),
        "2000::".parse().expect("ip"),
    ];
    let other: Vec<IpAddr> = vec![
        "10.0.0.5".parse().expect("ip"),
        "2001:db8::5".parse().expect("ip"),
    ];
    for (local, want) in [(&own, Some(CLASS_SSH)), (&other, Some(CLASS_THROTTLED))] {
        let s = node_shaper::plan::plan_host(&spec, &[], LeafChoice::Sfq, local);
        for dst in ["203.0.113.9", "2001:db8:9::1"] {
            let got = classify(&s, &from22(dst)).and_then(|v| v.node.classid);
            assert_eq!(got, want, "{dst} from port 22 with local {local:?}");
        }
    }
    // Too many addresses (an IPVS dummy): any source, like no address at all.
    let many: Vec<IpAddr> = (1..=20u8).map(|i| IpAddr::from([10, 0, 0, i])).collect();
    let s = node_shaper::plan::plan_host(&spec, &[], LeafChoice::Sfq, &many);
    assert_eq!(
        classify(&s, &from22("203.0.113.9")).and_then(|v| v.node.classid),
        Some(CLASS_SSH)
    );
}
