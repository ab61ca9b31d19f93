//! Stdio of one container process (init or exec): the pipes or pty it gets
//! from crun, the copy tasks that join them to the host's streams, stdin
//! close (CloseIO), pty resize, and draining output before an exit is
//! reported. Connection setup is `streams`; this module only copies.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle};

use crate::crun::ProcessStdio;
use crate::error::{TaskError, TaskResult};
use crate::fdio::{pipe, FdStream};
use crate::streams::{StdioHub, StdioKind, StreamKey};
use crate::transport::BoxStream;

/// How long crun may take to pass the pty master after it returned.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Which streams the host asked for (non-empty paths in the Task request).
#[derive(Debug, Clone, Copy, Default)]
pub struct StdioRequest {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub terminal: bool,
}

impl StdioRequest {
    /// The host streams this request makes vminitd expect.
    pub fn kinds(&self) -> Vec<StdioKind> {
        [
            (self.stdin, StdioKind::Stdin),
            (self.stdout, StdioKind::Stdout),
            (self.stderr && !self.terminal, StdioKind::Stderr),
        ]
        .into_iter()
        .filter_map(|(on, kind)| on.then_some(kind))
        .collect()
    }
}

/// A terminal size in character cells, as the pty keeps it (16 bits each;
/// larger requests are clamped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WinSize {
    pub width: u16,
    pub height: u16,
}

impl WinSize {
    /// From a ResizePty request's width and height.
    pub fn from_request(width: u32, height: u32) -> WinSize {
        WinSize {
            width: u16::try_from(width).unwrap_or(u16::MAX),
            height: u16::try_from(height).unwrap_or(u16::MAX),
        }
    }

    /// The OCI `process.consoleSize` object: crun sets it on the pty before
    /// the process runs.
    pub fn console_size_json(self) -> serde_json::Value {
        serde_json::json!({"height": self.height, "width": self.width})
    }
}

/// Our ends of a process's stdio, made before crun runs.
pub struct StdioSetup {
    container: String,
    exec: String,
    stdin_w: Option<OwnedFd>,
    stdout_r: Option<OwnedFd>,
    stderr_r: Option<OwnedFd>,
    console: Option<(UnixListener, PathBuf)>,
    req: StdioRequest,
}

/// Live stdio of a running process.
pub struct ProcessIo {
    stdin_close: Arc<Notify>,
    pty: Option<OwnedFd>,
    tasks: Vec<AbortHandle>,
    /// Output copiers; taken by whoever reports the exit, to drain first.
    outputs: Vec<JoinHandle<()>>,
}

impl StdioSetup {
    /// Makes pipes (or a console socket in `console_dir` for a terminal) and
    /// returns the descriptors crun hands to the process. Socket names are
    /// short serial numbers: unix socket paths are limited to 108 bytes.
    pub fn prepare(
        container: &str,
        exec: &str,
        req: StdioRequest,
        console_dir: &Path,
    ) -> TaskResult<(StdioSetup, ProcessStdio, Option<PathBuf>)> {
        let mut setup = StdioSetup {
            container: container.to_string(),
            exec: exec.to_string(),
            stdin_w: None,
            stdout_r: None,
            stderr_r: None,
            console: None,
            req,
        };
        let mut child = ProcessStdio {
            stdin: None,
            stdout: None,
            stderr: None,
        };
        let pipe_err = |e| TaskError::io("create stdio pipe", e);
        if req.terminal {
            static SERIAL: AtomicU64 = AtomicU64::new(0);
            let n = SERIAL.fetch_add(1, Ordering::Relaxed);
            let path = console_dir.join(format!("{n}.sock"));
            let _ = std::fs::remove_file(&path);
            let l = UnixListener::bind(&path)
                .map_err(|e| TaskError::io(format!("bind {}", path.display()), e))?;
            setup.console = Some((l, path.clone()));
            return Ok((setup, child, Some(path)));
        }
        if req.stdin {
            let (r, w) = pipe().map_err(pipe_err)?;
            child.stdin = Some(r);
            setup.stdin_w = Some(w);
        }
        if req.stdout {
            let (r, w) = pipe().map_err(pipe_err)?;
            child.stdout = Some(w);
            setup.stdout_r = Some(r);
        }
        if req.stderr {
            let (r, w) = pipe().map_err(pipe_err)?;
            child.stderr = Some(w);
            setup.stderr_r = Some(r);
        }
        Ok((setup, child, None))
    }

    fn key(&self, kind: StdioKind) -> StreamKey {
        StreamKey {
            container: self.container.clone(),
            exec: self.exec.clone(),
            kind,
        }
    }

    /// After crun succeeded: starts the copy tasks.
    pub async fn activate(mut self, hub: &StdioHub) -> TaskResult<ProcessIo> {
        let stdin_close = Arc::new(Notify::new());
        let mut io = ProcessIo {
            stdin_close: stdin_close.clone(),
            pty: None,
            tasks: Vec::new(),
            outputs: Vec::new(),
        };
        let wrap = |fd, eio| FdStream::new(fd, eio).map_err(|e| TaskError::io("stdio fd", e));
        if let Some((listener, path)) = self.console.take() {
            let master = receive_console(&listener).await;
            let _ = std::fs::remove_file(&path);
            let master = master?;
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .map_err(|e| TaskError::io("dup pty master", e))
            };
            if self.req.stdin {
                let w = wrap(dup(&master)?, true)?;
                let rx = hub.expect(self.key(StdioKind::Stdin));
                let t = tokio::spawn(copy_in(rx, w, stdin_close.clone()));
                io.tasks.push(t.abort_handle());
            }
            if self.req.stdout {
                let r = wrap(dup(&master)?, true)?;
                let rx = hub.expect(self.key(StdioKind::Stdout));
                let t = tokio::spawn(copy_out(rx, r));
                io.tasks.push(t.abort_handle());
                io.outputs.push(t);
            }
            io.pty = Some(master);
            return Ok(io);
        }
        if let Some(w) = self.stdin_w.take() {
            let w = wrap(w, false)?;
            let rx = hub.expect(self.key(StdioKind::Stdin));
            let t = tokio::spawn(copy_in(rx, w, stdin_close.clone()));
            io.tasks.push(t.abort_handle());
        }
        for (fd, kind) in [
            (self.stdout_r.take(), StdioKind::Stdout),
            (self.stderr_r.take(), StdioKind::Stderr),
        ] {
            if let Some(fd) = fd {
                let r = wrap(fd, false)?;
                let rx = hub.expect(self.key(kind));
                let t = tokio::spawn(copy_out(rx, r));
                io.tasks.push(t.abort_handle());
                io.outputs.push(t);
            }
        }
        Ok(io)
    }
}

impl Drop for StdioSetup {
    fn drop(&mut self) {
        if let Some((_, path)) = &self.console {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl ProcessIo {
    /// Closes the process's stdin (CloseIO); buffered input is dropped.
    pub fn close_stdin(&self) {
        self.stdin_close.notify_one();
    }

    /// Resizes the pty; an error if the process has no terminal.
    pub fn resize(&self, size: WinSize) -> TaskResult<()> {
        let Some(pty) = &self.pty else {
            return Err(TaskError::FailedPrecondition(
                "process has no terminal".into(),
            ));
        };
        let ws = libc::winsize {
            ws_row: size.height,
            ws_col: size.width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer to a
        // live local; the fd is an open pty master we own.
        let rc = unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc != 0 {
            return Err(TaskError::io("resize pty", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Takes the output copiers, so the exit can wait for them to drain.
    pub fn take_outputs(&mut self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut self.outputs)
    }

    /// Stops every copy task (on delete).
    pub fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Waits for output copiers to finish, at most `limit` in total.
pub async fn drain(outputs: Vec<JoinHandle<()>>, limit: Duration) {
    let all = async {
        for t in outputs {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(limit, all).await.is_err() {
        tracing::warn!("stdio did not drain in {limit:?}; reporting exit anyway");
    }
}

async fn receive_console(listener: &UnixListener) -> TaskResult<OwnedFd> {
    let (conn, _) = tokio::time::timeout(CONSOLE_TIMEOUT, listener.accept())
        .await
        .map_err(|_| TaskError::FailedPrecondition("crun never sent the pty master".into()))?
        .map_err(|e| TaskError::io("accept console socket", e))?;
    let conn = conn
        .into_std()
        .map_err(|e| TaskError::io("console socket", e))?;
    conn.set_nonblocking(false)
        .map_err(|e| TaskError::io("console socket", e))?;
    tokio::task::spawn_blocking(move || -> TaskResult<OwnedFd> {
        let mut buf = [0u8; 256];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| TaskError::io("receive pty master", e.into()))?;
        for c in msg
            .cmsgs()
            .map_err(|e| TaskError::io("pty cmsg", e.into()))?
        {
            if let ControlMessageOwned::ScmRights(fds) = c {
                if let Some(&fd) = fds.first() {
                    // SAFETY: the kernel just installed this descriptor in
                    // our table for us (SCM_RIGHTS); nothing else owns it.
                    return Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
                }
            }
        }
        Err(TaskError::FailedPrecondition(
            "console socket message carried no descriptor".into(),
        ))
    })
    .await
    .map_err(|e| TaskError::io("console task", std::io::Error::other(e)))?
}

/// Host stream → process stdin, until EOF, error, or CloseIO.
async fn copy_in(
    stream: tokio::sync::oneshot::Receiver<BoxStream>,
    mut to: impl AsyncWrite + Unpin,
    close: Arc<Notify>,
) {
    let mut from = tokio::select! {
        s = stream => match s { Ok(s) => s, Err(_) => return },
        _ = close.notified() => return,
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => { tracing::debug!("stdin stream ended: {e}"); break; }
            },
            _ = close.notified() => break,
        };
        let chunk = buf.get(..n).unwrap_or_default();
        tokio::select! {
            w = to.write_all(chunk) => if w.is_err() { break },
            _ = close.notified() => break,
        }
    }
    // Dropping `to` closes the pipe: the process reads EOF.
}

/// Process output → host stream, until the process side reaches EOF.
async fn copy_out(stream: tokio::sync::oneshot::Receiver<BoxStream>, mut from: FdStream) {
    let mut buf = vec![0u8; 16 * 1024];
    let Ok(mut to) = stream.await else {
        // No host stream will come (the process was forgotten): drain, so
        // the process never blocks on a full pipe.
        while matches!(from.read(&mut buf).await, Ok(n) if n > 0) {}
        return;
    };
    loop {
        match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if to
                    .write_all(buf.get(..n).unwrap_or_default())
                    .await
                    .is_err()
                {
                    // The host went away: keep draining so the process
                    // never blocks on a full pipe.
                    while matches!(from.read(&mut buf).await, Ok(n) if n > 0) {}
                    return;
                }
            }
            Err(e) => {
                tracing::debug!("output read ended: {e}");
                break;
            }
        }
    }
    let _ = to.shutdown().await;
}
