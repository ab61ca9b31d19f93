//! Booting itself, checked in every device boot (the boot matrix): the guest
//! reports the vCPUs it sees in /proc/cpuinfo, its MemTotal, its command line
//! and a file from its initrd; its kernel log must hold no kernel warning
//! (`WARNING: CPU:`; an inconsistent CPUID, for one, shows as "XSAVE
//! consistency problem"; soft-lockup and RCU-stall reports are not counted:
//! they are what a starved vCPU in the emulated lab looks like); and the VMM
//! records the boot timer (beacon kernel: Debian's kernel does not let the
//! init write the port through /dev/port). The boots vary, between them, the
//! kernel format (ELF vmlinux with the PVH entry, bzImage), 1 and 2 vCPUs,
//! hotplug-capable vCPUs on our VMM (2 of 4; QEMU microvm cannot), and the
//! end (reset or ACPI power off);
//! see `main.rs` for which boot has which.
//!
//! [`bad_input_fails_before_anything_runs`] (no VM): the QEMU backend refuses
//! bad input before QEMU starts.

use std::path::Path;

use beacon_tests::device_suite::{GuestKernel, Scenario};

use crate::VMM;

/// The boot part of a device boot with `cpus` vCPUs and `memory_mib` MiB,
/// whose case is named `case` (on its command line as `beacon.case=`), with
/// `marker` (a host file holding `token`) in its initrd.
pub fn part(
    case: &str,
    kernel: GuestKernel,
    cpus: u8,
    memory_mib: u64,
    marker: &Path,
    token: &str,
) -> Scenario {
    let kib = memory_mib * 1024;
    // MemTotal is RAM minus the kernel's reservations (image, page tables).
    let min_kib = kib * 6 / 10;
    let mut expect = vec![
        format!("BOOT-SEEN: {cpus} vCPUs"),
        format!("BOOT-CMDLINE: console=ttyS0"),
        format!("beacon.case={case}"),
        format!("BOOT-MARKER: {token}"),
        "BOOT-OK".to_string(),
    ];
    if kernel.is_beacon() {
        expect.push("guest init reached after".into());
    }
    Scenario {
        name: "boot",
        checks: format!(
            r#"
n=$(grep -c ^processor /proc/cpuinfo)
mem=$(awk '/MemTotal/ {{print $2}}' /proc/meminfo)
echo "BOOT-SEEN: $n vCPUs, $mem KiB RAM (possible CPUs $(cat /sys/devices/system/cpu/possible))"
echo "BOOT-CMDLINE: $(cat /proc/cmdline)"
echo "BOOT-MARKER: $(cat /etc/beacon-marker)"
[ "$n" -eq {cpus} ] || {{ echo "expected {cpus} vCPUs"; exit 1; }}
[ "$mem" -le {kib} ] && [ "$mem" -ge {min_kib} ] || {{ echo "MemTotal out of range for {memory_mib} MiB"; exit 1; }}
dmesg >/tmp/boot-dmesg || {{ echo "dmesg failed"; exit 1; }}
grep -q 'Linux version' /tmp/boot-dmesg || {{ echo "dmesg has no boot log"; exit 1; }}
if grep -E 'XSAVE consistency|WARNING: CPU:' /tmp/boot-dmesg; then echo "the kernel warned at boot"; exit 1; fi
echo BOOT-OK
"#
        ),
        guest_files: vec![(marker.to_path_buf(), "/etc/beacon-marker".into())],
        expect,
        ..Scenario::default()
    }
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
