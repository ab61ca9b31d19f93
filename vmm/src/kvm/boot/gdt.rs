//! The boot GDT and the `kvm_segment`s derived from it.
//!
//! The kernel's entry points want flat segments: a 64-bit code segment for the
//! Linux 64-bit entry, a 32-bit one for PVH, data segments, and a TSS so KVM has a
//! valid task register. Descriptors are written to guest memory and the same
//! values are loaded into the hidden segment registers, so they agree.

use kvm_bindings::kvm_segment;

/// Flags (access byte and the high nibble) of the descriptors we use.
const CODE64_FLAGS: u16 = 0xa09b;
const CODE32_FLAGS: u16 = 0xc09b;
const DATA_FLAGS: u16 = 0xc093;
const TSS64_FLAGS: u16 = 0x808b;
const TSS32_FLAGS: u16 = 0x008b;

/// Build a segment descriptor from flags, base and (20-bit) limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Selector indices (selector = index * 8).
pub const CODE_INDEX: u16 = 1;
pub const DATA_INDEX: u16 = 2;
pub const TSS_INDEX: u16 = 3;

/// The GDT for the 64-bit Linux entry: null, code64, data, TSS.
pub fn long_mode_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(CODE64_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS64_FLAGS, 0, 0xfffff),
    ]
}

/// The GDT for the PVH entry (32-bit protected mode, paging off): null, code32,
/// data, a 104-byte 32-bit TSS.
pub fn pvh_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(CODE32_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS32_FLAGS, 0, 0x67),
    ]
}

/// The hidden-register form of descriptor `entry` at GDT index `index`.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = bit(55) == 1;
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_have_the_architectural_values() {
        let gdt = long_mode_gdt();
        assert_eq!(gdt[0], 0);
        assert_eq!(
            gdt[1], 0x00af_9b00_0000_ffff,
            "code64: L=1, D=0, G=1, P, exec/read, accessed"
        );
        assert_eq!(
            gdt[2], 0x00cf_9300_0000_ffff,
            "data: D/B=1, G=1, P, read/write, accessed"
        );
        assert_eq!(gdt[3], 0x008f_8b00_0000_ffff, "tss: busy 64-bit TSS, G=1");
        let pvh = pvh_gdt();
        assert_eq!(pvh[1], 0x00cf_9b00_0000_ffff, "code32: D=1, G=1");
        assert_eq!(pvh[2], gdt[2]);
        assert_eq!(pvh[3], 0x0000_8b00_0000_0067, "32-bit busy TSS, 104 bytes");
        assert_eq!(
            gdt_entry(0, 0x1234_5678, 0),
            0x1200_0034_5678_0000,
            "base split"
        );
    }

    #[test]
    fn segments_match_their_descriptors() {
        let gdt = long_mode_gdt();
        let cs = segment_from_gdt(gdt[1], CODE_INDEX);
        assert_eq!((cs.selector, cs.base, cs.limit), (0x8, 0, 0xffff_ffff));
        assert_eq!((cs.type_, cs.s, cs.dpl, cs.present), (0xb, 1, 0, 1));
        assert_eq!((cs.l, cs.db, cs.g, cs.unusable), (1, 0, 1, 0));
        let ds = segment_from_gdt(gdt[2], DATA_INDEX);
        assert_eq!((ds.selector, ds.type_, ds.l, ds.db), (0x10, 0x3, 0, 1));
        let tr = segment_from_gdt(gdt[3], TSS_INDEX);
        assert_eq!((tr.selector, tr.type_, tr.s), (0x18, 0xb, 0));
        let tr32 = segment_from_gdt(pvh_gdt()[3], TSS_INDEX);
        assert_eq!((tr32.limit, tr32.g), (0x67, 0));
        let null = segment_from_gdt(0, 0);
        assert_eq!((null.present, null.unusable), (0, 1));
    }
}
