//! The vminitd binary: picks PID 1 or host mode, sets up logging, the
//! reaper, the stream port and the ttrpc Task server, and runs until the
//! host asks for shutdown (or SIGTERM/SIGINT on a host).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use beacon_common::guest_protocol::{VsockSecret, GUEST_SECRET_FILE};
use clap::{Parser, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

use vminitd::events::EventHub;
use vminitd::pid1::cmdline::BootParams;
use vminitd::reaper::Reaper;
use vminitd::streams::{self, StdioHub, StreamLimits};
use vminitd::task::runtime::{Runtime, RuntimeConfig};
use vminitd::task::service::TaskService;
use vminitd::transport::{self, ListenAddr, StreamListener, STREAM_VSOCK_PORT, TASK_VSOCK_PORT};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// PID 1 when our pid is 1, host otherwise.
    Auto,
    /// Guest init: mounts, network, shares, reaping, power-off.
    Pid1,
    /// Plain process (tests): no PID 1 duties, child subreaper.
    Host,
}

/// Guest PID 1 of beaconbox: containerd Task API over ttrpc, crun driver.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[arg(long, env = "VMINITD_MODE", value_enum, default_value = "auto")]
    mode: Mode,
    /// ttrpc Task API address (`vsock://-1:PORT` or `unix:///path`).
    #[arg(long, env = "VMINITD_TASK_ADDR", default_value_t = format!("vsock://-1:{TASK_VSOCK_PORT}"))]
    task_addr: String,
    /// Stdio and event stream address.
    #[arg(long, env = "VMINITD_STREAM_ADDR", default_value_t = format!("vsock://-1:{STREAM_VSOCK_PORT}"))]
    stream_addr: String,
    /// vminitd state: crun root, bundles, logs.
    #[arg(long, env = "VMINITD_STATE_DIR", default_value = "/run/vminitd")]
    state_dir: PathBuf,
    /// Where shares (bundles with their rootfs) are mounted.
    #[arg(
        long,
        env = "VMINITD_SHARES_DIR",
        default_value = "/run/vminitd/shares"
    )]
    shares_dir: PathBuf,
    /// The crun binary.
    #[arg(long, env = "VMINITD_CRUN", default_value = "/usr/bin/crun")]
    crun: PathBuf,
    /// The cgroup2 mount.
    #[arg(long, env = "VMINITD_CGROUP_MOUNT", default_value = "/sys/fs/cgroup")]
    cgroup_mount: PathBuf,
    /// Parent cgroup of all containers (a single path component).
    #[arg(long, env = "VMINITD_CGROUP_PARENT", default_value = "vminitd")]
    cgroup_parent: String,
    /// Where PID 1 reads its `beacon.*` parameters (tests point it at a file).
    #[arg(long, env = "VMINITD_CMDLINE_FILE", default_value = "/proc/cmdline")]
    cmdline_file: PathBuf,
    /// Log filter (tracing env-filter syntax).
    #[arg(long, env = "VMINITD_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pid1 = match args.mode {
        Mode::Auto => std::process::id() == 1,
        Mode::Pid1 => true,
        Mode::Host => false,
    };
    let boot = pid1.then(|| vminitd::pid1::early_setup(&args.cmdline_file));
    let filter = boot
        .as_ref()
        .and_then(|b| b.log.clone())
        .unwrap_or_else(|| args.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Building the tokio runtime")?;
    let result = rt.block_on(run(args, boot));
    if let Err(e) = &result {
        tracing::error!("vminitd failed: {e:#}");
    }
    if pid1 {
        // PID 1 must never exit: the kernel would panic. Power off instead.
        vminitd::pid1::power_off();
    }
    result
}

/// The per-VM vsock secret the host put in the initramfs, if any: read, then
/// removed, so nothing started later finds it. A file that is there but
/// malformed is an error (serving without the check would be open to any
/// host process).
fn take_secret() -> anyhow::Result<Option<Arc<VsockSecret>>> {
    let path = std::path::Path::new("/").join(GUEST_SECRET_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("Reading {}", path.display())),
    };
    std::fs::remove_file(&path).with_context(|| format!("Removing {}", path.display()))?;
    let secret = VsockSecret::parse_file(&text)
        .with_context(|| format!("{}: the host's vsock secret", path.display()))?;
    tracing::info!("host connections must authenticate (vhost-vsock)");
    Ok(Some(Arc::new(secret)))
}

async fn run(args: Args, boot: Option<BootParams>) -> anyhow::Result<()> {
    let pid1 = boot.is_some();
    if args.cgroup_parent.is_empty() || args.cgroup_parent.contains('/') {
        anyhow::bail!("--cgroup-parent must be one path component");
    }
    let reaper = Reaper::start().context("Starting the reaper")?;
    // Before anything announces readiness: a SIGTERM from then on must mean
    // an orderly stop, never the default (immediate death).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    if let Some(boot) = &boot {
        vminitd::pid1::setup(boot, &args.shares_dir, &args.cgroup_mount);
    } else {
        nix::sys::prctl::set_child_subreaper(true).context("Becoming a child subreaper")?;
    }
    if pid1 {
        let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|t| t.trim().parse().ok());
        match pid_max
            .map(|m| vminitd::cgroup::reserve_pids(&args.cgroup_mount, &args.cgroup_parent, m))
        {
            Some(Ok(cap)) => tracing::info!(
                "containers may hold {cap} pids in all ({} kept for vminitd)",
                vminitd::cgroup::RESERVED_PIDS
            ),
            Some(Err(e)) => tracing::warn!(
                "capping the containers' pids failed ({e}): a fork bomb in one could leave \
                 vminitd unable to stop it"
            ),
            None => tracing::warn!("no kernel pid limit to reserve pids from"),
        }
    }
    let secret = if pid1 { take_secret()? } else { None };
    let task_addr = ListenAddr::parse(&args.task_addr)?;
    let stream_addr = ListenAddr::parse(&args.stream_addr)?;
    std::fs::create_dir_all(&args.shares_dir)
        .with_context(|| format!("Creating {}", args.shares_dir.display()))?;

    let limits = StreamLimits::default();
    let hub = StdioHub::new(limits);
    let events = EventHub::start();
    let runtime = Arc::new(Runtime::new(
        RuntimeConfig {
            shares_dir: args.shares_dir.clone(),
            state_dir: args.state_dir.clone(),
            crun: args.crun.clone(),
            cgroup_mount: args.cgroup_mount.clone(),
            cgroup_parent: args.cgroup_parent.clone(),
        },
        reaper,
        hub.clone(),
        events.clone(),
    )?);

    let listener = StreamListener::bind(&stream_addr, secret.clone())
        .with_context(|| format!("Binding the stream port {}", args.stream_addr))?;
    let streams_task = tokio::spawn(streams::serve(listener, hub, events, limits));

    let shutdown = Arc::new(Notify::new());
    let service = TaskService::new(runtime.clone(), shutdown.clone());
    let task_listener = transport::task_listener(&task_addr, secret)
        .with_context(|| format!("Binding the Task API on {}", args.task_addr))?;
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(task_listener)
        .register_service(service.services());
    server.start().await.context("Starting the Task API")?;
    tracing::info!(task = %args.task_addr, streams = %args.stream_addr, pid1, "vminitd serving");
    if pid1 && matches!(task_addr, ListenAddr::Vsock { .. }) {
        tokio::spawn(transport::tell_host_ready());
    }

    tokio::select! {
        _ = shutdown.notified() => {}
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    tracing::info!("stopping containers");
    runtime.stop_all().await;
    // Let the reply to Shutdown leave before the server goes.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let _ = server.shutdown().await;
    streams_task.abort();
    for a in [&task_addr, &stream_addr] {
        if let ListenAddr::Unix(p) = a {
            let _ = std::fs::remove_file(p);
        }
    }
    let _ = std::fs::remove_dir(args.cgroup_mount.join(&args.cgroup_parent));
    tracing::info!("vminitd stopped");
    Ok(())
}
