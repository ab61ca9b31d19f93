//! The vCPUs of one VM: creating and configuring them, their threads, and CPU
//! hotplug.
//!
//! Every vCPU gets the same CPUID (topology sized for the maximum, so a CPU
//! added later fits in), MSRs and boot registers; the setup is kept so a vCPU
//! can be created while the guest runs. Hot-add creates (or reuses) the vCPU,
//! starts its thread (KVM holds it until the guest sends INIT/SIPI), marks it
//! present in the hotplug controller and raises the GED; the guest's ACPI code
//! acknowledges. Hot-remove asks the guest through the GED to give the CPU
//! back; once the guest ejected it (`_EJ0`), its thread is retired and its fd
//! kept: KVM cannot destroy a vCPU, so adding it again reuses the fd. A guest
//! that does not answer within [`crate::resize::HOTPLUG_ACK_TIMEOUT`] leaves the VM as it was.
//!
//! This module owns the vCPU fds and threads; it never runs a vCPU loop
//! itself ([`super::vcpu`]) and never stops the VM ([`super::control`]).

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use beacon_common::lock;
use beacon_devices::hotplug::{GedLine, HotplugSlot, HotplugState, EVENT_CPU};
use beacon_devices::Bus;
use kvm_bindings::{kvm_msr_entry, CpuId};
use kvm_ioctls::{VcpuFd, VmFd};

use super::boot::BootEntry;
use super::builder::hv;
use super::control::VcpuControl;
use super::exit_stats::SharedExitStats;
use super::vcpu::{self, VcpuSetup, VcpuThread};
use crate::backend::{VmError, VmExit};
use crate::seccomp::SeccompMode;

/// How often a wait for the guest checks whether the VM is ending.
const STOP_POLL: Duration = Duration::from_millis(100);
/// How long retiring a vCPU thread may take once the guest let it go.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The error of a resize cut short because the VM is ending.
pub(crate) fn ending() -> VmError {
    VmError::WrongState {
        operation: "resize",
        expected: "running",
        actual: "ending",
    }
}

/// The setup every vCPU is configured from, kept for hotplug.
pub struct CpuSetup {
    pub boot: u8,
    pub max: u8,
    pub entry: BootEntry,
    pub supported_cpuid: CpuId,
    pub msrs: Vec<kvm_msr_entry>,
}

/// A running vCPU thread.
struct Running {
    handle: JoinHandle<VcpuFd>,
    retire: Arc<AtomicBool>,
}

#[derive(Default)]
struct Slot {
    /// A vCPU not running (created for boot and not started yet, or retired).
    idle: Option<VcpuFd>,
    running: Option<Running>,
}

/// What a vCPU thread shares with the rest of the VM.
pub struct VcpuLinks {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub control: Arc<VcpuControl>,
    pub first_run: Arc<OnceLock<Duration>>,
    pub created: Instant,
    pub exits: Arc<SharedExitStats>,
    /// How each vCPU thread confines itself before its first `KVM_RUN`.
    pub seccomp: SeccompMode,
}

/// Hotplug wiring the CPU and memory managers share: the controller's
/// state and the GED line.
#[derive(Clone)]
pub struct HotplugWiring {
    pub state: Arc<HotplugState>,
    pub ged: Arc<GedLine>,
}

/// Wait for the guest's answer (`done`) up to `timeout`; gives up at once
/// when the VM ends.
pub(crate) fn wait_guest(
    state: &HotplugState,
    control: &VcpuControl,
    timeout: Duration,
    done: impl Fn(&beacon_devices::hotplug::HotplugSlots) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let slice = deadline
            .saturating_duration_since(Instant::now())
            .min(STOP_POLL);
        if state.wait_until(slice, &done) {
            return true;
        }
        if control.should_stop() || Instant::now() >= deadline {
            return false;
        }
    }
}

pub struct CpuManager {
    vm: Arc<VmFd>,
    setup: CpuSetup,
    links: VcpuLinks,
    slots: Mutex<Vec<Slot>>,
    hotplug: Option<HotplugWiring>,
    /// How long a request waits for the guest ([`HOTPLUG_ACK_TIMEOUT`](crate::resize::HOTPLUG_ACK_TIMEOUT)).
    ack_timeout: Mutex<Duration>,
    /// Serializes resize requests.
    resizing: Mutex<()>,
}

/// Marks a vCPU thread finished however it leaves, and turns a panic into a
/// crash of the VM so the other vCPUs stop too.
pub(crate) struct FinishGuard {
    pub(crate) control: Arc<VcpuControl>,
    pub(crate) id: u8,
}

impl Drop for FinishGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.control
                .request_stop(VmExit::Crashed(format!("vCPU {} thread panicked", self.id)));
        }
        // SAFETY: pthread_self has no preconditions.
        self.control
            .thread_finished(unsafe { libc::pthread_self() });
    }
}

impl CpuManager {
    /// Create and configure the boot vCPUs (not started).
    pub fn new(
        vm: Arc<VmFd>,
        setup: CpuSetup,
        links: VcpuLinks,
        hotplug: Option<HotplugWiring>,
    ) -> Result<Self, VmError> {
        let mut slots: Vec<Slot> = (0..setup.max).map(|_| Slot::default()).collect();
        let me = Self {
            vm,
            setup,
            links,
            slots: Mutex::new(Vec::new()),
            hotplug,
            ack_timeout: Mutex::new(crate::resize::HOTPLUG_ACK_TIMEOUT),
            resizing: Mutex::new(()),
        };
        for id in 0..me.setup.boot {
            slots[usize::from(id)].idle = Some(me.create(id)?);
        }
        *lock(&me.slots) = slots;
        Ok(me)
    }

    fn create(&self, id: u8) -> Result<VcpuFd, VmError> {
        let fd = self
            .vm
            .create_vcpu(u64::from(id))
            .map_err(hv(format!("KVM_CREATE_VCPU {id}")))?;
        vcpu::configure(
            &fd,
            id,
            &VcpuSetup {
                vcpus: self.setup.max,
                entry: self.setup.entry,
                supported_cpuid: &self.setup.supported_cpuid,
                msrs: &self.setup.msrs,
            },
        )?;
        Ok(fd)
    }

    /// Start the boot vCPUs' threads.
    pub fn start_boot_vcpus(&self) -> Result<(), VmError> {
        let mut slots = lock(&self.slots);
        for id in 0..self.setup.boot {
            self.spawn(&mut slots, id)?;
        }
        Ok(())
    }

    fn spawn(&self, slots: &mut [Slot], id: u8) -> Result<(), VmError> {
        let slot = slots
            .get_mut(usize::from(id))
            .ok_or_else(|| VmError::Unsupported(format!("vCPU {id} is beyond the maximum")))?;
        let fd = slot
            .idle
            .take()
            .ok_or_else(|| VmError::Unsupported(format!("vCPU {id} has no usable fd")))?;
        let retire = Arc::new(AtomicBool::new(false));
        let thread = VcpuThread {
            id,
            fd,
            io_bus: self.links.io_bus.clone(),
            mmio_bus: self.links.mmio_bus.clone(),
            control: self.links.control.clone(),
            first_run: self.links.first_run.clone(),
            created: self.links.created,
            retire: retire.clone(),
            exits: self.links.exits.clone(),
            seccomp: self.links.seccomp,
        };
        let guard_control = self.links.control.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("beacon-vcpu{id}"))
            .spawn(move || {
                let _guard = FinishGuard {
                    control: guard_control,
                    id,
                };
                thread.run()
            });
        match spawned {
            Ok(handle) => {
                self.links.control.register_thread(handle.as_pthread_t());
                slot.running = Some(Running { handle, retire });
                Ok(())
            }
            Err(e) => Err(VmError::Io {
                what: format!("spawning the thread of vCPU {id}"),
                source: e,
            }),
        }
    }

    /// vCPUs whose threads run.
    pub fn online(&self) -> u8 {
        let n = lock(&self.slots)
            .iter()
            .filter(|s| s.running.is_some())
            .count();
        u8::try_from(n).unwrap_or(u8::MAX)
    }

    pub fn max(&self) -> u8 {
        self.setup.max
    }

    /// The exits of every vCPU thread that has ended.
    pub fn exit_stats(&self) -> crate::backend::ExitStats {
        self.links.exits.snapshot()
    }

    /// Join every vCPU thread (after they were told to stop); the panic
    /// message of one that panicked.
    pub fn join_all(&self) -> Option<String> {
        let mut panic_note = None;
        // Held while joining, so a second caller returns only after the joins.
        let mut slots = lock(&self.slots);
        for slot in slots.iter_mut() {
            let Some(running) = slot.running.take() else {
                continue;
            };
            match running.handle.join() {
                Ok(fd) => slot.idle = Some(fd),
                Err(payload) => {
                    panic_note = Some(
                        payload
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| payload.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".into()),
                    )
                }
            }
        }
        panic_note
    }

    /// Bring the number of vCPUs to `target` with the guest's cooperation.
    /// Returns the new count; on error the VM keeps the vCPUs it had.
    pub fn resize(&self, target: u8) -> Result<u8, VmError> {
        let _one_at_a_time = lock(&self.resizing);
        crate::resize::check_vcpu_target(
            crate::config::VcpuConfig {
                boot: self.setup.boot,
                max: self.setup.max,
            },
            target,
        )?;
        // Checked above: a VM with room has its hotplug devices.
        let Some(hotplug) = &self.hotplug else {
            return Err(VmError::Unsupported(
                "this VM has no CPU hotplug device".into(),
            ));
        };
        let current = self.online();
        if target == current {
            return Ok(current);
        }
        if target > current {
            self.add(hotplug, current, target)?;
        } else {
            for id in (target..current).rev() {
                self.remove(hotplug, id)?;
            }
        }
        Ok(self.online())
    }

    /// Shorten the wait for the guest (tests of guests that never answer).
    #[cfg(test)]
    pub(crate) fn set_ack_timeout(&self, timeout: Duration) {
        *lock(&self.ack_timeout) = timeout;
    }

    fn wait_guest(
        &self,
        hotplug: &HotplugWiring,
        done: impl Fn(&beacon_devices::hotplug::HotplugSlots) -> bool,
    ) -> bool {
        let timeout = *lock(&self.ack_timeout);
        wait_guest(&hotplug.state, &self.links.control, timeout, done)
    }

    fn add(&self, hotplug: &HotplugWiring, from: u8, to: u8) -> Result<(), VmError> {
        let ids: Vec<u8> = (from..to).collect();
        let started = {
            let mut slots = lock(&self.slots);
            let mut started = Vec::new();
            let mut failed = None;
            for &id in &ids {
                let slot = &mut slots[usize::from(id)];
                if slot.idle.is_none() && slot.running.is_none() {
                    match self.create(id) {
                        Ok(fd) => slot.idle = Some(fd),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                match self.spawn(&mut slots, id) {
                    Ok(()) => started.push(id),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                None => started,
                Some(e) => {
                    drop(slots);
                    // Nothing was announced to the guest: just stop them again.
                    for &id in started.iter().rev() {
                        self.retire(id)?;
                    }
                    return Err(e);
                }
            }
        };
        debug_assert_eq!(started, ids);
        {
            let mut cpus = hotplug.state.lock();
            for &id in &ids {
                if let Some(s) = cpus.cpus.get_mut(usize::from(id)) {
                    *s = HotplugSlot {
                        enabled: true,
                        inserting: true,
                        ..HotplugSlot::default()
                    };
                }
            }
        }
        hotplug.ged.raise(EVENT_CPU);
        let acked = self.wait_guest(hotplug, |cpus| {
            ids.iter()
                .all(|&id| cpus.cpus.get(usize::from(id)).is_some_and(|s| !s.inserting))
        });
        if acked {
            tracing::info!(from, to, "vCPUs added; the guest acknowledged");
            return Ok(());
        }
        // Undo: the guest never saw them, or never said so.
        {
            let mut cpus = hotplug.state.lock();
            for &id in &ids {
                if let Some(s) = cpus.cpus.get_mut(usize::from(id)) {
                    *s = Default::default();
                }
            }
        }
        for &id in ids.iter().rev() {
            self.retire(id)?;
        }
        if self.links.control.should_stop() {
            return Err(ending());
        }
        Err(VmError::Hypervisor {
            what: format!("adding vCPUs {from}..{to}"),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the guest did not acknowledge the new vCPUs within {:?} (does its kernel have ACPI CPU hotplug and the GED driver?); the VM keeps {from} vCPUs",
                    *lock(&self.ack_timeout)
                ),
            ),
        })
    }

    fn remove(&self, hotplug: &HotplugWiring, id: u8) -> Result<(), VmError> {
        if id == 0 {
            return Err(VmError::Unsupported("vCPU 0 cannot be removed".into()));
        }
        {
            let mut cpus = hotplug.state.lock();
            if let Some(s) = cpus.cpus.get_mut(usize::from(id)) {
                s.removing = true;
                s.eject_allowed = true;
            }
        }
        hotplug.ged.raise(EVENT_CPU);
        let ejected = self.wait_guest(hotplug, |cpus| {
            cpus.cpus.get(usize::from(id)).is_some_and(|s| !s.enabled)
        });
        if !ejected {
            if let Some(s) = hotplug.state.lock().cpus.get_mut(usize::from(id)) {
                s.removing = false;
                s.eject_allowed = false;
            }
            if self.links.control.should_stop() {
                return Err(ending());
            }
            return Err(VmError::Hypervisor {
                what: format!("removing vCPU {id}"),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the guest did not eject vCPU {id} within {:?} (it may be unable to take the CPU offline); the vCPU stays",
                        *lock(&self.ack_timeout)
                    ),
                ),
            });
        }
        self.retire(id)?;
        tracing::info!(vcpu = id, "vCPU removed; the guest ejected it");
        Ok(())
    }

    /// Stop one vCPU's thread and keep its fd for a later add.
    fn retire(&self, id: u8) -> Result<(), VmError> {
        let running = lock(&self.slots)
            .get_mut(usize::from(id))
            .and_then(|s| s.running.take());
        let Some(running) = running else {
            return Ok(());
        };
        running.retire.store(true, Ordering::Release);
        let pthread = running.handle.as_pthread_t();
        if !self.links.control.wait_finished(pthread, RETIRE_TIMEOUT) {
            // Leave it registered: the VM's end will stop and join it.
            lock(&self.slots)[usize::from(id)].running = Some(running);
            return Err(VmError::Hypervisor {
                what: format!("stopping the thread of vCPU {id}"),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("it did not leave KVM_RUN within {RETIRE_TIMEOUT:?}"),
                ),
            });
        }
        let fd = running.handle.join().map_err(|_| VmError::Hypervisor {
            what: format!("stopping the thread of vCPU {id}"),
            source: std::io::Error::other("the thread panicked"),
        })?;
        lock(&self.slots)[usize::from(id)].idle = Some(fd);
        Ok(())
    }
}
