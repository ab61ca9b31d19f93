//! Against the real virtiofsd that resources/install.sh installs: it starts,
//! serves its socket, is reported when killed from outside, and is gone (with
//! its socket) after stop or drop.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use beacon_virtiofsd_launch::{find_binary, Exited, SandboxMode, ShareConfig, Virtiofsd};

fn alive(pid: u32) -> bool {
    // A reaped child has no /proc entry; a zombie would show state Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn starts_serves_a_socket_and_stops_clean() {
    find_binary().expect("virtiofsd installed (run resources/install.sh)");
    let tmp = tempfile::tempdir().expect("tempdir");
    let share = tmp.path().join("share");
    std::fs::create_dir(&share).expect("mkdir");
    let mut cfg = ShareConfig::new(&share, tmp.path().join("fs.sock"));
    cfg.sandbox = SandboxMode::None;
    let fs = Virtiofsd::spawn(&cfg).expect("spawn");
    let pid = fs.pid();
    assert!(alive(pid));
    assert!(fs.socket_path().exists());
    // Its log reaches the file while it runs.
    let log = fs.log_path().to_path_buf();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("Waiting for vhost-user socket connection") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "log so far: {text}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let exited = fs.stop(Duration::from_secs(5)).expect("stop");
    assert!(exited.requested);
    assert!(!alive(pid), "virtiofsd still running after stop ({exited})");
    assert!(!tmp.path().join("fs.sock").exists(), "socket left behind");
    assert!(log.exists(), "the log stays");
}

#[test]
fn drop_kills_and_a_stale_socket_is_replaced() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sock = tmp.path().join("fs.sock");
    // A stale socket file from a crashed run.
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("stale socket"));
    assert!(sock.exists());
    let mut cfg = ShareConfig::new(tmp.path(), &sock);
    cfg.sandbox = SandboxMode::None;
    let fs = Virtiofsd::spawn(&cfg).expect("spawn over a stale socket");
    let pid = fs.pid();
    // The socket now belongs to virtiofsd: a vhost-user frontend can connect.
    beacon_virtiofsd_launch::connect(&sock).expect("connect");
    drop(fs);
    assert!(!alive(pid), "virtiofsd survived drop");
    assert!(!Path::new(&sock).exists());
}

#[test]
fn a_kill_from_outside_is_reported() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = ShareConfig::new(tmp.path(), tmp.path().join("fs.sock"));
    cfg.sandbox = SandboxMode::None;
    let fs = Virtiofsd::spawn(&cfg).expect("spawn");
    let (tx, rx) = mpsc::channel::<Exited>();
    fs.on_exit(move |e| {
        let _ = tx.send(e.clone());
    });
    let pid = libc::pid_t::try_from(fs.pid()).expect("pid");
    // SAFETY: kill(2) on our own child, which the supervisor has not reaped yet
    // (it is running: nothing has reported its end).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let exited = rx.recv_timeout(Duration::from_secs(10)).expect("reported");
    assert!(!exited.requested);
    assert_eq!(exited.status_text(), "signal 9");
    assert!(!alive(fs.pid()));
}
