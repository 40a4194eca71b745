//! End-to-end test support (see `tests/`): a real Kubernetes control plane per
//! test, started from the binaries `tests/control-plane` builds.

pub mod argocd;
pub mod cluster;
pub mod kubelet;
pub mod lab;
pub mod monitoring;
pub mod plot;
pub mod site;
pub mod tools;
