//! The one place that calls `waitpid`. vminitd is PID 1 in the guest (and a
//! child subreaper on a host), so every orphan lands here: crun processes,
//! container inits and exec processes after crun exits, and anything they
//! leave behind. A single `waitpid(-1)` loop reaps them all, so no zombie
//! stays, and hands each status to whoever registered interest in that pid.
//!
//! Never use `std::process::Child::wait` or `tokio::process` in this crate:
//! they would race with this loop for the same statuses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use beacon_common::lock;
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How long an exit nobody asked for is kept, for a waiter that registers
/// late (a container init can exit before crun's pid file has been read).
const UNCLAIMED_TTL: Duration = Duration::from_secs(60);

/// How a process ended and when it was reaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, or 128 + signal number for a signal death.
    pub status: u32,
    /// Wall-clock time of the reap.
    pub at: SystemTime,
}

/// Maps a wait status onto the shell convention containerd uses.
pub fn exit_code(ws: WaitStatus) -> Option<u32> {
    match ws {
        WaitStatus::Exited(_, code) => Some(u32::try_from(code).unwrap_or(255)),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as u32),
        _ => None,
    }
}

#[derive(Default)]
struct Table {
    waiters: HashMap<i32, oneshot::Sender<ExitInfo>>,
    unclaimed: HashMap<i32, (ExitInfo, Instant)>,
}

/// Shared handle to the reaper's table of pid subscriptions.
#[derive(Clone, Default)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
}

impl Reaper {
    /// Creates the reaper and starts its SIGCHLD loop on the current runtime.
    pub fn start() -> std::io::Result<Reaper> {
        let reaper = Reaper::default();
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Returns a receiver that resolves when `pid` is reaped. If it already
    /// was (and nobody claimed it), resolves at once.
    pub fn subscribe(&self, pid: i32) -> oneshot::Receiver<ExitInfo> {
        let (tx, rx) = oneshot::channel();
        let mut t = self.lock();
        if let Some((info, _)) = t.unclaimed.remove(&pid) {
            let _ = tx.send(info);
        } else {
            t.waiters.insert(pid, tx);
        }
        rx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A poisoned lock only means a panic elsewhere; the table stays valid.
        lock(&self.table)
    }

    /// Reaps every child that has exited, without blocking.
    pub fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(ws) => {
                    let (Some(pid), Some(status)) = (ws.pid(), exit_code(ws)) else {
                        continue;
                    };
                    let info = ExitInfo {
                        status,
                        at: SystemTime::now(),
                    };
                    self.deliver(pid.as_raw(), info);
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("waitpid failed: {e}");
                    break;
                }
            }
        }
    }

    fn deliver(&self, pid: i32, info: ExitInfo) {
        let mut t = self.lock();
        if let Some(tx) = t.waiters.remove(&pid) {
            if tx.send(info).is_ok() {
                return;
            }
        }
        tracing::debug!(pid, status = info.status, "reaped unclaimed child");
        let now = Instant::now();
        t.unclaimed
            .retain(|_, (_, when)| now.duration_since(*when) < UNCLAIMED_TTL);
        t.unclaimed.insert(pid, (info, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn signal_deaths_are_128_plus_n() {
        let p = Pid::from_raw(5);
        assert_eq!(exit_code(WaitStatus::Exited(p, 3)), Some(3));
        assert_eq!(
            exit_code(WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(
            exit_code(WaitStatus::Signaled(p, Signal::SIGTERM, true)),
            Some(143)
        );
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn late_subscriber_gets_unclaimed_exit() {
        let reaper = Reaper::start().expect("reaper");
        // The reaper, not Child::wait, collects this child: that is the test.
        #[allow(clippy::zombie_processes)]
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 7"])
            .spawn()
            .expect("spawn sh");
        let pid = i32::try_from(child.id()).expect("pid fits");
        // Let it exit and be reaped before anyone subscribes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        reaper.reap_all();
        let info = tokio::time::timeout(Duration::from_secs(5), reaper.subscribe(pid))
            .await
            .expect("timely")
            .expect("delivered");
        assert_eq!(info.status, 7);
    }
}
