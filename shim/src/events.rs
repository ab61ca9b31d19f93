//! The task events the shim publishes to containerd, in the order they happen:
//! `/tasks/create`, `start`, `exec-added`, `exec-started`, `oom`, `paused`,
//! `resumed`, `exit`, `delete`.
//!
//! containerd listens for them on its ttrpc address (`TTRPC_ADDRESS`, the
//! `Events/Forward` method). [`Publisher::publish`] never blocks the caller: it
//! queues (bounded; when containerd stops reading for long, the oldest events
//! beyond the bound are dropped with an error) and one task delivers them in
//! order, with a timeout per call and reconnects with back-off.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use containerd_shim_protos::api::ForwardRequest;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim_async::EventsClient;
use tokio::sync::Notify;

/// Events held while containerd does not take them.
pub const MAX_QUEUED: usize = 4096;
/// How long one delivery may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A protobuf timestamp.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

/// One task event.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskEvent {
    Create {
        container_id: String,
        bundle: String,
        stdin: String,
        stdout: String,
        stderr: String,
        terminal: bool,
        pid: u32,
    },
    Start {
        container_id: String,
        pid: u32,
    },
    ExecAdded {
        container_id: String,
        exec_id: String,
    },
    ExecStarted {
        container_id: String,
        exec_id: String,
        pid: u32,
    },
    Oom {
        container_id: String,
    },
    Paused {
        container_id: String,
    },
    Resumed {
        container_id: String,
    },
    Exit {
        container_id: String,
        /// The exec id, or the container id for the init process.
        id: String,
        pid: u32,
        exit_status: u32,
        exited_at: SystemTime,
    },
    Delete {
        container_id: String,
        pid: u32,
        exit_status: u32,
        exited_at: SystemTime,
    },
}

fn any_of(type_url: &str, msg: &dyn protobuf::MessageDyn) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: msg.write_to_bytes_dyn().unwrap_or_default(),
        ..Default::default()
    }
}

impl TaskEvent {
    /// containerd's topic for the event.
    pub fn topic(&self) -> &'static str {
        use containerd_shim_protos::topics::*;
        match self {
            Self::Create { .. } => TASK_CREATE_EVENT_TOPIC,
            Self::Start { .. } => TASK_START_EVENT_TOPIC,
            Self::ExecAdded { .. } => TASK_EXEC_ADDED_EVENT_TOPIC,
            Self::ExecStarted { .. } => TASK_EXEC_STARTED_EVENT_TOPIC,
            Self::Oom { .. } => TASK_OOM_EVENT_TOPIC,
            Self::Paused { .. } => TASK_PAUSED_EVENT_TOPIC,
            Self::Resumed { .. } => TASK_RESUMED_EVENT_TOPIC,
            Self::Exit { .. } => TASK_EXIT_EVENT_TOPIC,
            Self::Delete { .. } => TASK_DELETE_EVENT_TOPIC,
        }
    }

    /// The event as containerd's `Any` (type URLs are the proto message names).
    pub fn to_any(&self) -> Any {
        match self.clone() {
            Self::Create {
                container_id,
                bundle,
                stdin,
                stdout,
                stderr,
                terminal,
                pid,
            } => any_of(
                "containerd.events.TaskCreate",
                &TaskCreate {
                    container_id,
                    bundle,
                    io: MessageField::some(TaskIO {
                        stdin,
                        stdout,
                        stderr,
                        terminal,
                        ..Default::default()
                    }),
                    pid,
                    ..Default::default()
                },
            ),
            Self::Start { container_id, pid } => any_of(
                "containerd.events.TaskStart",
                &TaskStart {
                    container_id,
                    pid,
                    ..Default::default()
                },
            ),
            Self::ExecAdded {
                container_id,
                exec_id,
            } => any_of(
                "containerd.events.TaskExecAdded",
                &TaskExecAdded {
                    container_id,
                    exec_id,
                    ..Default::default()
                },
            ),
            Self::ExecStarted {
                container_id,
                exec_id,
                pid,
            } => any_of(
                "containerd.events.TaskExecStarted",
                &TaskExecStarted {
                    container_id,
                    exec_id,
                    pid,
                    ..Default::default()
                },
            ),
            Self::Oom { container_id } => any_of(
                "containerd.events.TaskOOM",
                &TaskOOM {
                    container_id,
                    ..Default::default()
                },
            ),
            Self::Paused { container_id } => any_of(
                "containerd.events.TaskPaused",
                &TaskPaused {
                    container_id,
                    ..Default::default()
                },
            ),
            Self::Resumed { container_id } => any_of(
                "containerd.events.TaskResumed",
                &TaskResumed {
                    container_id,
                    ..Default::default()
                },
            ),
            Self::Exit {
                container_id,
                id,
                pid,
                exit_status,
                exited_at,
            } => any_of(
                "containerd.events.TaskExit",
                &TaskExit {
                    container_id,
                    id,
                    pid,
                    exit_status,
                    exited_at: MessageField::some(timestamp(exited_at)),
                    ..Default::default()
                },
            ),
            Self::Delete {
                container_id,
                pid,
                exit_status,
                exited_at,
            } => any_of(
                "containerd.events.TaskDelete",
                &TaskDelete {
                    container_id,
                    pid,
                    exit_status,
                    exited_at: MessageField::some(timestamp(exited_at)),
                    ..Default::default()
                },
            ),
        }
    }
}

struct Queue {
    events: VecDeque<(SystemTime, TaskEvent)>,
    dropped: u64,
    closed: bool,
}

/// Delivers task events to containerd in order.
#[derive(Clone)]
pub struct Publisher {
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
    idle: Arc<Notify>,
}

impl Publisher {
    /// Start delivering to containerd's ttrpc `address` (`unix:///...` or a
    /// path) for `namespace`. Must be called inside a tokio runtime.
    pub fn spawn(address: String, namespace: String) -> Self {
        let publisher = Self {
            queue: Arc::new(Mutex::new(Queue {
                events: VecDeque::new(),
                dropped: 0,
                closed: false,
            })),
            wake: Arc::new(Notify::new()),
            idle: Arc::new(Notify::new()),
        };
        let worker = publisher.clone();
        tokio::spawn(async move { worker.deliver(address, namespace).await });
        publisher
    }

    /// Queue `event`; never blocks.
    pub fn publish(&self, event: TaskEvent) {
        let mut q = beacon_common::lock(&self.queue);
        if q.closed {
            return;
        }
        if q.events.len() >= MAX_QUEUED {
            q.events.pop_front();
            q.dropped += 1;
            tracing::error!(
                dropped = q.dropped,
                "containerd is not taking task events; the oldest queued one was dropped"
            );
        }
        tracing::debug!(topic = event.topic(), "event queued");
        q.events.push_back((SystemTime::now(), event));
        drop(q);
        self.wake.notify_one();
    }

    /// Wait until every queued event was delivered or given up on (at most
    /// `limit`), then stop taking new ones. The server calls this before it exits.
    pub async fn close(&self, limit: Duration) {
        let drained = async {
            loop {
                let idle = self.idle.notified();
                if beacon_common::lock(&self.queue).events.is_empty() {
                    break;
                }
                idle.await;
            }
        };
        if tokio::time::timeout(limit, drained).await.is_err() {
            tracing::warn!("task events still queued at exit were not delivered");
        }
        beacon_common::lock(&self.queue).closed = true;
        self.wake.notify_one();
    }

    async fn deliver(self, address: String, namespace: String) {
        let address = if address.contains("://") {
            address
        } else {
            format!("unix://{address}")
        };
        let mut client: Option<EventsClient> = None;
        let mut backoff = Duration::from_millis(50);
        loop {
            let next = {
                let q = beacon_common::lock(&self.queue);
                if q.closed && q.events.is_empty() {
                    return;
                }
                q.events.front().cloned()
            };
            let Some((when, event)) = next else {
                self.idle.notify_waiters();
                self.wake.notified().await;
                continue;
            };
            if client.is_none() {
                match ttrpc::asynchronous::Client::connect(&address).await {
                    Ok(c) => client = Some(EventsClient::new(c)),
                    Err(e) => {
                        tracing::warn!("cannot reach containerd at {address} for events: {e}");
                    }
                }
            }
            let delivered = match &client {
                Some(c) => {
                    let req = ForwardRequest {
                        envelope: MessageField::some(Envelope {
                            timestamp: MessageField::some(timestamp(when)),
                            namespace: namespace.clone(),
                            topic: event.topic().to_string(),
                            event: MessageField::some(event.to_any()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    };
                    let ctx = ttrpc::context::with_timeout(CALL_TIMEOUT.as_nanos() as i64);
                    match tokio::time::timeout(CALL_TIMEOUT, c.forward(ctx, &req)).await {
                        Ok(Ok(_)) => true,
                        Ok(Err(e)) => {
                            tracing::warn!(
                                topic = event.topic(),
                                "forwarding an event failed: {e}"
                            );
                            false
                        }
                        Err(_) => {
                            tracing::warn!(topic = event.topic(), "forwarding an event timed out");
                            false
                        }
                    }
                }
                None => false,
            };
            if delivered {
                beacon_common::lock(&self.queue).events.pop_front();
                backoff = Duration::from_millis(50);
            } else {
                client = None;
                let closed = beacon_common::lock(&self.queue).closed;
                if closed {
                    // Exiting: give up on what containerd would not take.
                    beacon_common::lock(&self.queue).events.clear();
                    continue;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests;
