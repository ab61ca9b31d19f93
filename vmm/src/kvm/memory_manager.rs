//! Memory hotplug: the hotplug room above RAM, in blocks of
//! [`HOTPLUG_BLOCK_MIB`], each one ACPI memory device (`PNP0C80`).
//!
//! Adding a block creates its own memfd, maps it, registers it with KVM as a
//! new slot, swaps it into the guest memory every device reads through, tells
//! the devices that map guest memory elsewhere (vhost back-ends:
//! [`VirtioDevice::memory_changed`]), and only then marks the block present
//! in the hotplug controller and raises the GED; the guest's ACPI code
//! acknowledges and onlines it (the VMM puts `memhp_default_state=online_movable`
//! on the command line so it can be taken back). Removing a block asks the
//! guest to give it back; once the guest offlined it and ran `_EJ0`, the block
//! leaves the devices' tables first, then KVM, then is unmapped and its memfd
//! closed, which returns its pages to the host. A guest that cannot offline a
//! block (unmovable pages) never ejects it: after [`HOTPLUG_ACK_TIMEOUT`] the
//! block stays and the request fails with a clear error.
//!
//! This module owns the hotplugged regions and their KVM slots; boot RAM is
//! [`super::memory::GuestRam`]'s and it never touches it. It never runs on a
//! vCPU thread.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use beacon_common::lock;
use beacon_devices::hotplug::{HotplugSlot, EVENT_MEMORY};
use beacon_devices::virtio::VirtioDevice;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use super::boot::layout::hotplug_base;
use super::control::VcpuControl;
use super::cpu_manager::{ending, wait_guest, HotplugWiring};
use super::memory::GuestMem;
use crate::backend::VmError;
use crate::config::HOTPLUG_BLOCK_MIB;
use crate::resize::HOTPLUG_ACK_TIMEOUT;

/// Bytes in one hotplug block.
pub const BLOCK_BYTES: u64 = HOTPLUG_BLOCK_MIB << 20;
/// KVM memory slot of the first hotplug block (boot RAM uses the slots below).
const FIRST_SLOT: u32 = 8;
/// The most blocks a hotplug room may have: the kernel's vhost takes 64
/// memory regions by default (`max_mem_regions`), and boot RAM uses two.
pub const MAX_BLOCKS: usize = 62;

/// One plugged block.
struct Plugged {
    region: Arc<GuestRegionMmap>,
}

/// Where block `index` of a room starting at `base` lies.
fn block_addr(base: u64, index: usize) -> u64 {
    base + index as u64 * BLOCK_BYTES
}

/// The hotplug room of one VM.
pub struct MemoryManager {
    vm: Arc<VmFd>,
    mem: GuestMem,
    boot_mib: u64,
    base: u64,
    blocks: Mutex<Vec<Option<Plugged>>>,
    wiring: Option<HotplugWiring>,
    control: Arc<VcpuControl>,
    devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    ack_timeout: Mutex<Duration>,
    /// Serializes resize requests.
    resizing: Mutex<()>,
}

/// What [`MemoryManager::new`] needs besides the room's size.
pub struct MemoryLinks {
    pub vm: Arc<VmFd>,
    pub mem: GuestMem,
    pub control: Arc<VcpuControl>,
    /// Devices to tell when the memory layout changes.
    pub devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
}

/// The guest-physical ranges of a room's blocks, for the DSDT.
pub fn block_ranges(boot_mib: u64, room_mib: u64) -> Vec<(u64, u64)> {
    let base = hotplug_base(boot_mib << 20);
    (0..(room_mib / HOTPLUG_BLOCK_MIB) as usize)
        .map(|i| (block_addr(base, i), BLOCK_BYTES))
        .collect()
}

fn failed(what: String, why: String) -> VmError {
    VmError::Hypervisor {
        what,
        source: std::io::Error::new(std::io::ErrorKind::TimedOut, why),
    }
}

impl MemoryManager {
    /// A room of `room_mib` (a multiple of the block size, at most
    /// [`MAX_BLOCKS`] blocks) above `boot_mib` of RAM; nothing is plugged.
    pub fn new(
        links: MemoryLinks,
        boot_mib: u64,
        room_mib: u64,
        wiring: Option<HotplugWiring>,
    ) -> Result<Self, VmError> {
        let count = (room_mib / HOTPLUG_BLOCK_MIB) as usize;
        if count > MAX_BLOCKS {
            return Err(VmError::Unsupported(format!(
                "a memory hotplug room of {room_mib} MiB is {count} blocks of {HOTPLUG_BLOCK_MIB} MiB; at most {MAX_BLOCKS} are supported (vhost's memory table limit); lower --hotplug-memory to {} MiB or less",
                MAX_BLOCKS as u64 * HOTPLUG_BLOCK_MIB
            )));
        }
        Ok(Self {
            vm: links.vm,
            mem: links.mem,
            boot_mib,
            base: hotplug_base(boot_mib << 20),
            blocks: Mutex::new((0..count).map(|_| None).collect()),
            wiring,
            control: links.control,
            devices: links.devices,
            ack_timeout: Mutex::new(HOTPLUG_ACK_TIMEOUT),
            resizing: Mutex::new(()),
        })
    }

    /// Guest RAM plugged now, in MiB (boot RAM and plugged blocks).
    pub fn total_mib(&self) -> u64 {
        let plugged = lock(&self.blocks).iter().filter(|b| b.is_some()).count() as u64;
        self.boot_mib + plugged * HOTPLUG_BLOCK_MIB
    }

    /// The most RAM this VM can have, in MiB.
    pub fn max_mib(&self) -> u64 {
        self.boot_mib + lock(&self.blocks).len() as u64 * HOTPLUG_BLOCK_MIB
    }

    /// Shorten the wait for the guest (tests of guests that never answer).
    #[cfg(test)]
    pub(crate) fn set_ack_timeout(&self, timeout: Duration) {
        *lock(&self.ack_timeout) = timeout;
    }

    /// Bring guest RAM to `total_mib` (boot RAM plus whole blocks) with the
    /// guest's cooperation. Returns the new total; on error the VM keeps
    /// what it has then (reported in the error).
    pub fn resize(&self, total_mib: u64) -> Result<u64, VmError> {
        let _one_at_a_time = lock(&self.resizing);
        let shape = crate::config::MemoryConfig {
            size_mib: self.boot_mib,
            hotplug_mib: self.max_mib() - self.boot_mib,
            ..Default::default()
        };
        let want = crate::resize::memory_blocks_for(shape, total_mib)?;
        // Checked above: a VM with a room has its hotplug devices.
        let Some(wiring) = &self.wiring else {
            return Err(VmError::Unsupported(
                "this VM has no memory hotplug device".into(),
            ));
        };
        let (free, plugged): (Vec<usize>, Vec<usize>) = {
            let blocks = lock(&self.blocks);
            let free = blocks
                .iter()
                .enumerate()
                .filter(|(_, b)| b.is_none())
                .map(|(i, _)| i)
                .collect();
            let plugged = blocks
                .iter()
                .enumerate()
                .filter(|(_, b)| b.is_some())
                .map(|(i, _)| i)
                .collect();
            (free, plugged)
        };
        let have = plugged.len();
        if want > have {
            self.add(wiring, &free[..want - have])?;
        } else if want < have {
            let mut going = plugged[want..].to_vec();
            going.reverse();
            self.remove(wiring, &going)?;
        }
        Ok(self.total_mib())
    }

    /// Map block `index` and register it with KVM.
    fn map_block(&self, index: usize) -> Result<Arc<GuestRegionMmap>, VmError> {
        let addr = block_addr(self.base, index);
        let name = c"beacon-guest-ram-hotplug";
        // SAFETY: `name` is a valid NUL-terminated string; the flags are constants.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(VmError::Memory(format!(
                "memfd_create for a hotplug block failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = Arc::new(unsafe { File::from_raw_fd(fd) });
        file.set_len(BLOCK_BYTES)
            .map_err(|e| VmError::Memory(format!("sizing a hotplug block's memfd: {e}")))?;
        let region = GuestRegionMmap::<()>::from_range(
            GuestAddress(addr),
            BLOCK_BYTES as usize,
            Some(FileOffset::from_arc(file, 0)),
        )
        .map_err(|e| {
            VmError::Memory(format!(
                "mapping a hotplug block at {addr:#x}: {e}; the host may be out of address space or memory"
            ))
        })?;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| VmError::Memory(format!("host address of a hotplug block: {e}")))?;
        let slot = FIRST_SLOT + index as u32;
        let table = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: addr,
            memory_size: BLOCK_BYTES,
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping is live and owned by the returned region, which
        // `self.blocks` keeps until `unmap_block` has deleted this slot.
        unsafe { self.vm.set_user_memory_region(table) }.map_err(|e| VmError::Hypervisor {
            what: format!("KVM_SET_USER_MEMORY_REGION slot {slot} at {addr:#x} (memory hotplug)"),
            source: e.into(),
        })?;
        Ok(Arc::new(region))
    }

    /// Delete block `index`'s KVM slot (its mapping goes when the last
    /// reference to `region` does).
    fn unregister_block(&self, index: usize, region: &GuestRegionMmap) -> Result<(), VmError> {
        let slot = FIRST_SLOT + index as u32;
        let table = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero size deletes the slot; KVM stops using the mapping.
        unsafe { self.vm.set_user_memory_region(table) }.map_err(|e| VmError::Hypervisor {
            what: format!("deleting KVM memory slot {slot} (memory hot-remove)"),
            source: e.into(),
        })
    }

    /// Put `added` into, and take `removed` out of, the memory devices read.
    fn swap_memory(
        &self,
        added: &[Arc<GuestRegionMmap>],
        removed: &[Arc<GuestRegionMmap>],
    ) -> Result<(), VmError> {
        let guard = self
            .mem
            .lock()
            .map_err(|_| VmError::Memory("the guest memory lock is poisoned".into()))?;
        let mut next = (*self.mem.memory()).clone();
        for r in added {
            next = next
                .insert_region(r.clone())
                .map_err(|e| VmError::Memory(format!("adding a hotplug block: {e}")))?;
        }
        for r in removed {
            next = next
                .remove_region(r.start_addr(), r.len())
                .map_err(|e| VmError::Memory(format!("removing a hotplug block: {e}")))?
                .0;
        }
        guard.replace(next);
        for d in &self.devices {
            lock(d).memory_changed(&self.mem);
        }
        Ok(())
    }

    fn add(&self, wiring: &HotplugWiring, indices: &[usize]) -> Result<(), VmError> {
        let mut mapped = Vec::new();
        for &i in indices {
            match self.map_block(i) {
                Ok(r) => mapped.push((i, r)),
                Err(e) => {
                    for (i, r) in mapped.iter().rev() {
                        let _ = self.unregister_block(*i, r);
                    }
                    return Err(e);
                }
            }
        }
        let regions: Vec<_> = mapped.iter().map(|(_, r)| r.clone()).collect();
        if let Err(e) = self.swap_memory(&regions, &[]) {
            for (i, r) in mapped.iter().rev() {
                let _ = self.unregister_block(*i, r);
            }
            return Err(e);
        }
        {
            let mut blocks = lock(&self.blocks);
            for (i, r) in &mapped {
                blocks[*i] = Some(Plugged { region: r.clone() });
            }
        }
        {
            let mut slots = wiring.state.lock();
            for &i in indices {
                if let Some(s) = slots.memory.get_mut(i) {
                    *s = HotplugSlot {
                        enabled: true,
                        inserting: true,
                        ..HotplugSlot::default()
                    };
                }
            }
        }
        wiring.ged.raise(EVENT_MEMORY);
        let timeout = *lock(&self.ack_timeout);
        let acked = wait_guest(&wiring.state, &self.control, timeout, |s| {
            indices
                .iter()
                .all(|&i| s.memory.get(i).is_some_and(|b| !b.inserting))
        });
        if acked {
            tracing::info!(
                blocks = indices.len(),
                total_mib = self.total_mib(),
                "memory added; the guest acknowledged"
            );
            return Ok(());
        }
        // Undo what the guest did not acknowledge (it never looked at them).
        let unacked: Vec<usize> = {
            let mut slots = wiring.state.lock();
            indices
                .iter()
                .copied()
                .filter(|&i| {
                    let Some(s) = slots.memory.get_mut(i) else {
                        return false;
                    };
                    if s.inserting {
                        *s = HotplugSlot::default();
                        true
                    } else {
                        false
                    }
                })
                .collect()
        };
        self.unplug(&unacked)?;
        if self.control.should_stop() {
            return Err(ending());
        }
        Err(failed(
            "adding memory".into(),
            format!(
                "the guest did not acknowledge {} of {} new blocks within {timeout:?} (does its kernel have ACPI memory hotplug and the GED driver?); the VM has {} MiB",
                unacked.len(),
                indices.len(),
                self.total_mib()
            ),
        ))
    }

    /// Take blocks out of the devices' tables, KVM and the host, in that
    /// order; the guest no longer uses them.
    fn unplug(&self, indices: &[usize]) -> Result<(), VmError> {
        let going: Vec<(usize, Arc<GuestRegionMmap>)> = {
            let mut blocks = lock(&self.blocks);
            indices
                .iter()
                .filter_map(|&i| {
                    blocks
                        .get_mut(i)
                        .and_then(Option::take)
                        .map(|p| (i, p.region))
                })
                .collect()
        };
        let regions: Vec<_> = going.iter().map(|(_, r)| r.clone()).collect();
        self.swap_memory(&[], &regions)?;
        for (i, r) in &going {
            self.unregister_block(*i, r)?;
        }
        // Dropping the last references unmaps the blocks and closes their memfds.
        Ok(())
    }

    fn remove(&self, wiring: &HotplugWiring, indices: &[usize]) -> Result<(), VmError> {
        {
            let mut slots = wiring.state.lock();
            for &i in indices {
                if let Some(s) = slots.memory.get_mut(i) {
                    s.removing = true;
                    s.eject_allowed = true;
                }
            }
        }
        wiring.ged.raise(EVENT_MEMORY);
        let timeout = *lock(&self.ack_timeout);
        wait_guest(&wiring.state, &self.control, timeout, |s| {
            indices
                .iter()
                .all(|&i| s.memory.get(i).is_some_and(|b| !b.enabled))
        });
        let (ejected, stayed): (Vec<usize>, Vec<usize>) = {
            let mut slots = wiring.state.lock();
            let mut ejected = Vec::new();
            let mut stayed = Vec::new();
            for &i in indices {
                match slots.memory.get_mut(i) {
                    Some(s) if s.enabled => {
                        s.removing = false;
                        s.eject_allowed = false;
                        stayed.push(i);
                    }
                    Some(_) => ejected.push(i),
                    None => {}
                }
            }
            (ejected, stayed)
        };
        self.unplug(&ejected)?;
        if stayed.is_empty() {
            tracing::info!(
                blocks = ejected.len(),
                total_mib = self.total_mib(),
                "memory removed; the guest ejected it"
            );
            return Ok(());
        }
        if self.control.should_stop() {
            return Err(ending());
        }
        Err(failed(
            "removing memory".into(),
            format!(
                "the guest did not give back {} of {} blocks within {timeout:?} (it could not offline them: unmovable pages, or memory not onlined as movable); the VM has {} MiB",
                stayed.len(),
                indices.len(),
                self.total_mib()
            ),
        ))
    }
}
