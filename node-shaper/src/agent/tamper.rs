//! Tamper evidence: what a pass found changed on the interfaces it
//! enforces by someone else, and the `Tampered` condition between passes.
//! No I/O: [`TamperMemory`] is fed each interface's apply report by the pass.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use egressguard_crds::node_shaping::reasons;

use crate::engine::{ApplyReport, EngineError, FoundRoot};
use crate::netlink::decode::Hook;
use crate::target::Target;

/// How long `Tampered` stays True after a repaired tree or a direct-queue
/// bypass: long enough for a person (or the operator) to see it.
pub const TAMPER_HOLD: Duration = Duration::from_secs(600);

/// What kind of tampering a pass found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TamperKind {
    /// Another root qdisc replaced ours (never removed by the agent).
    ForeignRoot,
    /// An egress-hook filter on a shaped interface (it runs before the HTB
    /// root and can send packets around it).
    ForeignHook,
    /// Packets went through HTB's direct queue.
    DirectQueueBypass,
    /// Our root qdisc was deleted; the pass put it back.
    RootRemoved,
    /// Our tree was altered with the plan unchanged; the pass repaired it.
    TreeAltered,
    /// A clsact or ingress qdisc appeared: reported (log, Event, metric),
    /// not tampering by itself — it cannot bypass the root without filters.
    ForeignQdisc,
}

impl TamperKind {
    /// The `Tampered` condition's reason (and the metric's `kind` label).
    pub fn reason(self) -> &'static str {
        match self {
            TamperKind::ForeignRoot => reasons::FOREIGN_ROOT,
            TamperKind::ForeignHook => reasons::FOREIGN_HOOK,
            TamperKind::DirectQueueBypass => reasons::DIRECT_QUEUE_BYPASS,
            TamperKind::RootRemoved => reasons::ROOT_REMOVED,
            TamperKind::TreeAltered => reasons::TREE_ALTERED,
            TamperKind::ForeignQdisc => reasons::FOREIGN_QDISC,
        }
    }
}

/// One piece of tamper evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tampering {
    /// Interface.
    pub interface: String,
    /// What was found.
    pub kind: TamperKind,
    /// In words, for the condition, the Event and the log.
    pub detail: String,
}

impl std::fmt::Display for Tampering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.interface, self.detail)
    }
}

/// What the agent remembers of tampering between passes.
#[derive(Debug, Default)]
pub struct TamperMemory {
    /// Fingerprint of the target last enforced everywhere it was asked for:
    /// a pass with the same fingerprint that has to write is repairing.
    pub(super) fingerprint: Option<u64>,
    /// HTB's direct-queue counter per interface at the end of the last pass.
    direct: BTreeMap<String, u32>,
    /// Hooks seen per interface (a new one is new evidence).
    hooks: BTreeMap<String, Vec<Hook>>,
    /// The interface's addresses at the last pass: a change changes the
    /// plan (the SSH lane's sources), so the writes it takes are no repair.
    local: BTreeMap<String, Vec<std::net::IpAddr>>,
    /// Interfaces whose root is foreign now.
    foreign: BTreeMap<String, String>,
    /// The last repair or bypass, and when.
    recent: Option<(Instant, Tampering)>,
}

/// What makes a target "the same plan" for tamper evidence: its spec and
/// its protected entries.
pub(super) fn fingerprint(target: &Target) -> u64 {
    use std::hash::BuildHasher as _;
    let mut h = crate::hashing::Fast::default().build_hasher();
    target.valid.hash(&mut h);
    target.protected.hash(&mut h);
    h.finish()
}

impl TamperMemory {
    /// Evidence from one interface's apply; `same_plan` says the target is
    /// the one last enforced, so any write repaired someone else's change.
    ///
    /// `direct_after` is HTB's direct-queue counter read after a pass that
    /// wrote: the baseline for the next pass (a tree being built sends
    /// packets there until its default class exists; that is no bypass).
    pub(super) fn applied(
        &mut self,
        dev: &str,
        r: &ApplyReport,
        same_plan: bool,
        direct_after: Option<u32>,
    ) -> Vec<Tampering> {
        let mut out = Vec::new();
        let same_local = self.local.insert(dev.to_string(), r.found.local.clone())
            == Some(r.found.local.clone());
        let same_plan = same_plan && same_local;
        let ev = |kind, detail: String| Tampering {
            interface: dev.to_string(),
            kind,
            detail,
        };
        self.foreign.remove(dev);
        if same_plan && r.found.root == FoundRoot::Default {
            out.push(ev(
                TamperKind::RootRemoved,
                "the root qdisc e9: was deleted; put back".into(),
            ));
        } else if same_plan && r.writes > 0 {
            out.push(ev(
                TamperKind::TreeAltered,
                format!(
                    "the tree was altered while the plan was unchanged; {} writes repaired it",
                    r.writes
                ),
            ));
        }
        let before = self.direct.get(dev).copied();
        if let (Some(before), FoundRoot::Owned) = (before, r.found.root) {
            if r.found.direct_packets > before {
                out.push(ev(
                    TamperKind::DirectQueueBypass,
                    format!(
                        "{} packets went through HTB's direct queue (no class, no rate): a socket priority set to e9:0, or a filter someone added",
                        r.found.direct_packets - before
                    ),
                ));
            }
        }
        // A root put back this pass starts its counter at zero.
        let direct = match (direct_after, r.found.root) {
            (Some(after), _) => after,
            (None, FoundRoot::Owned) => r.found.direct_packets,
            (None, _) => 0,
        };
        self.direct.insert(dev.to_string(), direct);
        let seen = self.hooks.entry(dev.to_string()).or_default();
        for h in &r.found.hooks {
            if !seen.contains(h) {
                let kind = if h.can_bypass() {
                    TamperKind::ForeignHook
                } else {
                    TamperKind::ForeignQdisc
                };
                out.push(ev(kind, format!("{h} (not node-shaper's; left in place)")));
            }
        }
        *seen = r.found.hooks.clone();
        if let Some(t) = out
            .iter()
            .find(|t| !matches!(t.kind, TamperKind::ForeignHook | TamperKind::ForeignQdisc))
            .cloned()
        {
            self.recent = Some((Instant::now(), t));
        }
        out
    }

    /// Evidence from an interface whose apply failed.
    pub(super) fn failed(
        &mut self,
        dev: &str,
        e: &EngineError,
        was_shaped: bool,
    ) -> Vec<Tampering> {
        let EngineError::ForeignRoot { kind, handle, .. } = e else {
            return vec![];
        };
        let what = format!("{kind} {handle}");
        let new = self.foreign.insert(dev.to_string(), what.clone()) != Some(what.clone());
        if !(was_shaped || self.fingerprint.is_some()) || !new {
            return vec![];
        }
        vec![Tampering {
            interface: dev.to_string(),
            kind: TamperKind::ForeignRoot,
            detail: format!("root qdisc {what} replaced node-shaper's; it is left in place and the interface is not shaped until a person removes it (`tc qdisc del dev {dev} root`)"),
        }]
    }

    /// The `Tampered` condition now: what is still there (foreign roots,
    /// hooks), else the last repair within [`TAMPER_HOLD`].
    pub fn state(&self) -> Option<(TamperKind, String)> {
        let mut now: Vec<(TamperKind, String)> = self
            .foreign
            .iter()
            .map(|(dev, what)| {
                (
                    TamperKind::ForeignRoot,
                    format!("{dev}: foreign root qdisc {what} in place of node-shaper's"),
                )
            })
            .chain(self.hooks.iter().flat_map(|(dev, hs)| {
                hs.iter()
                    .filter(|h| h.can_bypass())
                    .map(move |h| (TamperKind::ForeignHook, format!("{dev}: {h}")))
            }))
            .collect();
        if let Some((at, t)) = &self.recent {
            if at.elapsed() < TAMPER_HOLD {
                now.push((t.kind, t.to_string()));
            }
        }
        let kind = now.iter().map(|(k, _)| *k).min()?;
        let message = now
            .into_iter()
            .map(|(_, m)| m)
            .collect::<Vec<_>>()
            .join("; ");
        Some((kind, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Found;

    fn report(root: FoundRoot, writes: usize, direct: u32, hooks: Vec<Hook>) -> ApplyReport {
        ApplyReport {
            interface: "eth0".into(),
            changes: vec![],
            changes_omitted: 0,
            writes,
            leaves: crate::engine::Leaves::Sfq,
            rebuilt: None,
            warnings: vec![],
            filters: 0,
            millis: 0.0,
            found: Found {
                root,
                direct_packets: direct,
                hooks,
                local: vec![],
            },
        }
    }

    fn kinds(t: &[Tampering]) -> Vec<TamperKind> {
        t.iter().map(|t| t.kind).collect()
    }

    #[test]
    fn evidence_is_what_changed_under_an_unchanged_plan() {
        let clsact = vec![
            Hook::Clsact,
            Hook::EgressFilter {
                classifier: "bpf".into(),
                prio: 1,
            },
        ];
        // (case, same plan, report, evidence expected)
        let cases: Vec<(&str, bool, ApplyReport, Vec<TamperKind>)> = vec![
            (
                "first apply",
                false,
                report(FoundRoot::Default, 40, 0, vec![]),
                vec![],
            ),
            (
                "plan edited: writes are the edit",
                false,
                report(FoundRoot::Owned, 2, 0, vec![]),
                vec![],
            ),
            (
                "nothing to do",
                true,
                report(FoundRoot::Owned, 0, 0, vec![]),
                vec![],
            ),
            (
                "root deleted",
                true,
                report(FoundRoot::Default, 40, 0, vec![]),
                vec![TamperKind::RootRemoved],
            ),
            (
                "a class changed",
                true,
                report(FoundRoot::Owned, 1, 0, vec![]),
                vec![TamperKind::TreeAltered],
            ),
            (
                "direct queue used",
                true,
                report(FoundRoot::Owned, 0, 9, vec![]),
                vec![TamperKind::DirectQueueBypass],
            ),
            (
                "clsact egress bpf",
                true,
                report(FoundRoot::Owned, 0, 0, clsact.clone()),
                vec![TamperKind::ForeignQdisc, TamperKind::ForeignHook],
            ),
            (
                "clsact alone (a CNI's)",
                true,
                report(FoundRoot::Owned, 0, 0, vec![Hook::Clsact]),
                vec![TamperKind::ForeignQdisc],
            ),
        ];
        for (case, same, r, want) in cases {
            let mut m = TamperMemory::default();
            // The previous pass saw the root with a zero direct-queue counter.
            m.applied("eth0", &report(FoundRoot::Owned, 0, 0, vec![]), false, None);
            assert_eq!(kinds(&m.applied("eth0", &r, same, None)), want, "{case}");
        }
        // A hook is new evidence once, and keeps the condition True while it stays.
        let mut m = TamperMemory::default();
        assert_eq!(
            m.applied(
                "eth0",
                &report(FoundRoot::Owned, 0, 0, clsact.clone()),
                true,
                None
            )
            .len(),
            2
        );
        assert!(m
            .applied("eth0", &report(FoundRoot::Owned, 0, 0, clsact), true, None)
            .is_empty());
        let (kind, why) = m.state().expect("tampered");
        assert_eq!(kind, TamperKind::ForeignHook);
        assert!(
            why.contains("bpf filter prio 1 on the clsact egress hook"),
            "{why}"
        );
        // Removed, it clears the condition (no repair was needed).
        m.applied("eth0", &report(FoundRoot::Owned, 0, 0, vec![]), true, None);
        assert_eq!(m.state(), None);
        // A repair holds the condition for a while.
        m.applied(
            "eth0",
            &report(FoundRoot::Default, 40, 0, vec![]),
            true,
            None,
        );
        assert_eq!(m.state().map(|s| s.0), Some(TamperKind::RootRemoved));
    }

    #[test]
    fn a_foreign_root_over_a_shaped_interface_is_reported_once_and_stays() {
        let mut m = TamperMemory::default();
        let e = EngineError::ForeignRoot {
            dev: "eth0".into(),
            kind: "prio".into(),
            handle: "1:".into(),
        };
        assert_eq!(
            kinds(&m.failed("eth0", &e, true)),
            vec![TamperKind::ForeignRoot]
        );
        assert!(m.failed("eth0", &e, true).is_empty(), "reported once");
        assert_eq!(m.state().map(|s| s.0), Some(TamperKind::ForeignRoot));
        // Never shaped by us: somebody's own setup, not tampering.
        let mut fresh = TamperMemory::default();
        assert!(fresh.failed("eth1", &e, false).is_empty());
        // Once we shape it again, the foreign root is gone.
        m.applied(
            "eth0",
            &report(FoundRoot::Foreign, 40, 0, vec![]),
            false,
            None,
        );
        assert_eq!(m.state(), None);
    }

    #[test]
    fn what_is_not_tampering() {
        // A clsact qdisc alone is reported but keeps the condition False.
        let mut m = TamperMemory::default();
        let r = report(FoundRoot::Owned, 0, 0, vec![Hook::Clsact, Hook::Ingress]);
        assert_eq!(m.applied("eth0", &r, true, None).len(), 2);
        assert_eq!(m.state(), None);
        // An address added: the SSH lane's sources change, and so do the
        // writes; no repair.
        let mut m = TamperMemory::default();
        m.applied("eth0", &report(FoundRoot::Owned, 0, 0, vec![]), false, None);
        let mut moved = report(FoundRoot::Owned, 2, 0, vec![]);
        moved.found.local = vec!["10.0.0.9".parse().expect("ip")];
        assert!(m.applied("eth0", &moved, true, None).is_empty());
        // A tree built from scratch sent packets to the direct queue before
        // its default class existed: the count read after the writes is the
        // baseline, so the next pass finds no bypass.
        let mut m = TamperMemory::default();
        m.applied(
            "eth0",
            &report(FoundRoot::Default, 60, 0, vec![]),
            false,
            Some(37),
        );
        assert!(m
            .applied("eth0", &report(FoundRoot::Owned, 0, 37, vec![]), true, None)
            .is_empty());
    }
}
