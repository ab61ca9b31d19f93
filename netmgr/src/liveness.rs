//! Sandbox liveness that dies with its owner.
//!
//! A sandbox is alive while some process holds an exclusive `flock` on its lock
//! file `$BEACON_RUN_DIR/sandboxes/<name>.lock` (name from
//! `beacon_paths::liveness_lock_name`). The kernel drops the lock when the holder
//! exits for any reason, SIGKILL included, and `/run` is a tmpfs a reboot empties:
//! so a crashed shim or a rebooted host leaves nothing that looks alive, and the
//! reconciler frees what it left behind.
//!
//! Who holds the lock:
//! - the shim, from before `NetworkManager::setup` until after `teardown`
//!   ([`SandboxLiveness::acquire`] returns a [`LivenessGuard`]; drop it last);
//! - `beacon-net setup --hold ID`, for as long as that command runs;
//! - the reconciler, briefly: [`SandboxLiveness::claim_if_dead`] takes the lock of
//!   a sandbox nobody holds and keeps it while it tears that sandbox's network
//!   down, so an owner starting again meanwhile waits in `acquire` instead of
//!   having its fresh network torn down under it.
//!
//! Leases made by `beacon-net setup ID` (no `--hold`) and `beacon-net allocate`
//! belong to the operator (`LeaseOwner::Cli`): no lock keeps them, and the
//! reconciler leaves them alone until `beacon-net teardown`/`release`.
//!
//! Lock files are removed by whoever holds the lock, just before letting go. A
//! process that opened the file earlier and then gets the lock finds the path no
//! longer names its file and starts over, so two holders can never both think they
//! own a sandbox. Never delete `$BEACON_RUN_DIR` while sandboxes run.
//!
//! Never: decide liveness from a file's existence, or from anything that outlives
//! the owning process.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{NetError, Result};
use crate::naming;

/// Where the liveness locks of this host's sandboxes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxLiveness {
    dir: PathBuf,
}

/// Proof that this process owns a sandbox: its liveness lock, held until the guard
/// is dropped or the process ends.
#[derive(Debug)]
pub struct LivenessGuard {
    lock: Flock<File>,
    path: PathBuf,
    sandbox_id: String,
}

/// What a liveness check found.
#[derive(Debug)]
pub enum Liveness {
    /// Some process owns the sandbox: leave its network alone.
    Alive,
    /// Nobody owns it. With a guard, the checker holds the sandbox's lock, so no
    /// owner can start it again until the guard is dropped.
    Gone(Option<LivenessGuard>),
}

/// Decides, per sandbox, whether the reconciler may free its network.
///
/// [`SandboxLiveness`] is the real check; any `Fn(&str) -> bool` (true = alive)
/// works too, for tests and callers with their own bookkeeping.
pub trait LivenessCheck: Send + Sync {
    fn probe(&self, sandbox_id: &str) -> Result<Liveness>;
}

impl<F: Fn(&str) -> bool + Send + Sync> LivenessCheck for F {
    fn probe(&self, sandbox_id: &str) -> Result<Liveness> {
        Ok(if self(sandbox_id) {
            Liveness::Alive
        } else {
            Liveness::Gone(None)
        })
    }
}

impl LivenessCheck for SandboxLiveness {
    fn probe(&self, sandbox_id: &str) -> Result<Liveness> {
        Ok(match self.claim_if_dead(sandbox_id)? {
            Some(guard) => Liveness::Gone(Some(guard)),
            None => Liveness::Alive,
        })
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> NetError + '_ {
    move |source| NetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

impl SandboxLiveness {
    /// Locks in `dir` (normally `BeaconPaths::liveness_dir()`, `/run/beacon/sandboxes`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SandboxLiveness { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The lock file of `sandbox_id`.
    pub fn lock_path(&self, sandbox_id: &str) -> PathBuf {
        self.dir.join(beacon_paths::liveness_lock_name(sandbox_id))
    }

    /// Become the owner of `sandbox_id` for as long as the guard lives (or the
    /// process does). Blocks while another process holds the lock: a reconciler
    /// tearing down the network a dead owner left (short), or a second owner of the
    /// same id (until it exits). Call it before `NetworkManager::setup`.
    pub fn acquire(&self, sandbox_id: &str) -> Result<LivenessGuard> {
        loop {
            if let Some(guard) = self.lock(sandbox_id, true)? {
                return Ok(guard);
            }
        }
    }

    /// Like [`Self::acquire`], but `Ok(None)` at once when another process holds
    /// the lock.
    pub fn try_acquire(&self, sandbox_id: &str) -> Result<Option<LivenessGuard>> {
        self.lock(sandbox_id, false)
    }

    /// If no process owns `sandbox_id`, take its lock and return the guard (hold it
    /// while tearing the sandbox's network down); `None` while it is alive.
    pub fn claim_if_dead(&self, sandbox_id: &str) -> Result<Option<LivenessGuard>> {
        self.lock(sandbox_id, false)
    }

    /// Whether some process owns `sandbox_id` right now.
    pub fn is_alive(&self, sandbox_id: &str) -> Result<bool> {
        Ok(self.lock(sandbox_id, false)?.is_none())
    }

    /// Take the lock, waiting or not. `Ok(None)`: held elsewhere (only when not
    /// waiting).
    fn lock(&self, sandbox_id: &str, wait: bool) -> Result<Option<LivenessGuard>> {
        naming::validate_sandbox_id(sandbox_id)?;
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let path = self.lock_path(sandbox_id);
        let arg = if wait {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockExclusiveNonblock
        };
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(io_err(&path))?;
            let lock = match Flock::lock(file, arg) {
                Ok(lock) => lock,
                Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
                Err((_, Errno::EINTR)) => continue,
                Err((_, errno)) => return Err(io_err(&path)(errno.into())),
            };
            // The previous holder unlinks the file just before it lets go: if
            // `path` no longer names the file we locked, start over on the new one.
            let ours = lock.metadata().map_err(io_err(&path))?;
            match std::fs::metadata(&path) {
                Ok(now) if same_file(&ours, &now) => {
                    return Ok(Some(LivenessGuard {
                        lock,
                        path,
                        sandbox_id: sandbox_id.to_string(),
                    }))
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
    }
}

impl LivenessGuard {
    pub fn sandbox_id(&self) -> &str {
        &self.sandbox_id
    }

    /// The lock file this guard holds.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LivenessGuard {
    fn drop(&mut self) {
        // Remove the file while still holding the lock (the lock itself goes when
        // `self.lock` is dropped right after), and only if it is still ours.
        if let (Ok(ours), Ok(now)) = (self.lock.metadata(), std::fs::metadata(&self.path)) {
            if same_file(&ours, &now) {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_alive_and_a_released_one_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let live = SandboxLiveness::new(dir.path().join("run/sandboxes"));
        assert!(!live.is_alive("sb").unwrap(), "never started");
        let guard = live.acquire("sb").unwrap();
        assert!(guard.path().exists());
        assert!(live.is_alive("sb").unwrap());
        assert!(live.try_acquire("sb").unwrap().is_none());
        assert!(live.claim_if_dead("sb").unwrap().is_none());
        assert!(matches!(live.probe("sb").unwrap(), Liveness::Alive));
        let path = guard.path().to_path_buf();
        drop(guard);
        assert!(!path.exists(), "the owner removes its file");
        assert!(!live.is_alive("sb").unwrap());
        assert!(!path.exists(), "a probe leaves nothing behind");

        // A claim keeps a new owner out until the claim is dropped.
        let claim = live.claim_if_dead("sb").unwrap().expect("nobody owns sb");
        assert!(live.try_acquire("sb").unwrap().is_none());
        let waiter = {
            let live = live.clone();
            std::thread::spawn(move || live.acquire("sb").unwrap())
        };
        drop(claim);
        let owner = waiter.join().unwrap();
        assert!(owner.path().exists(), "the waiter owns the new file");
        assert!(live.is_alive("sb").unwrap());
    }

    #[test]
    fn distinct_ids_have_distinct_locks() {
        let dir = tempfile::tempdir().unwrap();
        let live = SandboxLiveness::new(dir.path());
        let _a = live.acquire("a/b").unwrap();
        assert!(!live.is_alive("a_b").unwrap());
        assert!(live.is_alive("a/b").unwrap());
        assert!(live.acquire("").is_err());
    }
}
