//! The built beacon kernel's .config carries every option kernel-config/beacon.config
//! asks for (Kconfig silently drops options whose dependencies are missing).

use std::collections::HashMap;

use beacon_tests::assets::{beacon_kernel_dir, repo_root};

fn parse(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn every_requested_option_is_in_the_built_kernel() {
    let dir = beacon_kernel_dir().expect("building the beacon kernel");
    let built = parse(&std::fs::read_to_string(dir.join("config")).expect("read .config"));
    let wanted = parse(
        &std::fs::read_to_string(repo_root().join("kernel-config/beacon.config"))
            .expect("read fragment"),
    );
    assert!(wanted.len() > 100, "fragment looks truncated");
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(k, v)| built.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}={v} (built: {:?})", built.get(k)))
        .collect();
    assert!(missing.is_empty(), "options lost by Kconfig: {missing:#?}");
}

#[test]
fn room_for_cpu_hotplug_and_both_images_exist() {
    let dir = beacon_kernel_dir().expect("building the beacon kernel");
    let built = parse(&std::fs::read_to_string(dir.join("config")).expect("read .config"));
    let nr_cpus: u32 = built
        .get("CONFIG_NR_CPUS")
        .and_then(|v| v.parse().ok())
        .expect("CONFIG_NR_CPUS");
    assert!(nr_cpus >= 64, "NR_CPUS {nr_cpus} caps CPU hotplug");
    let vmlinux = std::fs::read(dir.join("vmlinux")).expect("vmlinux");
    assert!(vmlinux.starts_with(b"\x7fELF"), "vmlinux is not ELF");
    let bz = std::fs::read(dir.join("bzImage")).expect("bzImage");
    assert_eq!(
        bz.get(0x202..0x206),
        Some(&b"HdrS"[..]),
        "bzImage lacks HdrS"
    );
}
