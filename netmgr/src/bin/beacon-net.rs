//! `beacon-net`: operator commands for beaconbox host networking. Configuration
//! comes from the same environment variables the shim reads (`BEACON_STATE_DIR`,
//! `BEACON_RUN_DIR`, `BEACON_POOL_RANGE`, `BEACON_CNI_*`, ...).
//!
//! Networks made here belong to the operator (kept until `teardown`), except with
//! `setup --hold`, which owns the sandbox like a shim does: its network lives as
//! long as the command runs (see `beacon_netmgr::liveness`).

use std::io::Write;

use anyhow::{bail, Context, Result};
use beacon_netmgr::{link, naming, LeaseOwner, NetConfig, NetworkManager};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "beacon-net",
    about = "Inspect and repair beaconbox host networking"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List IP leases.
    List {
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Free leases of sandboxes no running process owns any more (shim-owned leases
    /// only), delete orphan TAPs, repair the bitmap, refresh nftables.
    Reconcile,
    /// Remove the nftables tables and the bridge (leases are kept).
    Cleanup,
    /// Move a corrupt network.db aside so the next use starts an empty one.
    RecoverDb {
        /// Proceed even though beacon TAPs exist (their addresses may be handed out twice).
        #[arg(long)]
        force: bool,
    },
    /// Set up a sandbox's network (TAP, lease, bridge) and print the attachment. The
    /// network is kept until `beacon-net teardown` (the reconciler leaves it alone).
    Setup {
        sandbox_id: String,
        /// Own the sandbox like a shim: hold its liveness lock, keep running, and
        /// tear the network down on SIGINT/SIGTERM. Killed any other way, the
        /// reconciler frees the network.
        #[arg(long)]
        hold: bool,
    },
    /// Tear down a sandbox's network (whoever owns it).
    Teardown { sandbox_id: String },
    /// Lease an address in the database only (no TAP); kept until `release`.
    Allocate { sandbox_id: String },
    /// Release a lease in the database only.
    Release { sandbox_id: String },
    /// Print this build's panic strategy, `abort` or `unwind` (tests check they run
    /// the release build's behaviour).
    #[command(hide = true)]
    PanicStrategy,
    /// Allocate `count` leases `<prefix>-<n>` one transaction at a time, printing each
    /// address once committed (crash-safety tests).
    #[command(hide = true)]
    StressAllocate {
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        count: u32,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BEACON_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::PanicStrategy = cli.command {
        println!(
            "{}",
            if cfg!(panic = "abort") {
                "abort"
            } else {
                "unwind"
            }
        );
        return Ok(());
    }
    let cfg = NetConfig::from_env().context("reading the network configuration")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli.command, cfg))
}

async fn run(command: Command, cfg: NetConfig) -> Result<()> {
    let db = beacon_netmgr::LeaseDb::new(cfg.db_path.clone(), cfg.pool, cfg.gateway, cfg.prefix);
    let mut out = std::io::stdout().lock();
    match command {
        Command::List { json } => {
            for l in db.list()? {
                if json {
                    writeln!(out, "{}", serde_json::to_string(&l)?)?;
                } else {
                    writeln!(
                        out,
                        "{:<40} {:<15} {:<15} {:<6} {:<5} {}",
                        l.sandbox_id,
                        l.ip,
                        l.tap,
                        format!("{:?}", l.mode).to_lowercase(),
                        format!("{:?}", l.owner).to_lowercase(),
                        l.created_unix
                    )?;
                }
            }
        }
        Command::Reconcile => {
            let report = NetworkManager::new(cfg)?.reconcile_once().await?;
            writeln!(out, "released: {:?}", report.released)?;
            writeln!(out, "orphan taps deleted: {:?}", report.orphan_taps)?;
            writeln!(
                out,
                "orphan CNI namespaces removed: {:?}",
                report.orphan_netns
            )?;
            writeln!(out, "bitmap bits cleared: {:?}", report.repair.bits_cleared)?;
            writeln!(out, "bitmap bits set: {:?}", report.repair.bits_set)?;
            for (id, err) in &report.failed {
                writeln!(out, "failed: {id}: {err}")?;
            }
        }
        Command::Cleanup => {
            NetworkManager::new(cfg)?.cleanup().await?;
            writeln!(out, "removed nftables tables and bridge")?;
        }
        Command::RecoverDb { force } => {
            let handle = link::connect()?;
            let taps: Vec<String> = link::list_links(&handle)
                .await?
                .iter()
                .filter_map(|m| link::link_name(m).map(str::to_string))
                .filter(|n| naming::is_beacon_tap(n))
                .collect();
            if !taps.is_empty() && !force {
                bail!(
                    "{} beacon TAPs exist ({}): sandboxes may be running and their addresses \
                     would be handed out again. Stop them first, or pass --force",
                    taps.len(),
                    taps.join(", ")
                );
            }
            match db.recover()? {
                Some(moved) => {
                    writeln!(out, "moved {} to {}", db.path().display(), moved.display())?
                }
                None => writeln!(out, "{} does not exist; nothing to do", db.path().display())?,
            }
        }
        Command::Setup {
            sandbox_id,
            hold: false,
        } => {
            let a = NetworkManager::new(cfg)?
                .setup_as(&sandbox_id, LeaseOwner::Cli)
                .await?;
            writeln!(out, "{}", describe(&a))?;
        }
        Command::Setup {
            sandbox_id,
            hold: true,
        } => {
            use tokio::signal::unix::{signal, SignalKind};
            // Handlers first: a signal right after the attachment is printed must
            // end in a teardown, not in the default action.
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            let mgr = NetworkManager::new(cfg)?;
            let live = mgr.liveness().clone();
            let id = sandbox_id.clone();
            let alive = tokio::task::spawn_blocking(move || live.acquire(&id)).await??;
            let a = mgr.setup(&sandbox_id).await?;
            writeln!(out, "{}", describe(&a))?;
            out.flush()?;
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            mgr.teardown(&sandbox_id).await?;
            drop(alive);
        }
        Command::Teardown { sandbox_id } => {
            NetworkManager::new(cfg)?.teardown(&sandbox_id).await?;
        }
        Command::Allocate { sandbox_id } => {
            naming::validate_sandbox_id(&sandbox_id)?;
            let l = db.allocate(
                &sandbox_id,
                &naming::tap_name(&sandbox_id),
                naming::guest_mac(&sandbox_id),
                LeaseOwner::Cli,
            )?;
            writeln!(out, "{}", l.ip)?;
        }
        Command::Release { sandbox_id } => match db.release(&sandbox_id)? {
            Some(l) => writeln!(out, "released {}", l.ip)?,
            None => writeln!(out, "no lease")?,
        },
        Command::PanicStrategy => {}
        Command::StressAllocate { prefix, count } => {
            for n in 0..count {
                let id = format!("{prefix}-{n}");
                let l = db.allocate(
                    &id,
                    &naming::tap_name(&id),
                    naming::guest_mac(&id),
                    LeaseOwner::Cli,
                )?;
                writeln!(out, "{id} {}", l.ip)?;
                out.flush()?;
            }
        }
    }
    Ok(())
}

fn describe(a: &beacon_netmgr::NetworkAttachment) -> String {
    format!(
        "tap={} mac={} ip={}/{} gateway={} dns={:?} netns={:?}",
        a.tap, a.mac, a.ip, a.prefix, a.gateway, a.dns, a.netns
    )
}
