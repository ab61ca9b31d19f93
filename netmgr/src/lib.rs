//! Host networking for beaconbox sandboxes: the `beacon0` bridge, one TAP per VM,
//! persistent IP leases, nftables forwarding and NAT, and CNI mode.
//!
//! The shim calls [`NetworkManager::setup`] before it boots a VM and
//! [`NetworkManager::teardown`] after the VM stopped, and runs
//! [`spawn_reconciler`] so leases of vanished sandboxes come back. Operators use
//! the `beacon-net` binary.

pub mod cni;
pub mod config;
pub mod error;
pub mod firewall;
pub mod leasedb;
pub mod link;
pub mod manager;
pub mod naming;
pub mod pool;
pub mod tap;

pub use config::{CniConfig, NetConfig, PoolRange};
pub use error::{NetError, Result};
pub use leasedb::{IpLease, LeaseDb, LeaseMode, RepairReport};
pub use manager::{
    spawn_reconciler, state_dir_liveness, NetworkAttachment, NetworkManager, ReconcileReport,
    DEFAULT_RECONCILE_INTERVAL,
};
pub use naming::MacAddr;
