use std::sync::{Arc, Mutex};

use super::*;
use crate::virtio::rng::Rng;
use crate::virtio::testing::{DriverQueue, Harness};
use crate::virtio::VIRTIO_RING_F_EVENT_IDX;

fn rng_harness() -> Harness {
    Harness::new(Arc::new(Mutex::new(Rng::new())), 16)
}

#[test]
fn identifies_itself() {
    let mut h = rng_harness();
    assert_eq!(h.read32(reg::MAGIC), MAGIC_VALUE);
    assert_eq!(h.read32(reg::VERSION), 2);
    assert_eq!(h.read32(reg::DEVICE_ID), 4);
    assert_eq!(h.read32(reg::VENDOR_ID), VENDOR_ID);
    assert_ne!(h.offered_features() & VIRTIO_F_VERSION_1, 0);
    h.write32(reg::QUEUE_SEL, 0);
    assert_eq!(h.read32(reg::QUEUE_NUM_MAX), 256);
    h.write32(reg::QUEUE_SEL, 1);
    assert_eq!(h.read32(reg::QUEUE_NUM_MAX), 0, "no such queue");
    assert_eq!(h.read32(reg::SHM_LEN_LOW), u32::MAX, "no shared memory");
}

#[test]
fn linux_style_bring_up_activates_the_device() {
    let mut h = rng_harness();
    let q = DriverQueue::new(0x10_0000, 64);
    let status = h.bring_up(VIRTIO_RING_F_EVENT_IDX, &[q]);
    assert_eq!(status, 0xf);
    assert!(beacon_common::lock(&h.device).is_activated());
    assert_ne!(h.transport.acked_features() & VIRTIO_RING_F_EVENT_IDX, 0);
    h.write32(reg::QUEUE_SEL, 0);
    assert_eq!(h.read32(reg::QUEUE_READY), 1);
}

#[test]
fn legacy_drivers_are_refused_at_features_ok() {
    let mut h = rng_harness();
    h.write32(reg::STATUS, 1);
    h.write32(reg::STATUS, 3);
    h.write32(reg::DRIVER_FEATURES_SEL, 1);
    h.write32(reg::DRIVER_FEATURES, 0);
    h.write32(reg::STATUS, 0xb);
    assert_eq!(
        h.read32(reg::STATUS) & FEATURES_OK,
        0,
        "FEATURES_OK not latched"
    );
}

#[test]
fn unoffered_features_are_dropped() {
    let mut h = rng_harness();
    h.write32(reg::STATUS, 1);
    h.write32(reg::STATUS, 3);
    h.write32(reg::DRIVER_FEATURES_SEL, 0);
    h.write32(reg::DRIVER_FEATURES, u32::MAX);
    h.write32(reg::DRIVER_FEATURES_SEL, 1);
    h.write32(reg::DRIVER_FEATURES, u32::MAX);
    let offered = h.offered_features();
    assert_eq!(h.transport.acked_features() & !offered, 0);
    h.write32(reg::DRIVER_FEATURES_SEL, 7);
    h.write32(reg::DRIVER_FEATURES, 1);
    assert_eq!(h.transport.acked_features() & !offered, 0);
}

#[test]
fn a_queue_outside_guest_memory_needs_reset() {
    let mut h = rng_harness();
    // 16 MiB of memory; rings at 1 GiB.
    let q = DriverQueue::new(1 << 30, 64);
    let status = h.bring_up(0, &[q]);
    assert_ne!(status & DEVICE_NEEDS_RESET, 0);
    assert!(!beacon_common::lock(&h.device).is_activated());
    assert_ne!(h.interrupt.status() & 2, 0, "config change raised");
    // A reset brings it back.
    h.write32(reg::STATUS, 0);
    assert_eq!(h.read32(reg::STATUS), 0);
    assert_eq!(h.bring_up(0, &[DriverQueue::new(0x10_0000, 64)]), 0xf);
}

#[test]
fn a_bad_queue_size_needs_reset() {
    let mut h = rng_harness();
    let mut q = DriverQueue::new(0x10_0000, 64);
    q.size = 100; // not a power of two
    let status = h.bring_up(0, &[q]);
    assert_ne!(status & DEVICE_NEEDS_RESET, 0);
}

#[test]
fn status_steps_out_of_order_are_ignored() {
    let mut h = rng_harness();
    h.write32(reg::STATUS, 4); // DRIVER_OK first
    assert_eq!(h.read32(reg::STATUS), 0);
    h.write32(reg::STATUS, 1);
    h.write32(reg::STATUS, 1 | 8); // FEATURES_OK without DRIVER
    assert_eq!(h.read32(reg::STATUS), 1);
    h.write32(reg::STATUS, 3);
    h.write32(reg::STATUS, 1); // clearing DRIVER without a reset
    assert_eq!(h.read32(reg::STATUS), 3);
    h.write32(reg::STATUS, 3 | DEVICE_NEEDS_RESET); // the driver may not set it
    assert_eq!(h.read32(reg::STATUS), 3);
}

#[test]
fn reset_after_activation_and_activate_again() {
    let mut h = rng_harness();
    assert_eq!(h.bring_up(0, &[DriverQueue::new(0x10_0000, 64)]), 0xf);
    h.write32(reg::STATUS, 0);
    assert!(!beacon_common::lock(&h.device).is_activated());
    assert_eq!(h.transport.acked_features(), 0);
    assert_eq!(h.bring_up(0, &[DriverQueue::new(0x20_0000, 32)]), 0xf);
    assert!(beacon_common::lock(&h.device).is_activated());
}

#[test]
fn queue_config_is_frozen_once_live() {
    let mut h = rng_harness();
    let q = DriverQueue::new(0x10_0000, 64);
    assert_eq!(h.bring_up(0, std::slice::from_ref(&q)), 0xf);
    // Moving the rings of a live queue is ignored (the device keeps the old ones).
    h.write32(reg::QUEUE_SEL, 0);
    h.write32(reg::QUEUE_DESC_LOW, 0x4000_0000);
    h.write32(reg::QUEUE_READY, 0);
    h.write32(reg::QUEUE_NUM, 2);
    assert_eq!(h.read32(reg::STATUS), 0xf);
}

#[test]
fn a_notify_write_reaching_the_transport_is_forwarded() {
    let mut h = rng_harness();
    h.write32(reg::QUEUE_NOTIFY, 0);
    assert_eq!(h.queue_events[0].read().expect("forwarded"), 1);
    h.write32(reg::QUEUE_NOTIFY, 99); // unknown queue: ignored
}

#[test]
fn interrupt_status_and_ack() {
    let mut h = rng_harness();
    h.interrupt.signal_used_queue();
    assert_eq!(h.read32(reg::INTERRUPT_STATUS), 1);
    h.write32(reg::INTERRUPT_ACK, 1);
    assert_eq!(h.read32(reg::INTERRUPT_STATUS), 0);
}

#[test]
fn hostile_register_traffic_never_panics() {
    let mut h = rng_harness();
    // A cheap deterministic generator: every offset, size and value pattern.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..200_000 {
        let r = next();
        let offset = match r % 4 {
            0 => r >> 8 & 0xff,
            1 => r >> 8 & 0xfff,
            2 => r >> 8,
            _ => (r >> 8 & 0x3f) * 4,
        };
        let len = [0usize, 1, 2, 3, 4, 8, 16][(r >> 40) as usize % 7];
        let mut buf = vec![0u8; len];
        if r & 0x80 == 0 {
            h.transport.read(offset, &mut buf);
        } else {
            let v = next().to_le_bytes();
            buf.iter_mut()
                .zip(v.iter().cycle())
                .for_each(|(b, v)| *b = *v);
            h.transport.write(offset, &buf);
        }
    }
    // Still a working device afterwards.
    h.write32(reg::STATUS, 0);
    assert_eq!(h.bring_up(0, &[DriverQueue::new(0x10_0000, 64)]), 0xf);
}

#[test]
fn state_reports_registers_and_ring_indexes_without_trusting_them() {
    let mut h = rng_harness();
    let before = h.transport.state();
    assert!(!before.activated);
    assert_eq!(before.device_type, 4);
    assert_eq!(before.queues.len(), 1);
    assert_eq!(before.queues[0].avail_idx, None, "no ring configured yet");

    let mut q = DriverQueue::new(0x10_0000, 64);
    h.bring_up(VIRTIO_RING_F_EVENT_IDX, &[q.clone()]);
    let m = h.mem.memory();
    q.set_avail_idx(&h.mem, 7);
    m.write_obj(5u16, GuestAddress(q.avail + 4 + 2 * 64))
        .expect("used_event");
    m.write_obj(3u16, GuestAddress(q.used + 2))
        .expect("used idx");
    m.write_obj(6u16, GuestAddress(q.used + 4 + 8 * 64))
        .expect("avail_event");
    h.interrupt.signal_used_queue();
    let s = h.transport.state();
    assert!(s.activated);
    assert_eq!(s.status, 0xf);
    assert_eq!(s.interrupt_status, 1);
    assert_ne!(s.acked_features & VIRTIO_RING_F_EVENT_IDX, 0);
    let qs = &s.queues[0];
    assert!(qs.ready);
    assert_eq!(qs.size, 64);
    assert_eq!(
        (qs.avail_idx, qs.used_event, qs.used_idx, qs.avail_event),
        (Some(7), Some(5), Some(3), Some(6))
    );

    // A ring the guest put outside its memory reads as unknown, not a panic.
    let mut h = rng_harness();
    let far = DriverQueue::new(1 << 40, 64);
    h.bring_up(0, &[far]);
    let s = h.transport.state();
    assert_eq!(s.queues[0].used_idx, None);
}
