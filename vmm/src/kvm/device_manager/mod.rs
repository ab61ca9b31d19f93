//! Everything a VM's devices hang off: the port I/O and MMIO buses the vCPUs
//! route exits through, the resource allocator (GSIs, MMIO space, ports), the
//! irqfd and ioeventfd registrations with KVM, the device event loop, and the
//! AML that describes each device in the DSDT.
//!
//! Attaching a virtio device is one call in fixed steps ([`DeviceManager::attach_virtio`]):
//! allocate an interrupt line and an MMIO window → register the irqfd and one
//! ioeventfd per queue → put the virtio-mmio transport on the bus → subscribe the
//! device to the event loop → record it for the DSDT. The ACPI tables are written
//! after every device is attached, from [`DeviceManager::dsdt_aml`].
//!
//! The hotplug controller ([`DeviceManager::attach_hotplug`]) is attached the
//! same way, with a level-triggered GED interrupt (a resample irqfd).
//!
//! This module never knows what a device does; device models live in
//! `beacon-devices`, and which devices a VM gets comes from its config.

pub mod legacy;
pub mod resources;

use std::sync::{Arc, Mutex};

use beacon_devices::virtio::{
    Interrupt, MmioTransport, VirtioDevice, VirtioSubscriber, MMIO_REGION_SIZE, NOTIFY_REG_OFFSET,
};
use beacon_devices::Bus;
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{IoapicPin, VirtioReport, VmError};
use crate::config::ConsoleConfig;
use crate::kvm::builder::hv;
use crate::kvm::console::{ConsoleBuffer, ConsoleOutput, SharedSerial};
use crate::kvm::event_loop::EventLoop;
use crate::kvm::memory::GuestMem;
use crate::seccomp::SeccompMode;

pub use legacy::{LegacyHooks, COM1_GSI, COM1_PORT};
use resources::ResourceAllocator;

/// One attached virtio-mmio device, as the DSDT and the kernel command line
/// describe it.
#[derive(Debug, Clone)]
pub struct VirtioMmioInfo {
    /// What it is ("rng", "net", ...), for logs.
    pub kind: &'static str,
    pub base: u64,
    pub gsi: u32,
}

/// The hotplug controller, as the DSDT describes it.
#[derive(Debug, Clone)]
pub struct HotplugInfo {
    pub base: u64,
    pub gsi: u32,
    pub max_vcpus: u8,
    /// The memory hotplug room's blocks, `(guest address, bytes)`.
    pub memory_blocks: Vec<(u64, u64)>,
}

struct AttachedVirtio {
    info: VirtioMmioInfo,
    device: Arc<Mutex<dyn VirtioDevice>>,
    /// Its register block (also on the MMIO bus), for [`DeviceManager::virtio_states`].
    transport: Arc<Mutex<MmioTransport>>,
    /// The irqfd; kept open for the life of the VM.
    _irq: EventFd,
}

/// The devices of one VM.
pub struct DeviceManager {
    vm: Arc<VmFd>,
    mem: GuestMem,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    resources: ResourceAllocator,
    event_loop: EventLoop,
    serial: Option<SharedSerial>,
    console: Option<Arc<ConsoleBuffer>>,
    _serial_irq: Option<EventFd>,
    virtio: Vec<AttachedVirtio>,
    hotplug: Option<HotplugInfo>,
}

impl DeviceManager {
    /// Empty buses and an event loop that does not run yet.
    pub fn new(vm: Arc<VmFd>, mem: GuestMem) -> Result<Self, VmError> {
        Ok(Self {
            vm,
            mem,
            io_bus: Arc::new(Bus::new()),
            mmio_bus: Arc::new(Bus::new()),
            resources: ResourceAllocator::new()?,
            event_loop: EventLoop::new()?,
            serial: None,
            console: None,
            _serial_irq: None,
            virtio: Vec::new(),
            hotplug: None,
        })
    }

    /// The port I/O bus (vCPUs route IN/OUT exits here).
    pub fn io_bus(&self) -> &Arc<Bus> {
        &self.io_bus
    }

    /// The MMIO bus (vCPUs route MMIO exits here).
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio_bus
    }

    /// The guest memory devices see (vhost back-ends need its regions).
    pub fn guest_memory(&self) -> GuestMem {
        self.mem.clone()
    }

    /// COM1 (tests and the console).
    pub fn serial(&self) -> Option<&SharedSerial> {
        self.serial.as_ref()
    }

    /// Attach COM1 (with `console` behind it), the i8042, the boot timer and
    /// the ACPI PM registers.
    /// `output` replaces the output `console` names (tests).
    pub fn attach_legacy(
        &mut self,
        console: &ConsoleConfig,
        output: Option<ConsoleOutput>,
        hooks: LegacyHooks,
    ) -> Result<(), VmError> {
        let legacy = legacy::attach(
            &self.vm,
            &self.io_bus,
            &mut self.resources,
            console,
            output,
            hooks,
        )?;
        for s in legacy.subscribers {
            self.event_loop.add(s)?;
        }
        self.serial = Some(legacy.serial);
        self._serial_irq = Some(legacy.serial_irq);
        self.console = legacy.console;
        Ok(())
    }

    /// Console bytes dropped because nobody read them in time.
    pub fn console_dropped(&self) -> u64 {
        self.console.as_ref().map_or(0, |c| c.dropped())
    }

    /// Attach a virtio device on its own virtio-mmio transport.
    pub fn attach_virtio(
        &mut self,
        kind: &'static str,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<VirtioMmioInfo, VmError> {
        let queues = beacon_common::lock(&device).queue_max_sizes().len();
        // 1. Resources.
        let gsi = self.resources.allocate_gsi()?;
        let base = match self
            .resources
            .allocate_mmio(MMIO_REGION_SIZE, MMIO_REGION_SIZE)
        {
            Ok(base) => base,
            Err(e) => {
                self.resources.free_gsi(gsi);
                return Err(e);
            }
        };
        let attached = self.wire_virtio(kind, device.clone(), queues, base, gsi);
        if attached.is_err() {
            // KVM registrations made so far die with their eventfds (and the VM).
            self.resources.free_mmio(base, MMIO_REGION_SIZE);
            self.resources.free_gsi(gsi);
        }
        let (irq, transport) = attached?;
        let info = VirtioMmioInfo { kind, base, gsi };
        tracing::debug!(
            kind,
            base = format_args!("{base:#x}"),
            gsi,
            queues,
            "virtio device attached"
        );
        self.virtio.push(AttachedVirtio {
            info: info.clone(),
            device,
            transport,
            _irq: irq,
        });
        Ok(info)
    }

    fn wire_virtio(
        &mut self,
        kind: &'static str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        queues: usize,
        base: u64,
        gsi: u32,
    ) -> Result<(EventFd, Arc<Mutex<MmioTransport>>), VmError> {
        let io = |what: &'static str| {
            move |e: std::io::Error| VmError::Device {
                device: kind.into(),
                reason: format!("{what}: {e}"),
            }
        };
        // 2. Interrupt line and queue notifications.
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io("creating its interrupt eventfd"))?;
        self.vm
            .register_irqfd(&irq, gsi)
            .map_err(hv(format!("KVM_IRQFD for {kind} on GSI {gsi}")))?;
        let mut queue_events = Vec::with_capacity(queues);
        for index in 0..queues {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io("creating a queue eventfd"))?;
            let addr = IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET);
            self.vm
                .register_ioevent(&evt, &addr, index as u32)
                .map_err(hv(format!(
                    "KVM_IOEVENTFD for {kind} queue {index} at {:#x}",
                    base + NOTIFY_REG_OFFSET
                )))?;
            queue_events.push(evt);
        }
        let dup = |evts: &[EventFd]| -> Result<Vec<EventFd>, VmError> {
            evts.iter()
                .map(EventFd::try_clone)
                .collect::<Result<_, _>>()
                .map_err(io("duplicating queue eventfds"))
        };
        // 3. The transport on the bus.
        let interrupt = Arc::new(Interrupt::new(
            irq.try_clone()
                .map_err(io("duplicating its interrupt eventfd"))?,
        ));
        let transport = MmioTransport::new(
            device.clone(),
            self.mem.clone(),
            interrupt,
            dup(&queue_events)?,
        )
        .map_err(io("building its virtio-mmio transport"))?;
        let transport = Arc::new(Mutex::new(transport));
        self.mmio_bus
            .insert(base, MMIO_REGION_SIZE, transport.clone())
            .map_err(|e| VmError::Device {
                device: kind.into(),
                reason: e.to_string(),
            })?;
        // 4. The event loop.
        if let Err(e) = self
            .event_loop
            .add(Box::new(VirtioSubscriber::new(device, queue_events)))
        {
            self.mmio_bus.remove(base);
            return Err(e);
        }
        Ok((irq, transport))
    }

    /// Attach the hotplug controller (its MMIO page and the level-triggered
    /// GED interrupt) for a VM of up to `max_vcpus` vCPUs, `boot_vcpus` of
    /// them present at boot, and a memory hotplug room of `memory_blocks`
    /// (`(guest address, bytes)`, none plugged at boot). Returns what the CPU
    /// and memory managers need to hotplug.
    pub fn attach_hotplug(
        &mut self,
        boot_vcpus: u8,
        max_vcpus: u8,
        memory_blocks: Vec<(u64, u64)>,
    ) -> Result<crate::kvm::cpu_manager::HotplugWiring, VmError> {
        use beacon_devices::hotplug::{
            GedLine, GedResampler, HotplugController, HotplugState, HOTPLUG_REGION_SIZE,
        };
        let failed = |what: &'static str| {
            move |e: std::io::Error| VmError::Device {
                device: "hotplug".into(),
                reason: format!("{what}: {e}"),
            }
        };
        let gsi = self.resources.allocate_late_gsi()?;
        let base = self
            .resources
            .allocate_mmio(HOTPLUG_REGION_SIZE, HOTPLUG_REGION_SIZE)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(failed("creating the GED eventfd"))?;
        let resample = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(failed("creating the GED resample eventfd"))?;
        self.vm
            .register_irqfd_with_resample(&irq, &resample, gsi)
            .map_err(hv(format!(
                "KVM_IRQFD (level, resample) for the GED on GSI {gsi}"
            )))?;
        let state = HotplugState::new(boot_vcpus, max_vcpus, memory_blocks.len());
        let controller = HotplugController::new(state.clone());
        self.mmio_bus
            .insert(base, HOTPLUG_REGION_SIZE, Arc::new(Mutex::new(controller)))
            .map_err(|e| VmError::Device {
                device: "hotplug".into(),
                reason: e.to_string(),
            })?;
        let dup = |fd: &EventFd| fd.try_clone().map_err(failed("duplicating a GED eventfd"));
        self.event_loop.add(Box::new(GedResampler::new(
            state.clone(),
            dup(&irq)?,
            resample,
        )))?;
        self.hotplug = Some(HotplugInfo {
            base,
            gsi,
            max_vcpus,
            memory_blocks,
        });
        tracing::debug!(
            base = format_args!("{base:#x}"),
            gsi,
            "hotplug controller attached"
        );
        Ok(crate::kvm::cpu_manager::HotplugWiring {
            ged: Arc::new(GedLine::new(state.clone(), irq)),
            state,
        })
    }

    /// Where the hotplug controller is, if the VM has one.
    pub fn hotplug_info(&self) -> Option<&HotplugInfo> {
        self.hotplug.as_ref()
    }

    /// Every attached virtio device (the memory manager tells them when
    /// guest memory changes).
    pub fn virtio_handles(&self) -> Vec<Arc<Mutex<dyn VirtioDevice>>> {
        self.virtio.iter().map(|d| d.device.clone()).collect()
    }

    /// Every virtio device's transport and ring state now, in attach order,
    /// with its interrupt pin as the guest programmed it in the IOAPIC.
    pub fn virtio_states(&self) -> Vec<VirtioReport> {
        let pins = self.ioapic_pins();
        self.virtio
            .iter()
            .map(|d| VirtioReport {
                kind: d.info.kind.into(),
                mmio_base: d.info.base,
                gsi: d.info.gsi,
                transport: beacon_common::lock(&d.transport).state(),
                pin: pins
                    .as_ref()
                    .and_then(|p| p.get(d.info.gsi as usize))
                    .copied(),
            })
            .collect()
    }

    /// The IOAPIC's redirection entries with its pending-interrupt bits
    /// folded in (KVM_GET_IRQCHIP), or `None` if KVM would not say.
    fn ioapic_pins(&self) -> Option<Vec<IoapicPin>> {
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        if let Err(e) = self.vm.get_irqchip(&mut chip) {
            tracing::debug!("KVM_GET_IRQCHIP (IOAPIC): {e}");
            return None;
        }
        // SAFETY: chip_id is the IOAPIC, so KVM filled the `ioapic` member.
        let ioapic = unsafe { chip.chip.ioapic };
        Some(
            (0..ioapic.redirtbl.len())
                .map(|pin| {
                    // SAFETY: every redirection entry is a plain u64 (`bits`).
                    let bits = unsafe { ioapic.redirtbl[pin].bits };
                    IoapicPin {
                        vector: (bits & 0xff) as u8,
                        remote_irr: bits & (1 << 14) != 0,
                        level_triggered: bits & (1 << 15) != 0,
                        masked: bits & (1 << 16) != 0,
                        destination: (bits >> 56) as u8,
                        pending: ioapic.irr & (1 << pin) != 0,
                    }
                })
                .collect(),
        )
    }

    /// The attached virtio-mmio devices, in attach order.
    pub fn virtio_devices(&self) -> impl Iterator<Item = &VirtioMmioInfo> {
        self.virtio.iter().map(|d| &d.info)
    }

    /// AML for every device, for the DSDT's `\_SB_` scope.
    pub fn dsdt_aml(&self) -> Result<Vec<u8>, VmError> {
        let mut aml = Vec::new();
        if self.serial.is_some() {
            aml.extend(crate::acpi::com1_aml(COM1_PORT, COM1_GSI));
        }
        for (index, d) in self.virtio.iter().enumerate() {
            let base = u32::try_from(d.info.base).map_err(|_| VmError::Device {
                device: d.info.kind.into(),
                reason: format!("MMIO base {:#x} is above 4 GiB", d.info.base),
            })?;
            aml.extend(
                crate::acpi::virtio_mmio_aml(index, base, MMIO_REGION_SIZE as u32, d.info.gsi)
                    .map_err(|e| VmError::Device {
                        device: d.info.kind.into(),
                        reason: e.to_string(),
                    })?,
            );
        }
        if let Some(h) = &self.hotplug {
            let base = u32::try_from(h.base).map_err(|_| VmError::Device {
                device: "hotplug".into(),
                reason: format!("MMIO base {:#x} is above 4 GiB", h.base),
            })?;
            aml.extend(
                crate::acpi::hotplug_aml(base, h.gsi, h.max_vcpus, &h.memory_blocks).map_err(
                    |e| VmError::Device {
                        device: "hotplug".into(),
                        reason: e.to_string(),
                    },
                )?,
            );
        }
        Ok(aml)
    }

    /// `virtio_mmio.device=` parameters for kernels that do not read ACPI.
    pub fn virtio_cmdline(&self) -> String {
        self.virtio
            .iter()
            .map(|d| format!(" virtio_mmio.device=4K@{:#x}:{}", d.info.base, d.info.gsi))
            .collect()
    }

    /// Start serving device events.
    pub fn start(&mut self, seccomp: SeccompMode) -> Result<(), VmError> {
        self.event_loop.start(seccomp)
    }

    /// Stop serving device events and wait for the loop to end.
    pub fn stop(&mut self) {
        self.event_loop.stop();
    }
}
