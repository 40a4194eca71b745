//! A guard spec after validation ([`crate::validate()`] makes one): every
//! field checked, parsed and defaulted, in the form the planners consume.

use ipnet::IpNet;

use crate::errors::FieldError;
use crate::guard::Protocol;
use crate::units::{Rate, Size};
use crate::wide::wide_whitelist_problems;

/// A destination port range after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// Protocol to match.
    pub protocol: Protocol,
    /// First port, inclusive.
    pub first: u16,
    /// Last port, inclusive.
    pub last: u16,
    /// Index in `spec.throttle.destinations`.
    pub index: usize,
}

/// A whitelist entry after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WhitelistEntry {
    /// The network, host bits clear.
    pub net: IpNet,
    /// Index in `spec.whitelist`, or in the group's `spec.cidrs`.
    pub index: usize,
    /// The CIDRGroup it comes from (an index into [`ValidSpec::groups`]);
    /// `None` for the guard's own `spec.whitelist`.
    pub group: Option<u32>,
}

/// A spec whose every field has been checked and parsed.
#[derive(Debug, Clone, PartialEq, Hash)]
pub struct ValidSpec {
    /// Interfaces named by the spec, if any.
    pub interfaces: Option<Vec<String>>,
    /// Egress budget.
    pub uplink_rate: Rate,
    /// Burst of the uplink class.
    pub uplink_burst: Option<Size>,
    /// Guaranteed rate of the throttled class.
    pub throttle_rate: Rate,
    /// Ceiling of the throttled class.
    pub throttle_ceil: Rate,
    /// Burst of the throttled class.
    pub throttle_burst: Option<Size>,
    /// Throttled destinations, in spec order.
    pub destinations: Vec<PortRange>,
    /// Whitelisted networks: `spec.whitelist` in order, then each group's.
    pub whitelist: Vec<WhitelistEntry>,
    /// Names of the CIDRGroups whose entries [`ValidSpec::whitelist`] holds.
    pub groups: Vec<String>,
    /// Throttle packets whose ports cannot be read (later fragments, IPv6
    /// extension headers), unless whitelisted or protected.
    pub throttle_portless: bool,
    /// Send TCP from source port 22 past every class (SSH stays reachable).
    pub protect_ssh_replies: bool,
    /// `spec.protect` entries without ports: networks and why.
    pub protect: Vec<(IpNet, String)>,
    /// `spec.protect` entries with ports.
    pub protect_ports: Vec<ProtectPort>,
    /// The protected lane (control plane, nodes, `spec.protect`).
    pub protected_lane: LaneRates,
    /// The SSH lane.
    pub ssh_lane: LaneRates,
    /// A quarantine throttles every destination but the whitelisted and
    /// protected ones, whatever the port or protocol (mode `Auto` with
    /// `quarantine.throttle: AllButWhitelisted`).
    pub throttle_all: bool,
    /// `spec.allowWideRanges`: the guard accepts whitelist and protect
    /// entries that exempt a large part of the internet.
    pub allow_wide_ranges: bool,
}

/// A lane's guaranteed rate and ceiling, defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LaneRates {
    /// Guaranteed rate.
    pub rate: Rate,
    /// Ceiling.
    pub ceil: Rate,
}

/// A protected destination port range (`spec.protect[i]` with a port).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProtectPort {
    /// The network.
    pub net: IpNet,
    /// Protocol to match.
    pub protocol: Protocol,
    /// First port, inclusive.
    pub first: u16,
    /// Last port, inclusive.
    pub last: u16,
    /// Why.
    pub reason: String,
    /// Index in `spec.protect`.
    pub index: usize,
}

impl ValidSpec {
    /// What [`wide_whitelist_problems`] finds in the whitelist with the
    /// CIDRGroups added ([`ValidSpec::add_group`]); nothing when the guard
    /// sets `spec.allowWideRanges`. [`crate::validate()`] checks the guard's own
    /// entries; whoever adds groups runs this once they are all added.
    pub fn wide_group_problems(&self) -> Vec<FieldError> {
        wide_whitelist_problems(
            self.allow_wide_ranges,
            self.whitelist.iter().map(|e| {
                let g = e.group.and_then(|g| self.groups.get(g as usize));
                (g.map(String::as_str), e.index, &e.net)
            }),
        )
    }

    /// Adds a CIDRGroup's entries (already validated) to the whitelist.
    pub fn add_group(&mut self, name: &str, nets: &[IpNet]) {
        let g = self.groups.len() as u32;
        self.groups.push(name.to_string());
        self.whitelist.reserve(nets.len());
        self.whitelist
            .extend(nets.iter().enumerate().map(|(index, net)| WhitelistEntry {
                net: *net,
                index,
                group: Some(g),
            }));
    }
}
