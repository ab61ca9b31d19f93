//! The Intel MultiProcessor table, through which Linux (CONFIG_X86_MPPARSE) finds
//! the vCPUs, the IOAPIC and the ISA interrupt routing when there are no ACPI
//! tables.
//!
//! The floating pointer sits at the start of the EBDA (0x9fc00), where the
//! kernel's scan of "the last KiB of base memory" finds it, followed by the
//! configuration table. Layout and checksums follow MP spec 1.4.

use super::layout::{EBDA_START, IOAPIC_ADDR, LAPIC_ADDR};

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Stepping/model/family of a generic x86-64 CPU, as Firecracker states it.
const CPU_SIGNATURE: u32 = (6 << 8) | (1 << 4) | 7;
/// FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;
const ISA_BUS_ID: u8 = 0;
/// Legacy IRQs routed through the IOAPIC, one pin each.
const LEGACY_IRQS: u8 = 16;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Size of the floating pointer structure.
pub const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;

/// Where the table goes.
pub const MPTABLE_ADDR: u64 = EBDA_START;

/// The MP table bytes for `vcpus` processors (APIC ids 0..vcpus), to be written at
/// [`MPTABLE_ADDR`]. The IOAPIC takes the id after the last CPU.
pub fn mptable_bytes(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut body = Vec::new();
    let mut entries: u16 = 0;
    for cpu in 0..vcpus {
        body.push(ENTRY_PROCESSOR);
        body.push(cpu);
        body.push(APIC_VERSION);
        body.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        body.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        body.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        body.extend_from_slice(&[0; 8]);
        entries += 1;
    }
    body.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    body.extend_from_slice(b"ISA   ");
    entries += 1;
    body.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    body.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entries += 1;
    for irq in 0..LEGACY_IRQS {
        // type, irq type, flags (u16: conforming polarity/trigger), src bus, src irq,
        // dst IOAPIC, dst pin.
        body.extend_from_slice(&[
            ENTRY_IOINTSRC,
            INT_TYPE_INT,
            0,
            0,
            ISA_BUS_ID,
            irq,
            ioapic_id,
            irq,
        ]);
        entries += 1;
    }
    // LINT0 of every CPU is ExtINT (the PIC), LINT1 is NMI.
    body.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, ISA_BUS_ID, 0, 0xff, 0]);
    body.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, ISA_BUS_ID, 0, 0xff, 1]);
    entries += 2;

    let table_len = MPC_HEADER_SIZE + body.len();
    let mut mpc = Vec::with_capacity(table_len);
    mpc.extend_from_slice(MPC_SIGNATURE);
    // A u16: at most 254 CPUs * 20 bytes plus fixed entries stays far below 64 KiB.
    mpc.extend_from_slice(&(table_len as u16).to_le_bytes());
    mpc.push(SPEC_REV);
    mpc.push(0); // checksum, below
    mpc.extend_from_slice(b"BEACON  ");
    mpc.extend_from_slice(b"BEACONBOX   ");
    mpc.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    mpc.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    mpc.extend_from_slice(&entries.to_le_bytes());
    mpc.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    mpc.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    mpc.push(0); // extended table checksum
    mpc.push(0); // reserved
    mpc.extend_from_slice(&body);
    mpc[7] = checksum(&mpc);

    let mut out = Vec::with_capacity(MPF_SIZE + mpc.len());
    out.extend_from_slice(MPF_SIGNATURE);
    // The configuration table follows the floating pointer; both are below 1 MiB.
    out.extend_from_slice(&((MPTABLE_ADDR as u32) + MPF_SIZE as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(SPEC_REV);
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // feature bytes: 0 = a configuration table is present
    out[10] = checksum(&out);
    out.extend_from_slice(&mpc);
    out
}

/// The byte that makes `bytes` sum to zero (mod 256).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_pointers_and_entries() {
        for vcpus in [1u8, 2, 8, 254] {
            let t = mptable_bytes(vcpus);
            let (mpf, mpc) = t.split_at(MPF_SIZE);
            assert_eq!(&mpf[0..4], b"_MP_");
            assert_eq!(sum(mpf), 0, "floating pointer checksum");
            assert_eq!(
                u32::from_le_bytes(mpf[4..8].try_into().expect("4 bytes")),
                0x9fc10
            );
            assert_eq!(&mpc[0..4], b"PCMP");
            let len = u16::from_le_bytes([mpc[4], mpc[5]]) as usize;
            assert_eq!(len, mpc.len());
            assert_eq!(sum(mpc), 0, "configuration table checksum");
            let count = u16::from_le_bytes([mpc[34], mpc[35]]);
            assert_eq!(count, u16::from(vcpus) + 1 + 1 + 16 + 2);
            assert_eq!(
                u32::from_le_bytes(mpc[36..40].try_into().expect("4")),
                0xfee0_0000
            );

            // Walk the entries: processors first, BSP flagged once, ids 0..vcpus.
            let mut at = MPC_HEADER_SIZE;
            let mut cpus = Vec::new();
            let mut ioapic = None;
            for _ in 0..count {
                let size = if mpc[at] == ENTRY_PROCESSOR { 20 } else { 8 };
                match mpc[at] {
                    ENTRY_PROCESSOR => cpus.push((mpc[at + 1], mpc[at + 3])),
                    ENTRY_IOAPIC => ioapic = Some(mpc[at + 1]),
                    ENTRY_IOINTSRC => assert_eq!(mpc[at + 5], mpc[at + 7], "identity pin routing"),
                    _ => {}
                }
                at += size;
            }
            assert_eq!(at, mpc.len());
            assert_eq!(cpus.len(), usize::from(vcpus));
            assert_eq!(cpus[0], (0, CPU_ENABLED | CPU_BOOTPROCESSOR));
            assert!(cpus[1..]
                .iter()
                .enumerate()
                .all(|(i, c)| *c == (i as u8 + 1, CPU_ENABLED)));
            assert_eq!(ioapic, Some(vcpus));
        }
        // The table must fit the EBDA/ISA hole below 1 MiB even at the maximum.
        assert!(MPTABLE_ADDR as usize + mptable_bytes(254).len() < 0x10_0000);
    }
}
