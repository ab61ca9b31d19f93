//! The stream port: the handshake every stdio or event connection opens
//! with, and the rendezvous that pairs a host stream with the process pipe
//! waiting for it (in either order). Wire format: see README.md.
//!
//! Everything a peer can make vminitd hold here is bounded: a connection
//! must send its handshake line within [`StreamLimits::handshake_timeout`];
//! at most [`StreamLimits::max_handshaking`] connections may be in their
//! handshake at once (more are refused at once); a `STDIO` key is accepted
//! only if a Create or Exec announced it ([`StdioHub::reserve`]), and
//! announced streams nobody took are capped and expire. One event
//! subscriber at a time is the `events` module's rule.
//!
//! Owns only connection setup; copying bytes is `stdio`, events are
//! `events`, port forwards (`FORWARD`) are `forward`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beacon_common::lock;
use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::events::EventHub;
use crate::forward::{ForwardLimits, Forwards};
use crate::transport::{BoxStream, RefusalLog, StreamListener};

/// Longest handshake line accepted.
const MAX_HANDSHAKE: usize = 512;

/// What a peer of the stream port may make vminitd hold, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Time from accept to the end of the handshake (line read, reply sent).
    pub handshake_timeout: Duration,
    /// Connections in their handshake at once; beyond, refused at once.
    pub max_handshaking: usize,
    /// Announced streams not yet taken by their process (with or without a
    /// host connection parked on them), at most.
    pub max_pending_streams: usize,
    /// How long an announced stream waits for its process to take it.
    pub pending_ttl: Duration,
    /// `FORWARD` connections open at once, and their connect timeout.
    pub forwards: ForwardLimits,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            handshake_timeout: Duration::from_secs(10),
            max_handshaking: 32,
            max_pending_streams: 3 * 1024,
            pending_ttl: Duration::from_secs(120),
            forwards: ForwardLimits::default(),
        }
    }
}

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
    /// Join this connection to a TCP port of the guest's loopback.
    Forward(u16),
}

/// Parses one handshake line (without the newline), with the wire format of
/// [`beacon_common::guest_protocol::StreamRequest`], shared with the shim.
pub fn parse_handshake(line: &str) -> Result<Handshake, String> {
    use beacon_common::guest_protocol::{StdioStream, StreamRequest};
    match StreamRequest::parse(line).map_err(|e| e.to_string())? {
        StreamRequest::Events => Ok(Handshake::Events),
        StreamRequest::Forward { port } => Ok(Handshake::Forward(port)),
        StreamRequest::Stdio {
            container,
            exec,
            stream,
        } => Ok(Handshake::Stdio(StreamKey {
            container,
            exec: exec.unwrap_or_default(),
            kind: match stream {
                StdioStream::Stdin => StdioKind::Stdin,
                StdioStream::Stdout => StdioKind::Stdout,
                StdioStream::Stderr => StdioKind::Stderr,
            },
        })),
    }
}

enum Slot {
    /// A Create or Exec named this stream; neither side has come yet.
    Reserved { since: Instant },
    /// A host connection for it is being answered `OK`; `waiter` is the
    /// process, if it asked meanwhile.
    Connecting {
        since: Instant,
        waiter: Option<oneshot::Sender<BoxStream>>,
    },
    /// The host connected before the process asked.
    Parked { stream: BoxStream, since: Instant },
    /// The process asked; the host has not connected yet.
    Waiting(oneshot::Sender<BoxStream>),
}

impl Slot {
    /// Announced and not yet taken by its process: what the cap and the
    /// expiry apply to.
    fn pending_since(&self) -> Option<Instant> {
        match self {
            Slot::Reserved { since } | Slot::Parked { since, .. } => Some(*since),
            Slot::Connecting {
                since,
                waiter: None,
            } => Some(*since),
            Slot::Connecting {
                waiter: Some(_), ..
            }
            | Slot::Waiting(_) => None,
        }
    }
}

/// Why a host stream was not accepted (sent as `ERR <reason>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    #[error("no process expects stream {0}")]
    Unknown(String),
    #[error("stream {0} is already connected")]
    AlreadyConnected(String),
}

/// A host stream accepted by [`StdioHub::begin`]: answer it `OK`, then
/// hand it over with [`StdioHub::finish`].
#[derive(Debug)]
pub struct Admission {
    key: StreamKey,
}

fn describe(key: &StreamKey) -> String {
    let exec = if key.exec.is_empty() { "-" } else { &key.exec };
    format!("{} {exec} {:?}", key.container, key.kind).to_ascii_lowercase()
}

struct Slots {
    map: HashMap<StreamKey, Slot>,
    max_pending: usize,
    ttl: Duration,
}

impl Slots {
    fn expire(&mut self, now: Instant) {
        let ttl = self.ttl;
        self.map.retain(|key, slot| {
            let keep = slot
                .pending_since()
                .is_none_or(|since| now.duration_since(since) < ttl);
            if !keep {
                tracing::warn!(?key, "announced stream expired untaken");
            }
            keep
        });
    }
}

/// Pairs host stdio connections with the processes that expect them.
#[derive(Clone)]
pub struct StdioHub {
    slots: Arc<Mutex<Slots>>,
}

impl Default for StdioHub {
    fn default() -> Self {
        StdioHub::new(StreamLimits::default())
    }
}

impl StdioHub {
    pub fn new(limits: StreamLimits) -> StdioHub {
        StdioHub {
            slots: Arc::new(Mutex::new(Slots {
                map: HashMap::new(),
                max_pending: limits.max_pending_streams,
                ttl: limits.pending_ttl,
            })),
        }
    }

    /// Announces that the process behind `key` will use this stream, so the
    /// host may connect it from now on. Refused beyond the cap.
    pub fn reserve(&self, key: StreamKey) -> Result<(), String> {
        self.reserve_at(key, Instant::now())
    }

    fn reserve_at(&self, key: StreamKey, now: Instant) -> Result<(), String> {
        let mut s = lock(&self.slots);
        s.expire(now);
        if s.map.contains_key(&key) {
            return Ok(());
        }
        let pending = s
            .map
            .values()
            .filter(|v| v.pending_since().is_some())
            .count();
        if pending >= s.max_pending {
            return Err(format!(
                "{pending} announced streams are waiting for the host to connect \
                 (the most allowed): connect or delete some first"
            ));
        }
        s.map.insert(key, Slot::Reserved { since: now });
        Ok(())
    }

    /// A process asks for the host stream `key`; resolves once connected
    /// (at once if the host already did).
    pub fn expect(&self, key: StreamKey) -> oneshot::Receiver<BoxStream> {
        let (tx, rx) = oneshot::channel();
        let mut s = lock(&self.slots);
        match s.map.remove(&key) {
            Some(Slot::Parked { stream, .. }) => {
                let _ = tx.send(stream);
            }
            Some(Slot::Connecting { since, .. }) => {
                s.map.insert(
                    key,
                    Slot::Connecting {
                        since,
                        waiter: Some(tx),
                    },
                );
            }
            _ => {
                s.map.insert(key, Slot::Waiting(tx));
            }
        }
        rx
    }

    /// Admits a host connection for `key` if a process announced or asked
    /// for it and nobody connected it yet.
    pub fn begin(&self, key: StreamKey) -> Result<Admission, OfferError> {
        self.begin_at(key, Instant::now())
    }

    fn begin_at(&self, key: StreamKey, now: Instant) -> Result<Admission, OfferError> {
        let mut s = lock(&self.slots);
        s.expire(now);
        let next = match s.map.remove(&key) {
            Some(Slot::Reserved { since }) => Slot::Connecting {
                since,
                waiter: None,
            },
            Some(Slot::Waiting(tx)) => Slot::Connecting {
                since: now,
                waiter: Some(tx),
            },
            Some(other) => {
                s.map.insert(key.clone(), other);
                return Err(OfferError::AlreadyConnected(describe(&key)));
            }
            None => return Err(OfferError::Unknown(describe(&key))),
        };
        s.map.insert(key.clone(), next);
        Ok(Admission { key })
    }

    /// Hands an admitted stream over once it was answered. If answering
    /// failed (`answered` false) and no process took it yet, the stream is
    /// dropped and the host may connect again.
    pub fn finish(&self, admission: Admission, stream: BoxStream, answered: bool) {
        let key = admission.key;
        let mut s = lock(&self.slots);
        match s.map.remove(&key) {
            Some(Slot::Connecting {
                waiter: Some(tx), ..
            }) => {
                // Even a broken stream goes to the process: its copy task
                // then ends (and drains the pipe) instead of waiting forever.
                let _ = tx.send(stream);
            }
            Some(Slot::Connecting {
                since,
                waiter: None,
            }) => {
                let slot = if answered {
                    Slot::Parked { stream, since }
                } else {
                    Slot::Reserved { since }
                };
                s.map.insert(key, slot);
            }
            Some(other) => {
                s.map.insert(key, other);
            }
            // Forgotten meanwhile (the process was deleted): dropping the
            // stream closes it.
            None => {}
        }
    }

    /// Forgets every slot of one process (on delete or a failed start);
    /// parked host streams are closed.
    pub fn forget(&self, container: &str, exec: &str) {
        lock(&self.slots)
            .map
            .retain(|k, _| !(k.container == container && k.exec == exec));
    }

    /// Drops announced streams nobody took within the expiry.
    pub fn expire(&self) {
        lock(&self.slots).expire(Instant::now());
    }
}

/// Accepts stream connections forever and routes each one, within
/// `limits`.
pub async fn serve(
    mut listener: StreamListener,
    hub: StdioHub,
    events: EventHub,
    limits: StreamLimits,
) {
    let handshakes = Arc::new(Semaphore::new(limits.max_handshaking));
    let forwards = Forwards::new(limits.forwards);
    let mut busy_log = RefusalLog::default();
    let mut sweep = tokio::time::interval((limits.pending_ttl / 4).max(Duration::from_secs(1)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = sweep.tick() => {
                hub.expire();
                continue;
            }
        };
        match accepted {
            Ok(mut stream) => match handshakes.clone().try_acquire_owned() {
                Ok(permit) => {
                    let hub = hub.clone();
                    let events = events.clone();
                    let forwards = forwards.clone();
                    tokio::spawn(async move {
                        let to = Routes {
                            hub: &hub,
                            events: &events,
                            forwards: &forwards,
                        };
                        if let Err(e) = route(stream, permit, to, limits).await {
                            tracing::warn!("stream handshake failed: {e}");
                        }
                    });
                }
                Err(_) => {
                    if let Some(suppressed) = busy_log.record(Instant::now()) {
                        tracing::warn!(
                            suppressed,
                            "stream port: {} connections already in their handshake; refusing",
                            limits.max_handshaking
                        );
                    }
                    // A fresh socket's send buffer is empty: the line fits
                    // without waiting, and we never wait here.
                    let _ = stream
                        .write(b"ERR busy: too many connections in handshake\n")
                        .now_or_never();
                }
            },
            Err(e) => {
                tracing::warn!("stream accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
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

async fn reply(stream: &mut BoxStream, line: &[u8]) -> std::io::Result<()> {
    stream.write_all(line).await?;
    stream.flush().await
}

/// Where a connection can be handed on.
#[derive(Clone, Copy)]
struct Routes<'a> {
    hub: &'a StdioHub,
    events: &'a EventHub,
    forwards: &'a Forwards,
}

/// One connection's handshake. `_permit` counts it among the handshakes in
/// flight until this returns.
async fn route(
    mut stream: BoxStream,
    _permit: OwnedSemaphorePermit,
    to: Routes<'_>,
    limits: StreamLimits,
) -> std::io::Result<()> {
    let Routes {
        hub,
        events,
        forwards,
    } = to;
    let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
    let line = match tokio::time::timeout_at(deadline, read_line(&mut stream)).await {
        Ok(Ok(Some(line))) => line,
        // A connect-and-close probe (readiness checks): nothing to do.
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => {
            let _ = reply(&mut stream, format!("ERR {e}\n").as_bytes()).now_or_never();
            return Err(e);
        }
        Err(_) => {
            let _ = reply(&mut stream, b"ERR handshake timed out\n").now_or_never();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no handshake within {:?}", limits.handshake_timeout),
            ));
        }
    };
    match parse_handshake(&line) {
        // The event hub answers (`OK` or, with a subscriber already
        // connected, `ERR`): only it knows, in order with the events.
        Ok(Handshake::Events) => {
            events.subscribe(stream);
            Ok(())
        }
        Ok(Handshake::Forward(port)) => {
            let connected = tokio::time::timeout_at(deadline, forwards.connect(port))
                .await
                .unwrap_or_else(|_| Err("handshake timed out while connecting".into()));
            match connected {
                Ok(forward) => {
                    if tokio::time::timeout_at(deadline, reply(&mut stream, b"OK\n"))
                        .await
                        .is_ok_and(|r| r.is_ok())
                    {
                        tokio::spawn(forward.run(stream));
                    }
                }
                Err(why) => {
                    tracing::info!(port, "port forward refused: {why}");
                    let _ = tokio::time::timeout_at(
                        deadline,
                        reply(&mut stream, format!("ERR {why}\n").as_bytes()),
                    )
                    .await;
                }
            }
            Ok(())
        }
        Ok(Handshake::Stdio(key)) => match hub.begin(key.clone()) {
            Ok(admission) => {
                let answered = tokio::time::timeout_at(deadline, reply(&mut stream, b"OK\n"))
                    .await
                    .is_ok_and(|r| r.is_ok());
                hub.finish(admission, stream, answered);
                if answered {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!("answering {key:?} failed")))
                }
            }
            Err(why) => {
                tracing::warn!(?key, "stdio stream refused: {why}");
                let _ = tokio::time::timeout_at(
                    deadline,
                    reply(&mut stream, format!("ERR {why}\n").as_bytes()),
                )
                .await;
                Ok(())
            }
        },
        Err(why) => {
            let _ = tokio::time::timeout_at(
                deadline,
                reply(&mut stream, format!("ERR {why}\n").as_bytes()),
            )
            .await;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixStream;

    fn key(c: &str, kind: StdioKind) -> StreamKey {
        StreamKey {
            container: c.into(),
            exec: String::new(),
            kind,
        }
    }

    #[test]
    fn handshake_parsing() {
        assert_eq!(parse_handshake("EVENTS"), Ok(Handshake::Events));
        assert_eq!(
            parse_handshake("STDIO c1 - stdout"),
            Ok(Handshake::Stdio(key("c1", StdioKind::Stdout)))
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

    fn offer(hub: &StdioHub, k: StreamKey, s: BoxStream) -> Result<(), OfferError> {
        let a = hub.begin(k)?;
        hub.finish(a, s, true);
        Ok(())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn rendezvous_in_both_orders() {
        let hub = StdioHub::default();
        // Process first.
        hub.reserve(key("c", StdioKind::Stdout)).expect("reserve");
        let rx = hub.expect(key("c", StdioKind::Stdout));
        let (a, _b) = tokio::io::duplex(8);
        offer(&hub, key("c", StdioKind::Stdout), Box::new(a)).expect("offer");
        assert!(rx.await.is_ok());
        // Host first, then a duplicate is refused.
        hub.reserve(key("c", StdioKind::Stdin)).expect("reserve");
        let (c, _d) = tokio::io::duplex(8);
        offer(&hub, key("c", StdioKind::Stdin), Box::new(c)).expect("offer");
        let (e, _f) = tokio::io::duplex(8);
        assert!(matches!(
            offer(&hub, key("c", StdioKind::Stdin), Box::new(e)),
            Err(OfferError::AlreadyConnected(_))
        ));
        assert!(hub.expect(key("c", StdioKind::Stdin)).await.is_ok());
        // The process asking while the host's OK is on its way.
        hub.reserve(key("c", StdioKind::Stderr)).expect("reserve");
        let adm = hub.begin(key("c", StdioKind::Stderr)).expect("begin");
        let rx = hub.expect(key("c", StdioKind::Stderr));
        let (g, _h) = tokio::io::duplex(8);
        hub.finish(adm, Box::new(g), true);
        assert!(rx.await.is_ok());
    }

    #[test]
    fn unannounced_keys_are_refused() {
        let hub = StdioHub::default();
        let (a, _b) = tokio::io::duplex(8);
        assert_eq!(
            offer(&hub, key("c9", StdioKind::Stdout), Box::new(a)).map_err(|e| e.to_string()),
            Err("no process expects stream c9 - stdout".into())
        );
        // Announcing stdout does not open stdin.
        hub.reserve(key("c9", StdioKind::Stdout)).expect("reserve");
        assert!(hub.begin(key("c9", StdioKind::Stdin)).is_err());
        assert!(hub.begin(key("c9", StdioKind::Stdout)).is_ok());
    }

    #[test]
    fn announced_streams_are_capped_and_expire() {
        let ttl = Duration::from_secs(60);
        let hub = StdioHub::new(StreamLimits {
            max_pending_streams: 2,
            pending_ttl: ttl,
            ..StreamLimits::default()
        });
        let t0 = Instant::now();
        hub.reserve_at(key("a", StdioKind::Stdout), t0).expect("1");
        hub.reserve_at(key("b", StdioKind::Stdout), t0).expect("2");
        let e = hub
            .reserve_at(key("c", StdioKind::Stdout), t0)
            .expect_err("over the cap");
        assert!(e.contains("2 announced streams"), "{e}");
        // A stream its process asked for no longer counts.
        drop(hub.expect(key("a", StdioKind::Stdout)));
        hub.reserve_at(key("c", StdioKind::Stdout), t0)
            .expect("room again");
        // Parked streams expire with their announcement: the host's
        // connection is closed.
        let adm = hub
            .begin_at(key("b", StdioKind::Stdout), t0)
            .expect("begin");
        let (ours, mut theirs) = tokio::io::duplex(8);
        hub.finish(adm, Box::new(ours), true);
        let later = t0 + ttl;
        assert!(matches!(
            hub.begin_at(key("c", StdioKind::Stdout), later),
            Err(OfferError::Unknown(_))
        ));
        let mut buf = [0u8; 1];
        assert_eq!(
            theirs
                .read(&mut buf)
                .now_or_never()
                .expect("closed")
                .expect("eof"),
            0
        );
        // The one its process is waiting for does not expire.
        assert!(hub.begin_at(key("a", StdioKind::Stdout), later).is_ok());
    }

    /// A stream-port server on a unix socket in a temp dir.
    struct Port {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        hub: StdioHub,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Port {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn port(limits: StreamLimits) -> Port {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("streams.sock");
        let listener =
            StreamListener::bind(&crate::transport::ListenAddr::Unix(path.clone()), None)
                .expect("bind");
        let hub = StdioHub::new(limits);
        let task = tokio::spawn(serve(listener, hub.clone(), EventHub::start(), limits));
        Port {
            _dir: dir,
            path,
            hub,
            task,
        }
    }

    /// Sends `line` and returns the one-line answer ("" for a close).
    async fn ask(path: &std::path::Path, line: &str) -> (String, BufReader<UnixStream>) {
        let mut s = UnixStream::connect(path).await.expect("connect");
        s.write_all(line.as_bytes()).await.expect("write");
        let mut r = BufReader::new(s);
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(30), r.read_line(&mut answer))
            .await
            .expect("an answer or a close")
            .expect("read");
        (answer, r)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_flood_of_silent_connections_is_refused_beyond_the_cap() {
        let p = port(StreamLimits {
            max_handshaking: 4,
            handshake_timeout: Duration::from_secs(600),
            ..StreamLimits::default()
        });
        let mut silent = Vec::new();
        for _ in 0..4 {
            silent.push(UnixStream::connect(&p.path).await.expect("connect"));
        }
        // Accepts happen in order: by the time this one is accepted, the
        // four before it hold every handshake slot.
        let (answer, _) = ask(&p.path, "EVENTS\n").await;
        assert_eq!(answer, "ERR busy: too many connections in handshake\n");
        // One silent connection goes away: its slot is free again.
        drop(silent.pop());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (answer, _) = ask(&p.path, "EVENTS\n").await;
            if answer == "OK\n" {
                break;
            }
            assert!(Instant::now() < deadline, "no slot came free: {answer:?}");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_handshake_is_cut_off() {
        let p = port(StreamLimits {
            handshake_timeout: Duration::from_millis(300),
            ..StreamLimits::default()
        });
        p.hub
            .reserve(key("c1", StdioKind::Stdout))
            .expect("reserve");
        // Half a line, then nothing.
        let (answer, mut rest) = ask(&p.path, "STDIO c1 - std").await;
        assert_eq!(answer, "ERR handshake timed out\n");
        let mut more = Vec::new();
        rest.read_to_end(&mut more).await.expect("read");
        assert!(more.is_empty(), "closed after the error");
        // The key was never taken: a prompt connection still gets it.
        let (answer, _) = ask(&p.path, "STDIO c1 - stdout\n").await;
        assert_eq!(answer, "OK\n");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_unknown_key_is_refused_with_a_reason() {
        let p = port(StreamLimits::default());
        let (answer, _) = ask(&p.path, "STDIO ghost - stdout\n").await;
        assert_eq!(answer, "ERR no process expects stream ghost - stdout\n");
        p.hub
            .reserve(key("real", StdioKind::Stdout))
            .expect("reserve");
        let (answer, _kept) = ask(&p.path, "STDIO real - stdout\n").await;
        assert_eq!(answer, "OK\n");
        let (answer, _) = ask(&p.path, "STDIO real - stdout\n").await;
        assert_eq!(answer, "ERR stream real - stdout is already connected\n");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_second_event_subscriber_is_refused_until_the_first_leaves() {
        let p = port(StreamLimits::default());
        let (answer, first) = ask(&p.path, "EVENTS\n").await;
        assert_eq!(answer, "OK\n");
        let (answer, _) = ask(&p.path, "EVENTS\n").await;
        assert_eq!(
            answer,
            "ERR an event subscriber is already connected (one at a time)\n"
        );
        drop(first);
        let (answer, _) = ask(&p.path, "EVENTS\n").await;
        assert_eq!(answer, "OK\n");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_forward_reaches_the_loopback_port_or_says_why_not() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open = server.local_addr().expect("addr").port();
        let serving = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.expect("accept");
            s.write_all(b"hello from the guest").await.expect("write");
        });
        let p = port(StreamLimits::default());
        let (answer, mut rest) = ask(&p.path, &format!("FORWARD {open}\n")).await;
        assert_eq!(answer, "OK\n");
        let mut got = String::new();
        rest.read_to_string(&mut got).await.expect("read");
        assert_eq!(got, "hello from the guest");
        serving.await.expect("served");

        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind")
            .port();
        let (answer, _) = ask(&p.path, &format!("FORWARD {closed}\n")).await;
        assert!(
            answer.starts_with("ERR cannot connect 127.0.0.1:"),
            "{answer:?}"
        );
        let (answer, _) = ask(&p.path, "FORWARD 0\n").await;
        assert!(answer.starts_with("ERR "), "{answer:?}");
    }
}
