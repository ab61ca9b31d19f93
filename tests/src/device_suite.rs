//! Runs virtio device scenarios in real guests: each scenario boots `beacon-vmm`
//! on every (backend, kernel) pair it asks for, with its device flags and a
//! guest initrd whose init runs the scenario's checks, and reads the results back
//! from the console. All boots of one call share one lab VM on hosts without
//! hardware KVM.
//!
//! A scenario can run host-side shell around each boot (`host_before`, e.g. make
//! a TAP or start a server; `host_after`, e.g. compare what arrived) inside the
//! same lab VM; `$CASE` names the case and `$WORK` a folder private to it, in both
//! and in the `beacon-vmm` arguments (`{WORK}` is replaced there).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::assets::{beacon_kernel_dir, lab_visible_tempdir, stock_kernel};
use crate::guest::{device_initrd, DeviceGuest};
use crate::lab::run_with_kvm;
use crate::script::{section, section_exit_code, sh_command, sh_quote, sh_section};

/// Which guest kernel a case boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKernel {
    /// The beacon kernel (vmlinux), drivers built in.
    Beacon,
    /// Debian's cloud kernel (bzImage), virtio drivers as modules found through ACPI.
    Stock,
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
    /// Guest shell; the init prints `BEACON-CHECKS-RC: <its exit code>`.
    pub checks: String,
    /// Stock kernel modules to load (with dependencies) before the checks.
    pub stock_modules: Vec<&'static str>,
    /// More files for the guest initrd: (host path, guest path).
    pub guest_files: Vec<(PathBuf, String)>,
    /// Host shell run before the boot (in the lab VM when there is one).
    pub host_before: String,
    /// Host shell run after the boot; a non-zero exit fails the case.
    pub host_after: String,
    /// Text the case's output (console and host shell) must contain.
    pub expect: Vec<String>,
    /// Guest memory in MiB (default 256).
    pub memory_mib: u64,
    /// Seconds one boot may take before `timeout` ends it.
    pub timeout_secs: u32,
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
            timeout_secs: 180,
        }
    }
}

/// The outcome of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    pub output: String,
    pub problems: Vec<String>,
}

/// Run every case of `scenarios`; the test fails (with each failing case's
/// output) unless all pass. `binary` is the `beacon-vmm` executable.
pub fn run_scenarios(
    binary: &Path,
    scenarios: &[Scenario],
    lab_timeout: Duration,
) -> Vec<CaseResult> {
    let beacon = beacon_kernel_dir().expect("beacon kernel").join("vmlinux");
    let stock = stock_kernel().expect("stock kernel");
    let tmp = lab_visible_tempdir().expect("tempdir");

    let mut script = String::from("set +e\n");
    let mut cases = Vec::new();
    for s in scenarios {
        for &kernel in &s.kernels {
            let (kname, kpath) = match kernel {
                GuestKernel::Beacon => ("beacon", &beacon),
                GuestKernel::Stock => ("stock", &stock),
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
            let initrd = device_initrd(tmp.path(), &format!("{}-{kname}.gz", s.name), &guest)
                .expect("guest initrd");
            for backend in &s.backends {
                let name = format!("{}-{backend}-{kname}", s.name);
                let work = tmp.path().join(&name);
                std::fs::create_dir_all(&work).expect("case folder");
                let work_s = work.display().to_string();
                let mut argv: Vec<String> = vec![
                    "timeout".into(),
                    s.timeout_secs.to_string(),
                    binary.display().to_string(),
                    "run".into(),
                    "--backend".into(),
                    (*backend).into(),
                    "--kernel".into(),
                    kpath.display().to_string(),
                    "--initrd".into(),
                    initrd.display().to_string(),
                    "--memory".into(),
                    s.memory_mib.to_string(),
                    "--cmdline".into(),
                    "console=ttyS0 panic=-1 quiet".into(),
                ];
                argv.extend(s.vmm_args.iter().map(|a| a.replace("{WORK}", &work_s)));
                let body = format!(
                    "export CASE={} WORK={}\n{}\nNO_COLOR=1 {} 2>&1\nrc=$?\n{}\n[ $? -eq 0 ] || {{ echo HOST-AFTER-FAILED; [ $rc -ne 0 ] || rc=99; }}\n(exit $rc)",
                    sh_quote(&name),
                    sh_quote(&work_s),
                    s.host_before,
                    sh_command(&argv),
                    if s.host_after.is_empty() { "true" } else { s.host_after.as_str() },
                );
                script.push_str(&sh_section(&name, &format!("(\n{body}\n)")));
                cases.push((name, s.expect.clone()));
            }
        }
    }
    let script_path = tmp.path().join("devices.sh");
    std::fs::write(&script_path, script).expect("write script");
    let out = run_with_kvm(
        &["sh".to_string(), script_path.display().to_string()],
        lab_timeout,
    )
    .expect("lab run");

    let mut results = Vec::new();
    for (name, expect) in cases {
        let mut problems = Vec::new();
        let text = section(&out.output, &name).unwrap_or_default().to_string();
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
        for e in &expect {
            if !text.contains(e.as_str()) {
                problems.push(format!("missing {e:?}"));
            }
        }
        results.push(CaseResult {
            name,
            output: text,
            problems,
        });
    }
    eprintln!(
        "{} device boots in {:.1} s",
        results.len(),
        out.elapsed.as_secs_f64()
    );
    results
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
        "{} of {} device boots failed:\n{}",
        failures.len(),
        results.len(),
        failures.join("\n---\n")
    );
}
