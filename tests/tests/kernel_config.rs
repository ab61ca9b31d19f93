//! The built beacon kernel's .config carries every option kernel-config/beacon.config
//! asks for (Kconfig silently drops options whose dependencies are missing), and
//! leaves out every option the fragment turns off with `# CONFIG_X is not set`
//! (olddefconfig would otherwise switch some back on by default, as it does with
//! the vsock loopback transport).

use std::collections::HashMap;

use beacon_tests::assets::{beacon_kernel_dir, repo_root};

fn parse(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Options the text turns off with `# CONFIG_X is not set`.
fn turned_off(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter_map(|l| l.strip_suffix(" is not set"))
        .filter(|k| k.starts_with("CONFIG_"))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_option_turned_off_stays_off() {
    let dir = beacon_kernel_dir().expect("building the beacon kernel");
    let built = parse(&std::fs::read_to_string(dir.join("config")).expect("read .config"));
    let off = turned_off(
        &std::fs::read_to_string(repo_root().join("kernel-config/beacon.config"))
            .expect("read fragment"),
    );
    assert!(
        off.iter().any(|k| k == "CONFIG_VSOCKETS_LOOPBACK"),
        "the fragment must keep the vsock loopback transport out (containers could reach vminitd through it)"
    );
    let on: Vec<String> = off
        .iter()
        .filter_map(|k| built.get(k).map(|v| format!("{k}={v}")))
        .collect();
    assert!(
        on.is_empty(),
        "options the fragment turns off are on: {on:?}"
    );
}

#[test]
fn turned_off_lines_are_recognised() {
    let off = turned_off("# CONFIG_A is not set\nCONFIG_B=y\n# a comment is not set\n");
    assert_eq!(off, vec!["CONFIG_A".to_string()]);
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
