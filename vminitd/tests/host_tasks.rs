//! vminitd on a unix socket with real crun: lifecycle, exit statuses,
//! signals, exec, stdin, pty, events, concurrency and the stream port's
//! limits.

mod common;

use std::time::{Duration, UNIX_EPOCH};

use common::*;
use containerd_shim_protos::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, DeleteRequest, ExecProcessRequest,
    KillRequest, PidsRequest, ResizePtyRequest, StartRequest, StateRequest, Status, WaitRequest,
};
use protobuf::well_known_types::any::Any;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

fn start(id: &str, exec: &str) -> StartRequest {
    StartRequest {
        id: id.into(),
        exec_id: exec.into(),
        ..Default::default()
    }
}

fn wait(id: &str, exec: &str) -> WaitRequest {
    WaitRequest {
        id: id.into(),
        exec_id: exec.into(),
        ..Default::default()
    }
}

fn delete(id: &str, exec: &str) -> DeleteRequest {
    DeleteRequest {
        id: id.into(),
        exec_id: exec.into(),
        ..Default::default()
    }
}

fn kill(id: &str, exec: &str, signal: u32) -> KillRequest {
    KillRequest {
        id: id.into(),
        exec_id: exec.into(),
        signal,
        ..Default::default()
    }
}

fn exec_req(
    id: &str,
    exec: &str,
    args: &[&str],
    stdin: bool,
    terminal: bool,
) -> ExecProcessRequest {
    let process = serde_json::json!({
        "terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": args,
        "env": ["PATH=/bin"], "cwd": "/",
    });
    ExecProcessRequest {
        id: id.into(),
        exec_id: exec.into(),
        terminal,
        stdin: if stdin {
            "stream:stdin".into()
        } else {
            String::new()
        },
        stdout: "stream:stdout".into(),
        stderr: if terminal {
            String::new()
        } else {
            "stream:stderr".into()
        },
        spec: Some(Any {
            type_url: PROCESS_TYPE_URL.into(),
            value: serde_json::to_vec(&process).expect("json"),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

async fn events(v: &Vminitd) -> tokio::io::Lines<BufReader<UnixStream>> {
    let mut s = UnixStream::connect(&v.stream_sock)
        .await
        .expect("stream port");
    s.write_all(b"EVENTS\n").await.expect("handshake");
    let mut ok = [0u8; 3];
    s.read_exact(&mut ok).await.expect("reply");
    assert_eq!(&ok, b"OK\n");
    BufReader::new(s).lines()
}

async fn next_event(lines: &mut tokio::io::Lines<BufReader<UnixStream>>) -> serde_json::Value {
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("event in time")
        .expect("read event")
        .expect("event line");
    serde_json::from_str(&line).expect("event json")
}

#[tokio::test(flavor = "current_thread")]
async fn echo_exit_code_event_and_cleanup() {
    let mut v = Vminitd::spawn();
    let c = v.client().await;
    let mut ev = events(&v).await;
    let (out, err, status) = run_to_exit(
        &v,
        &c,
        "echo1",
        &["sh", "-c", "echo hello; echo oops >&2; exit 3"],
    )
    .await;
    assert_eq!(out, "hello\n");
    assert_eq!(err, "oops\n");
    assert_eq!(status, 3);

    let st = c
        .state(
            ctx(),
            &StateRequest {
                id: "echo1".into(),
                ..Default::default()
            },
        )
        .await
        .expect("state");
    assert_eq!(st.status.enum_value(), Ok(Status::STOPPED));
    assert_eq!(st.exit_status, 3);
    assert!(st.pid > 0);

    let e = next_event(&mut ev).await;
    assert_eq!(e["topic"], "/tasks/exit");
    assert_eq!(e["container_id"], "echo1");
    assert_eq!(e["exit_status"], 3);
    assert_eq!(e["pid"], st.pid);

    let d = c.delete(ctx(), &delete("echo1", "")).await.expect("delete");
    assert_eq!(d.exit_status, 3);
    assert_eq!(d.pid, st.pid);
    // The exit time is the reap time: recent, and the same everywhere.
    let at = d.exited_at.as_ref().expect("exited_at");
    assert_eq!(Some(at.seconds), e["exited_at"]["seconds"].as_i64());
    assert_eq!(Some(i64::from(at.nanos)), e["exited_at"]["nanos"].as_i64());
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("now")
        .as_secs();
    assert!(now.abs_diff(u64::try_from(at.seconds).expect("positive")) < 60);

    assert_eq!(
        code_of(
            c.state(
                ctx(),
                &StateRequest {
                    id: "echo1".into(),
                    ..Default::default()
                }
            )
            .await
        ),
        ttrpc::Code::NOT_FOUND
    );
    v.stop();
    v.assert_clean();
}

#[tokio::test(flavor = "current_thread")]
async fn kill_signal_9_is_137_and_unknown_ids_are_not_found() {
    let mut v = Vminitd::spawn();
    let c = v.client().await;
    v.rootfs("k1");
    c.create(
        ctx(),
        &create_req("k1", &spec(&["sleep", "100"], false), false, false, false),
    )
    .await
    .expect("create");
    c.start(ctx(), &start("k1", "")).await.expect("start");
    assert_eq!(
        code_of(c.kill(ctx(), &kill("nope", "", 9)).await),
        ttrpc::Code::NOT_FOUND
    );
    // A running container cannot be deleted.
    assert_eq!(
        code_of(c.delete(ctx(), &delete("k1", "")).await),
        ttrpc::Code::FAILED_PRECONDITION
    );
    c.kill(ctx(), &kill("k1", "", 9)).await.expect("kill");
    let w = c.wait(ctx(), &wait("k1", "")).await.expect("wait");
    assert_eq!(w.exit_status, 137);
    assert_eq!(
        code_of(c.kill(ctx(), &kill("k1", "", 9)).await),
        ttrpc::Code::NOT_FOUND
    );
    assert_eq!(
        code_of(
            c.checkpoint(
                ctx(),
                &CheckpointTaskRequest {
                    id: "k1".into(),
                    ..Default::default()
                }
            )
            .await
        ),
        ttrpc::Code::UNIMPLEMENTED
    );
    let conn = c
        .connect(
            ctx(),
            &ConnectRequest {
                id: "k1".into(),
                ..Default::default()
            },
        )
        .await
        .expect("connect");
    assert!(conn.version.starts_with("vminitd/"));
    c.delete(ctx(), &delete("k1", "")).await.expect("delete");
    v.stop();
    v.assert_clean();
}

#[tokio::test(flavor = "current_thread")]
async fn exec_into_running_container_and_pids() {
    let mut v = Vminitd::spawn();
    let c = v.client().await;
    let mut ev = events(&v).await;
    v.rootfs("x1");
    let cr = c
        .create(
            ctx(),
            &create_req("x1", &spec(&["sleep", "100"], false), false, false, false),
        )
        .await
        .expect("create");
    c.start(ctx(), &start("x1", "")).await.expect("start");

    c.exec(
        ctx(),
        &exec_req(
            "x1",
            "e1",
            &["sh", "-c", "echo from-exec; exit 5"],
            false,
            false,
        ),
    )
    .await
    .expect("exec");
    assert_eq!(
        code_of(
            c.exec(ctx(), &exec_req("x1", "e1", &["true"], false, false))
                .await
        ),
        ttrpc::Code::ALREADY_EXISTS
    );
    let out = stream(&v, "x1", "e1", "stdout").await;
    let err = stream(&v, "x1", "e1", "stderr").await;
    let sr = c
        .start(ctx(), &start("x1", "e1"))
        .await
        .expect("start exec");
    assert!(sr.pid > 0 && sr.pid != cr.pid);
    let (o, e) = tokio::join!(read_all(out), read_all(err));
    assert_eq!(o, "from-exec\n");
    assert_eq!(e, "");
    let w = c.wait(ctx(), &wait("x1", "e1")).await.expect("wait exec");
    assert_eq!(w.exit_status, 5);
    let ex = next_event(&mut ev).await;
    assert_eq!(ex["id"], "e1");
    assert_eq!(ex["exit_status"], 5);

    let pids = c
        .pids(
            ctx(),
            &PidsRequest {
                id: "x1".into(),
                ..Default::default()
            },
        )
        .await
        .expect("pids");
    let list: Vec<u32> = pids.processes.iter().map(|p| p.pid).collect();
    assert!(list.contains(&cr.pid), "{list:?} lacks init {}", cr.pid);

    let d = c
        .delete(ctx(), &delete("x1", "e1"))
        .await
        .expect("delete exec");
    assert_eq!(d.exit_status, 5);
    assert_eq!(
        code_of(c.wait(ctx(), &wait("x1", "e1")).await),
        ttrpc::Code::NOT_FOUND
    );
    // An exec whose binary is missing fails clearly; the container lives on.
    c.exec(ctx(), &exec_req("x1", "e2", &["/bin/nope"], false, false))
        .await
        .expect("exec registers");
    let r = c.start(ctx(), &start("x1", "e2")).await;
    assert!(r.is_err(), "missing exec binary must fail: {r:?}");
    let st = c
        .state(
            ctx(),
            &StateRequest {
                id: "x1".into(),
                ..Default::default()
            },
        )
        .await
        .expect("state");
    assert_eq!(st.status.enum_value(), Ok(Status::RUNNING));

    v.assert_no_zombies();
    c.kill(ctx(), &kill("x1", "", 9)).await.expect("kill");
    assert_eq!(
        c.wait(ctx(), &wait("x1", ""))
            .await
            .expect("wait")
            .exit_status,
        137
    );
    c.delete(ctx(), &delete("x1", "")).await.expect("delete");
    v.stop();
    v.assert_clean();
}

#[tokio::test(flavor = "current_thread")]
async fn stdin_echo_close_io_and_disconnect() {
    let mut v = Vminitd::spawn();
    let c = v.client().await;
    v.rootfs("in1");
    c.create(
        ctx(),
        &create_req("in1", &spec(&["cat"], false), true, true, false),
    )
    .await
    .expect("create");
    let mut sin = stream(&v, "in1", "", "stdin").await;
    let out = stream(&v, "in1", "", "stdout").await;
    c.start(ctx(), &start("in1", "")).await.expect("start");
    let mut out = BufReader::new(out);
    sin.write_all(b"ping\n").await.expect("write");
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), out.read_line(&mut line))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(line, "ping\n");
    // Half-closing the stream is EOF for cat.
    sin.shutdown().await.expect("shutdown");
    assert_eq!(
        c.wait(ctx(), &wait("in1", ""))
            .await
            .expect("wait")
            .exit_status,
        0
    );

    // CloseIO ends an exec's stdin while the host stream stays open.
    v.rootfs("in2");
    c.create(
        ctx(),
        &create_req("in2", &spec(&["sleep", "100"], false), false, false, false),
    )
    .await
    .expect("create");
    c.start(ctx(), &start("in2", "")).await.expect("start");
    c.exec(ctx(), &exec_req("in2", "cat", &["cat"], true, false))
        .await
        .expect("exec");
    let mut ein = stream(&v, "in2", "cat", "stdin").await;
    let eout = stream(&v, "in2", "cat", "stdout").await;
    let _eerr = stream(&v, "in2", "cat", "stderr").await;
    c.start(ctx(), &start("in2", "cat"))
        .await
        .expect("start exec");
    ein.write_all(b"abc\n").await.expect("write");
    let mut eout = BufReader::new(eout);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), eout.read_line(&mut line))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(line, "abc\n");
    c.close_io(
        ctx(),
        &CloseIORequest {
            id: "in2".into(),
            exec_id: "cat".into(),
            stdin: true,
            ..Default::default()
        },
    )
    .await
    .expect("close io");
    assert_eq!(
        c.wait(ctx(), &wait("in2", "cat"))
            .await
            .expect("wait")
            .exit_status,
        0
    );

    // A stdin stream that disconnects mid-write: the process sees EOF and
    // vminitd keeps serving.
    c.exec(
        ctx(),
        &exec_req(
            "in2",
            "cat2",
            &["sh", "-c", "cat >/dev/null; echo done"],
            true,
            false,
        ),
    )
    .await
    .expect("exec");
    let mut ein = stream(&v, "in2", "cat2", "stdin").await;
    let eout = stream(&v, "in2", "cat2", "stdout").await;
    let _eerr = stream(&v, "in2", "cat2", "stderr").await;
    c.start(ctx(), &start("in2", "cat2"))
        .await
        .expect("start exec");
    ein.write_all(&vec![b'x'; 100_000]).await.expect("write");
    drop(ein);
    assert_eq!(read_all(eout).await, "done\n");
    assert_eq!(
        c.wait(ctx(), &wait("in2", "cat2"))
            .await
            .expect("wait")
            .exit_status,
        0
    );

    for id in ["in1", "in2"] {
        let _ = c.kill(ctx(), &kill(id, "", 9)).await;
        c.wait(ctx(), &wait(id, "")).await.expect("wait");
        c.delete(ctx(), &delete(id, "")).await.expect("delete");
    }
    v.stop();
    v.assert_clean();
}

#[tokio::test(flavor = "current_thread")]
async fn pty_with_resize() {
    let mut v = Vminitd::spawn();
    let c = v.client().await;
    v.rootfs("t1");
    let s = spec(&["sh", "-c", "read x; stty size; exit 4"], true);
    c.create(ctx(), &create_req("t1", &s, true, true, false))
        .await
        .expect("create");
    let mut sin = stream(&v, "t1", "", "stdin").await;
    let out = stream(&v, "t1", "", "stdout").await;
    c.start(ctx(), &start("t1", "")).await.expect("start");
    c.resize_pty(
        ctx(),
        &ResizePtyRequest {
            id: "t1".into(),
            width: 100,
            height: 40,
            ..Default::default()
        },
    )
    .await
    .expect("resize");
    sin.write_all(b"go\n").await.expect("write");
    let text = read_all(out).await;
    assert!(text.contains("40 100"), "pty output {text:?}");
    assert_eq!(
        c.wait(ctx(), &wait("t1", ""))
            .await
            .expect("wait")
            .exit_status,
        4
    );
    // An exec with its own pty (the container must be running for exec).
    v.rootfs("t3");
    c.create(
        ctx(),
        &create_req("t3", &spec(&["sleep", "100"], false), false, false, false),
    )
    .await
    .expect("create");
    c.start(ctx(), &start("t3", "")).await.expect("start");
    c.exec(
        ctx(),
        &exec_req(
            "t3",
            "tty",
            &["sh", "-c", "test -t 0 && test -t 1 && echo isatty"],
            false,
            true,
        ),
    )
    .await
    .expect("exec");
    let eout = stream(&v, "t3", "tty", "stdout").await;
    c.start(ctx(), &start("t3", "tty"))
        .await
        .expect("start exec");
    let text = read_all(eout).await;
    assert_eq!(text, "isatty\r\n");
    assert_eq!(
        c.wait(ctx(), &wait("t3", "tty"))
            .await
            .expect("wait")
            .exit_status,
        0
    );
    c.kill(ctx(), &kill("t3", "", 9)).await.expect("kill");
    c.wait(ctx(), &wait("t3", "")).await.expect("wait");
    c.delete(ctx(), &delete("t3", "")).await.expect("delete");

    // Resizing a process without a terminal is refused clearly.
    v.rootfs("t2");
    c.create(
        ctx(),
        &create_req("t2", &spec(&["sleep", "100"], false), false, false, false),
    )
    .await
    .expect("create");
    assert_eq!(
        code_of(
            c.resize_pty(
                ctx(),
                &ResizePtyRequest {
                    id: "t2".into(),
                    width: 1,
                    height: 1,
                    ..Default::default()
                }
            )
            .await
        ),
        ttrpc::Code::FAILED_PRECONDITION
    );
    // A never-started container can be deleted.
    c.delete(ctx(), &delete("t2", ""))
        .await
        .expect("delete created");
    c.delete(ctx(), &delete("t1", "")).await.expect("delete");
    v.stop();
    v.assert_clean();
}

#[tokio::test(flavor = "current_thread")]
async fn twenty_containers_concurrently() {
    let mut v = Vminitd::spawn();
    let c = v.client().await;
    let runs = (0..20).map(|i| {
        let c = c.clone();
        let v = &v;
        async move {
            let id = format!("par{i}");
            let code = format!("exit {}", i % 7);
            let script = format!("echo {id}; {code}");
            let (o, e, st) = run_to_exit(v, &c, &id, &["sh", "-c", &script]).await;
            c.delete(ctx(), &delete(&id, "")).await.expect("delete");
            (id, o, e, st, i)
        }
    });
    let results = futures_join_all(runs).await;
    for (id, o, e, st, i) in results {
        assert_eq!(o, format!("{id}\n"));
        assert_eq!(e, "");
        assert_eq!(st, i % 7);
    }
    v.assert_no_zombies();
    v.stop();
    v.assert_clean();
}

/// `join_all` without pulling in the futures crate.
async fn futures_join_all<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let set: Vec<_> = fs.map(Box::pin).collect();
    let mut out = Vec::with_capacity(set.len());
    let mut pending: Vec<_> = set.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(results.into_iter().flatten());
    out
}

/// The exit is reported only after every byte of output went to the host
/// stream and the stream was shut down: at the moment Wait returns, all of
/// it, EOF included, is already queued on our socket. Checked with
/// non-blocking reads after Wait, not with a time limit.
#[tokio::test(flavor = "current_thread")]
async fn output_is_complete_when_wait_returns() {
    let mut v = Vminitd::spawn();
    let c = v.client().await;
    v.rootfs("big");
    let s = spec(&["dd", "if=/dev/zero", "bs=1000", "count=1000"], false);
    c.create(ctx(), &create_req("big", &s, false, true, false))
        .await
        .expect("create");
    let mut out = stream(&v, "big", "", "stdout").await;
    c.start(ctx(), &start("big", "")).await.expect("start");
    // Read while waiting (the output is larger than the socket buffers).
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let wait_req = wait("big", "");
    let w = {
        let waiting = c.wait(ctx(), &wait_req);
        tokio::pin!(waiting);
        loop {
            tokio::select! {
                w = &mut waiting => break w.expect("wait"),
                r = out.read(&mut buf) => got += r.expect("read output"),
            }
        }
    };
    assert_eq!(w.exit_status, 0);
    let mut out = out.into_std().expect("std stream");
    out.set_nonblocking(true).expect("nonblocking");
    loop {
        match std::io::Read::read(&mut out, &mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("Wait returned before stdout was complete ({got} bytes so far, no EOF)")
            }
            Err(e) => panic!("read output: {e}"),
        }
    }
    assert_eq!(got, 1_000_000);
    c.delete(ctx(), &delete("big", "")).await.expect("delete");
    v.stop();
    v.assert_clean();
}

/// What a peer of the stream port can make vminitd hold is bounded. A flood
/// of 1000 connections that never send their handshake leaves vminitd with
/// a few dozen extra descriptors at most (before: one per connection, and
/// about 900 exhausted a 1024 limit), and the Task API keeps serving; after
/// the flood, a key no Create or Exec announced and a second event
/// subscriber are refused with a reason, and containers run as before.
#[tokio::test(flavor = "current_thread")]
async fn stream_port_is_bounded() {
    const FLOOD: usize = 1000;
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    let need = u64::try_from(FLOOD).expect("fits") + 200;
    assert!(
        hard >= need,
        "this test needs {need} descriptors; the hard limit is {hard}"
    );
    if soft < need {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
            .expect("raise the descriptor limit");
    }
    let mut v = Vminitd::spawn();
    let c = v.client().await;
    let pid = v.child.as_ref().expect("running").id();
    let open_fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("vminitd's fds")
            .count()
    };
    let before = open_fds();

    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        flood.push(std::os::unix::net::UnixStream::connect(&v.stream_sock).expect("connect"));
    }
    // Connections are accepted in order: once the last one is answered,
    // vminitd has seen them all.
    let last = flood.last_mut().expect("flood");
    last.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&*last), &mut answer)
        .expect("the last connection is answered");
    assert_eq!(answer, "ERR busy: too many connections in handshake\n");
    let during = open_fds();
    assert!(
        during < before + 64,
        "vminitd holds {during} descriptors with {FLOOD} silent connections (was {before})"
    );
    // The Task API is untouched: a container without streams runs.
    v.rootfs("quiet");
    c.create(
        ctx(),
        &create_req("quiet", &spec(&["true"], false), false, false, false),
    )
    .await
    .expect("create during the flood");
    c.start(ctx(), &start("quiet", "")).await.expect("start");
    assert_eq!(
        c.wait(ctx(), &wait("quiet", ""))
            .await
            .expect("wait")
            .exit_status,
        0
    );
    c.delete(ctx(), &delete("quiet", "")).await.expect("delete");

    drop(flood);
    // The silent connections in their handshake see EOF and free their
    // slots; until vminitd has noticed, the port answers "busy".
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut ev = loop {
        let mut s = UnixStream::connect(&v.stream_sock).await.expect("connect");
        s.write_all(b"EVENTS\n").await.expect("handshake");
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await.expect("answer");
        if line == "OK\n" {
            break r.lines();
        }
        assert!(line.starts_with("ERR busy"), "{line:?}");
        assert!(std::time::Instant::now() < deadline, "the port stayed busy");
        tokio::task::yield_now().await;
    };
    let ask = |line: &'static str| {
        let path = v.stream_sock.clone();
        async move {
            let mut s = UnixStream::connect(path).await.expect("connect");
            s.write_all(line.as_bytes()).await.expect("handshake");
            let mut answer = String::new();
            BufReader::new(s)
                .read_line(&mut answer)
                .await
                .expect("answer");
            answer
        }
    };
    assert_eq!(
        ask("EVENTS\n").await,
        "ERR an event subscriber is already connected (one at a time)\n"
    );
    assert_eq!(
        ask("STDIO ghost - stdout\n").await,
        "ERR no process expects stream ghost - stdout\n"
    );
    // Create announces only the streams it names: stderr was not asked for.
    v.rootfs("named");
    c.create(
        ctx(),
        &create_req("named", &spec(&["echo", "hi"], false), false, true, false),
    )
    .await
    .expect("create");
    assert_eq!(
        ask("STDIO named - stderr\n").await,
        "ERR no process expects stream named - stderr\n"
    );
    let out = stream(&v, "named", "", "stdout").await;
    c.start(ctx(), &start("named", "")).await.expect("start");
    assert_eq!(read_all(out).await, "hi\n");
    // The quiet container's exit was queued before we subscribed.
    let e = next_event(&mut ev).await;
    assert_eq!(e["container_id"], "quiet");
    let e = next_event(&mut ev).await;
    assert_eq!(e["container_id"], "named");
    c.delete(ctx(), &delete("named", "")).await.expect("delete");
    v.stop();
    v.assert_clean();
}

fn resize(id: &str, exec: &str, width: u32, height: u32) -> ResizePtyRequest {
    ResizePtyRequest {
        id: id.into(),
        exec_id: exec.into(),
        width,
        height,
        ..Default::default()
    }
}

/// Reads `s` until its text so far ends with `end` (the pty echoes input at
/// once, so a test writes only after the output it must come after).
async fn read_until(s: &mut UnixStream, end: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    while !out.ends_with(end.as_bytes()) {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{end:?} in time; got {out:?}"))
            .expect("read output");
        assert!(n > 0, "EOF before {end:?}; got {out:?}");
        out.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `ctr task exec -t` order: Exec, ResizePty, then Start. The exec's pty
/// is only made at Start (`crun exec --console-socket`), so vminitd keeps
/// the size, gives it to crun as `consoleSize` and sets it again when the
/// pty master arrives. crun 1.8.1 sets an exec's `consoleSize` from its
/// parent AFTER it let the child exec (the create path sets it in the child,
/// before), so an exec that asks at once can, rarely, still see 0x0 (busybox
/// then prints `stty: standard input` and exits 0; seen once in CI): the
/// exec waits up to 5 s for a size, and no further ResizePty is sent until
/// it printed one. A resize after Start reaches the live pty. The init with
/// a terminal, resized between Create and Start (its pty exists from
/// Create), must report its size at once.
#[tokio::test(flavor = "current_thread")]
async fn exec_pty_size_set_before_start() {
    let mut v = Vminitd::spawn();
    let c = v.client().await;
    v.rootfs("p1");
    let script = "stty size; echo rc=$?; read x; stty size; echo rc=$?";
    let exec_script = "i=0; while [ $i -lt 50 ]; do s=$(stty size 2>&1); \
        case \"$s\" in [1-9]*) break ;; esac; i=$((i+1)); sleep 0.1; done; \
        echo \"$s\"; echo rc=$?; read x; stty size; echo rc=$?";
    c.create(
        ctx(),
        &create_req("p1", &spec(&["sh", "-c", script], true), true, true, false),
    )
    .await
    .expect("create");
    let mut init_in = stream(&v, "p1", "", "stdin").await;
    let mut init_out = stream(&v, "p1", "", "stdout").await;
    c.resize_pty(ctx(), &resize("p1", "", 100, 40))
        .await
        .expect("resize the created init");
    c.start(ctx(), &start("p1", "")).await.expect("start");
    c.exec(
        ctx(),
        &exec_req("p1", "tty", &["sh", "-c", exec_script], true, true),
    )
    .await
    .expect("exec");
    let mut sin = stream(&v, "p1", "tty", "stdin").await;
    let mut out = stream(&v, "p1", "tty", "stdout").await;
    c.resize_pty(ctx(), &resize("p1", "tty", 100, 40))
        .await
        .expect("resize before the exec starts");
    c.start(ctx(), &start("p1", "tty"))
        .await
        .expect("start exec");
    let first = read_until(&mut out, "rc=0\r\n").await;
    c.resize_pty(ctx(), &resize("p1", "tty", 120, 50))
        .await
        .expect("resize the running exec");
    sin.write_all(b"go\n").await.expect("write exec stdin");
    let text = first + &read_all(out).await;
    let clean = |t: &str| {
        assert!(!t.contains('\0'), "NUL byte in pty output {t:?}");
        assert!(!t.contains("stty:"), "stty failed: {t:?}");
        assert!(!t.contains("temporarily unavailable"), "EAGAIN: {t:?}");
    };
    clean(&text);
    assert_eq!(text, "40 100\r\nrc=0\r\ngo\r\n50 120\r\nrc=0\r\n");
    assert_eq!(
        c.wait(ctx(), &wait("p1", "tty"))
            .await
            .expect("wait exec")
            .exit_status,
        0
    );

    let first = read_until(&mut init_out, "rc=0\r\n").await;
    c.resize_pty(ctx(), &resize("p1", "", 90, 30))
        .await
        .expect("resize the running init");
    init_in.write_all(b"go\n").await.expect("write init stdin");
    let text = first + &read_all(init_out).await;
    clean(&text);
    assert_eq!(text, "40 100\r\nrc=0\r\ngo\r\n30 90\r\nrc=0\r\n");
    assert_eq!(
        c.wait(ctx(), &wait("p1", ""))
            .await
            .expect("wait init")
            .exit_status,
        0
    );
    // After Delete the exec is gone.
    c.delete(ctx(), &delete("p1", "tty"))
        .await
        .expect("delete exec");
    assert_eq!(
        code_of(c.resize_pty(ctx(), &resize("p1", "tty", 1, 1)).await),
        ttrpc::Code::NOT_FOUND
    );
    c.delete(ctx(), &delete("p1", "")).await.expect("delete");
    v.stop();
    v.assert_clean();
}
