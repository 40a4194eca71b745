//! Networks as specs write them: parsing a CIDR, and the family and address
//! span of a network. Leaf vocabulary shared by the guard's whitelist, its
//! protected destinations and CIDRGroups.

use std::net::IpAddr;

use ipnet::IpNet;

/// Why a whitelist, protect or CIDRGroup entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Neither an address nor an address with a prefix length.
    #[error("{input:?} is not a CIDR; write an address and prefix length such as 203.0.113.0/24 or 2001:db8::/48")]
    NotACidr {
        /// The rejected input, trimmed.
        input: String,
    },
    /// Bits are set past the prefix length (`10.0.0.1/8`).
    #[error("{input} has host bits set; the network is {network}")]
    HostBitsSet {
        /// The rejected input, trimmed.
        input: String,
        /// The network it was probably meant to be.
        network: IpNet,
    },
}

/// Parses a whitelist entry; a bare address means a host route.
pub fn parse_cidr(s: &str) -> Result<IpNet, CidrError> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let net: IpNet = s.parse().map_err(|_| CidrError::NotACidr {
        input: s.to_string(),
    })?;
    if net.trunc() != net {
        return Err(CidrError::HostBitsSet {
            input: s.to_string(),
            network: net.trunc(),
        });
    }
    Ok(net)
}

/// "IPv4" or "IPv6", as messages name a network's family.
pub(crate) fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "IPv4",
        IpNet::V6(_) => "IPv6",
    }
}

/// Family index (0 IPv4, 1 IPv6) and first and last address of a network.
pub(crate) fn span(net: &IpNet) -> (usize, u128, u128) {
    match net {
        IpNet::V4(n) => (
            0,
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNet::V6(n) => (1, u128::from(n.network()), u128::from(n.broadcast())),
    }
}
