//! One container process (the init or an exec) as vminitd tracks it: its
//! pid, lifecycle state, stdio, and its exit, which is recorded only after
//! the output streams have drained and then announced as a TaskExit event.

use std::sync::Mutex;
use std::time::Duration;

use beacon_common::lock;
use tokio::sync::{oneshot, watch};

use crate::events::{Event, EventHub};
use crate::reaper::ExitInfo;
use crate::stdio::{drain, ProcessIo, StdioRequest};

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
