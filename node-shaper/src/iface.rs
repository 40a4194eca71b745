//! Finding interfaces: by name, or the ones carrying the default routes.

use std::fs;

/// A network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    /// Name, e.g. `enp1s0`.
    pub name: String,
    /// Kernel index.
    pub index: i32,
}

/// Why an interface could not be found.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    /// No such interface in this network namespace.
    #[error("interface {0:?} does not exist on this host (see `ip link`); fix spec.interfaces or --interface")]
    Missing(String),
    /// No default route to infer interfaces from.
    #[error(
        "no interface given and no default route found; set spec.interfaces or pass --interface"
    )]
    NoDefaultRoute,
}

/// Looks up one interface by name.
pub fn by_name(name: &str) -> Result<Interface, IfaceError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(IfaceError::Missing(name.to_string()));
    }
    let idx = fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| IfaceError::Missing(name.to_string()))?;
    Ok(Interface {
        name: name.to_string(),
        index: idx,
    })
}

/// Interfaces of the default IPv4 and IPv6 routes, deduplicated.
pub fn default_route_interfaces() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if let Ok(t) = fs::read_to_string("/proc/net/route") {
        for line in t.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask
            if f.len() > 7
                && f[1] == "00000000"
                && f[7] == "00000000"
                && !out.iter().any(|o| o == f[0])
            {
                out.push(f[0].to_string());
            }
        }
    }
    if let Ok(t) = fs::read_to_string("/proc/net/ipv6_route") {
        for line in t.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            // dst dst_len src src_len nexthop metric refcnt use flags iface
            if f.len() == 10
                && f[0] == "00000000000000000000000000000000"
                && f[1] == "00"
                && f[9] != "lo"
                && !out.iter().any(|o| o == f[9])
            {
                out.push(f[9].to_string());
            }
        }
    }
    out
}

/// Resolves the interfaces to act on: the CLI flag wins, then the spec, then default routes.
pub fn resolve(flag: Option<&str>, spec: Option<&[String]>) -> Result<Vec<Interface>, IfaceError> {
    let names: Vec<String> = match (flag, spec) {
        (Some(f), _) => vec![f.to_string()],
        (None, Some(s)) => s.to_vec(),
        (None, None) => {
            let d = default_route_interfaces();
            if d.is_empty() {
                return Err(IfaceError::NoDefaultRoute);
            }
            d
        }
    };
    names.iter().map(|n| by_name(n)).collect()
}
