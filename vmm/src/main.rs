//! `beacon-vmm`: run one VM from the command line, a thin CLI over the library.
//!
//! Exit codes: 0 when the guest powered off or asked to reboot, 1 when the VM
//! crashed, 2 when the configuration was refused before anything ran (invalid,
//! or not supported by the chosen backend).

use std::path::PathBuf;
use std::process::ExitCode;

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
    Run(RunArgs),
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
    /// Which VMM runs the guest: kvm (in-process) or qemu (child process, for comparison).
    #[arg(long, value_enum, default_value_t = BackendKind::Kvm)]
    backend: BackendKind,
    /// Where the serial console goes: stdout, off, or a file path.
    #[arg(long, default_value = "stdout")]
    console: ConsoleConfig,
    /// Add a virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
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
    /// Also name the virtio-mmio devices on the kernel command line
    /// (virtio_mmio.device=), for kernels without ACPI; the KVM backend always
    /// describes them in the DSDT.
    #[arg(long)]
    virtio_cmdline: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BEACON_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let Cmd::Run(args) = Cli::parse().command;
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

fn run(args: RunArgs, shares: &fs_cli::FsShares) -> Result<VmExit, VmError> {
    let mut config = VmConfig::new(args.kernel);
    config.initrd = args.initrd;
    config.cmdline = args.cmdline;
    config.vcpus.boot = args.cpus;
    config.vcpus.max = args.max_cpus.unwrap_or(args.cpus);
    config.memory.size_mib = args.memory;
    config.console = args.console;
    config.virtio_mmio_cmdline = args.virtio_cmdline;
    if args.rng {
        config.devices.push(DeviceConfig::Rng);
    }
    config.devices.extend(shares.devices());
    let vm = create_backend(args.backend, config)?;
    // Declared after the VM, so dropped before it: virtiofsd ending with its
    // VM is no death to report.
    let _watch = shares.watch_while_running();
    vm.start()?;
    let exit = vm.wait()?;
    let times = vm.boot_times();
    if let Some(t) = times.first_run {
        tracing::info!(backend = ?args.backend, "first vCPU run after {} µs", t.as_micros());
    }
    if let Some(t) = times.init_reached {
        tracing::info!(backend = ?args.backend, "guest init reached after {} µs", t.as_micros());
    }
    Ok(exit)
}
