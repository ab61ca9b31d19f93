//! The stream port: the handshake every stdio or event connection opens
//! with, and the rendezvous that pairs a host stream with the process pipe
//! waiting for it (in either order). Wire format: see README.md.
//!
//! Owns only connection setup; copying bytes is `stdio`, events are `events`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use beacon_common::lock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::events::EventHub;
use crate::ids::valid_id;
use crate::transport::{BoxStream, StreamListener};

/// Longest handshake line accepted.
const MAX_HANDSHAKE: usize = 512;

/// Which stdio stream of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StdioKind {
    Stdin,
    Stdout,
    Stderr,
}

/// Identifies one stdio stream: container id, exec id ("" for init), kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamKey {
    pub container: String,
    pub exec: String,
    pub kind: StdioKind,
}

/// What a connection asked for in its first line.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    Stdio(StreamKey),
    Events,
}

/// Parses one handshake line (without the newline).
pub fn parse_handshake(line: &str) -> Result<Handshake, String> {
    let words: Vec<&str> = line.split(' ').collect();
    match words.as_slice() {
        ["EVENTS"] => Ok(Handshake::Events),
        ["STDIO", container, exec, kind] => {
            if !valid_id(container) {
                return Err(format!("bad container id {container:?}"));
            }
            let exec = if *exec == "-" {
                String::new()
            } else if valid_id(exec) {
                (*exec).to_string()
            } else {
                return Err(format!("bad exec id {exec:?}"));
            };
            let kind = match *kind {
                "stdin" => StdioKind::Stdin,
                "stdout" => StdioKind::Stdout,
                "stderr" => StdioKind::Stderr,
                other => return Err(format!("bad stream kind {other:?}")),
            };
            Ok(Handshake::Stdio(StreamKey {
                container: (*container).to_string(),
                exec,
                kind,
            }))
        }
        _ => Err("expected `STDIO <id> <exec-id|-> <stdin|stdout|stderr>` or `EVENTS`".into()),
    }
}

enum Slot {
    /// A process is waiting for the host to connect this stream.
    Waiting(oneshot::Sender<BoxStream>),
    /// The host connected before the process asked.
    Early(BoxStream),
}

/// Pairs host stdio connections with the processes that expect them.
#[derive(Clone, Default)]
pub struct StdioHub {
    slots: Arc<Mutex<HashMap<StreamKey, Slot>>>,
}

impl StdioHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StreamKey, Slot>> {
        lock(&self.slots)
    }

    /// A process asks for the host stream `key`; resolves once connected.
    pub fn expect(&self, key: StreamKey) -> oneshot::Receiver<BoxStream> {
        let (tx, rx) = oneshot::channel();
        let mut slots = self.lock();
        match slots.remove(&key) {
            Some(Slot::Early(stream)) => {
                let _ = tx.send(stream);
            }
            _ => {
                slots.insert(key, Slot::Waiting(tx));
            }
        }
        rx
    }

    /// Offers a host stream; refuses a second stream for the same key.
    fn offer(&self, key: StreamKey, stream: BoxStream) -> Result<(), String> {
        let mut slots = self.lock();
        match slots.remove(&key) {
            Some(Slot::Waiting(tx)) => match tx.send(stream) {
                Ok(()) => Ok(()),
                Err(_) => Err("the process no longer takes this stream".into()),
            },
            Some(early @ Slot::Early(_)) => {
                slots.insert(key, early);
                Err("stream already connected".into())
            }
            None => {
                slots.insert(key, Slot::Early(stream));
                Ok(())
            }
        }
    }

    /// Forgets every slot of a container (on delete).
    pub fn forget(&self, container: &str, exec: &str) {
        self.lock()
            .retain(|k, _| !(k.container == container && k.exec == exec));
    }
}

/// Accepts stream connections forever and routes each one.
pub async fn serve(mut listener: StreamListener, hub: StdioHub, events: EventHub) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let hub = hub.clone();
                let events = events.clone();
                tokio::spawn(async move {
                    if let Err(e) = route(stream, &hub, &events).await {
                        tracing::warn!("stream handshake failed: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("stream accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads the handshake line; None if the peer closed without sending any.
async fn read_line(stream: &mut BoxStream) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: whatever follows the newline belongs to the process.
    while line.len() < MAX_HANDSHAKE {
        if stream.read(&mut byte).await? == 0 {
            if line.is_empty() {
                return Ok(None);
            }
            break;
        }
        if byte[0] == b'\n' {
            return String::from_utf8(line)
                .map(Some)
                .map_err(|_| std::io::Error::other("handshake is not UTF-8"));
        }
        line.push(byte[0]);
    }
    Err(std::io::Error::other("handshake line missing or too long"))
}

async fn route(mut stream: BoxStream, hub: &StdioHub, events: &EventHub) -> std::io::Result<()> {
    let Some(line) = read_line(&mut stream).await? else {
        // A connect-and-close probe (readiness checks): nothing to do.
        return Ok(());
    };
    match parse_handshake(&line) {
        Ok(Handshake::Events) => {
            stream.write_all(b"OK\n").await?;
            events.subscribe(stream);
            Ok(())
        }
        Ok(Handshake::Stdio(key)) => {
            stream.write_all(b"OK\n").await?;
            stream.flush().await?;
            if let Err(why) = hub.offer(key.clone(), stream) {
                // The stream moved into the hub only on success; on refusal
                // it is dropped here, which closes it.
                tracing::warn!(?key, "stdio stream refused: {why}");
            }
            Ok(())
        }
        Err(why) => {
            stream.write_all(format!("ERR {why}\n").as_bytes()).await?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_parsing() {
        assert_eq!(parse_handshake("EVENTS"), Ok(Handshake::Events));
        assert_eq!(
            parse_handshake("STDIO c1 - stdout"),
            Ok(Handshake::Stdio(StreamKey {
                container: "c1".into(),
                exec: String::new(),
                kind: StdioKind::Stdout
            }))
        );
        assert_eq!(
            parse_handshake("STDIO c1 e2 stdin"),
            Ok(Handshake::Stdio(StreamKey {
                container: "c1".into(),
                exec: "e2".into(),
                kind: StdioKind::Stdin
            }))
        );
        assert!(parse_handshake("STDIO ../x - stdout").is_err());
        assert!(parse_handshake("STDIO -x - stdout").is_err());
        assert!(parse_handshake("STDIO c1 --help stdout").is_err());
        assert!(parse_handshake("STDIO c1 - stdweird").is_err());
        assert!(parse_handshake("STDIO c1 stdout").is_err());
        assert!(parse_handshake("").is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn rendezvous_in_both_orders() {
        let hub = StdioHub::default();
        let key = |k| StreamKey {
            container: "c".into(),
            exec: String::new(),
            kind: k,
        };
        // Process first.
        let rx = hub.expect(key(StdioKind::Stdout));
        let (a, _b) = tokio::io::duplex(8);
        hub.offer(key(StdioKind::Stdout), Box::new(a))
            .expect("offer");
        assert!(rx.await.is_ok());
        // Host first, then a duplicate is refused.
        let (c, _d) = tokio::io::duplex(8);
        hub.offer(key(StdioKind::Stdin), Box::new(c))
            .expect("offer");
        let (e, _f) = tokio::io::duplex(8);
        assert!(hub.offer(key(StdioKind::Stdin), Box::new(e)).is_err());
        assert!(hub.expect(key(StdioKind::Stdin)).await.is_ok());
    }
}
