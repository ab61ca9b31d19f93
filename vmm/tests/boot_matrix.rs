//! Both backends boot to init and end cleanly with the beacon kernel (ELF vmlinux and
//! bzImage) and a stock distribution kernel (Debian's cloud bzImage), with 1 and 2
//! vCPUs (and, on our VMM, 2 of 4 hotplug-capable ones), ending by reset or by ACPI
//! power off. In each boot the guest reports the vCPU count it sees in /proc/cpuinfo, its
//! MemTotal, the command line and a file from the initrd. All cases share one lab VM
//! (on hosts without hardware KVM) to keep the suite fast.

use std::path::PathBuf;
use std::time::Duration;

use beacon_tests::assets::{
    beacon_kernel_dir, hello_initrd_with_marker, lab_visible_tempdir, stock_kernel,
};
use beacon_tests::lab::run_with_kvm;
use beacon_tests::script::{section, section_exit_code, sh_command, sh_section};

const VMM: &str = env!("CARGO_BIN_EXE_beacon-vmm");

struct Case {
    name: String,
    backend: &'static str,
    kernel: PathBuf,
    cpus: u8,
    max_cpus: u8,
    memory_mib: u64,
    poweroff: bool,
}

#[test]
fn both_backends_boot_beacon_and_stock_kernels() {
    let beacon = beacon_kernel_dir().expect("beacon kernel");
    let stock = stock_kernel().expect("stock kernel");
    let tmp = lab_visible_tempdir().expect("tempdir");
    let token = format!("initrd-token-{}", std::process::id());
    let initrd = hello_initrd_with_marker(tmp.path(), Some(&token)).expect("initrd");

    let mut cases = Vec::new();
    for backend in ["kvm", "qemu"] {
        for (kname, kernel) in [
            ("beacon-elf", beacon.join("vmlinux")),
            ("beacon-bz", beacon.join("bzImage")),
            ("stock-bz", stock.clone()),
        ] {
            let cpu_counts: &[u8] = match kname {
                "beacon-elf" => &[1, 2],
                _ => &[2],
            };
            for &cpus in cpu_counts {
                // Our VMM's MADT can list CPUs that are not online yet (hotplug);
                // QEMU microvm cannot.
                let max_cpus = if backend == "kvm" && kname == "beacon-bz" {
                    4
                } else {
                    cpus
                };
                let poweroff = kname != "beacon-elf";
                cases.push(Case {
                    name: format!(
                        "{backend}-{kname}-{cpus}of{max_cpus}cpu-{}",
                        if poweroff { "poweroff" } else { "reset" }
                    ),
                    backend,
                    kernel: kernel.clone(),
                    cpus,
                    max_cpus,
                    memory_mib: if kname == "stock-bz" { 384 } else { 192 },
                    poweroff,
                });
            }
        }
    }

    let mut script = String::from("set +e\n");
    for c in &cases {
        let reboot = if c.backend == "kvm" { " reboot=k" } else { "" };
        let end = if c.poweroff {
            " beacon.end=poweroff"
        } else {
            ""
        };
        let cmdline = format!(
            "console=ttyS0{reboot}{end} panic=-1 quiet beacon.case={}",
            c.name
        );
        let argv = [
            "timeout".to_string(),
            "150".into(),
            VMM.into(),
            "run".into(),
            "--backend".into(),
            c.backend.into(),
            "--kernel".into(),
            c.kernel.display().to_string(),
            "--initrd".into(),
            initrd.display().to_string(),
            "--cpus".into(),
            c.cpus.to_string(),
            "--max-cpus".into(),
            c.max_cpus.to_string(),
            "--memory".into(),
            c.memory_mib.to_string(),
            "--cmdline".into(),
            cmdline,
        ];
        let command = format!("NO_COLOR=1 {} 2>&1", sh_command(&argv));
        script.push_str(&sh_section(&c.name, &command));
    }
    let script_path = tmp.path().join("matrix.sh");
    std::fs::write(&script_path, script).expect("write script");
    let out = run_with_kvm(
        &["sh".to_string(), script_path.display().to_string()],
        Duration::from_secs(1500),
    )
    .expect("lab run");

    let mut failures = Vec::new();
    for c in &cases {
        let (Some(text), Some(rc)) = (
            section(&out.output, &c.name),
            section_exit_code(&out.output, &c.name),
        ) else {
            failures.push(format!("{}: no output section", c.name));
            continue;
        };
        let mut problems = Vec::new();
        if rc != 0 {
            problems.push(format!("exit code {rc}"));
        }
        if !text.contains("BEACON-HELLO: hello from the") {
            problems.push("no greeting".into());
        }
        if !text.contains(&format!(", {} vCPUs,", c.cpus)) {
            problems.push(format!("guest did not see {} vCPUs", c.cpus));
        }
        if !text.contains(&format!("beacon.case={}", c.name)) {
            problems.push("command line not intact".into());
        }
        if !text.contains(&format!("BEACON-HELLO-MARKER: {token}")) {
            problems.push("initrd file not visible".into());
        }
        // Debian's kernel does not let the init write the boot-timer port through
        // /dev/port; the beacon kernel must.
        if c.name.contains("beacon") && !text.contains("guest init reached after") {
            problems.push("boot timer not recorded".into());
        }
        let mem_kib: Option<u64> = text
            .split("vCPUs, ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok());
        match mem_kib {
            // MemTotal is RAM minus the kernel's reservations (image, page tables).
            Some(k) if k <= c.memory_mib * 1024 && k >= c.memory_mib * 1024 * 6 / 10 => {}
            other => problems.push(format!("MemTotal {other:?} KiB for {} MiB", c.memory_mib)),
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}\n{text}", c.name, problems.join(", ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} boots failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n---\n")
    );
    eprintln!(
        "{} boots in {:.1} s",
        cases.len(),
        out.elapsed.as_secs_f64()
    );
}
