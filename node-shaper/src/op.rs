//! One kernel operation, as the differ plans it, the encoder sends it and
//! people read it: `Display` is the one rendering for `apply`'s list of
//! changes, logs and errors (`tc` syntax is [`crate::render`]'s).

use std::fmt;

use crate::model::*;

/// One kernel operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create our root qdisc; `graft` replaces a foreign root (`--force`).
    AddRoot {
        /// The qdisc.
        root: Root,
        /// Replace whatever root is there.
        graft: bool,
    },
    /// Delete our root qdisc, restoring the device default.
    DelRoot,
    /// Create or update an HTB class in place.
    PutClass(Class),
    /// Delete a class.
    DelClass(u32),
    /// Graft a leaf qdisc under a class (replaces the previous leaf).
    PutLeaf(Leaf),
    /// Create a u32 hash table.
    AddTable {
        /// Prio.
        prio: u16,
        /// Ethertype.
        protocol: u16,
        /// The table.
        table: HashTable,
    },
    /// Delete a u32 hash table.
    DelTable {
        /// Prio.
        prio: u16,
        /// Ethertype.
        protocol: u16,
        /// Table handle.
        handle: u32,
    },
    /// Create a u32 filter; `filter.id` is set.
    AddFilter {
        /// Prio.
        prio: u16,
        /// Ethertype.
        protocol: u16,
        /// The filter.
        filter: Filter,
    },
    /// Change classid/link of an existing filter (the kernel keeps its selector).
    ChangeFilter {
        /// Prio.
        prio: u16,
        /// Ethertype.
        protocol: u16,
        /// Full handle of the existing filter.
        handle: u32,
        /// The new content.
        filter: Filter,
    },
    /// Point a link filter at no table, releasing its reference, so the table
    /// can be deleted while the filter keeps its prio alive.
    Unlink {
        /// Prio.
        prio: u16,
        /// Ethertype.
        protocol: u16,
        /// Full handle.
        handle: u32,
    },
    /// Delete one u32 filter.
    DelFilter {
        /// Prio.
        prio: u16,
        /// Ethertype.
        protocol: u16,
        /// Full handle.
        handle: u32,
    },
    /// Delete a u32 hash table that may exist without being visible: a
    /// table whose prio was deleted (by a person, or a kernel that dropped an
    /// emptied prio) stays in the qdisc's u32 state, invisible to dumps, and
    /// blocks its handle forever. The kernel finds tables by handle across
    /// prios, so it is deleted through `prio`, one that exists. "Not found" is
    /// the expected outcome and not an error.
    SweepTable {
        /// An existing prio to reach the qdisc's u32 state through.
        prio: u16,
        /// Its ethertype.
        protocol: u16,
        /// Table handle.
        handle: u32,
    },
    /// Delete every filter of a prio.
    DelPrio {
        /// Prio.
        prio: u16,
        /// Ethertype.
        protocol: u16,
    },
}

impl Op {
    /// The filter prio an operation touches, if it is a filter operation.
    pub fn prio(&self) -> Option<u16> {
        match self {
            Op::AddTable { prio, .. }
            | Op::DelTable { prio, .. }
            | Op::AddFilter { prio, .. }
            | Op::ChangeFilter { prio, .. }
            | Op::Unlink { prio, .. }
            | Op::DelFilter { prio, .. }
            | Op::DelPrio { prio, .. } => Some(*prio),
            _ => None,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddRoot { root, .. } => {
                write!(f, "create htb root qdisc {}", fmt_handle(root.handle))
            }
            Op::DelRoot => write!(f, "delete root qdisc {}", fmt_handle(crate::layout::ROOT)),
            Op::PutClass(c) => write!(f, "set htb class {}", fmt_handle(c.classid)),
            Op::DelClass(id) => write!(f, "delete class {}", fmt_handle(*id)),
            Op::PutLeaf(l) => write!(
                f,
                "attach {} leaf {} under class {}",
                l.kind.kind(),
                fmt_handle(l.handle),
                fmt_handle(l.parent)
            ),
            Op::AddTable { prio, table, .. } => write!(
                f,
                "create u32 table {:x}: (prio {prio})",
                table.handle >> 20
            ),
            Op::DelTable { prio, handle, .. } => {
                write!(f, "delete u32 table {:x}: (prio {prio})", handle >> 20)
            }
            Op::SweepTable { prio, handle, .. } => write!(
                f,
                "sweep hidden u32 table {:x}: (through prio {prio})",
                handle >> 20
            ),
            Op::AddFilter {
                prio, filter: node, ..
            } => {
                write!(f, "add u32 filter {} (prio {prio})", Why(node))
            }
            Op::ChangeFilter { prio, handle, .. } => write!(
                f,
                "change u32 filter {} (prio {prio})",
                fmt_u32_handle(*handle)
            ),
            Op::Unlink { prio, handle, .. } => write!(
                f,
                "unlink u32 filter {} (prio {prio})",
                fmt_u32_handle(*handle)
            ),
            Op::DelFilter { prio, handle, .. } => write!(
                f,
                "delete u32 filter {} (prio {prio})",
                fmt_u32_handle(*handle)
            ),
            Op::DelPrio { prio, .. } => write!(f, "delete filter prio {prio}"),
        }
    }
}

/// Why a filter is added, in spec terms.
struct Why<'a>(&'a Filter);

impl fmt::Display for Why<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0.origin {
            Origin::Whitelist { group, index } => {
                write!(
                    f,
                    "for {}",
                    Origin::whitelist_field(group.as_deref(), *index)
                )
            }
            Origin::Protected(i) => write!(f, "for protected[{i}]"),
            Origin::Destination(i) => write!(f, "for spec.throttle.destinations[{i}]"),
            Origin::Link(l) => write!(f, "linking {l}"),
            Origin::Portless(what) => write!(f, "spec.throttle.portless ({what})"),
            Origin::Quarantine(what) => {
                write!(f, "spec.quarantine.throttle: AllButWhitelisted ({what})")
            }
            Origin::SshReplies => f.write_str("spec.protectSshReplies (TCP source port 22)"),
            Origin::ProtectedPort(i) => write!(f, "for spec.protect[{i}] (ports)"),
            Origin::Unknown => f.write_str("(restore)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_read_in_spec_terms() {
        let node = Filter {
            table: Table::User(0x104 << 20),
            bucket: 7,
            id: Some(3),
            sel: Selector::default(),
            classid: Some(0x00e9_0030),
            link: None,
            origin: Origin::Whitelist {
                group: Some("payment-partners".into()),
                index: 17,
            },
        };
        let cases = [
            (
                Op::AddFilter {
                    prio: 14,
                    protocol: ETH_P_IP,
                    filter: node.clone(),
                },
                "add u32 filter for CIDRGroup payment-partners[17] (prio 14)",
            ),
            (
                Op::DelFilter {
                    prio: 14,
                    protocol: ETH_P_IP,
                    handle: (0x104 << 20) | (7 << 12) | 3,
                },
                "delete u32 filter 104:7:3 (prio 14)",
            ),
            (
                Op::SweepTable {
                    prio: 10,
                    protocol: ETH_P_IP,
                    handle: 0x503 << 20,
                },
                "sweep hidden u32 table 503: (through prio 10)",
            ),
            (Op::DelRoot, "delete root qdisc e9:"),
            (Op::DelClass(0x00e9_0010), "delete class e9:10"),
        ];
        for (op, want) in cases {
            assert_eq!(op.to_string(), want);
        }
    }
}
