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
    let filt = |prio: u16, proto: u16| {
        format!(
            "tc filter {{}} dev {dev} parent e9: prio {prio} protocol {}",
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
            filt(*prio, *protocol).replace("{}", "add"),
            table_id(table.handle),
            table.divisor
        ),
        Op::DelTable { prio, protocol, handle } | Op::SweepTable { prio, protocol, handle } => {
            format!("{} handle {} u32", filt(*prio, *protocol).replace("{}", "del"), table_id(*handle))
        }
        Op::AddFilter { prio, protocol, filter: node } | Op::ChangeFilter { prio, protocol, filter: node, .. } => {
            let verb = if matches!(op, Op::AddFilter { .. }) { "add" } else { "replace" };
            let mut s = filt(*prio, *protocol).replace("{}", verb);
            match (op, node.table) {
                (Op::ChangeFilter { handle, .. }, _) => s.push_str(&format!(" handle {}", fmt_u32_handle(*handle))),
                (_, Table::User(t)) => {
                    s.push_str(&format!(" handle {:x}:{:x}:{:x}", t >> 20, node.bucket, node.id.unwrap_or(0)));
                }
                (_, Table::Root) => s.push_str(&format!(" handle ::{:x}", node.id.unwrap_or(0))),
            }
            s.push_str(" u32");
            if let Some(c) = node.classid {
                s.push_str(&format!(" classid {}", fmt_handle(c)));
            }
            if let Some(l) = node.link {
                s.push_str(&format!(" link {}", table_id(l)));
                if node.sel.hmask != 0 {
                    s.push_str(&format!(" hashkey mask {:#010x} at {}", node.sel.hmask, node.sel.hoff));
                }
            }
            if let (Table::User(t), Op::AddFilter { .. }) = (node.table, op) {
                s.push_str(&format!(" ht {:x}:{:x}:", t >> 20, node.bucket));
            }
            s.push(' ');
            s.push_str(&selector_words(&node.sel));
            s.push_str(&comment(&node.origin));
            s
        }
        Op::Unlink { prio, protocol, handle } => {
            format!("{} handle {} u32 link 0", filt(*prio, *protocol).replace("{}", "change"), fmt_u32_handle(*handle))
        }
        Op::DelFilter { prio, protocol, handle } => {
            format!("{} handle {} u32", filt(*prio, *protocol).replace("{}", "del"), fmt_u32_handle(*handle))
        }
        Op::DelPrio { prio, protocol } => filt(*prio, *protocol).replace("{}", "del"),
    }
}
