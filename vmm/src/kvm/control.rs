//! Coordination between the vCPU threads and whoever drives the VM: stop,
//! pause/resume, the recorded exit reason, and kicking vCPUs out of `KVM_RUN`.
//!
//! A vCPU blocked in `KVM_RUN` (a halted guest CPU waits there) only returns when
//! interrupted, so stopping or pausing sets a flag and then sends each vCPU
//! thread a real-time signal whose handler does nothing: the ioctl fails with
//! EINTR and the thread sees the flag. A signal landing just before the thread
//! enters `KVM_RUN` would be lost, so waiters repeat the kick every few
//! milliseconds until every thread has answered.
//!
//! Thread ids are only signalled while their thread has not finished, under the
//! same lock that marks them finished, and threads are joined only after all have
//! finished: a `pthread_t` is never used after its thread was joined.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use std::time::{Duration, Instant};

use crate::backend::VmExit;

/// How often waiters repeat the kick while vCPUs have not answered.
const KICK_INTERVAL: Duration = Duration::from_millis(5);

/// The signal used to kick vCPUs (the first real-time signal glibc leaves free).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_signal: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Nothing to do: being interrupted is the whole point.
}

/// Install the (empty) kick handler once per process. Every call reports the
/// outcome of the one installation.
pub fn install_kick_handler() -> Result<(), std::io::Error> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let outcome = INSTALLED.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno())
    });
    outcome.map_err(std::io::Error::from_raw_os_error)
}

struct Thread {
    id: libc::pthread_t,
    finished: bool,
}

#[derive(Default)]
struct State {
    paused: bool,
    parked: usize,
    finished: usize,
    exit: Option<VmExit>,
    threads: Vec<Thread>,
    /// Threads that finished before their spawner registered them (a vCPU that
    /// sees the stop flag at once can beat `register_thread`).
    finished_unregistered: Vec<libc::pthread_t>,
}

/// Shared by the VM handle and all its vCPU threads.
pub struct VcpuControl {
    stop: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self::new()
    }
}

impl VcpuControl {
    pub fn new() -> Self {
        Self {
            stop: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain data that stays consistent at every unlock.
        beacon_common::lock(&self.state)
    }

    /// Remember a spawned vCPU thread so it can be kicked.
    pub fn register_thread(&self, id: libc::pthread_t) {
        let mut state = self.lock();
        let finished = match state.finished_unregistered.iter().position(|t| *t == id) {
            Some(i) => {
                state.finished_unregistered.swap_remove(i);
                state.finished += 1;
                true
            }
            None => false,
        };
        state.threads.push(Thread { id, finished });
        self.changed.notify_all();
    }

    /// Threads registered so far.
    pub fn thread_count(&self) -> usize {
        self.lock().threads.len()
    }

    /// True once the VM is ending.
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// End the VM with `exit` (the first reason recorded wins) and kick every vCPU.
    /// Never blocks on a vCPU, so it is safe to call from device callbacks.
    pub fn request_stop(&self, exit: VmExit) {
        let mut state = self.lock();
        if state.exit.is_none() {
            state.exit = Some(exit);
        }
        self.stop.store(true, Ordering::Release);
        Self::kick(&state);
        self.changed.notify_all();
    }

    /// The recorded exit reason, if the VM is ending.
    pub fn exit(&self) -> Option<VmExit> {
        self.lock().exit.clone()
    }

    fn kick(state: &State) {
        for thread in state.threads.iter().filter(|t| !t.finished) {
            // SAFETY: the thread has not finished, so it has not been joined and its
            // pthread_t is valid; we hold the lock that marks threads finished.
            let rc = unsafe { libc::pthread_kill(thread.id, kick_signal()) };
            if rc != 0 {
                tracing::debug!("kicking a vCPU thread failed: errno {rc}");
            }
        }
    }

    /// Called by a vCPU thread as its very last act.
    pub fn thread_finished(&self, id: libc::pthread_t) {
        let mut state = self.lock();
        if let Some(t) = state.threads.iter_mut().find(|t| t.id == id && !t.finished) {
            t.finished = true;
            state.finished += 1;
        } else {
            // Not registered yet: count it when the spawner registers it. The id
            // cannot be reused before the thread is joined, which comes later.
            state.finished_unregistered.push(id);
        }
        self.changed.notify_all();
    }

    /// Block until every registered thread has finished, kicking them while the VM
    /// is stopping. Callers then join the threads.
    pub fn wait_all_finished(&self) {
        let mut state = self.lock();
        while state.finished < state.threads.len() {
            if self.should_stop() {
                Self::kick(&state);
            }
            state = self
                .changed
                .wait_timeout(state, KICK_INTERVAL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Kick thread `id` until it has finished (a vCPU told to retire), for up
    /// to `timeout`; true once it has. Callers then join it.
    pub fn wait_finished(&self, id: libc::pthread_t, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            let thread = state.threads.iter().find(|t| t.id == id && !t.finished);
            let Some(thread) = thread else {
                return true;
            };
            if Instant::now() >= deadline {
                return false;
            }
            // SAFETY: the thread has not finished, so it has not been joined and
            // its pthread_t is valid; we hold the lock that marks threads finished.
            let rc = unsafe { libc::pthread_kill(thread.id, kick_signal()) };
            if rc != 0 {
                tracing::debug!("kicking a vCPU thread failed: errno {rc}");
            }
            state = self
                .changed
                .wait_timeout(state, KICK_INTERVAL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Called by a vCPU thread before each `KVM_RUN`: park here while paused.
    pub fn park_if_paused(&self) {
        let mut state = self.lock();
        if !state.paused || self.should_stop() {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.paused && !self.should_stop() {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.parked -= 1;
    }

    /// Park all vCPUs; true once all are parked (or finished) within `timeout`.
    pub fn pause(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        state.paused = true;
        loop {
            if state.parked + state.finished >= state.threads.len() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            Self::kick(&state);
            state = self
                .changed
                .wait_timeout(state, KICK_INTERVAL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Let parked vCPUs run again.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::Arc;

    /// A fake vCPU: blocks in a long sleep (standing in for KVM_RUN, which a signal
    /// interrupts the same way) and otherwise follows the real loop's protocol.
    fn spawn_fake(control: Arc<VcpuControl>) -> std::thread::JoinHandle<u32> {
        let c = control.clone();
        let handle = std::thread::spawn(move || {
            let mut rounds = 0;
            while !c.should_stop() {
                c.park_if_paused();
                rounds += 1;
                // nanosleep returns early with EINTR when kicked.
                // SAFETY: plain libc call with a valid timespec.
                unsafe {
                    let ts = libc::timespec {
                        tv_sec: 30,
                        tv_nsec: 0,
                    };
                    libc::nanosleep(&ts, std::ptr::null_mut());
                }
            }
            // SAFETY: pthread_self has no preconditions.
            c.thread_finished(unsafe { libc::pthread_self() });
            rounds
        });
        control.register_thread(handle.as_pthread_t());
        handle
    }

    #[test]
    fn stop_kicks_blocked_threads_and_first_reason_wins() {
        install_kick_handler().expect("handler");
        let control = Arc::new(VcpuControl::new());
        let handles: Vec<_> = (0..3).map(|_| spawn_fake(control.clone())).collect();
        std::thread::sleep(Duration::from_millis(20));
        let started = Instant::now();
        control.request_stop(VmExit::Reboot);
        control.request_stop(VmExit::Crashed("later".into()));
        control.wait_all_finished();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "kicks ended the sleeps"
        );
        for h in handles {
            h.join().expect("join");
        }
        assert_eq!(control.exit(), Some(VmExit::Reboot));
    }

    #[test]
    fn a_thread_that_finishes_before_it_is_registered_is_counted() {
        let control = Arc::new(VcpuControl::new());
        let c = control.clone();
        let handle = std::thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            c.thread_finished(unsafe { libc::pthread_self() });
        });
        // Make sure the thread is done before registering it (the race, forced).
        while !handle.is_finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        control.register_thread(handle.as_pthread_t());
        let (tx, rx) = std::sync::mpsc::channel();
        let c = control.clone();
        std::thread::spawn(move || {
            c.wait_all_finished();
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(10)).is_ok(),
            "wait_all_finished hung on a thread that finished before registration"
        );
        handle.join().expect("join");
    }

    #[test]
    fn pause_parks_and_resume_releases() {
        install_kick_handler().expect("handler");
        let control = Arc::new(VcpuControl::new());
        let handles: Vec<_> = (0..2).map(|_| spawn_fake(control.clone())).collect();
        // Let both reach their "KVM_RUN" so pausing has to kick them out of it.
        std::thread::sleep(Duration::from_millis(20));
        assert!(control.pause(Duration::from_secs(10)), "all parked");
        assert_eq!(control.lock().parked, 2);
        control.resume();
        // Every parked thread leaves the park (waiting for it, not sleeping).
        let deadline = Instant::now() + Duration::from_secs(30);
        while control.lock().parked > 0 {
            assert!(Instant::now() < deadline, "vCPUs still parked after resume");
            std::thread::yield_now();
        }
        control.request_stop(VmExit::PowerOff);
        control.wait_all_finished();
        for h in handles {
            assert!(h.join().expect("join") >= 2, "ran again after resume");
        }
    }
}
