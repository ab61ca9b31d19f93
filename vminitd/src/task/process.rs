//! One container process (the init or an exec) as vminitd tracks it: its
//! pid, lifecycle state, stdio, pty size, and its exit, which is recorded
//! only after the output streams have drained and then announced as a
//! TaskExit event.

use std::sync::Mutex;
use std::time::Duration;

use beacon_common::lock;
use tokio::sync::{oneshot, watch};

use crate::error::{TaskError, TaskResult};
use crate::events::{Event, EventHub};
use crate::reaper::ExitInfo;
use crate::stdio::{drain, ProcessIo, StdioRequest, WinSize};

/// How long an exited process's output may take to drain before the exit
/// is reported anyway (a background child may hold the pipe open).
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Lifecycle of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    /// Registered (exec) or created by crun (init), not started.
    Created,
    Running,
    Stopped,
}

/// The stdio paths exactly as the host sent them (echoed back by State).
#[derive(Debug, Clone, Default)]
pub struct StdioNames {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioNames {
    /// Which streams to set up: a non-empty name means the host will
    /// connect that stream on the stream port.
    pub fn request(&self) -> StdioRequest {
        StdioRequest {
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            stderr: !self.stderr.is_empty() && !self.terminal,
            terminal: self.terminal,
        }
    }
}

struct Inner {
    pid: u32,
    state: ProcState,
    io: Option<ProcessIo>,
    /// The last size ResizePty asked for. An exec's pty exists only once it
    /// starts, and clients resize before Start (`ctr task exec -t` does):
    /// the size is kept, put in the exec's `consoleSize` for crun, and
    /// applied again when the pty arrives.
    console_size: Option<WinSize>,
}

/// One tracked process.
pub struct Process {
    pub names: StdioNames,
    /// For an exec: the OCI process JSON to run on Start.
    pub exec_spec: Option<serde_json::Value>,
    inner: Mutex<Inner>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    start_claimed: std::sync::atomic::AtomicBool,
}

impl Process {
    /// A process that is known but not yet running.
    pub fn new(names: StdioNames, exec_spec: Option<serde_json::Value>) -> Process {
        Process {
            names,
            exec_spec,
            inner: Mutex::new(Inner {
                pid: 0,
                state: ProcState::Created,
                io: None,
                console_size: None,
            }),
            exit_tx: watch::channel(None).0,
            start_claimed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// True for exactly one caller: the one allowed to start the process.
    pub fn claim_start(&self) -> bool {
        !self
            .start_claimed
            .swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// Gives the start back after a failed attempt.
    pub fn release_start(&self) {
        self.start_claimed
            .store(false, std::sync::atomic::Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    pub fn pid(&self) -> u32 {
        self.lock().pid
    }

    pub fn state(&self) -> ProcState {
        self.lock().state
    }

    pub fn set_running(&self) {
        let mut i = self.lock();
        if i.state == ProcState::Created {
            i.state = ProcState::Running;
        }
    }

    /// The exit, once recorded.
    pub fn exit(&self) -> Option<ExitInfo> {
        *self.exit_tx.borrow()
    }

    /// Waits for the exit to be recorded.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit_tx.subscribe();
        loop {
            if let Some(info) = *rx.borrow_and_update() {
                return info;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`, so this cannot happen while
                // we hold `&self`; wait forever rather than invent a status.
                std::future::pending::<()>().await;
            }
        }
    }

    /// ResizePty: resizes the live pty, or, for a terminal process not yet
    /// started, keeps the size for its start.
    pub fn resize(&self, size: WinSize) -> TaskResult<()> {
        if !self.names.terminal {
            return Err(TaskError::FailedPrecondition(
                "process has no terminal".into(),
            ));
        }
        let mut i = self.lock();
        if i.io.is_none() && i.state != ProcState::Created {
            return Err(TaskError::FailedPrecondition(
                "process is not running".into(),
            ));
        }
        i.console_size = Some(size);
        match &i.io {
            Some(io) => io.resize(size),
            None => Ok(()),
        }
    }

    /// The size the pty should have, if ResizePty named one.
    pub fn console_size(&self) -> Option<WinSize> {
        self.lock().console_size
    }

    /// Runs `f` on the live stdio, if any.
    pub fn with_io<T>(&self, f: impl FnOnce(&ProcessIo) -> T) -> Option<T> {
        self.lock().io.as_ref().map(f)
    }

    /// Records the pid and stdio of a process crun has just created, and
    /// spawns the task that reports its exit after draining its output.
    pub fn attach(
        self: &std::sync::Arc<Self>,
        pid: u32,
        mut io: ProcessIo,
        exited: oneshot::Receiver<ExitInfo>,
        events: EventHub,
        container_id: String,
        id: String,
    ) {
        let outputs = io.take_outputs();
        {
            let mut i = self.lock();
            // A resize that came while crun ran: the pty gets it now.
            if let Some(size) = i.console_size {
                if let Err(e) = io.resize(size) {
                    tracing::warn!(pid, "applying the requested pty size: {e}");
                }
            }
            i.pid = pid;
            i.io = Some(io);
        }
        let me = self.clone();
        tokio::spawn(async move {
            let Ok(info) = exited.await else {
                tracing::error!(pid, "reaper dropped the exit of a container process");
                return;
            };
            drain(outputs, DRAIN_LIMIT).await;
            me.lock().state = ProcState::Stopped;
            me.exit_tx.send_replace(Some(info));
            events.send(Event::Exit {
                container_id,
                id,
                pid,
                exit_status: info.status,
                exited_at: info.at,
            });
        });
    }

    /// Stops stdio copying (on delete).
    pub fn close_io(&self) {
        if let Some(io) = self.lock().io.take() {
            io.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(terminal: bool) -> StdioNames {
        StdioNames {
            stdout: "out".into(),
            terminal,
            ..Default::default()
        }
    }

    #[test]
    fn resize_before_start_is_kept_for_a_terminal() {
        let p = Process::new(names(true), None);
        assert_eq!(p.console_size(), None);
        p.resize(WinSize::from_request(100, 40))
            .expect("a created terminal process takes a size");
        p.resize(WinSize::from_request(70_000, 50))
            .expect("the last size wins");
        assert_eq!(
            p.console_size(),
            Some(WinSize {
                width: u16::MAX,
                height: 50
            })
        );
    }

    #[test]
    fn resize_without_a_terminal_or_after_the_end_is_refused() {
        let p = Process::new(names(false), None);
        let e = p
            .resize(WinSize::from_request(1, 1))
            .expect_err("no terminal");
        assert_eq!(e.code(), ttrpc::Code::FAILED_PRECONDITION);
        assert!(e.to_string().contains("no terminal"), "{e}");
        assert_eq!(p.console_size(), None);

        let p = Process::new(names(true), None);
        p.lock().state = ProcState::Stopped;
        let e = p
            .resize(WinSize::from_request(1, 1))
            .expect_err("finished, no pty");
        assert_eq!(e.code(), ttrpc::Code::FAILED_PRECONDITION);
    }
}
