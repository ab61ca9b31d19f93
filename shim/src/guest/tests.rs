use std::path::Path;

use beacon_common::guest_protocol::{StdioStream, WireTime};
use tokio::net::UnixListener;

use super::*;

/// A fake hybrid vsock socket: answers each connection with `reply` after it
/// read the CONNECT line, then echoes.
async fn fake_hybrid(path: &Path, reply: &'static [u8]) {
    let listener = UnixListener::bind(path).expect("bind");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut reader = BufReader::new(&mut s);
                let mut line = String::new();
                if reader.read_line(&mut line).await.is_err() || !line.starts_with("CONNECT ") {
                    return;
                }
                if reply.is_empty() || s.write_all(reply).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

#[tokio::test]
async fn hybrid_dial_speaks_the_connect_protocol() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("v.sock");
    fake_hybrid(&uds, b"OK 1073741824\n").await;
    let link = GuestLink::Hybrid { uds };
    let mut s = link.dial(1024).await.expect("dial");
    s.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn hybrid_refusals_and_garbage_are_errors_not_hangs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let refused = dir.path().join("r.sock");
    fake_hybrid(&refused, b"").await; // closes without a reply
    let err = GuestLink::Hybrid { uds: refused }
        .dial(1024)
        .await
        .expect_err("refused");
    assert!(matches!(err, GuestError::Connect { .. }), "{err}");
    let garbage = dir.path().join("g.sock");
    fake_hybrid(&garbage, &[b'x'; 200]).await;
    let err = GuestLink::Hybrid { uds: garbage }
        .dial(1024)
        .await
        .expect_err("garbage");
    assert!(err.to_string().contains("longer than"), "{err}");
    let nothing = dir.path().join("none.sock");
    let err = GuestLink::Hybrid { uds: nothing }
        .dial(1024)
        .await
        .expect_err("absent");
    assert!(matches!(err, GuestError::Connect { .. }));
}

#[tokio::test]
async fn a_silent_guest_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("s.sock");
    let listener = UnixListener::bind(&uds).expect("bind");
    let _held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            conns.push(s);
        }
    });
    let err = GuestLink::Hybrid { uds }
        .dial(1024)
        .await
        .expect_err("silent");
    assert!(matches!(err, GuestError::Timeout { .. }), "{err}");
}

/// A fake vminitd stream port: OK, then `lines`, then EOF.
async fn fake_streams(path: &Path, first: &'static str, lines: Vec<Vec<u8>>) {
    let listener = UnixListener::bind(path).expect("bind");
    tokio::spawn(async move {
        if let Ok((mut s, _)) = listener.accept().await {
            let mut line = String::new();
            let mut reader = BufReader::new(&mut s);
            let _ = reader.read_line(&mut line).await;
            let _ = s.write_all(first.as_bytes()).await;
            for l in lines {
                let _ = s.write_all(&l).await;
            }
        }
    });
}

#[tokio::test]
async fn events_are_parsed_and_garbage_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let streams = dir.path().join("streams.sock");
    let exit = GuestEvent::Exit {
        container_id: "c1".into(),
        id: "c1".into(),
        pid: 9,
        exit_status: 3,
        exited_at: WireTime {
            seconds: 5,
            nanos: 6,
        },
    };
    let oom = GuestEvent::Oom {
        container_id: "c1".into(),
    };
    let mut long = vec![b'{'; 10_000];
    long.push(b'\n');
    fake_streams(
        &streams,
        "OK\n",
        vec![
            exit.to_line(),
            b"not json\n".to_vec(),
            long,
            br#"{"topic":"/tasks/exit","container_id":"-rf","id":"x","pid":1,"exit_status":0,"exited_at":{"seconds":0,"nanos":0}}"#.to_vec(),
            b"\n".to_vec(),
            oom.to_line(),
        ],
    )
    .await;
    let link = GuestLink::Unix {
        task: dir.path().join("task.sock"),
        streams,
    };
    let mut rx = link.subscribe_events().await.expect("subscribe");
    assert_eq!(rx.recv().await, Some(exit));
    assert_eq!(rx.recv().await, Some(oom));
    assert_eq!(rx.recv().await, None, "ends with the stream");
}

#[tokio::test]
async fn a_refused_stream_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let streams = dir.path().join("streams.sock");
    fake_streams(&streams, "ERR no such process\n", Vec::new()).await;
    let link = GuestLink::Unix {
        task: dir.path().join("task.sock"),
        streams,
    };
    let err = link
        .open_stream(&StreamRequest::Stdio {
            container: "c1".into(),
            exec: None,
            stream: StdioStream::Stdout,
        })
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("no such process"), "{err}");
}

#[tokio::test]
async fn connecting_gives_up_when_the_vm_ends_or_time_runs_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = GuestLink::Hybrid {
        uds: dir.path().join("absent.sock"),
    };
    let ended = link
        .connect_task(Duration::from_secs(60), || true, None)
        .await;
    assert!(matches!(ended, Err(GuestError::VmEnded)));
    let not_up = link
        .connect_task(Duration::from_millis(100), || false, None)
        .await;
    assert!(matches!(not_up, Err(GuestError::NotUp(_))));
}

/// A hybrid socket whose guest "boots" until `up` is set: connections are
/// counted and refused (closed) until then, answered with OK after.
async fn booting_hybrid(
    path: &Path,
    up: Arc<std::sync::atomic::AtomicBool>,
    attempts: Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::Ordering;
    let listener = UnixListener::bind(path).expect("bind");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            attempts.fetch_add(1, Ordering::SeqCst);
            if up.load(Ordering::SeqCst) {
                let _ = s.write_all(b"OK 1073741824\n").await;
                // Keep it open for the client.
                tokio::spawn(async move {
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                });
            }
        }
    });
}

#[tokio::test]
async fn the_ready_signal_replaces_polling_a_booting_guest() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("v.sock");
    let (up, attempts) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    booting_hybrid(&uds, up.clone(), attempts.clone()).await;
    let ready_path = dir.path().join(format!("v.sock_{READY_PORT}"));
    // A stale socket file from a killed shim is replaced.
    drop(std::os::unix::net::UnixListener::bind(&ready_path).expect("stale socket"));
    let ready = ReadySignal::listen(&uds).expect("listen over a stale socket");
    assert!(ready_path.exists(), "the signal's socket is <uds>_<port>");
    let link = GuestLink::Hybrid { uds: uds.clone() };
    // The "guest" boots for 1.2 s, then signals, as vminitd does.
    let guest = {
        let (up, ready_path) = (up.clone(), ready_path.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            up.store(true, Ordering::SeqCst);
            tokio::net::UnixStream::connect(&ready_path).await.map(drop)
        })
    };
    let started = Instant::now();
    link.connect_task(Duration::from_secs(60), || false, Some(ready))
        .await
        .expect("connected after the signal");
    guest.await.expect("join").expect("signalled");
    // Polling at up to 50 ms would have tried about 25 times in 1.2 s; the
    // fallback pause (500 ms) allows a few. However slow the machine, more
    // time only means fewer attempts per second.
    let n = attempts.load(Ordering::SeqCst);
    let bound = 3 + (started.elapsed().as_millis() / READY_FALLBACK.as_millis()) as usize;
    assert!(
        n <= bound,
        "{n} attempts in {:?} (at most {bound})",
        started.elapsed()
    );
    assert!(
        !ready_path.exists(),
        "the signal's socket is removed once used"
    );
}

#[tokio::test]
async fn without_a_signal_the_fallback_still_connects() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("v.sock");
    let up = Arc::new(AtomicBool::new(false));
    booting_hybrid(&uds, up.clone(), Arc::new(AtomicUsize::new(0))).await;
    // A guest that never signals (an older initrd) and is up after 300 ms:
    // the fallback attempts still reach it.
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        up.store(true, Ordering::SeqCst);
    });
    let ready = ReadySignal::listen(&uds).expect("listen");
    let link = GuestLink::Hybrid { uds };
    link.connect_task(Duration::from_secs(60), || false, Some(ready))
        .await
        .expect("connected without a signal");
}
