//! The in-process KVM backend: a VM built from rust-vmm crates whose vCPUs run as
//! threads of the calling process, with its devices served by one event-loop
//! thread.
//!
//! [`builder`] assembles a VM from its config (everything that can fail happens
//! there, before a vCPU runs); this module holds only the running VM's
//! lifecycle: [`VmBackend::start`] starts the device event loop and one thread
//! per vCPU, [`VmBackend::wait`] joins them all, and pause, resume and kill park
//! or stop the vCPUs through [`control`].
//!
//! Missing for now: an ACPI power button (so [`VmBackend::shutdown`] is a hard
//! stop) and CPU and memory hotplug.

pub mod boot;
pub mod builder;
pub mod console;
pub mod control;
pub mod device_manager;
pub mod event_loop;
pub mod memory;
pub mod vcpu;

#[cfg(test)]
mod tests;

use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use beacon_common::lock;
use beacon_devices::Bus;
use kvm_ioctls::{VcpuFd, VmFd};

use crate::backend::{BackendKind, BootTimes, VmBackend, VmError, VmExit};
use crate::config::VmConfig;

use control::VcpuControl;
use device_manager::DeviceManager;
use memory::GuestRam;
use vcpu::VcpuThread;

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
    first_run: Arc<OnceLock<Duration>>,
    init_reached: Arc<OnceLock<Duration>>,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    // Field order is drop order: the devices (and their event loop) first, then
    // the VM fd, then the memory it maps.
    devices: Mutex<DeviceManager>,
    vm: Arc<VmFd>,
    ram: GuestRam,
}

impl KvmVm {
    /// Build the VM ([`builder::build`]); nothing runs until [`VmBackend::start`].
    pub fn create(config: VmConfig) -> Result<Self, VmError> {
        builder::build(config)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: VmConfig,
        created: Instant,
        control: Arc<VcpuControl>,
        vcpus: Vec<VcpuFd>,
        init_reached: Arc<OnceLock<Duration>>,
        devices: DeviceManager,
        vm: Arc<VmFd>,
        ram: GuestRam,
    ) -> Self {
        Self {
            config,
            created,
            control,
            lifecycle: Mutex::new(Lifecycle::Created),
            pending: Mutex::new(vcpus),
            threads: Mutex::new(Vec::new()),
            first_run: Arc::new(OnceLock::new()),
            init_reached,
            io_bus: devices.io_bus().clone(),
            mmio_bus: devices.mmio_bus().clone(),
            devices: Mutex::new(devices),
            vm,
            ram,
        }
    }

    /// The guest RAM (for devices that need to map it, such as vhost-user).
    pub fn guest_ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The VM fd (for devices that register irqfds or ioeventfds).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Console bytes dropped because nobody read them in time.
    pub fn console_dropped(&self) -> u64 {
        lock(&self.devices).console_dropped()
    }

    fn wrong_state(&self, operation: &'static str, expected: &'static str) -> VmError {
        VmError::WrongState {
            operation,
            expected,
            actual: lock(&self.lifecycle).name(),
        }
    }

    /// Stop, wait for and join every vCPU thread, then end the device event loop.
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
        // No vCPU can touch a device any more: end the loop (it flushes the console).
        lock(&self.devices).stop();
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
        if let Err(e) = lock(&self.devices).start() {
            *lock(&self.lifecycle) = Lifecycle::Ended;
            return Err(e);
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
