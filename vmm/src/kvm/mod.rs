//! The in-process KVM backend: a VM built from rust-vmm crates whose vCPUs run as
//! threads of the calling process, with its devices served by one event-loop
//! thread.
//!
//! [`builder`] assembles a VM from its config (everything that can fail happens
//! there, before a vCPU runs); this module holds only the running VM's
//! lifecycle: [`VmBackend::start`] starts the device event loop and one thread
//! per vCPU ([`cpu_manager`]), [`VmBackend::wait`] joins them all, pause,
//! resume and kill park or stop the vCPUs through [`control`], and
//! [`VmBackend::resize_vcpus`] hotplugs vCPUs through the CPU manager.
//!
//! Missing for now: an ACPI power button (so [`VmBackend::shutdown`] is a hard
//! stop) and memory hotplug.

pub mod boot;
pub mod builder;
pub mod console;
pub mod control;
pub mod cpu_manager;
pub mod device_manager;
pub mod event_loop;
pub mod exit_stats;
pub mod memory;
pub mod memory_manager;
pub mod vcpu;

#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use beacon_common::lock;
use kvm_ioctls::VmFd;

use crate::backend::{BackendKind, BootTimes, VmBackend, VmError, VmExit};
use crate::config::VmConfig;

use control::VcpuControl;
use cpu_manager::CpuManager;
use device_manager::DeviceManager;
use memory::GuestRam;
use memory_manager::MemoryManager;

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
    control: Arc<VcpuControl>,
    lifecycle: Mutex<Lifecycle>,
    cpus: CpuManager,
    memory: MemoryManager,
    first_run: Arc<OnceLock<Duration>>,
    init_reached: Arc<OnceLock<Duration>>,
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
        control: Arc<VcpuControl>,
        cpus: CpuManager,
        memory: MemoryManager,
        first_run: Arc<OnceLock<Duration>>,
        init_reached: Arc<OnceLock<Duration>>,
        devices: DeviceManager,
        vm: Arc<VmFd>,
        ram: GuestRam,
    ) -> Self {
        Self {
            config,
            control,
            lifecycle: Mutex::new(Lifecycle::Created),
            cpus,
            memory,
            first_run,
            init_reached,
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

    /// `operation` needs a running VM that is not ending.
    fn require_running(
        &self,
        operation: &'static str,
        lifecycle: Lifecycle,
    ) -> Result<(), VmError> {
        if lifecycle == Lifecycle::Running && !self.control.should_stop() {
            return Ok(());
        }
        Err(VmError::WrongState {
            operation,
            expected: "running",
            actual: if self.control.should_stop() {
                "ending"
            } else {
                lifecycle.name()
            },
        })
    }

    /// Stop, wait for and join every vCPU thread, then end the device event loop.
    fn join_all(&self) -> Option<String> {
        self.control.wait_all_finished();
        let panic_note = self.cpus.join_all();
        // No vCPU can touch a device any more: end the loop (it flushes the console).
        lock(&self.devices).stop();
        panic_note
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
        if let Err(e) = lock(&self.devices).start(self.config.seccomp) {
            *lock(&self.lifecycle) = Lifecycle::Ended;
            return Err(e);
        }
        if let Err(e) = self.cpus.start_boot_vcpus() {
            self.control
                .request_stop(VmExit::Crashed(format!("could not start the vCPUs: {e}")));
            self.join_all();
            *lock(&self.lifecycle) = Lifecycle::Ended;
            return Err(e);
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
        self.require_running("pause", *lifecycle)?;
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
        self.cpus.online()
    }

    fn max_vcpus(&self) -> u8 {
        self.cpus.max()
    }

    fn resize_vcpus(&self, target: u8) -> Result<u8, VmError> {
        let lifecycle = *lock(&self.lifecycle);
        self.require_running("resize", lifecycle)?;
        self.cpus.resize(target)
    }

    fn memory_mib(&self) -> u64 {
        self.memory.total_mib()
    }

    fn max_memory_mib(&self) -> u64 {
        self.memory.max_mib()
    }

    fn resize_memory(&self, total_mib: u64) -> Result<u64, VmError> {
        let lifecycle = *lock(&self.lifecycle);
        self.require_running("resize", lifecycle)?;
        self.memory.resize(total_mib)
    }

    fn virtio_report(&self) -> Result<Vec<crate::backend::VirtioReport>, VmError> {
        Ok(lock(&self.devices).virtio_states())
    }

    fn thread_confinement(&self) -> crate::seccomp::SeccompMode {
        self.config.seccomp
    }

    fn exit_stats(&self) -> Option<crate::backend::ExitStats> {
        Some(self.cpus.exit_stats())
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
