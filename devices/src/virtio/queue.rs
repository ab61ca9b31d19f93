//! Serving a virtqueue's available chains, bounded and safe against a hostile
//! ring.
//!
//! [`serve_queue`] is the one loop every userspace device uses: pop a chain, let
//! the device fill or consume it, return it to the used ring, re-arm
//! notifications, and tell the driver. It serves at most a budget of chains per
//! call (the caller re-schedules itself when [`Served::more_pending`] says so, so
//! one busy queue cannot monopolise the event loop), and it stops when the ring
//! claims entries it cannot deliver (an available index that ran ahead of what
//! the driver published), instead of spinning on it; an index that moved
//! between the last pop and the re-arm (the guest published concurrently) is
//! a race, served in another round, not a broken ring.
//!
//! Devices whose requests finish elsewhere (a block device's I/O thread) take a
//! chain with [`ChainOutcome::Deferred`] and hand it back later, from the event
//! loop, with [`return_used`].

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use super::device::Interrupt;
use crate::throttle::Throttle;

/// What the device did with one chain.
pub enum ChainOutcome {
    /// Done: return it to the driver with `len` bytes written into it.
    Used(u32),
    /// Not now (e.g. no packet to receive yet): leave it, and every chain after
    /// it, in the available ring for a later call.
    Later,
    /// Taken: the device finishes it elsewhere and returns it with
    /// [`return_used`] (it counts against the budget like a used chain).
    Deferred,
}

/// What a call of [`serve_queue`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Chains returned to the used ring.
    pub used: usize,
    /// The budget ran out with chains still waiting: call again soon.
    pub more_pending: bool,
    /// The ring is inconsistent (it could not deliver what its index claims);
    /// the device should stop touching it until the driver resets.
    pub broken: bool,
}

/// Rounds that found nothing to pop although the re-arm saw new chains, before
/// the ring is taken as broken (a race resolves in one).
const MAX_EMPTY_RETRIES: usize = 4;

/// Whether the available index is within a ring's size of where we are: if
/// not, no pop can ever succeed.
fn index_plausible<G: GuestMemory>(queue: &Queue, mem: &G) -> bool {
    queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .is_ok_and(|idx| idx.0.wrapping_sub(queue.next_avail()) <= queue.size())
}

/// Serve up to `budget` chains from `queue` with `serve`, then signal the driver
/// through `interrupt` if it asked to be told.
pub fn serve_queue<'m, G: GuestMemory>(
    queue: &mut Queue,
    mem: &'m G,
    budget: usize,
    interrupt: &Interrupt,
    complaints: &mut Throttle,
    mut serve: impl FnMut(DescriptorChain<&'m G>) -> ChainOutcome,
) -> Served {
    let mut out = Served::default();
    let mut left = budget.max(1);
    let mut empty_retries = 0;
    'rounds: loop {
        let mut popped = 0usize;
        while left > 0 {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            popped += 1;
            let head = chain.head_index();
            match serve(chain) {
                ChainOutcome::Used(len) => {
                    left -= 1;
                    if let Err(e) = queue.add_used(mem, head, len) {
                        if let Some(suppressed) = complaints.allow() {
                            tracing::warn!(suppressed, "virtqueue: cannot return a buffer: {e}");
                        }
                        out.broken = true;
                        break 'rounds;
                    }
                    out.used += 1;
                }
                ChainOutcome::Deferred => left -= 1,
                ChainOutcome::Later => {
                    queue.go_to_previous_position();
                    break 'rounds;
                }
            }
        }
        if left == 0 {
            out.more_pending = true;
            break;
        }
        // Re-arm notifications; chains that raced in are served in another round.
        match queue.enable_notification(mem) {
            Ok(true) if popped > 0 => continue,
            // Nothing was popped, yet the index moved: the driver published
            // between our last pop and the re-arm (a vCPU runs concurrently),
            // unless the index claims more than the ring holds.
            Ok(true) if empty_retries < MAX_EMPTY_RETRIES && index_plausible(queue, mem) => {
                empty_retries += 1;
                continue;
            }
            Ok(true) => {
                if let Some(suppressed) = complaints.allow() {
                    tracing::warn!(
                        suppressed,
                        "virtqueue: the available index claims chains that cannot be read; ignoring the queue until the driver resets it"
                    );
                }
                out.broken = true;
                break;
            }
            Ok(false) => break,
            Err(e) => {
                if let Some(suppressed) = complaints.allow() {
                    tracing::warn!(suppressed, "virtqueue: cannot re-arm notifications: {e}");
                }
                out.broken = true;
                break;
            }
        }
    }
    if out.used > 0 {
        notify_used(queue, mem, interrupt);
    }
    out
}

/// Tell the driver about new used entries if it asked to be told (EVENT_IDX);
/// when the ring cannot say, tell it anyway.
fn notify_used<G: GuestMemory>(queue: &mut Queue, mem: &G, interrupt: &Interrupt) {
    match queue.needs_notification(mem) {
        Ok(false) => {}
        Ok(true) | Err(_) => interrupt.signal_used_queue(),
    }
}

/// Return chains taken with [`ChainOutcome::Deferred`] to the used ring:
/// `(head index, bytes written)` each, then signal the driver once if it asked.
/// Returns how many were returned; an error when the used ring cannot be written
/// (the device should then stop touching the queue until the driver resets).
pub fn return_used<G: GuestMemory>(
    queue: &mut Queue,
    mem: &G,
    done: impl IntoIterator<Item = (u16, u32)>,
    interrupt: &Interrupt,
    complaints: &mut Throttle,
) -> Result<usize, virtio_queue::Error> {
    let mut used = 0usize;
    let mut result = Ok(());
    for (head, len) in done {
        if let Err(e) = queue.add_used(mem, head, len) {
            if let Some(suppressed) = complaints.allow() {
                tracing::warn!(suppressed, "virtqueue: cannot return a buffer: {e}");
            }
            result = Err(e);
            break;
        }
        used += 1;
    }
    if used > 0 {
        notify_used(queue, mem, interrupt);
    }
    result.map(|()| used)
}
