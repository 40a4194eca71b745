//! What to enforce on a host: a validated guard spec plus the destinations
//! that must always stay whitelisted, from either an EgressGuard or the
//! operator's NodeShaping for this node.

use egressguard_crds::load::Manifest;
use egressguard_crds::node_shaping::{NodeShaping, NodeShapingSpec, ProtectedEntry};
use egressguard_crds::validate::parse_cidr;
use egressguard_crds::{validate, EgressGuardSpec, FieldError, ValidSpec, ValidationErrors};

use crate::plan::Protected;

/// A checked plan input.
#[derive(Debug, Clone)]
pub struct Target {
    /// Guard name (for messages).
    pub name: String,
    /// The spec as written (kept to remember what was applied).
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
}

impl Target {
    /// Builds a target from a guard spec and protected entries, validating both.
    pub fn new(
        name: &str,
        spec: &EgressGuardSpec,
        protected: &[ProtectedEntry],
    ) -> Result<Target, ValidationErrors> {
        let mut errors = Vec::new();
        let valid = validate(spec).map_err(|e| errors.extend(e.0)).ok();
        let mut prot = Vec::new();
        for (i, p) in protected.iter().enumerate() {
            match parse_cidr(&p.cidr) {
                Ok(net) => prot.push(Protected {
                    net,
                    reason: p.reason.clone(),
                }),
                Err(m) => errors.push(FieldError {
                    path: format!("spec.protected[{i}].cidr"),
                    message: m,
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
                spec: spec.clone(),
                valid,
                protected: prot,
            }),
            _ => Err(ValidationErrors(errors)),
        }
    }

    /// From a loaded manifest.
    pub fn from_manifest(m: &Manifest) -> Result<Target, TargetError> {
        match m {
            Manifest::Guard(g) => {
                let name = g.metadata.name.clone().unwrap_or_default();
                Target::new(&name, &g.spec, &[]).map_err(|errors| TargetError::Invalid {
                    kind: "EgressGuard",
                    name,
                    errors,
                })
            }
            Manifest::NodeShaping(ns) => {
                let name = ns.metadata.name.clone().unwrap_or_default();
                let Some(spec) = &ns.spec.shaping else {
                    return Err(TargetError::Removal(name));
                };
                Target::new(&name, spec, &ns.spec.protected).map_err(|errors| {
                    TargetError::Invalid {
                        kind: "NodeShaping",
                        name,
                        errors,
                    }
                })
            }
        }
    }

    /// The target as a NodeShaping document, to remember what was applied.
    pub fn to_node_shaping(&self, node: &str) -> NodeShaping {
        let mut ns = NodeShaping::new(
            node,
            NodeShapingSpec {
                node_name: node.to_string(),
                guard: None,
                shaping: Some(self.spec.clone()),
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
