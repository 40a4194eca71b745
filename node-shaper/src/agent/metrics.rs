//! Prometheus text exposition of the agent's state. Label values come from
//! a bounded set: guard names, interface names, class roles.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::Outcome;

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
}

impl Metrics {
    /// Folds one reconcile outcome in.
    pub fn record(&mut self, o: &Outcome) {
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
        if o.error.is_some() {
            self.apply_errors += 1;
        }
        self.last_apply = Some(o.at.clone());
        self.last_apply_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (i, (name, help)) in [
            (
                "egressguard_class_bytes_total",
                "Bytes sent through the class (Ethernet header included).",
            ),
            (
                "egressguard_class_packets_total",
                "Packets sent through the class.",
            ),
            (
                "egressguard_class_drops_total",
                "Packets dropped by the class.",
            ),
            (
                "egressguard_class_overlimits_total",
                "Times the class was over its rate.",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((g, iface, role), v) in &self.classes {
                let _ = writeln!(
                    s,
                    "{name}{{guard=\"{g}\",interface=\"{iface}\",class=\"{role}\"}} {}",
                    v[i]
                );
            }
        }
        let _ = writeln!(s, "# HELP egressguard_enforced Whether the plan is in the kernel on the interface.\n# TYPE egressguard_enforced gauge");
        for (iface, e) in &self.enforced {
            let _ = writeln!(
                s,
                "egressguard_enforced{{interface=\"{iface}\"}} {}",
                u8::from(*e)
            );
        }
        let _ = writeln!(s, "# HELP egressguard_apply_errors_total Failed applies.\n# TYPE egressguard_apply_errors_total counter");
        let _ = writeln!(s, "egressguard_apply_errors_total {}", self.apply_errors);
        let _ = writeln!(s, "# HELP egressguard_rebuilds_total Applies that rebuilt part of the tree after an incremental change could not be applied or undone.\n# TYPE egressguard_rebuilds_total counter");
        let _ = writeln!(s, "egressguard_rebuilds_total {}", self.rebuilds);
        let _ = writeln!(s, "# HELP egressguard_reconciles_total Reconcile passes.\n# TYPE egressguard_reconciles_total counter");
        let _ = writeln!(s, "egressguard_reconciles_total {}", self.reconciles);
        let _ = writeln!(s, "# HELP egressguard_last_apply_timestamp_seconds When the last pass finished.\n# TYPE egressguard_last_apply_timestamp_seconds gauge");
        let _ = writeln!(
            s,
            "egressguard_last_apply_timestamp_seconds {:.3}",
            self.last_apply_unix
        );
        s
    }
}
