use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use super::*;
use crate::bus::BusDevice;
use crate::virtio::testing::{DriverQueue, Harness, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use vm_memory::GuestAddressSpace;

const QUEUE: u64 = 0x10_0000;
const HDR: u64 = 0x40_0000;
const STATUS: u64 = 0x48_0000;
const DATA: u64 = 0x50_0000;
const MEM_MIB: usize = 32;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// What an untouched status byte holds.
const UNTOUCHED: u8 = 0xee;

/// Recognisable disk contents: every sector differs.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|k| ((k / 512) * 31 + k % 251) as u8).collect()
}

fn image(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("write image");
    path
}

struct Rig {
    h: Harness,
    q: DriverQueue,
    blk: Arc<Mutex<Block>>,
    path: std::path::PathBuf,
    /// Next header/status slot.
    slot: u64,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// A device on a `sectors`-sector patterned image, brought up like Linux.
    fn new(sectors: usize, read_only: bool) -> Self {
        Self::with_features(sectors, read_only, u64::MAX)
    }

    fn with_features(sectors: usize, read_only: bool, accept: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = image(&dir, "disk.img", &pattern(sectors * 512));
        let blk = Arc::new(Mutex::new(Block::open(&path, read_only).expect("open")));
        let mut h = Harness::new(blk.clone(), MEM_MIB);
        let q = DriverQueue::new(QUEUE, QUEUE_SIZE);
        assert_eq!(h.bring_up(accept, std::slice::from_ref(&q)), 0xf);
        Self {
            h,
            q,
            blk,
            path,
            slot: 0,
            _dir: dir,
        }
    }

    fn write_header(&self, at: u64, kind: u32, sector: u64) {
        let m = self.h.mem.memory();
        m.write_obj(kind, GuestAddress(at)).expect("type");
        m.write_obj(0u32, GuestAddress(at + 4)).expect("reserved");
        m.write_obj(sector, GuestAddress(at + 8)).expect("sector");
    }

    /// Publish header + `data` + status; returns (head, status address).
    fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u16, u64) {
        let hdr = HDR + self.slot * 16;
        let status = STATUS + self.slot;
        self.slot += 1;
        self.write_header(hdr, kind, sector);
        self.h
            .mem
            .memory()
            .write_obj(UNTOUCHED, GuestAddress(status))
            .expect("status");
        let mut chain = vec![(hdr, 16, false)];
        chain.extend_from_slice(data);
        chain.push((status, 1, true));
        (self.q.add_chain(&self.h.mem, &chain), status)
    }

    fn status(&self, at: u64) -> u8 {
        self.h
            .mem
            .memory()
            .read_obj(GuestAddress(at))
            .expect("status")
    }

    fn read_mem(&self, at: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.h
            .mem
            .memory()
            .read_slice(&mut buf, GuestAddress(at))
            .expect("read");
        buf
    }

    fn fill_mem(&self, at: u64, bytes: &[u8]) {
        self.h
            .mem
            .memory()
            .write_slice(bytes, GuestAddress(at))
            .expect("fill");
    }

    /// Notify, then wait until the I/O thread finished everything handed to it
    /// and the completions are back in the used ring.
    fn run(&mut self) -> Vec<(u32, u32)> {
        self.h.notify(0);
        self.settle();
        self.q.take_used(&self.h.mem)
    }

    fn settle(&mut self) {
        let fd = beacon_common::lock(&self.blk).worker.done_evt().as_raw_fd();
        // Bounded: a lost completion fails the test instead of hanging it.
        for _ in 0..1000 {
            {
                let mut blk = beacon_common::lock(&self.blk);
                // As the event loop does: clear the eventfd, then collect.
                let _ = blk.worker.done_evt().read();
                blk.complete();
                if blk.in_flight() == 0 {
                    return;
                }
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 100) };
        }
        panic!("requests handed to the I/O thread never completed");
    }
}

#[test]
fn identifies_itself_and_its_limits() {
    let mut rig = Rig::new(64, false);
    let h = &mut rig.h;
    assert_eq!(h.read32(0x08), VIRTIO_ID_BLOCK);
    let features = h.offered_features();
    for f in [
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_FLUSH,
    ] {
        assert_ne!(features & bit(f), 0, "feature {f} offered");
    }
    assert_eq!(features & bit(VIRTIO_BLK_F_RO), 0, "not read-only");
    assert_ne!(features & VIRTIO_RING_F_EVENT_IDX, 0);
    let config = |h: &mut Harness, off: u64, len: usize| {
        let mut b = vec![0u8; len];
        h.transport.read(0x100 + off, &mut b);
        b
    };
    assert_eq!(config(h, 0, 8), 64u64.to_le_bytes());
    assert_eq!(config(h, 8, 4), SIZE_MAX.to_le_bytes());
    assert_eq!(config(h, 12, 4), SEG_MAX.to_le_bytes());
    // Odd sizes and offsets, and past the end, never panic.
    assert_eq!(config(h, 1, 3), [0, 0, 0]);
    assert_eq!(config(h, 4000, 8), [0; 8]);
    let b = beacon_common::lock(&rig.blk);
    let mut buf = [0xffu8; 4];
    b.read_config(u64::MAX - 1, &mut buf);
    assert_eq!(buf, [0; 4]);
}

#[test]
fn reads_sectors_into_scattered_buffers() {
    let mut rig = Rig::new(64, false);
    let (head, status) = rig.request(
        VIRTIO_BLK_T_IN,
        3,
        &[(DATA, 512, true), (DATA + 0x10000, 1024, true)],
    );
    assert_eq!(rig.run(), vec![(u32::from(head), 1536 + 1)]);
    assert_eq!(rig.status(status), OK);
    let disk = pattern(64 * 512);
    assert_eq!(rig.read_mem(DATA, 512), disk[3 * 512..4 * 512]);
    assert_eq!(rig.read_mem(DATA + 0x10000, 1024), disk[4 * 512..6 * 512]);
    assert!(rig.h.irq.read().expect("interrupt") >= 1);
}

#[test]
fn writes_reach_the_file_and_read_back() {
    let mut rig = Rig::new(64, false);
    let data: Vec<u8> = (0..1024).map(|i| (i % 13) as u8 ^ 0x5a).collect();
    rig.fill_mem(DATA, &data);
    let (_, status) = rig.request(
        VIRTIO_BLK_T_OUT,
        10,
        &[(DATA, 512, false), (DATA + 512, 512, false)],
    );
    let used = rig.run();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 1, "a write returns only the status byte");
    assert_eq!(rig.status(status), OK);
    let file = std::fs::read(&rig.path).expect("read image");
    assert_eq!(file[10 * 512..12 * 512], data[..]);
    assert_eq!(file[..10 * 512], pattern(64 * 512)[..10 * 512]);
    // And through the device again.
    let (_, status) = rig.request(VIRTIO_BLK_T_IN, 10, &[(DATA + 0x8000, 1024, true)]);
    rig.run();
    assert_eq!(rig.status(status), OK);
    assert_eq!(rig.read_mem(DATA + 0x8000, 1024), data);
}

#[test]
fn flush_and_writethrough_succeed() {
    let mut rig = Rig::new(8, false);
    let (_, status) = rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    rig.run();
    assert_eq!(rig.status(status), OK);
    assert!(
        !beacon_common::lock(&rig.blk)
            .active
            .as_ref()
            .expect("active")
            .writethrough
    );
    // A driver without FLUSH gets write-through (each write synced).
    let mut rig = Rig::with_features(8, false, !bit(VIRTIO_BLK_F_FLUSH));
    assert!(
        beacon_common::lock(&rig.blk)
            .active
            .as_ref()
            .expect("active")
            .writethrough
    );
    rig.fill_mem(DATA, &[7u8; 512]);
    let (_, status) = rig.request(VIRTIO_BLK_T_OUT, 1, &[(DATA, 512, false)]);
    rig.run();
    assert_eq!(rig.status(status), OK);
    assert_eq!(
        std::fs::read(&rig.path).expect("image")[512..1024],
        [7u8; 512]
    );
}

#[test]
fn get_id_is_a_stable_serial() {
    let mut rig = Rig::new(8, false);
    let (head, status) = rig.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
    assert_eq!(rig.run(), vec![(u32::from(head), 21)]);
    assert_eq!(rig.status(status), OK);
    let id = rig.read_mem(DATA, 20);
    let serial = beacon_common::lock(&rig.blk).disk().serial_str();
    assert!(serial.starts_with("bcn-") && serial.len() <= 20, "{serial}");
    assert_eq!(&id[..serial.len()], serial.as_bytes());
    // The same file gives the same serial; another file another one.
    let dir = tempfile::tempdir().expect("tempdir");
    let other = image(&dir, "b.img", &[0u8; 4096]);
    let first = DiskFile::open(&other, true).expect("open");
    let again = DiskFile::open(&other, true).expect("reopen");
    assert_eq!(first.serial_str(), again.serial_str());
    assert_ne!(first.serial_str(), serial);
    // A short id buffer gets what fits.
    rig.fill_mem(DATA + 0x1000, &[0xaa; 8]);
    let (head, status) = rig.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA + 0x1000, 4, true)]);
    assert_eq!(rig.run(), vec![(u32::from(head), 5)]);
    assert_eq!(rig.status(status), OK);
    assert_eq!(rig.read_mem(DATA + 0x1000, 8)[..4], serial.as_bytes()[..4]);
    assert_eq!(rig.read_mem(DATA + 0x1004, 4), [0xaa; 4]);
}

#[test]
fn read_only_disks_refuse_writes_and_still_read() {
    let mut rig = Rig::new(16, true);
    assert_ne!(rig.h.offered_features() & bit(VIRTIO_BLK_F_RO), 0);
    rig.fill_mem(DATA, &[0x11; 512]);
    let (_, status) = rig.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]);
    let used = rig.run();
    assert_eq!(used[0].1, 1);
    assert_eq!(rig.status(status), IOERR);
    assert_eq!(std::fs::read(&rig.path).expect("image"), pattern(16 * 512));
    let (_, status) = rig.request(VIRTIO_BLK_T_IN, 15, &[(DATA, 512, true)]);
    rig.run();
    assert_eq!(rig.status(status), OK);
    assert_eq!(rig.read_mem(DATA, 512), pattern(16 * 512)[15 * 512..]);
    let (_, status) = rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    rig.run();
    assert_eq!(
        rig.status(status),
        OK,
        "flushing a read-only disk is a no-op"
    );
}

#[test]
fn sectors_outside_the_disk_and_overflows_fail() {
    let mut rig = Rig::new(16, false);
    for (sector, len) in [
        (16u64, 512u32),       // just past the end
        (15, 1024),            // crosses the end
        (u64::MAX, 512),       // sector + count overflows
        (u64::MAX / 512, 512), // sector * 512 overflows
        (17, 0),               // empty, but starts past the end
    ] {
        let (read, write): (&[_], &[_]) = if len == 0 {
            (&[], &[])
        } else {
            (&[(DATA, len, true)], &[(DATA, len, false)])
        };
        let (_, status) = rig.request(VIRTIO_BLK_T_IN, sector, read);
        let (_, wstatus) = rig.request(VIRTIO_BLK_T_OUT, sector, write);
        let used = rig.run();
        assert_eq!(used.len(), 2);
        assert_eq!(rig.status(status), IOERR, "read at {sector}+{len}");
        assert_eq!(rig.status(wstatus), IOERR, "write at {sector}");
    }
    assert_eq!(std::fs::read(&rig.path).expect("image"), pattern(16 * 512));
    // The last sector and an empty read at the end are fine.
    let (_, status) = rig.request(VIRTIO_BLK_T_IN, 15, &[(DATA, 512, true)]);
    let (_, empty) = rig.request(VIRTIO_BLK_T_IN, 16, &[]);
    rig.run();
    assert_eq!((rig.status(status), rig.status(empty)), (OK, OK));
}

#[test]
fn data_that_is_not_whole_sectors_fails() {
    let mut rig = Rig::new(16, false);
    let (_, a) = rig.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 511, true)]);
    let (_, b) = rig.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 256, false), (DATA, 1, false)]);
    rig.run();
    assert_eq!((rig.status(a), rig.status(b)), (IOERR, IOERR));
    // Two halves of a sector together are fine.
    let (_, c) = rig.request(
        VIRTIO_BLK_T_IN,
        0,
        &[(DATA, 256, true), (DATA + 0x1000, 256, true)],
    );
    rig.run();
    assert_eq!(rig.status(c), OK);
}

#[test]
fn short_garbled_and_unknown_headers() {
    let mut rig = Rig::new(16, false);
    // An 8-byte header.
    let status = STATUS + 100;
    rig.write_header(HDR + 0x1000, VIRTIO_BLK_T_IN, 0);
    rig.q.add_chain(
        &rig.h.mem,
        &[
            (HDR + 0x1000, 8, false),
            (DATA, 512, true),
            (status, 1, true),
        ],
    );
    rig.run();
    assert_eq!(rig.status(status), IOERR);
    // Unknown types, and the discard/write-zeroes we do not offer.
    for kind in [2u32, 11, 13, 0xdead_beef] {
        let (_, s) = rig.request(kind, 0, &[(DATA, 512, true)]);
        rig.run();
        assert_eq!(rig.status(s), UNSUPP, "type {kind}");
    }
    // A header split over three descriptors, the data in the last of them.
    let at = HDR + 0x2000;
    rig.write_header(at, VIRTIO_BLK_T_OUT, 2);
    rig.fill_mem(at + 16, &[0x42; 512]);
    let status = STATUS + 200;
    rig.q.add_chain(
        &rig.h.mem,
        &[
            (at, 5, false),
            (at + 5, 7, false),
            (at + 12, 4 + 512, false),
            (status, 1, true),
        ],
    );
    rig.run();
    assert_eq!(rig.status(status), OK);
    assert_eq!(
        std::fs::read(&rig.path).expect("image")[1024..1536],
        [0x42; 512]
    );
    // A header outside guest memory.
    let status = STATUS + 300;
    rig.q
        .add_chain(&rig.h.mem, &[(1 << 40, 16, false), (status, 1, true)]);
    rig.run();
    assert_eq!(rig.status(status), IOERR);
}

#[test]
fn buffers_in_the_wrong_direction_fail() {
    let mut rig = Rig::new(16, false);
    // A read whose data buffer is device-readable.
    let (_, a) = rig.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, false)]);
    // A write whose data buffer is device-writable.
    let (_, b) = rig.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, true)]);
    // GET_ID with a readable buffer.
    let (_, c) = rig.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, false)]);
    // A flush carrying data.
    let (_, d) = rig.request(VIRTIO_BLK_T_FLUSH, 0, &[(DATA, 512, false)]);
    rig.run();
    for s in [a, b, c, d] {
        assert_eq!(rig.status(s), IOERR);
    }
    // Readable after writable.
    let status = STATUS + 100;
    rig.write_header(HDR + 0x1000, VIRTIO_BLK_T_IN, 0);
    rig.q.add_chain(
        &rig.h.mem,
        &[
            (HDR + 0x1000, 16, false),
            (DATA, 512, true),
            (DATA + 512, 512, false),
            (status, 1, true),
        ],
    );
    rig.run();
    assert_eq!(rig.status(status), IOERR);
    // A status byte the device may not write: returned with nothing written.
    let status = STATUS + 200;
    rig.fill_mem(status, &[UNTOUCHED]);
    let head = rig.q.add_chain(
        &rig.h.mem,
        &[
            (HDR + 0x1000, 16, false),
            (DATA, 512, true),
            (status, 1, false),
        ],
    );
    assert_eq!(rig.run(), vec![(u32::from(head), 0)]);
    assert_eq!(rig.status(status), UNTOUCHED);
    assert_eq!(std::fs::read(&rig.path).expect("image"), pattern(16 * 512));
}

#[test]
fn zero_length_descriptors_and_status() {
    let mut rig = Rig::new(16, false);
    // A zero-length data descriptor between real ones is harmless.
    let (_, a) = rig.request(
        VIRTIO_BLK_T_IN,
        1,
        &[(DATA, 0, true), (DATA, 512, true), (DATA + 0x1000, 0, true)],
    );
    rig.run();
    assert_eq!(rig.status(a), OK);
    assert_eq!(rig.read_mem(DATA, 512), pattern(16 * 512)[512..1024]);
    // A zero-length status descriptor: no status byte, returned empty.
    rig.write_header(HDR + 0x1000, VIRTIO_BLK_T_IN, 0);
    let head = rig.q.add_chain(
        &rig.h.mem,
        &[
            (HDR + 0x1000, 16, false),
            (DATA, 512, true),
            (STATUS + 50, 0, true),
        ],
    );
    assert_eq!(rig.run(), vec![(u32::from(head), 0)]);
    // A chain of one zero-length descriptor.
    let head = rig.q.add_chain(&rig.h.mem, &[(DATA, 0, false)]);
    assert_eq!(rig.run(), vec![(u32::from(head), 0)]);
    // The status byte outside guest memory.
    let head = rig
        .q
        .add_chain(&rig.h.mem, &[(HDR + 0x1000, 16, false), (1 << 40, 1, true)]);
    assert_eq!(rig.run(), vec![(u32::from(head), 0)]);
}

#[test]
fn segment_limits_are_enforced() {
    let mut rig = Rig::new(4096, false);
    // SEG_MAX segments are fine, one more is not.
    let segs: Vec<(u64, u32, bool)> = (0..u64::from(SEG_MAX))
        .map(|i| (DATA + i * 512, 512, true))
        .collect();
    let (_, ok) = rig.request(VIRTIO_BLK_T_IN, 0, &segs);
    rig.run();
    assert_eq!(rig.status(ok), OK);
    let mut too_many = segs.clone();
    too_many.push((DATA, 512, true));
    let (_, bad) = rig.request(VIRTIO_BLK_T_IN, 0, &too_many);
    rig.run();
    assert_eq!(rig.status(bad), IOERR);
    // A segment above SIZE_MAX.
    let (_, big) = rig.request(VIRTIO_BLK_T_IN, 0, &[(DATA, SIZE_MAX + 512, true)]);
    let (_, max) = rig.request(VIRTIO_BLK_T_IN, 0, &[(DATA, SIZE_MAX, true)]);
    rig.run();
    assert_eq!((rig.status(big), rig.status(max)), (IOERR, OK));
    // Data outside guest memory, or crossing its end.
    let end = (MEM_MIB as u64) << 20;
    let (_, out) = rig.request(VIRTIO_BLK_T_IN, 0, &[(1 << 40, 512, true)]);
    let (_, cross) = rig.request(VIRTIO_BLK_T_IN, 0, &[(end - 256, 512, true)]);
    rig.run();
    assert_eq!((rig.status(out), rig.status(cross)), (IOERR, IOERR));
}

#[test]
fn looping_and_overlong_chains_do_not_hang() {
    let mut rig = Rig::new(16, false);
    rig.write_header(HDR, VIRTIO_BLK_T_IN, 0);
    // An indirect table of 4096 descriptors chained in a ring: the walk stops
    // at WALK_LIMIT and the chain is returned unanswered.
    let table = DATA + 0x10_0000;
    for i in 0..4096u64 {
        let at = table + i * 16;
        let m = rig.h.mem.memory();
        m.write_obj(HDR, GuestAddress(at)).expect("addr");
        m.write_obj(16u32, GuestAddress(at + 8)).expect("len");
        m.write_obj(DESC_F_NEXT, GuestAddress(at + 12))
            .expect("flags");
        m.write_obj(((i + 1) % 4096) as u16, GuestAddress(at + 14))
            .expect("next");
    }
    rig.q
        .write_desc(&rig.h.mem, 0, table, 4096 * 16, DESC_F_INDIRECT, 0);
    rig.q.publish(&rig.h.mem, 0);
    assert_eq!(rig.run(), vec![(0, 0)]);
    // Descriptor 1 points to itself; 2 and 3 point to each other.
    rig.q.write_desc(&rig.h.mem, 1, HDR, 16, DESC_F_NEXT, 1);
    rig.q.publish(&rig.h.mem, 1);
    rig.q.write_desc(&rig.h.mem, 2, HDR, 16, DESC_F_NEXT, 3);
    rig.q
        .write_desc(&rig.h.mem, 3, DATA, 512, DESC_F_WRITE | DESC_F_NEXT, 2);
    rig.q.publish(&rig.h.mem, 2);
    let used = rig.run();
    assert_eq!(used.len(), 2, "{used:?}");
    // A head beyond the table, and an available index far ahead of what was
    // published: the queue is left alone until the driver resets it.
    rig.q.publish(&rig.h.mem, 9999);
    rig.h.notify(0);
    rig.q.set_avail_idx(&rig.h.mem, 40_000);
    rig.h.notify(0);
    rig.h.notify(0);
    rig.settle();
    // A reset brings the device back.
    rig.h.write32(0x70, 0);
    let mut fresh = DriverQueue::new(0x20_0000, 16);
    assert_eq!(rig.h.bring_up(0, std::slice::from_ref(&fresh)), 0xf);
    rig.write_header(HDR, VIRTIO_BLK_T_IN, 2);
    rig.fill_mem(STATUS, &[UNTOUCHED]);
    fresh.add_chain(
        &rig.h.mem,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    rig.h.notify(0);
    rig.settle();
    assert_eq!(fresh.take_used(&rig.h.mem), vec![(0, 513)]);
    assert_eq!(rig.status(STATUS), OK);
}

#[test]
fn an_overlong_chain_still_gets_its_status() {
    let mut rig = Rig::new(16, false);
    // 200 data descriptors: more than SEG_MAX, less than the walk limit.
    let segs: Vec<(u64, u32, bool)> = (0..200).map(|i| (DATA + i * 512, 512, true)).collect();
    let (head, status) = rig.request(VIRTIO_BLK_T_IN, 0, &segs);
    assert_eq!(rig.run(), vec![(u32::from(head), 1)]);
    assert_eq!(rig.status(status), IOERR);
}

#[test]
fn a_full_queue_is_served_in_rounds_and_all_complete() {
    let mut rig = Rig::new(256, false);
    // 85 three-descriptor chains fill the 256-entry queue.
    let mut statuses = Vec::new();
    for i in 0..85u64 {
        let (_, s) = rig.request(VIRTIO_BLK_T_IN, i, &[(DATA + i * 512, 512, true)]);
        statuses.push(s);
    }
    let used = rig.run();
    assert_eq!(used.len(), 85);
    assert!(statuses.iter().all(|&s| rig.status(s) == OK));
    assert_eq!(rig.read_mem(DATA, 85 * 512), pattern(256 * 512)[..85 * 512]);
}

#[test]
fn reset_with_requests_in_flight_and_activate_again() {
    let mut rig = Rig::new(64, false);
    for i in 0..20 {
        rig.request(VIRTIO_BLK_T_IN, i, &[(DATA, 512, true)]);
    }
    rig.h.notify(0);
    // Reset before the completions are collected: they are dropped.
    rig.h.write32(0x70, 0);
    assert!(!beacon_common::lock(&rig.blk).is_activated());
    let mut fresh = DriverQueue::new(0x20_0000, 16);
    assert_eq!(rig.h.bring_up(0, std::slice::from_ref(&fresh)), 0xf);
    rig.write_header(HDR, VIRTIO_BLK_T_IN, 5);
    rig.fill_mem(STATUS, &[UNTOUCHED]);
    fresh.add_chain(
        &rig.h.mem,
        &[
            (HDR, 16, false),
            (DATA + 0x8000, 512, true),
            (STATUS, 1, true),
        ],
    );
    rig.h.notify(0);
    rig.settle();
    assert_eq!(fresh.take_used(&rig.h.mem), vec![(0, 513)]);
    assert_eq!(
        rig.read_mem(DATA + 0x8000, 512),
        pattern(64 * 512)[5 * 512..6 * 512]
    );
}

#[test]
fn opening_images() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Missing, a directory, too small.
    let missing = dir.path().join("missing.img");
    let e = DiskFile::open(&missing, true).expect_err("missing");
    assert!(e.to_string().contains("missing.img"), "{e}");
    assert!(matches!(
        DiskFile::open(dir.path(), true),
        Err(DiskError::NotAFile(_) | DiskError::Open { .. })
    ));
    let tiny = image(&dir, "tiny.img", &[0u8; 100]);
    assert!(matches!(
        DiskFile::open(&tiny, true),
        Err(DiskError::TooSmall { size: 100, .. })
    ));
    // A size that is not whole sectors: the tail is hidden.
    let odd = image(&dir, "odd.img", &[0u8; 3 * 512 + 100]);
    assert_eq!(DiskFile::open(&odd, false).expect("odd").capacity(), 3);
    // One writer at a time; readers share.
    let img = image(&dir, "shared.img", &[0u8; 4096]);
    let writer = DiskFile::open(&img, false).expect("writer");
    let e = DiskFile::open(&img, false).expect_err("second writer");
    assert!(matches!(e, DiskError::Locked { .. }), "{e}");
    assert!(matches!(
        DiskFile::open(&img, true),
        Err(DiskError::Locked { .. })
    ));
    drop(writer);
    let r1 = DiskFile::open(&img, true).expect("reader");
    let _r2 = DiskFile::open(&img, true).expect("second reader");
    assert!(DiskFile::open(&img, false).is_err(), "no writer while read");
    drop(r1);
}

#[test]
fn a_trailing_partial_sector_is_never_read_or_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = pattern(4 * 512);
    bytes.extend_from_slice(&[0x77; 100]);
    let path = image(&dir, "odd.img", &bytes);
    let blk = Arc::new(Mutex::new(Block::open(&path, false).expect("open")));
    let mut rig = Rig {
        h: Harness::new(blk.clone(), MEM_MIB),
        q: DriverQueue::new(QUEUE, 16),
        blk,
        path,
        slot: 0,
        _dir: dir,
    };
    assert_eq!(rig.h.bring_up(u64::MAX, std::slice::from_ref(&rig.q)), 0xf);
    let (_, r) = rig.request(VIRTIO_BLK_T_IN, 4, &[(DATA, 512, true)]);
    let (_, w) = rig.request(VIRTIO_BLK_T_OUT, 4, &[(DATA, 512, false)]);
    rig.run();
    assert_eq!((rig.status(r), rig.status(w)), (IOERR, IOERR));
    assert_eq!(std::fs::read(&rig.path).expect("image"), bytes);
}

#[test]
fn completions_arrive_through_the_event_loop() {
    use event_manager::{EventManager, SubscriberOps};
    let mut rig = Rig::new(16, false);
    let mut manager =
        EventManager::<Arc<Mutex<crate::virtio::VirtioSubscriber>>>::new().expect("event manager");
    manager.add_subscriber(Arc::new(Mutex::new(rig.h.subscriber())));
    let (head, status) = rig.request(VIRTIO_BLK_T_IN, 7, &[(DATA, 512, true)]);
    // The guest's kick, as KVM's ioeventfd delivers it.
    rig.h.queue_events[0].write(1).expect("kick");
    let mut used = Vec::new();
    // Bounded: each turn waits at most a second for the next event.
    for _ in 0..20 {
        manager.run_with_timeout(1000).expect("event loop turn");
        used.extend(rig.q.take_used(&rig.h.mem));
        if !used.is_empty() {
            break;
        }
    }
    assert_eq!(used, vec![(u32::from(head), 513)]);
    assert_eq!(rig.status(status), OK);
    assert_eq!(rig.read_mem(DATA, 512), pattern(16 * 512)[7 * 512..8 * 512]);
    assert_eq!(beacon_common::lock(&rig.blk).in_flight(), 0);
}

#[test]
fn requests_past_the_in_flight_cap_wait_in_the_ring() {
    let mut rig = Rig::new(16, false);
    // One request, published over and over (a hostile driver may reuse a head).
    let (head, status) = rig.request(VIRTIO_BLK_T_IN, 1, &[(DATA, 512, true)]);
    for _ in 1..MAX_IN_FLIGHT {
        rig.q.publish(&rig.h.mem, head);
    }
    rig.h.notify(0);
    assert_eq!(beacon_common::lock(&rig.blk).in_flight(), MAX_IN_FLIGHT);
    // Ten more wait in the available ring: nothing more is handed over.
    for _ in 0..10 {
        rig.q.publish(&rig.h.mem, head);
    }
    rig.h.notify(0);
    {
        let blk = beacon_common::lock(&rig.blk);
        assert_eq!(blk.in_flight(), MAX_IN_FLIGHT);
        assert!(blk.active.as_ref().expect("active").waiting_for_room);
    }
    // Completions make room; the waiting ones are served without a new kick.
    rig.settle();
    assert_eq!(rig.q.take_used(&rig.h.mem).len(), MAX_IN_FLIGHT + 10);
    assert_eq!(rig.status(status), OK);
}

#[test]
fn a_buffer_across_two_memory_regions_is_read_and_written_whole() {
    use request::{Operation, Request, Segment};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = image(&dir, "d.img", &pattern(16 * 512));
    let disk = DiskFile::open(&path, false).expect("open");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 1 << 20),
        (GuestAddress(1 << 20), 1 << 20),
    ])
    .expect("two regions");
    let across = Segment {
        addr: GuestAddress((1 << 20) - 1000),
        len: 2048,
    };
    let read = Request {
        op: Operation::Read { sector: 4 },
        data: vec![across],
        data_len: 2048,
        status: GuestAddress(0x1000),
    };
    let (outcome, failure) = disk::execute(&disk, &mem, &read, false);
    assert!(failure.is_none(), "{failure:?}");
    assert_eq!(outcome.status, OK);
    let mut got = vec![0u8; 2048];
    mem.read_slice(&mut got, across.addr).expect("read");
    assert_eq!(got, pattern(16 * 512)[4 * 512..8 * 512]);
    let write = Request {
        op: Operation::Write { sector: 0 },
        ..read
    };
    let (outcome, _) = disk::execute(&disk, &mem, &write, false);
    assert_eq!(outcome.status, OK);
    assert_eq!(std::fs::read(&path).expect("image")[..2048], got[..]);
}

#[test]
fn the_io_thread_runs_the_confinement_hook_first_on_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = image(&dir, "hooked.img", &pattern(8 * 512));
    let (tx, rx) = std::sync::mpsc::channel();
    let hook = crate::confine::ThreadHook::new(move |kind| {
        let _ = tx.send((kind, std::thread::current().name().map(str::to_string)));
    });
    let blk = Block::open_with_hook(&path, false, Some(hook)).expect("open");
    let (kind, name) = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the hook ran");
    assert_eq!(kind, crate::confine::WorkerThread::BlockIo);
    assert_eq!(name.as_deref(), Some("beacon-blk-io"));
    drop(blk);
}
