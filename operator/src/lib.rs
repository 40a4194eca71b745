//! The EgressGuard operator. The decisions are pure: [`decide`] (guards, nodes
//! and control-plane endpoints in, one plan per node out), [`evaluate`]
//! (Prometheus answers in, Breach/OK/Unknown per node out) and [`quarantine`]
//! (quarantines admitted, started and released). [`run`] and [`remediate`]
//! are the process around them (watches, writes, status, Events, finalizers,
//! leader election, the Prometheus client and the Alertmanager receiver).

pub mod context;
pub mod decide;
pub mod enforcement;
pub mod evaluate;
pub mod group_status;
pub mod index;
pub mod intent;
pub mod kinds;
pub mod leader;
pub mod own_writes;
pub mod pass;
pub mod prom;
pub mod quarantine;
pub mod quarantine_progress;
pub mod rbac;
pub mod receiver;
pub mod remediate;
pub mod run;
pub mod snapshot;
pub mod status;
pub mod webhook;
pub mod writes;
