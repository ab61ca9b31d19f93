//! A process's memory as the benchmarks count it, from `/proc/PID/smaps`:
//! its resident set, and the part of it that is guest RAM (the `memfd`
//! mappings QEMU and our VMM's hotplug blocks use, and our VMM's boot RAM file,
//! [`beacon_common::GUEST_RAM_NAME`], a memfd or on a huge-page tmpfs); and the
//! machine's memory
//! from `/proc/meminfo`. Reads only; knows nothing of which process is which.

/// (total Rss, Rss of guest RAM mappings) of process `pid`, in KiB.
pub fn rss_split(pid: u32) -> std::io::Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(parse_smaps(&smaps))
}

fn parse_smaps(smaps: &str) -> (u64, u64) {
    let (mut total, mut guest, mut in_memfd) = (0, 0, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_memfd = line.contains("/memfd:")
                || line.contains(&format!("/{}", beacon_common::GUEST_RAM_NAME));
        } else if let Some(v) = line.strip_prefix("Rss:") {
            let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            total += kib;
            if in_memfd {
                guest += kib;
            }
        }
    }
    (total, guest)
}

/// A `/proc/meminfo` field (`MemTotal`, `MemAvailable`, ...) in KiB.
pub fn meminfo_kib(field: &str) -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    m.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_is_the_memfd_and_huge_tmpfs_mappings() {
        let smaps = "\
55d0-55e0 r-xp 00000000 08:01 1 /usr/bin/beacon-vmm
Size:                 64 kB
Rss:                  40 kB
7f00-7f80 rw-s 00000000 00:01 2 /memfd:beacon-guest-ram (deleted)
Rss:                1000 kB
7f90-7fa0 rw-p 00000000 00:00 0
Rss:                   8 kB
7fb0-7fc0 rw-s 00000000 00:3a 2 /beacon-guest-ram (deleted)
Rss:                2048 kB
";
        assert_eq!(parse_smaps(smaps), (3096, 3048));
        assert!(rss_split(std::process::id()).expect("own smaps").0 > 0);
    }

    #[test]
    fn meminfo_fields_by_exact_name() {
        assert!(meminfo_kib("MemTotal").is_some_and(|kb| kb > 0));
        assert!(meminfo_kib("MemAvailable").is_some());
        assert_eq!(meminfo_kib("Mem"), None, "a prefix is not a field");
        assert_eq!(meminfo_kib("NoSuchField"), None);
    }
}
