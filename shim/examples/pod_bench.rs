//! Pod start and pod memory benchmark through containerd's CRI plugin (a
//! private containerd 1.6 with a bridge + host-local CNI chain, driven by the
//! CRI client of `beacon_tests::cri`): the `beaconbox` handler on the
//! in-process KVM backend, a `beaconbox-qemu` handler on the QEMU backend, and
//! `runc`, interleaved; then ten beaconbox pods one after another and ten at
//! once. Prints medians and ratios; asserts nothing (timings on a shared
//! machine, and in the nested lab, are noisy; in the lab only the ratios mean
//! something).
//!
//! ```text
//! cargo build -p beacon-shim --bin containerd-shim-beaconbox-v1 --example pod_bench
//! target/debug/examples/pod_bench prepare DIR          # host: guest files, images
//! tests/lab/run --timeout 2400 -- target/debug/examples/pod_bench run DIR [RUNS]
//! ```
//!
//! - pod start: RunPodSandbox + CreateContainer + StartContainer of a busybox
//!   `echo ready`, to that line in the container's CRI log (the VM's boot,
//!   vminitd, crun, the CNI chain and the pod's TAP included);
//!   RunPodSandbox, CreateContainer and StartContainer each, and the shim's
//!   own account of the sandbox's start (its "sandbox VM up in" log line:
//!   network, virtiofsd, VM built, vminitd up, ...) as medians per phase;
//! - ten pods: the wall time for ten pods (each RunPodSandbox, CreateContainer
//!   and StartContainer of a `sleep`), one after another and from ten threads
//!   at once;
//! - host memory per pod, with the ten up: the shims' RSS (their VMM threads
//!   included) minus their guest-RAM (memfd) mappings, plus virtiofsd's RSS,
//!   divided by ten.

#[path = "common/mod.rs"]
mod common;

use beacon_tests::bench::sample;
use common::{median, pgrep, phase_medians, sandbox_phases, variant};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use beacon_tests::containerd::{
    example_shim_dir, install_guest, shim_env, Containerd, ContainerdSpec, CriRuntime, CriSpec,
    RUNTIME, SHIM_BINARY,
};
use beacon_tests::cri::{ContainerSpec, Cri, PodSpec};
use beacon_tests::images::{busybox_archive, pause_archive, BUSYBOX_IMAGE, PAUSE_IMAGE};
use beacon_tests::procfs::rss_split;

/// (label, CRI runtime handler) of each configuration.
const CONFIGS: [(&str, &str); 3] = [
    ("beaconbox kvm", "beaconbox"),
    ("beaconbox qemu", "beaconbox-qemu"),
    ("runc", "runc"),
];
/// How many pods the scale runs start.
const PODS: usize = 10;

/// A started pod: its id, its log folder, and how long RunPodSandbox,
/// CreateContainer and StartContainer took.
struct Started {
    pod_id: String,
    log_dir: PathBuf,
    calls: [f64; 3],
}

/// Run pod `name` on `handler` with one busybox container running `cmd`.
fn run_pod(
    cri: &Cri,
    logs: &Path,
    name: &str,
    handler: &str,
    cmd: &[&str],
) -> anyhow::Result<Started> {
    let log_dir = logs.join(name);
    std::fs::create_dir_all(&log_dir)?;
    let pod = PodSpec::new(name, &log_dir).config();
    let t = Instant::now();
    let pod_id = cri
        .run_pod_sandbox(&pod, handler)
        .map_err(|e| anyhow::anyhow!("RunPodSandbox {name}: {}", e.message()))?;
    let run = t.elapsed().as_secs_f64();
    let app = ContainerSpec::new("app", BUSYBOX_IMAGE, cmd);
    let t = Instant::now();
    let created = cri.create_container(&pod_id, &app.config(), &pod);
    let create = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let started = created.and_then(|id| cri.start_container(&id));
    let start = t.elapsed().as_secs_f64();
    if let Err(e) = started {
        remove_pod(cri, &pod_id);
        bail!("the container of {name}: {}", e.message());
    }
    Ok(Started {
        pod_id,
        log_dir,
        calls: [run, create, start],
    })
}

fn remove_pod(cri: &Cri, pod_id: &str) {
    if let Err(e) = cri
        .stop_pod_sandbox(pod_id)
        .and_then(|()| cri.remove_pod_sandbox(pod_id))
    {
        println!("removing pod {pod_id}: {}", e.message());
    }
}

/// Seconds from RunPodSandbox to the app's `ready` in its CRI log, with the
/// pod's id and its calls' times.
fn start_once(cri: &Cri, logs: &Path, name: &str, handler: &str) -> anyhow::Result<(f64, Started)> {
    let begun = Instant::now();
    let started = run_pod(cri, logs, name, handler, &["echo", "ready"])?;
    let log = started.log_dir.join("app.log");
    let pod_id = started.pod_id.clone();
    let deadline = Instant::now() + Duration::from_secs(300);
    let result = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().any(|l| l.ends_with(" ready")) {
            break Ok((begun.elapsed().as_secs_f64(), started));
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "{name}: no 'ready' in {} after 300 s: {text:?}",
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    remove_pod(cri, &pod_id);
    result
}

/// MiB of host memory the running sandboxes take, guest RAM excluded.
fn sandboxes_memory_mib() -> f64 {
    let mut kib = 0;
    let shims = pgrep(&["-f", &format!("{SHIM_BINARY} -namespace")]);
    for pid in shims.iter().chain(&pgrep(&["-x", "virtiofsd"])) {
        let (total, guest) = rss_split(*pid).unwrap_or_default();
        kib += total - guest;
    }
    kib as f64 / 1024.0
}

/// Start [`PODS`] beaconbox pods (at once from threads, or one after another);
/// the wall time, and the host memory per pod with all of them up.
fn scale(socket: &Path, logs: &Path, at_once: bool) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    let tag = if at_once { "par" } else { "seq" };
    let one = |i: usize| -> anyhow::Result<String> {
        let cri = Cri::connect(socket)
            .map_err(anyhow::Error::msg)?
            .with_timeout(Duration::from_secs(900));
        run_pod(
            &cri,
            logs,
            &format!("{tag}{i}"),
            "beaconbox",
            &["sleep", "600"],
        )
        .map(|p| p.pod_id)
    };
    let results: Vec<anyhow::Result<String>> = if at_once {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..PODS).map(|i| s.spawn(move || one(i))).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a pod thread panicked")))
                })
                .collect()
        })
    } else {
        (0..PODS).map(one).collect()
    };
    let took = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let mib = sandboxes_memory_mib();
    let cri = Cri::connect(socket).map_err(anyhow::Error::msg)?;
    let mut failed = Vec::new();
    let mut up = 0;
    for r in results {
        match r {
            Ok(id) => {
                up += 1;
                remove_pod(&cri, &id);
            }
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {PODS} pods failed: {}",
            failed.len(),
            failed.join("; ")
        );
    }
    Ok((took, mib / up as f64))
}

fn run(dir: &Path, runs: usize) -> anyhow::Result<()> {
    // The shims run elsewhere: every path they get must be absolute.
    let dir = &std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
    let work = tempfile::Builder::new()
        .prefix("beacon-pod-bench")
        .tempdir()?;
    // Room for slow boots in the emulated lab (ten at once); VMs that cannot
    // grow, so QEMU runs on microvm (its fastest machine), not its hotplug
    // machine.
    let fixed = "max_cpus = 1\nhotplug_memory_mib = 0\n";
    let config = work.path().join("runtime.toml");
    std::fs::write(&config, format!("[vm]\nboot_timeout_secs = 900\n{fixed}"))?;
    let qemu_config = work.path().join("runtime-qemu.toml");
    std::fs::write(
        &qemu_config,
        format!("[vm]\nbackend = \"qemu\"\nboot_timeout_secs = 900\n{fixed}"),
    )?;
    let env = shim_env(work.path(), &dir.join("share"));
    let handler = |name: &str, config: &Path| CriRuntime {
        handler: name.into(),
        runtime_type: RUNTIME.into(),
        config_path: Some(config.to_path_buf()),
    };
    let c = Containerd::start_cri(
        &work.path().join("containerd"),
        &ContainerdSpec {
            shim_dir: example_shim_dir().map_err(anyhow::Error::msg)?,
            env,
        },
        &CriSpec {
            bridge: "bcnbench0".into(),
            subnet: "10.75.0.0/24".into(),
            runtimes: vec![
                handler("beaconbox", &config),
                handler("beaconbox-qemu", &qemu_config),
            ],
        },
    )
    .map_err(anyhow::Error::msg)?;
    for archive in ["busybox-oci.tar", "pause-oci.tar"] {
        c.import_image(&dir.join(archive))
            .map_err(anyhow::Error::msg)
            .context("run `pod_bench prepare DIR` first")?;
    }
    let cri = Cri::connect(&c.socket)
        .map_err(anyhow::Error::msg)?
        .with_timeout(Duration::from_secs(600));
    let logs = work.path().join("pod-logs");
    let mut start: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    let mut calls: Vec<[Vec<f64>; 3]> = vec![Default::default(); CONFIGS.len()];
    let mut phases: Vec<Vec<Vec<(String, f64)>>> = vec![Vec::new(); CONFIGS.len()];
    for run in 0..runs {
        for (i, (label, handler)) in CONFIGS.iter().enumerate() {
            match start_once(&cri, &logs, &format!("s{run}-{i}"), handler) {
                Ok((s, started)) => {
                    let [rp, cc, sc] = started.calls;
                    println!(
                        "run {run} {label:>14}: pod start {s:.3} s (RunPodSandbox {rp:.3}, \
                         CreateContainer {cc:.3}, StartContainer {sc:.3})"
                    );
                    sample("pod", "pod-start", variant(label), "s", s);
                    for (call, v) in ["RunPodSandbox", "CreateContainer", "StartContainer"]
                        .iter()
                        .zip(started.calls)
                    {
                        sample("pod", call, variant(label), "s", v);
                    }
                    start[i].push(s);
                    for (k, v) in started.calls.into_iter().enumerate() {
                        calls[i][k].push(v);
                    }
                    if let Some(p) = sandbox_phases(&c.log_text(), &started.pod_id) {
                        phases[i].push(p);
                    }
                }
                Err(e) => println!("run {run} {label:>14}: pod start failed: {e:#}"),
            }
        }
    }
    let fmt = |v: Option<f64>, unit: &str| v.map_or("-".into(), |x| format!("{x:.2} {unit}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    let s: Vec<Option<f64>> = start.into_iter().map(median).collect();
    println!("\nmedians of {runs} runs:");
    println!(
        "{:<36}{:>10}{:>10}{:>10}{:>10}{:>10}",
        "", "kvm", "qemu", "runc", "kvm/qemu", "kvm/runc"
    );
    println!(
        "{:<36}{:>10}{:>10}{:>10}{:>10}{:>10}",
        "pod start (RunPodSandbox to output)",
        fmt(s[0], "s"),
        fmt(s[1], "s"),
        fmt(s[2], "s"),
        ratio(s[0], s[1]),
        ratio(s[0], s[2])
    );
    for (k, call) in ["RunPodSandbox", "CreateContainer", "StartContainer"]
        .iter()
        .enumerate()
    {
        let m: Vec<Option<f64>> = calls.iter().map(|c| median(c[k].clone())).collect();
        println!(
            "{:<36}{:>10}{:>10}{:>10}{:>10}{:>10}",
            format!("  {call}"),
            fmt(m[0], "s"),
            fmt(m[1], "s"),
            fmt(m[2], "s"),
            ratio(m[0], m[1]),
            ratio(m[0], m[2])
        );
    }
    // The sandbox's start inside RunPodSandbox, as the shim logged it.
    let p: Vec<Vec<(String, f64)>> = phases.iter().map(|r| phase_medians(r)).collect();
    for (name, kvm) in &p[0] {
        let qemu = p[1]
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, ms)| *ms / 1000.0);
        println!(
            "{:<36}{:>10}{:>10}{:>10}{:>10}",
            format!("  shim: {name}"),
            fmt(Some(kvm / 1000.0), "s"),
            fmt(qemu, "s"),
            "",
            ratio(Some(*kvm), qemu.map(|q| q * 1000.0)),
        );
    }
    for at_once in [false, true] {
        let what = if at_once {
            "at once"
        } else {
            "one after another"
        };
        match scale(&c.socket, &logs, at_once) {
            Ok((took, mib)) => {
                let v = if at_once {
                    "at-once"
                } else {
                    "one-after-another"
                };
                sample("pod", &format!("{PODS}-pods-wall"), v, "s", took);
                sample("pod", "host-memory-per-pod", v, "MiB", mib);
                println!(
                "{PODS} beaconbox pods {what}: {took:.1} s in all, {mib:.1} MiB host memory per pod (guest RAM excluded)"
                )
            }
            Err(e) => println!("{PODS} beaconbox pods {what}: failed: {e:#}"),
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    common::bench_main(
        "pod_bench",
        |dir| {
            install_guest(dir).map_err(anyhow::Error::msg)?;
            busybox_archive(dir, BUSYBOX_IMAGE, &[]).map_err(anyhow::Error::msg)?;
            pause_archive(dir, PAUSE_IMAGE).map_err(anyhow::Error::msg)?;
            Ok(())
        },
        run,
    )
}
