//! "Why is this destination slow?": which class a packet lands in, and why.

use std::net::IpAddr;

use serde::Serialize;

use crate::diff::filter_handle;
use crate::layout::{Role, CLASS_DEFAULT};
use crate::model::{fmt_handle, fmt_u32_handle, Origin, Shape};
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
    let pkt = Packet::new(dst, l4, port, 0);
    let proto = match l4 {
        L4::Tcp => "TCP",
        L4::Udp => "UDP",
        L4::Icmp(_) => "ICMP",
    };
    let Some(v) = classify(observed, &pkt) else {
        return Explanation {
            role: "default".into(),
            class: fmt_handle(CLASS_DEFAULT),
            reason: format!("default: {dst} {proto} port {port} matches no whitelist entry and no throttled destination, so it is ordinary traffic"),
            filter: None,
        };
    };
    let classid = v.node.classid.unwrap_or(CLASS_DEFAULT);
    let role = Role::of(classid).map_or("unknown", |r| r.name());
    let prio = observed.prios.iter().find(|p| p.prio == v.prio);
    let filter = prio.map(|p| {
        format!(
            "prio {} handle {}",
            p.prio,
            fmt_u32_handle(filter_handle(p, v.node))
        )
    });
    // Find which spec field produced this node by planning the spec again.
    let spec = target.map(|t| &t.valid);
    let origin = target.and_then(|t| {
        let desired = plan_protected(&t.valid, &t.protected, LeafChoice::Sfq);
        desired
            .prios
            .iter()
            .flat_map(|p| p.filters.iter())
            .find(|n| n.same_rule(v.node))
            .map(|n| n.origin.clone())
    });
    let reason = match (origin, spec) {
        (Some(Origin::Protected(i)), _) => {
            let p = target.and_then(|t| t.protected.get(i));
            let (net, why) = p.map_or((String::new(), String::new()), |p| {
                (p.net.to_string(), p.reason.clone())
            });
            format!("protected: destination {dst} is inside {net} ({why}); never throttled: the protected lane, guaranteed and served first")
        }
        (Some(Origin::ProtectedPort(i)), Some(s)) => {
            let what = s
                .protect_ports
                .iter()
                .find(|p| p.index == i)
                .map_or(String::new(), |p| {
                    let ports = if p.first == p.last {
                        p.first.to_string()
                    } else {
                        format!("{}-{}", p.first, p.last)
                    };
                    format!("{} {} {ports} ({})", p.net, p.protocol, p.reason)
                });
            format!("protected: {dst} {proto} port {port} matches spec.protect[{i}], {what}; never throttled: the protected lane, guaranteed and served first")
        }
        (Some(Origin::Whitelist { group, index }), Some(s)) => {
            let g = group
                .as_deref()
                .and_then(|g| s.groups.iter().position(|n| n == g))
                .map(|g| g as u32);
            let net = s
                .whitelist
                .iter()
                .find(|e| e.index == index && e.group == g)
                .map(|e| e.net.to_string())
                .unwrap_or_default();
            let field = Origin::whitelist_field(group.as_deref(), index);
            format!("whitelist: destination {dst} is inside {net}, {field}; never throttled, served first")
        }
        (Some(Origin::Destination(i)), Some(s)) => {
            let d = s.destinations.iter().find(|d| d.index == i);
            let what = d.map_or(String::new(), |d| {
                if d.first == d.last {
                    format!("{} {}", d.protocol, d.first)
                } else {
                    format!("{} {}-{}", d.protocol, d.first, d.last)
                }
            });
            format!("throttled: destination port {port} ({proto}) matches spec.throttle.destinations[{i}] ({what})")
        }
        (Some(Origin::Quarantine(what)), _) => format!(
            "throttled: {dst} {proto} port {port} is not whitelisted or protected, and the quarantine throttles {what} (spec.quarantine.throttle: AllButWhitelisted)"
        ),
        _ => format!(
            "{role}: {dst} {proto} port {port} matches kernel filter {} into class {}",
            filter.clone().unwrap_or_default(),
            fmt_handle(classid)
        ),
    };
    Explanation {
        role: role.into(),
        class: fmt_handle(classid),
        reason,
        filter,
    }
}
