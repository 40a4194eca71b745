//! The agent's metrics, read at scrape time. Label values come from a
//! bounded set: guard names, interface names, class roles.

use std::collections::BTreeMap;

use egressguard_crds::serve::prometheus_client::encoding::DescriptorEncoder;
use egressguard_crds::serve::{counter, counters, gauge, gauges, Scrape};

use super::PassReport;

/// What `/metrics` reports.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    classes: BTreeMap<(String, String, String), [i64; 4]>,
    enforced: BTreeMap<String, bool>,
    apply_errors: u64,
    rebuilds: u64,
    reconciles: u64,
    last_apply: Option<String>,
    last_apply_unix: f64,
    /// Tamper evidence found, by kind (a reason of the `Tampered` condition).
    tamper: BTreeMap<&'static str, u64>,
    tampered: bool,
}

impl Metrics {
    /// Folds one pass report in.
    pub fn record(&mut self, o: &PassReport) {
        self.reconciles += 1;
        let guard = o.guard.clone().unwrap_or_default();
        self.classes.clear();
        self.enforced.clear();
        for i in &o.interfaces {
            self.enforced.insert(i.name.clone(), i.enforced);
            if i.error.is_some() {
                self.apply_errors += 1;
            }
            if i.rebuilt.is_some() {
                self.rebuilds += 1;
            }
            for c in &i.counters {
                self.classes.insert(
                    (guard.clone(), i.name.clone(), c.role.clone()),
                    [c.bytes, c.packets, c.drops, c.overlimits],
                );
            }
        }
        if o.outcome.error().is_some() {
            self.apply_errors += 1;
        }
        for t in &o.tamper {
            *self.tamper.entry(t.kind.reason()).or_default() += 1;
        }
        self.tampered = o.tampered.is_some();
        self.last_apply = Some(o.at.clone());
        self.last_apply_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
    }
}

impl Scrape for Metrics {
    fn scrape(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let classes = [
            (
                "egressguard_class_bytes",
                "Bytes sent through the class (Ethernet header included).",
            ),
            (
                "egressguard_class_packets",
                "Packets sent through the class.",
            ),
            ("egressguard_class_drops", "Packets dropped by the class."),
            (
                "egressguard_class_overlimits",
                "Times the class was over its rate.",
            ),
        ];
        for (i, (name, help)) in classes.into_iter().enumerate() {
            let rows = self.classes.iter().map(|((g, iface, role), v)| {
                let labels = [
                    ("guard", g.as_str()),
                    ("interface", iface.as_str()),
                    ("class", role.as_str()),
                ];
                // The kernel's counters are unsigned; netlink-packet-route hands them over as i64.
                (labels, v[i].max(0) as u64)
            });
            counters(e, name, help, rows)?;
        }
        let rows = self
            .enforced
            .iter()
            .map(|(iface, on)| ([("interface", iface.as_str())], i64::from(*on)));
        gauges(
            e,
            "egressguard_enforced",
            "Whether the plan is in the kernel on the interface.",
            rows,
        )?;
        counter(
            e,
            "egressguard_apply_errors",
            "Failed applies.",
            self.apply_errors,
        )?;
        counter(
            e,
            "egressguard_rebuilds",
            "Applies that rebuilt part of the tree after an incremental change could not be applied or undone.",
            self.rebuilds,
        )?;
        let rows = self.tamper.iter().map(|(kind, n)| ([("kind", *kind)], *n));
        counters(
            e,
            "egressguard_tamper_events",
            "Tamper evidence found on shaped interfaces, by kind (RootRemoved, TreeAltered, ForeignRoot, ForeignHook, DirectQueueBypass).",
            rows,
        )?;
        gauge(
            e,
            "egressguard_tampered",
            "1 while the node's Tampered condition is True.",
            i64::from(self.tampered),
        )?;
        counter(
            e,
            "egressguard_reconciles",
            "Reconcile passes.",
            self.reconciles,
        )?;
        gauge(
            e,
            "egressguard_last_apply_timestamp_seconds",
            "When the last pass finished.",
            self.last_apply_unix,
        )
    }
}
