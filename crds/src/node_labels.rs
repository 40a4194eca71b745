//! Which Node labels a node's own kubelet may set, under the NodeRestriction
//! admission plugin. A label the node can set is the node's to choose: it
//! must not decide whether the node is shaped or quarantined.

/// Labels in the `kubernetes.io` and `k8s.io` namespaces that NodeRestriction
/// still lets a kubelet set on its own Node.
const KUBELET_LABELS: [&str; 11] = [
    "kubernetes.io/hostname",
    "kubernetes.io/arch",
    "kubernetes.io/os",
    "beta.kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "failure-domain.beta.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
];

fn within(ns: &str, domain: &str) -> bool {
    ns == domain || ns.ends_with(&format!(".{domain}"))
}

/// Can a node's kubelet set (or remove) label `key` on its own Node?
/// True for unprefixed keys and every prefix outside `kubernetes.io` and
/// `k8s.io`; false for `node-restriction.kubernetes.io/` keys, which exist
/// for exactly this.
pub fn kubelet_settable(key: &str) -> bool {
    let Some((ns, _)) = key.split_once('/') else {
        return true;
    };
    if within(ns, "node-restriction.kubernetes.io") {
        return false;
    }
    if !(within(ns, "kubernetes.io") || within(ns, "k8s.io")) {
        return true;
    }
    KUBELET_LABELS.contains(&key)
        || within(ns, "kubelet.kubernetes.io")
        || within(ns, "node.kubernetes.io")
}

#[cfg(test)]
mod tests {
    use super::kubelet_settable;

    #[test]
    fn only_restricted_prefixes_are_out_of_a_kubelets_reach() {
        for key in [
            "site",
            "egressguard.io/exclude",
            "example.com/role",
            "kubernetes.io/hostname",
            "topology.kubernetes.io/zone",
            "node.kubernetes.io/instance-type",
            "kubelet.kubernetes.io/anything",
        ] {
            assert!(kubelet_settable(key), "{key}");
        }
        for key in [
            "node-restriction.kubernetes.io/egressguard-exclude",
            "node-restriction.kubernetes.io/site",
            "node-role.kubernetes.io/control-plane",
            "example.k8s.io/x",
        ] {
            assert!(!kubelet_settable(key), "{key}");
        }
    }
}
