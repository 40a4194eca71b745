//! Apply, reset and inspect one interface, transactionally.
//!
//! # Guarantees
//! - Idempotent: applying the same spec twice sends nothing the second time.
//! - All or nothing: when the kernel refuses any request, the interface is
//!   driven back to the state read before the change, and the error names the
//!   object and the kernel's reason.
//! - Ownership: only a root `htb e9:` is ours. A foreign root qdisc is never
//!   replaced or removed without `force`.

use std::time::Instant;

use tracing::{debug, info, warn};

use std::collections::BTreeSet;

use crate::diff::{diff, diff_onto_streamed, diff_rebuilding, overfull_buckets_of, Op};
use crate::iface::Interface;
use crate::model::{fmt_handle, Leaf, LeafKind, Shape};
use crate::netlink::{encode, observe, KernelError, KernelReply, Netlink, Observed, RootState};
use crate::plan::{plan_host, plan_skeleton, LeafChoice, WhitelistPlan};
use crate::target::Target;
use crate::written::Written;

/// Why an operation on an interface failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The root qdisc belongs to someone else.
    #[error(
        "{dev}: root qdisc is {kind} {handle}, which node-shaper did not install; \
         refusing to replace it (pass --force to replace it; `tc qdisc show dev {dev}` shows it)"
    )]
    ForeignRoot {
        /// Interface.
        dev: String,
        /// Kind of the foreign root.
        kind: String,
        /// Its handle.
        handle: String,
    },
    /// The kernel refused part of a change; the interface was rolled back.
    #[error("{dev}: {source}; rolled back: {rollback}")]
    Refused {
        /// Interface.
        dev: String,
        /// The first refusal.
        source: KernelError,
        /// What the rollback achieved.
        rollback: String,
    },
    /// Too many whitelist entries share one hash bucket.
    #[error("{dev}: {count} whitelist entries share hash bucket {bucket:#04x} of prio {prio}; u32 holds at most 4094 per bucket, spread the entries or aggregate them into shorter prefixes")]
    BucketFull {
        /// Interface.
        dev: String,
        /// Filter prio.
        prio: u16,
        /// Bucket.
        bucket: u8,
        /// Entries in it.
        count: usize,
    },
    /// Talking to the kernel failed part-way through a change; the
    /// interface was driven back like after a refusal.
    #[error("{dev}: netlink: {source}; rolled back: {rollback}")]
    IoMidApply {
        /// Interface.
        dev: String,
        /// The I/O error.
        source: std::io::Error,
        /// What the rollback achieved.
        rollback: String,
    },
    /// Talking to the kernel failed.
    #[error("{dev}: netlink: {source}")]
    Io {
        /// Interface.
        dev: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// After applying, the kernel does not hold what we wrote.
    #[error("{dev}: after applying, the kernel state still differs from the plan in {0} places; run `node-shaper show` and report a bug", .remaining)]
    Diverged {
        /// Interface.
        dev: String,
        /// Operations still needed.
        remaining: usize,
    },
}

/// What an apply did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApplyReport {
    /// Interface.
    pub interface: String,
    /// Human-readable changes, in order: the first [`CHANGES_KEPT`].
    pub changes: Vec<String>,
    /// Changes not described in `changes` (a 100,000-entry apply would
    /// hold as many strings; `writes` counts every one).
    pub changes_omitted: usize,
    /// Netlink write requests sent.
    pub writes: usize,
    /// Leaf qdiscs in use, and why (serialised as `leaf`, the kind, and
    /// `fallback`, set when sfq was missing and pfifo leaves are used instead).
    #[serde(flatten)]
    pub leaves: Leaves,
    /// Set when an incremental change could neither be applied nor undone and
    /// part of the tree (or all of it) was rebuilt instead.
    pub rebuilt: Option<String>,
    /// Kernel warnings that came with successful requests.
    pub warnings: Vec<String>,
    /// Filters (u32 filters) installed.
    pub filters: usize,
    /// Wall time.
    pub millis: f64,
    /// What the pass found before it wrote anything: the root qdisc then,
    /// HTB's direct-queue counter, and hooks someone else put on the interface.
    pub found: Found,
}

/// The leaf qdiscs an apply left under the classes, and why. What an
/// [`ApplyReport`]'s `leaf` and `fallback` say (and so the NodeShaping
/// status's): see [`Leaves::kind`] and [`Leaves::fallback`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leaves {
    /// sfq, as planned.
    Sfq,
    /// pfifo: this apply found the kernel without sfq (the kernel's reason).
    SfqUnavailable(String),
    /// pfifo leaves an earlier apply fell back to, kept: re-applying writes
    /// nothing, and sfq is retried only after a reset.
    PfifoKept,
}

impl Leaves {
    /// What an apply starts from: a pfifo fallback already in place is
    /// kept (so re-applying writes nothing); otherwise sfq is asked for.
    fn found(obs: &Observed) -> Leaves {
        if obs.shape.leaves.iter().any(|l| l.kind == LeafKind::Pfifo) {
            Leaves::PfifoKept
        } else {
            Leaves::Sfq
        }
    }

    /// The leaves to plan.
    pub fn choice(&self) -> LeafChoice {
        match self {
            Leaves::Sfq => LeafChoice::Sfq,
            Leaves::SfqUnavailable(_) | Leaves::PfifoKept => LeafChoice::PfifoFallback,
        }
    }

    /// The leaf qdisc kind, as `tc` names it: `sfq` or `pfifo`.
    pub fn kind(&self) -> &'static str {
        match self {
            Leaves::Sfq => "sfq",
            Leaves::SfqUnavailable(_) | Leaves::PfifoKept => "pfifo",
        }
    }

    /// Set when running degraded: why the leaves are not sfq, in words.
    pub fn fallback(&self) -> Option<String> {
        match self {
            Leaves::Sfq => None,
            Leaves::SfqUnavailable(reason) => {
                Some(format!("sfq unavailable ({reason}); using pfifo leaves"))
            }
            Leaves::PfifoKept => Some(PFIFO_KEPT.to_string()),
        }
    }
}

/// As the report has always read: `leaf` (the kind) and `fallback`.
impl serde::Serialize for Leaves {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut st = s.serialize_struct("Leaves", 2)?;
        st.serialize_field("leaf", self.kind())?;
        st.serialize_field("fallback", &self.fallback())?;
        st.end()
    }
}

/// The state an apply found the interface in, for tamper evidence.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Found {
    /// Whose root qdisc it was.
    pub root: FoundRoot,
    /// HTB's `direct_packets_stat` (only with our root).
    pub direct_packets: u32,
    /// clsact/ingress qdiscs and egress-hook filters (never ours).
    pub hooks: Vec<crate::netlink::decode::Hook>,
    /// The interface's own addresses (the SSH lane's sources).
    pub local: Vec<std::net::IpAddr>,
}

/// Whose root qdisc an apply found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FoundRoot {
    /// Ours.
    #[default]
    Owned,
    /// The device default: nothing of ours there (first apply, or our root deleted).
    Default,
    /// Someone else's (replaced only with `--force`).
    Foreign,
}

impl Found {
    fn of(o: &Observed) -> Found {
        Found {
            root: match o.root {
                RootState::Owned => FoundRoot::Owned,
                RootState::Default(_) => FoundRoot::Default,
                RootState::Foreign { .. } => FoundRoot::Foreign,
            },
            direct_packets: o.direct_packets,
            hooks: o.hooks.clone(),
            local: o.local.clone(),
        }
    }
}

fn io(dev: &str) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io {
        dev: dev.to_string(),
        source,
    }
}

/// The first refused operation of a run: its index in the ops, and why.
type Refusal = (usize, KernelError);

/// Which operations may share a pipelined chunk: [`run`] sends each run of
/// consecutive operations of one stage together, and the next run only
/// after the kernel answered every request of this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    /// Deleting the root (its parameters changed, or nothing is wanted).
    DelRoot,
    /// Additions and in-place changes: the root, classes, leaves, tables
    /// and filters.
    Put,
    /// Filter deletions, and unlinks that release a table.
    DelFilters,
    /// Table deletions and sweeps (retried while the kernel says EBUSY).
    DelTables,
    /// Whole-prio deletions.
    DelPrios,
    /// Class deletions.
    DelClasses,
}

impl Stage {
    /// The stage `op` is sent in.
    fn of(op: &Op) -> Stage {
        match op {
            Op::DelRoot => Stage::DelRoot,
            Op::AddRoot { .. }
            | Op::PutClass(_)
            | Op::PutLeaf(_)
            | Op::AddTable { .. }
            | Op::AddFilter { .. }
            | Op::ChangeFilter { .. } => Stage::Put,
            Op::DelFilter { .. } | Op::Unlink { .. } => Stage::DelFilters,
            Op::DelTable { .. } | Op::SweepTable { .. } => Stage::DelTables,
            Op::DelPrio { .. } => Stage::DelPrios,
            Op::DelClass(_) => Stage::DelClasses,
        }
    }
}

/// Sends `ops`; returns the first refusal (with the index of the refused
/// operation) and every warning.
///
/// Requests are pipelined within a stage (additions and changes, node
/// deletions, table deletions, ...) and stages run one after another; after a
/// refusal no later stage is sent, so a failed change never got as far as
/// deleting anything, and rolling back only undoes additions and changes.
/// Table deletions are retried on EBUSY: a deleted or unlinked node releases
/// its table only after an RCU grace period, and a prio deleted while its
/// table is still referenced would orphan that table.
fn run(
    nl: &mut Netlink,
    iface: &Interface,
    ops: &[Op],
) -> Result<(Option<Refusal>, Vec<String>), EngineError> {
    let mut first = None;
    let mut warnings = Vec::new();
    let mut start = 0;
    while start < ops.len() && first.is_none() {
        let st = Stage::of(&ops[start]);
        let end = ops[start..]
            .iter()
            .position(|o| Stage::of(o) != st)
            .map_or(ops.len(), |p| start + p);
        // Encoded a slice at a time: the socket pipelines 48 KiB batches
        // anyway, and 100,000 encoded requests held at once were the
        // biggest part of a big apply's peak memory (~50 MiB).
        let mut at = start;
        while at < end {
            let to = (at + ENCODE_AT_ONCE).min(end);
            run_slice(
                nl,
                iface,
                &ops[at..to],
                at,
                st == Stage::DelTables,
                &mut first,
                &mut warnings,
            )?;
            at = to;
        }
        start = end;
    }
    Ok((first, warnings))
}

/// Requests encoded and sent at a time.
const ENCODE_AT_ONCE: usize = 1024;

/// Sends one slice of a stage (`offset`: its index in the run's ops).
fn run_slice(
    nl: &mut Netlink,
    iface: &Interface,
    chunk: &[Op],
    offset: usize,
    tables: bool,
    first: &mut Option<Refusal>,
    warnings: &mut Vec<String>,
) -> Result<(), EngineError> {
    let reqs: Vec<_> = chunk
        .iter()
        .map(|op| encode(op, iface.index, &iface.name))
        .collect();
    let mut outcomes = nl.execute(&reqs).map_err(io(&iface.name))?;
    for _ in 0..100 {
        let busy: Vec<usize> = (0..outcomes.len())
            .filter(|&i| tables && matches!(&outcomes[i], KernelReply::Err(e) if e.errno == EBUSY))
            .collect();
        if busy.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        let retry: Vec<_> = busy.iter().map(|&i| reqs[i].clone()).collect();
        for (i, o) in busy
            .into_iter()
            .zip(nl.execute(&retry).map_err(io(&iface.name))?)
        {
            outcomes[i] = o;
        }
    }
    for (i, (op, o)) in chunk.iter().zip(outcomes).enumerate() {
        match o {
            KernelReply::Ok(Some(w)) => warnings.push(w),
            KernelReply::Ok(None) => {}
            // No hidden table under that handle: the usual case.
            KernelReply::Err(e) if matches!(op, Op::SweepTable { .. }) && e.errno == ENOENT => {}
            KernelReply::Err(e) => {
                if first.is_none() {
                    *first = Some((offset + i, e));
                }
            }
        }
    }
    Ok(())
}

/// The qdisc kind this kernel lacks, when `e` is its refusal of `op`: the
/// kernel answers a leaf of a kind it has no module for with ENOENT
/// ("Specified qdisc kind is unknown"). Decided from the operation and the
/// errno, not from the message text.
fn missing_kind<'a>(op: &'a Op, e: &KernelError) -> Option<&'a LeafKind> {
    match op {
        Op::PutLeaf(leaf) if e.errno == ENOENT => Some(&leaf.kind),
        _ => None,
    }
}

/// `op` puts an sfq leaf under a class.
fn attaches_sfq(op: &Op) -> bool {
    matches!(
        op,
        Op::PutLeaf(Leaf {
            kind: LeafKind::Sfq { .. },
            ..
        })
    )
}

const ENOENT: i32 = 2;

const EBUSY: i32 = 16;

/// Changes described in an [`ApplyReport`] at most.
pub const CHANGES_KEPT: usize = 1000;

/// How to apply.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions {
    /// Replace a foreign root qdisc.
    pub force: bool,
    /// Read the whole tree back afterwards and fail if it differs from the
    /// plan. Every request is already acknowledged by the kernel; this also
    /// checks node-shaper's own logic, at the cost of one more full dump.
    pub verify: bool,
    /// Describe every change in [`ApplyReport::changes`] (the CLI prints
    /// them; the agent does not, and a 100,000-entry apply would hold as
    /// many strings).
    pub describe: bool,
    /// Remember the tree written (the agent; see [`apply_remembering`]).
    pub remember: bool,
}

/// Applies `target` to `iface`: read the tree, plan and diff, send; fall
/// back to pfifo leaves if this kernel lacks sfq; after a refusal, roll back
/// (or rebuild what cannot be rolled back); optionally read back and compare.
pub fn apply(
    nl: &mut Netlink,
    iface: &Interface,
    target: &Target,
    opts: ApplyOptions,
) -> Result<ApplyReport, EngineError> {
    apply_remembering(nl, iface, target, opts).map(|(r, _)| r)
}

/// [`apply`], and with `opts.remember`, what the kernel holds afterwards
/// as the agent remembers it ([`Written`]): the tree read before the pass
/// with the pass's operations applied, every handle known from the
/// kernel's acknowledgements. `None` when the pass was not clean (a
/// refusal, a rollback, a rebuild, the pfifo fallback): the next pass then
/// reads the tree back.
pub fn apply_remembering(
    nl: &mut Netlink,
    iface: &Interface,
    target: &Target,
    opts: ApplyOptions,
) -> Result<(ApplyReport, Option<Written>), EngineError> {
    let start = Instant::now();
    let dev = iface.name.as_str();
    let writes_before = nl.writes;
    let before = observe(nl, iface.index).map_err(io(dev))?;
    let filters = before.shape.filter_count();
    debug!(
        interface = dev,
        ms = ms(&start),
        filters,
        peak_kib = peak_kib(),
        "observed"
    );
    check_root(&before.root, dev, opts.force)?;
    // One plan of the whitelist for the pass (its duplicate check holds
    // a set of every network while it runs).
    let whitelist = WhitelistPlan::new(&target.valid, &target.protected);
    let mut sent = converge(nl, iface, target, &whitelist, &before, opts)?;
    debug!(
        interface = dev,
        ms = ms(&start),
        peak_kib = peak_kib(),
        "sent"
    );
    let written = sent.clean.take().and_then(|(base, ops)| {
        Written::after(
            iface.index,
            base.as_ref().unwrap_or(&before),
            &ops,
            target,
            &whitelist,
            sent.leaves.choice(),
            sent.filters,
        )
    });
    if opts.verify {
        let desired = plan_host(
            &target.valid,
            &target.protected,
            sent.leaves.choice(),
            &before.local,
        );
        verify(nl, iface, &desired)?;
        debug!(interface = dev, ms = ms(&start), "verified");
    }
    for w in &sent.warnings {
        warn!(interface = dev, warning = %w, "kernel warning");
    }
    let leaf = sent.leaves.kind();
    let report = ApplyReport {
        rebuilt: sent.rebuilt,
        interface: dev.into(),
        writes: nl.writes - writes_before,
        changes: sent.changes,
        changes_omitted: sent.omitted,
        leaves: sent.leaves,
        warnings: sent.warnings,
        filters: sent.filters,
        millis: ms(&start),
        found: Found::of(&before),
    };
    let (writes, filters) = (report.writes, report.filters);
    info!(interface = dev, writes, leaf, filters, "applied");
    Ok((report, written))
}

/// The agent's pass when it may trust the tree it last wrote (`written`):
/// reads the root, classes, leaves, hooks and addresses (a few small
/// dumps) but not the filters, plans only the whitelist's difference from
/// what it wrote, and sends that. `Ok(None)` when the difference cannot be
/// sent this way (our root is gone, a class or leaf differs, the skeleton
/// or the whitelist's layout changed, a refusal): the caller then runs the
/// full [`apply_remembering`], which reads the tree back. A refused
/// incremental write is not rolled back here; the full pass that follows
/// reads what the kernel holds and converges from there (or rolls back to it).
pub fn apply_incremental(
    nl: &mut Netlink,
    iface: &Interface,
    target: &Target,
    written: &mut Written,
) -> Result<Option<ApplyReport>, EngineError> {
    let start = Instant::now();
    let dev = iface.name.as_str();
    if written.ifindex != iface.index {
        return Ok(None);
    }
    let writes_before = nl.writes;
    let light = crate::netlink::decode::observe_light(nl, iface.index).map_err(io(dev))?;
    if light.root != RootState::Owned {
        return Ok(None);
    }
    let leaves = Leaves::found(&light);
    let light_ms = ms(&start);
    let Some(delta) = written.delta(target, leaves.choice(), &light) else {
        return Ok(None);
    };
    let delta_ms = ms(&start) - light_ms;
    let (refusal, warnings) = run(nl, iface, &delta.ops)?;
    if let Some((at, e)) = refusal {
        warn!(interface = dev, op = %delta.ops[at], error = %e, "incremental change refused; reading the tree back");
        return Ok(None);
    }
    let writes = nl.writes - writes_before;
    written.commit(delta);
    for w in &warnings {
        warn!(interface = dev, warning = %w, "kernel warning");
    }
    let report = ApplyReport {
        interface: dev.into(),
        changes: vec![],
        changes_omitted: writes,
        writes,
        leaves,
        rebuilt: None,
        warnings,
        filters: written.filters(),
        millis: ms(&start),
        found: Found::of(&light),
    };
    debug!(
        interface = dev,
        writes,
        ms = report.millis,
        light_ms,
        delta_ms,
        "applied from the remembered tree"
    );
    Ok(Some(report))
}

const PFIFO_KEPT: &str = "pfifo leaves kept from an earlier apply where sfq was unavailable; `node-shaper reset` then apply to retry sfq";

/// What sending a plan came to.
struct Sent {
    /// Filters in the tree now in the kernel.
    filters: usize,
    leaves: Leaves,
    changes: Vec<String>,
    omitted: usize,
    warnings: Vec<String>,
    rebuilt: Option<String>,
    /// The operations, when they went through without a refusal (after
    /// the pfifo fallback: from the tree read after it, the first element)
    /// and the caller remembers the tree.
    clean: Option<(Option<Observed>, Vec<Op>)>,
}

/// Sends the changes from `before` to the target. A kernel without sfq
/// turns the leaves into pfifo once (visibly); any other refusal is
/// recovered (rolled back, or the prio rebuilt) and the rest sent again.
fn converge(
    nl: &mut Netlink,
    iface: &Interface,
    target: &Target,
    whitelist: &WhitelistPlan<'_>,
    before: &Observed,
    opts: ApplyOptions,
) -> Result<Sent, EngineError> {
    let dev = iface.name.as_str();
    let mut leaves = Leaves::found(before);
    let (mut ops, mut filters) = prepare_with(before, target, whitelist, leaves.choice(), dev)?;
    debug!(
        interface = dev,
        ops = ops.len(),
        peak_kib = peak_kib(),
        "planned and diffed"
    );
    // The operations described so far (formatted at the end).
    let mut described: Vec<Op> = Vec::new();
    let (mut warnings, mut rebuilt) = (Vec::new(), None);
    let mut omitted = 0;
    // What the operations were computed from: `before`, or the tree read
    // after the fallback; `None` once a refusal was recovered.
    let mut base: Option<Option<Observed>> = Some(None);
    loop {
        if opts.describe {
            let room = CHANGES_KEPT.saturating_sub(described.len());
            described.extend(ops.iter().take(room).cloned());
            omitted += ops.len().saturating_sub(room);
        }
        let Some((at, err)) = send(nl, iface, before, &ops, &mut warnings)? else {
            break;
        };
        let lacks_sfq = matches!(missing_kind(&ops[at], &err), Some(LeafKind::Sfq { .. }));
        if leaves == Leaves::Sfq && lacks_sfq {
            warn!(interface = dev, reason = %err.reason, "sfq is not available on this kernel; falling back to pfifo leaves (rates are still enforced, flows are not fair-queued)");
            leaves = Leaves::SfqUnavailable(err.reason.clone());
            // The rest of the refused stage went through: read it back,
            // without holding the old operations next to it.
            drop(std::mem::take(&mut ops));
            let now = observe(nl, iface.index).map_err(io(dev))?;
            (ops, filters) = prepare_with(&now, target, whitelist, leaves.choice(), dev)?;
            base = base.map(|_| Some(now));
            // The sfq leaves described were refused: they are not changes.
            described.retain(|op| !attaches_sfq(op));
            continue;
        }
        base = None;
        let scope = ops[at].prio();
        let desired = plan_host(
            &target.valid,
            &target.protected,
            leaves.choice(),
            &before.local,
        );
        ops = recover(nl, iface, before, &desired, scope, err, &mut rebuilt)?;
    }
    Ok(Sent {
        filters,
        leaves,
        changes: described
            .iter()
            .map(|op| format!("{op} on {dev}"))
            .collect(),
        omitted,
        warnings,
        rebuilt,
        clean: base.filter(|_| opts.remember).map(|b| (b, ops)),
    })
}

/// Peak resident memory so far (VmHWM, KiB), for debug logs.
pub fn peak_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn ms(t: &Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// A foreign root qdisc is replaced only with `--force` (and said so).
fn check_root(root: &RootState, dev: &str, force: bool) -> Result<(), EngineError> {
    if let RootState::Foreign { kind, handle } = root {
        if !force {
            return Err(EngineError::ForeignRoot {
                dev: dev.into(),
                kind: kind.clone(),
                handle: fmt_handle(*handle),
            });
        }
        warn!(
            interface = dev,
            kind, "replacing foreign root qdisc (--force)"
        );
    }
    Ok(())
}

/// The operations that take `observed` to the desired tree for `target`
/// with leaf `choice`, and how many filters that tree has. Pure. The
/// whitelist prios are planned and diffed one at a time, so the plan is
/// never held whole next to its operations.
pub fn prepare(
    observed: &Observed,
    target: &Target,
    choice: LeafChoice,
    dev: &str,
) -> Result<(Vec<Op>, usize), EngineError> {
    let whitelist = WhitelistPlan::new(&target.valid, &target.protected);
    prepare_with(observed, target, &whitelist, choice, dev)
}

/// [`prepare`] with the whitelist's plan made once for the whole pass.
fn prepare_with(
    observed: &Observed,
    target: &Target,
    whitelist: &WhitelistPlan<'_>,
    choice: LeafChoice,
    dev: &str,
) -> Result<(Vec<Op>, usize), EngineError> {
    // SSH replies are matched from the interface's own addresses.
    let mut skeleton = plan_skeleton(&target.valid, choice, &observed.local);
    let skeleton_filters = skeleton.filter_count();
    let (low, high): (Vec<_>, Vec<_>) = std::mem::take(&mut skeleton.prios)
        .into_iter()
        .partition(|p| p.prio < crate::layout::PRIO_V4_WHITELIST);
    let mut filters = 0;
    let mut overfull = None;
    let prios = low
        .into_iter()
        .chain(whitelist.prios())
        .chain(high)
        .inspect(|p| {
            filters += p.filters.len();
            if overfull.is_none() {
                overfull = overfull_buckets_of(p).into_iter().next();
            }
        });
    let foreign = matches!(observed.root, RootState::Foreign { .. });
    let hint = whitelist.len() + 512 + skeleton_filters;
    let ops = diff_onto_streamed(&observed.shape, &skeleton, prios, foreign, hint);
    if let Some((prio, _, bucket, count)) = overfull {
        return Err(EngineError::BucketFull {
            dev: dev.into(),
            prio,
            bucket,
            count,
        });
    }
    Ok((ops, filters))
}

/// Sends `ops`: the kernel's first refusal, if any. An I/O error part-way
/// is undone like a refusal and reported as such.
fn send(
    nl: &mut Netlink,
    iface: &Interface,
    before: &Observed,
    ops: &[Op],
    warnings: &mut Vec<String>,
) -> Result<Option<Refusal>, EngineError> {
    match run(nl, iface, ops) {
        Ok((refusal, w)) => {
            warnings.extend(w);
            Ok(refusal)
        }
        Err(EngineError::Io { source, .. }) => {
            let (rollback, _) = rollback(nl, iface, before);
            Err(EngineError::IoMidApply {
                dev: iface.name.clone(),
                source,
                rollback,
            })
        }
        Err(e) => Err(e),
    }
}

/// After a refusal: roll back to `before` and report it; or, when neither
/// the change nor its undo went through (the kernel holds something our view
/// of it does not explain), the operations that rebuild what the refused
/// write touched, its prio `scope` or else the whole tree, instead of
/// failing the same way on every pass. A second refusal is reported.
fn recover(
    nl: &mut Netlink,
    iface: &Interface,
    before: &Observed,
    desired: &Shape,
    scope: Option<u16>,
    err: KernelError,
    rebuilt: &mut Option<String>,
) -> Result<Vec<Op>, EngineError> {
    let dev = iface.name.as_str();
    let (rolled_back, complete) = rollback(nl, iface, before);
    if complete || rebuilt.is_some() {
        return Err(EngineError::Refused {
            dev: dev.into(),
            source: err,
            rollback: rolled_back,
        });
    }
    // Traffic of that prio (or of the interface) is briefly classified by
    // what remains: said loudly.
    let now = observe(nl, iface.index).map_err(io(dev))?;
    let ops = match scope {
        Some(prio) => diff_rebuilding(&now.shape, desired, &BTreeSet::from([prio])),
        None => {
            let mut v = vec![Op::DelRoot];
            v.extend(diff(&Shape::default(), desired));
            v
        }
    };
    let what = scope.map_or_else(
        || "the whole e9: tree".to_string(),
        |p| format!("filter prio {p}"),
    );
    warn!(interface = dev, error = %err, rollback = %rolled_back, rebuilt = %what, "incremental change refused and not undone; rebuilding (brief disruption)");
    *rebuilt = Some(format!(
        "rebuilt {what} after the kernel refused an incremental change ({err}) and its rollback ({rolled_back}); traffic it classifies was briefly unclassified"
    ));
    Ok(ops)
}

/// Reads the tree back and fails if it differs from `desired`.
fn verify(nl: &mut Netlink, iface: &Interface, desired: &Shape) -> Result<(), EngineError> {
    let dev = iface.name.as_str();
    let after = observe(nl, iface.index).map_err(io(dev))?;
    let remaining = diff(&after.shape, desired);
    for op in &remaining {
        warn!(interface = dev, op = ?op, "still differs after apply");
    }
    if remaining.is_empty() {
        Ok(())
    } else {
        Err(EngineError::Diverged {
            dev: dev.into(),
            remaining: remaining.len(),
        })
    }
}

/// Sends `ops`; if the kernel refuses any of them, drives the interface back
/// to `before` and returns the refusal. Returns kernel warnings on success.
pub fn transact(
    nl: &mut Netlink,
    iface: &Interface,
    before: &Observed,
    ops: &[Op],
) -> Result<Vec<String>, EngineError> {
    let (err, warnings) = run(nl, iface, ops)?;
    match err {
        None => Ok(warnings),
        Some((_, source)) => {
            let (rollback, _) = rollback(nl, iface, before);
            Err(EngineError::Refused {
                dev: iface.name.clone(),
                source,
                rollback,
            })
        }
    }
}

/// Drives the interface back to `before`; returns a sentence for the error
/// and whether the rollback completed.
fn rollback(nl: &mut Netlink, iface: &Interface, before: &Observed) -> (String, bool) {
    let dev = iface.name.as_str();
    let now = match observe(nl, iface.index) {
        Ok(o) => o,
        Err(e) => return (format!("could not read state to roll back ({e})"), false),
    };
    let ops = match &before.root {
        RootState::Owned => {
            let mut target: Shape = before.shape.clone();
            // The kernel renumbers root tables; matching is by node id within them.
            for p in &mut target.prios {
                p.root_handle = None;
            }
            diff(&now.shape, &target)
        }
        _ if now.root == RootState::Owned => vec![Op::DelRoot],
        _ => vec![],
    };
    match run(nl, iface, &ops) {
        Ok((None, _)) => (match &before.root {
            RootState::Foreign { kind, .. } => format!("removed the partial tree; the foreign {kind} root it replaced is gone and the device default is back"),
            RootState::Default(k) => format!("removed the partial tree; device default ({k}) restored"),
            RootState::Owned => format!("restored the previous configuration ({} requests)", ops.len()),
        }, true),
        Ok((Some((_, e)), _)) => {
            warn!(interface = dev, error = %e, "rollback incomplete");
            (format!("rollback incomplete: {e}"), false)
        }
        Err(e) => (format!("rollback failed: {e}"), false),
    }
}

/// What a reset did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResetReport {
    /// Interface.
    pub interface: String,
    /// What was removed, if anything.
    pub removed: Option<String>,
}

/// Removes our root qdisc (and with `force`, a foreign one), restoring the device default.
pub fn reset(nl: &mut Netlink, iface: &Interface, force: bool) -> Result<ResetReport, EngineError> {
    let dev = iface.name.as_str();
    let obs = observe(nl, iface.index).map_err(io(dev))?;
    let op = match &obs.root {
        RootState::Default(_) => {
            return Ok(ResetReport {
                interface: dev.into(),
                removed: None,
            })
        }
        RootState::Owned => (
            crate::layout::ROOT,
            "node-shaper's htb e9: tree".to_string(),
        ),
        RootState::Foreign { kind, handle } if force => (*handle, format!("foreign {kind} root")),
        RootState::Foreign { kind, handle } => {
            return Err(EngineError::ForeignRoot {
                dev: dev.into(),
                kind: kind.clone(),
                handle: fmt_handle(*handle),
            })
        }
    };
    let req = crate::netlink::encode::del_root(op.0, iface.index, dev);
    match nl.execute(&[req]).map_err(io(dev))?.pop() {
        Some(KernelReply::Err(e)) => Err(EngineError::Refused {
            dev: dev.into(),
            source: e,
            rollback: "nothing was changed".into(),
        }),
        _ => {
            info!(interface = dev, removed = %op.1, "reset");
            Ok(ResetReport {
                interface: dev.into(),
                removed: Some(op.1),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Leaf;
    use crate::netlink::RootState;

    fn refusal(errno: i32) -> KernelError {
        KernelError {
            what: "anything".into(),
            errno,
            reason: "whatever the text says".into(),
        }
    }

    fn observed(root: RootState) -> Observed {
        Observed {
            root,
            shape: Shape::default(),
            counters: vec![],
            root_counters: Default::default(),
            direct_packets: 0,
            hooks: vec![],
            local: vec![],
        }
    }

    fn target(whitelist: &str) -> Target {
        let g = egressguard_crds::load::parse_str(&format!(
            "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: t}}\nspec:\n  uplink: {{rate: 20Mbit}}\n  throttle: {{rate: 1Mbit, destinations: [{{port: 443}}]}}\n  whitelist: [{whitelist}]\n"
        ))
        .expect("guard")
        .remove(0);
        Target::new("t", &g.spec, &[]).expect("valid")
    }

    /// Over a foreign root the plan grafts ours in its place; over the
    /// device default it creates it; an overfull bucket is refused before
    /// anything is planned to be sent.
    #[test]
    fn prepare_grafts_over_a_foreign_root_and_refuses_overfull_buckets() {
        let t = target("198.51.100.0/24");
        let foreign = observed(RootState::Foreign {
            kind: "fq_codel".into(),
            handle: 0x8001_0000,
        });
        let (ops, _) = prepare(&foreign, &t, LeafChoice::Sfq, "eth0").expect("plan");
        assert!(
            matches!(ops[0], Op::AddRoot { graft: true, .. }),
            "{:?}",
            ops[0]
        );
        let default = observed(RootState::Default("noqueue".into()));
        let (ops, filters) = prepare(&default, &t, LeafChoice::Sfq, "eth0").expect("plan");
        assert!(matches!(ops[0], Op::AddRoot { graft: false, .. }));
        assert_eq!(
            filters,
            ops.iter()
                .filter(|o| matches!(o, Op::AddFilter { .. }))
                .count()
        );
        let same: Vec<String> = (0..5000u32)
            .map(|i| format!("{}.{}.0.1/32", 11 + i / 250, i % 250))
            .collect();
        let err = prepare(&default, &target(&same.join(", ")), LeafChoice::Sfq, "eth0")
            .expect_err("overfull");
        assert!(
            matches!(err, EngineError::BucketFull { count: 5000, .. }),
            "{err}"
        );
    }

    /// The leaves' kind and fallback read as the status has always written
    /// them, in the report's JSON too.
    #[test]
    fn leaves_read_as_the_status_and_the_report_always_did() {
        let cases = [
            (Leaves::Sfq, LeafChoice::Sfq, "sfq", None),
            (
                Leaves::SfqUnavailable("Specified qdisc kind is unknown".into()),
                LeafChoice::PfifoFallback,
                "pfifo",
                Some("sfq unavailable (Specified qdisc kind is unknown); using pfifo leaves"),
            ),
            (
                Leaves::PfifoKept,
                LeafChoice::PfifoFallback,
                "pfifo",
                Some("pfifo leaves kept from an earlier apply where sfq was unavailable; `node-shaper reset` then apply to retry sfq"),
            ),
        ];
        for (leaves, choice, kind, fallback) in cases {
            assert_eq!(leaves.choice(), choice, "{leaves:?}");
            assert_eq!(leaves.kind(), kind, "{leaves:?}");
            assert_eq!(leaves.fallback().as_deref(), fallback, "{leaves:?}");
            let json = serde_json::to_value(&leaves).expect("json");
            assert_eq!(
                json,
                serde_json::json!({ "leaf": kind, "fallback": fallback }),
                "{leaves:?}"
            );
        }
        // An apply keeps pfifo leaves it finds, and asks for sfq otherwise.
        let mut o = observed(RootState::Owned);
        assert_eq!(Leaves::found(&o), Leaves::Sfq);
        o.shape.leaves.push(Leaf {
            handle: 0x110 << 16,
            parent: 0x00e9_0010,
            kind: LeafKind::Pfifo,
        });
        assert_eq!(Leaves::found(&o), Leaves::PfifoKept);
    }

    /// The report's JSON keeps its keys, in order, with `leaf` and
    /// `fallback` where they always were.
    #[test]
    fn the_apply_report_serialises_as_before() {
        let r = ApplyReport {
            interface: "eth0".into(),
            changes: vec![],
            changes_omitted: 0,
            writes: 3,
            leaves: Leaves::SfqUnavailable("gone".into()),
            rebuilt: None,
            warnings: vec![],
            filters: 7,
            millis: 1.5,
            found: Found::default(),
        };
        let json = serde_json::to_string(&r).expect("json");
        assert_eq!(
            json,
            r#"{"interface":"eth0","changes":[],"changes_omitted":0,"writes":3,"leaf":"pfifo","fallback":"sfq unavailable (gone); using pfifo leaves","rebuilt":null,"warnings":[],"filters":7,"millis":1.5,"found":{"root":"owned","direct_packets":0,"hooks":[],"local":[]}}"#
        );
    }

    /// Only sfq leaves are dropped from the changes after the fallback, and
    /// only table deletions share the stage that is retried on EBUSY.
    #[test]
    fn operations_are_told_apart_by_variant() {
        let leaf = |kind| {
            Op::PutLeaf(Leaf {
                handle: 0x10 << 16,
                parent: 0x00e9_0010,
                kind,
            })
        };
        assert!(attaches_sfq(&leaf(LeafKind::Sfq { perturb: 10 })));
        assert!(!attaches_sfq(&leaf(LeafKind::Pfifo)));
        assert!(!attaches_sfq(&Op::DelRoot));
        let (prio, protocol, handle) = (10, crate::model::ETH_P_IP, 0x101 << 20);
        let table_ops = [
            Op::DelTable {
                prio,
                protocol,
                handle,
            },
            Op::SweepTable {
                prio,
                protocol,
                handle,
            },
        ];
        assert!(table_ops.iter().all(|o| Stage::of(o) == Stage::DelTables));
        assert_eq!(Stage::of(&Op::DelRoot), Stage::DelRoot);
        assert_eq!(Stage::of(&leaf(LeafKind::Pfifo)), Stage::Put);
        assert_eq!(Stage::of(&Op::DelPrio { prio, protocol }), Stage::DelPrios);
        assert_eq!(Stage::of(&Op::DelClass(0x00e9_0010)), Stage::DelClasses);
    }

    /// The fallback is decided by the operation and errno, whatever the text.
    #[test]
    fn a_missing_qdisc_kind_is_read_from_the_operation_and_errno() {
        let sfq = Op::PutLeaf(Leaf {
            handle: 0x10 << 16,
            parent: 0x00e9_0010,
            kind: LeafKind::Sfq { perturb: 10 },
        });
        assert_eq!(
            missing_kind(&sfq, &refusal(ENOENT)),
            Some(&LeafKind::Sfq { perturb: 10 })
        );
        assert_eq!(missing_kind(&sfq, &refusal(EBUSY)), None);
        assert_eq!(missing_kind(&Op::DelRoot, &refusal(ENOENT)), None);
    }
}
