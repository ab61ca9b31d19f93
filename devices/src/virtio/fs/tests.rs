//! The virtio-fs frontend against a fake vhost-user backend (`fake_backend`),
//! driven through the virtio-mmio registers like Linux drives it: config space
//! (also hostile accesses), the handshake and its refusals, activation (memory
//! table, vrings, kick and call fds), a request round trip ending in the
//! used-buffer interrupt, driver resets, a backend that hangs up or goes mute,
//! teardown, and memory hotplug (regions added and removed one at a time, or
//! the whole table again, and the limits of both).

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::fake_backend::{FakeBackend, FakeConfig, VIRTIOFSD_FEATURES};
use super::*;
use crate::virtio::device::{INT_CONFIG, INT_VRING};
use crate::virtio::testing::{
    hot_add, hot_remove, memfd_region, shared_guest_memory, DriverQueue, Harness,
};
use crate::virtio::VirtioSubscriber;
use crate::BusDevice;

const STATUS: u64 = 0x70;
const DEVICE_NEEDS_RESET: u32 = 0x40;
const HIPRIO_RING: u64 = 0x10_0000;
const REQUEST_RING: u64 = 0x20_0000;
const BUF: u64 = 0x40_0000;

fn device(config: FakeConfig) -> (VhostUserFs, FakeBackend) {
    let (fake, stream) = FakeBackend::start(config);
    let mut cfg = FsConfig::new("myshare", "/fake.sock");
    cfg.queue_size = 16;
    let fs = VhostUserFs::with_stream(&cfg, stream).expect("handshake with the fake");
    (fs, fake)
}

/// A harness around a connected device, with memfd-backed guest memory.
fn harness(config: FakeConfig) -> (Harness, FakeBackend, Arc<Mutex<VhostUserFs>>) {
    let (fs, fake) = device(config);
    let fs = Arc::new(Mutex::new(fs));
    let h = Harness::with_memory(fs.clone(), shared_guest_memory(16));
    (h, fake, fs)
}

fn queues() -> [DriverQueue; 2] {
    [
        DriverQueue::new(HIPRIO_RING, 16),
        DriverQueue::new(REQUEST_RING, 16),
    ]
}

/// An event loop with the device's subscriber in it.
fn event_loop(h: &Harness) -> EventManager<Arc<Mutex<VirtioSubscriber>>> {
    let mut m = EventManager::<Arc<Mutex<VirtioSubscriber>>>::new().expect("event manager");
    m.add_subscriber(Arc::new(Mutex::new(h.subscriber())));
    m
}

fn turn_until(
    m: &mut EventManager<Arc<Mutex<VirtioSubscriber>>>,
    what: &str,
    mut done: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        m.run_with_timeout(50).expect("event loop turn");
    }
}

fn read_config(h: &mut Harness, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0xaa; len];
    h.transport.read(0x100 + offset, &mut b);
    b
}

#[test]
fn config_space_holds_the_tag_and_the_queue_count() {
    let (mut h, _fake, _fs) = harness(FakeConfig::default());
    assert_eq!(h.read32(0x08), VIRTIO_ID_FS);
    let config = read_config(&mut h, 0, CONFIG_LEN);
    assert_eq!(&config[..7], b"myshare");
    assert!(config[7..TAG_LEN].iter().all(|b| *b == 0), "NUL padded");
    assert_eq!(&config[TAG_LEN..], &1u32.to_le_bytes());
    // Byte-wise and odd-sized reads see the same bytes.
    assert_eq!(read_config(&mut h, 2, 3), b"sha");
    assert_eq!(read_config(&mut h, 36, 1), [1]);
    assert_eq!(
        read_config(&mut h, 38, 4),
        [0, 0, 0, 0],
        "past the end is zero"
    );
    for (offset, len) in [
        (40, 4),
        (0xe00, 8),
        (0xeff, 1),
        (0x1000, 4),
        (u64::MAX - 0x100, 8),
    ] {
        assert!(
            read_config(&mut h, offset, len).iter().all(|b| *b == 0),
            "offset {offset:#x}"
        );
    }
    let mut empty = [];
    h.transport.read(0x100, &mut empty);
    // The driver may not write it; writes change nothing.
    h.write32(STATUS, 1 | 2);
    h.transport.write(0x100, b"evil");
    h.transport.write(0x100 + 36, &[9, 9, 9, 9]);
    h.transport.write(0x100 + 0xefc, &[1, 2, 3, 4]);
    assert_eq!(read_config(&mut h, 0, CONFIG_LEN), config);
}

#[test]
fn offers_only_what_both_the_backend_and_the_transport_can_do() {
    let mut config = FakeConfig::default();
    // Packed rings, NOTIFY_ON_EMPTY and the vhost-user bits must not reach the guest.
    config.features |= (1 << 34) | (1 << 24);
    let (mut h, _fake, _fs) = harness(config);
    let offered = h.offered_features();
    assert_eq!(
        offered,
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
    );
    let config = FakeConfig {
        features: VIRTIO_F_VERSION_1 | (1 << 30),
        ..FakeConfig::default()
    };
    let (mut h, _fake, _fs) = harness(config);
    assert_eq!(h.offered_features(), VIRTIO_F_VERSION_1);
}

#[test]
fn the_handshake_negotiates_protocol_features_and_queues() {
    let (fs, fake) = device(FakeConfig::default());
    assert_eq!(
        fake.log(),
        [
            "SET_OWNER",
            "GET_FEATURES",
            "GET_PROTOCOL_FEATURES",
            "SET_PROTOCOL_FEATURES 0xa009",
            "GET_QUEUE_NUM",
            "GET_MAX_MEM_SLOTS",
        ]
    );
    let n = fs.negotiated();
    assert_eq!(
        n.protocol,
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
    );
    assert_eq!(n.max_mem_slots, Some(32), "kept for memory hotplug");
    assert_eq!(n.features, VIRTIOFSD_FEATURES);
    assert_eq!(fs.queue_max_sizes(), [16, 16]);
    assert!(!fs.handles_queue_notifications());
}

#[test]
fn backends_that_cannot_serve_are_refused_before_boot() {
    let refuse = |config: FakeConfig| {
        let (_fake, stream) = FakeBackend::start(config);
        let mut cfg = FsConfig::new("t", "/fake.sock");
        cfg.handshake_timeout = Duration::from_millis(300);
        VhostUserFs::with_stream(&cfg, stream).expect_err("refused")
    };
    let mut c = FakeConfig::default();
    c.features &= !VIRTIO_F_VERSION_1;
    let e = refuse(c);
    assert!(
        matches!(
            e,
            FsError::Missing {
                what: "VIRTIO_F_VERSION_1",
                ..
            }
        ),
        "{e}"
    );
    let mut c = FakeConfig::default();
    c.features &= !(1 << 30);
    let e = refuse(c);
    assert!(
        e.to_string().contains("VHOST_USER_F_PROTOCOL_FEATURES"),
        "{e}"
    );
    let c = FakeConfig {
        queue_num: 1,
        ..FakeConfig::default()
    };
    let e = refuse(c);
    assert!(
        matches!(
            e,
            FsError::TooFewQueues {
                offered: 1,
                needed: 2,
                ..
            }
        ),
        "{e}"
    );
    // A backend that accepts the connection but never answers.
    let c = FakeConfig {
        mute_after: Some(0),
        ..FakeConfig::default()
    };
    let e = refuse(c);
    assert!(matches!(e, FsError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("hung"), "{e}");
    // A backend that hangs up at once.
    let (a, b) = UnixStream::pair().expect("pair");
    drop(a);
    let e = VhostUserFs::with_stream(&FsConfig::new("t", "/x"), b).expect_err("refused");
    assert!(
        matches!(
            e,
            FsError::Handshake {
                step: "SET_OWNER",
                ..
            } | FsError::Handshake {
                step: "GET_FEATURES",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn missing_and_dead_sockets_and_bad_settings_are_clear_errors() {
    let tmp = std::env::temp_dir().join(format!("beacon-fs-test-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");
    let missing = tmp.join("missing.sock");
    let e = VhostUserFs::connect(&FsConfig::new("t", &missing)).expect_err("missing");
    assert!(matches!(e, FsError::NoSocket(_)), "{e}");
    assert!(e.to_string().contains("missing.sock"), "{e}");
    // A socket file nobody listens on any more (virtiofsd died).
    let dead = tmp.join("dead.sock");
    drop(UnixListener::bind(&dead).expect("bind"));
    let e = VhostUserFs::connect(&FsConfig::new("t", &dead)).expect_err("dead");
    assert!(matches!(e, FsError::Dead { .. }), "{e}");
    assert!(e.to_string().contains("start it again"), "{e}");
    let _ = std::fs::remove_dir_all(&tmp);
    let mut c = FsConfig::new("", "/x");
    assert!(matches!(VhostUserFs::connect(&c), Err(FsError::BadTag(_))));
    c.tag = "t".repeat(TAG_LEN + 1);
    assert!(matches!(VhostUserFs::connect(&c), Err(FsError::BadTag(_))));
    c.tag = "t".into();
    c.queue_size = 1000;
    assert!(matches!(
        VhostUserFs::connect(&c),
        Err(FsError::BadQueueSize(1000))
    ));
    c.queue_size = 16;
    c.request_queues = 0;
    assert!(matches!(
        VhostUserFs::connect(&c),
        Err(FsError::BadRequestQueues(0))
    ));
}

/// Bring the device up like Linux does and wait for the backend to run both rings.
fn bring_up(h: &mut Harness, fake: &FakeBackend) {
    let before = fake.count("SET_VRING_ENABLE 1 true");
    assert_eq!(h.bring_up(VIRTIO_RING_F_EVENT_IDX, &queues()), 0xf);
    fake.wait_for_count("SET_VRING_ENABLE 1 true", before + 1);
}

#[test]
fn activation_hands_the_backend_memory_rings_kick_and_call_fds() {
    let (mut h, fake, fs) = harness(FakeConfig::default());
    bring_up(&mut h, &fake);
    assert!(beacon_common::lock(&fs).is_activated());
    let log = fake.log();
    let setup: Vec<&str> = log[6..].iter().map(String::as_str).collect();
    assert_eq!(
        setup,
        [
            "SET_FEATURES 0x160000000",
            "SET_MEM_TABLE 1",
            "SET_VRING_NUM 0 16",
            "SET_VRING_BASE 0 0",
            "SET_VRING_ADDR 0",
            "SET_VRING_KICK 0",
            "SET_VRING_CALL 0",
            "SET_VRING_NUM 1 16",
            "SET_VRING_BASE 1 0",
            "SET_VRING_ADDR 1",
            "SET_VRING_KICK 1",
            "SET_VRING_CALL 1",
            "SET_VRING_ENABLE 0 true",
            "SET_VRING_ENABLE 1 true",
        ]
    );
    let rec = beacon_common::lock(&fake.rec);
    let mem = h.mem.memory();
    let region = mem.iter().next().expect("one region");
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .expect("host") as u64;
    let (table, _) = &rec.regions[0];
    let (gpa, size, user, offset) = (
        table.guest_phys_addr,
        table.memory_size,
        table.user_addr,
        table.mmap_offset,
    );
    assert_eq!((gpa, size, user, offset), (0, 16 << 20, host, 0));
    let q = queues();
    let ring = &rec.vrings[&1];
    assert_eq!(
        ring.desc,
        host + q[1].desc,
        "addresses in our address space"
    );
    assert_eq!(ring.avail, host + q[1].avail);
    assert_eq!(ring.used, host + q[1].used);
    // The kick fd is the queue's notification eventfd.
    let mut kick = ring.kick.as_ref().expect("kick").try_clone().expect("dup");
    drop(rec);
    h.queue_events[1].write(3).expect("guest kick");
    let mut n = [0u8; 8];
    kick.read_exact(&mut n).expect("backend sees the kick");
    assert_eq!(u64::from_ne_bytes(n), 3);
}

#[test]
fn a_request_round_trip_raises_the_used_buffer_interrupt() {
    let (mut h, fake, _fs) = harness(FakeConfig::default());
    let mut m = event_loop(&h);
    bring_up(&mut h, &fake);
    let [_, mut requests] = queues();
    let mem = h.mem.clone();
    mem.memory()
        .write_slice(b"hello fuse", GuestAddress(BUF))
        .expect("request");
    let head = requests.add_chain(&mem, &[(BUF, 10, false), (BUF + 0x1000, 64, true)]);
    h.queue_events[1].write(1).expect("kick");
    fake.serve_one(1, |req| req.to_ascii_uppercase());
    turn_until(&mut m, "the used-buffer interrupt", || {
        h.interrupt.status() & INT_VRING != 0
    });
    assert!(h.irq.read().expect("the irq line fired") >= 1);
    assert_eq!(
        h.read32(0x60) & INT_VRING,
        INT_VRING,
        "InterruptStatus says why"
    );
    assert_eq!(requests.take_used(&mem), vec![(u32::from(head), 10)]);
    let mut reply = [0u8; 10];
    mem.memory()
        .read_slice(&mut reply, GuestAddress(BUF + 0x1000))
        .expect("reply");
    assert_eq!(&reply, b"HELLO FUSE");
}

#[test]
fn a_backend_hang_up_is_noticed_once_and_the_device_needs_a_reset() {
    let (mut h, mut fake, fs) = harness(FakeConfig::default());
    let mut m = event_loop(&h);
    bring_up(&mut h, &fake);
    assert_eq!(h.read32(STATUS) & DEVICE_NEEDS_RESET, 0);
    fake.die();
    turn_until(&mut m, "the hang-up noticed", || {
        beacon_common::lock(&fs).backend_dead()
    });
    assert_eq!(h.read32(STATUS) & DEVICE_NEEDS_RESET, DEVICE_NEEDS_RESET);
    assert_ne!(
        h.interrupt.status() & INT_CONFIG,
        0,
        "config-change interrupt"
    );
    // The socket is no longer watched: the loop does not spin on it.
    assert_eq!(m.run_with_timeout(100).expect("turn"), 0);
    // The driver's read-modify-write of the status is no protocol error, and a
    // reset does not bring a dead backend back.
    let status = h.read32(STATUS);
    h.write32(STATUS, status | 0x80);
    h.write32(STATUS, 0);
    assert_eq!(h.read32(STATUS), DEVICE_NEEDS_RESET);
    assert_eq!(
        h.bring_up(VIRTIO_RING_F_EVENT_IDX, &queues()) & DEVICE_NEEDS_RESET,
        DEVICE_NEEDS_RESET,
        "activation against a dead backend is refused"
    );
    assert!(!beacon_common::lock(&fs).is_activated());
}

#[test]
fn a_driver_reset_stops_the_rings_and_the_device_comes_back() {
    let (mut h, fake, fs) = harness(FakeConfig::default());
    bring_up(&mut h, &fake);
    h.write32(STATUS, 0);
    // The reset waits for the backend, so the rings are stopped already.
    let log = fake.log();
    let tail: Vec<&str> = log[log.len() - 5..].iter().map(String::as_str).collect();
    assert_eq!(
        tail,
        [
            "SET_VRING_ENABLE 0 false",
            "GET_VRING_BASE 0",
            "SET_VRING_ENABLE 1 false",
            "GET_VRING_BASE 1",
            "RESET_DEVICE",
        ]
    );
    assert!(!beacon_common::lock(&fs).is_activated());
    assert!(!beacon_common::lock(&fs).needs_reset());
    // Many cycles: requests never pile up, each comes back.
    for _ in 0..20 {
        bring_up(&mut h, &fake);
        h.write32(STATUS, 0);
    }
    bring_up(&mut h, &fake);
    let sets = fake
        .log()
        .iter()
        .filter(|l| l.starts_with("SET_MEM_TABLE"))
        .count();
    assert_eq!(sets, 22);
}

#[test]
fn only_the_queues_the_driver_set_up_are_started() {
    let (mut h, fake, _fs) = harness(FakeConfig::default());
    // Only the high-priority queue.
    assert_eq!(h.bring_up(0, &queues()[..1]), 0xf);
    fake.wait_for("SET_VRING_ENABLE 0 true");
    std::thread::sleep(Duration::from_millis(50));
    let about_queue_1 =
        |l: &String| l.starts_with("SET_VRING_") && l.split(' ').nth(1) == Some("1");
    assert!(!fake.log().iter().any(about_queue_1), "{:?}", fake.log());
    // No queue at all: refused.
    h.write32(STATUS, 0);
    assert_eq!(h.bring_up(0, &[]) & DEVICE_NEEDS_RESET, DEVICE_NEEDS_RESET);
    // A queue outside guest memory never reaches the backend.
    h.write32(STATUS, 0);
    let wild = [
        DriverQueue::new(HIPRIO_RING, 16),
        DriverQueue::new(1 << 40, 16),
    ];
    assert_eq!(
        h.bring_up(0, &wild) & DEVICE_NEEDS_RESET,
        DEVICE_NEEDS_RESET
    );
    std::thread::sleep(Duration::from_millis(50));
    let tables = fake
        .log()
        .iter()
        .filter(|l| l.starts_with("SET_MEM_TABLE"))
        .count();
    assert_eq!(tables, 1);
}

#[test]
fn a_backend_that_stops_answering_cannot_hang_the_vm() {
    // Answers the handshake (6 requests), then goes silent.
    let config = FakeConfig {
        mute_after: Some(6),
        ..FakeConfig::default()
    };
    let (mut h, fake, fs) = harness(config);
    // Activation does not wait for the backend.
    assert_eq!(h.bring_up(0, &queues()), 0xf);
    // A reset waits, but only so long, and then reports the device broken.
    let start = Instant::now();
    h.write32(STATUS, 0);
    assert!(start.elapsed() < RESET_WAIT + Duration::from_secs(5));
    assert!(beacon_common::lock(&fs).needs_reset());
    assert_eq!(h.read32(STATUS), DEVICE_NEEDS_RESET);
    // Tearing down the device ends the link's thread even with the backend mute.
    let (done, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(h);
        drop(fs);
        let _ = done.send(());
    });
    ended
        .recv_timeout(Duration::from_secs(20))
        .expect("teardown finished");
    drop(fake);
}

#[test]
fn teardown_stops_the_rings_and_hangs_up() {
    let (mut h, mut fake, fs) = harness(FakeConfig::default());
    bring_up(&mut h, &fake);
    drop(h);
    drop(fs);
    // The fake's handler thread ends when the frontend hangs up.
    fake.wait_disconnected();
    let log = fake.log();
    assert!(log.iter().any(|l| l == "GET_VRING_BASE 1"), "{log:?}");
}

// Memory hotplug: the VMM swaps the guest memory, then calls `memory_changed`.

/// Where hot-added regions go (above 4 GiB), and their size.
const HOTPLUG_BASE: u64 = 1 << 32;
const DIMM: u64 = 2 << 20;

fn dimm(i: u64) -> GuestAddress {
    GuestAddress(HOTPLUG_BASE + i * DIMM)
}

fn plug(h: &Harness, fs: &Arc<Mutex<VhostUserFs>>, i: u64) {
    hot_add(&h.mem, memfd_region(dimm(i), DIMM as usize));
    beacon_common::lock(fs).memory_changed(&h.mem);
}

/// Removes DIMM `i` and tells the device; the region is handed back still
/// mapped, as the VMM unmaps it only after the device returned.
fn unplug(h: &Harness, fs: &Arc<Mutex<VhostUserFs>>, i: u64) -> Arc<GuestRegionMmap> {
    let region = hot_remove(&h.mem, dimm(i), DIMM);
    beacon_common::lock(fs).memory_changed(&h.mem);
    region
}

fn memory_messages(fake: &FakeBackend) -> Vec<String> {
    fake.log()
        .into_iter()
        .filter(|l| l.contains("MEM_REG") || l.starts_with("SET_MEM_TABLE"))
        .collect()
}

fn wait_needs_reset(fs: &Arc<Mutex<VhostUserFs>>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !beacon_common::lock(fs).needs_reset() {
        assert!(Instant::now() < deadline, "the device never needed a reset");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn protocol_without_mem_slots() -> FakeConfig {
    let mut config = FakeConfig::default();
    config
        .protocol
        .remove(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
    config
}

#[test]
fn hotplugged_memory_reaches_the_backend_region_by_region() {
    let (mut h, fake, fs) = harness(FakeConfig::default());
    bring_up(&mut h, &fake);
    plug(&h, &fs, 0);
    let added = format!("ADD_MEM_REG {:#x} {DIMM:#x}", dimm(0).0);
    fake.wait_for(&added);
    // The backend got the region's own memfd, at the region's offset in it.
    h.mem
        .memory()
        .write_slice(b"hot", dimm(0).unchecked_add(0x100))
        .expect("write the new RAM");
    let host = h.mem.memory().get_host_address(dimm(0)).expect("mapped") as u64;
    {
        let rec = beacon_common::lock(&fake.rec);
        let (table, file) = rec.regions.last().expect("the added region");
        let (gpa, size, user, offset) = (
            table.guest_phys_addr,
            table.memory_size,
            table.user_addr,
            table.mmap_offset,
        );
        assert_eq!((gpa, size, user, offset), (dimm(0).0, DIMM, host, 0));
        let mut seen = [0u8; 3];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut seen, 0x100).expect("read the memfd");
        assert_eq!(&seen, b"hot");
    }
    // A removal is acknowledged before `memory_changed` returns: the VMM
    // unmaps the region right after.
    let region = unplug(&h, &fs, 0);
    assert_eq!(
        memory_messages(&fake),
        [
            "SET_MEM_TABLE 1".to_string(),
            added,
            format!("REM_MEM_REG {:#x} {DIMM:#x}", dimm(0).0),
        ]
    );
    drop(region);
    assert_eq!(beacon_common::lock(&fake.rec).regions.len(), 1);
    // Nothing changed: nothing is sent.
    beacon_common::lock(&fs).memory_changed(&h.mem);
    // Two additions right after each other (they may share one update), and
    // one removal.
    plug(&h, &fs, 1);
    plug(&h, &fs, 2);
    fake.wait_for(&format!("ADD_MEM_REG {:#x} {DIMM:#x}", dimm(2).0));
    drop(unplug(&h, &fs, 1));
    assert_eq!(
        memory_messages(&fake)[3..],
        [
            format!("ADD_MEM_REG {:#x} {DIMM:#x}", dimm(1).0),
            format!("ADD_MEM_REG {:#x} {DIMM:#x}", dimm(2).0),
            format!("REM_MEM_REG {:#x} {DIMM:#x}", dimm(1).0),
        ]
    );
    // A region removed before the backend heard of it: either it never gets
    // there, or it is added and removed; either way, once the removal
    // returns, the backend has exactly the guest's regions.
    plug(&h, &fs, 3);
    drop(unplug(&h, &fs, 3));
    let backend: Vec<(u64, u64)> = beacon_common::lock(&fake.rec)
        .regions
        .iter()
        .map(|(r, _)| (r.guest_phys_addr, r.memory_size))
        .collect();
    assert_eq!(backend, [(0, 16 << 20), (dimm(2).0, DIMM)]);
    assert_eq!(
        fake.count(&format!("ADD_MEM_REG {:#x} {DIMM:#x}", dimm(3).0)),
        fake.count(&format!("REM_MEM_REG {:#x} {DIMM:#x}", dimm(3).0)),
    );
    assert!(!beacon_common::lock(&fs).needs_reset());
    assert_eq!(h.interrupt.status() & INT_CONFIG, 0);
    assert_eq!(h.read32(STATUS) & DEVICE_NEEDS_RESET, 0);
}

#[test]
fn without_configure_mem_slots_the_whole_table_is_sent_again() {
    let (mut h, fake, fs) = harness(protocol_without_mem_slots());
    assert_eq!(beacon_common::lock(&fs).negotiated().max_mem_slots, None);
    bring_up(&mut h, &fake);
    plug(&h, &fs, 0);
    fake.wait_for("SET_MEM_TABLE 2");
    // The removal is acknowledged before the call returns here too.
    drop(unplug(&h, &fs, 0));
    assert_eq!(
        memory_messages(&fake),
        ["SET_MEM_TABLE 1", "SET_MEM_TABLE 2", "SET_MEM_TABLE 1"]
    );
    assert_eq!(beacon_common::lock(&fake.rec).regions.len(), 1);
    // One table holds at most 8 regions: the 9th cannot be announced.
    for i in 0..7 {
        plug(&h, &fs, i);
    }
    fake.wait_for("SET_MEM_TABLE 8");
    assert!(!beacon_common::lock(&fs).needs_reset());
    plug(&h, &fs, 7);
    wait_needs_reset(&fs);
    assert_ne!(
        h.interrupt.status() & INT_CONFIG,
        0,
        "config-change interrupt"
    );
    assert_eq!(h.read32(STATUS) & DEVICE_NEEDS_RESET, DEVICE_NEEDS_RESET);
    assert!(
        !memory_messages(&fake)
            .iter()
            .any(|l| l == "SET_MEM_TABLE 9"),
        "{:?}",
        fake.log()
    );
}

#[test]
fn adding_past_the_backends_memory_slots_needs_a_reset() {
    let config = FakeConfig {
        max_mem_slots: 2,
        ..FakeConfig::default()
    };
    let (mut h, fake, fs) = harness(config);
    bring_up(&mut h, &fake);
    plug(&h, &fs, 0);
    fake.wait_for(&format!("ADD_MEM_REG {:#x} {DIMM:#x}", dimm(0).0));
    plug(&h, &fs, 1);
    wait_needs_reset(&fs);
    assert_ne!(h.interrupt.status() & INT_CONFIG, 0);
    assert_eq!(
        memory_messages(&fake),
        [
            "SET_MEM_TABLE 1".to_string(),
            format!("ADD_MEM_REG {:#x} {DIMM:#x}", dimm(0).0)
        ]
    );
    // Removing still works (the VMM depends on it), and a driver reset and
    // activation bring the device back with the whole table.
    drop(unplug(&h, &fs, 1));
    drop(unplug(&h, &fs, 0));
    assert_eq!(
        memory_messages(&fake).last().map(String::as_str),
        Some(format!("REM_MEM_REG {:#x} {DIMM:#x}", dimm(0).0).as_str())
    );
    h.write32(STATUS, 0);
    assert!(!beacon_common::lock(&fs).needs_reset());
    bring_up(&mut h, &fake);
    assert_eq!(fake.count("SET_MEM_TABLE 1"), 2);
}

#[test]
fn a_device_that_is_not_activated_tells_the_backend_nothing() {
    let (mut h, fake, fs) = harness(FakeConfig::default());
    // Before the first activation.
    plug(&h, &fs, 0);
    drop(unplug(&h, &fs, 0));
    // After a driver reset.
    bring_up(&mut h, &fake);
    h.write32(STATUS, 0);
    plug(&h, &fs, 1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(memory_messages(&fake), ["SET_MEM_TABLE 1"]);
    // The next activation sends the whole table.
    bring_up(&mut h, &fake);
    assert_eq!(
        memory_messages(&fake),
        ["SET_MEM_TABLE 1", "SET_MEM_TABLE 2"]
    );
    assert!(!beacon_common::lock(&fs).needs_reset());
}

#[test]
fn an_activation_with_more_than_eight_regions_adds_the_rest_one_by_one() {
    let (mut h, fake, fs) = harness(FakeConfig::default());
    for i in 0..9 {
        plug(&h, &fs, i);
    }
    bring_up(&mut h, &fake);
    let mut expected = vec!["SET_MEM_TABLE 8".to_string()];
    expected.extend((7..9).map(|i| format!("ADD_MEM_REG {:#x} {DIMM:#x}", dimm(i).0)));
    assert_eq!(memory_messages(&fake), expected);
    assert_eq!(beacon_common::lock(&fake.rec).regions.len(), 10);
    // The regions last sent include the added ones: removing one is one REM_MEM_REG.
    drop(unplug(&h, &fs, 8));
    assert_eq!(
        memory_messages(&fake).last().map(String::as_str),
        Some(format!("REM_MEM_REG {:#x} {DIMM:#x}", dimm(8).0).as_str())
    );
    assert!(!beacon_common::lock(&fs).needs_reset());
}

#[test]
fn a_backend_that_does_not_confirm_a_removal_cannot_hang_the_vmm() {
    // Answers the handshake (6 requests) and the activation (14), then goes silent.
    let config = FakeConfig {
        mute_after: Some(20),
        ..FakeConfig::default()
    };
    let (mut h, fake, fs) = harness(config);
    hot_add(&h.mem, memfd_region(dimm(0), DIMM as usize));
    hot_add(&h.mem, memfd_region(dimm(1), DIMM as usize));
    bring_up(&mut h, &fake);
    fake.wait_for("SET_MEM_TABLE 3");
    let start = Instant::now();
    let region = unplug(&h, &fs, 0);
    assert!(start.elapsed() >= MEMORY_WAIT, "waited for the backend");
    assert!(start.elapsed() < MEMORY_WAIT + Duration::from_secs(5));
    drop(region);
    assert!(beacon_common::lock(&fs).needs_reset());
    assert_ne!(h.interrupt.status() & INT_CONFIG, 0);
    // The next removal does not wait behind the stuck one.
    let start = Instant::now();
    drop(unplug(&h, &fs, 1));
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(beacon_common::lock(&fs).needs_reset());
    // Tearing down still ends the link's thread.
    let (done, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(h);
        drop(fs);
        let _ = done.send(());
    });
    ended
        .recv_timeout(Duration::from_secs(20))
        .expect("teardown finished");
    drop(fake);
}

#[test]
fn the_backend_thread_runs_the_confinement_hook_before_the_handshake() {
    let (tx, rx) = std::sync::mpsc::channel();
    let hook = crate::confine::ThreadHook::new(move |kind| {
        let _ = tx.send((kind, std::thread::current().name().map(str::to_string)));
    });
    let (_fake, stream) = FakeBackend::start(FakeConfig::default());
    let mut cfg = FsConfig::new("hooked", "/fake.sock");
    cfg.thread_hook = Some(hook);
    let fs = VhostUserFs::with_stream(&cfg, stream).expect("handshake with the fake");
    let (kind, name) = rx
        .try_recv()
        .expect("the hook ran before the handshake ended");
    assert_eq!(kind, crate::confine::WorkerThread::VhostUser);
    assert_eq!(name.as_deref(), Some("vhost-user-fs"));
    drop(fs);
}
