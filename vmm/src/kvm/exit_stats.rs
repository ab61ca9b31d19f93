//! Counting VM exits: by reason, and for port and MMIO exits by address, so a
//! boot's exits can be compared between guests, kernels and VMM changes (in
//! the nested lab every exit is very expensive, so their number is the figure
//! to drive down).
//!
//! Each vCPU thread counts into its own [`ExitCounter`] (no lock on the exit
//! path) and merges it into the VM's [`SharedExitStats`] when it leaves. The
//! per-address table is bounded ([`MAX_ADDRESSES`]): a guest touching many
//! addresses cannot grow it; what does not fit is counted as "other".

use std::collections::HashMap;
use std::sync::Mutex;

use crate::backend::{ExitCount, ExitStats};

/// Distinct (kind, address) pairs kept per vCPU and per VM.
pub const MAX_ADDRESSES: usize = 64;

/// What a vCPU exit was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

impl ExitKind {
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
    by_kind: HashMap<ExitKind, u64>,
    by_address: HashMap<(ExitKind, u64), u64>,
    /// Address exits that did not fit in `by_address`.
    unlisted: u64,
}

impl ExitCounter {
    pub fn count(&mut self, kind: ExitKind, address: u64) {
        *self.by_kind.entry(kind).or_default() += 1;
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
        for (kind, n) in &counter.by_kind {
            *merged.by_kind.entry(*kind).or_default() += n;
        }
        merged.unlisted += counter.unlisted;
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
        let mut by_kind: Vec<ExitCount> = merged
            .by_kind
            .iter()
            .map(|(k, n)| ExitCount {
                what: k.name().to_string(),
                count: *n,
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
        ExitStats {
            total: merged.by_kind.values().sum(),
            by_kind,
            by_address,
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
