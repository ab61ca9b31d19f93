//! Scenarios both shim end-to-end tests run against their containerd: the
//! host-mode one (vminitd as a host process) and the VM one.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use beacon_tests::assets::lab_visible_tempdir;
use beacon_tests::containerd::{install_guest, Containerd, RUNTIME};
use beacon_tests::images::BUSYBOX_IMAGE;
use beacon_tests::lab::{here_or_in_lab, kvm_host, KvmHost};

/// Where a VM test finds the guest kernel and initrd (`BEACON_SHARE_DIR`).
const SHARE_ENV: &str = "BEACON_TEST_SHARE_DIR";

/// Hardware KVM and CAP_SYS_ADMIN (TAPs, mounts): a VM test runs right here.
pub fn has_hardware_kvm_and_caps() -> bool {
    kvm_host() == KvmHost::Hardware
        && std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|c| c & (1 << 24) != 0)
}

/// The start of a VM test `test`: the guest files laid out as `make install`
/// does (built on the host: cargo and the kernel build are too slow under
/// emulation), then either `Some(share folder)` to run here, or `None` once
/// the test ran (and passed) in the nested lab with `env` besides the share.
pub fn vm_test_here(test: &str, env: &[(&str, String)]) -> Option<PathBuf> {
    let share = match std::env::var_os(SHARE_ENV) {
        Some(s) => PathBuf::from(s),
        None => {
            let dir = lab_visible_tempdir().expect("tempdir").keep();
            install_guest(&dir).expect("guest kernel and initrd")
        }
    };
    let mut all = vec![(SHARE_ENV, share.display().to_string())];
    all.extend(env.iter().cloned());
    if here_or_in_lab(
        has_hardware_kvm_and_caps(),
        "there is no KVM that runs real guests",
        test,
        &all,
    ) {
        Some(share)
    } else {
        let _ = std::fs::remove_dir_all(share.parent().unwrap_or(&share));
        None
    }
}

/// A shell script's standard output.
pub fn sh(script: &str) -> String {
    let o = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("sh");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A command's exit code and output, for failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `ctr run --rm` of the busybox image as `id`.
pub fn run(containerd: &Containerd, id: &str, args: &[&str]) -> Output {
    let mut a = vec!["run", "--rm", "--runtime", RUNTIME, BUSYBOX_IMAGE, id];
    a.extend_from_slice(args);
    containerd.ctr(&a).expect("ctr run")
}

/// A failure message with containerd's (and so the shims') recent log.
pub fn failure(containerd: &Containerd, what: &str, o: &Output) -> String {
    format!(
        "{what}: {}\ncontainerd log:\n{}",
        text(o),
        containerd.log_tail(80)
    )
}

/// Remove a task once it has stopped, then its container.
pub fn remove(containerd: &Containerd, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let o = containerd.ctr(&["task", "rm", id]).expect("task rm");
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            failure(containerd, "task rm", &o)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = containerd.ctr(&["containers", "rm", id]).expect("rm");
    assert!(
        o.status.success(),
        "{}",
        failure(containerd, "container rm", &o)
    );
}

/// What a VM test adds to the basic scenarios (the host-mode test adds nothing).
#[derive(Default)]
pub struct Extras<'a> {
    /// More `ctr run` options for the one-shot container (`--mount ...`).
    pub run_options: Vec<String>,
    /// Shell run inside the one-shot container (its output goes to stderr); it
    /// failing makes the container exit 9 instead of 7.
    pub one_shot_checks: &'a str,
    /// Called while the long-running container `c5` runs (metrics, pause, tty).
    pub while_running: Option<&'a dyn Fn(&Containerd)>,
}

/// The basic scenarios in as few containers as possible (each one costs a VM
/// boot, which takes over a minute inside the emulated lab):
///
/// * one `ctr run --rm` with stdin piped in: exact stdout (what `wc -c` counted
///   of stdin, whose EOF ended it, then 10 MiB byte for byte), exact stderr, and
///   exit code 7;
/// * one detached container: an exec with exact output and exit code 3, `task
///   ls`, SIGTERM caught by the container (exit 42), delete;
/// * a container id starting with '-', refused before any VM starts.
pub fn basic_scenarios(containerd: &Containerd, extras: &Extras) {
    let failure = |what: &str, o: &Output| failure(containerd, what, o);

    let script = format!(
        "wc -c; echo to-stderr >&2; {{ {} ; }} >&2 || exit 9; \
         yes 0123456789abcde | head -c 10485760; exit 7",
        if extras.one_shot_checks.is_empty() {
            "true"
        } else {
            extras.one_shot_checks
        }
    );
    let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
    args.extend(extras.run_options.iter().map(String::as_str));
    args.extend([BUSYBOX_IMAGE, "c1", "sh", "-c", script.as_str()]);
    let o = containerd
        .ctr_stdin(&args, b"abc")
        .expect("ctr run with stdin");
    assert_eq!(
        o.status.code(),
        Some(7),
        "{}",
        failure("one-shot exit code", &o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).starts_with("to-stderr\n"),
        "{}",
        failure("stderr", &o)
    );
    let payload = o
        .stdout
        .strip_prefix(b"3\n")
        .unwrap_or_else(|| panic!("{}", failure("stdin counted, then EOF", &o)));
    assert_eq!(payload.len(), 10 << 20, "{}", failure("10 MiB length", &o));
    assert!(
        payload
            .chunks(16)
            .all(|c| c == &b"0123456789abcde\n"[..c.len()]),
        "10 MiB arrived with different bytes"
    );

    // A detached container, an exec into it, SIGTERM, delete.
    let o = containerd
        .ctr(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            BUSYBOX_IMAGE,
            "c5",
            "sh",
            "-c",
            "trap 'exit 42' TERM; while true; do sleep 1; done",
        ])
        .expect("ctr run -d");
    assert!(o.status.success(), "{}", failure("run -d", &o));
    let o = containerd
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "c5",
            "sh",
            "-c",
            "echo exec-ok; exit 3",
        ])
        .expect("exec");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "exec-ok\n",
        "{}",
        failure("exec", &o)
    );
    assert_eq!(o.status.code(), Some(3), "{}", failure("exec exit", &o));
    let o = containerd.ctr(&["task", "ls"]).expect("task ls");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("c5"),
        "{}",
        failure("task ls", &o)
    );
    if let Some(more) = extras.while_running {
        more(containerd);
    }
    let o = containerd
        .ctr(&["task", "kill", "-s", "SIGTERM", "c5"])
        .expect("kill");
    assert!(o.status.success(), "{}", failure("SIGTERM", &o));
    wait_stopped(containerd, "c5");
    remove(containerd, "c5");

    // A container id that starts with '-' never reaches the guest.
    let o = containerd
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            BUSYBOX_IMAGE,
            "--",
            "-x",
            "true",
        ])
        .expect("ctr run -x");
    assert!(!o.status.success());
}

/// Wait until `ctr task ls` shows `id` STOPPED.
pub fn wait_stopped(containerd: &Containerd, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let o = containerd.ctr(&["task", "ls"]).expect("ls");
        let ls = String::from_utf8_lossy(&o.stdout).to_string();
        if ls
            .lines()
            .any(|l| l.split_whitespace().next() == Some(id) && l.contains("STOPPED"))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            failure(containerd, &format!("{id} stopped"), &o)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
