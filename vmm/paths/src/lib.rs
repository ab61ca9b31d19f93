//! The one place every beaconbox component resolves its folders.
//!
//! Defaults follow the seed system's layout: `/usr/share/beacon` (kernel, initrd),
//! `/var/lib/beacon` (state that survives a reboot: network database, sandbox
//! state), `/run/beacon` (runtime state that must *not* survive one: sandbox
//! liveness locks, CNI namespaces), `/var/log/beacon` (VM and shim logs). Each is
//! overridden by `BEACON_SHARE_DIR`, `BEACON_STATE_DIR`, `BEACON_RUN_DIR` and
//! `BEACON_LOG_DIR`. Tests build a [`BeaconPaths`] from a temporary folder with
//! [`BeaconPaths::under`] and never touch the real ones.
//!
//! Per-sandbox names go through [`sanitize`], which maps distinct ids to distinct,
//! safe, short path components (see there for the scheme).
//!
//! This module only computes paths; it never creates or deletes anything except in
//! [`BeaconPaths::ensure_dirs`], which the caller invokes explicitly.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Environment variable that overrides [`DEFAULT_SHARE_DIR`].
pub const SHARE_DIR_ENV: &str = "BEACON_SHARE_DIR";
/// Environment variable that overrides [`DEFAULT_STATE_DIR`].
pub const STATE_DIR_ENV: &str = "BEACON_STATE_DIR";
/// Environment variable that overrides [`DEFAULT_LOG_DIR`].
pub const LOG_DIR_ENV: &str = "BEACON_LOG_DIR";
/// Environment variable that overrides [`DEFAULT_RUN_DIR`].
pub const RUN_DIR_ENV: &str = "BEACON_RUN_DIR";

/// Read-only assets: the beacon kernel and initrd.
pub const DEFAULT_SHARE_DIR: &str = "/usr/share/beacon";
/// Persistent state: the IP lease database, sandbox records.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/beacon";
/// Logs: one serial log per VM, shim logs.
pub const DEFAULT_LOG_DIR: &str = "/var/log/beacon";
/// Runtime state on a tmpfs, gone after a reboot: liveness locks, CNI namespaces.
pub const DEFAULT_RUN_DIR: &str = "/run/beacon";

/// File name of the beacon kernel (uncompressed vmlinux) under `share/kernel/`.
pub const KERNEL_FILE: &str = "beacon-kernel-x86_64";
/// File name of the beacon initrd under `share/kernel/`.
pub const INITRD_FILE: &str = "beacon-initrd";

/// The four roots and everything derived from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeaconPaths {
    share_dir: PathBuf,
    state_dir: PathBuf,
    run_dir: PathBuf,
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
            run_dir: pick(RUN_DIR_ENV, DEFAULT_RUN_DIR),
            log_dir: pick(LOG_DIR_ENV, DEFAULT_LOG_DIR),
        }
    }

    /// All four roots below one folder (`share/`, `state/`, `run/`, `log/`): for tests.
    pub fn under(root: &Path) -> Self {
        Self {
            share_dir: root.join("share"),
            state_dir: root.join("state"),
            run_dir: root.join("run"),
            log_dir: root.join("log"),
        }
    }

    pub fn share_dir(&self) -> &Path {
        &self.share_dir
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Runtime root: emptied by a reboot (a tmpfs), so nothing here outlives the
    /// processes that made it by more than the machine's uptime.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
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

    /// `run/vsock-cids`: one lock file per vhost-vsock guest CID in use
    /// (`flock`ed by the process whose VM has it), so concurrent shims never
    /// pick the same CID.
    pub fn vsock_cid_dir(&self) -> PathBuf {
        self.run_dir.join("vsock-cids")
    }

    /// `run/sandboxes`: one liveness lock file per running sandbox.
    pub fn liveness_dir(&self) -> PathBuf {
        self.run_dir.join("sandboxes")
    }

    /// `run/sandboxes/<id>.lock`: locked (`flock`) by the process that owns the
    /// sandbox for as long as it runs.
    pub fn sandbox_liveness(&self, sandbox_id: &str) -> PathBuf {
        self.liveness_dir().join(liveness_lock_name(sandbox_id))
    }

    /// `run/netns`: CNI mode's bind-mounted per-sandbox network namespaces.
    pub fn cni_netns_dir(&self) -> PathBuf {
        self.run_dir.join("netns")
    }

    /// Create the state, runtime and log roots (the share root is installed, not
    /// created).
    pub fn ensure_dirs(&self) -> io::Result<()> {
        std::fs::create_dir_all(&self.state_dir)?;
        std::fs::create_dir_all(&self.run_dir)?;
        std::fs::create_dir_all(&self.log_dir)
    }
}

/// `<id>.lock`: the file name of a sandbox's liveness lock inside
/// [`BeaconPaths::liveness_dir`].
pub fn liveness_lock_name(sandbox_id: &str) -> String {
    format!("{}.lock", sanitize(sandbox_id))
}

/// Longest id containerd accepts; such ids are used verbatim by [`sanitize`].
pub const MAX_VERBATIM_LEN: usize = beacon_common::id::MAX_ID_LEN;
/// Readable characters kept in front of the hash when an id is not used verbatim.
pub const HASHED_PREFIX_LEN: usize = 32;
/// Hex digits of SHA-256 appended when an id is not used verbatim (64 bits).
pub const HASH_HEX_LEN: usize = 16;

/// Make an externally supplied id one safe, short path component, distinct for
/// distinct ids.
///
/// Scheme:
/// - An id that containerd itself would accept ([`is_containerd_id`]) is used
///   verbatim.
/// - Any other id becomes `<prefix>+<hash>`: `<prefix>` is up to
///   [`HASHED_PREFIX_LEN`] characters of the id with every character outside
///   `[A-Za-z0-9_.-]` (and a leading `.` or `-`) replaced by `_`, for people reading a
///   folder listing; `<hash>` is the first [`HASH_HEX_LEN`] hex digits of the
///   SHA-256 of the exact id bytes.
///
/// A verbatim name never contains `+`, and every hashed name does, so the two
/// forms cannot meet; two hashed names are equal only if 64 bits of SHA-256 of
/// different ids are. `a/b` and `a_b` therefore get different names. Every result
/// is non-empty, never `.` or `..`, has no `/` or NUL, and is at most
/// [`MAX_VERBATIM_LEN`] bytes.
pub fn sanitize(id: &str) -> String {
    if is_containerd_id(id) {
        return id.to_string();
    }
    let prefix: String = id
        .chars()
        .take(HASHED_PREFIX_LEN)
        .enumerate()
        .map(|(i, c)| {
            let keep = c.is_ascii_alphanumeric() || c == '_' || (i > 0 && matches!(c, '.' | '-'));
            if keep {
                c
            } else {
                '_'
            }
        })
        .collect();
    let digest = Sha256::digest(id.as_bytes());
    let hash: String = digest
        .iter()
        .take(HASH_HEX_LEN / 2)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{prefix}+{hash}")
}

/// containerd's rule for container (and so sandbox) ids, defined once in
/// [`beacon_common::id`]. Such an id is already a safe path component.
pub use beacon_common::id::valid_id as is_containerd_id;

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
        assert_eq!(p.run_dir(), Path::new("/run/beacon"));
        assert_eq!(p.cni_netns_dir(), Path::new("/run/beacon/netns"));
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
            (RUN_DIR_ENV, "/r"),
            (LOG_DIR_ENV, "/l"),
        ]));
        assert_eq!(
            p.sandbox_liveness("abc"),
            Path::new("/r/sandboxes/abc.lock")
        );
        assert_eq!(p.kernel(), Path::new("/s/kernel/beacon-kernel-x86_64"));
        assert_eq!(p.network_db(), Path::new("/st/network.db"));
        assert_eq!(p.vm_log("abc"), Path::new("/l/abc.vm.log"));
    }

    #[test]
    fn empty_value_keeps_default() {
        let p = BeaconPaths::from_lookup(lookup(&[(STATE_DIR_ENV, "")]));
        assert_eq!(p.state_dir(), Path::new(DEFAULT_STATE_DIR));
    }

    fn is_one_safe_component(name: &str) {
        assert!(!name.is_empty() && name != "." && name != "..", "{name:?}");
        assert!(!name.contains('/') && !name.contains('\0'), "{name:?}");
        assert!(!name.starts_with('.') && !name.starts_with('-'), "{name:?}");
        assert!(name.len() <= MAX_VERBATIM_LEN, "{name:?} is too long");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b)),
            "{name:?}"
        );
        assert_eq!(
            Path::new(name).components().count(),
            1,
            "{name:?} is one component"
        );
    }

    #[test]
    fn ids_cannot_escape() {
        for id in [
            "../../etc",
            "..",
            ".",
            "",
            "a/b c",
            "/abs",
            "-rf",
            ".hidden",
        ] {
            let name = sanitize(id);
            is_one_safe_component(&name);
            assert!(name.contains('+'), "{id:?} must not be used verbatim");
        }
        assert!(sanitize("../../etc").starts_with("_._.._etc+"));
        let p = BeaconPaths::under(Path::new("/t"));
        assert_eq!(
            p.sandbox_state("..").parent(),
            Some(Path::new("/t/state/sandboxes"))
        );
    }

    #[test]
    fn containerd_id_rule() {
        for ok in ["a", "0", "pod-1_x.y", &"z".repeat(76)] {
            assert!(is_containerd_id(ok), "{ok:?}");
        }
        for bad in [
            "",
            "_a",
            "-a",
            ".a",
            "a/b",
            "a b",
            "a+b",
            "\u{e9}",
            &"z".repeat(77),
        ] {
            assert!(!is_containerd_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn containerd_ids_are_kept_verbatim() {
        let long = "f".repeat(64);
        for id in ["abc", "pod1", "0a.b_c-d", long.as_str(), &"x".repeat(76)] {
            assert_eq!(sanitize(id), id);
        }
        let p = BeaconPaths::under(Path::new("/t"));
        assert_eq!(p.vm_log("pod1"), Path::new("/t/log/pod1.vm.log"));
        assert_eq!(
            p.sandbox_liveness("pod1"),
            Path::new("/t/run/sandboxes/pod1.lock")
        );
    }

    #[test]
    fn different_ids_never_share_a_name() {
        // The collisions of the old scheme, and ids built to look like hashed names.
        let a_slash_b = sanitize("a/b");
        let long = "y".repeat(200);
        let mut long2 = long.clone();
        long2.push('z');
        let tricky = [
            "a/b",
            "a_b",
            "a b",
            "a\\b",
            "a+b",
            "a\u{e9}b",
            "a\u{1F642}b",
            a_slash_b.as_str(),
            &a_slash_b.replace('+', "_"),
            "_",
            "",
            ".",
            "..",
            "__",
            long.as_str(),
            long2.as_str(),
            &"x".repeat(77),
            &"x".repeat(76),
        ];
        let mut seen = std::collections::HashMap::new();
        for id in tricky {
            let name = sanitize(id);
            is_one_safe_component(&name);
            if let Some(other) = seen.insert(name.clone(), id) {
                panic!("{id:?} and {other:?} both map to {name:?}");
            }
        }
        assert_ne!(
            BeaconPaths::under(Path::new("/t")).sandbox_state("a/b"),
            BeaconPaths::under(Path::new("/t")).sandbox_state("a_b")
        );
        assert_ne!(
            BeaconPaths::under(Path::new("/t")).vm_log("a/b"),
            BeaconPaths::under(Path::new("/t")).vm_log("a_b")
        );

        // Exhaustively: every id up to four characters over an alphabet of kept,
        // replaced and marker characters.
        let alphabet = ['a', '_', '/', '.', '+', '-'];
        let mut ids = vec![String::new()];
        let mut frontier = vec![String::new()];
        for _ in 0..4 {
            frontier = frontier
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            ids.extend(frontier.iter().cloned());
        }
        let mut names = std::collections::HashMap::new();
        for id in &ids {
            let name = sanitize(id);
            is_one_safe_component(&name);
            if let Some(other) = names.insert(name.clone(), id.clone()) {
                panic!("{id:?} and {other:?} both map to {name:?}");
            }
        }
        assert_eq!(names.len(), ids.len());
    }

    #[test]
    fn names_are_stable_and_short() {
        let id = "k8s.io/some pod/with an extremely long name ".repeat(10);
        let name = sanitize(&id);
        assert_eq!(name, sanitize(&id), "stable");
        assert_eq!(name.len(), HASHED_PREFIX_LEN + 1 + HASH_HEX_LEN);
        assert!(
            name.starts_with("k8s.io_some_pod_with_an_extremel+"),
            "{name}"
        );
        // The hash is SHA-256 of the exact id.
        assert_eq!(sanitize("a/b"), "a_b+c14cddc033f64b9d");
    }

    #[test]
    fn ensure_dirs_creates_state_and_log() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = BeaconPaths::under(tmp.path());
        p.ensure_dirs().expect("ensure_dirs");
        assert!(p.state_dir().is_dir());
        assert!(p.run_dir().is_dir());
        assert!(p.log_dir().is_dir());
        assert!(!p.share_dir().exists());
    }
}
