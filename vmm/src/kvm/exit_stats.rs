//! Counting VM exits: by reason, and for port and MMIO exits by address, so a
//! boot's exits can be compared between guests, kernels and VMM changes (in
//! the nested lab every exit is very expensive, so their number is the figure
//! to drive down).
//!
//! Each vCPU thread counts into its own [`ExitCounter`] (no lock on the exit
//! path) and merges it into the VM's [`SharedExitStats`] when it leaves. The
//! per-address table is bounded ([`MAX_ADDRESSES`]): a guest touching many
//! addresses cannot grow it; what does not fit is counted as "other".
//!
//! Most exits never reach us: KVM handles them (LAPIC, HLT, MSRs, EPT/NPT
//! faults). [`kvm_vcpu_counters`] reads KVM's own per-vCPU counters through
//! its binary statistics fd (`KVM_GET_STATS_FD`, Linux 5.14+) when a vCPU
//! thread leaves, so both views come out together.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use crate::backend::{ExitCount, ExitStats};

/// Distinct (kind, address) pairs kept per vCPU and per VM.
pub const MAX_ADDRESSES: usize = 64;

/// What a vCPU exit was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitKind {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    /// Interrupted (a kick, a signal) or an interrupt window.
    Intr,
    SystemEvent,
    Other,
}

// `by_kind` is indexed by discriminant: ALL lists every kind, in order.
const _: () = assert!(ExitKind::Other as usize + 1 == ExitKind::ALL.len());

impl ExitKind {
    const ALL: [Self; 8] = [
        Self::IoIn,
        Self::IoOut,
        Self::MmioRead,
        Self::MmioWrite,
        Self::Hlt,
        Self::Intr,
        Self::SystemEvent,
        Self::Other,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::IoIn => "io-in",
            Self::IoOut => "io-out",
            Self::MmioRead => "mmio-read",
            Self::MmioWrite => "mmio-write",
            Self::Hlt => "hlt",
            Self::Intr => "interrupted",
            Self::SystemEvent => "system-event",
            Self::Other => "other",
        }
    }

    fn has_address(self) -> bool {
        matches!(
            self,
            Self::IoIn | Self::IoOut | Self::MmioRead | Self::MmioWrite
        )
    }
}

/// One vCPU's counts.
#[derive(Debug, Default)]
pub struct ExitCounter {
    /// Indexed by `ExitKind as usize` (no hashing on the exit path).
    by_kind: [u64; ExitKind::ALL.len()],
    by_address: HashMap<(ExitKind, u64), u64>,
    /// Address exits that did not fit in `by_address`.
    unlisted: u64,
    /// KVM's own counters for this vCPU ([`kvm_vcpu_counters`]).
    kvm: Vec<(String, u64)>,
}

/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;
/// Bounds on what the stats fd describes (the kernel's own data, bounded anyway).
const MAX_STATS: u32 = 1024;
const MAX_STAT_NAME: u32 = 256;
/// Size of `struct kvm_stats_desc` before its name.
const STATS_DESC_HEADER: usize = 16;

/// KVM's cumulative per-vCPU exit counters (names ending in `exits`, and
/// instruction emulations), read through the vCPU's binary statistics fd.
pub fn kvm_vcpu_counters(vcpu: &impl AsRawFd) -> std::io::Result<Vec<(String, u64)>> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1;
    // `vcpu` is an open vCPU fd.
    let raw = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD as _) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the ioctl just returned this fd to us; nobody else owns it.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    let mut header = [0u8; 24];
    file.read_exact_at(&mut header, 0)?;
    let word = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let (name_size, num_desc) = (word(&header, 4), word(&header, 8));
    let (desc_offset, data_offset) = (word(&header, 16), word(&header, 20));
    if num_desc > MAX_STATS || name_size > MAX_STAT_NAME {
        return Err(std::io::Error::other(format!(
            "KVM describes {num_desc} statistics with {name_size}-byte names; more than expected"
        )));
    }
    let desc_len = STATS_DESC_HEADER + name_size as usize;
    let mut descs = vec![0u8; desc_len * num_desc as usize];
    file.read_exact_at(&mut descs, u64::from(desc_offset))?;
    let mut out = Vec::new();
    for d in descs.chunks_exact(desc_len) {
        let flags = word(d, 0);
        let size = u16::from_le_bytes([d[6], d[7]]);
        let offset = word(d, 8);
        let name_bytes = &d[STATS_DESC_HEADER..];
        let end = name_bytes
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(name_bytes.len());
        let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
        let cumulative =
            flags & kvm_bindings::KVM_STATS_TYPE_MASK == kvm_bindings::KVM_STATS_TYPE_CUMULATIVE;
        if !cumulative || size != 1 || !(name.ends_with("exits") || name == "insn_emulation") {
            continue;
        }
        let mut value = [0u8; 8];
        file.read_exact_at(&mut value, u64::from(data_offset) + u64::from(offset))?;
        out.push((name, u64::from_le_bytes(value)));
    }
    Ok(out)
}

impl ExitCounter {
    /// Record KVM's own counters for this vCPU (read as its thread leaves).
    pub fn set_kvm_counters(&mut self, counters: Vec<(String, u64)>) {
        self.kvm = counters;
    }

    pub fn count(&mut self, kind: ExitKind, address: u64) {
        self.by_kind[kind as usize] += 1;
        if !kind.has_address() {
            return;
        }
        let full = self.by_address.len() >= MAX_ADDRESSES;
        match self.by_address.get_mut(&(kind, address)) {
            Some(n) => *n += 1,
            None if !full => {
                self.by_address.insert((kind, address), 1);
            }
            None => self.unlisted += 1,
        }
    }
}

/// The VM's totals, merged from every vCPU that has left.
#[derive(Debug, Default)]
pub struct SharedExitStats {
    merged: Mutex<ExitCounter>,
}

impl SharedExitStats {
    pub fn merge(&self, counter: &ExitCounter) {
        let mut merged = beacon_common::lock(&self.merged);
        for (total, n) in merged.by_kind.iter_mut().zip(counter.by_kind) {
            *total += n;
        }
        merged.unlisted += counter.unlisted;
        for (name, n) in &counter.kvm {
            match merged.kvm.iter_mut().find(|(m, _)| m == name) {
                Some((_, total)) => *total += n,
                None => merged.kvm.push((name.clone(), *n)),
            }
        }
        for (key, n) in &counter.by_address {
            let full = merged.by_address.len() >= MAX_ADDRESSES;
            match merged.by_address.get_mut(key) {
                Some(m) => *m += n,
                None if !full => {
                    merged.by_address.insert(*key, *n);
                }
                None => merged.unlisted += n,
            }
        }
    }

    /// The totals so far, biggest first.
    pub fn snapshot(&self) -> ExitStats {
        let merged = beacon_common::lock(&self.merged);
        let mut by_kind: Vec<ExitCount> = ExitKind::ALL
            .iter()
            .zip(merged.by_kind)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| ExitCount {
                what: k.name().to_string(),
                count: n,
            })
            .collect();
        by_kind.sort_by(|a, b| b.count.cmp(&a.count).then(a.what.cmp(&b.what)));
        let mut by_address: Vec<ExitCount> = merged
            .by_address
            .iter()
            .map(|((k, addr), n)| ExitCount {
                what: format!("{} {addr:#x}", k.name()),
                count: *n,
            })
            .collect();
        if merged.unlisted > 0 {
            by_address.push(ExitCount {
                what: "other addresses".into(),
                count: merged.unlisted,
            });
        }
        by_address.sort_by(|a, b| b.count.cmp(&a.count).then(a.what.cmp(&b.what)));
        let mut kvm: Vec<ExitCount> = merged
            .kvm
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| ExitCount {
                what: name.clone(),
                count: *n,
            })
            .collect();
        kvm.sort_by(|a, b| b.count.cmp(&a.count).then(a.what.cmp(&b.what)));
        ExitStats {
            total: merged.by_kind.iter().sum(),
            by_kind,
            by_address,
            kvm,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_merge_sort_and_stay_bounded() {
        let shared = SharedExitStats::default();
        let mut a = ExitCounter::default();
        for _ in 0..5 {
            a.count(ExitKind::IoOut, 0x3f8);
        }
        a.count(ExitKind::Hlt, 0);
        let mut b = ExitCounter::default();
        b.count(ExitKind::IoOut, 0x3f8);
        b.count(ExitKind::MmioWrite, 0xc000_0050);
        shared.merge(&a);
        shared.merge(&b);
        let s = shared.snapshot();
        assert_eq!(s.total, 8);
        assert_eq!(s.by_kind[0].what, "io-out");
        assert_eq!(s.by_kind[0].count, 6);
        assert_eq!(s.by_address[0].what, "io-out 0x3f8");
        assert_eq!(s.by_address[0].count, 6);

        // A guest touching endless addresses: the table stays bounded and
        // nothing is lost from the totals.
        let mut flood = ExitCounter::default();
        for addr in 0..10_000u64 {
            flood.count(ExitKind::MmioRead, addr * 4);
        }
        assert_eq!(flood.by_address.len(), MAX_ADDRESSES);
        shared.merge(&flood);
        let s = shared.snapshot();
        assert_eq!(s.total, 10_008);
        assert!(s.by_address.len() <= MAX_ADDRESSES + 1);
        let listed: u64 = s.by_address.iter().map(|c| c.count).sum();
        assert_eq!(listed, 6 + 1 + 10_000, "every address exit is somewhere");
    }
}
