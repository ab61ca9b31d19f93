//! virtio-rng (entropy device, id 4): one queue whose writable buffers are filled
//! from the host's `getrandom(2)`.
//!
//! Each request is served up to [`MAX_BYTES_PER_REQUEST`] bytes (the driver asks
//! again for more), and one notification serves at most a queue's worth of
//! requests, so a guest cannot make the event loop spin on this device.

use event_manager::EventOps;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;

use super::device::{
    ActivateError, Activation, GuestMem, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use super::queue::{serve_queue, ChainOutcome};
use crate::throttle::Throttle;
use std::io::Write;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// virtio device id of the entropy device.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest answer to one request.
pub const MAX_BYTES_PER_REQUEST: usize = 64 << 10;

struct Active {
    mem: GuestMem,
    interrupt: Arc<Interrupt>,
    queue: Queue,
    /// The queue's own notification eventfd: written to come back later when one
    /// round's budget ran out with requests still waiting.
    reschedule: EventFd,
    /// The driver broke the ring; nothing is served until it resets the device.
    broken: bool,
}

/// The entropy device.
pub struct Rng {
    sizes: [u16; 1],
    active: Option<Active>,
    bad_chain: Throttle,
    ring_complaints: Throttle,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

/// Fill `buf` from getrandom(2).
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl Rng {
    pub fn new() -> Self {
        Self {
            sizes: [QUEUE_SIZE],
            active: None,
            bad_chain: Throttle::default(),
            ring_complaints: Throttle::default(),
        }
    }

    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.broken {
            return;
        }
        let mem = active.mem.memory();
        let complaints = &mut self.bad_chain;
        let mut chunk = [0u8; 4096];
        let budget = usize::from(active.queue.size());
        let served = serve_queue(
            &mut active.queue,
            &*mem,
            budget,
            &active.interrupt,
            &mut self.ring_complaints,
            |chain| {
                let written = match chain.writer(&*mem) {
                    Ok(mut writer) => {
                        let mut left = writer.available_bytes().min(MAX_BYTES_PER_REQUEST);
                        while left > 0 {
                            let n = left.min(chunk.len());
                            let step = fill_random(&mut chunk[..n])
                                .and_then(|()| writer.write_all(&chunk[..n]));
                            if let Err(e) = step {
                                if let Some(suppressed) = complaints.allow() {
                                    tracing::warn!(suppressed, "virtio-rng: request failed: {e}");
                                }
                                break;
                            }
                            left -= n;
                        }
                        writer.bytes_written()
                    }
                    Err(e) => {
                        if let Some(suppressed) = complaints.allow() {
                            tracing::warn!(
                                suppressed,
                                "virtio-rng: malformed request dropped: {e}"
                            );
                        }
                        0
                    }
                };
                ChainOutcome::Used(u32::try_from(written).unwrap_or(u32::MAX))
            },
        );
        if served.more_pending {
            // Let other devices run, then continue.
            let _ = active.reschedule.write(1);
        }
        active.broken = served.broken;
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Some(queue) = activation.queues.into_iter().next().filter(|q| q.ready()) else {
            return Err(ActivateError::QueueNotReady { index: 0 });
        };
        let Some(reschedule) = activation.queue_events.into_iter().next() else {
            return Err(ActivateError::Backend(
                "no notification eventfd for the request queue".into(),
            ));
        };
        self.active = Some(Active {
            mem: activation.mem,
            interrupt: activation.interrupt,
            queue,
            reschedule,
            broken: false,
        });
        // Requests may already be waiting.
        self.process_queue();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_notified(&mut self, _index: usize, _ops: &mut EventOps) {
        self.process_queue();
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

#[cfg(test)]
mod tests;
