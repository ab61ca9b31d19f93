//! The hybrid backend's connection table: every host socket of the device
//! (connections and handshakes), what the guest is owed (RSTs, round-robin
//! RX work), and keeping the event loop's registrations in step with what
//! each socket should be watched for. Sockets leave the event loop before they
//! are closed. It never touches the virtqueues (the device does) and never
//! blocks.

use std::collections::{HashMap, VecDeque};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Instant;

use event_manager::{EventOps, Events};

use super::conn::{Connection, State, Verdict};
use super::host::{self, PendingHandshake};
use super::{
    CONNECT_TIMEOUT, FIRST_LOCAL_PORT, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS, MAX_CONTROL,
    TOKEN_FIRST_SOCKET,
};
use crate::throttle::Throttle;
use crate::virtio::vsock::packet::{Header, HeaderError, Op, HOST_CID, MAX_PAYLOAD, TYPE_STREAM};

/// A socket on its way out: removed from the event loop, then closed.
pub(super) struct Doomed {
    stream: UnixStream,
    registered: bool,
}

/// Every host socket of the device and what the guest is owed.
pub(super) struct Muxer {
    pub(super) guest_cid: u64,
    pub(super) uds_path: PathBuf,
    pub(super) conns: HashMap<u32, Connection>,
    pub(super) by_ports: HashMap<(u32, u32), u32>,
    pub(super) handshakes: HashMap<u32, (PendingHandshake, Instant)>,
    /// RSTs for packets that belong to no connection.
    pub(super) control: VecDeque<Header>,
    /// Connections with something for the RX queue, served round robin.
    pub(super) rx_list: VecDeque<u32>,
    pub(super) doomed: Vec<Doomed>,
    pub(super) next_token: u32,
    pub(super) next_local_port: u32,
    /// Host bytes on their way to the guest.
    pub(super) scratch: Vec<u8>,
    pub(super) protocol_log: Throttle,
    pub(super) host_log: Throttle,
}

impl Muxer {
    pub(super) fn new(guest_cid: u64, uds_path: PathBuf) -> Self {
        Self {
            guest_cid,
            uds_path,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            handshakes: HashMap::new(),
            control: VecDeque::new(),
            rx_list: VecDeque::new(),
            doomed: Vec::new(),
            next_token: TOKEN_FIRST_SOCKET,
            next_local_port: FIRST_LOCAL_PORT,
            scratch: vec![0; MAX_PAYLOAD as usize],
            protocol_log: Throttle::default(),
            host_log: Throttle::default(),
        }
    }

    pub(super) fn sockets(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    pub(super) fn alloc_token(&mut self) -> u32 {
        loop {
            let t = self.next_token;
            self.next_token = self.next_token.checked_add(1).unwrap_or(TOKEN_FIRST_SOCKET);
            if !self.conns.contains_key(&t) && !self.handshakes.contains_key(&t) {
                return t;
            }
        }
    }

    pub(super) fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = match self.next_local_port.checked_add(1) {
                Some(n) if n < u32::MAX => n,
                _ => FIRST_LOCAL_PORT,
            };
            if !self.by_ports.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    /// List `token` for RX work if it has some.
    pub(super) fn schedule(&mut self, token: u32) {
        if let Some(c) = self.conns.get_mut(&token) {
            if !c.in_rx_list && c.has_rx_work() {
                c.in_rx_list = true;
                self.rx_list.push_back(token);
            }
        }
    }

    /// Forget a connection; its socket leaves the event loop on the next sync.
    pub(super) fn forget(&mut self, token: u32) {
        if let Some(c) = self.conns.remove(&token) {
            self.by_ports.remove(&(c.local_port, c.peer_port));
            tracing::debug!(
                local_port = c.local_port,
                peer_port = c.peer_port,
                "vsock: connection closed"
            );
            self.doomed.push(Doomed {
                registered: c.registered.is_some(),
                stream: c.stream,
            });
        }
    }

    pub(super) fn drop_handshake(&mut self, token: u32) {
        if let Some((h, _)) = self.handshakes.remove(&token) {
            self.doomed.push(Doomed {
                stream: h.stream,
                registered: true,
            });
        }
    }

    /// Drop everything (device reset); returns whether any connection existed.
    pub(super) fn clear(&mut self) -> bool {
        let had = !self.conns.is_empty();
        let tokens: Vec<u32> = self.conns.keys().copied().collect();
        for t in tokens {
            self.forget(t);
        }
        let tokens: Vec<u32> = self.handshakes.keys().copied().collect();
        for t in tokens {
            self.drop_handshake(t);
        }
        self.control.clear();
        self.rx_list.clear();
        had
    }

    pub(super) fn apply(&mut self, token: u32, verdict: Verdict) {
        match verdict {
            Verdict::Keep => self.schedule(token),
            Verdict::Reset => {
                if let Some(c) = self.conns.get_mut(&token) {
                    c.owe_rst();
                }
                self.schedule(token);
            }
            Verdict::Drop => self.forget(token),
        }
    }

    /// A RST answering `h` (a packet that belongs to no connection).
    pub(super) fn push_rst(&mut self, h: &Header) {
        if self.control.len() >= MAX_CONTROL {
            return;
        }
        self.control.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            len: 0,
            type_: h.type_,
            op: Op::Rst as u16,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// A packet header the parser refused.
    pub(super) fn bad_packet(&mut self, raw: &Header, e: HeaderError) {
        if let Some(suppressed) = self.protocol_log.allow() {
            tracing::warn!(suppressed, "vsock: guest packet refused: {e}");
        }
        match e {
            // A socket type or op we do not serve: refuse it the normal way.
            HeaderError::UnsupportedType(_) | HeaderError::UnknownOp(_)
                if raw.op != Op::Rst as u16 =>
            {
                let known = self.by_ports.get(&(raw.dst_port, raw.src_port)).copied();
                match known {
                    Some(t) => self.apply(t, Verdict::Reset),
                    None => self.push_rst(raw),
                }
            }
            // Lengths that lie about the buffers on a live connection end it.
            HeaderError::TooLong { .. }
            | HeaderError::Truncated { .. }
            | HeaderError::PayloadOnControl { .. } => {
                if let Some(t) = self.by_ports.get(&(raw.dst_port, raw.src_port)).copied() {
                    self.apply(t, Verdict::Reset);
                }
            }
            _ => {}
        }
    }

    /// A checked packet from the guest.
    pub(super) fn guest_packet(&mut self, op: Op, h: &Header, payload: &[u8]) {
        let Some(token) = self.by_ports.get(&(h.dst_port, h.src_port)).copied() else {
            match op {
                Op::Request => self.guest_connect(h),
                Op::Rst => {}
                _ => self.push_rst(h),
            }
            return;
        };
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let was_local_init = matches!(conn.state, State::LocalInit { .. });
        let result = match op {
            Op::Request => Ok(Verdict::Reset),
            Op::Rw => conn.guest_data(h, payload),
            op => conn.guest_control(op, h),
        };
        let verdict = match result {
            Ok(v) => v,
            Err(e) => {
                if let Some(suppressed) = self.protocol_log.allow() {
                    tracing::warn!(
                        suppressed,
                        local_port = h.dst_port,
                        peer_port = h.src_port,
                        "vsock: connection reset: {e}"
                    );
                }
                Verdict::Reset
            }
        };
        if verdict == Verdict::Keep && was_local_init && conn.state == State::Established {
            if conn.send_ok_line() {
                tracing::debug!(
                    local_port = conn.local_port,
                    peer_port = conn.peer_port,
                    "vsock: guest accepted a host connection"
                );
            } else {
                self.apply(token, Verdict::Reset);
                return;
            }
        }
        self.apply(token, verdict);
    }

    /// The guest asks for host port `h.dst_port`.
    pub(super) fn guest_connect(&mut self, h: &Header) {
        if self.sockets() >= MAX_CONNECTIONS {
            if let Some(suppressed) = self.host_log.allow() {
                tracing::warn!(
                    suppressed,
                    "vsock: {MAX_CONNECTIONS} connections open; refusing the guest's request for port {}",
                    h.dst_port
                );
            }
            self.push_rst(h);
            return;
        }
        let path = host::port_socket_path(&self.uds_path, h.dst_port);
        match host::connect_nonblocking(&path) {
            Ok(stream) => {
                let token = self.alloc_token();
                let conn = Connection::guest_initiated(stream, h, self.guest_cid);
                self.by_ports.insert((h.dst_port, h.src_port), token);
                self.conns.insert(token, conn);
                self.schedule(token);
                tracing::debug!(port = h.dst_port, "vsock: guest connected to {path:?}");
            }
            Err(e) => {
                if let Some(suppressed) = self.host_log.allow() {
                    tracing::info!(
                        suppressed,
                        "vsock: guest connection to port {} refused: {path:?}: {e}",
                        h.dst_port
                    );
                }
                self.push_rst(h);
            }
        }
    }

    /// The next packet for an RX buffer with `room` payload bytes.
    pub(super) fn next_rx(&mut self, room: usize) -> Option<(Header, usize)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, 0));
        }
        for _ in 0..self.rx_list.len() {
            let token = self.rx_list.pop_front()?;
            let Some(conn) = self.conns.get_mut(&token) else {
                continue;
            };
            conn.in_rx_list = false;
            let Some((hdr, len)) = conn.next_rx(room, &mut self.scratch) else {
                continue;
            };
            if Connection::reset_sent(&hdr) {
                self.forget(token);
            } else {
                let verdict = conn.after_progress();
                self.apply(token, verdict);
            }
            return Some((hdr, len));
        }
        None
    }

    /// Drop handshakes and unanswered host connections past their deadline;
    /// returns whether any deadline is still pending.
    pub(super) fn expire(&mut self, now: Instant) -> bool {
        let late: Vec<u32> = self
            .handshakes
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            if let Some(suppressed) = self.host_log.allow() {
                tracing::warn!(
                    suppressed,
                    "vsock: a host connection sent no CONNECT line within {HANDSHAKE_TIMEOUT:?}; dropped"
                );
            }
            self.drop_handshake(t);
        }
        let late: Vec<(u32, Header)> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, State::LocalInit { deadline } if deadline <= now))
            .map(|(t, c)| {
                let h = Header {
                    src_cid: self.guest_cid,
                    dst_cid: HOST_CID,
                    src_port: c.peer_port,
                    dst_port: c.local_port,
                    type_: TYPE_STREAM,
                    ..Header::default()
                };
                (*t, h)
            })
            .collect();
        for (t, h) in late {
            if let Some(suppressed) = self.host_log.allow() {
                tracing::warn!(
                    suppressed,
                    port = h.src_port,
                    "vsock: the guest did not accept a host connection within {CONNECT_TIMEOUT:?}; closed"
                );
            }
            self.forget(t);
            self.push_rst(&h);
        }
        !self.handshakes.is_empty()
            || self
                .conns
                .values()
                .any(|c| matches!(c.state, State::LocalInit { .. }))
    }

    /// Bring the event loop in step: closed sockets out, interests updated.
    pub(super) fn sync(&mut self, ops: &mut EventOps) {
        for d in self.doomed.drain(..) {
            if d.registered {
                if let Err(e) = ops.remove(Events::empty(&d.stream)) {
                    tracing::debug!("vsock: removing a socket from the event loop: {e:?}");
                }
            }
        }
        let mut failed = Vec::new();
        for (token, c) in self.conns.iter_mut() {
            let desired = c.desired_interest();
            if desired == c.registered {
                continue;
            }
            let res = match (c.registered, desired) {
                (None, Some(set)) => ops.add(Events::with_data(&c.stream, *token, set)),
                (Some(_), Some(set)) => ops.modify(Events::with_data(&c.stream, *token, set)),
                (Some(_), None) => ops.remove(Events::empty(&c.stream)),
                (None, None) => Ok(()),
            };
            match res {
                Ok(()) => c.registered = desired,
                Err(e) => {
                    tracing::error!(
                        "vsock: cannot watch a connection's socket: {e:?}; resetting it"
                    );
                    failed.push(*token);
                }
            }
        }
        for t in failed {
            if let Some(c) = self.conns.get_mut(&t) {
                c.owe_rst();
            }
            self.schedule(t);
        }
    }
}
