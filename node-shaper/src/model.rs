//! The tc objects node-shaper manages on one interface, as plain data.
//!
//! The planner produces a desired [`Shape`]; the netlink reader produces an
//! observed one; the differ turns the pair into operations. Keeping all three
//! on one vocabulary is what makes apply idempotent and rollback exact.

/// `ETH_P_IP`, host order.
pub const ETH_P_IP: u16 = 0x0800;
/// `ETH_P_IPV6`, host order.
pub const ETH_P_IPV6: u16 = 0x86DD;

/// u32 selector flag: a match classifies (iproute2 sets it with `flowid`).
pub const U32_TERMINAL: u8 = 1;
/// u32 selector flag: add a fixed offset (`offset plus N`).
pub const U32_OFFSET: u8 = 2;
/// u32 selector flag: add an offset read from the packet (`offset at N mask M shift S`).
pub const U32_VAROFFSET: u8 = 4;
/// u32 selector flag: later keys are relative to the new offset (`eat`).
pub const U32_EAT: u8 = 8;

/// The HTB root qdisc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root {
    /// Qdisc handle, e.g. `0x00e9_0000`.
    pub handle: u32,
    /// Minor id of the class unclassified traffic goes to.
    pub defcls: u32,
    /// rate-to-quantum divisor; we set quanta explicitly, so it only matters for foreign classes.
    pub r2q: u32,
}

/// An HTB class. Rates are bytes per second, bursts are kernel ticks (64 ns).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Class {
    /// Class id (`major:minor`).
    pub classid: u32,
    /// Parent class, or the root qdisc handle.
    pub parent: u32,
    /// Guaranteed rate, bytes/s.
    pub rate: u64,
    /// Ceiling, bytes/s.
    pub ceil: u64,
    /// Burst at `rate`, ticks.
    pub buffer: u32,
    /// Burst at `ceil`, ticks.
    pub cbuffer: u32,
    /// DRR quantum in bytes; explicit so the kernel never warns.
    pub quantum: u32,
    /// Priority for borrowing; lower is served first.
    pub prio: u32,
}

/// The qdisc kind under a leaf class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeafKind {
    /// `sfq perturb N`.
    Sfq {
        /// Hash perturbation period, seconds.
        perturb: i32,
    },
    /// `pfifo` with the device's queue length, the fallback when sfq is missing.
    Pfifo,
    /// Anything else found in the kernel.
    Other(String),
}

impl LeafKind {
    /// The kind string the kernel uses.
    pub fn kind(&self) -> &str {
        match self {
            LeafKind::Sfq { .. } => "sfq",
            LeafKind::Pfifo => "pfifo",
            LeafKind::Other(k) => k,
        }
    }
}

/// A qdisc attached to a leaf class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Qdisc handle.
    pub handle: u32,
    /// The class it hangs under.
    pub parent: u32,
    /// What it is.
    pub kind: LeafKind,
}

/// One 32-bit match of a u32 selector (`struct tc_u32_key`), host-order numbers
/// meaning the packet's big-endian word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// Bits compared.
    pub mask: u32,
    /// Expected value (already masked).
    pub val: u32,
    /// Byte offset from the current header.
    pub off: i32,
    /// Mask applied to the variable offset (`nexthdr+`), 0 for fixed offsets.
    pub offmask: i32,
}

/// `struct tc_u32_sel` without `nkeys`, which is `keys.len()`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    /// `U32_*` flags.
    pub flags: u8,
    /// Right shift applied to the variable offset.
    pub offshift: u8,
    /// Mask applied to the 16 bits read at `offoff`.
    pub offmask: u16,
    /// Fixed offset.
    pub off: u16,
    /// Where the variable offset is read.
    pub offoff: i16,
    /// Where the hash key word is read.
    pub hoff: i16,
    /// Bits of that word that pick the bucket.
    pub hmask: u32,
    /// All keys must match.
    pub keys: Vec<Key>,
}

impl Origin {
    /// Where a whitelist entry is written: `spec.whitelist[3]` or
    /// `CIDRGroup payment-partners[17]`.
    pub fn whitelist_field(group: Option<&str>, index: usize) -> String {
        match group {
            Some(g) => format!("CIDRGroup {g}[{index}]"),
            None => format!("spec.whitelist[{index}]"),
        }
    }
}

/// Why a filter node exists, so `explain` can answer in spec terms.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Origin {
    /// Observed in the kernel; provenance unknown until matched with a plan.
    #[default]
    Unknown,
    /// `spec.whitelist[index]`, or `spec.cidrs[index]` of CIDRGroup `group`.
    Whitelist {
        /// The CIDRGroup, or `None` for the guard's own list.
        group: Option<std::sync::Arc<str>>,
        /// Index in that list.
        index: usize,
    },
    /// The i-th protected destination (control plane, other nodes).
    Protected(usize),
    /// `spec.throttle.destinations[i]`.
    Destination(usize),
    /// Plumbing: a filter that links to a table.
    Link(&'static str),
    /// A packet whose ports cannot be read (`spec.throttle.portless`).
    Portless(&'static str),
    /// An SSH reply (`spec.protectSshReplies`).
    SshReplies,
    /// `spec.protect[i]`, an entry with ports.
    ProtectedPort(usize),
    /// A quarantine's `AllButWhitelisted` catch-all.
    Quarantine(&'static str),
}

/// Which table of a prio a filter sits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// The prio's own root table (kernel-assigned id `8xx:`).
    Root,
    /// A table we created, by full handle (`htid << 20`).
    User(u32),
}

/// One u32 filter: a key node in a hash table bucket. (Called a filter
/// here so that "node" always means a Kubernetes node.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// Table holding the filter.
    pub table: Table,
    /// Bucket within the table.
    pub bucket: u8,
    /// Filter id (12 bits); `None` in a plan means "any free id".
    pub id: Option<u32>,
    /// What it matches.
    pub sel: Selector,
    /// Class it classifies into, with `U32_TERMINAL`.
    pub classid: Option<u32>,
    /// Table it jumps to, by full handle.
    pub link: Option<u32>,
    /// Why it exists (ignored when comparing).
    pub origin: Origin,
}

impl Filter {
    /// Equal in everything the kernel stores, except the filter id.
    pub fn same_rule(&self, other: &Filter) -> bool {
        self.table == other.table
            && self.bucket == other.bucket
            && self.sel == other.sel
            && self.classid == other.classid
            && self.link == other.link
    }
}

/// A u32 hash table we own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashTable {
    /// Full handle, `htid << 20`.
    pub handle: u32,
    /// Number of buckets (1..256, power of two).
    pub divisor: u32,
}

/// All u32 filters of one priority (one `tcf_proto`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prio {
    /// Filter priority.
    pub prio: u16,
    /// Ethertype, host order.
    pub protocol: u16,
    /// Kernel-assigned root table handle (observed only).
    pub root_handle: Option<u32>,
    /// Our tables.
    pub tables: Vec<HashTable>,
    /// Our filters.
    pub filters: Vec<Filter>,
}

/// Everything under our root qdisc on one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    /// The root qdisc.
    pub root: Option<Root>,
    /// HTB classes, parents before children.
    pub classes: Vec<Class>,
    /// Leaf qdiscs.
    pub leaves: Vec<Leaf>,
    /// Filter priorities, ascending.
    pub prios: Vec<Prio>,
}

impl Shape {
    /// Number of u32 filters, for leak checks and reports.
    pub fn filter_count(&self) -> usize {
        self.prios.iter().map(|p| p.filters.len()).sum()
    }
}

/// Formats a tc handle the way `tc` prints it (`e9:10`, `e9:`).
pub fn fmt_handle(h: u32) -> String {
    let (maj, min) = (h >> 16, h & 0xffff);
    if min == 0 {
        format!("{maj:x}:")
    } else {
        format!("{maj:x}:{min:x}")
    }
}

/// Formats a u32 filter handle the way `tc` prints it (`101:1b:3`).
pub fn fmt_u32_handle(h: u32) -> String {
    format!("{:x}:{:x}:{:x}", h >> 20, (h >> 12) & 0xff, h & 0xfff)
}
