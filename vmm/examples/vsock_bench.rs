//! vsock throughput benchmark: 100 MiB one way, then 100 MiB the other way,
//! between the host and a guest, on our KVM backend with vhost-vsock, on QEMU
//! with vhost-vsock, and on our KVM backend with the hybrid unix-socket
//! backend; same kernel, same guest, same run, interleaved. Prints a table
//! with the median, min, max and spread of each, and ratios against QEMU.
//! Asserts nothing (timings in the nested lab are inflated and noisy: compare
//! ratios from one run).
//!
//! ```text
//! cargo build --release -p beacon-vmm --bin beacon-vmm --example vsock_bench
//! cargo build --release -p beacon-tests --bin beacon-vsock-tool
//! tests/lab/run --timeout 3000 -- target/release/examples/vsock_bench --kernel VMLINUX --runs 3
//! ```
//!
//! Each boot's guest serves port 5000 (receives N bytes) and 5001 (sends N
//! bytes) with `beacon-vsock-tool`; the host connects to each in turn (AF_VSOCK
//! to CID 3, or `CONNECT` through the hybrid socket) and times the transfer
//! from connect to both ends closed, checksum checked, boot time excluded.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    /// MiB per direction.
    #[arg(long, default_value_t = 100)]
    mib: u64,
    /// beacon-vsock-tool binary (default: next to this example's folder).
    #[arg(long)]
    tool: Option<PathBuf>,
}

const CID: u32 = 3;
const CONFIGS: [(&str, &str, bool); 3] = [
    ("kvm vhost-vsock", "kvm", false),
    ("qemu vhost-vsock", "qemu", false),
    ("kvm hybrid", "kvm", true),
];

/// The files every boot uses.
struct Files<'a> {
    vmm: &'a Path,
    tool: &'a Path,
    kernel: &'a Path,
    initrd: &'a Path,
    work: &'a Path,
}

/// Seconds for (host→guest, guest→host) in one boot.
fn one_boot(f: &Files<'_>, backend: &str, hybrid: bool, bytes: u64) -> anyhow::Result<(f64, f64)> {
    let Files {
        vmm,
        tool,
        kernel,
        initrd,
        work,
    } = *f;
    let uds = work.join(format!("bench-{}.sock", std::process::id()));
    let vsock = if hybrid {
        format!("cid={CID},uds={}", uds.display())
    } else {
        format!("cid={CID}")
    };
    let reboot = if backend == "kvm" { " reboot=k" } else { "" };
    let mut vm = Command::new(vmm)
        .arg("run")
        .args(["--backend", backend, "--console", "off", "--memory", "512"])
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args([
            "--cmdline",
            &format!("console=ttyS0{reboot} panic=-1 quiet"),
        ])
        .args(["--vsock", &vsock])
        .env("BEACON_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("spawning beacon-vmm")?;
    let transfer = |port: u32, send: u64, recv: u64| -> anyhow::Result<f64> {
        let target = if hybrid {
            vec!["--hybrid".to_string(), format!("{}:{port}", uds.display())]
        } else {
            vec!["--vsock".to_string(), format!("{CID}:{port}")]
        };
        let out = Command::new(tool)
            .arg("connect")
            .args(&target)
            .args([
                "--bytes",
                &send.to_string(),
                "--recv-bytes",
                &recv.to_string(),
            ])
            .args(["--retry-secs", "300", "--timeout-secs", "900"])
            .output()
            .context("running beacon-vsock-tool")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("transfer on port {port} failed: {text}");
        }
        text.split("secs=")
            .nth(1)
            .and_then(|s| s.trim().parse::<f64>().ok())
            .with_context(|| format!("no timing in {text:?}"))
    };
    let result = (|| Ok((transfer(5000, bytes, 0)?, transfer(5001, 0, bytes)?)))();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if vm.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = vm.kill();
            let _ = vm.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    result
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let vmm = args.vm.vmm()?;
    let tool = common::target_binary("beacon-vsock-tool", args.tool.as_deref())?;
    for (what, p) in [("beacon-vmm", &vmm), ("beacon-vsock-tool", &tool)] {
        if !p.is_file() {
            bail!(
                "{what} not found at {}; build it or pass its path",
                p.display()
            );
        }
    }
    let bytes = args.mib << 20;
    let work = beacon_tests::assets::lab_visible_tempdir().map_err(anyhow::Error::msg)?;
    let checks = format!(
        "T=/bin/beacon-vsock-tool\n\
         $T serve --vsock 5000 --bytes 0 --recv-bytes {bytes} --timeout-secs 900 &\n\
         $T serve --vsock 5001 --bytes {bytes} --recv-bytes 0 --timeout-secs 900 &\n\
         wait\n"
    );
    let initrd = device_initrd(
        work.path(),
        "vsock-bench.gz",
        &DeviceGuest {
            checks,
            stock_modules: Vec::new(),
            extra: vec![(tool.clone(), "/bin/beacon-vsock-tool".into())],
        },
    )
    .map_err(anyhow::Error::msg)?;

    let mut samples: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); CONFIGS.len()];
    for run in 0..args.vm.runs {
        for (i, (name, backend, hybrid)) in CONFIGS.iter().enumerate() {
            let files = Files {
                vmm: &vmm,
                tool: &tool,
                kernel: &args.vm.kernel,
                initrd: &initrd,
                work: work.path(),
            };
            // A boot that fails to start (QEMU's QMP socket is slow to come
            // up on a loaded machine) is tried once more.
            let result = one_boot(&files, backend, *hybrid, bytes).or_else(|e| {
                eprintln!("run {run} {name}: failed ({e:#}); once more");
                one_boot(&files, backend, *hybrid, bytes)
            });
            match result {
                Ok((to_guest, to_host)) => {
                    eprintln!(
                        "run {run} {name}: host->guest {to_guest:.2} s, guest->host {to_host:.2} s"
                    );
                    let variant = if *hybrid { "kvm-hybrid" } else { backend };
                    let mib = args.mib as f64;
                    sample("vsock", "host-to-guest", variant, "MiB/s", mib / to_guest);
                    sample("vsock", "guest-to-host", variant, "MiB/s", mib / to_host);
                    samples[i].0.push(to_guest);
                    samples[i].1.push(to_host);
                }
                Err(e) => eprintln!("run {run} {name}: failed: {e:#}"),
            }
        }
    }

    println!(
        "\nvsock transfer of {} MiB per direction, {} boots each (lower is better)\n",
        args.mib, args.vm.runs
    );
    println!("| backend | direction | n | median s | min s | max s | spread % | MiB/s | vs QEMU |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for dir in 0..2 {
        let pick = |i: usize| -> &[f64] {
            if dir == 0 {
                &samples[i].0
            } else {
                &samples[i].1
            }
        };
        let qemu = Spread::of(pick(1).iter().copied());
        for (i, (name, _, _)) in CONFIGS.iter().enumerate() {
            let v = pick(i);
            let n = v.len();
            let direction = if dir == 0 {
                "host→guest"
            } else {
                "guest→host"
            };
            match Spread::of(v.iter().copied()) {
                Some(s) => println!(
                    "| {name} | {direction} | {n} | {:.2} | {:.2} | {:.2} | {:.0} | {:.1} | {} |",
                    s.median,
                    s.min,
                    s.max,
                    s.percent(),
                    args.mib as f64 / s.median,
                    qemu.as_ref()
                        .map(|q| format!("{:.2}x", s.median / q.median))
                        .unwrap_or_else(|| "-".into()),
                ),
                None => println!("| {name} | {direction} | 0 | - | - | - | - | - | - |"),
            }
        }
    }
    println!("\nspread = (max - min) / median; vs QEMU = median / QEMU's median (time, so < 1 is faster)");
    Ok(())
}
