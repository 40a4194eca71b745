//! The EgressGuard API (`egressguard.io/v1alpha1`): the custom resource, tc's
//! units, and the one validation shared by the operator and node-shaper.

pub mod cidr_group;
pub mod conditions;
pub mod guard;
pub mod load;
pub mod node_labels;
pub mod node_shaping;
pub mod quarantine;
#[cfg(feature = "serve")]
pub mod serve;
pub mod units;
pub mod validate;

pub use cidr_group::{CIDRGroup, CidrGroupSpec, GroupRef};
pub use guard::{
    Destination, EgressGuard, EgressGuardSpec, EgressGuardStatus, Mode, NodePhase, NodeState,
    Protocol, Throttle, Uplink,
};
pub use node_shaping::{NodeShaping, NodeShapingSpec, NodeShapingStatus};
pub use quarantine::{Phase, Quarantine, QuarantineSpec, QuarantineStatus};
pub use validate::{validate, FieldError, ValidSpec, ValidationErrors};

#[cfg(test)]
mod tests;
