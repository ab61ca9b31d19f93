//! The one long-lived thread that spawns every child that must die with this
//! process: each virtiofsd, and QEMU for the QEMU backend.
//!
//! They are started with `PR_SET_PDEATHSIG`, so they die with their parent. Linux
//! sends that signal when the *thread* that forked the child exits, not the
//! process: a child spawned from a short-lived thread (a request handler, a
//! tokio blocking task) would be killed as soon as that thread ends, taking the
//! guest's filesystem (or the whole VM) with it. So every spawn is handed to one
//! thread, `virtiofsd-launcher`, that is started on first use and never exits;
//! the children it forks then die only with the process.
//!
//! This module owns that thread and the hand-off to it. It never waits for,
//! signals or reaps a child: that is [`crate::Virtiofsd`]'s job.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Mutex, OnceLock};

/// One spawn request: the command and where to send the result.
struct Request {
    command: Command,
    reply: SyncSender<io::Result<Child>>,
}

/// The process-wide spawner (its sender; the thread holds the receiver).
static LAUNCHER: OnceLock<Result<Mutex<Sender<Request>>, String>> = OnceLock::new();

fn serve(requests: Receiver<Request>) {
    // The sender lives in a static and is never dropped, so this loop (and with
    // it the parent thread of every virtiofsd) only ends with the process.
    for mut request in requests {
        let spawned = request.command.spawn();
        // Nobody waits for it any more (the requesting thread died): end it.
        if let Err(mpsc::SendError(Ok(mut orphan))) = request.reply.send(spawned) {
            let _ = orphan.kill();
            let _ = orphan.wait();
        }
    }
}

fn launcher() -> io::Result<&'static Mutex<Sender<Request>>> {
    LAUNCHER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel();
            std::thread::Builder::new()
                .name("virtiofsd-launcher".into())
                .spawn(move || serve(rx))
                .map(|_| Mutex::new(tx))
                .map_err(|e| format!("cannot start the virtiofsd launcher thread: {e}"))
        })
        .as_ref()
        .map_err(|e| io::Error::other(e.clone()))
}

/// Make `command` die with this process: `PR_SET_PDEATHSIG` (SIGKILL) in the
/// child, and exit at once if the parent already died before that took effect.
pub(crate) fn die_with_parent(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: runs in the forked child before exec; prctl(2), getppid(2) and
    // _exit(2) are async-signal-safe and the closure touches no parent memory
    // (it captures a plain integer).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Spawn `command` on the launcher thread (with [`die_with_parent`] applied) and
/// return the child. Blocks only for the fork and exec.
pub fn spawn(mut command: Command) -> io::Result<Child> {
    die_with_parent(&mut command);
    let (reply, result) = mpsc::sync_channel(1);
    lock(launcher()?)
        .send(Request { command, reply })
        .map_err(|_| io::Error::other("the virtiofsd launcher thread is gone"))?;
    result
        .recv()
        .map_err(|_| io::Error::other("the virtiofsd launcher thread dropped the request"))?
}

/// A poisoned lock only means another thread panicked while sending; the sender
/// itself is still fine.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
