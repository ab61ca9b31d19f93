//! `beacon-vmm run --backend qemu` boots the beacon kernel to init under KVM (in the
//! nested lab on hosts without hardware KVM), ends with exit 0 when the guest
//! reboots, and reads the boot timer; bad input fails before QEMU starts.

use std::time::Duration;

use beacon_tests::assets::{beacon_kernel_dir, hello_initrd, lab_visible_tempdir};
use beacon_tests::lab::run_with_kvm;

const VMM: &str = env!("CARGO_BIN_EXE_beacon-vmm");

#[test]
fn qemu_backend_boots_to_init_and_reports_boot_timer() {
    let kernel = beacon_kernel_dir().expect("beacon kernel").join("vmlinux");
    let tmp = lab_visible_tempdir().expect("tempdir");
    let initrd = hello_initrd(tmp.path()).expect("initrd");
    let argv = [
        VMM.to_string(),
        "run".into(),
        "--backend".into(),
        "qemu".into(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        initrd.display().to_string(),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "192".into(),
        "--cmdline".into(),
        "console=ttyS0 panic=-1 quiet".into(),
    ];
    let out = run_with_kvm(&argv, Duration::from_secs(420)).expect("run");
    assert_eq!(out.exit_code, 0, "{}", out.console);
    assert!(out.output.contains("BEACON-HELLO"), "{}", out.output);
    assert!(out.output.contains("2 vCPUs"), "{}", out.output);
    // MemTotal is RAM minus the kernel's own reservations: within 192 MiB, above 150.
    let kib: u64 = out
        .output
        .split("vCPUs, ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("MemTotal in greeting");
    assert!(kib <= 192 * 1024 && kib > 150 * 1024, "MemTotal {kib} KiB");
    assert!(
        out.output.contains("guest init reached after"),
        "boot timer not seen:\n{}",
        out.output
    );
}

#[test]
fn bad_input_fails_before_anything_runs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let not_kernel = tmp.path().join("k");
    std::fs::write(&not_kernel, b"not a kernel").expect("write");
    for (args, needle) in [
        (vec!["--kernel", "/nonexistent/vmlinux"], "cannot be read"),
        (
            vec!["--kernel", not_kernel.to_str().expect("utf8")],
            "neither an ELF",
        ),
        (vec!["--kernel", "/bin/ls", "--cpus", "0"], "at least 1"),
        (vec!["--kernel", "/bin/ls", "--memory", "8"], "too small"),
    ] {
        let out = std::process::Command::new(VMM)
            .arg("run")
            .args(["--backend", "qemu"])
            .args(&args)
            .output()
            .expect("run beacon-vmm");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
