//! The netlink edge: encoding operations, a pipelined socket, reading state back.

pub mod decode;
pub mod encode;
pub mod monitor;
pub mod socket;

pub use decode::{class_counters, observe, Counters, Observed, RootState};
pub use encode::{encode, Request};
pub use socket::{KernelError, KernelReply, Netlink};
