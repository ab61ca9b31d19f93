//! ACPI tables for a hardware-reduced x86 microVM: RSDP, XSDT, FADT, MADT, DSDT.
//!
//! This module owns the bytes of the tables and where they sit in guest memory; it
//! never touches KVM or the device buses. The tables tell the guest:
//! - which vCPUs exist (MADT: enabled at boot, "online capable" up to the maximum
//!   for hotplug), where the IOAPIC is, and that ISA IRQ 0 arrives on GSI 2 (KVM's
//!   PIT routing);
//! - how to power off (FADT hardware-reduced sleep control/status registers on
//!   I/O ports [`SLEEP_CONTROL_PORT`]/[`SLEEP_STATUS_PORT`], `\_S5` = [`S5_SLEEP_TYPE`])
//!   and reset ([`RESET_PORT`], value [`RESET_VALUE`]);
//! - that there is no VGA, keyboard controller or CMOS RTC to probe
//!   ([`IAPC_BOOT_ARCH`]);
//! - every device in the VM, as AML inside `\_SB_` that the device manager
//!   contributes after it attached them ([`AcpiConfig::devices_aml`]), built with the
//!   helpers here: COM1 ([`com1_aml`], `PNP0501`: hardware-reduced ACPI has no legacy
//!   PIC, so Linux routes no ISA IRQ that the DSDT does not name) and each
//!   virtio-mmio device ([`virtio_mmio_aml`], `LNRO0005` with its MMIO window and
//!   interrupt), so a stock kernel whose virtio drivers are modules finds them and
//!   no `virtio_mmio.device=` parameters are needed.

use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

mod hotplug;
pub use hotplug::hotplug_aml;

/// Where the RSDP goes: the BIOS read-only area Linux scans (0xE0000..0xFFFFF).
pub const RSDP_ADDR: u64 = 0x000e_0000;
/// The tables must all end below this (the end of the legacy BIOS area).
pub const ACPI_REGION_END: u64 = 0x0010_0000;
/// Guest writes `SLP_TYP << 2 | SLP_EN` here to sleep; S5 means power off.
pub const SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// Sleep status register (WAK_STS); reads as 0.
pub const SLEEP_STATUS_PORT: u16 = 0x3c1;
/// Writing [`RESET_VALUE`] here resets (ends) the VM.
pub const RESET_PORT: u16 = 0x3c2;
/// FADT IA-PC boot architecture flags: no VGA (bit 2) and no CMOS RTC (bit 5).
/// The "8042" bit (1) stays clear: no keyboard controller for the guest to
/// probe (the VMM still takes the 0xFE reset command on port 0x64). Without
/// the RTC bit, a stock kernel's `rtc_cmos` spins on ports 0x70/0x71, which
/// nothing decodes (seconds in the lab); the guest's wall clock comes from
/// kvm-clock.
pub const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);
// The register semantics belong to the device that decodes them.
pub use beacon_devices::acpi_pm::{RESET_VALUE, S5_SLEEP_TYPE};

/// DSDT device names are `V000`..`VFFF`.
pub const MAX_MMIO_DEVICES: usize = 0x1000;

const OEM_ID: [u8; 6] = *b"BEACON";
const OEM_TABLE_ID: [u8; 8] = *b"BEACONVM";
const OEM_REVISION: u32 = 1;

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    pub boot_vcpus: u8,
    pub max_vcpus: u8,
    pub ioapic_addr: u32,
    pub lapic_addr: u32,
    /// AML of every device, placed inside `\_SB_` (see [`com1_aml`], [`virtio_mmio_aml`]).
    pub devices_aml: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("ACPI tables need {needed} bytes but only {available} fit below 1 MiB")]
    TooLarge { needed: u64, available: u64 },
    #[error("virtio-mmio device number {0} is more than the {MAX_MMIO_DEVICES} the DSDT can name")]
    TooManyDevices(usize),
    #[error("boot vCPUs ({boot}) must be between 1 and the maximum ({max})")]
    BadVcpus { boot: u8, max: u8 },
    #[error("CPU hotplug AML needs at least one vCPU")]
    NoHotplugVcpus,
    #[error("hotplug registers at {0:#x} do not fit below 4 GiB")]
    HotplugAbove4G(u32),
    #[error("{0} memory hotplug blocks are more than the {max} the DSDT can name; lower the hotplug room", max = hotplug::MAX_MEMORY_BLOCKS)]
    TooManyMemoryBlocks(usize),
}

/// A 16550 UART on I/O `port` raising `gsi`, as DSDT device `COM1`.
pub fn com1_aml(port: u16, gsi: u32) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
    let uid = Name::new(Path::new("_UID"), &0u8);
    let io = IO::new(port, port, 1, 8);
    let irq = Interrupt::new(true, true, false, false, gsi);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&io, &irq]));
    to_bytes(&Device::new(Path::new("COM1"), vec![&hid, &uid, &crs]))
}

/// The `index`th virtio-mmio device (DSDT device `Vnnn`, `LNRO0005`): its register
/// window and its edge-triggered, active-high interrupt.
pub fn virtio_mmio_aml(index: usize, base: u32, size: u32, gsi: u32) -> Result<Vec<u8>, AcpiError> {
    if index >= MAX_MMIO_DEVICES {
        return Err(AcpiError::TooManyDevices(index));
    }
    let name = format!("V{index:03X}");
    let hid = Name::new(Path::new("_HID"), &"LNRO0005");
    let uid_value = index as u32;
    let uid = Name::new(Path::new("_UID"), &uid_value);
    let mem = Memory32Fixed::new(true, base, size);
    let irq = Interrupt::new(true, true, false, false, gsi);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&mem, &irq]));
    Ok(to_bytes(&Device::new(
        Path::new(&name),
        vec![&hid, &uid, &crs],
    )))
}

/// An AML blob already serialised (the devices' AML inside `\_SB_`).
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        for b in self.0 {
            sink.byte(*b);
        }
    }
}

/// One table and its guest-physical address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedTable {
    pub addr: u64,
    pub bytes: Vec<u8>,
}

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    let mut body = Vec::new();
    body.extend_from_slice(&cfg.lapic_addr.to_le_bytes());
    body.extend_from_slice(&PCAT_COMPAT.to_le_bytes());
    for id in 0..cfg.max_vcpus {
        // Processor Local APIC: type 0, length 8, uid, apic id, flags.
        // Flags: bit 0 enabled; bit 1 online capable (hotplug later).
        let flags: u32 = if id < cfg.boot_vcpus { 1 } else { 2 };
        body.extend_from_slice(&[0, 8, id, id]);
        body.extend_from_slice(&flags.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, id (after the CPUs' ids), reserved, address, GSI base.
    body.extend_from_slice(&[1, 12, cfg.max_vcpus, 0]);
    body.extend_from_slice(&cfg.ioapic_addr.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt Source Override: type 2, length 10, bus 0 (ISA), IRQ 0 -> GSI 2,
    // flags 0 (conforming): KVM wires the PIT to IOAPIC pin 2.
    body.extend_from_slice(&[2, 10, 0, 0]);
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    let mut sdt = Sdt::new(*b"APIC", 36, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let s5 = Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    );
    let mut body = to_bytes(&s5);
    let devices = RawAml(&cfg.devices_aml);
    body.extend(to_bytes(&aml::Scope::new(
        Path::new("\\_SB_"),
        vec![&devices],
    )));
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.sleep_control_reg = io_gas(SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io_gas(SLEEP_STATUS_PORT);
    b.reset_reg = io_gas(RESET_PORT);
    b.reset_value = RESET_VALUE;
    b.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    // "KVMKVMKVM" is what Linux checks for in CPUID, not here; the field is optional.
    to_bytes(&b.finalize())
}

/// Build every table and place it: RSDP at [`RSDP_ADDR`], the rest after it,
/// 16-byte aligned, all below [`ACPI_REGION_END`].
pub fn build(cfg: &AcpiConfig) -> Result<Vec<PlacedTable>, AcpiError> {
    if cfg.boot_vcpus == 0 || cfg.boot_vcpus > cfg.max_vcpus {
        return Err(AcpiError::BadVcpus {
            boot: cfg.boot_vcpus,
            max: cfg.max_vcpus,
        });
    }
    let mut next = align16(RSDP_ADDR + Rsdp::len() as u64);
    let mut place = |bytes: Vec<u8>| {
        let addr = next;
        next = align16(addr + bytes.len() as u64);
        PlacedTable { addr, bytes }
    };
    let dsdt = place(dsdt(cfg));
    let fadt = place(fadt(dsdt.addr));
    let madt = place(madt(cfg));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt.addr);
    xsdt.add_entry(madt.addr);
    let xsdt = place(to_bytes(&xsdt));
    if next > ACPI_REGION_END {
        return Err(AcpiError::TooLarge {
            needed: next - RSDP_ADDR,
            available: ACPI_REGION_END - RSDP_ADDR,
        });
    }
    let rsdp = PlacedTable {
        addr: RSDP_ADDR,
        bytes: to_bytes(&Rsdp::new(OEM_ID, xsdt.addr)),
    };
    Ok(vec![rsdp, xsdt, fadt, madt, dsdt])
}

/// Port ranges must match the device's layout (control, status, reset in a row).
const _: () = {
    assert!(
        SLEEP_STATUS_PORT as u64
            == SLEEP_CONTROL_PORT as u64 + beacon_devices::acpi_pm::SLEEP_STATUS_OFFSET
    );
    assert!(RESET_PORT as u64 == SLEEP_CONTROL_PORT as u64 + beacon_devices::acpi_pm::RESET_OFFSET);
};

#[cfg(test)]
mod tests;
