//! What the benchmark examples share: their command line (`prepare DIR`,
//! `run DIR [RUNS]`), process lookup, medians, and the shim's sandbox phase
//! times read back from containerd's log. Included with `#[path]`
//! (not an example of its own).

use std::path::Path;
use std::process::{Command, ExitCode};

/// The pids `pgrep ARGS` prints.
pub fn pgrep(args: &[&str]) -> Vec<u32> {
    Command::new("pgrep")
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The median of `v` (the upper one of an even count), if any.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// Run benchmark `name`: `prepare DIR` (on the host) or `run DIR [RUNS]`
/// (3 runs unless given), errors on stderr and in the exit code.
pub fn bench_main(
    name: &str,
    prepare: impl FnOnce(&Path) -> anyhow::Result<()>,
    run: impl FnOnce(&Path, usize) -> anyhow::Result<()>,
) -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [cmd, dir] if cmd == "prepare" => {
            let dir = Path::new(dir);
            std::fs::create_dir_all(dir)
                .map_err(anyhow::Error::from)
                .and_then(|()| prepare(dir))
        }
        [cmd, dir] if cmd == "run" => run(Path::new(dir), 3),
        [cmd, dir, runs] if cmd == "run" => match runs.parse() {
            Ok(n) if n > 0 => run(Path::new(dir), n),
            _ => Err(anyhow::anyhow!("RUNS must be a positive number")),
        },
        _ => Err(anyhow::anyhow!(
            "usage: {name} prepare DIR | {name} run DIR [RUNS]"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The phases of sandbox `id`'s start as the shim logged them ("sandbox VM up
/// in 2.310 s (host cgroup 0 ms, network 45 ms, ...)"): (name, ms) in order,
/// from the last such line of `log` that names `id`.
pub fn sandbox_phases(log: &str, id: &str) -> Option<Vec<(String, f64)>> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("sandbox VM up in ") && l.contains(id))?;
    let inner = line.split_once(" s (")?.1.split_once(')')?.0;
    inner
        .split(", ")
        .map(|part| {
            let (name, ms) = part.strip_suffix(" ms")?.rsplit_once(' ')?;
            Some((name.to_string(), ms.parse().ok()?))
        })
        .collect()
}

/// Per-phase medians of several [`sandbox_phases`] results, in the phases'
/// order, as `name median ms` lines.
pub fn phase_medians(runs: &[Vec<(String, f64)>]) -> Vec<(String, f64)> {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .iter()
        .filter_map(|(name, _)| {
            let values = runs
                .iter()
                .filter_map(|r| r.iter().find(|(n, _)| n == name).map(|(_, ms)| *ms))
                .collect();
            median(values).map(|m| (name.clone(), m))
        })
        .collect()
}

/// The report's variant of a benchmark configuration's label (`beaconbox
/// kvm` is `kvm`, `beaconbox qemu` is `qemu`, `runc` is `runc`), for
/// `beacon_tests::bench::sample` lines.
pub fn variant(label: &str) -> &str {
    label.rsplit(' ').next().unwrap_or(label)
}
