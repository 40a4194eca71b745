//! The EgressGuard operator. [`decide`] is the pure core (guards, nodes and
//! control-plane endpoints in, one plan per node out); [`run`] is the process
//! around it (watches, writes, status, events, finalizer, leader election).

pub mod decide;
pub mod evaluate;
pub mod http;
pub mod leader;
pub mod prom;
pub mod quarantine;
pub mod rbac;
pub mod remediate;
pub mod run;
pub mod webhook;
