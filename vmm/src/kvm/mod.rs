//! The in-process KVM backend: a VM built from rust-vmm crates whose vCPUs run as
//! threads of the calling process.
//!
//! [`KvmVm::create`] does everything that can fail before a vCPU runs (open KVM,
//! check limits, allocate and load guest memory, create the irqchip, PIT, devices
//! and vCPUs), so a bad config or an oversized initrd is a [`VmError`] with no
//! thread started; every fd is released by drop. [`VmBackend::start`] spawns one
//! thread per vCPU; [`VmBackend::wait`] joins them all.
//!
//! Missing for now: ACPI (no PM1 sleep register, so a guest `poweroff` ends in a
//! halt loop the VMM cannot see, and [`VmBackend::shutdown`] is a hard stop);
//! serial input; virtio devices.

pub mod boot;
pub mod console_input;
pub mod control;
pub mod devices;
pub mod memory;
pub mod vcpu;

#[cfg(test)]
mod tests;

use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use beacon_devices::Bus;
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::backend::{BackendKind, BootTimes, VmBackend, VmError, VmExit};
use crate::config::VmConfig;

use boot::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use control::VcpuControl;
use memory::GuestRam;
use vcpu::{VcpuSetup, VcpuThread};

/// How long pause waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    Created,
    Running,
    Paused,
    Ended,
}

impl Lifecycle {
    fn name(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Ended => "ended",
        }
    }
}

/// One KVM microVM.
pub struct KvmVm {
    config: VmConfig,
    created: Instant,
    control: Arc<VcpuControl>,
    lifecycle: Mutex<Lifecycle>,
    /// vCPUs created and configured, waiting for `start`.
    pending: Mutex<Vec<VcpuFd>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The device event loop (console input); joined after the vCPUs.
    events: Mutex<Option<JoinHandle<()>>>,
    first_run: Arc<OnceLock<Duration>>,
    init_reached: Arc<OnceLock<Duration>>,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    _legacy: devices::LegacyDevices,
    // Field order is drop order: the VM fd goes before the memory it maps.
    vm: VmFd,
    ram: GuestRam,
}

fn hv(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Hypervisor {
        what: what.into(),
        source: e.into(),
    }
}

/// Refuse more vCPUs than this host's KVM runs in one VM (KVM_CAP_MAX_VCPUS).
fn check_vcpu_limit(asked: u8, kvm_max: usize) -> Result<(), VmError> {
    if usize::from(asked) <= kvm_max {
        return Ok(());
    }
    Err(VmError::Hypervisor {
        what: "checking the vCPU count".into(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "this host's KVM runs at most {kvm_max} vCPUs per VM (KVM_CAP_MAX_VCPUS), {asked} were asked for; lower --cpus/--max-cpus"
            ),
        ),
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KvmVm {
    /// Build the VM; nothing runs until [`VmBackend::start`].
    pub fn create(config: VmConfig) -> Result<Self, VmError> {
        let created = Instant::now();
        let format = config.validate()?;
        let kvm =
            Kvm::new().map_err(|e| VmError::KvmUnavailable(format!("opening /dev/kvm: {e}")))?;

        check_vcpu_limit(config.vcpus.max, kvm.get_max_vcpus())?;

        let vm = kvm.create_vm().map_err(hv("KVM_CREATE_VM"))?;
        let mem_bytes = config.memory.size_mib << 20;
        let ram = GuestRam::new(mem_bytes)?;
        ram.register(&vm)?;

        vm.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(hv("KVM_SET_TSS_ADDR"))?;
        if kvm.check_extension(Cap::SetIdentityMapAddr) {
            vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
                .map_err(hv("KVM_SET_IDENTITY_MAP_ADDR"))?;
        }
        vm.create_irq_chip().map_err(hv("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(hv("KVM_CREATE_PIT2"))?;

        let entry = boot::load(ram.memory(), mem_bytes, &config, format)?;
        tracing::info!(?entry, ?format, "kernel loaded");

        let control = Arc::new(VcpuControl::new());
        let init_reached = Arc::new(OnceLock::new());
        let legacy = devices::build(
            &vm,
            &config.console,
            control.clone(),
            created,
            init_reached.clone(),
        )?;

        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(hv("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(hv("KVM_GET_MSR_INDEX_LIST"))?;
        let msrs = boot::msr::boot_msrs(msr_list.as_slice());
        let setup = VcpuSetup {
            vcpus: config.vcpus.boot,
            entry,
            supported_cpuid: &supported_cpuid,
            msrs: &msrs,
        };
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus.boot));
        for id in 0..config.vcpus.boot {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| VmError::Hypervisor {
                    what: format!("KVM_CREATE_VCPU {id}"),
                    source: e.into(),
                })?;
            vcpu::configure(&fd, id, &setup)?;
            vcpus.push(fd);
        }
        control::install_kick_handler().map_err(|e| VmError::Hypervisor {
            what: "installing the vCPU kick signal handler".into(),
            source: e,
        })?;

        Ok(Self {
            config,
            created,
            control,
            lifecycle: Mutex::new(Lifecycle::Created),
            pending: Mutex::new(vcpus),
            threads: Mutex::new(Vec::new()),
            events: Mutex::new(None),
            first_run: Arc::new(OnceLock::new()),
            init_reached,
            io_bus: legacy.io_bus.clone(),
            mmio_bus: Arc::new(Bus::new()),
            _legacy: legacy,
            vm,
            ram,
        })
    }

    /// The guest RAM (for devices that need to map it, such as vhost-user).
    pub fn guest_ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The VM fd (for devices that register irqfds or ioeventfds).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    fn wrong_state(&self, operation: &'static str, expected: &'static str) -> VmError {
        VmError::WrongState {
            operation,
            expected,
            actual: lock(&self.lifecycle).name(),
        }
    }

    /// Stop, wait for and join every vCPU thread.
    fn join_all(&self) -> Option<String> {
        self.control.wait_all_finished();
        let mut panic_note = None;
        // Held while joining, so a second waiter returns only after the joins.
        let mut threads = lock(&self.threads);
        for handle in threads.drain(..) {
            if let Err(payload) = handle.join() {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                panic_note = Some(msg);
            }
        }
        // The event loop notices the stop within one tick.
        if let Some(events) = lock(&self.events).take() {
            if events.join().is_err() {
                tracing::warn!("the device event loop thread panicked");
            }
        }
        panic_note
    }
}

/// Marks a vCPU thread finished however it leaves, and turns a panic into a
/// crash of the VM so the other vCPUs stop too.
struct FinishGuard {
    control: Arc<VcpuControl>,
    id: u8,
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

impl VmBackend for KvmVm {
    fn kind(&self) -> BackendKind {
        BackendKind::Kvm
    }

    fn start(&self) -> Result<(), VmError> {
        let mut lifecycle = lock(&self.lifecycle);
        if *lifecycle != Lifecycle::Created {
            return Err(VmError::WrongState {
                operation: "start",
                expected: "created",
                actual: lifecycle.name(),
            });
        }
        *lifecycle = Lifecycle::Running;
        drop(lifecycle);
        // Console input only when the console is this process's terminal side.
        let input = match self.config.console {
            crate::config::ConsoleConfig::Stdout => console_input::stdin_dup(),
            _ => None,
        };
        match console_input::spawn_event_loop(
            input,
            self._legacy.serial.clone(),
            self.control.clone(),
        ) {
            Ok(handle) => *lock(&self.events) = Some(handle),
            Err(e) => {
                *lock(&self.lifecycle) = Lifecycle::Ended;
                return Err(e);
            }
        }
        let vcpus = std::mem::take(&mut *lock(&self.pending));
        for (id, fd) in (0u8..).zip(vcpus) {
            let thread = VcpuThread {
                id,
                fd,
                io_bus: self.io_bus.clone(),
                mmio_bus: self.mmio_bus.clone(),
                control: self.control.clone(),
                first_run: self.first_run.clone(),
                created: self.created,
            };
            let guard_control = self.control.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("beacon-vcpu{id}"))
                .spawn(move || {
                    let _guard = FinishGuard {
                        control: guard_control,
                        id,
                    };
                    thread.run();
                });
            match spawned {
                Ok(handle) => {
                    self.control.register_thread(handle.as_pthread_t());
                    lock(&self.threads).push(handle);
                }
                Err(e) => {
                    self.control
                        .request_stop(VmExit::Crashed(format!("could not start vCPU {id}: {e}")));
                    self.join_all();
                    *lock(&self.lifecycle) = Lifecycle::Ended;
                    return Err(VmError::Io {
                        what: format!("spawning the thread of vCPU {id}"),
                        source: e,
                    });
                }
            }
        }
        tracing::info!(vcpus = self.config.vcpus.boot, "VM started");
        Ok(())
    }

    fn wait(&self) -> Result<VmExit, VmError> {
        if *lock(&self.lifecycle) == Lifecycle::Created {
            return Err(self.wrong_state("wait", "started"));
        }
        let panic_note = self.join_all();
        *lock(&self.lifecycle) = Lifecycle::Ended;
        let exit = match (self.control.exit(), panic_note) {
            (Some(VmExit::Crashed(what)), Some(note)) => VmExit::Crashed(format!("{what}: {note}")),
            (Some(exit), _) => exit,
            (None, _) => VmExit::Crashed("all vCPU threads ended without a reason".into()),
        };
        Ok(exit)
    }

    fn shutdown(&self) -> Result<(), VmError> {
        // Without ACPI there is no power button to press: stop the vCPUs hard.
        tracing::warn!("no ACPI power button in this VMM yet: shutdown stops the vCPUs without asking the guest");
        self.kill()
    }

    fn kill(&self) -> Result<(), VmError> {
        let lifecycle = *lock(&self.lifecycle);
        if lifecycle == Lifecycle::Created {
            return Err(self.wrong_state("kill", "started"));
        }
        self.control.request_stop(VmExit::PowerOff);
        Ok(())
    }

    fn pause(&self) -> Result<(), VmError> {
        let mut lifecycle = lock(&self.lifecycle);
        if *lifecycle != Lifecycle::Running || self.control.should_stop() {
            return Err(VmError::WrongState {
                operation: "pause",
                expected: "running",
                actual: if self.control.should_stop() {
                    "ending"
                } else {
                    lifecycle.name()
                },
            });
        }
        if !self.control.pause(PAUSE_TIMEOUT) {
            self.control.resume();
            return Err(VmError::Hypervisor {
                what: "pausing the vCPUs".into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "not every vCPU stopped within {PAUSE_TIMEOUT:?}; the VM keeps running"
                    ),
                ),
            });
        }
        *lifecycle = Lifecycle::Paused;
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        let mut lifecycle = lock(&self.lifecycle);
        if *lifecycle != Lifecycle::Paused {
            return Err(VmError::WrongState {
                operation: "resume",
                expected: "paused",
                actual: lifecycle.name(),
            });
        }
        self.control.resume();
        *lifecycle = Lifecycle::Running;
        Ok(())
    }

    fn vcpu_count(&self) -> u8 {
        self.config.vcpus.boot
    }

    fn memory_mib(&self) -> u64 {
        self.config.memory.size_mib
    }

    fn boot_times(&self) -> BootTimes {
        BootTimes {
            first_run: self.first_run.get().copied(),
            init_reached: self.init_reached.get().copied(),
        }
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        if self.control.thread_count() > 0 {
            self.control.request_stop(VmExit::PowerOff);
            self.join_all();
        }
    }
}
