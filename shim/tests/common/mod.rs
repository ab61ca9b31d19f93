//! Scenarios both shim end-to-end tests run against their containerd: the
//! host-mode one (vminitd as a host process) and the VM one.

#![allow(dead_code)]

use std::process::Output;
use std::time::{Duration, Instant};

use beacon_tests::containerd::{Containerd, RUNTIME};
use beacon_tests::images::BUSYBOX_IMAGE;

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

/// Exact output, exit codes, 10 MiB of output, stdin, exec, kill, a bad id.
pub fn basic_scenarios(containerd: &Containerd) {
    let run = |id: &str, args: &[&str]| run(containerd, id, args);
    let failure = |what: &str, o: &Output| failure(containerd, what, o);

    // Exact output.
    let o = run("c1", &["echo", "hello-from-the-shim"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "hello-from-the-shim\n",
        "{}",
        failure("echo", &o)
    );
    assert!(o.status.success(), "{}", failure("echo", &o));

    // Exit codes propagate.
    let o = run("c2", &["sh", "-c", "echo to-stderr >&2; exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{}", failure("exit 7", &o));
    assert_eq!(String::from_utf8_lossy(&o.stderr), "to-stderr\n");

    // 10 MiB of stdout arrive byte for byte.
    let o = run(
        "c3",
        &["sh", "-c", "yes 0123456789abcde | head -c 10485760"],
    );
    assert!(o.status.success(), "{}", failure("10 MiB", &o));
    assert_eq!(o.stdout.len(), 10 << 20, "{}", failure("10 MiB length", &o));
    assert!(o
        .stdout
        .chunks(16)
        .all(|c| c == &b"0123456789abcde\n"[..c.len()]));

    // stdin piped in reaches the process, and its EOF ends it.
    let o = containerd
        .ctr_stdin(
            &[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                BUSYBOX_IMAGE,
                "c4",
                "sh",
                "-c",
                "wc -c; cat",
            ],
            b"abc",
        )
        .expect("ctr run with stdin");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "3",
        "{}",
        failure("stdin", &o)
    );

    // A detached container, an exec into it, kill, delete.
    let o = containerd
        .ctr(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            BUSYBOX_IMAGE,
            "c5",
            "sleep",
            "1000",
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
    let o = containerd
        .ctr(&["task", "kill", "-s", "SIGKILL", "c5"])
        .expect("kill");
    assert!(o.status.success(), "{}", failure("kill", &o));
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
