//! Spawn, supervise and reap one `virtiofsd` per shared folder.
//!
//! This crate owns the virtiofsd process of one share: it finds the binary, checks
//! the share before starting, waits until the vhost-user socket accepts
//! connections, and guarantees the process is gone (and its socket removed) after
//! [`Virtiofsd::stop`] or drop, or when the calling process dies
//! (`PR_SET_PDEATHSIG`). It knows nothing about VMs: the VMM connects to
//! [`Virtiofsd::socket_path`].

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the virtiofsd binary.
pub const VIRTIOFSD_ENV: &str = "BEACON_VIRTIOFSD";
/// Where resources/install.sh and distributions put virtiofsd, in search order.
const CANDIDATES: &[&str] = &[
    "/usr/local/bin/virtiofsd",
    "/usr/libexec/virtiofsd",
    "/usr/lib/qemu/virtiofsd",
    "/usr/bin/virtiofsd",
];

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

/// One share.
#[derive(Debug, Clone)]
pub struct ShareConfig {
    pub shared_dir: PathBuf,
    pub socket_path: PathBuf,
    pub cache: CachePolicy,
    pub sandbox: SandboxMode,
    pub readonly: bool,
    /// How long to wait for the socket to accept connections.
    pub ready_timeout: Duration,
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
        }
    }

    /// The virtiofsd argument list for this share.
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec![
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
        a
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("virtiofsd not found (looked at ${VIRTIOFSD_ENV} and {CANDIDATES:?}); run resources/install.sh")]
    NotFound,
    #[error("shared folder {0:?} does not exist or is not a folder")]
    BadShare(PathBuf),
    #[error("socket folder {0:?} does not exist; create it first")]
    NoSocketDir(PathBuf),
    #[error("cannot remove the stale socket {path:?}: {source}")]
    StaleSocket {
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
    #[error("virtiofsd exited during start-up ({status}): {stderr}")]
    Died { status: String, stderr: String },
    #[error("virtiofsd's socket {socket:?} did not accept connections within {timeout:?}; virtiofsd was stopped")]
    NotReady { socket: PathBuf, timeout: Duration },
    #[error("waiting for virtiofsd: {0}")]
    Wait(#[source] std::io::Error),
}

/// Find the virtiofsd binary: `$BEACON_VIRTIOFSD`, then the usual install places.
pub fn find_binary() -> Result<PathBuf, LaunchError> {
    if let Some(p) = std::env::var_os(VIRTIOFSD_ENV) {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(LaunchError::NotFound)
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

/// A running virtiofsd.
#[derive(Debug)]
pub struct Virtiofsd {
    child: Option<Child>,
    socket_path: PathBuf,
}

impl Virtiofsd {
    /// Start virtiofsd for `share` with the binary from [`find_binary`].
    pub fn spawn(share: &ShareConfig) -> Result<Self, LaunchError> {
        Self::spawn_with(&find_binary()?, share)
    }

    /// Start `binary` for `share` and wait until its socket accepts connections.
    pub fn spawn_with(binary: &Path, share: &ShareConfig) -> Result<Self, LaunchError> {
        if !share.shared_dir.is_dir() {
            return Err(LaunchError::BadShare(share.shared_dir.clone()));
        }
        let socket_dir = share
            .socket_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !socket_dir.is_dir() {
            return Err(LaunchError::NoSocketDir(socket_dir.to_path_buf()));
        }
        match std::fs::remove_file(&share.socket_path) {
            Ok(()) => tracing::debug!(socket = ?share.socket_path, "removed a stale socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LaunchError::StaleSocket {
                    path: share.socket_path.clone(),
                    source,
                })
            }
        }
        let mut cmd = Command::new(binary);
        cmd.args(share.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: runs in the forked child before exec; prctl(2) is async-signal-safe
        // and the closure touches no parent memory.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
        let mut me = Self {
            child: Some(child),
            socket_path: share.socket_path.clone(),
        };
        me.wait_ready(share.ready_timeout)?;
        tracing::info!(share = ?share.shared_dir, socket = ?share.socket_path, pid = me.pid(), "virtiofsd ready");
        Ok(me)
    }

    /// Poll until the socket exists (virtiofsd creates it when listening), watching
    /// for an early exit.
    ///
    /// We only test for the socket file, never connect: virtiofsd serves exactly one
    /// vhost-user frontend and exits when that connection closes, so a probe
    /// connection would consume the share.
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), LaunchError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().map_err(LaunchError::Wait)? {
                    let mut stderr = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = e.read_to_string(&mut stderr);
                    }
                    self.child = None;
                    return Err(LaunchError::Died {
                        status: describe(status),
                        stderr: stderr.trim().to_string(),
                    });
                }
            }
            if is_socket(&self.socket_path) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill_and_reap();
                return Err(LaunchError::NotReady {
                    socket: self.socket_path.clone(),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Has virtiofsd exited (for example because its VM disconnected)?
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, LaunchError> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map_err(LaunchError::Wait),
            None => Ok(None),
        }
    }

    /// Ask virtiofsd to stop (SIGTERM), kill it after `grace`, reap it, remove the socket.
    pub fn stop(mut self, grace: Duration) -> Result<ExitStatus, LaunchError> {
        let Some(mut child) = self.child.take() else {
            return Err(LaunchError::Wait(std::io::Error::other("already reaped")));
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) on our own unreaped child: the pid cannot have been reused.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        let status = loop {
            if let Some(s) = child.try_wait().map_err(LaunchError::Wait)? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                break child.wait().map_err(LaunchError::Wait)?;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let _ = std::fs::remove_file(&self.socket_path);
        Ok(status)
    }

    fn kill_and_reap(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => status.to_string(),
    }
}

/// Connect to a vhost-user socket (the VMM side uses this; tests use it to prove
/// the socket is live).
pub fn connect(socket: &Path) -> std::io::Result<UnixStream> {
    UnixStream::connect(socket)
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
                "--readonly"
            ]
        );
    }

    #[test]
    fn bad_share_and_socket_dir_are_refused_before_spawning() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = ShareConfig::new(tmp.path().join("missing"), tmp.path().join("s.sock"));
        assert!(matches!(
            Virtiofsd::spawn_with(Path::new("/bin/true"), &s),
            Err(LaunchError::BadShare(_))
        ));
        let s = ShareConfig::new(tmp.path(), tmp.path().join("no/such/dir/s.sock"));
        assert!(matches!(
            Virtiofsd::spawn_with(Path::new("/bin/true"), &s),
            Err(LaunchError::NoSocketDir(_))
        ));
    }

    #[test]
    fn early_exit_reports_stderr() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = ShareConfig::new(tmp.path(), tmp.path().join("s.sock"));
        // `sh` rejects virtiofsd's flags and exits at once with a message.
        let err = Virtiofsd::spawn_with(Path::new("/bin/sh"), &s).expect_err("must fail");
        match err {
            LaunchError::Died { stderr, .. } => assert!(!stderr.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn silent_program_times_out_and_is_killed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let script = tmp.path().join("fake");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 60\n").expect("write");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        let mut s = ShareConfig::new(tmp.path(), tmp.path().join("s.sock"));
        s.ready_timeout = Duration::from_millis(200);
        let err = Virtiofsd::spawn_with(&script, &s).expect_err("must time out");
        assert!(matches!(err, LaunchError::NotReady { .. }), "{err}");
    }
}
