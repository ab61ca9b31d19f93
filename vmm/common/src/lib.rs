//! Definitions that more than one beaconbox crate needs, each defined once here:
//! the Ethernet address type ([`MacAddr`]) that netmgr hands out and the VMM's
//! virtio-net presents to the guest, the poison-tolerant mutex lock ([`lock`])
//! every crate with shared state uses, and the host ↔ vminitd stream protocol
//! ([`guest_protocol`]: ports, handshake lines, event lines), the id rule
//! every container, exec and sandbox id must pass ([`id`]), and the name of
//! the VMM's guest RAM file ([`GUEST_RAM_NAME`]), by which benchmarks tell
//! guest RAM from the VMM's own memory.
//!
//! This crate owns plain data types and tiny helpers only; it must never grow
//! policy, I/O or a dependency on another beaconbox crate.

pub mod guest_protocol;
pub mod id;
pub mod mac;
pub mod sync;
pub mod tun;

pub use id::valid_id;

/// The name guest RAM's file has in `/proc/<pid>/smaps`, whichever way the
/// VMM made it: `/memfd:beacon-guest-ram (deleted)` or, on its huge-page
/// tmpfs, `/beacon-guest-ram (deleted)`.
pub const GUEST_RAM_NAME: &str = "beacon-guest-ram";
pub use mac::{MacAddr, MacParseError};
pub use sync::lock;
