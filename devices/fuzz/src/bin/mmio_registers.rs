//! Fuzz target: virtio-mmio register and config-space access sequences on the
//! transport, with the rng or the block device (on a scratch disk, read-only
//! or read-write) behind it: accesses of any offset, size and value, Linux-like
//! bring-ups with offered or unoffered features, queues laid out from input,
//! notifications, event-loop turns (block completions) and resets, in any order.
//! Must hold: no panic or hang; the magic value never changes; the device is
//! only ever active while the status says DRIVER_OK.
#![no_main]

use std::sync::{Arc, Mutex};

use beacon_devices::virtio::block::Block;
use beacon_devices::virtio::rng::Rng;
use beacon_devices::virtio::VirtioDevice;
use beacon_devices::BusDevice;
use beacon_devices_fuzz::{
    arbitrary, lay_out_queue, scratch_disk, sprinkle, DriverQueue, Harness, Unstructured, MEM_MIB,
    RING_BASE,
};
use event_manager::{EventManager, SubscriberOps};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

fn device(u: &mut Unstructured<'_>) -> arbitrary::Result<Arc<Mutex<dyn VirtioDevice>>> {
    Ok(if u.arbitrary()? {
        Arc::new(Mutex::new(Rng::new()))
    } else {
        let (_, path) = scratch_disk();
        Arc::new(Mutex::new(
            Block::open(path, u.arbitrary()?).expect("scratch disk"),
        ))
    })
}

/// Register offsets: mostly the real registers, then config space, then anything.
fn offset(u: &mut Unstructured<'_>) -> arbitrary::Result<u64> {
    Ok(match u.int_in_range(0u8..=9)? {
        0..=5 => u64::from(u.int_in_range(0u8..=0x3f)?) * 4,
        6 | 7 => 0x100 + u64::from(u.int_in_range(0u8..=0x40)?),
        8 => u64::from(u.int_in_range(0u16..=0x1010)?),
        _ => u.arbitrary()?,
    })
}

/// One event-loop turn for the device (its own fds: block completions).
fn pump(h: &Harness) {
    let Ok(mut manager) =
        EventManager::<Arc<Mutex<beacon_devices::virtio::VirtioSubscriber>>>::new()
    else {
        return;
    };
    manager.add_subscriber(Arc::new(Mutex::new(h.subscriber())));
    let _ = manager.run_with_timeout(0);
}

fn run(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let mut h = Harness::new(device(u)?, MEM_MIB);
    let mut driver = DriverQueue::new(RING_BASE, 1 << u.int_in_range(0u8..=8)?);
    for _ in 0..u.int_in_range(1u16..=256)? {
        match u.int_in_range(0u8..=15)? {
            0..=4 => {
                let len = *u.choose(&[0usize, 1, 2, 3, 4, 4, 4, 8, 16])?;
                let mut buf = vec![0u8; len];
                let at = offset(u)?;
                h.transport.read(at, &mut buf);
            }
            5..=9 => {
                let len = *u.choose(&[0usize, 1, 2, 4, 4, 4, 8])?;
                let bytes = u.bytes(len)?.to_vec();
                let at = offset(u)?;
                h.transport.write(at, &bytes);
            }
            10 => {
                let accept = u.arbitrary()?;
                let mut q = driver.clone();
                if u.ratio(1u8, 8)? {
                    q.size = u.arbitrary()?;
                }
                h.bring_up(accept, &[q]);
            }
            11 => {
                driver = DriverQueue::new(RING_BASE, driver.size);
                lay_out_queue(u, &h.mem, &mut driver)?;
                sprinkle(u, &h.mem, 8)?;
                h.notify(0);
            }
            12 => {
                let index = u.int_in_range(0usize..=1)?;
                if index < h.queue_events.len() {
                    h.notify(index);
                }
            }
            13 => pump(&h),
            14 => h.write32(0x70, 0),
            _ => {
                let status = u.arbitrary()?;
                h.write32(0x70, status);
            }
        }
        assert_eq!(h.read32(0), 0x7472_6976, "magic");
        let active = beacon_common::lock(&h.device).is_activated();
        if active {
            assert_ne!(h.read32(0x70) & 4, 0, "active without DRIVER_OK");
        }
    }
    Ok(())
}
