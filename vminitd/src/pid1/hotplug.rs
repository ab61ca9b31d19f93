//! Bring hot-added CPUs and memory online (PID 1 only).
//!
//! The VMM adds a vCPU through ACPI; the kernel registers it offline, and on
//! x86 nothing in the kernel onlines it. Memory blocks added through ACPI may
//! also stay offline (depending on `memhp_default_state`). This thread listens
//! to the kernel's uevents (`NETLINK_KOBJECT_UEVENT`) and onlines each CPU and
//! memory block as it appears; memory goes online movable, so it can be
//! unplugged again. At start it onlines whatever is already there and offline
//! (added while the guest was booting).
//!
//! It only ever writes the `online` and `state` files under
//! `/sys/devices/system`; uevents come from the kernel alone (the socket only
//! accepts messages whose sender is the kernel, port id 0).

use std::path::{Path, PathBuf};

const SYS_CPU: &str = "/sys/devices/system/cpu";
const SYS_MEMORY: &str = "/sys/devices/system/memory";
/// The kernel's uevent multicast group.
const UEVENT_GROUP: u32 = 1;
/// The biggest uevent the kernel sends is well under this.
const UEVENT_MAX: usize = 8192;

/// What a uevent asks of us.
#[derive(Debug, PartialEq, Eq)]
enum Added {
    Cpu(PathBuf),
    Memory(PathBuf),
}

/// Parse one uevent datagram ("ACTION@DEVPATH\0KEY=VALUE\0...").
fn parse(msg: &[u8]) -> Option<Added> {
    let header = msg.split(|b| *b == 0).next()?;
    let header = std::str::from_utf8(header).ok()?;
    let (action, devpath) = header.split_once('@')?;
    if action != "add" || devpath.contains("..") {
        return None;
    }
    let name = devpath.rsplit('/').next()?;
    if let Some(n) = devpath.strip_prefix("/devices/system/cpu/cpu") {
        if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
            return Some(Added::Cpu(Path::new(SYS_CPU).join(name)));
        }
    }
    if let Some(n) = devpath.strip_prefix("/devices/system/memory/memory") {
        if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
            return Some(Added::Memory(Path::new(SYS_MEMORY).join(name)));
        }
    }
    None
}

fn online_cpu(dir: &Path) {
    let file = dir.join("online");
    match std::fs::read_to_string(&file) {
        Ok(s) if s.trim() == "0" => match std::fs::write(&file, "1") {
            Ok(()) => tracing::info!(cpu = %dir.display(), "hot-added CPU online"),
            Err(e) => tracing::warn!(cpu = %dir.display(), "cannot online a hot-added CPU: {e}"),
        },
        // Already online, or a CPU that cannot go offline (no `online` file).
        _ => {}
    }
}

fn online_memory(dir: &Path) {
    let file = dir.join("state");
    match std::fs::read_to_string(&file) {
        Ok(s) if s.trim() == "offline" => match std::fs::write(&file, "online_movable") {
            Ok(()) => tracing::info!(block = %dir.display(), "hot-added memory online (movable)"),
            Err(e) => {
                tracing::warn!(block = %dir.display(), "cannot online hot-added memory: {e}")
            }
        },
        _ => {}
    }
}

fn online_all_present() {
    for (root, prefix, online) in [
        (SYS_CPU, "cpu", online_cpu as fn(&Path)),
        (SYS_MEMORY, "memory", online_memory as fn(&Path)),
    ] {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name
                .strip_prefix(prefix)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            {
                online(&e.path());
            }
        }
    }
}

fn uevent_socket() -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{
        bind, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
    };
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkKObjectUEvent,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &NetlinkAddr::new(0, UEVENT_GROUP),
    )?;
    Ok(fd)
}

fn listen(fd: std::os::fd::OwnedFd) {
    use nix::sys::socket::{recvfrom, NetlinkAddr};
    let mut buf = vec![0u8; UEVENT_MAX];
    loop {
        let (n, from) =
            match recvfrom::<NetlinkAddr>(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut buf) {
                Ok(r) => r,
                Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::ENOBUFS) => {
                    // Missed events: catch up from sysfs.
                    online_all_present();
                    continue;
                }
                Err(e) => {
                    tracing::error!(
                        "reading uevents failed: {e}; hot-added CPUs and memory stay offline"
                    );
                    return;
                }
            };
        // Only the kernel (port id 0) speaks for hardware.
        if from.is_none_or(|a| a.pid() != 0) {
            continue;
        }
        match parse(&buf[..n]) {
            Some(Added::Cpu(dir)) => online_cpu(&dir),
            Some(Added::Memory(dir)) => online_memory(&dir),
            None => {}
        }
    }
}

/// Start onlining hot-added CPUs and memory.
pub fn start() {
    let fd = match uevent_socket() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(
                "cannot listen to uevents ({e}); hot-added CPUs and memory stay offline"
            );
            return;
        }
    };
    // Subscribed first, then the catch-up: nothing added in between is missed.
    online_all_present();
    if let Err(e) = std::thread::Builder::new()
        .name("hotplug".into())
        .spawn(move || listen(fd))
    {
        tracing::error!(
            "cannot start the hotplug thread ({e}); hot-added CPUs and memory stay offline"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uevents_for_added_cpus_and_memory_are_recognised() {
        assert_eq!(
            parse(b"add@/devices/system/cpu/cpu3\0ACTION=add\0"),
            Some(Added::Cpu(PathBuf::from("/sys/devices/system/cpu/cpu3")))
        );
        assert_eq!(
            parse(b"add@/devices/system/memory/memory40\0ACTION=add\0"),
            Some(Added::Memory(PathBuf::from(
                "/sys/devices/system/memory/memory40"
            )))
        );
        for other in [
            &b"remove@/devices/system/cpu/cpu3\0"[..],
            b"add@/devices/system/cpu/cpufreq\0",
            b"add@/devices/system/cpu/cpu\0",
            b"add@/devices/system/cpu/cpu1/../../../x\0",
            b"add@/devices/virtual/net/lo\0",
            b"libudev\0\xfe\xed",
            b"",
            b"\xff\xfe@",
        ] {
            assert_eq!(parse(other), None, "{other:?}");
        }
    }
}
