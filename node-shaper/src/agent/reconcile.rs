//! One reconcile pass: what the plan asks for ([`Input`]) → kernel.
//! Blocking (netlink).

use std::collections::BTreeSet;

use egressguard_crds::node_shaping::{ClassCounters, InterfaceStatus};
use tracing::{info, warn};

use super::inputs::Input;
use crate::engine::{self, ApplyOptions};
use crate::iface::{self, Interface};
use crate::layout::Role;
use crate::netlink::{class_counters, observe, Netlink, RootState};
use crate::plan::{plan_protected, LeafChoice};

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
}

/// The result of one pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PassReport {
    /// Guard the plan came from.
    pub guard: Option<String>,
    /// Per-interface results.
    pub interfaces: Vec<InterfaceStatus>,
    /// The plan could not be used at all (invalid, no interface...).
    pub error: Option<String>,
    /// That error is the plan's fault (invalid), not the node's.
    pub invalid: bool,
    /// Shaping was removed or intentionally not programmed.
    pub removed: bool,
    /// DryRun: what would be programmed.
    pub dry_run: Option<String>,
    /// The plan's guard or groups are not at the versions it names yet:
    /// what is missing. The kernel was left as it was.
    pub waiting: Option<String>,
    /// The pass wrote to the kernel.
    pub wrote: bool,
    /// When the pass finished (RFC 3339).
    pub at: String,
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

/// Drives the kernel to what `input` asks for.
pub fn reconcile(input: &Input, mem: &mut Memory) -> PassReport {
    let mut out = PassReport {
        at: k8s_openapi::jiff::Timestamp::now().to_string(),
        ..PassReport::default()
    };
    let mut nl = match Netlink::open() {
        Ok(nl) => nl,
        Err(e) => {
            out.error = Some(format!("cannot open rtnetlink: {e}"));
            return out;
        }
    };
    if !mem.scanned {
        mem.shaped = owned_interfaces(&mut nl)
            .into_iter()
            .map(|i| i.name)
            .collect();
        mem.scanned = true;
    }
    let (target, enforce) = match input {
        Input::Remove => {
            out.removed = true;
            let names = std::mem::take(&mut mem.shaped);
            mem.shaped = remove(&mut nl, names, &mut out);
            return out;
        }
        // Neither a plan that does not validate nor one whose inputs have
        // not arrived touches the kernel: what runs stays.
        Input::Invalid(e) => {
            out.error = Some(e.clone());
            out.invalid = true;
            warn!(error = %e, "invalid NodeShaping; kernel left unchanged");
            return out;
        }
        Input::Waiting(why) => {
            out.waiting = Some(format!("{why}; kernel left unchanged until it arrives"));
            info!(waiting = %why, "plan not enforceable yet; kernel left unchanged");
            return out;
        }
        Input::Shape {
            guard,
            target,
            enforce,
        } => {
            out.guard = guard.clone();
            (target.as_ref(), *enforce)
        }
    };
    let ifaces = match iface::resolve(None, target.valid.interfaces.as_deref()) {
        Ok(i) => i,
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    if !enforce {
        let shape = plan_protected(&target.valid, &target.protected, LeafChoice::Sfq);
        out.dry_run = Some(format!(
            "dry run: would program {} classes and {} u32 filters on {}",
            shape.classes.len(),
            shape.filter_count(),
            ifaces
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        out.removed = true;
        let names = std::mem::take(&mut mem.shaped);
        mem.shaped = remove(&mut nl, names, &mut out);
        return out;
    }
    let wanted: BTreeSet<String> = ifaces.iter().map(|i| i.name.clone()).collect();
    let stale: Vec<String> = mem.shaped.difference(&wanted).cloned().collect();
    let kept = remove(&mut nl, stale.clone(), &mut out);
    for s in stale.into_iter().filter(|s| !kept.contains(s)) {
        mem.shaped.remove(&s);
    }
    for i in &ifaces {
        match engine::apply(&mut nl, i, target, ApplyOptions::default()) {
            Ok(r) => {
                mem.shaped.insert(i.name.clone());
                // The record only changes with the kernel; rewriting a
                // 100,000-entry record every resync would cost more than the pass.
                if r.writes > 0 || !crate::state::path(&i.name).exists() {
                    crate::state::remember(i, target);
                }
                out.wrote |= r.writes > 0;
                out.interfaces.push(InterfaceStatus {
                    name: i.name.clone(),
                    enforced: true,
                    leaf: Some(r.leaf.clone()),
                    fallback: r.fallback.clone(),
                    rebuilt: r.rebuilt.clone(),
                    error: None,
                    filters: r.filters as i64,
                    counters: counters_of(&mut nl, i),
                });
            }
            Err(e) => {
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
    out
}
