//! The one place that reaps. vminitd is PID 1 in the guest (and a child
//! subreaper on a host), so every orphan lands here: crun processes,
//! container inits and exec processes after crun exits, and anything they
//! leave behind. A single loop reaps them all, so no zombie stays, and hands
//! each exit to whoever registered interest in that process.
//!
//! A pid alone does not name a process: once reaped, it can be reused. So
//! exits are matched by identity, the pid plus the process's start time
//! (`/proc/<pid>/stat` field 22, clock ticks since boot), read from the
//! zombie before it is reaped. A subscriber names the pid and the span of
//! time the wanted process was born in (it started after crun was spawned
//! and before crun was reaped): an exit nobody asked for is handed only to
//! a subscriber whose span contains its start, so a new process that reuses
//! the pid of an unclaimed exit never receives it. Reaping and subscribing
//! hold the same lock, so a process seen alive by a subscriber cannot be
//! reaped unseen in between.
//!
//! Never use `std::process::Child::wait` or `tokio::process` in this crate:
//! they would race with this loop for the same statuses.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use beacon_common::lock;
use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How long an exit nobody asked for is kept, for a waiter that registers
/// late (a container init can exit before crun's pid file has been read).
const UNCLAIMED_TTL: Duration = Duration::from_secs(60);

/// Most unclaimed exits kept; containers can orphan processes at will, so
/// the oldest are dropped beyond this.
const MAX_UNCLAIMED: usize = 4096;

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

/// Boot-time clock ticks (the unit of `/proc/<pid>/stat` start times).
pub type Ticks = u64;

/// The start time of a process: field 22 of the text of `/proc/<pid>/stat`.
pub fn parse_start_time(stat: &str) -> Option<Ticks> {
    // The command (field 2) is in parentheses and may hold spaces or `)`;
    // the fields after the last `)` start with field 3 (state).
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The start time of the process now holding `pid` (alive or a zombie not
/// yet reaped), or None if there is none.
pub fn start_time(pid: i32) -> Option<Ticks> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// Now, in the clock and unit of process start times (CLOCK_BOOTTIME in
/// clock ticks, rounded down as the kernel rounds start times).
pub fn boot_ticks_now() -> Ticks {
    let Ok(ts) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) else {
        return 0;
    };
    let ns = u128::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u128::try_from(ts.tv_nsec()).unwrap_or(0);
    let per_tick = 1_000_000_000 / u128::from(ticks_per_second());
    u64::try_from(ns / per_tick.max(1)).unwrap_or(u64::MAX)
}

/// The span of boot-time ticks a wanted process was started in (both ends
/// included: start times have a tick's resolution).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BirthWindow {
    pub from: Ticks,
    pub to: Ticks,
}

impl BirthWindow {
    /// From `from` (taken before the process could exist) until now.
    pub fn since(from: Ticks) -> BirthWindow {
        BirthWindow {
            from,
            to: boot_ticks_now(),
        }
    }

    pub fn contains(&self, t: Ticks) -> bool {
        (self.from..=self.to).contains(&t)
    }
}

/// Why a subscription names no process whose exit can be reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// A live process holds the pid, but it started outside the window:
    /// it reused the pid of the one that was wanted, whose exit is unknown.
    #[error("pid {pid} now belongs to a process started at tick {start}, outside the expected {window:?}, and no exit of the expected process was seen")]
    NotOurs {
        pid: i32,
        start: Ticks,
        window: BirthWindow,
    },
    /// No process holds the pid and no exit of one born in the window was
    /// seen (it was reaped elsewhere, or its exit expired).
    #[error("process {pid} is gone and no exit of a process started in {window:?} was seen")]
    Gone { pid: i32, window: BirthWindow },
}

struct Waiter {
    /// Start time of the process when the waiter registered.
    start: Ticks,
    txs: Vec<oneshot::Sender<ExitInfo>>,
}

struct Unclaimed {
    pid: i32,
    /// None when the zombie's start time could not be read: then the exit
    /// can never be matched to a subscriber.
    start: Option<Ticks>,
    info: ExitInfo,
    reaped: Instant,
}

/// Exits and the subscribers waiting for them, matched by pid and start
/// time. Pure bookkeeping: the caller reads `/proc` and reaps.
#[derive(Default)]
pub struct ExitTable {
    /// By pid: while a process is unreaped no other can hold its pid, so
    /// a waiter registered for a live process is that process's.
    waiters: HashMap<i32, Waiter>,
    /// Oldest first.
    unclaimed: VecDeque<Unclaimed>,
}

impl ExitTable {
    /// Registers interest in the process `pid` born in `window`.
    /// `current_start` is the start time of the unreaped process holding
    /// `pid` right now (None if none), read while no reap can happen.
    pub fn subscribe(
        &mut self,
        pid: i32,
        window: BirthWindow,
        current_start: Option<Ticks>,
        now: Instant,
    ) -> Result<oneshot::Receiver<ExitInfo>, SubscribeError> {
        self.expire(now);
        let (tx, rx) = oneshot::channel();
        if let Some(start) = current_start.filter(|s| window.contains(*s)) {
            // Alive (or a zombie) and born in the window: ours, and its exit
            // is still to come.
            match self.waiters.get_mut(&pid) {
                Some(w) if w.start == start => w.txs.push(tx),
                _ => {
                    self.waiters.insert(
                        pid,
                        Waiter {
                            start,
                            txs: vec![tx],
                        },
                    );
                }
            }
            return Ok(rx);
        }
        let found = self
            .unclaimed
            .iter()
            .rposition(|u| u.pid == pid && u.start.is_some_and(|s| window.contains(s)));
        if let Some(u) = found.and_then(|i| self.unclaimed.remove(i)) {
            let _ = tx.send(u.info);
            return Ok(rx);
        }
        Err(match current_start {
            Some(start) => SubscribeError::NotOurs { pid, start, window },
            None => SubscribeError::Gone { pid, window },
        })
    }

    /// Records the exit of the process `pid` that started at `start`.
    pub fn deliver(&mut self, pid: i32, start: Option<Ticks>, info: ExitInfo, now: Instant) {
        if let Some(w) = self.waiters.remove(&pid) {
            // A waiter only exists for an unreaped process, and this is the
            // reap of the process holding the pid: the same one.
            if start.is_some_and(|s| s != w.start) {
                tracing::warn!(pid, ?start, waited = w.start, "start time changed");
            }
            for tx in w.txs {
                let _ = tx.send(info);
            }
            return;
        }
        tracing::debug!(pid, status = info.status, "reaped unclaimed child");
        self.expire(now);
        if self.unclaimed.len() >= MAX_UNCLAIMED {
            self.unclaimed.pop_front();
        }
        self.unclaimed.push_back(Unclaimed {
            pid,
            start,
            info,
            reaped: now,
        });
    }

    fn expire(&mut self, now: Instant) {
        while self
            .unclaimed
            .front()
            .is_some_and(|u| now.duration_since(u.reaped) >= UNCLAIMED_TTL)
        {
            self.unclaimed.pop_front();
        }
    }
}

/// Shared handle to the reaper's table of subscriptions.
#[derive(Clone, Default)]
pub struct Reaper {
    table: Arc<Mutex<ExitTable>>,
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

    /// Returns a receiver that resolves with the exit of the process `pid`
    /// that started in `window`: at once if it already was reaped, else
    /// when it is.
    pub fn subscribe(
        &self,
        pid: i32,
        window: BirthWindow,
    ) -> Result<oneshot::Receiver<ExitInfo>, SubscribeError> {
        let mut t = lock(&self.table);
        // Under the table lock no reap happens: whatever holds `pid` now
        // stays unreaped until we are done.
        let current = start_time(pid);
        t.subscribe(pid, window, current, Instant::now())
    }

    /// Reaps every child that has exited, without blocking.
    pub fn reap_all(&self) {
        loop {
            let mut t = lock(&self.table);
            // Peek first (WNOWAIT): the zombie keeps its /proc entry, and
            // with it its start time, until the waitpid below.
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
            let pid = match waitid(Id::All, flags) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(ws) => match ws.pid() {
                    Some(p) => p,
                    None => break,
                },
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("waitid failed: {e}");
                    break;
                }
            };
            let start = start_time(pid.as_raw());
            if start.is_none() {
                tracing::warn!(pid = pid.as_raw(), "no start time for a zombie");
            }
            let ws = loop {
                match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Err(Errno::EINTR) => continue,
                    other => break other,
                }
            };
            match ws {
                Ok(ws) => {
                    if let Some(status) = exit_code(ws) {
                        let info = ExitInfo {
                            status,
                            at: SystemTime::now(),
                        };
                        t.deliver(pid.as_raw(), start, info, Instant::now());
                    }
                }
                Err(e) => {
                    tracing::warn!(pid = pid.as_raw(), "waitpid failed: {e}");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

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

    #[test]
    fn start_time_is_field_22() {
        // A command with spaces and a `)` in it, as the kernel writes it.
        let stat = "42 (a) b c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 \
                    1000 50 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(123_456));
        assert_eq!(parse_start_time("42 (x) S 1"), None);
        assert_eq!(parse_start_time("garbage"), None);
        let me = i32::try_from(std::process::id()).expect("pid");
        let mine = start_time(me).expect("own start time");
        assert!(mine <= boot_ticks_now(), "a start time is in the past");
    }

    fn exit(status: u32) -> ExitInfo {
        ExitInfo {
            status,
            at: SystemTime::UNIX_EPOCH,
        }
    }

    fn window(from: Ticks, to: Ticks) -> BirthWindow {
        BirthWindow { from, to }
    }

    #[test]
    fn an_unclaimed_exit_is_not_handed_to_a_process_reusing_its_pid() {
        let now = Instant::now();
        let mut t = ExitTable::default();
        // An orphan with pid 300, started at tick 10, exits; nobody asked.
        t.deliver(300, Some(10), exit(0), now);
        // Later our exec gets pid 300 (started at tick 50) and is running.
        let mut rx = t
            .subscribe(300, window(40, 60), Some(50), now)
            .expect("subscribe");
        assert!(
            rx.try_recv().is_err(),
            "the orphan's exit was handed to the new process"
        );
        t.deliver(300, Some(50), exit(137), now);
        assert_eq!(rx.try_recv().expect("delivered").status, 137);
    }

    #[test]
    fn an_exit_before_the_subscription_is_found_even_if_the_pid_was_reused() {
        let now = Instant::now();
        let mut t = ExitTable::default();
        // An old orphan and then our process (tick 45), both with pid 300,
        // both reaped before anyone read the pid file; a third process
        // (tick 70) holds the pid now.
        t.deliver(300, Some(10), exit(1), now);
        t.deliver(300, Some(45), exit(3), now);
        let mut rx = t
            .subscribe(300, window(40, 60), Some(70), now)
            .expect("subscribe");
        assert_eq!(rx.try_recv().expect("resolved").status, 3);
        // The old orphan's exit is no one's.
        assert_eq!(
            t.subscribe(300, window(40, 60), None, now).map(drop),
            Err(SubscribeError::Gone {
                pid: 300,
                window: window(40, 60)
            })
        );
    }

    #[test]
    fn a_live_stranger_and_no_exit_is_an_error_not_a_wait() {
        let now = Instant::now();
        let mut t = ExitTable::default();
        let r = t.subscribe(77, window(40, 60), Some(99), now).map(drop);
        assert!(
            matches!(r, Err(SubscribeError::NotOurs { pid: 77, .. })),
            "{r:?}"
        );
        // Unknown start time: the exit is kept but matches nobody.
        t.deliver(78, None, exit(0), now);
        assert!(t.subscribe(78, window(0, u64::MAX), None, now).is_err());
    }

    #[test]
    fn unclaimed_exits_expire_and_are_capped() {
        let start = Instant::now();
        let mut t = ExitTable::default();
        t.deliver(5, Some(1), exit(0), start);
        let later = start + UNCLAIMED_TTL;
        assert!(t.subscribe(5, window(0, 9), None, later).is_err());
        for pid in 0..i32::try_from(MAX_UNCLAIMED + 10).expect("fits") {
            t.deliver(pid, Some(1), exit(0), later);
        }
        assert_eq!(t.unclaimed.len(), MAX_UNCLAIMED);
        // The oldest went first.
        assert!(t.subscribe(0, window(0, 9), None, later).is_err());
        assert!(t.subscribe(4000, window(0, 9), None, later).is_ok());
    }

    #[test]
    fn two_subscribers_of_one_process_both_hear() {
        let now = Instant::now();
        let mut t = ExitTable::default();
        let mut a = t.subscribe(9, window(1, 2), Some(2), now).expect("a");
        let mut b = t.subscribe(9, window(1, 2), Some(2), now).expect("b");
        t.deliver(9, Some(2), exit(4), now);
        assert_eq!(a.try_recv().expect("a").status, 4);
        assert_eq!(b.try_recv().expect("b").status, 4);
    }

    /// A child that exits before anyone subscribes is reaped, kept, and
    /// handed to the late subscriber. The test waits for the reap itself
    /// (the child's /proc entry disappears only when it is reaped), not for
    /// a guessed amount of time.
    #[tokio::test(flavor = "current_thread")]
    async fn late_subscriber_gets_unclaimed_exit() {
        let reaper = Reaper::start().expect("reaper");
        let from = boot_ticks_now();
        // The reaper, not Child::wait, collects this child: that is the test.
        #[allow(clippy::zombie_processes)]
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 7"])
            .spawn()
            .expect("spawn sh");
        let pid = i32::try_from(child.id()).expect("pid fits");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(Instant::now() < deadline, "child {pid} was never reaped");
            reaper.reap_all();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut rx = reaper
            .subscribe(pid, BirthWindow::since(from))
            .expect("the exit was kept");
        assert_eq!(rx.try_recv().expect("resolved at once").status, 7);
    }
}
