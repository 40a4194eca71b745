//! How the operator treats a guard: shared by the guard's spec and the
//! quarantine policy it carries, so it sits below both.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the operator treats a guard.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Mode {
    /// Program the selected nodes now.
    #[default]
    Enforce,
    /// Program a node only while it is quarantined by a metric or alert.
    Auto,
    /// Compute and report everything; program nothing.
    DryRun,
}
