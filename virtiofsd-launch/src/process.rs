//! One running virtiofsd: start-up, the watch on its life, and its end.
//!
//! A supervisor thread per virtiofsd blocks in `wait(2)` on it, so a death is
//! noticed the moment it happens, recorded ([`Virtiofsd::exited`]) and reported
//! to the owner's callback ([`Virtiofsd::on_exit`]) with the end of its log.
//! Signals go through a pidfd, so they can never hit a recycled pid after the
//! supervisor reaped the process. [`Virtiofsd::stop`] (and drop) asks virtiofsd
//! to end (SIGTERM), kills it after a grace period, joins the supervisor and the
//! log thread, and removes the socket file: nothing is left behind.
//!
//! This module never spawns directly (that is [`crate::launcher`]'s thread) and
//! never blocks anywhere but in its caller's thread or its own.

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::launcher::{self, lock};
use crate::stderr_log::StderrLog;
use crate::{find_binary, LaunchError, ShareConfig};

/// How long a SIGKILLed virtiofsd may take to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long to wait for the last holders of virtiofsd's stderr (its sandbox
/// children) to go after virtiofsd itself ended.
const LOG_WAIT: Duration = Duration::from_secs(2);

/// How a virtiofsd ended.
#[derive(Debug, Clone)]
pub struct Exited {
    /// Its wait status (`None` if it could not be collected).
    pub status: Option<ExitStatus>,
    /// The owner asked for the end ([`Virtiofsd::stop`] or drop); otherwise
    /// virtiofsd died on its own (crash, kill, its frontend hung up).
    pub requested: bool,
    /// The end of its log.
    pub stderr_tail: String,
}

impl Exited {
    /// "exit code N", "signal N" or "unknown status".
    pub fn status_text(&self) -> String {
        match self.status {
            Some(s) => match (s.code(), s.signal()) {
                (Some(c), _) => format!("exit code {c}"),
                (None, Some(sig)) => format!("signal {sig}"),
                _ => s.to_string(),
            },
            None => "unknown status".into(),
        }
    }
}

impl fmt::Display for Exited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.status_text())?;
        let last: Vec<&str> = self.stderr_tail.lines().rev().take(5).collect();
        if !last.is_empty() {
            write!(f, "; last log lines: ")?;
            for (i, l) in last.iter().rev().enumerate() {
                if i > 0 {
                    write!(f, " | ")?;
                }
                write!(f, "{}", l.trim())?;
            }
        }
        Ok(())
    }
}

type ExitCallback = Box<dyn FnOnce(&Exited) + Send>;

#[derive(Default)]
struct State {
    exited: Option<Exited>,
    on_exit: Option<ExitCallback>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop_requested: AtomicBool,
}

/// A running virtiofsd.
pub struct Virtiofsd {
    pid: u32,
    pidfd: OwnedFd,
    share: PathBuf,
    socket_path: PathBuf,
    shared: Arc<Shared>,
    supervisor: Option<JoinHandle<()>>,
    log: Arc<StderrLog>,
    /// Stopped and cleaned up (by stop, or a failed start).
    finished: bool,
}

impl fmt::Debug for Virtiofsd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Virtiofsd")
            .field("pid", &self.pid)
            .field("share", &self.share)
            .field("socket_path", &self.socket_path)
            .finish()
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::other("pid out of range"))?;
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Signal the process behind `pidfd`; ESRCH (already reaped) is not an error.
fn pidfd_signal(pidfd: &OwnedFd, signal: i32) {
    // SAFETY: pidfd_send_signal(2) with a valid pidfd we own, a signal number
    // and a null siginfo; it does not touch our memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!("signalling virtiofsd failed: {e}");
        }
    }
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

impl Virtiofsd {
    /// Start virtiofsd for `share` with the binary from [`find_binary`].
    pub fn spawn(share: &ShareConfig) -> Result<Self, LaunchError> {
        Self::spawn_with(&find_binary()?, share)
    }

    /// Start `binary` for `share` and wait until its socket exists.
    pub fn spawn_with(binary: &Path, share: &ShareConfig) -> Result<Self, LaunchError> {
        let mut me = Self::start_with(binary, share)?;
        me.wait_ready(share.ready_timeout)?;
        Ok(me)
    }

    /// Start virtiofsd for `share` with the binary from [`find_binary`],
    /// without waiting for its socket: the caller does other work meanwhile
    /// and calls [`Virtiofsd::wait_ready`] before anything connects.
    pub fn start(share: &ShareConfig) -> Result<Self, LaunchError> {
        Self::start_with(&find_binary()?, share)
    }

    /// [`Virtiofsd::start`] with `binary`.
    pub fn start_with(binary: &Path, share: &ShareConfig) -> Result<Self, LaunchError> {
        if !share.shared_dir.is_dir() {
            return Err(LaunchError::BadShare(share.shared_dir.clone()));
        }
        let socket_dir = share
            .socket_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !socket_dir.is_dir() {
            return Err(LaunchError::NoSocketDir(socket_dir.to_path_buf()));
        }
        match std::fs::remove_file(&share.socket_path) {
            Ok(()) => tracing::debug!(socket = ?share.socket_path, "removed a stale socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LaunchError::StaleSocket {
                    path: share.socket_path.clone(),
                    source,
                })
            }
        }
        let log_path = share.log_file();
        let pending =
            StderrLog::open(&log_path, share.log_max_bytes).map_err(|source| LaunchError::Log {
                path: log_path.clone(),
                source,
            })?;
        let spawn_err = |source| LaunchError::Spawn {
            binary: binary.to_path_buf(),
            source,
        };

        let mut cmd = Command::new(binary);
        cmd.args(share.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = launcher::spawn(cmd).map_err(spawn_err)?;
        let pid = child.id();
        // From here on every failure must kill and reap the child.
        let abandon = |mut child: std::process::Child| {
            let _ = child.kill();
            let _ = child.wait();
        };
        let Some(stderr) = child.stderr.take() else {
            abandon(child);
            return Err(spawn_err(std::io::Error::other("no stderr pipe")));
        };
        let log = match pending.drain(stderr) {
            Ok(log) => Arc::new(log),
            Err(e) => {
                abandon(child);
                return Err(spawn_err(e));
            }
        };
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                abandon(child);
                return Err(spawn_err(e));
            }
        };
        let shared = Arc::new(Shared::default());
        let supervisor = {
            let shared = shared.clone();
            let log = log.clone();
            std::thread::Builder::new()
                .name("vfsd-watch".into())
                .spawn(move || supervise(child, &shared, &log))
        };
        let supervisor = match supervisor {
            Ok(t) => t,
            Err(e) => {
                // The closure, and the Child in it, is gone: kill and reap by hand.
                pidfd_signal(&pidfd, libc::SIGKILL);
                let mut status = 0;
                // SAFETY: waitpid(2) on our own unreaped child, with a valid out pointer.
                unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
                return Err(spawn_err(e));
            }
        };
        Ok(Self {
            pid,
            pidfd,
            share: share.shared_dir.clone(),
            socket_path: share.socket_path.clone(),
            shared,
            supervisor: Some(supervisor),
            log,
            finished: false,
        })
    }

    /// Wait (at most `timeout`) until the vhost-user socket exists. On an
    /// error virtiofsd is stopped, and its last log lines are in the error.
    ///
    /// We only test for the socket file, never connect: virtiofsd serves exactly
    /// one vhost-user frontend and exits when that connection closes, so a probe
    /// connection would consume the share.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), LaunchError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exited) = self.exited() {
                // Its last words may still be in the pipe.
                self.log.wait_done(LOG_WAIT);
                let _ = self.shutdown(Duration::ZERO);
                return Err(LaunchError::Died {
                    share: self.share.clone(),
                    status: exited.status_text(),
                    stderr: self.log.tail(),
                });
            }
            if is_socket(&self.socket_path) {
                tracing::info!(share = ?self.share, socket = ?self.socket_path, log = ?self.log.path(), pid = self.pid, "virtiofsd ready");
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let _ = self.shutdown(Duration::ZERO);
                return Err(LaunchError::NotReady {
                    socket: self.socket_path.clone(),
                    timeout,
                    log: self.log.path().to_path_buf(),
                });
            }
            let guard = lock(&self.shared.state);
            if guard.exited.is_none() {
                let _ = self
                    .shared
                    .changed
                    .wait_timeout(guard, (deadline - now).min(Duration::from_millis(5)));
            }
        }
    }

    /// The vhost-user socket the VMM connects to.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The file virtiofsd's stderr goes to.
    pub fn log_path(&self) -> &Path {
        self.log.path()
    }

    /// The shared folder.
    pub fn shared_dir(&self) -> &Path {
        &self.share
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How it ended, once it has.
    pub fn exited(&self) -> Option<Exited> {
        lock(&self.shared.state).exited.clone()
    }

    /// Call `callback` once when virtiofsd ends (on the supervisor thread), or
    /// right away on this thread if it already has. Replaces an earlier callback.
    /// `Exited::requested` tells a death from a stop the owner asked for.
    pub fn on_exit(&self, callback: impl FnOnce(&Exited) + Send + 'static) {
        let mut state = lock(&self.shared.state);
        match state.exited.clone() {
            Some(exited) => {
                drop(state);
                callback(&exited);
            }
            None => state.on_exit = Some(Box::new(callback)),
        }
    }

    /// Wait up to `timeout` for virtiofsd to end on its own.
    pub fn wait_exit(&self, timeout: Duration) -> Option<Exited> {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.shared.state);
        loop {
            if let Some(e) = &state.exited {
                return Some(e.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            state = match self.shared.changed.wait_timeout(state, deadline - now) {
                Ok((s, _)) => s,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Ask virtiofsd to stop (SIGTERM), kill it after `grace`, reap it, and
    /// remove its socket; its log file stays.
    pub fn stop(mut self, grace: Duration) -> Result<Exited, LaunchError> {
        self.shutdown(grace)
    }

    fn shutdown(&mut self, grace: Duration) -> Result<Exited, LaunchError> {
        if !self.finished {
            self.shared.stop_requested.store(true, Ordering::SeqCst);
            let mut exited = None;
            if !grace.is_zero() {
                pidfd_signal(&self.pidfd, libc::SIGTERM);
                exited = self.wait_exit(grace);
            }
            if exited.is_none() {
                pidfd_signal(&self.pidfd, libc::SIGKILL);
                if self.wait_exit(KILL_WAIT).is_none() {
                    return Err(LaunchError::Unkillable {
                        pid: self.pid,
                        waited: KILL_WAIT,
                    });
                }
            }
            if let Some(t) = self.supervisor.take() {
                if t.join().is_err() {
                    tracing::error!(pid = self.pid, "the virtiofsd supervisor thread panicked");
                }
            }
            if !self.log.finish(LOG_WAIT) {
                tracing::warn!(
                    pid = self.pid,
                    "a process virtiofsd forked still holds its stderr; its log thread ends when that process does"
                );
            }
            match std::fs::remove_file(&self.socket_path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(socket = ?self.socket_path, "cannot remove virtiofsd's socket: {e}")
                }
            }
            self.finished = true;
        }
        self.exited().ok_or(LaunchError::Unkillable {
            pid: self.pid,
            waited: KILL_WAIT,
        })
    }
}

/// The supervisor thread: reap virtiofsd the moment it ends, record how, tell
/// the owner.
fn supervise(mut child: std::process::Child, shared: &Shared, log: &StderrLog) {
    let status = loop {
        match child.wait() {
            Ok(s) => break Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(pid = child.id(), "cannot wait for virtiofsd: {e}");
                break None;
            }
        }
    };
    // The report should carry its last words.
    log.wait_done(Duration::from_millis(500));
    let exited = Exited {
        status,
        requested: shared.stop_requested.load(Ordering::SeqCst),
        stderr_tail: log.tail(),
    };
    let callback = {
        let mut state = lock(&shared.state);
        state.exited = Some(exited.clone());
        state.on_exit.take()
    };
    shared.changed.notify_all();
    if !exited.requested {
        tracing::debug!(pid = child.id(), "virtiofsd ended on its own: {exited}");
    }
    if let Some(callback) = callback {
        callback(&exited);
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown(Duration::ZERO) {
            tracing::error!("{e}");
        }
    }
}
