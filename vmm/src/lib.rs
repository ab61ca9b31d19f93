//! beacon-vmm: build and run one microVM.
//!
//! The crate owns the VM's configuration ([`config`]), the backend seam
//! ([`backend`]) and the backends themselves. It never knows about containerd or
//! sandboxes: the shim turns a container into a [`VmConfig`] and drives a
//! [`VmBackend`].

pub mod backend;
pub mod config;

pub use backend::{BackendKind, BootTimes, VmBackend, VmError, VmExit};
pub use config::{ConfigError, ConsoleConfig, DeviceConfig, KernelFormat, MacAddr, VmConfig};
