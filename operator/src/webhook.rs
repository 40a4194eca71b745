//! The Alertmanager receiver (`POST /alertmanager`): authenticated, bounded,
//! idempotent. It never quarantines by itself: it stores the intent as a
//! Pending Quarantine object named after the alert (guard, node, trigger,
//! fingerprint, startsAt), so Alertmanager's retries and HA duplicates hit
//! the same name, any replica can receive, and the leader admits or refuses
//! it with the same rails as every other quarantine.
//!
//! Answers: 200 once every intent is stored (or was already), 401 without
//! the token, 400 for malformed JSON or another webhook version, 413 over
//! 1 MiB, 503 while the API cannot store the intent (Alertmanager retries).

use std::collections::BTreeMap;

use egressguard_crds::quarantine::{Evidence, TriggerRule};
use egressguard_crds::{EgressGuard, Mode, Quarantine, QuarantineSpec};
use kube::api::ObjectMeta;
use kube::ResourceExt;
use serde::Deserialize;

use crate::evaluate::NodeIndex;
use crate::quarantine::object_name;

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY: usize = 1 << 20;

/// Alertmanager's webhook payload (version 4).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    /// Must be "4".
    pub version: String,
    /// Alerts in the group.
    #[serde(default)]
    pub alerts: Vec<Alert>,
    /// Alerts cut by `max_alerts`.
    #[serde(default)]
    pub truncated_alerts: u64,
}

/// One alert.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// `firing` or `resolved`.
    pub status: String,
    /// The alert's labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// When it started firing.
    #[serde(default)]
    pub starts_at: String,
    /// Hash of the label set.
    #[serde(default)]
    pub fingerprint: String,
}

/// Why a body was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadRequest {
    /// Not JSON of the expected shape.
    #[error("malformed Alertmanager notification: {0}")]
    Malformed(String),
    /// Another webhook version.
    #[error("webhook version {0:?} is not supported; Alertmanager 0.x sends \"4\"")]
    Version(String),
}

/// Parses a webhook body.
pub fn parse(body: &[u8]) -> Result<Notification, BadRequest> {
    let n: Notification =
        serde_json::from_slice(body).map_err(|e| BadRequest::Malformed(e.to_string()))?;
    if n.version != "4" {
        return Err(BadRequest::Version(n.version));
    }
    Ok(n)
}

/// What one alert asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Intent {
    /// Store this Pending quarantine (creating an existing name is a duplicate).
    Quarantine(Box<Quarantine>),
    /// Record that the alert behind this quarantine resolved.
    Resolved(String),
    /// A DryRun guard would quarantine the node: an Event only.
    WouldQuarantine {
        /// Guard.
        guard: String,
        /// Node.
        node: String,
        /// Trigger.
        trigger: String,
    },
    /// A matching alert names no known node.
    Unmapped {
        /// Guard.
        guard: String,
        /// Trigger.
        trigger: String,
        /// The alert's labels, rendered.
        labels: String,
    },
}

/// What the notification asks of each guard's alertmanager triggers.
pub fn intents(n: &Notification, guards: &[EgressGuard], nodes: &NodeIndex) -> Vec<Intent> {
    let mut out = Vec::new();
    for g in guards {
        if g.metadata.deletion_timestamp.is_some() || g.spec.mode == Mode::Enforce {
            continue;
        }
        let Ok(Some(rules)) =
            egressguard_crds::quarantine::rules(g.spec.quarantine.as_ref(), g.spec.mode)
        else {
            continue;
        };
        let guard = g.name_any();
        for (trigger, rule) in &rules.triggers {
            let TriggerRule::Alertmanager {
                matchers,
                node_label,
            } = rule
            else {
                continue;
            };
            for a in &n.alerts {
                if !matchers.iter().all(|(k, v)| a.labels.get(k) == Some(v)) {
                    continue;
                }
                let Some(node) = nodes.node_of(&a.labels, node_label.as_deref()) else {
                    out.push(Intent::Unmapped {
                        guard: guard.clone(),
                        trigger: trigger.clone(),
                        labels: format!("{:?}", a.labels),
                    });
                    continue;
                };
                let name = object_name(
                    &guard,
                    &node,
                    &format!("{trigger}/{}/{}", a.fingerprint, a.starts_at),
                );
                match (a.status.as_str(), g.spec.mode) {
                    ("firing", Mode::DryRun) => out.push(Intent::WouldQuarantine {
                        guard: guard.clone(),
                        node,
                        trigger: trigger.clone(),
                    }),
                    ("firing", _) => out.push(Intent::Quarantine(Box::new(Quarantine {
                        metadata: ObjectMeta {
                            name: Some(name),
                            labels: Some(BTreeMap::from([
                                ("egressguard.io/guard".to_string(), guard.clone()),
                                ("egressguard.io/node".to_string(), node.clone()),
                            ])),
                            ..Default::default()
                        },
                        spec: QuarantineSpec {
                            node_name: node,
                            guard: guard.clone(),
                            trigger: trigger.clone(),
                            evidence: Some(Evidence {
                                fingerprint: Some(a.fingerprint.clone()),
                                labels: a.labels.clone(),
                                starts_at: Some(a.starts_at.clone()),
                                ..Default::default()
                            }),
                            release: g.spec.quarantine.as_ref().map(|q| q.release.clone()),
                            reason: None,
                        },
                        status: None,
                    }))),
                    ("resolved", _) => out.push(Intent::Resolved(name)),
                    _ => {}
                }
            }
        }
    }
    out
}

/// Compares the presented `Authorization` header with the token in constant time.
pub fn authorized(header: Option<&[u8]>, token: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    let Some(h) = header else { return false };
    let Some(presented) = h.strip_prefix(b"Bearer ") else {
        return false;
    };
    // Unequal lengths fail without comparing; the token's length is not a secret.
    !token.is_empty() && presented.ct_eq(token).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::NodeFacts;
    use egressguard_crds::load::parse_str;

    const GUARD: &str = "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: site}\nspec:\n  mode: Auto\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{port: 443}]}\n  quarantine:\n    triggers: [{name: alert, alertmanager: {matchers: {alertname: NodeEgressSaturated}}}]\n";

    fn body(status: &str, labels: &str) -> String {
        format!(
            r#"{{"version":"4","status":"{status}","receiver":"eg","groupLabels":{{}},"commonLabels":{{}},"commonAnnotations":{{}},"externalURL":"http://am","truncatedAlerts":0,"alerts":[{{"status":"{status}","labels":{labels},"annotations":{{}},"startsAt":"2026-11-23T10:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"a1b2"}}]}}"#
        )
    }

    fn index() -> NodeIndex {
        NodeIndex::new(&[NodeFacts {
            name: "worker-1".into(),
            labels: Default::default(),
            internal_ips: vec!["10.0.0.1".parse().unwrap()],
        }])
    }

    #[test]
    fn a_firing_alert_becomes_one_deterministic_pending_quarantine() {
        let g = parse_str(GUARD).unwrap();
        let n = parse(
            body(
                "firing",
                r#"{"alertname":"NodeEgressSaturated","instance":"10.0.0.1:9100"}"#,
            )
            .as_bytes(),
        )
        .unwrap();
        let a = intents(&n, &g, &index());
        let b = intents(&n, &g, &index());
        assert_eq!(a, b, "the same notification must name the same object");
        let Intent::Quarantine(q) = &a[0] else {
            panic!("{a:?}")
        };
        assert_eq!(
            (q.spec.node_name.as_str(), q.spec.trigger.as_str()),
            ("worker-1", "alert")
        );
        let resolved = parse(
            body(
                "resolved",
                r#"{"alertname":"NodeEgressSaturated","instance":"10.0.0.1:9100"}"#,
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            intents(&resolved, &g, &index()),
            vec![Intent::Resolved(q.name_any())]
        );
        let other = parse(
            body(
                "firing",
                r#"{"alertname":"Other","instance":"10.0.0.1:9100"}"#,
            )
            .as_bytes(),
        )
        .unwrap();
        assert!(intents(&other, &g, &index()).is_empty());
        let lost = parse(
            body(
                "firing",
                r#"{"alertname":"NodeEgressSaturated","instance":"192.0.2.9:9100"}"#,
            )
            .as_bytes(),
        )
        .unwrap();
        assert!(matches!(
            intents(&lost, &g, &index())[0],
            Intent::Unmapped { .. }
        ));
    }

    #[test]
    fn bad_bodies_and_tokens_are_refused() {
        assert!(matches!(parse(b"{not json"), Err(BadRequest::Malformed(_))));
        assert_eq!(
            parse(br#"{"version":"3","alerts":[]}"#).unwrap_err(),
            BadRequest::Version("3".into())
        );
        assert!(authorized(Some(b"Bearer s3cret"), b"s3cret"));
        assert!(!authorized(Some(b"Bearer s3creT"), b"s3cret"));
        assert!(!authorized(Some(b"s3cret"), b"s3cret"));
        assert!(!authorized(None, b"s3cret"));
        assert!(!authorized(Some(b"Bearer "), b""));
    }
}
