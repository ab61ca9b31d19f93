//! A process's stdio between containerd and the guest: containerd names where
//! each stream goes (a FIFO path, `file:///path`, or `binary:///logger?args`),
//! and vminitd serves each stream as one connection on its stream port.
//!
//! Output is copied guest → host with back-pressure only: when containerd does
//! not read a FIFO, the copy waits, vminitd's copy waits, and the process blocks
//! on its write; nothing grows in memory. The exit of a process is reported only
//! after its output copies finished ([`ProcessIo::finish`]), so output is
//! complete when containerd hears of the exit. Stdin is copied host → guest
//! until the host closes it or CloseIO ([`ProcessIo::close_stdin`]), and the
//! guest then sees EOF.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use beacon_common::guest_protocol::{StdioStream, StreamRequest};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use crate::guest::{GuestError, GuestLink};

/// How long opening a FIFO may wait for containerd to open its end.
const FIFO_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a logging binary may take to say it is ready.
const LOGGER_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why stdio could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("{stream}: unsupported stdio address {uri:?}; use a FIFO path, file:///path or binary:///path")]
    BadUri { stream: &'static str, uri: String },
    #[error("{stream}: opening {path}: {source}")]
    Open {
        stream: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{stream}: starting the logging binary {path}: {reason}")]
    Logger {
        stream: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Guest(#[from] GuestError),
}

/// Where containerd wants one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoTarget {
    None,
    Fifo(PathBuf),
    File(PathBuf),
    Binary { path: PathBuf, args: Vec<String> },
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// URL percent-decoding (`%2F`, and `+` as a space in query strings).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            if let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(if b == b'+' { b' ' } else { b });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl IoTarget {
    /// Parse what containerd put in a Create or Exec request.
    pub fn parse(stream: &'static str, uri: &str) -> Result<Self, IoError> {
        let bad = || IoError::BadUri {
            stream,
            uri: uri.chars().take(200).collect(),
        };
        if uri.is_empty() {
            return Ok(Self::None);
        }
        if let Some(rest) = uri.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(bad());
            }
            return Ok(Self::File(PathBuf::from(percent_decode(rest))));
        }
        if let Some(rest) = uri.strip_prefix("fifo://") {
            return Ok(Self::Fifo(PathBuf::from(percent_decode(rest))));
        }
        if let Some(rest) = uri.strip_prefix("binary://") {
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            if !path.starts_with('/') {
                return Err(bad());
            }
            let mut args = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                args.push(percent_decode(k));
                if !v.is_empty() {
                    args.push(percent_decode(v));
                }
            }
            return Ok(Self::Binary {
                path: PathBuf::from(percent_decode(path)),
                args,
            });
        }
        if uri.contains("://") || !uri.starts_with('/') {
            return Err(bad());
        }
        Ok(Self::Fifo(PathBuf::from(uri)))
    }
}

/// What containerd asked for one process.
#[derive(Debug, Clone, Default)]
pub struct StdioSpec {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Open a FIFO for writing without blocking a thread: retry while containerd
/// has not opened its reading end yet.
async fn open_fifo_sender(stream: &'static str, path: &Path) -> Result<pipe::Sender, IoError> {
    let deadline = Instant::now() + FIFO_OPEN_TIMEOUT;
    loop {
        match pipe::OpenOptions::new().open_sender(path) {
            Ok(s) => return Ok(s),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(source) => {
                return Err(IoError::Open {
                    stream,
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// A logging binary started for `binary://` (containerd's protocol: stdout on
/// fd 3, stderr on fd 4, fd 5 closed once it is ready).
struct Logger {
    child: tokio::process::Child,
}

fn pipe_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned both fds; nobody else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

async fn start_logger(
    stream: &'static str,
    path: &Path,
    args: &[String],
    container: &str,
    namespace: &str,
) -> Result<(Logger, Writer, Writer), IoError> {
    let fail = |reason: String| IoError::Logger {
        stream,
        path: path.to_path_buf(),
        reason,
    };
    let (out_r, out_w) = pipe_pair().map_err(|e| fail(e.to_string()))?;
    let (err_r, err_w) = pipe_pair().map_err(|e| fail(e.to_string()))?;
    let (wait_r, wait_w) = pipe_pair().map_err(|e| fail(e.to_string()))?;
    let fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), wait_w.as_raw_fd()];
    let mut cmd = tokio::process::Command::new(path);
    cmd.args(args)
        .env("CONTAINER_ID", container)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    // SAFETY: only async-signal-safe calls (dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in fds.iter().enumerate() {
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| fail(e.to_string()))?;
    drop((out_r, err_r, wait_w));
    // Ready when the binary closes fd 5 (EOF on our end).
    let mut ready = pipe::Receiver::from_owned_fd(wait_r).map_err(|e| fail(e.to_string()))?;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(LOGGER_READY_TIMEOUT, ready.read(&mut byte)).await {
        Ok(_) => {}
        Err(_) => return Err(fail(format!("not ready within {LOGGER_READY_TIMEOUT:?}"))),
    }
    let out: Writer =
        Box::new(pipe::Sender::from_owned_fd(out_w).map_err(|e| fail(e.to_string()))?);
    let err: Writer =
        Box::new(pipe::Sender::from_owned_fd(err_w).map_err(|e| fail(e.to_string()))?);
    Ok((Logger { child }, out, err))
}

async fn copy_out<R: AsyncRead + Unpin>(mut from: R, mut to: Writer, what: String) {
    let mut buf = vec![0u8; 64 << 10];
    let mut sink_gone = false;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("{what}: reading from the guest failed: {e}");
                break;
            }
        };
        // A reader that went away must not block the process: keep draining.
        if !sink_gone {
            if let Err(e) = to.write_all(&buf[..n]).await {
                tracing::warn!("{what}: the host side stopped reading ({e}); output is discarded");
                sink_gone = true;
            }
        }
    }
    let _ = to.flush().await;
    let _ = to.shutdown().await;
}

/// The stdio of one process.
pub struct ProcessIo {
    stdin: Mutex<Option<JoinHandle<()>>>,
    stdin_close: watch::Sender<bool>,
    outputs: Mutex<Vec<JoinHandle<()>>>,
    logger: Mutex<Option<Logger>>,
}

impl ProcessIo {
    /// Connect the process's streams in the guest to what containerd named.
    /// Call after the guest created the process and before it starts.
    pub async fn attach(
        link: &GuestLink,
        namespace: &str,
        container: &str,
        exec: Option<&str>,
        spec: &StdioSpec,
    ) -> Result<Self, IoError> {
        let stdin = IoTarget::parse("stdin", &spec.stdin)?;
        let stdout = IoTarget::parse("stdout", &spec.stdout)?;
        let stderr = if spec.terminal {
            // One pty: stderr arrives merged into stdout.
            IoTarget::None
        } else {
            IoTarget::parse("stderr", &spec.stderr)?
        };
        let request = |stream| StreamRequest::Stdio {
            container: container.to_string(),
            exec: exec.map(str::to_string),
            stream,
        };
        let mut logger = None;
        let mut writers: HashMap<StdioStream, Writer> = HashMap::new();
        for (stream, target) in [
            (StdioStream::Stdout, &stdout),
            (StdioStream::Stderr, &stderr),
        ] {
            let name = stream.as_str();
            let w: Writer = match target {
                IoTarget::None => continue,
                IoTarget::Fifo(p) => Box::new(open_fifo_sender(name, p).await?),
                IoTarget::File(p) => {
                    if let Some(dir) = p.parent() {
                        std::fs::create_dir_all(dir).map_err(|source| IoError::Open {
                            stream: name,
                            path: p.clone(),
                            source,
                        })?;
                    }
                    let f = tokio::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .await
                        .map_err(|source| IoError::Open {
                            stream: name,
                            path: p.clone(),
                            source,
                        })?;
                    Box::new(f)
                }
                IoTarget::Binary { path, args } => {
                    // One logger takes both streams.
                    if logger.is_none() {
                        let (l, out, err) =
                            start_logger(name, path, args, container, namespace).await?;
                        logger = Some(l);
                        writers.insert(StdioStream::Stdout, out);
                        writers.insert(StdioStream::Stderr, err);
                    }
                    continue;
                }
            };
            writers.insert(stream, w);
        }
        let mut outputs = Vec::new();
        for (stream, target) in [
            (StdioStream::Stdout, &stdout),
            (StdioStream::Stderr, &stderr),
        ] {
            if *target == IoTarget::None {
                continue;
            }
            let Some(w) = writers.remove(&stream) else {
                continue;
            };
            let conn = link.open_stream(&request(stream)).await?;
            let what = format!("{container}/{} {}", exec.unwrap_or("init"), stream.as_str());
            outputs.push(tokio::spawn(copy_out(conn, w, what)));
        }
        let (stdin_close, mut closed) = watch::channel(false);
        let stdin_task = match stdin {
            IoTarget::None => None,
            IoTarget::Fifo(p) => {
                let mut from = pipe::OpenOptions::new()
                    .open_receiver(&p)
                    .map_err(|source| IoError::Open {
                        stream: "stdin",
                        path: p.clone(),
                        source,
                    })?;
                let mut to = link.open_stream(&request(StdioStream::Stdin)).await?;
                Some(tokio::spawn(async move {
                    let mut buf = vec![0u8; 32 << 10];
                    loop {
                        let n = tokio::select! {
                            r = from.read(&mut buf) => match r {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            },
                            _ = closed.wait_for(|c| *c) => break,
                        };
                        if to.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    // EOF for the process.
                    let _ = to.shutdown().await;
                }))
            }
            other => {
                return Err(IoError::BadUri {
                    stream: "stdin",
                    uri: format!("{other:?}"),
                })
            }
        };
        Ok(Self {
            stdin: Mutex::new(stdin_task),
            stdin_close,
            outputs: Mutex::new(outputs),
            logger: Mutex::new(logger),
        })
    }

    /// CloseIO: the process gets EOF on stdin.
    pub async fn close_stdin(&self) {
        let _ = self.stdin_close.send(true);
        if let Some(task) = self.stdin.lock().await.take() {
            let _ = task.await;
        }
    }

    /// Wait until the output copies are done (the guest closed them), at most
    /// `limit`. True when everything was copied.
    pub async fn finish(&self, limit: Duration) -> bool {
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *self.outputs.lock().await);
        let all = async {
            for t in tasks {
                let _ = t.await;
            }
        };
        let done = tokio::time::timeout(limit, all).await.is_ok();
        if let Some(mut l) = self.logger.lock().await.take() {
            // The logger ends when its pipes close.
            let _ = tokio::time::timeout(Duration::from_secs(5), l.child.wait()).await;
        }
        done
    }

    /// Stop every copy now (the process or the VM is gone).
    pub async fn abort(&self) {
        let _ = self.stdin_close.send(true);
        if let Some(t) = self.stdin.lock().await.take() {
            t.abort();
        }
        for t in self.outputs.lock().await.drain(..) {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests;
