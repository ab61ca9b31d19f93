//! virtio-net (device id 1) on a TAP: one receive and one transmit queue, the
//! MAC and link status in config space, checksum and TCP segmentation offloads
//! both ways, mergeable receive buffers and event-index suppression.
//!
//! Two data paths behind one device model:
//! - userspace (`userspace.rs`): the VMM's event loop moves frames between the
//!   TAP and the queues (TX on queue notification; RX when the TAP is readable
//!   and the guest has posted buffers);
//! - vhost-net (`vhost.rs`): the kernel's vhost worker moves them; the VMM only
//!   sets it up, and turns its "used" signals into virtio-mmio interrupts.
//!
//! This module owns feature negotiation, the config space, the mapping from
//! accepted features to TAP offloads, and the choice of data path. It never
//! touches a queue itself, never blocks, and never trusts a byte of the guest:
//! every frame is checked by the data path before it goes anywhere.

mod userspace;
mod vhost;

use std::sync::Arc;

use beacon_common::MacAddr;
use event_manager::{EventOps, Events};
use virtio_bindings::virtio_net as vn;

use super::device::{
    ActivateError, Activation, GuestMem, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use super::events::DEVICE_TOKEN_BASE;
use crate::tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};

pub use crate::tap::VNET_HDR_LEN;
pub use vhost::VHOST_NET_DEVICE;

/// The guest's transmit path without a TAP, for the fuzz target
/// `devices/fuzz/src/bin/net_header.rs` (not an API): the header check and the
/// per-chain gather-and-write the device runs on every TX chain, writing into
/// any [`FrameSink`](userspace::FrameSink) instead of the TAP.
#[doc(hidden)]
pub mod tx {
    pub use super::userspace::{check_tx_header, transmit, FrameSink, TxError, TX_BUFFER_LEN};
}

/// virtio device id of the network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// Largest frame the guest may send, without its net header (64 KiB: a full
/// TSO segment with its Ethernet header fits).
pub const MAX_TX_FRAME: usize = 64 << 10;

const fn bit(n: u32) -> u64 {
    1 << n
}

/// virtio-net feature bits, as masks.
pub mod features {
    use super::{bit, vn};
    pub const CSUM: u64 = bit(vn::VIRTIO_NET_F_CSUM);
    pub const GUEST_CSUM: u64 = bit(vn::VIRTIO_NET_F_GUEST_CSUM);
    pub const MAC: u64 = bit(vn::VIRTIO_NET_F_MAC);
    pub const GUEST_TSO4: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO4);
    pub const GUEST_TSO6: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO6);
    pub const HOST_TSO4: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO4);
    pub const HOST_TSO6: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO6);
    pub const MRG_RXBUF: u64 = bit(vn::VIRTIO_NET_F_MRG_RXBUF);
    pub const STATUS: u64 = bit(vn::VIRTIO_NET_F_STATUS);
}

/// Everything this device offers. UFO (and USO) are not offered: Linux no longer
/// produces UFO, and a half-done fragmentation offload is worse than none.
pub const OFFERED_FEATURES: u64 = features::CSUM
    | features::GUEST_CSUM
    | features::MAC
    | features::GUEST_TSO4
    | features::GUEST_TSO6
    | features::HOST_TSO4
    | features::HOST_TSO6
    | features::MRG_RXBUF
    | features::STATUS
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_F_VERSION_1;

/// Ring features that belong to the transport, not the net device: in vhost
/// mode these must also be supported by the kernel's vhost-net.
const RING_FEATURES: u64 = features::MRG_RXBUF
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_F_VERSION_1;

/// The TAP offloads (`TUN_F_*`) that follow from the features the guest
/// accepted: what the guest can take in frames from the host. Segmentation
/// offloads need the checksum offload (the spec makes them depend on it, and so
/// does the TAP).
pub fn tap_offloads(acked: u64) -> u32 {
    if acked & features::GUEST_CSUM == 0 {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if acked & features::GUEST_TSO4 != 0 {
        flags |= TUN_F_TSO4;
    }
    if acked & features::GUEST_TSO6 != 0 {
        flags |= TUN_F_TSO6;
    }
    flags
}

/// Event data of the device's own fds (the TAP, vhost's call eventfds).
const TAP_TOKEN: u32 = DEVICE_TOKEN_BASE;
const VHOST_CALL_TOKEN: u32 = DEVICE_TOKEN_BASE + 1;

/// Why a network device cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("vhost-net needs {VHOST_NET_DEVICE}, which does not exist here; load the vhost_net module (`modprobe vhost_net`) or drop vhost=on")]
    VhostMissing,
    #[error("cannot {action} for TAP {tap}: {reason}")]
    Vhost {
        action: &'static str,
        tap: String,
        reason: String,
    },
    #[error("cannot create an eventfd for TAP {tap}: {source}")]
    EventFd {
        tap: String,
        #[source]
        source: std::io::Error,
    },
}

enum DataPath {
    Userspace(Box<userspace::Userspace>),
    Vhost(Box<vhost::VhostPath>),
}

/// The network device.
pub struct Net {
    tap: Arc<Tap>,
    mac: MacAddr,
    sizes: [u16; 2],
    features: u64,
    path: DataPath,
}

impl Net {
    /// A device whose frames the VMM's event loop moves.
    pub fn new(tap: Tap, mac: MacAddr) -> Self {
        let tap = Arc::new(tap);
        Self {
            path: DataPath::Userspace(Box::new(userspace::Userspace::new(tap.clone()))),
            tap,
            mac,
            sizes: [QUEUE_SIZE; 2],
            features: OFFERED_FEATURES,
        }
    }

    /// A device whose frames the kernel's vhost-net moves; fails (with nothing
    /// left open) when `/dev/vhost-net` is missing or unusable.
    pub fn with_vhost(tap: Tap, mac: MacAddr, mem: GuestMem) -> Result<Self, NetError> {
        let tap = Arc::new(tap);
        let vhost = vhost::VhostPath::new(tap.clone(), mem)?;
        // Ring features the kernel cannot do are not offered.
        let features = OFFERED_FEATURES & (!RING_FEATURES | vhost.supported_features());
        Ok(Self {
            path: DataPath::Vhost(Box::new(vhost)),
            tap,
            mac,
            sizes: [QUEUE_SIZE; 2],
            features,
        })
    }

    /// The TAP's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Whether the kernel's vhost-net moves the frames.
    pub fn is_vhost(&self) -> bool {
        matches!(self.path, DataPath::Vhost(_))
    }

    /// Config space: mac (6 bytes), status (le16).
    fn config_space(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac.0);
        c[6..].copy_from_slice(&(vn::VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        for (index, q) in activation.queues.iter().enumerate() {
            if !virtio_queue::QueueT::ready(q) {
                return Err(ActivateError::QueueNotReady { index });
            }
        }
        if activation.queues.len() != 2 || activation.queue_events.len() != 2 {
            return Err(ActivateError::Backend(
                "virtio-net needs exactly a receive and a transmit queue".into(),
            ));
        }
        self.tap
            .set_offload(tap_offloads(activation.acked_features))
            .map_err(|e| ActivateError::Backend(e.to_string()))?;
        match &mut self.path {
            DataPath::Userspace(u) => u.activate(activation),
            DataPath::Vhost(v) => v.activate(activation),
        }
    }

    fn reset(&mut self) {
        match &mut self.path {
            DataPath::Userspace(u) => u.reset(),
            DataPath::Vhost(v) => v.reset(),
        }
    }

    fn handles_queue_notifications(&self) -> bool {
        !self.is_vhost()
    }

    fn queue_notified(&mut self, index: usize, ops: &mut EventOps) {
        if let DataPath::Userspace(u) = &mut self.path {
            u.queue_notified(index, ops);
        }
    }

    fn init_events(&mut self, ops: &mut EventOps) {
        match &mut self.path {
            DataPath::Userspace(u) => u.init_events(ops),
            DataPath::Vhost(v) => v.init_events(ops),
        }
    }

    fn handle_event(&mut self, events: Events, ops: &mut EventOps) {
        match &mut self.path {
            DataPath::Userspace(u) => u.handle_event(events, ops),
            DataPath::Vhost(v) => v.handle_event(events),
        }
    }

    fn memory_changed(&mut self, mem: &GuestMem) {
        // The userspace path reads through `mem` itself.
        if let DataPath::Vhost(v) = &mut self.path {
            v.memory_changed(mem);
        }
    }

    fn needs_reset(&self) -> bool {
        match &self.path {
            DataPath::Userspace(_) => false,
            DataPath::Vhost(v) => v.needs_reset(),
        }
    }

    fn is_activated(&self) -> bool {
        match &self.path {
            DataPath::Userspace(u) => u.is_activated(),
            DataPath::Vhost(v) => v.is_activated(),
        }
    }
}

#[cfg(test)]
mod tests;
