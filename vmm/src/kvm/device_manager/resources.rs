//! The one allocator of a VM's device resources, on `vm-allocator`: interrupt
//! lines (GSIs on the IOAPIC), MMIO space inside the 32-bit gap, and I/O ports.
//!
//! Legacy PC devices sit at architectural addresses a stock kernel expects
//! (COM1 at 0x3f8 on ISA IRQ 4, the i8042 at 0x60); their ports are reserved here
//! by exact address so nothing else can be placed over them. (vm-allocator 0.1.4's
//! exact-address allocation does not check that the range is still free, so port
//! reservations are kept in a plain ordered map instead.) Everything else is
//! allocated, never written down as a constant.

use std::collections::BTreeMap;

use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator, RangeInclusive};

use crate::backend::VmError;
use crate::kvm::boot::layout::{IOAPIC_ADDR, MMIO_GAP_START};

/// GSIs 0..=4 are ISA lines with fixed owners (PIT, keyboard, cascade, COM2,
/// COM1); devices get the remaining IOAPIC pins.
pub const FIRST_DEVICE_GSI: u32 = 5;
/// The last pin of KVM's 24-pin IOAPIC.
pub const LAST_GSI: u32 = 23;
/// From here up, lines kept for level-triggered interrupts that may be raised
/// before the guest set its interrupt controllers up (the GED). KVM routes
/// GSIs 0-15 to the legacy PIC too, and a PIC the guest has not programmed yet
/// delivers its IRQ n as vector n: a GED raised early on GSI 5 reached a
/// booting stock kernel as exception 5 ("bounds") and killed it. These lines
/// reach the IOAPIC only, whose pins stay masked (the level held) until the
/// guest's driver unmasks them.
pub const FIRST_LATE_GSI: u32 = 20;
/// MMIO space for devices: from the start of the gap up to the IOAPIC (the LAPIC,
/// the TSS and the identity-map pages live above it).
pub const MMIO_WINDOW: (u64, u64) = (MMIO_GAP_START, IOAPIC_ADDR as u64);

/// GSIs, MMIO and ports of one VM.
#[derive(Debug)]
pub struct ResourceAllocator {
    gsis: IdAllocator,
    late_gsis: IdAllocator,
    mmio: AddressAllocator,
    /// Reserved port ranges: first port → (number of ports, owner).
    ports: BTreeMap<u16, (u16, String)>,
}

fn exhausted(what: &str, e: vm_allocator::Error) -> VmError {
    VmError::Device {
        device: "resource allocator".into(),
        reason: format!("no {what} left: {e}; attach fewer devices"),
    }
}

impl ResourceAllocator {
    pub fn new() -> Result<Self, VmError> {
        let internal = |what: &str, e: vm_allocator::Error| VmError::Device {
            device: "resource allocator".into(),
            reason: format!("{what}: {e}"),
        };
        Ok(Self {
            gsis: IdAllocator::new(FIRST_DEVICE_GSI, FIRST_LATE_GSI - 1)
                .map_err(|e| internal("GSI range", e))?,
            late_gsis: IdAllocator::new(FIRST_LATE_GSI, LAST_GSI)
                .map_err(|e| internal("GSI range", e))?,
            mmio: AddressAllocator::new(MMIO_WINDOW.0, MMIO_WINDOW.1 - MMIO_WINDOW.0)
                .map_err(|e| internal("MMIO window", e))?,
            ports: BTreeMap::new(),
        })
    }

    /// The next free interrupt line.
    pub fn allocate_gsi(&mut self) -> Result<u32, VmError> {
        self.gsis.allocate_id().map_err(|e| {
            exhausted(
                &format!(
                    "interrupt lines (GSIs {FIRST_DEVICE_GSI}-{})",
                    FIRST_LATE_GSI - 1
                ),
                e,
            )
        })
    }

    /// The next free line that reaches the IOAPIC only ([`FIRST_LATE_GSI`]),
    /// for interrupts raised before the guest may be ready for them.
    pub fn allocate_late_gsi(&mut self) -> Result<u32, VmError> {
        self.late_gsis.allocate_id().map_err(|e| {
            exhausted(
                &format!("IOAPIC-only interrupt lines (GSIs {FIRST_LATE_GSI}-{LAST_GSI})"),
                e,
            )
        })
    }

    /// Give a GSI back (a device that failed to attach, hot unplug).
    pub fn free_gsi(&mut self, gsi: u32) {
        let pool = if gsi >= FIRST_LATE_GSI {
            &mut self.late_gsis
        } else {
            &mut self.gsis
        };
        if let Err(e) = pool.free_id(gsi) {
            tracing::warn!(gsi, "freeing a GSI that was not allocated: {e}");
        }
    }

    /// `size` bytes of MMIO space aligned to `align` (a power of two).
    pub fn allocate_mmio(&mut self, size: u64, align: u64) -> Result<u64, VmError> {
        self.mmio
            .allocate(size, align, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|e| exhausted("MMIO space", e))
    }

    /// Give MMIO space back.
    pub fn free_mmio(&mut self, base: u64, size: u64) {
        let freed = RangeInclusive::new(base, base + size - 1).and_then(|r| self.mmio.free(&r));
        if let Err(e) = freed {
            tracing::warn!(base, size, "freeing MMIO space that was not allocated: {e}");
        }
    }

    /// Reserve the architectural ports `[base, base + len)` of a legacy device.
    pub fn reserve_ports(&mut self, base: u16, len: u16, owner: &str) -> Result<(), VmError> {
        let refuse = |reason: String| VmError::Device {
            device: owner.into(),
            reason,
        };
        let end = u32::from(base) + u32::from(len);
        if len == 0 || end > 0x1_0000 {
            return Err(refuse(format!(
                "ports {base:#x}+{len} are not a valid range"
            )));
        }
        // The only candidate for overlap: the last range starting before `end`.
        if let Some((&other, (other_len, other_owner))) =
            self.ports.range(..=((end - 1) as u16)).next_back()
        {
            if u32::from(other) + u32::from(*other_len) > u32::from(base) {
                return Err(refuse(format!(
                    "ports {base:#x}+{len} overlap {other_owner} at {other:#x}+{other_len}"
                )));
            }
        }
        self.ports.insert(base, (len, owner.to_string()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsis_run_from_5_to_19_then_fail_clearly() {
        let mut r = ResourceAllocator::new().expect("allocator");
        let got: Vec<u32> = (0..15).map(|_| r.allocate_gsi().expect("gsi")).collect();
        assert_eq!(got, (5..=19).collect::<Vec<_>>());
        let err = r.allocate_gsi().expect_err("exhausted");
        assert!(err.to_string().contains("attach fewer devices"), "{err}");
        r.free_gsi(7);
        assert_eq!(r.allocate_gsi().expect("reused"), 7);
    }

    #[test]
    fn late_gsis_never_reach_the_pic() {
        let mut r = ResourceAllocator::new().expect("allocator");
        let got: Vec<u32> = (0..4)
            .map(|_| r.allocate_late_gsi().expect("gsi"))
            .collect();
        assert_eq!(got, (20..=23).collect::<Vec<_>>());
        assert!(got.iter().all(|g| *g >= 16), "GSIs 0-15 also go to the PIC");
        assert!(r.allocate_late_gsi().is_err());
        r.free_gsi(21);
        assert_eq!(r.allocate_late_gsi().expect("reused"), 21);
        assert_eq!(r.allocate_gsi().expect("the other pool is untouched"), 5);
    }

    #[test]
    fn mmio_comes_from_the_gap_below_the_ioapic_without_overlap() {
        let mut r = ResourceAllocator::new().expect("allocator");
        let a = r.allocate_mmio(0x1000, 0x1000).expect("a");
        let b = r.allocate_mmio(0x1000, 0x1000).expect("b");
        assert!(a >= MMIO_GAP_START && b >= MMIO_GAP_START);
        assert_eq!(a % 0x1000, 0);
        assert!(a + 0x1000 <= b || b + 0x1000 <= a);
        assert!(r.allocate_mmio(1 << 40, 0x1000).is_err());
        let big = MMIO_WINDOW.1 - MMIO_WINDOW.0;
        assert!(r.allocate_mmio(big, 0x1000).is_err(), "already partly used");
        r.free_mmio(a, 0x1000);
        assert_eq!(r.allocate_mmio(0x1000, 0x1000).expect("reused"), a);
    }

    #[test]
    fn legacy_ports_are_reserved_exactly_once() {
        let mut r = ResourceAllocator::new().expect("allocator");
        r.reserve_ports(0x3f8, 8, "COM1").expect("COM1");
        r.reserve_ports(0x60, 5, "i8042").expect("i8042");
        let err = r.reserve_ports(0x3fc, 2, "clash").expect_err("overlap");
        assert!(
            err.to_string().contains("clash") && err.to_string().contains("COM1"),
            "{err}"
        );
        r.reserve_ports(0x3f0, 9, "below")
            .expect_err("overlaps from below");
        r.reserve_ports(0x400, 1, "next door").expect("adjacent");
        r.reserve_ports(0x3f0, 8, "below, adjacent")
            .expect("adjacent below");
        r.reserve_ports(0xffff, 2, "wraps")
            .expect_err("past the port space");
        r.reserve_ports(0x500, 0, "empty").expect_err("empty");
    }
}
