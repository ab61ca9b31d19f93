//! virtio-blk benchmark: the in-process KVM backend's device against QEMU's
//! virtio-blk-device, same kernel, same guest, same image, same run,
//! interleaved. Prints medians and kvm/qemu ratios; asserts nothing (timings on
//! a shared machine, and inside the nested lab, are noisy: read the ratios).
//!
//! ```text
//! cargo build --release -p beacon-vmm --bin beacon-vmm --example blk_bench
//! tests/lab/run -- target/release/examples/blk_bench --kernel VMLINUX --runs 3
//! ```
//!
//! The guest (the device-test init with busybox) runs `dd` with O_DIRECT on
//! `/dev/vda`, so every block goes to the device, and times each workload with
//! `/proc/uptime` (10 ms resolution; the workloads take seconds in the lab):
//! sequential 1 MiB reads and writes (bandwidth, few requests) and 4 KiB reads
//! and writes (request rate: per-request cost, notifications and interrupts).
//! The image is a regular file in the host page cache for both backends (QEMU's
//! default `cache=writeback`; ours reads and writes through the page cache).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use beacon_tests::guest::{device_initrd, DeviceGuest};
use clap::Parser;

mod common;
use beacon_tests::bench::sample;

#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    vm: common::VmArgs,
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Size of the disk image in MiB (at least 64).
    #[arg(long, default_value_t = 128)]
    disk_mib: u64,
}

const BACKENDS: [&str; 2] = ["kvm", "qemu"];

/// (name, bytes moved, dd arguments).
const WORKLOADS: [(&str, u64, &str); 4] = [
    (
        "seq-read-1M",
        64 << 20,
        "if=/dev/vda of=/dev/null bs=1M count=64 iflag=direct",
    ),
    (
        "seq-write-1M",
        64 << 20,
        "if=/dev/zero of=/dev/vda bs=1M count=64 oflag=direct conv=fsync",
    ),
    (
        "read-4k",
        8 << 20,
        "if=/dev/vda of=/dev/null bs=4k count=2048 iflag=direct",
    ),
    (
        "write-4k",
        8 << 20,
        "if=/dev/zero of=/dev/vda bs=4k count=2048 oflag=direct conv=fsync",
    ),
];

fn guest_script() -> String {
    let mut s = String::from(
        "set -e\n\
         t() { cut -d' ' -f1 /proc/uptime | tr -d .; }\n",
    );
    for (name, bytes, dd) in WORKLOADS {
        s.push_str(&format!(
            "sync; echo 3 > /proc/sys/vm/drop_caches\n\
             a=$(t); dd {dd} 2>/dev/null; b=$(t)\n\
             echo \"BENCH {name} {bytes} $((b - a))\"\n"
        ));
    }
    s
}

/// One boot: centiseconds per workload.
fn boot(
    args: &Args,
    vmm: &Path,
    backend: &str,
    initrd: &Path,
    image: &Path,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let started = Instant::now();
    let out = Command::new(vmm)
        .arg("run")
        .args(["--backend", backend, "--memory", &args.memory.to_string()])
        .arg("--kernel")
        .arg(&args.vm.kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("--disk")
        .arg(format!("path={}", image.display()))
        .args(["--cmdline", "console=ttyS0 panic=-1 quiet"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", vmm.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut times = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("BENCH") {
            continue;
        }
        if let (Some(name), Some(_bytes), Some(cs)) = (words.next(), words.next(), words.next()) {
            times.insert(name.to_string(), cs.parse::<u64>().unwrap_or(0).max(1));
        }
    }
    if !out.status.success() || times.len() != WORKLOADS.len() {
        bail!(
            "{backend} boot failed ({}, {} of {} results):\n{}\n{}",
            out.status,
            times.len(),
            WORKLOADS.len(),
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "blk_bench: {backend} boot in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(times)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.disk_mib < 64 {
        bail!("--disk-mib must be at least 64 (the sequential workloads move 64 MiB)");
    }
    let vmm = args.vm.vmm()?;
    let tmp = tempfile::tempdir()?;
    let image = tmp.path().join("disk.img");
    // Real data (not a sparse file): reads come from the page cache, not holes.
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    let mut data = Vec::with_capacity((args.disk_mib << 20) as usize);
    for _ in 0..args.disk_mib {
        data.extend_from_slice(&chunk);
    }
    std::fs::write(&image, &data).context("writing the disk image")?;
    drop(data);
    let initrd = device_initrd(
        tmp.path(),
        "bench-initrd.gz",
        &DeviceGuest {
            checks: guest_script(),
            ..Default::default()
        },
    )
    .map_err(anyhow::Error::msg)?;

    // The first QEMU start in a fresh lab VM reads QEMU and its ~50 libraries
    // over 9p, which can outlast the backend's 10 s wait for QMP on a loaded
    // host; load them once first.
    let _ = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status();
    // Centiseconds (whole numbers, exact as f64).
    let mut samples: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    for run in 0..args.vm.runs {
        for backend in BACKENDS {
            let times = boot(&args, &vmm, backend, &initrd, &image)
                .with_context(|| format!("run {run}"))?;
            for (name, bytes, _) in WORKLOADS {
                let cs = times.get(name).copied().unwrap_or(1);
                sample(
                    "blk",
                    name,
                    backend,
                    "MiB/s",
                    bytes as f64 / 1048576.0 / (cs as f64 / 100.0),
                );
                samples.entry((backend, name)).or_default().push(cs as f64);
            }
        }
    }

    println!(
        "virtio-blk, O_DIRECT dd in the guest, {} boots per backend, medians",
        args.vm.runs
    );
    println!(
        "{:<14} {:>11} {:>11} {:>11} {:>11} {:>9}",
        "workload", "kvm MiB/s", "qemu MiB/s", "kvm req/s", "qemu req/s", "kvm/qemu"
    );
    for (name, bytes, dd) in WORKLOADS {
        let block: f64 = if dd.contains("bs=4k") {
            4096.0
        } else {
            1048576.0
        };
        let rate = |backend| {
            // No samples (--runs 0): 0 cs, an infinite rate, as before.
            let cs = samples
                .get(&(backend, name))
                .and_then(|v| common::median(v.iter().copied()))
                .unwrap_or(0.0);
            bytes as f64 / (cs / 100.0)
        };
        let (k, q) = (rate("kvm"), rate("qemu"));
        let mib = 1048576.0;
        println!(
            "{:<14} {:>11.1} {:>11.1} {:>11.0} {:>11.0} {:>9.2}",
            name,
            k / mib,
            q / mib,
            k / block,
            q / block,
            k / q
        );
    }
    Ok(())
}
