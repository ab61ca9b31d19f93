//! virtio-fs read benchmark: our vhost-user-fs frontend (KVM backend) against
//! QEMU's vhost-user-fs-device, the same virtiofsd (same binary, same flags, a
//! fresh one per boot) and the same guest, interleaved in one run. Prints each
//! run and a table of medians with spread and the kvm/qemu ratio; asserts
//! nothing (timings on a shared machine, and inside the nested lab, are noisy;
//! only the ratio counts).
//!
//! ```text
//! cargo build --release -p beacon-vmm --bin beacon-vmm --example fs_bench
//! tests/lab/run --memory 4096 -- target/release/examples/fs_bench \
//!     --kernel "$(kernel-config/build.sh)/vmlinux"
//! ```
//!
//! Each boot mounts the share, drops the guest's page cache (a fresh guest is
//! cold anyway), reads every file once with `dd bs=1M`, and powers off. The time
//! is taken on the host between the guest's start and end markers arriving on
//! the console (the guest's own /proc/uptime delta is printed alongside).
//! The data set (default 256 files of 4 MiB: 1 GiB) lives in a temporary
//! folder (tmpfs inside the lab), so virtiofsd reads from host memory.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use beacon_virtiofsd_launch::{SandboxMode, ShareConfig, Virtiofsd};
use clap::Parser;

mod common;
use beacon_tests::bench::sample;
use common::Spread;

#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    vm: common::VmArgs,
    /// Files in the data set.
    #[arg(long, default_value_t = 256)]
    files: usize,
    /// MiB per file.
    #[arg(long, default_value_t = 4)]
    file_mib: usize,
    #[arg(long, default_value_t = 2)]
    cpus: u8,
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// Where to put the data set (default: a temporary folder).
    #[arg(long)]
    dir: Option<PathBuf>,
}

const BACKENDS: [&str; 2] = ["kvm", "qemu"];

const INIT: &str = r#"#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /mnt/d
if mount -t virtiofs data /mnt/d; then
    n=$(ls /mnt/d | wc -l)
    echo "FS-BENCH-CLOCK $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    echo "FS-BENCH-START $(cut -d' ' -f1 /proc/uptime) $n"
    for f in /mnt/d/*; do
        dd if="$f" of=/dev/null bs=1M 2>/dev/null || echo "FS-BENCH-FAILED $f"
    done
    echo "FS-BENCH-END $(cut -d' ' -f1 /proc/uptime)"
    umount /mnt/d
else
    echo "FS-BENCH-FAILED mount"
fi
poweroff -f
"#;

/// One boot's result.
struct Sample {
    /// Host time between the start and end markers.
    host: Duration,
    /// The guest's own /proc/uptime delta.
    guest_secs: f64,
}

fn build_initrd(dir: &Path) -> anyhow::Result<PathBuf> {
    let init = dir.join("fs-bench-init");
    std::fs::write(&init, INIT).context("writing the bench init")?;
    let spec = beacon_initrd::InitrdSpec {
        init,
        busybox: Some(PathBuf::from("/bin/busybox")),
        ..Default::default()
    };
    let out = dir.join("fs-bench-initrd.gz");
    let mut file = std::fs::File::create(&out).context("creating the initrd")?;
    beacon_initrd::build(&spec, &mut file).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(out)
}

fn make_data(dir: &Path, files: usize, file_mib: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut block = vec![0u8; file_mib << 20];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut block))
        .context("reading /dev/urandom")?;
    for i in 0..files {
        // A different first word per file, so no two files are alike.
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let mut f = std::fs::File::create(dir.join(format!("data-{i:04}")))?;
        f.write_all(&block)?;
    }
    Ok(())
}

fn boot_once(
    args: &Args,
    vmm: &Path,
    initrd: &Path,
    data: &Path,
    sockets: &Path,
    backend: &str,
    run: usize,
) -> anyhow::Result<Sample> {
    let mut share = ShareConfig::new(data, sockets.join(format!("{backend}-{run}.sock")));
    share.sandbox = SandboxMode::None;
    let fs = Virtiofsd::spawn(&share).context("starting virtiofsd")?;
    let reboot = if backend == "kvm" { " reboot=k" } else { "" };
    let mut child = Command::new(vmm)
        .arg("run")
        .args(["--backend", backend])
        .args(["--cpus", &args.cpus.to_string()])
        .args(["--memory", &args.memory.to_string()])
        .arg("--kernel")
        .arg(&args.vm.kernel)
        .arg("--initrd")
        .arg(initrd)
        .args([
            "--cmdline",
            &format!("console=ttyS0{reboot} panic=-1 quiet"),
        ])
        .arg("--fs")
        .arg(format!("tag=data,socket={}", fs.socket_path().display()))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("running {}", vmm.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut start: Option<(Instant, f64)> = None;
    let mut end: Option<(Instant, f64)> = None;
    let mut failures = Vec::new();
    let mut files_seen = 0usize;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let now = Instant::now();
        let mut words = line.split_whitespace();
        match words.next() {
            Some("FS-BENCH-START") => {
                let t = words.next().and_then(|w| w.parse().ok()).unwrap_or(0.0);
                files_seen = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                start = Some((now, t));
            }
            Some("FS-BENCH-END") => {
                let t = words.next().and_then(|w| w.parse().ok()).unwrap_or(0.0);
                end = Some((now, t));
            }
            Some("FS-BENCH-FAILED") => failures.push(line.clone()),
            Some("FS-BENCH-CLOCK") if run == 0 => println!(
                "{backend}: guest clock source {}",
                words.next().unwrap_or("?")
            ),
            _ => {}
        }
    }
    let status = child.wait().context("waiting for beacon-vmm")?;
    drop(fs);
    if !status.success() || !failures.is_empty() {
        bail!("{backend} run {run} failed ({status}): {failures:?}");
    }
    if files_seen != args.files {
        bail!(
            "{backend} run {run}: the guest saw {files_seen} files, not {}",
            args.files
        );
    }
    match (start, end) {
        (Some((h0, g0)), Some((h1, g1))) => Ok(Sample {
            host: h1.duration_since(h0),
            guest_secs: g1 - g0,
        }),
        _ => bail!("{backend} run {run}: no start/end markers on the console"),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let vmm = args.vm.vmm()?;
    let work = tempfile::Builder::new()
        .prefix("beacon-fs-bench.")
        .tempdir()
        .context("temporary folder")?;
    let data = args.dir.clone().unwrap_or_else(|| work.path().join("data"));
    let mib = args.files * args.file_mib;
    println!(
        "data set: {} files x {} MiB = {mib} MiB in {}",
        args.files,
        args.file_mib,
        data.display()
    );
    make_data(&data, args.files, args.file_mib)?;
    let initrd = build_initrd(work.path())?;
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    // Interleave the backends so drift in the machine's load hits both alike.
    for run in 0..args.vm.runs {
        for (i, backend) in BACKENDS.iter().enumerate() {
            // A boot that fails before the guest reads anything (QEMU's QMP
            // socket can be slow to appear on a loaded machine) is retried once.
            let s = match boot_once(&args, &vmm, &initrd, &data, work.path(), backend, run) {
                Ok(s) => s,
                Err(e) => {
                    println!("run {run} {backend:>4}: {e:#}; retrying once");
                    boot_once(
                        &args,
                        &vmm,
                        &initrd,
                        &data,
                        work.path(),
                        backend,
                        run + 1000,
                    )?
                }
            };
            let rate = mib as f64 / s.host.as_secs_f64();
            println!(
                "run {run} {backend:>4}: {:.2} s on the host ({:.2} s guest uptime), {rate:.1} MiB/s",
                s.host.as_secs_f64(),
                s.guest_secs
            );
            sample("fs", "cold-read", backend, "MiB/s", rate);
            rates[i].push(rate);
        }
    }
    println!(
        "\nreading {mib} MiB ({} x {} MiB, cold guest cache), {} runs, {} vCPUs, {} MiB guest:",
        args.files, args.file_mib, args.vm.runs, args.cpus, args.memory
    );
    println!(
        "{:<8}{:>14}{:>12}{:>12}{:>10}",
        "backend", "median MiB/s", "min", "max", "spread"
    );
    let mut medians = [0.0; 2];
    for (i, backend) in BACKENDS.iter().enumerate() {
        match Spread::of(rates[i].iter().copied()) {
            Some(s) => {
                medians[i] = s.median;
                println!(
                    "{backend:<8}{:>14.1}{:>12.1}{:>12.1}{:>9.0}%",
                    s.median,
                    s.min,
                    s.max,
                    s.percent()
                );
            }
            // --runs 0.
            None => println!("{backend:<8}{:>14}{:>12}{:>12}{:>10}", "-", "-", "-", "-"),
        }
    }
    if medians[1] > 0.0 {
        println!(
            "kvm/qemu throughput (medians): {:.2}x (target >= 0.90x)",
            medians[0] / medians[1]
        );
    }
    Ok(())
}
