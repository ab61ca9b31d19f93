//! Per-sandbox network namespaces for CNI mode: a namespace is created by a
//! short-lived thread that unshares its network namespace and bind-mounts it onto a
//! file (as `ip netns add` does), removed by unmounting that file, and entered by a
//! dedicated thread that `setns`es into it and runs its own current-thread runtime,
//! so the caller's threads never change namespace.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::error::{NetError, Result};

fn ns_err(path: &Path, detail: impl std::fmt::Display) -> NetError {
    NetError::Netns {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// Whether `path` is a mounted namespace file.
pub fn is_mounted(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// Create a new network namespace pinned at `path` (idempotent).
pub fn create(path: &Path) -> Result<()> {
    if is_mounted(path) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| ns_err(dir, e))?;
    }
    File::create(path).map_err(|e| ns_err(path, e))?;
    let target: PathBuf = path.to_path_buf();
    let made = std::thread::spawn(move || -> std::result::Result<(), String> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare: {e}"))?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("bind mount: {e}"))
    })
    .join()
    .map_err(|_| ns_err(path, "namespace thread panicked"))?;
    made.map_err(|e| {
        let _ = std::fs::remove_file(path);
        ns_err(path, e)
    })
}

/// Unmount and delete the namespace file; a missing one is fine.
pub fn remove(path: &Path) -> Result<()> {
    if is_mounted(path) {
        umount2(path, MntFlags::MNT_DETACH).map_err(|e| ns_err(path, format!("umount: {e}")))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ns_err(path, e)),
    }
}

/// Run the future built by `f` inside the namespace at `path`, on a dedicated thread.
pub fn run_in<F, Fut, T>(path: &Path, f: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
    T: Send + 'static,
{
    let file = File::open(path).map_err(|e| ns_err(path, e))?;
    let shown = path.to_path_buf();
    std::thread::spawn(move || -> Result<T> {
        setns(&file, CloneFlags::CLONE_NEWNET)
            .map_err(|e| ns_err(&shown, format!("setns: {e}")))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ns_err(&shown, format!("runtime: {e}")))?;
        rt.block_on(f())
    })
    .join()
    .map_err(|_| ns_err(path, "namespace thread panicked"))?
}
