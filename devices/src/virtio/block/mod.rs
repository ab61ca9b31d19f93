//! virtio-blk (block device, id 2) on a raw image file, read-only or read-write.
//!
//! - [`disk`]: the image ([`DiskFile`]: opened, locked, sized once) and the
//!   execution of requests against it;
//! - [`request`]: the guest-facing parser that validates each request;
//! - [`worker`]: the I/O thread;
//! - this module: the device model on the event loop.
//!
//! Features: `SEG_MAX` and `SIZE_MAX` (declared in config space and enforced on
//! every request), `FLUSH` (`fdatasync`; a driver that does not negotiate it
//! gets write-through: every write is synced before it completes), `RO` for
//! read-only disks (writes fail with IOERR), `GET_ID` (a stable serial),
//! `EVENT_IDX` and indirect descriptors. Discard and write-zeroes are not
//! offered (UNSUPP). The capacity is the image size in whole 512-byte sectors
//! (a trailing partial sector is hidden; see [`DiskFile::open`]).
//!
//! **Disk I/O never runs on the event loop.** Every device of the VM shares that
//! one thread, and a page-cache miss or an `fdatasync` may take seconds. The
//! event loop only parses and validates chains (cheap, bounded by
//! [`request::MAX_DESCRIPTORS`] per chain and the queue budget per turn) and
//! hands valid requests to the device's I/O thread through a bounded channel;
//! invalid ones are answered at once. At most [`MAX_IN_FLIGHT`] requests are out
//! at a time: past that, chains stay in the available ring until completions
//! come back (an eventfd the device watches), so a flooding guest holds at most
//! that many requests of host memory. Completions are returned to the used ring
//! on the event loop, which alone owns the queue.
//!
//! Guest-triggered log lines are throttled; nothing a guest writes can panic,
//! block or spin here.

pub mod disk;
pub mod request;
mod worker;

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_S_IOERR,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub use disk::{DiskError, DiskFile};
pub use request::{DiskShape, SECTOR_SIZE, SEG_MAX, SIZE_MAX};

use super::device::{
    ActivateError, Activation, GuestMem, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use super::events::DEVICE_TOKEN_BASE;
use super::queue::{return_used, serve_queue, ChainOutcome};
use crate::confine::ThreadHook;
use crate::throttle::Throttle;
use worker::{Done, Job, Refused, Worker};

/// virtio device id of the block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most requests handed to the I/O thread and not yet returned.
pub const MAX_IN_FLIGHT: usize = QUEUE_SIZE as usize;
/// Event data of the completion eventfd.
const COMPLETION_TOKEN: u32 = DEVICE_TOKEN_BASE;
/// Bytes of `struct virtio_blk_config` we answer for (up to `blk_size`);
/// reads past it are zeros.
const CONFIG_LEN: usize = 24;

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Why a block device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("cannot start the I/O thread for disk image {path:?}: {source}")]
    Worker {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

struct Active {
    mem: GuestMem,
    interrupt: Arc<Interrupt>,
    queue: Queue,
    /// The queue's own notification eventfd: written to come back later when one
    /// round's budget ran out with requests still waiting.
    reschedule: EventFd,
    /// Sync every write before completing it (FLUSH not negotiated).
    writethrough: bool,
    epoch: u64,
    /// Requests with the I/O thread.
    in_flight: usize,
    /// Chains were left in the ring for lack of room; serve again on completions.
    waiting_for_room: bool,
    /// The driver broke the ring; nothing is served until it resets the device.
    broken: bool,
}

/// The block device.
pub struct Block {
    disk: Arc<DiskFile>,
    sizes: [u16; 1],
    config: [u8; CONFIG_LEN],
    active: Option<Active>,
    worker: Worker,
    epoch: u64,
    bad_request: Throttle,
    ring_complaints: Throttle,
    config_writes: Throttle,
}

impl Block {
    /// A device for `disk`, with its I/O thread started (which runs `hook`,
    /// the VMM's confinement, first).
    pub fn new(disk: DiskFile, hook: Option<ThreadHook>) -> Result<Self, BlockError> {
        let disk = Arc::new(disk);
        let worker = Worker::start(disk.clone(), MAX_IN_FLIGHT, hook).map_err(|source| {
            BlockError::Worker {
                path: disk.path().to_path_buf(),
                source,
            }
        })?;
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&disk.capacity().to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        tracing::debug!(
            path = %disk.path().display(),
            sectors = disk.capacity(),
            read_only = disk.read_only(),
            serial = %disk.serial_str(),
            "virtio-blk disk"
        );
        Ok(Self {
            disk,
            sizes: [QUEUE_SIZE],
            config,
            active: None,
            worker,
            epoch: 0,
            bad_request: Throttle::default(),
            ring_complaints: Throttle::default(),
            config_writes: Throttle::default(),
        })
    }

    /// Open `path` and make a device for it.
    pub fn open(path: &std::path::Path, read_only: bool) -> Result<Self, BlockError> {
        Self::open_with_hook(path, read_only, None)
    }

    /// [`Block::open`], the I/O thread running `hook` first.
    pub fn open_with_hook(
        path: &std::path::Path,
        read_only: bool,
        hook: Option<ThreadHook>,
    ) -> Result<Self, BlockError> {
        Self::new(DiskFile::open(path, read_only)?, hook)
    }

    /// The disk behind the device.
    pub fn disk(&self) -> &DiskFile {
        &self.disk
    }

    fn shape(&self) -> DiskShape {
        DiskShape {
            capacity: self.disk.capacity(),
            read_only: self.disk.read_only(),
        }
    }

    /// Requests with the I/O thread (tests).
    pub fn in_flight(&self) -> usize {
        self.active.as_ref().map_or(0, |a| a.in_flight)
    }

    fn process_queue(&mut self) {
        let shape = self.shape();
        let Self {
            active,
            worker,
            bad_request,
            ring_complaints,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            return;
        };
        if active.broken {
            return;
        }
        let Active {
            mem: guest_mem,
            interrupt,
            queue,
            reschedule,
            writethrough,
            epoch,
            in_flight,
            waiting_for_room,
            ..
        } = active;
        *waiting_for_room = false;
        let mem = guest_mem.memory();
        let budget = usize::from(queue.size());
        let served = serve_queue(queue, &*mem, budget, interrupt, ring_complaints, |chain| {
            if *in_flight >= MAX_IN_FLIGHT {
                *waiting_for_room = true;
                return ChainOutcome::Later;
            }
            let head = chain.head_index();
            let request = match request::parse(chain, &mem, shape) {
                Ok(request) => request,
                Err(rejected) => {
                    if let Some(suppressed) = bad_request.allow() {
                        tracing::warn!(suppressed, "virtio-blk: bad request: {}", rejected.error);
                    }
                    return ChainOutcome::Used(
                        rejected
                            .status
                            .map_or(0, |at| write_status(&mem, at, rejected.error.status())),
                    );
                }
            };
            let status = request.status;
            let job = Job {
                epoch: *epoch,
                head,
                request,
                mem: guest_mem.clone(),
                writethrough: *writethrough,
            };
            match worker.submit(job) {
                Ok(()) => {
                    *in_flight += 1;
                    ChainOutcome::Deferred
                }
                Err(Refused::Full) => {
                    *waiting_for_room = true;
                    ChainOutcome::Later
                }
                Err(Refused::Gone) => {
                    if let Some(suppressed) = bad_request.allow() {
                        tracing::error!(suppressed, "virtio-blk: the I/O thread is gone");
                    }
                    ChainOutcome::Used(write_status(&mem, status, VIRTIO_BLK_S_IOERR as u8))
                }
            }
        });
        if served.more_pending {
            // Let other devices run, then continue.
            let _ = reschedule.write(1);
        }
        active.broken = served.broken;
    }

    /// Return finished requests to the used ring; serve the queue again if
    /// chains were waiting for room.
    fn complete(&mut self) {
        let Some(active) = self.active.as_mut() else {
            // Reset: whatever finishes belongs to an abandoned activation.
            while self.worker.try_done().is_some() {}
            return;
        };
        let mut done: Vec<(u16, u32)> = Vec::new();
        // Bounded: at most `in_flight` (plus stale ones) are waiting.
        while let Some(Done {
            epoch,
            head,
            used_len,
        }) = self.worker.try_done()
        {
            if epoch == active.epoch {
                done.push((head, used_len));
            }
        }
        active.in_flight = active.in_flight.saturating_sub(done.len());
        if !active.broken && !done.is_empty() {
            let mem = active.mem.memory();
            if return_used(
                &mut active.queue,
                &*mem,
                done,
                &active.interrupt,
                &mut self.ring_complaints,
            )
            .is_err()
            {
                active.broken = true;
            }
        }
        if active.waiting_for_room {
            self.process_queue();
        }
    }
}

/// Write a status byte; the used length (1, or 0 when it could not be written).
fn write_status(mem: &GuestMemoryMmap, at: GuestAddress, status: u8) -> u32 {
    u32::from(mem.write_obj(status, at).is_ok())
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_FLUSH);
        if self.disk.read_only() {
            f |= bit(VIRTIO_BLK_F_RO);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| self.config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing in our config space is writable (no CONFIG_WCE).
        if let Some(suppressed) = self.config_writes.allow() {
            tracing::debug!(
                offset,
                len = data.len(),
                suppressed,
                "virtio-blk: config space write ignored"
            );
        }
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
        self.epoch = self.epoch.wrapping_add(1);
        self.worker.set_epoch(self.epoch);
        self.active = Some(Active {
            mem: activation.mem,
            interrupt: activation.interrupt,
            queue,
            reschedule,
            writethrough: activation.acked_features & bit(VIRTIO_BLK_F_FLUSH) == 0,
            epoch: self.epoch,
            in_flight: 0,
            waiting_for_room: false,
            broken: false,
        });
        // Requests may already be waiting.
        self.process_queue();
        Ok(())
    }

    fn reset(&mut self) {
        // Jobs of the abandoned activation are skipped by the I/O thread, and
        // its completions dropped.
        self.epoch = self.epoch.wrapping_add(1);
        self.worker.set_epoch(self.epoch);
        self.active = None;
    }

    fn queue_notified(&mut self, _index: usize, _ops: &mut EventOps) {
        self.process_queue();
    }

    fn init_events(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            self.worker.done_evt(),
            COMPLETION_TOKEN,
            EventSet::IN,
        )) {
            tracing::error!("virtio-blk: cannot watch the completion eventfd: {e:?}");
        }
    }

    fn handle_event(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() != COMPLETION_TOKEN {
            return;
        }
        // Clears the counter; WouldBlock only means nothing new.
        let _ = self.worker.done_evt().read();
        self.complete();
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

#[cfg(test)]
mod tests;
