//! The hybrid device against the miniature driver (guest side: real register
//! sequences, hand-made chains) and real unix sockets (host side), on a real
//! event loop.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use super::conn::{CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
use super::*;
use crate::virtio::testing::{DriverQueue, Harness};
use crate::virtio::vsock::packet::{
    Op, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_SEQPACKET, TYPE_STREAM,
};
use crate::virtio::VirtioSubscriber;

const CID: u64 = 3;
const QSIZE: u16 = 64;
const RX_BUF: u32 = 4096 + HEADER_LEN as u32;
const RX_BASE: u64 = 0x40_0000;
const TX_BASE: u64 = 0x80_0000;
const TX_SLOT: u64 = 0x1_1000;
const EV_BASE: u64 = 0xf0_0000;

struct Guest {
    h: Harness,
    dev: Arc<Mutex<HybridVsock>>,
    em: EventManager<Arc<Mutex<VirtioSubscriber>>>,
    rx: DriverQueue,
    tx: DriverQueue,
    ev: DriverQueue,
    rx_addr: HashMap<u32, u64>,
    rx_posted: u64,
    tx_next: u64,
    dir: tempfile::TempDir,
    /// What the guest advertises as its receive buffer.
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Guest {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = Arc::new(Mutex::new(
            HybridVsock::new(CID, &dir.path().join("v.sock")).expect("device"),
        ));
        let mut h = Harness::new(dev.clone(), 32);
        let rx = DriverQueue::new(0x10_0000, QSIZE);
        let tx = DriverQueue::new(0x20_0000, QSIZE);
        let ev = DriverQueue::new(0x30_0000, QSIZE);
        assert_eq!(h.bring_up(0, &[rx.clone(), tx.clone(), ev.clone()]), 0xf);
        let mut em = EventManager::new().expect("event manager");
        em.add_subscriber(Arc::new(Mutex::new(h.subscriber())));
        let mut g = Self {
            h,
            dev,
            em,
            rx,
            tx,
            ev,
            rx_addr: HashMap::new(),
            rx_posted: 0,
            tx_next: 0,
            dir,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        };
        g.turns(3);
        g
    }

    fn uds(&self) -> std::path::PathBuf {
        self.dir.path().join("v.sock")
    }

    /// Run the event loop until it is idle for a moment.
    fn turns(&mut self, n: usize) {
        for _ in 0..n {
            if self.em.run_with_timeout(20).expect("event loop") == 0 {
                break;
            }
        }
    }

    /// Until `cond` holds (failing after 10 s: a hang is a failure, not a timing).
    fn until(&mut self, what: &str, mut cond: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond(self) {
            assert!(Instant::now() < deadline, "never happened: {what}");
            let _ = self.em.run_with_timeout(20);
        }
    }

    fn post_rx(&mut self, n: usize) {
        self.post_rx_sized(n, RX_BUF);
    }

    fn post_rx_sized(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let addr = RX_BASE + (self.rx_posted % u64::from(QSIZE)) * 0x2000;
            self.rx_posted += 1;
            let head = self.rx.add_chain(&self.h.mem, &[(addr, size, true)]);
            self.rx_addr.insert(u32::from(head), addr);
        }
        let _ = self.h.queue_events[RX_QUEUE].write(1);
        self.turns(3);
    }

    fn header(&self, op: Op, src_port: u32, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Put raw bytes on the TX queue as one descriptor.
    fn send_raw(&mut self, bytes: &[u8]) {
        let addr = TX_BASE + (self.tx_next % u64::from(QSIZE)) * TX_SLOT;
        self.tx_next += 1;
        self.h
            .mem
            .memory()
            .write_slice(bytes, GuestAddress(addr))
            .expect("write packet");
        let len = u32::try_from(bytes.len()).expect("len");
        self.tx.add_chain(&self.h.mem, &[(addr, len, false)]);
        let _ = self.h.queue_events[TX_QUEUE].write(1);
        self.turns(3);
        let _ = self.tx.take_used(&self.h.mem);
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let mut b = hdr.encode().to_vec();
        b.extend_from_slice(payload);
        self.send_raw(&b);
    }

    /// Packets the device put in RX buffers.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        for (head, len) in self.rx.take_used(&self.h.mem) {
            let addr = self.rx_addr[&head];
            if len == 0 {
                // A buffer the device could not use, returned empty.
                out.push((Header::default(), Vec::new()));
                continue;
            }
            let mut b = vec![0u8; len as usize];
            self.h
                .mem
                .memory()
                .read_slice(&mut b, GuestAddress(addr))
                .expect("read rx");
            let hdr = Header::decode(&b).expect("device header");
            let payload = b[HEADER_LEN..].to_vec();
            assert_eq!(hdr.len as usize, payload.len(), "header length matches");
            out.push((hdr, payload));
        }
        out
    }

    /// Wait for the next packet (posting one buffer if none waits).
    fn next_packet(&mut self) -> (Header, Vec<u8>) {
        let mut got = Vec::new();
        self.until("a packet for the guest", |g| {
            got.extend(g.received());
            !got.is_empty()
        });
        assert_eq!(got.len(), 1, "one packet: {got:?}");
        got.remove(0)
    }

    /// Host connects with CONNECT `port`; the guest accepts. Returns the
    /// host stream and the host-side port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(self.uds()).expect("connect");
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .expect("write");
        self.post_rx(1);
        let (req, _) = self.next_packet();
        assert_eq!(req.op, Op::Request as u16);
        assert_eq!(req.dst_port, port);
        assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, CID));
        let local = req.src_port;
        self.send(self.header(Op::Response, port, local, 0), &[]);
        let mut line = [0u8; 32];
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let n = s.read(&mut line).expect("OK line");
        assert_eq!(&line[..n], format!("OK {local}\n").as_bytes());
        (s, local)
    }

    fn dev(&self) -> std::sync::MutexGuard<'_, HybridVsock> {
        beacon_common::lock(&self.dev)
    }
}

/// Whether the device closed its end of `s` (EOF or reset; data still in
/// flight is skipped).
fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn host_initiated_connection_moves_data_both_ways_and_closes_cleanly() {
    let mut g = Guest::new();
    let (mut s, local) = g.host_connect(1024);
    s.write_all(b"hello guest").expect("write");
    g.post_rx(1);
    let (h, p) = g.next_packet();
    assert_eq!((h.op, h.src_port, h.dst_port), (Op::Rw as u16, local, 1024));
    assert_eq!(p, b"hello guest");
    assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
    g.send(g.header(Op::Rw, 1024, local, 11), b"hello host!");
    let mut b = [0u8; 11];
    s.read_exact(&mut b).expect("read");
    assert_eq!(&b, b"hello host!");
    // The guest closes: SHUTDOWN both ways; the host sees EOF, the guest a RST.
    let mut sh = g.header(Op::Shutdown, 1024, local, 0);
    sh.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(sh, &[]);
    g.post_rx(1);
    let (h, _) = g.next_packet();
    assert_eq!(h.op, Op::Rst as u16);
    assert!(closed(&mut s));
    assert_eq!(g.dev().connections(), 0);
}

#[test]
fn host_half_close_is_a_shutdown_and_the_guest_close_ends_it() {
    let mut g = Guest::new();
    let (mut s, local) = g.host_connect(7);
    s.write_all(b"last words").expect("write");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    g.post_rx(2);
    let mut got = Vec::new();
    g.until("data and shutdown", |g| {
        got.extend(g.received());
        got.len() >= 2
    });
    assert_eq!(got[0].0.op, Op::Rw as u16);
    assert_eq!(got[0].1, b"last words");
    assert_eq!(got[1].0.op, Op::Shutdown as u16);
    assert_eq!(got[1].0.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
    // The guest can still send, then shuts its side: both done, RST.
    g.send(g.header(Op::Rw, 7, local, 3), b"bye");
    let mut b = [0u8; 3];
    s.read_exact(&mut b).expect("read");
    let mut sh = g.header(Op::Shutdown, 7, local, 0);
    sh.flags = SHUTDOWN_SEND;
    g.send(sh, &[]);
    g.post_rx(1);
    let (h, _) = g.next_packet();
    assert_eq!(h.op, Op::Rst as u16);
    assert!(closed(&mut s));
    assert_eq!(g.dev().connections(), 0);
}

#[test]
fn guest_refusing_or_resetting_closes_the_host_socket() {
    let mut g = Guest::new();
    let mut s = UnixStream::connect(g.uds()).expect("connect");
    s.write_all(b"CONNECT 99\n").expect("write");
    g.post_rx(1);
    let (req, _) = g.next_packet();
    g.send(g.header(Op::Rst, 99, req.src_port, 0), &[]);
    assert!(closed(&mut s));
    assert_eq!(g.dev().connections(), 0);
}

#[test]
fn guest_initiated_connection_goes_to_the_port_socket_or_is_refused() {
    let mut g = Guest::new();
    g.post_rx(1);
    // Nothing listens on <uds>_6000: RST.
    g.send(g.header(Op::Request, 40000, 6000, 0), &[]);
    let (h, _) = g.next_packet();
    assert_eq!(
        (h.op, h.src_port, h.dst_port),
        (Op::Rst as u16, 6000, 40000)
    );
    let l = UnixListener::bind(host::port_socket_path(&g.uds(), 6000)).expect("listen");
    g.post_rx(1);
    g.send(g.header(Op::Request, 40001, 6000, 0), &[]);
    let (h, _) = g.next_packet();
    assert_eq!(
        (h.op, h.src_port, h.dst_port),
        (Op::Response as u16, 6000, 40001)
    );
    let (mut s, _) = l.accept().expect("accept");
    g.send(g.header(Op::Rw, 40001, 6000, 4), b"ping");
    let mut b = [0u8; 4];
    s.read_exact(&mut b).expect("read");
    assert_eq!(&b, b"ping");
    // The host program goes away: the guest gets SHUTDOWN, then its RST ends it.
    drop(s);
    g.post_rx(1);
    let (h, _) = g.next_packet();
    assert_eq!(h.op, Op::Shutdown as u16);
    assert_eq!(h.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    g.send(g.header(Op::Rst, 40001, 6000, 0), &[]);
    assert_eq!(g.dev().connections(), 0);
}

#[test]
fn packets_for_unknown_connections_get_rst_and_rst_gets_nothing() {
    let mut g = Guest::new();
    g.post_rx(4);
    g.send(g.header(Op::Rw, 1, 2, 3), b"abc");
    g.send(g.header(Op::CreditRequest, 1, 2, 0), &[]);
    g.send(g.header(Op::Rst, 1, 2, 0), &[]);
    let mut seq = g.header(Op::Request, 5, 6, 0);
    seq.type_ = TYPE_SEQPACKET;
    g.send(seq, &[]);
    let got = g.received();
    let ops: Vec<u16> = got.iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, vec![Op::Rst as u16; 3], "{got:?}");
    assert_eq!(
        got[2].0.type_, TYPE_SEQPACKET,
        "a seqpacket request is refused as such"
    );
}

#[test]
fn credit_request_is_answered_with_credit_update() {
    let mut g = Guest::new();
    let (_s, local) = g.host_connect(5);
    g.post_rx(1);
    g.send(g.header(Op::CreditRequest, 5, local, 0), &[]);
    let (h, _) = g.next_packet();
    assert_eq!(h.op, Op::CreditUpdate as u16);
    assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
}

#[test]
fn the_host_is_read_only_as_far_as_the_guest_credit_allows() {
    let mut g = Guest::new();
    g.buf_alloc = 10_000;
    let (mut s, local) = g.host_connect(5);
    // The guest's RESPONSE advertised 10 000 bytes of buffer.
    s.set_nonblocking(true).expect("nonblocking");
    let chunk = vec![7u8; 64 << 10];
    let mut written = 0usize;
    for _ in 0..64 {
        match s.write(&chunk) {
            Ok(n) => written += n,
            Err(_) => break,
        }
    }
    assert!(written > 20_000, "the host wrote {written}");
    g.post_rx(16);
    g.turns(10);
    let got: usize = g.received().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(got, 10_000, "exactly the guest's credit was delivered");
    g.post_rx(16);
    g.turns(10);
    assert!(g.received().is_empty(), "nothing beyond the credit");
    // The guest consumed it all: its credit update lets more through.
    g.fwd_cnt = 10_000;
    g.send(g.header(Op::CreditUpdate, 5, local, 0), &[]);
    g.turns(10);
    let got: usize = g.received().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(got, 10_000);
}

#[test]
fn a_host_socket_that_never_reads_costs_at_most_the_advertised_buffer() {
    let mut g = Guest::new();
    let l = UnixListener::bind(host::port_socket_path(&g.uds(), 9)).expect("listen");
    g.post_rx(1);
    g.send(g.header(Op::Request, 50, 9, 0), &[]);
    assert_eq!(g.next_packet().0.op, Op::Response as u16);
    let (_never_reads, _) = l.accept().expect("accept");
    // A guest that ignores credit: it keeps sending while the host program
    // reads nothing. The device holds at most what it advertised, then resets.
    let payload = vec![1u8; 32 << 10];
    g.post_rx(8);
    let mut got = Vec::new();
    let mut reset = false;
    for _ in 0..400 {
        g.send(g.header(Op::Rw, 50, 9, payload.len() as u32), &payload);
        assert!(g.dev().buffered_bytes() <= CONN_BUF_ALLOC as usize);
        got.extend(g.received());
        g.post_rx(got.len().min(8));
        if got.iter().any(|(h, _)| h.op == Op::Rst as u16) {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest sending beyond its credit is reset");
    assert_eq!(g.dev().connections(), 0);
    assert_eq!(g.dev().buffered_bytes(), 0);
}

#[test]
fn guest_to_host_credit_is_returned_as_the_host_reads() {
    let mut g = Guest::new();
    let (mut s, local) = g.host_connect(5);
    let payload = vec![3u8; 16 << 10];
    g.post_rx(8);
    let mut fwd = None;
    for _ in 0..(CREDIT_UPDATE_THRESHOLD as usize / payload.len() + 1) {
        g.send(g.header(Op::Rw, 5, local, payload.len() as u32), &payload);
        let mut b = vec![0u8; payload.len()];
        s.read_exact(&mut b).expect("read");
    }
    g.turns(3);
    for (h, _) in g.received() {
        if h.op == Op::CreditUpdate as u16 {
            fwd = Some(h.fwd_cnt);
        }
    }
    let fwd = fwd.expect("a credit update once a quarter of the buffer was forwarded");
    assert!(fwd >= CREDIT_UPDATE_THRESHOLD);
}

#[test]
fn hostile_chains_are_dropped_without_harm() {
    let mut g = Guest::new();
    // Shorter than a header.
    g.send_raw(&[1, 2, 3]);
    // A giant length with a few bytes behind it.
    let mut h = g.header(Op::Rw, 1, 2, u32::MAX);
    g.send(h, b"xyz");
    // A length longer than the buffers.
    h.len = 100;
    g.send(h, b"short");
    // A device-writable TX buffer and one outside guest memory.
    g.tx.add_chain(&g.h.mem, &[(TX_BASE, 64, true)]);
    g.tx.add_chain(&g.h.mem, &[(1 << 40, 64, false)]);
    let _ = g.h.queue_events[TX_QUEUE].write(1);
    g.turns(3);
    // RX buffers that are read-only or smaller than a header.
    let head = g.rx.add_chain(&g.h.mem, &[(RX_BASE, 4096, false)]);
    g.rx_addr.insert(u32::from(head), RX_BASE);
    let head = g.rx.add_chain(&g.h.mem, &[(RX_BASE, 10, true)]);
    g.rx_addr.insert(u32::from(head), RX_BASE);
    g.rx_posted += 2;
    let _ = g.h.queue_events[RX_QUEUE].write(1);
    g.send(g.header(Op::Rw, 1, 2, 0), &[]);
    g.turns(3);
    // They are returned empty; the RST the packet earned waits for a usable one.
    let unusable = g.received();
    assert_eq!(unusable.len(), 2);
    assert!(unusable.iter().all(|(h, p)| p.is_empty() && h.op == 0));
    g.post_rx(1);
    assert_eq!(g.next_packet().0.op, Op::Rst as u16);
    // The device still works.
    let mut fresh = Guest::new();
    let (_s, _) = fresh.host_connect(3);
    let (_s2, _) = g.host_connect(4);
}

#[test]
fn a_flood_of_requests_is_bounded() {
    let mut g = Guest::new();
    let _l = UnixListener::bind(host::port_socket_path(&g.uds(), 80)).expect("listen");
    // No RX buffers: replies pile up only to their bound, then TX waits.
    for i in 0..(MAX_CONNECTIONS as u32 + 40) {
        g.send(g.header(Op::Request, 10_000 + i, 80, 0), &[]);
    }
    assert!(g.dev().connections() <= MAX_CONNECTIONS);
    assert!(g.dev().mux.control.len() <= MAX_CONTROL);
    // Stalled on RX, the device waits for buffers instead of spinning.
    let mut idle = false;
    for _ in 0..20 {
        if g.em.run_with_timeout(50).expect("event loop") == 0 {
            idle = true;
            break;
        }
    }
    assert!(
        idle,
        "the event loop keeps waking up while TX waits for RX buffers"
    );
    // Drain: every request got an answer, RESPONSE or RST.
    let mut answered = 0;
    for _ in 0..20 {
        g.post_rx(usize::from(QSIZE) / 2);
        answered += g.received().len();
    }
    assert!(answered >= MAX_CONNECTIONS, "answered {answered}");
}

#[test]
fn garbage_and_silent_handshakes_are_dropped() {
    let mut g = Guest::new();
    let mut garbage = UnixStream::connect(g.uds()).expect("connect");
    garbage.write_all(b"GET / HTTP/1.1\r\n").expect("write");
    let mut long = UnixStream::connect(g.uds()).expect("connect");
    long.write_all(&[b'A'; 100]).expect("write");
    let mut bad_port = UnixStream::connect(g.uds()).expect("connect");
    bad_port.write_all(b"CONNECT 99999999999\n").expect("write");
    g.turns(5);
    assert!(closed(&mut garbage));
    assert!(closed(&mut long));
    assert!(closed(&mut bad_port));
    // Silent: dropped at the deadline.
    let mut silent = UnixStream::connect(g.uds()).expect("connect");
    silent.write_all(b"CONN").expect("write");
    g.until("the silent handshake is dropped", |g| {
        g.turns(1);
        g.dev().mux.handshakes.is_empty()
    });
    assert!(closed(&mut silent));
}

#[test]
fn device_reset_closes_every_host_socket_and_reports_a_transport_reset() {
    let mut g = Guest::new();
    let (mut a, _) = g.host_connect(1);
    let (mut b, _) = g.host_connect(2);
    g.h.write32(0x70, 0);
    g.turns(3);
    assert!(closed(&mut a));
    assert!(closed(&mut b));
    assert_eq!(g.dev().connections(), 0);
    // Inactive: host connections are refused.
    let mut c = UnixStream::connect(g.uds()).expect("connect");
    c.write_all(b"CONNECT 1\n").expect("write");
    g.turns(3);
    assert!(closed(&mut c));
    // The driver comes back (on fresh, zeroed rings) and posts an event
    // buffer: it hears of the reset.
    g.h.mem
        .memory()
        .write_slice(&vec![0u8; 0x30_0000], GuestAddress(0x10_0000))
        .expect("zero the rings");
    let rx = DriverQueue::new(0x10_0000, QSIZE);
    let tx = DriverQueue::new(0x20_0000, QSIZE);
    let mut ev = DriverQueue::new(0x30_0000, QSIZE);
    assert_eq!(g.h.bring_up(0, &[rx.clone(), tx.clone(), ev.clone()]), 0xf);
    ev.add_chain(&g.h.mem, &[(EV_BASE, 4, true)]);
    let _ = g.h.queue_events[EVENT_QUEUE].write(1);
    g.turns(3);
    assert_eq!(ev.take_used(&g.h.mem), vec![(0, 4)]);
    g.rx = rx;
    g.tx = tx;
    g.ev = ev;
    g.rx_posted = 0;
    g.tx_next = 0;
    let (_d, _) = g.host_connect(3);
}

#[test]
fn the_socket_file_is_replaced_when_stale_refused_when_live_and_removed_on_drop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.sock");
    drop(UnixListener::bind(&path).expect("stale"));
    assert!(path.exists(), "a stale socket file");
    let dev = HybridVsock::new(CID, &path).expect("replaces the stale file");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let e = HybridVsock::new(CID, &path).err().expect("in use");
    assert!(
        e.to_string().contains("another process is listening"),
        "{e}"
    );
    drop(dev);
    assert!(!path.exists(), "removed on drop");
    std::fs::write(&path, b"not a socket").expect("file");
    let e = HybridVsock::new(CID, &path).err().expect("not a socket");
    assert!(e.to_string().contains("not a socket"), "{e}");
    let e = HybridVsock::new(CID, &dir.path().join("missing/v.sock"))
        .err()
        .expect("missing folder");
    assert!(e.to_string().contains("cannot be created"), "{e}");
    assert!(!dir.path().join("missing").exists());
}

#[test]
fn handshake_lines_parse_strictly() {
    use host::{parse_connect_line, Handshake};
    assert_eq!(
        parse_connect_line(b"CONNECT 1024\n"),
        Handshake::Connect(1024)
    );
    assert_eq!(parse_connect_line(b"CONNECT 0\r\n"), Handshake::Connect(0));
    assert_eq!(
        parse_connect_line(b"CONNECT 4294967295\n"),
        Handshake::Connect(u32::MAX)
    );
    assert_eq!(parse_connect_line(b"CONNECT 12"), Handshake::Incomplete);
    assert_eq!(parse_connect_line(b""), Handshake::Incomplete);
    for bad in [
        &b"CONNECT 4294967296\n"[..],
        b"CONNECT -1\n",
        b"CONNECT \n",
        b"CONNECT 1 2\n",
        b"connect 1\n",
        b"CONNECT +1\n",
        b"\n",
        &[b'9'; 40],
    ] {
        assert_eq!(parse_connect_line(bad), Handshake::Garbage, "{bad:?}");
    }
}
