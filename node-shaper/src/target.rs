//! What to enforce on a host: a validated guard spec (with the CIDRGroups
//! its whitelist references) plus the destinations that must always stay
//! whitelisted, from either an EgressGuard or the operator's NodeShaping for
//! this node.

use std::collections::BTreeMap;

use egressguard_crds::load::Manifest;
use egressguard_crds::node_shaping::{NodeShaping, NodeShapingSpec, ProtectedEntry, ResolvedGroup};
use egressguard_crds::validate::parse_cidr;
use egressguard_crds::{
    validate, CIDRGroup, CidrGroupSpec, EgressGuardSpec, FieldError, ValidSpec, ValidationErrors,
};
use ipnet::IpNet;

use crate::plan::Protected;

/// A checked plan input.
#[derive(Debug, Clone)]
pub struct Target {
    /// Name of the guard (or plan) it comes from, for messages.
    pub name: String,
    /// The spec as written (kept to remember what was applied), without
    /// `whitelist`: those entries are in `valid.whitelist`, and a
    /// 100,000-entry list held twice cost 5.6 MiB at every apply's peak
    /// ([`Target::to_node_shaping`] writes them back).
    pub spec: EgressGuardSpec,
    /// The spec, validated.
    pub valid: ValidSpec,
    /// Always-whitelisted destinations.
    pub protected: Vec<Protected>,
}

/// Why a manifest cannot be enforced.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Field errors.
    #[error("{kind} {name:?} is invalid:\n{errors}")]
    Invalid {
        /// Kind of the manifest.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Every problem.
        errors: ValidationErrors,
    },
    /// A NodeShaping that asks for removal.
    #[error("NodeShaping {0:?} carries no shaping (it asks for removal); use `node-shaper reset`")]
    Removal(String),
    /// A NodeShaping from the operator names its guard instead of carrying it.
    #[error("NodeShaping {0:?} names EgressGuard {1:?} instead of carrying its spec; apply the guard (and its CIDRGroups) from a file instead")]
    ByReference(String, String),
}

/// A group's name and validated entries.
pub type GroupEntries<'a> = (&'a str, &'a [IpNet]);

impl Target {
    /// Builds a target from a guard spec and protected entries, validating both.
    pub fn new(
        name: &str,
        spec: &EgressGuardSpec,
        protected: &[ProtectedEntry],
    ) -> Result<Target, ValidationErrors> {
        Target::with_groups(name, spec, protected, &[])
    }

    /// Like [`Target::new`], with the entries of the CIDRGroups the guard's
    /// `whitelistGroups` resolved to (in the order given).
    pub fn with_groups(
        name: &str,
        spec: &EgressGuardSpec,
        protected: &[ProtectedEntry],
        groups: &[GroupEntries<'_>],
    ) -> Result<Target, ValidationErrors> {
        let mut errors = Vec::new();
        let mut valid = validate(spec).map_err(|e| errors.extend(e.0)).ok();
        if let Some(v) = &mut valid {
            for (g, nets) in groups {
                v.add_group(g, nets);
            }
            errors.extend(v.wide_group_problems());
        }
        let mut prot = Vec::new();
        for (i, p) in protected.iter().enumerate() {
            match parse_cidr(&p.cidr) {
                Ok(net) => prot.push(Protected {
                    net,
                    reason: p.reason.clone(),
                }),
                Err(m) => errors.push(FieldError {
                    path: format!("spec.protected[{i}].cidr"),
                    message: m.to_string(),
                }),
            }
        }
        // The guard's own spec.protect joins what the plan protects.
        if let Some(v) = &valid {
            prot.extend(v.protect.iter().map(|(net, reason)| Protected {
                net: *net,
                reason: reason.clone(),
            }));
        }
        match valid {
            Some(valid) if errors.is_empty() => Ok(Target {
                name: name.into(),
                spec: EgressGuardSpec {
                    whitelist: Vec::new(),
                    ..spec.clone()
                },
                valid,
                protected: prot,
            }),
            _ => Err(ValidationErrors(errors)),
        }
    }

    /// From a loaded manifest and the CIDRGroups loaded with it (a guard's
    /// `whitelistGroups` resolve among these, as they would in a cluster).
    pub fn from_manifest(m: &Manifest, groups: &[&CIDRGroup]) -> Result<Target, TargetError> {
        let (kind, name, spec, protected, named) = match m {
            Manifest::Guard(g) => (
                "EgressGuard",
                g.metadata.name.clone().unwrap_or_default(),
                &g.spec,
                &[][..],
                None,
            ),
            Manifest::NodeShaping(ns) => {
                let name = ns.metadata.name.clone().unwrap_or_default();
                let Some(spec) = &ns.spec.shaping else {
                    return Err(match &ns.spec.guard {
                        Some(g) => TargetError::ByReference(name, g.name.clone()),
                        None => TargetError::Removal(name),
                    });
                };
                let named = (!ns.spec.groups.is_empty()).then_some(&ns.spec.groups);
                ("NodeShaping", name, spec, &ns.spec.protected[..], named)
            }
            Manifest::Group(g) => {
                return Err(TargetError::Invalid {
                    kind: "CIDRGroup",
                    name: g.metadata.name.clone().unwrap_or_default(),
                    errors: ValidationErrors(vec![FieldError {
                        path: "kind".into(),
                        message: "a CIDRGroup is enforced through a guard that references it; put the EgressGuard in the same file".into(),
                    }]),
                })
            }
        };
        let invalid = |errors| TargetError::Invalid {
            kind,
            name: name.clone(),
            errors,
        };
        let parsed = resolve_in_file(spec, named, groups).map_err(invalid)?;
        let entries: Vec<GroupEntries<'_>> = parsed
            .iter()
            .map(|(n, nets)| (n.as_str(), nets.as_slice()))
            .collect();
        Target::with_groups(&name, spec, protected, &entries).map_err(invalid)
    }

    /// The CIDRGroups whose entries this target whitelists, rebuilt from
    /// the validated entries (in their original order).
    pub fn group_objects(&self) -> Vec<CIDRGroup> {
        let mut by_group: Vec<Vec<String>> = vec![Vec::new(); self.valid.groups.len()];
        for e in &self.valid.whitelist {
            if let Some(g) = e.group.and_then(|g| by_group.get_mut(g as usize)) {
                g.push(e.net.to_string());
            }
        }
        self.valid
            .groups
            .iter()
            .zip(by_group)
            .map(|(name, cidrs)| CIDRGroup::new(name, CidrGroupSpec { cidrs }))
            .collect()
    }

    /// The target as a NodeShaping document, to remember what was applied
    /// (with [`Target::group_objects`], a file `load` reads back).
    pub fn to_node_shaping(&self, node: &str) -> NodeShaping {
        let mut ns = NodeShaping::new(
            node,
            NodeShapingSpec {
                node_name: node.to_string(),
                guard: None,
                shaping: Some(EgressGuardSpec {
                    whitelist: self
                        .valid
                        .whitelist
                        .iter()
                        .filter(|e| e.group.is_none())
                        .map(|e| e.net.to_string())
                        .collect(),
                    ..self.spec.clone()
                }),
                groups: self
                    .group_objects()
                    .iter()
                    .map(|g| ResolvedGroup {
                        name: g.metadata.name.clone().unwrap_or_default(),
                        digest: g.spec.digest(),
                    })
                    .collect(),
                protected: self
                    .protected
                    .iter()
                    .map(|p| ProtectedEntry {
                        cidr: p.net.to_string(),
                        reason: p.reason.clone(),
                    })
                    .collect(),
                enforce: true,
            },
        );
        ns.metadata.annotations = Some(
            [("egressguard.io/guard".to_string(), self.name.clone())]
                .into_iter()
                .collect(),
        );
        ns
    }
}

/// The entries of the groups a spec uses, out of those in the same file:
/// the groups a plan names (by digest), or else the guard's
/// `whitelistGroups` resolved by name and label. Errors name the reference
/// or the group's entry.
fn resolve_in_file(
    spec: &EgressGuardSpec,
    named: Option<&Vec<ResolvedGroup>>,
    groups: &[&CIDRGroup],
) -> Result<Vec<(String, Vec<IpNet>)>, ValidationErrors> {
    let by_name: BTreeMap<&str, &CIDRGroup> = groups
        .iter()
        .map(|g| (g.metadata.name.as_deref().unwrap_or_default(), *g))
        .collect();
    let empty = BTreeMap::new();
    let names: Vec<String> = match named {
        Some(refs) => {
            let mut errors = Vec::new();
            for (i, r) in refs.iter().enumerate() {
                match by_name.get(r.name.as_str()) {
                    Some(g) if g.spec.digest() == r.digest => {}
                    Some(_) => errors.push(FieldError {
                        path: format!("spec.groups[{i}]"),
                        message: format!(
                            "CIDRGroup {} in the file is not the version the plan names ({})",
                            r.name, r.digest
                        ),
                    }),
                    None => errors.push(FieldError {
                        path: format!("spec.groups[{i}]"),
                        message: format!(
                            "CIDRGroup {} is not in the file; add it as another document",
                            r.name
                        ),
                    }),
                }
            }
            if !errors.is_empty() {
                return Err(ValidationErrors(errors));
            }
            refs.iter().map(|r| r.name.clone()).collect()
        }
        None => egressguard_crds::cidr_group::resolve(
            &spec.whitelist_groups,
            by_name
                .iter()
                .map(|(n, g)| (*n, g.metadata.labels.as_ref().unwrap_or(&empty))),
        )
        .map_err(ValidationErrors)?,
    };
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for name in names {
        if let Some(g) = by_name.get(name.as_str()) {
            match g.spec.validate() {
                Ok(nets) => out.push((name, nets)),
                Err(e) => errors.extend(e.0.into_iter().map(|f| FieldError {
                    path: format!("CIDRGroup {name}: {}", f.path),
                    message: f.message,
                })),
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ValidationErrors(errors))
    }
}
