//! The vsock test tool's logic (`beacon-vsock-tool`), usable on the host and,
//! packed into a guest initrd, in the guest: listen or connect over AF_VSOCK,
//! a unix socket, or the hybrid backend's `CONNECT` handshake; open many
//! connections at once; on each, send N bytes of a deterministic stream while
//! receiving and checking the peer's, full duplex; print one summary line with
//! checksums that the tests compare against [`stream_checksum`].
//!
//! It never decides what a test expects: it reports, and exits non-zero when
//! what arrived is not the stream that was sent.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The host's CID, as seen from a guest.
pub const HOST_CID: u32 = 2;

/// Word `index` of the stream.
fn word(index: u64) -> u64 {
    (index ^ 0x5bd1_e995).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Checksum state over a byte stream, fed word by word.
#[derive(Debug, Clone, Copy)]
pub struct Checksum(u64);

impl Default for Checksum {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Checksum {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x100_0000_01b3);
    }

    pub fn value(&self) -> u64 {
        self.0
    }
}

/// The checksum of the first `n` bytes of the stream (the last partial word
/// zero-padded).
pub fn stream_checksum(n: u64) -> u64 {
    let mut c = Checksum::default();
    let words = n / 8;
    for i in 0..words {
        c.add(word(i));
    }
    let tail = n % 8;
    if tail > 0 {
        let mask = (1u64 << (8 * tail)) - 1;
        c.add(word(words) & mask);
    }
    c.value()
}

/// Bytes `[pos, pos + buf.len())` of the stream into `buf`.
fn fill(pos: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let p = pos + i as u64;
        *b = (word(p / 8) >> (8 * (p % 8))) as u8;
    }
}

/// Checks received bytes against the stream, word by word.
#[derive(Debug, Default)]
struct Verifier {
    pos: u64,
    carry: [u8; 8],
    carried: usize,
    sum: Checksum,
    mismatch_at: Option<u64>,
}

impl Verifier {
    fn push_word(&mut self, w: u64) {
        let index = self.pos / 8;
        if w != word(index) && self.mismatch_at.is_none() {
            self.mismatch_at = Some(self.pos);
        }
        self.sum.add(w);
        self.pos += 8;
    }

    fn feed(&mut self, mut data: &[u8]) {
        while self.carried > 0 && !data.is_empty() {
            self.carry[self.carried] = data[0];
            self.carried += 1;
            data = &data[1..];
            if self.carried == 8 {
                self.carried = 0;
                self.push_word(u64::from_le_bytes(self.carry));
            }
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.push_word(u64::from_le_bytes(w));
        }
        for &b in chunks.remainder() {
            self.carry[self.carried] = b;
            self.carried += 1;
        }
    }

    /// (bytes, checksum, first mismatching offset).
    fn finish(mut self) -> (u64, u64, Option<u64>) {
        let total = self.pos + self.carried as u64;
        if self.carried > 0 {
            let mut w = [0u8; 8];
            w[..self.carried].copy_from_slice(&self.carry[..self.carried]);
            let got = u64::from_le_bytes(w);
            let mask = (1u64 << (8 * self.carried)) - 1;
            if got != word(self.pos / 8) & mask && self.mismatch_at.is_none() {
                self.mismatch_at = Some(self.pos);
            }
            self.sum.add(got);
        }
        (total, self.sum.value(), self.mismatch_at)
    }
}

/// Where to listen or connect.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// AF_VSOCK `cid:port` (listen: any CID).
    Vsock { cid: u32, port: u32 },
    /// A unix socket path.
    Unix(PathBuf),
    /// The hybrid backend's socket and the guest port (`CONNECT port`).
    Hybrid { path: PathBuf, port: u32 },
}

/// A connected socket of any family.
pub struct Conn(File);

impl Conn {
    fn from_fd(fd: OwnedFd) -> Self {
        Self(File::from(fd))
    }

    fn try_clone(&self) -> std::io::Result<Self> {
        self.0.try_clone().map(Self)
    }

    fn shutdown_write(&self) {
        // SAFETY: shutdown(2) on a socket fd we own.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_WR) };
    }
}

fn vsock_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; zero is valid.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn vsock_connect(cid: u32, port: u32) -> std::io::Result<Conn> {
    let fd = vsock_socket()?;
    // Linux gives up on a vsock connect after 2 s; guests in the nested lab
    // can be slower than that to answer (SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD).
    let tv = libc::timeval {
        tv_sec: 30,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a valid timeval of the given size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::AF_VSOCK,
            6,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let a = vsock_addr(cid, port);
    // SAFETY: `a` is a valid sockaddr_vm of the given size.
    check(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&a as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    Ok(Conn::from_fd(fd))
}

fn hybrid_connect(path: &Path, port: u32) -> std::io::Result<Conn> {
    let mut s = UnixStream::connect(path)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 32 {
        if s.read(&mut b)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "closed before OK (nothing listens on that guest port)",
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    if !line.starts_with(b"OK ") {
        return Err(std::io::Error::other(format!(
            "unexpected handshake answer {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    Ok(Conn::from_fd(OwnedFd::from(s)))
}

/// Connect once.
pub fn connect(ep: &Endpoint) -> std::io::Result<Conn> {
    match ep {
        Endpoint::Vsock { cid, port } => vsock_connect(*cid, *port),
        Endpoint::Unix(p) => UnixStream::connect(p).map(|s| Conn::from_fd(OwnedFd::from(s))),
        Endpoint::Hybrid { path, port } => hybrid_connect(path, *port),
    }
}

/// Connect, retrying until `deadline` (the peer may not listen yet).
pub fn connect_retry(ep: &Endpoint, deadline: Instant) -> std::io::Result<Conn> {
    loop {
        match connect(ep) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// A listening socket of any family.
pub enum Listener {
    Vsock(OwnedFd),
    Unix(UnixListener),
}

/// Listen on `ep` (a hybrid endpoint is not something one listens on).
pub fn listen(ep: &Endpoint) -> std::io::Result<Listener> {
    match ep {
        Endpoint::Vsock { port, .. } => {
            let fd = vsock_socket()?;
            let a = vsock_addr(libc::VMADDR_CID_ANY, *port);
            // SAFETY: `a` is a valid sockaddr_vm of the given size.
            check(unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&a as *const libc::sockaddr_vm).cast(),
                    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                )
            })?;
            // SAFETY: listen(2) on our socket.
            check(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
            Ok(Listener::Vsock(fd))
        }
        Endpoint::Unix(p) => {
            let _ = std::fs::remove_file(p);
            Ok(Listener::Unix(UnixListener::bind(p)?))
        }
        Endpoint::Hybrid { .. } => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "listen on a unix path or a vsock port; hybrid is for connecting",
        )),
    }
}

impl Listener {
    pub fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Listener::Vsock(fd) => {
                // SAFETY: accept(2) on our listening socket; no address wanted.
                let c = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if c < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: a fresh fd we own.
                Ok(Conn::from_fd(unsafe { OwnedFd::from_raw_fd(c) }))
            }
            Listener::Unix(l) => l.accept().map(|(s, _)| Conn::from_fd(OwnedFd::from(s))),
        }
    }
}

/// Hold guest CID `cid` in the host kernel's vhost-vsock (as a VM would)
/// until the returned fd is closed: for tests of a CID that is in use.
pub fn hold_cid(cid: u64) -> std::io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vhost-vsock")?;
    // VHOST_SET_OWNER = _IO(0xAF, 0x01); VHOST_VSOCK_SET_GUEST_CID = _IOW(0xAF, 0x60, u64).
    const VHOST_SET_OWNER: libc::c_ulong = 0xAF01;
    const VHOST_VSOCK_SET_GUEST_CID: libc::c_ulong = 0x4008_AF60;
    // SAFETY: ioctls on a vhost-vsock fd we own; the CID argument outlives the call.
    unsafe {
        check(libc::ioctl(f.as_raw_fd(), VHOST_SET_OWNER))?;
        check(libc::ioctl(
            f.as_raw_fd(),
            VHOST_VSOCK_SET_GUEST_CID,
            &cid as *const u64,
        ))?;
    }
    Ok(OwnedFd::from(f))
}

/// What a server saw: a report for every connection that carried the
/// exchange, and how many connections the peer abandoned before any byte
/// moved.
#[derive(Debug)]
pub struct Served {
    pub reports: Vec<ConnReport>,
    pub abandoned: usize,
}

/// Whether a connection was gone before any data moved: nothing arrived, and
/// the peer did not take the whole stream. A client whose connect gave up
/// (Linux's vsock connect timeout, in a slow guest) and retried leaves such a
/// connection behind: the far side accepted it after the client had left.
pub fn abandoned(r: &ConnReport, bytes: u64) -> bool {
    r.received == 0 && r.mismatch_at.is_none() && r.sent < bytes && bytes > 0
}

/// Accept `conns` connections on `l` and run [`exchange`] on each (all
/// accepted before any data moves with `open_all_first`). A connection the
/// peer abandoned does not count: another is accepted in its place, up to
/// `conns` such replacements. Only the server side may do this; the client
/// still needs every one of its own connections to succeed, so nothing that
/// is lost after a connection was established goes unnoticed.
pub fn serve(
    l: &Listener,
    conns: usize,
    bytes: u64,
    open_all_first: bool,
) -> Result<Served, String> {
    let mut served = Served {
        reports: Vec::new(),
        abandoned: 0,
    };
    let mut wanted = conns;
    while wanted > 0 {
        let mut threads = Vec::new();
        let mut accepted = Vec::new();
        for _ in 0..wanted {
            let c = l.accept().map_err(|e| format!("accept: {e}"))?;
            if open_all_first {
                accepted.push(c);
            } else {
                threads.push(std::thread::spawn(move || exchange(c, bytes)));
            }
        }
        threads.extend(
            accepted
                .into_iter()
                .map(|c| std::thread::spawn(move || exchange(c, bytes))),
        );
        wanted = 0;
        for t in threads {
            let r = t
                .join()
                .map_err(|_| "a connection thread panicked".to_string())?;
            if abandoned(&r, bytes) && served.abandoned < conns {
                served.abandoned += 1;
                wanted += 1;
            } else {
                served.reports.push(r);
            }
        }
    }
    Ok(served)
}

/// What one connection saw.
#[derive(Debug, Clone)]
pub struct ConnReport {
    pub sent: u64,
    pub sent_sum: u64,
    pub received: u64,
    pub received_sum: u64,
    pub mismatch_at: Option<u64>,
    pub error: Option<String>,
    /// From the connection's start to both directions done.
    pub elapsed: Duration,
}

/// Send `bytes` of the stream while receiving (and checking) until EOF.
pub fn exchange(conn: Conn, bytes: u64) -> ConnReport {
    let start = Instant::now();
    let writer = match conn.try_clone() {
        Ok(w) => w,
        Err(e) => {
            return ConnReport {
                sent: 0,
                sent_sum: 0,
                received: 0,
                received_sum: 0,
                mismatch_at: None,
                error: Some(format!("dup: {e}")),
                elapsed: start.elapsed(),
            }
        }
    };
    let sender = std::thread::spawn(move || -> Result<(u64, u64), String> {
        let mut w = writer;
        let mut buf = vec![0u8; 64 << 10];
        let mut pos = 0u64;
        while pos < bytes {
            let n = (bytes - pos).min(buf.len() as u64) as usize;
            fill(pos, &mut buf[..n]);
            w.0.write_all(&buf[..n])
                .map_err(|e| format!("send at {pos}: {e}"))?;
            pos += n as u64;
        }
        w.shutdown_write();
        Ok((pos, stream_checksum(pos)))
    });
    let mut r = conn;
    let mut v = Verifier::default();
    let mut buf = vec![0u8; 64 << 10];
    let mut error = None;
    loop {
        match r.0.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => v.feed(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error = Some(format!("receive: {e}"));
                break;
            }
        }
    }
    let (received, received_sum, mismatch_at) = v.finish();
    let (sent, sent_sum) = match sender.join() {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            error.get_or_insert(e);
            (0, 0)
        }
        Err(_) => {
            error.get_or_insert("sender panicked".into());
            (0, 0)
        }
    };
    ConnReport {
        sent,
        sent_sum,
        received,
        received_sum,
        mismatch_at,
        error,
        elapsed: start.elapsed(),
    }
}

/// The summary line for `reports` (every connection must have sent exactly
/// `bytes` and received exactly `recv_bytes` of the stream): `Ok(line)` when
/// all did. `secs` is the slowest connection's time.
pub fn summarize(
    label: &str,
    bytes: u64,
    recv_bytes: u64,
    reports: &[ConnReport],
) -> Result<String, String> {
    let expected = stream_checksum(recv_bytes);
    let sent_expected = stream_checksum(bytes);
    let elapsed = reports.iter().map(|r| r.elapsed).max().unwrap_or_default();
    let mut problems = Vec::new();
    for (i, r) in reports.iter().enumerate() {
        if let Some(e) = &r.error {
            problems.push(format!("conn {i}: {e}"));
        }
        if let Some(at) = r.mismatch_at {
            problems.push(format!(
                "conn {i}: received data differs from the stream at byte {at}"
            ));
        }
        if r.received != recv_bytes || r.received_sum != expected {
            problems.push(format!(
                "conn {i}: received {} bytes, checksum {:016x} (expected {recv_bytes}, {expected:016x})",
                r.received, r.received_sum
            ));
        }
        if r.sent != bytes || r.sent_sum != sent_expected {
            problems.push(format!("conn {i}: sent {} bytes", r.sent));
        }
    }
    let line = format!(
        "VSOCK-TOOL-OK {label} conns={} bytes={recv_bytes} sum={expected:016x} secs={:.3}",
        reports.len(),
        elapsed.as_secs_f64()
    );
    if problems.is_empty() {
        Ok(line)
    } else {
        Err(format!(
            "VSOCK-TOOL-FAILED {label}: {}",
            problems.join("; ")
        ))
    }
}

/// The line a passing run that received `bytes` per connection prints, up
/// to its timing (what tests expect).
pub fn expected_line(label: &str, conns: usize, bytes: u64) -> String {
    format!(
        "VSOCK-TOOL-OK {label} conns={conns} bytes={bytes} sum={:016x} ",
        stream_checksum(bytes)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_matches_the_stream_checksum_at_any_split() {
        for n in [0u64, 1, 7, 8, 9, 1000, 65_537] {
            let mut data = vec![0u8; n as usize];
            fill(0, &mut data);
            for split in [1usize, 3, 8, 4096] {
                let mut v = Verifier::default();
                for c in data.chunks(split) {
                    v.feed(c);
                }
                let (total, sum, bad) = v.finish();
                assert_eq!(
                    (total, sum, bad),
                    (n, stream_checksum(n), None),
                    "n={n} split={split}"
                );
            }
        }
        let mut data = vec![0u8; 100];
        fill(0, &mut data);
        data[42] ^= 1;
        let mut v = Verifier::default();
        v.feed(&data);
        assert_eq!(v.finish().2, Some(40));
    }

    #[test]
    fn a_server_replaces_connections_the_client_abandoned() {
        let dir = std::env::temp_dir().join(format!("vsock-tool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("s.sock");
        let l = listen(&Endpoint::Unix(path.clone())).expect("listen");
        // Two connections given up before the server accepts them, then the
        // two that carry the exchange.
        drop(UnixStream::connect(&path).expect("connect"));
        drop(UnixStream::connect(&path).expect("connect"));
        let ep = Endpoint::Unix(path);
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let ep = ep.clone();
                std::thread::spawn(move || exchange(connect(&ep).expect("connect"), 100_000))
            })
            .collect();
        let served = serve(&l, 2, 100_000, true).expect("serves");
        assert_eq!(served.abandoned, 2);
        let line = summarize("srv", 100_000, 100_000, &served.reports).expect("passes");
        assert!(line.starts_with(&expected_line("srv", 2, 100_000)));
        let reports: Vec<_> = clients
            .into_iter()
            .map(|t| t.join().expect("join"))
            .collect();
        summarize("cli", 100_000, 100_000, &reports).expect("clients pass");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn abandoned_means_nothing_arrived_and_the_stream_did_not_go_out() {
        let r = |received, sent| ConnReport {
            sent,
            sent_sum: 0,
            received,
            received_sum: 0,
            mismatch_at: None,
            error: None,
            elapsed: Duration::ZERO,
        };
        assert!(abandoned(&r(0, 0), 10));
        assert!(
            !abandoned(&r(0, 10), 10),
            "the peer took it all: a real loss"
        );
        assert!(!abandoned(&r(1, 0), 10));
    }

    #[test]
    fn exchange_over_a_socket_pair() {
        let (a, b) = UnixStream::pair().expect("pair");
        let t = std::thread::spawn(move || exchange(Conn::from_fd(OwnedFd::from(b)), 300_001));
        let ra = exchange(Conn::from_fd(OwnedFd::from(a)), 300_001);
        let rb = t.join().expect("join");
        let line = summarize("pair", 300_001, 300_001, &[ra, rb]).expect("passes");
        assert!(line.starts_with(&expected_line("pair", 2, 300_001)));
    }
}
