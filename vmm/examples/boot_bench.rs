//! Boot benchmark: the in-process KVM backend against QEMU microvm (and, with
//! `--firecracker`, Firecracker), same kernel, same initrd, same run,
//! interleaved. Prints numbers and kvm/qemu (and kvm/firecracker) ratios;
//! asserts nothing (timings on a shared machine, and inside the nested lab,
//! are noisy).
//!
//! ```text
//! cargo build --release -p beacon-vmm --bin beacon-vmm --example boot_bench
//! tests/lab/run -- target/release/examples/boot_bench --kernel VMLINUX --initrd HELLO_INITRD \
//!     [--firecracker PATH/TO/firecracker]
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
//!
//! Firecracker (`--firecracker PATH` or `BEACON_FIRECRACKER`; not packaged for
//! Debian, built from source: see ../shared/ANCHORS.md) boots the
//! same kernel, initrd, command line, vCPUs and memory, with no API socket and
//! no device (`firecracker --no-api --config-file vm.json`), as a third
//! variant of each run. Only its wall time is measured: it has no log line for
//! its first KVM_RUN, its boot timer is an MMIO device rather than our port
//! 0x440, and its memory overhead is left out (see [`Firecracker`]). It boots
//! only an uncompressed ELF vmlinux: a bzImage `--kernel` is unpacked into a
//! temporary folder first (with the host's gzip, xz, zstd, lz4, bzip2 or lzop),
//! and when that cannot be done Firecracker is skipped for that kernel, saying
//! why.

use std::fs::File;
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
    /// Also boot the same kernel and initrd under this Firecracker binary in
    /// every run (wall time only).
    #[arg(long, env = "BEACON_FIRECRACKER")]
    firecracker: Option<PathBuf>,
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

/// The variants, in the order each run boots them (`firecracker` only with
/// `--firecracker`).
const VARIANTS: [&str; 3] = ["kvm", "qemu", "firecracker"];
const FIRECRACKER: usize = 2;

fn cmdline(backend: &str, hold: u32) -> String {
    // microvm has no i8042: QEMU ends through the ACPI reset; ours and
    // Firecracker through the i8042 reset (Firecracker exits on it).
    let reboot = if backend == "qemu" { "" } else { " reboot=k" };
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

/// Firecracker beside us: its binary and a temporary folder holding its
/// config (`vm.json`), each run's output and, for a bzImage `--kernel`, the
/// vmlinux unpacked from it.
///
/// No memory overhead is sampled for it: `beacon_tests::procfs::rss_split`
/// counts only `/memfd:` mappings as guest RAM, and Firecracker backs guest
/// RAM with an anonymous private mapping (a memfd only when a vhost-user
/// disk is attached), so its guest's resident pages would all be counted as
/// VMM overhead; `rss_split` cannot pick the guest RAM out by size.
struct Firecracker {
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl Firecracker {
    /// Writes the config; None, after saying why, when `--kernel` cannot be
    /// given to Firecracker (a bzImage that cannot be unpacked here).
    fn new(bin: &Path, args: &Args) -> anyhow::Result<Option<Self>> {
        let version = Command::new(bin)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} --version", bin.display()))?;
        let version = String::from_utf8_lossy(&version.stdout);
        println!(
            "firecracker: {} ({})",
            bin.display(),
            version.lines().next().unwrap_or("no version").trim()
        );
        let dir = tempfile::tempdir().context("temporary folder")?;
        let kernel = match elf_kernel(&args.vm.kernel, dir.path()) {
            Ok(k) => k,
            Err(e) => {
                println!(
                    "firecracker: NOT compared with {}: {e:#} (Firecracker boots only an uncompressed ELF vmlinux)",
                    args.vm.kernel.display()
                );
                return Ok(None);
            }
        };
        let initrd = args
            .initrd
            .canonicalize()
            .with_context(|| format!("initrd {}", args.initrd.display()))?;
        let path = |p: &Path| {
            p.to_str()
                .map(str::to_owned)
                .with_context(|| format!("{} is not UTF-8", p.display()))
        };
        // No API socket, logger or metrics: Firecracker's log and the guest's
        // console both go to its stdout. Its seccomp filters stay on (a gnu
        // build has an allow-all default filter; a musl release build has its
        // real ones, which allow a boot without devices). Firecracker appends
        // `pci=off` to the command line itself (it runs without PCI).
        let mut config = serde_json::json!({
            "boot-source": {
                "kernel_image_path": path(&kernel)?,
                "initrd_path": path(&initrd)?,
                "boot_args": cmdline("firecracker", 0),
            },
            "drives": [],
            "machine-config": {
                "vcpu_count": args.cpus,
                "mem_size_mib": args.memory,
            },
        });
        // Firecracker refuses to start on a KVM without KVM_CAP_XSAVE or
        // KVM_CAP_XCRS, which it uses only to save a snapshot. The nested lab's
        // emulated CPU has no XSAVE (`LAB_CPU` in tests/src/lab.rs) and its KVM
        // lacks KVM_CAP_XCRS: where one is missing, a custom CPU template drops
        // it from the capabilities Firecracker checks (its documented
        // `kvm_capabilities` "!N" entries), and nothing else changes.
        let missing = missing_kvm_caps();
        if !missing.is_empty() {
            let names: Vec<String> = missing.iter().map(|(_, n)| n.to_string()).collect();
            println!(
                "firecracker: this KVM lacks {}: not required of Firecracker (used for snapshots only)",
                names.join(" and ")
            );
            let caps: Vec<String> = missing.iter().map(|(c, _)| format!("!{c}")).collect();
            config["cpu-config"] = serde_json::json!({ "kvm_capabilities": caps });
        }
        std::fs::write(
            dir.path().join("vm.json"),
            serde_json::to_vec_pretty(&config)?,
        )
        .context("writing vm.json")?;
        Ok(Some(Self {
            bin: bin.to_path_buf(),
            dir,
        }))
    }

    /// One boot: wall time from process start to exit. The guest must have
    /// run the hello init (its greeting on the console), since a kernel
    /// that panics also ends in a reset (`panic=-1`) and a clean exit.
    fn boot_once(&self, run: usize) -> anyhow::Result<Duration> {
        let log_path = self.dir.path().join(format!("run{run}.log"));
        let log = File::create(&log_path).context("firecracker log")?;
        let start = Instant::now();
        let status = Command::new(&self.bin)
            .arg("--no-api")
            .arg("--config-file")
            .arg(self.dir.path().join("vm.json"))
            .args(["--id", &format!("bbench-{}-{run}", std::process::id())])
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("firecracker log")?)
            .stderr(log)
            .status()
            .with_context(|| format!("running {}", self.bin.display()))?;
        let wall = start.elapsed();
        let out = std::fs::read(&log_path).unwrap_or_default();
        let out = String::from_utf8_lossy(&out);
        if !status.success() || !out.contains("BEACON-HELLO:") {
            let tail: Vec<&str> = out.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "firecracker boot failed ({status}{}), its output ends:\n{}",
                if status.success() {
                    ", but the guest never greeted"
                } else {
                    ""
                },
                tail.join("\n")
            );
        }
        Ok(wall)
    }
}

/// The KVM capabilities Firecracker requires that this host's /dev/kvm lacks
/// and a boot without snapshots does not use: (number, name).
fn missing_kvm_caps() -> Vec<(u32, &'static str)> {
    use kvm_ioctls::Cap;
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        // Firecracker will say what is wrong with /dev/kvm.
        return Vec::new();
    };
    [(Cap::Xsave, "KVM_CAP_XSAVE"), (Cap::Xcrs, "KVM_CAP_XCRS")]
        .into_iter()
        .filter(|(cap, _)| !kvm.check_extension(*cap))
        .map(|(cap, name)| (cap as u32, name))
        .collect()
}

/// `kernel` as Firecracker boots it, an uncompressed ELF vmlinux: `kernel`
/// itself when it is one; for a bzImage, its compressed payload (found
/// through the boot protocol's `payload_offset` and `payload_length`, as
/// the kernel's own decompressor does, where `scripts/extract-vmlinux` scans
/// for magic numbers) unpacked into `dir` by the host's tool for its format.
fn elf_kernel(kernel: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let image = std::fs::read(kernel).with_context(|| format!("reading {}", kernel.display()))?;
    if image.starts_with(b"\x7fELF") {
        return kernel
            .canonicalize()
            .with_context(|| format!("kernel {}", kernel.display()));
    }
    let u16_at = |at: usize| {
        image
            .get(at..at + 2)
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .map(u16::from_le_bytes)
    };
    let u32_at = |at: usize| {
        image
            .get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(|b| u32::from_le_bytes(b) as usize)
    };
    if image.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        bail!("neither an ELF vmlinux nor a bzImage");
    }
    let protocol = u16_at(0x206).unwrap_or(0);
    if protocol < 0x208 {
        bail!(
            "a bzImage of boot protocol {}.{}, which does not say where its payload is",
            protocol >> 8,
            protocol & 0xff
        );
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let (offset, len) = (u32_at(0x248).unwrap_or(0), u32_at(0x24c).unwrap_or(0));
    let start = (setup_sects + 1) * 512 + offset;
    let payload = image
        .get(start..start + len)
        .filter(|p| p.len() > 8)
        .context("the bzImage's payload lies beyond its end")?;
    // Every format but gzip has the uncompressed size appended (the kernel's
    // `*_with_size` build commands); the tools would take it for garbage.
    let (tool, flags, sized): (&str, &[&str], bool) = match payload {
        [0x1f, 0x8b, ..] => ("gzip", &["-dc"], false),
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => ("xz", &["-dc"], true),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => ("zstd", &["-dcq"], true),
        [0x02, 0x21, 0x4c, 0x18, ..] => ("lz4", &["-dc"], true),
        [b'B', b'Z', b'h', ..] => ("bzip2", &["-dc"], true),
        [0x5d, 0, 0, ..] => ("xz", &["--format=lzma", "-dc"], true),
        [0x89, b'L', b'Z', b'O', ..] => ("lzop", &["-dc"], true),
        _ => bail!(
            "a bzImage whose payload is in an unknown format (it starts {:02x?})",
            &payload[..8]
        ),
    };
    let (data, size) = if sized {
        (&payload[..payload.len() - 4], u32_at(start + len - 4))
    } else {
        (payload, None)
    };
    let packed = dir.join("payload");
    std::fs::write(&packed, data).context("writing the bzImage's payload")?;
    let vmlinux = dir.join("vmlinux");
    let st = Command::new(tool)
        .args(flags)
        .stdin(File::open(&packed).context("reading the payload back")?)
        .stdout(File::create(&vmlinux).context("creating vmlinux")?)
        .status()
        .with_context(|| format!("running `{tool}` to unpack the bzImage's payload"))?;
    let _ = std::fs::remove_file(&packed);
    if !st.success() {
        bail!(
            "`{tool} {}` could not unpack the bzImage's payload ({st})",
            flags.join(" ")
        );
    }
    let mut magic = [0u8; 4];
    let got = std::fs::metadata(&vmlinux).map(|m| m.len()).unwrap_or(0);
    File::open(&vmlinux)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .context("reading the unpacked vmlinux")?;
    if &magic != b"\x7fELF" {
        bail!("the bzImage's {tool} payload is not an ELF vmlinux");
    }
    if let Some(size) = size.filter(|&s| s as u64 != got) {
        bail!("the bzImage's {tool} payload unpacked to {got} bytes, its trailer says {size}");
    }
    println!(
        "firecracker: unpacked {} ({tool}) into a {:.1} MiB vmlinux",
        kernel.display(),
        got as f64 / (1024.0 * 1024.0)
    );
    Ok(vmlinux)
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
    let firecracker = match &args.firecracker {
        Some(bin) => Firecracker::new(bin, &args)?,
        None => None,
    };
    let mut samples: [Vec<Sample>; 3] = Default::default();
    let mut overhead: [Vec<f64>; 3] = Default::default();
    let mut overhead_dev: [Vec<f64>; 3] = Default::default();
    // Firecracker failing does not cut our runs short: it is dropped for the
    // remaining runs and the benchmark fails once the table is printed.
    let mut firecracker_failed: Option<anyhow::Error> = None;
    let devices = if args.no_memory || args.no_devices {
        None
    } else {
        Some(Devices::new()?)
    };
    // Interleave the backends so drift in the machine's load hits all alike.
    for run in 0..args.vm.runs {
        for (i, backend) in VARIANTS.iter().enumerate() {
            if i == FIRECRACKER {
                let Some(fc) = firecracker
                    .as_ref()
                    .filter(|_| firecracker_failed.is_none())
                else {
                    continue;
                };
                match fc.boot_once(run) {
                    Ok(wall) => {
                        println!("run {run} {backend:>4}: wall {:.3} s", wall.as_secs_f64());
                        sample("boot", "wall", backend, "s", wall.as_secs_f64());
                        samples[i].push(Sample {
                            wall,
                            ..Default::default()
                        });
                    }
                    Err(e) => {
                        println!(
                            "run {run} {backend}: FAILED, left out of the remaining runs: {e:#}"
                        );
                        firecracker_failed = Some(e);
                    }
                }
                continue;
            }
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
    let (k, q, f) = (stat(0), stat(1), stat(FIRECRACKER));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    // The Firecracker columns only when it was compared.
    let with_fc = firecracker.is_some();
    println!(
        "\nmedians of {} runs, {} vCPUs, {} MiB:",
        args.vm.runs, args.cpus, args.memory
    );
    let mut head = format!("{:<22}{:>14}{:>14}", "", "kvm", "qemu");
    if with_fc {
        head += &format!("{:>14}", "firecracker");
    }
    head += &format!("{:>10}", "kvm/qemu");
    if with_fc {
        head += &format!("{:>17}", "kvm/firecracker");
    }
    println!("{head}");
    for (name, a, b, c, unit) in [
        ("wall (start to exit)", k.0, q.0, f.0, "s"),
        ("first run", k.1, q.1, f.1, "ms"),
        ("init reached", k.2, q.2, f.2, "ms"),
        ("memory overhead", k.3, q.3, f.3, "MiB"),
        ("  with every device", k.4, q.4, f.4, "MiB"),
        ("VM exits per boot", k.5, q.5, f.5, ""),
    ] {
        let mut row = format!("{name:<22}{:>14}{:>14}", fmt(a, unit), fmt(b, unit));
        if with_fc {
            row += &format!("{:>14}", fmt(c, unit));
        }
        row += &format!("{:>10}", ratio(a, b));
        if with_fc {
            row += &format!("{:>17}", ratio(a, c));
        }
        println!("{row}");
    }
    if let Some(e) = firecracker_failed {
        return Err(e.context("the firecracker variant failed"));
    }
    Ok(())
}
