//! beacon-vmm: build and run one microVM.
//!
//! The crate owns the VM's configuration ([`config`]), the backend seam
//! ([`backend`]) and the backends themselves. It never knows about containerd or
//! sandboxes: the shim turns a container into a [`VmConfig`] and drives a
//! [`VmBackend`].

pub mod acpi;
pub mod backend;
pub mod config;
pub mod kvm;
pub mod qemu;

pub use backend::{BackendKind, BootTimes, VmBackend, VmError, VmExit};
pub use config::{ConfigError, ConsoleConfig, DeviceConfig, KernelFormat, MacAddr, VmConfig};

/// Build the backend of `kind` for `config` (not started yet).
pub fn create_backend(kind: BackendKind, config: VmConfig) -> Result<Box<dyn VmBackend>, VmError> {
    match kind {
        BackendKind::Kvm => Ok(Box::new(kvm::KvmVm::create(config)?)),
        BackendKind::Qemu => Ok(Box::new(qemu::QemuVm::create(config)?)),
    }
}
