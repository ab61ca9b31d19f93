//! virtio-fs (device id 26) as a vhost-user frontend: the guest's FUSE requests
//! are served by a vhost-user backend (virtiofsd) straight from guest memory;
//! this device only sets the rings up and relays the backend's completions.
//!
//! What it owns:
//! - the config space: the tag (36 bytes, NUL padded) and the number of
//!   request queues; the queues: one high-priority queue and the request queues;
//! - the connection to the backend, through [`backend::BackendLink`] (its own
//!   thread; a missing, dead or mute socket is an error before boot);
//! - queue notifications go to the backend directly: the queues' ioeventfds are
//!   its kick fds ([`VirtioDevice::handles_queue_notifications`] is false);
//! - completions come back on call eventfds that *we* own and watch in the
//!   event loop, to raise the interrupt through [`Interrupt::signal_used_queue`]:
//!   virtio-mmio's driver ignores an interrupt whose InterruptStatus bit is not
//!   set, so the backend can never be handed the irqfd itself;
//! - memory hotplug ([`VirtioDevice::memory_changed`]): the link's thread
//!   brings the backend's memory table up to date; a removal is waited for
//!   (bounded by [`MEMORY_WAIT`]) so the backend has let go of the region
//!   before the VMM unmaps it; a failure makes the device need a reset;
//! - the backend's death: its socket is watched for hang-up in the event loop;
//!   the first hang-up is logged once and the device reports DEVICE_NEEDS_RESET
//!   (with a config-change interrupt). The VM keeps running and can be stopped.
//!
//! It never reads or writes the queues or guest memory (no DAX either: virtiofsd
//! has none) and never blocks the event loop: everything that waits on the
//! backend happens on the link's thread, and the few waits the virtio protocol
//! needs (handshake, reset, memory removal) are bounded.

mod backend;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use backend::{BackendLink, Request, Slot, VringSetup};
pub use backend::{Negotiated, HANDSHAKE_TIMEOUT, MEMORY_TABLE_MAX, MEMORY_WAIT, RESET_WAIT};

use super::device::{
    ActivateError, Activation, GuestMem, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use super::events::DEVICE_TOKEN_BASE;
use crate::confine::ThreadHook;
use crate::throttle::Throttle;

/// virtio device id of the file-system device.
pub const VIRTIO_ID_FS: u32 = 26;
/// Bytes of the tag field in the config space.
pub const TAG_LEN: usize = 36;
/// The config space: tag, then `num_request_queues` (le32).
pub const CONFIG_LEN: usize = TAG_LEN + 4;
/// Largest queue size we offer (virtiofsd takes up to 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// virtio features this frontend can pass through (split rings only, no
/// notification queue, no DAX window).
const PASSTHROUGH_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;

/// Event data of the backend socket (hang-up watch); call fds use
/// `DEVICE_TOKEN_BASE + queue index`.
const HANGUP_TOKEN: u32 = DEVICE_TOKEN_BASE + 0x1000;

/// One share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The mount tag the guest uses (`mount -t virtiofs TAG /mnt`).
    pub tag: String,
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// Entries per queue (power of two, at most [`MAX_QUEUE_SIZE`]).
    pub queue_size: u16,
    /// Request queues (virtiofsd serves one).
    pub request_queues: u16,
    /// How long the backend may take to answer the handshake.
    pub handshake_timeout: Duration,
    /// Run first by the thread that talks to the backend (the VMM's
    /// confinement, [`crate::confine`]).
    pub thread_hook: Option<ThreadHook>,
}

impl FsConfig {
    pub fn new(tag: impl Into<String>, socket: impl Into<PathBuf>) -> Self {
        Self {
            tag: tag.into(),
            socket: socket.into(),
            queue_size: 1024,
            request_queues: 1,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            thread_hook: None,
        }
    }
}

/// Why a virtio-fs device could not be made; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {0:?} must be 1 to {TAG_LEN} bytes")]
    BadTag(String),
    #[error("virtio-fs queue size {0} must be a power of two from 2 to {MAX_QUEUE_SIZE}")]
    BadQueueSize(u16),
    #[error("virtio-fs needs 1 to 255 request queues (got {0})")]
    BadRequestQueues(u16),
    #[error("vhost-user socket {0:?} does not exist; start virtiofsd for this share first (or let `beacon-vmm --fs tag=T,dir=PATH` start one)")]
    NoSocket(PathBuf),
    #[error("nothing is listening on vhost-user socket {path:?} ({source}); the virtiofsd behind it is gone: start it again")]
    Dead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to vhost-user socket {path:?}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the vhost-user backend {backend} did not finish the handshake within {timeout:?}; it may be hung: restart it")]
    Timeout { backend: String, timeout: Duration },
    #[error("vhost-user handshake with {backend} failed at {step}: {source}; is it a virtio-fs backend (virtiofsd)?")]
    Handshake {
        backend: String,
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("the vhost-user backend {backend} lacks {what}; use virtiofsd 1.x")]
    Missing { backend: String, what: &'static str },
    #[error("the vhost-user backend {backend} serves {offered} queues, the device needs {needed}; lower the request queues")]
    TooFewQueues {
        backend: String,
        offered: u64,
        needed: usize,
    },
    #[error("setting up the vhost-user connection: {0}")]
    Thread(#[source] std::io::Error),
}

/// What the driver activated.
struct Active {
    interrupt: Arc<Interrupt>,
    /// The guest RAM regions as last announced to the link, to tell a removal
    /// (waited for) from an addition.
    layout: Vec<Slot>,
}

/// The virtio-fs device.
pub struct VhostUserFs {
    tag: String,
    config_space: [u8; CONFIG_LEN],
    sizes: Vec<u16>,
    offered_features: u64,
    /// Per queue: what the backend writes when it used buffers.
    calls: Vec<EventFd>,
    link: BackendLink,
    active: Option<Active>,
    odd_config: Throttle,
    reset_trouble: Throttle,
    memory_trouble: Throttle,
}

impl std::fmt::Debug for VhostUserFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFs")
            .field("tag", &self.tag)
            .field("queues", &self.sizes.len())
            .finish()
    }
}

fn check(config: &FsConfig) -> Result<(), FsError> {
    if config.tag.is_empty() || config.tag.len() > TAG_LEN {
        return Err(FsError::BadTag(config.tag.clone()));
    }
    let q = config.queue_size;
    if !q.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&q) {
        return Err(FsError::BadQueueSize(q));
    }
    if config.request_queues == 0 || config.request_queues > 255 {
        return Err(FsError::BadRequestQueues(config.request_queues));
    }
    Ok(())
}

/// Connect to a vhost-user socket, telling a missing socket from a dead one.
fn connect(path: &Path) -> Result<UnixStream, FsError> {
    UnixStream::connect(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => FsError::NoSocket(path.to_path_buf()),
        std::io::ErrorKind::ConnectionRefused => FsError::Dead {
            path: path.to_path_buf(),
            source,
        },
        _ => FsError::Connect {
            path: path.to_path_buf(),
            source,
        },
    })
}

impl VhostUserFs {
    /// Connect to the backend at `config.socket` and shake hands; fails (before
    /// the guest boots) when the socket is missing or dead or the backend does
    /// not answer like a virtio-fs backend.
    pub fn connect(config: &FsConfig) -> Result<Self, FsError> {
        check(config)?;
        let stream = connect(&config.socket)?;
        Self::with_stream(config, stream)
    }

    /// The same over an already connected stream (tests: one end of a socketpair).
    pub fn with_stream(config: &FsConfig, stream: UnixStream) -> Result<Self, FsError> {
        check(config)?;
        let queues = 1 + usize::from(config.request_queues);
        let calls = (0..queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(FsError::Thread)?;
        let for_backend = calls
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(FsError::Thread)?;
        let label = format!("{:?} (tag {})", config.socket, config.tag);
        let link = BackendLink::start(
            stream,
            &label,
            queues,
            for_backend,
            config.handshake_timeout,
            config.thread_hook.clone(),
        )?;
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[..config.tag.len()].copy_from_slice(config.tag.as_bytes());
        config_space[TAG_LEN..].copy_from_slice(&u32::from(config.request_queues).to_le_bytes());
        let offered_features = link.negotiated().features & PASSTHROUGH_FEATURES;
        tracing::info!(tag = %config.tag, socket = ?config.socket, "virtio-fs connected to its vhost-user backend");
        Ok(Self {
            tag: config.tag.clone(),
            config_space,
            sizes: vec![config.queue_size; queues],
            offered_features,
            calls,
            link,
            active: None,
            odd_config: Throttle::default(),
            reset_trouble: Throttle::default(),
            memory_trouble: Throttle::default(),
        })
    }

    /// What the handshake settled (protocol features, memory slots for hotplug).
    pub fn negotiated(&self) -> Negotiated {
        self.link.negotiated()
    }

    /// The backend hung up.
    pub fn backend_dead(&self) -> bool {
        self.link.state().dead.load(Ordering::SeqCst)
    }

    fn backend_hung_up(&mut self, events: Events, ops: &mut EventOps) {
        // Level-triggered: stop watching, or the loop would spin on it.
        if let Err(e) = ops.remove(events) {
            tracing::debug!("cannot stop watching the vhost-user socket: {e:?}");
        }
        let state = self.link.state();
        state.needs_reset.store(true, Ordering::SeqCst);
        if !state.dead.swap(true, Ordering::SeqCst) {
            tracing::error!(
                tag = %self.tag,
                "virtio-fs share {:?}: the vhost-user backend hung up (virtiofsd died?); the share stops answering and the device needs a reset",
                self.tag
            );
        }
        if let Some(active) = &self.active {
            active.interrupt.signal_config_change();
        }
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        self.offered_features | VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.config_space.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Some(suppressed) = self.odd_config.allow() {
            tracing::debug!(
                offset,
                len = data.len(),
                suppressed,
                "virtio-fs: config space is read-only; write ignored"
            );
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.backend_dead() {
            return Err(ActivateError::Backend(format!(
                "the vhost-user backend of share {:?} is gone",
                self.tag
            )));
        }
        let vrings: Vec<VringSetup> = activation
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready())
            .map(|(index, q)| VringSetup {
                index,
                size: q.size(),
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
                next_avail: q.next_avail(),
            })
            .collect();
        if vrings.is_empty() {
            return Err(ActivateError::QueueNotReady { index: 0 });
        }
        let kicks = activation
            .queue_events
            .into_iter()
            .enumerate()
            .filter(|(i, _)| vrings.iter().any(|v| v.index == *i))
            .collect();
        let layout = backend::layout(&activation.mem.memory());
        self.link
            .send(Request::Activate {
                features: activation.acked_features,
                mem: activation.mem,
                vrings,
                kicks,
                interrupt: activation.interrupt.clone(),
            })
            .map_err(|e| ActivateError::Backend(e.to_string()))?;
        self.active = Some(Active {
            interrupt: activation.interrupt,
            layout,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        let state = self.link.state().clone();
        if state.dead.load(Ordering::SeqCst) {
            return;
        }
        match self.link.reset() {
            Ok(()) => state.needs_reset.store(false, Ordering::SeqCst),
            Err(e) => {
                state.needs_reset.store(true, Ordering::SeqCst);
                if let Some(suppressed) = self.reset_trouble.allow() {
                    tracing::warn!(tag = %self.tag, suppressed, "virtio-fs reset: {e}");
                }
            }
        }
        // Completions of the old rings must not reach the next activation.
        for call in &self.calls {
            let _ = call.read();
        }
    }

    fn memory_changed(&mut self, mem: &GuestMem) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if self.link.state().dead.load(Ordering::SeqCst) {
            // Already reported: the device needs a reset.
            return;
        }
        let layout = backend::layout(&mem.memory());
        if layout == active.layout {
            return;
        }
        let removal = active.layout.iter().any(|s| !layout.contains(s));
        active.layout = layout;
        if let Err(e) = self.link.memory_changed(mem, &active.interrupt, removal) {
            self.link.state().needs_reset.store(true, Ordering::SeqCst);
            if let Some(suppressed) = self.memory_trouble.allow() {
                tracing::error!(
                    tag = %self.tag,
                    suppressed,
                    "virtio-fs: the vhost-user backend did not take the new guest memory layout: {e}; the device needs a reset"
                );
            }
            active.interrupt.signal_config_change();
        }
    }

    fn handles_queue_notifications(&self) -> bool {
        false
    }

    fn queue_notified(&mut self, index: usize, _ops: &mut EventOps) {
        // Never registered (the backend owns the kick fds); nothing to do.
        tracing::debug!(index, "virtio-fs: unexpected queue notification");
    }

    fn init_events(&mut self, ops: &mut EventOps) {
        for (index, call) in (0u32..).zip(&self.calls) {
            if let Err(e) = ops.add(Events::with_data(
                call,
                DEVICE_TOKEN_BASE + index,
                EventSet::IN,
            )) {
                tracing::error!(tag = %self.tag, index, "cannot watch a virtio-fs call eventfd: {e:?}");
            }
        }
        let watch = Events::with_data(self.link.socket(), HANGUP_TOKEN, EventSet::READ_HANG_UP);
        if let Err(e) = ops.add(watch) {
            tracing::error!(tag = %self.tag, "cannot watch the vhost-user socket for hang-up: {e:?}");
        }
    }

    fn handle_event(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if data == HANGUP_TOKEN {
            self.backend_hung_up(events, ops);
            return;
        }
        let index = data.wrapping_sub(DEVICE_TOKEN_BASE) as usize;
        let Some(call) = self.calls.get(index) else {
            tracing::debug!(data, "virtio-fs: unexpected event");
            return;
        };
        // Clears the counter; WouldBlock only means nothing was pending.
        let _ = call.read();
        if let Some(active) = &self.active {
            active.interrupt.signal_used_queue();
        }
    }

    fn needs_reset(&self) -> bool {
        self.link.state().needs_reset.load(Ordering::SeqCst)
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

#[cfg(test)]
mod fake_backend;
#[cfg(test)]
mod tests;
