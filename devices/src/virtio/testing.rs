//! A virtio driver in miniature, for tests and fuzz targets: lays out split
//! queues in guest memory and drives an [`MmioTransport`] through its registers
//! the way Linux's virtio_mmio driver does, so device models are exercised
//! against real register sequences and hand-made (also malformed) descriptor
//! chains without a VM.

use std::sync::{Arc, Mutex};

use event_manager::SubscriberOps;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};
use vmm_sys_util::eventfd::EventFd;

use super::device::{GuestMem, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use super::mmio::MmioTransport;
use super::VirtioSubscriber;
use crate::bus::BusDevice;

/// Descriptor flags.
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// `mib` MiB of guest memory at address 0.
pub fn guest_memory(mib: usize) -> GuestMem {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mib << 20)])
        .expect("test guest memory");
    GuestMemoryAtomic::new(mem)
}

/// `mib` MiB of guest memory at address 0 backed by a memfd mapped shared, the
/// way the VMM makes it, so a vhost-user backend can map the same pages (the
/// region's file offset is 0).
pub fn shared_guest_memory(mib: usize) -> GuestMem {
    let region = memfd_region(GuestAddress(0), mib << 20);
    GuestMemoryAtomic::new(GuestMemoryMmap::from_regions(vec![region]).expect("test guest memory"))
}

/// `len` bytes of guest RAM at `start` backed by a fresh memfd mapped shared
/// (file offset 0), like the regions the VMM makes at boot and on hot-add.
pub fn memfd_region(start: GuestAddress, len: usize) -> GuestRegionMmap {
    use std::os::fd::FromRawFd;
    // SAFETY: a valid NUL-terminated name and constant flags.
    let fd = unsafe { libc::memfd_create(c"beacon-test-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len as u64).expect("size the memfd");
    GuestRegionMmap::<()>::from_range(start, len, Some(vm_memory::FileOffset::new(file, 0)))
        .expect("map the memfd")
}

/// Memory hot-add as the VMM does it: swap `mem` to a map with `region` added.
pub fn hot_add(mem: &GuestMem, region: GuestRegionMmap) {
    let grown = mem
        .memory()
        .insert_region(Arc::new(region))
        .expect("the new region fits");
    mem.lock().expect("memory lock").replace(grown);
}

/// Memory hot-remove as the VMM does it: swap `mem` to a map without the
/// region at `start` of `len` bytes; the region is returned, still mapped (the
/// VMM unmaps it only after the devices were told).
pub fn hot_remove(mem: &GuestMem, start: GuestAddress, len: u64) -> Arc<GuestRegionMmap> {
    let (shrunk, region) = mem
        .memory()
        .remove_region(start, len)
        .expect("a region to remove");
    mem.lock().expect("memory lock").replace(shrunk);
    region
}

/// One split virtqueue as the driver sees it.
#[derive(Debug, Clone)]
pub struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// A queue of `size` entries whose rings start at `base` (page aligned).
    pub fn new(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 4095) & !4095;
        Self {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Write descriptor `index` raw.
    pub fn write_desc(
        &self,
        mem: &GuestMem,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.desc + 16 * u64::from(index);
        let m = mem.memory();
        m.write_obj(addr, GuestAddress(at)).expect("desc addr");
        m.write_obj(len, GuestAddress(at + 8)).expect("desc len");
        m.write_obj(flags, GuestAddress(at + 12))
            .expect("desc flags");
        m.write_obj(next, GuestAddress(at + 14)).expect("desc next");
    }

    /// Publish `head` in the available ring.
    pub fn publish(&mut self, mem: &GuestMem, head: u16) {
        let m = mem.memory();
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        m.write_obj(head, GuestAddress(slot)).expect("avail slot");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .expect("avail idx");
    }

    /// Set the available index to anything (hostile tests).
    pub fn set_avail_idx(&mut self, mem: &GuestMem, idx: u16) {
        self.avail_idx = idx;
        mem.memory()
            .write_obj(idx, GuestAddress(self.avail + 2))
            .expect("avail idx");
    }

    /// Add a chain of buffers `(guest address, length, device-writable)` and publish it.
    pub fn add_chain(&mut self, mem: &GuestMem, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let last = i + 1 == buffers.len();
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(mem, index, addr, len, flags, self.next_desc);
        }
        self.publish(mem, head);
        head
    }

    /// Used entries `(head, written length)` the device returned since the last call.
    pub fn take_used(&mut self, mem: &GuestMem) -> Vec<(u32, u32)> {
        let m = mem.memory();
        let idx: u16 = m.read_obj(GuestAddress(self.used + 2)).expect("used idx");
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = m.read_obj(GuestAddress(at)).expect("used id");
            let len: u32 = m.read_obj(GuestAddress(at + 4)).expect("used len");
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A transport with its device, memory, interrupt and queue eventfds, driven
/// through registers.
pub struct Harness {
    pub mem: GuestMem,
    pub transport: MmioTransport,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub irq: EventFd,
    pub interrupt: Arc<Interrupt>,
    pub queue_events: Vec<EventFd>,
}

impl Harness {
    /// Wrap `device` with `mem_mib` MiB of guest memory.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, mem_mib: usize) -> Self {
        Self::with_memory(device, guest_memory(mem_mib))
    }

    /// Wrap `device` with the given guest memory (e.g. [`shared_guest_memory`]).
    pub fn with_memory(device: Arc<Mutex<dyn VirtioDevice>>, mem: GuestMem) -> Self {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("irq eventfd");
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().expect("clone irq")));
        let n = beacon_common::lock(&device).queue_max_sizes().len();
        let queue_events: Vec<EventFd> = (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("queue eventfd"))
            .collect();
        let dups = queue_events
            .iter()
            .map(|e| e.try_clone().expect("dup"))
            .collect();
        let transport = MmioTransport::new(device.clone(), mem.clone(), interrupt.clone(), dups)
            .expect("transport");
        Self {
            mem,
            transport,
            device,
            irq,
            interrupt,
            queue_events,
        }
    }

    /// A subscriber for the device, for an event loop in tests.
    pub fn subscriber(&self) -> VirtioSubscriber {
        VirtioSubscriber::new(
            self.device.clone(),
            self.queue_events
                .iter()
                .map(|e| e.try_clone().expect("dup"))
                .collect(),
        )
    }

    pub fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write32(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// The device's offered features.
    pub fn offered_features(&mut self) -> u64 {
        self.write32(0x14, 0);
        let low = u64::from(self.read32(0x10));
        self.write32(0x14, 1);
        low | (u64::from(self.read32(0x10)) << 32)
    }

    /// Initialise like Linux: reset, ACK, DRIVER, features (`accept` masked by the
    /// offer, VERSION_1 always), FEATURES_OK, the queues, DRIVER_OK. Returns the
    /// final status register.
    pub fn bring_up(&mut self, accept: u64, queues: &[DriverQueue]) -> u32 {
        self.write32(0x70, 0);
        self.write32(0x70, 1);
        self.write32(0x70, 1 | 2);
        let features = (self.offered_features() & accept) | VIRTIO_F_VERSION_1;
        self.write32(0x24, 0);
        self.write32(0x20, features as u32);
        self.write32(0x24, 1);
        self.write32(0x20, (features >> 32) as u32);
        self.write32(0x70, 1 | 2 | 8);
        for (i, q) in queues.iter().enumerate() {
            self.write32(0x30, i as u32);
            self.write32(0x38, u32::from(q.size));
            self.write32(0x80, q.desc as u32);
            self.write32(0x84, (q.desc >> 32) as u32);
            self.write32(0x90, q.avail as u32);
            self.write32(0x94, (q.avail >> 32) as u32);
            self.write32(0xa0, q.used as u32);
            self.write32(0xa4, (q.used >> 32) as u32);
            self.write32(0x44, 1);
        }
        self.write32(0x70, 1 | 2 | 8 | 4);
        self.read32(0x70)
    }

    /// Deliver a notification for queue `index` to the device the way the event
    /// loop does (through a real `EventManager`, so the device gets `EventOps`).
    pub fn notify(&mut self, index: usize) {
        let _ = self.queue_events[index].read();
        let mut manager =
            event_manager::EventManager::<Arc<Mutex<OneShot>>>::new().expect("event manager");
        let shot = Arc::new(Mutex::new(OneShot {
            device: self.device.clone(),
            index,
            evt: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        }));
        manager.add_subscriber(shot);
        manager.run_with_timeout(1000).expect("event loop turn");
    }
}

/// Delivers one queue notification from inside an event loop turn.
struct OneShot {
    device: Arc<Mutex<dyn VirtioDevice>>,
    index: usize,
    evt: EventFd,
}

impl event_manager::MutEventSubscriber for OneShot {
    fn init(&mut self, ops: &mut event_manager::EventOps) {
        if self.evt.write(1).is_ok() {
            let _ = ops.add(event_manager::Events::new(
                &self.evt,
                event_manager::EventSet::IN,
            ));
        }
    }

    fn process(&mut self, _events: event_manager::Events, ops: &mut event_manager::EventOps) {
        let _ = self.evt.read();
        let mut device = beacon_common::lock(&self.device);
        if device.is_activated() {
            device.queue_notified(self.index, ops);
        }
    }
}
