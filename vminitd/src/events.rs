//! Task events (exit, OOM) pushed to the host in the order they happened.
//! Owns the event queue and the one subscriber stream: a second subscriber
//! is refused (`ERR ...`) while the first is connected; a subscriber that
//! hung up, sent anything, or takes longer than [`SUBSCRIBER_WRITE_TIMEOUT`]
//! for one line is dropped. Events raised while no subscriber is connected
//! wait in a bounded queue. Wire format: one JSON object per line
//! (README.md).

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use beacon_common::guest_protocol::GuestEvent;

use crate::transport::BoxStream;

/// Events kept while no host is subscribed; the oldest are dropped beyond.
const MAX_PENDING: usize = 4096;

/// Longest time one line (or the `OK`) may take to reach the subscriber
/// before it is dropped as stuck.
pub const SUBSCRIBER_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer to a second subscriber.
pub const ERR_SUBSCRIBED: &[u8] = b"ERR an event subscriber is already connected (one at a time)\n";

pub use beacon_common::guest_protocol::{TOPIC_EXIT, TOPIC_OOM};

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
    /// The event as one JSON line, newline included, in the wire format of
    /// [`GuestEvent`] (shared with the shim).
    pub fn to_line(&self) -> Vec<u8> {
        match self {
            Event::Exit {
                container_id,
                id,
                pid,
                exit_status,
                exited_at,
            } => GuestEvent::Exit {
                container_id: container_id.clone(),
                id: id.clone(),
                pid: *pid,
                exit_status: *exit_status,
                exited_at: (*exited_at).into(),
            },
            Event::Oom { container_id } => GuestEvent::Oom {
                container_id: container_id.clone(),
            },
        }
        .to_line()
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

    /// Offers `stream` (its `EVENTS` line read) as the subscriber. It is
    /// answered `OK` and then gets the queued events; or, if a live
    /// subscriber is already connected, `ERR ...` and is closed.
    pub fn subscribe(&self, stream: BoxStream) {
        let _ = self.tx.send(Msg::Subscribe(stream));
    }
}

/// Whether the subscriber is still there: it never sends anything, so a
/// readable stream means it hung up (EOF, error) or broke the protocol.
fn gone(result: std::io::Result<usize>) -> &'static str {
    match result {
        Ok(0) => "hung up",
        Ok(_) => "sent data (subscribers only read): closing it",
        Err(_) => "connection failed",
    }
}

async fn write_line(s: &mut BoxStream, line: &[u8]) -> std::io::Result<()> {
    let write = async {
        s.write_all(line).await?;
        s.flush().await
    };
    tokio::time::timeout(SUBSCRIBER_WRITE_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("one line took over {SUBSCRIBER_WRITE_TIMEOUT:?}"),
            ))
        })
}

enum Wake {
    Msg(Option<Msg>),
    SubscriberGone(&'static str),
}

async fn publish(mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut pending: VecDeque<Vec<u8>> = VecDeque::new();
    let mut sub: Option<BoxStream> = None;
    let mut scratch = [0u8; 64];
    loop {
        let wake = match sub.as_mut() {
            Some(s) => tokio::select! {
                m = rx.recv() => Wake::Msg(m),
                r = s.read(&mut scratch) => Wake::SubscriberGone(gone(r)),
            },
            None => Wake::Msg(rx.recv().await),
        };
        let msg = match wake {
            Wake::Msg(Some(m)) => m,
            Wake::Msg(None) => break,
            Wake::SubscriberGone(why) => {
                tracing::info!("event subscriber {why}");
                sub = None;
                continue;
            }
        };
        match msg {
            Msg::Event(e) => {
                if pending.len() == MAX_PENDING {
                    tracing::warn!("no event subscriber: dropping the oldest event");
                    pending.pop_front();
                }
                pending.push_back(e.to_line());
            }
            Msg::Subscribe(mut s) => {
                // The current one may have hung up a moment ago: look once,
                // without waiting.
                if let Some(r) = sub
                    .as_mut()
                    .and_then(|c| c.read(&mut scratch).now_or_never())
                {
                    tracing::info!("event subscriber {}", gone(r));
                    sub = None;
                }
                if sub.is_some() {
                    tracing::warn!("second event subscriber refused");
                    // Its send buffer is empty: this never waits.
                    let _ = s.write_all(ERR_SUBSCRIBED).now_or_never();
                    continue;
                }
                match write_line(&mut s, b"OK\n").await {
                    Ok(()) => {
                        tracing::info!("event subscriber connected");
                        sub = Some(s);
                    }
                    Err(e) => tracing::warn!("event subscriber lost at once: {e}"),
                }
            }
        }
        while let (Some(s), Some(line)) = (sub.as_mut(), pending.front()) {
            match write_line(s, line).await {
                Ok(()) => {
                    pending.pop_front();
                }
                Err(e) => {
                    tracing::warn!("event subscriber dropped: {e}");
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
            exited_at: std::time::UNIX_EPOCH + std::time::Duration::new(5, 6),
        });
        let (ours, theirs) = tokio::io::duplex(4096);
        hub.subscribe(Box::new(ours));
        let mut lines = BufReader::new(theirs).lines();
        assert_eq!(lines.next_line().await.expect("io").as_deref(), Some("OK"));
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

    fn oom(c: &str) -> Event {
        Event::Oom {
            container_id: c.into(),
        }
    }

    async fn line(lines: &mut tokio::io::Lines<BufReader<tokio::io::DuplexStream>>) -> String {
        lines.next_line().await.expect("io").unwrap_or_default()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_second_subscriber_is_refused_and_the_first_keeps_its_events() {
        let hub = EventHub::start();
        let (a, a_peer) = tokio::io::duplex(4096);
        hub.subscribe(Box::new(a));
        let mut first = BufReader::new(a_peer).lines();
        assert_eq!(line(&mut first).await, "OK");
        let (b, b_peer) = tokio::io::duplex(4096);
        hub.subscribe(Box::new(b));
        let mut second = BufReader::new(b_peer).lines();
        assert_eq!(
            format!("{}\n", line(&mut second).await).as_bytes(),
            ERR_SUBSCRIBED
        );
        assert_eq!(second.next_line().await.expect("io"), None, "closed");
        hub.send(oom("x"));
        assert!(line(&mut first).await.contains("\"container_id\":\"x\""));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_subscriber_that_hung_up_is_replaced() {
        let hub = EventHub::start();
        let (a, a_peer) = tokio::io::duplex(4096);
        hub.subscribe(Box::new(a));
        let mut first = BufReader::new(a_peer).lines();
        assert_eq!(line(&mut first).await, "OK");
        drop(first);
        hub.send(oom("queued"));
        let (b, b_peer) = tokio::io::duplex(4096);
        hub.subscribe(Box::new(b));
        let mut second = BufReader::new(b_peer).lines();
        assert_eq!(line(&mut second).await, "OK");
        assert!(line(&mut second).await.contains("queued"));
    }

    /// A subscriber that stops reading holds the publisher for at most
    /// SUBSCRIBER_WRITE_TIMEOUT per line (virtual time here), then is
    /// dropped; the undelivered event waits for the next subscriber.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_stuck_subscriber_is_dropped() {
        let hub = EventHub::start();
        // Room for the OK and 8 bytes more: not for an event line.
        let (a, mut a_peer) = tokio::io::duplex(8);
        hub.subscribe(Box::new(a));
        let mut ok = [0u8; 3];
        a_peer.read_exact(&mut ok).await.expect("ok");
        assert_eq!(&ok, b"OK\n");
        hub.send(oom("late"));
        // a_peer reads no more. The next subscriber is answered only once
        // the publisher gave up on the stuck one.
        let (b, b_peer) = tokio::io::duplex(4096);
        hub.subscribe(Box::new(b));
        let mut second = BufReader::new(b_peer).lines();
        assert_eq!(line(&mut second).await, "OK");
        assert!(line(&mut second).await.contains("late"));
        // The stuck one was closed after the part that fit.
        let mut rest = Vec::new();
        a_peer.read_to_end(&mut rest).await.expect("eof");
        assert_eq!(rest.len(), 8, "{rest:?}");
    }
}
