//! Operations as the `tc` commands a reviewer would type (`node-shaper plan`).

use crate::diff::Op;
use crate::model::*;

fn proto_name(p: u16) -> &'static str {
    if p == ETH_P_IPV6 {
        "ipv6"
    } else {
        "ip"
    }
}

fn rate(bps: u64) -> String {
    egressguard_crds::units::Rate::from_bits_per_sec(bps * 8).to_string()
}

fn burst_bytes(ticks: u32, rate: u64) -> u64 {
    (u128::from(ticks) * 64 * u128::from(rate) / 1_000_000_000) as u64
}

fn table_id(h: u32) -> String {
    format!("{:x}:", h >> 20)
}

fn selector_words(sel: &Selector) -> String {
    let mut w = Vec::new();
    if sel.flags & U32_VAROFFSET != 0 {
        w.push(format!(
            "offset at {} mask {:#06x} shift {}",
            sel.offoff, sel.offmask, sel.offshift
        ));
    } else if sel.flags & U32_OFFSET != 0 {
        w.push(format!("offset plus {}", sel.off));
    }
    if sel.flags & U32_EAT != 0 {
        w.push("eat".into());
    }
    for k in &sel.keys {
        let at = if k.offmask != 0 {
            format!("nexthdr+{}", k.off)
        } else {
            k.off.to_string()
        };
        w.push(format!(
            "match u32 {:#010x} {:#010x} at {at}",
            k.val, k.mask
        ));
    }
    w.join(" ")
}

fn comment(o: &Origin) -> String {
    match o {
        Origin::Whitelist { group, index } => {
            format!("  # {}", Origin::whitelist_field(group.as_deref(), *index))
        }
        Origin::Protected(i) => format!("  # protected[{i}]"),
        Origin::Destination(i) => format!("  # spec.throttle.destinations[{i}]"),
        Origin::Link(what) => format!("  # {what}"),
        Origin::Portless(what) => format!("  # spec.throttle.portless: {what}"),
        Origin::Quarantine(what) => format!("  # spec.quarantine.throttle: {what}"),
        Origin::SshReplies => {
            "  # spec.protectSshReplies: TCP source port 22, ssh lane".to_string()
        }
        Origin::ProtectedPort(i) => format!("  # spec.protect[{i}]: ports, protected lane"),
        Origin::Unknown => String::new(),
    }
}

/// One `tc` command per operation.
pub fn tc_command(op: &Op, dev: &str) -> String {
    let filter = |verb: &str, prio: u16, proto: u16| {
        format!(
            "tc filter {verb} dev {dev} parent e9: prio {prio} protocol {}",
            proto_name(proto)
        )
    };
    match op {
        Op::AddRoot { root, graft } => format!(
            "tc qdisc {} dev {dev} root handle {} htb default {:x} r2q {}",
            if *graft { "replace" } else { "add" },
            fmt_handle(root.handle),
            root.defcls,
            root.r2q
        ),
        Op::DelRoot => format!("tc qdisc del dev {dev} root handle e9:"),
        Op::PutClass(c) => format!(
            "tc class replace dev {dev} parent {} classid {} htb rate {} ceil {} burst {}b cburst {}b quantum {} prio {}",
            fmt_handle(c.parent),
            fmt_handle(c.classid),
            rate(c.rate),
            rate(c.ceil),
            burst_bytes(c.buffer, c.rate),
            burst_bytes(c.cbuffer, c.ceil),
            c.quantum,
            c.prio
        ),
        Op::DelClass(id) => format!("tc class del dev {dev} classid {}", fmt_handle(*id)),
        Op::PutLeaf(l) => {
            let kind = match &l.kind {
                LeafKind::Sfq { perturb } => format!("sfq perturb {perturb}"),
                other => other.kind().to_string(),
            };
            format!("tc qdisc replace dev {dev} parent {} handle {} {kind}", fmt_handle(l.parent), fmt_handle(l.handle))
        }
        Op::AddTable { prio, protocol, table } => format!(
            "{} handle {} u32 divisor {}",
            filter("add", *prio, *protocol),
            table_id(table.handle),
            table.divisor
        ),
        Op::DelTable { prio, protocol, handle } | Op::SweepTable { prio, protocol, handle } => {
            format!("{} handle {} u32", filter("del", *prio, *protocol), table_id(*handle))
        }
        Op::AddFilter { prio, protocol, filter: node } => {
            u32_filter(filter("add", *prio, *protocol), node, None)
        }
        Op::ChangeFilter { prio, protocol, handle, filter: node } => {
            u32_filter(filter("replace", *prio, *protocol), node, Some(*handle))
        }
        Op::Unlink { prio, protocol, handle } => {
            format!("{} handle {} u32 link 0", filter("change", *prio, *protocol), fmt_u32_handle(*handle))
        }
        Op::DelFilter { prio, protocol, handle } => {
            format!("{} handle {} u32", filter("del", *prio, *protocol), fmt_u32_handle(*handle))
        }
        Op::DelPrio { prio, protocol } => filter("del", *prio, *protocol),
    }
}

/// `head` (`tc filter add|replace dev ... protocol ...`) followed by the
/// u32 node: its handle, classid or link (with its hash key), `ht` for a
/// new node in a user table, the match words and where it comes from.
/// `changed`: the handle of the node replaced in place (it keeps its table).
fn u32_filter(mut s: String, node: &Filter, changed: Option<u32>) -> String {
    match (changed, node.table) {
        (Some(handle), _) => s.push_str(&format!(" handle {}", fmt_u32_handle(handle))),
        (None, Table::User(t)) => {
            s.push_str(&format!(
                " handle {:x}:{:x}:{:x}",
                t >> 20,
                node.bucket,
                node.id.unwrap_or(0)
            ));
        }
        (None, Table::Root) => s.push_str(&format!(" handle ::{:x}", node.id.unwrap_or(0))),
    }
    s.push_str(" u32");
    if let Some(c) = node.classid {
        s.push_str(&format!(" classid {}", fmt_handle(c)));
    }
    if let Some(l) = node.link {
        s.push_str(&format!(" link {}", table_id(l)));
        if node.sel.hmask != 0 {
            s.push_str(&format!(
                " hashkey mask {:#010x} at {}",
                node.sel.hmask, node.sel.hoff
            ));
        }
    }
    if let (Table::User(t), None) = (node.table, changed) {
        s.push_str(&format!(" ht {:x}:{:x}:", t >> 20, node.bucket));
    }
    s.push(' ');
    s.push_str(&selector_words(&node.sel));
    s.push_str(&comment(&node.origin));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind of operation reads as the tc command it mirrors.
    #[test]
    fn each_operation_reads_as_its_tc_command() {
        let entry = Filter {
            table: Table::User(0x103 << 20),
            bucket: 0x64,
            id: Some(2),
            sel: Selector {
                flags: U32_TERMINAL,
                keys: vec![Key {
                    mask: 0xffff_ff00,
                    val: 0xc633_6400,
                    off: 16,
                    offmask: 0,
                }],
                ..Selector::default()
            },
            classid: Some(0x00e9_0030),
            link: None,
            origin: Origin::Whitelist {
                group: None,
                index: 0,
            },
        };
        let link = Filter {
            table: Table::Root,
            bucket: 0,
            id: Some(1),
            sel: Selector {
                hoff: 16,
                hmask: 0xff,
                ..Selector::default()
            },
            classid: None,
            link: Some(0x103 << 20),
            origin: Origin::Link("whitelist /24"),
        };
        let (prio, protocol, handle) = (13, ETH_P_IP, 0x1036_4002);
        let ops = [
            Op::AddFilter {
                prio,
                protocol,
                filter: entry.clone(),
            },
            Op::AddFilter {
                prio,
                protocol,
                filter: link,
            },
            Op::ChangeFilter {
                prio,
                protocol,
                handle,
                filter: entry,
            },
            Op::Unlink {
                prio,
                protocol: ETH_P_IPV6,
                handle,
            },
            Op::DelFilter {
                prio,
                protocol,
                handle,
            },
            Op::SweepTable {
                prio,
                protocol,
                handle: 0x103 << 20,
            },
            Op::DelPrio { prio, protocol },
        ];
        let got: Vec<String> = ops.iter().map(|op| tc_command(op, "eth0")).collect();
        let want = [
            "tc filter add dev eth0 parent e9: prio 13 protocol ip handle 103:64:2 u32 classid e9:30 ht 103:64: match u32 0xc6336400 0xffffff00 at 16  # spec.whitelist[0]",
            "tc filter add dev eth0 parent e9: prio 13 protocol ip handle ::1 u32 link 103: hashkey mask 0x000000ff at 16   # whitelist /24",
            "tc filter replace dev eth0 parent e9: prio 13 protocol ip handle 103:64:2 u32 classid e9:30 match u32 0xc6336400 0xffffff00 at 16  # spec.whitelist[0]",
            "tc filter change dev eth0 parent e9: prio 13 protocol ipv6 handle 103:64:2 u32 link 0",
            "tc filter del dev eth0 parent e9: prio 13 protocol ip handle 103:64:2 u32",
            "tc filter del dev eth0 parent e9: prio 13 protocol ip handle 103: u32",
            "tc filter del dev eth0 parent e9: prio 13 protocol ip",
        ];
        assert_eq!(got, want);
    }
}
