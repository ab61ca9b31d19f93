//! `make bench`'s results: the one line format every benchmark prints its
//! samples in, and the report built from a run's log (JSON, Markdown and a
//! self-contained HTML page with SVG plots), plus the comparison of two
//! result files that flags regressions beyond their spread.
//!
//! A benchmark prints one [`Sample`] line per measured run
//! (`BENCH-SAMPLE bench metric variant unit value`), next to its own human
//! table; `tests/bench/run` (the driver) adds one [`Status`] line per
//! benchmark (`BENCH-STATUS bench ok|failed|missing why`) and `BENCH-END`
//! once every benchmark had its turn. A log without `BENCH-END`, or with a
//! failed benchmark, gives a report marked partial.
//!
//! This module never runs a benchmark or a VM, and never decides what a
//! figure should be: it only counts what the log says.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The tag that starts a sample line.
pub const SAMPLE_TAG: &str = "BENCH-SAMPLE";
/// The tag of the driver's per-benchmark status line.
pub const STATUS_TAG: &str = "BENCH-STATUS";
/// The driver's line once every benchmark had its turn.
pub const END_TAG: &str = "BENCH-END";
/// The driver's line saying where the benchmarks ran (the lab VM, or this
/// host): `BENCH-MACHINE <cpus> <MemTotal kB>`.
pub const MACHINE_TAG: &str = "BENCH-MACHINE";
/// The variant other variants of a metric are divided by, when present.
pub const REFERENCE_VARIANT: &str = "qemu";

/// Every benchmark `make bench` knows, in report order, with what it measures.
/// A benchmark the log never mentions is reported as not run.
pub const BENCHMARKS: &[(&str, &str)] = &[
    ("boot", "boot wall, first vCPU entry, init reached, VMM memory overhead, VM exits per boot (vmm/examples/boot_bench.rs)"),
    ("start", "container start through containerd, sandbox host memory; our VMM, the QEMU backend, runc (shim/examples/start_bench.rs)"),
    ("pod", "pod start through containerd's CRI, ten pods, host memory per pod (shim/examples/pod_bench.rs)"),
    ("net", "TCP throughput guest to host and back over a TAP, userspace and vhost-net (vmm/examples/net_bench.rs)"),
    ("vsock", "100 MiB each way over vsock: vhost-vsock on both, our hybrid backend (vmm/examples/vsock_bench.rs)"),
    ("fs", "virtio-fs cold read of a data set through the same virtiofsd (vmm/examples/fs_bench.rs)"),
    ("blk", "virtio-blk O_DIRECT sequential and 4 KiB I/O (vmm/examples/blk_bench.rs)"),
    ("hotplug", "vCPU and memory hotplug latency, request to reply and to guest use (tests/bench/hotplug)"),
    ("density", "idle 128 MiB VMs started at once: VMs per second, host memory per VM with and without guest RAM (vmm/examples/density_bench.rs)"),
    ("firecracker", "Firecracker booted beside us with the same kernel"),
];

/// Errors reading results.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0} is not a result file of `make bench`: {1}")]
    BadResults(String, String),
}

/// Keeps a token to one word: whitespace becomes `-`, empty becomes `-`.
fn token(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| if c.is_whitespace() { '-' } else { c })
        .collect();
    if t.is_empty() {
        "-".into()
    } else {
        t
    }
}

/// What follows `tag` in `line`, when the tag starts a word there: the lab
/// echoes its guest's output on its serial console, where a kernel message
/// can share a line with a benchmark's.
fn after_tag<'a>(line: &'a str, tag: &str) -> Option<&'a str> {
    let at = line.find(tag)?;
    let before_ok = line[..at]
        .chars()
        .next_back()
        .is_none_or(char::is_whitespace);
    let rest = &line[at + tag.len()..];
    let after_ok = rest.chars().next().is_none_or(char::is_whitespace);
    (before_ok && after_ok).then_some(rest)
}

/// One measured value of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub bench: String,
    pub metric: String,
    pub variant: String,
    pub unit: String,
    pub value: f64,
}

impl Sample {
    pub fn new(bench: &str, metric: &str, variant: &str, unit: &str, value: f64) -> Self {
        Sample {
            bench: token(bench),
            metric: token(metric),
            variant: token(variant),
            unit: token(unit),
            value,
        }
    }

    pub fn to_line(&self) -> String {
        format!(
            "{SAMPLE_TAG} {} {} {} {} {}",
            self.bench, self.metric, self.variant, self.unit, self.value
        )
    }

    /// A sample line, anywhere in a line (the lab prefixes nothing, but a
    /// benchmark's own output may be indented); `None` for anything else,
    /// including a value that is not a finite number.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = after_tag(line, SAMPLE_TAG)?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let [bench, metric, variant, unit, value] = f.as_slice() else {
            return None;
        };
        let value: f64 = value.parse().ok()?;
        value
            .is_finite()
            .then(|| Sample::new(bench, metric, variant, unit, value))
    }
}

/// Prints one sample line on stdout (what a benchmark calls per measured run).
pub fn sample(bench: &str, metric: &str, variant: &str, unit: &str, value: f64) {
    println!(
        "{}",
        Sample::new(bench, metric, variant, unit, value).to_line()
    );
}

/// How a benchmark's turn ended, as the driver saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub bench: String,
    /// `ok`, `failed`, `missing` (no such benchmark here yet), or `not-run`.
    pub state: String,
    pub why: String,
}

impl Status {
    pub fn parse(line: &str) -> Option<Self> {
        let rest = after_tag(line, STATUS_TAG)?;
        let mut f = rest.split_whitespace();
        let bench = f.next()?.to_string();
        let state = f.next()?.to_string();
        let why = f.collect::<Vec<_>>().join(" ");
        Some(Status { bench, state, why })
    }
}

/// One metric of one variant over the runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub bench: String,
    pub metric: String,
    pub variant: String,
    pub unit: String,
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
    /// median / the reference variant's median (`qemu`), when there is one.
    pub ratio: Option<f64>,
}

impl Figure {
    /// Throughput units (`.../s`) are better higher; times, memory and
    /// counts are better lower.
    pub fn higher_is_better(&self) -> bool {
        self.unit.ends_with("/s")
    }

    fn key(&self) -> (String, String, String) {
        (
            self.bench.clone(),
            self.metric.clone(),
            self.variant.clone(),
        )
    }
}

/// Where and from what the figures came.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub date: String,
    pub host: String,
    pub commit: String,
    /// `lab` (nested QEMU TCG with a real KVM inside) or `hardware`.
    pub kvm: String,
    /// CPUs and memory where the benchmarks ran (the lab VM's in the lab),
    /// from the log's `BENCH-MACHINE` line; the host's when there is none.
    pub cpus: String,
    pub memory: String,
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub machine: Machine,
    /// A benchmark failed or the run ended before every benchmark had its turn.
    pub partial: bool,
    pub statuses: Vec<Status>,
    pub figures: Vec<Figure>,
}

/// The median of sorted values (the lower middle one for an even count, as
/// the benchmarks' own tables do).
fn median_sorted(v: &[f64]) -> f64 {
    v[(v.len() - 1) / 2]
}

impl Report {
    /// Builds the report from a `make bench` log.
    pub fn from_log(log: &str, mut machine: Machine) -> Report {
        let mut groups: BTreeMap<(String, String, String), (String, Vec<f64>)> = BTreeMap::new();
        let mut seen: BTreeMap<String, Status> = BTreeMap::new();
        let mut ended = false;
        for line in log.lines() {
            if let Some(s) = Sample::parse(line) {
                let e = groups
                    .entry((s.bench, s.metric, s.variant))
                    .or_insert_with(|| (s.unit.clone(), Vec::new()));
                e.1.push(s.value);
            } else if let Some(st) = Status::parse(line) {
                seen.insert(st.bench.clone(), st);
            } else if let Some(rest) = after_tag(line, MACHINE_TAG) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                if let [cpus, kb] = f.as_slice() {
                    if let Ok(kb) = kb.parse::<u64>() {
                        machine.cpus = cpus.to_string();
                        machine.memory = format!("{:.1} GiB", kb as f64 / 1048576.0);
                    }
                }
            } else if after_tag(line, END_TAG).is_some_and(|r| r.trim().is_empty()) {
                ended = true;
            }
        }
        let mut figures: Vec<Figure> = groups
            .into_iter()
            .map(|((bench, metric, variant), (unit, mut v))| {
                v.sort_by(f64::total_cmp);
                Figure {
                    bench,
                    metric,
                    variant,
                    unit,
                    n: v.len(),
                    min: v[0],
                    median: median_sorted(&v),
                    max: v[v.len() - 1],
                    ratio: None,
                }
            })
            .collect();
        let refs: BTreeMap<(String, String), f64> = figures
            .iter()
            .filter(|f| f.variant == REFERENCE_VARIANT && f.median > 0.0)
            .map(|f| ((f.bench.clone(), f.metric.clone()), f.median))
            .collect();
        for f in &mut figures {
            f.ratio = refs
                .get(&(f.bench.clone(), f.metric.clone()))
                .map(|r| f.median / r);
        }
        let order = |b: &str| BENCHMARKS.iter().position(|(n, _)| *n == b);
        figures.sort_by_key(|f| order(&f.bench).unwrap_or(usize::MAX));
        let mut statuses: Vec<Status> = BENCHMARKS
            .iter()
            .map(|(name, _)| {
                seen.remove(*name).unwrap_or_else(|| {
                    let measured = figures.iter().any(|f| f.bench == *name);
                    let (state, why) = match (measured, ended) {
                        (true, _) => (
                            "failed",
                            "cut short while it ran: its figures so far are below",
                        ),
                        (false, true) => ("not-run", "the driver never started it"),
                        (false, false) => ("not-run", "the run ended before its turn"),
                    };
                    Status {
                        bench: name.to_string(),
                        state: state.into(),
                        why: why.into(),
                    }
                })
            })
            .collect();
        statuses.extend(seen.into_values());
        let partial = !ended
            || statuses
                .iter()
                .any(|s| s.state == "failed" || s.state == "not-run");
        Report {
            machine,
            partial,
            statuses,
            figures,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn from_json(name: &str, text: &str) -> Result<Report, BenchError> {
        serde_json::from_str(text).map_err(|e| BenchError::BadResults(name.into(), e.to_string()))
    }

    fn title(&self) -> String {
        format!(
            "beaconbox benchmarks, {} on {} ({}), commit {}{}",
            self.machine.date,
            self.machine.host,
            self.machine.kvm,
            self.machine.commit,
            if self.partial { " — PARTIAL" } else { "" }
        )
    }

    fn how_to_read(&self) -> &'static str {
        if self.machine.kvm == "lab" {
            "Measured in the nested lab (QEMU TCG with a real KVM inside): every figure is inflated by emulation and VM exits are very expensive, so compare the ratio column (ours / QEMU backend, same lab VM, same run), never absolute times."
        } else {
            "Measured directly on hardware KVM: absolute times mean something; ratios are ours / the QEMU backend in the same run."
        }
    }

    /// The Markdown summary.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# {}\n", self.title());
        let _ = writeln!(s, "{}\n", self.how_to_read());
        let _ = writeln!(
            s,
            "Machine: {} CPUs, {} memory. Figures: median (min–max) over n runs.\n",
            self.machine.cpus, self.machine.memory
        );
        let _ = writeln!(s, "| benchmark | state | note |\n|---|---|---|");
        for st in &self.statuses {
            let _ = writeln!(s, "| {} | {} | {} |", st.bench, st.state, st.why);
        }
        let mut bench = "";
        for f in &self.figures {
            if f.bench != bench {
                bench = &f.bench;
                let what = BENCHMARKS
                    .iter()
                    .find(|(n, _)| *n == bench)
                    .map_or("", |(_, w)| w);
                let _ = writeln!(
                    s,
                    "\n## {bench}\n\n{what}\n\n| metric | variant | median (min–max) | n | / qemu |\n|---|---|---|---|---|"
                );
            }
            let _ = writeln!(
                s,
                "| {} | {} | {} {} ({}–{}) | {} | {} |",
                f.metric,
                f.variant,
                num(f.median),
                f.unit,
                num(f.min),
                num(f.max),
                f.n,
                f.ratio.map_or("-".into(), |r| format!("{r:.2}×"))
            );
        }
        s
    }

    /// A self-contained HTML page: the Markdown's tables plus one SVG bar
    /// chart per metric (bar = median, whisker = min to max).
    pub fn to_html(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>{}</title>\
             <style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}\
             table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px}}\
             .chart{{display:inline-block;margin:4px}}</style></head><body>",
            esc(&self.title())
        );
        let _ = write!(
            s,
            "<h1>{}</h1><p>{}</p><p>Machine: {} CPUs, {} memory.</p>",
            esc(&self.title()),
            esc(self.how_to_read()),
            esc(&self.machine.cpus),
            esc(&self.machine.memory)
        );
        s.push_str("<table><tr><th>benchmark</th><th>state</th><th>note</th></tr>");
        for st in &self.statuses {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&st.bench),
                esc(&st.state),
                esc(&st.why)
            );
        }
        s.push_str("</table>");
        let mut metrics: Vec<(&str, &str)> = Vec::new();
        for f in &self.figures {
            if !metrics.contains(&(f.bench.as_str(), f.metric.as_str())) {
                metrics.push((&f.bench, &f.metric));
            }
        }
        let mut bench = "";
        for (b, m) in metrics {
            if b != bench {
                bench = b;
                let _ = write!(s, "<h2>{}</h2>", esc(b));
            }
            let figs: Vec<&Figure> = self
                .figures
                .iter()
                .filter(|f| f.bench == b && f.metric == m)
                .collect();
            s.push_str(&chart(m, &figs));
        }
        s.push_str("</body></html>\n");
        s
    }
}

/// A number with 3 significant digits or so (no exponent).
fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One horizontal bar chart: a bar per variant (median), a whisker from min
/// to max, the value and ratio printed at the end.
fn chart(metric: &str, figs: &[&Figure]) -> String {
    const W: f64 = 360.0;
    const LABEL: f64 = 90.0;
    const ROW: f64 = 22.0;
    let top = figs.iter().map(|f| f.max).fold(0.0_f64, f64::max);
    let scale = if top > 0.0 { W / top } else { 0.0 };
    let unit = figs.first().map_or("", |f| f.unit.as_str());
    let better = if figs.first().is_some_and(|f| f.higher_is_better()) {
        "higher is better"
    } else {
        "lower is better"
    };
    let h = 24.0 + ROW * figs.len() as f64;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{h}\">\
         <text x=\"0\" y=\"14\" font-size=\"13\" font-weight=\"bold\">{} ({}, {better})</text>",
        LABEL + W + 140.0,
        esc(metric),
        esc(unit)
    );
    for (i, f) in figs.iter().enumerate() {
        let y = 24.0 + ROW * i as f64;
        let colour = match f.variant.as_str() {
            REFERENCE_VARIANT => "#999",
            "runc" => "#c96",
            v if v.starts_with("qemu") => "#bbb",
            _ => "#369",
        };
        let _ = write!(
            s,
            "<text x=\"0\" y=\"{}\" font-size=\"12\">{}</text>\
             <rect x=\"{LABEL}\" y=\"{}\" width=\"{:.1}\" height=\"14\" fill=\"{colour}\"/>\
             <line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"#000\"/>\
             <text x=\"{:.1}\" y=\"{}\" font-size=\"12\">{} {}</text>",
            y + 12.0,
            esc(&f.variant),
            y,
            f.median * scale,
            LABEL + f.min * scale,
            LABEL + f.max * scale,
            y + 7.0,
            y + 7.0,
            LABEL + f.max * scale + 4.0,
            y + 12.0,
            num(f.median),
            f.ratio.map_or(String::new(), |r| format!("({r:.2}×)"))
        );
    }
    s.push_str("</svg>");
    s
}

/// One figure that got worse from `old` to `new` by more than either run's
/// spread: the new median lies outside the old min–max range, on the bad
/// side, and the old median outside the new range.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub figure: String,
    pub old: Figure,
    pub new: Figure,
    pub regression: bool,
}

/// Every figure present in both runs, with whether it regressed.
pub fn compare(old: &Report, new: &Report) -> Vec<Change> {
    let olds: BTreeMap<_, _> = old.figures.iter().map(|f| (f.key(), f)).collect();
    new.figures
        .iter()
        .filter_map(|n| {
            let o = olds.get(&n.key())?;
            let worse = if n.higher_is_better() {
                n.median < o.min && o.median > n.max
            } else {
                n.median > o.max && o.median < n.min
            };
            Some(Change {
                figure: format!("{} {} {}", n.bench, n.metric, n.variant),
                old: (*o).clone(),
                new: n.clone(),
                regression: worse,
            })
        })
        .collect()
}

/// `compare`'s table, regressions marked.
pub fn compare_text(old: &Report, new: &Report) -> String {
    let mut s = format!(
        "old: {} {} ({})\nnew: {} {} ({})\n",
        old.machine.date,
        old.machine.commit,
        old.machine.kvm,
        new.machine.date,
        new.machine.commit,
        new.machine.kvm
    );
    if old.machine.kvm != new.machine.kvm {
        s.push_str("warning: one run is in the lab and one on hardware KVM: absolute figures do not compare\n");
    }
    let changes = compare(old, new);
    for c in &changes {
        let _ = writeln!(
            s,
            "{:<48} {:>10} ({}-{}) -> {:>10} ({}-{}) {}{}",
            c.figure,
            num(c.old.median),
            num(c.old.min),
            num(c.old.max),
            num(c.new.median),
            num(c.new.min),
            num(c.new.max),
            c.new.unit,
            if c.regression { "  REGRESSION" } else { "" }
        );
    }
    let n = changes.iter().filter(|c| c.regression).count();
    let _ = writeln!(
        s,
        "{} figures in both runs, {n} regressed beyond both runs' spread",
        changes.len()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            date: "2026-12-02".into(),
            host: "h".into(),
            commit: "abc".into(),
            kvm: "lab".into(),
            cpus: "1".into(),
            memory: "8 GiB".into(),
        }
    }

    #[test]
    fn sample_lines_round_trip_and_reject_junk() {
        let s = Sample::new("boot", "first run", "kvm", "ms", 12.5);
        assert_eq!(s.to_line(), "BENCH-SAMPLE boot first-run kvm ms 12.5");
        assert_eq!(Sample::parse(&s.to_line()), Some(s));
        assert_eq!(Sample::parse("BENCH-SAMPLE boot wall kvm s"), None);
        assert_eq!(Sample::parse("BENCH-SAMPLE boot wall kvm s NaN"), None);
        assert_eq!(Sample::parse("BENCH-SAMPLE boot wall kvm s 1 2"), None);
        assert_eq!(Sample::parse("run 0 kvm: wall 1.2 s"), None);
        assert_eq!(Sample::parse("X-BENCH-SAMPLE boot wall kvm s 1"), None);
        let echoed = Sample::parse("[   3.1] virtio: x BENCH-SAMPLE boot wall kvm s 1\r");
        assert_eq!(echoed.map(|s| s.value), Some(1.0));
    }

    const LOG: &str = "\
BENCH-SAMPLE boot wall kvm s 2
BENCH-SAMPLE boot wall kvm s 1
BENCH-SAMPLE boot wall kvm s 3
BENCH-SAMPLE boot wall qemu s 4
BENCH-SAMPLE boot wall qemu s 5
BENCH-SAMPLE net tx kvm Gbit/s 2
BENCH-STATUS boot ok
BENCH-STATUS net failed exit 1
BENCH-STATUS density missing no benchmark yet
BENCH-MACHINE 1 6291456
";

    #[test]
    fn figures_have_spread_and_ratio_to_qemu() {
        let r = Report::from_log(LOG, machine());
        let k = &r.figures[0];
        assert_eq!((k.variant.as_str(), k.n), ("kvm", 3));
        assert_eq!((k.min, k.median, k.max), (1.0, 2.0, 3.0));
        assert_eq!(k.ratio, Some(0.5));
        let q = &r.figures[1];
        assert_eq!((q.median, q.ratio), (4.0, Some(1.0)));
        assert_eq!(r.figures[2].ratio, None);
        assert!(r.figures[2].higher_is_better());
        assert!(!k.higher_is_better());
    }

    #[test]
    fn partial_when_interrupted_or_failed() {
        let r = Report::from_log(LOG, machine());
        assert!(r.partial, "no BENCH-END");
        let st = |r: &Report, b: &str| {
            r.statuses
                .iter()
                .find(|s| s.bench == b)
                .map(|s| s.state.clone())
        };
        assert_eq!(st(&r, "start").as_deref(), Some("not-run"));
        let cut = Report::from_log("BENCH-SAMPLE pod pod-start kvm s 1\n", machine());
        assert_eq!(
            st(&cut, "pod").as_deref(),
            Some("failed"),
            "cut short mid-way"
        );
        assert_eq!(st(&r, "density").as_deref(), Some("missing"));
        let failed = format!("{LOG}{END_TAG}\n");
        assert!(Report::from_log(&failed, machine()).partial, "net failed");
        let all_ok: String = BENCHMARKS
            .iter()
            .map(|(b, _)| format!("BENCH-STATUS {b} ok\n"))
            .collect::<String>()
            + END_TAG;
        assert!(!Report::from_log(&all_ok, machine()).partial);
        let missing_only = all_ok.replace(
            "BENCH-STATUS firecracker ok",
            "BENCH-STATUS firecracker missing not built",
        );
        assert!(!Report::from_log(&missing_only, machine()).partial);
    }

    #[test]
    fn renders_every_figure_and_round_trips_json() {
        let r = Report::from_log(LOG, machine());
        let md = r.to_markdown();
        assert!(md.contains("PARTIAL"));
        assert!(
            md.contains("| wall | kvm | 2 s (1–3) | 3 | 0.50× |"),
            "{md}"
        );
        assert!(md.contains("| net | failed | exit 1 |"));
        assert!(
            md.contains("Machine: 1 CPUs, 6.0 GiB memory"),
            "where it ran: {md}"
        );
        let html = r.to_html();
        assert_eq!(html.matches("<svg").count(), 2, "one chart per metric");
        assert!(html.contains("(0.50×)"));
        let back = Report::from_json("r.json", &r.to_json()).expect("json");
        assert_eq!(back, r);
        assert!(Report::from_json("x", "{}").is_err());
    }

    #[test]
    fn regressions_only_beyond_both_spreads() {
        let old = Report::from_log(LOG, machine());
        let slower = LOG
            .replace("kvm s 1\n", "kvm s 6\n")
            .replace("kvm s 2\n", "kvm s 7\n")
            .replace("kvm s 3\n", "kvm s 8\n");
        let new = Report::from_log(&slower, machine());
        let c = compare(&old, &new);
        let wall = c
            .iter()
            .find(|c| c.figure == "boot wall kvm")
            .expect("wall");
        assert!(wall.regression);
        let same = compare(&old, &old);
        assert!(same.iter().all(|c| !c.regression));
        let overlap = LOG.replace("kvm s 3\n", "kvm s 3.5\n");
        let c = compare(&old, &Report::from_log(&overlap, machine()));
        assert!(c.iter().all(|c| !c.regression), "within the spread");
        let faster = LOG.replace("Gbit/s 2", "Gbit/s 1");
        let c = compare(&old, &Report::from_log(&faster, machine()));
        let tx = c.iter().find(|c| c.figure == "net tx kvm").expect("tx");
        assert!(tx.regression, "throughput down");
        assert!(compare_text(&old, &new).contains("REGRESSION"));
    }
}
