use std::sync::{Arc, Mutex};

use super::*;
use crate::virtio::testing::{DriverQueue, Harness, DESC_F_NEXT, DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

const BUF: u64 = 0x40_0000;

fn ready() -> (Harness, DriverQueue) {
    let mut h = Harness::new(Arc::new(Mutex::new(Rng::new())), 16);
    let q = DriverQueue::new(0x10_0000, 16);
    assert_eq!(
        h.bring_up(VIRTIO_RING_F_EVENT_IDX, std::slice::from_ref(&q)),
        0xf
    );
    (h, q)
}

#[test]
fn fills_writable_buffers_with_randomness() {
    let (mut h, mut q) = ready();
    let head = q.add_chain(&h.mem, &[(BUF, 64, true), (BUF + 4096, 64, true)]);
    h.notify(0);
    assert_eq!(q.take_used(&h.mem), vec![(u32::from(head), 128)]);
    let mut bytes = [0u8; 64];
    h.mem
        .memory()
        .read_slice(&mut bytes, GuestAddress(BUF))
        .expect("read");
    assert!(bytes.iter().any(|b| *b != 0), "random bytes were written");
    assert!(h.irq.read().expect("interrupt") >= 1);
}

#[test]
fn large_requests_are_capped() {
    let (mut h, mut q) = ready();
    q.add_chain(&h.mem, &[(BUF, 1 << 20, true)]);
    h.notify(0);
    let used = q.take_used(&h.mem);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1 as usize, MAX_BYTES_PER_REQUEST);
}

#[test]
fn read_only_and_out_of_memory_buffers_get_nothing() {
    let (mut h, mut q) = ready();
    q.add_chain(&h.mem, &[(BUF, 64, false)]);
    q.add_chain(&h.mem, &[(1 << 40, 64, true)]);
    q.add_chain(&h.mem, &[((16 << 20) - 8, 64, true)]);
    h.notify(0);
    let used = q.take_used(&h.mem);
    assert_eq!(used.len(), 3);
    assert_eq!(used[0].1, 0, "a device-readable buffer is not written");
    assert_eq!(used[1].1, 0, "a buffer outside memory is dropped");
    assert_eq!(
        used[2].1, 0,
        "a buffer crossing the end of memory is dropped"
    );
}

#[test]
fn looping_chains_and_wild_indexes_do_not_hang() {
    let (mut h, mut q) = ready();
    // Descriptor 0 points to itself.
    q.write_desc(&h.mem, 0, BUF, 16, DESC_F_WRITE | DESC_F_NEXT, 0);
    q.publish(&h.mem, 0);
    // Descriptors 1 and 2 point to each other.
    q.write_desc(&h.mem, 1, BUF, 16, DESC_F_WRITE | DESC_F_NEXT, 2);
    q.write_desc(&h.mem, 2, BUF, 16, DESC_F_WRITE | DESC_F_NEXT, 1);
    q.publish(&h.mem, 1);
    // A head index beyond the table.
    q.publish(&h.mem, 999);
    h.notify(0);
    let used = q.take_used(&h.mem);
    assert!(used.len() <= 3, "{used:?}");
    // An available index far ahead of what was published.
    q.set_avail_idx(&h.mem, 40_000);
    h.notify(0);
    h.notify(0);
    // The device is still alive after a reset.
    h.write32(0x70, 0);
    let mut fresh = DriverQueue::new(0x20_0000, 16);
    assert_eq!(h.bring_up(0, std::slice::from_ref(&fresh)), 0xf);
    fresh.add_chain(&h.mem, &[(BUF, 32, true)]);
    h.notify(0);
    assert_eq!(fresh.take_used(&h.mem), vec![(0, 32)]);
}

#[test]
fn a_full_queue_is_served_in_budgeted_rounds() {
    let (mut h, mut q) = ready();
    for i in 0..16 {
        q.add_chain(&h.mem, &[(BUF + i * 64, 64, true)]);
    }
    h.notify(0);
    assert_eq!(q.take_used(&h.mem).len(), 16);
}
