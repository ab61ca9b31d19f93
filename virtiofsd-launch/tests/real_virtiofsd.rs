//! Against the real virtiofsd that resources/install.sh installs.

use std::path::Path;
use std::time::Duration;

use beacon_virtiofsd_launch::{find_binary, SandboxMode, ShareConfig, Virtiofsd};

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
    let pid = fs.pid().expect("pid");
    assert!(alive(pid));
    assert!(fs.socket_path().exists());
    let status = fs.stop(Duration::from_secs(5)).expect("stop");
    assert!(!alive(pid), "virtiofsd still running after stop ({status})");
    assert!(!tmp.path().join("fs.sock").exists(), "socket left behind");
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
    let pid = fs.pid().expect("pid");
    // The socket now belongs to virtiofsd: a vhost-user frontend can connect.
    beacon_virtiofsd_launch::connect(&sock).expect("connect");
    drop(fs);
    assert!(!alive(pid), "virtiofsd survived drop");
    assert!(!Path::new(&sock).exists());
}
