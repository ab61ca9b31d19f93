//! The VMM's VM suite: every virtio device (rng, blk, net, fs, vsock) and the
//! boot matrix, on both backends (`kvm`, ours, and `qemu`) with the beacon
//! kernel and Debian's stock cloud kernel (virtio drivers as modules found
//! through ACPI), plus console input. On hosts without hardware KVM every lab
//! VM start and guest boot is slow under emulation, and a lab VM has one
//! (emulated) CPU: so the suite runs in two lab VMs side by side, one for each
//! guest kernel, each booting its kernel on both backends (two tests, which
//! libtest runs in parallel).
//!
//! Each boot carries many devices at once ([`Scenario::combine`]); each device
//! module returns its parts and says what they check. Two boots per (backend,
//! kernel), because some variants exclude each other (one TAP, one vsock per
//! boot, a killed virtiofsd ends the boot):
//!
//! | boot | kvm | qemu |
//! | --- | --- | --- |
//! | `dev1` | boot, rng, vsock hybrid, blk, fs, net userspace (TAP fd), memory hotplug (512 + 256 MiB, a virtio-fs share reading into it), hostile guest | boot, rng, vsock vhost, blk, fs, net vhost (microvm) |
//! | `dev2` | boot, vsock vhost, net vhost, CPU hotplug, fs kill | boot, net tap, CPU hotplug, memory hotplug (as on kvm), fs kill (QEMU's hotplug machine, q35: virtio-pci) |
//!
//! and the boot matrix spread over them, no variant needing a boot of its own:
//!
//! | boot | beacon kernel | stock kernel |
//! | --- | --- | --- |
//! | `dev1` | ELF vmlinux, 2 vCPUs, reset | 2 vCPUs, power off |
//! | `dev2` | bzImage, 2 vCPUs (of 4 hotplug-capable: hot-added and removed), power off | 1 vCPU (of 2: hot-added and removed), power off |
//!
//! The refusals that need a real KVM but no guest (`fs-refused` on both
//! backends, `vsock-refused` on kvm) run in the lab before `dev1` with the
//! beacon kernel; those that need no KVM (bad images, bad QEMU input) are
//! plain tests on the host. `cargo test -p beacon-vmm --test devices`.
//!
//! Where the time goes in the lab (the suite prints each boot's figures and
//! `MATRIX` lines; see them with `--nocapture`, as `make test` runs it): in
//! a CI-like run beside the other lanes, `dev1` on our VMM took about 345 s
//! (vsock 85 to 130 s with 32 MiB streams, now 16 MiB; memory hotplug 80 to
//! 90 s, its fill since halved), `dev2` on QEMU (q35) 300 to 370 s (memory
//! hotplug about 95 s), the others 100 to 200 s; a boot to init takes 10 to
//! 60 s.

mod blk;
mod boot;
mod console;
mod fs;
mod hostile;
mod hotplug;
mod net;
mod rng;
mod vsock;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use beacon_tests::assets::{beacon_kernel_dir, lab_visible_tempdir};
use beacon_tests::device_suite::{
    assert_all_passed, run_in_one_lab, GuestEnd, GuestKernel, Scenario,
};

pub const VMM: &str = env!("CARGO_BIN_EXE_beacon-vmm");

/// Seconds one boot may take (boot, every part's checks, the end), stock
/// kernel in a busy nested lab included.
const DEV1_TIMEOUT_SECS: u32 = 1500;
const DEV2_TIMEOUT_SECS: u32 = 1200;

/// The guest programs, built in release (in the guest the vsock tool checks
/// 200 MiB under emulation, where a debug build would take most of the
/// guest's CPU); returns (`beacon-vsock-tool`, `beacon-hostile-guest`).
fn guest_programs() -> (PathBuf, PathBuf) {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/devices-HASH -> target/
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("test binary under target/<profile>/deps");
    let names = ["beacon-vsock-tool", "beacon-hostile-guest"];
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--release", "-p", "beacon-tests"]);
    for n in names {
        cmd.args(["--bin", n]);
    }
    let status = cmd
        .status()
        .expect("running cargo build for the guest programs");
    assert!(status.success(), "building {names:?} failed");
    let [vsock, hostile] = names.map(|n| target.join("release").join(n));
    for p in [&vsock, &hostile] {
        assert!(p.is_file(), "{} was not built", p.display());
    }
    (vsock, hostile)
}

/// What the boots need from the host.
struct Assets<'a> {
    tool: &'a Path,
    hostile: &'a Path,
    blk: &'a blk::Assets,
    marker: &'a Path,
    token: &'a str,
}

/// One combined boot on `backend` with `kernel`.
#[allow(clippy::too_many_arguments)]
fn boot(
    a: &Assets,
    name: &'static str,
    backend: &'static str,
    kernel: GuestKernel,
    cpus: u8,
    max_cpus: u8,
    end: GuestEnd,
    devices: Vec<Scenario>,
    timeout_secs: u32,
) -> Scenario {
    let memory_mib = 512;
    let case = format!("{name}-{backend}-{}", kernel.name());
    let mut parts = Vec::new();
    // Refusals first: they need no guest and no part's host jobs running.
    if name == "dev1" && kernel.is_beacon() {
        parts.push(fs::refusals(backend));
        if backend == "kvm" {
            parts.push(vsock::refusals(a.tool));
        }
    }
    parts.push(boot::part(
        &case, kernel, cpus, memory_mib, a.marker, a.token,
    ));
    parts.extend(devices);
    let hotplug = parts
        .iter()
        .any(|p| p.name == "cpu-hotplug" || p.name == "memory-hotplug");
    let mut s = Scenario::combine(name, parts);
    if hotplug {
        s.vmm_args.extend(hotplug::api_socket_args());
        // QEMU's hotplug machine has virtio-pci devices.
        if backend == "qemu" {
            s.stock_modules.insert(0, "virtio_pci");
        }
    }
    s.backends.retain(|b| *b == backend);
    s.kernels = vec![kernel];
    s.cpus = cpus;
    s.max_cpus = Some(max_cpus);
    s.end = end;
    s.memory_mib = memory_mib;
    s.timeout_secs = timeout_secs;
    assert_eq!(
        s.backends,
        [backend],
        "{case}: a part cannot run on {backend}"
    );
    s
}

/// Every boot of the suite (see the module doc).
fn boots(a: &Assets) -> Vec<Scenario> {
    let mut out = Vec::new();
    for backend in ["kvm", "qemu"] {
        for beacon in [true, false] {
            // dev1: the devices' main checks; vsock first, so its host clients
            // find the guest's servers early.
            let (kernel, cpus, end) = if beacon {
                (GuestKernel::Beacon, 2, GuestEnd::Reset)
            } else {
                (GuestKernel::Stock, 2, GuestEnd::PowerOff)
            };
            // 16 MiB streams where our vsock device runs our kernel.
            let big = if backend == "kvm" && beacon {
                vsock::BIG
            } else {
                vsock::MEDIUM
            };
            let (vsock1, net1) = if backend == "kvm" {
                (
                    vsock::hybrid(a.tool, big),
                    net::part(net::Variant::User, backend),
                )
            } else {
                (
                    vsock::vhost(a.tool, big),
                    net::part(net::Variant::Vhost, backend),
                )
            };
            let mut devices = vec![
                rng::part(),
                vsock1,
                blk::part(a.blk, backend),
                fs::shares(),
                net1,
            ];
            // Last: it leaves the devices unusable.
            if backend == "kvm" {
                devices.push(hotplug::memory_part(512, 256, backend));
                let windows = hostile::device_count(&devices);
                devices.push(hostile::part(a.hostile, windows));
            }
            out.push(boot(
                a,
                "dev1",
                backend,
                kernel,
                cpus,
                cpus,
                end,
                devices,
                DEV1_TIMEOUT_SECS,
            ));
            // dev2: the other variants; the killed virtiofsd last.
            let (kernel, cpus, max_cpus) = if beacon {
                (GuestKernel::BeaconBzImage, 2, 4)
            } else {
                (GuestKernel::Stock, 1, 2)
            };
            let mut devices = Vec::new();
            if backend == "kvm" {
                devices.push(vsock::vhost(a.tool, big));
                devices.push(net::part(net::Variant::Vhost, backend));
                devices.push(hotplug::part(cpus, max_cpus, backend));
            } else {
                devices.push(net::part(net::Variant::QemuTap, backend));
                devices.push(hotplug::part(cpus, max_cpus, backend));
                devices.push(hotplug::memory_part(512, 256, backend));
            }
            devices.push(fs::kill(backend));
            out.push(boot(
                a,
                "dev2",
                backend,
                kernel,
                cpus,
                max_cpus,
                GuestEnd::PowerOff,
                devices,
                DEV2_TIMEOUT_SECS,
            ));
        }
    }
    out
}

/// Every device variant runs on every backend that has it, with both kernels.
fn assert_coverage(boots: &[Scenario]) {
    let want: &[(&str, &[&str])] = &[
        (
            "kvm",
            &[
                "boot",
                "rng",
                "blk",
                "fs",
                "fs-kill",
                "net-user",
                "net-vhost",
                "vsock-hybrid",
                "vsock-vhost",
                "hostile",
                "cpu-hotplug",
                "memory-hotplug",
            ],
        ),
        (
            "qemu",
            &[
                "boot",
                "rng",
                "blk",
                "fs",
                "fs-kill",
                "net-vhost",
                "net-tap",
                "vsock-vhost",
                "cpu-hotplug",
                "memory-hotplug",
            ],
        ),
    ];
    for (backend, parts) in want {
        for beacon in [true, false] {
            let have: BTreeSet<&str> = boots
                .iter()
                .filter(|s| s.backends.contains(backend))
                .filter(|s| s.kernels.iter().any(|k| k.is_beacon() == beacon))
                .flat_map(|s| s.parts.iter().map(|p| p.name))
                .collect();
            for p in *parts {
                assert!(
                    have.contains(p),
                    "{p} does not run on {backend} with the {} kernel",
                    if beacon { "beacon" } else { "stock" }
                );
            }
        }
        let refusals: BTreeSet<&str> = boots
            .iter()
            .filter(|s| s.backends.contains(backend))
            .flat_map(|s| s.parts.iter().map(|p| p.name))
            .filter(|n| n.ends_with("-refused"))
            .collect();
        assert!(refusals.contains("fs-refused"), "fs-refused on {backend}");
        if *backend == "kvm" {
            assert!(refusals.contains("vsock-refused"), "vsock-refused");
        }
    }
}

/// Run the boots with the beacon kernel (`beacon`) or the stock kernel in one
/// lab VM, plus `raw` sections (console input with the beacon kernel's).
fn run_half(beacon: bool) {
    let (tool, hostile) = guest_programs();
    let tmp = lab_visible_tempdir().expect("tempdir");
    let blk_dir = tmp.path().join("blk");
    std::fs::create_dir(&blk_dir).expect("blk folder");
    let blk = blk::assets(&blk_dir);
    let token = format!("initrd-token-{}", std::process::id());
    let marker = tmp.path().join("beacon-marker");
    std::fs::write(&marker, &token).expect("marker");
    let a = Assets {
        tool: &tool,
        hostile: &hostile,
        blk: &blk,
        marker: &marker,
        token: &token,
    };
    let all = boots(&a);
    assert_coverage(&all);
    let mut scenarios: Vec<Scenario> = all
        .into_iter()
        .filter(|s| s.kernels.iter().all(|k| k.is_beacon() == beacon))
        .collect();
    assert_eq!(scenarios.len(), 4, "two boots per backend");
    // A developer's shortcut: only the boots named `<boot>-<backend>` in
    // BEACON_DEVICE_ONLY (comma-separated), loudly; `make test` never sets it.
    let only = std::env::var("BEACON_DEVICE_ONLY").unwrap_or_default();
    if !only.is_empty() {
        scenarios.retain(|s| {
            only.split(',')
                .any(|o| s.backends.iter().any(|b| format!("{}-{b}", s.name) == o))
        });
        eprintln!(
            "BEACON_DEVICE_ONLY={only}: running {} of the 4 boots; this is not the whole suite",
            scenarios.len()
        );
    }
    let boots_run = scenarios.len();
    let kernel = beacon_kernel_dir().expect("beacon kernel").join("vmlinux");
    let raw = if beacon {
        vec![console::section_for(&kernel, tmp.path())]
    } else {
        Vec::new()
    };
    let lab_timeout: u64 = scenarios
        .iter()
        .map(|s| u64::from(s.timeout_secs) + 60)
        .sum::<u64>()
        + 600;
    let (results, out) = run_in_one_lab(
        Path::new(VMM),
        &scenarios,
        &raw,
        Duration::from_secs(lab_timeout),
    );
    assert_eq!(results.len(), boots_run, "every boot ran");
    let raw_problems = if beacon {
        console::problems(&out.output)
    } else {
        Vec::new()
    };
    assert_all_passed(&results);
    assert!(raw_problems.is_empty(), "{}", raw_problems.join("\n"));
}

/// Every device and boot variant with the beacon kernel, on both backends,
/// and console input (one lab VM; runs alongside the stock kernel's).
// tests/run-all's main lane skips these two by the name prefix
// `every_device_and_boot_variant_with_the` (its vmm lane runs them): keep it.
#[test]
fn every_device_and_boot_variant_with_the_beacon_kernel() {
    run_half(true);
}

/// Every device and boot variant with the stock kernel, on both backends (one
/// lab VM; runs alongside the beacon kernel's).
#[test]
fn every_device_and_boot_variant_with_the_stock_kernel() {
    run_half(false);
}
