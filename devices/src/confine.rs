//! How a device's own threads get confined. The block device's I/O thread
//! and the vhost-user backend's thread start when their device is made, on
//! whatever thread the VMM builds the VM, before any confinement; each calls
//! the [`ThreadHook`] it was handed as its first step, naming its
//! [`WorkerThread`] kind. The VMM's hook applies that kind's seccomp
//! allowlist, Landlock and capability drop (`beacon_vmm::seccomp`).
//!
//! This module only carries the hook; it never decides what a thread may do.

use std::fmt;
use std::sync::Arc;

/// The kinds of thread a device starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerThread {
    /// virtio-blk's I/O thread: reads, writes, flushes and discards on the
    /// disk file it holds.
    BlockIo,
    /// virtio-fs's vhost-user thread: messages to and from the backend on
    /// its connected socket.
    VhostUser,
}

/// A callback a device's thread runs first thing (see the module doc).
#[derive(Clone)]
pub struct ThreadHook(Arc<dyn Fn(WorkerThread) + Send + Sync>);

impl ThreadHook {
    pub fn new(f: impl Fn(WorkerThread) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Run the hook for a thread of `kind` (on that thread).
    pub fn run(&self, kind: WorkerThread) {
        (self.0)(kind)
    }
}

/// Run `hook`, if any, for the calling thread of `kind`.
pub fn run_hook(hook: Option<&ThreadHook>, kind: WorkerThread) {
    if let Some(h) = hook {
        h.run(kind);
    }
}

impl fmt::Debug for ThreadHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ThreadHook")
    }
}

/// Hooks compare by identity (configs that hold one stay comparable).
impl PartialEq for ThreadHook {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ThreadHook {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn the_hook_runs_on_the_thread_with_its_kind() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let hook = ThreadHook::new(move |k| {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((k, std::thread::current().id()))
        });
        let id = std::thread::spawn({
            let hook = hook.clone();
            move || {
                run_hook(Some(&hook), WorkerThread::BlockIo);
                std::thread::current().id()
            }
        })
        .join()
        .expect("thread");
        run_hook(None, WorkerThread::VhostUser);
        assert_eq!(
            *seen.lock().unwrap_or_else(|p| p.into_inner()),
            vec![(WorkerThread::BlockIo, id)]
        );
        assert_eq!(hook, hook.clone());
        assert_ne!(hook, ThreadHook::new(|_| {}));
    }
}
