//! What the kernel's vhost devices (vhost-net, vhost-vsock) are told about
//! guest memory: one table entry per RAM region, with our address of it. The
//! kernel worker runs in our address space, so it needs no fds or offsets
//! (unlike vhost-user, see `fs/backend.rs`). The same table goes out on
//! activation and again after every memory hotplug
//! ([`super::VirtioDevice::memory_changed`]).

use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::device::GuestMem;

/// One entry per region of `mem`: guest address, size and our mapping of it.
// The `..Default::default()` fills the fields vhost's `xen` feature adds.
#[allow(clippy::needless_update)]
pub fn memory_table(mem: &GuestMemoryMmap) -> Vec<VhostUserMemoryRegionInfo> {
    mem.iter()
        .map(|region| VhostUserMemoryRegionInfo {
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            mmap_offset: 0,
            mmap_handle: -1,
            ..Default::default()
        })
        .collect()
}

/// VHOST_SET_MEM_TABLE with the current layout of `mem`.
pub fn set_memory_table(backend: &impl VhostBackend, mem: &GuestMem) -> vhost::Result<()> {
    let table = memory_table(&mem.memory());
    backend.set_mem_table(&table).map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{GuestAddress, GuestMemoryAtomic, MemoryRegionAddress};

    use super::*;
    use crate::virtio::testing::{guest_memory, hot_add, hot_remove, memfd_region};

    /// (guest address, size, our address) of each entry, and what the fields
    /// vhost-user would use are set to.
    fn entries(mem: &GuestMem) -> Vec<(u64, u64, u64)> {
        memory_table(&mem.memory())
            .iter()
            .map(|e| {
                assert_eq!((e.mmap_offset, e.mmap_handle), (0, -1));
                (e.guest_phys_addr, e.memory_size, e.userspace_addr)
            })
            .collect()
    }

    fn host(mem: &GuestMem, gpa: u64) -> u64 {
        let guard = mem.memory();
        let region = guard.find_region(GuestAddress(gpa)).expect("a region");
        region
            .get_host_address(MemoryRegionAddress(gpa - region.start_addr().0))
            .expect("mapped") as u64
    }

    #[test]
    fn one_entry_per_region_with_its_address_size_and_mapping() {
        // RAM below and above the 32-bit hole, the way the VMM lays it out.
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[
                (GuestAddress(0), 3 << 20),
                (GuestAddress(1 << 32), 1 << 20),
            ])
            .expect("memory"),
        );
        assert_eq!(
            entries(&mem),
            [
                (0, 3 << 20, host(&mem, 0)),
                (1 << 32, 1 << 20, host(&mem, 1 << 32)),
            ]
        );
    }

    #[test]
    fn the_table_follows_hot_added_and_removed_regions() {
        let mem = guest_memory(2);
        let boot = (0, 2 << 20, host(&mem, 0));
        let at = 1u64 << 33;
        hot_add(&mem, memfd_region(GuestAddress(at), 4 << 20));
        let added = (at, 4 << 20, host(&mem, at));
        assert_ne!(added.2, 0);
        assert_eq!(entries(&mem), [boot, added]);
        let gone: Arc<_> = hot_remove(&mem, GuestAddress(at), 4 << 20);
        assert_eq!(entries(&mem), [boot]);
        assert_eq!(gone.as_ptr() as u64, added.2, "still mapped until dropped");
    }
}
