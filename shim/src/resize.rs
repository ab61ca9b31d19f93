//! Sizing the sandbox VM for containerd's Update (and CRI's
//! UpdateContainerResources): the new OCI `LinuxResources` say how many vCPUs
//! and how much memory the VM needs, and the VM is grown before vminitd
//! applies the new cgroup limits, or shrunk after it lowered them.
//!
//! How much: what [`ResourceNeeds`] says (the same rule sizes the VM at
//! create time), never below the boot size; memory above the boot memory in
//! whole hotplug blocks. A resource the update leaves unset (no quota, no
//! limit) keeps the VM's current size.
//! Beyond the VM's maxima (`max_cpus`, `memory_mib + hotplug_memory_mib`)
//! the update is refused and nothing changes.
//!
//! This module only computes; it never talks to the VM or the guest
//! (`service.rs` does, in the order above).

use beacon_vmm::config::HOTPLUG_BLOCK_MIB;
use serde_json::Value;

use crate::config::{ResourceNeeds, GUEST_OVERHEAD_MIB};

/// The VM's size now and its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmShape {
    pub boot_cpus: u8,
    pub cpus: u8,
    pub max_cpus: u8,
    pub boot_mib: u64,
    pub memory_mib: u64,
    pub max_mib: u64,
}

/// The size an update asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub cpus: u8,
    pub memory_mib: u64,
}

impl Target {
    /// What the VM must have before the new limits apply: each resource at
    /// the larger of now and the target (grow first, shrink after).
    pub fn grown(&self, shape: &VmShape) -> Target {
        Target {
            cpus: self.cpus.max(shape.cpus),
            memory_mib: self.memory_mib.max(shape.memory_mib),
        }
    }

    /// Whether `shape` already has this size.
    pub fn is(&self, shape: &VmShape) -> bool {
        self.cpus == shape.cpus && self.memory_mib == shape.memory_mib
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResizeError {
    #[error("the update's resources are not OCI LinuxResources JSON: {0}")]
    BadResources(String),
    #[error("the CPU quota needs {need} vCPUs, but this sandbox's VM has at most {max} (max_cpus); raise max_cpus in the runtime config or io.beaconbox.vm.max_cpus, or lower the quota. Nothing was changed")]
    TooManyCpus { need: u64, max: u8 },
    #[error("the memory limit needs {need_mib} MiB of VM memory (the limit and {GUEST_OVERHEAD_MIB} MiB for the guest), but this sandbox's VM has at most {max_mib} MiB (memory_mib + hotplug_memory_mib); raise hotplug_memory_mib, or lower the limit. Nothing was changed")]
    TooMuchMemory { need_mib: u64, max_mib: u64 },
}

/// What `resources` (OCI LinuxResources as JSON, the way containerd sends
/// them) need of a VM shaped like `shape`.
pub fn target(shape: &VmShape, resources: &[u8]) -> Result<Target, ResizeError> {
    let json: Value =
        serde_json::from_slice(resources).map_err(|e| ResizeError::BadResources(e.to_string()))?;
    if !json.is_object() {
        return Err(ResizeError::BadResources("not a JSON object".into()));
    }
    let needs = ResourceNeeds::of(&json);
    let mut out = Target {
        cpus: shape.cpus,
        memory_mib: shape.memory_mib,
    };
    if let Some(need) = needs.cpus {
        if need > u64::from(shape.max_cpus) {
            return Err(ResizeError::TooManyCpus {
                need,
                max: shape.max_cpus,
            });
        }
        // need <= max_cpus, a u8.
        out.cpus = (need as u8).max(shape.boot_cpus);
    }
    if let Some(need_mib) = needs.memory_mib {
        let above = need_mib.saturating_sub(shape.boot_mib);
        let memory_mib = shape.boot_mib.saturating_add(
            above
                .div_ceil(HOTPLUG_BLOCK_MIB)
                .saturating_mul(HOTPLUG_BLOCK_MIB),
        );
        if memory_mib > shape.max_mib {
            return Err(ResizeError::TooMuchMemory {
                need_mib,
                max_mib: shape.max_mib,
            });
        }
        out.memory_mib = memory_mib;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: VmShape = VmShape {
        boot_cpus: 1,
        cpus: 1,
        max_cpus: 2,
        boot_mib: 512,
        memory_mib: 512,
        max_mib: 512 + 2048,
    };

    fn t(json: &str) -> Result<Target, ResizeError> {
        target(&SHAPE, json.as_bytes())
    }

    #[test]
    fn quota_and_limit_size_the_vm() {
        // 640 MiB + 128 MiB for the guest: 256 MiB above the boot memory.
        assert_eq!(
            t(r#"{"cpu":{"quota":200000,"period":100000},"memory":{"limit":671088640}}"#),
            Ok(Target {
                cpus: 2,
                memory_mib: 768
            })
        );
        // Part of a CPU is a whole one; part of a block is a whole one; a
        // limit the boot memory holds needs nothing more.
        assert_eq!(
            t(r#"{"cpu":{"quota":150000,"period":100000},"memory":{"limit":402653185}}"#),
            Ok(Target {
                cpus: 2,
                memory_mib: 640
            })
        );
        assert_eq!(
            t(r#"{"memory":{"limit":268435456}}"#).map(|t| t.memory_mib),
            Ok(512)
        );
        // Never below the boot vCPUs; a missing period is the kernel's.
        assert_eq!(t(r#"{"cpu":{"quota":50000}}"#).map(|t| t.cpus), Ok(1));
    }

    #[test]
    fn unset_resources_keep_the_current_size() {
        let now = VmShape {
            cpus: 2,
            memory_mib: 896,
            ..SHAPE
        };
        let keep = Target {
            cpus: 2,
            memory_mib: 896,
        };
        for json in [
            "{}",
            r#"{"cpu":{"shares":1024}}"#,
            r#"{"cpu":{"quota":-1,"period":100000}}"#,
            r#"{"memory":{"limit":-1}}"#,
            r#"{"memory":{"limit":0},"pids":{"limit":10}}"#,
        ] {
            let got = target(&now, json.as_bytes());
            assert_eq!(got, Ok(keep), "{json}");
            assert!(keep.is(&now) && keep.grown(&now).is(&now));
        }
    }

    #[test]
    fn beyond_the_maxima_is_refused() {
        let e = t(r#"{"cpu":{"quota":300000,"period":100000}}"#).expect_err("3 > 2");
        assert!(matches!(e, ResizeError::TooManyCpus { need: 3, max: 2 }));
        assert!(e.to_string().contains("max_cpus"), "{e}");
        let e = t(r#"{"memory":{"limit":4294967296}}"#).expect_err("4 GiB");
        assert!(matches!(
            e,
            ResizeError::TooMuchMemory {
                need_mib: 4224,
                max_mib: 2560,
            }
        ));
        assert!(e.to_string().contains("hotplug_memory_mib"), "{e}");
        // Huge numbers do not overflow.
        assert!(t(r#"{"cpu":{"quota":9223372036854775807,"period":1}}"#).is_err());
        assert!(t(r#"{"memory":{"limit":9223372036854775807}}"#).is_err());
    }

    #[test]
    fn growing_comes_first_per_resource() {
        let now = VmShape {
            cpus: 2,
            memory_mib: 768,
            ..SHAPE
        };
        // Fewer vCPUs, more memory: grow memory only, then shrink the vCPUs.
        let t = Target {
            cpus: 1,
            memory_mib: 1024,
        };
        assert_eq!(
            t.grown(&now),
            Target {
                cpus: 2,
                memory_mib: 1024
            }
        );
        assert!(!t.is(&now));
    }

    #[test]
    fn garbage_is_an_error() {
        for bad in ["", "42", "[]", "not json"] {
            assert!(
                matches!(t(bad), Err(ResizeError::BadResources(_))),
                "{bad:?}"
            );
        }
    }
}
