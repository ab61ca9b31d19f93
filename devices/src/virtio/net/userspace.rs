//! virtio-net's userspace data path: the VMM's event loop moves frames between
//! the TAP and the two queues.
//!
//! - TX runs on the transmit queue's notification: each chain is one frame
//!   (net header + Ethernet frame), checked and written to the TAP.
//! - RX runs when the TAP is readable (level-triggered) and when the guest
//!   posts receive buffers (its notification). One frame at a time is read from
//!   the TAP into a bounded buffer; it goes into the guest only once enough
//!   posted buffers are there for all of it. When they are not, the TAP leaves
//!   the epoll set (so a readable TAP cannot make the loop spin), the frame
//!   waits, further frames wait in the TAP's own queue (which is what bounds
//!   memory), and the receive queue's notification is armed so the guest's next
//!   buffer brings the TAP back.
//!
//! Every pass is bounded (a budget of frames or chains), every chain goes
//! through [`serve_queue`], and nothing here blocks: the TAP is non-blocking.
//! It never lets a malformed chain, a wrong header or an oversized frame reach
//! the TAP or the guest: those are dropped with a throttled log line.

use std::io::{ErrorKind, Read};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{features, RX_QUEUE, TAP_TOKEN, TX_QUEUE, VNET_HDR_LEN};
use crate::tap::Tap;
use crate::throttle::Throttle;
use crate::virtio::device::{ActivateError, Activation, GuestMem, Interrupt};
use crate::virtio::queue::{serve_queue, ChainOutcome};

/// Largest frame (with its net header) the TAP can hand over: a 64 KiB GSO
/// packet plus Ethernet and VLAN headers, rounded up. A read that fills the
/// whole buffer may have been cut short and is dropped.
const RX_BUFFER_LEN: usize = VNET_HDR_LEN + (64 << 10) + 1024;
/// Largest TX chain: the header plus [`super::MAX_TX_FRAME`].
pub const TX_BUFFER_LEN: usize = VNET_HDR_LEN + super::MAX_TX_FRAME;
/// Pieces of guest memory one transmitted frame may be written from; a chain
/// with more is copied first.
const TX_MAX_SEGMENTS: usize = 64;
/// Frames moved from the TAP per event-loop turn, before other devices run.
const RX_FRAMES_PER_TURN: usize = 256;

// virtio_net_hdr_v1 layout.
const HDR_FLAGS: usize = 0;
const HDR_GSO_TYPE: usize = 1;
const HDR_NUM_BUFFERS: usize = 10;
const NEEDS_CSUM: u8 = 1;
const DATA_VALID: u8 = 2;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;

/// Whether a TX header asks only for what the guest negotiated; `Err` says why not.
pub fn check_tx_header(hdr: &[u8], acked: u64) -> Result<(), &'static str> {
    let (Some(&flags), Some(&gso)) = (hdr.get(HDR_FLAGS), hdr.get(HDR_GSO_TYPE)) else {
        return Err("header too short");
    };
    if flags & !NEEDS_CSUM != 0 {
        return Err("unknown header flags");
    }
    if flags & NEEDS_CSUM != 0 && acked & features::CSUM == 0 {
        return Err("checksum offload asked for but not negotiated");
    }
    match gso {
        GSO_NONE => Ok(()),
        GSO_TCPV4 if acked & features::HOST_TSO4 != 0 => Ok(()),
        GSO_TCPV6 if acked & features::HOST_TSO6 != 0 => Ok(()),
        _ => Err("segmentation type not negotiated"),
    }
}

/// Make an RX header say only what the guest negotiated; `Err` when the frame
/// needs an offload the guest did not accept (the TAP's offloads exclude it, so
/// this is a host bug or a race with a reset).
pub(super) fn fix_rx_header(
    hdr: &mut [u8],
    acked: u64,
    num_buffers: u16,
) -> Result<(), &'static str> {
    if hdr.len() < VNET_HDR_LEN {
        return Err("header too short");
    }
    let gso = hdr[HDR_GSO_TYPE];
    let allowed = match gso {
        GSO_NONE => true,
        GSO_TCPV4 => acked & features::GUEST_TSO4 != 0,
        GSO_TCPV6 => acked & features::GUEST_TSO6 != 0,
        _ => false,
    };
    if !allowed {
        return Err("segmentation type the guest did not accept");
    }
    if acked & features::GUEST_CSUM == 0 {
        if hdr[HDR_FLAGS] & NEEDS_CSUM != 0 {
            return Err("partial checksum the guest did not accept");
        }
        hdr[HDR_FLAGS] = 0;
    } else {
        hdr[HDR_FLAGS] &= NEEDS_CSUM | DATA_VALID;
    }
    hdr[HDR_NUM_BUFFERS..VNET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());
    Ok(())
}

/// Bytes a receive chain can take: its device-writable descriptors, as long as
/// every one lies in guest memory (a chain with one that does not takes
/// nothing). Walks descriptors only; nothing is allocated per chain.
fn writable_room(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> usize {
    let mut room = 0usize;
    for desc in chain.writable() {
        if !GuestMemoryBackend::check_range(mem, desc.addr(), desc.len() as usize) {
            return 0;
        }
        room = room.saturating_add(desc.len() as usize);
    }
    room
}

/// Copy `data` into a receive chain's device-writable descriptors, in order;
/// returns the bytes written (fewer when the chain is shorter or leaves memory).
fn fill_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    data: &[u8],
) -> usize {
    let mut written = 0usize;
    for desc in chain.writable() {
        let rest = data.get(written..).unwrap_or_default();
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(desc.len() as usize);
        if mem.write_slice(&rest[..n], desc.addr()).is_err() {
            break;
        }
        written += n;
    }
    written
}

/// What the receive queue can do with a frame of some length.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum RxPlan {
    /// The next `n` chains hold it.
    Fits(usize),
    /// Not enough buffers yet; the queue's notification is armed.
    Wait,
    /// It can never fit (one too-small buffer without mergeable buffers, or a
    /// ring full of buffers that together are too small).
    NeverFits,
    /// The ring is inconsistent.
    Broken,
}

/// Look at the available chains, without consuming them, for room for `need`
/// bytes. When the ring runs dry, notifications are armed with the queue's
/// position at its end, so the guest's next buffer notifies us.
pub(super) fn plan_rx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    need: usize,
    mergeable: bool,
) -> RxPlan {
    let start = queue.next_avail();
    let max_chains = if mergeable {
        usize::from(queue.size())
    } else {
        1
    };
    let mut have = 0usize;
    let mut chains = 0usize;
    let mut rearmed = false;
    let plan = loop {
        match queue.pop_descriptor_chain(mem) {
            Some(chain) => {
                rearmed = false;
                chains += 1;
                have = have.saturating_add(writable_room(mem, chain));
                if have >= need {
                    break RxPlan::Fits(chains);
                }
                if chains >= max_chains {
                    break RxPlan::NeverFits;
                }
            }
            // The index said more were there, but none could be read.
            None if rearmed => break RxPlan::Broken,
            None => match queue.enable_notification(mem) {
                Ok(true) => rearmed = true,
                Ok(false) => break RxPlan::Wait,
                Err(_) => break RxPlan::Broken,
            },
        }
    };
    queue.set_next_avail(start);
    plan
}

/// Why a transmitted frame did not reach the TAP.
#[derive(Debug)]
pub enum TxError {
    /// The guest's chain or header is wrong.
    Dropped(&'static str),
    /// The TAP refused it.
    Tap(std::io::Error),
}

/// Where [`transmit`] writes a checked frame (net header first): the TAP, or
/// a stand-in in fuzz targets, which cannot open a TAP.
pub trait FrameSink {
    /// Write one frame.
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize>;
    /// Write one frame gathered from `iovs`, each of which points to memory
    /// readable for the duration of the call.
    fn write_frame_vectored(&self, iovs: &[libc::iovec]) -> std::io::Result<usize>;
}

impl FrameSink for Tap {
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        Tap::write_frame(self, frame)
    }

    fn write_frame_vectored(&self, iovs: &[libc::iovec]) -> std::io::Result<usize> {
        Tap::write_frame_vectored(self, iovs)
    }
}

/// Send one transmit chain to the TAP. The header is copied out and checked
/// (so the guest cannot change it after the check); the frame behind it goes
/// to the TAP straight from guest memory (`writev`), or through `buf` when the
/// chain has more than [`TX_MAX_SEGMENTS`] pieces. `buf` must hold
/// [`TX_BUFFER_LEN`] bytes.
pub fn transmit(
    tap: &impl FrameSink,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    acked: u64,
    buf: &mut [u8],
) -> Result<(), TxError> {
    const EMPTY: libc::iovec = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    // Slot 0 is the header's checked copy; the frame follows from guest memory.
    let mut iovs = [EMPTY; TX_MAX_SEGMENTS + 1];
    let mut used = 1usize;
    let mut hdr = [0u8; VNET_HDR_LEN];
    let mut hdr_got = 0usize;
    let mut total = 0usize;
    let mut fragmented = false;
    for desc in chain.clone().readable() {
        let len = desc.len() as usize;
        total = total
            .checked_add(len)
            .filter(|t| *t <= TX_BUFFER_LEN)
            .ok_or(TxError::Dropped("longer than 64 KiB plus header"))?;
        for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), len) {
            let slice = slice.map_err(|_| TxError::Dropped("outside guest memory"))?;
            let skip = if hdr_got < hdr.len() {
                let n = slice.copy_to(&mut hdr[hdr_got..]);
                hdr_got += n;
                n
            } else {
                0
            };
            if slice.len() <= skip {
                continue;
            }
            match iovs.get_mut(used) {
                Some(iov) => {
                    // The pointer stays valid after the guard goes: it points
                    // into the guest RAM mapping, which `mem` keeps mapped for
                    // this whole call (the guard only matters for Xen grants).
                    let base = slice.ptr_guard().as_ptr();
                    *iov = libc::iovec {
                        // `skip < slice.len()`: the offset stays inside the slice.
                        iov_base: base.wrapping_add(skip).cast_mut().cast(),
                        iov_len: slice.len() - skip,
                    };
                    used += 1;
                }
                None => fragmented = true,
            }
        }
    }
    if total <= VNET_HDR_LEN {
        return Err(TxError::Dropped("shorter than the net header"));
    }
    if fragmented {
        // Too fragmented to hand over piecewise: copy it.
        let frame = buf
            .get_mut(..total)
            .ok_or(TxError::Dropped("longer than 64 KiB plus header"))?;
        let mut r = chain
            .reader(mem)
            .map_err(|_| TxError::Dropped("malformed chain"))?;
        r.read_exact(frame)
            .map_err(|_| TxError::Dropped("unreadable"))?;
        check_tx_header(frame, acked).map_err(TxError::Dropped)?;
        return tap.write_frame(frame).map(drop).map_err(TxError::Tap);
    }
    check_tx_header(&hdr, acked).map_err(TxError::Dropped)?;
    iovs[0] = libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    };
    tap.write_frame_vectored(&iovs[..used])
        .map(drop)
        .map_err(TxError::Tap)
}

/// What one receive step left to do.
enum RxStep {
    /// Go on with the next frame.
    Next,
    /// The TAP is empty (it stays watched).
    Drained,
    /// Stop receiving and take the TAP out of the epoll set: no buffers, no
    /// activation, or a broken ring.
    Stop,
}

struct Active {
    mem: GuestMem,
    interrupt: Arc<Interrupt>,
    acked: u64,
    rx: Queue,
    tx: Queue,
    /// The transmit queue's notification eventfd: written to come back later.
    tx_kick: EventFd,
    rx_broken: bool,
    tx_broken: bool,
}

/// The userspace data path's state.
pub(super) struct Userspace {
    tap: Arc<Tap>,
    active: Option<Active>,
    /// Whether the TAP is in the epoll set.
    tap_watched: bool,
    /// The frame read from the TAP and not delivered yet: `rx_buf[..rx_len]`.
    rx_buf: Vec<u8>,
    rx_len: usize,
    tx_buf: Vec<u8>,
    bad_tx: Throttle,
    bad_rx: Throttle,
    tap_io: Throttle,
    rx_ring: Throttle,
    tx_ring: Throttle,
}

impl Userspace {
    pub(super) fn new(tap: Arc<Tap>) -> Self {
        Self {
            tap,
            active: None,
            tap_watched: false,
            rx_buf: vec![0; RX_BUFFER_LEN],
            rx_len: 0,
            tx_buf: vec![0; TX_BUFFER_LEN],
            bad_tx: Throttle::default(),
            bad_rx: Throttle::default(),
            tap_io: Throttle::default(),
            rx_ring: Throttle::default(),
            tx_ring: Throttle::default(),
        }
    }

    pub(super) fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    pub(super) fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let mut queues = activation.queues.into_iter();
        let mut kicks = activation.queue_events.into_iter();
        let (Some(rx), Some(tx), Some(rx_kick), Some(tx_kick)) =
            (queues.next(), queues.next(), kicks.next(), kicks.next())
        else {
            return Err(ActivateError::Backend(
                "virtio-net needs a receive and a transmit queue".into(),
            ));
        };
        // Notifications stay armed while idle; the event loop arms and disarms
        // the TAP, so it must run once: kicking the receive queue does that
        // (activation runs on a vCPU thread, which cannot touch the epoll set).
        if let Err(e) = rx_kick.write(1) {
            return Err(ActivateError::Backend(format!(
                "cannot schedule the first receive pass: {e}"
            )));
        }
        self.rx_len = 0;
        self.active = Some(Active {
            mem: activation.mem,
            interrupt: activation.interrupt,
            acked: activation.acked_features,
            rx,
            tx,
            tx_kick,
            rx_broken: false,
            tx_broken: false,
        });
        Ok(())
    }

    pub(super) fn reset(&mut self) {
        // A frame read for the old queues is dropped with them (a link reset).
        self.active = None;
        self.rx_len = 0;
    }

    pub(super) fn init_events(&mut self, ops: &mut EventOps) {
        self.watch_tap(ops);
    }

    fn watch_tap(&mut self, ops: &mut EventOps) {
        if self.tap_watched {
            return;
        }
        match ops.add(Events::with_data(&*self.tap, TAP_TOKEN, EventSet::IN)) {
            Ok(()) => self.tap_watched = true,
            Err(e) => {
                if let Some(suppressed) = self.tap_io.allow() {
                    tracing::error!(
                        tap = self.tap.name(),
                        suppressed,
                        "virtio-net: cannot watch the TAP: {e:?}"
                    );
                }
            }
        }
    }

    fn unwatch_tap(&mut self, ops: &mut EventOps) {
        if !self.tap_watched {
            return;
        }
        if let Err(e) = ops.remove(Events::with_data(&*self.tap, TAP_TOKEN, EventSet::IN)) {
            tracing::debug!(
                tap = self.tap.name(),
                "virtio-net: unwatching the TAP: {e:?}"
            );
        }
        self.tap_watched = false;
    }

    pub(super) fn queue_notified(&mut self, index: usize, ops: &mut EventOps) {
        match index {
            RX_QUEUE => {
                // New receive buffers (or activation): the TAP may be drained again.
                self.watch_tap(ops);
                self.process_rx(ops);
            }
            TX_QUEUE => self.process_tx(),
            _ => {}
        }
    }

    pub(super) fn handle_event(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() != TAP_TOKEN {
            return;
        }
        if self.active.is_none() {
            // Nobody to deliver to: frames wait in the TAP's queue (and overflow
            // there) until the driver activates the device.
            self.unwatch_tap(ops);
            return;
        }
        self.process_rx(ops);
    }

    fn process_rx(&mut self, ops: &mut EventOps) {
        for _ in 0..RX_FRAMES_PER_TURN {
            match self.rx_step() {
                RxStep::Next => {}
                RxStep::Drained => return,
                RxStep::Stop => {
                    self.unwatch_tap(ops);
                    return;
                }
            }
        }
        // Budget spent: the TAP stays watched (level-triggered), so the loop
        // comes back after serving everything else that is ready.
    }

    /// Move (or drop) one frame.
    fn rx_step(&mut self) -> RxStep {
        let Some(active) = self.active.as_mut() else {
            return RxStep::Stop;
        };
        if active.rx_broken {
            return RxStep::Stop;
        }
        if self.rx_len == 0 {
            match self.tap.read_frame(&mut self.rx_buf) {
                Ok(n) if n <= VNET_HDR_LEN || n >= self.rx_buf.len() => {
                    if let Some(suppressed) = self.bad_rx.allow() {
                        tracing::warn!(
                            tap = self.tap.name(),
                            len = n,
                            suppressed,
                            "virtio-net: frame of impossible size from the TAP dropped"
                        );
                    }
                    return RxStep::Next;
                }
                Ok(n) => self.rx_len = n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return RxStep::Drained,
                Err(e) if e.kind() == ErrorKind::Interrupted => return RxStep::Next,
                Err(e) => {
                    // E.g. the TAP was deleted under us: its fd stays "ready"
                    // with an error, so it must leave the epoll set or the loop
                    // would spin. The guest's next receive buffers try again.
                    if let Some(suppressed) = self.tap_io.allow() {
                        tracing::warn!(
                            tap = self.tap.name(),
                            suppressed,
                            "virtio-net: reading the TAP failed: {e}; receiving paused"
                        );
                    }
                    return RxStep::Stop;
                }
            }
        }
        let mem = active.mem.memory();
        let mergeable = active.acked & features::MRG_RXBUF != 0;
        match plan_rx(&mut active.rx, &mem, self.rx_len, mergeable) {
            RxPlan::Fits(chains) => {
                let frame = &mut self.rx_buf[..self.rx_len];
                self.rx_len = 0;
                let num_buffers = u16::try_from(chains).unwrap_or(u16::MAX);
                if let Err(why) = fix_rx_header(frame, active.acked, num_buffers) {
                    if let Some(suppressed) = self.bad_rx.allow() {
                        tracing::warn!(
                            tap = self.tap.name(),
                            suppressed,
                            "virtio-net: received frame dropped: {why}"
                        );
                    }
                    return RxStep::Next;
                }
                let frame: &[u8] = frame;
                let mut offset = 0usize;
                let bad_rx = &mut self.bad_rx;
                let served = serve_queue(
                    &mut active.rx,
                    &*mem,
                    chains,
                    &active.interrupt,
                    &mut self.rx_ring,
                    |chain| {
                        let rest = frame.get(offset..).unwrap_or_default();
                        let written = fill_chain(&mem, chain, rest);
                        offset += written;
                        if written == 0 {
                            if let Some(suppressed) = bad_rx.allow() {
                                tracing::warn!(
                                    suppressed,
                                    "virtio-net: unusable receive buffer returned empty"
                                );
                            }
                        }
                        ChainOutcome::Used(u32::try_from(written).unwrap_or(0))
                    },
                );
                if offset < frame.len() {
                    // The guest changed its buffers between the look and the copy.
                    if let Some(suppressed) = self.bad_rx.allow() {
                        tracing::warn!(
                            tap = self.tap.name(),
                            suppressed,
                            "virtio-net: receive buffers shrank while a frame was copied; it arrived cut"
                        );
                    }
                }
                active.rx_broken = served.broken;
                RxStep::Next
            }
            // The frame stays; the guest's next buffer brings the TAP back.
            RxPlan::Wait => RxStep::Stop,
            RxPlan::NeverFits => {
                self.rx_len = 0;
                if let Some(suppressed) = self.bad_rx.allow() {
                    tracing::warn!(
                        tap = self.tap.name(),
                        suppressed,
                        "virtio-net: received frame does not fit the guest's receive buffers; dropped"
                    );
                }
                RxStep::Next
            }
            RxPlan::Broken => {
                if let Some(suppressed) = self.rx_ring.allow() {
                    tracing::warn!(
                        tap = self.tap.name(),
                        suppressed,
                        "virtio-net: the receive ring is inconsistent; receiving stops until the driver resets the device"
                    );
                }
                active.rx_broken = true;
                RxStep::Stop
            }
        }
    }

    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.tx_broken {
            return;
        }
        let mem = active.mem.memory();
        let acked = active.acked;
        let tap = &self.tap;
        let buf = &mut self.tx_buf;
        let bad_tx = &mut self.bad_tx;
        let tap_io = &mut self.tap_io;
        let budget = usize::from(active.tx.size());
        let served = serve_queue(
            &mut active.tx,
            &*mem,
            budget,
            &active.interrupt,
            &mut self.tx_ring,
            |chain| {
                match transmit(&**tap, &mem, chain, acked, buf) {
                    Ok(()) => {}
                    Err(TxError::Dropped(why)) => {
                        if let Some(suppressed) = bad_tx.allow() {
                            tracing::warn!(
                                tap = tap.name(),
                                suppressed,
                                "virtio-net: transmitted frame dropped: {why}"
                            );
                        }
                    }
                    Err(TxError::Tap(e)) => {
                        if let Some(suppressed) = tap_io.allow() {
                            tracing::warn!(
                                tap = tap.name(),
                                suppressed,
                                "virtio-net: writing a frame to the TAP failed: {e}; dropped"
                            );
                        }
                    }
                }
                ChainOutcome::Used(0)
            },
        );
        if served.more_pending {
            // Let other devices run, then continue.
            let _ = active.tx_kick.write(1);
        }
        active.tx_broken = served.broken;
    }
}
