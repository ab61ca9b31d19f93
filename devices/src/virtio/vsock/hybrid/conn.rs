//! One stream connection of the hybrid backend: the host unix stream, the
//! connection state machine (virtio 1.2, 5.10.6.6) and credit-based flow
//! control in both directions.
//!
//! Credit, guest → host: we advertise [`CONN_BUF_ALLOC`] bytes; data the host
//! socket does not take at once waits in a buffer that can never exceed it (a
//! guest that sends beyond its credit is reset). Credit, host → guest: the host
//! socket is read only as far as the guest's advertised free space allows, so a
//! guest that stops reading stops us reading, instead of making us buffer.
//!
//! A connection never registers itself anywhere: it says which readiness it
//! wants ([`Connection::desired_interest`]) and the device keeps the event loop
//! in step. Nothing here blocks (the stream is non-blocking) or panics on what
//! the guest or the host program sends.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use event_manager::EventSet;

use super::super::packet::{
    Header, Op, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer we advertise per connection (what a guest may have in flight
/// to us, and the most we ever buffer for a host program that reads slowly).
pub const CONN_BUF_ALLOC: u32 = 256 << 10;
/// Tell the guest about freed space once this much was forwarded since the
/// last header it saw.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A host program connected and sent `CONNECT`; we asked the guest
    /// (REQUEST) and wait for its RESPONSE until `deadline`.
    LocalInit { deadline: Instant },
    /// Data flows.
    Established,
}

/// Packets a connection owes the guest, besides data.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Owed {
    request: bool,
    response: bool,
    credit_update: bool,
    /// SHUTDOWN flags to send (host EOF).
    shutdown: u32,
    rst: bool,
}

/// What to do with a connection after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Send RST to the guest, then forget the connection.
    Reset,
    /// Forget it without telling the guest (it reset, or never knew).
    Drop,
}

/// Why a guest packet broke the protocol on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("the guest sent {len} bytes with only {free} bytes of credit")]
    CreditExceeded { len: u32, free: u32 },
    #[error("the guest sent {0:?} in state {1:?}")]
    Unexpected(Op, State),
    #[error("the guest sent data after announcing it would send no more")]
    DataAfterShutdown,
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    pub stream: UnixStream,
    /// The host side's port (the guest's `dst_port` on its packets).
    pub local_port: u32,
    /// The guest side's port.
    pub peer_port: u32,
    pub state: State,
    guest_cid: u64,
    // Host → guest credit: what the guest told us, and what we sent.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
    // Guest → host: what arrived, what reached the host socket, what the
    // guest last heard of it.
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Guest data the host socket has not taken yet (at most CONN_BUF_ALLOC).
    pending: VecDeque<u8>,
    owed: Owed,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// We shut the host socket's write side (after the guest's SHUTDOWN SEND).
    host_write_shut: bool,
    /// The host program will send no more (read gave EOF).
    host_eof: bool,
    /// The host socket hung up: epoll reports it forever, so it leaves epoll.
    hung_up: bool,
    /// The host socket was readable and has not been drained yet.
    pub rx_ready: bool,
    /// Whether the device lists it for RX work.
    pub in_rx_list: bool,
    /// What the event loop watches for it now (None: not registered).
    pub registered: Option<EventSet>,
}

impl Connection {
    fn new(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        state: State,
    ) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            guest_cid,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            pending: VecDeque::new(),
            owed: Owed::default(),
            peer_shutdown: 0,
            host_write_shut: false,
            host_eof: false,
            hung_up: false,
            rx_ready: false,
            in_rx_list: false,
            registered: None,
        }
    }

    /// A connection the host opened (`CONNECT peer_port`): owes the guest a REQUEST.
    pub fn host_initiated(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        deadline: Instant,
    ) -> Self {
        let mut c = Self::new(
            stream,
            local_port,
            peer_port,
            guest_cid,
            State::LocalInit { deadline },
        );
        c.owed.request = true;
        c
    }

    /// A connection the guest opened (REQUEST from `hdr`), already connected
    /// on the host: owes the guest a RESPONSE.
    pub fn guest_initiated(stream: UnixStream, hdr: &Header, guest_cid: u64) -> Self {
        let mut c = Self::new(
            stream,
            hdr.dst_port,
            hdr.src_port,
            guest_cid,
            State::Established,
        );
        c.update_peer_credit(hdr);
        c.owed.response = true;
        c
    }

    /// Take the credit fields of any guest packet.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes the guest can still take (0 when it claims nonsense).
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes of our advertised buffer the guest may still fill.
    pub fn our_free(&self) -> u32 {
        let held = (self.rx_cnt - self.fwd_cnt).0;
        CONN_BUF_ALLOC.saturating_sub(held)
    }

    /// Guest data waiting for the host socket.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn may_read_host(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && !self.owed.rst
    }

    /// Whether there is anything to put on the RX queue for it now.
    pub fn has_rx_work(&self) -> bool {
        let o = self.owed;
        o.rst
            || o.request
            || o.response
            || o.shutdown != 0
            || o.credit_update
            || (self.rx_ready && self.may_read_host() && self.peer_free() > 0)
    }

    /// What the event loop should watch: read readiness only while we may
    /// deliver to the guest, write readiness only while data waits. `None`:
    /// the socket must leave epoll (it hung up and would be reported forever).
    pub fn desired_interest(&self) -> Option<EventSet> {
        if self.hung_up {
            return None;
        }
        let mut set = EventSet::empty();
        if self.may_read_host() && !self.rx_ready && self.peer_free() > 0 {
            set |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        if !self.pending.is_empty() {
            set |= EventSet::OUT;
        }
        Some(set)
    }

    /// The host socket reported `events`.
    pub fn host_ready(&mut self, events: EventSet) -> Verdict {
        if events.contains(EventSet::ERROR) {
            return Verdict::Reset;
        }
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            self.rx_ready = true;
        }
        if events.contains(EventSet::HANG_UP) {
            self.hung_up = true;
        }
        if events.contains(EventSet::OUT) || (self.hung_up && !self.pending.is_empty()) {
            return self.flush();
        }
        self.after_progress()
    }

    /// A packet header for this connection.
    fn header(&mut self, op: Op, len: u32, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest that fits `room` payload bytes: control
    /// packets first, then data read from the host socket into `scratch`.
    /// Returns the header and how many bytes of `scratch` are its payload.
    pub fn next_rx(&mut self, room: usize, scratch: &mut [u8]) -> Option<(Header, usize)> {
        if self.owed.rst {
            self.owed = Owed::default();
            return Some((self.header(Op::Rst, 0, 0), 0));
        }
        if self.owed.request {
            self.owed.request = false;
            return Some((self.header(Op::Request, 0, 0), 0));
        }
        if self.owed.response {
            self.owed.response = false;
            return Some((self.header(Op::Response, 0, 0), 0));
        }
        if self.rx_ready && self.may_read_host() {
            let credit = self.peer_free() as usize;
            let want = room
                .min(credit)
                .min(scratch.len())
                .min(MAX_PAYLOAD as usize);
            if want > 0 {
                if let Some(buf) = scratch.get_mut(..want) {
                    match self.stream.read(buf) {
                        Ok(0) => {
                            self.host_eof = true;
                            self.rx_ready = false;
                            self.owed.shutdown |= SHUTDOWN_SEND;
                            if self.hung_up {
                                self.owed.shutdown |= SHUTDOWN_RCV;
                            }
                        }
                        Ok(n) => {
                            self.tx_cnt += Wrapping(n as u32);
                            self.owed.credit_update = false;
                            return Some((self.header(Op::Rw, n as u32, 0), n));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => self.rx_ready = false,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => {
                            self.owed = Owed::default();
                            self.owed.rst = true;
                            return self.next_rx(room, scratch);
                        }
                    }
                }
            }
        }
        if self.owed.shutdown != 0 {
            let flags = std::mem::take(&mut self.owed.shutdown);
            return Some((self.header(Op::Shutdown, 0, flags), 0));
        }
        if self.owed.credit_update {
            self.owed.credit_update = false;
            return Some((self.header(Op::CreditUpdate, 0, 0), 0));
        }
        None
    }

    /// Whether the last packet produced by [`Self::next_rx`] was a RST (the
    /// connection is then done).
    pub fn reset_sent(hdr: &Header) -> bool {
        hdr.op == Op::Rst as u16
    }

    /// A control packet from the guest (not RW).
    pub fn guest_control(&mut self, op: Op, hdr: &Header) -> Result<Verdict, ProtocolError> {
        self.update_peer_credit(hdr);
        match (op, self.state) {
            (Op::Rst, _) => Ok(Verdict::Drop),
            (Op::Response, State::LocalInit { .. }) => {
                self.state = State::Established;
                Ok(Verdict::Keep)
            }
            (Op::CreditUpdate, State::Established) => Ok(self.after_progress()),
            (Op::CreditRequest, State::Established) => {
                self.owed.credit_update = true;
                Ok(Verdict::Keep)
            }
            (Op::Shutdown, State::Established) => {
                self.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                Ok(self.after_progress())
            }
            (op, state) => Err(ProtocolError::Unexpected(op, state)),
        }
    }

    /// Data from the guest: forward what the host socket takes, keep the rest.
    pub fn guest_data(&mut self, hdr: &Header, payload: &[u8]) -> Result<Verdict, ProtocolError> {
        self.update_peer_credit(hdr);
        if self.state != State::Established {
            return Err(ProtocolError::Unexpected(Op::Rw, self.state));
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return Err(ProtocolError::DataAfterShutdown);
        }
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let free = self.our_free();
        if len > free {
            return Err(ProtocolError::CreditExceeded { len, free });
        }
        self.rx_cnt += Wrapping(len);
        if self.host_write_shut {
            // The host side is closed for writing: count it as delivered.
            self.fwd_cnt += Wrapping(len);
            return Ok(Verdict::Keep);
        }
        let mut rest = payload;
        if self.pending.is_empty() {
            match self.write_host(rest) {
                Ok(n) => rest = rest.get(n..).unwrap_or_default(),
                Err(_) => return Ok(Verdict::Reset),
            }
        }
        self.pending.extend(rest);
        Ok(self.after_progress())
    }

    fn write_host(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let done = write_nonblocking(&mut self.stream, data)?;
        self.fwd_cnt += Wrapping(done as u32);
        Ok(done)
    }

    /// Write buffered guest data to the host socket.
    pub fn flush(&mut self) -> Verdict {
        if !self.pending.is_empty() {
            let data = self.pending.make_contiguous();
            match write_nonblocking(&mut self.stream, data) {
                Ok(n) => {
                    self.fwd_cnt += Wrapping(n as u32);
                    self.pending.drain(..n.min(self.pending.len()));
                }
                Err(_) => return Verdict::Reset,
            }
        }
        self.after_progress()
    }

    /// Shutdowns and credit after data moved (or a packet was sent): whether
    /// the connection is finished, and whether the guest should hear of freed
    /// space.
    pub fn after_progress(&mut self) -> Verdict {
        if self.state != State::Established {
            return Verdict::Keep;
        }
        let flushed = self.pending.is_empty();
        if flushed && self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        let guest_done = self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND;
        let both_done =
            self.peer_shutdown & SHUTDOWN_SEND != 0 && self.host_eof && self.owed.shutdown == 0;
        if flushed && (guest_done || both_done) {
            return Verdict::Reset;
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.owed.credit_update = true;
        }
        Verdict::Keep
    }

    /// Tell the host program the guest accepted: `OK <local_port>\n`. False
    /// when the socket did not take the whole line at once (the program is
    /// gone or misbehaves; the connection is then reset).
    pub fn send_ok_line(&mut self) -> bool {
        let line = format!("OK {}\n", self.local_port);
        matches!(write_nonblocking(&mut self.stream, line.as_bytes()), Ok(n) if n == line.len())
    }

    /// Whether it owes the guest a RST (and ends once that is sent).
    pub fn resetting(&self) -> bool {
        self.owed.rst
    }

    /// Mark the connection to be reset: the next RX packet is its RST.
    pub fn owe_rst(&mut self) {
        self.owed = Owed::default();
        self.owed.rst = true;
    }
}

/// Write as much of `data` as `stream` takes now. `send(2)` with
/// `MSG_NOSIGNAL`: a host program that went away is an error here, never a
/// SIGPIPE for the whole process (whatever its signal dispositions).
fn write_nonblocking(stream: &mut UnixStream, data: &[u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        let Some(rest) = data.get(done..) else { break };
        // SAFETY: `rest` is a valid buffer of `rest.len()` bytes; the fd is
        // the stream's open socket.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                ErrorKind::WouldBlock => break,
                ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    Ok(done)
}
