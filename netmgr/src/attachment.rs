//! [`NetworkAttachment`]: what the VMM and the guest need to know about one
//! sandbox's network, built from its lease. Both modes (legacy in `manager`, CNI in
//! `cni`) return it; this module depends on neither, so they need not know each
//! other.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use beacon_common::MacAddr;

use crate::error::Result;
use crate::leasedb::IpLease;
use crate::tap;

/// What the VMM and the guest need to know about one sandbox's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkAttachment {
    /// TAP device name (persistent; open it with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`).
    pub tap: String,
    /// MAC address to give the guest's virtio-net device.
    pub mac: MacAddr,
    /// Guest address.
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    /// CNI mode: the namespace the TAP lives in (open the TAP from inside it).
    pub netns: Option<PathBuf>,
}

impl NetworkAttachment {
    /// Open the TAP for the VMM (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), from inside
    /// the sandbox namespace in CNI mode.
    pub fn open_tap(&self) -> Result<std::fs::File> {
        tap::open_tap_for_vm(&self.tap, self.netns.as_deref())
    }

    /// The attachment a lease describes, with the DNS servers to hand the guest.
    pub fn from_lease(lease: &IpLease, dns: Vec<Ipv4Addr>) -> Self {
        NetworkAttachment {
            tap: lease.tap.clone(),
            mac: lease.mac,
            ip: lease.ip,
            prefix: lease.prefix,
            gateway: lease.gateway,
            dns,
            netns: lease.netns.clone(),
        }
    }
}
