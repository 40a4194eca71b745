//! Netlink conformance: each request node-shaper sends is compared byte for
//! byte with what iproute2's `tc` sends for the equivalent command, captured
//! with strace by `scripts/capture-tc-fixtures.sh` (fixtures in
//! `tests/fixtures/tc`). Sequence numbers and port ids are zeroed on both
//! sides; the ifindex is taken from the capture. This is how the SFQ encoding
//! is proven on a kernel that has no sch_sfq.
//!
//! One deliberate difference: tc sends 1 KiB rate tables (TCA_HTB_RTAB/CTAB)
//! with every HTB class; kernels >= 3.8 ignore them when the ratespec says
//! "ethernet", so node-shaper omits them. The comparison strips them from
//! tc's bytes (fixing the lengths) and everything else must be identical.

use std::net::IpAddr;

use node_shaper::diff::Op;
use node_shaper::layout::*;
use node_shaper::model::*;
use node_shaper::netlink::encode;
use node_shaper::plan::{dst_keys, hash_key, l4_link};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/tc/{name}.hex",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(|l| l.split_whitespace())
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn zero_seq_pid(b: &mut [u8]) {
    b[8..16].fill(0);
}

/// Removes TCA_HTB_RTAB (4) and TCA_HTB_CTAB (3) from the TCA_OPTIONS of an HTB class request.
fn strip_rate_tables(b: &[u8]) -> Vec<u8> {
    let mut out = b[..36].to_vec(); // nlmsghdr + tcmsg
    let mut off = 36;
    while off + 4 <= b.len() {
        let len = u16::from_le_bytes([b[off], b[off + 1]]) as usize;
        let kind = u16::from_le_bytes([b[off + 2], b[off + 3]]);
        let aligned = (len + 3) & !3;
        if kind == 2 {
            let mut inner = Vec::new();
            let mut i = off + 4;
            while i + 4 <= off + len {
                let ilen = u16::from_le_bytes([b[i], b[i + 1]]) as usize;
                let ikind = u16::from_le_bytes([b[i + 2], b[i + 3]]);
                let ialigned = (ilen + 3) & !3;
                if ikind != 3 && ikind != 4 {
                    inner.extend_from_slice(&b[i..i + ialigned]);
                }
                i += ialigned;
            }
            out.extend_from_slice(&((inner.len() + 4) as u16).to_le_bytes());
            out.extend_from_slice(&2u16.to_le_bytes());
            out.extend(inner);
        } else {
            out.extend_from_slice(&b[off..off + aligned]);
        }
        off += aligned;
    }
    let total = out.len() as u32;
    out[0..4].copy_from_slice(&total.to_le_bytes());
    out
}

fn hex(b: &[u8]) -> String {
    b.chunks(16)
        .map(|c| {
            c.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_conforms(name: &str, op: Op) {
    let mut want = fixture(name);
    let ifindex = le32(&want, 20) as i32;
    if name.starts_with("class_htb") {
        want = strip_rate_tables(&want);
    }
    zero_seq_pid(&mut want);
    let req = encode(&op, ifindex, "cap0");
    let mut got = vec![0u8; req.message.buffer_len()];
    req.message.serialize(&mut got);
    zero_seq_pid(&mut got);
    assert_eq!(
        got,
        want,
        "{name}: ours\n{}\n---- tc\n{}",
        hex(&got),
        hex(&want)
    );
}

fn class(classid: u32, parent: u32, rate: u64, buffer: u32, quantum: u32, prio: u32) -> Class {
    Class {
        classid,
        parent,
        rate,
        ceil: rate,
        buffer,
        cbuffer: buffer,
        quantum,
        prio,
    }
}

fn node(table: Table, bucket: u8, id: u32, keys: Vec<Key>, classid: u32) -> Filter {
    Filter {
        table,
        bucket,
        id: Some(id),
        sel: Selector {
            flags: U32_TERMINAL,
            keys,
            ..Selector::default()
        },
        classid: Some(classid),
        link: None,
        origin: Origin::Unknown,
    }
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().expect("test CIDR")
}

fn hash_link(v4: bool, byte: usize, table: u32) -> Filter {
    let (hoff, hmask) = hash_key(v4, byte);
    Filter {
        table: Table::Root,
        bucket: 0,
        id: Some(1),
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
        link: Some(table),
        origin: Origin::Unknown,
    }
}

fn with_id(mut n: Filter, id: u32) -> Filter {
    n.id = Some(id);
    n
}

fn port(table: u32, id: u32, value: u32, mask: u32) -> Filter {
    node(
        Table::User(table),
        0,
        id,
        vec![Key {
            mask,
            val: value,
            off: 0,
            offmask: 0,
        }],
        CLASS_THROTTLED,
    )
}

#[test]
fn htb_root_qdisc() {
    assert_conforms(
        "qdisc_htb_root",
        Op::AddRoot {
            root: Root {
                handle: ROOT,
                defcls: DEFCLS,
                r2q: R2Q,
            },
            graft: false,
        },
    );
}

#[test]
fn htb_classes() {
    assert_conforms(
        "class_htb_throttled",
        Op::PutClass(class(
            CLASS_THROTTLED,
            CLASS_UPLINK,
            125_000,
            128_000,
            1514,
            2,
        )),
    );
    assert_conforms(
        "class_htb_uplink",
        Op::PutClass(class(CLASS_UPLINK, ROOT, 2_500_000, 96_000, 200_000, 0)),
    );
    // 40gbit does not fit tc_ratespec's u32: RATE64/CEIL64 come first.
    assert_conforms(
        "class_htb_rate64",
        Op::PutClass(class(
            CLASS_DEFAULT,
            CLASS_UPLINK,
            5_000_000_000,
            15_625,
            200_000,
            1,
        )),
    );
}

#[test]
fn leaf_qdiscs() {
    let sfq = Leaf {
        handle: leaf_handle(CLASS_THROTTLED, true),
        parent: CLASS_THROTTLED,
        kind: LeafKind::Sfq { perturb: 10 },
    };
    assert_conforms("qdisc_sfq_leaf", Op::PutLeaf(sfq));
    let pfifo = Leaf {
        handle: leaf_handle(CLASS_THROTTLED, false),
        parent: CLASS_THROTTLED,
        kind: LeafKind::Pfifo,
    };
    assert_conforms("qdisc_pfifo_leaf", Op::PutLeaf(pfifo));
}

#[test]
fn whitelist_hash_tables_and_entries() {
    let t104 = 0x104 << 20;
    assert_conforms(
        "filter_table_v4",
        Op::AddTable {
            prio: 14,
            protocol: ETH_P_IP,
            table: HashTable {
                handle: t104,
                divisor: 256,
            },
        },
    );
    assert_conforms(
        "filter_link_v4_hash",
        Op::AddFilter {
            prio: 14,
            protocol: ETH_P_IP,
            filter: hash_link(true, 3, t104),
        },
    );
    let host = node(
        Table::User(t104),
        0x0a,
        1,
        dst_keys(&net("203.0.113.10/32")),
        CLASS_WHITELIST,
    );
    assert_conforms(
        "filter_v4_host",
        Op::AddFilter {
            prio: 14,
            protocol: ETH_P_IP,
            filter: host,
        },
    );
    let n24 = node(
        Table::User(0x103 << 20),
        0x64,
        1,
        dst_keys(&net("198.51.100.0/24")),
        CLASS_WHITELIST,
    );
    assert_conforms(
        "filter_v4_net24",
        Op::AddFilter {
            prio: 13,
            protocol: ETH_P_IP,
            filter: n24,
        },
    );
    assert_conforms(
        "filter_link_v6_hash",
        Op::AddFilter {
            prio: 23,
            protocol: ETH_P_IPV6,
            filter: hash_link(false, 5, 0x113 << 20),
        },
    );
    let n48 = node(
        Table::User(0x113 << 20),
        1,
        1,
        dst_keys(&net("2001:db8:1::/48")),
        CLASS_WHITELIST,
    );
    assert_conforms(
        "filter_v6_net48",
        Op::AddFilter {
            prio: 23,
            protocol: ETH_P_IPV6,
            filter: n48,
        },
    );
    let h128 = node(
        Table::User(0x115 << 20),
        0x42,
        1,
        dst_keys(&net("2001:db8::42/128")),
        CLASS_WHITELIST,
    );
    assert_conforms(
        "filter_v6_host",
        Op::AddFilter {
            prio: 25,
            protocol: ETH_P_IPV6,
            filter: h128,
        },
    );
}

#[test]
fn throttle_links_and_ports() {
    assert_conforms(
        "filter_link_v4_tcp",
        Op::AddFilter {
            prio: 40,
            protocol: ETH_P_IP,
            filter: with_id(l4_link(true, 6, TABLE_V4_TCP), 1),
        },
    );
    assert_conforms(
        "filter_link_v4_udp",
        Op::AddFilter {
            prio: 40,
            protocol: ETH_P_IP,
            filter: with_id(l4_link(true, 17, TABLE_V4_UDP), 2),
        },
    );
    assert_conforms(
        "filter_link_v6_tcp",
        Op::AddFilter {
            prio: 41,
            protocol: ETH_P_IPV6,
            filter: with_id(l4_link(false, 6, TABLE_V6_TCP), 1),
        },
    );
    assert_conforms(
        "filter_port_443",
        Op::AddFilter {
            prio: 40,
            protocol: ETH_P_IP,
            filter: port(TABLE_V4_TCP, 2, 443, 0xffff),
        },
    );
    assert_conforms(
        "filter_port_block",
        Op::AddFilter {
            prio: 40,
            protocol: ETH_P_IP,
            filter: port(TABLE_V4_UDP, 1, 8000, 0xffe0),
        },
    );
    let mut changed = port(TABLE_V4_TCP, 2, 443, 0xffff);
    changed.classid = Some(CLASS_WHITELIST);
    assert_conforms(
        "filter_change_node",
        Op::ChangeFilter {
            prio: 40,
            protocol: ETH_P_IP,
            handle: TABLE_V4_TCP | 2,
            filter: changed,
        },
    );
}

#[test]
fn deletes() {
    assert_conforms(
        "filter_del_node",
        Op::DelFilter {
            prio: 14,
            protocol: ETH_P_IP,
            handle: (0x104 << 20) | (0x0a << 12) | 1,
        },
    );
    assert_conforms(
        "filter_del_table",
        Op::DelTable {
            prio: 14,
            protocol: ETH_P_IP,
            handle: 0x104 << 20,
        },
    );
    assert_conforms(
        "filter_del_prio",
        Op::DelPrio {
            prio: 14,
            protocol: ETH_P_IP,
        },
    );
    assert_conforms("class_del", Op::DelClass(CLASS_THROTTLED));
    assert_conforms("qdisc_del_root", Op::DelRoot);
}

#[test]
fn planned_keys_match_tc_match_syntax() {
    // `match ip6 dst 2001:db8:1::/48` is two keys; tc_u32 keys carry masked values.
    let k = dst_keys(&net("2001:db8:1::/48"));
    assert_eq!(
        k,
        vec![
            Key {
                mask: 0xffff_ffff,
                val: 0x2001_0db8,
                off: 24,
                offmask: 0
            },
            Key {
                mask: 0xffff_0000,
                val: 0x0001_0000,
                off: 28,
                offmask: 0
            },
        ]
    );
    let _ = IpAddr::from([0u8; 4]);
}
