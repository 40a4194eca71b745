//! The stable handles and priorities node-shaper uses. They are part of the
//! product: runbooks, dashboards and `tc -s class show` readers rely on them.
//!
//! ```text
//! e9:    htb root, default 20 (r2q 10, quanta set explicitly)
//!        nothing is classified to e9:0 (HTB's direct queue, held to no rate):
//!        every packet is under the uplink and some class's ceiling
//! └─ e9:1   uplink     rate = ceil = spec.uplink.rate
//!    ├─ e9:40 protected prio 0   rate/ceil = spec.lanes.protected                   leaf 40: sfq (140: pfifo)
//!    ├─ e9:50 ssh       prio 1   rate/ceil = spec.lanes.ssh                         leaf 50: sfq (150: pfifo)
//!    ├─ e9:30 whitelist prio 1   rate = what the others leave but default's share,
//!    │                           ceil uplink                                        leaf 30: sfq (130: pfifo)
//!    ├─ e9:20 default   prio 2   rate = a tenth of what the others leave, at least
//!    │                           min(1Mbit, half of it), ceil uplink                leaf 20: sfq (120: pfifo)
//!    └─ e9:10 throttled prio 3   rate/ceil = spec.throttle                          leaf 10: sfq (110: pfifo)
//! filters on e9: (u32)
//!   prio 5      ip    spec.protect entries with ports: dst + proto -> table 240:+i, dport -> e9:40
//!   prio 6      ipv6  the same for IPv6
//!   prio 10     ip    whitelist /0-/7, linear in the root table
//!   prio 11-14  ip    whitelist /8-15, /16-23, /24-31, /32: tables 101:-104:, 256 buckets on dst byte 1..4;
//!                     a /16, /24 or /32 bucket of over 64 entries splits into its own table
//!                     (300:+b, 400:+b, 500:+b), 256 buckets on the byte before
//!   prio 20     ipv6  whitelist /0-/15, linear
//!   prio 21-25  ipv6  whitelist /16-31, /32-47, /48-63, /64-127, /128: tables 111:-115:, on dst byte 2,4,6,8,16;
//!                     /48, /64, /128 buckets split like IPv4 (600:+b, 700:+b, 1:+b); a /16 or /32 bucket
//!                     of over 4,000 entries spills into 141: or 142:, on the byte before
//! (user tables stay below 800:, where the kernel numbers the prios' own root tables)
//!   prio 30     ip    SSH replies: TCP from the interface's own addresses, source port 22
//!                     -> e9:50 (the SSH lane), via table 220:
//!   prio 31     ipv6  SSH replies, via table 221:
//!   prio 40     ip    throttle: link on proto (+ IHL, non-fragment) to 200: (tcp) / 201: (udp)
//!   prio 41     ipv6  throttle: link on next header to 210: (tcp) / 211: (udp)
//!   prio 42     ip    portless: a fragment offset bit set (a later fragment) -> throttled
//!   prio 43     ipv6  portless: next header is an extension header -> throttled
//!   prio 44     ip    quarantine AllButWhitelisted: every other IPv4 packet -> throttled
//!   prio 45     ipv6  the same for IPv6, after neighbour discovery (ICMPv6 133-137) -> default
//! ```
//!
//! Whitelist prios come first so a whitelisted destination on a throttled port
//! is never throttled. Each whitelist entry lives in exactly one bucket: the one
//! of the last address byte its prefix fully covers, so per-packet cost is one
//! short bucket walk per prefix-length group, whatever the list length.

/// Major number of every handle we own; `e9` reads as "eg" in `tc` output.
pub const MAJOR: u32 = 0xe9;
/// Root qdisc handle `e9:`; its presence is how we recognise our own tree.
pub const ROOT: u32 = MAJOR << 16;
/// `default 20`.
pub const DEFCLS: u32 = 0x20;
/// HTB's rate-to-quantum divisor (iproute2's default).
pub const R2Q: u32 = 10;

/// Parent class at the uplink rate.
pub const CLASS_UPLINK: u32 = ROOT | 0x1;
/// Throttled destinations.
pub const CLASS_THROTTLED: u32 = ROOT | 0x10;
/// Everything else.
pub const CLASS_DEFAULT: u32 = ROOT | DEFCLS;
/// Whitelisted destinations.
pub const CLASS_WHITELIST: u32 = ROOT | 0x30;
/// Protected destinations: the control plane, the other nodes, `spec.protect`.
pub const CLASS_PROTECTED: u32 = ROOT | 0x40;
/// SSH replies.
pub const CLASS_SSH: u32 = ROOT | 0x50;

/// The role of one of our classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `e9:1`.
    Uplink,
    /// `e9:10`.
    Throttled,
    /// `e9:20`.
    Default,
    /// `e9:30`.
    Whitelist,
    /// `e9:40`: protected destinations.
    Protected,
    /// `e9:50`: SSH replies.
    Ssh,
}

impl Role {
    /// The role of a class id, if it is one of ours.
    pub fn of(classid: u32) -> Option<Role> {
        match classid {
            CLASS_UPLINK => Some(Role::Uplink),
            CLASS_THROTTLED => Some(Role::Throttled),
            CLASS_DEFAULT => Some(Role::Default),
            CLASS_WHITELIST => Some(Role::Whitelist),
            CLASS_PROTECTED => Some(Role::Protected),
            CLASS_SSH => Some(Role::Ssh),
            _ => None,
        }
    }
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Uplink => "uplink",
            Role::Throttled => "throttled",
            Role::Default => "default",
            Role::Whitelist => "whitelist",
            Role::Protected => "protected",
            Role::Ssh => "ssh",
        }
    }
}

/// Leaf qdisc handle for a class: sfq at `<minor>:`, the pfifo fallback at
/// `1<minor>:` (a kind cannot change under one handle, so they differ).
pub fn leaf_handle(classid: u32, sfq: bool) -> u32 {
    let minor = classid & 0xffff;
    if sfq {
        minor << 16
    } else {
        (0x100 | minor) << 16
    }
}

/// IPv4 `spec.protect` entries with ports (before the whitelist, so a
/// whitelisted destination's protected port still goes to the protected lane).
pub const PRIO_V4_PROTECT_PORTS: u16 = 5;
/// IPv6 `spec.protect` entries with ports.
pub const PRIO_V6_PROTECT_PORTS: u16 = 6;
/// The port table of the i-th `spec.protect` entry with ports (i < 16).
pub const fn table_protect_ports(i: usize) -> u32 {
    table(0x240 + i as u32)
}
/// Linear IPv4 whitelist (prefixes shorter than /8).
pub const PRIO_V4_WHITELIST: u16 = 10;
/// Linear IPv6 whitelist (prefixes shorter than /16).
pub const PRIO_V6_WHITELIST: u16 = 20;
/// IPv4 SSH replies.
pub const PRIO_V4_SSH: u16 = 30;
/// IPv6 SSH replies.
pub const PRIO_V6_SSH: u16 = 31;
/// IPv4 TCP source ports of protected replies.
pub const TABLE_V4_SSH: u32 = table(0x220);
/// IPv6 TCP source ports of protected replies.
pub const TABLE_V6_SSH: u32 = table(0x221);
/// IPv4 throttle rules.
pub const PRIO_V4_THROTTLE: u16 = 40;
/// IPv6 throttle rules.
pub const PRIO_V6_THROTTLE: u16 = 41;
/// IPv4 packets without ports (later fragments).
pub const PRIO_V4_PORTLESS: u16 = 42;
/// IPv6 packets whose TCP/UDP header sits behind an extension header.
pub const PRIO_V6_PORTLESS: u16 = 43;
/// A quarantine's `AllButWhitelisted`: every IPv4 packet left.
pub const PRIO_V4_ALL: u16 = 44;
/// The same for IPv6 (neighbour discovery excepted).
pub const PRIO_V6_ALL: u16 = 45;

/// A hashed whitelist group: prefixes whose last fully covered byte is `byte`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashGroup {
    /// Filter prio.
    pub prio: u16,
    /// Table handle.
    pub table: u32,
    /// Index of the destination-address byte that picks the bucket.
    pub byte: usize,
    /// Shortest prefix in the group.
    pub min_len: u8,
    /// First htid of per-bucket second-level tables (bucket `b` splits into
    /// htid `split + b`, hashed on the byte before `byte`); 0 for groups
    /// that do not split.
    pub split: u32,
    /// For groups that do not split: one second-level table (hashed on the
    /// byte before `byte`) for the buckets too full for u32; 0 for none.
    pub spill: u32,
}

/// A bucket of a splitting group holding more whitelist entries than this
/// moves them into its own second-level table, so a packet walks a few
/// nodes per group however long the list: past ~64 nodes per bucket the
/// walk itself starts to cost throughput (measured at 100,000 entries).
pub const SPLIT_AT: usize = 64;

/// A bucket of a group that does not split, holding more entries than
/// this, moves them into the group's spill table: a u32 bucket holds at most
/// 4094 nodes (12-bit ids, 0 and 0xfff reserved).
pub const SPILL_AT: usize = 4000;

impl HashGroup {
    /// The second-level table bucket `bucket` splits into.
    pub const fn split_table(&self, bucket: u8) -> u32 {
        table(self.split + bucket as u32)
    }
}

const fn table(htid: u32) -> u32 {
    htid << 20
}

/// IPv4 groups, by shortest prefix length.
pub const V4_GROUPS: [HashGroup; 4] = [
    HashGroup {
        prio: 11,
        table: table(0x101),
        split: 0,
        spill: 0,
        byte: 0,
        min_len: 8,
    },
    HashGroup {
        prio: 12,
        table: table(0x102),
        split: 0x300,
        spill: 0,
        byte: 1,
        min_len: 16,
    },
    HashGroup {
        prio: 13,
        table: table(0x103),
        split: 0x400,
        spill: 0,
        byte: 2,
        min_len: 24,
    },
    HashGroup {
        prio: 14,
        table: table(0x104),
        split: 0x500,
        spill: 0,
        byte: 3,
        min_len: 32,
    },
];

/// IPv6 groups, by shortest prefix length.
pub const V6_GROUPS: [HashGroup; 5] = [
    HashGroup {
        prio: 21,
        table: table(0x111),
        split: 0,
        spill: table(0x141),
        byte: 1,
        min_len: 16,
    },
    HashGroup {
        prio: 22,
        table: table(0x112),
        split: 0,
        spill: table(0x142),
        byte: 3,
        min_len: 32,
    },
    HashGroup {
        prio: 23,
        table: table(0x113),
        split: 0x600,
        spill: 0,
        byte: 5,
        min_len: 48,
    },
    HashGroup {
        prio: 24,
        table: table(0x114),
        split: 0x700,
        spill: 0,
        byte: 7,
        min_len: 64,
    },
    HashGroup {
        prio: 25,
        table: table(0x115),
        split: 0x001,
        spill: 0,
        byte: 15,
        min_len: 128,
    },
];

/// IPv4 TCP destination ports.
pub const TABLE_V4_TCP: u32 = table(0x200);
/// IPv4 UDP destination ports.
pub const TABLE_V4_UDP: u32 = table(0x201);
/// IPv6 TCP destination ports.
pub const TABLE_V6_TCP: u32 = table(0x210);
/// IPv6 UDP destination ports.
pub const TABLE_V6_UDP: u32 = table(0x211);
