//! What the VMM benchmarks in this folder share; each says `mod common;` (cargo
//! makes no example of a folder without a `main.rs`). This module owns:
//!
//! - [`VmArgs`]: the arguments every benchmark takes (guest kernel, boots, the
//!   `beacon-vmm` to run), flattened into each benchmark's own clap `Args`;
//! - [`beacon_vmm`] and [`target_binary`]: where the binaries built with an
//!   example are, unless the command line names one;
//! - [`Spread`] and [`median`]: median, minimum, maximum and spread of a
//!   benchmark's samples;
//! - [`memory_pid`]: the process whose memory a VM costs (ours, or the QEMU
//!   child of `beacon-vmm run --backend qemu`).
//!
//! Each benchmark compiles its own copy of this module and uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use anyhow::Context;

// The arguments every benchmark takes; `#[command(flatten)]` them first in
// the benchmark's `Args`. (Not a doc comment: clap would print it as the
// benchmark's description in --help.)
#[derive(clap::Args, Debug)]
pub struct VmArgs {
    /// Guest kernel with the drivers this benchmark uses built in (the beacon
    /// vmlinux).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Boots per backend or configuration (the medians and spreads are over
    /// these).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// beacon-vmm binary (default: next to this example's folder).
    #[arg(long)]
    pub vmm: Option<PathBuf>,
}

impl VmArgs {
    /// The `beacon-vmm` to run: `--vmm`, else the one built with this example.
    pub fn vmm(&self) -> anyhow::Result<PathBuf> {
        beacon_vmm(self.vmm.as_deref())
    }
}

/// `explicit` if given, else `beacon-vmm` next to this example's folder.
pub fn beacon_vmm(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    target_binary("beacon-vmm", explicit)
}

/// `explicit` if given, else the binary `name` in the folder above this
/// example's (`target/<profile>/examples/..`), where cargo puts the binaries
/// it built with it. Whether the file exists is the caller's business.
pub fn target_binary(name: &str, explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe().context("locating this example's binary")?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("no target folder above {}", exe.display()))?;
    Ok(dir.join(name))
}

/// Median, minimum and maximum of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// The middle sample; for an even count the upper of the two middle
    /// ones (a sample that was measured, not a mean of two).
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// None for no samples. Ordered with `f64::total_cmp`, so a NaN sample
    /// does not panic (it sorts as the largest, or the smallest if negative).
    pub fn of(samples: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut v: Vec<f64> = samples.into_iter().collect();
        v.sort_by(f64::total_cmp);
        Some(Self {
            median: *v.get(v.len() / 2)?,
            min: *v.first()?,
            max: *v.last()?,
        })
    }

    /// (max - min) / median in percent; 0 when the median is not positive.
    pub fn percent(&self) -> f64 {
        if self.median > 0.0 {
            (self.max - self.min) / self.median * 100.0
        } else {
            0.0
        }
    }
}

/// The median of `samples` as [`Spread::of`] takes it; None for no samples.
pub fn median(samples: impl IntoIterator<Item = f64>) -> Option<f64> {
    Spread::of(samples).map(|s| s.median)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_samples_no_spread() {
        assert_eq!(Spread::of([]), None);
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn one_sample() {
        let s = Spread::of([2.5]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 2.5, 2.5));
        assert_eq!(s.percent(), 0.0);
    }

    #[test]
    fn odd_and_even_counts_unsorted() {
        let s = Spread::of([30.0, 10.0, 20.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (20.0, 10.0, 30.0));
        assert_eq!(s.percent(), 100.0);
        // Even count: the upper middle sample.
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), Some(3.0));
    }

    #[test]
    fn nan_does_not_panic() {
        let s = Spread::of([1.0, f64::NAN, 3.0]).unwrap();
        assert_eq!((s.median, s.min), (3.0, 1.0));
        assert!(s.max.is_nan());
        let s = Spread::of([f64::NAN]).unwrap();
        assert!(s.median.is_nan());
        assert_eq!(s.percent(), 0.0);
    }

    #[test]
    fn percent_of_a_non_positive_median_is_zero() {
        assert_eq!(Spread::of([0.0, 0.0, 5.0]).unwrap().percent(), 0.0);
        assert_eq!(Spread::of([-3.0, -2.0, -1.0]).unwrap().percent(), 0.0);
    }

    #[test]
    fn explicit_binary_wins() {
        let p = Path::new("/opt/vmm");
        assert_eq!(beacon_vmm(Some(p)).unwrap(), p);
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().and_then(Path::parent).unwrap();
        assert_eq!(beacon_vmm(None).unwrap(), dir.join("beacon-vmm"));
        assert_eq!(
            target_binary("beacon-vsock-tool", None).unwrap(),
            dir.join("beacon-vsock-tool")
        );
    }
}

/// The children of every thread of process `pid` (`/proc/PID/task/*/children`).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// The process holding a VM that `beacon-vmm run --backend BACKEND` (pid
/// `vmm`) started: itself for ours, its `qemu` child for QEMU (the
/// beacon-vmm parent, and virtiofsd for a share, are not counted).
pub fn memory_pid(vmm: u32, backend: &str) -> anyhow::Result<u32> {
    if backend != "qemu" {
        return Ok(vmm);
    }
    children(vmm)
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with("qemu"))
        })
        .context("no qemu child process")
}
