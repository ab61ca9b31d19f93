//! The beacon kernel and initrd boot for real under KVM: QEMU microvm with KVM runs
//! the hello init, which prints a marker and ends the VM. On hosts without hardware
//! KVM this runs inside the nested lab. This is also the QEMU side of later parity
//! tests with our own VMM.

use std::time::Duration;

use beacon_tests::assets::{beacon_kernel_dir, hello_initrd, lab_visible_tempdir};
use beacon_tests::lab::run_with_kvm;
use beacon_tests::script::qemu_microvm_argv;

#[test]
fn qemu_microvm_boots_beacon_kernel_to_init() {
    let kernel = beacon_kernel_dir().expect("beacon kernel").join("vmlinux");
    let tmp = lab_visible_tempdir().expect("tempdir");
    let initrd = hello_initrd(tmp.path()).expect("hello initrd");
    // No reboot=k: microvm has no i8042; its ACPI reset register ends QEMU (-no-reboot).
    let cmdline = "console=ttyS0 panic=-1 quiet beacon.marker=cmdline-intact";
    let argv = qemu_microvm_argv(&kernel, &initrd, cmdline, 2, 256);
    let out = run_with_kvm(&argv, Duration::from_secs(420)).expect("lab run");
    assert_eq!(out.exit_code, 0, "QEMU failed:\n{}", out.console);
    assert!(
        out.output
            .contains("BEACON-HELLO: hello from the beacon kernel 6.1"),
        "no greeting:\n{}",
        out.console
    );
    assert!(
        out.output.contains("2 vCPUs"),
        "vCPU count:\n{}",
        out.output
    );
    assert!(
        out.output.contains("beacon.marker=cmdline-intact"),
        "cmdline:\n{}",
        out.output
    );
    eprintln!("lab boot took {:.1} s", out.elapsed.as_secs_f64());
}
