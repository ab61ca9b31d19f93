//! The pause image's program (`/pause`): what Kubernetes' pause does. As a pod
//! sandbox's first process it holds the pod's namespaces open: it sleeps in
//! `pause()` until SIGINT or SIGTERM, on which it exits 0, and reaps every child
//! that ends (SIGCHLD), as a PID 1 must.
//!
//! Built by `tests/src/images.rs` with plain `rustc` (static, no crates), so it
//! declares the few libc functions it needs itself.

use std::ffi::c_int;

const SIGINT: c_int = 2;
const SIGTERM: c_int = 15;
const SIGCHLD: c_int = 17;
const WNOHANG: c_int = 1;
/// `signal()`'s error return.
const SIG_ERR: usize = usize::MAX;

type Handler = extern "C" fn(c_int);

unsafe extern "C" {
    /// glibc's `signal()` installs the handler with BSD semantics (kept after
    /// delivery, interrupted system calls restarted).
    fn signal(signum: c_int, handler: Handler) -> usize;
    fn pause() -> c_int;
    fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
    fn _exit(status: c_int) -> !;
}

/// SIGINT and SIGTERM: a clean shutdown.
extern "C" fn on_shutdown(_signum: c_int) {
    // SAFETY: `_exit` is async-signal-safe and ends the process at once.
    unsafe { _exit(0) }
}

/// SIGCHLD: reap every child that has ended (several may share one signal).
extern "C" fn on_child(_signum: c_int) {
    loop {
        let mut status: c_int = 0;
        // SAFETY: `waitpid` is async-signal-safe; `status` is a valid, writable
        // int on this stack frame for the duration of the call.
        let pid = unsafe { waitpid(-1, &mut status, WNOHANG) };
        if pid <= 0 {
            break;
        }
    }
}

fn install(signum: c_int, handler: Handler) {
    // SAFETY: the handlers only call async-signal-safe functions (`_exit`,
    // `waitpid`) and touch no shared state.
    if unsafe { signal(signum, handler) } == SIG_ERR {
        eprintln!("pause: cannot install the handler for signal {signum}");
        std::process::exit(1);
    }
}

fn main() {
    install(SIGINT, on_shutdown);
    install(SIGTERM, on_shutdown);
    install(SIGCHLD, on_child);
    loop {
        // SAFETY: `pause` has no preconditions; it returns after a handled signal.
        unsafe { pause() };
    }
}
