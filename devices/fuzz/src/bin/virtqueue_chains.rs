//! Fuzz target: descriptor-chain walking through `serve_queue`, the one queue
//! loop every userspace device uses. Rings, descriptor tables (direct and
//! indirect, looping, pointing anywhere) and the device's answer to each chain
//! (consume, fill, walk, leave for later, defer and return later) come from the
//! input. Must hold: no panic, no hang, never more chains served than the
//! budget, and a chain never yields more descriptors than its tables can hold.
#![no_main]

use beacon_devices::throttle::Throttle;
use beacon_devices::virtio::{return_used, serve_queue, ChainOutcome, Interrupt};
use beacon_devices_fuzz::{
    arbitrary, guest_memory, lay_out_queue, sprinkle, DriverQueue, Unstructured, RING_BASE,
};
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

fn run(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let mem = guest_memory();
    let size = 1u16 << u.int_in_range(0u8..=8)?;
    let mut driver = DriverQueue::new(RING_BASE, size);
    lay_out_queue(u, &mem, &mut driver)?;
    sprinkle(u, &mem, 8)?;
    let mut queue = Queue::new(256).expect("queue");
    queue.set_size(size);
    queue.set_desc_table_address(Some(driver.desc as u32), Some(0));
    queue.set_avail_ring_address(Some(driver.avail as u32), Some(0));
    queue.set_used_ring_address(Some(driver.used as u32), Some(0));
    queue.set_event_idx(u.arbitrary()?);
    queue.set_ready(true);
    let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
    let mut complaints = Throttle::default();
    let m = mem.memory();
    let choices: Vec<u8> = u.arbitrary()?;
    let mut next_choice = choices.iter().copied().cycle();
    let mut deferred = Vec::new();
    for _ in 0..u.int_in_range(1u8..=4)? {
        let budget = u.int_in_range(1usize..=300)?;
        let mut deferred_now = 0usize;
        let served = serve_queue(
            &mut queue,
            &*m,
            budget,
            &interrupt,
            &mut complaints,
            |chain| {
                let head = chain.head_index();
                match next_choice.next().unwrap_or(0) % 5 {
                    0 => {
                        let mut buf = [0u8; 4096];
                        let mut read = 0u32;
                        if let Ok(mut r) = chain.reader(&*m) {
                            while read < 64 << 10 {
                                match r.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => read += n as u32,
                                }
                            }
                        }
                        ChainOutcome::Used(0)
                    }
                    1 => {
                        let mut written = 0usize;
                        if let Ok(mut w) = chain.writer(&*m) {
                            let n = w.available_bytes().min(64 << 10);
                            if w.write_all(&vec![0xa5; n]).is_ok() {
                                written = w.bytes_written();
                            }
                        }
                        ChainOutcome::Used(written as u32)
                    }
                    2 => {
                        // The raw walk: bounded by the queue size plus one indirect table.
                        let walked = chain.count();
                        assert!(
                            walked <= usize::from(size) + usize::from(u16::MAX),
                            "{walked}"
                        );
                        ChainOutcome::Used(1)
                    }
                    3 => ChainOutcome::Later,
                    _ => {
                        deferred.push((head, 1));
                        deferred_now += 1;
                        ChainOutcome::Deferred
                    }
                }
            },
        );
        assert!(
            served.used + deferred_now <= budget,
            "{served:?} {deferred_now} {budget}"
        );
        if served.more_pending {
            assert_eq!(served.used + deferred_now, budget, "{served:?}");
        }
        if served.broken {
            break;
        }
        if u.arbitrary()? {
            let _ = return_used(
                &mut queue,
                &*m,
                deferred.drain(..),
                &interrupt,
                &mut complaints,
            );
        }
    }
    let _ = return_used(
        &mut queue,
        &*m,
        deferred.drain(..),
        &interrupt,
        &mut complaints,
    );
    Ok(())
}
