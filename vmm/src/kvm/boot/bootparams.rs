//! The structures a kernel reads at entry: Linux `boot_params` (64-bit boot
//! protocol, for bzImage and ELF without PVH) and Xen's `hvm_start_info` (PVH).
//!
//! Both carry the same facts: the e820 map, where the command line is, and where
//! the initrd is. Building them is pure; writing them to guest memory is the
//! caller's job, so tests can check every field.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};

use super::layout::{e820_map, E820Entry, CMDLINE_ADDR, PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR};

/// `boot_flag` value every boot sector carries.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS": the setup header signature.
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned id.
pub const LOADER_UNDEFINED: u8 = 0xff;
/// Kernel alignment we state for ELF kernels (the x86_64 default, 16 MiB).
pub const KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// `hvm_start_info.magic`.
pub const PVH_MAGIC: u32 = 0x336e_c578;
/// `loadflags` bit: the protected-mode kernel is loaded at 1 MiB.
const LOADED_HIGH: u8 = 0x01;

/// The initrd as loaded: guest address and size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initrd {
    pub addr: u64,
    pub size: u64,
}

/// What does not fit the 32-bit fields of the boot protocol.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootParamsError {
    #[error("the e820 map has {0} entries, more than boot_params holds")]
    TooManyE820Entries(usize),
    #[error("the initrd at {addr:#x} (+{size:#x}) is beyond 4 GiB; the boot protocol cannot point there")]
    InitrdAbove4G { addr: u64, size: u64 },
}

/// Build the zero page. `header` is the bzImage's own setup header (kept, then
/// our fields written over it) or None for an ELF kernel. `cmdline_size` is the
/// command line length without its NUL.
pub fn linux_boot_params(
    mem_bytes: u64,
    header: Option<setup_header>,
    cmdline_size: u32,
    initrd: Option<Initrd>,
) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    } else {
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_size;
    if let Some(Initrd { addr, size }) = initrd {
        let (Ok(addr32), Ok(size32)) = (u32::try_from(addr), u32::try_from(size)) else {
            return Err(BootParamsError::InitrdAbove4G { addr, size });
        };
        params.hdr.ramdisk_image = addr32;
        params.hdr.ramdisk_size = size32;
    }
    let map = e820_map(mem_bytes);
    let mut table = params.e820_table;
    if map.len() > table.len() {
        return Err(BootParamsError::TooManyE820Entries(map.len()));
    }
    for (slot, E820Entry { addr, size, kind }) in table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_table = table;
    // Fits: checked against the table length (128) above.
    params.e820_entries = map.len() as u8;
    // Boot protocol 2.14+: where the ACPI tables start (older kernels scan for it).
    params.acpi_rsdp_addr = crate::acpi::RSDP_ADDR;
    Ok(params)
}

/// The PVH start info with its memory map and module list (the initrd, if any).
/// Addresses inside point at [`PVH_MEMMAP_ADDR`] and [`PVH_MODLIST_ADDR`].
pub fn pvh_start_info(
    mem_bytes: u64,
    initrd: Option<Initrd>,
) -> (
    hvm_start_info,
    Vec<hvm_memmap_table_entry>,
    Vec<hvm_modlist_entry>,
) {
    let memmap: Vec<_> = e820_map(mem_bytes)
        .into_iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let modules: Vec<_> = initrd
        .map(|i| hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .into_iter()
        .collect();
    let info = hvm_start_info {
        magic: PVH_MAGIC,
        // Version 1 carries the memory map, which non-Xen guests require.
        version: 1,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_ADDR
        },
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: crate::acpi::RSDP_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    (info, memmap, modules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm::boot::layout::{E820_RAM, HIMEM_START, MMIO_GAP_END};

    const MIB: u64 = 1 << 20;

    #[test]
    fn elf_boot_params_fields() {
        let initrd = Initrd {
            addr: 0x7f0_0000,
            size: 0x12345,
        };
        let p = linux_boot_params(128 * MIB, None, 42, Some(initrd)).expect("params");
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x7f0_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x12345);
        assert_eq!({ p.hdr.kernel_alignment }, 0x100_0000);
        assert_eq!({ p.e820_entries }, 2);
        let table = { p.e820_table };
        assert_eq!({ table[1].addr }, HIMEM_START);
        assert_eq!({ table[1].size }, 127 * MIB);
        assert_eq!({ table[1].r#type }, E820_RAM);
        assert_eq!({ table[2].size }, 0, "unused slots stay zero");
    }

    #[test]
    fn bzimage_header_is_kept_under_our_fields() {
        let mut hdr = setup_header {
            setup_sects: 27,
            version: 0x020f,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            loadflags: 0x80,
            type_of_loader: 0x12,
            ..Default::default()
        };
        hdr.xloadflags = 0x7f;
        let p = linux_boot_params(5 << 30, Some(hdr), 10, None).expect("params");
        assert_eq!({ p.hdr.setup_sects }, 27);
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ p.hdr.xloadflags }, 0x7f);
        assert_eq!(
            { p.hdr.loadflags },
            0x81,
            "LOADED_HIGH added, CAN_USE_HEAP kept"
        );
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        assert_eq!({ p.e820_entries }, 3);
        let table = { p.e820_table };
        assert_eq!({ table[2].addr }, MMIO_GAP_END);
        assert_eq!({ table[2].size }, 2 << 30);
    }

    #[test]
    fn initrd_beyond_32_bits_is_refused() {
        let err = linux_boot_params(
            128 * MIB,
            None,
            1,
            Some(Initrd {
                addr: 1 << 32,
                size: 1,
            }),
        );
        assert!(matches!(err, Err(BootParamsError::InitrdAbove4G { .. })));
    }

    #[test]
    fn pvh_start_info_fields() {
        let (info, memmap, modules) = pvh_start_info(
            64 * MIB,
            Some(Initrd {
                addr: 0x300_0000,
                size: 0x1000,
            }),
        );
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, 0x20000);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_ADDR);
        assert_eq!(info.memmap_paddr, PVH_MEMMAP_ADDR);
        assert_eq!(info.memmap_entries, 2);
        assert_eq!(memmap[1].addr, HIMEM_START);
        assert_eq!(memmap[1].size, 63 * MIB);
        assert_eq!(modules[0].paddr, 0x300_0000);
        assert_eq!(modules[0].size, 0x1000);
        let (info, _, modules) = pvh_start_info(64 * MIB, None);
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
        assert!(modules.is_empty());
    }
}
