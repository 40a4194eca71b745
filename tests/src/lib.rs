//! End-to-end tests (see `tests/`) and the Kubernetes-API stand-in they run
//! against on machines without a real API server. The stand-in is test
//! infrastructure only: it is not Kubernetes.

pub mod standin;
