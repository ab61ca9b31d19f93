//! Direct kernel boot: load the kernel and initrd into guest memory and write
//! everything the kernel reads at its entry point, so that no firmware and no
//! real-mode code runs.
//!
//! An ELF `vmlinux` with a PVH note is entered at its PVH entry in 32-bit
//! protected mode with `hvm_start_info`; any other ELF, and a bzImage, is entered
//! at its 64-bit entry in long mode with `boot_params`, on identity page tables.
//! This module owns guest-memory contents at boot (the ACPI tables excepted: the
//! builder writes those once every device is attached); vCPU registers live in
//! `super::vcpu`, which asks [`BootEntry`] what to load.

pub mod bootparams;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;

use std::fs::File;

use linux_loader::loader::{elf::PvhBootCapability, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::backend::VmError;
use crate::config::{KernelFormat, VmConfig};

use bootparams::{linux_boot_params, pvh_start_info, Initrd};
use layout::{
    initrd_address, low_ram_end, CMDLINE_ADDR, GDT_ADDR, HIMEM_START, IDT_ADDR, PVH_INFO_ADDR,
    PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR, ZERO_PAGE_ADDR,
};

/// Offset of the 64-bit entry (`startup_64`) from the start of a bzImage's
/// protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `rbx` = `hvm_start_info`.
    Pvh { entry: u64 },
    /// Linux 64-bit boot protocol: long mode, `rsi` = `boot_params`.
    Linux64 { entry: u64 },
}

impl BootEntry {
    /// The GDT this entry expects (also loaded into the segment registers).
    pub fn gdt(&self) -> [u64; 4] {
        match self {
            Self::Pvh { .. } => gdt::pvh_gdt(),
            Self::Linux64 { .. } => gdt::long_mode_gdt(),
        }
    }
}

fn mem_err(what: &str) -> impl FnOnce(vm_memory::GuestMemoryError) -> VmError + '_ {
    move |e| VmError::Memory(format!("writing {what} into guest memory: {e}"))
}

/// Load kernel, command line and initrd for `config` into `mem` (`mem_bytes` of
/// RAM laid out by [`layout::ram_regions`]) and write the boot structures.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    config: &VmConfig,
    format: KernelFormat,
) -> Result<BootEntry, VmError> {
    let mut kernel = File::open(&config.kernel)
        .map_err(|e| VmError::KernelLoad(format!("opening {:?}: {e}", config.kernel)))?;
    let highmem = Some(GuestAddress(HIMEM_START));
    let loaded = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut kernel, highmem),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut kernel, highmem),
    }
    .map_err(|e| {
        VmError::KernelLoad(format!(
            "{:?}: {e}; the kernel may be larger than guest memory ({} MiB) or not an x86_64 kernel",
            config.kernel,
            mem_bytes >> 20
        ))
    })?;
    let entry = match (format, loaded.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(addr)) => {
            BootEntry::Pvh { entry: addr.0 }
        }
        (KernelFormat::Elf, _) => BootEntry::Linux64 {
            entry: loaded.kernel_load.0,
        },
        (KernelFormat::BzImage, _) => BootEntry::Linux64 {
            entry: loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
        },
    };
    tracing::debug!(
        ?entry,
        kernel_end = format_args!("{:#x}", loaded.kernel_end),
        "kernel loaded"
    );

    // The command line, NUL-terminated (validated: no NUL inside, < 2048 bytes).
    let mut cmdline = config.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_ADDR))
        .map_err(mem_err("the command line"))?;

    // The initrd: as high as possible below the MMIO gap and the kernel's limit.
    // A bzImage decompresses itself to its preferred address and needs `init_size`
    // bytes there; the initrd must stay clear of that, not just of the image.
    let mut limit = low_ram_end(mem_bytes);
    let mut kernel_end = loaded.kernel_end;
    if let Some(hdr) = loaded.setup_header {
        let max = { hdr.initrd_addr_max };
        if max != 0 {
            limit = limit.min(u64::from(max) + 1);
        }
        let init_size = u64::from(hdr.init_size);
        for base in [{ hdr.pref_address }, loaded.kernel_load.0] {
            kernel_end = kernel_end.max(base.saturating_add(init_size));
        }
    }
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(mem, path, kernel_end, limit)?),
        None => None,
    };

    match entry {
        BootEntry::Pvh { .. } => {
            let (info, memmap, modules) = pvh_start_info(mem_bytes, initrd);
            mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))
                .map_err(mem_err("hvm_start_info"))?;
            for (i, e) in memmap.into_iter().enumerate() {
                let at = PVH_MEMMAP_ADDR + (i * std::mem::size_of_val(&e)) as u64;
                mem.write_obj(e, GuestAddress(at))
                    .map_err(mem_err("the PVH memory map"))?;
            }
            for module in modules {
                mem.write_obj(module, GuestAddress(PVH_MODLIST_ADDR))
                    .map_err(mem_err("the PVH module list"))?;
            }
        }
        BootEntry::Linux64 { .. } => {
            // Fits: the config limits the command line to 2047 bytes.
            let params = linux_boot_params(
                mem_bytes,
                loaded.setup_header,
                config.cmdline.len() as u32,
                initrd,
            )
            .map_err(|e| VmError::KernelLoad(e.to_string()))?;
            mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
                .map_err(mem_err("boot_params"))?;
            paging::write_identity_tables(mem).map_err(mem_err("the boot page tables"))?;
        }
    }

    for (i, desc) in entry.gdt().iter().enumerate() {
        mem.write_obj(*desc, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(mem_err("the GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(mem_err("the IDT"))?;
    mem.write_slice(
        &mptable::mptable_bytes(config.vcpus.boot),
        GuestAddress(mptable::MPTABLE_ADDR),
    )
    .map_err(mem_err("the MP table"))?;
    Ok(entry)
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &std::path::Path,
    kernel_end: u64,
    limit: u64,
) -> Result<Initrd, VmError> {
    let mut file = File::open(path).map_err(VmError::io(format!("opening initrd {path:?}")))?;
    let size = file
        .metadata()
        .map_err(VmError::io(format!("reading the size of initrd {path:?}")))?
        .len();
    let addr = initrd_address(size, kernel_end, limit).ok_or_else(|| {
        VmError::Memory(format!(
            "initrd {path:?} ({} KiB) does not fit between the kernel (ends at {kernel_end:#x}) \
             and {limit:#x} (end of RAM below the 3 GiB MMIO gap); give the VM more memory or use a smaller initrd",
            size >> 10
        ))
    })?;
    let len = usize::try_from(size)
        .map_err(|_| VmError::Memory(format!("initrd {path:?} is too large for this host")))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| VmError::Memory(format!("reading initrd {path:?} into guest memory: {e}")))?;
    tracing::debug!(addr = format_args!("{addr:#x}"), size, "initrd loaded");
    Ok(Initrd { addr, size })
}
