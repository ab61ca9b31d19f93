//! The virtio-mmio transport, version 2 (virtio 1.x): one 4 KiB register block per
//! device on the VMM's MMIO bus.
//!
//! The transport owns feature negotiation, the device status state machine and
//! the queue configuration registers; on DRIVER_OK it checks every ready queue
//! against guest memory and hands the queues to the device ([`Activation`]). A
//! driver that breaks the protocol (features it was not offered, a queue outside
//! guest memory, a status step out of order) gets a refusal the spec defines
//! (FEATURES_OK not latched, DEVICE_NEEDS_RESET), never a panic. Register accesses
//! must be aligned 32-bit; anything else reads as zero and is ignored, with a
//! throttled log line.
//!
//! Queue notifications normally never reach this code: the VMM registers an
//! ioeventfd on [`NOTIFY_REG_OFFSET`] per queue. A write that does arrive here
//! (no ioeventfd, or tests) is forwarded to the same eventfd.
//!
//! [`MmioTransport::state`] reads a device's registers and the indexes of its
//! rings for the host (`beacon-vmm ctl devices`: why is a queue stalled?); it
//! reads guest memory without trusting it and never changes anything.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;

use super::device::{
    Activation, GuestMem, Interrupt, VirtioDevice, DEVICE_NEEDS_RESET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::bus::BusDevice;
use crate::throttle::Throttle;

/// Bytes of MMIO space one device occupies.
pub const MMIO_REGION_SIZE: u64 = 0x1000;
/// The QueueNotify register (the VMM's ioeventfds sit here).
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// "BCON": our vendor id.
const VENDOR_ID: u32 = 0x4e4f_4342;
const CONFIG_SPACE_OFFSET: u64 = 0x100;

// Device status bits (virtio 1.2, 2.1).
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const FAILED: u32 = 0x80;

mod reg {
    pub const MAGIC: u64 = 0x00;
    pub const VERSION: u64 = 0x04;
    pub const DEVICE_ID: u64 = 0x08;
    pub const VENDOR_ID: u64 = 0x0c;
    pub const DEVICE_FEATURES: u64 = 0x10;
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM_MAX: u64 = 0x34;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const QUEUE_NOTIFY: u64 = 0x50;
    pub const INTERRUPT_STATUS: u64 = 0x60;
    pub const INTERRUPT_ACK: u64 = 0x64;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    pub const QUEUE_DESC_HIGH: u64 = 0x84;
    pub const QUEUE_AVAIL_LOW: u64 = 0x90;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x94;
    pub const QUEUE_USED_LOW: u64 = 0xa0;
    pub const QUEUE_USED_HIGH: u64 = 0xa4;
    pub const SHM_SEL: u64 = 0xac;
    pub const SHM_LEN_LOW: u64 = 0xb0;
    pub const SHM_LEN_HIGH: u64 = 0xb4;
    pub const CONFIG_GENERATION: u64 = 0xfc;
}

/// A device's transport state, for the host's eyes only ([`MmioTransport::state`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    /// The device status register.
    pub status: u32,
    /// Whether the device was handed its queues (DRIVER_OK accepted).
    pub activated: bool,
    /// InterruptStatus: bits raised and not yet acknowledged by the driver.
    pub interrupt_status: u32,
    pub acked_features: u64,
    pub queues: Vec<QueueState>,
}

/// One queue's configuration and ring indexes. The ring fields are read from
/// guest memory at the moment of the call; `None` where the ring is not
/// configured or its address is not guest RAM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    pub ready: bool,
    pub size: u16,
    pub avail_flags: Option<u16>,
    /// The driver's next available index.
    pub avail_idx: Option<u16>,
    /// With VIRTIO_RING_F_EVENT_IDX: the used index the driver wants an
    /// interrupt at.
    pub used_event: Option<u16>,
    pub used_flags: Option<u16>,
    /// The device's next used index.
    pub used_idx: Option<u16>,
    /// With VIRTIO_RING_F_EVENT_IDX: the available index the device wants a
    /// notification at.
    pub avail_event: Option<u16>,
}

/// One queue's state; `mem` is read at the ring addresses the driver set.
fn queue_state(q: &Queue, mem: &impl vm_memory::GuestMemory) -> QueueState {
    let read = |base: u64, offset: u64| -> Option<u16> {
        let addr = base.checked_add(offset)?;
        mem.read_obj::<u16>(GuestAddress(addr)).ok()
    };
    let size = q.size();
    let ring = 2 * u64::from(size);
    let (avail, used) = (q.avail_ring(), q.used_ring());
    let configured = q.ready() || avail != 0 || used != 0;
    let at = |base: u64, offset: u64| if configured { read(base, offset) } else { None };
    QueueState {
        ready: q.ready(),
        size,
        avail_flags: at(avail, 0),
        avail_idx: at(avail, 2),
        used_event: at(avail, 4 + ring),
        used_flags: at(used, 0),
        used_idx: at(used, 2),
        // Used ring elements are 8 bytes each.
        avail_event: at(used, 4 + 4 * ring),
    }
}

/// One virtio device's register block.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMem,
    interrupt: Arc<Interrupt>,
    /// Duplicates of the queues' notification eventfds.
    queue_events: Vec<EventFd>,
    /// The driver's queue configuration (copies go to the device on DRIVER_OK).
    queues: Vec<Queue>,
    /// The driver wrote a queue size the queue cannot take.
    bad_size: Vec<bool>,
    offered_features: u64,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    activated: bool,
    odd_access: Throttle,
    protocol_error: Throttle,
}

impl MmioTransport {
    /// A transport for `device`, raising `interrupt`, with one notification
    /// eventfd per queue (the VMM's ioeventfds; duplicates are kept here).
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMem,
        interrupt: Arc<Interrupt>,
        queue_events: Vec<EventFd>,
    ) -> Result<Self, std::io::Error> {
        let (sizes, offered_features) = {
            let d = beacon_common::lock(&device);
            (
                d.queue_max_sizes().to_vec(),
                d.features() | VIRTIO_F_VERSION_1,
            )
        };
        if queue_events.len() != sizes.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the device has {} queues but {} notification eventfds were given",
                    sizes.len(),
                    queue_events.len()
                ),
            ));
        }
        let queues = sizes
            .iter()
            .map(|&max| {
                Queue::new(max).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("queue size {max}: {e}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queue_events,
            bad_size: vec![false; queues.len()],
            queues,
            offered_features,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            activated: false,
            odd_access: Throttle::default(),
            protocol_error: Throttle::default(),
        })
    }

    /// The device status register (for tests and diagnostics).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The registers and ring indexes now (see [`TransportState`]).
    pub fn state(&self) -> TransportState {
        let mem = self.mem.memory();
        TransportState {
            device_type: beacon_common::lock(&self.device).device_type(),
            status: self.status,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            acked_features: self.acked_features,
            queues: self.queues.iter().map(|q| queue_state(q, &*mem)).collect(),
        }
    }

    fn protocol_error(&mut self, what: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.protocol_error.allow() {
            let device = beacon_common::lock(&self.device).device_type();
            tracing::warn!(device, suppressed, "virtio-mmio: {what}");
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// The selected queue, only while the driver may still configure it.
    fn configurable_queue(&mut self) -> Option<&mut Queue> {
        if self.status & DRIVER_OK != 0 {
            return None;
        }
        self.selected_queue().filter(|q| !q.ready())
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => beacon_common::lock(&self.device).device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => self.offered_features as u32,
                1 => (self.offered_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status | self.device_needs_reset(),
            // No shared memory regions: a length of all ones means "none".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM => {
                let index = self.queue_select as usize;
                if let Some(q) = self.configurable_queue() {
                    let fits = u16::try_from(value)
                        .ok()
                        .filter(|&n| n != 0 && n <= q.max_size() && n.is_power_of_two());
                    match fits {
                        Some(n) => q.set_size(n),
                        None => {
                            self.bad_size[index] = true;
                            self.protocol_error(format_args!(
                                "queue {index} size {value} is not a power of two up to the maximum"
                            ));
                            return;
                        }
                    }
                    self.bad_size[index] = false;
                }
            }
            reg::QUEUE_READY => {
                if self.status & DRIVER_OK == 0 {
                    if let Some(q) = self.selected_queue() {
                        q.set_ready(value == 1);
                    }
                }
            }
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            reg::QUEUE_DESC_LOW => {
                self.set_queue_address(|q| q.set_desc_table_address(Some(value), None))
            }
            reg::QUEUE_DESC_HIGH => {
                self.set_queue_address(|q| q.set_desc_table_address(None, Some(value)))
            }
            reg::QUEUE_AVAIL_LOW => {
                self.set_queue_address(|q| q.set_avail_ring_address(Some(value), None))
            }
            reg::QUEUE_AVAIL_HIGH => {
                self.set_queue_address(|q| q.set_avail_ring_address(None, Some(value)))
            }
            reg::QUEUE_USED_LOW => {
                self.set_queue_address(|q| q.set_used_ring_address(Some(value), None))
            }
            reg::QUEUE_USED_HIGH => {
                self.set_queue_address(|q| q.set_used_ring_address(None, Some(value)))
            }
            reg::SHM_SEL => {}
            _ => self.protocol_error(format_args!(
                "write of {value:#x} to read-only or unknown register {offset:#x} ignored"
            )),
        }
    }

    fn set_queue_address(&mut self, set: impl FnOnce(&mut Queue)) {
        match self.configurable_queue() {
            Some(q) => set(q),
            None => self.protocol_error(format_args!(
                "queue address written for a queue that is unknown, ready or live; ignored"
            )),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & DRIVER == 0 || self.status & FEATURES_OK != 0 {
            self.protocol_error(format_args!(
                "driver features written outside feature negotiation; ignored"
            ));
            return;
        }
        let shift = match self.driver_features_select {
            0 => 0,
            1 => 32,
            page => {
                self.protocol_error(format_args!("driver features page {page} does not exist"));
                return;
            }
        };
        let page_mask = 0xffff_ffffu64 << shift;
        let wanted = u64::from(value) << shift;
        let unoffered = wanted & !self.offered_features;
        if unoffered != 0 {
            self.protocol_error(format_args!(
                "driver acked features {unoffered:#x} it was not offered; dropped"
            ));
        }
        self.acked_features = (self.acked_features & !page_mask) | (wanted & self.offered_features);
    }

    fn notify(&mut self, queue: u32) {
        match self.queue_events.get(queue as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::debug!("forwarding a queue notification failed: {e}");
                }
            }
            None => self.protocol_error(format_args!("notification for unknown queue {queue}")),
        }
    }

    /// DEVICE_NEEDS_RESET when the device itself asks for it.
    fn device_needs_reset(&self) -> u32 {
        if beacon_common::lock(&self.device).needs_reset() {
            DEVICE_NEEDS_RESET
        } else {
            0
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Latch what the driver has seen, so writing it back is no error.
        self.status |= self.device_needs_reset();
        if value & !self.status & DEVICE_NEEDS_RESET != 0 {
            self.protocol_error(format_args!("driver tried to set DEVICE_NEEDS_RESET"));
        }
        let value = value & !DEVICE_NEEDS_RESET | (self.status & DEVICE_NEEDS_RESET);
        let current = self.status;
        if value & current != current {
            self.protocol_error(format_args!(
                "status {value:#x} clears bits of {current:#x} without a reset; ignored"
            ));
            return;
        }
        let new = value & !self.status;
        // Each step needs the ones before it.
        let needs = |bit: u32, before: u32| new & bit != 0 && value & before != before;
        if needs(DRIVER, ACKNOWLEDGE)
            || needs(FEATURES_OK, ACKNOWLEDGE | DRIVER)
            || needs(DRIVER_OK, ACKNOWLEDGE | DRIVER | FEATURES_OK)
        {
            self.protocol_error(format_args!(
                "status {value:#x} skips a step of the initialisation; ignored"
            ));
            return;
        }
        let mut latched = value;
        if new & FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // Legacy drivers are not supported: the driver reads FEATURES_OK back
            // as clear and gives up on the device.
            self.protocol_error(format_args!(
                "driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)"
            ));
            latched &= !FEATURES_OK;
        }
        if new & FAILED != 0 {
            // The guest can set it at will: throttled like its mistakes.
            self.protocol_error(format_args!("the guest driver marked the device FAILED"));
        }
        self.status = latched;
        if new & DRIVER_OK != 0 && latched & DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mem = self.mem.memory();
        let bad = self
            .queues
            .iter()
            .zip(&self.bad_size)
            .position(|(q, bad_size)| q.ready() && (*bad_size || !q.is_valid(&*mem)));
        drop(mem);
        if let Some(index) = bad {
            self.protocol_error(format_args!(
                "queue {index} is not inside guest memory or has a bad size; device needs reset"
            ));
            self.needs_reset();
            return;
        }
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queues = self
            .queues
            .iter()
            .map(|q| copy_queue(q, event_idx))
            .collect();
        let queue_events = match self
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(evts) => evts,
            Err(e) => {
                tracing::error!("virtio-mmio: duplicating queue eventfds: {e}");
                self.needs_reset();
                return;
            }
        };
        let activation = Activation {
            acked_features: self.acked_features,
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues,
            queue_events,
        };
        let mut device = beacon_common::lock(&self.device);
        match device.activate(activation) {
            Ok(()) => {
                self.activated = true;
                tracing::debug!(device = device.device_type(), "virtio device activated");
            }
            Err(e) => {
                drop(device);
                // The driver can retry at will: throttled like its other mistakes.
                self.protocol_error(format_args!("virtio device failed to activate: {e}"));
                self.needs_reset();
            }
        }
    }

    fn needs_reset(&mut self) {
        self.status |= DEVICE_NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    fn reset(&mut self) {
        if self.activated {
            beacon_common::lock(&self.device).reset();
            self.activated = false;
        }
        for q in self.queues.iter_mut() {
            q.reset();
        }
        self.bad_size.fill(false);
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.status = 0;
        self.interrupt.clear();
    }

    fn odd_access(&mut self, what: &str, offset: u64, len: usize) {
        if let Some(suppressed) = self.odd_access.allow() {
            tracing::debug!(offset, len, suppressed, "virtio-mmio: ignored {what}");
        }
    }
}

/// The device's own copy of a queue the driver configured.
fn copy_queue(q: &Queue, event_idx: bool) -> Queue {
    let mut copy = Queue::new(q.max_size()).unwrap_or_default();
    copy.set_size(q.size());
    let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
    let (lo, hi) = split(q.desc_table());
    copy.set_desc_table_address(lo, hi);
    let (lo, hi) = split(q.avail_ring());
    copy.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(q.used_ring());
    copy.set_used_ring_address(lo, hi);
    copy.set_event_idx(event_idx);
    copy.set_ready(q.ready());
    copy
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if offset >= MMIO_REGION_SIZE {
                data.fill(0);
                return;
            }
            beacon_common::lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            self.odd_access("register read", offset, data.len());
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if offset >= MMIO_REGION_SIZE || self.status & DRIVER == 0 {
                self.odd_access("config write", offset, data.len());
                return;
            }
            beacon_common::lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.odd_access("register write", offset, data.len());
            return;
        };
        if !offset.is_multiple_of(4) {
            self.odd_access("unaligned register write", offset, data.len());
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests;
