//! Task events (exit, OOM) pushed to the host in the order they happened.
//! Owns the event queue and the one subscriber stream; events raised while
//! no subscriber is connected wait in a bounded queue. Wire format: one JSON
//! object per line (README.md).

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::transport::BoxStream;

/// Events kept while no host is subscribed; the oldest are dropped beyond.
const MAX_PENDING: usize = 4096;

/// Topic of an exit event (containerd's name).
pub const TOPIC_EXIT: &str = "/tasks/exit";
/// Topic of an OOM event (containerd's name).
pub const TOPIC_OOM: &str = "/tasks/oom";

/// Something the host must hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A container init or exec process ended.
    Exit {
        container_id: String,
        /// The exec id, or the container id for the init process.
        id: String,
        pid: u32,
        exit_status: u32,
        exited_at: SystemTime,
    },
    /// The container's cgroup saw an OOM kill.
    Oom { container_id: String },
}

impl Event {
    /// The event as one JSON line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let v = match self {
            Event::Exit {
                container_id,
                id,
                pid,
                exit_status,
                exited_at,
            } => {
                let d = exited_at.duration_since(UNIX_EPOCH).unwrap_or_default();
                serde_json::json!({
                    "topic": TOPIC_EXIT,
                    "container_id": container_id,
                    "id": id,
                    "pid": pid,
                    "exit_status": exit_status,
                    "exited_at": {"seconds": d.as_secs(), "nanos": d.subsec_nanos()},
                })
            }
            Event::Oom { container_id } => serde_json::json!({
                "topic": TOPIC_OOM,
                "container_id": container_id,
            }),
        };
        let mut line = v.to_string().into_bytes();
        line.push(b'\n');
        line
    }
}

enum Msg {
    Event(Event),
    Subscribe(BoxStream),
}

/// Handle for raising events and attaching the host's subscriber stream.
#[derive(Clone)]
pub struct EventHub {
    tx: mpsc::UnboundedSender<Msg>,
}

impl EventHub {
    /// Starts the publisher task on the current runtime.
    pub fn start() -> EventHub {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(publish(rx));
        EventHub { tx }
    }

    /// Queues an event; it reaches the host after every earlier one.
    pub fn send(&self, event: Event) {
        tracing::info!(?event, "event");
        let _ = self.tx.send(Msg::Event(event));
    }

    /// Makes `stream` the subscriber, replacing any earlier one.
    pub fn subscribe(&self, stream: BoxStream) {
        let _ = self.tx.send(Msg::Subscribe(stream));
    }
}

async fn publish(mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut pending: VecDeque<Vec<u8>> = VecDeque::new();
    let mut sub: Option<BoxStream> = None;
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Event(e) => {
                if pending.len() == MAX_PENDING {
                    tracing::warn!("no event subscriber: dropping the oldest event");
                    pending.pop_front();
                }
                pending.push_back(e.to_line());
            }
            Msg::Subscribe(s) => sub = Some(s),
        }
        while let (Some(s), Some(line)) = (sub.as_mut(), pending.front()) {
            let sent = async {
                s.write_all(line).await?;
                s.flush().await
            }
            .await;
            match sent {
                Ok(()) => {
                    pending.pop_front();
                }
                Err(e) => {
                    tracing::warn!("event subscriber gone: {e}");
                    sub = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};

    #[tokio::test(flavor = "current_thread")]
    async fn queued_events_arrive_in_order() {
        let hub = EventHub::start();
        hub.send(Event::Oom {
            container_id: "a".into(),
        });
        hub.send(Event::Exit {
            container_id: "a".into(),
            id: "a".into(),
            pid: 42,
            exit_status: 137,
            exited_at: UNIX_EPOCH + std::time::Duration::new(5, 6),
        });
        let (ours, theirs) = tokio::io::duplex(4096);
        hub.subscribe(Box::new(ours));
        let mut lines = BufReader::new(theirs).lines();
        let first: serde_json::Value =
            serde_json::from_str(&lines.next_line().await.expect("io").expect("line"))
                .expect("json");
        assert_eq!(first["topic"], TOPIC_OOM);
        let second: serde_json::Value =
            serde_json::from_str(&lines.next_line().await.expect("io").expect("line"))
                .expect("json");
        assert_eq!(second["topic"], TOPIC_EXIT);
        assert_eq!(second["exit_status"], 137);
        assert_eq!(second["exited_at"]["seconds"], 5);
        assert_eq!(second["exited_at"]["nanos"], 6);
    }
}
