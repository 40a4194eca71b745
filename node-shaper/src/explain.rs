//! "Why is this destination slow?": which class a packet lands in, and why.

use std::net::IpAddr;

use serde::Serialize;

use crate::diff::filter_handle;
use crate::layout::{Role, CLASS_DEFAULT};
use crate::model::{fmt_handle, fmt_u32_handle, Filter, Origin, Shape};
use crate::plan::{plan_protected, LeafChoice};
use crate::sim::{classify, Packet, L4};
use crate::target::Target;

/// The answer to `node-shaper explain`.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// Role of the class (`whitelist`, `throttled`, `default`).
    pub role: String,
    /// Class id, e.g. `e9:10`.
    pub class: String,
    /// The sentence an on-call engineer reads.
    pub reason: String,
    /// The kernel filter that matched, if any (`prio 40 handle 200:0:1`).
    pub filter: Option<String>,
}

/// Classifies `dst:port/proto` against the kernel's `observed` shape; `target`
/// (what was applied, when known) turns filter handles into spec fields.
pub fn explain(
    observed: &Shape,
    target: Option<&Target>,
    dst: IpAddr,
    port: u16,
    l4: L4,
) -> Explanation {
    let q = Question {
        dst,
        port,
        proto: match l4 {
            L4::Tcp => "TCP",
            L4::Udp => "UDP",
            L4::Icmp(_) => "ICMP",
        },
    };
    let Some(v) = classify(observed, &Packet::new(dst, l4, port, 0)) else {
        return Explanation {
            role: "default".into(),
            class: fmt_handle(CLASS_DEFAULT),
            reason: format!("default: {dst} {} port {port} matches no whitelist entry and no throttled destination, so it is ordinary traffic", q.proto),
            filter: None,
        };
    };
    let classid = v.node.classid.unwrap_or(CLASS_DEFAULT);
    let role = Role::of(classid).map_or("unknown", |r| r.name());
    let filter = observed.prios.iter().find(|p| p.prio == v.prio).map(|p| {
        format!(
            "prio {} handle {}",
            p.prio,
            fmt_u32_handle(filter_handle(p, v.node))
        )
    });
    let reason = target
        .and_then(|t| Some((t, origin_of(t, v.node)?)))
        .and_then(|(t, origin)| q.reason(&origin, t))
        .unwrap_or_else(|| {
            format!(
                "{role}: {dst} {} port {port} matches kernel filter {} into class {}",
                q.proto,
                filter.clone().unwrap_or_default(),
                fmt_handle(classid)
            )
        });
    Explanation {
        role: role.into(),
        class: fmt_handle(classid),
        reason,
        filter,
    }
}

/// Which spec field produced the kernel filter `node`, found by planning
/// the spec again.
fn origin_of(t: &Target, node: &Filter) -> Option<Origin> {
    let desired = plan_protected(&t.valid, &t.protected, LeafChoice::Sfq);
    desired
        .prios
        .iter()
        .flat_map(|p| p.filters.iter())
        .find(|n| n.same_rule(node))
        .map(|n| n.origin.clone())
}

/// The packet asked about.
struct Question {
    dst: IpAddr,
    port: u16,
    proto: &'static str,
}

impl Question {
    /// Why a filter from `origin` in `t` took the packet, in spec terms;
    /// `None` for plumbing, which the kernel filter explains as well.
    fn reason(&self, origin: &Origin, t: &Target) -> Option<String> {
        let Question { dst, port, proto } = self;
        let s = &t.valid;
        Some(match origin {
            Origin::Protected(i) => {
                let (net, why) = t.protected.get(*i).map_or((String::new(), String::new()), |p| {
                    (p.net.to_string(), p.reason.clone())
                });
                format!("protected: destination {dst} is inside {net} ({why}); never throttled: the protected lane, guaranteed and served first")
            }
            Origin::ProtectedPort(i) => {
                let what = s.protect_ports.iter().find(|p| p.index == *i).map_or(String::new(), |p| {
                    let ports = span(p.first, p.last);
                    format!("{} {} {ports} ({})", p.net, p.protocol, p.reason)
                });
                format!("protected: {dst} {proto} port {port} matches spec.protect[{i}], {what}; never throttled: the protected lane, guaranteed and served first")
            }
            Origin::Whitelist { group, index } => {
                let g = group
                    .as_deref()
                    .and_then(|g| s.groups.iter().position(|n| n == g))
                    .map(|g| g as u32);
                let net = s
                    .whitelist
                    .iter()
                    .find(|e| e.index == *index && e.group == g)
                    .map(|e| e.net.to_string())
                    .unwrap_or_default();
                let field = Origin::whitelist_field(group.as_deref(), *index);
                format!("whitelist: destination {dst} is inside {net}, {field}; never throttled, served first")
            }
            Origin::Destination(i) => {
                let what = s.destinations.iter().find(|d| d.index == *i).map_or(String::new(), |d| {
                    format!("{} {}", d.protocol, span(d.first, d.last))
                });
                format!("throttled: destination port {port} ({proto}) matches spec.throttle.destinations[{i}] ({what})")
            }
            Origin::Quarantine(what) => format!(
                "throttled: {dst} {proto} port {port} is not whitelisted or protected, and the quarantine throttles {what} (spec.quarantine.throttle: AllButWhitelisted)"
            ),
            Origin::Unknown | Origin::Link(_) | Origin::Portless(_) | Origin::SshReplies => {
                return None
            }
        })
    }
}

/// A port, or a range of them.
fn span(first: u16, last: u16) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        let g = egressguard_crds::load::parse_str(
            "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: t}\nspec:\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{protocol: TCP, port: 443}, {protocol: UDP, port: 8000, endPort: 8100}]}\n  whitelist: [198.51.100.0/24]\n  protect: [{cidr: 203.0.113.0/24, protocol: TCP, port: 6443, reason: api}]\n",
        )
        .expect("guard")
        .remove(0);
        let protected = [egressguard_crds::node_shaping::ProtectedEntry {
            cidr: "10.0.0.1/32".into(),
            reason: "kubernetes API endpoint".into(),
        }];
        Target::new("t", &g.spec, &protected).expect("valid")
    }

    /// Each kind of filter is explained by the spec field that made it.
    #[test]
    fn a_destination_is_explained_in_spec_terms() {
        let t = target();
        let shape = plan_protected(&t.valid, &t.protected, LeafChoice::Sfq);
        let why = |dst: &str, port: u16, l4: L4, target: Option<&Target>| {
            explain(&shape, target, dst.parse().expect("ip"), port, l4).reason
        };
        let cases = [
            ("10.0.0.1", 443, L4::Tcp, "protected: destination 10.0.0.1 is inside 10.0.0.1/32 (kubernetes API endpoint); never throttled: the protected lane, guaranteed and served first"),
            ("203.0.113.7", 6443, L4::Tcp, "protected: 203.0.113.7 TCP port 6443 matches spec.protect[0], 203.0.113.0/24 TCP 6443 (api); never throttled: the protected lane, guaranteed and served first"),
            ("198.51.100.9", 443, L4::Tcp, "whitelist: destination 198.51.100.9 is inside 198.51.100.0/24, spec.whitelist[0]; never throttled, served first"),
            ("192.0.2.1", 443, L4::Tcp, "throttled: destination port 443 (TCP) matches spec.throttle.destinations[0] (TCP 443)"),
            ("192.0.2.1", 8050, L4::Udp, "throttled: destination port 8050 (UDP) matches spec.throttle.destinations[1] (UDP 8000-8100)"),
            ("192.0.2.1", 80, L4::Tcp, "default: 192.0.2.1 TCP port 80 matches no whitelist entry and no throttled destination, so it is ordinary traffic"),
        ];
        for (dst, port, l4, want) in cases {
            assert_eq!(why(dst, port, l4, Some(&t)), want, "{dst} {port}");
        }
        // Without the guard, the kernel filter is all there is to say.
        let e = explain(&shape, None, "192.0.2.1".parse().expect("ip"), 443, L4::Tcp);
        assert_eq!(e.role, "throttled");
        assert_eq!(e.class, "e9:10");
        assert!(
            e.reason.starts_with(
                "throttled: 192.0.2.1 TCP port 443 matches kernel filter prio 40 handle "
            ),
            "{}",
            e.reason
        );
    }
}
