//! Listen addresses and who may connect to them. Owns the parsing of
//! `unix:///path` and `vsock://CID:PORT` addresses, accepting connections on
//! them for the stream port and the ttrpc Task API, and the peer check:
//! on vsock only the host (CID 2) is ever served; any other peer (a
//! container reaching the guest's own CID or the loopback CID) is closed
//! before a byte is read from it, and logged (rate-limited) with its CID.
//! Unix sockets (host mode, tests) have no CID and are not filtered. When
//! the host reaches the guest through kernel vhost-vsock (any host process
//! may connect to a guest CID), a per-VM secret is set
//! ([`beacon_common::guest_protocol::VsockSecret`]) and a host connection is
//! handed on only after its first line is the secret's `AUTH` line, read
//! with a deadline in a task of its own (a silent peer never blocks the
//! accept loop; at most [`MAX_PENDING_AUTH`] wait at once). The one
//! connection vminitd itself opens is here too: the ready signal to the host
//! ([`tell_host_ready`]), which carries no bytes. It knows nothing else of
//! what the bytes mean.

use std::future::poll_fn;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beacon_common::guest_protocol::{VsockSecret, MAX_AUTH_LINE};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream};

/// The guest's vsock ports (defined once, shared with the shim).
pub use beacon_common::guest_protocol::{
    STREAM_PORT as STREAM_VSOCK_PORT, TASK_PORT as TASK_VSOCK_PORT,
};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket path (host tests).
    Unix(PathBuf),
    /// A vsock port; `cid` -1 (`VMADDR_CID_ANY`) in the guest.
    Vsock { cid: u32, port: u32 },
}

/// A malformed listen address.
#[derive(Debug, thiserror::Error)]
#[error("Bad listen address {addr:?}: {why}")]
pub struct AddrError {
    addr: String,
    why: &'static str,
}

impl ListenAddr {
    /// Parses `unix:///path` or `vsock://CID:PORT` (CID may be -1).
    pub fn parse(s: &str) -> Result<ListenAddr, AddrError> {
        let err = |why| AddrError {
            addr: s.to_string(),
            why,
        };
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(err("unix path must be absolute"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = rest.split_once(':').ok_or_else(|| err("missing :PORT"))?;
            let cid = if cid == "-1" {
                libc::VMADDR_CID_ANY
            } else {
                cid.parse().map_err(|_| err("bad CID"))?
            };
            let port = port.parse().map_err(|_| err("bad port"))?;
            return Ok(ListenAddr::Vsock { cid, port });
        }
        Err(err("expected unix:// or vsock://"))
    }

    /// The address in the form ttrpc's `Server::bind` accepts.
    pub fn to_ttrpc(&self) -> String {
        match self {
            ListenAddr::Unix(p) => format!("unix://{}", p.display()),
            ListenAddr::Vsock { cid, port } if *cid == libc::VMADDR_CID_ANY => {
                format!("vsock://-1:{port}")
            }
            ListenAddr::Vsock { cid, port } => format!("vsock://{cid}:{port}"),
        }
    }
}

/// The vsock CID of the host (`VMADDR_CID_HOST`): the only peer served.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

/// Whether a vsock peer may talk to vminitd: the host, and nobody else
/// (not the loopback CID 1, not the guest's own CID, which is where a
/// process inside the VM would come from).
pub fn peer_allowed(cid: u32) -> bool {
    cid == HOST_CID
}

/// How long vminitd waits for the host to take its ready signal.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Tell the host the Task API listens: connect to the host's
/// [`beacon_common::guest_protocol::READY_PORT`] and close. Best effort: with
/// kernel vhost-vsock nobody listens there, and the host polls anyway; a
/// failure is logged at debug level only.
pub async fn tell_host_ready() {
    let port = beacon_common::guest_protocol::READY_PORT;
    let addr = VsockAddr::new(HOST_CID, port);
    match tokio::time::timeout(READY_TIMEOUT, VsockStream::connect(addr)).await {
        Ok(Ok(conn)) => {
            drop(conn);
            tracing::debug!("told the host vminitd is serving");
        }
        Ok(Err(e)) => tracing::debug!("no ready signal to the host (port {port}): {e}"),
        Err(_) => tracing::debug!("the host did not take the ready signal in {READY_TIMEOUT:?}"),
    }
}

/// Refused peers are logged at most this many times per period...
const REFUSAL_LOG_BURST: u32 = 5;
/// ...and the rest are counted into the next line.
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Rate limit for refusal lines: a container hammering the port must not
/// flood the console.
#[derive(Debug)]
pub struct RefusalLog {
    burst: u32,
    period: Duration,
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog::new(REFUSAL_LOG_BURST, REFUSAL_LOG_PERIOD)
    }
}

impl RefusalLog {
    pub fn new(burst: u32, period: Duration) -> RefusalLog {
        RefusalLog {
            burst,
            period,
            window_start: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// Counts one refusal at `now`. `Some(n)` means "log this one, and say
    /// that `n` earlier ones went unlogged"; `None` means stay quiet.
    pub fn record(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|s| now.duration_since(s) >= self.period);
        if fresh {
            self.window_start = Some(now);
            self.logged = 0;
        }
        if self.logged < self.burst {
            self.logged += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// The peer check with its log line: true to serve the peer.
pub fn admit(port: u32, peer: VsockAddr, log: &mut RefusalLog, now: Instant) -> bool {
    if peer_allowed(peer.cid()) {
        return true;
    }
    if let Some(suppressed) = log.record(now) {
        tracing::warn!(
            port,
            peer_cid = peer.cid(),
            peer_port = peer.port(),
            suppressed,
            "refused a vsock connection: only the host (CID {HOST_CID}) may connect"
        );
    }
    false
}

/// How long a host connection has to send its `AUTH` line.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections waiting for their `AUTH` line at once; more are closed.
pub const MAX_PENDING_AUTH: usize = 16;

/// The secret check of a [`VsockGate`].
struct Auth {
    secret: Arc<VsockSecret>,
    pending: Arc<AtomicUsize>,
    passed_tx: mpsc::Sender<VsockStream>,
    passed_rx: mpsc::Receiver<VsockStream>,
    failures: Arc<Mutex<RefusalLog>>,
}

/// Read the first line (at most [`MAX_AUTH_LINE`] bytes) and check it.
async fn authenticate<S: AsyncRead + Unpin>(conn: &mut S, secret: &VsockSecret) -> bool {
    let mut line = Vec::with_capacity(MAX_AUTH_LINE);
    let mut byte = [0u8; 1];
    let read = async {
        while line.len() < MAX_AUTH_LINE {
            match conn.read(&mut byte).await {
                Ok(1) if byte[0] == b'\n' => return true,
                Ok(1) => line.push(byte[0]),
                _ => return false,
            }
        }
        false
    };
    matches!(tokio::time::timeout(AUTH_TIMEOUT, read).await, Ok(true)) && secret.accepts(&line)
}

/// A vsock listener that hands out connections from the host only (and,
/// with a secret, only those that proved they know it).
pub struct VsockGate {
    listener: VsockListener,
    port: u32,
    refusals: RefusalLog,
    auth: Option<Auth>,
}

impl VsockGate {
    pub fn bind(
        cid: u32,
        port: u32,
        secret: Option<Arc<VsockSecret>>,
    ) -> std::io::Result<VsockGate> {
        let auth = secret.map(|secret| {
            let (passed_tx, passed_rx) = mpsc::channel(MAX_PENDING_AUTH);
            Auth {
                secret,
                pending: Arc::new(AtomicUsize::new(0)),
                passed_tx,
                passed_rx,
                failures: Arc::new(Mutex::new(RefusalLog::default())),
            }
        });
        Ok(VsockGate {
            listener: VsockListener::bind(VsockAddr::new(cid, port))?,
            port,
            refusals: RefusalLog::default(),
            auth,
        })
    }

    /// The next connection from the host (with a secret: that sent the
    /// secret's `AUTH` line first).
    pub async fn accept(&mut self) -> VsockStream {
        if self.auth.is_none() {
            return self.accept_host().await;
        }
        loop {
            let passed = match &mut self.auth {
                Some(a) => &mut a.passed_rx,
                None => return self.accept_host().await,
            };
            let conn = tokio::select! {
                Some(s) = passed.recv() => return s,
                c = Self::accept_from(&self.listener, self.port, &mut self.refusals) => c,
            };
            let Some(a) = &self.auth else { continue };
            if a.pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING_AUTH {
                a.pending.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(
                    port = self.port,
                    "too many connections waiting to authenticate; closed one"
                );
                continue;
            }
            let (secret, pending, tx, failures, port) = (
                a.secret.clone(),
                a.pending.clone(),
                a.passed_tx.clone(),
                a.failures.clone(),
                self.port,
            );
            tokio::spawn(async move {
                let mut conn = conn;
                let ok = authenticate(&mut conn, &secret).await;
                pending.fetch_sub(1, Ordering::SeqCst);
                if ok {
                    let _ = tx.send(conn).await;
                } else if let Some(suppressed) =
                    beacon_common::lock(&failures).record(Instant::now())
                {
                    tracing::warn!(
                        port,
                        suppressed,
                        "closed a host vsock connection without the VM's secret"
                    );
                }
            });
        }
    }

    async fn accept_host(&mut self) -> VsockStream {
        Self::accept_from(&self.listener, self.port, &mut self.refusals).await
    }

    /// The next connection from the host. Other peers are closed unread;
    /// accept errors (out of descriptors, say) are logged and retried after
    /// a pause, so they never turn into a busy loop.
    async fn accept_from(
        listener: &VsockListener,
        port: u32,
        refusals: &mut RefusalLog,
    ) -> VsockStream {
        loop {
            match poll_fn(|cx| listener.poll_accept_std(cx)).await {
                Ok((conn, peer)) => {
                    if !admit(port, peer, refusals, Instant::now()) {
                        // Dropping closes it: nothing was read.
                        drop(conn);
                        continue;
                    }
                    match VsockStream::new(conn) {
                        Ok(s) => return s,
                        Err(e) => tracing::warn!(port, "vsock stream setup: {e}"),
                    }
                }
                Err(e) => {
                    tracing::warn!(port, "vsock accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// The Task API's listener for ttrpc: a unix socket as ttrpc binds it, or
/// a [`VsockGate`] so only the host reaches the ttrpc server.
pub fn task_listener(
    addr: &ListenAddr,
    secret: Option<Arc<VsockSecret>>,
) -> std::io::Result<ttrpc::r#async::transport::Listener> {
    use ttrpc::r#async::transport::Listener;
    match addr {
        ListenAddr::Unix(p) => {
            let _ = std::fs::remove_file(p);
            Listener::bind(addr.to_ttrpc())
        }
        ListenAddr::Vsock { cid, port } => {
            let gate = VsockGate::bind(*cid, *port, secret)?;
            let conns = futures::stream::unfold(gate, |mut gate| async move {
                let conn = gate.accept().await;
                Some((Ok::<_, std::io::Error>(conn), gate))
            });
            Ok(Listener::new(conns))
        }
    }
}

/// One accepted byte stream.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ByteStream for T {}

/// A boxed accepted stream.
pub type BoxStream = Box<dyn ByteStream>;

/// Accepts byte streams on a unix or vsock address (vsock: host only).
pub enum StreamListener {
    Unix(UnixListener),
    Vsock(VsockGate),
}

impl StreamListener {
    /// Binds the address (removing a stale unix socket file first); a
    /// `secret` applies to vsock only.
    pub fn bind(
        addr: &ListenAddr,
        secret: Option<Arc<VsockSecret>>,
    ) -> std::io::Result<StreamListener> {
        match addr {
            ListenAddr::Unix(p) => {
                let _ = std::fs::remove_file(p);
                Ok(StreamListener::Unix(UnixListener::bind(p)?))
            }
            ListenAddr::Vsock { cid, port } => {
                Ok(StreamListener::Vsock(VsockGate::bind(*cid, *port, secret)?))
            }
        }
    }

    /// Waits for the next connection.
    pub async fn accept(&mut self) -> std::io::Result<BoxStream> {
        match self {
            StreamListener::Unix(l) => Ok(Box::new(l.accept().await?.0)),
            StreamListener::Vsock(g) => Ok(Box::new(g.accept().await)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            ListenAddr::parse("unix:///run/t.sock").expect("unix"),
            ListenAddr::Unix("/run/t.sock".into())
        );
        let v = ListenAddr::parse("vsock://-1:1024").expect("vsock");
        assert_eq!(
            v,
            ListenAddr::Vsock {
                cid: libc::VMADDR_CID_ANY,
                port: 1024
            }
        );
        assert_eq!(v.to_ttrpc(), "vsock://-1:1024");
        assert!(ListenAddr::parse("unix://relative").is_err());
        assert!(ListenAddr::parse("vsock://3").is_err());
        assert!(ListenAddr::parse("tcp://1.2.3.4:5").is_err());
    }

    #[test]
    fn only_the_host_cid_is_served() {
        assert!(peer_allowed(2));
        // Hypervisor, loopback (VMADDR_CID_LOCAL), guests (3 and up: the
        // guest's own CID among them), VMADDR_CID_ANY.
        for cid in [0, 1, 3, 4, 1234, 0xffff_fffe, u32::MAX] {
            assert!(!peer_allowed(cid), "CID {cid} must be refused");
        }
        let mut log = RefusalLog::default();
        let now = Instant::now();
        assert!(admit(1024, VsockAddr::new(2, 5000), &mut log, now));
        assert!(!admit(1024, VsockAddr::new(1, 5000), &mut log, now));
        assert!(!admit(1025, VsockAddr::new(1234, 5000), &mut log, now));
    }

    #[test]
    fn refusals_are_logged_at_a_bounded_rate() {
        let period = Duration::from_secs(10);
        let mut log = RefusalLog::new(3, period);
        let t0 = Instant::now();
        let logged: Vec<Option<u64>> = (0..10).map(|_| log.record(t0)).collect();
        let mut expected = vec![Some(0); 3];
        expected.extend([None; 7]);
        assert_eq!(logged, expected);
        // The next period's first line reports the 7 that went unlogged.
        assert_eq!(log.record(t0 + period), Some(7));
        assert_eq!(log.record(t0 + period), Some(0));
    }

    #[tokio::test]
    async fn only_the_secret_line_authenticates() {
        use tokio::io::AsyncWriteExt;
        let secret = VsockSecret::generate().expect("random");
        let other = VsockSecret::generate().expect("random");
        for (send, want) in [
            (secret.auth_line().into_bytes(), true),
            (other.auth_line().into_bytes(), false),
            (b"CONNECT 1024\n".to_vec(), false),
            (vec![b'A'; 4 * MAX_AUTH_LINE], false),
            (Vec::new(), false),
        ] {
            let (mut host, mut guest) = tokio::io::duplex(4096);
            host.write_all(&send).await.expect("write");
            drop(host);
            assert_eq!(authenticate(&mut guest, &secret).await, want);
        }
        // A peer that says nothing is given up on at the deadline.
        tokio::time::pause();
        let (_host, mut guest) = tokio::io::duplex(64);
        assert!(!authenticate(&mut guest, &secret).await);
    }
}
