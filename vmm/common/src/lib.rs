//! Definitions that more than one beaconbox crate needs, each defined once here:
//! the Ethernet address type ([`MacAddr`]) that netmgr hands out and the VMM's
//! virtio-net presents to the guest, the poison-tolerant mutex lock ([`lock`])
//! every crate with shared state uses, and the host ↔ vminitd stream protocol
//! ([`guest_protocol`]: ports, handshake lines, event lines), and the id rule
//! every container, exec and sandbox id must pass ([`id`]).
//!
//! This crate owns plain data types and tiny helpers only; it must never grow
//! policy, I/O or a dependency on another beaconbox crate.

pub mod guest_protocol;
pub mod id;
pub mod mac;
pub mod sync;
pub mod tun;

pub use id::valid_id;
pub use mac::{MacAddr, MacParseError};
pub use sync::lock;
