//! The sandbox's cgroup on the host: the shim process joins the cgroup its
//! sandbox's spec names (`linux.cgroupsPath`, under the pod's cgroup that
//! kubelet limits), before the VM boots and virtiofsd starts, so the VM's
//! memory (faulted in by the VMM's threads of this process, which cgroup v2
//! moves with it) and virtiofsd (a child started afterwards) are charged to
//! the pod on the host. On teardown the shim moves back to where it was and
//! removes the folders it created.
//!
//! Owns only that: never sets limits (kubelet sets the pod's), never touches
//! a cgroup it did not create beyond enabling controllers for its children.
//! cgroup v2 only (v1 is reported as unsupported and the sandbox runs
//! unaccounted). Both forms of `cgroupsPath`: cgroupfs paths, and the systemd
//! driver's `slice:prefix:name` (what containerd's CRI plugin passes when the
//! pod's parent is a `.slice`), which names the folder
//! `<slice, expanded as systemd does>/<prefix>-<name>.scope`. The shim makes
//! that folder itself; unlike runc's systemd driver it does not register the
//! scope with systemd over D-Bus (systemd leaves cgroups it does not know
//! alone; the pod slice's limits, which kubelet sets through systemd, apply).

use std::path::{Component, Path, PathBuf};

/// Where the cgroup v2 hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Controllers enabled for the sandbox's cgroup (those its parents have).
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Why the shim could not join its sandbox's host cgroup.
#[derive(Debug, thiserror::Error)]
pub enum HostCgroupError {
    #[error("cgroupsPath {path:?} is not a valid systemd-driver path (slice:prefix:name): {why}")]
    Systemd { path: String, why: &'static str },
    #[error("cgroupsPath {0:?} leaves the cgroup hierarchy ('..'); refusing it")]
    Escapes(String),
    #[error(
        "{0} is not a cgroup v2 hierarchy: the VM's memory cannot be accounted to its pod \
         (boot the host with cgroup v2, systemd.unified_cgroup_hierarchy=1)"
    )]
    NotV2(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HostCgroupError {
    let what = what.into();
    move |source| HostCgroupError::Io { what, source }
}

/// The folder of systemd slice `slice` relative to the hierarchy's root, as
/// systemd lays slices out: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`,
/// `-.slice` is the root.
fn expand_slice(slice: &str) -> Result<PathBuf, &'static str> {
    let Some(stem) = slice.strip_suffix(".slice") else {
        return Err("the slice must end in .slice");
    };
    if stem == "-" {
        return Ok(PathBuf::new());
    }
    if stem.is_empty()
        || stem.contains('/')
        || stem.starts_with('-')
        || stem.ends_with('-')
        || stem.contains("--")
    {
        return Err("a slice name is dash-separated words without '/'");
    }
    let mut out = PathBuf::new();
    let mut prefix = String::new();
    for word in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(word);
        out.push(format!("{prefix}.slice"));
    }
    Ok(out)
}

/// The folder a systemd-driver `slice:prefix:name` path names, relative to
/// the hierarchy's root (runc's rules: an empty slice is `system.slice`; the
/// unit is `<prefix>-<name>.scope`, or `name` itself when there is no prefix
/// and `name` is a slice).
fn systemd_dir(cgroups_path: &str) -> Result<PathBuf, HostCgroupError> {
    let bad = |why| HostCgroupError::Systemd {
        path: cgroups_path.into(),
        why,
    };
    let mut parts = cgroups_path.split(':');
    let (Some(slice), Some(prefix), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("expected three ':'-separated parts"));
    };
    if name.is_empty() {
        return Err(bad("the name is empty"));
    }
    let unit_ok = |s: &str| !s.contains('/') && s != "." && s != "..";
    if !unit_ok(prefix) || !unit_ok(name) {
        return Err(bad("a prefix or name holds '/' or is '.' or '..'"));
    }
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let mut dir = expand_slice(slice).map_err(bad)?;
    if prefix.is_empty() && name.ends_with(".slice") {
        dir.push(
            expand_slice(name)
                .map_err(bad)?
                .file_name()
                .unwrap_or_default(),
        );
    } else if prefix.is_empty() {
        dir.push(format!("{name}.scope"));
    } else {
        dir.push(format!("{prefix}-{name}.scope"));
    }
    Ok(dir)
}

/// The cgroup folder `cgroups_path` names under `root`, for a process whose
/// own cgroup is `own` (relative paths are taken from there, as runc does;
/// systemd-driver paths from the root).
pub fn host_dir(root: &Path, own: &Path, cgroups_path: &str) -> Result<PathBuf, HostCgroupError> {
    if cgroups_path.contains(':') {
        return Ok(root.join(systemd_dir(cgroups_path)?));
    }
    let path = Path::new(cgroups_path);
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(HostCgroupError::Escapes(cgroups_path.into()));
    }
    let relative = path.strip_prefix("/").unwrap_or(path);
    let base = if path.is_absolute() {
        root.to_path_buf()
    } else {
        root.join(own.strip_prefix("/").unwrap_or(own))
    };
    Ok(base.join(relative))
}

/// This process's cgroup v2 path (`0::/path` in `/proc/self/cgroup`).
fn own_cgroup() -> Result<PathBuf, HostCgroupError> {
    let text =
        std::fs::read_to_string("/proc/self/cgroup").map_err(io("reading /proc/self/cgroup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(PathBuf::from)
        .ok_or_else(|| HostCgroupError::NotV2(PathBuf::from(CGROUP_ROOT)))
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// The shim process inside its sandbox's host cgroup.
#[derive(Debug)]
pub struct HostCgroup {
    dir: PathBuf,
    /// Folders this process created, outermost first.
    created: Vec<PathBuf>,
    /// Where the process was before (it returns there on [`HostCgroup::leave`]).
    previous: PathBuf,
}

impl HostCgroup {
    /// Move this process into `cgroups_path` under [`CGROUP_ROOT`], creating
    /// the folders it needs and enabling the memory, cpu and pids controllers
    /// on the way (where the parent has them).
    pub fn join(cgroups_path: &str) -> Result<Self, HostCgroupError> {
        let root = Path::new(CGROUP_ROOT);
        if !is_cgroup2(root) {
            return Err(HostCgroupError::NotV2(root.into()));
        }
        let own = own_cgroup()?;
        let dir = host_dir(root, &own, cgroups_path)?;
        let previous = root.join(own.strip_prefix("/").unwrap_or(&own));
        let mut created = Vec::new();
        let rel = dir.strip_prefix(root).unwrap_or(&dir).to_path_buf();
        let mut at = root.to_path_buf();
        for part in rel.components() {
            enable_controllers(&at);
            at.push(part);
            match std::fs::create_dir(&at) {
                Ok(()) => created.push(at.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    let me = Self {
                        dir: dir.clone(),
                        created,
                        previous,
                    };
                    me.remove_created();
                    return Err(io(format!("creating the cgroup {}", at.display()))(e));
                }
            }
        }
        let me = Self {
            dir,
            created,
            previous,
        };
        let procs = me.dir.join("cgroup.procs");
        if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
            me.remove_created();
            return Err(io(format!("moving the shim into {}", procs.display()))(e));
        }
        Ok(me)
    }

    /// The cgroup folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Move the process back where it was and remove the folders it created
    /// (what is still in use stays, logged). A child that was just stopped
    /// (virtiofsd) can keep the cgroup populated for a moment after it was
    /// reaped, so this waits up to [`EMPTY_WAIT`] for the kernel to say the
    /// cgroup is empty before removing it.
    pub fn leave(self) {
        let procs = self.previous.join("cgroup.procs");
        if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
            tracing::warn!("moving the shim back to {}: {e}", procs.display());
        }
        let deadline = std::time::Instant::now() + EMPTY_WAIT;
        while populated(&self.dir) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if populated(&self.dir) {
            let left = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
            tracing::warn!(
                "the cgroup {} still holds processes {:?} after {EMPTY_WAIT:?}; it stays",
                self.dir.display(),
                left.split_whitespace().collect::<Vec<_>>()
            );
        }
        self.remove_created();
    }

    /// Remove the folders this process created, innermost first. A parent
    /// another sandbox has joined since is still busy and stays (as runc
    /// leaves parents too).
    fn remove_created(&self) {
        for dir in self.created.iter().rev() {
            if let Err(e) = std::fs::remove_dir(dir) {
                if *dir == self.dir {
                    tracing::warn!("removing the cgroup {}: {e}", dir.display());
                } else {
                    tracing::debug!("leaving the cgroup {}: {e}", dir.display());
                }
            }
        }
    }
}

/// How long [`HostCgroup::leave`] waits for the cgroup to empty.
const EMPTY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether the cgroup at `dir` (or a descendant) holds a process, from its
/// `cgroup.events`; false when that cannot be read (gone already).
fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// Enable [`CONTROLLERS`] for the children of `dir`, each on its own (one the
/// parent lacks, or a cgroup holding processes, refuses; that is fine).
fn enable_controllers(dir: &Path) {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for c in CONTROLLERS {
        let has = |list: &str| list.split_whitespace().any(|x| x == c);
        if has(&available) && !has(&enabled) {
            if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
                tracing::debug!("enabling {c} under {}: {e}", dir.display());
            }
        }
    }
}

/// After a shim died: remove the sandbox's cgroup folder if it is empty (the
/// folders above it may belong to others and stay).
pub fn remove_leftover(cgroups_path: &str) {
    let root = Path::new(CGROUP_ROOT);
    if !is_cgroup2(root) {
        return;
    }
    let Ok(own) = own_cgroup() else { return };
    if let Ok(dir) = host_dir(root, &own, cgroups_path) {
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("removing the cgroup {}: {e}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_taken_from_the_root_or_the_own_cgroup() {
        let root = Path::new("/sys/fs/cgroup");
        let own = Path::new("/system.slice/containerd.service");
        assert_eq!(
            host_dir(root, own, "/kubepods/burstable/pod1/abc").expect("abs"),
            Path::new("/sys/fs/cgroup/kubepods/burstable/pod1/abc")
        );
        assert_eq!(
            host_dir(root, own, "k8s.io/abc").expect("rel"),
            Path::new("/sys/fs/cgroup/system.slice/containerd.service/k8s.io/abc")
        );
    }

    #[test]
    fn systemd_paths_expand_as_systemd_lays_slices_out() {
        let (root, own) = (Path::new("/sys/fs/cgroup"), Path::new("/system.slice/x"));
        let dir = |p: &str| host_dir(root, own, p);
        assert_eq!(
            dir("kubepods-burstable-pod1a2b.slice:cri-containerd:abc").expect("kubelet"),
            Path::new(
                "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/\
                 kubepods-burstable-pod1a2b.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            dir("-.slice:docker:abc").expect("root slice"),
            Path::new("/sys/fs/cgroup/docker-abc.scope")
        );
        assert_eq!(
            dir(":cri-containerd:abc").expect("default slice"),
            Path::new("/sys/fs/cgroup/system.slice/cri-containerd-abc.scope")
        );
        assert_eq!(
            dir("machine.slice::vm1").expect("no prefix"),
            Path::new("/sys/fs/cgroup/machine.slice/vm1.scope")
        );
    }

    #[test]
    fn bad_systemd_paths_and_escapes_are_refused() {
        let (root, own) = (Path::new("/sys/fs/cgroup"), Path::new("/"));
        for bad in [
            "kubepods.slice:cri-containerd",
            "kubepods.slice:a:b:c",
            "kubepods:cri-containerd:abc",
            "kube--pods.slice:p:abc",
            "-kubepods.slice:p:abc",
            "a/b.slice:p:abc",
            "kubepods.slice:p:",
            "kubepods.slice:p:../../etc",
            "kubepods.slice::..",
        ] {
            let e = host_dir(root, own, bad).expect_err(bad);
            assert!(matches!(e, HostCgroupError::Systemd { .. }), "{bad}: {e}");
        }
        let e = host_dir(root, own, "/k8s.io/../../etc").expect_err("escape");
        assert!(matches!(e, HostCgroupError::Escapes(_)), "{e}");
    }
}
