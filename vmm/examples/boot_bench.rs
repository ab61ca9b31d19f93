//! Boot benchmark: the in-process KVM backend against QEMU microvm, same kernel,
//! same initrd, same run, interleaved. Prints numbers and kvm/qemu ratios; asserts
//! nothing (timings on a shared machine, and inside the nested lab, are noisy).
//!
//! ```text
//! cargo build --release -p beacon-vmm --bin beacon-vmm --example boot_bench
//! tests/lab/run -- target/release/examples/boot_bench --kernel VMLINUX --initrd HELLO_INITRD
//! ```
//!
//! Per backend it spawns `beacon-vmm run` (so process start is included) and records:
//! - wall: process start to exit, guest ends right after init (the hello init);
//! - first run: VMM start to the first KVM_RUN (QEMU: to QMP's RESUME), from its log;
//! - init: VMM start to the guest writing the boot-timer port, from its log;
//! - overhead: the VMM process's RSS minus the resident pages of its guest RAM
//!   memfd mappings, sampled 1 s after init while the guest idles (beacon.hold=3).
//!   For QEMU that is the qemu process (the beacon-vmm parent is not counted).
//! - overhead with every device attached (unless `--no-devices`; needs root):
//!   rng, a 64 MiB read-only disk, virtio-net on a TAP the benchmark creates
//!   (`bbench<pid>`, userspace data path), a virtio-fs share (virtiofsd's own
//!   memory is not counted, for either backend) and vsock (the hybrid
//!   userspace backend on ours; vhost-vsock on QEMU, which has no other). The
//!   beacon kernel's drivers bind every device at boot, so the queues are live.
//!
//! It also prints the size of the initrd it boots and of the one `make install`
//! put in `$BEACON_SHARE_DIR/kernel/beacon-initrd` (every VM reads its whole
//! initrd at boot, so its size is part of the boot cost).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

mod common;
use beacon_tests::bench::sample;
use beacon_tests::procfs::rss_split;
use common::median;

#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    vm: common::VmArgs,
    #[arg(long)]
    initrd: PathBuf,
    #[arg(long, default_value_t = 2)]
    cpus: u8,
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// Skip the memory runs.
    #[arg(long)]
    no_memory: bool,
    /// Skip the memory runs with every device attached.
    #[arg(long)]
    no_devices: bool,
}

/// The host side of the all-devices runs: a folder (disk image, share, vsock
/// socket) and a TAP, removed on drop.
struct Devices {
    dir: tempfile::TempDir,
    tap: String,
}

impl Devices {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("temporary folder")?;
        let disk = dir.path().join("disk.img");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(64 << 20))
            .context("disk image")?;
        std::fs::create_dir(dir.path().join("share")).context("share folder")?;
        std::fs::write(dir.path().join("share/hello"), "hello\n").context("share file")?;
        let tap = format!("bbench{}", std::process::id() % 100_000);
        let st = Command::new("ip")
            .args(["tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr"])
            .status()
            .context("running ip tuntap add")?;
        if !st.success() {
            bail!("ip tuntap add dev {tap} failed (root needed; or pass --no-devices)");
        }
        Ok(Self { dir, tap })
    }

    /// `beacon-vmm run` flags attaching every device on `backend`.
    fn args(&self, backend: &str) -> Vec<String> {
        let d = self.dir.path().display();
        let vsock = if backend == "kvm" {
            format!("cid=3,uds={d}/vsock.sock")
        } else {
            format!("cid={}", 1000 + std::process::id() % 100_000)
        };
        [
            "--rng".to_string(),
            "--disk".into(),
            format!("path={d}/disk.img,ro"),
            "--net".into(),
            format!("tap={},mac=52:54:00:12:34:56", self.tap),
            "--fs".into(),
            format!("tag=share,dir={d}/share"),
            "--vsock".into(),
            vsock,
        ]
        .into()
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", "dev", &self.tap])
            .status();
    }
}

#[derive(Debug, Default, Clone)]
struct Sample {
    wall: Duration,
    first_run_us: Option<u64>,
    init_us: Option<u64>,
    /// VM exits over the whole boot (our VMM's `--stats`; QEMU has none).
    exits: Option<u64>,
}

const BACKENDS: [&str; 2] = ["kvm", "qemu"];

fn cmdline(backend: &str, hold: u32) -> String {
    // microvm has no i8042: QEMU ends through the ACPI reset; ours through i8042.
    let reboot = if backend == "kvm" { " reboot=k" } else { "" };
    format!("console=ttyS0{reboot} panic=-1 quiet beacon.hold={hold}")
}

fn vmm_command(args: &Args, vmm: &Path, backend: &str, hold: u32, extra: &[String]) -> Command {
    let mut c = Command::new(vmm);
    c.arg("run")
        .args(["--backend", backend, "--console", "off"])
        .args(extra)
        .args(["--cpus", &args.cpus.to_string()])
        .args(["--memory", &args.memory.to_string()])
        .arg("--kernel")
        .arg(&args.vm.kernel)
        .arg("--initrd")
        .arg(&args.initrd)
        .args(["--cmdline", &cmdline(backend, hold)])
        .env("BEACON_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// The number before " µs" in a log line containing `marker`.
fn micros_after(line: &str, marker: &str) -> Option<u64> {
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn boot_once(args: &Args, vmm: &Path, backend: &str) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let stats = if backend == "kvm" {
        vec!["--stats".to_string()]
    } else {
        Vec::new()
    };
    let out = vmm_command(args, vmm, backend, 0, &stats)
        .output()
        .with_context(|| format!("running {}", vmm.display()))?;
    let wall = start.elapsed();
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("{backend} boot failed ({}):\n{log}", out.status);
    }
    let mut s = Sample {
        wall,
        ..Default::default()
    };
    for line in log.lines() {
        s.first_run_us = s
            .first_run_us
            .or(micros_after(line, "first vCPU run after"));
        s.init_us = s.init_us.or(micros_after(line, "guest init reached after"));
        // `--stats`: "beacon-vmm: N exits; io-out ...".
        s.exits = s.exits.or_else(|| {
            let rest = line.strip_prefix("beacon-vmm: ")?;
            rest.split(" exits").next()?.parse().ok()
        });
    }
    Ok(s)
}

/// Overhead in KiB: boot with the guest held idle, sample 1 s after init.
fn overhead_once(
    args: &Args,
    vmm: &Path,
    backend: &str,
    devices: Option<&Devices>,
) -> anyhow::Result<u64> {
    let extra = devices.map(|d| d.args(backend)).unwrap_or_default();
    let mut child = vmm_command(args, vmm, backend, 3, &extra)
        .spawn()
        .context("spawning beacon-vmm")?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("guest init reached") {
                let _ = tx.send(());
            }
        }
    });
    let result = (|| {
        rx.recv_timeout(Duration::from_secs(120))
            .context("the guest never reached init")?;
        std::thread::sleep(Duration::from_secs(1));
        let pid = common::memory_pid(child.id(), backend)?;
        let (total, guest) =
            rss_split(pid).with_context(|| format!("reading /proc/{pid}/smaps"))?;
        Ok(total.saturating_sub(guest))
    })();
    let _ = child.wait();
    let _ = reader.join();
    result
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    v.map(|x| format!("{x:.1} {unit}"))
        .unwrap_or_else(|| "-".into())
}

/// `12.3 MiB (12897280 bytes)`, or why there is no size.
fn file_size(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!(
            "{:.1} MiB ({} bytes)",
            m.len() as f64 / (1024.0 * 1024.0),
            m.len()
        ),
        Err(e) => format!("- ({e})"),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "initrd booted here: {} {}",
        args.initrd.display(),
        file_size(&args.initrd)
    );
    let installed = beacon_paths::BeaconPaths::from_env().initrd();
    println!(
        "initrd of make install: {} {}",
        installed.display(),
        file_size(&installed)
    );
    let vmm = args.vm.vmm()?;
    let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    let mut overhead: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut overhead_dev: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let devices = if args.no_memory || args.no_devices {
        None
    } else {
        Some(Devices::new()?)
    };
    // Interleave the backends so drift in the machine's load hits both alike.
    for run in 0..args.vm.runs {
        for (i, backend) in BACKENDS.iter().enumerate() {
            let s = boot_once(&args, &vmm, backend)?;
            println!(
                "run {run} {backend:>4}: wall {:.3} s, first run {} µs, init {} µs, exits {}",
                s.wall.as_secs_f64(),
                s.first_run_us.map_or("-".into(), |v| v.to_string()),
                s.init_us.map_or("-".into(), |v| v.to_string()),
                s.exits.map_or("-".into(), |v| v.to_string())
            );
            sample("boot", "wall", backend, "s", s.wall.as_secs_f64());
            if let Some(v) = s.first_run_us {
                sample("boot", "first-vcpu-entry", backend, "ms", v as f64 / 1000.0);
            }
            if let Some(v) = s.init_us {
                sample("boot", "init-reached", backend, "ms", v as f64 / 1000.0);
            }
            if let Some(v) = s.exits {
                sample("boot", "vm-exits", backend, "exits", v as f64);
            }
            samples[i].push(s);
            if !args.no_memory {
                let kib = overhead_once(&args, &vmm, backend, None)?;
                println!(
                    "run {run} {backend:>4}: overhead {:.1} MiB",
                    kib as f64 / 1024.0
                );
                sample(
                    "boot",
                    "vmm-memory-overhead",
                    backend,
                    "MiB",
                    kib as f64 / 1024.0,
                );
                overhead[i].push(kib as f64 / 1024.0);
            }
            if let Some(d) = &devices {
                let kib = overhead_once(&args, &vmm, backend, Some(d))?;
                println!(
                    "run {run} {backend:>4}: overhead with every device {:.1} MiB",
                    kib as f64 / 1024.0
                );
                sample(
                    "boot",
                    "vmm-memory-overhead-all-devices",
                    backend,
                    "MiB",
                    kib as f64 / 1024.0,
                );
                overhead_dev[i].push(kib as f64 / 1024.0);
            }
        }
    }
    let stat = |i: usize| {
        (
            median(samples[i].iter().map(|s| s.wall.as_secs_f64())),
            median(
                samples[i]
                    .iter()
                    .filter_map(|s| s.first_run_us)
                    .map(|v| v as f64 / 1000.0),
            ),
            median(
                samples[i]
                    .iter()
                    .filter_map(|s| s.init_us)
                    .map(|v| v as f64 / 1000.0),
            ),
            median(overhead[i].iter().copied()),
            median(overhead_dev[i].iter().copied()),
            median(samples[i].iter().filter_map(|s| s.exits).map(|v| v as f64)),
        )
    };
    let (k, q) = (stat(0), stat(1));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    println!(
        "\nmedians of {} runs, {} vCPUs, {} MiB:",
        args.vm.runs, args.cpus, args.memory
    );
    println!("{:<22}{:>14}{:>14}{:>10}", "", "kvm", "qemu", "kvm/qemu");
    for (name, a, b, unit) in [
        ("wall (start to exit)", k.0, q.0, "s"),
        ("first run", k.1, q.1, "ms"),
        ("init reached", k.2, q.2, "ms"),
        ("memory overhead", k.3, q.3, "MiB"),
        ("  with every device", k.4, q.4, "MiB"),
        ("VM exits per boot", k.5, q.5, ""),
    ] {
        println!(
            "{name:<22}{:>14}{:>14}{:>10}",
            fmt(a, unit),
            fmt(b, unit),
            ratio(a, b)
        );
    }
    Ok(())
}
