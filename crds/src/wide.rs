//! Wide ranges: the whitelist and protect entries that would exempt a large
//! part of the internet from a guard's throttle, refused unless the guard
//! sets `spec.allowWideRanges`. Shared by guard validation and the check of
//! the CIDRGroups a guard resolves to.

use ipnet::IpNet;

use crate::errors::FieldError;
use crate::net::span;

/// The shortest prefix (IPv4, IPv6) a CIDRGroup entry may have unless the
/// guard sets `spec.allowWideRanges`: a group is shared, often selected by
/// label, so one wide entry would widen every guard that uses it.
pub const MIN_GROUP_PREFIX: (u8, u8) = (8, 16);

/// The shortest prefix (IPv4, IPv6) a `spec.protect` entry without ports may
/// have unless the guard sets `spec.allowWideRanges`: every packet to it
/// skips the throttle, in a lane with a guarantee of its own.
pub const MIN_PROTECT_PREFIX: (u8, u8) = (16, 48);

/// At most this many wide entries of one CIDRGroup are named; the rest are
/// counted (a group may hold 50,000 entries).
const MAX_WIDE_NAMED: usize = 20;

/// Of a (IPv4, IPv6) pair of prefix lengths, the one for `net`'s family.
pub(crate) fn min_prefix(net: &IpNet, (v4, v6): (u8, u8)) -> u8 {
    match net {
        IpNet::V4(_) => v4,
        IpNet::V6(_) => v6,
    }
}

const FAMILIES: [&str; 2] = ["IPv4", "IPv6"];
const HALF: [u128; 2] = [1 << 31, 1 << 127];

/// Addresses covered by the union of `nets`, overlaps merged, for each
/// family (IPv4, IPv6) whose union is half of the family or more. IPv6
/// saturates at `u128::MAX` (all of it). Sorts only when the plain sum of
/// the entries' sizes reaches half, so ordinary whitelists cost one pass.
pub fn wide_union<'a>(nets: impl Iterator<Item = &'a IpNet> + Clone) -> [Option<u128>; 2] {
    let mut upper = [0u128; 2];
    for n in nets.clone() {
        let (f, a, b) = span(n);
        upper[f] = upper[f].saturating_add(b - a).saturating_add(1);
    }
    let mut out = [None; 2];
    for f in 0..2 {
        if upper[f] < HALF[f] {
            continue;
        }
        let mut spans: Vec<(u128, u128)> = nets
            .clone()
            .map(span)
            .filter(|s| s.0 == f)
            .map(|(_, a, b)| (a, b))
            .collect();
        spans.sort_unstable();
        let mut total = 0u128;
        let mut cur: Option<(u128, u128)> = None;
        for (a, b) in spans {
            cur = match cur {
                Some((ca, cb)) if a <= cb.saturating_add(1) => Some((ca, cb.max(b))),
                Some((ca, cb)) => {
                    total = total.saturating_add(cb - ca).saturating_add(1);
                    Some((a, b))
                }
                None => Some((a, b)),
            };
        }
        if let Some((ca, cb)) = cur {
            total = total.saturating_add(cb - ca).saturating_add(1);
        }
        if total >= HALF[f] {
            out[f] = Some(total);
        }
    }
    out
}

/// The whitelist problems `spec.allowWideRanges` exists for, none when
/// `allow`: CIDRGroup entries shorter than [`MIN_GROUP_PREFIX`] and, per
/// family, a union of every entry covering half of it or more. `entries` are
/// (the CIDRGroup's name, or `None` for `spec.whitelist`; the index; the
/// network). A family the guard's own whitelist lists as a whole (`/0`,
/// accepted only with `spec.whitelistAllDestinations`) is meant to be covered.
pub fn wide_whitelist_problems<'a, I>(allow: bool, entries: I) -> Vec<FieldError>
where
    I: Iterator<Item = (Option<&'a str>, usize, &'a IpNet)> + Clone,
{
    let mut out = Vec::new();
    if allow {
        return out;
    }
    // Group entries, at most MAX_WIDE_NAMED named per group.
    let mut named: Vec<(&str, usize)> = Vec::new();
    for (g, i, net) in entries.clone() {
        let Some(g) = g else { continue };
        let min = min_prefix(net, MIN_GROUP_PREFIX);
        if net.prefix_len() >= min {
            continue;
        }
        let k = match named.iter().position(|(n, _)| *n == g) {
            Some(k) => k,
            None => {
                named.push((g, 0));
                named.len() - 1
            }
        };
        named[k].1 += 1;
        if named[k].1 <= MAX_WIDE_NAMED {
            out.push(FieldError {
                path: format!("CIDRGroup {g}: spec.cidrs[{i}]"),
                message: format!("{net} is wider than /{min}, so every guard using the group would exempt it from its throttle; narrow it to /{min} or longer, or set spec.allowWideRanges: true on the guard if exempting that much is meant"),
            });
        }
    }
    for (g, n) in named {
        if n > MAX_WIDE_NAMED {
            out.push(FieldError {
                path: format!("CIDRGroup {g}: spec.cidrs"),
                message: format!(
                    "and {} more entries wider than /8 (IPv4) or /16 (IPv6)",
                    n - MAX_WIDE_NAMED
                ),
            });
        }
    }
    let union = wide_union(entries.clone().map(|(_, _, n)| n));
    for (f, total) in union.iter().enumerate() {
        let Some(total) = total else { continue };
        let in_family = entries.clone().filter(|(_, _, n)| span(n).0 == f);
        if in_family
            .clone()
            .any(|(g, _, n)| g.is_none() && n.prefix_len() == 0)
        {
            continue;
        }
        let mut groups: Vec<&str> = in_family.filter_map(|(g, _, _)| g).collect();
        groups.sort_unstable();
        groups.dedup();
        let share = (*total as f64) / 2f64.powi(if f == 0 { 32 } else { 128 }) * 100.0;
        let family = FAMILIES[f];
        out.push(if groups.is_empty() {
            FieldError {
                path: "spec.whitelist".into(),
                message: format!("the entries cover {share:.0}% of all {family} addresses (overlaps merged), so the guard would throttle almost nothing there; remove the widest entries, or set spec.allowWideRanges: true if exempting that much is meant"),
            }
        } else {
            FieldError {
                path: "spec.whitelistGroups".into(),
                message: format!("with CIDRGroups {} the whitelist covers {share:.0}% of all {family} addresses (overlaps merged), so the guard would throttle almost nothing there; narrow the groups or reference fewer of them, or set spec.allowWideRanges: true if exempting that much is meant", groups.join(", ")),
            }
        });
    }
    out
}
