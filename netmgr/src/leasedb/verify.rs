//! Opening an untrusted database file where a crash cannot take us down: in a
//! short-lived child process.
//!
//! redb can panic (or worse) on some corrupted files, and release builds are built
//! with `panic = "abort"`, so a `catch_unwind` around the open would never run.
//! Instead the check runs in a `fork`ed child that leaves with `_exit`: `Ok` exits
//! 0, an error comes back as [`EXIT_REFUSED`] with its text on a pipe, a panic as
//! [`EXIT_PANICKED`] (unwinding builds) or death by SIGABRT (aborting builds), and
//! any other crash signal (segfault, failed allocation) likewise. The child's
//! standard error is the same pipe, so the panic message comes back too. Whatever
//! the build's panic strategy, the caller gets a result, never a dead process.
//!
//! What the child may touch: it is a copy of a possibly multi-threaded parent, so
//! it runs only the check, takes no lock another thread might have held at the
//! fork (glibc resets its allocator locks in the child; redb keeps no global
//! state; nothing is logged; the process-wide panic hook is left alone, because
//! replacing it takes a lock a concurrently panicking thread holds), dumps no
//! core, and ends with `_exit`, so no destructor or `atexit` handler of the
//! parent runs twice. One wait remains possible: a panic in the check while
//! another thread of the parent was itself mid-panic at the fork can block on the
//! panic machinery's lock; [`CHILD_DEADLINE`] ends such a child and the caller
//! gets a plain error, not a verdict on the file.
//!
//! Never: run anything in the child beyond the given check, or exit it any other
//! way than `_exit`.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

/// The check succeeded.
const EXIT_OK: i32 = 0;
/// The check returned an error; its text follows on the pipe.
pub(super) const EXIT_REFUSED: i32 = 3;
/// The check panicked; the panic message follows on the pipe.
pub(super) const EXIT_PANICKED: i32 = 4;
/// Longest message taken from the child.
const MAX_MESSAGE: usize = 16 << 10;
/// Far above the time a real check needs (tens of milliseconds); it only keeps a
/// wedged child from hanging the caller for ever.
pub(super) const CHILD_DEADLINE: Duration = Duration::from_secs(120);

/// How the child's check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The check returned `Ok`.
    Passed,
    /// The check returned `Err(text)`.
    Refused(String),
    /// The check panicked (message) or was killed by a crash signal.
    Crashed(String),
    /// The child could not run or ended unexpectedly (not the file's fault).
    Failed(String),
}

/// Run `check` in a forked child and report how it ended. `check` returns `Err`
/// with a text for the caller; it runs only in the child.
pub(super) fn in_child(check: impl FnOnce() -> Result<(), String>) -> Outcome {
    let (read_end, write_end) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(format!("cannot create a pipe: {e}")),
    };
    // SAFETY: the child runs only `child_main`: it opens and closes one file, takes
    // no lock another thread of ours could hold (glibc resets its allocator locks
    // in the child; redb has no global state; nothing is logged) and leaves with
    // `_exit`, so nothing of ours is torn down twice.
    match unsafe { fork() } {
        Err(e) => Outcome::Failed(format!("cannot fork: {e}")),
        Ok(ForkResult::Child) => {
            drop(read_end);
            child_main(write_end, check)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(write_end);
            wait_for(child, read_end)
        }
    }
}

fn write_all_raw(fd: i32, mut bytes: &[u8]) {
    bytes = &bytes[..bytes.len().min(MAX_MESSAGE)];
    while !bytes.is_empty() {
        // SAFETY: `bytes` is a valid slice for the whole call; `fd` is the pipe's
        // write end, open for the child's lifetime.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        bytes = &bytes[n.unsigned_abs()..];
    }
}

fn child_main(pipe: OwnedFd, check: impl FnOnce() -> Result<(), String>) -> ! {
    let fd = pipe.as_raw_fd();
    // SAFETY: dup2 and setrlimit are plain system calls on valid arguments (`fd`
    // is open; `no_core` outlives its call).
    unsafe {
        // The panic message of an aborting build goes to stderr: make that the pipe.
        libc::dup2(fd, libc::STDERR_FILENO);
        // A crash here must not dump a core of (a copy of) the whole parent.
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
    }
    let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)) {
        Ok(Ok(())) => EXIT_OK,
        Ok(Err(text)) => {
            write_all_raw(fd, text.as_bytes());
            EXIT_REFUSED
        }
        Err(payload) => {
            let text = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            write_all_raw(fd, text.as_bytes());
            EXIT_PANICKED
        }
    };
    // SAFETY: _exit ends the process at once; the child never returns into the
    // parent's code and runs none of its destructors or atexit handlers.
    unsafe { libc::_exit(code) }
}

/// Read the child's message until it closes the pipe (it exits), bounded by
/// [`CHILD_DEADLINE`], then reap it.
fn wait_for(child: Pid, pipe: OwnedFd) -> Outcome {
    let deadline = Instant::now() + CHILD_DEADLINE;
    let mut message = Vec::new();
    let mut file = std::fs::File::from(pipe);
    let mut buf = [0u8; 4096];
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            timed_out = true;
            break;
        }
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: one valid pollfd that outlives the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if ready == 0 {
            continue;
        }
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if message.len() < MAX_MESSAGE {
                    message.extend_from_slice(&buf[..n]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if timed_out {
        let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
    }
    let status = loop {
        match waitpid(child, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    let text = String::from_utf8_lossy(&message).trim().to_string();
    if timed_out {
        return Outcome::Failed(format!(
            "the check did not finish within {} s and was stopped",
            CHILD_DEADLINE.as_secs()
        ));
    }
    match status {
        Ok(WaitStatus::Exited(_, EXIT_OK)) => Outcome::Passed,
        Ok(WaitStatus::Exited(_, EXIT_REFUSED)) => Outcome::Refused(text),
        Ok(WaitStatus::Exited(_, EXIT_PANICKED)) => Outcome::Crashed(format!("panic: {text}")),
        Ok(WaitStatus::Signaled(_, sig, _)) if is_crash(sig) => {
            if text.is_empty() {
                Outcome::Crashed(format!("killed by {sig}"))
            } else {
                Outcome::Crashed(format!("killed by {sig}: {text}"))
            }
        }
        Ok(other) => Outcome::Failed(format!("the checking process ended with {other:?}")),
        Err(e) => Outcome::Failed(format!("cannot reap the checking process: {e}")),
    }
}

/// Signals a process gets from its own fault rather than from outside.
fn is_crash(sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGABRT | Signal::SIGSEGV | Signal::SIGBUS | Signal::SIGILL | Signal::SIGFPE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ending_of_the_check_is_reported() {
        assert_eq!(in_child(|| Ok(())), Outcome::Passed);
        assert_eq!(
            in_child(|| Err("no good".into())),
            Outcome::Refused("no good".into())
        );
        match in_child(|| panic!("index out of bounds: the len is 3")) {
            Outcome::Crashed(m) => assert!(m.contains("the len is 3"), "{m}"),
            other => panic!("{other:?}"),
        }
        // What a `panic = "abort"` build does on a panic: print, then abort.
        match in_child(|| {
            // Straight to fd 2, as the default panic hook writes (eprintln! would
            // go to the test harness's capture).
            let _ = std::io::Write::write_all(&mut std::io::stderr(), b"panicked: boom");
            std::process::abort()
        }) {
            Outcome::Crashed(m) => {
                assert!(
                    m.starts_with("killed by SIGABRT") && m.contains("boom"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Not the file's fault: someone else killed the checker.
        match in_child(|| {
            let _ = nix::sys::signal::raise(Signal::SIGKILL);
            Ok(())
        }) {
            Outcome::Failed(m) => assert!(m.contains("SIGKILL"), "{m}"),
            other => panic!("{other:?}"),
        }
        // The parent is untouched: its own panic hook still runs here.
        assert!(std::panic::catch_unwind(|| panic!("parent")).is_err());
    }
}
