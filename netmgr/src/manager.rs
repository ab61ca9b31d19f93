//! [`NetworkManager`]: the API the shim calls. It owns the order of operations of
//! one sandbox's network (lease first, then TAP, then attach; the reverse on
//! teardown) and the reconciler that repairs what a crash left behind. Whether a
//! sandbox still runs is [`crate::liveness`]'s question, never this module's.
//!
//! Order matters for crash safety: setup commits the lease before it creates the
//! TAP, so a `beacon-*` TAP without a lease is always an orphan (a crashed setup or
//! teardown) the reconciler may delete, and a lease whose sandbox is gone is freed
//! together with its TAP.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rtnetlink::Handle;
use tokio::sync::Mutex;

use crate::attachment::NetworkAttachment;
use crate::config::NetConfig;
use crate::error::{NetError, Result};
use crate::guard::{self, GuestPin};
use crate::leasedb::{LeaseDb, LeaseMode, LeaseOwner, RepairReport};
use crate::liveness::{Liveness, LivenessCheck, SandboxLiveness};
use crate::naming;
use crate::{firewall, link, tap};

/// What one reconciler pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Sandboxes whose lease was freed because they no longer exist.
    pub released: Vec<String>,
    /// `beacon-*` TAPs deleted because no lease owned them.
    pub orphan_taps: Vec<String>,
    /// CNI namespace files no lease named, now removed.
    pub orphan_netns: Vec<PathBuf>,
    /// Bitmap and index fixes.
    pub repair: RepairReport,
    /// Sandboxes whose liveness check or teardown failed (kept for the next pass),
    /// with the error.
    pub failed: Vec<(String, String)>,
}

/// Host networking for all sandboxes of this host.
pub struct NetworkManager {
    cfg: NetConfig,
    db: LeaseDb,
    liveness: SandboxLiveness,
    handle: Handle,
    bridge_index: Mutex<Option<u32>>,
    /// The namespace the manager was created in (for background deletions).
    netns: Arc<std::fs::File>,
}

impl NetworkManager {
    /// Connect to netlink in the current namespace. Changes nothing on the system;
    /// must be called inside a tokio runtime.
    pub fn new(cfg: NetConfig) -> Result<Self> {
        cfg.validate()?;
        let db = LeaseDb::new(cfg.db_path.clone(), cfg.pool, cfg.gateway, cfg.prefix);
        let ns_path = "/proc/thread-self/ns/net";
        let netns = std::fs::File::open(ns_path).map_err(|source| NetError::Io {
            path: ns_path.into(),
            source,
        })?;
        Ok(NetworkManager {
            handle: link::connect()?,
            liveness: SandboxLiveness::new(cfg.liveness_dir.clone()),
            cfg,
            db,
            bridge_index: Mutex::new(None),
            netns: Arc::new(netns),
        })
    }

    /// Do the slow one-time work ahead of the first `setup`: open and verify the
    /// lease database, and (legacy mode) make sure the bridge and nftables tables
    /// exist. A shim can call this at startup, in parallel with its other work.
    pub async fn prepare(&self) -> Result<()> {
        self.db.open_now()?;
        if self.cfg.cni.is_none() {
            self.ensure_host(false).await?;
        }
        Ok(())
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// The lease database.
    pub fn leases(&self) -> &LeaseDb {
        &self.db
    }

    /// The sandboxes' liveness locks (`$BEACON_RUN_DIR/sandboxes`): the shim takes
    /// its sandbox's guard here before [`Self::setup`].
    pub fn liveness(&self) -> &SandboxLiveness {
        &self.liveness
    }

    /// Bridge, its address, IP forwarding and the nftables tables (filter, NAT and
    /// the guard table rebuilt from the leases). The nftables tables are
    /// (re)applied when the bridge had to be created, a table is missing, or
    /// `force_nft`.
    ///
    /// Before creating the bridge, refuses with [`NetError::SubnetConflict`] when
    /// an address or route of another device already covers the subnet.
    pub async fn ensure_host(&self, force_nft: bool) -> Result<u32> {
        let mut cached = self.bridge_index.lock().await;
        if let (Some(index), false) = (*cached, force_nft) {
            return Ok(index);
        }
        if link::link_index(&self.handle, &self.cfg.bridge)
            .await?
            .is_none()
        {
            self.refuse_taken_subnet().await?;
        }
        let (index, created) = link::ensure_bridge(
            &self.handle,
            &self.cfg.bridge,
            self.cfg.gateway,
            self.cfg.prefix,
        )
        .await?;
        if created
            || force_nft
            || cached.is_none() && !firewall::all_tables_present(&self.cfg.nft_program)?
        {
            firewall::enable_ip_forward()?;
            firewall::ensure(&self.cfg)?;
            self.refresh_guard()?;
            tracing::info!(bridge = %self.cfg.bridge, "host network ready");
        }
        *cached = Some(index);
        Ok(index)
    }

    /// [`NetError::SubnetConflict`] if something other than our bridge owns an
    /// address or route in the configured subnet.
    async fn refuse_taken_subnet(&self) -> Result<()> {
        let (subnet, prefix) = (self.cfg.subnet(), self.cfg.prefix);
        match link::subnet_owner(&self.handle, &self.cfg.bridge, subnet, prefix).await? {
            None => Ok(()),
            Some(owner) => {
                tracing::error!(%subnet, prefix, %owner, "the legacy subnet is taken");
                Err(NetError::SubnetConflict {
                    subnet: format!("{subnet}/{prefix}"),
                    bridge: self.cfg.bridge.clone(),
                    owner,
                })
            }
        }
    }

    /// Rebuild the guard table (per-TAP anti-spoofing, guest isolation) from the
    /// lease database; see [`crate::guard`].
    fn refresh_guard(&self) -> Result<()> {
        guard::rebuild(
            &self.cfg.nft_program,
            &self.cfg.firewall_lock,
            self.cfg.guest_to_guest,
            || Ok(GuestPin::of_leases(&self.db.list()?)),
        )
    }

    /// [`Self::refresh_guard`] after a legacy teardown, if the bridge exists (after
    /// `cleanup` there is nothing to guard, and no table to recreate). A failure is
    /// logged, not returned: the TAP is gone, so its stale element matches no
    /// frame, and every later setup or reconciler pass rebuilds the table from the
    /// leases.
    async fn refresh_guard_after_teardown(&self, sandbox_id: &str) {
        let refreshed = match link::link_index(&self.handle, &self.cfg.bridge).await {
            Ok(None) => return,
            Ok(Some(_)) => self.refresh_guard(),
            Err(e) => Err(e),
        };
        if let Err(e) = refreshed {
            tracing::warn!(sandbox_id, error = %e, "could not drop the sandbox's guard rules; the next setup or reconciler pass will");
        }
    }

    /// Give `sandbox_id` a network: lease, TAP, attachment. Calling it again for the
    /// same sandbox returns the same attachment.
    ///
    /// The caller must hold the sandbox's liveness guard
    /// ([`SandboxLiveness::acquire`] on [`Self::liveness`]) from before this call
    /// until after [`Self::teardown`]; without it this fails with
    /// [`NetError::SandboxNotAlive`] rather than hand out a lease the next
    /// reconciler pass would free.
    pub async fn setup(&self, sandbox_id: &str) -> Result<NetworkAttachment> {
        self.setup_as(sandbox_id, LeaseOwner::Shim).await
    }

    /// [`Self::setup`] with an explicit owner: [`LeaseOwner::Cli`] leases need no
    /// liveness guard and are kept until [`Self::teardown`] (`beacon-net setup`).
    pub async fn setup_as(&self, sandbox_id: &str, owner: LeaseOwner) -> Result<NetworkAttachment> {
        naming::validate_sandbox_id(sandbox_id)?;
        if owner == LeaseOwner::Shim && !self.liveness.is_alive(sandbox_id)? {
            return Err(NetError::SandboxNotAlive {
                sandbox_id: sandbox_id.to_string(),
                lock: self.liveness.lock_path(sandbox_id),
            });
        }
        if let Some(cni) = &self.cfg.cni {
            return crate::cni::setup(&self.db, &self.cfg.dns, cni, sandbox_id, owner);
        }
        let bridge = self.ensure_host(false).await?;
        let tap_name = naming::tap_name(sandbox_id);
        let lease =
            self.db
                .allocate(sandbox_id, &tap_name, naming::guest_mac(sandbox_id), owner)?;
        let plugged = match self.plug_tap(&tap_name, bridge).await {
            // Pin the TAP to its lease before anyone opens it: until then the guard
            // drops every frame of a `beacon-*` TAP it does not know.
            Ok(()) => self.refresh_guard(),
            Err(e) => Err(e),
        };
        if let Err(e) = plugged {
            tracing::warn!(sandbox_id, error = %e, "TAP setup failed; releasing the lease");
            let _ = link::delete_link(&self.handle, &tap_name).await;
            self.db.release(sandbox_id)?;
            return Err(e);
        }
        tracing::debug!(sandbox_id, tap = %tap_name, ip = %lease.ip, "sandbox network ready");
        Ok(NetworkAttachment::from_lease(&lease, self.cfg.dns.clone()))
    }

    async fn plug_tap(&self, tap_name: &str, bridge: u32) -> Result<()> {
        tap::create_persistent_tap(tap_name)?;
        let index = link::link_index(&self.handle, tap_name)
            .await?
            .ok_or_else(|| NetError::Netlink {
                action: format!("looking up TAP {tap_name}"),
                detail: "it vanished right after creation".into(),
            })?;
        if link::set_up(&self.handle, index, Some(bridge))
            .await
            .is_ok()
        {
            return Ok(());
        }
        // The bridge may have been removed behind our back: recreate and retry once.
        *self.bridge_index.lock().await = None;
        let bridge = self.ensure_host(false).await?;
        link::set_up(&self.handle, index, Some(bridge)).await
    }

    /// Remove the network of `sandbox_id`: TAP (and CNI DEL), then the lease.
    /// Idempotent: tearing down an unknown sandbox succeeds.
    pub async fn teardown(&self, sandbox_id: &str) -> Result<()> {
        naming::validate_sandbox_id(sandbox_id)?;
        let lease = self.db.get(sandbox_id)?;
        match lease.as_ref().map(|l| l.mode) {
            Some(LeaseMode::Cni) => {
                if let Some(lease) = &lease {
                    crate::cni::teardown(lease)?;
                }
            }
            _ => {
                let tap_name = lease
                    .as_ref()
                    .map_or_else(|| naming::tap_name(sandbox_id), |l| l.tap.clone());
                // The kernel needs ~15 ms to unregister a netdev and the commit
                // ~5-10 ms of fsync: run them side by side. Should we crash in
                // between, a TAP without a lease is an orphan the reconciler deletes.
                let db = self.db.clone();
                let id = sandbox_id.to_string();
                let release = tokio::task::spawn_blocking(move || db.release(&id));
                let deleted = link::delete_link(&self.handle, &tap_name).await;
                release.await.map_err(|e| NetError::Database {
                    path: self.db.path().to_path_buf(),
                    detail: format!("release task failed: {e}"),
                })??;
                self.refresh_guard_after_teardown(sandbox_id).await;
                deleted?;
                return Ok(());
            }
        }
        self.db.release(sandbox_id)?;
        Ok(())
    }

    /// Verify a sandbox's network: CNI CHECK over the chain in CNI mode; in legacy
    /// mode that its TAP exists and sits on the bridge.
    pub async fn check(&self, sandbox_id: &str) -> Result<()> {
        let lease = self.db.get(sandbox_id)?.ok_or_else(|| NetError::Netlink {
            action: format!("checking sandbox {sandbox_id:?}"),
            detail: "it has no lease".into(),
        })?;
        if lease.mode == LeaseMode::Cni {
            return crate::cni::check(&lease);
        }
        let bridge = link::link_index(&self.handle, &self.cfg.bridge).await?;
        let tap = link::get_link(&self.handle, &lease.tap).await?;
        match (bridge, tap) {
            (Some(b), Some(t)) if link::link_controller(&t) == Some(b) => Ok(()),
            _ => Err(NetError::Netlink {
                action: format!("checking sandbox {sandbox_id:?}"),
                detail: format!("TAP {} is missing or not on {}", lease.tap, self.cfg.bridge),
            }),
        }
    }

    /// Legacy-mode teardown that does not wait for the kernel: the lease is released
    /// (durably) before this returns, and the TAP is deleted by a background thread
    /// (unregistering a netdev takes the kernel ~15 ms). Should the process exit
    /// before that thread ran, the TAP is an orphan the reconciler deletes. Join the
    /// handle to know when the TAP is gone. CNI leases are torn down fully, inline.
    pub async fn teardown_deferred(
        &self,
        sandbox_id: &str,
    ) -> Result<Option<std::thread::JoinHandle<Result<bool>>>> {
        naming::validate_sandbox_id(sandbox_id)?;
        let lease = self.db.get(sandbox_id)?;
        if lease.as_ref().is_some_and(|l| l.mode == LeaseMode::Cni) {
            self.teardown(sandbox_id).await?;
            return Ok(None);
        }
        let tap_name = lease.map_or_else(|| naming::tap_name(sandbox_id), |l| l.tap);
        self.db.release(sandbox_id)?;
        self.refresh_guard_after_teardown(sandbox_id).await;
        let netns = self.netns.clone();
        Ok(Some(std::thread::spawn(move || {
            nix::sched::setns(netns.as_ref(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                |e| NetError::Netns {
                    path: "/proc/thread-self/ns/net".into(),
                    detail: format!("setns: {e}"),
                },
            )?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| NetError::Netlink {
                    action: "starting the TAP deletion thread".into(),
                    detail: e.to_string(),
                })?;
            rt.block_on(async {
                let handle = link::connect()?;
                link::delete_link(&handle, &tap_name).await
            })
        })))
    }

    /// One reconciler pass with the real liveness check ([`Self::liveness`]): what
    /// the shim runs once at start, and `beacon-net reconcile` runs.
    pub async fn reconcile_once(&self) -> Result<ReconcileReport> {
        self.reconcile(&self.liveness).await
    }

    /// One reconciler pass: free the shim-owned leases of sandboxes `liveness`
    /// says are gone (deleting their TAPs, running CNI DEL), align the bitmap with
    /// the leases, delete `beacon-*` TAPs no lease owns, and refresh the nftables
    /// tables when the bridge exists. Operator-owned ([`LeaseOwner::Cli`]) leases
    /// are never freed here.
    ///
    /// Contract for `liveness`: a sandbox must count as alive from before its
    /// `setup` starts, or a reconciler in another process may free a lease that is
    /// being set up. The lock-based [`SandboxLiveness`] also keeps a restarting
    /// owner out while its old network is torn down.
    pub async fn reconcile(&self, liveness: &dyn LivenessCheck) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        for lease in self.db.list()? {
            if lease.owner == LeaseOwner::Cli {
                continue;
            }
            let claim = match liveness.probe(&lease.sandbox_id) {
                Ok(Liveness::Alive) => continue,
                Ok(Liveness::Gone(claim)) => claim,
                Err(e) => {
                    let detail = format!("checking whether it still runs: {e}");
                    report.failed.push((lease.sandbox_id, detail));
                    continue;
                }
            };
            match self.teardown(&lease.sandbox_id).await {
                Ok(()) => report.released.push(lease.sandbox_id),
                Err(e) => report.failed.push((lease.sandbox_id, e.to_string())),
            }
            // Only now may an owner start this sandbox again.
            drop(claim);
        }
        report.repair = self.db.repair()?;
        if let Some(cni) = &self.cfg.cni {
            let candidates = crate::cni::orphan_namespaces(cni);
            let named: Vec<PathBuf> = self
                .db
                .list()?
                .into_iter()
                .filter_map(|l| l.netns)
                .collect();
            for ns in candidates.into_iter().filter(|ns| !named.contains(ns)) {
                crate::cni::netns::remove(&ns)?;
                report.orphan_netns.push(ns);
            }
        }
        let links = link::list_links(&self.handle).await?;
        // Read the leases only after listing the links: a setup commits its lease
        // before it creates its TAP, so every TAP listed above has its lease visible
        // now and a concurrent setup's fresh TAP is never taken for an orphan.
        let owned: Vec<String> = self.db.list()?.into_iter().map(|l| l.tap).collect();
        for msg in links {
            let Some(name) = link::link_name(&msg) else {
                continue;
            };
            if naming::is_beacon_tap(name) && !owned.iter().any(|t| t == name) {
                let name = name.to_string();
                link::delete_link(&self.handle, &name).await?;
                report.orphan_taps.push(name);
            }
        }
        if self.cfg.cni.is_none()
            && link::link_index(&self.handle, &self.cfg.bridge)
                .await?
                .is_some()
        {
            self.ensure_host(true).await?;
        }
        if report != ReconcileReport::default() {
            tracing::info!(?report, "reconciled sandbox networks");
        }
        Ok(report)
    }

    /// Remove the host-wide pieces: the nftables tables (filter, NAT, guard) and the
    /// bridge. Leases and TAPs of running sandboxes are left alone.
    pub async fn cleanup(&self) -> Result<()> {
        firewall::remove(&self.cfg.nft_program)?;
        link::delete_link(&self.handle, &self.cfg.bridge).await?;
        *self.bridge_index.lock().await = None;
        Ok(())
    }
}

/// Run [`NetworkManager::reconcile`] now and then every `interval` (the default is
/// [`DEFAULT_RECONCILE_INTERVAL`]) until the task is aborted. Errors are logged.
/// `liveness` is normally `Arc::new(manager.liveness().clone())`.
pub fn spawn_reconciler(
    manager: Arc<NetworkManager>,
    interval: Duration,
    liveness: Arc<dyn LivenessCheck>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        loop {
            ticker.tick().await;
            if let Err(e) = manager.reconcile(liveness.as_ref()).await {
                tracing::warn!(error = %e, "network reconciler pass failed");
            }
        }
    })
}

/// One minute, as the design asks.
pub const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    #[test]
    fn manager_outside_a_runtime_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::NetConfig::legacy(&beacon_paths::BeaconPaths::under(dir.path()));
        let err = crate::NetworkManager::new(cfg).err().expect("no runtime");
        assert!(err.to_string().contains("tokio runtime"), "{err}");
    }
}
