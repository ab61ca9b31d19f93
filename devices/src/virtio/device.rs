//! What a virtio device model is to the transport and to the VMM.
//!
//! A device offers features, a config space and a number of queues; once the
//! driver sets DRIVER_OK the transport hands it an [`Activation`] (the negotiated
//! features, guest memory, the configured queues and the interrupt line) and from
//! then on the device serves its queues from the VMM's event loop
//! ([`super::VirtioSubscriber`]). A driver reset takes everything back. When
//! guest memory is hot-added or removed the VMM swaps the [`GuestMem`] every
//! device holds and then tells each device ([`VirtioDevice::memory_changed`]),
//! for the devices whose backend keeps its own copy of the memory table (vhost).
//!
//! Devices must never block on the guest in any method here, and wait for a
//! backend only where the protocol needs an answer, and then for a bounded time
//! (a vhost-user reset, a memory removal): they are called from vCPU threads
//! (config space, activate, reset), from the one event-loop thread every device
//! of the VM shares, and from the VMM thread that hotplugs memory.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events};
use virtio_queue::Queue;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it: swappable when memory is hotplugged.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// The device conforms to virtio 1.x (we offer nothing else).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Descriptors may point to indirect tables (virtio-queue walks them).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// used_event/avail_event notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device status bit: the device hit an error and needs a reset.
pub const DEVICE_NEEDS_RESET: u32 = 0x40;

/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = 0x1;
/// Interrupt status bit: the configuration space changed.
pub const INT_CONFIG: u32 = 0x2;

/// One device's interrupt: the status bits the driver reads (and acknowledges)
/// through the transport, and the eventfd wired to the guest's IRQ.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    line: EventFd,
}

impl Interrupt {
    /// An interrupt raised by writing `line` (the VMM's irqfd).
    pub fn new(line: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            line,
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        if let Err(e) = self.line.write(1) {
            // Only fails if the counter would overflow: the guest is not reading
            // its interrupts at all, and one more changes nothing.
            tracing::debug!("virtio interrupt eventfd write failed: {e}");
        }
    }

    /// Tell the driver a used ring has new entries.
    pub fn signal_used_queue(&self) {
        self.raise(INT_VRING);
    }

    /// Tell the driver the config space (or the device status) changed.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clear the bits the driver handled.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Clear everything (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }
}

/// What the driver set up, handed to the device on DRIVER_OK.
pub struct Activation {
    /// Features both sides agreed on.
    pub acked_features: u64,
    pub mem: GuestMem,
    pub interrupt: Arc<Interrupt>,
    /// One entry per queue the device declared, configured and checked against
    /// guest memory by the transport; queues the driver left unused are not ready.
    pub queues: Vec<Queue>,
    /// The queues' notification eventfds (duplicates of the ones the VMM
    /// registered as ioeventfds), for devices whose data path runs elsewhere
    /// (vhost); other devices get notified through [`VirtioDevice::queue_notified`].
    pub queue_events: Vec<EventFd>,
}

/// Why a device could not start; the transport then sets DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {index} is required but the driver did not set it up")]
    QueueNotReady { index: usize },
    #[error("the driver did not accept required feature bits {missing:#x}")]
    MissingFeatures { missing: u64 },
    #[error("{0}")]
    Backend(String),
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device id (1 net, 2 block, 4 rng, 19 vsock, 26 fs).
    fn device_type(&self) -> u32;

    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits offered to the driver (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;

    /// Read the device-specific config space at `offset`. Reads outside it give zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }

    /// Write the config space; most devices ignore writes (the driver may not
    /// write read-only fields).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            device = self.device_type(),
            offset,
            len = data.len(),
            "ignored config space write"
        );
    }

    /// Start serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;

    /// The driver reset the device: drop the queues and everything derived from
    /// the activation, and be ready to be activated again.
    fn reset(&mut self);

    /// Guest memory gained or lost regions (memory hotplug): `mem` (the same
    /// memory the device got at activation) already shows the new layout.
    /// Devices that map guest memory elsewhere (vhost) pass the new table on;
    /// the rest read through `mem` and need nothing. Called from a VMM thread
    /// (not a vCPU); must not block on the guest. A device that is not
    /// activated does nothing (activation sends the whole table). Called after
    /// an addition is mapped, and before a removed region is unmapped.
    fn memory_changed(&mut self, mem: &GuestMem) {
        let _ = mem;
    }

    /// Whether queue notifications should reach [`Self::queue_notified`] through
    /// the event loop (false for vhost devices, whose backend reads the
    /// notification eventfds itself).
    fn handles_queue_notifications(&self) -> bool {
        true
    }

    /// The guest notified queue `index` (only after activation; notifications
    /// before it are dropped by the subscriber).
    fn queue_notified(&mut self, index: usize, ops: &mut EventOps);

    /// Register the fds the device owns for its whole life (a TAP, a listening
    /// socket) with `data` values of the device's choosing, all at or above
    /// [`super::events::DEVICE_TOKEN_BASE`].
    fn init_events(&mut self, ops: &mut EventOps) {
        let _ = ops;
    }

    /// One of the device's own fds is ready.
    fn handle_event(&mut self, events: Events, ops: &mut EventOps) {
        let _ = ops;
        tracing::debug!(
            device = self.device_type(),
            data = events.data(),
            "unexpected event"
        );
    }

    /// The device hit an error it cannot recover from by itself (its backend
    /// died, say): the transport then shows DEVICE_NEEDS_RESET in the status
    /// register. The device raises the config-change interrupt itself.
    fn needs_reset(&self) -> bool {
        false
    }

    /// Whether the device is activated (for logs and tests).
    fn is_activated(&self) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_bits_set_ack_and_signal() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let irq = Interrupt::new(evt.try_clone().expect("clone"));
        irq.signal_used_queue();
        irq.signal_config_change();
        assert_eq!(irq.status(), INT_VRING | INT_CONFIG);
        assert_eq!(evt.read().expect("raised"), 2);
        irq.ack(INT_VRING);
        assert_eq!(irq.status(), INT_CONFIG);
        irq.clear();
        assert_eq!(irq.status(), 0);
    }
}
