//! The hotplug controller: one MMIO page the guest's ACPI code (the DSDT's
//! GED and CPU hotplug methods) reads and writes to learn what changed and to
//! answer.
//!
//! Register layout (offsets in the page; the AML in `beacon-vmm`'s `acpi`
//! module must agree):
//! - [`GED_EVENTS`] (u32, read clears): pending event bits ([`EVENT_CPU`]);
//!   the GED's `_EVT` reads it when the interrupt fires.
//! - [`CPU_SELECT`] (u32, read/write): the CPU the next status access is about.
//! - [`CPU_STATUS`] (u8): read gives the selected CPU's [`CPU_ENABLED`],
//!   [`CPU_INSERTING`] and [`CPU_REMOVING`] bits; a write of
//!   [`CPU_INSERTING`] acknowledges an insertion, of [`CPU_REMOVING`] a
//!   removal request (so the next scan does not repeat it), and [`CPU_EJECT`]
//!   says the guest has let the CPU go (its `_EJ0`), which only a CPU the VMM
//!   asked back may do ([`HotplugSlot::eject_allowed`]).
//! - [`MEM_SELECT`] (u32) and [`MEM_STATUS`] (u8): the same for the memory
//!   blocks of the hotplug room (ACPI memory devices), with the same status
//!   bits; the GED event is [`EVENT_MEMORY`].
//!
//! The device owns only these registers and the per-CPU and per-block state
//! behind them ([`HotplugState`]); creating and stopping vCPUs, mapping
//! memory and raising the GED interrupt belong to the VMM, which waits for every acknowledgement and
//! ejection on the state's condition variable.
//! The GED interrupt is level-triggered ([`GedLine`]): the VMM raises it
//! through a KVM irqfd with a resample eventfd, and [`GedResampler`] raises it
//! again after each end-of-interrupt while events are still unread. So an
//! event raised before the guest's GED driver unmasked the line is delivered
//! when it does, never lost.
//!
//! Everything here is guest-controlled input: any offset, size or value is
//! handled, a CPU or block index out of range selects nothing, and the guest
//! can never eject a CPU or a memory block the VMM did not ask to remove.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Size of the controller's MMIO window.
pub const HOTPLUG_REGION_SIZE: u64 = 0x1000;
/// Offset of the pending GED event bits (u32, read clears).
pub const GED_EVENTS: u64 = 0x0;
/// Offset of the CPU selector (u32).
pub const CPU_SELECT: u64 = 0x10;
/// Offset of the selected CPU's status and command byte (u8).
pub const CPU_STATUS: u64 = 0x14;
/// Offset of the memory block selector (u32).
pub const MEM_SELECT: u64 = 0x20;
/// Offset of the selected memory block's status and command byte (u8; the
/// same bits as [`CPU_STATUS`]).
pub const MEM_STATUS: u64 = 0x24;

/// GED event bit: rescan the CPUs.
pub const EVENT_CPU: u32 = 1 << 0;
/// GED event bit: rescan the memory blocks.
pub const EVENT_MEMORY: u32 = 1 << 1;

/// Status bit: the CPU is present (its `_STA` says enabled).
pub const CPU_ENABLED: u8 = 1 << 0;
/// Status bit: the CPU was added and the guest was not told yet; writing it
/// acknowledges.
pub const CPU_INSERTING: u8 = 1 << 1;
/// Status bit: the VMM asks the guest to give the CPU back; writing it
/// acknowledges the request.
pub const CPU_REMOVING: u8 = 1 << 2;
/// Command bit: the guest ejected the CPU (write only).
pub const CPU_EJECT: u8 = 1 << 3;

/// One hotpluggable CPU or memory block, as the guest sees it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HotplugSlot {
    pub enabled: bool,
    /// Insertion not yet acknowledged.
    pub inserting: bool,
    /// Removal request not yet acknowledged (the guest was not told yet).
    pub removing: bool,
    /// The VMM asked for this CPU or block back: the guest may eject it.
    pub eject_allowed: bool,
}

/// Per-CPU and per-memory-block hotplug state shared by the controller
/// (guest side) and the VMM.
#[derive(Debug, Default)]
pub struct HotplugSlots {
    pub cpus: Vec<HotplugSlot>,
    /// The hotplug room's blocks, lowest address first.
    pub memory: Vec<HotplugSlot>,
    /// GED events not yet read by the guest.
    pub pending_events: u32,
}

/// The state and the condition variable the VMM waits on for the guest's
/// answers.
#[derive(Debug, Default)]
pub struct HotplugState {
    slots: Mutex<HotplugSlots>,
    changed: Condvar,
}

impl HotplugState {
    /// `max` CPU slots, the first `boot` enabled, and `memory_blocks` absent
    /// memory blocks.
    pub fn new(boot: u8, max: u8, memory_blocks: usize) -> Arc<Self> {
        let cpus = (0..max)
            .map(|i| HotplugSlot {
                enabled: i < boot,
                ..HotplugSlot::default()
            })
            .collect();
        Arc::new(Self {
            slots: Mutex::new(HotplugSlots {
                cpus,
                memory: vec![HotplugSlot::default(); memory_blocks],
                pending_events: 0,
            }),
            changed: Condvar::new(),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, HotplugSlots> {
        beacon_common::lock(&self.slots)
    }

    /// Wake whoever waits in [`HotplugState::wait_until`].
    pub fn notify(&self) {
        self.changed.notify_all();
    }

    /// Wait until `done` holds or `timeout` passes; true if it holds.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&HotplugSlots) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut slots = self.lock();
        loop {
            if done(&slots) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            slots = match self.changed.wait_timeout(slots, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

/// The VMM's side of the GED interrupt: record events, then assert the line.
pub struct GedLine {
    state: Arc<HotplugState>,
    irq: EventFd,
}

impl GedLine {
    /// `irq` is the trigger eventfd of a resample irqfd (level-triggered).
    pub fn new(state: Arc<HotplugState>, irq: EventFd) -> Self {
        Self { state, irq }
    }

    /// Record `events` for the guest's `_EVT` and assert the interrupt.
    pub fn raise(&self, events: u32) {
        self.state.lock().pending_events |= events;
        if let Err(e) = self.irq.write(1) {
            tracing::error!("cannot raise the GED interrupt: {e}");
        }
    }
}

/// On the event loop: after the guest's end-of-interrupt (the resample
/// eventfd), assert the line again while events are unread.
pub struct GedResampler {
    state: Arc<HotplugState>,
    irq: EventFd,
    resample: EventFd,
}

impl GedResampler {
    pub fn new(state: Arc<HotplugState>, irq: EventFd, resample: EventFd) -> Self {
        Self {
            state,
            irq,
            resample,
        }
    }
}

impl MutEventSubscriber for GedResampler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.resample, EventSet::IN)) {
            tracing::error!("cannot watch the GED resample eventfd: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Clears the counter; WouldBlock only means there was nothing to clear.
        let _ = self.resample.read();
        if self.state.lock().pending_events != 0 {
            if let Err(e) = self.irq.write(1) {
                tracing::error!("cannot raise the GED interrupt again: {e}");
            }
        }
    }
}

/// The guest-facing registers.
pub struct HotplugController {
    state: Arc<HotplugState>,
    selected: u32,
    selected_memory: u32,
}

/// Which kind of slot a status access is about.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cpu,
    Memory,
}

impl HotplugController {
    pub fn new(state: Arc<HotplugState>) -> Self {
        Self {
            state,
            selected: 0,
            selected_memory: 0,
        }
    }

    fn slot(slots: &mut HotplugSlots, kind: Kind, index: u32) -> Option<&mut HotplugSlot> {
        let index = usize::try_from(index).ok()?;
        match kind {
            Kind::Cpu => slots.cpus.get_mut(index),
            Kind::Memory => slots.memory.get_mut(index),
        }
    }

    fn read_status(&self, kind: Kind, index: u32, data: &mut [u8]) {
        let mut slots = self.state.lock();
        if let Some(slot) = Self::slot(&mut slots, kind, index) {
            data[0] = Self::status_byte(slot);
        }
    }

    /// A command written to a status byte: acknowledgements and ejection.
    fn command(&self, kind: Kind, index: u32, value: u8) {
        let mut slots = self.state.lock();
        let Some(slot) = Self::slot(&mut slots, kind, index) else {
            return;
        };
        if value & CPU_INSERTING != 0 {
            slot.inserting = false;
        }
        if value & CPU_REMOVING != 0 {
            slot.removing = false;
        }
        // Only what the VMM asked back can go, and never the boot CPU.
        let never = kind == Kind::Cpu && index == 0;
        if value & CPU_EJECT != 0 && slot.enabled && slot.eject_allowed && !never {
            slot.enabled = false;
            slot.removing = false;
            slot.eject_allowed = false;
            match kind {
                Kind::Cpu => tracing::debug!(vcpu = index, "the guest ejected a vCPU"),
                Kind::Memory => tracing::debug!(block = index, "the guest ejected a memory block"),
            }
        }
        drop(slots);
        self.state.notify();
    }

    fn status_byte(slot: &HotplugSlot) -> u8 {
        let mut b = 0;
        if slot.enabled {
            b |= CPU_ENABLED;
        }
        if slot.inserting {
            b |= CPU_INSERTING;
        }
        if slot.removing {
            b |= CPU_REMOVING;
        }
        b
    }
}

fn put(data: &mut [u8], value: u32) {
    let bytes = value.to_le_bytes();
    for (d, b) in data.iter_mut().zip(bytes) {
        *d = b;
    }
}

impl BusDevice for HotplugController {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match (offset, data.len()) {
            (GED_EVENTS, 4) => {
                let events = std::mem::take(&mut self.state.lock().pending_events);
                put(data, events);
            }
            (CPU_SELECT, 4) => put(data, self.selected),
            (CPU_STATUS, 1) => self.read_status(Kind::Cpu, self.selected, data),
            (MEM_SELECT, 4) => put(data, self.selected_memory),
            (MEM_STATUS, 1) => self.read_status(Kind::Memory, self.selected_memory, data),
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (CPU_SELECT, [a, b, c, d]) => self.selected = u32::from_le_bytes([*a, *b, *c, *d]),
            (CPU_STATUS, [value]) => self.command(Kind::Cpu, self.selected, *value),
            (MEM_SELECT, [a, b, c, d]) => {
                self.selected_memory = u32::from_le_bytes([*a, *b, *c, *d])
            }
            (MEM_STATUS, [value]) => self.command(Kind::Memory, self.selected_memory, *value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller(boot: u8, max: u8) -> (Arc<HotplugState>, HotplugController) {
        let state = HotplugState::new(boot, max, 2);
        let c = HotplugController::new(state.clone());
        (state, c)
    }

    fn status(c: &mut HotplugController, cpu: u32) -> u8 {
        c.write(CPU_SELECT, &cpu.to_le_bytes());
        let mut b = [0u8];
        c.read(CPU_STATUS, &mut b);
        b[0]
    }

    #[test]
    fn boot_cpus_are_enabled_and_the_rest_absent() {
        let (_s, mut c) = controller(1, 3);
        assert_eq!(status(&mut c, 0), CPU_ENABLED);
        assert_eq!(status(&mut c, 1), 0);
        assert_eq!(status(&mut c, 2), 0);
        assert_eq!(status(&mut c, 3), 0, "out of range reads as absent");
        assert_eq!(status(&mut c, u32::MAX), 0);
    }

    #[test]
    fn insertion_is_acknowledged_and_events_read_clear() {
        let (s, mut c) = controller(1, 2);
        {
            let mut cpus = s.lock();
            cpus.cpus[1] = HotplugSlot {
                enabled: true,
                inserting: true,
                ..HotplugSlot::default()
            };
            cpus.pending_events |= EVENT_CPU;
        }
        let mut ev = [0u8; 4];
        c.read(GED_EVENTS, &mut ev);
        assert_eq!(u32::from_le_bytes(ev), EVENT_CPU);
        c.read(GED_EVENTS, &mut ev);
        assert_eq!(u32::from_le_bytes(ev), 0, "read clears");
        assert_eq!(status(&mut c, 1), CPU_ENABLED | CPU_INSERTING);
        c.write(CPU_STATUS, &[CPU_INSERTING]);
        assert_eq!(status(&mut c, 1), CPU_ENABLED);
        assert!(s.wait_until(Duration::ZERO, |cpus| !cpus.cpus[1].inserting));
    }

    #[test]
    fn only_a_cpu_asked_back_can_be_ejected_and_never_cpu0() {
        let (s, mut c) = controller(2, 2);
        c.write(CPU_SELECT, &1u32.to_le_bytes());
        c.write(CPU_STATUS, &[CPU_EJECT]);
        assert_eq!(status(&mut c, 1), CPU_ENABLED, "not asked: stays");
        s.lock().cpus[0].eject_allowed = true;
        c.write(CPU_SELECT, &0u32.to_le_bytes());
        c.write(CPU_STATUS, &[CPU_EJECT]);
        assert_eq!(status(&mut c, 0) & CPU_ENABLED, CPU_ENABLED, "CPU 0 stays");
        {
            let mut cpus = s.lock();
            cpus.cpus[1].removing = true;
            cpus.cpus[1].eject_allowed = true;
        }
        assert_eq!(status(&mut c, 1), CPU_ENABLED | CPU_REMOVING);
        c.write(CPU_STATUS, &[CPU_REMOVING]);
        assert_eq!(status(&mut c, 1), CPU_ENABLED, "request acknowledged once");
        c.write(CPU_SELECT, &1u32.to_le_bytes());
        c.write(CPU_STATUS, &[CPU_EJECT]);
        assert_eq!(status(&mut c, 1), 0);
        assert!(!s.lock().cpus[1].eject_allowed, "one ejection per request");
    }

    fn memory_status(c: &mut HotplugController, block: u32) -> u8 {
        c.write(MEM_SELECT, &block.to_le_bytes());
        let mut b = [0u8];
        c.read(MEM_STATUS, &mut b);
        b[0]
    }

    #[test]
    fn memory_blocks_are_inserted_and_ejected_only_when_asked() {
        let (s, mut c) = controller(1, 1);
        assert_eq!(memory_status(&mut c, 0), 0, "absent at boot");
        assert_eq!(memory_status(&mut c, 2), 0, "out of range");
        {
            let mut slots = s.lock();
            slots.memory[1] = HotplugSlot {
                enabled: true,
                inserting: true,
                ..HotplugSlot::default()
            };
            slots.pending_events |= EVENT_MEMORY;
        }
        let mut ev = [0u8; 4];
        c.read(GED_EVENTS, &mut ev);
        assert_eq!(u32::from_le_bytes(ev), EVENT_MEMORY);
        assert_eq!(memory_status(&mut c, 1), CPU_ENABLED | CPU_INSERTING);
        c.write(MEM_STATUS, &[CPU_INSERTING]);
        assert_eq!(memory_status(&mut c, 1), CPU_ENABLED);
        c.write(MEM_STATUS, &[CPU_EJECT]);
        assert_eq!(
            memory_status(&mut c, 1),
            CPU_ENABLED,
            "not asked back: stays"
        );
        {
            let mut slots = s.lock();
            slots.memory[1].removing = true;
            slots.memory[1].eject_allowed = true;
        }
        assert_eq!(memory_status(&mut c, 1), CPU_ENABLED | CPU_REMOVING);
        c.write(MEM_STATUS, &[CPU_EJECT]);
        assert_eq!(memory_status(&mut c, 1), 0);
        assert!(s.lock().cpus[0].enabled, "CPUs untouched");
        let mut sel = [0u8; 4];
        c.read(MEM_SELECT, &mut sel);
        assert_eq!(u32::from_le_bytes(sel), 1);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (_s, mut c) = controller(1, 2);
        for offset in [
            0u64,
            1,
            3,
            0x10,
            0x11,
            0x14,
            0x15,
            0x20,
            0x24,
            0x25,
            0xfff,
            0x1000,
            u64::MAX,
        ] {
            for len in [0usize, 1, 2, 3, 4, 8] {
                let mut buf = vec![0xaau8; len];
                c.read(offset, &mut buf);
                c.write(offset, &buf);
            }
        }
        assert_eq!(status(&mut c, 0), CPU_ENABLED);
        assert_eq!(status(&mut c, 1), 0);
    }
}
