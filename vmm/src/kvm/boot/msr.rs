//! Model-specific registers every vCPU starts with.
//!
//! The values match what firmware would leave behind for Linux: syscall MSRs
//! cleared, fast strings enabled, MTRRs on with write-back as the default type
//! (without it Linux maps all RAM uncached and boots very slowly).

use kvm_bindings::kvm_msr_entry;

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;

/// The boot MSRs, keeping only those `supported` (KVM_GET_MSR_INDEX_LIST) names,
/// so a host without one of them does not fail the boot.
pub fn boot_msrs(supported: &[u32]) -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
    .into_iter()
    .filter(|(index, _)| {
        let ok = supported.contains(index);
        if !ok {
            tracing::debug!("MSR {index:#x} not supported by KVM here; not set at boot");
        }
        ok
    })
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_filtering() {
        let all: Vec<u32> = vec![
            0x10,
            0x174,
            0x175,
            0x176,
            0x1a0,
            0x2ff,
            0xc000_0081,
            0xc000_0082,
            0xc000_0083,
            0xc000_0084,
            0xc000_0102,
        ];
        let msrs = boot_msrs(&all);
        assert_eq!(msrs.len(), 11);
        let get = |i: u32| msrs.iter().find(|m| m.index == i).map(|m| m.data);
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(MSR_LSTAR), Some(0));

        let without_misc: Vec<u32> = all.iter().copied().filter(|&i| i != 0x1a0).collect();
        let msrs = boot_msrs(&without_misc);
        assert_eq!(msrs.len(), 10);
        assert!(msrs.iter().all(|m| m.index != MSR_IA32_MISC_ENABLE));
    }
}
