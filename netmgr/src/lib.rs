//! Host networking for beaconbox sandboxes: the `beacon0` bridge, one TAP per VM,
//! persistent IP leases, nftables forwarding and NAT, and CNI mode.
//!
//! The shim calls [`NetworkManager::setup`] before it boots a VM and
//! [`NetworkManager::teardown`] after the VM stopped, and runs
//! [`spawn_reconciler`] so leases of vanished sandboxes come back. Operators use
//! the `beacon-net` binary.
//!
//! ```no_run
//! # async fn shim(sandbox_id: &str) -> Result<(), beacon_netmgr::NetError> {
//! use std::sync::Arc;
//! use beacon_netmgr::{NetConfig, NetworkManager};
//!
//! let paths = beacon_paths::BeaconPaths::from_env();
//! // The sandbox must count as alive before setup (see `NetworkManager::reconcile`).
//! std::fs::create_dir_all(paths.sandbox_state(sandbox_id)).ok();
//! let net = Arc::new(NetworkManager::new(NetConfig::from_env()?)?);
//! net.prepare().await?; // optional: open the database and host network early
//! let _reconciler = beacon_netmgr::spawn_reconciler(
//!     net.clone(),
//!     beacon_netmgr::DEFAULT_RECONCILE_INTERVAL,
//!     beacon_netmgr::state_dir_liveness(paths.clone()),
//! );
//! let att = net.setup(sandbox_id).await?;
//! let tap = att.open_tap()?; // virtio-net backend; guest: att.ip/att.prefix via att.gateway
//! // ... run the VM ...
//! drop(tap);
//! net.teardown(sandbox_id).await?;
//! # Ok(()) }
//! ```

pub mod attachment;
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

pub use attachment::NetworkAttachment;
/// The guest MAC type (defined once, in `beacon-common`).
pub use beacon_common::MacAddr;
pub use config::{CniConfig, NetConfig, PoolRange};
pub use error::{NetError, Result};
pub use leasedb::{IpLease, LeaseDb, LeaseMode, RepairReport};
pub use manager::{
    spawn_reconciler, state_dir_liveness, NetworkManager, ReconcileReport,
    DEFAULT_RECONCILE_INTERVAL,
};
