use super::*;

fn cfg(boot: u8, max: u8) -> AcpiConfig {
    AcpiConfig {
        boot_vcpus: boot,
        max_vcpus: max,
        ioapic_addr: 0xfec0_0000,
        lapic_addr: 0xfee0_0000,
        devices_aml: [
            com1_aml(0x3f8, 4),
            virtio_mmio_aml(0, 0xd000_0000, 0x1000, 5).expect("V000"),
            virtio_mmio_aml(1, 0xd000_1000, 0x1000, 6).expect("V001"),
        ]
        .concat(),
    }
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn by_sig<'a>(tables: &'a [PlacedTable], sig: &[u8]) -> &'a PlacedTable {
    tables
        .iter()
        .find(|t| t.bytes.starts_with(sig))
        .expect("table present")
}

#[test]
fn every_table_checksums_and_fits() {
    let tables = build(&cfg(2, 4)).expect("build");
    assert_eq!(tables.len(), 5);
    for t in &tables {
        // RSDP: both the 20-byte and the full checksum; SDTs: the whole table.
        if t.bytes.starts_with(b"RSD PTR ") {
            assert_eq!(sum(&t.bytes[..20]), 0);
        } else {
            assert_eq!(u32_at(&t.bytes, 4) as usize, t.bytes.len(), "length field");
        }
        assert_eq!(sum(&t.bytes), 0, "checksum of {:?}", &t.bytes[..4]);
        assert!(t.addr >= RSDP_ADDR && t.addr + t.bytes.len() as u64 <= ACPI_REGION_END);
        assert_eq!(t.addr % 16, 0);
    }
    // No overlaps.
    let mut spans: Vec<(u64, u64)> = tables
        .iter()
        .map(|t| (t.addr, t.addr + t.bytes.len() as u64))
        .collect();
    spans.sort();
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
}

#[test]
fn pointers_chain_rsdp_xsdt_fadt_dsdt() {
    let tables = build(&cfg(1, 1)).expect("build");
    let rsdp = by_sig(&tables, b"RSD PTR ");
    assert_eq!(rsdp.addr, RSDP_ADDR);
    assert_eq!(rsdp.bytes[15], 2, "ACPI 2.0+ RSDP");
    let xsdt = by_sig(&tables, b"XSDT");
    assert_eq!(u64_at(&rsdp.bytes, 24), xsdt.addr);
    let fadt = by_sig(&tables, b"FACP");
    let madt = by_sig(&tables, b"APIC");
    assert_eq!(u64_at(&xsdt.bytes, 36), fadt.addr);
    assert_eq!(u64_at(&xsdt.bytes, 44), madt.addr);
    let dsdt = by_sig(&tables, b"DSDT");
    // FADT X_DSDT at offset 140.
    assert_eq!(u64_at(&fadt.bytes, 140), dsdt.addr);
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
    let tables = build(&cfg(1, 1)).expect("build");
    let fadt = &by_sig(&tables, b"FACP").bytes;
    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    // RESET_REG (GAS at 116): system I/O, port RESET_PORT; RESET_VALUE at 128.
    // IAPC_BOOT_ARCH at offset 109: no VGA, no CMOS RTC, no 8042.
    assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), IAPC_BOOT_ARCH);
    assert_eq!(IAPC_BOOT_ARCH & 0b10, 0, "no 8042");
    assert_eq!(fadt[116], 1);
    assert_eq!(u64_at(fadt, 120), u64::from(RESET_PORT));
    assert_eq!(fadt[128], RESET_VALUE);
    // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256.
    assert_eq!(fadt[244], 1);
    assert_eq!(u64_at(fadt, 248), u64::from(SLEEP_CONTROL_PORT));
    assert_eq!(fadt[256], 1);
    assert_eq!(u64_at(fadt, 260), u64::from(SLEEP_STATUS_PORT));
}

#[test]
fn madt_lists_boot_and_hotpluggable_cpus_ioapic_and_override() {
    let tables = build(&cfg(2, 4)).expect("build");
    let madt = &by_sig(&tables, b"APIC").bytes;
    assert_eq!(u32_at(madt, 36), 0xfee0_0000);
    assert_eq!(u32_at(madt, 40) & 1, 1, "PCAT_COMPAT");
    let mut off = 44;
    let mut cpus = Vec::new();
    let mut ioapic = None;
    let mut overrides = Vec::new();
    while off < madt.len() {
        let (kind, len) = (madt[off], madt[off + 1] as usize);
        assert!(len >= 2);
        match kind {
            0 => cpus.push((madt[off + 3], u32_at(madt, off + 4))),
            1 => ioapic = Some((madt[off + 2], u32_at(madt, off + 4))),
            2 => overrides.push((madt[off + 3], u32_at(madt, off + 4))),
            other => panic!("unexpected MADT entry {other}"),
        }
        off += len;
    }
    assert_eq!(off, madt.len());
    assert_eq!(cpus, vec![(0, 1), (1, 1), (2, 2), (3, 2)]);
    assert_eq!(ioapic, Some((4, 0xfec0_0000)));
    assert_eq!(overrides, vec![(0, 2)]);
}

#[test]
fn dsdt_has_s5_and_virtio_mmio_devices() {
    let tables = build(&cfg(1, 1)).expect("build");
    let dsdt = &by_sig(&tables, b"DSDT").bytes;
    let find = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
    assert!(find(b"_S5_"));
    assert!(
        find(b"COM1"),
        "COM1 must be described: no legacy PIC routes IRQ 4"
    );
    // EISAID("PNP0501") encodes to 0x0105D041 (little endian 41 D0 05 01).
    assert!(find(&[0x41, 0xd0, 0x05, 0x01]));
    // IO descriptor for 0x3f8 (min, max) and an extended interrupt for GSI 4.
    assert!(find(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03]));
    assert!(find(b"V000") && find(b"V001"));
    assert!(find(b"LNRO0005"));
    // The first device's MMIO base inside its Memory32Fixed descriptor.
    assert!(find(&0xd000_0000u32.to_le_bytes()));
    // Everything sits in the \_SB_ scope: ScopeOp (0x10), a package length, then
    // the root-prefixed name.
    let sb = dsdt
        .windows(5)
        .position(|w| w == b"\\_SB_")
        .expect("\\_SB_ scope");
    assert!(
        dsdt[sb.saturating_sub(5)..sb].contains(&0x10),
        "ScopeOp (and its 1 to 4 byte length) before \\_SB_"
    );
    let com1 = dsdt.windows(4).position(|w| w == b"COM1").expect("COM1");
    assert!(com1 > sb, "COM1 inside \\_SB_");
}

#[test]
fn bad_vcpus_and_oversize_are_errors() {
    assert!(matches!(build(&cfg(0, 1)), Err(AcpiError::BadVcpus { .. })));
    assert!(matches!(build(&cfg(3, 2)), Err(AcpiError::BadVcpus { .. })));
    let mut big = cfg(1, 1);
    big.devices_aml = (0..4000)
        .flat_map(|i| virtio_mmio_aml(i, 0xd000_0000 + i as u32 * 0x1000, 0x1000, 5).expect("aml"))
        .collect();
    assert!(matches!(build(&big), Err(AcpiError::TooLarge { .. })));
    assert!(matches!(
        virtio_mmio_aml(MAX_MMIO_DEVICES, 0xd000_0000, 0x1000, 5),
        Err(AcpiError::TooManyDevices(_))
    ));
}
