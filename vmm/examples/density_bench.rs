//! Density benchmark: how fast idle 128 MiB VMs start when many start at
//! once, and what each costs in host memory, for our VMM against QEMU
//! microvm; same kernel, same initrd, same run, interleaved. Prints numbers
//! and kvm/qemu ratios; asserts nothing (timings on a shared machine, and
//! inside the nested lab, are noisy: read the ratios).
//!
//! ```text
//! cargo build --release -p beacon-vmm --bin beacon-vmm --example density_bench
//! tests/lab/run --memory 6144 -- target/release/examples/density_bench \
//!     --kernel build/kernel/vmlinux --initrd build/hello-initrd.gz --runs 3
//! ```
//!
//! Each round spawns `--count` `beacon-vmm run` processes at once (1 vCPU,
//! `--memory` MiB, the hello init held idle by `beacon.hold`; `make bench`
//! asks for 10, or 4 in the lab, where five QEMUs took about 56 s to start,
//! near the QEMU backend's 60 s start-up limit), and records:
//! - VMs per second: the count over the time from the first spawn to the
//!   last VM's guest reaching init (its "guest init reached" log line);
//! - host memory per VM, with every VM up and idle: the mean resident set of
//!   the processes holding the VMs (ours, or QEMU's), guest RAM included
//!   (what the host really gives each VM), and the same without the guest
//!   RAM (the VMM's own overhead).
//!
//! The count is capped by what the machine can hold: a round never starts
//! more VMs than MemAvailable over (guest memory + 64 MiB), less 512 MiB
//! for everything else. Every VM is killed at the end of its round, also
//! when the round fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

mod common;
use beacon_tests::bench::sample;
use beacon_tests::procfs::{meminfo_kib, rss_split};
use common::median;

#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    vm: common::VmArgs,
    /// The hello initrd (`make hello-initrd`).
    #[arg(long)]
    initrd: PathBuf,
    /// VMs started at once per round (fewer when memory is short).
    #[arg(long, default_value_t = 10)]
    count: usize,
    /// Guest memory of each VM in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// Seconds every VM may take to reach init.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

const BACKENDS: [&str; 2] = ["kvm", "qemu"];

/// One round's figures.
struct Round {
    vms_per_sec: f64,
    total_mib: f64,
    overhead_mib: f64,
}

/// Kills and reaps every VM of a round, however the round ends.
struct Fleet(Vec<Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn spawn(args: &Args, vmm: &Path, backend: &str) -> anyhow::Result<Child> {
    // microvm has no i8042: QEMU ends through the ACPI reset; ours through i8042.
    let reboot = if backend == "kvm" { " reboot=k" } else { "" };
    Command::new(vmm)
        .arg("run")
        .args(["--backend", backend, "--console", "off", "--cpus", "1"])
        .args(["--memory", &args.memory.to_string()])
        .arg("--kernel")
        .arg(&args.vm.kernel)
        .arg("--initrd")
        .arg(&args.initrd)
        .args([
            "--cmdline",
            &format!(
                "console=ttyS0{reboot} panic=-1 quiet beacon.hold={}",
                args.timeout + 60
            ),
        ])
        .env("BEACON_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", vmm.display()))
}

fn round(args: &Args, vmm: &Path, backend: &str, count: usize) -> anyhow::Result<Round> {
    let (tx, rx) = mpsc::channel();
    let mut fleet = Fleet(Vec::new());
    let mut readers = Vec::new();
    let start = Instant::now();
    for i in 0..count {
        let mut child = spawn(args, vmm, backend)?;
        let stderr = child.stderr.take().context("stderr")?;
        fleet.0.push(child);
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            // The last lines, for the report of a VM that ended early.
            let mut tail: Vec<String> = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("guest init reached") {
                    let _ = tx.send((i, None));
                }
                if tail.len() == 20 {
                    tail.remove(0);
                }
                tail.push(line);
            }
            let _ = tx.send((i, Some(tail.join("\n"))));
        }));
    }
    drop(tx);
    let deadline = start + Duration::from_secs(args.timeout);
    let mut up = vec![false; count];
    while up.iter().any(|u| !u) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, None)) => up[i] = true,
            Ok((i, Some(tail))) if !up[i] => {
                bail!("{backend}: VM {i} of {count} ended before its guest reached init:\n{tail}")
            }
            Ok(_) => {}
            Err(_) => bail!(
                "{backend}: {} of {count} VMs reached init within {} s",
                up.iter().filter(|u| **u).count(),
                args.timeout
            ),
        }
    }
    let took = start.elapsed().as_secs_f64();
    // Let the last ones settle into idle before reading their memory.
    std::thread::sleep(Duration::from_secs(1));
    let (mut total, mut guest) = (0u64, 0u64);
    for c in &fleet.0 {
        let pid = common::memory_pid(c.id(), backend)?;
        let (t, g) = rss_split(pid).with_context(|| format!("reading /proc/{pid}/smaps"))?;
        total += t;
        guest += g;
    }
    drop(fleet);
    for r in readers {
        let _ = r.join();
    }
    let n = count as f64;
    Ok(Round {
        vms_per_sec: n / took,
        total_mib: total as f64 / 1024.0 / n,
        overhead_mib: total.saturating_sub(guest) as f64 / 1024.0 / n,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let vmm = args.vm.vmm()?;
    let fits = meminfo_kib("MemAvailable")
        .map(|kb| ((kb / 1024).saturating_sub(512) / (args.memory + 64)) as usize)
        .unwrap_or(args.count);
    let count = args.count.min(fits);
    if count == 0 {
        bail!("not enough free memory for one {} MiB VM", args.memory);
    }
    if count < args.count {
        println!(
            "{count} VMs per round instead of {}: that is what MemAvailable holds",
            args.count
        );
    }
    let mut rounds: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
    // Interleave the backends so drift in the machine's load hits both alike.
    for run in 0..args.vm.runs {
        for (i, backend) in BACKENDS.iter().enumerate() {
            match round(&args, &vmm, backend, count) {
                Ok(r) => {
                    println!(
                        "run {run} {backend:>4}: {count} VMs, {:.2} VMs/s, {:.1} MiB each ({:.1} MiB without guest RAM)",
                        r.vms_per_sec, r.total_mib, r.overhead_mib
                    );
                    sample("density", "vms-started", backend, "VMs/s", r.vms_per_sec);
                    sample("density", "host-memory-per-vm", backend, "MiB", r.total_mib);
                    sample(
                        "density",
                        "vmm-overhead-per-vm",
                        backend,
                        "MiB",
                        r.overhead_mib,
                    );
                    rounds[i].push(r);
                }
                Err(e) => println!("run {run} {backend:>4}: failed: {e:#}"),
            }
        }
    }
    println!(
        "\nmedians of {} rounds of {count} idle {} MiB VMs started at once:",
        args.vm.runs, args.memory
    );
    println!("{:<26}{:>12}{:>12}{:>10}", "", "kvm", "qemu", "kvm/qemu");
    type Pick = fn(&Round) -> f64;
    let rows: [(&str, Pick); 3] = [
        ("VMs started per second", |r| r.vms_per_sec),
        ("host MiB per VM", |r| r.total_mib),
        ("  without guest RAM", |r| r.overhead_mib),
    ];
    for (name, pick) in rows {
        let m: Vec<Option<f64>> = rounds
            .iter()
            .map(|rs| median(rs.iter().map(pick)))
            .collect();
        let show = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.2}"));
        let ratio = match (m[0], m[1]) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        println!("{name:<26}{:>12}{:>12}{ratio:>10}", show(m[0]), show(m[1]));
    }
    if rounds.iter().any(Vec::is_empty) {
        bail!("a backend finished no round");
    }
    Ok(())
}
