//! One reconcile pass: what the plan asks for ([`Input`]) → kernel.
//! Blocking (netlink).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use egressguard_crds::node_shaping::{ClassCounters, InterfaceStatus};
use tracing::{info, warn};

use super::inputs::Input;
use super::tamper::{fingerprint, TamperMemory};
pub use super::tamper::{TamperKind, Tampering};
use crate::engine::{self, ApplyOptions, ApplyReport, EngineError};
use crate::iface::{self, Interface};
use crate::layout::Role;
use crate::netlink::{class_counters, observe, Netlink, RootState};
use crate::plan::{plan_protected, LeafChoice};
use crate::target::Target;
use crate::written::Written;

/// What the agent remembers between passes.
#[derive(Debug, Default)]
pub struct Memory {
    /// Interfaces currently carrying our tree.
    pub shaped: BTreeSet<String>,
    /// The startup scan for leftovers ran.
    pub scanned: bool,
    /// Destinations this agent protects on its own, whatever the plan says:
    /// the API server address its own kubeconfig or in-cluster config uses
    /// (often a load-balancer VIP that no EndpointSlice lists).
    pub own_protected: Vec<egressguard_crds::node_shaping::ProtectedEntry>,
    /// Tamper evidence between passes.
    pub tamper: TamperMemory,
    /// Shared with the tc-notification monitor: our sockets and the
    /// interfaces we shape, and whether anyone else changed tc since.
    pub watch: Option<crate::netlink::monitor::Watch>,
    /// The tree last written to each interface, for passes that may trust
    /// it (see [`Trigger`] and [`crate::written`]).
    pub written: BTreeMap<String, Written>,
    /// Interfaces whose record for `explain` and `show` is due
    /// ([`record_applied`], after the pass).
    pub record_due: Vec<String>,
}

/// Why a pass runs: which decides whether it may trust the tree it last
/// wrote instead of reading 100,000 filters back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The plan or its inputs changed: trusts the written tree, unless the
    /// tc monitor is not running or reported a foreign change since.
    Plan,
    /// The periodic resync: reads everything back (drift repair).
    Resync,
    /// A foreign tc change was notified: reads everything back.
    Tamper,
}

/// What a pass came to, as a whole: exactly one of these. Per-interface
/// results (an interface may fail while another is enforced) are in
/// [`PassReport::interfaces`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Outcome {
    /// The plan is enforced on the interfaces it names (each interface's
    /// own result says whether it got there).
    #[default]
    Enforced,
    /// No shaping is planned for this node: ours was removed.
    Removed,
    /// The plan does not enforce (DryRun, or Auto while not quarantined):
    /// ours was removed, and this says what would be programmed.
    DryRun(String),
    /// The plan's guard or groups are not at the versions it names yet:
    /// what is missing. The kernel was left as it was.
    Waiting(String),
    /// The plan cannot be enforced as written (its fault, not the node's);
    /// the kernel was left as it was.
    Invalid(String),
    /// The node could not use the plan at all (no rtnetlink socket, no
    /// interface to shape): the node's fault, not the plan's.
    Failed(String),
}

impl Outcome {
    /// The pass left nothing of ours in the kernel on purpose.
    pub fn removes_shaping(&self) -> bool {
        match self {
            Outcome::Removed | Outcome::DryRun(_) => true,
            Outcome::Enforced | Outcome::Waiting(_) | Outcome::Invalid(_) | Outcome::Failed(_) => {
                false
            }
        }
    }

    /// Why the plan could not be used at all, if it could not.
    pub fn error(&self) -> Option<&str> {
        match self {
            Outcome::Invalid(e) | Outcome::Failed(e) => Some(e),
            Outcome::Enforced | Outcome::Removed | Outcome::DryRun(_) | Outcome::Waiting(_) => None,
        }
    }
}

/// The result of one pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PassReport {
    /// Guard the plan came from.
    pub guard: Option<String>,
    /// What the pass came to.
    pub outcome: Outcome,
    /// Per-interface results.
    pub interfaces: Vec<InterfaceStatus>,
    /// The pass wrote to the kernel.
    pub wrote: bool,
    /// New tamper evidence found by this pass (each is logged, counted and
    /// becomes a Warning Event on the Node).
    pub tamper: Vec<Tampering>,
    /// The `Tampered` condition after this pass: the worst kind and why.
    pub tampered: Option<(TamperKind, String)>,
    /// When the pass finished (RFC 3339).
    pub at: String,
    /// Interfaces changed from the remembered tree, without a read-back.
    pub incremental: Vec<String>,
    /// Milliseconds the engine took over all interfaces (read, plan, send).
    pub engine_ms: f64,
}

/// Every interface of this host whose root qdisc is ours.
fn owned_interfaces(nl: &mut Netlink) -> Vec<Interface> {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| iface::by_name(&e.file_name().to_string_lossy()).ok())
        .filter(|i| observe(nl, i.index).is_ok_and(|o| o.root == RootState::Owned))
        .collect()
}

fn counters_of(nl: &mut Netlink, i: &Interface) -> Vec<ClassCounters> {
    // Only the class dump: apply already read the whole tree this pass.
    let Ok(counters) = class_counters(nl, i.index) else {
        return vec![];
    };
    counters
        .iter()
        .filter_map(|(id, c)| {
            Role::of(*id).map(|r| ClassCounters {
                role: r.name().into(),
                bytes: c.bytes as i64,
                packets: c.packets as i64,
                drops: i64::from(c.drops),
                overlimits: i64::from(c.overlimits),
            })
        })
        .collect()
}

/// Removes our tree from `names`; returns the interfaces where removal
/// failed, which stay remembered so the next pass retries them.
fn remove(
    nl: &mut Netlink,
    names: impl IntoIterator<Item = String>,
    out: &mut PassReport,
) -> BTreeSet<String> {
    let mut failed = BTreeSet::new();
    for name in names {
        // An interface that is gone took its qdiscs with it.
        let Ok(i) = iface::by_name(&name) else {
            continue;
        };
        match engine::reset(nl, &i, false) {
            Ok(r) => {
                crate::state::forget(&name);
                if r.removed.is_some() {
                    out.wrote = true;
                    info!(interface = %name, "removed shaping (plan no longer enforces it)");
                }
                out.interfaces.push(InterfaceStatus {
                    name,
                    enforced: false,
                    ..Default::default()
                });
            }
            Err(e) => {
                failed.insert(name.clone());
                out.interfaces.push(InterfaceStatus {
                    name,
                    enforced: false,
                    error: Some(e.to_string()),
                    ..Default::default()
                });
            }
        }
    }
    failed
}

/// Drives the kernel to what `input` asks for, reading the tree back (as
/// a resync does), and says whether anyone tampered with what it enforces.
pub fn reconcile(input: &Input, mem: &mut Memory) -> PassReport {
    reconcile_with(input, Trigger::Resync, mem)
}

/// [`reconcile`] for a pass run for `trigger`: a plan-driven pass diffs
/// against the tree it last wrote when nothing else touched tc since.
pub fn reconcile_with(input: &Input, trigger: Trigger, mem: &mut Memory) -> PassReport {
    if !trusts(trigger, mem.watch.as_ref()) {
        mem.written.clear();
    }
    let mut out = pass(input, mem);
    if let Some(w) = &mem.watch {
        w.set_interfaces(
            mem.shaped
                .iter()
                .filter_map(|n| iface::by_name(n).ok())
                .map(|i| i.index),
        );
    }
    if out.outcome.removes_shaping() {
        // Nothing of ours is left to tamper with.
        mem.tamper = TamperMemory::default();
        mem.written.clear();
    }
    mem.written.retain(|name, _| mem.shaped.contains(name));
    out.tampered = mem.tamper.state();
    out
}

/// One pass for `input`: opens the socket, scans for leftovers once, then
/// does what the input asks.
fn pass(input: &Input, mem: &mut Memory) -> PassReport {
    let mut out = PassReport {
        at: k8s_openapi::jiff::Timestamp::now().to_string(),
        ..PassReport::default()
    };
    let mut nl = match Netlink::open() {
        Ok(nl) => nl,
        Err(e) => {
            out.outcome = Outcome::Failed(format!("cannot open rtnetlink: {e}"));
            return out;
        }
    };
    if let (Some(w), Some(port)) = (&mem.watch, nl.port_id()) {
        w.own_port(port);
    }
    if !mem.scanned {
        mem.shaped = owned_interfaces(&mut nl)
            .into_iter()
            .map(|i| i.name)
            .collect();
        mem.scanned = true;
    }
    match input {
        Input::Remove => {
            out.outcome = Outcome::Removed;
            remove_all(&mut nl, mem, &mut out);
        }
        // Neither a plan that does not validate nor one whose inputs have
        // not arrived touches the kernel: what runs stays.
        Input::Invalid(e) => {
            out.outcome = Outcome::Invalid(e.clone());
            warn!(error = %e, "invalid NodeShaping; kernel left unchanged");
        }
        Input::Waiting(why) => {
            out.outcome =
                Outcome::Waiting(format!("{why}; kernel left unchanged until it arrives"));
            info!(waiting = %why, "plan not enforceable yet; kernel left unchanged");
        }
        Input::Shape {
            guard,
            target,
            enforce,
        } => {
            out.guard = guard.clone();
            shape(&mut nl, target, *enforce, mem, &mut out);
        }
    }
    out
}

/// Removes our tree from every interface that carries it; the ones where
/// that failed stay remembered for the next pass.
fn remove_all(nl: &mut Netlink, mem: &mut Memory, out: &mut PassReport) {
    let names = std::mem::take(&mut mem.shaped);
    mem.shaped = remove(nl, names, out);
}

/// Enforces `target` on the interfaces it names, or with `enforce` false
/// (a dry run) says what it would program and removes ours.
fn shape(nl: &mut Netlink, target: &Target, enforce: bool, mem: &mut Memory, out: &mut PassReport) {
    let ifaces = match iface::resolve(None, target.valid.interfaces.as_deref()) {
        Ok(i) => i,
        Err(e) => {
            out.outcome = Outcome::Failed(e.to_string());
            return;
        }
    };
    if !enforce {
        out.outcome = Outcome::DryRun(dry_run(target, &ifaces));
        remove_all(nl, mem, out);
        return;
    }
    out.outcome = Outcome::Enforced;
    // Watched from before the first write: a foreign change right after
    // this pass's writes must not be trusted away by the next.
    if let Some(w) = &mem.watch {
        let shaped = mem.shaped.iter().filter_map(|n| iface::by_name(n).ok());
        w.set_interfaces(shaped.chain(ifaces.iter().cloned()).map(|i| i.index));
    }
    remove_stale(nl, &ifaces, mem, out);
    enforce_on(nl, &ifaces, target, mem, out);
}

/// What a dry run would program, in words.
fn dry_run(target: &Target, ifaces: &[Interface]) -> String {
    let shape = plan_protected(&target.valid, &target.protected, LeafChoice::Sfq);
    format!(
        "dry run: would program {} classes and {} u32 filters on {}",
        shape.classes.len(),
        shape.filter_count(),
        ifaces
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Removes our tree from the interfaces we shape that the plan no longer
/// names; one whose removal failed stays remembered.
fn remove_stale(nl: &mut Netlink, ifaces: &[Interface], mem: &mut Memory, out: &mut PassReport) {
    let wanted: BTreeSet<String> = ifaces.iter().map(|i| i.name.clone()).collect();
    let stale: Vec<String> = mem.shaped.difference(&wanted).cloned().collect();
    let kept = remove(nl, stale.clone(), out);
    for s in stale.into_iter().filter(|s| !kept.contains(s)) {
        mem.shaped.remove(&s);
    }
}

/// Applies `target` to each interface and gathers the evidence: a pass
/// with the target last enforced everywhere that has to write is repairing.
fn enforce_on(
    nl: &mut Netlink,
    ifaces: &[Interface],
    target: &Target,
    mem: &mut Memory,
    out: &mut PassReport,
) {
    let fp = fingerprint(target);
    let same_plan = mem.tamper.fingerprint == Some(fp);
    let mut all_applied = true;
    let engine_start = Instant::now();
    for i in ifaces {
        let was_shaped = mem.shaped.contains(&i.name);
        match apply_one(nl, i, target, mem) {
            Ok((r, incremental)) => {
                if incremental {
                    out.incremental.push(i.name.clone());
                }
                applied(nl, i, &r, same_plan && was_shaped, mem, out);
            }
            Err(e) => {
                all_applied = false;
                out.tamper
                    .extend(mem.tamper.failed(&i.name, &e, was_shaped));
                warn!(interface = %i.name, error = %e, "apply failed");
                out.interfaces.push(InterfaceStatus {
                    name: i.name.clone(),
                    enforced: false,
                    error: Some(e.to_string()),
                    ..Default::default()
                });
            }
        }
    }
    out.engine_ms = engine_start.elapsed().as_secs_f64() * 1000.0;
    // Only a target in force everywhere is the reference for "unchanged".
    mem.tamper.fingerprint = all_applied.then_some(fp);
    for t in &out.tamper {
        warn!(interface = %t.interface, kind = t.kind.reason(), detail = %t.detail, "tampering");
    }
}

/// Records an interface's successful apply `r`: its tamper evidence
/// (`same_plan`: the target last enforced, on an interface we shaped),
/// that it is shaped, whether its record is due, and its status.
fn applied(
    nl: &mut Netlink,
    i: &Interface,
    r: &ApplyReport,
    same_plan: bool,
    mem: &mut Memory,
    out: &mut PassReport,
) {
    let direct_after = (r.writes > 0)
        .then(|| crate::netlink::decode::direct_packets(nl, i.index).ok())
        .flatten();
    out.tamper
        .extend(mem.tamper.applied(&i.name, r, same_plan, direct_after));
    mem.shaped.insert(i.name.clone());
    // The record only changes with the kernel; rewriting a
    // 100,000-entry record every resync would cost more than the
    // pass. It is written after the pass ([`record_applied`]).
    if r.writes > 0 || !crate::state::path(&i.name).exists() {
        mem.record_due.push(i.name.clone());
    }
    out.wrote |= r.writes > 0;
    out.interfaces.push(InterfaceStatus {
        name: i.name.clone(),
        enforced: true,
        leaf: Some(r.leaves.kind().to_string()),
        fallback: r.leaves.fallback(),
        rebuilt: r.rebuilt.clone(),
        error: None,
        filters: r.filters as i64,
        counters: counters_of(nl, i),
    });
}

/// May this pass trust the tree the last one wrote? Only a plan change,
/// with the tc monitor listening and no foreign change reported since. The
/// monitor's word is read (and cleared) on every pass: a pass that reads
/// back covers whatever it reported.
fn trusts(trigger: Trigger, watch: Option<&crate::netlink::monitor::Watch>) -> bool {
    let foreign = watch.is_none_or(|w| w.take_foreign());
    !foreign && trigger == Trigger::Plan
}

/// Applies `target` to `i`: from the tree last written there when this
/// pass may trust it, else reading it back (and remembering what it
/// wrote). Says which.
fn apply_one(
    nl: &mut Netlink,
    i: &Interface,
    target: &Target,
    mem: &mut Memory,
) -> Result<(ApplyReport, bool), EngineError> {
    if let Some(w) = mem.written.get_mut(&i.name) {
        match engine::apply_incremental(nl, i, target, w) {
            Ok(Some(r)) => return Ok((r, true)),
            Ok(None) => {}
            Err(e) => {
                mem.written.remove(&i.name);
                return Err(e);
            }
        }
    }
    mem.written.remove(&i.name);
    let opts = ApplyOptions {
        remember: true,
        ..ApplyOptions::default()
    };
    let (r, written) = engine::apply_remembering(nl, i, target, opts)?;
    if let Some(w) = written {
        mem.written.insert(i.name.clone(), w);
    }
    Ok((r, false))
}

/// Writes the records `explain` and `show` read for the interfaces the last
/// pass changed (kept off the pass itself: at 100,000 entries the record
/// costs more than a one-entry change).
pub fn record_applied(input: &Input, mem: &mut Memory) {
    let due = std::mem::take(&mut mem.record_due);
    if let Input::Shape { target, .. } = input {
        for name in due {
            crate::state::remember_name(&name, target);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a plan change may skip the read-back, and only while the
    /// monitor listens and reported nothing foreign since the last pass.
    #[test]
    fn a_foreign_change_forces_a_read_back() {
        use crate::netlink::monitor::Watch;
        assert!(!trusts(Trigger::Plan, None), "no monitor at all");
        let w = Watch::default();
        assert!(!trusts(Trigger::Plan, Some(&w)), "monitor not listening");
        // A real monitor on this host (it only listens), as the agent runs one.
        if crate::netlink::monitor::spawn(w.clone(), |_| true).is_err() {
            return;
        }
        assert!(
            !trusts(Trigger::Plan, Some(&w)),
            "the first pass after it started reads back"
        );
        assert!(
            trusts(Trigger::Plan, Some(&w)),
            "a plan change, nothing foreign"
        );
        assert!(!trusts(Trigger::Resync, Some(&w)), "the resync reads back");
        assert!(
            !trusts(Trigger::Tamper, Some(&w)),
            "a tamper pass reads back"
        );
        assert!(trusts(Trigger::Plan, Some(&w)));
        w.mark_foreign_for_tests();
        assert!(!trusts(Trigger::Plan, Some(&w)), "a foreign change since");
        assert!(trusts(Trigger::Plan, Some(&w)), "covered by that read-back");
    }

    /// A dry run says what it would program, where.
    #[test]
    fn a_dry_run_says_what_it_would_program() {
        let g = egressguard_crds::load::parse_str(
            "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: t}\nspec:\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{port: 443}]}\n",
        )
        .expect("guard")
        .remove(0);
        let t = Target::new("t", &g.spec, &[]).expect("valid");
        let ifaces = ["eth0", "wg0"].map(|n| Interface {
            name: n.into(),
            index: 0,
        });
        let shape = plan_protected(&t.valid, &t.protected, LeafChoice::Sfq);
        assert_eq!(
            dry_run(&t, &ifaces),
            format!(
                "dry run: would program {} classes and {} u32 filters on eth0, wg0",
                shape.classes.len(),
                shape.filter_count()
            )
        );
    }

    /// Only a removal or a dry run resets the tamper memory, and only an
    /// invalid plan or a node that could not use it is an error of the pass.
    #[test]
    fn outcomes_say_what_was_removed_and_what_failed() {
        let cases = [
            (Outcome::Enforced, false, None),
            (Outcome::Removed, true, None),
            (Outcome::DryRun("would".into()), true, None),
            (Outcome::Waiting("guard".into()), false, None),
            (Outcome::Invalid("bad".into()), false, Some("bad")),
            (
                Outcome::Failed("no netlink".into()),
                false,
                Some("no netlink"),
            ),
        ];
        for (o, removes, error) in cases {
            assert_eq!(o.removes_shaping(), removes, "{o:?}");
            assert_eq!(o.error(), error, "{o:?}");
        }
    }
}
