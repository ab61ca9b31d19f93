//! The shared vsock pieces: config space and the event queue.

use super::*;
use crate::virtio::testing::{guest_memory, DriverQueue};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

#[test]
fn config_space_is_the_guest_cid_and_zeros_beyond() {
    let mut b = [0xffu8; 8];
    read_config(0x0102_0304_0506_0708, 0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x0102_0304_0506_0708);
    let mut b = [0xffu8; 4];
    read_config(0x0102_0304_0506_0708, 4, &mut b);
    assert_eq!(b, [4, 3, 2, 1]);
    let mut b = [0xffu8; 4];
    read_config(3, 6, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
    read_config(3, u64::MAX, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
}

#[test]
fn transport_reset_waits_for_a_buffer_and_is_delivered_once() {
    let mem = guest_memory(4);
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let interrupt = Interrupt::new(irq.try_clone().expect("dup"));
    let mut dq = DriverQueue::new(0x1_0000, 8);
    let mut q = Queue::new(8).expect("queue");
    q.set_size(8);
    q.set_desc_table_address(Some(dq.desc as u32), Some(0));
    q.set_avail_ring_address(Some(dq.avail as u32), Some(0));
    q.set_used_ring_address(Some(dq.used as u32), Some(0));
    q.set_ready(true);
    let mut events = EventQueue::new(q);
    events.transport_reset(&mem, &interrupt);
    assert!(events.reset_pending(), "no buffer yet");
    mem.memory()
        .write_obj(0xffff_ffffu32, GuestAddress(0x8_0000))
        .expect("write");
    dq.add_chain(&mem, &[(0x8_0000, 8, true)]);
    dq.add_chain(&mem, &[(0x9_0000, 8, true)]);
    events.deliver(&mem, &interrupt);
    assert!(!events.reset_pending());
    assert_eq!(dq.take_used(&mem), vec![(0, 4)]);
    let id: u32 = mem.memory().read_obj(GuestAddress(0x8_0000)).expect("read");
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    assert!(irq.read().expect("interrupt") >= 1);
    // Nothing more to say: the second buffer stays with the device.
    events.deliver(&mem, &interrupt);
    assert!(dq.take_used(&mem).is_empty());
}

#[test]
fn a_read_only_event_buffer_is_returned_empty() {
    let mem = guest_memory(4);
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let interrupt = Interrupt::new(irq);
    let mut dq = DriverQueue::new(0x1_0000, 8);
    let mut q = Queue::new(8).expect("queue");
    q.set_size(8);
    q.set_desc_table_address(Some(dq.desc as u32), Some(0));
    q.set_avail_ring_address(Some(dq.avail as u32), Some(0));
    q.set_used_ring_address(Some(dq.used as u32), Some(0));
    q.set_ready(true);
    let mut events = EventQueue::new(q);
    dq.add_chain(&mem, &[(0x8_0000, 8, false)]);
    events.transport_reset(&mem, &interrupt);
    assert_eq!(dq.take_used(&mem), vec![(0, 0)]);
    assert!(events.reset_pending(), "still owed");
}
