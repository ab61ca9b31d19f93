//! The reaper against real pid reuse. An exit nobody claimed (an orphan's)
//! must never be handed to a later process that got the same pid.
//!
//! Pid reuse is forced, not waited for: the test re-runs itself as PID 1 of
//! a private pid namespace (`unshare -p -f --mount-proc`), where it owns the
//! pid counter, and writes `/proc/sys/kernel/ns_last_pid` so the next child
//! gets the pid of the one that just exited. Its own test binary, because
//! the reaper collects every child of the process.

use std::process::Command;
use std::time::{Duration, Instant};

use vminitd::reaper::{boot_ticks_now, BirthWindow, Reaper};

const INNER_ENV: &str = "VMINITD_PID_REUSE_INNER";
const TEST_NAME: &str = "a_reused_pid_never_receives_an_old_exit";
const CHECKED: &str = "PID-REUSE-CHECKED";

#[test]
fn a_reused_pid_never_receives_an_old_exit() {
    if std::env::var_os(INNER_ENV).is_some() {
        inside_a_private_pid_namespace();
        return;
    }
    let me = std::env::current_exe().expect("current exe");
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount", "--mount-proc", "--kill-child"])
        .arg(&me)
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(INNER_ENV, "1")
        .output()
        .expect("run unshare (util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "inner run failed:\n{text}");
    // The inner run must have run the check, not filtered it away.
    assert!(text.contains(CHECKED), "inner run did not check:\n{text}");
    assert!(
        text.contains("test result: ok. 1 passed"),
        "inner run:\n{text}"
    );
    eprintln!("{text}");
}

fn inside_a_private_pid_namespace() {
    assert_eq!(std::process::id(), 1, "not PID 1 of a fresh pid namespace");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let reaper = Reaper::start().expect("reaper");
        // The first process: exits 0, and nobody ever asks for its exit.
        #[allow(clippy::zombie_processes)]
        let first = Command::new("/bin/true").spawn().expect("spawn true");
        let pid = i32::try_from(first.id()).expect("pid");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(Instant::now() < deadline, "pid {pid} was never reaped");
            reaper.reap_all();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Start times have a clock tick's resolution: the second process
        // must start in a later tick than the first did to be told apart.
        let reaped_at = boot_ticks_now();
        while boot_ticks_now() <= reaped_at {
            assert!(Instant::now() < deadline, "the boot clock stands still");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }

        // The second process gets the same pid.
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("write ns_last_pid");
        let born = boot_ticks_now();
        #[allow(clippy::zombie_processes)]
        let second = Command::new("/bin/sleep")
            .arg("1000")
            .spawn()
            .expect("spawn sleep");
        assert_eq!(
            i32::try_from(second.id()).expect("pid"),
            pid,
            "ns_last_pid did not force pid reuse"
        );
        let mut exited = reaper
            .subscribe(pid, BirthWindow::since(born))
            .expect("subscribe to the second process");
        assert!(
            exited.try_recv().is_err(),
            "the second process was handed the first one's exit"
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill");
        let info = tokio::time::timeout(Duration::from_secs(30), exited)
            .await
            .expect("the second exit in time")
            .expect("delivered");
        assert_eq!(info.status, 137, "the second process's own exit");
        println!("{CHECKED}: pid {pid} reused; its new holder got its own exit (137)");
    });
}
