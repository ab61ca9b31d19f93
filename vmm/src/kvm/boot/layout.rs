//! Where everything lives in guest physical memory, and the e820 map that tells the
//! guest which parts are RAM.
//!
//! Low memory holds the boot structures at fixed addresses (below 1 MiB, the way
//! Firecracker and Cloud Hypervisor lay them out); the kernel loads at its own
//! physical address above 1 MiB; the initrd goes as high as it fits below the
//! 32-bit MMIO gap, which spans 3 GiB..4 GiB. RAM beyond 3 GiB continues at 4 GiB.

/// GDT (a handful of 8-byte descriptors).
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map, up to [`ZERO_PAGE_ADDR`].
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4.
pub const PML4_ADDR: u64 = 0x9000;
/// The one page-directory-pointer table (covers 512 GiB, we use 4 entries).
pub const PDPT_ADDR: u64 = 0xa000;
/// Four page directories of 2 MiB pages, one per GiB: 0xb000..0xf000.
pub const PD_ADDR: u64 = 0xb000;
/// How many GiB the boot page tables identity-map.
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// Kernel command line (at most 2048 bytes with its NUL).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Start of the extended BIOS data area: the MP table goes here, and RAM below
/// 640 KiB ends here in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the legacy ISA hole.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (devices, IOAPIC, LAPIC, TSS pages).
pub const MMIO_GAP_START: u64 = 3 << 30;
/// End of the 32-bit MMIO gap; RAM resumes here.
pub const MMIO_GAP_END: u64 = 4 << 30;
/// Three pages KVM needs for the real-mode TSS on Intel (`KVM_SET_TSS_ADDR`).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// One page for KVM's identity map on Intel (`KVM_SET_IDENTITY_MAP_ADDR`).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Page size used for alignment of loaded images.
pub const PAGE_SIZE: u64 = 0x1000;

/// e820 entry type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 entry type: reserved.
pub const E820_RESERVED: u32 = 2;

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest RAM regions to back with host memory, as `(guest address, bytes)`.
/// The first starts at 0 and stops at the MMIO gap; the rest of RAM, if any,
/// starts at 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// Where the memory hotplug room starts: the first GiB boundary above RAM
/// and the MMIO gap. Hot-added blocks go here, lowest first; the e820 map
/// never lists them (the guest learns of them through ACPI).
pub fn hotplug_base(mem_bytes: u64) -> u64 {
    let ram_end = ram_regions(mem_bytes)
        .last()
        .map_or(0, |(base, len)| base + len);
    // RAM ends far below 2^64 (the config caps it at 1 TiB).
    align_up(ram_end.max(MMIO_GAP_END), 1 << 30).unwrap_or(MMIO_GAP_END)
}

/// The end (exclusive) of RAM below the MMIO gap.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

/// The e820 map for `mem_bytes` of RAM: conventional memory below the EBDA, then
/// 1 MiB up to the gap (or the end of RAM), then the remainder above 4 GiB.
/// `mem_bytes` is at least a few MiB (the config enforces 32 MiB).
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![E820Entry {
        addr: 0,
        size: EBDA_START,
        kind: E820_RAM,
    }];
    let low_end = low_ram_end(mem_bytes);
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    if mem_bytes > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_bytes - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

/// Round `value` down to a multiple of `align` (a power of two).
pub fn align_down(value: u64, align: u64) -> u64 {
    value & !(align - 1)
}

/// Round `value` up to a multiple of `align` (a power of two); None on overflow.
pub fn align_up(value: u64, align: u64) -> Option<u64> {
    Some(value.checked_add(align - 1)? & !(align - 1))
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as possible below
/// `limit` (the end of low RAM, or the kernel's `initrd_addr_max` + 1 if lower),
/// and not below `kernel_end`. None when it does not fit.
pub fn initrd_address(size: u64, kernel_end: u64, limit: u64) -> Option<u64> {
    let start = align_down(limit.checked_sub(size)?, PAGE_SIZE);
    (start >= align_up(kernel_end, PAGE_SIZE)?).then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn hotplug_room_starts_on_a_gib_above_ram_and_the_gap() {
        assert_eq!(hotplug_base(512 * MIB), 4 * GIB);
        assert_eq!(hotplug_base(3 * GIB), 4 * GIB);
        assert_eq!(hotplug_base(3 * GIB + MIB), 5 * GIB);
        assert_eq!(hotplug_base(4 * GIB), 5 * GIB);
        assert_eq!(hotplug_base(8 * GIB + 3 * MIB), 10 * GIB);
    }

    #[test]
    fn e820_small_guest() {
        let map = e820_map(128 * MIB);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: 127 * MIB,
                    kind: E820_RAM
                },
            ]
        );
        assert_eq!(ram_regions(128 * MIB), vec![(0, 128 * MIB)]);
    }

    #[test]
    fn e820_exactly_up_to_the_gap() {
        let map = e820_map(3 * GIB);
        assert_eq!(map.len(), 2);
        assert_eq!(map[1].addr + map[1].size, MMIO_GAP_START);
        assert_eq!(ram_regions(3 * GIB), vec![(0, 3 * GIB)]);
    }

    #[test]
    fn e820_large_guest_resumes_above_4g() {
        for mem in [3 * GIB + 2 * MIB, 4 * GIB, 8 * GIB] {
            let map = e820_map(mem);
            assert_eq!(map.len(), 3, "{mem:#x}");
            assert_eq!(
                map[1],
                E820Entry {
                    addr: HIMEM_START,
                    size: 3 * GIB - MIB,
                    kind: E820_RAM
                }
            );
            assert_eq!(
                map[2],
                E820Entry {
                    addr: 4 * GIB,
                    size: mem - 3 * GIB,
                    kind: E820_RAM
                }
            );
            // Nothing is RAM inside the gap.
            assert!(map
                .iter()
                .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
            // Everything but the ISA hole and the EBDA is usable.
            assert_eq!(ram_total(&map), mem - (HIMEM_START - EBDA_START));
            assert_eq!(
                ram_regions(mem),
                vec![(0, 3 * GIB), (4 * GIB, mem - 3 * GIB)]
            );
        }
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (GDT_ADDR, 0x20),
            (IDT_ADDR, 8),
            (PVH_INFO_ADDR, 0x40),
            (PVH_MODLIST_ADDR, 0x20),
            (PVH_MEMMAP_ADDR, ZERO_PAGE_ADDR - PVH_MEMMAP_ADDR),
            (ZERO_PAGE_ADDR, 0x1000),
            (BOOT_STACK_POINTER - 0x800, 0x800),
            (PML4_ADDR, 0x1000),
            (PDPT_ADDR, 0x1000),
            (PD_ADDR, IDENTITY_MAPPED_GIB * 0x1000),
            (CMDLINE_ADDR, 2048),
            (EBDA_START, 0x400),
        ];
        areas.sort();
        for pair in areas.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?}");
        }
        const { assert!(EBDA_START + 0x400 <= HIMEM_START) };
        assert!((MMIO_GAP_START..MMIO_GAP_END).contains(&KVM_TSS_ADDR));
        const { assert!(KVM_IDENTITY_MAP_ADDR + PAGE_SIZE <= KVM_TSS_ADDR) };
        // KVM's pages stay clear of the IOAPIC and LAPIC windows and below 4 GiB.
        let kvm_pages = KVM_IDENTITY_MAP_ADDR..KVM_TSS_ADDR + 3 * PAGE_SIZE;
        for window in [u64::from(IOAPIC_ADDR), u64::from(LAPIC_ADDR)] {
            assert!(!kvm_pages.contains(&window) && !kvm_pages.contains(&(window + PAGE_SIZE - 1)));
        }
        assert!(kvm_pages.end <= MMIO_GAP_END);
    }

    #[test]
    fn initrd_goes_high_page_aligned_or_not_at_all() {
        let limit = 128 * MIB;
        let addr = initrd_address(10 * MIB + 5, 20 * MIB, limit).expect("fits");
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + 10 * MIB + 5 <= limit);
        assert!(limit - (addr + 10 * MIB + 5) < PAGE_SIZE);
        // Exactly filling the room above the kernel.
        assert_eq!(initrd_address(108 * MIB, 20 * MIB, limit), Some(20 * MIB));
        // One page too many.
        assert_eq!(initrd_address(108 * MIB + 1, 20 * MIB, limit), None);
        assert_eq!(initrd_address(u64::MAX, 0, limit), None);
    }
}
