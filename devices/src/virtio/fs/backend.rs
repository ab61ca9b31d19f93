//! The vhost-user conversation with the file-system backend (virtiofsd), on a
//! thread of its own.
//!
//! vhost-user is synchronous request/reply over a unix socket: every setup
//! message waits for the backend's answer. A backend that hangs would hang
//! whoever talks to it, and the device is driven from vCPU threads and from the
//! VMM's one event loop, which must never block. So [`BackendLink`] owns a
//! `vhost-user-fs` thread that holds the [`Frontend`] and does all the talking;
//! the device hands it requests through a bounded channel ([`REQUEST_BACKLOG`])
//! and waits only where the virtio protocol needs an answer, and then only for a
//! bounded time: the handshake before boot ([`HANDSHAKE_TIMEOUT`]), a driver
//! reset ([`RESET_WAIT`]) and the removal of guest memory ([`MEMORY_WAIT`]).
//! Tearing down shuts the socket, which unblocks the thread whatever state the
//! backend is in, so a hung backend can never keep the VM from ending.
//!
//! Memory hotplug: the thread remembers which RAM regions the backend was
//! given (set by the activation's memory table) and, when the layout changes,
//! tells the backend the difference: with `CONFIGURE_MEM_SLOTS` (up to
//! [`Negotiated::max_mem_slots`] regions) one `REM_MEM_REG` per region gone and
//! one `ADD_MEM_REG` per new one, otherwise the whole table again with
//! `SET_MEM_TABLE` (at most [`MEMORY_TABLE_MAX`] regions). A removal is waited
//! for, because the VMM unmaps the region as soon as the device returns; an
//! addition is only queued.
//!
//! This module never touches guest memory contents or virtqueues: it only tells
//! the backend where they are.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};
use vmm_sys_util::eventfd::EventFd;

use super::FsError;
use crate::confine::{run_hook, ThreadHook, WorkerThread};
use crate::throttle::Throttle;
use crate::virtio::device::{GuestMem, Interrupt, VIRTIO_F_VERSION_1};

/// How long the handshake before boot may take by default.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a driver reset waits for the backend to stop its rings.
pub const RESET_WAIT: Duration = Duration::from_secs(1);
/// How long the removal of guest memory waits for the backend to let go of it.
pub const MEMORY_WAIT: Duration = Duration::from_secs(5);
/// Regions one `SET_MEM_TABLE` may carry (the protocol's
/// `VHOST_MEMORY_BASELINE_NREGIONS`); more need `CONFIGURE_MEM_SLOTS`.
pub const MEMORY_TABLE_MAX: usize = 8;
/// How long teardown waits for the thread before shutting the socket under it.
pub const TEARDOWN_WAIT: Duration = Duration::from_secs(1);
/// Requests queued for the thread at most (activate, reset: a driver cannot
/// usefully have more in flight; memory additions share one queued request,
/// and a memory removal is waited for).
pub const REQUEST_BACKLOG: usize = 4;

/// The vhost-user protocol features we use when the backend offers them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// What the handshake settled.
#[derive(Debug, Clone, Copy)]
pub struct Negotiated {
    /// The backend's virtio feature bits.
    pub features: u64,
    /// The protocol features both sides use.
    pub protocol: VhostUserProtocolFeatures,
    /// Memory slots the backend takes (with `CONFIGURE_MEM_SLOTS`), for hotplug.
    pub max_mem_slots: Option<u64>,
}

/// One vring as the driver configured it (guest physical addresses).
#[derive(Debug, Clone, Copy)]
pub struct VringSetup {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
}

/// A guest RAM region as the backend knows it: what `REM_MEM_REG` names, and
/// what tells one layout's regions from another's (a region re-added at the
/// same address is a new mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    /// Our mapping of it.
    pub userspace_addr: u64,
    /// Where it starts in its file.
    pub mmap_offset: u64,
}

impl Slot {
    /// `region` as it is mapped now.
    pub fn of(region: &GuestRegionMmap) -> Self {
        Self {
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            mmap_offset: region.file_offset().map_or(0, FileOffset::start),
        }
    }

    /// The region as `REM_MEM_REG` sends it (no fd).
    // The `..Default::default()` fills the fields vhost's `xen` feature adds.
    #[allow(clippy::needless_update)]
    fn removal(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.guest_phys_addr,
            memory_size: self.memory_size,
            userspace_addr: self.userspace_addr,
            mmap_offset: self.mmap_offset,
            mmap_handle: -1,
            ..Default::default()
        }
    }
}

/// The regions of `mem`, in address order.
pub fn layout(mem: &GuestMemoryMmap) -> Vec<Slot> {
    mem.iter().map(Slot::of).collect()
}

/// Work for the thread.
pub enum Request {
    /// Send features, the memory table and the vrings, then enable them.
    Activate {
        features: u64,
        mem: GuestMem,
        vrings: Vec<VringSetup>,
        /// (queue index, its notification eventfd): the backend's kick fds.
        kicks: Vec<(usize, EventFd)>,
        interrupt: Arc<Interrupt>,
    },
    /// Stop the rings (the driver reset the device); answer on `done`.
    Reset { done: SyncSender<()> },
    /// Guest memory changed: bring the backend's table up to the current
    /// layout of `mem`; answer on `done` (if any) once the backend has it.
    MemoryChanged {
        mem: GuestMem,
        interrupt: Arc<Interrupt>,
        done: Option<SyncSender<()>>,
    },
}

/// Flags the thread and the device share.
#[derive(Debug, Default)]
pub struct LinkState {
    /// The backend hung up or broke the protocol; nothing will work again.
    pub dead: AtomicBool,
    /// The device must report DEVICE_NEEDS_RESET.
    pub needs_reset: AtomicBool,
    /// A memory update is queued and not yet started (it will read the layout
    /// as it is then, so further additions need no request of their own).
    pub memory_pending: AtomicBool,
    /// A memory removal was not confirmed in time: until the thread answers
    /// again, later removals fail at once instead of waiting behind it.
    pub memory_stuck: AtomicBool,
}

/// The device's end of the conversation.
pub struct BackendLink {
    requests: Option<SyncSender<Request>>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the thread has ended (it holds the only sender).
    ended: Receiver<()>,
    /// A duplicate of the socket: watched for hang-up, shut down at teardown.
    socket: UnixStream,
    negotiated: Negotiated,
    state: Arc<LinkState>,
}

impl BackendLink {
    /// Start the thread on `stream`, shake hands (bounded by `timeout`) and check the backend can serve `queues` queues.
    /// `calls` are the per-queue eventfds the backend signals used buffers on.
    pub fn start(
        stream: UnixStream,
        label: &str,
        queues: usize,
        calls: Vec<EventFd>,
        timeout: Duration,
        hook: Option<ThreadHook>,
    ) -> Result<Self, FsError> {
        let socket = stream.try_clone().map_err(FsError::Thread)?;
        let frontend = Frontend::from_stream(stream, queues as u64);
        let (requests, inbox) = mpsc::sync_channel(REQUEST_BACKLOG);
        let (shook, handshake) = mpsc::sync_channel(1);
        let (end_marker, ended) = mpsc::sync_channel::<()>(0);
        let state = Arc::new(LinkState::default());
        let mut worker = Worker {
            frontend,
            calls,
            state: state.clone(),
            label: label.to_string(),
            negotiated: None,
            started: Vec::new(),
            sent: None,
            complaints: Throttle::default(),
        };
        let thread = std::thread::Builder::new()
            .name("vhost-user-fs".into())
            .spawn(move || {
                run_hook(hook.as_ref(), WorkerThread::VhostUser);
                let _end_marker = end_marker;
                let result = worker.handshake(queues);
                let ok = result.is_ok();
                if shook.send(result).is_ok() && ok {
                    worker.serve(inbox);
                }
                // The frontend, and with it the socket, closes here: virtiofsd
                // exits when its frontend goes.
            })
            .map_err(FsError::Thread)?;
        let mut link = Self {
            requests: Some(requests),
            thread: Some(thread),
            ended,
            socket,
            negotiated: Negotiated {
                features: 0,
                protocol: VhostUserProtocolFeatures::empty(),
                max_mem_slots: None,
            },
            state,
        };
        match handshake.recv_timeout(timeout) {
            Ok(Ok(n)) => {
                link.negotiated = n;
                Ok(link)
            }
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => Err(FsError::Timeout {
                backend: label.to_string(),
                timeout,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(FsError::Thread(std::io::Error::other(
                "the vhost-user thread ended during the handshake",
            ))),
        }
        // On error `link` drops here: socket shut down, thread joined.
    }

    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    pub fn state(&self) -> &Arc<LinkState> {
        &self.state
    }

    /// The socket, for watching it for hang-up.
    pub fn socket(&self) -> &UnixStream {
        &self.socket
    }

    /// Queue `request`; false when the thread is gone or swamped.
    pub fn send(&self, request: Request) -> Result<(), &'static str> {
        let Some(tx) = self.requests.as_ref() else {
            return Err("the vhost-user thread has ended");
        };
        match tx.try_send(request) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err("the backend is not answering (requests piled up)"),
            Err(TrySendError::Disconnected(_)) => Err("the vhost-user thread has ended"),
        }
    }

    /// Stop the backend's rings and wait (bounded) until it confirms.
    pub fn reset(&self) -> Result<(), &'static str> {
        let (done, confirmed) = mpsc::sync_channel(1);
        self.send(Request::Reset { done })?;
        confirmed
            .recv_timeout(RESET_WAIT)
            .map_err(|_| "the backend did not confirm the reset in time")
    }

    /// Bring the backend's memory table up to the layout of `mem`. A
    /// `removal` waits (at most [`MEMORY_WAIT`]) until the thread has told the
    /// backend (and, with `REPLY_ACK`, the backend acknowledged), because the
    /// VMM unmaps the region right after; an addition is only queued. Failures
    /// the thread meets it handles itself (needs-reset, config interrupt).
    pub fn memory_changed(
        &self,
        mem: &GuestMem,
        interrupt: &Arc<Interrupt>,
        removal: bool,
    ) -> Result<(), &'static str> {
        let request = |done| Request::MemoryChanged {
            mem: mem.clone(),
            interrupt: interrupt.clone(),
            done,
        };
        if !removal {
            if self.state.memory_pending.swap(true, Ordering::SeqCst) {
                return Ok(());
            }
            let queued = self.send(request(None));
            if queued.is_err() {
                self.state.memory_pending.store(false, Ordering::SeqCst);
            }
            return queued;
        }
        if self.state.memory_stuck.load(Ordering::SeqCst) {
            return Err("the backend has not confirmed an earlier removal of guest memory");
        }
        let (done, confirmed) = mpsc::sync_channel(1);
        self.send(request(Some(done)))?;
        match confirmed.recv_timeout(MEMORY_WAIT) {
            Ok(()) => Ok(()),
            Err(RecvTimeoutError::Timeout) => {
                self.state.memory_stuck.store(true, Ordering::SeqCst);
                Err("the backend did not confirm the removal of guest memory in time")
            }
            Err(RecvTimeoutError::Disconnected) => Err("the vhost-user thread has ended"),
        }
    }
}

impl Drop for BackendLink {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop once it is idle; stopping
        // the rings happened at the driver's reset, or does not matter once the
        // backend loses its frontend.
        self.requests = None;
        if let Err(RecvTimeoutError::Timeout) = self.ended.recv_timeout(TEARDOWN_WAIT) {
            // Stuck on a backend that does not answer: pull the socket from under it.
            let _ = self.socket.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the vhost-user-fs thread panicked");
            }
        }
    }
}

/// Where a request failed (for the error message).
fn step<T>(what: &'static str, r: vhost::Result<T>) -> Result<T, (&'static str, vhost::Error)> {
    r.map_err(|e| (what, e))
}

/// The thread's state.
struct Worker {
    frontend: Frontend,
    calls: Vec<EventFd>,
    state: Arc<LinkState>,
    label: String,
    negotiated: Option<Negotiated>,
    /// Queues the backend is running.
    started: Vec<usize>,
    /// The RAM regions the backend was given; None until an activation's
    /// memory table went through.
    sent: Option<Vec<Slot>>,
    /// A driver can make activations fail as often as it likes.
    complaints: Throttle,
}

impl Worker {
    fn handshake(&mut self, queues: usize) -> Result<Negotiated, FsError> {
        let fail = |(step, source): (&'static str, vhost::Error)| FsError::Handshake {
            backend: self.label.clone(),
            step,
            source,
        };
        let fe = &mut self.frontend;
        step("SET_OWNER", fe.set_owner()).map_err(fail)?;
        let features = step("GET_FEATURES", fe.get_features()).map_err(fail)?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        for (bit, name) in [
            (VIRTIO_F_VERSION_1, "VIRTIO_F_VERSION_1"),
            (protocol_bit, "VHOST_USER_F_PROTOCOL_FEATURES"),
        ] {
            if features & bit == 0 {
                return Err(FsError::Missing {
                    backend: self.label.clone(),
                    what: name,
                });
            }
        }
        let offered = step("GET_PROTOCOL_FEATURES", fe.get_protocol_features()).map_err(fail)?;
        let protocol = offered & wanted_protocol_features();
        step("SET_PROTOCOL_FEATURES", fe.set_protocol_features(protocol)).map_err(fail)?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every setup message is acknowledged, so a refusal is an error here
            // rather than a silently dead queue.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let n = step("GET_QUEUE_NUM", fe.get_queue_num()).map_err(fail)?;
            if n < queues as u64 {
                return Err(FsError::TooFewQueues {
                    backend: self.label.clone(),
                    offered: n,
                    needed: queues,
                });
            }
        }
        let max_mem_slots = if protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            Some(step("GET_MAX_MEM_SLOTS", fe.get_max_mem_slots()).map_err(fail)?)
        } else {
            None
        };
        let n = Negotiated {
            features,
            protocol,
            max_mem_slots,
        };
        self.negotiated = Some(n);
        tracing::debug!(backend = %self.label, features = format_args!("{features:#x}"), ?protocol, ?max_mem_slots, "vhost-user handshake done");
        Ok(n)
    }

    fn serve(&mut self, inbox: Receiver<Request>) {
        for request in inbox {
            match request {
                Request::Activate {
                    features,
                    mem,
                    vrings,
                    kicks,
                    interrupt,
                } => {
                    if let Err((what, e)) = self.activate(features, &mem, &vrings, &kicks) {
                        self.failed(what, &e);
                        interrupt.signal_config_change();
                    }
                }
                Request::Reset { done } => {
                    self.stop_rings();
                    let _ = done.send(());
                }
                Request::MemoryChanged {
                    mem,
                    interrupt,
                    done,
                } => {
                    if let Err((what, e)) = self.update_memory(&mem) {
                        self.failed(what, &e);
                        interrupt.signal_config_change();
                    }
                    self.state.memory_stuck.store(false, Ordering::SeqCst);
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
            }
        }
        self.stop_rings();
    }

    fn failed(&mut self, what: &str, e: &dyn std::fmt::Display) {
        self.state.needs_reset.store(true, Ordering::SeqCst);
        let Some(suppressed) = self.complaints.allow() else {
            return;
        };
        if self.state.dead.load(Ordering::SeqCst) {
            tracing::debug!(backend = %self.label, suppressed, "vhost-user {what} failed: {e} (the backend is gone)");
        } else {
            tracing::error!(backend = %self.label, suppressed, "vhost-user {what} failed: {e}; the virtio-fs device needs a reset");
        }
    }

    fn activate(
        &mut self,
        guest_features: u64,
        mem: &GuestMem,
        vrings: &[VringSetup],
        kicks: &[(usize, EventFd)],
    ) -> Result<(), (&'static str, String)> {
        let Some(negotiated) = self.negotiated else {
            return Err(("activation", "no handshake".into()));
        };
        let err = |what: &'static str| move |e: vhost::Error| (what, e.to_string());
        let features = (guest_features & negotiated.features)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(features)
            .map_err(err("SET_FEATURES"))?;
        let guard = mem.memory();
        self.send_table(&guard, negotiated)?;

        let fe = &mut self.frontend;
        for v in vrings {
            let size = u64::from(v.size);
            let host = |gpa: u64, len: u64| host_address(&*guard, gpa, len);
            let config = VringConfigData {
                queue_max_size: v.size,
                queue_size: v.size,
                flags: 0,
                desc_table_addr: host(v.desc, 16 * size).ok_or((
                    "SET_VRING_ADDR",
                    "descriptor table outside guest RAM".to_string(),
                ))?,
                used_ring_addr: host(v.used, 6 + 8 * size)
                    .ok_or(("SET_VRING_ADDR", "used ring outside guest RAM".to_string()))?,
                avail_ring_addr: host(v.avail, 6 + 2 * size).ok_or((
                    "SET_VRING_ADDR",
                    "available ring outside guest RAM".to_string(),
                ))?,
                log_addr: None,
            };
            let Some((_, kick)) = kicks.iter().find(|(i, _)| *i == v.index) else {
                return Err((
                    "SET_VRING_KICK",
                    format!("no eventfd for queue {}", v.index),
                ));
            };
            let Some(call) = self.calls.get(v.index) else {
                return Err((
                    "SET_VRING_CALL",
                    format!("no eventfd for queue {}", v.index),
                ));
            };
            fe.set_vring_num(v.index, v.size)
                .map_err(err("SET_VRING_NUM"))?;
            fe.set_vring_base(v.index, v.next_avail)
                .map_err(err("SET_VRING_BASE"))?;
            fe.set_vring_addr(v.index, &config)
                .map_err(err("SET_VRING_ADDR"))?;
            fe.set_vring_kick(v.index, kick)
                .map_err(err("SET_VRING_KICK"))?;
            fe.set_vring_call(v.index, call)
                .map_err(err("SET_VRING_CALL"))?;
            self.started.push(v.index);
        }
        for v in vrings {
            fe.set_vring_enable(v.index, true)
                .map_err(err("SET_VRING_ENABLE"))?;
        }
        tracing::debug!(backend = %self.label, queues = vrings.len(), "vhost-user rings running");
        Ok(())
    }

    /// The whole memory table: `SET_MEM_TABLE` with up to [`MEMORY_TABLE_MAX`]
    /// regions and, with `CONFIGURE_MEM_SLOTS`, the rest through `ADD_MEM_REG`.
    fn send_table(
        &mut self,
        mem: &GuestMemoryMmap,
        negotiated: Negotiated,
    ) -> Result<(), (&'static str, String)> {
        self.sent = None;
        let count = mem.num_regions();
        match negotiated.max_mem_slots {
            Some(max) if count as u64 > max => {
                return Err((
                    "SET_MEM_TABLE",
                    format!("{count} RAM regions, the backend takes {max}"),
                ))
            }
            None if count > MEMORY_TABLE_MAX => {
                return Err((
                    "SET_MEM_TABLE",
                    format!("{count} RAM regions, but one memory table holds at most {MEMORY_TABLE_MAX} and the backend lacks CONFIGURE_MEM_SLOTS"),
                ))
            }
            _ => {}
        }
        let regions: Vec<&GuestRegionMmap> = mem.iter().collect();
        let (first, rest) = regions.split_at(count.min(MEMORY_TABLE_MAX));
        let table = first
            .iter()
            .map(|r| shareable("SET_MEM_TABLE", r))
            .collect::<Result<Vec<_>, _>>()?;
        self.frontend
            .set_mem_table(&table)
            .map_err(|e| ("SET_MEM_TABLE", e.to_string()))?;
        let mut sent: Vec<Slot> = first.iter().map(|r| Slot::of(r)).collect();
        let added = self.add_regions(&mut sent, rest);
        self.sent = Some(sent);
        added
    }

    /// `ADD_MEM_REG` for each of `regions`, noting each the backend took in `sent`.
    fn add_regions(
        &mut self,
        sent: &mut Vec<Slot>,
        regions: &[&GuestRegionMmap],
    ) -> Result<(), (&'static str, String)> {
        for region in regions {
            let info = shareable("ADD_MEM_REG", region)?;
            self.frontend
                .add_mem_region(&info)
                .map_err(|e| ("ADD_MEM_REG", e.to_string()))?;
            sent.push(Slot::of(region));
        }
        Ok(())
    }

    /// Guest memory changed: tell the backend what differs from what it has.
    fn update_memory(&mut self, mem: &GuestMem) -> Result<(), (&'static str, String)> {
        // From here on a further addition needs a request of its own.
        self.state.memory_pending.store(false, Ordering::SeqCst);
        let Some(negotiated) = self.negotiated else {
            return Err(("memory update", "no handshake".into()));
        };
        let guard = mem.memory();
        let now = layout(&guard);
        let Some(mut sent) = self.sent.take() else {
            // The activation did not get the table through: the device needs
            // a reset already, and the next activation sends the whole table.
            return Ok(());
        };
        if sent == now {
            self.sent = Some(sent);
            return Ok(());
        }
        let Some(max) = negotiated.max_mem_slots else {
            return self.send_table(&guard, negotiated);
        };
        let result = self.apply_difference(&mut sent, &guard, &now, max);
        sent.sort_by_key(|s| s.guest_phys_addr);
        self.sent = Some(sent);
        result
    }

    /// With `CONFIGURE_MEM_SLOTS`: `REM_MEM_REG` for each region of `sent`
    /// missing from `now` (first, freeing slots), then `ADD_MEM_REG` for each
    /// new one, keeping `sent` what the backend has even when a step fails.
    fn apply_difference(
        &mut self,
        sent: &mut Vec<Slot>,
        mem: &GuestMemoryMmap,
        now: &[Slot],
        max: u64,
    ) -> Result<(), (&'static str, String)> {
        let gone: Vec<Slot> = sent.iter().filter(|s| !now.contains(s)).copied().collect();
        for slot in gone {
            self.frontend
                .remove_mem_region(&slot.removal())
                .map_err(|e| ("REM_MEM_REG", e.to_string()))?;
            sent.retain(|s| *s != slot);
        }
        if now.len() as u64 > max {
            return Err((
                "ADD_MEM_REG",
                format!("{} RAM regions, the backend takes {max}", now.len()),
            ));
        }
        let new: Vec<&GuestRegionMmap> = mem
            .iter()
            .filter(|r| !sent.contains(&Slot::of(r)))
            .collect();
        self.add_regions(sent, &new)
    }

    /// Stop every running ring (GET_VRING_BASE stops a ring, per the
    /// vhost-user spec) and reset the backend's device state.
    fn stop_rings(&mut self) {
        let started = std::mem::take(&mut self.started);
        if started.is_empty() || self.state.dead.load(Ordering::SeqCst) {
            return;
        }
        for index in started {
            let stopped = self
                .frontend
                .set_vring_enable(index, false)
                .and_then(|()| self.frontend.get_vring_base(index));
            if let Err(e) = stopped {
                self.failed("stopping a ring", &e);
                return;
            }
        }
        let resettable = self
            .negotiated
            .is_some_and(|n| n.protocol.contains(VhostUserProtocolFeatures::RESET_DEVICE));
        if resettable {
            if let Err(e) = self.frontend.reset_device() {
                self.failed("RESET_DEVICE", &e);
            }
        }
    }
}

/// `region` as a memory table entry, with the fd the backend maps it from.
fn shareable(
    what: &'static str,
    region: &GuestRegionMmap,
) -> Result<VhostUserMemoryRegionInfo, (&'static str, String)> {
    VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|e| {
        (
            what,
            format!(
                "guest RAM is not backed by a shareable file (memfd), which vhost-user needs: {e}"
            ),
        )
    })
}

/// Our address of `len` bytes of guest memory at `gpa`, if they lie in one region.
fn host_address<M: GuestMemoryBackend>(mem: &M, gpa: u64, len: u64) -> Option<u64> {
    let (region, offset) = mem.to_region_addr(GuestAddress(gpa))?;
    let last = offset.0.checked_add(len.checked_sub(1)?)?;
    if last >= region.len() {
        return None;
    }
    region.get_host_address(offset).ok().map(|p| p as u64)
}
