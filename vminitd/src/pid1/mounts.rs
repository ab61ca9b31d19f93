//! The guest's file systems: the kernel API mounts, cgroup2 with every
//! available controller delegated, and the shares (virtio-fs, EROFS on
//! virtio-blk) named on the command line.

use std::path::Path;

use nix::mount::{mount, MsFlags};

use super::cmdline::Share;

/// One mount PID 1 makes at boot.
struct ApiMount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

fn api_mounts() -> [ApiMount; 8] {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    [
        ApiMount {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: nosuid_nodev_noexec,
            data: None,
        },
        ApiMount {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: nosuid_nodev_noexec,
            data: None,
        },
        ApiMount {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        ApiMount {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("newinstance,ptmxmode=0666,mode=0620"),
        },
        ApiMount {
            source: "shm",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: nosuid_nodev_noexec,
            data: Some("mode=1777"),
        },
        ApiMount {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=0755"),
        },
        ApiMount {
            source: "tmpfs",
            target: "/tmp",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=1777"),
        },
        ApiMount {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: nosuid_nodev_noexec,
            data: Some("nsdelegate"),
        },
    ]
}

/// Where PID 1 mounts file systems of its own (fresh and empty, or the
/// kernel's view): a path under one of these is not what it was before
/// PID 1 started. Tests keep their files elsewhere.
pub fn api_mount_points() -> impl Iterator<Item = &'static str> {
    api_mounts().into_iter().map(|m| m.target)
}

fn is_mountpoint(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| t.lines().any(|l| l.split(' ').nth(4) == Some(path)))
        .unwrap_or(false)
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run, /tmp and cgroup2.
/// Already-mounted targets are left alone; failures are logged, not fatal.
pub fn mount_api_filesystems() {
    for m in api_mounts() {
        // /proc is needed to know what is mounted; try it unconditionally.
        if m.target != "/proc" && is_mountpoint(m.target) {
            continue;
        }
        if let Err(e) = std::fs::create_dir_all(m.target) {
            tracing::warn!("mkdir {}: {e}", m.target);
        }
        if let Err(e) = mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
            if e != nix::errno::Errno::EBUSY {
                tracing::warn!("mount {} on {}: {e}", m.fstype, m.target);
            }
        }
    }
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
}

/// Delegates every available controller to child cgroups.
pub fn enable_controllers(cgroup_mount: &Path) {
    let Ok(avail) = std::fs::read_to_string(cgroup_mount.join("cgroup.controllers")) else {
        tracing::warn!("no cgroup.controllers under {}", cgroup_mount.display());
        return;
    };
    let line: Vec<String> = avail.split_whitespace().map(|c| format!("+{c}")).collect();
    if let Err(e) = std::fs::write(cgroup_mount.join("cgroup.subtree_control"), line.join(" ")) {
        tracing::warn!("enabling cgroup controllers {avail:?}: {e}");
    } else {
        tracing::info!("cgroup controllers enabled: {}", avail.trim());
    }
}

/// Mounts each share at `<shares_dir>/<name>`.
pub fn mount_shares(shares: &[Share], shares_dir: &Path) {
    for s in shares {
        let (source, name, fstype, flags) = match s {
            Share::VirtioFs {
                tag,
                name,
                readonly,
            } => (
                tag.clone(),
                name,
                "virtiofs",
                if *readonly {
                    MsFlags::MS_RDONLY
                } else {
                    MsFlags::empty()
                },
            ),
            Share::Erofs { device, name } => {
                (format!("/dev/{device}"), name, "erofs", MsFlags::MS_RDONLY)
            }
        };
        let target = shares_dir.join(name);
        if let Err(e) = std::fs::create_dir_all(&target) {
            tracing::warn!("mkdir {}: {e}", target.display());
            continue;
        }
        match mount(
            Some(source.as_str()),
            &target,
            Some(fstype),
            flags,
            None::<&str>,
        ) {
            Ok(()) => tracing::info!("mounted {fstype} {source} on {}", target.display()),
            Err(e) => tracing::error!("mount {fstype} {source} on {}: {e}", target.display()),
        }
    }
}
