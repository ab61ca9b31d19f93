//! The shim's connection to vminitd, the guest's PID 1: the Task API client
//! (ttrpc on guest port 1024), stdio streams and the event stream (port 1025).
//!
//! How bytes reach the guest is a [`GuestLink`]: the hybrid vsock backend's unix
//! socket (connect, `CONNECT <port>\n`, wait for `OK <port>\n`), kernel
//! vhost-vsock (`AF_VSOCK` to the guest's CID, then the VM's secret as the
//! first line: any host process may connect to a CID, only the shim knows the
//! secret), or plain unix sockets to a vminitd running as a host process
//! (tests). Everything vminitd
//! sends is bounded and time-limited: handshake lines are capped, every call
//! has a timeout, and an event line that is malformed is dropped with a log line.
//! This module never decides what to do with a container; it only carries.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use beacon_common::guest_protocol::{
    GuestEvent, StreamRequest, VsockSecret, MAX_EVENT_LINE, MAX_HANDSHAKE_LINE, READY_PORT,
    STREAM_PORT, TASK_PORT,
};
use containerd_shim_protos::shim_async::TaskClient;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// How long one handshake (hybrid CONNECT, stream request, events subscription)
/// may take. Bounds a mute guest; generous because a CPU-starved guest (several
/// VMs booting at once on one core) answers late.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// The first pause between attempts to reach a booting vminitd; it doubles up
/// to [`CONNECT_RETRY_MAX`]. Each refused attempt costs the booting guest an
/// interrupt and a reply (a vsock reset), so polling every 10 ms throughout a
/// boot slowed the guest measurably in the nested lab.
const CONNECT_RETRY_FIRST: Duration = Duration::from_millis(5);
/// The longest pause between attempts: the most a ready vminitd waits.
const CONNECT_RETRY_MAX: Duration = Duration::from_millis(50);
/// The pause between attempts while a [`ReadySignal`] is awaited: a fallback
/// for a guest whose signal never comes (an older initrd), not the way in.
const READY_FALLBACK: Duration = Duration::from_millis(500);
/// How long a Task API call to vminitd may take before the shim gives up on it.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the guest could not be reached or answered badly.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot connect to {what}: {source}")]
    Connect {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest refused {what}: {reply}")]
    Refused { what: String, reply: String },
    #[error("{what} took longer than {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("vminitd did not come up within {0:?}; the VM log says why")]
    NotUp(Duration),
    #[error("the VM ended before vminitd came up; the VM log says why")]
    VmEnded,
}

/// Where vminitd's two ports are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestLink {
    /// The VM's hybrid vsock unix socket.
    Hybrid { uds: PathBuf },
    /// Kernel vhost-vsock: the guest's CID, and the secret vminitd asks of
    /// every connection.
    Vhost { cid: u32, secret: Arc<VsockSecret> },
    /// vminitd as a host process: its task and stream unix sockets.
    Unix { task: PathBuf, streams: PathBuf },
}

/// The host end of vminitd's ready signal on a hybrid link: a unix socket at
/// `<uds>_<READY_PORT>` (inside the sandbox's private run folder), which the
/// guest connects to once its Task API listens. One connection is taken,
/// then the socket is closed and its file removed, so a guest that keeps
/// connecting is refused by the VMM, not queued here.
#[derive(Debug)]
pub struct ReadySignal {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl ReadySignal {
    /// Listen for the signal of the guest behind the hybrid socket `uds`
    /// (before the VM starts, so an early signal is not refused).
    pub fn listen(uds: &std::path::Path) -> Result<ReadySignal, GuestError> {
        let path = beacon_devices::virtio::vsock::hybrid::host::port_socket_path(uds, READY_PORT);
        // A socket file left by a shim killed before its guest signalled:
        // the sandbox's run folder is this shim's alone, so it is replaced.
        let _ = std::fs::remove_file(&path);
        let listener =
            tokio::net::UnixListener::bind(&path).map_err(|source| GuestError::Connect {
                what: format!("the ready signal's socket {}", path.display()),
                source,
            })?;
        Ok(ReadySignal { listener, path })
    }

    /// Wait for the guest to connect.
    async fn wait(&self) -> std::io::Result<()> {
        self.listener.accept().await.map(drop)
    }
}

impl Drop for ReadySignal {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Connect an `AF_VSOCK` stream socket to (`cid`, `port`), blocking (run it
/// off the async threads). `SO_VSOCK_CONNECT_TIMEOUT`'s default (2 s) bounds a
/// guest that does not answer.
fn vsock_connect(cid: u32, port: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid start.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: `addr` is a sockaddr_vm of the length given; `fd` is open.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Read one `\n`-terminated line of at most `max` bytes.
async fn read_line<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<String> {
    let mut line = Vec::with_capacity(32);
    let mut byte = [0u8; 1];
    loop {
        if r.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before the end of the line",
            ));
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() >= max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line longer than {max} bytes"),
            ));
        }
        line.push(byte[0]);
    }
}

async fn timed<T>(
    what: &str,
    after: Duration,
    f: impl std::future::Future<Output = Result<T, GuestError>>,
) -> Result<T, GuestError> {
    tokio::time::timeout(after, f)
        .await
        .map_err(|_| GuestError::Timeout {
            what: what.to_string(),
            after,
        })?
}

impl GuestLink {
    /// A connected byte stream to guest `port`.
    pub async fn dial(&self, port: u32) -> Result<UnixStream, GuestError> {
        match self {
            Self::Unix { task, streams } => {
                let path = if port == TASK_PORT { task } else { streams };
                UnixStream::connect(path)
                    .await
                    .map_err(|source| GuestError::Connect {
                        what: format!("vminitd at {}", path.display()),
                        source,
                    })
            }
            Self::Hybrid { uds } => {
                let what = format!("guest port {port} through {}", uds.display());
                timed(&what.clone(), HANDSHAKE_TIMEOUT, async {
                    let mut s =
                        UnixStream::connect(uds)
                            .await
                            .map_err(|source| GuestError::Connect {
                                what: what.clone(),
                                source,
                            })?;
                    let io = |source| GuestError::Connect {
                        what: what.clone(),
                        source,
                    };
                    s.write_all(format!("CONNECT {port}\n").as_bytes())
                        .await
                        .map_err(io)?;
                    let reply = read_line(&mut s, 64).await.map_err(io)?;
                    if reply.starts_with("OK ") {
                        Ok(s)
                    } else {
                        Err(GuestError::Refused {
                            what: what.clone(),
                            reply: reply.chars().take(64).collect(),
                        })
                    }
                })
                .await
            }
            Self::Vhost { cid, secret } => {
                let (cid, what) = (*cid, format!("guest CID {cid} port {port} (vhost-vsock)"));
                timed(&what.clone(), HANDSHAKE_TIMEOUT, async {
                    let io = |source| GuestError::Connect {
                        what: what.clone(),
                        source,
                    };
                    let fd = tokio::task::spawn_blocking(move || vsock_connect(cid, port))
                        .await
                        .map_err(|e| io(std::io::Error::other(e)))?
                        .map_err(io)?;
                    // An AF_VSOCK stream socket carries bytes as a unix stream
                    // socket does (read, write, shutdown): tokio's UnixStream
                    // drives it; nothing here asks it for a unix address.
                    let std = std::os::unix::net::UnixStream::from(fd);
                    std.set_nonblocking(true).map_err(io)?;
                    let mut s = UnixStream::from_std(std).map_err(io)?;
                    s.write_all(secret.auth_line().as_bytes())
                        .await
                        .map_err(io)?;
                    Ok(s)
                })
                .await
            }
        }
    }

    /// A stream of the stream port after its handshake was accepted.
    pub async fn open_stream(&self, request: &StreamRequest) -> Result<UnixStream, GuestError> {
        let what = request.to_line().trim_end().to_string();
        let mut s = self.dial(STREAM_PORT).await?;
        timed(&what.clone(), HANDSHAKE_TIMEOUT, async {
            let io = |source| GuestError::Connect {
                what: what.clone(),
                source,
            };
            s.write_all(request.to_line().as_bytes())
                .await
                .map_err(io)?;
            let reply = read_line(&mut s, MAX_HANDSHAKE_LINE).await.map_err(io)?;
            if reply == "OK" {
                Ok(())
            } else {
                Err(GuestError::Refused {
                    what: what.clone(),
                    reply: reply.chars().take(200).collect(),
                })
            }
        })
        .await?;
        Ok(s)
    }

    /// Connect the Task API, retrying while the guest boots, until `limit` or
    /// until `vm_ended()` says there is no guest any more. With a `ready`
    /// signal, attempts wait for it (or [`READY_FALLBACK`]) instead of
    /// polling every [`CONNECT_RETRY_MAX`].
    pub async fn connect_task(
        &self,
        limit: Duration,
        vm_ended: impl Fn() -> bool,
        mut ready: Option<ReadySignal>,
    ) -> Result<TaskClient, GuestError> {
        let deadline = Instant::now() + limit;
        let mut pause = CONNECT_RETRY_FIRST;
        loop {
            if vm_ended() {
                return Err(GuestError::VmEnded);
            }
            let last = match self.dial(TASK_PORT).await {
                Ok(stream) => {
                    let client = ttrpc::asynchronous::Client::new(
                        ttrpc::asynchronous::transport::Socket::new(stream),
                    );
                    return Ok(TaskClient::new(client));
                }
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                tracing::warn!("last attempt to reach vminitd: {last}");
                return Err(GuestError::NotUp(limit));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            match &ready {
                Some(signal) => {
                    tokio::select! {
                        got = signal.wait() => {
                            // One signal only: a second one (or a failed
                            // accept) falls back to plain polling.
                            match got {
                                Ok(()) => tracing::debug!("vminitd signalled it is serving"),
                                Err(e) => tracing::debug!("the ready signal failed: {e}"),
                            }
                            ready = None;
                        }
                        _ = tokio::time::sleep(READY_FALLBACK.min(remaining)) => {}
                    }
                }
                None => {
                    tokio::time::sleep(pause.min(remaining)).await;
                    pause = (pause * 2).min(CONNECT_RETRY_MAX);
                }
            }
        }
    }

    /// Subscribe to vminitd's events; each valid one is sent on the returned
    /// channel in order. The channel closes when the stream ends.
    pub async fn subscribe_events(&self) -> Result<mpsc::Receiver<GuestEvent>, GuestError> {
        let stream = self.open_stream(&StreamRequest::Events).await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut reader = BufReader::with_capacity(MAX_EVENT_LINE, stream);
            let mut line = Vec::with_capacity(256);
            loop {
                line.clear();
                // `take` bounds the line; a longer one is skipped to its end.
                let n = match (&mut reader)
                    .take(MAX_EVENT_LINE as u64)
                    .read_until(b'\n', &mut line)
                    .await
                {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!("the guest's event stream failed: {e}");
                        break;
                    }
                };
                if line.last() != Some(&b'\n') {
                    tracing::warn!(bytes = n, "dropping an over-long event line from the guest");
                    let mut sink = Vec::new();
                    if reader.read_until(b'\n', &mut sink).await.unwrap_or(0) == 0 {
                        break;
                    }
                    continue;
                }
                match GuestEvent::parse(line.trim_ascii_end()) {
                    Ok(event) => {
                        if tx.send(event).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => tracing::warn!("dropping a malformed event from the guest: {e}"),
                }
            }
        });
        Ok(rx)
    }
}

/// A ttrpc context with the shim's call timeout.
pub fn call_context() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(CALL_TIMEOUT.as_nanos() as i64)
}

#[cfg(test)]
mod tests;
