//! beacon-vmm: build and run one microVM.
//!
//! The crate owns the VM's configuration ([`config`]), the backend seam
//! ([`backend`]) and the backends themselves. It never knows about containerd or
//! sandboxes: the shim turns a container into a [`VmConfig`] and drives a
//! [`VmBackend`]. A running VM can be inspected and resized through its
//! control socket ([`api`]).

pub mod acpi;
pub mod api;
pub mod backend;
pub mod config;
pub mod kvm;
pub mod qemu;
pub mod resize;
pub mod seccomp;

pub use backend::{BackendKind, BootTimes, ExitCount, ExitStats, VmBackend, VmError, VmExit};
pub use config::{ConfigError, ConsoleConfig, DeviceConfig, KernelFormat, MacAddr, VmConfig};

/// Build the backend of `kind` for `config` (not started yet).
pub fn create_backend(kind: BackendKind, config: VmConfig) -> Result<Box<dyn VmBackend>, VmError> {
    match kind {
        BackendKind::Kvm => Ok(Box::new(kvm::KvmVm::create(config)?)),
        BackendKind::Qemu => Ok(Box::new(qemu::QemuVm::create(config)?)),
    }
}

/// The log filter for a process that runs the VMM: `BEACON_LOG` if set, else
/// `default`, with the `virtio_queue` crate's records off. That crate logs
/// each malformed queue it meets at error level and without a rate limit, so
/// a guest could flood the log through it; the device layer reports the same
/// problems itself, rate-limited. Name `virtio_queue` in `BEACON_LOG` to see
/// its records anyway.
pub fn log_filter(default: &str) -> tracing_subscriber::EnvFilter {
    let env = std::env::var("BEACON_LOG").ok();
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("BEACON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    if !env.is_some_and(|e| e.contains("virtio_queue")) {
        if let Ok(off) = "virtio_queue=off".parse() {
            filter = filter.add_directive(off);
        }
    }
    filter
}
