//! Runs virtio device scenarios in real guests: each scenario boots `beacon-vmm`
//! on every (backend, kernel) pair it asks for, with its device flags and a
//! guest initrd whose init runs the scenario's checks, and reads the results back
//! from the console. Each boot's console and the VMM's log (stderr) are
//! written to files of their own (`$CONSOLE` and `$CASE_WORK/vmm.log`) and
//! printed one after the other when the boot ends, so a log line never splits
//! a console line; host shell can follow the guest's progress in `$CONSOLE`
//! while it runs. All boots of one call share one lab VM on hosts without
//! hardware KVM; so may raw shell sections ([`RawSection`]) that need the lab but
//! not a device guest.
//!
//! A scenario can run host-side shell around each boot (`host_before`, e.g. make
//! a TAP or start a server; `host_after`, e.g. compare what arrived) inside the
//! same lab VM; `$CASE` names the case, `$BACKEND` its backend, `$GUEST_KERNEL`
//! its kernel ([`GuestKernel::name`]) and `$WORK` a folder private to it, in
//! both and in the `beacon-vmm` arguments (`{WORK}` is replaced there). Before a
//! QEMU case the lab reads QEMU once (`--version`), so its first start is not
//! slowed by loading it over 9p.
//!
//! [`Scenario::combine`] merges scenarios ("parts") into one boot carrying all
//! their devices: each part gets its own `$WORK` subfolder (`{WORK}` in its
//! arguments becomes `{WORK}/<part>`), its guest checks run in a subshell in
//! part order, and each part's result is judged on its own (its guest checks'
//! exit code, its `host_after`'s exit code, its `expect` lines found in its own
//! output or in output no part owns), so a failure names the part.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::assets::{beacon_kernel_dir, lab_visible_tempdir, stock_kernel};
use crate::guest::{device_initrd, DeviceGuest};
use crate::lab::{run_with_kvm, LabOutput};
use crate::script::{section, section_exit_code, sh_command, sh_quote, sh_section};

/// Which guest kernel a case boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKernel {
    /// The beacon kernel as ELF `vmlinux` (PVH entry), drivers built in.
    Beacon,
    /// The beacon kernel as `bzImage` (Linux boot protocol), drivers built in.
    BeaconBzImage,
    /// Debian's cloud kernel (bzImage), virtio drivers as modules found through ACPI.
    Stock,
}

impl GuestKernel {
    /// The name in case names and `$GUEST_KERNEL`.
    pub fn name(self) -> &'static str {
        match self {
            GuestKernel::Beacon => "beacon",
            GuestKernel::BeaconBzImage => "beacon-bz",
            GuestKernel::Stock => "stock",
        }
    }

    /// Whether it is the beacon kernel (in either format).
    pub fn is_beacon(self) -> bool {
        self != GuestKernel::Stock
    }
}

/// How the guest ends after its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEnd {
    /// ACPI power off (`poweroff -f`).
    PowerOff,
    /// A reset (`reboot -f`; `reboot=k` on the KVM backend's command line).
    Reset,
}

/// One device scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    /// Backends to run on ("kvm", "qemu").
    pub backends: Vec<&'static str>,
    pub kernels: Vec<GuestKernel>,
    /// Extra `beacon-vmm run` arguments; `{WORK}` becomes the case's folder.
    pub vmm_args: Vec<String>,
    /// Guest shell; the init prints `BEACON-CHECKS-RC: <its exit code>`. Checks
    /// that must not let the guest sync at the end (a virtio-fs share whose
    /// backend died: Linux would wait for it forever) create `/tmp/beacon-no-sync`.
    pub checks: String,
    /// Stock kernel modules to load (with dependencies) before the checks.
    pub stock_modules: Vec<&'static str>,
    /// More files for the guest initrd: (host path, guest path).
    pub guest_files: Vec<(PathBuf, String)>,
    /// Host shell run before the boot (in the lab VM when there is one).
    pub host_before: String,
    /// Host shell run after the boot; a non-zero exit fails the case. It runs in
    /// the case's shell (so it can `wait` for jobs `host_before` started), so it
    /// must not `exit` or leave `set -e` on; `$rc` is `beacon-vmm`'s exit code.
    pub host_after: String,
    /// Text the case's output (console and host shell) must contain.
    pub expect: Vec<String>,
    /// Guest memory in MiB (default 256).
    pub memory_mib: u64,
    /// vCPUs the guest boots with (default 1).
    pub cpus: u8,
    /// vCPUs the VM could have (hotplug-capable; default: `cpus`).
    pub max_cpus: Option<u8>,
    /// How the guest ends (default: power off).
    pub end: GuestEnd,
    /// Seconds one boot may take before `timeout` ends it.
    pub timeout_secs: u32,
    /// The parts of a [`Scenario::combine`]d scenario (empty otherwise).
    pub parts: Vec<Part>,
}

/// What a combined scenario keeps of each part to judge it on its own.
#[derive(Debug, Clone)]
pub struct Part {
    pub name: &'static str,
    pub expect: Vec<String>,
    /// Whether the part has guest checks (a part may be host shell only).
    pub guest: bool,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: "",
            backends: vec!["kvm", "qemu"],
            kernels: vec![GuestKernel::Beacon, GuestKernel::Stock],
            vmm_args: Vec::new(),
            checks: String::new(),
            stock_modules: vec!["virtio_mmio"],
            guest_files: Vec::new(),
            host_before: String::new(),
            host_after: String::new(),
            expect: Vec::new(),
            memory_mib: 256,
            cpus: 1,
            max_cpus: None,
            end: GuestEnd::PowerOff,
            timeout_secs: 180,
            parts: Vec::new(),
        }
    }
}

/// The lines around the VMM's own log (its stderr) in a case's output, which
/// comes after the console's.
const VMM_LOG: &str = "=== VMM-LOG";
const VMM_LOG_END: &str = "=== VMM-LOG-END";

/// Marker lines that delimit a part's own output in a combined case.
fn marker(kind: &str, part: &str) -> String {
    format!("=== PART-{kind} [{part}]")
}

impl Scenario {
    /// One scenario booting every part's devices at once, named `name`. It runs
    /// on the backends and kernels all parts allow; memory and the boot timeout
    /// are the parts' largest (set them after combining to change them), vCPUs
    /// and the guest's end are the defaults. Parts must not be combined
    /// themselves, must have distinct names, and must not put different files at
    /// one guest path. A part whose checks stop the guest from syncing (see
    /// [`Scenario::checks`]) should come last.
    pub fn combine(name: &'static str, parts: Vec<Scenario>) -> Scenario {
        assert!(!parts.is_empty(), "{name}: no parts");
        let mut out = Scenario {
            name,
            backends: parts[0].backends.clone(),
            kernels: parts[0].kernels.clone(),
            stock_modules: Vec::new(),
            memory_mib: 0,
            timeout_secs: 0,
            ..Scenario::default()
        };
        let mut checks = String::from("rc=0\n");
        let mut after = String::from("after_rc=0\n");
        for p in &parts {
            assert!(p.parts.is_empty(), "{name}: part {} is combined", p.name);
            assert!(
                !out.parts.iter().any(|q| q.name == p.name),
                "{name}: two parts named {}",
                p.name
            );
            out.backends.retain(|b| p.backends.contains(b));
            out.kernels.retain(|k| p.kernels.contains(k));
            let sub = format!("{{WORK}}/{}", p.name);
            out.vmm_args
                .extend(p.vmm_args.iter().map(|a| a.replace("{WORK}", &sub)));
            for m in &p.stock_modules {
                if !out.stock_modules.contains(m) {
                    out.stock_modules.push(m);
                }
            }
            for (host, guest) in &p.guest_files {
                match out.guest_files.iter().find(|(_, g)| g == guest) {
                    Some((h, _)) => assert_eq!(h, host, "{name}: two files for {guest}"),
                    None => out.guest_files.push((host.clone(), guest.clone())),
                }
            }
            out.memory_mib = out.memory_mib.max(p.memory_mib);
            out.timeout_secs = out.timeout_secs.max(p.timeout_secs);
            let work = format!("WORK=\"$CASE_WORK/{}\"; mkdir -p \"$WORK\"", p.name);
            out.host_before.push_str(&format!(
                "{work}\necho '{}'\n{}\nset +e\necho '{}'\n",
                marker("HOST-BEFORE", p.name),
                p.host_before,
                marker("HOST-BEFORE-END", p.name),
            ));
            let guest = !p.checks.trim().is_empty();
            if guest {
                checks.push_str(&format!(
                    "echo '{}'\n(\n{}\n)\nprc=$?\necho \"{} rc=$prc at $(cut -d' ' -f1 /proc/uptime) s\"\n[ $prc -eq 0 ] || rc=1\n",
                    marker("GUEST", p.name),
                    p.checks,
                    marker("GUEST-END", p.name),
                ));
            }
            after.push_str(&format!(
                "{work}\necho '{}'\n{{\n{}\n}}\nprc=$?\nset +e\necho \"{} rc=$prc\"\n[ $prc -eq 0 ] || after_rc=1\n",
                marker("HOST-AFTER", p.name),
                if p.host_after.trim().is_empty() { "true" } else { p.host_after.as_str() },
                marker("HOST-AFTER-END", p.name),
            ));
            out.parts.push(Part {
                name: p.name,
                expect: p.expect.clone(),
                guest,
            });
        }
        assert!(
            !out.backends.is_empty() && !out.kernels.is_empty(),
            "{name}: the parts have no backend and kernel in common"
        );
        checks.push_str("exit $rc\n");
        after.push_str("WORK=\"$CASE_WORK\"\n(exit $after_rc)");
        out.checks = checks;
        out.host_after = after;
        out
    }
}

/// Shell that needs the lab (a real KVM) but no device guest of its own, run in
/// the same lab VM as the scenarios (after them), as a section of its own.
#[derive(Debug, Clone)]
pub struct RawSection {
    pub name: String,
    pub script: String,
}

/// The outcome of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    /// The scenario's name (`dev1`, ...), backend and guest kernel.
    pub boot: &'static str,
    pub backend: &'static str,
    pub kernel: GuestKernel,
    pub output: String,
    pub problems: Vec<String>,
}

/// Run every case of `scenarios`; the caller asserts on the results
/// ([`assert_all_passed`]). `binary` is the `beacon-vmm` executable.
pub fn run_scenarios(
    binary: &Path,
    scenarios: &[Scenario],
    lab_timeout: Duration,
) -> Vec<CaseResult> {
    run_in_one_lab(binary, scenarios, &[], lab_timeout).0
}

/// [`run_scenarios`], then `raw` sections, in one lab VM; also returns the lab's
/// whole output (read a raw section with [`crate::script::section`]).
pub fn run_in_one_lab(
    binary: &Path,
    scenarios: &[Scenario],
    raw: &[RawSection],
    lab_timeout: Duration,
) -> (Vec<CaseResult>, LabOutput) {
    let beacon_dir = beacon_kernel_dir().expect("beacon kernel");
    let stock = stock_kernel().expect("stock kernel");
    let tmp = lab_visible_tempdir().expect("tempdir");

    let mut script = String::from("set +e\n");
    let mut cases: Vec<(String, &Scenario, &'static str, GuestKernel)> = Vec::new();
    for (i, s) in scenarios.iter().enumerate() {
        for &kernel in &s.kernels {
            let kname = kernel.name();
            let kpath = match kernel {
                GuestKernel::Beacon => beacon_dir.join("vmlinux"),
                GuestKernel::BeaconBzImage => beacon_dir.join("bzImage"),
                GuestKernel::Stock => stock.clone(),
            };
            let guest = DeviceGuest {
                checks: s.checks.clone(),
                stock_modules: if kernel == GuestKernel::Stock {
                    s.stock_modules.clone()
                } else {
                    Vec::new()
                },
                extra: s.guest_files.clone(),
            };
            // Scenarios may share a name (one per backend, say): the index
            // keeps their initrds apart.
            let initrd = device_initrd(tmp.path(), &format!("{i}-{}-{kname}.gz", s.name), &guest)
                .expect("guest initrd");
            for &backend in &s.backends {
                let name = format!("{}-{backend}-{kname}", s.name);
                let work = tmp.path().join(&name);
                std::fs::create_dir_all(&work).expect("case folder");
                let work_s = work.display().to_string();
                let mut cmdline = String::from("console=ttyS0 panic=-1 quiet");
                if s.end == GuestEnd::Reset {
                    cmdline.push_str(" beacon.end=reset");
                    if backend == "kvm" {
                        cmdline.push_str(" reboot=k");
                    }
                }
                cmdline.push_str(&format!(" beacon.case={name}"));
                let mut argv: Vec<String> = vec![
                    "timeout".into(),
                    s.timeout_secs.to_string(),
                    binary.display().to_string(),
                    "run".into(),
                    "--backend".into(),
                    backend.into(),
                    "--kernel".into(),
                    kpath.display().to_string(),
                    "--initrd".into(),
                    initrd.display().to_string(),
                    "--memory".into(),
                    s.memory_mib.to_string(),
                    "--cpus".into(),
                    s.cpus.to_string(),
                    "--max-cpus".into(),
                    s.max_cpus.unwrap_or(s.cpus).to_string(),
                    "--cmdline".into(),
                    cmdline,
                ];
                argv.extend(s.vmm_args.iter().map(|a| a.replace("{WORK}", &work_s)));
                let warm = if backend == "qemu" {
                    "qemu-system-x86_64 --version >/dev/null 2>&1\n"
                } else {
                    ""
                };
                // The console and the VMM's log go to files of their own and
                // are printed after the boot: one stream for both let a log
                // line land inside a console line and hide it from `expect`.
                // The VMM's threads are confined in trap mode: a call off an
                // allowlist ends the boot with 159 and names the thread class
                // and the call in the VMM's log.
                let body = format!(
                    "export CASE={} WORK={} CASE_WORK={} BACKEND={backend} GUEST_KERNEL={kname}\nexport CONSOLE=\"$CASE_WORK/console.out\" BEACON_SECCOMP=trap\necho \"{CASE_TIME} start $(cut -d' ' -f1 /proc/uptime)\"\n{warm}{}\necho \"{CASE_TIME} vmm $(cut -d' ' -f1 /proc/uptime)\"\nNO_COLOR=1 {} >\"$CONSOLE\" 2>\"$CASE_WORK/vmm.log\"\nrc=$?\necho \"{CASE_TIME} vmm-end $(cut -d' ' -f1 /proc/uptime)\"\ncat \"$CONSOLE\"\necho '{VMM_LOG}'\ncat \"$CASE_WORK/vmm.log\"\necho '{VMM_LOG_END}'\n{}\n[ $? -eq 0 ] || {{ echo HOST-AFTER-FAILED; [ $rc -ne 0 ] || rc=99; }}\necho \"{CASE_TIME} end $(cut -d' ' -f1 /proc/uptime)\"\n(exit $rc)",
                    sh_quote(&name),
                    sh_quote(&work_s),
                    sh_quote(&work_s),
                    s.host_before,
                    sh_command(&argv),
                    if s.host_after.is_empty() { "true" } else { s.host_after.as_str() },
                );
                script.push_str(&sh_section(&name, &format!("(\n{body}\n)")));
                cases.push((name, s, backend, kernel));
            }
        }
    }
    for r in raw {
        script.push_str(&sh_section(&r.name, &format!("(\n{}\n)", r.script)));
    }
    let script_path = tmp.path().join("devices.sh");
    std::fs::write(&script_path, script).expect("write script");
    let out = run_with_kvm(
        &["sh".to_string(), script_path.display().to_string()],
        lab_timeout,
    )
    .expect("lab run");

    let mut results = Vec::new();
    for (name, s, backend, kernel) in cases {
        let text = section(&out.output, &name).unwrap_or_default().to_string();
        let mut problems = Vec::new();
        match section_exit_code(&out.output, &name) {
            None => problems.push("no output section".to_string()),
            Some(0) => {}
            Some(rc) => problems.push(format!("exit code {rc}")),
        }
        if !text.contains("BEACON-CHECKS-RC: 0") {
            problems.push("guest checks failed".to_string());
        }
        if text.contains("BEACON-MODULE-FAILED") {
            problems.push("a module did not load".to_string());
        }
        for e in &s.expect {
            if !text.contains(e.as_str()) {
                problems.push(format!("missing {e:?}"));
            }
        }
        problems.extend(part_problems(&text, &s.parts));
        results.push(CaseResult {
            name,
            boot: s.name,
            backend,
            kernel,
            output: text,
            problems,
        });
    }
    eprintln!("{}", timings(&results));
    eprintln!("{}", matrix(&results));
    eprintln!(
        "{} device boots and {} other sections in {:.1} s",
        results.len(),
        raw.len(),
        out.elapsed.as_secs_f64()
    );
    (results, out)
}

/// Lines the lab prints before and after each boot (the lab's uptime).
const CASE_TIME: &str = "BEACON-CASE-TIME";

/// Where each boot's time went, for the suite's output (`--nocapture`): the
/// boot's wall time in the lab and the guest's uptime at the end of each part.
fn timings(results: &[CaseResult]) -> String {
    let mut out = String::from("device suite timings (lab seconds; guest uptime after each part):");
    for r in results {
        let span = |a: &str, b: &str| match (case_time(r, a), case_time(r, b)) {
            (Some(a), Some(b)) => format!("{:.1}", b - a),
            _ => "?".to_string(),
        };
        let wall = format!(
            "{} (host before {}, VM {}, host after {})",
            span("start", "end"),
            span("start", "vmm"),
            span("vmm", "vmm-end"),
            span("vmm-end", "end")
        );
        let parts: Vec<String> = r
            .output
            .lines()
            .filter(|l| l.contains("=== PART-GUEST-END ["))
            .filter_map(|l| {
                let name = l.split('[').nth(1)?.split(']').next()?;
                let secs = l.split(" at ").nth(1)?.trim_end_matches(" s");
                Some(format!("{name} {secs}"))
            })
            .collect();
        out.push_str(&format!("\n  {}: {wall} s; {}", r.name, parts.join(", ")));
    }
    out
}

/// The lab's uptime at a boot's `CASE_TIME` line `what` (start, vmm,
/// vmm-end, end).
fn case_time(r: &CaseResult, what: &str) -> Option<f64> {
    let tag = format!("{CASE_TIME} {what} ");
    r.output
        .lines()
        .find_map(|l| l.strip_prefix(&tag))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

/// The lab seconds one boot took, host jobs before and after included.
fn case_seconds(r: &CaseResult) -> Option<f64> {
    Some(case_time(r, "end")? - case_time(r, "start")?)
}

/// Prefix of [`matrix`]'s lines (`make matrix` collects them).
pub const MATRIX_LINE: &str = "MATRIX";

/// One line per boot: backend, kernel, boot, pass or FAIL, lab seconds.
pub fn matrix(results: &[CaseResult]) -> String {
    results
        .iter()
        .map(|r| {
            format!(
                "{MATRIX_LINE} {:<6} {:<9} {:<5} {:<5} {}",
                r.backend,
                r.kernel.name(),
                r.boot,
                if r.problems.is_empty() {
                    "pass"
                } else {
                    "FAIL"
                },
                case_seconds(r).map_or("?".to_string(), |s| format!("{s:.1}"))
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The byte ranges of `text` between `begin` and `end` lines (each `end`
/// after its `begin`; an unmatched `begin` runs to the end of `text`).
fn regions(text: &str, begin: &str, end: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(begin) {
        let start = from + i;
        let stop = text[start..]
            .find(end)
            .map(|j| start + j)
            .unwrap_or(text.len());
        out.push((start, stop));
        from = stop.max(start + begin.len());
        if from >= text.len() {
            break;
        }
    }
    out
}

/// The exit code on the line `<end> rc=N` in `text`.
fn end_rc(text: &str, end: &str) -> Option<i32> {
    let tag = format!("{end} rc=");
    let rest = &text[text.find(&tag)? + tag.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Each part's problems in a combined case's output, named after the part: its
/// guest checks' and host_after's exit codes, and its expected lines, looked
/// for in its own output and in output no part owns.
fn part_problems(text: &str, parts: &[Part]) -> Vec<String> {
    let owned: Vec<Vec<(usize, usize)>> = parts
        .iter()
        .map(|p| {
            let mut r = Vec::new();
            for (b, e) in [
                ("HOST-BEFORE", "HOST-BEFORE-END"),
                ("GUEST", "GUEST-END"),
                ("HOST-AFTER", "HOST-AFTER-END"),
            ] {
                r.extend(regions(text, &marker(b, p.name), &marker(e, p.name)));
            }
            r
        })
        .collect();
    let mut unowned = String::new();
    let mut all: Vec<(usize, usize)> = owned.iter().flatten().copied().collect();
    all.sort_unstable();
    let mut at = 0;
    for (s, e) in all {
        if s > at {
            unowned.push_str(&text[at..s]);
        }
        at = at.max(e);
    }
    unowned.push_str(&text[at.min(text.len())..]);

    let mut problems = Vec::new();
    for (p, ranges) in parts.iter().zip(&owned) {
        let own: String = ranges.iter().map(|&(s, e)| &text[s..e]).collect();
        let mut mine = Vec::new();
        if p.guest {
            match end_rc(text, &marker("GUEST-END", p.name)) {
                None => mine.push("guest checks did not finish".to_string()),
                Some(0) => {}
                Some(rc) => mine.push(format!("guest checks failed (exit code {rc})")),
            }
        }
        match end_rc(text, &marker("HOST-AFTER-END", p.name)) {
            None => mine.push("host_after did not run".to_string()),
            Some(0) => {}
            Some(rc) => mine.push(format!("host_after failed (exit code {rc})")),
        }
        for e in &p.expect {
            if !own.contains(e.as_str()) && !unowned.contains(e.as_str()) {
                mine.push(format!("missing {e:?}"));
            }
        }
        problems.extend(mine.into_iter().map(|m| format!("[{}] {m}", p.name)));
    }
    problems
}

/// Panic with every failing case's problems and output.
pub fn assert_all_passed(results: &[CaseResult]) {
    let failures: Vec<String> = results
        .iter()
        .filter(|r| !r.problems.is_empty())
        .map(|r| format!("{}: {}\n{}", r.name, r.problems.join(", "), r.output))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} device boots failed:\n{}\n\nsummary:\n{}",
        failures.len(),
        results.len(),
        failures.join("\n---\n"),
        results
            .iter()
            .filter(|r| !r.problems.is_empty())
            .map(|r| format!("{}: {}", r.name, r.problems.join(", ")))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A boot's time lines and part ends become its timing and matrix lines.
    #[test]
    fn timings_and_matrix_lines_come_from_a_boots_output() {
        let output = format!(
            "{CASE_TIME} start 10.0\n{CASE_TIME} vmm 12.5\nboot\n=== PART-GUEST-END [rng] rc=0 at 3.25 s\n{CASE_TIME} vmm-end 40.0\n{CASE_TIME} end 41.0\n"
        );
        let passed = CaseResult {
            name: "dev1-kvm-beacon".into(),
            boot: "dev1",
            backend: "kvm",
            kernel: GuestKernel::Beacon,
            output,
            problems: Vec::new(),
        };
        let failed = CaseResult {
            name: "dev2-qemu-stock".into(),
            boot: "dev2",
            backend: "qemu",
            kernel: GuestKernel::Stock,
            output: "no time lines".into(),
            problems: vec!["exit code 1".into()],
        };
        let t = timings(&[passed.clone(), failed.clone()]);
        assert!(
            t.contains(
                "dev1-kvm-beacon: 31.0 (host before 2.5, VM 27.5, host after 1.0) s; rng 3.25"
            ),
            "{t}"
        );
        assert!(t.contains("dev2-qemu-stock: ? (host before ?"), "{t}");
        let m = matrix(&[passed, failed]);
        let lines: Vec<Vec<&str>> = m.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(
            lines[0],
            ["MATRIX", "kvm", "beacon", "dev1", "pass", "31.0"]
        );
        assert_eq!(lines[1], ["MATRIX", "qemu", "stock", "dev2", "FAIL", "?"]);
    }

    fn part(name: &'static str, expect: &[&str]) -> Scenario {
        Scenario {
            name,
            vmm_args: vec!["--disk".into(), "path={WORK}/d.img".into()],
            checks: format!("echo {name}-guest"),
            stock_modules: vec!["virtio_mmio", "virtio_blk"],
            host_before: format!("echo {name}-before"),
            expect: expect.iter().map(|s| s.to_string()).collect(),
            ..Scenario::default()
        }
    }

    #[test]
    fn combine_keeps_parts_apart() {
        let mut b = part("b", &["shared-line", "b-only"]);
        b.backends = vec!["kvm"];
        b.memory_mib = 512;
        let c = Scenario::combine("ab", vec![part("a", &["a-guest"]), b]);
        assert_eq!(c.backends, vec!["kvm"]);
        assert_eq!(c.memory_mib, 512);
        assert_eq!(c.stock_modules, vec!["virtio_mmio", "virtio_blk"]);
        assert_eq!(
            c.vmm_args,
            [
                "--disk",
                "path={WORK}/a/d.img",
                "--disk",
                "path={WORK}/b/d.img"
            ]
        );
        assert!(c.expect.is_empty());
        assert!(c.checks.find("echo a-guest") < c.checks.find("echo b-guest"));

        // A passing case: each expectation in its own part or in nobody's output.
        let ok = "\
=== PART-HOST-BEFORE [a]\na-before\n=== PART-HOST-BEFORE-END [a]\n\
=== PART-HOST-BEFORE [b]\nb-before\n=== PART-HOST-BEFORE-END [b]\n\
shared-line\n\
=== PART-GUEST [a]\r\na-guest\r\n=== PART-GUEST-END [a] rc=0 at 9.1 s\r\n\
=== PART-GUEST [b]\r\nb-only\r\n=== PART-GUEST-END [b] rc=0 at 9.5 s\r\n\
=== PART-HOST-AFTER [a]\n=== PART-HOST-AFTER-END [a] rc=0\n\
=== PART-HOST-AFTER [b]\n=== PART-HOST-AFTER-END [b] rc=0\n";
        assert_eq!(part_problems(ok, &c.parts), Vec::<String>::new());

        // Another part's line does not count; failures name the part.
        let bad = ok
            .replace("b-only", "")
            .replace("a-guest\r\n", "b-only\r\n")
            .replace("[a] rc=0 ", "[a] rc=1 ")
            .replace("=== PART-HOST-AFTER-END [b] rc=0", "");
        assert_eq!(
            part_problems(&bad, &c.parts),
            [
                "[a] guest checks failed (exit code 1)",
                "[a] missing \"a-guest\"",
                "[b] host_after did not run",
                "[b] missing \"b-only\"",
            ]
        );
    }

    #[test]
    #[should_panic(expected = "no backend and kernel in common")]
    fn combine_refuses_parts_with_nowhere_to_run() {
        let mut a = part("a", &[]);
        a.backends = vec!["kvm"];
        let mut b = part("b", &[]);
        b.backends = vec!["qemu"];
        Scenario::combine("ab", vec![a, b]);
    }
}
