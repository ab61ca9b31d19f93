//! A private containerd for tests: its own root, state, sockets and config in a
//! folder the test owns, with beaconbox's shim on its PATH as the runtime
//! `io.containerd.beaconbox.v1`. Killed (with its shims) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The runtime name `ctr run --runtime` takes.
pub const RUNTIME: &str = "io.containerd.beaconbox.v1";
/// The shim's file name (containerd finds it on its PATH from [`RUNTIME`]).
pub const SHIM_BINARY: &str = "containerd-shim-beaconbox-v1";

/// For a cargo example: the folder above the example's own
/// (`target/<profile>/`), where cargo put the shim built with it; an error
/// saying to build it when it is not there.
pub fn example_shim_dir() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    let dir = me
        .parent()
        .and_then(Path::parent)
        .ok_or("this program has no target folder")?;
    if !dir.join(SHIM_BINARY).exists() {
        return Err(format!(
            "{} is missing: build it first (cargo build -p beacon-shim)",
            dir.join(SHIM_BINARY).display()
        ));
    }
    Ok(dir.to_path_buf())
}

/// A running private containerd.
pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// What it was started with (a restart starts it the same way).
    spec: ContainerdSpec,
    child: std::sync::Mutex<Option<Child>>,
}

/// What to start containerd with.
#[derive(Debug, Clone, Default)]
pub struct ContainerdSpec {
    /// Folder holding `containerd-shim-beaconbox-v1`.
    pub shim_dir: PathBuf,
    /// Environment for containerd and so for the shims it starts.
    pub env: Vec<(String, String)>,
    /// Keep the CRI plugin enabled.
    pub cri: bool,
}

impl Containerd {
    /// Start containerd in `dir` and wait until it answers.
    pub fn start(dir: &Path, spec: &ContainerdSpec) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let me = Self {
            dir: dir.to_path_buf(),
            socket: dir.join("containerd.sock"),
            spec: spec.clone(),
            child: std::sync::Mutex::new(None),
        };
        me.spawn(false)?;
        Ok(me)
    }

    /// Kill containerd (SIGKILL, as a crash would: the shims it started keep
    /// running), start it again on the same root and state, and wait until it
    /// answers. Its log goes on in the same file.
    pub fn restart(&self) -> Result<(), String> {
        if let Some(mut c) = self.lock_child().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn(true)
    }

    fn lock_child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Start the process (appending to its log when `again`) and wait until
    /// it answers.
    fn spawn(&self, again: bool) -> Result<(), String> {
        let (dir, spec, socket) = (&self.dir, &self.spec, &self.socket);
        let disabled = if spec.cri {
            "[]".to_string()
        } else {
            r#"["io.containerd.grpc.v1.cri"]"#.to_string()
        };
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = {disabled}\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  level = \"debug\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
        );
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).map_err(|e| format!("writing the config: {e}"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(again)
            .truncate(!again)
            .open(dir.join("containerd.log"))
            .map_err(|e| format!("containerd log: {e}"))?;
        let path = format!(
            "{}:{}",
            spec.shim_dir.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(&config_path)
            .env("PATH", path)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting containerd (Debian package containerd): {e}"))?;
        *self.lock_child() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self
                .ctr(&["version"])
                .map(|o| o.status.success())
                .unwrap_or(false)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "containerd did not come up; its log:\n{}",
                    self.log_tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Run `ctr` against this containerd.
    pub fn ctr(&self, args: &[&str]) -> std::io::Result<Output> {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
    }

    /// `ctr` with the given stdin bytes.
    pub fn ctr_stdin(&self, args: &[&str], input: &[u8]) -> std::io::Result<Output> {
        use std::io::Write;
        let mut child = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input)?;
        }
        child.wait_with_output()
    }

    /// The last `lines` lines of containerd's log (shim logs included).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.lock_child().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Lay out the beacon kernel and an initrd with vminitd as `/init` (plus
/// busybox and crun) under `dir/share/kernel`, the way `make install` lays them
/// out under `$BEACON_SHARE_DIR`, and return `dir/share` (for `BEACON_SHARE_DIR`).
pub fn install_guest(dir: &Path) -> Result<PathBuf, String> {
    let share = dir.join("share");
    let kernel_dir = share.join("kernel");
    std::fs::create_dir_all(&kernel_dir).map_err(|e| format!("{}: {e}", kernel_dir.display()))?;
    let kernel = crate::assets::beacon_kernel_dir()?.join("vmlinux");
    std::fs::copy(&kernel, kernel_dir.join(beacon_paths::KERNEL_FILE))
        .map_err(|e| format!("copying {}: {e}", kernel.display()))?;
    let spec = beacon_initrd::InitrdSpec {
        init: workspace_bin("vminitd", "vminitd")?,
        busybox: Some(PathBuf::from("/bin/busybox")),
        crun: Some(PathBuf::from("/usr/bin/crun")),
        ..Default::default()
    };
    let initrd = kernel_dir.join(beacon_paths::INITRD_FILE);
    let mut out =
        std::fs::File::create(&initrd).map_err(|e| format!("{}: {e}", initrd.display()))?;
    beacon_initrd::build(&spec, &mut out).map_err(|e| format!("building the initrd: {e}"))?;
    Ok(share)
}

/// The environment a private containerd hands its beaconbox shims: the guest
/// files from `share` (see [`install_guest`]) and every state, run, log and
/// socket folder under `dir`, so nothing touches the host's real ones.
pub fn shim_env(dir: &Path, share: &Path) -> Vec<(String, String)> {
    let at = |sub: &str| dir.join(sub).display().to_string();
    vec![
        ("BEACON_SHARE_DIR".into(), share.display().to_string()),
        ("BEACON_SHIM_SOCKET_DIR".into(), at("s")),
        ("BEACON_RUN_DIR".into(), at("run")),
        ("BEACON_STATE_DIR".into(), at("state")),
        ("BEACON_LOG_DIR".into(), at("log")),
    ]
}

/// Path of binary `bin` of workspace package `package`, built by cargo now if
/// needed (same profile as the calling test).
pub fn workspace_bin(package: &str, bin: &str) -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let release = me.components().any(|c| c.as_os_str() == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-p",
        package,
        "--bin",
        bin,
        "--message-format=json-render-diagnostics",
    ])
    .current_dir(crate::assets::repo_root())
    .stderr(Stdio::inherit());
    if release {
        cmd.arg("--release");
    }
    let out = cmd.output().map_err(|e| format!("running cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo build -p {package} --bin {bin} failed"));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| format!("cargo reported no executable for {bin}"))
}
