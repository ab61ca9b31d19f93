//! The one place every beaconbox component resolves its folders.
//!
//! Defaults follow the seed system's layout: `/usr/share/beacon` (kernel, initrd),
//! `/var/lib/beacon` (state: network database, sandbox state), `/var/log/beacon`
//! (VM and shim logs). Each is overridden by `BEACON_SHARE_DIR`, `BEACON_STATE_DIR`
//! and `BEACON_LOG_DIR`. Tests build a [`BeaconPaths`] from a temporary folder with
//! [`BeaconPaths::under`] and never touch the real ones.
//!
//! This module only computes paths; it never creates or deletes anything except in
//! [`BeaconPaths::ensure_dirs`], which the caller invokes explicitly.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

/// Environment variable that overrides [`DEFAULT_SHARE_DIR`].
pub const SHARE_DIR_ENV: &str = "BEACON_SHARE_DIR";
/// Environment variable that overrides [`DEFAULT_STATE_DIR`].
pub const STATE_DIR_ENV: &str = "BEACON_STATE_DIR";
/// Environment variable that overrides [`DEFAULT_LOG_DIR`].
pub const LOG_DIR_ENV: &str = "BEACON_LOG_DIR";

/// Read-only assets: the beacon kernel and initrd.
pub const DEFAULT_SHARE_DIR: &str = "/usr/share/beacon";
/// Persistent state: the IP lease database, sandbox records.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/beacon";
/// Logs: one serial log per VM, shim logs.
pub const DEFAULT_LOG_DIR: &str = "/var/log/beacon";

/// File name of the beacon kernel (uncompressed vmlinux) under `share/kernel/`.
pub const KERNEL_FILE: &str = "beacon-kernel-x86_64";
/// File name of the beacon initrd under `share/kernel/`.
pub const INITRD_FILE: &str = "beacon-initrd";

/// The three roots and everything derived from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeaconPaths {
    share_dir: PathBuf,
    state_dir: PathBuf,
    log_dir: PathBuf,
}

impl BeaconPaths {
    /// Resolve from the process environment.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// Resolve with a custom variable lookup (tests pass a map instead of mutating
    /// the process environment, which is shared between test threads).
    ///
    /// An empty value counts as unset, so `BEACON_STATE_DIR= cmd` keeps the default
    /// rather than resolving to the current directory.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Self {
        let pick = |name: &str, default: &str| {
            lookup(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(default))
        };
        Self {
            share_dir: pick(SHARE_DIR_ENV, DEFAULT_SHARE_DIR),
            state_dir: pick(STATE_DIR_ENV, DEFAULT_STATE_DIR),
            log_dir: pick(LOG_DIR_ENV, DEFAULT_LOG_DIR),
        }
    }

    /// All three roots below one folder (`share/`, `state/`, `log/`): for tests.
    pub fn under(root: &Path) -> Self {
        Self {
            share_dir: root.join("share"),
            state_dir: root.join("state"),
            log_dir: root.join("log"),
        }
    }

    pub fn share_dir(&self) -> &Path {
        &self.share_dir
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// `share/kernel/beacon-kernel-x86_64`: the default guest kernel.
    pub fn kernel(&self) -> PathBuf {
        self.share_dir.join("kernel").join(KERNEL_FILE)
    }

    /// `share/kernel/beacon-initrd`: the default guest initrd.
    pub fn initrd(&self) -> PathBuf {
        self.share_dir.join("kernel").join(INITRD_FILE)
    }

    /// `state/network.db`: the IP lease database.
    pub fn network_db(&self) -> PathBuf {
        self.state_dir.join("network.db")
    }

    /// `state/sandboxes/<id>`: per-sandbox runtime state (sockets, pid files).
    pub fn sandbox_state(&self, sandbox_id: &str) -> PathBuf {
        self.state_dir.join("sandboxes").join(sanitize(sandbox_id))
    }

    /// `log/<id>.vm.log`: the serial console of one sandbox's VM.
    pub fn vm_log(&self, sandbox_id: &str) -> PathBuf {
        self.log_dir
            .join(format!("{}.vm.log", sanitize(sandbox_id)))
    }

    /// Create the state and log roots (the share root is installed, not created).
    pub fn ensure_dirs(&self) -> io::Result<()> {
        std::fs::create_dir_all(&self.state_dir)?;
        std::fs::create_dir_all(&self.log_dir)
    }
}

/// Make an externally supplied id safe as one path component: anything outside
/// `[A-Za-z0-9._-]` becomes `_`, and `.`/`..`/empty become `_` so the result can
/// never escape its parent folder.
pub fn sanitize(id: &str) -> String {
    let cleaned: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() || cleaned.chars().all(|c| c == '.') {
        "_".repeat(cleaned.len().max(1))
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn defaults_when_unset() {
        let p = BeaconPaths::from_lookup(lookup(&[]));
        assert_eq!(p.share_dir(), Path::new("/usr/share/beacon"));
        assert_eq!(p.state_dir(), Path::new("/var/lib/beacon"));
        assert_eq!(p.log_dir(), Path::new("/var/log/beacon"));
        assert_eq!(
            p.kernel(),
            Path::new("/usr/share/beacon/kernel/beacon-kernel-x86_64")
        );
        assert_eq!(
            p.initrd(),
            Path::new("/usr/share/beacon/kernel/beacon-initrd")
        );
        assert_eq!(p.network_db(), Path::new("/var/lib/beacon/network.db"));
    }

    #[test]
    fn env_overrides_each_root() {
        let p = BeaconPaths::from_lookup(lookup(&[
            (SHARE_DIR_ENV, "/s"),
            (STATE_DIR_ENV, "/st"),
            (LOG_DIR_ENV, "/l"),
        ]));
        assert_eq!(p.kernel(), Path::new("/s/kernel/beacon-kernel-x86_64"));
        assert_eq!(p.network_db(), Path::new("/st/network.db"));
        assert_eq!(p.vm_log("abc"), Path::new("/l/abc.vm.log"));
    }

    #[test]
    fn empty_value_keeps_default() {
        let p = BeaconPaths::from_lookup(lookup(&[(STATE_DIR_ENV, "")]));
        assert_eq!(p.state_dir(), Path::new(DEFAULT_STATE_DIR));
    }

    #[test]
    fn ids_cannot_escape() {
        assert_eq!(sanitize("../../etc"), ".._.._etc");
        assert_eq!(sanitize(".."), "__");
        assert_eq!(sanitize(""), "_");
        assert_eq!(sanitize("a/b c"), "a_b_c");
        let p = BeaconPaths::under(Path::new("/t"));
        assert_eq!(p.sandbox_state(".."), Path::new("/t/state/sandboxes/__"));
    }

    #[test]
    fn ensure_dirs_creates_state_and_log() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = BeaconPaths::under(tmp.path());
        p.ensure_dirs().expect("ensure_dirs");
        assert!(p.state_dir().is_dir());
        assert!(p.log_dir().is_dir());
        assert!(!p.share_dir().exists());
    }
}
