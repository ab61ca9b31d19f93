//! virtio-vsock (device id 19): sockets between the guest and the host, with
//! two backends behind the same guest-facing device.
//!
//! - [`hybrid`]: userspace, no kernel module and no host-wide CID: host programs
//!   reach the guest through a unix socket (`CONNECT <port>\n`, the Firecracker
//!   and Cloud Hypervisor convention), guest connections to port P go to the
//!   unix socket `<uds_path>_P`;
//! - [`vhost`]: the kernel's `/dev/vhost-vsock` serves the RX and TX queues;
//!   host programs use `AF_VSOCK` with the guest's CID.
//!
//! Shared here: the queue layout, the config space (the guest CID) and the
//! event queue, which stays in userspace with both backends. Guest packet
//! headers are parsed in [`packet`] only. This module never knows about KVM or
//! the VMM's configuration types.

pub mod hybrid;
pub mod packet;
pub mod vhost;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;

use super::device::{GuestMem, Interrupt};
use super::queue::{serve_queue, ChainOutcome};
use crate::throttle::Throttle;

/// virtio device id of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Queue indexes.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The three queue sizes, for [`super::VirtioDevice::queue_max_sizes`].
pub const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// `virtio_vsock_event.id`: the transport was reset; the guest drops every
/// connection and re-reads the CID.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// The config space: `le64 guest_cid`.
pub fn read_config(guest_cid: u64, offset: u64, data: &mut [u8]) {
    let bytes = guest_cid.to_le_bytes();
    for (i, out) in data.iter_mut().enumerate() {
        *out = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| bytes.get(at))
            .copied()
            .unwrap_or(0);
    }
}

/// The event queue: the driver posts writable buffers, the device fills one
/// with a `virtio_vsock_event` when it has something to say.
pub struct EventQueue {
    queue: Queue,
    /// A transport reset waits for a buffer.
    reset_pending: bool,
    broken: bool,
    complaints: Throttle,
    ring_complaints: Throttle,
}

impl EventQueue {
    pub fn new(queue: Queue) -> Self {
        Self {
            queue,
            reset_pending: false,
            broken: false,
            complaints: Throttle::default(),
            ring_complaints: Throttle::default(),
        }
    }

    /// Queue a transport reset event; it is delivered as soon as the driver
    /// has posted a buffer.
    pub fn transport_reset(&mut self, mem: &GuestMem, interrupt: &Interrupt) {
        self.reset_pending = true;
        self.deliver(mem, interrupt);
    }

    /// Whether a reset event still waits for a buffer.
    pub fn reset_pending(&self) -> bool {
        self.reset_pending
    }

    /// Deliver what is pending (called when the driver posts buffers, too).
    pub fn deliver(&mut self, mem: &GuestMem, interrupt: &Interrupt) {
        if !self.reset_pending || self.broken || !self.queue.ready() {
            return;
        }
        let m = mem.memory();
        let complaints = &mut self.complaints;
        let mut delivered = false;
        let served = serve_queue(
            &mut self.queue,
            &*m,
            1,
            interrupt,
            &mut self.ring_complaints,
            |chain| {
                let written = match chain.writer(&*m) {
                    Ok(mut w) if w.available_bytes() >= 4 => {
                        match std::io::Write::write_all(
                            &mut w,
                            &EVENT_TRANSPORT_RESET.to_le_bytes(),
                        ) {
                            Ok(()) => {
                                delivered = true;
                                4
                            }
                            Err(_) => 0,
                        }
                    }
                    _ => {
                        if let Some(suppressed) = complaints.allow() {
                            tracing::warn!(suppressed, "vsock: event buffer unusable; dropped");
                        }
                        0
                    }
                };
                ChainOutcome::Used(written)
            },
        );
        self.broken = served.broken;
        if delivered {
            self.reset_pending = false;
            tracing::info!("vsock: transport reset event delivered to the guest");
        }
    }
}

#[cfg(test)]
mod tests;
