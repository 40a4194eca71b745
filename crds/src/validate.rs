//! One validation for every entry point (node-shaper, the operator, `validate`).
//!
//! It reports every problem at once, each with its field path, and turns the
//! stringly-typed spec into checked values the planners consume. It sits on
//! top of the crate: it knows every kind, and no kind imports it.

use ipnet::IpNet;

use crate::cidr_group::check_refs;
use crate::guard::{EgressGuardSpec, Mode, PortlessPolicy, ProtectEntry};
use crate::net::family;
use crate::quarantine_policy::{rules as quarantine_rules, QuarantineThrottle};
use crate::units::{parse_rate, parse_size, Rate, Size};
use crate::wide::min_prefix;

// Kept at their paths of before the split into leaf modules.
pub use crate::errors::{FieldError, ValidationErrors};
pub use crate::net::{parse_cidr, CidrError};
pub use crate::selector::{selector_problems, selects, SelectorError};
pub use crate::valid_spec::{LaneRates, PortRange, ProtectPort, ValidSpec, WhitelistEntry};
pub use crate::wide::{wide_union, wide_whitelist_problems, MIN_GROUP_PREFIX, MIN_PROTECT_PREFIX};

/// Nanoseconds per HTB tick on every kernel since 2.6.x (`/proc/net/psched`).
pub const NS_PER_TICK: u64 = 64;

/// At most this many `spec.protect` entries with ports (each is one u32
/// table; the list is meant for a DNS server or a bastion, not a whitelist).
pub const MAX_PROTECT_PORTS: usize = 16;

/// The lowest uplink rate a guard may set. Below it the guard's own HTB
/// classes cannot carry full-size frames smoothly (a 1500-byte frame is 12 ms
/// at 1 Mbit) and everything unprotected on the node, control traffic
/// included, would time out: a typo such as `16bit` must not cut a node off.
pub const MIN_UPLINK_BITS: u64 = 1_000_000;

/// Checks a spec and returns its parsed form, or every problem found.
///
/// Each part of the spec has its check below, in the order they run here;
/// problems are reported in that order, which the bad-input tests pin.
pub fn validate(spec: &EgressGuardSpec) -> Result<ValidSpec, ValidationErrors> {
    let mut c = Collector(Vec::new());
    let interfaces = interfaces(&mut c, spec);
    let budget = budget(&mut c, spec);
    check_budget(&mut c, spec, &budget);
    let lanes = lanes(&mut c, spec, budget.uplink_rate, budget.throttle_rate);
    let destinations = destinations(&mut c, spec);
    let whitelist = whitelist(&mut c, spec);
    let (protect, protect_ports) = protect(&mut c, spec);
    check_references(&mut c, spec);
    if let Err(errs) = quarantine_rules(spec.quarantine.as_ref(), spec.mode) {
        c.0.extend(errs);
    }

    if !c.0.is_empty() {
        return Err(ValidationErrors(c.0));
    }
    let Budget {
        uplink_rate: Some(uplink_rate),
        uplink_burst: Some(uplink_burst),
        throttle_rate: Some(throttle_rate),
        throttle_ceil: Some(throttle_ceil),
        throttle_burst: Some(throttle_burst),
    } = budget
    else {
        // Every None above pushed an error, so this is unreachable in
        // practice; keep it an error rather than a panic.
        return Err(unparsed());
    };
    let Some((protected_lane, ssh_lane)) = lanes else {
        return Err(unparsed());
    };
    Ok(ValidSpec {
        interfaces,
        uplink_rate,
        uplink_burst,
        throttle_rate,
        throttle_ceil,
        throttle_burst,
        destinations,
        whitelist,
        groups: Vec::new(),
        throttle_portless: spec.throttle.portless == PortlessPolicy::Throttle,
        protect_ssh_replies: spec.protect_ssh_replies.unwrap_or(true),
        protect,
        protect_ports,
        protected_lane,
        ssh_lane,
        throttle_all: throttles_all(spec),
        allow_wide_ranges: spec.allow_wide_ranges,
    })
}

/// The error for a spec without problems that still did not parse.
fn unparsed() -> ValidationErrors {
    ValidationErrors(vec![FieldError::new("spec", "could not be parsed")])
}

/// `spec.interfaces`: absent, or a non-empty list of distinct, valid
/// interface names, never `lo`.
fn interfaces(c: &mut Collector, spec: &EgressGuardSpec) -> Option<Vec<String>> {
    let ifaces = spec.interfaces.as_ref()?;
    if ifaces.is_empty() {
        c.push(
            "spec.interfaces",
            "is empty; list interfaces or omit the field to use the default-route interfaces",
        );
    }
    for (i, name) in ifaces.iter().enumerate() {
        if let Some(p) = interface_name_problem(name) {
            c.push(format!("spec.interfaces[{i}]"), format!("{name:?} {p}"));
        } else if name == "lo" {
            // No opt-in: the node's own processes talk over loopback.
            c.push(
                format!("spec.interfaces[{i}]"),
                "\"lo\" is the loopback interface: shaping it throttles the node's own processes talking to each other (the kubelet, local databases, this agent); remove it and list the uplink interfaces",
            );
        } else if ifaces[..i].contains(name) {
            c.push(
                format!("spec.interfaces[{i}]"),
                format!("{name:?} is listed twice"),
            );
        }
    }
    Some(ifaces.clone())
}

/// The uplink's and the throttle's rates and bursts as parsed; `None` where
/// a problem was pushed (an absent burst is `Some(None)`).
struct Budget {
    uplink_rate: Option<Rate>,
    uplink_burst: Option<Option<Size>>,
    throttle_rate: Option<Rate>,
    throttle_ceil: Option<Rate>,
    throttle_burst: Option<Option<Size>>,
}

/// `spec.uplink` and `spec.throttle`'s rate, ceil (default: the rate) and
/// burst, each parsed; then whether each burst fits HTB at its rate.
fn budget(c: &mut Collector, spec: &EgressGuardSpec) -> Budget {
    let uplink_rate = c.rate("spec.uplink.rate", &spec.uplink.rate);
    let uplink_burst = c.size("spec.uplink.burst", spec.uplink.burst.as_ref());
    let throttle_rate = c.rate("spec.throttle.rate", &spec.throttle.rate);
    let throttle_ceil = match &spec.throttle.ceil {
        Some(ceil) => c.rate("spec.throttle.ceil", ceil),
        None => throttle_rate,
    };
    let throttle_burst = c.size("spec.throttle.burst", spec.throttle.burst.as_ref());
    c.burst_fits("spec.uplink.burst", uplink_burst.flatten(), uplink_rate);
    c.burst_fits(
        "spec.throttle.burst",
        throttle_burst.flatten(),
        throttle_rate,
    );
    Budget {
        uplink_rate,
        uplink_burst,
        throttle_rate,
        throttle_ceil,
        throttle_burst,
    }
}

/// How the parsed rates relate: a given throttle ceil lies between the
/// throttle's rate and the uplink, the uplink is at least
/// [`MIN_UPLINK_BITS`], and the throttle's rate is below the uplink.
fn check_budget(c: &mut Collector, spec: &EgressGuardSpec, b: &Budget) {
    let ceil_given = spec.throttle.ceil.is_some();
    if let (Some(rate), Some(ceil)) = (b.throttle_rate, b.throttle_ceil) {
        if ceil_given && ceil < rate {
            c.push(
                "spec.throttle.ceil",
                format!("{ceil} is below spec.throttle.rate ({rate}); ceil must be at least rate"),
            );
        }
    }
    if let (Some(up), Some(ceil)) = (b.uplink_rate, b.throttle_ceil) {
        if ceil_given && ceil > up {
            c.push("spec.throttle.ceil", format!("{ceil} is above spec.uplink.rate ({up}); throttled traffic cannot exceed the uplink"));
        }
    }
    if let Some(up) = b.uplink_rate {
        if up.bits_per_sec() < MIN_UPLINK_BITS {
            c.push(
                "spec.uplink.rate",
                format!("{up} is below the 1Mbit floor: an uplink that small starves the node's own traffic; set at least 1Mbit"),
            );
        }
    }
    if let (Some(up), Some(rate)) = (b.uplink_rate, b.throttle_rate) {
        if rate >= up {
            c.push("spec.throttle.rate", format!("{rate} must be below spec.uplink.rate ({up}) so ordinary and whitelisted traffic keep a share of the uplink"));
        }
    }
}

/// `spec.lanes`, defaults filled in; `None` when a problem was pushed or
/// the uplink or throttle did not parse.
fn lanes(
    c: &mut Collector,
    spec: &EgressGuardSpec,
    uplink: Option<Rate>,
    throttle: Option<Rate>,
) -> Option<(LaneRates, LaneRates)> {
    let given = spec.lanes.clone().unwrap_or_default();
    let mut parse = |path: &str, v: Option<&String>| match v {
        Some(v) => c.rate(path, v).map(Some),
        None => Some(None),
    };
    let p_rate = parse(
        "spec.lanes.protected.rate",
        given.protected.as_ref().and_then(|l| l.rate.as_ref()),
    );
    let p_ceil = parse(
        "spec.lanes.protected.ceil",
        given.protected.as_ref().and_then(|l| l.ceil.as_ref()),
    );
    let s_rate = parse(
        "spec.lanes.ssh.rate",
        given.ssh.as_ref().and_then(|l| l.rate.as_ref()),
    );
    let s_ceil = parse(
        "spec.lanes.ssh.ceil",
        given.ssh.as_ref().and_then(|l| l.ceil.as_ref()),
    );
    let (up, throttle) = (uplink?, throttle?);
    let (p_rate, p_ceil, s_rate, s_ceil) = (p_rate?, p_ceil?, s_rate?, s_ceil?);
    let (p_default, s_default) = default_lane_rates(up, throttle);
    let protected = LaneRates {
        rate: p_rate.unwrap_or(p_default),
        ceil: p_ceil.unwrap_or(up),
    };
    let ssh = LaneRates {
        rate: s_rate.unwrap_or(s_default),
        // A rate given above the default ceiling lifts that default with it.
        ceil: s_ceil.unwrap_or_else(|| default_ssh_ceil(up).max(s_rate.unwrap_or(s_default))),
    };
    let before = c.0.len();
    for (name, lane) in [("protected", protected), ("ssh", ssh)] {
        if lane.ceil < lane.rate {
            c.push(
                format!("spec.lanes.{name}.ceil"),
                format!(
                    "{} is below the lane's rate ({}); ceil must be at least rate",
                    lane.ceil, lane.rate
                ),
            );
        }
        if lane.ceil > up {
            c.push(
                format!("spec.lanes.{name}.ceil"),
                format!(
                    "{} is above spec.uplink.rate ({up}); no lane can exceed the uplink",
                    lane.ceil
                ),
            );
        }
    }
    let sum = protected.rate.bits_per_sec() + ssh.rate.bits_per_sec() + throttle.bits_per_sec();
    // Whitelisted and ordinary traffic need a guarantee too (8bit each at least).
    if sum + 16 > up.bits_per_sec() && (p_rate.is_some() || s_rate.is_some()) {
        c.push(
            "spec.lanes",
            format!(
                "the guarantees (protected {} + ssh {} + spec.throttle.rate {throttle}) leave nothing of spec.uplink.rate ({up}) for whitelisted and ordinary traffic; lower them or raise the uplink",
                protected.rate, ssh.rate
            ),
        );
    }
    (c.0.len() == before).then_some((protected, ssh))
}

/// `spec.throttle.destinations`: at least one, each a port or an inclusive
/// range of ports.
fn destinations(c: &mut Collector, spec: &EgressGuardSpec) -> Vec<PortRange> {
    let mut destinations = Vec::new();
    if spec.throttle.destinations.is_empty() {
        c.push(
            "spec.throttle.destinations",
            "is empty; list at least one destination, e.g. {protocol: TCP, port: 443}",
        );
    }
    for (i, d) in spec.throttle.destinations.iter().enumerate() {
        let base = format!("spec.throttle.destinations[{i}]");
        let first = c.port(format!("{base}.port"), d.port);
        let last = match d.end_port {
            Some(end) => c.port(format!("{base}.endPort"), end),
            None => first,
        };
        if let (Some(f), Some(l), Some(_)) = (first, last, d.end_port) {
            if l < f {
                c.push(
                    format!("{base}.endPort"),
                    format!(
                        "{l} is below port {f}; endPort is the last port of an inclusive range"
                    ),
                );
                continue;
            }
        }
        if let (Some(first), Some(last)) = (first, last) {
            destinations.push(PortRange {
                protocol: d.protocol,
                first,
                last,
                index: i,
            });
        }
    }
    destinations
}

/// `spec.whitelist`: networks, none a whole address family unless
/// `spec.whitelistAllDestinations`, together not too wide unless
/// `spec.allowWideRanges`.
fn whitelist(c: &mut Collector, spec: &EgressGuardSpec) -> Vec<WhitelistEntry> {
    let mut whitelist = Vec::new();
    for (i, s) in spec.whitelist.iter().enumerate() {
        match parse_cidr(s) {
            Ok(net) if net.prefix_len() == 0 && spec.whitelist_all_destinations != Some(true) => {
                c.push(
                    format!("spec.whitelist[{i}]"),
                    format!("{net} is every {} destination, so the guard would throttle nothing there; remove it, or set spec.whitelistAllDestinations: true if that is meant", family(&net)),
                )
            }
            Ok(net) => whitelist.push(WhitelistEntry {
                net,
                index: i,
                group: None,
            }),
            Err(m) => c.push(format!("spec.whitelist[{i}]"), m.to_string()),
        }
    }
    c.0.extend(wide_whitelist_problems(
        spec.allow_wide_ranges,
        whitelist.iter().map(|e| (None, e.index, &e.net)),
    ));
    whitelist
}

/// A `spec.protect` entry after its check.
enum Protect {
    /// Every packet to the network, and why.
    Whole(IpNet, String),
    /// Only some ports of it.
    Ports(ProtectPort),
}

/// `spec.protect`: each entry checked ([`protect_entry`]), and at most
/// [`MAX_PROTECT_PORTS`] of them with ports.
fn protect(c: &mut Collector, spec: &EgressGuardSpec) -> (Vec<(IpNet, String)>, Vec<ProtectPort>) {
    let mut whole = Vec::new();
    let mut ports = Vec::new();
    for (i, p) in spec.protect.iter().enumerate() {
        match protect_entry(c, spec.allow_wide_ranges, i, p) {
            Some(Protect::Whole(net, reason)) => whole.push((net, reason)),
            Some(Protect::Ports(p)) => ports.push(p),
            None => {}
        }
    }
    if ports.len() > MAX_PROTECT_PORTS {
        c.push(
            "spec.protect",
            format!(
                "has {} entries with ports; at most {MAX_PROTECT_PORTS} are allowed (protect whole destinations, or whitelist them)",
                ports.len()
            ),
        );
    }
    (whole, ports)
}

/// `spec.protect[i]`: a network; with no port, protocol or endPort, the
/// whole network (no wider than [`MIN_PROTECT_PREFIX`] unless
/// `allow_wide`), otherwise a port or an inclusive range of ports. `None`
/// when a problem was pushed.
fn protect_entry(
    c: &mut Collector,
    allow_wide: bool,
    i: usize,
    p: &ProtectEntry,
) -> Option<Protect> {
    let reason = p
        .reason
        .clone()
        .unwrap_or_else(|| format!("spec.protect[{i}]"));
    let net = match parse_cidr(&p.cidr) {
        Ok(net) => Some(net),
        Err(m) => {
            c.push(format!("spec.protect[{i}].cidr"), m.to_string());
            None
        }
    };
    match (p.port, p.end_port, p.protocol) {
        (None, None, None) => {
            let net = net?;
            let min = min_prefix(&net, MIN_PROTECT_PREFIX);
            if !allow_wide && net.prefix_len() < min {
                c.push(
                    format!("spec.protect[{i}].cidr"),
                    format!("{net} has no port and is wider than /{min}, so every packet to it would skip the throttle in the protected lane; narrow it to /{min} or longer, add a port, or set spec.allowWideRanges: true if exempting that much is meant"),
                );
                return None;
            }
            Some(Protect::Whole(net, reason))
        }
        (None, _, _) => {
            c.push(
                format!("spec.protect[{i}].port"),
                "is required with protocol or endPort; omit all three to protect every packet to the destination",
            );
            None
        }
        (Some(port), end, protocol) => {
            let first = c.port(format!("spec.protect[{i}].port"), port);
            let last = match end {
                Some(e) => c.port(format!("spec.protect[{i}].endPort"), e),
                None => first,
            };
            let (f, l) = (first?, last?);
            if l < f {
                c.push(
                    format!("spec.protect[{i}].endPort"),
                    format!(
                        "{l} is below port {f}; endPort is the last port of an inclusive range"
                    ),
                );
                return None;
            }
            Some(Protect::Ports(ProtectPort {
                net: net?,
                protocol: protocol.unwrap_or_default(),
                first: f,
                last: l,
                reason,
                index: i,
            }))
        }
    }
}

/// `spec.nodeSelector` and `spec.whitelistGroups`: what the API server
/// would refuse in a selector, and malformed group references.
fn check_references(c: &mut Collector, spec: &EgressGuardSpec) {
    if let Some(sel) = &spec.node_selector {
        c.0.extend(selector_problems(sel, "spec.nodeSelector"));
    }
    c.0.extend(check_refs(&spec.whitelist_groups));
}

/// Does a quarantine throttle every destination but the whitelisted and
/// protected ones? Mode `Auto` with `quarantine.throttle: AllButWhitelisted`
/// (the default).
fn throttles_all(spec: &EgressGuardSpec) -> bool {
    spec.mode == Mode::Auto
        && spec
            .quarantine
            .as_ref()
            .and_then(|q| q.throttle)
            .unwrap_or_default()
            == QuarantineThrottle::AllButWhitelisted
}

/// The problems found so far, and the parsers that add to them.
struct Collector(Vec<FieldError>);

impl Collector {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(path, message));
    }

    fn rate(&mut self, path: &str, value: &str) -> Option<Rate> {
        match parse_rate(value) {
            Ok(r) if r.bits_per_sec() == 0 => {
                self.push(path, "must be greater than 0");
                None
            }
            Ok(r) if r.bytes_per_sec() == 0 => {
                self.push(
                    path,
                    format!("{value:?} is below 8bit, the smallest rate HTB can express"),
                );
                None
            }
            Ok(r) => Some(r),
            Err(e) => {
                self.push(path, e.to_string());
                None
            }
        }
    }

    fn size(&mut self, path: &str, value: Option<&String>) -> Option<Option<Size>> {
        let Some(value) = value else {
            return Some(None);
        };
        match parse_size(value) {
            Ok(s) if s.bytes() == 0 => {
                self.push(path, "must be greater than 0");
                None
            }
            Ok(s) => Some(Some(s)),
            Err(e) => {
                self.push(path, e.to_string());
                None
            }
        }
    }

    fn port(&mut self, path: String, value: i64) -> Option<u16> {
        if value < 1 {
            self.push(path, format!("{value} is below 1"));
            None
        } else if value > 65535 {
            self.push(path, format!("{value} is above 65535"));
            None
        } else {
            u16::try_from(value).ok()
        }
    }

    fn burst_fits(&mut self, path: &str, burst: Option<Size>, rate: Option<Rate>) {
        if let (Some(b), Some(r)) = (burst, rate) {
            if burst_ticks(b, r).is_none() {
                self.push(path, format!("{b} takes too long to drain at {r}; HTB stores bursts as 32-bit ticks of 64ns, so use a smaller burst"));
            }
        }
    }
}

/// What is wrong with an interface name, if anything.
fn interface_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name.len() > 15 {
        Some("is longer than 15 bytes, the kernel's limit for interface names")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
        || name == "."
        || name == ".."
    {
        Some("is not a valid interface name")
    } else {
        None
    }
}

const MBIT: u64 = 1_000_000;

/// Default guarantees that always fit: on a roomy uplink they are the
/// documented ones (protected max(1Mbit, uplink/10), SSH 1Mbit); on an
/// uplink too small for them, each shrinks to a quarter of what the throttle
/// leaves, so whitelisted and ordinary traffic keep at least half.
fn default_lane_rates(up: Rate, throttle: Rate) -> (Rate, Rate) {
    let left = up.bits_per_sec().saturating_sub(throttle.bits_per_sec()) / 4;
    let protected = (up.bits_per_sec() / 10).max(MBIT).min(left).max(8);
    let ssh = MBIT.min(left).max(8);
    (
        Rate::from_bits_per_sec(protected),
        Rate::from_bits_per_sec(ssh),
    )
}

/// The SSH lane's default ceiling: max(5Mbit, uplink/10), at most the uplink.
fn default_ssh_ceil(up: Rate) -> Rate {
    Rate::from_bits_per_sec(
        (up.bits_per_sec() / 10)
            .max(5 * MBIT)
            .min(up.bits_per_sec()),
    )
}

/// HTB burst in ticks as the kernel stores it: ceil(bytes * 1e9 / rate / 64).
pub fn burst_ticks(burst: Size, rate: Rate) -> Option<u64> {
    let bps = rate.bytes_per_sec().max(1) as u128;
    let ns = (burst.bytes() as u128 * 1_000_000_000).div_ceil(bps);
    let ticks = ns.div_ceil(NS_PER_TICK as u128);
    u32::try_from(ticks).ok().map(u64::from)
}

/// Whitelist entries that change nothing: a network listed twice, or one
/// inside another entry. Warnings, not errors: the guard means the same.
pub fn whitelist_warnings(v: &ValidSpec) -> Vec<String> {
    use std::collections::HashMap;
    let field = |e: &WhitelistEntry| match e.group.and_then(|g| v.groups.get(g as usize)) {
        Some(g) => format!("CIDRGroup {g}[{}]", e.index),
        None => format!("spec.whitelist[{}]", e.index),
    };
    let mut first: HashMap<IpNet, &WhitelistEntry> = HashMap::with_capacity(v.whitelist.len());
    let mut out = Vec::new();
    for e in &v.whitelist {
        if let Some(f) = first.get(&e.net) {
            out.push(format!("{}: {} repeats {}", field(e), e.net, field(f)));
        } else {
            first.insert(e.net, e);
        }
    }
    for e in &v.whitelist {
        // Only the first mention of a network is checked, against shorter prefixes.
        if !first.get(&e.net).is_some_and(|f| std::ptr::eq(*f, e)) {
            continue;
        }
        let covering = (0..e.net.prefix_len()).rev().find_map(|len| {
            let wider = IpNet::new(e.net.network(), len).ok()?.trunc();
            first.get(&wider).copied()
        });
        if let Some(w) = covering {
            out.push(format!(
                "{}: {} is inside {} ({}); it changes nothing",
                field(e),
                e.net,
                field(w),
                w.net
            ));
        }
    }
    out
}
