//! node-shaper: enforces an EgressGuard's egress shaping on one host with HTB
//! classes, SFQ leaves and u32 filters, programmed over rtnetlink.
//!
//! The pipeline is pure until the last step: [`plan`] turns a validated spec
//! into a [`model::Shape`], [`netlink::observe`] reads the kernel's shape,
//! [`diff`] computes operations, and [`engine`] sends them transactionally.

pub mod agent;
pub mod alloc;
pub mod diff;
pub mod engine;
pub mod explain;
pub mod hashing;
pub mod iface;
pub mod layout;
pub mod model;
pub mod netlink;
pub mod op;
pub mod plan;
pub mod ports;
pub mod render;
pub mod show;
pub mod sim;
pub mod state;
pub mod target;
pub mod written;
