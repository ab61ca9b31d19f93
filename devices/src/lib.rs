//! Device models for beacon VMs: the I/O and MMIO bus seam ([`bus`]) and the legacy
//! x86 devices every VM has ([`legacy`]: 16550 serial, i8042 reset, boot timer), and the
//! ACPI power-management registers ([`acpi_pm`]).
//!
//! Devices here never know about the VMM: they see byte accesses at offsets inside
//! their own range and report outward only through what they were handed (an
//! interrupt trigger, a writer, a callback). Every access comes from a hostile
//! guest, so no access of any size or offset may panic: odd ones are logged and
//! ignored.

pub mod acpi_pm;
pub mod bus;
pub mod legacy;

pub use bus::{Bus, BusDevice, BusError};
