//! Guest RAM: one memfd, mapped shared, split around the 32-bit MMIO gap.
//!
//! A memfd (not anonymous memory) so that vhost-user back-ends such as virtiofsd
//! can map the same pages: hand them [`GuestRam::memfd`] and each region's file
//! offset. Devices see the RAM as a [`GuestMem`] (a `GuestMemoryAtomic`), so the
//! region list can be swapped when memory is hotplugged without stopping them. The memfd is sized with `ftruncate` and mapped `MAP_NORESERVE`, so pages
//! are only allocated when the guest touches them; we check up front that the
//! size is plausible for this host, because an overcommitted guest would die later
//! and far less clearly.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
};

pub use beacon_devices::virtio::GuestMem;

use super::boot::layout::ram_regions;
use crate::backend::VmError;

/// The guest's RAM and the file behind it.
pub struct GuestRam {
    mem: GuestMem,
    memfd: Arc<File>,
    bytes: u64,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// Total RAM of this host in bytes, from /proc/meminfo (None if unreadable).
fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl GuestRam {
    /// Create `bytes` of guest RAM (whole MiB; the config guarantees >= 32 MiB).
    pub fn new(bytes: u64) -> Result<Self, VmError> {
        if let Some(host) = host_memory_bytes() {
            if bytes > host {
                return Err(VmError::Memory(format!(
                    "{} MiB of guest RAM asked for, but this host has only {} MiB; lower --memory",
                    bytes >> 20,
                    host >> 20
                )));
            }
        }
        let name = c"beacon-guest-ram";
        // SAFETY: `name` is a valid NUL-terminated string; the flags are constants.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(VmError::Memory(format!(
                "memfd_create failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = Arc::new(unsafe { File::from_raw_fd(fd) });
        file.set_len(bytes).map_err(|e| {
            VmError::Memory(format!(
                "sizing the guest RAM memfd to {} MiB: {e}",
                bytes >> 20
            ))
        })?;
        let mut regions = Vec::new();
        let mut file_offset = 0u64;
        for (base, len) in ram_regions(bytes) {
            let size = usize::try_from(len)
                .map_err(|_| VmError::Memory(format!("region of {len:#x} bytes too large")))?;
            let region = GuestRegionMmap::<()>::from_range(
                GuestAddress(base),
                size,
                Some(FileOffset::from_arc(file.clone(), file_offset)),
            )
            .map_err(|e| {
                VmError::Memory(format!(
                    "mapping {} MiB of guest RAM at {base:#x}: {e}; the host may be out of address space or memory",
                    len >> 20
                ))
            })?;
            regions.push(region);
            file_offset += len;
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| VmError::Memory(format!("assembling guest RAM: {e}")))?;
        Ok(Self {
            mem: GuestMemoryAtomic::new(mem),
            memfd: file,
            bytes,
        })
    }

    /// A snapshot of the guest memory's regions (loaders, KVM registration).
    pub fn memory(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap> {
        self.mem.memory()
    }

    /// The guest memory as devices hold it.
    pub fn shared(&self) -> GuestMem {
        self.mem.clone()
    }

    /// The memfd behind all regions (region `i` starts at the sum of the
    /// lengths of regions before it).
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// RAM size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Tell KVM about every region, as slots 0, 1, ...
    pub fn register(&self, vm: &VmFd) -> Result<(), VmError> {
        let mem = self.mem.memory();
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| VmError::Memory(format!("host address of a RAM region: {e}")))?;
            let table = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by
            // `self.mem` (and the devices' clones of it), which the VM (and so
            // KVM's use of it) never outlives: `KvmVm` drops the VM fd before the
            // memory, and the mapping is only unmapped when the last clone goes.
            unsafe { vm.set_user_memory_region(table) }.map_err(|e| VmError::Hypervisor {
                what: format!(
                    "KVM_SET_USER_MEMORY_REGION slot {slot} at {:#x}",
                    region.start_addr().0
                ),
                source: e.into(),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    #[test]
    fn ram_is_shared_through_the_memfd() {
        let ram = GuestRam::new(64 << 20).expect("ram");
        assert_eq!(ram.memory().num_regions(), 1);
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1234))
            .expect("write");
        let mut buf = [0u8; 4];
        ram.memfd()
            .read_exact_at(&mut buf, 0x1234)
            .expect("read memfd");
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.memfd().metadata().expect("stat").len(), 64 << 20);
    }

    #[test]
    fn ram_above_the_gap_continues_at_4g_in_the_same_memfd() {
        // Sparse: nothing is allocated until touched.
        let bytes = (3 << 30) + (512 << 20);
        let ram = match GuestRam::new(bytes) {
            Ok(ram) => ram,
            // A host with less than 3.5 GiB of RAM refuses, and says why.
            Err(e) => return assert!(e.to_string().contains("lower --memory"), "{e}"),
        };
        let regions: Vec<_> = ram
            .memory()
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        assert_eq!(regions, vec![(0, 3 << 30), (4 << 30, 512 << 20)]);
        ram.memory()
            .write_obj(0x5a5a_u16, GuestAddress(4 << 30))
            .expect("write above 4 GiB");
        let mut buf = [0u8; 2];
        ram.memfd()
            .read_exact_at(&mut buf, 3 << 30)
            .expect("read memfd");
        assert_eq!(
            u16::from_le_bytes(buf),
            0x5a5a,
            "region 1 starts at file offset 3 GiB"
        );
        assert!(
            ram.memory().write_obj(1u8, GuestAddress(3 << 30)).is_err(),
            "the gap is not RAM"
        );
    }

    #[test]
    fn absurd_sizes_fail_clearly() {
        let err = GuestRam::new(1 << 50).expect_err("petabyte");
        assert!(err.to_string().contains("lower --memory"), "{err}");
    }
}
