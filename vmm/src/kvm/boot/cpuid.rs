//! The CPUID each vCPU sees: KVM's supported list, made consistent with the VM.
//!
//! KVM reports what it *can* expose; we tell every vCPU its own APIC id, the
//! number of logical CPUs, a topology of one socket with one thread per core and
//! `vcpus` cores, and that it runs under KVM (hypervisor bit and the
//! 0x40000000 signature leaf, which enables kvm-clock and PV features in Linux).
//! The filter is pure so it can be tested against a fabricated list.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: the LAPIC timer has TSC-deadline mode.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// The KVM signature, "KVMKVMKVM\0\0\0", as EBX/ECX/EDX.
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// The hypervisor leaf range KVM uses.
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;
const KVM_FEATURES_LEAF: u32 = 0x4000_0001;

/// Leaf 0xB level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `count` items (ceil(log2(count))).
fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

fn max_basic_leaf(entries: &[kvm_cpuid_entry2]) -> u32 {
    entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax)
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    // "AuthenticAMD" (and Hygon's "HygonGenuine", which follows AMD's leaves).
    entries
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| e.ebx == 0x6874_7541 || e.ebx == 0x6f67_7948)
}

fn topology_entry(index: u32, apic_id: u32, vcpus: u32) -> kvm_cpuid_entry2 {
    let (eax, ebx, ecx) = match index {
        // Threads: one per core, so the next level starts at shift 0.
        0 => (0, 1, (LEVEL_TYPE_SMT << 8) | index),
        // Cores: all vCPUs in one package.
        1 => (bits_for(vcpus), vcpus, (LEVEL_TYPE_CORE << 8) | index),
        // Invalid level: ends the enumeration.
        _ => (0, 0, index),
    };
    kvm_cpuid_entry2 {
        function: 0xb,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: apic_id,
        ..Default::default()
    }
}

/// Offer the LAPIC's TSC-deadline timer mode. KVM_GET_SUPPORTED_CPUID leaves
/// the bit clear because it depends on the in-kernel LAPIC; the caller sets it
/// when KVM has `KVM_CAP_TSC_DEADLINE_TIMER` (QEMU does the same). Without it
/// Linux calibrates the LAPIC timer against the PIT at boot and programs it
/// through the initial-count register.
pub fn enable_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == 0x1) {
        e.ecx |= LEAF1_ECX_TSC_DEADLINE;
    }
}

/// Make `entries` (KVM_GET_SUPPORTED_CPUID's answer) right for vCPU `vcpu_id`
/// of `vcpus`.
pub fn filter_cpuid(entries: &mut Vec<kvm_cpuid_entry2>, vcpu_id: u8, vcpus: u8) {
    let apic_id = u32::from(vcpu_id);
    let count = u32::from(vcpus.max(1));
    let max_leaf = max_basic_leaf(entries);
    let amd = is_amd(entries);

    // Topology leaves are rebuilt below; 0x1F is dropped so the guest uses 0xB.
    entries.retain(|e| e.function != 0xb && e.function != 0x1f);

    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Deterministic cache parameters: cores per package in 31:26,
                // threads sharing this cache in 25:14 (L3 is shared by all).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
            }
            HYPERVISOR_LEAF => {
                e.eax = e.eax.max(KVM_FEATURES_LEAF);
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            0x8000_0008 if amd => {
                // NC (cores - 1) in 7:0, APIC id size in 15:12.
                e.ecx = (e.ecx & !0xf0ff) | ((count - 1) & 0xff) | (bits_for(count) << 12);
            }
            0x8000_001e if amd => {
                e.eax = apic_id;
                // Compute unit id = core id, one thread per unit.
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }

    if !entries.iter().any(|e| e.function == HYPERVISOR_LEAF) {
        entries.push(kvm_cpuid_entry2 {
            function: HYPERVISOR_LEAF,
            eax: KVM_FEATURES_LEAF,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
    }
    if max_leaf >= 0xb {
        for index in 0..3 {
            entries.push(topology_entry(index, apic_id, count));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// A plausible Intel host list: max leaf 0x1f, L1d/L2/L3 in leaf 4, host
    /// topology (2 threads, 16 cores) in 0xB and 0x1F.
    fn intel_supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            // "GenuineIntel"
            leaf(0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            leaf(
                1,
                0,
                [
                    0x000906ea,
                    0x0510_0800 | (7 << 24),
                    0x7ffa_fbff,
                    0x0fab_fbff,
                ],
            ),
            leaf(4, 0, [0x1c00_4121, 0x01c0_003f, 0x3f, 0]),
            leaf(4, 2, [0x1c00_4143, 0x01c0_003f, 0x3ff, 0]),
            leaf(4, 3, [0x1c03_c163, 0x03c0_003f, 0x2fff, 6]),
            leaf(0xb, 0, [1, 2, 0x100, 7]),
            leaf(0xb, 1, [5, 32, 0x201, 7]),
            leaf(0x1f, 0, [1, 2, 0x100, 7]),
            leaf(0x4000_0000, 0, [0x4000_0001, 0, 0, 0]),
            leaf(0x4000_0001, 0, [0x0100_7afb, 0, 0, 0]),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    #[test]
    fn apic_ids_and_counts_per_vcpu() {
        for (id, vcpus) in [(0u8, 1u8), (0, 4), (3, 4), (9, 12)] {
            let mut e = intel_supported();
            filter_cpuid(&mut e, id, vcpus);
            let l1 = find(&e, 1, 0);
            assert_eq!(l1.ebx >> 24, u32::from(id), "initial APIC id");
            assert_eq!((l1.ebx >> 16) & 0xff, u32::from(vcpus), "logical count");
            assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
            assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0, "hypervisor bit");
            assert_eq!(
                l1.edx & LEAF1_EDX_HTT != 0,
                vcpus > 1,
                "HTT only with several CPUs"
            );

            // Topology: SMT level of 1 thread, core level of `vcpus` cores, then the end.
            let smt = find(&e, 0xb, 0);
            assert_eq!(
                (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx),
                (0, 1, 1, u32::from(id))
            );
            let core = find(&e, 0xb, 1);
            assert_eq!(
                (core.ebx, core.ecx >> 8, core.edx),
                (u32::from(vcpus), 2, u32::from(id))
            );
            assert!(
                1u32 << core.eax >= u32::from(vcpus),
                "shift covers all APIC ids"
            );
            assert_eq!(find(&e, 0xb, 2).ecx >> 8, 0, "level 2 invalid");
            assert_eq!(
                e.iter().filter(|x| x.function == 0xb).count(),
                3,
                "host 0xB replaced"
            );
            assert!(e.iter().all(|x| x.function != 0x1f), "0x1F dropped");
            assert!(e
                .iter()
                .filter(|x| x.function == 0xb)
                .all(|x| x.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0));

            // Leaf 4: cores per package, L3 shared by all, L1/L2 private.
            assert_eq!((find(&e, 4, 0).eax >> 26) + 1, u32::from(vcpus));
            assert_eq!((find(&e, 4, 0).eax >> 14) & 0xfff, 0);
            assert_eq!(((find(&e, 4, 3).eax >> 14) & 0xfff) + 1, u32::from(vcpus));
            assert_eq!(find(&e, 4, 3).eax & 0x3fff, 0x0163, "cache type/level kept");
        }
    }

    #[test]
    fn kvm_signature_leaf_present_and_right() {
        let mut e = intel_supported();
        filter_cpuid(&mut e, 0, 1);
        let sig = find(&e, HYPERVISOR_LEAF, 0);
        let mut bytes = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
        assert!(sig.eax >= 0x4000_0001);
        // The features leaf KVM gave is kept untouched.
        assert_eq!(find(&e, 0x4000_0001, 0).eax, 0x0100_7afb);

        // A list without the leaf gets one.
        let mut bare = vec![leaf(0, 0, [1, 0, 0, 0]), leaf(1, 0, [0; 4])];
        filter_cpuid(&mut bare, 0, 1);
        assert_eq!(find(&bare, HYPERVISOR_LEAF, 0).ebx, KVM_SIGNATURE[0]);
        assert!(
            bare.iter().all(|x| x.function != 0xb),
            "no 0xB above the max leaf"
        );
    }

    #[test]
    fn amd_core_count_leaves() {
        let mut e = vec![
            // "AuthenticAMD", max leaf 0x10.
            leaf(0, 0, [0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            leaf(1, 0, [0x00a00f11, 0x0008_0800, 0x7ed8_320b, 0x178b_fbff]),
            leaf(0x8000_0008, 0, [0x3030, 0, 0x0000_700f, 0]),
            leaf(0x8000_001e, 0, [0x1f, 0x0100, 0x0300, 0]),
        ];
        filter_cpuid(&mut e, 2, 3);
        let nc = find(&e, 0x8000_0008, 0).ecx;
        assert_eq!(nc & 0xff, 2, "NC = cores - 1");
        assert_eq!((nc >> 12) & 0xf, 2, "APIC id size");
        let ext = find(&e, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx, ext.ecx), (2, 2, 0));
        // Max leaf 0x10 covers 0xB: the topology leaf is provided on AMD too.
        assert_eq!(find(&e, 0xb, 1).ebx, 3);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9, 254].map(bits_for),
            [0, 1, 2, 2, 3, 3, 4, 8]
        );
    }

    #[test]
    fn tsc_deadline_is_offered_in_leaf_1_only() {
        let mut e = vec![
            leaf(0, 0, [0xd, 0, 0, 0]),
            leaf(1, 0, [0; 4]),
            leaf(7, 0, [0; 4]),
        ];
        enable_tsc_deadline(&mut e);
        assert_eq!(e[1].ecx, LEAF1_ECX_TSC_DEADLINE);
        assert_eq!(e[0].ecx, 0);
        assert_eq!(e[2].ecx, 0);
    }
}
