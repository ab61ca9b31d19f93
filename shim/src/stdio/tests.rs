use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixListener;

use super::*;

#[test]
fn targets_parse_like_containerd_writes_them() {
    assert_eq!(IoTarget::parse("stdout", "").ok(), Some(IoTarget::None));
    assert_eq!(
        IoTarget::parse("stdout", "/run/containerd/fifo/1/c-stdout").ok(),
        Some(IoTarget::Fifo("/run/containerd/fifo/1/c-stdout".into()))
    );
    assert_eq!(
        IoTarget::parse("stdout", "file:///var/log/a%20b.log").ok(),
        Some(IoTarget::File("/var/log/a b.log".into()))
    );
    assert_eq!(
        IoTarget::parse("stdout", "binary:///usr/bin/logger?tag=x+y&flag").ok(),
        Some(IoTarget::Binary {
            path: "/usr/bin/logger".into(),
            args: vec!["tag".into(), "x y".into(), "flag".into()],
        })
    );
    for bad in ["relative", "http://x", "file://rel", "binary://rel", "%"] {
        assert!(IoTarget::parse("stdout", bad).is_err(), "{bad}");
    }
    // Multi-byte text next to % never panics.
    assert_eq!(percent_decode("%é%4"), "%é%4");
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// A fake vminitd stream port: for each STDIO stdout/stderr request it sends
/// OK, the stream's text and EOF; for stdin it sends OK and records what it
/// reads until EOF.
async fn fake_streams(path: &Path, stdin_got: tokio::sync::mpsc::Sender<Vec<u8>>) {
    let listener = UnixListener::bind(path).expect("bind");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let stdin_got = stdin_got.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(s);
                let mut line = String::new();
                if reader.read_line(&mut line).await.is_err() {
                    return;
                }
                let Ok(StreamRequest::Stdio { stream, .. }) = StreamRequest::parse(&line) else {
                    return;
                };
                let mut s = reader.into_inner();
                let _ = s.write_all(b"OK\n").await;
                match stream {
                    StdioStream::Stdout => {
                        let _ = s.write_all(&vec![b'o'; 200_000]).await;
                    }
                    StdioStream::Stderr => {
                        let _ = s.write_all(b"to-stderr\n").await;
                    }
                    StdioStream::Stdin => {
                        let mut all = Vec::new();
                        let _ = s.read_to_end(&mut all).await;
                        let _ = stdin_got.send(all).await;
                    }
                }
            });
        }
    });
}

fn link(dir: &Path) -> GuestLink {
    GuestLink::Unix {
        task: dir.join("task.sock"),
        streams: dir.join("streams.sock"),
    }
}

#[tokio::test]
async fn output_reaches_fifos_and_files_completely_before_finish() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, _rx) = tokio::sync::mpsc::channel(4);
    fake_streams(&dir.path().join("streams.sock"), tx).await;
    let out_fifo = dir.path().join("c-stdout");
    mkfifo(&out_fifo);
    // containerd opens its reading end first.
    let mut reader = pipe::OpenOptions::new()
        .open_receiver(&out_fifo)
        .expect("reader");
    let err_file = dir.path().join("logs/err.log");
    let spec = StdioSpec {
        stdin: String::new(),
        stdout: out_fifo.display().to_string(),
        stderr: format!("file://{}", err_file.display()),
        terminal: false,
    };
    let io = ProcessIo::attach(&link(dir.path()), "ns", "c1", None, &spec)
        .await
        .expect("attach");
    let reading = tokio::spawn(async move {
        let mut all = Vec::new();
        let _ = reader.read_to_end(&mut all).await;
        all
    });
    assert!(io.finish(Duration::from_secs(30)).await, "copies finished");
    let got = reading.await.expect("reader");
    assert_eq!(got.len(), 200_000);
    assert!(got.iter().all(|b| *b == b'o'));
    assert_eq!(std::fs::read(&err_file).expect("file"), b"to-stderr\n");
}

#[tokio::test]
async fn stdin_reaches_the_guest_and_ends_with_eof() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    fake_streams(&dir.path().join("streams.sock"), tx).await;
    let in_fifo = dir.path().join("c-stdin");
    mkfifo(&in_fifo);
    // containerd keeps its writing end open (a read-write open never blocks).
    let mut writer = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&in_fifo)
        .expect("writer");
    let spec = StdioSpec {
        stdin: in_fifo.display().to_string(),
        ..StdioSpec::default()
    };
    let io = ProcessIo::attach(&link(dir.path()), "ns", "c1", Some("e1"), &spec)
        .await
        .expect("attach");
    std::io::Write::write_all(&mut writer, b"hello stdin\n").expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    io.close_stdin().await;
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("EOF reached the guest")
        .expect("data");
    assert_eq!(got, b"hello stdin\n");
}

#[tokio::test]
async fn a_reader_that_went_away_does_not_block_the_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, _rx) = tokio::sync::mpsc::channel(4);
    fake_streams(&dir.path().join("streams.sock"), tx).await;
    let out_fifo = dir.path().join("c-stdout");
    mkfifo(&out_fifo);
    let reader = pipe::OpenOptions::new()
        .open_receiver(&out_fifo)
        .expect("reader");
    let spec = StdioSpec {
        stdout: out_fifo.display().to_string(),
        terminal: true,
        ..StdioSpec::default()
    };
    let io = ProcessIo::attach(&link(dir.path()), "ns", "c1", None, &spec)
        .await
        .expect("attach");
    drop(reader);
    assert!(
        io.finish(Duration::from_secs(30)).await,
        "drained to the end"
    );
}

#[tokio::test]
async fn binary_loggers_get_both_streams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, _rx) = tokio::sync::mpsc::channel(4);
    fake_streams(&dir.path().join("streams.sock"), tx).await;
    let logger = dir.path().join("logger.sh");
    let out = dir.path().join("logged");
    std::fs::write(
        &logger,
        format!(
            "#!/bin/sh\nexec 5>&-\ncat <&3 >'{0}.out' &\ncat <&4 >'{0}.err'\nwait\necho \"$1 $2 $CONTAINER_ID $CONTAINER_NAMESPACE\" >'{0}.args'\n",
            out.display()
        ),
    )
    .expect("logger");
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let uri = format!("binary://{}?tag=t1", logger.display());
    let spec = StdioSpec {
        stdout: uri.clone(),
        stderr: uri,
        ..StdioSpec::default()
    };
    let io = ProcessIo::attach(&link(dir.path()), "ns9", "c7", None, &spec)
        .await
        .expect("attach");
    assert!(io.finish(Duration::from_secs(30)).await);
    let with = |ext: &str| {
        let mut p = out.clone().into_os_string();
        p.push(ext);
        std::fs::read(p).expect("logger output")
    };
    assert_eq!(with(".out").len(), 200_000);
    assert_eq!(with(".err"), b"to-stderr\n");
    assert_eq!(with(".args"), b"tag t1 c7 ns9\n");
}
