//! The long-running shim server: the process `start` spawns. It serves the Task
//! API on the socket `start` bound (inherited as fd 3), logs to the bundle's
//! `log` FIFO, publishes events to containerd, and ends when containerd calls
//! Shutdown with no container left, or on SIGTERM/SIGINT, after tearing down
//! whatever is still running.

use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use beacon_netmgr::config::NetConfig;
use beacon_netmgr::NetworkManager;
use beacon_paths::BeaconPaths;
use tokio::sync::Notify;

use crate::events::Publisher;
use crate::guest::GuestLink;
use crate::invocation::Invocation;
use crate::sandbox::run_root;
use crate::service::{GuestMode, Service};

/// The fd the listening socket is inherited on.
pub const LISTEN_FD: RawFd = 3;
/// Environment variable naming the listening fd (set by `start`).
pub const LISTEN_FD_ENV: &str = "BEACON_SHIM_LISTEN_FD";
/// Tests: serve a vminitd that runs as a host process instead of building a VM:
/// `<task socket>,<stream socket>,<shares folder>`.
pub const HOST_GUEST_ENV: &str = "BEACON_SHIM_HOST_GUEST";

fn guest_mode() -> anyhow::Result<GuestMode> {
    let Some(v) = std::env::var_os(HOST_GUEST_ENV).filter(|v| !v.is_empty()) else {
        return Ok(GuestMode::Vm);
    };
    let v = v.to_string_lossy().into_owned();
    let parts: Vec<&str> = v.split(',').collect();
    let [task, streams, shares] = parts[..] else {
        anyhow::bail!("{HOST_GUEST_ENV} must be <task socket>,<stream socket>,<shares folder>");
    };
    Ok(GuestMode::HostProcess {
        link: GuestLink::Unix {
            task: task.into(),
            streams: streams.into(),
        },
        shares: PathBuf::from(shares),
    })
}

/// Run the server until it is told to end.
pub fn serve(inv: &Invocation) -> anyhow::Result<()> {
    let fd: RawFd = std::env::var(LISTEN_FD_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LISTEN_FD);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("beacon-shim")
        .build()
        .context("starting the shim's runtime")?;
    let result = runtime.block_on(run(inv, fd));
    // A blocking task still waiting on a peer (a FIFO nobody opens, say) must
    // not keep a finished shim alive: dropping the runtime would wait for it.
    runtime.shutdown_timeout(Duration::from_secs(2));
    tracing::info!("shim exiting");
    result
}

async fn run(inv: &Invocation, fd: RawFd) -> anyhow::Result<()> {
    // SAFETY: `start` handed this process the bound, listening socket on `fd`
    // and nothing else owns it.
    let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    std_listener
        .set_nonblocking(true)
        .context("making the listening socket non-blocking")?;
    let listener = tokio::net::UnixListener::from_std(std_listener)
        .context("adopting the listening socket")?;

    let ttrpc_address = std::env::var("TTRPC_ADDRESS")
        .unwrap_or_else(|_| format!("{}.ttrpc", inv.containerd_address));
    let publisher = Publisher::spawn(ttrpc_address, inv.namespace.clone());
    let paths = BeaconPaths::from_env();
    let mode = guest_mode()?;
    let net = match mode {
        // netmgr's settings (BEACON_HOST_ACCESS, BEACON_SUBNET, BEACON_DNS,
        // ...) come from the environment containerd gives the shim.
        GuestMode::Vm => match NetConfig::from_env().and_then(NetworkManager::new) {
            Ok(n) => {
                // Leases of sandboxes whose shim died (or of a host that
                // rebooted) are freed at every start.
                if let Err(e) = n.reconcile_once().await {
                    tracing::warn!("network reconcile at start: {e}");
                }
                Ok(Arc::new(n))
            }
            Err(e) => {
                tracing::error!(
                    "the network manager cannot start ({e}); sandboxes that ask for a network are refused"
                );
                Err(Arc::from(e.to_string()))
            }
        },
        GuestMode::HostProcess { .. } => Err(Arc::from(
            "vminitd runs as a host process (tests): there is no VM to give a network",
        )),
    };
    let shutdown = Arc::new(Notify::new());
    let service = Arc::new(Service::new(
        inv.namespace.clone(),
        paths,
        run_root(),
        mode,
        publisher.clone(),
        net,
        shutdown.clone(),
    ));
    let mut server = ttrpc::asynchronous::Server::new()
        .add_listener(listener.into())
        .register_service(Service::services_of(service.clone()));
    server.start().await.context("starting the ttrpc server")?;
    tracing::info!(namespace = inv.namespace, id = inv.id, "shim serving");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("watching SIGTERM")?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("watching SIGINT")?;
    tokio::select! {
        _ = shutdown.notified() => tracing::info!("shutdown requested by containerd"),
        _ = term.recv() => tracing::info!("SIGTERM: ending"),
        _ = int.recv() => tracing::info!("SIGINT: ending"),
    }
    if let Err(e) = server.shutdown().await {
        tracing::warn!("stopping the ttrpc server: {e}");
    }
    service.cleanup().await;
    tracing::debug!("sandboxes cleaned up; flushing events");
    publisher.close(Duration::from_secs(5)).await;
    Ok(())
}
