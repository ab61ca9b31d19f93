//! Guest RAM: one shared-memory file, mapped shared, split around the 32-bit
//! MMIO gap.
//!
//! A file (not anonymous memory) so that vhost-user back-ends such as virtiofsd
//! can map the same pages: hand them [`GuestRam::memfd`] and each region's file
//! offset. With huge pages asked for (`--huge-pages`; off by default) the file is an unlinked one
//! on a tmpfs of its own mounted `huge=within_size` and detached at once (it
//! lives only as long as the file is open: no mount is left behind, even if
//! the process is killed after this step), so the guest's RAM is backed by
//! 2 MiB transparent huge pages whatever the host's `shmem_enabled` says
//! (`never` by default, which a memfd obeys). Each page the guest first
//! touches is a nested page fault; with 2 MiB pages there are up to 512 times
//! fewer, which is most of a boot's cost in a nested lab and a real share on
//! hardware. Without the privilege to mount (an unprivileged `beacon-vmm`) it
//! falls back to a memfd with `MADV_HUGEPAGE` (huge only where the host's
//! `shmem_enabled` is `advise` or more), and says so.
//!
//! Devices see the RAM as a [`GuestMem`] (a `GuestMemoryAtomic`), so the
//! region list can be swapped when memory is hotplugged without stopping
//! them. The file is sized with `ftruncate` and mapped `MAP_NORESERVE`, so pages
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

/// An unlinked file on a fresh tmpfs mounted `huge=within_size` (2 MiB
/// transparent huge pages for every page inside the file's size), the mount
/// detached before this returns: it lives on only through the file.
fn huge_tmpfs_file() -> std::io::Result<File> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::Builder::new().prefix("beacon-ram-").tempdir()?;
    let target =
        std::ffi::CString::new(dir.path().as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // No size limit of its own (size=0): the VM's memory size bounds it, and
    // the pages are charged to the cgroup of whoever touches them, as a
    // memfd's are.
    let options = c"huge=within_size,size=0,mode=0700";
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the
    // call; mounting on our own fresh, empty folder.
    let rc = unsafe {
        libc::mount(
            c"beacon-ram".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let path = dir.path().join(beacon_common::GUEST_RAM_NAME);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .and_then(|f| std::fs::remove_file(&path).map(|()| f));
    // Detach the mount whatever happened: the open file (if any) keeps it.
    // SAFETY: `target` is a valid NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        tracing::warn!(
            "detaching the guest RAM tmpfs at {}: {}",
            dir.path().display(),
            std::io::Error::last_os_error()
        );
    }
    file
}

/// Ask for transparent huge pages on a RAM mapping (a hint: where the host
/// refuses, 4 KiB pages back it as before).
fn advise_huge(region: &GuestRegionMmap<()>) {
    let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
        return;
    };
    let Ok(len) = usize::try_from(region.len()) else {
        return;
    };
    // SAFETY: `host..host+len` is the region's own live mapping; MADV_HUGEPAGE
    // changes no contents, only how later faults are served.
    let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        tracing::debug!(
            "MADV_HUGEPAGE on guest RAM: {}",
            std::io::Error::last_os_error()
        );
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
    /// Create `bytes` of guest RAM (whole MiB; the config guarantees >= 32 MiB),
    /// on transparent huge pages where the host allows if `huge_pages`.
    pub fn new(bytes: u64, huge_pages: bool) -> Result<Self, VmError> {
        if let Some(host) = host_memory_bytes() {
            if bytes > host {
                return Err(VmError::Memory(format!(
                    "{} MiB of guest RAM asked for, but this host has only {} MiB; lower --memory",
                    bytes >> 20,
                    host >> 20
                )));
            }
        }
        let huge = if huge_pages {
            match huge_tmpfs_file() {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::info!(
                        "guest RAM on a memfd, huge pages only if the host's shmem_enabled \
                         allows: no huge-page tmpfs ({e}; it needs CAP_SYS_ADMIN)"
                    );
                    None
                }
            }
        } else {
            None
        };
        let file = match huge {
            Some(f) => f,
            None => {
                // beacon_common::GUEST_RAM_NAME, NUL-terminated.
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
                unsafe { File::from_raw_fd(fd) }
            }
        };
        let file = Arc::new(file);
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
            if huge_pages {
                advise_huge(&region);
            }
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

    /// The file behind all regions, a memfd or the huge-page tmpfs file
    /// (region `i` starts at the sum of the lengths of regions before it).
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
        let ram = GuestRam::new(64 << 20, false).expect("ram");
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
        let ram = match GuestRam::new(bytes, true) {
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
    fn huge_page_ram_is_shared_and_leaves_no_mount() {
        let mounts_before = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let ram = GuestRam::new(64 << 20, true).expect("ram");
        ram.memory()
            .write_obj(0x1234_5678_u32, GuestAddress(3 << 20))
            .expect("write");
        let mut buf = [0u8; 4];
        ram.memfd()
            .read_exact_at(&mut buf, 3 << 20)
            .expect("read the RAM file");
        assert_eq!(u32::from_le_bytes(buf), 0x1234_5678);
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        assert_eq!(
            mounts.matches("beacon-ram").count(),
            mounts_before.matches("beacon-ram").count(),
            "the RAM tmpfs is detached at once"
        );
        // Benchmarks find guest RAM by its name, either way it was made.
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        assert!(smaps.contains(beacon_common::GUEST_RAM_NAME), "{smaps}");
        // With the privilege to mount (root here), the file is on the
        // huge-page tmpfs, not a memfd.
        if effective_root() {
            let link = std::fs::read_link(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(ram.memfd())
            ))
            .expect("fd link");
            assert!(
                !link.to_string_lossy().contains("memfd:"),
                "{}",
                link.display()
            );
        }
    }

    /// Whether this process may mount (effective uid 0, from /proc).
    fn effective_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
            })
            .unwrap_or(false)
    }

    #[test]
    fn absurd_sizes_fail_clearly() {
        let err = GuestRam::new(1 << 50, true).expect_err("petabyte");
        assert!(err.to_string().contains("lower --memory"), "{err}");
    }
}
