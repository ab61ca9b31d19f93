//! Identity page tables for entering the kernel in long mode.
//!
//! The 64-bit boot protocol wants paging on and the kernel, boot_params, the
//! command line and the initrd reachable at their physical addresses. We map the
//! first 4 GiB 1:1 with 2 MiB pages: one PML4 entry, four PDPT entries, four page
//! directories of 512 entries. The kernel replaces these tables early.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{IDENTITY_MAPPED_GIB, PDPT_ADDR, PD_ADDR, PML4_ADDR};

/// Present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// In a page directory entry: maps a 2 MiB page instead of pointing to a table.
pub const PTE_HUGE: u64 = 1 << 7;

const TWO_MIB: u64 = 2 << 20;
const ENTRIES: u64 = 512;

/// Write the tables; returns the value for CR3.
pub fn write_identity_tables(mem: &GuestMemoryMmap) -> Result<u64, vm_memory::GuestMemoryError> {
    mem.write_obj(
        PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE,
        GuestAddress(PML4_ADDR),
    )?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PD_ADDR + gib * 0x1000;
        mem.write_obj(
            pd | PTE_PRESENT | PTE_WRITABLE,
            GuestAddress(PDPT_ADDR + gib * 8),
        )?;
        // One 4 KiB write per directory rather than 512 small ones.
        let mut table = [0u8; 0x1000];
        for (i, chunk) in table.chunks_exact_mut(8).enumerate() {
            let phys = (gib * ENTRIES + i as u64) * TWO_MIB;
            chunk.copy_from_slice(&(phys | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE).to_le_bytes());
        }
        mem.write_slice(&table, GuestAddress(pd))?;
    }
    Ok(PML4_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Translate a virtual address the way the MMU would with 4-level paging and
    /// 2 MiB pages; None for a non-present entry.
    fn walk(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let read = |addr: u64| {
            mem.read_obj::<u64>(GuestAddress(addr))
                .expect("table in memory")
        };
        let frame = |e: u64| e & 0x000f_ffff_ffff_f000;
        let pml4e = read(cr3 + ((va >> 39) & 0x1ff) * 8);
        if pml4e & PTE_PRESENT == 0 {
            return None;
        }
        let pdpte = read(frame(pml4e) + ((va >> 30) & 0x1ff) * 8);
        if pdpte & PTE_PRESENT == 0 {
            return None;
        }
        assert_eq!(pdpte & PTE_HUGE, 0, "no 1 GiB pages");
        let pde = read(frame(pdpte) + ((va >> 21) & 0x1ff) * 8);
        if pde & PTE_PRESENT == 0 {
            return None;
        }
        assert_ne!(pde & PTE_HUGE, 0, "2 MiB pages");
        assert_ne!(pde & PTE_WRITABLE, 0);
        Some((pde & 0x000f_ffff_ffe0_0000) | (va & (TWO_MIB - 1)))
    }

    #[test]
    fn first_4_gib_are_identity_mapped() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let cr3 = write_identity_tables(&mem).expect("tables");
        assert_eq!(cr3, PML4_ADDR);
        // Every 2 MiB page, at its start, middle and last byte.
        for page in 0..(IDENTITY_MAPPED_GIB << 30) / TWO_MIB {
            for off in [0, 0x1234, TWO_MIB - 1] {
                let va = page * TWO_MIB + off;
                assert_eq!(walk(&mem, cr3, va), Some(va), "{va:#x}");
            }
        }
        // Nothing above 4 GiB: the 5th PDPT entry and the 2nd PML4 entry are empty.
        assert_eq!(walk(&mem, cr3, 4 << 30), None);
        assert_eq!(walk(&mem, cr3, 1 << 39), None);
    }
}
