//! The persistent lease database (`$BEACON_STATE_DIR/network.db`, redb).
//!
//! Owns: the IP bitmap, one [`IpLease`] per sandbox, the TAP-name index. Every
//! allocate and release is one ACID write transaction. Any number of shim processes
//! share the file: each keeps it open in redb's multi-writer mode (opening and
//! closing cost more than the 15 ms setup budget) and additionally takes an
//! exclusive `flock` on `network.db.lock` around creation and every write.
//!
//! Never: reinitialise an existing file. A file that does not open cleanly yields
//! [`NetError::DatabaseCorrupt`]; only `beacon-net recover-db` ([`LeaseDb::recover`])
//! moves it aside. A new file is built under a temporary name and renamed into place,
//! so a crash while creating it cannot leave a half-made database behind.
//!
//! Corruption that makes redb panic or crash must still end in that error, in
//! release builds too (`panic = "abort"`, where no `catch_unwind` runs): each
//! process therefore checks a copy of the file in a forked child before it opens
//! the file itself (see `verify`). The child's death is the error, never ours, and
//! a file that fails the check is left exactly as it was.

use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use beacon_common::MacAddr;
use nix::fcntl::{Flock, FlockArg};
use redb::{
    ConcurrencyMode, Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::config::PoolRange;
use crate::error::{NetError, Result};
use crate::pool::PoolBitmap;

const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const TAPS: TableDefinition<&str, &str> = TableDefinition::new("taps");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const META_POOL: &str = "pool";
const META_BITMAP: &str = "bitmap";
const META_CURSOR: &str = "cursor";

/// How a lease's address was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseMode {
    /// From our bitmap; the TAP sits on the bridge.
    Legacy,
    /// From a CNI IPAM plugin; the TAP sits in a per-sandbox namespace.
    Cni,
}

/// Who keeps a lease alive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseOwner {
    /// A running process holding the sandbox's liveness lock (the shim, or
    /// `beacon-net setup --hold`); the reconciler frees the lease once the lock is
    /// free. Leases stored before owners were recorded are of this kind.
    #[default]
    Shim,
    /// An operator (`beacon-net setup`/`allocate`): kept until `beacon-net
    /// teardown`/`release`; the reconciler never frees it.
    Cli,
}

/// One sandbox's network lease as stored in the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpLease {
    pub sandbox_id: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub tap: String,
    pub mac: MacAddr,
    /// Seconds since the Unix epoch when the lease was granted.
    pub created_unix: u64,
    pub mode: LeaseMode,
    /// CNI mode: the sandbox's network namespace file.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// CNI mode: what DEL needs after a crash (network config and ADD result).
    #[serde(default)]
    pub cni: Option<serde_json::Value>,
    #[serde(default)]
    pub owner: LeaseOwner,
}

/// What [`LeaseDb::repair`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RepairReport {
    /// Bits set without a lease, now cleared.
    pub bits_cleared: Vec<Ipv4Addr>,
    /// Legacy leases whose bit was clear, now set.
    pub bits_set: Vec<Ipv4Addr>,
    /// TAP index entries without a lease, now removed.
    pub taps_removed: Vec<String>,
}

/// Handle on the database file, opened on first use and kept open (clones share it).
#[derive(Clone)]
pub struct LeaseDb {
    path: PathBuf,
    pool: PoolRange,
    prefix: u8,
    gateway: Ipv4Addr,
    open_db: Arc<OpenDb>,
}

/// The shared open handle. Closing a redb handle writes to the file, so it is
/// closed under the same cross-process lock as every write.
struct OpenDb {
    db: Mutex<Option<Database>>,
    lock_path: PathBuf,
}

impl Drop for OpenDb {
    fn drop(&mut self) {
        let db = beacon_common::lock(&self.db).take();
        if let Some(db) = db {
            let _lock = lock_file(&self.lock_path);
            drop(db);
        }
    }
}

fn lock_path_of(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf().into_os_string();
    p.push(".lock");
    PathBuf::from(p)
}

/// Take an exclusive `flock` on `lock_path` (created with its folder if missing),
/// released when the returned value is dropped.
pub(crate) fn lock_file(lock_path: &Path) -> std::io::Result<Flock<File>> {
    if let Some(dir) = lock_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path)?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| std::io::Error::from(errno))
}

impl std::fmt::Debug for LeaseDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseDb")
            .field("path", &self.path)
            .field("pool", &self.pool)
            .finish()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl LeaseDb {
    /// A handle for `path` serving `pool` inside `gateway/prefix`. Nothing is opened yet.
    pub fn new(path: impl Into<PathBuf>, pool: PoolRange, gateway: Ipv4Addr, prefix: u8) -> Self {
        let path = path.into();
        LeaseDb {
            path: path.clone(),
            pool,
            prefix,
            gateway,
            open_db: Arc::new(OpenDb {
                db: Mutex::new(None),
                lock_path: lock_path_of(&path),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl Into<redb::Error>) -> NetError {
        let e: redb::Error = e.into();
        let corrupt = match &e {
            redb::Error::Corrupted(_) => true,
            redb::Error::Io(io) => matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        };
        if corrupt {
            NetError::DatabaseCorrupt {
                path: self.path.clone(),
                detail: e.to_string(),
            }
        } else {
            NetError::Database {
                path: self.path.clone(),
                detail: e.to_string(),
            }
        }
    }

    fn corrupt(&self, detail: impl Into<String>) -> NetError {
        NetError::DatabaseCorrupt {
            path: self.path.clone(),
            detail: detail.into(),
        }
    }

    fn io(&self, path: &Path, source: std::io::Error) -> NetError {
        NetError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Take the cross-process lock (blocks until free; released on drop or crash).
    fn lock(&self) -> Result<Flock<File>> {
        let lock_path = &self.open_db.lock_path;
        lock_file(lock_path).map_err(|e| self.io(lock_path, e))
    }

    fn builder() -> redb::Builder {
        let mut b = Database::builder();
        b.set_cache_size(4 << 20);
        b.set_concurrency_mode(ConcurrencyMode::MultiWriter);
        b
    }

    /// Open the database (caller holds the lock), creating it atomically if absent.
    ///
    /// The file is first checked ([`Self::check_in_child`]); only a file that
    /// passed is opened here, without repeating redb's integrity check: every
    /// writer holds the lock we hold, so it is still the same file.
    fn open(&self) -> Result<Database> {
        if !self.path.exists() {
            self.create_fresh()?;
        }
        self.check_in_child()?;
        Self::builder().open(&self.path).map_err(|e| self.err(e))
    }

    /// Open a copy of the file with redb's integrity check in a child process
    /// ([`verify`]). A file that makes redb fail, panic or crash there yields
    /// [`NetError::DatabaseCorrupt`] whatever this build's panic strategy, and
    /// the file itself is not touched: redb may write to what it opens (a
    /// recovery flag, a repair), and here that is only the copy.
    fn check_in_child(&self) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let copy = tempfile::Builder::new()
            .prefix(".network.db.check-")
            .tempfile_in(dir)
            .map_err(|e| self.io(dir, e))?;
        std::fs::copy(&self.path, copy.path()).map_err(|e| self.io(&self.path, e))?;
        let outcome = verify::in_child(|| {
            let mut b = Self::builder();
            b.set_check_integrity_on_open(true);
            match b.open(copy.path()) {
                Ok(db) => db.close().map_err(|e| self.encode(self.err(e))),
                Err(e) => Err(self.encode(self.err(e))),
            }
        });
        match outcome {
            verify::Outcome::Passed => Ok(()),
            verify::Outcome::Refused(text) => Err(self.decode_error(&text)),
            verify::Outcome::Crashed(how) => {
                Err(self.corrupt(format!("the storage engine crashed on it: {how}")))
            }
            verify::Outcome::Failed(why) => Err(NetError::Database {
                path: self.path.clone(),
                detail: format!("could not check the file: {why}"),
            }),
        }
    }

    /// An open error as text for the trip out of the checking child.
    fn encode(&self, e: NetError) -> String {
        match e {
            NetError::DatabaseCorrupt { detail, .. } => format!("corrupt:{detail}"),
            NetError::Database { detail, .. } => format!("error:{detail}"),
            other => format!("error:{other}"),
        }
    }

    fn decode_error(&self, text: &str) -> NetError {
        match text.strip_prefix("corrupt:") {
            Some(detail) => self.corrupt(detail),
            None => NetError::Database {
                path: self.path.clone(),
                detail: text.strip_prefix("error:").unwrap_or(text).to_string(),
            },
        }
    }

    fn create_fresh(&self) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| self.io(dir, e))?;
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(format!(".new-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        {
            let db = Self::builder().create(&tmp).map_err(|e| self.err(e))?;
            let txn = db.begin_write().map_err(|e| self.err(e))?;
            {
                let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
                let pool = self.pool.to_string();
                meta.insert(META_POOL, pool.as_bytes())
                    .map_err(|e| self.err(e))?;
                meta.insert(META_BITMAP, PoolBitmap::new(self.pool).as_bytes())
                    .map_err(|e| self.err(e))?;
                meta.insert(META_CURSOR, &u32::from(self.pool.first).to_be_bytes()[..])
                    .map_err(|e| self.err(e))?;
                txn.open_table(LEASES).map_err(|e| self.err(e))?;
                txn.open_table(TAPS).map_err(|e| self.err(e))?;
            }
            txn.commit().map_err(|e| self.err(e))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(|e| self.io(&self.path, e))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        tracing::info!(path = %self.path.display(), pool = %self.pool, "created network database");
        Ok(())
    }

    /// Run `f` with the open database (opening it first if needed). A storage error
    /// drops the handle so the next call opens the file afresh.
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        let mut slot = beacon_common::lock(&self.open_db.db);
        if slot.is_none() {
            *slot = Some(self.open()?);
        }
        let Some(db) = slot.as_ref() else {
            return Err(self.corrupt("database handle vanished"));
        };
        let out = f(db);
        if matches!(
            out,
            Err(NetError::Database { .. } | NetError::DatabaseCorrupt { .. })
        ) {
            *slot = None;
        }
        out
    }

    /// Run `f` in one write transaction under the lock and commit it.
    fn write<T>(&self, f: impl FnOnce(&Self, &WriteTransaction) -> Result<T>) -> Result<T> {
        let _lock = self.lock()?;
        self.with_db(|db| {
            let txn = db.begin_write().map_err(|e| self.err(e))?;
            let out = f(self, &txn)?;
            txn.commit().map_err(|e| self.err(e))?;
            Ok(out)
        })
    }

    fn load_bitmap(&self, txn: &WriteTransaction) -> Result<(PoolBitmap, Ipv4Addr)> {
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let stored = meta
            .get(META_POOL)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| self.corrupt("pool metadata is missing"))?
            .value()
            .to_vec();
        let stored = String::from_utf8_lossy(&stored).into_owned();
        if stored != self.pool.to_string() {
            return Err(NetError::PoolChanged {
                path: self.path.clone(),
                stored,
                configured: self.pool.to_string(),
            });
        }
        let bits = meta
            .get(META_BITMAP)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| self.corrupt("IP bitmap is missing"))?;
        let map = PoolBitmap::from_bytes(self.pool, bits.value())
            .ok_or_else(|| self.corrupt("IP bitmap has the wrong length"))?;
        let cursor = meta
            .get(META_CURSOR)
            .map_err(|e| self.err(e))?
            .and_then(|c| <[u8; 4]>::try_from(c.value()).ok())
            .map_or(self.pool.first, |b| Ipv4Addr::from(u32::from_be_bytes(b)));
        Ok((map, cursor))
    }

    fn store_bitmap(
        &self,
        txn: &WriteTransaction,
        map: &PoolBitmap,
        cursor: Option<Ipv4Addr>,
    ) -> Result<()> {
        let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
        meta.insert(META_BITMAP, map.as_bytes())
            .map_err(|e| self.err(e))?;
        if let Some(c) = cursor {
            meta.insert(META_CURSOR, &u32::from(c).to_be_bytes()[..])
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    fn decode(&self, bytes: &[u8]) -> Result<IpLease> {
        serde_json::from_slice(bytes)
            .map_err(|e| self.corrupt(format!("a lease record does not parse: {e}")))
    }

    fn get_in(&self, txn: &WriteTransaction, sandbox_id: &str) -> Result<Option<IpLease>> {
        let leases = txn.open_table(LEASES).map_err(|e| self.err(e))?;
        let found = leases.get(sandbox_id).map_err(|e| self.err(e))?;
        found.map(|v| self.decode(v.value())).transpose()
    }

    fn check_tap_free(&self, txn: &WriteTransaction, tap: &str, sandbox_id: &str) -> Result<()> {
        let taps = txn.open_table(TAPS).map_err(|e| self.err(e))?;
        if let Some(other) = taps.get(tap).map_err(|e| self.err(e))? {
            if other.value() != sandbox_id {
                return Err(NetError::TapNameCollision {
                    tap: tap.to_string(),
                    sandbox_id: sandbox_id.to_string(),
                    other: other.value().to_string(),
                });
            }
        }
        Ok(())
    }

    fn insert_lease(&self, txn: &WriteTransaction, lease: &IpLease) -> Result<()> {
        let bytes = serde_json::to_vec(lease).map_err(|e| NetError::Database {
            path: self.path.clone(),
            detail: format!("cannot encode lease: {e}"),
        })?;
        let mut leases = txn.open_table(LEASES).map_err(|e| self.err(e))?;
        leases
            .insert(lease.sandbox_id.as_str(), bytes.as_slice())
            .map_err(|e| self.err(e))?;
        let mut taps = txn.open_table(TAPS).map_err(|e| self.err(e))?;
        taps.insert(lease.tap.as_str(), lease.sandbox_id.as_str())
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Lease an address from the bitmap for `sandbox_id` (legacy mode), in one
    /// transaction. A sandbox that already holds a lease gets the same one back
    /// (with its original owner).
    pub fn allocate(
        &self,
        sandbox_id: &str,
        tap: &str,
        mac: MacAddr,
        owner: LeaseOwner,
    ) -> Result<IpLease> {
        self.write(|me, txn| {
            if let Some(existing) = me.get_in(txn, sandbox_id)? {
                return Ok(existing);
            }
            me.check_tap_free(txn, tap, sandbox_id)?;
            let (mut map, cursor) = me.load_bitmap(txn)?;
            let ip = map.allocate(cursor).ok_or(NetError::PoolExhausted {
                range: me.pool.to_string(),
                size: me.pool.size(),
            })?;
            let next = map.next_after(ip);
            me.store_bitmap(txn, &map, Some(next))?;
            let lease = IpLease {
                sandbox_id: sandbox_id.to_string(),
                ip,
                prefix: me.prefix,
                gateway: me.gateway,
                tap: tap.to_string(),
                mac,
                created_unix: now_unix(),
                mode: LeaseMode::Legacy,
                netns: None,
                cni: None,
                owner,
            };
            me.insert_lease(txn, &lease)?;
            Ok(lease)
        })
    }

    /// Record a lease whose address came from elsewhere (CNI mode); replaces any
    /// earlier record of the same sandbox.
    pub fn record(&self, lease: &IpLease) -> Result<()> {
        self.write(|me, txn| {
            me.check_tap_free(txn, &lease.tap, &lease.sandbox_id)?;
            me.insert_lease(txn, lease)
        })
    }

    /// Drop the lease of `sandbox_id` and free its address; `Ok(None)` when it had
    /// none (release is idempotent).
    pub fn release(&self, sandbox_id: &str) -> Result<Option<IpLease>> {
        self.write(|me, txn| {
            let Some(lease) = me.get_in(txn, sandbox_id)? else {
                return Ok(None);
            };
            {
                let mut leases = txn.open_table(LEASES).map_err(|e| me.err(e))?;
                leases.remove(sandbox_id).map_err(|e| me.err(e))?;
                let mut taps = txn.open_table(TAPS).map_err(|e| me.err(e))?;
                taps.remove(lease.tap.as_str()).map_err(|e| me.err(e))?;
            }
            if lease.mode == LeaseMode::Legacy {
                let (mut map, _) = me.load_bitmap(txn)?;
                map.set(lease.ip, false);
                me.store_bitmap(txn, &map, None)?;
            }
            Ok(Some(lease))
        })
    }

    /// The lease of one sandbox, if any.
    pub fn get(&self, sandbox_id: &str) -> Result<Option<IpLease>> {
        let _lock = self.lock()?;
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| self.err(e))?;
            let leases = txn.open_table(LEASES).map_err(|e| self.err(e))?;
            let found = leases.get(sandbox_id).map_err(|e| self.err(e))?;
            found.map(|v| self.decode(v.value())).transpose()
        })
    }

    /// Open (and verify) the file now rather than on first use. Verification reads
    /// the whole file (~20 ms for a small one on a loaded VM disk).
    pub fn open_now(&self) -> Result<()> {
        let _lock = self.lock()?;
        self.with_db(|_| Ok(()))
    }

    /// Every lease, ordered by sandbox id.
    pub fn list(&self) -> Result<Vec<IpLease>> {
        let _lock = self.lock()?;
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| self.err(e))?;
            let leases = txn.open_table(LEASES).map_err(|e| self.err(e))?;
            let mut out = Vec::new();
            for row in leases.iter().map_err(|e| self.err(e))? {
                let (_, v) = row.map_err(|e| self.err(e))?;
                out.push(self.decode(v.value())?);
            }
            Ok(out)
        })
    }

    /// Addresses marked leased in the bitmap (for checks and `beacon-net`).
    pub fn leased_addresses(&self) -> Result<Vec<Ipv4Addr>> {
        self.write(|me, txn| Ok(me.load_bitmap(txn)?.0.leased()))
    }

    /// Make the bitmap and TAP index agree with the lease records, in one
    /// transaction. Lease records are the truth: they name a sandbox.
    pub fn repair(&self) -> Result<RepairReport> {
        self.write(|me, txn| {
            let mut report = RepairReport::default();
            let mut leases = Vec::new();
            {
                let table = txn.open_table(LEASES).map_err(|e| me.err(e))?;
                for row in table.iter().map_err(|e| me.err(e))? {
                    let (_, v) = row.map_err(|e| me.err(e))?;
                    leases.push(me.decode(v.value())?);
                }
            }
            let (map, _) = me.load_bitmap(txn)?;
            let mut want = PoolBitmap::new(me.pool);
            for l in leases.iter().filter(|l| l.mode == LeaseMode::Legacy) {
                want.set(l.ip, true);
            }
            for ip in map.leased() {
                if !want.is_leased(ip) {
                    report.bits_cleared.push(ip);
                }
            }
            for ip in want.leased() {
                if !map.is_leased(ip) {
                    report.bits_set.push(ip);
                }
            }
            if want != map {
                me.store_bitmap(txn, &want, None)?;
            }
            let mut taps = txn.open_table(TAPS).map_err(|e| me.err(e))?;
            let mut stale = Vec::new();
            for row in taps.iter().map_err(|e| me.err(e))? {
                let (k, v) = row.map_err(|e| me.err(e))?;
                let tap = k.value().to_string();
                if !leases
                    .iter()
                    .any(|l| l.tap == tap && l.sandbox_id == v.value())
                {
                    stale.push(tap);
                }
            }
            for tap in &stale {
                taps.remove(tap.as_str()).map_err(|e| me.err(e))?;
            }
            for l in &leases {
                if taps.get(l.tap.as_str()).map_err(|e| me.err(e))?.is_none() {
                    taps.insert(l.tap.as_str(), l.sandbox_id.as_str())
                        .map_err(|e| me.err(e))?;
                }
            }
            report.taps_removed = stale;
            Ok(report)
        })
    }

    /// Move a database that does not open aside (`network.db.corrupt-<unix time>`),
    /// so the next operation starts an empty one. Returns the new name of the old
    /// file, or `None` when there was no file.
    pub fn recover(&self) -> Result<Option<PathBuf>> {
        let _lock = self.lock()?;
        *beacon_common::lock(&self.open_db.db) = None;
        if !self.path.exists() {
            return Ok(None);
        }
        let mut moved = self.path.clone().into_os_string();
        moved.push(format!(".corrupt-{}", now_unix()));
        let moved = PathBuf::from(moved);
        std::fs::rename(&self.path, &moved).map_err(|e| self.io(&self.path, e))?;
        tracing::warn!(from = %self.path.display(), to = %moved.display(), "moved network database aside");
        Ok(Some(moved))
    }
}

mod verify;

#[cfg(test)]
mod tests;
