//! What a container's files look like on both sides of the VM boundary.
//!
//! On the host, a sandbox has one share folder that virtiofsd exports into the
//! guest; each container gets `<share>/<container-id>/` with its root filesystem
//! mounted at `rootfs` (the snapshot mounts containerd hands over) and each bind
//! mount of its spec at `mounts/<n>` (read-only ones mounted read-only). The
//! share is a shared mount, so mounts added after virtiofsd started propagate
//! into virtiofsd's mount namespace.
//!
//! In the guest, the same folder is `<GUEST_SHARES_DIR>/<share name>/<id>`: the
//! spec is rewritten to point there ([`rewrite_spec`]), host-only settings
//! (hooks, namespace paths, security labels the guest kernel does not have) are
//! dropped, and guest-local mounts (proc, tmpfs, devpts, ...) stay as they are.
//! Unmounting undoes it all, in reverse, and tolerates what is already gone.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde_json::Value;

/// Why a mount could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mounting {what} at {target}: {source}")]
    Mount {
        what: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("preparing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rootfs mount {index}: {reason}")]
    BadRootfs { index: usize, reason: String },
    #[error("bind mount to {destination}: {reason}")]
    BadBind { destination: String, reason: String },
}

/// One mount of containerd's `rootfs` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MountError + '_ {
    move |source| MountError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Every mount point of this process's mount namespace.
fn mount_points() -> std::collections::HashSet<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        // mountinfo escapes blanks and backslashes as octal.
        .map(|mp| {
            PathBuf::from(
                mp.replace("\\040", " ")
                    .replace("\\011", "\t")
                    .replace("\\012", "\n")
                    .replace("\\134", "\\"),
            )
        })
        .collect()
}

fn is_mountpoint(path: &Path) -> bool {
    mount_points().contains(path)
}

/// Remove `root` and everything below it, but never anything on or under a
/// mount point: a mount left behind (an unmount that failed) keeps its files,
/// and the folders above it stay. Returns the mount points found in the way.
pub fn remove_tree_within_mount(root: &Path) -> Vec<PathBuf> {
    let mounts = mount_points();
    let mut blocked = Vec::new();
    fn walk(
        p: &Path,
        mounts: &std::collections::HashSet<PathBuf>,
        blocked: &mut Vec<PathBuf>,
    ) -> bool {
        if mounts.contains(p) {
            blocked.push(p.to_path_buf());
            return false;
        }
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return true;
        };
        if !meta.is_dir() {
            return std::fs::remove_file(p).is_ok();
        }
        let mut all = true;
        if let Ok(entries) = std::fs::read_dir(p) {
            for e in entries.flatten() {
                all &= walk(&e.path(), mounts, blocked);
            }
        }
        all && std::fs::remove_dir(p).is_ok()
    }
    walk(root, &mounts, &mut blocked);
    blocked
}

/// Make `share` a folder that is its own shared mount (idempotent).
pub fn prepare_share(share: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(share).map_err(io_err(share))?;
    if !is_mountpoint(share) {
        mount(
            Some(share),
            share,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|source| MountError::Mount {
            what: "the share onto itself".into(),
            target: share.to_path_buf(),
            source,
        })?;
    }
    mount(
        None::<&str>,
        share,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|source| MountError::Mount {
        what: "shared propagation".into(),
        target: share.to_path_buf(),
        source,
    })
}

/// Split containerd's mount options into flags and the data string.
fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

/// Mount the container's root filesystem at `target`: containerd's snapshot
/// mounts when there are any, else a bind of the bundle's prepared `rootfs`.
pub fn mount_rootfs(
    mounts: &[RootfsMount],
    bundle_rootfs: &Path,
    target: &Path,
) -> Result<(), MountError> {
    std::fs::create_dir_all(target).map_err(io_err(target))?;
    if mounts.is_empty() {
        return mount(
            Some(bundle_rootfs),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|source| MountError::Mount {
            what: format!("the bundle rootfs {}", bundle_rootfs.display()),
            target: target.to_path_buf(),
            source,
        });
    }
    if mounts.len() > 1 {
        return Err(MountError::BadRootfs {
            index: 1,
            reason: "only one rootfs mount is supported (containerd's snapshotters give one)"
                .into(),
        });
    }
    let m = &mounts[0];
    if m.kind.is_empty() || m.kind.contains(['/', ',']) {
        return Err(MountError::BadRootfs {
            index: 0,
            reason: format!("mount type {:?} is not valid", m.kind),
        });
    }
    let (flags, data) = parse_options(&m.options);
    let kind = if flags.contains(MsFlags::MS_BIND) {
        None
    } else {
        Some(m.kind.as_str())
    };
    mount(
        Some(m.source.as_str()),
        target,
        kind,
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(|source| MountError::Mount {
        what: format!("the {} rootfs from {}", m.kind, m.source),
        target: target.to_path_buf(),
        source,
    })?;
    if flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY) {
        remount_read_only(target)?;
    }
    Ok(())
}

fn remount_read_only(target: &Path) -> Result<(), MountError> {
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|source| MountError::Mount {
        what: "a read-only remount".into(),
        target: target.to_path_buf(),
        source,
    })
}

/// Mount types that exist only inside the guest and stay as they are.
fn guest_local(kind: &str) -> bool {
    matches!(
        kind,
        "proc"
            | "sysfs"
            | "tmpfs"
            | "devpts"
            | "mqueue"
            | "cgroup"
            | "cgroup2"
            | "shm"
            | "devtmpfs"
    )
}

/// Is this spec mount a bind of a host path?
fn is_bind(m: &Value) -> bool {
    let kind = m.get("type").and_then(Value::as_str).unwrap_or("");
    let opts_bind = m.get("options").and_then(Value::as_array).is_some_and(|o| {
        o.iter()
            .any(|v| matches!(v.as_str(), Some("bind" | "rbind")))
    });
    kind == "bind" || (opts_bind && !guest_local(kind))
}

/// Carry the spec's bind mounts into the share: bind each host source at
/// `<container_dir>/mounts/<n>` and point the spec at `<guest_dir>/mounts/<n>`.
/// Returns the host paths mounted (to unmount later, in reverse).
pub fn carry_bind_mounts(
    spec: &mut Value,
    container_dir: &Path,
    guest_dir: &str,
) -> Result<Vec<PathBuf>, MountError> {
    let mut mounted = Vec::new();
    let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) else {
        return Ok(mounted);
    };
    for (n, m) in mounts.iter_mut().enumerate() {
        if !is_bind(m) {
            continue;
        }
        let destination = m
            .get("destination")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let bad = |reason: &str| MountError::BadBind {
            destination: destination.clone(),
            reason: reason.to_string(),
        };
        let source = m
            .get("source")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no source"))?;
        let source = PathBuf::from(source);
        if !source.is_absolute() {
            return Err(bad("the source must be an absolute host path"));
        }
        let meta = std::fs::metadata(&source).map_err(io_err(&source))?;
        let read_only = m
            .get("options")
            .and_then(Value::as_array)
            .is_some_and(|o| o.iter().any(|v| v.as_str() == Some("ro")));
        let target = container_dir.join("mounts").join(n.to_string());
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        if meta.is_dir() {
            std::fs::create_dir_all(&target).map_err(io_err(&target))?;
        } else {
            std::fs::write(&target, b"").map_err(io_err(&target))?;
        }
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| MountError::Mount {
            what: format!("bind of {}", source.display()),
            target: target.clone(),
            source: e,
        })?;
        mounted.push(target.clone());
        if read_only {
            remount_read_only(&target)?;
        }
        m["source"] = Value::String(format!("{guest_dir}/mounts/{n}"));
    }
    Ok(mounted)
}

/// Rewrite a container's spec for the guest: its root is the share's `rootfs`,
/// host-only settings go.
pub fn rewrite_spec(spec: &mut Value) {
    if let Some(root) = spec.get_mut("root").and_then(Value::as_object_mut) {
        root.insert("path".into(), Value::String("rootfs".into()));
    }
    if let Some(obj) = spec.as_object_mut() {
        obj.remove("hooks");
    }
    if let Some(process) = spec.get_mut("process").and_then(Value::as_object_mut) {
        process.remove("apparmorProfile");
        process.remove("selinuxLabel");
    }
    if let Some(linux) = spec.get_mut("linux").and_then(Value::as_object_mut) {
        linux.remove("mountLabel");
        // Paths name host namespaces; in the guest each container gets its own,
        // except the network, which is the VM's.
        if let Some(Value::Array(ns)) = linux.get_mut("namespaces") {
            ns.retain(|n| n.get("type").and_then(Value::as_str) != Some("network"));
            for n in ns.iter_mut() {
                if let Some(o) = n.as_object_mut() {
                    o.remove("path");
                }
            }
        }
    }
}

/// Unmount every mount at or below `root`, deepest first (cleaning up after a
/// shim that died without unmounting).
pub fn unmount_under(root: &Path) {
    let mut below: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|m| m.starts_with(root))
        .collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in below {
        if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
            tracing::warn!("unmounting {}: {e}", m.display());
        }
    }
}

/// Unmount `paths` in reverse order; what is already gone is fine.
pub fn unmount_all(paths: &[PathBuf]) {
    for p in paths.iter().rev() {
        match umount2(p, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => tracing::warn!("unmounting {}: {e}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests;
