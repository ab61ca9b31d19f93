//! Definitions that more than one beaconbox crate needs, each defined once here:
//! the Ethernet address type ([`MacAddr`]) that netmgr hands out and the VMM's
//! virtio-net presents to the guest, and the poison-tolerant mutex lock ([`lock`])
//! every crate with shared state uses.
//!
//! This crate owns plain data types and tiny helpers only; it must never grow
//! policy, I/O or a dependency on another beaconbox crate.

pub mod mac;
pub mod sync;

pub use mac::{MacAddr, MacParseError};
pub use sync::lock;
