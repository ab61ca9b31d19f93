//! Spawn, supervise and reap one `virtiofsd` per shared folder.
//!
//! This crate owns the virtiofsd processes of a share's owner (the shim, the
//! `beacon-vmm` CLI, a benchmark): it finds the binary, checks the share before
//! starting, spawns virtiofsd from one long-lived thread ([`launcher`], because
//! `PR_SET_PDEATHSIG` follows the spawning *thread*), drains its stderr into a
//! log file for its whole life ([`stderr_log`]), waits until its vhost-user
//! socket exists, reports its death to whoever watches ([`Virtiofsd::on_exit`]),
//! and guarantees the process, its socket file and the threads watching it are
//! gone after [`Virtiofsd::stop`] or drop (and the process when the owner dies).
//!
//! It knows nothing about VMs: the VMM connects to [`Virtiofsd::socket_path`].

pub mod launcher;
mod process;
pub mod stderr_log;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use process::{Exited, Virtiofsd};

/// Environment variable naming the virtiofsd binary.
pub const VIRTIOFSD_ENV: &str = "BEACON_VIRTIOFSD";
/// Where resources/install.sh and distributions put virtiofsd, in search order.
const CANDIDATES: &[&str] = &[
    "/usr/local/bin/virtiofsd",
    "/usr/libexec/virtiofsd",
    "/usr/lib/qemu/virtiofsd",
    "/usr/bin/virtiofsd",
];
/// Default size at which virtiofsd's log file is rotated.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 8 << 20;

/// virtiofsd's `--cache` policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CachePolicy {
    Never,
    #[default]
    Auto,
    Always,
}

impl CachePolicy {
    fn as_arg(self) -> &'static str {
        match self {
            Self::Never => "never",
            Self::Auto => "auto",
            Self::Always => "always",
        }
    }
}

impl std::str::FromStr for CachePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" => Ok(Self::Never),
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            other => Err(format!(
                "unknown virtiofsd cache policy {other:?}; use never, auto or always"
            )),
        }
    }
}

/// virtiofsd's `--sandbox` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SandboxMode {
    /// Mount namespace + pivot_root: the production default.
    #[default]
    Namespace,
    /// chroot(2) into the share.
    Chroot,
    /// No sandbox (tests without namespace privileges).
    None,
}

impl SandboxMode {
    fn as_arg(self) -> &'static str {
        match self {
            Self::Namespace => "namespace",
            Self::Chroot => "chroot",
            Self::None => "none",
        }
    }
}

impl std::str::FromStr for SandboxMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "namespace" => Ok(Self::Namespace),
            "chroot" => Ok(Self::Chroot),
            "none" => Ok(Self::None),
            other => Err(format!(
                "unknown virtiofsd sandbox {other:?}; use namespace, chroot or none"
            )),
        }
    }
}

/// One share.
#[derive(Debug, Clone)]
pub struct ShareConfig {
    pub shared_dir: PathBuf,
    pub socket_path: PathBuf,
    pub cache: CachePolicy,
    pub sandbox: SandboxMode,
    pub readonly: bool,
    /// How long to wait for the socket to appear.
    pub ready_timeout: Duration,
    /// Where virtiofsd's stderr goes (appended); `None`: the socket path with
    /// `.log` added.
    pub log_path: Option<PathBuf>,
    /// Size at which the log file is rotated to `<log>.1`.
    pub log_max_bytes: u64,
    /// More virtiofsd arguments (e.g. `--log-level debug`), after ours.
    pub extra_args: Vec<OsString>,
}

impl ShareConfig {
    pub fn new(shared_dir: impl Into<PathBuf>, socket_path: impl Into<PathBuf>) -> Self {
        Self {
            shared_dir: shared_dir.into(),
            socket_path: socket_path.into(),
            cache: CachePolicy::default(),
            sandbox: SandboxMode::default(),
            readonly: false,
            ready_timeout: Duration::from_secs(10),
            log_path: None,
            log_max_bytes: DEFAULT_LOG_MAX_BYTES,
            extra_args: Vec::new(),
        }
    }

    /// The log file virtiofsd's stderr goes to.
    pub fn log_file(&self) -> PathBuf {
        self.log_path.clone().unwrap_or_else(|| {
            let mut p = self.socket_path.clone().into_os_string();
            p.push(".log");
            PathBuf::from(p)
        })
    }

    /// The virtiofsd argument list for this share.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "--socket-path".into(),
            self.socket_path.clone().into(),
            "--shared-dir".into(),
            self.shared_dir.clone().into(),
            "--cache".into(),
            self.cache.as_arg().into(),
            "--sandbox".into(),
            self.sandbox.as_arg().into(),
        ];
        if self.readonly {
            a.push("--readonly".into());
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// Why a virtiofsd could not be started or stopped; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("virtiofsd not found (looked at ${VIRTIOFSD_ENV} and {CANDIDATES:?}); run resources/install.sh or set ${VIRTIOFSD_ENV}")]
    NotFound,
    #[error("${VIRTIOFSD_ENV} names {0:?}, which is not an executable file; fix or unset it")]
    BadOverride(PathBuf),
    #[error("shared folder {0:?} does not exist or is not a folder; create it or share another")]
    BadShare(PathBuf),
    #[error("socket folder {0:?} does not exist; create it first")]
    NoSocketDir(PathBuf),
    #[error("cannot remove the stale socket {path:?}: {source}; remove it by hand")]
    StaleSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open virtiofsd's log file {path:?}: {source}; pick a writable log path")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {binary:?}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("virtiofsd for {share:?} exited during start-up ({status}): {stderr}")]
    Died {
        share: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("virtiofsd's socket {socket:?} did not appear within {timeout:?}; virtiofsd was stopped (its log: {log:?})")]
    NotReady {
        socket: PathBuf,
        timeout: Duration,
        log: PathBuf,
    },
    #[error("virtiofsd (pid {pid}) did not exit after SIGKILL within {waited:?}")]
    Unkillable { pid: u32, waited: Duration },
}

/// Find the virtiofsd binary: `$BEACON_VIRTIOFSD`, then the usual install places.
pub fn find_binary() -> Result<PathBuf, LaunchError> {
    if let Some(p) = std::env::var_os(VIRTIOFSD_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(LaunchError::BadOverride(p))
        };
    }
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| is_executable(p))
        .ok_or(LaunchError::NotFound)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Connect to a vhost-user socket (tests use it to prove the socket is live; a
/// virtiofsd serves exactly one connection, so this consumes the share).
pub fn connect(socket: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    std::os::unix::net::UnixStream::connect(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_follow_the_config() {
        let mut s = ShareConfig::new("/srv/rootfs", "/run/b/fs.sock");
        s.readonly = true;
        s.cache = CachePolicy::Never;
        s.sandbox = SandboxMode::None;
        s.extra_args = vec!["--log-level".into(), "debug".into()];
        let args: Vec<String> = s
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--socket-path",
                "/run/b/fs.sock",
                "--shared-dir",
                "/srv/rootfs",
                "--cache",
                "never",
                "--sandbox",
                "none",
                "--readonly",
                "--log-level",
                "debug"
            ]
        );
        assert_eq!(s.log_file(), PathBuf::from("/run/b/fs.sock.log"));
    }

    #[test]
    fn policies_parse() {
        assert_eq!("always".parse(), Ok(CachePolicy::Always));
        assert_eq!("chroot".parse(), Ok(SandboxMode::Chroot));
        assert!("sometimes".parse::<CachePolicy>().is_err());
        assert!("jail".parse::<SandboxMode>().is_err());
    }
}
