//! The virtio devices in real guests, on both backends, with the beacon kernel
//! and Debian's stock cloud kernel (whose virtio drivers are modules found
//! through ACPI): each scenario boots each (backend, kernel) pair with its
//! device flags and a checks script run by the guest's init, and reads the
//! results back from the console. All boots share one lab VM on hosts without
//! hardware KVM, to keep the suite fast.

use std::path::PathBuf;
use std::time::Duration;

use beacon_tests::assets::{beacon_kernel_dir, lab_visible_tempdir, stock_kernel};
use beacon_tests::guest::{device_initrd, DeviceGuest};
use beacon_tests::lab::run_with_kvm;
use beacon_tests::script::{section, section_exit_code, sh_command, sh_section};

const VMM: &str = env!("CARGO_BIN_EXE_beacon-vmm");

/// One device scenario: `beacon-vmm` flags, what the guest checks, and what the
/// guest's output must contain.
struct Scenario {
    name: &'static str,
    vmm_args: Vec<String>,
    checks: &'static str,
    stock_modules: Vec<&'static str>,
    expect: Vec<&'static str>,
}

fn scenarios() -> Vec<Scenario> {
    vec![Scenario {
        name: "rng",
        vmm_args: vec!["--rng".into()],
        checks: r#"
set -e
echo "RNG-AVAILABLE: $(cat /sys/class/misc/hw_random/rng_available)"
echo "RNG-CURRENT: $(cat /sys/class/misc/hw_random/rng_current)"
bytes=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')
echo "RNG-BYTES: $bytes"
[ ${#bytes} -eq 128 ]
[ "$bytes" != "$(printf '0%.0s' $(seq 128))" ]
grep -q virtio_rng /sys/class/misc/hw_random/rng_current
"#,
        stock_modules: vec!["virtio_mmio", "virtio_rng"],
        expect: vec!["RNG-CURRENT: virtio_rng"],
    }]
}

#[test]
fn devices_work_on_both_backends_with_beacon_and_stock_kernels() {
    let beacon = beacon_kernel_dir().expect("beacon kernel").join("vmlinux");
    let stock = stock_kernel().expect("stock kernel");
    let tmp = lab_visible_tempdir().expect("tempdir");

    let mut script = String::from("set +e\n");
    let mut cases = Vec::new();
    for s in scenarios() {
        for (kname, kernel, memory) in [("beacon", &beacon, 192), ("stock", &stock, 384)] {
            let guest = DeviceGuest {
                checks: s.checks.to_string(),
                stock_modules: if kname == "stock" {
                    s.stock_modules.clone()
                } else {
                    Vec::new()
                },
                extra: Vec::new(),
            };
            let initrd = device_initrd(tmp.path(), &format!("{}-{kname}.gz", s.name), &guest)
                .expect("initrd");
            for backend in ["kvm", "qemu"] {
                let name = format!("{}-{backend}-{kname}", s.name);
                let mut argv: Vec<String> = vec![
                    "timeout".into(),
                    "180".into(),
                    VMM.into(),
                    "run".into(),
                    "--backend".into(),
                    backend.into(),
                    "--kernel".into(),
                    kernel.display().to_string(),
                    "--initrd".into(),
                    initrd.display().to_string(),
                    "--memory".into(),
                    memory.to_string(),
                    "--cmdline".into(),
                    "console=ttyS0 panic=-1 quiet".into(),
                ];
                argv.extend(s.vmm_args.iter().cloned());
                script.push_str(&sh_section(
                    &name,
                    &format!("NO_COLOR=1 {} 2>&1", sh_command(&argv)),
                ));
                cases.push((name, s.expect.clone()));
            }
        }
    }
    let script_path: PathBuf = tmp.path().join("devices.sh");
    std::fs::write(&script_path, script).expect("write script");
    let out = run_with_kvm(
        &["sh".to_string(), script_path.display().to_string()],
        Duration::from_secs(1500),
    )
    .expect("lab run");

    let mut failures = Vec::new();
    for (name, expect) in &cases {
        let (Some(text), Some(rc)) = (
            section(&out.output, name),
            section_exit_code(&out.output, name),
        ) else {
            failures.push(format!("{name}: no output section"));
            continue;
        };
        let mut problems = Vec::new();
        if rc != 0 {
            problems.push(format!("beacon-vmm exit code {rc}"));
        }
        if !text.contains("BEACON-CHECKS-RC: 0") {
            problems.push("guest checks failed".to_string());
        }
        if text.contains("BEACON-MODULE-FAILED") {
            problems.push("a module did not load".to_string());
        }
        for e in expect {
            if !text.contains(e) {
                problems.push(format!("missing {e:?}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{name}: {}\n{text}", problems.join(", ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} device boots failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n---\n")
    );
    eprintln!(
        "{} device boots in {:.1} s",
        cases.len(),
        out.elapsed.as_secs_f64()
    );
}
