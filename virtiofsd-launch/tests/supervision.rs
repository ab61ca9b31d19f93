//! Supervision against a scripted stand-in for virtiofsd (a Perl script: Perl is
//! part of every Debian system), so stderr floods, deaths and exit codes can be
//! produced on demand: a chatty virtiofsd does not stall, a death is reported
//! with its last words, a stop leaves no process, socket or thread behind, and a
//! virtiofsd spawned on behalf of a short-lived thread outlives that thread.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use beacon_virtiofsd_launch::{Exited, LaunchError, ShareConfig, Virtiofsd};

/// The tests count this process's threads and children: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fake virtiofsd. `$FAKE_MODE` is read from a file next to the socket
/// (`<socket>.mode`), because the launcher passes only virtiofsd's arguments.
const FAKE: &str = r#"#!/usr/bin/perl
use strict; use warnings; use IO::Socket::UNIX;
my %a; for (my $i = 0; $i < @ARGV; $i++) { $a{$ARGV[$i]} = $ARGV[$i + 1] if $ARGV[$i] =~ /^--/; }
my $sock = $a{'--socket-path'} or die "no --socket-path";
open(my $mf, '<', "$sock.mode") or die "no mode file";
my $mode = <$mf>; chomp $mode;
$| = 1; select(STDERR); $| = 1;
my $line = ('x' x 1023) . "\n";
sub flood { print STDERR $line for 1 .. 1024; }
flood() if $mode eq 'chatty';
print STDERR "listening on $sock\n";
my $l = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Local => $sock, Listen => 1) or die "bind: $!";
if ($mode eq 'chatty') { flood(); open(my $d, '>', "$sock.done"); close $d; }
if ($mode eq 'die') {
    select(undef, undef, undef, 0.05) until -e "$sock.die";
    print STDERR "simulated crash: giving up\n";
    exit 7;
}
sleep 1 while 1;
"#;

struct Fake {
    _tmp: tempfile::TempDir,
    binary: PathBuf,
    share: PathBuf,
    socket: PathBuf,
}

fn fake(mode: &str) -> Fake {
    let tmp = tempfile::tempdir().expect("tempdir");
    let binary = tmp.path().join("fake-virtiofsd");
    std::fs::write(&binary, FAKE).expect("write fake");
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let share = tmp.path().join("share");
    std::fs::create_dir(&share).expect("share");
    let socket = tmp.path().join("fs.sock");
    std::fs::write(tmp.path().join("fs.sock.mode"), mode).expect("mode");
    Fake {
        _tmp: tmp,
        binary,
        share,
        socket,
    }
}

fn alive(pid: u32) -> bool {
    // A reaped child has no /proc entry; a zombie shows state Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// Threads of this process whose name starts with `vfsd-` (the per-virtiofsd
/// supervisor and log threads).
fn vfsd_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .map(|c| c.starts_with("vfsd-"))
                .unwrap_or(false)
        })
        .count()
}

/// After the threads are joined, wait for the kernel to drop them from
/// `/proc/self/task`: `pthread_join` returns when the thread's exit wakes its
/// joiner, which is a moment before the kernel releases the task entry.
fn assert_no_vfsd_threads(what: &str) {
    wait_until(what, Duration::from_secs(5), || vfsd_threads() == 0);
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn log_bytes(log: &Path) -> u64 {
    let mut rotated = log.as_os_str().to_owned();
    rotated.push(".1");
    [log.to_path_buf(), PathBuf::from(rotated)]
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum()
}

#[test]
fn a_chatty_virtiofsd_does_not_stall_and_its_log_is_kept() {
    let _serial = serial();
    let f = fake("chatty");
    let mut cfg = ShareConfig::new(&f.share, &f.socket);
    cfg.ready_timeout = Duration::from_secs(20);
    // 1 MiB before the socket exists: without a drain it would block at 64 KiB
    // and never listen.
    let fs = Virtiofsd::spawn_with(&f.binary, &cfg).expect("a chatty virtiofsd starts");
    // And 1 MiB more while it runs.
    let mut done = f.socket.clone().into_os_string();
    done.push(".done");
    wait_until(
        "the second MiB of log written",
        Duration::from_secs(20),
        || Path::new(&done).exists(),
    );
    wait_until(
        "the log file holding 2 MiB",
        Duration::from_secs(10),
        || log_bytes(fs.log_path()) >= 2 << 20,
    );
    assert!(fs.exited().is_none(), "still running");
    let log = fs.log_path().to_path_buf();
    let pid = fs.pid();
    let exited = fs.stop(Duration::from_secs(5)).expect("stop");
    assert!(exited.requested);
    assert!(!alive(pid));
    assert!(log.exists(), "the log stays after stop");
}

#[test]
fn a_death_is_reported_once_with_its_last_words() {
    let _serial = serial();
    let f = fake("die");
    let cfg = ShareConfig::new(&f.share, &f.socket);
    let fs = Virtiofsd::spawn_with(&f.binary, &cfg).expect("spawn");
    let (tx, rx) = mpsc::channel::<Exited>();
    fs.on_exit(move |e| {
        let _ = tx.send(e.clone());
    });
    let mut die = f.socket.clone().into_os_string();
    die.push(".die");
    std::fs::write(&die, "").expect("trigger");
    let exited = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the death is reported");
    assert!(!exited.requested, "nobody asked it to stop");
    assert_eq!(exited.status.and_then(|s| s.code()), Some(7));
    assert!(
        exited.stderr_tail.contains("simulated crash"),
        "{}",
        exited.stderr_tail
    );
    assert!(exited.to_string().contains("exit code 7"), "{exited}");
    assert!(!alive(fs.pid()), "reaped as soon as it died");
    assert!(fs.exited().is_some());
    // A late watcher hears about it at once.
    let (tx2, rx2) = mpsc::channel::<Exited>();
    fs.on_exit(move |e| {
        let _ = tx2.send(e.clone());
    });
    assert!(rx2.try_recv().is_ok());
    fs.stop(Duration::from_secs(1)).expect("stop after death");
    assert!(rx.try_recv().is_err(), "reported once");
}

#[test]
fn stop_and_drop_leave_no_process_socket_or_thread() {
    let _serial = serial();
    let f = fake("quiet");
    let cfg = ShareConfig::new(&f.share, &f.socket);
    assert_no_vfsd_threads("no vfsd thread left");
    let fs = Virtiofsd::spawn_with(&f.binary, &cfg).expect("spawn");
    let pid = fs.pid();
    assert!(alive(pid));
    assert_eq!(vfsd_threads(), 2, "a supervisor and a log thread");
    let (tx, rx) = mpsc::channel::<Exited>();
    fs.on_exit(move |e| {
        let _ = tx.send(e.clone());
    });
    let exited = fs.stop(Duration::from_secs(5)).expect("stop");
    assert!(exited.requested);
    assert!(rx.try_recv().expect("the callback ran").requested);
    assert!(!alive(pid));
    assert!(!f.socket.exists(), "socket removed");
    assert_no_vfsd_threads("threads joined");

    let fs = Virtiofsd::spawn_with(&f.binary, &cfg).expect("spawn again over the old path");
    let pid = fs.pid();
    drop(fs);
    assert!(!alive(pid));
    assert!(!f.socket.exists());
    assert_no_vfsd_threads("no vfsd thread left");
}

#[test]
fn bad_input_fails_before_anything_runs() {
    let _serial = serial();
    let f = fake("quiet");
    let file = f.share.join("a-file");
    std::fs::write(&file, "").expect("file");
    let cfg = ShareConfig::new(&file, &f.socket);
    let err = Virtiofsd::spawn_with(&f.binary, &cfg).expect_err("a file is no share");
    assert!(matches!(err, LaunchError::BadShare(_)), "{err}");
    assert!(err.to_string().contains("a-file"), "{err}");
    let mut cfg = ShareConfig::new(&f.share, &f.socket);
    cfg.log_path = Some(f.share.join("no/such/dir/fs.log"));
    let err = Virtiofsd::spawn_with(&f.binary, &cfg).expect_err("unwritable log");
    assert!(matches!(err, LaunchError::Log { .. }), "{err}");
    assert_no_vfsd_threads("no vfsd thread left");
    assert!(!f.socket.exists());
}

#[test]
fn early_death_reports_stderr_and_a_silent_program_is_killed() {
    let _serial = serial();
    let f = fake("quiet");
    let cfg = ShareConfig::new(&f.share, &f.socket);
    // `sh` rejects virtiofsd's flags and exits at once with a message.
    match Virtiofsd::spawn_with(Path::new("/bin/sh"), &cfg) {
        Err(LaunchError::Died { stderr, .. }) => assert!(!stderr.is_empty()),
        other => panic!("unexpected {other:?}"),
    }
    let script = f.share.join("silent");
    std::fs::write(&script, "#!/bin/sh\nexec sleep 60\n").expect("write");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut cfg = ShareConfig::new(&f.share, &f.socket);
    cfg.ready_timeout = Duration::from_millis(300);
    let err = Virtiofsd::spawn_with(&script, &cfg).expect_err("must time out");
    assert!(matches!(err, LaunchError::NotReady { .. }), "{err}");
    assert_no_vfsd_threads("no vfsd thread left");
    let sleepers = std::fs::read_dir("/proc")
        .expect("proc")
        .filter_map(Result::ok)
        .filter(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            stat.contains("(sleep)")
                && stat
                    .split_whitespace()
                    .nth(3)
                    .and_then(|ppid| ppid.parse::<u32>().ok())
                    == Some(std::process::id())
        })
        .count();
    assert_eq!(sleepers, 0, "the silent program was killed and reaped");
}

/// The control for the next test: a child with PR_SET_PDEATHSIG spawned
/// directly from a thread dies when that thread ends (which is why the crate
/// spawns from one long-lived thread).
#[test]
fn control_pdeathsig_follows_the_spawning_thread() {
    let _serial = serial();
    use std::os::unix::process::CommandExt;
    let child = std::thread::spawn(|| {
        let mut c = std::process::Command::new("sleep");
        c.arg("60");
        // SAFETY: prctl(2) is async-signal-safe; the closure touches no parent memory.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        c.spawn().expect("spawn sleep")
    })
    .join()
    .expect("thread");
    let mut child = child;
    let status = child.wait().expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}

#[test]
fn virtiofsd_spawned_for_a_short_lived_thread_survives_it() {
    let _serial = serial();
    let f = fake("quiet");
    let cfg = ShareConfig::new(&f.share, &f.socket);
    let fs = std::thread::spawn(move || Virtiofsd::spawn_with(&f.binary, &cfg).map(|fs| (fs, f)))
        .join()
        .expect("thread")
        .expect("spawn");
    let (fs, f) = fs;
    // The control above dies within milliseconds of its thread's end.
    std::thread::sleep(Duration::from_millis(500));
    assert!(fs.exited().is_none(), "{:?}", fs.exited());
    assert!(alive(fs.pid()));
    beacon_virtiofsd_launch::connect(&f.socket).expect("still listening");
    fs.stop(Duration::from_secs(5)).expect("stop");
}

/// Started without waiting, a virtiofsd becomes ready later; one that dies
/// before it is waited for reports the death from `wait_ready`, and nothing
/// of it is left.
#[test]
fn a_started_virtiofsd_is_waited_for_later() {
    let _serial = serial();
    let f = fake("quiet");
    let cfg = ShareConfig::new(&f.share, &f.socket);
    let mut fs = Virtiofsd::start_with(&f.binary, &cfg).expect("start");
    fs.wait_ready(Duration::from_secs(10)).expect("ready");
    assert!(f.socket.exists());
    fs.wait_ready(Duration::from_secs(10))
        .expect("waiting again is no error");
    drop(fs);
    assert!(!f.socket.exists());

    let mut fs = Virtiofsd::start_with(Path::new("/bin/sh"), &cfg).expect("start");
    let err = fs
        .wait_ready(Duration::from_secs(10))
        .expect_err("sh dies on virtiofsd's flags");
    assert!(matches!(err, LaunchError::Died { .. }), "{err}");
    drop(fs);
    assert_no_vfsd_threads("no vfsd thread left");
}
