//! Host networking for beaconbox sandboxes: the `beacon0` bridge, one TAP per VM,
//! persistent IP leases, nftables forwarding and NAT, and CNI mode.
//!
//! Legacy mode confines its guests: each TAP may only send frames with its lease's
//! MAC and IPv4 address (ARP included; everything else from a guest is dropped),
//! guests reach each other only with `BEACON_GUEST_TO_GUEST=1`, the host only for
//! what `BEACON_HOST_ACCESS` allows, and nothing outside the bridge may open
//! connections to them ([`firewall`], [`guard`]). Setup refuses a subnet another
//! device already uses ([`NetError::SubnetConflict`]).
//!
//! The shim holds its sandbox's liveness guard ([`SandboxLiveness::acquire`], a
//! `flock` under `$BEACON_RUN_DIR` that dies with the process), runs one
//! reconciler pass at start ([`NetworkManager::reconcile_once`]: frees what
//! crashed shims and reboots left behind) and then [`spawn_reconciler`], calls
//! [`NetworkManager::setup`] before it boots a VM and [`NetworkManager::teardown`]
//! after the VM stopped, and drops the guard last. Operators use the `beacon-net`
//! binary.
//!
//! ```no_run
//! # async fn shim(sandbox_id: &str) -> Result<(), beacon_netmgr::NetError> {
//! use std::sync::Arc;
//! use beacon_netmgr::{NetConfig, NetworkManager};
//!
//! let net = Arc::new(NetworkManager::new(NetConfig::from_env()?)?);
//! // Alive from before setup until after teardown; released on drop or death.
//! // (Blocks while a reconciler tears down a previous incarnation: from async
//! // code, call it through spawn_blocking.)
//! let alive = net.liveness().acquire(sandbox_id)?;
//! net.prepare().await?; // optional: open the database and host network early
//! net.reconcile_once().await?;
//! let _reconciler = beacon_netmgr::spawn_reconciler(
//!     net.clone(),
//!     beacon_netmgr::DEFAULT_RECONCILE_INTERVAL,
//!     Arc::new(net.liveness().clone()),
//! );
//! let att = net.setup(sandbox_id).await?;
//! let tap = att.open_tap()?; // virtio-net backend; guest: att.ip/att.prefix via att.gateway
//! // ... run the VM ...
//! drop(tap);
//! net.teardown(sandbox_id).await?;
//! drop(alive);
//! # Ok(()) }
//! ```

pub mod attachment;
pub mod cni;
pub mod config;
pub mod error;
pub mod firewall;
pub mod guard;
pub mod leasedb;
pub mod link;
pub mod liveness;
pub mod manager;
pub mod naming;
pub mod pool;
pub mod tap;

pub use attachment::NetworkAttachment;
/// The guest MAC type (defined once, in `beacon-common`).
pub use beacon_common::MacAddr;
pub use config::{CniConfig, HostService, NetConfig, PoolRange};
pub use error::{NetError, Result};
pub use leasedb::{IpLease, LeaseDb, LeaseMode, LeaseOwner, RepairReport};
pub use liveness::{Liveness, LivenessCheck, LivenessGuard, SandboxLiveness};
pub use manager::{spawn_reconciler, NetworkManager, ReconcileReport, DEFAULT_RECONCILE_INTERVAL};
