//! The lab runner itself: exit codes and output come back, a hung command is killed
//! at the timeout with no QEMU left behind, a missing QEMU is a clear error.

use std::time::Duration;

use beacon_tests::lab::{Lab, LabError};

fn qemu_children() -> usize {
    // QEMU processes whose parent is this test process.
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
                    let comm_ok = stat.contains("(qemu-system-x86");
                    let ppid = stat
                        .rsplit_once(") ")
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string));
                    comm_ok && ppid.as_deref() == Some(me.as_str())
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn exit_code_output_timeout_and_cleanup() {
    let lab = Lab {
        timeout: Duration::from_secs(300),
        ..Lab::new()
    };
    let out = lab
        .run(&[
            "sh",
            "-c",
            "echo to-stdout; echo to-stderr >&2; test -c /dev/kvm && exit 3",
        ])
        .expect("lab run");
    assert_eq!(out.exit_code, 3, "console:\n{}", out.console);
    assert!(out.output.contains("to-stdout") && out.output.contains("to-stderr"));

    // The host root is visible read-only under a writable overlay: writes succeed
    // inside and never reach the host.
    let marker = std::env::current_dir()
        .expect("cwd")
        .join("lab-write-probe-must-not-exist");
    let out = lab
        .run(&[
            "sh",
            "-c",
            &format!(
                "echo x > '{}' && cat '{}'",
                marker.display(),
                marker.display()
            ),
        ])
        .expect("lab run");
    assert_eq!(out.exit_code, 0, "{}", out.console);
    assert!(!marker.exists(), "a lab write reached the host");

    let hung = Lab {
        timeout: Duration::from_secs(40),
        ..Lab::new()
    };
    match hung.run(&["sleep", "3600"]) {
        Err(LabError::Timeout { .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(qemu_children(), 0, "QEMU left behind after the timeout");
}

#[test]
fn missing_qemu_is_reported() {
    // A Lab pointed at a QEMU that does not exist, through the documented variable;
    // run in a child process so the environment change stays local.
    let exe = std::env::current_exe().expect("current exe");
    if std::env::var_os("BEACON_LAB_TEST_CHILD").is_some() {
        let err = Lab::new().run(&["true"]).expect_err("no qemu");
        assert!(matches!(err, LabError::QemuMissing(_)), "{err}");
        assert!(err.to_string().contains("install"), "{err}");
        return;
    }
    let status = std::process::Command::new(exe)
        .args(["--exact", "missing_qemu_is_reported", "--nocapture"])
        .env("BEACON_LAB_TEST_CHILD", "1")
        .env("BEACON_LAB_QEMU", "/nonexistent/qemu-system-x86_64")
        .status()
        .expect("child test");
    assert!(status.success());
}
