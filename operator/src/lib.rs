//! The EgressGuard operator's logic, kept free of I/O so it can be tested as
//! plain functions: [`decide`] turns guards, nodes and control-plane endpoints
//! into one plan per node.

pub mod decide;
