//! Fuzz target: virtio-blk request handling, the device's own parser
//! (`block::request::parse`) and executor (`block::disk::execute`) run
//! synchronously on chains laid out from the input, with request headers
//! (types, sectors around the capacity and overflow) sprinkled where the
//! chains point, against a scratch disk read-only or read-write. Must hold: no
//! panic or hang; a valid request is within SEG_MAX/SIZE_MAX and the disk;
//! writes never reach a read-only disk; the status byte is OK or IOERR after
//! execution; the disk never grows.
#![no_main]

use beacon_devices::virtio::block::disk::{execute, DiskFile};
use beacon_devices::virtio::block::request::{
    parse, DiskShape, Operation, SECTOR_SIZE, SEG_MAX, SIZE_MAX,
};
use beacon_devices_fuzz::{
    address, arbitrary, guest_memory, lay_out_queue, scratch_disk, sprinkle, DriverQueue,
    Unstructured, DISK_SECTORS, RING_BASE,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

fn run(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let (file, path) = scratch_disk();
    let read_only: bool = u.arbitrary()?;
    let disk = DiskFile::open(path, read_only).expect("scratch disk");
    let shape = DiskShape {
        capacity: disk.capacity(),
        read_only,
    };
    let mem = guest_memory();
    let size = 1u16 << u.int_in_range(0u8..=8)?;
    let mut driver = DriverQueue::new(RING_BASE, size);
    lay_out_queue(u, &mem, &mut driver)?;
    // Request headers where chains are likely to point.
    for _ in 0..u.int_in_range(0u8..=16)? {
        let at = GuestAddress(address(u)?);
        let kind: u32 = match u.int_in_range(0u8..=7)? {
            0 | 1 => 0,
            2 | 3 => 1,
            4 => 4,
            5 => 8,
            _ => u.arbitrary()?,
        };
        let sector: u64 = match u.int_in_range(0u8..=5)? {
            0 | 1 => u.int_in_range(0..=DISK_SECTORS)?,
            2 => DISK_SECTORS - 1,
            3 => u64::MAX - u64::from(u.int_in_range(0u8..=8)?),
            4 => u64::MAX / SECTOR_SIZE,
            _ => u.arbitrary()?,
        };
        let m = mem.memory();
        let _ = m.write_obj(kind, at);
        let _ = m.write_obj(sector, GuestAddress(at.0.wrapping_add(8)));
    }
    sprinkle(u, &mem, 4)?;
    let mut queue = Queue::new(256).expect("queue");
    queue.set_size(size);
    queue.set_desc_table_address(Some(driver.desc as u32), Some(0));
    queue.set_avail_ring_address(Some(driver.avail as u32), Some(0));
    queue.set_used_ring_address(Some(driver.used as u32), Some(0));
    queue.set_ready(true);
    let m = mem.memory();
    for _ in 0..512 {
        let Some(chain) = queue.pop_descriptor_chain(&*m) else {
            break;
        };
        match parse(chain, &m, shape) {
            Ok(request) => {
                assert!(request.data.len() <= SEG_MAX as usize);
                assert!(request.data.iter().all(|s| s.len <= SIZE_MAX));
                assert!(m.address_in_range(request.status));
                if let Operation::Read { sector } | Operation::Write { sector } = request.op {
                    assert_eq!(request.data_len % SECTOR_SIZE, 0);
                    assert!(sector + request.data_len / SECTOR_SIZE <= shape.capacity);
                }
                assert!(!(read_only && matches!(request.op, Operation::Write { .. })));
                let (outcome, _) = execute(&disk, &m, &request, u.arbitrary()?);
                assert!(outcome.status <= 1, "{outcome:?}");
                if outcome.used_len > 0 {
                    // Written last, so data overlapping it cannot hide it.
                    let status: u8 = m.read_obj(request.status).expect("status byte");
                    assert_eq!(status, outcome.status);
                }
            }
            Err(rejected) => {
                if let Some(at) = rejected.status {
                    assert!(m.address_in_range(at));
                }
                assert!(matches!(rejected.error.status(), 1 | 2));
            }
        }
    }
    assert_eq!(
        file.metadata().expect("disk metadata").len(),
        DISK_SECTORS * 512
    );
    Ok(())
}
