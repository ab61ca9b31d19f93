//! Network benchmark: TCP throughput both ways between a guest and its host over
//! a TAP, for our userspace virtio-net against QEMU's userspace virtio-net, and
//! our vhost-net against QEMU with vhost=on: same kernel, same initrd, same TAP,
//! same run, interleaved. Prints a table with medians, run-to-run spread and
//! ratios; asserts nothing (throughput on a shared machine, and inside the
//! nested lab, is noisy: compare ratios from one run).
//!
//! ```text
//! cargo build --release -p beacon-vmm --bin beacon-vmm --example net_bench
//! tests/lab/run --timeout 3000 -- target/release/examples/net_bench --kernel VMLINUX --runs 3
//! ```
//!
//! Needs root (it makes the TAP `nb0` with 10.78.0.1/24 and runs `iperf3 -s` on
//! it), `iperf3`, `/dev/vhost-net`, and a KVM (inside the lab on hosts without
//! one). Each boot gets a fresh `iperf3 -s` and runs `iperf3 -c` from the
//! guest for `--seconds`, then with `-R`; the number reported is the
//! receiver's rate. Medians are over the boots that completed (`n` column);
//! spread is (max - min) / median.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use beacon_tests::guest::{device_initrd, DeviceGuest};
use clap::Parser;

mod common;
use beacon_tests::bench::sample;
use common::Spread;

#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    vm: common::VmArgs,
    /// Seconds of each iperf3 transfer.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    #[arg(long, default_value_t = 512)]
    memory: u64,
}

const TAP: &str = "nb0";
/// One boot (boot, two transfers, power off) may take this long in a busy lab.
const BOOT_TIMEOUT_SECS: u32 = 600;
const MAC: &str = "02:00:00:00:78:02";

/// (name, backend, vhost)
const CONFIGS: [(&str, &str, bool); 4] = [
    ("ours userspace", "kvm", false),
    ("qemu userspace", "qemu", false),
    ("ours vhost", "kvm", true),
    ("qemu vhost", "qemu", true),
];

fn checks(seconds: u32) -> String {
    format!(
        r#"
set -e
ip link set lo up
ip link set eth0 up
ip addr add 10.78.0.2/24 dev eth0
ping -c 1 -W 10 10.78.0.1 >/dev/null
c="iperf3 -c 10.78.0.1 -t {seconds} -f m --connect-timeout 10000"
echo "BENCH-TX: $($c | grep receiver)"
echo "BENCH-RX: $($c -R --rcv-timeout 30000 | grep receiver)"
"#
    )
}

fn sh(script: &str) -> anyhow::Result<()> {
    let status = Command::new("sh")
        .args(["-ec", script])
        .status()
        .context("running sh")?;
    if !status.success() {
        bail!("host setup failed: {script}");
    }
    Ok(())
}

/// The Mbit/s figure of an iperf3 summary line after `marker`.
fn mbits(console: &str, marker: &str) -> Option<f64> {
    let line = console.lines().find(|l| l.contains(marker))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "Mbits/sec")?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}

fn boot_once(
    args: &Args,
    vmm: &Path,
    initrd: &Path,
    work: &Path,
    backend: &str,
    vhost: bool,
) -> anyhow::Result<(f64, f64)> {
    let console = work.join("console.log");
    let _ = std::fs::remove_file(&console);
    let mut net = format!("tap={TAP},mac={MAC}");
    if vhost {
        net.push_str(",vhost=on");
    }
    let reboot = if backend == "kvm" { " reboot=k" } else { "" };
    // A fresh server per boot: a test a dying guest left half-done cannot
    // block the next one.
    let pidfile = work.join("iperf3.pid");
    sh(&format!(
        "iperf3 -s -D -B 10.78.0.1 --idle-timeout 60 --pidfile {}",
        pidfile.display()
    ))?;
    let out = Command::new("timeout")
        .args(["--signal=KILL", &BOOT_TIMEOUT_SECS.to_string()])
        .arg(vmm)
        .arg("run")
        .args(["--backend", backend])
        .arg("--kernel")
        .arg(&args.vm.kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cpus", &args.cpus.to_string()])
        .args(["--memory", &args.memory.to_string()])
        .args([
            "--cmdline",
            &format!("console=ttyS0{reboot} panic=-1 quiet"),
        ])
        .arg("--console")
        .arg(&console)
        .args(["--net", &net])
        .env("BEACON_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {}", vmm.display()));
    let _ = sh(&format!(
        "kill $(cat {}) 2>/dev/null; true",
        pidfile.display()
    ));
    let out = out?;
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    if !out.status.success() || !text.contains("BEACON-CHECKS-RC: 0") {
        bail!(
            "{backend} (vhost {vhost}) boot failed ({}):\n{}\n{text}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tx = mbits(&text, "BENCH-TX:").context("no guest-to-host result")?;
    let rx = mbits(&text, "BENCH-RX:").context("no host-to-guest result")?;
    Ok((tx, rx))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let vmm = args.vm.vmm()?;
    anyhow::ensure!(
        Path::new("/usr/bin/iperf3").exists(),
        "iperf3 is missing: run resources/install.sh"
    );
    let work = tempfile::tempdir().context("temp dir")?;
    let guest = DeviceGuest {
        checks: checks(args.seconds),
        extra: vec![("/usr/bin/iperf3".into(), "/usr/bin/iperf3".into())],
        ..Default::default()
    };
    let initrd = device_initrd(work.path(), "net-bench.gz", &guest).map_err(anyhow::Error::msg)?;
    sh(&format!(
        "ip tuntap add {TAP} mode tap
         ip addr add 10.78.0.1/24 dev {TAP}
         ip link set {TAP} up"
    ))?;
    let started = Instant::now();
    let mut samples = vec![(Vec::new(), Vec::new()); CONFIGS.len()];
    // Interleave so drift in the machine's load hits every configuration alike.
    for run in 0..args.vm.runs {
        for (i, (name, backend, vhost)) in CONFIGS.iter().enumerate() {
            match boot_once(&args, &vmm, &initrd, work.path(), backend, *vhost) {
                Ok((tx, rx)) => {
                    println!("run {run} {name:<15} guest->host {tx:>9.1} Mbit/s  host->guest {rx:>9.1} Mbit/s");
                    let path = if *vhost { "vhost" } else { "userspace" };
                    sample(
                        "net",
                        &format!("guest-to-host-{path}"),
                        backend,
                        "Mbit/s",
                        tx,
                    );
                    sample(
                        "net",
                        &format!("host-to-guest-{path}"),
                        backend,
                        "Mbit/s",
                        rx,
                    );
                    samples[i].0.push(tx);
                    samples[i].1.push(rx);
                }
                // One lost sample (a guest hung in a busy lab) is reported, not fatal.
                Err(e) => println!("run {run} {name:<15} failed: {e:#}"),
            }
        }
    }
    let _ = sh(&format!("ip link del {TAP}"));
    println!(
        "\n{} runs of {} s per direction, {} vCPU, {} MiB, interleaved, {:.0} s in all",
        args.vm.runs,
        args.seconds,
        args.cpus,
        args.memory,
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<13}{:<12}{:>16}{:>10}{:>16}{:>10}{:>11}{:>8}",
        "direction",
        "data path",
        "ours Mbit/s",
        "spread",
        "qemu Mbit/s",
        "spread",
        "ours/qemu",
        "n"
    );
    for (dir, pick) in [("guest->host", 0usize), ("host->guest", 1)] {
        for (path, ours, qemu) in [("userspace", 0usize, 1usize), ("vhost", 2, 3)] {
            let get = |i: usize| -> &Vec<f64> {
                if pick == 0 {
                    &samples[i].0
                } else {
                    &samples[i].1
                }
            };
            // A configuration with no completed boot (n 0) shows 0 and 0%.
            let stats = |i| Spread::of(get(i).iter().copied());
            let (so, sq) = (stats(ours), stats(qemu));
            let (o, q) = (so.map_or(0.0, |s| s.median), sq.map_or(0.0, |s| s.median));
            println!(
                "{dir:<13}{path:<12}{o:>16.1}{:>9.0}%{q:>16.1}{:>9.0}%{:>10.2}x{:>8}",
                so.map_or(0.0, |s| s.percent()),
                sq.map_or(0.0, |s| s.percent()),
                if q > 0.0 { o / q } else { 0.0 },
                format!("{}/{}", get(ours).len(), get(qemu).len())
            );
        }
    }
    println!("targets: userspace ours/qemu >= 1.00x; vhost within qemu vhost's spread");
    Ok(())
}
