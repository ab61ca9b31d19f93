//! Host networking for beaconbox sandboxes: the `beacon0` bridge, one TAP per VM,
//! persistent IP leases, nftables forwarding and NAT, and CNI mode.
//!
//! The shim calls [`NetworkManager::setup`] before it boots a VM and
//! [`NetworkManager::teardown`] after the VM stopped. Operators use `beacon-net`.

pub mod config;
pub mod error;
pub mod leasedb;
pub mod naming;
pub mod pool;

pub use config::{NetConfig, PoolRange};
pub use error::{NetError, Result};
pub use leasedb::{IpLease, LeaseDb, LeaseMode};
pub use naming::MacAddr;
