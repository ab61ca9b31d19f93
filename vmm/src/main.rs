//! `beacon-vmm`: run one VM from the command line, a thin CLI over the library.
//!
//! Exit codes: 0 when the guest powered off or asked to reboot, 1 when the VM
//! crashed, 2 when the configuration was refused before anything ran (invalid,
//! or not supported by the chosen backend).

use std::path::PathBuf;
use std::process::ExitCode;

use beacon_vmm::seccomp::SeccompMode;
use beacon_vmm::{
    create_backend, BackendKind, ConsoleConfig, DeviceConfig, VmConfig, VmError, VmExit,
};
use clap::{Parser, Subcommand};

mod fs_cli;

#[derive(Parser, Debug)]
#[command(version, about = "Run a microVM with the beaconbox VMM")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot a kernel and wait until the guest powers off.
    Run(Box<RunArgs>),
    /// Inspect or resize a running VM through its control socket (--api-socket).
    Ctl(CtlArgs),
}

#[derive(clap::Args, Debug)]
struct CtlArgs {
    /// The VM's control socket (`beacon-vmm run --api-socket PATH`).
    #[arg(long)]
    socket: PathBuf,
    /// Seconds to wait for the answer (a resize waits for the guest).
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    #[command(subcommand)]
    action: CtlAction,
}

#[derive(Subcommand, Debug)]
enum CtlAction {
    /// Print the VM's figures as JSON.
    Info,
    /// Print every virtio device's transport and ring state as JSON (why is
    /// a device stalled?).
    Devices,
    /// Stop the VM's vCPUs (a paused VM refuses resizes).
    Pause,
    /// Restart a paused VM's vCPUs.
    Resume,
    /// Hot-add or hot-remove vCPUs and memory: --cpus N and --memory MiB
    /// are the new totals (either or both).
    #[command(arg_required_else_help = true)]
    Resize {
        #[arg(long)]
        cpus: Option<u8>,
        /// New total guest RAM in MiB: boot memory plus whole 128 MiB blocks.
        #[arg(long)]
        memory: Option<u64>,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Guest kernel: an uncompressed ELF vmlinux (PVH or 64-bit entry) or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk (cpio, optionally compressed).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    cmdline: String,
    /// vCPUs online at boot.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Maximum vCPUs for hotplug (defaults to --cpus).
    #[arg(long)]
    max_cpus: Option<u8>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// Room for memory hotplug in MiB (whole 128 MiB blocks; `ctl resize
    /// --memory` plugs it in).
    #[arg(long, default_value_t = 0)]
    hotplug_memory: u64,
    /// Back guest RAM with 2 MiB transparent huge pages (KVM backend): a
    /// faster boot, more host memory for a guest that touches little of its
    /// RAM. Off by default for now (see the README).
    #[arg(long)]
    huge_pages: bool,
    /// Which VMM runs the guest: kvm (in-process) or qemu (child process, for comparison).
    #[arg(long, value_enum, default_value_t = BackendKind::Kvm)]
    backend: BackendKind,
    /// Where the serial console goes: stdout, off, or a file path.
    #[arg(long, default_value = "stdout")]
    console: ConsoleConfig,
    /// Add a virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// Add a virtio-blk disk backed by a raw image file: path=FILE[,ro]
    /// (repeatable; the first is /dev/vda). `ro` opens it read-only and the
    /// guest sees a read-only disk. The capacity is the file size in whole
    /// 512-byte sectors (a trailing partial sector is not visible). A missing or
    /// unopenable file, or one another VM holds, is refused before boot.
    #[arg(long = "disk", value_name = "path=FILE[,ro]", value_parser = DeviceConfig::parse_disk)]
    disks: Vec<DeviceConfig>,
    /// Add a virtio-net device on an existing TAP (repeatable):
    /// `tap=NAME,mac=MAC[,vhost=on][,fd=N]`. `vhost=on` moves frames in the
    /// kernel's vhost-net (needs /dev/vhost-net); `fd=N` uses the inherited,
    /// already-open TAP descriptor N instead of opening NAME (KVM backend only;
    /// an unattached /dev/net/tun descriptor is attached to NAME).
    #[arg(long = "net", value_name = "tap=NAME,mac=MAC[,vhost=on][,fd=N]", value_parser = parse_net)]
    nets: Vec<DeviceConfig>,
    /// Add a virtio-vsock device: `cid=N` (3 or above) with the kernel's
    /// vhost-vsock (host programs use AF_VSOCK with that CID), or
    /// `cid=N,uds=PATH` with the hybrid unix-socket backend (KVM backend only):
    /// host programs connect to PATH and send `CONNECT <port>\n` (answered
    /// `OK <hostport>\n`); guest connections to port P go to `PATH_P`.
    #[arg(long, value_name = "cid=N[,uds=PATH]", value_parser = parse_vsock)]
    vsock: Option<DeviceConfig>,
    /// Share a host folder over virtio-fs (repeatable); the guest mounts it with
    /// `mount -t virtiofs TAG /mnt`.
    ///
    /// `tag=T,dir=PATH[,ro][,cache=auto|always|never][,sandbox=namespace|chroot|none][,log=FILE]`
    /// starts virtiofsd (/usr/local/bin/virtiofsd, or $BEACON_VIRTIOFSD) for PATH,
    /// read-only with `ro`, logs its stderr to FILE (default: next to its private
    /// socket), reports its death, and stops it when the VM ends.
    /// `tag=T,socket=PATH` connects to an already running vhost-user backend.
    #[arg(long = "fs", value_name = "SHARE", value_parser = fs_cli::parse_share)]
    fs: Vec<fs_cli::FsShare>,
    /// Print the VM exits counted over the VM's life when it ends (KVM
    /// backend): by reason, and the busiest ports and MMIO addresses.
    #[arg(long)]
    stats: bool,
    /// Serve a control socket at PATH (`beacon-vmm ctl --socket PATH ...`):
    /// JSON lines, mode 0600, removed when the VM ends.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Also name the virtio-mmio devices on the kernel command line
    /// (virtio_mmio.device=), for kernels without ACPI; the KVM backend always
    /// describes them in the DSDT.
    #[arg(long)]
    virtio_cmdline: bool,
    /// How the VMM's threads (vCPUs, device event loop, control socket) are
    /// confined after setup, KVM backend: `kill` (default: a system call off
    /// a thread's allowlist kills the process), `trap` (the VMM names the
    /// thread and the call on stderr, then exits with 159), `log` (the
    /// kernel logs such calls and lets them pass) or `off`. Every mode but
    /// `off` also applies Landlock (no file access) and drops the threads'
    /// capabilities. Defaults to $BEACON_SECCOMP when set.
    #[arg(long, env = "BEACON_SECCOMP", default_value_t = SeccompMode::Kill)]
    seccomp: SeccompMode,
    /// Refuse to run unless the threads get every layer of their
    /// confinement: --seccomp kill or trap, and a kernel with seccomp filters
    /// and Landlock; a thread that then fails to confine ends the process.
    /// Defaults to $BEACON_REQUIRE_CONFINEMENT (1 or true) when set.
    #[arg(long, env = "BEACON_REQUIRE_CONFINEMENT")]
    require_confinement: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(beacon_vmm::log_filter("info"))
        .init();
    let args = match Cli::parse().command {
        Cmd::Run(args) => *args,
        Cmd::Ctl(ctl) => return ctl_main(ctl),
    };
    let shares = match fs_cli::FsShares::start(&args.fs) {
        Ok(shares) => shares,
        Err(e) => {
            eprintln!("beacon-vmm: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = run(args, &shares);
    shares.stop();
    match result {
        Ok(VmExit::PowerOff) => ExitCode::SUCCESS,
        Ok(VmExit::Reboot) => {
            tracing::info!("guest requested a reboot; the VM has ended");
            ExitCode::SUCCESS
        }
        Ok(VmExit::Crashed(why)) => {
            eprintln!("beacon-vmm: the VM crashed: {why}");
            ExitCode::from(1)
        }
        Err(e @ (VmError::Config(_) | VmError::Unsupported(_))) => {
            eprintln!("beacon-vmm: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("beacon-vmm: {e}");
            ExitCode::from(1)
        }
    }
}

/// `beacon-vmm ctl`: one request, the reply on stdout; exit 1 when the VM
/// refused it, 2 when it could not be asked.
fn ctl_main(ctl: CtlArgs) -> ExitCode {
    let request = match ctl.action {
        CtlAction::Info => beacon_vmm::api::Request::Info {},
        CtlAction::Devices => beacon_vmm::api::Request::Devices {},
        CtlAction::Pause => beacon_vmm::api::Request::Pause {},
        CtlAction::Resume => beacon_vmm::api::Request::Resume {},
        CtlAction::Resize { cpus, memory } => beacon_vmm::api::Request::Resize {
            cpus,
            memory_mib: memory,
        },
    };
    match beacon_vmm::api::request(
        &ctl.socket,
        &request,
        std::time::Duration::from_secs(ctl.timeout_secs),
    ) {
        Ok(reply) => {
            println!(
                "{}",
                serde_json::to_string(&reply).unwrap_or_else(|e| format!("{reply:?} ({e})"))
            );
            if reply.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("beacon-vmm ctl: {e}");
            ExitCode::from(2)
        }
    }
}

/// `--vsock cid=N[,uds=PATH]`.
fn parse_vsock(s: &str) -> Result<DeviceConfig, String> {
    let mut cid = None;
    let mut uds = None;
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("cid", v)) => {
                cid = Some(
                    v.parse::<u32>()
                        .map_err(|_| format!("cid {v:?} is not a number from 3 to 4294967294"))?,
                )
            }
            Some(("uds", v)) if !v.is_empty() => uds = Some(PathBuf::from(v)),
            _ => {
                return Err(format!(
                    "unknown vsock option {part:?}; expected cid=N[,uds=PATH]"
                ))
            }
        }
    }
    let guest_cid = cid.ok_or("cid=N is required, e.g. --vsock cid=3")?;
    Ok(DeviceConfig::Vsock {
        guest_cid,
        uds_path: uds,
    })
}

fn run(args: RunArgs, shares: &fs_cli::FsShares) -> Result<VmExit, VmError> {
    let mut config = VmConfig::new(args.kernel);
    config.initrd = args.initrd;
    config.cmdline = args.cmdline;
    config.vcpus.boot = args.cpus;
    config.vcpus.max = args.max_cpus.unwrap_or(args.cpus);
    config.memory.size_mib = args.memory;
    config.memory.hotplug_mib = args.hotplug_memory;
    config.memory.huge_pages = args.huge_pages;
    config.console = args.console;
    config.virtio_mmio_cmdline = args.virtio_cmdline;
    config.seccomp = args.seccomp;
    config.require_confinement = args.require_confinement;
    if args.rng {
        config.devices.push(DeviceConfig::Rng);
    }
    config.devices.extend(args.disks);
    config.devices.extend(args.nets);
    if let Some(vsock) = args.vsock {
        config.devices.push(vsock);
    }
    config.devices.extend(shares.devices());
    let vm: std::sync::Arc<dyn beacon_vmm::VmBackend> =
        create_backend(args.backend, config)?.into();
    // Declared after the VM, so dropped before it: virtiofsd ending with its
    // VM is no death to report.
    let _watch = shares.watch_while_running();
    vm.start()?;
    let _api = match &args.api_socket {
        Some(path) => match beacon_vmm::api::ApiServer::start(path, vm.clone()) {
            Ok(server) => Some(server),
            Err(e) => {
                let _ = vm.kill();
                let _ = vm.wait();
                return Err(VmError::Io {
                    what: "starting the control socket".into(),
                    source: std::io::Error::other(e.to_string()),
                });
            }
        },
        None => None,
    };
    let exit = vm.wait()?;
    if args.stats {
        match vm.exit_stats() {
            Some(stats) => eprintln!("beacon-vmm: {stats}"),
            None => eprintln!(
                "beacon-vmm: the {:?} backend does not count VM exits",
                args.backend
            ),
        }
    }
    let times = vm.boot_times();
    if let Some(t) = times.first_run {
        tracing::info!(backend = ?args.backend, "first vCPU run after {} µs", t.as_micros());
    }
    if let Some(t) = times.init_reached {
        tracing::info!(backend = ?args.backend, "guest init reached after {} µs", t.as_micros());
    }
    Ok(exit)
}

/// `--net tap=NAME,mac=MAC[,vhost=on][,fd=N]`.
fn parse_net(spec: &str) -> Result<DeviceConfig, String> {
    let (mut tap, mut mac, mut vhost, mut tap_fd) = (None, None, false, None);
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not key=value (keys: tap, mac, vhost, fd)"))?;
        match key {
            "tap" => tap = Some(value.to_string()),
            "mac" => mac = Some(value.parse().map_err(|e| format!("mac: {e}"))?),
            "vhost" => {
                vhost = match value {
                    "on" | "true" | "1" => true,
                    "off" | "false" | "0" => false,
                    _ => return Err(format!("vhost={value}: use on or off")),
                }
            }
            "fd" => {
                tap_fd = Some(
                    value
                        .parse::<i32>()
                        .map_err(|_| format!("fd={value} is not a file descriptor number"))?,
                )
            }
            _ => return Err(format!("unknown key {key:?} (keys: tap, mac, vhost, fd)")),
        }
    }
    let mac = mac.ok_or("mac=MAC is required (a unicast address, e.g. 02:00:00:00:00:01)")?;
    let tap = match (tap, tap_fd) {
        (Some(tap), _) => tap,
        (None, Some(_)) => String::new(),
        (None, None) => return Err("tap=NAME (or fd=N) is required".into()),
    };
    Ok(DeviceConfig::Net {
        tap,
        mac,
        vhost,
        tap_fd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_flag_parses_and_refuses_clearly() {
        let net = parse_net("tap=bt0,mac=02:00:00:00:00:01,vhost=on").expect("net");
        assert_eq!(
            net,
            DeviceConfig::Net {
                tap: "bt0".into(),
                mac: "02:00:00:00:00:01".parse().expect("mac"),
                vhost: true,
                tap_fd: None,
            }
        );
        let net = parse_net("fd=5,mac=02:00:00:00:00:01").expect("fd only");
        assert!(matches!(
            net,
            DeviceConfig::Net {
                tap_fd: Some(5),
                ..
            }
        ));
        assert!(parse_net("tap=bt0").unwrap_err().contains("mac"));
        assert!(parse_net("mac=02:00:00:00:00:01")
            .unwrap_err()
            .contains("tap"));
        assert!(parse_net("tap=bt0,mac=zz").unwrap_err().contains("mac"));
        assert!(parse_net("tap=bt0,mac=02:00:00:00:00:01,vhost=maybe").is_err());
        assert!(parse_net("tap=bt0,mac=02:00:00:00:00:01,speed=10").is_err());
        let cli = Cli::try_parse_from([
            "beacon-vmm",
            "run",
            "--kernel",
            "/k",
            "--net",
            "tap=a0,mac=02:00:00:00:00:01",
            "--net",
            "tap=a1,mac=02:00:00:00:00:02,vhost=on",
        ])
        .expect("two nets");
        let Cmd::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.nets.len(), 2);
    }

    #[test]
    fn vsock_flag_parses_cid_and_optional_uds() {
        assert_eq!(
            parse_vsock("cid=3"),
            Ok(DeviceConfig::Vsock {
                guest_cid: 3,
                uds_path: None
            })
        );
        assert_eq!(
            parse_vsock("cid=7,uds=/run/v.sock"),
            Ok(DeviceConfig::Vsock {
                guest_cid: 7,
                uds_path: Some("/run/v.sock".into())
            })
        );
        for bad in [
            "",
            "uds=/x",
            "cid=x",
            "cid=-1",
            "cid=3,port=2",
            "cid=3,uds=",
        ] {
            assert!(parse_vsock(bad).is_err(), "{bad:?}");
        }
    }
}
