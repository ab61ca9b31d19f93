//! The hybrid vsock backend: a userspace virtio-vsock device whose host side is
//! unix sockets (the Firecracker / Cloud Hypervisor convention), so it needs no
//! kernel module and no host-wide CID.
//!
//! - Host → guest: a program connects to `<uds_path>`, writes `CONNECT <port>\n`;
//!   the device sends the guest a REQUEST and, once the guest accepts, answers
//!   `OK <hostport>\n` (a refusal or reset closes the socket).
//! - Guest → host: a REQUEST to port P connects to `<uds_path>_P`; nothing
//!   listening means RST.
//!
//! The device owns the queues and the listener ([`host`]); its connection
//! table (`muxer`) holds every connection ([`conn`]) and handshake and keeps
//! the event loop's registrations in step with what each socket should be
//! watched for. Everything is bounded: connections
//! ([`MAX_CONNECTIONS`]), handshakes ([`MAX_HANDSHAKES`], each with a deadline),
//! control packets waiting for RX buffers ([`MAX_CONTROL`]: the TX queue stops
//! being served while they are full), per-connection buffers (credit). Sockets
//! leave the event loop before they are closed, also after a device reset. No
//! handler blocks: every socket is non-blocking.

pub mod conn;
pub mod host;
mod muxer;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::super::device::{
    ActivateError, Activation, GuestMem, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use super::super::events::DEVICE_TOKEN_BASE;
use super::super::queue::{serve_queue, ChainOutcome};
use super::packet::{parse_header, Header, HEADER_LEN, MAX_PAYLOAD};
use super::{EventQueue, EVENT_QUEUE, QUEUE_SIZES, RX_QUEUE, TX_QUEUE, VIRTIO_ID_VSOCK};
use crate::throttle::Throttle;
use conn::{Connection, State};
use host::{Handshake, HostListener, ListenError, PendingHandshake};
use muxer::Muxer;

/// Connections and handshakes at once, together.
pub const MAX_CONNECTIONS: usize = 256;
/// Host programs connected but not through `CONNECT` yet.
pub const MAX_HANDSHAKES: usize = 64;
/// Control packets (RSTs to unknown connections) waiting for RX buffers.
pub const MAX_CONTROL: usize = 256;
/// How long a host program may take to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to accept a host connection. Its kernel
/// queues the RESPONSE at once when something listens, but sends it from a
/// worker that a CPU-starved guest runs late (seen beyond 10 s in the nested
/// lab); giving up early resets a connection the guest application already
/// accepted, so this only bounds guests that never answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadlines are checked this often while any is pending.
const TIMER_PERIOD: Duration = Duration::from_millis(500);
/// Connections accepted per listener event (the rest on the next turn).
const ACCEPTS_PER_EVENT: usize = 32;
/// TX and RX rounds per event before yielding to other devices.
const ROUNDS: usize = 4;

const TOKEN_LISTENER: u32 = DEVICE_TOKEN_BASE;
const TOKEN_CLEANUP: u32 = DEVICE_TOKEN_BASE + 1;
const TOKEN_TIMER: u32 = DEVICE_TOKEN_BASE + 2;
pub(crate) const TOKEN_FIRST_SOCKET: u32 = DEVICE_TOKEN_BASE + 16;
/// Host-side ports of host-initiated connections start here.
pub(crate) const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Why the hybrid device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum HybridError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("vsock: creating {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

struct Active {
    mem: GuestMem,
    interrupt: Arc<Interrupt>,
    rx: Queue,
    tx: Queue,
    events: EventQueue,
    rx_kick: EventFd,
    tx_kick: EventFd,
    rx_broken: bool,
    tx_broken: bool,
}

/// The hybrid vsock device.
pub struct HybridVsock {
    guest_cid: u64,
    listener: HostListener,
    cleanup: EventFd,
    timer: TimerFd,
    timer_armed: bool,
    active: Option<Active>,
    mux: Muxer,
    /// Guest payload on its way to a host socket.
    tx_scratch: Vec<u8>,
    /// Connections were dropped by a reset: tell the guest once it is back.
    reset_event_owed: bool,
    chain_log: Throttle,
    rx_ring_log: Throttle,
    tx_ring_log: Throttle,
}

impl HybridVsock {
    /// A device for guest `guest_cid` listening on `uds_path` (created now, so
    /// a bad path fails before the guest boots; removed when the device drops).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, HybridError> {
        let io = |what| move |source| HybridError::Io { what, source };
        let listener = HostListener::bind(uds_path)?;
        let cleanup = EventFd::new(libc::EFD_NONBLOCK).map_err(io("an eventfd"))?;
        let timer = TimerFd::new().map_err(|e| HybridError::Io {
            what: "a timerfd",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        // SAFETY: F_SETFL on a timerfd we own; the result is checked.
        let rc = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if rc < 0 {
            return Err(HybridError::Io {
                what: "a non-blocking timerfd",
                source: std::io::Error::last_os_error(),
            });
        }
        tracing::info!(guest_cid, path = ?uds_path, "vsock: hybrid backend listening");
        Ok(Self {
            guest_cid,
            listener,
            cleanup,
            timer,
            timer_armed: false,
            active: None,
            mux: Muxer::new(guest_cid, uds_path.to_path_buf()),
            tx_scratch: vec![0; MAX_PAYLOAD as usize],
            reset_event_owed: false,
            chain_log: Throttle::default(),
            rx_ring_log: Throttle::default(),
            tx_ring_log: Throttle::default(),
        })
    }

    /// The listening socket's path.
    pub fn uds_path(&self) -> &Path {
        self.listener.path()
    }

    /// Open connections (tests, logs).
    pub fn connections(&self) -> usize {
        self.mux.conns.len()
    }

    /// Guest data buffered for host programs, over every connection.
    pub fn buffered_bytes(&self) -> usize {
        self.mux.conns.values().map(Connection::pending_len).sum()
    }

    /// Serve the TX queue; returns whether it stopped because control packets
    /// for the guest are full (RX must drain first).
    fn process_tx(&mut self) -> (bool, bool) {
        let Some(active) = self.active.as_mut() else {
            return (false, false);
        };
        if active.tx_broken {
            return (false, false);
        }
        let mem = active.mem.memory();
        let mux = &mut self.mux;
        let buf = &mut self.tx_scratch;
        let log = &mut self.chain_log;
        let cid = self.guest_cid;
        let mut stalled = false;
        let served = serve_queue(
            &mut active.tx,
            &*mem,
            usize::from(super::QUEUE_SIZE),
            &active.interrupt,
            &mut self.tx_ring_log,
            |chain| {
                if mux.control.len() >= MAX_CONTROL {
                    stalled = true;
                    return ChainOutcome::Later;
                }
                let mut reader = match chain.reader(&*mem) {
                    Ok(r) => r,
                    Err(e) => {
                        if let Some(suppressed) = log.allow() {
                            tracing::warn!(suppressed, "vsock: malformed TX chain dropped: {e}");
                        }
                        return ChainOutcome::Used(0);
                    }
                };
                let mut raw = [0u8; HEADER_LEN];
                if reader.available_bytes() < HEADER_LEN || reader.read_exact(&mut raw).is_err() {
                    if let Some(suppressed) = log.allow() {
                        tracing::warn!(
                            suppressed,
                            "vsock: TX chain shorter than a packet header dropped"
                        );
                    }
                    return ChainOutcome::Used(0);
                }
                match parse_header(&raw, reader.available_bytes(), cid) {
                    Ok(pkt) => {
                        let len = pkt.header.len as usize;
                        let Some(payload) = buf.get_mut(..len) else {
                            return ChainOutcome::Used(0);
                        };
                        if reader.read_exact(payload).is_err() {
                            if let Some(suppressed) = log.allow() {
                                tracing::warn!(suppressed, "vsock: unreadable TX payload dropped");
                            }
                            return ChainOutcome::Used(0);
                        }
                        mux.guest_packet(pkt.op, &pkt.header, payload);
                    }
                    Err(e) => {
                        if let Ok(h) = Header::decode(&raw) {
                            mux.bad_packet(&h, e);
                        }
                    }
                }
                ChainOutcome::Used(0)
            },
        );
        active.tx_broken = served.broken;
        (stalled, served.more_pending)
    }

    /// Fill RX buffers with what the guest is owed; returns (whether any
    /// buffer was used, whether the budget ran out with more waiting).
    fn process_rx(&mut self) -> (bool, bool) {
        let Some(active) = self.active.as_mut() else {
            return (false, false);
        };
        if active.rx_broken {
            return (false, false);
        }
        if self.mux.control.is_empty() && self.mux.rx_list.is_empty() {
            return (false, false);
        }
        let mem = active.mem.memory();
        let mux = &mut self.mux;
        let log = &mut self.chain_log;
        let served = serve_queue(
            &mut active.rx,
            &*mem,
            usize::from(super::QUEUE_SIZE),
            &active.interrupt,
            &mut self.rx_ring_log,
            |chain| {
                let mut writer = match chain.writer(&*mem) {
                    Ok(w) if w.available_bytes() >= HEADER_LEN => w,
                    Ok(_) | Err(_) => {
                        if let Some(suppressed) = log.allow() {
                            tracing::warn!(
                                suppressed,
                                "vsock: RX buffer unusable (not writable, or smaller than a header); dropped"
                            );
                        }
                        return ChainOutcome::Used(0);
                    }
                };
                let room = writer.available_bytes() - HEADER_LEN;
                let Some((hdr, len)) = mux.next_rx(room) else {
                    return ChainOutcome::Later;
                };
                let payload = mux.scratch.get(..len).unwrap_or_default();
                let wrote = std::io::Write::write_all(&mut writer, &hdr.encode())
                    .and_then(|()| std::io::Write::write_all(&mut writer, payload));
                if let Err(e) = wrote {
                    if let Some(suppressed) = log.allow() {
                        tracing::warn!(suppressed, "vsock: writing an RX buffer failed: {e}");
                    }
                }
                ChainOutcome::Used(u32::try_from(writer.bytes_written()).unwrap_or(0))
            },
        );
        active.rx_broken = served.broken;
        (served.used > 0, served.more_pending)
    }

    /// Move data both ways until nothing moves (bounded), then bring the
    /// event loop in step. A TX queue stalled on full control packets resumes
    /// when RX buffers drain them (here, or on the guest's next RX
    /// notification), never by rescheduling itself.
    fn pump(&mut self, ops: &mut EventOps) {
        let mut tx_more = false;
        let mut rx_more = false;
        for _ in 0..ROUNDS {
            let (stalled, more) = self.process_tx();
            tx_more = more;
            let (rx_used, more) = self.process_rx();
            rx_more = more;
            if !(tx_more || rx_more || (stalled && rx_used)) {
                break;
            }
        }
        if let Some(active) = self.active.as_ref() {
            // Budgets ran out with work left: come back after other devices.
            if rx_more {
                let _ = active.rx_kick.write(1);
            }
            if tx_more {
                let _ = active.tx_kick.write(1);
            }
        }
        self.mux.sync(ops);
        self.arm_timer();
    }

    fn arm_timer(&mut self) {
        let wanted = !self.mux.handshakes.is_empty()
            || self
                .mux
                .conns
                .values()
                .any(|c| matches!(c.state, State::LocalInit { .. }));
        if wanted == self.timer_armed {
            return;
        }
        let res = if wanted {
            self.timer.reset(TIMER_PERIOD, Some(TIMER_PERIOD))
        } else {
            self.timer.clear()
        };
        match res {
            Ok(()) => self.timer_armed = wanted,
            Err(e) => tracing::error!("vsock: cannot arm the deadline timer: {e}"),
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        for _ in 0..ACCEPTS_PER_EVENT {
            let stream = match self.listener.accept() {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(e) => {
                    if let Some(suppressed) = self.mux.host_log.allow() {
                        tracing::warn!(
                            suppressed,
                            "vsock: accept on {:?} failed: {e}",
                            self.listener.path()
                        );
                    }
                    break;
                }
            };
            if self.mux.sockets() >= MAX_CONNECTIONS || self.mux.handshakes.len() >= MAX_HANDSHAKES
            {
                if let Some(suppressed) = self.mux.host_log.allow() {
                    tracing::warn!(
                        suppressed,
                        "vsock: too many host connections ({} open, {} handshaking); one refused",
                        self.mux.conns.len(),
                        self.mux.handshakes.len()
                    );
                }
                continue;
            }
            let token = self.mux.alloc_token();
            if let Err(e) = ops.add(Events::with_data(&stream, token, EventSet::IN)) {
                tracing::error!("vsock: cannot watch a host connection: {e:?}");
                continue;
            }
            self.mux.handshakes.insert(
                token,
                (
                    PendingHandshake::new(stream),
                    Instant::now() + HANDSHAKE_TIMEOUT,
                ),
            );
        }
    }

    fn handshake_ready(&mut self, token: u32) {
        let Some((pending, _)) = self.mux.handshakes.get_mut(&token) else {
            return;
        };
        let port = match pending.advance() {
            Ok(Handshake::Incomplete) => return,
            Ok(Handshake::Connect(port)) => port,
            Ok(Handshake::Garbage) => {
                if let Some(suppressed) = self.mux.host_log.allow() {
                    tracing::warn!(
                        suppressed,
                        "vsock: a host connection did not start with `CONNECT <port>\\n`; dropped"
                    );
                }
                self.mux.drop_handshake(token);
                return;
            }
            Err(e) => {
                tracing::debug!("vsock: host connection ended during its handshake: {e}");
                self.mux.drop_handshake(token);
                return;
            }
        };
        if self.active.is_none() {
            if let Some(suppressed) = self.mux.host_log.allow() {
                tracing::info!(
                    suppressed,
                    port,
                    "vsock: host connection refused: the guest's vsock driver is not up"
                );
            }
            self.mux.drop_handshake(token);
            return;
        }
        let Some((pending, _)) = self.mux.handshakes.remove(&token) else {
            return;
        };
        let local = self.mux.alloc_local_port(port);
        let mut conn = Connection::host_initiated(
            pending.stream,
            local,
            port,
            self.guest_cid,
            Instant::now() + CONNECT_TIMEOUT,
        );
        conn.registered = Some(EventSet::IN);
        self.mux.by_ports.insert((local, port), token);
        self.mux.conns.insert(token, conn);
        self.mux.schedule(token);
        tracing::debug!(port, local, "vsock: host connects to the guest");
    }
}

impl VirtioDevice for HybridVsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config(self.guest_cid, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let mut queues = activation.queues.into_iter();
        let mut take = |index: usize| {
            queues
                .next()
                .filter(|q| q.ready())
                .ok_or(ActivateError::QueueNotReady { index })
        };
        let rx = take(RX_QUEUE)?;
        let tx = take(TX_QUEUE)?;
        let ev = take(EVENT_QUEUE)?;
        let mut kicks = activation.queue_events.into_iter();
        let (Some(rx_kick), Some(tx_kick)) = (kicks.next(), kicks.next()) else {
            return Err(ActivateError::Backend(
                "no notification eventfds for the RX and TX queues".into(),
            ));
        };
        let mut events = EventQueue::new(ev);
        if std::mem::take(&mut self.reset_event_owed) {
            events.transport_reset(&activation.mem, &activation.interrupt);
        }
        // Packets may already wait: serve them from the event loop.
        let _ = tx_kick.write(1);
        self.active = Some(Active {
            mem: activation.mem,
            interrupt: activation.interrupt,
            rx,
            tx,
            events,
            rx_kick,
            tx_kick,
            rx_broken: false,
            tx_broken: false,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        if self.mux.clear() {
            self.reset_event_owed = true;
        }
        // The sockets leave the event loop from the loop's own thread.
        let _ = self.cleanup.write(1);
    }

    fn queue_notified(&mut self, index: usize, ops: &mut EventOps) {
        if index == EVENT_QUEUE {
            if let Some(a) = self.active.as_mut() {
                a.events.deliver(&a.mem, &a.interrupt);
            }
            return;
        }
        self.pump(ops);
    }

    fn init_events(&mut self, ops: &mut EventOps) {
        for (fd, token, what) in [
            (
                self.listener.as_raw_fd(),
                TOKEN_LISTENER,
                "listening socket",
            ),
            (self.cleanup.as_raw_fd(), TOKEN_CLEANUP, "cleanup eventfd"),
            (self.timer.as_raw_fd(), TOKEN_TIMER, "deadline timer"),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                tracing::error!("vsock: cannot watch its {what}: {e:?}");
            }
        }
    }

    fn handle_event(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        match token {
            TOKEN_LISTENER => self.accept(ops),
            TOKEN_CLEANUP => {
                let _ = self.cleanup.read();
            }
            TOKEN_TIMER => {
                let mut count = [0u8; 8];
                // SAFETY: reading 8 bytes into a valid buffer from a
                // non-blocking timerfd we own.
                let _ = unsafe { libc::read(self.timer.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
                self.mux.expire(Instant::now());
            }
            t if self.mux.handshakes.contains_key(&t) => self.handshake_ready(t),
            t => {
                if let Some(c) = self.mux.conns.get_mut(&t) {
                    let verdict = c.host_ready(events.event_set());
                    self.mux.apply(t, verdict);
                }
            }
        }
        self.pump(ops);
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

#[cfg(test)]
mod tests;
