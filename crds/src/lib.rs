//! The EgressGuard API (`egressguard.io/v1alpha1`): the custom resource, tc's
//! units, and the one validation shared by the operator and node-shaper.
//!
//! Imports run one way, from the top of this list down; nothing imports a
//! module above it:
//!
//! - [`mod@validate`] (the one validation; it knows every kind) and [`load`];
//! - the kinds: [`node_shaping`], [`cidr_group`] (the group kind, and how a
//!   guard's references resolve), [`valid_spec`] (a checked guard spec),
//!   [`guard`], [`quarantine`] (the record kind), [`quarantine_policy`] (a
//!   guard's `spec.quarantine` and its check);
//! - shared vocabulary, knowing no kind: [`wide`] (on [`net`]), [`selector`],
//!   [`net`], [`mode`], [`units`], [`duration`], [`conditions`],
//!   [`node_labels`], and [`errors`] at the bottom.

pub mod cidr_group;
pub mod conditions;
pub mod duration;
pub mod errors;
pub mod guard;
pub mod load;
pub mod mode;
pub mod net;
pub mod node_labels;
pub mod node_shaping;
pub mod quarantine;
pub mod quarantine_policy;
pub mod selector;
#[cfg(feature = "serve")]
pub mod serve;
pub mod units;
pub mod valid_spec;
pub mod validate;
pub mod wide;

pub use cidr_group::{CIDRGroup, CidrGroupSpec, CidrGroupStatus, GroupRef};
pub use guard::{
    Destination, EgressGuard, EgressGuardSpec, EgressGuardStatus, Mode, NodePhase, NodeState,
    Protocol, Throttle, Uplink,
};
pub use node_shaping::{NodeShaping, NodeShapingSpec, NodeShapingStatus};
pub use quarantine::{Phase, Quarantine, QuarantineSpec, QuarantineStatus};
pub use validate::{validate, FieldError, ValidSpec, ValidationErrors};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSON,
};
use kube::CustomResourceExt;

/// Every CRD of the API, as the chart ships them: EgressGuard, NodeShaping,
/// Quarantine, CIDRGroup.
///
/// Each defaults `status` to `{observedGeneration: 0}`. An object nobody has
/// processed yet then reads as "generation 1 not observed" instead of having
/// no status at all, which kstatus (Flux, Helm's `--wait`) takes for Current
/// and Argo CD for Healthy. The API server applies the default when it reads
/// an object without a status, so it holds from the create response on.
pub fn definitions() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![
        EgressGuard::crd(),
        NodeShaping::crd(),
        Quarantine::crd(),
        CIDRGroup::crd(),
    ];
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            let status = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
                .and_then(|s| s.properties.as_mut())
                .and_then(|p| p.get_mut("status"));
            if let Some(status) = status {
                status.default = Some(JSON(serde_json::json!({ "observedGeneration": 0 })));
            }
        }
    }
    crds
}

#[cfg(test)]
mod tests;
