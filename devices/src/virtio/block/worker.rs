//! The block device's I/O thread: it takes validated requests from the event
//! loop through a bounded channel, executes them on the disk
//! ([`super::disk::execute`]: reads, writes, `fdatasync`), and hands back
//! completions through a channel plus an eventfd the event loop watches (the
//! device hands over at most `MAX_IN_FLIGHT` requests before collecting their
//! completions, which bounds both channels).
//!
//! Why a thread: a read that misses the page cache or an `fdatasync` can take
//! milliseconds to seconds, and the event loop serves every device of the VM;
//! it must only ever `try_send` here and drain completions, never wait.
//!
//! The thread never touches the virtqueue (the event loop owns it) and never
//! touches guest memory for a request the driver abandoned by resetting the
//! device (each request carries the activation's epoch). It ends when the
//! device drops its sender, after the request at hand.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use super::disk::{execute, DiskFile};
use super::request::Request;
use crate::confine::{run_hook, ThreadHook, WorkerThread};
use crate::throttle::Throttle;
use crate::virtio::device::GuestMem;

/// One request for the I/O thread.
pub(super) struct Job {
    pub epoch: u64,
    pub head: u16,
    pub request: Request,
    pub mem: GuestMem,
    pub writethrough: bool,
}

/// One finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Done {
    pub epoch: u64,
    pub head: u16,
    pub used_len: u32,
}

/// Why a job could not be handed over.
pub(super) enum Refused {
    /// The hand-off is full: try again after completions.
    Full,
    /// The thread is gone.
    Gone,
}

/// The event loop's end of the I/O thread.
pub(super) struct Worker {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    done_evt: EventFd,
    /// The current activation; jobs of older ones are skipped.
    epoch: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Start the thread for `disk`, accepting up to `capacity` queued jobs.
    /// The thread runs `hook` (the VMM's confinement) before its first job.
    pub fn start(
        disk: Arc<DiskFile>,
        capacity: usize,
        hook: Option<ThreadHook>,
    ) -> std::io::Result<Self> {
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(capacity);
        let (done_tx, done) = mpsc::channel::<Done>();
        let done_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let signal = done_evt.try_clone()?;
        let epoch = Arc::new(AtomicU64::new(0));
        let current = epoch.clone();
        let thread = std::thread::Builder::new()
            .name("beacon-blk-io".into())
            .spawn(move || {
                run_hook(hook.as_ref(), WorkerThread::BlockIo);
                serve(&disk, &job_rx, &done_tx, &signal, &current)
            })?;
        Ok(Self {
            jobs: Some(jobs),
            done,
            done_evt,
            epoch,
            thread: Some(thread),
        })
    }

    /// Hand `job` over without waiting.
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        let Some(jobs) = &self.jobs else {
            return Err(Refused::Gone);
        };
        match jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(Refused::Full),
            Err(TrySendError::Disconnected(_)) => Err(Refused::Gone),
        }
    }

    /// The eventfd written after each completion.
    pub fn done_evt(&self) -> &EventFd {
        &self.done_evt
    }

    /// The next finished request, if any (never waits).
    pub fn try_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }

    /// A new activation (or a reset): jobs of earlier ones are skipped.
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the channel ends the thread after the job at hand.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the virtio-blk I/O thread panicked");
            }
        }
    }
}

fn serve(
    disk: &DiskFile,
    jobs: &Receiver<Job>,
    done: &Sender<Done>,
    signal: &EventFd,
    current: &AtomicU64,
) {
    let mut failures = Throttle::default();
    while let Ok(job) = jobs.recv() {
        if job.epoch != current.load(Ordering::Acquire) {
            continue;
        }
        let mem = job.mem.memory();
        let (outcome, failure) = execute(disk, &mem, &job.request, job.writethrough);
        drop(mem);
        if let Some(e) = failure {
            if let Some(suppressed) = failures.allow() {
                tracing::warn!(
                    path = %disk.path().display(),
                    op = ?job.request.op,
                    suppressed,
                    "virtio-blk: request failed: {e}"
                );
            }
        }
        let finished = Done {
            epoch: job.epoch,
            head: job.head,
            used_len: outcome.used_len,
        };
        if done.send(finished).is_err() {
            return;
        }
        if let Err(e) = signal.write(1) {
            tracing::debug!("virtio-blk: completion eventfd write failed: {e}");
        }
    }
}
