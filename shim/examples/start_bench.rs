//! Container start and sandbox memory benchmark: a private containerd (as
//! `make run` starts one) runs busybox with our shim on the in-process KVM
//! backend, with our shim on the QEMU backend (`io.beaconbox.vm.backend=qemu`
//! annotation), and with runc, interleaved, and prints medians and ratios.
//! Asserts nothing (timings on a shared machine, and in the nested lab, are
//! noisy; in the lab only the ratios mean something).
//!
//! ```text
//! cargo build -p beacon-shim --bin containerd-shim-beaconbox-v1 --example start_bench
//! target/debug/examples/start_bench prepare DIR          # host: guest files, image
//! tests/lab/run --timeout 1800 -- target/debug/examples/start_bench run DIR [RUNS]
//! ```
//!
//! - start: `ctr run --rm ... echo` spawned, to its first output line (the
//!   sandbox's VM boot, vminitd, crun and the container's start included);
//! - memory: an idle detached container (`sleep`), once it answered an exec:
//!   the host memory of its sandbox, guest RAM excluded: the shim server's RSS
//!   (its VMM threads included) minus its guest-RAM (memfd) mappings, plus
//!   virtiofsd's RSS, plus for QEMU the qemu process's RSS minus its guest RAM.
//!
//! The shim's own account of each sandbox's start (its "sandbox VM up in"
//! log line: network, virtiofsd, VM built, vminitd up, ...) is printed as
//! medians per phase under the start row.
//!
//! `BEACON_BENCH_TRACE=1` prints the first start's VM console log and shim log
//! lines for both backends (where the time goes), `BEACON_BENCH_TRACE=all`
//! those of every start; `BEACON_BENCH_KERNEL_PARAMS` adds guest kernel
//! parameters (`loglevel=7` shows the kernel's own boot in those logs).

use std::io::{BufRead, BufReader};
#[path = "common/mod.rs"]
mod common;

use beacon_tests::bench::sample;
use common::{median, pgrep, phase_medians, sandbox_phases, variant};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use beacon_tests::containerd::{
    example_shim_dir, install_guest, shim_env, Containerd, ContainerdSpec, RUNTIME, SHIM_BINARY,
};
use beacon_tests::images::{busybox_archive, BUSYBOX_IMAGE};
use beacon_tests::procfs::rss_split;

const RUNC: &str = "io.containerd.runc.v2";

/// What one configuration runs as: (label, runtime, extra `ctr run` options).
const CONFIGS: [(&str, &str, &[&str]); 3] = [
    ("beaconbox kvm", RUNTIME, &[]),
    (
        "beaconbox qemu",
        RUNTIME,
        &["--annotation", "io.beaconbox.vm.backend=qemu"],
    ),
    ("runc", RUNC, &[]),
];

/// Seconds from spawning `ctr run` to its first output line.
fn start_once(c: &Containerd, id: &str, runtime: &str, opts: &[&str]) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut child = Command::new("ctr")
        .arg("--address")
        .arg(&c.socket)
        .args(["run", "--rm", "--runtime", runtime])
        .args(opts)
        .args([BUSYBOX_IMAGE, id, "echo", "ready"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning ctr")?;
    let out = child.stdout.take().context("stdout")?;
    let first = BufReader::new(out).lines().next().transpose()?;
    let took = started.elapsed().as_secs_f64();
    let o = child.wait_with_output()?;
    if first.as_deref() != Some("ready") || !o.status.success() {
        bail!(
            "{id} ({runtime} {opts:?}): first line {first:?}, {}; {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr),
            c.log_tail(30)
        );
    }
    Ok(took)
}

/// MiB of host memory of one idle sandbox (see the module doc).
fn memory_once(c: &Containerd, id: &str, opts: &[&str]) -> anyhow::Result<f64> {
    let mut args = vec!["run", "-d", "--runtime", RUNTIME];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[BUSYBOX_IMAGE, id, "sleep", "600"]);
    let o = c.ctr(&args)?;
    if !o.status.success() {
        bail!("{id}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let result = (|| {
        let o = c.ctr(&["task", "exec", "--exec-id", "m", id, "true"])?;
        if !o.status.success() {
            bail!("{id} exec: {}", String::from_utf8_lossy(&o.stderr));
        }
        std::thread::sleep(Duration::from_secs(2));
        let mut kib = 0;
        let shims = pgrep(&["-f", &format!("{SHIM_BINARY} -namespace")]);
        for pid in shims.iter().chain(&pgrep(&["-x", "virtiofsd"])) {
            let (total, guest) = rss_split(*pid).unwrap_or_default();
            kib += total - guest;
        }
        // -f: a process name (comm) is cut to 15 characters.
        for pid in pgrep(&["-f", "qemu-system-x86_64"]) {
            let (total, guest) = rss_split(pid).unwrap_or_default();
            kib += total - guest;
        }
        Ok(kib as f64 / 1024.0)
    })();
    let _ = c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if c.ctr(&["task", "rm", id]).is_ok_and(|o| o.status.success()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = c.ctr(&["containers", "rm", id]);
    result
}

/// With `BEACON_BENCH_TRACE` set: the VM's console log and the shim's log
/// lines of sandbox `id`, to see where a start's time goes.
fn trace(c: &Containerd, work: &Path, id: &str) {
    let vm_log = std::fs::read_to_string(work.join("log").join(format!("{id}.vm.log")))
        .unwrap_or_else(|e| format!("(no VM log: {e})"));
    println!("--- {id}: VM log\n{vm_log}--- {id}: shim and containerd");
    for line in c.log_tail(4000).lines().filter(|l| l.contains(id)) {
        println!("{line}");
    }
    println!("--- {id}: end");
}

/// Runtime-config lines for VMs that cannot grow (QEMU then runs on microvm).
const FIXED_SHAPE: &str = "max_cpus = 1\nhotplug_memory_mib = 0\n";

fn run(dir: &Path, runs: usize) -> anyhow::Result<()> {
    // The shims run elsewhere: every path they get must be absolute.
    let dir = &std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
    let archive = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "tar"))
        .context("no image archive: run `start_bench prepare DIR` first")?;
    let work = tempfile::Builder::new().prefix("beacon-bench").tempdir()?;
    // Room for a slow boot in the emulated lab; VMs that cannot grow, so
    // QEMU runs on microvm (its fastest machine), not its hotplug machine.
    let config = work.path().join("runtime.toml");
    let mut runtime = format!("[vm]\nboot_timeout_secs = 600\n{FIXED_SHAPE}");
    if let Ok(params) = std::env::var("BEACON_BENCH_KERNEL_PARAMS") {
        runtime.push_str(&format!("kernel_params = {:?}\n", params));
    }
    std::fs::write(&config, runtime)?;
    let mut env = shim_env(work.path(), &dir.join("share"));
    env.push(("BEACON_RUNTIME_CONFIG".into(), config.display().to_string()));
    let c = Containerd::start(
        &work.path().join("containerd"),
        &ContainerdSpec {
            shim_dir: example_shim_dir().map_err(anyhow::Error::msg)?,
            env,
        },
    )
    .map_err(anyhow::Error::msg)?;
    let o = c.ctr(&["images", "import", &archive.display().to_string()])?;
    if !o.status.success() {
        bail!("import: {}", String::from_utf8_lossy(&o.stderr));
    }
    let mut start: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    let mut mem: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut phases: Vec<Vec<Vec<(String, f64)>>> = vec![Vec::new(); 2];
    for run in 0..runs {
        for (i, (label, runtime, opts)) in CONFIGS.iter().enumerate() {
            match start_once(&c, &format!("s{run}-{i}"), runtime, opts) {
                Ok(s) => {
                    println!("run {run} {label:>14}: start {s:.3} s");
                    sample("start", "container-start", variant(label), "s", s);
                    start[i].push(s);
                    if let Some(p) = phases.get_mut(i) {
                        let these = sandbox_phases(&c.log_text(), &format!("s{run}-{i}"));
                        let line: Vec<String> = these
                            .iter()
                            .flatten()
                            .map(|(name, ms)| format!("{name} {ms:.0} ms"))
                            .collect();
                        println!("run {run} {label:>14}: shim {}", line.join(", "));
                        p.extend(these);
                    }
                    let trace_all = std::env::var("BEACON_BENCH_TRACE").is_ok_and(|v| v == "all");
                    if (run == 0 || trace_all)
                        && i < 2
                        && std::env::var_os("BEACON_BENCH_TRACE").is_some()
                    {
                        trace(&c, work.path(), &format!("s{run}-{i}"));
                    }
                }
                Err(e) => println!("run {run} {label:>14}: start failed: {e:#}"),
            }
            if i < 2 {
                match memory_once(&c, &format!("m{run}-{i}"), opts) {
                    Ok(m) => {
                        println!("run {run} {label:>14}: idle sandbox memory {m:.1} MiB");
                        sample(
                            "start",
                            "idle-sandbox-host-memory",
                            variant(label),
                            "MiB",
                            m,
                        );
                        mem[i].push(m);
                    }
                    Err(e) => println!("run {run} {label:>14}: memory run failed: {e:#}"),
                }
            }
        }
    }
    let fmt = |v: Option<f64>, unit: &str| v.map_or("-".into(), |x| format!("{x:.2} {unit}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    let s: Vec<Option<f64>> = start.into_iter().map(median).collect();
    let m: Vec<Option<f64>> = mem.into_iter().map(median).collect();
    println!("\nmedians of {runs} runs:");
    println!(
        "{:<28}{:>12}{:>12}{:>12}{:>10}",
        "", "kvm", "qemu", "runc", "kvm/qemu"
    );
    println!(
        "{:<28}{:>12}{:>12}{:>12}{:>10}",
        "start (ctr run to output)",
        fmt(s[0], "s"),
        fmt(s[1], "s"),
        fmt(s[2], "s"),
        ratio(s[0], s[1])
    );
    // The sandbox's start inside it, as the shim logged it.
    let p: Vec<Vec<(String, f64)>> = phases.iter().map(|r| phase_medians(r)).collect();
    for (name, kvm) in &p[0] {
        let qemu = p[1].iter().find(|(n, _)| n == name).map(|(_, ms)| *ms);
        println!(
            "{:<28}{:>12}{:>12}{:>12}{:>10}",
            format!("  shim: {name}"),
            fmt(Some(kvm / 1000.0), "s"),
            fmt(qemu.map(|q| q / 1000.0), "s"),
            "",
            ratio(Some(*kvm), qemu)
        );
    }
    println!(
        "{:<28}{:>12}{:>12}{:>12}{:>10}",
        "idle sandbox host memory",
        fmt(m[0], "MiB"),
        fmt(m[1], "MiB"),
        "-",
        ratio(m[0], m[1])
    );
    Ok(())
}

fn main() -> ExitCode {
    common::bench_main(
        "start_bench",
        |dir| {
            install_guest(dir).map_err(anyhow::Error::msg)?;
            busybox_archive(dir, BUSYBOX_IMAGE, &[]).map_err(anyhow::Error::msg)?;
            Ok(())
        },
        run,
    )
}
