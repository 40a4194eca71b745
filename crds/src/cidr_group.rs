//! `CIDRGroup` (`egressguard.io/v1alpha1`, cluster-scoped): a named list of
//! networks kept by the people who own it (a partner list, the payment
//! providers), referenced from guards by name or label selector, like Cilium's
//! `CiliumCIDRGroup` and Calico's `GlobalNetworkSet`.
//!
//! Guards and per-node plans name groups instead of copying them, so a
//! 100,000-entry whitelist costs one set of objects in etcd whatever the
//! number of nodes, and one edit is one write.

use std::collections::BTreeMap;

use ipnet::IpNet;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::errors::{FieldError, ValidationErrors};
pub use crate::guard::{GroupRef, ResolvedGroup};
use crate::net::parse_cidr;
use crate::selector::{selector_problems, selects};
use crate::valid_spec::ValidSpec;
use crate::wide::wide_whitelist_problems;

/// Most entries one group may hold. etcd refuses objects over 1.5 MiB; a
/// list of IPv6 /128s reaches that near 35,000 entries, IPv4 /24s near
/// 80,000. Larger lists are split into several groups that share a label.
pub const MAX_GROUP_ENTRIES: usize = 50_000;

/// A list of networks a guard may whitelist.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "egressguard.io",
    version = "v1alpha1",
    kind = "CIDRGroup",
    plural = "cidrgroups",
    shortname = "egcg",
    status = "CidrGroupStatus",
    printcolumn = r#"{"name":"Entries","type":"integer","jsonPath":".status.entries"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CidrGroupSpec {
    /// IPv4/IPv6 networks with host bits clear (a bare address is a host route).
    #[schemars(length(max = 50000))]
    pub cidrs: Vec<String>,
}

impl CidrGroupSpec {
    /// A digest of the list as written (order included: `explain` names
    /// entries by index). Plans name groups by it, and the agent enforces a
    /// plan only when the groups it holds have the digests the plan names.
    pub fn digest(&self) -> String {
        // FNV-1a: stable across versions and platforms, no dependency, and
        // collisions only matter between two versions of one group.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for c in &self.cidrs {
            for b in c.trim().bytes().chain(std::iter::once(b'\n')) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        format!("fnv1a64:{h:016x}")
    }

    /// Every entry parsed, or every problem with its field path.
    pub fn validate(&self) -> Result<Vec<IpNet>, ValidationErrors> {
        let mut errors = Vec::new();
        if self.cidrs.len() > MAX_GROUP_ENTRIES {
            errors.push(FieldError {
                path: "spec.cidrs".into(),
                message: format!(
                    "has {} entries; at most {MAX_GROUP_ENTRIES} fit one object: split the list into several groups with one label and select them with whitelistGroups[].selector",
                    self.cidrs.len()
                ),
            });
        }
        let mut nets = Vec::with_capacity(self.cidrs.len());
        for (i, s) in self.cidrs.iter().enumerate() {
            match parse_cidr(s) {
                Ok(n) if n.prefix_len() == 0 => errors.push(FieldError {
                    path: format!("spec.cidrs[{i}]"),
                    message: format!("{n} is every destination of its family; a guard that whitelists it throttles nothing. A group cannot hold it: put it in the guard's own whitelist with spec.whitelistAllDestinations: true if that is meant"),
                }),
                Ok(n) => nets.push(n),
                Err(e) => errors.push(FieldError {
                    path: format!("spec.cidrs[{i}]"),
                    message: e.to_string(),
                }),
            }
        }
        if errors.is_empty() {
            Ok(nets)
        } else {
            Err(ValidationErrors(errors))
        }
    }
}

/// What the operator found in a group (written by its leader).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CidrGroupStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Entries of the list (when valid).
    #[serde(default)]
    pub entries: i64,
    /// [`CidrGroupSpec::digest`] of the content (when valid): what guards'
    /// `status.groups` name once their nodes enforce this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Standard conditions: Ready (the list is valid), Stalled (it is not:
    /// only an edit can fix it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

/// Problems of a reference list that do not depend on which groups exist.
pub fn check_refs(refs: &[GroupRef]) -> Vec<FieldError> {
    let mut out = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        let path = format!("spec.whitelistGroups[{i}]");
        match (&r.name, &r.selector) {
            (Some(_), Some(_)) | (None, None) => out.push(FieldError {
                path,
                message: "set exactly one of name (one group) and selector (groups by label)"
                    .into(),
            }),
            (Some(n), None) if n.is_empty() => out.push(FieldError {
                path: format!("{path}.name"),
                message: "must not be empty".into(),
            }),
            (None, Some(sel)) => {
                out.extend(selector_problems(sel, &format!("{path}.selector")));
            }
            _ => {}
        }
    }
    out
}

/// The groups a reference list names, sorted and without duplicates, out of
/// the groups that exist (name → labels). A missing name, or a selector that
/// matches no group, is an error naming the reference: a whitelist never
/// shrinks silently because a group is absent or mislabelled. Once the
/// groups' entries are at hand, [`check_resolved`] checks they do not widen
/// the guard's whitelist beyond what it allows.
pub fn resolve<'a>(
    refs: &[GroupRef],
    groups: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>)> + Clone,
) -> Result<Vec<String>, Vec<FieldError>> {
    let mut errors = check_refs(refs);
    let mut names = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        let path = format!("spec.whitelistGroups[{i}]");
        // A malformed reference has its error already; it resolves to nothing.
        if errors
            .iter()
            .any(|e| e.path.starts_with(&format!("{path}.")) || e.path == path)
        {
            continue;
        }
        match (&r.name, &r.selector) {
            (Some(n), None) => {
                if groups.clone().into_iter().any(|(g, _)| g == n) {
                    names.push(n.clone());
                } else {
                    errors.push(FieldError {
                        path: format!("{path}.name"),
                        message: format!("CIDRGroup {n:?} does not exist; create it (kubectl apply -f) or fix the name"),
                    });
                }
            }
            (None, Some(sel)) => {
                let before = names.len();
                for (g, labels) in groups.clone() {
                    if selects(sel, labels).unwrap_or(false) {
                        names.push(g.to_string());
                    }
                }
                if names.len() == before {
                    errors.push(FieldError {
                        path: format!("{path}.selector"),
                        message: "matches no CIDRGroup; label the groups it should select, or fix the selector".into(),
                    });
                }
            }
            _ => {}
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// The entries of the groups a guard resolved to ([`resolve`]; name and
/// [`CidrGroupSpec::validate`]d entries), checked against that guard (its
/// [`crate::validate()`]d spec): unless it sets `spec.allowWideRanges`, an
/// entry shorter than /8 (IPv4) or /16 (IPv6) is an error naming the group
/// and the entry's index, and so is a whitelist that, with the groups,
/// covers half an address family or more. A group selected by label never
/// widens a guard silently. Same errors as
/// [`ValidSpec::wide_group_problems`](crate::ValidSpec::wide_group_problems),
/// without copying the groups' entries into the guard's whitelist.
pub fn check_resolved(
    guard: &ValidSpec,
    groups: &[(&str, &[IpNet])],
) -> Result<(), Vec<FieldError>> {
    let own = guard
        .whitelist
        .iter()
        .filter(|e| e.group.is_none())
        .map(|e| (None, e.index, &e.net));
    let grouped = groups.iter().flat_map(|(name, nets)| {
        nets.iter()
            .enumerate()
            .map(move |(i, n)| (Some(*name), i, n))
    });
    let errors = wide_whitelist_problems(guard.allow_wide_ranges, own.chain(grouped));
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn digest_follows_content_and_order() {
        let a = CidrGroupSpec {
            cidrs: vec!["10.0.0.0/8".into(), "192.0.2.0/24".into()],
        };
        let b = CidrGroupSpec {
            cidrs: vec!["192.0.2.0/24".into(), "10.0.0.0/8".into()],
        };
        assert_eq!(a.digest(), a.clone().digest());
        assert_ne!(a.digest(), b.digest());
        assert!(a.digest().starts_with("fnv1a64:"));
        // Entry boundaries count: ["1", "0.0.0.0/8"] is not ["10.0.0.0/8"].
        let c = CidrGroupSpec {
            cidrs: vec!["1".into(), "0.0.0.0/8".into()],
        };
        let d = CidrGroupSpec {
            cidrs: vec!["10.0.0.0/8".into()],
        };
        assert_ne!(c.digest(), d.digest());
    }

    #[test]
    fn validation_names_each_bad_entry() {
        let g = CidrGroupSpec {
            cidrs: vec!["10.0.0.1/8".into(), "2001:db8::/48".into(), "nope".into()],
        };
        let e = g.validate().expect_err("invalid").to_string();
        assert_eq!(
            e,
            "spec.cidrs[0]: 10.0.0.1/8 has host bits set; the network is 10.0.0.0/8\n\
             spec.cidrs[2]: \"nope\" is not a CIDR; write an address and prefix length such as 203.0.113.0/24 or 2001:db8::/48"
        );
        let too_many = CidrGroupSpec {
            cidrs: vec!["10.0.0.0/8".into(); MAX_GROUP_ENTRIES + 1],
        };
        let e = too_many.validate().expect_err("too many").to_string();
        assert!(
            e.starts_with("spec.cidrs: has 50001 entries; at most 50000"),
            "{e}"
        );
    }

    #[test]
    fn references_resolve_by_name_and_label() {
        let partners = labels(&[("egressguard.io/whitelist", "business")]);
        let other = labels(&[]);
        let groups = [
            ("payment-partners", &partners),
            ("cdn", &partners),
            ("misc", &other),
        ];
        let by_label = GroupRef {
            selector: Some(LabelSelector {
                match_labels: Some(labels(&[("egressguard.io/whitelist", "business")])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let by_name = GroupRef {
            name: Some("payment-partners".into()),
            ..Default::default()
        };
        let got = resolve(&[by_name.clone(), by_label.clone()], groups.iter().copied());
        assert_eq!(
            got,
            Ok(vec!["cdn".to_string(), "payment-partners".to_string()])
        );

        let missing = GroupRef {
            name: Some("partners".into()),
            ..Default::default()
        };
        let nothing = GroupRef {
            selector: Some(LabelSelector {
                match_labels: Some(labels(&[("team", "none")])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let errs = resolve(&[missing, nothing], groups.iter().copied()).expect_err("unresolved");
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            text,
            [
                "spec.whitelistGroups[0].name: CIDRGroup \"partners\" does not exist; create it (kubectl apply -f) or fix the name",
                "spec.whitelistGroups[1].selector: matches no CIDRGroup; label the groups it should select, or fix the selector",
            ]
        );
        let both = GroupRef {
            name: Some("cdn".into()),
            selector: by_label.selector,
        };
        let errs = resolve(&[both], groups.iter().copied()).expect_err("both");
        assert_eq!(
            errs[0].to_string(),
            "spec.whitelistGroups[0]: set exactly one of name (one group) and selector (groups by label)"
        );
    }
}
