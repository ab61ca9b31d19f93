//! The DSDT with the CPU and memory hotplug AML, checked by ACPICA's own tools: `iasl -d`
//! must disassemble it without errors or warnings into the devices and
//! methods we meant, and the disassembly must compile again with no errors.
//! Needs `iasl` (Debian `acpica-tools`, installed by `resources/install.sh`);
//! without it the test fails. `cargo test -p beacon-vmm --test acpi_iasl`.

use std::path::Path;
use std::process::{Command, Output};

use beacon_devices::hotplug::{
    CPU_SELECT, CPU_STATUS, HOTPLUG_REGION_SIZE, MEM_SELECT, MEM_STATUS,
};
use beacon_vmm::acpi::{build, hotplug_aml, AcpiConfig};

const HOTPLUG_BASE: u32 = 0xd000_0000;
const GED_GSI: u32 = 9;
const MAX_VCPUS: u8 = 3;
/// Two 128 MiB memory blocks at 4 GiB.
const BLOCKS: [(u64, u64); 2] = [(4 << 30, 128 << 20), ((4 << 30) + (128 << 20), 128 << 20)];

/// Run `iasl` with `args` in `dir`; fail (never skip) when it is missing.
fn iasl(dir: &Path, args: &[&str]) -> Output {
    match Command::new("iasl").args(args).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("iasl not found: run `apt-get install acpica-tools` (or resources/install.sh)")
        }
        Err(e) => panic!("cannot run iasl: {e}"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Lines of iasl's report that are errors or warnings (not a compilation
/// summary, which counts them).
fn complaints(report: &str) -> Vec<&str> {
    report
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            (l.contains("error") || l.contains("warning")) && !l.starts_with("compilation ")
        })
        .collect()
}

fn dsdt() -> Vec<u8> {
    let cfg = AcpiConfig {
        boot_vcpus: 1,
        max_vcpus: MAX_VCPUS,
        ioapic_addr: 0xfec0_0000,
        lapic_addr: 0xfee0_0000,
        devices_aml: hotplug_aml(HOTPLUG_BASE, GED_GSI, MAX_VCPUS, &BLOCKS).expect("hotplug AML"),
    };
    let tables = build(&cfg).expect("tables");
    tables
        .into_iter()
        .find(|t| t.bytes.starts_with(b"DSDT"))
        .expect("a DSDT")
        .bytes
}

#[test]
fn hotplug_dsdt_disassembles_and_recompiles_with_iasl() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("dsdt.aml"), dsdt()).expect("write dsdt.aml");

    let out = iasl(dir.path(), &["-d", "dsdt.aml"]);
    let report = text(&out);
    assert!(out.status.success(), "iasl -d failed:\n{report}");
    assert_eq!(
        complaints(&report),
        Vec::<&str>::new(),
        "iasl -d complained:\n{report}"
    );
    let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).expect("dsdt.dsl");
    let has = |needle: &str| {
        assert!(
            dsl.contains(needle),
            "`{needle}` missing from the disassembly:\n{dsl}"
        )
    };
    for device in [
        "CPUS", "C000", "C001", "C002", "GED0", "MHPC", "M000", "M001",
    ] {
        has(&format!("Device ({device})"));
    }
    assert!(
        !dsl.contains("Device (C003)"),
        "one processor device per possible CPU"
    );
    assert!(
        !dsl.contains("Device (M002)"),
        "one memory device per block"
    );
    for method in [
        "_EVT, 1, Serialized",
        "CSCN, 0, Serialized",
        "CSTA, 1, Serialized",
        "MSCN, 0, Serialized",
        "MSTA, 1, Serialized",
        "MEJ0, 1, Serialized",
    ] {
        has(&format!("Method ({method})"));
    }
    let devices = usize::from(MAX_VCPUS) + BLOCKS.len();
    for (method, count) in [
        ("_EJ0", devices),
        ("_STA", devices),
        ("_MAT", usize::from(MAX_VCPUS)),
    ] {
        assert_eq!(
            dsl.matches(&format!("Method ({method}, ")).count(),
            count,
            "one {method} per CPU (and memory block):\n{dsl}"
        );
    }
    has("Name (_HID, EisaId (\"PNP0C80\") /* Memory Device */)");
    has("Name (_HID, EisaId (\"PNP0A06\") /* Generic Container Device */)");
    // Each block's range, as iasl prints a QWordMemory's minimum and maximum.
    for (base, len) in BLOCKS {
        has(&format!("0x{base:016X}, // Range Minimum"));
        has(&format!("0x{:016X}, // Range Maximum", base + len - 1));
    }
    has(&format!(
        "Offset ({MEM_SELECT:#04X}), \n                MSEL,   32"
    ));
    has(&format!(
        "Offset ({MEM_STATUS:#04X}), \n                MEN,    1, \n                MINS,   1, \n                MRMV,   1, \n                MEJF,   1"
    ));
    has("\\_SB.MHPC.MSCN ()");
    // iasl follows a known ID with a comment naming it.
    has("Name (_HID, \"ACPI0013\" /* Generic Event Device */)");
    has("Name (_HID, \"ACPI0010\" /* Processor Container Device */)");
    has("Name (_HID, \"ACPI0007\" /* Processor Device */)");
    has("Name (_CID, EisaId (\"PNP0A05\")");
    for region in ["PRST", "GEDR", "MRST"] {
        has(&format!(
            "OperationRegion ({region}, SystemMemory, 0xD0000000, {HOTPLUG_REGION_SIZE:#X})"
        ));
    }
    // The registers sit where the device decodes them.
    has(&format!(
        "Offset ({CPU_SELECT:#04X}), \n                CSEL,   32"
    ));
    has(&format!(
        "Offset ({CPU_STATUS:#04X}), \n                CPEN,   1, \n                CINS,   1, \n                CRMV,   1, \n                CEJF,   1"
    ));
    has("GDAT,   32");
    has("Local0 = GDAT");
    has("Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, )");
    has(&format!("0x{GED_GSI:08X},"));
    // Every name the methods use resolves inside the table.
    assert!(!dsl.contains("External ("), "unresolved names:\n{dsl}");

    let out = iasl(dir.path(), &["-p", "recompiled", "dsdt.dsl"]);
    let report = text(&out);
    assert!(
        out.status.success(),
        "iasl failed to compile the disassembly:\n{report}"
    );
    assert!(
        report.contains(" 0 Errors, 0 Warnings"),
        "iasl compile report:\n{report}"
    );
    assert!(
        dir.path().join("recompiled.aml").exists(),
        "no recompiled.aml:\n{report}"
    );
}
