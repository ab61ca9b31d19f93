//! `beacon-net-bench`: times `setup` and `teardown` and prints medians. It always
//! runs inside a private network namespace (it re-executes itself under
//! `unshare --net`) with its database in a temporary folder, so it never touches the
//! host's interfaces, nftables or state.
//!
//! Usage: `beacon-net-bench [iterations] [--cni BIN_DIR]` (default 50 iterations;
//! with `--cni`, CNI mode with the bridge + host-local plugins from BIN_DIR is timed
//! too).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use beacon_netmgr::{CniConfig, NetConfig, NetworkManager};

const CHILD_ENV: &str = "BEACON_NET_BENCH_IN_NETNS";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if std::env::var_os(CHILD_ENV).is_none() {
        let exe = std::env::current_exe()?;
        let status = std::process::Command::new("unshare")
            .args(["--net", "--mount", "--propagation", "private", "--"])
            .arg(exe)
            .args(&args)
            .env(CHILD_ENV, "1")
            .status()
            .context("running unshare (util-linux)")?;
        std::process::exit(status.code().unwrap_or(1));
    }
    let iterations: usize = args
        .first()
        .filter(|a| !a.starts_with("--"))
        .map(|a| a.parse())
        .transpose()
        .context("iterations must be a number")?
        .unwrap_or(50);
    let cni_bin = args
        .iter()
        .position(|a| a == "--cni")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let paths = beacon_paths::BeaconPaths::under(dir.path());
        let cfg = NetConfig::legacy(&paths);
        bench("legacy", cfg, iterations).await?;
        if let Some(bin) = cni_bin {
            let mut cfg = NetConfig::legacy(&paths);
            cfg.db_path = dir.path().join("cni-network.db");
            let conf_dir = dir.path().join("cni-conf");
            std::fs::create_dir_all(&conf_dir)?;
            std::fs::write(
                conf_dir.join("10-beacon.conflist"),
                beacon_netmgr::cni::example_conflist(
                    "beacon-net",
                    "cni-bench0",
                    "10.99.0.0/16",
                    &dir.path().join("ipam"),
                ),
            )?;
            cfg.cni = Some(CniConfig {
                conf_dir,
                bin_dir: bin.into(),
                network: "beacon-net".into(),
                netns_dir: dir.path().join("netns"),
                ifname: "eth0".into(),
            });
            bench("cni", cfg, iterations.min(20)).await?;
        }
        Ok(())
    })
}

fn median(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let p90 = v[(v.len() * 9 / 10).min(v.len() - 1)];
    (v[v.len() / 2], p90)
}

async fn bench(label: &str, cfg: NetConfig, iterations: usize) -> Result<()> {
    let mgr = NetworkManager::new(cfg.clone())?;
    // Each sandbox is owned (liveness guard held) across its setup, as in the shim.
    let live = mgr.liveness().clone();
    let _warmup = live.acquire("warmup")?;
    let t = Instant::now();
    mgr.setup("warmup").await?;
    let first = t.elapsed();
    mgr.teardown("warmup").await?;
    let mut setups = Vec::with_capacity(iterations);
    let mut teardowns = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let id = format!("bench-{i}");
        let _alive = live.acquire(&id)?;
        let t = Instant::now();
        mgr.setup(&id).await?;
        setups.push(t.elapsed());
        let t = Instant::now();
        mgr.teardown(&id).await?;
        teardowns.push(t.elapsed());
    }
    let mut deferred = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let id = format!("deferred-{i}");
        let _alive = live.acquire(&id)?;
        mgr.setup(&id).await?;
        let t = Instant::now();
        let deleting = mgr.teardown_deferred(&id).await?;
        deferred.push(t.elapsed());
        if let Some(thread) = deleting {
            let _ = thread.join();
        }
    }
    let (s50, s90) = median(setups);
    let (t50, t90) = median(teardowns);
    println!(
        "{label}: first setup (creates host network) {:.2} ms; setup median {:.2} ms (p90 {:.2}); teardown median {:.2} ms (p90 {:.2}); n={iterations}",
        ms(first),
        ms(s50),
        ms(s90),
        ms(t50),
        ms(t90)
    );
    if label == "legacy" {
        let (d50, d90) = median(deferred);
        println!(
            "{label}: teardown_deferred (lease released, TAP deleted in the background) median {:.2} ms (p90 {:.2})",
            ms(d50),
            ms(d90)
        );
    }
    // Where the time goes: the database alone, and TAP create/delete alone.
    let (mut alloc, mut release, mut tap_add, mut tap_del) = (vec![], vec![], vec![], vec![]);
    let handle = beacon_netmgr::link::connect()?;
    for i in 0..iterations {
        let id = format!("parts-{i}");
        let tap = beacon_netmgr::naming::tap_name(&id);
        let t = Instant::now();
        mgr.leases().allocate(
            &id,
            &tap,
            beacon_netmgr::naming::guest_mac(&id),
            beacon_netmgr::LeaseOwner::Cli,
        )?;
        alloc.push(t.elapsed());
        let t = Instant::now();
        mgr.leases().release(&id)?;
        release.push(t.elapsed());
        let t = Instant::now();
        beacon_netmgr::tap::create_persistent_tap(&tap)?;
        tap_add.push(t.elapsed());
        let t = Instant::now();
        beacon_netmgr::link::delete_link(&handle, &tap).await?;
        tap_del.push(t.elapsed());
    }
    println!(
        "{label}: parts medians: db allocate {:.2} ms, db release {:.2} ms, TAP create {:.2} ms, TAP delete {:.2} ms",
        ms(median(alloc).0),
        ms(median(release).0),
        ms(median(tap_add).0),
        ms(median(tap_del).0)
    );
    // A shim is one process per sandbox: time setup with a brand-new manager (takes
    // the liveness lock, opens the database with its integrity check, connects
    // netlink, checks nftables).
    let mut cold = Vec::new();
    for i in 0..iterations.min(20) {
        let id = format!("cold-{i}");
        let t = Instant::now();
        let fresh = NetworkManager::new(cfg.clone())?;
        let _alive = fresh.liveness().acquire(&id)?;
        fresh.setup(&id).await?;
        cold.push(t.elapsed());
        fresh.teardown(&id).await?;
    }
    let (c50, c90) = median(cold);
    let mut prepared = Vec::new();
    for i in 0..iterations.min(20) {
        let id = format!("prepared-{i}");
        let fresh = NetworkManager::new(cfg.clone())?;
        let _alive = fresh.liveness().acquire(&id)?;
        fresh.prepare().await?;
        let t = Instant::now();
        fresh.setup(&id).await?;
        prepared.push(t.elapsed());
        fresh.teardown(&id).await?;
    }
    let (p50, p90) = median(prepared);
    println!(
        "{label}: setup after NetworkManager::prepare() in a fresh manager median {:.2} ms (p90 {:.2})",
        ms(p50),
        ms(p90)
    );
    println!(
        "{label}: cold setup (new manager, as a fresh shim process) median {:.2} ms (p90 {:.2})",
        ms(c50),
        ms(c90)
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
