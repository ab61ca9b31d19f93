//! The seam between "what VM to run" and "how it runs".
//!
//! [`VmBackend`] is implemented by the in-process KVM backend and by the QEMU
//! backend (a child process driven over QMP), so the shim, the CLI and the
//! benchmarks treat both alike. A backend is created from a validated
//! [`VmConfig`](crate::config::VmConfig), started once, and waited on; shutdown,
//! pause and resume may be called from any thread while another thread waits.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Which implementation runs the VM.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// rust-vmm based VMM on threads of the calling process.
    #[default]
    Kvm,
    /// `qemu-system-x86_64 -M microvm` as a child process, for parity and comparison.
    Qemu,
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5, `reboot(POWER_OFF)`), or a requested shutdown completed.
    PowerOff,
    /// The guest asked for a reboot (i8042 reset, triple fault on purpose); we end the VM.
    Reboot,
    /// The guest or the hypervisor failed: triple fault, KVM internal error, a vCPU thread
    /// panicked, QEMU died. The string says what, with vCPU registers where known.
    Crashed(String),
}

/// Milestones a backend records, for logs and benchmarks. Times are since the backend
/// was created (the "VMM start" of the benchmarks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootTimes {
    /// First `KVM_RUN` entered (KVM backend), or QMP reporting the VM running (QEMU).
    pub first_run: Option<Duration>,
    /// The guest wrote the boot-timer port: its init is running.
    pub init_reached: Option<Duration>,
}

/// One line of [`ExitStats`]: an exit reason, or a reason at an address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitCount {
    pub what: String,
    pub count: u64,
}

/// VM exits counted over a VM's life (KVM backend; see
/// `kvm::exit_stats`), biggest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitStats {
    pub total: u64,
    pub by_kind: Vec<ExitCount>,
    /// Port and MMIO exits by address (bounded; the rest as "other addresses").
    pub by_address: Vec<ExitCount>,
    /// KVM's own counters (every exit, most handled in the kernel): `exits`,
    /// `halt_exits`, `io_exits`, ... summed over the vCPUs.
    pub kvm: Vec<ExitCount>,
}

impl std::fmt::Display for ExitStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} exits", self.total)?;
        for c in &self.by_kind {
            write!(f, "; {} {}", c.what, c.count)?;
        }
        if !self.kvm.is_empty() {
            write!(f, "\n  in KVM:")?;
            for c in &self.kvm {
                write!(f, " {} {};", c.what, c.count)?;
            }
        }
        for c in self.by_address.iter().take(12) {
            write!(f, "\n  {:>10}  {}", c.count, c.what)?;
        }
        Ok(())
    }
}

/// Errors of running a VM; each says what failed and what to try.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("KVM is not usable here ({0}); on hosts without hardware KVM run inside the nested lab (tests/lab/run)")]
    KvmUnavailable(String),
    #[error("{what} failed: {source}")]
    Hypervisor {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the kernel: {0}")]
    KernelLoad(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },
    #[error("QEMU: {0}")]
    Qemu(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("the VM is {actual}, but {operation} needs it {expected}")]
    WrongState {
        operation: &'static str,
        expected: &'static str,
        actual: &'static str,
    },
    #[error(transparent)]
    Confinement(#[from] crate::seccomp::ConfineError),
    #[error("I/O error while {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl VmError {
    /// Wrap an I/O error with what we were doing.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// One virtio device as the host sees it now (`beacon-vmm ctl devices`): its
/// place, its interrupt pin as the guest programmed it, and its transport's
/// registers and ring indexes, for finding out why a device stalled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioReport {
    /// What it is ("net", "vsock", ...).
    pub kind: String,
    pub mmio_base: u64,
    pub gsi: u32,
    /// Its pin in the interrupt controller (`None`: the backend could not read it).
    pub pin: Option<IoapicPin>,
    #[serde(flatten)]
    pub transport: beacon_devices::virtio::TransportState,
}

/// One IOAPIC redirection entry as the guest programmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicPin {
    pub vector: u8,
    pub masked: bool,
    pub level_triggered: bool,
    /// Level-triggered: delivered and not yet EOIed by the guest.
    pub remote_irr: bool,
    pub destination: u8,
    /// The pin's request bit: an interrupt waits to be delivered.
    pub pending: bool,
}

/// One VM, however it is run.
pub trait VmBackend: Send + Sync {
    /// Which implementation this is.
    fn kind(&self) -> BackendKind;

    /// Start the guest. Called once; a second call is [`VmError::WrongState`].
    fn start(&self) -> Result<(), VmError>;

    /// Block until the VM has ended and every thread or process it used is gone.
    fn wait(&self) -> Result<VmExit, VmError>;

    /// Ask the guest to power off. Returns at once; [`wait`](Self::wait) reports the end.
    /// A backend that cannot reach the guest ends the VM hard instead.
    fn shutdown(&self) -> Result<(), VmError>;

    /// End the VM now, without asking the guest.
    fn kill(&self) -> Result<(), VmError>;

    /// Stop all vCPUs (devices keep their state).
    fn pause(&self) -> Result<(), VmError>;

    /// Continue after [`pause`](Self::pause).
    fn resume(&self) -> Result<(), VmError>;

    /// vCPUs currently online.
    fn vcpu_count(&self) -> u8;

    /// The most vCPUs this VM can have (`--max-cpus`).
    fn max_vcpus(&self) -> u8;

    /// Hot-add or hot-remove vCPUs until `target` are online, with the
    /// guest's cooperation (ACPI CPU hotplug); returns the new count. Only
    /// while running; on error the VM keeps the vCPUs it had.
    fn resize_vcpus(&self, target: u8) -> Result<u8, VmError>;

    /// Guest RAM currently plugged, in MiB.
    fn memory_mib(&self) -> u64;

    /// The most guest RAM this VM can have, in MiB (boot memory plus the
    /// hotplug room, `--hotplug-memory`).
    fn max_memory_mib(&self) -> u64;

    /// Hot-add or hot-remove memory blocks until the guest has `total_mib`
    /// (boot memory plus whole blocks), with the guest's cooperation (ACPI
    /// memory hotplug); returns the new total. Only while running; on error
    /// the VM keeps what the error reports.
    fn resize_memory(&self, total_mib: u64) -> Result<u64, VmError>;

    /// Every virtio device's state now ([`VirtioReport`]), in attach order.
    fn virtio_report(&self) -> Result<Vec<VirtioReport>, VmError> {
        Err(VmError::Unsupported(
            "device reports come from the KVM backend only; for QEMU use its monitor (`info virtio`)"
                .into(),
        ))
    }

    /// How threads that serve this VM in the host process confine themselves
    /// ([`crate::seccomp`]): the KVM backend's configured mode; `Off` for a
    /// backend whose VM runs in another process.
    fn thread_confinement(&self) -> crate::seccomp::SeccompMode {
        crate::seccomp::SeccompMode::Off
    }

    /// Milestones so far.
    fn boot_times(&self) -> BootTimes;

    /// VM exits counted so far (vCPUs add theirs when their thread ends), if
    /// this backend counts them (the KVM backend does; QEMU does not).
    fn exit_stats(&self) -> Option<ExitStats> {
        None
    }
}
