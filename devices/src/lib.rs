//! Device models for beacon VMs: the I/O and MMIO bus seam ([`bus`]), the legacy
//! x86 devices every VM has ([`legacy`]: 16550 serial, i8042 reset, boot timer),
//! the ACPI power-management registers ([`acpi_pm`]), the hotplug controller
//! the guest's ACPI code talks to ([`hotplug`]), virtio devices on the
//! virtio-mmio transport ([`virtio`]), and the TAP behind virtio-net ([`tap`]).
//! Threads a device starts run the VMM's confinement hook first ([`confine`]).
//!
//! Devices here never know about the VMM: they see byte accesses at offsets inside
//! their own range, guest memory through `vm-memory`, and report outward only
//! through what they were handed (an interrupt eventfd, a writer, a callback).
//! Every access and every byte in guest memory comes from a hostile guest, so no
//! access of any size or offset, and no descriptor chain, may panic or hang: odd
//! ones are ignored with a throttled log line ([`throttle`]).

pub mod acpi_pm;
pub mod bus;
pub mod confine;
pub mod hotplug;
pub mod legacy;
pub mod tap;
pub mod throttle;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
