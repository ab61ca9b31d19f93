//! What a resize may ask for, checked the same way by every backend.
//!
//! This module owns the rules of [`crate::VmBackend::resize_vcpus`] and
//! [`crate::VmBackend::resize_memory`] that do not depend on how a backend
//! plugs things in: the bounds, the block size, how long the guest gets to
//! answer and the command-line setting that makes hot-added memory removable.
//! It never touches a VM; the backends call it before they do.

use std::time::Duration;

use crate::backend::VmError;
use crate::config::{MemoryConfig, VcpuConfig, HOTPLUG_BLOCK_MIB};

/// How long a hotplug request waits for the guest to acknowledge (an added
/// device) or eject (a removed one). Generous: in the nested lab a guest on
/// one emulated vCPU can take tens of seconds to run the ACPI methods.
pub const HOTPLUG_ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// Added to the guest's command line when the VM has a memory hotplug room:
/// hot-added memory goes to ZONE_MOVABLE, so it can be taken back.
pub const MOVABLE_MEMORY_PARAM: &str = " memhp_default_state=online_movable";

/// Check that a VM shaped by `vcpus` can have `target` vCPUs.
pub fn check_vcpu_target(vcpus: VcpuConfig, target: u8) -> Result<(), VmError> {
    if vcpus.max <= vcpus.boot {
        return Err(VmError::Unsupported(format!(
            "this VM was started without room for more vCPUs (--max-cpus equal to --cpus: {}); start it with a higher --max-cpus",
            vcpus.max
        )));
    }
    if target == 0 {
        return Err(VmError::Unsupported(
            "a VM needs at least 1 vCPU; ask for 1 or more".into(),
        ));
    }
    if target > vcpus.max {
        return Err(VmError::Unsupported(format!(
            "{target} vCPUs asked for, but this VM was started with at most {} (--max-cpus)",
            vcpus.max
        )));
    }
    Ok(())
}

/// How many hotplug blocks a VM shaped by `memory` needs plugged to have
/// `total_mib` of RAM, or why it cannot have that.
pub fn memory_blocks_for(memory: MemoryConfig, total_mib: u64) -> Result<usize, VmError> {
    let boot = memory.size_mib;
    if memory.hotplug_mib == 0 {
        return Err(VmError::Unsupported(
            "this VM was started without a memory hotplug room (--hotplug-memory 0); start it with one".into(),
        ));
    }
    let max = boot + memory.hotplug_mib;
    if total_mib < boot {
        return Err(VmError::Unsupported(format!(
            "{total_mib} MiB asked for, but boot memory ({boot} MiB) cannot be removed; ask for {boot} MiB or more"
        )));
    }
    if total_mib > max {
        return Err(VmError::Unsupported(format!(
            "{total_mib} MiB asked for, but this VM can have at most {max} MiB ({boot} MiB boot memory and a {} MiB hotplug room)",
            memory.hotplug_mib
        )));
    }
    let extra = total_mib - boot;
    if !extra.is_multiple_of(HOTPLUG_BLOCK_MIB) {
        let below = total_mib - extra % HOTPLUG_BLOCK_MIB;
        return Err(VmError::Unsupported(format!(
            "{total_mib} MiB is not boot memory ({boot} MiB) plus whole {HOTPLUG_BLOCK_MIB} MiB blocks; ask for {below} or {} MiB",
            below + HOTPLUG_BLOCK_MIB
        )));
    }
    usize::try_from(extra / HOTPLUG_BLOCK_MIB)
        .map_err(|_| VmError::Unsupported(format!("{total_mib} MiB is too much")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_targets_within_the_room_only() {
        let shape = VcpuConfig { boot: 1, max: 3 };
        for ok in 1..=3 {
            assert!(check_vcpu_target(shape, ok).is_ok(), "{ok}");
        }
        assert!(check_vcpu_target(shape, 0)
            .expect_err("zero")
            .to_string()
            .contains("at least 1"));
        assert!(check_vcpu_target(shape, 4)
            .expect_err("too many")
            .to_string()
            .contains("at most 3"));
        let none = VcpuConfig { boot: 2, max: 2 };
        assert!(check_vcpu_target(none, 2)
            .expect_err("no room")
            .to_string()
            .contains("--max-cpus"));
    }

    #[test]
    fn memory_targets_are_boot_memory_plus_whole_blocks() {
        let shape = MemoryConfig {
            size_mib: 512,
            hotplug_mib: 512,
            ..Default::default()
        };
        assert_eq!(memory_blocks_for(shape, 512).expect("boot"), 0);
        assert_eq!(memory_blocks_for(shape, 768).expect("two"), 2);
        assert_eq!(memory_blocks_for(shape, 1024).expect("all"), 4);
        let e = memory_blocks_for(shape, 700).expect_err("partial");
        assert!(e.to_string().contains("ask for 640 or 768 MiB"), "{e}");
        let e = memory_blocks_for(shape, 1152).expect_err("beyond");
        assert!(e.to_string().contains("at most 1024 MiB"), "{e}");
        let e = memory_blocks_for(shape, 256).expect_err("below boot");
        assert!(e.to_string().contains("cannot be removed"), "{e}");
        let none = MemoryConfig {
            size_mib: 512,
            hotplug_mib: 0,
            ..Default::default()
        };
        let e = memory_blocks_for(none, 512).expect_err("no room");
        assert!(e.to_string().contains("--hotplug-memory"), "{e}");
    }
}
