//! A private containerd for tests: its own root, state, sockets and config in a
//! folder the test owns, with beaconbox's shim on its PATH as the runtime
//! `io.containerd.beaconbox.v1`. Killed (with its shims) when dropped.
//!
//! Started with [`Containerd::start_cri`], its CRI plugin is configured for
//! tests (see [`CriSpec`]): the locally built pause image as sandbox image, a
//! CNI bridge network of the test's own (conflist and IPAM state in the test's
//! folder), `runc` and the test's runtime handlers; images for it go to the
//! `k8s.io` namespace ([`Containerd::import_image`]). Such a containerd stops
//! and removes every pod left when dropped, and deletes its bridge.

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

/// Where Debian's containernetworking-plugins puts the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The containerd namespace the CRI plugin works in (and sees images of).
pub const CRI_NAMESPACE: &str = "k8s.io";

/// A running private containerd.
pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// What it was started with (a restart starts it the same way).
    spec: ContainerdSpec,
    /// The CRI plugin's settings, when started with [`Containerd::start_cri`].
    cri: Option<CriSpec>,
    child: std::sync::Mutex<Option<Child>>,
}

/// What to start containerd with.
#[derive(Debug, Clone, Default)]
pub struct ContainerdSpec {
    /// Folder holding `containerd-shim-beaconbox-v1`.
    pub shim_dir: PathBuf,
    /// Environment for containerd and so for the shims it starts.
    pub env: Vec<(String, String)>,
}

/// How [`Containerd::start_cri`] configures the CRI plugin.
#[derive(Debug, Clone, Default)]
pub struct CriSpec {
    /// The Linux bridge the CNI bridge plugin creates and attaches pods to
    /// (at most 15 characters); pick one no other test uses (one left by an
    /// earlier run is taken over). Deleted when the containerd is dropped.
    pub bridge: String,
    /// The pods' IPv4 subnet, e.g. `10.77.0.0/24` (host-local IPAM; the bridge
    /// gets its first address and is the pods' gateway, without NAT).
    pub subnet: String,
    /// Runtime handlers besides `runc` (which is always there, and the default).
    pub runtimes: Vec<CriRuntime>,
}

/// A CRI runtime handler (what a Kubernetes RuntimeClass names).
#[derive(Debug, Clone, Default)]
pub struct CriRuntime {
    /// The handler name `RunPodSandbox` takes, e.g. `beaconbox`.
    pub handler: String,
    /// containerd's runtime type, e.g. [`RUNTIME`] (`io.containerd.beaconbox.v1`).
    pub runtime_type: String,
    /// `options.ConfigPath`: containerd hands it to the shim as
    /// `runtimeoptions.v1.Options { config_path }` with each task it creates.
    pub config_path: Option<PathBuf>,
}

impl Containerd {
    /// Start containerd in `dir`, its CRI plugin disabled, and wait until it
    /// answers.
    pub fn start(dir: &Path, spec: &ContainerdSpec) -> Result<Self, String> {
        Self::launch(dir, spec, None)
    }

    /// Start containerd in `dir` with its CRI plugin configured by `cri`, and
    /// wait until it answers. Fails naming the Debian package when the CNI
    /// plugins are missing. Import the pause image
    /// ([`crate::images::pause_archive`]) before running pods.
    pub fn start_cri(dir: &Path, spec: &ContainerdSpec, cri: &CriSpec) -> Result<Self, String> {
        Self::launch(dir, spec, Some(cri.clone()))
    }

    fn launch(dir: &Path, spec: &ContainerdSpec, cri: Option<CriSpec>) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let me = Self {
            dir: dir.to_path_buf(),
            socket: dir.join("containerd.sock"),
            spec: spec.clone(),
            cri,
            child: std::sync::Mutex::new(None),
        };
        if let Some(cri) = &me.cri {
            check_cni_plugins()?;
            // One left by an earlier run that died is fine: the bridge plugin
            // takes it over. Any other kind of link is not ours.
            if link_exists(&cri.bridge) && !is_bridge(&cri.bridge) {
                return Err(format!(
                    "CriSpec.bridge {:?} names an existing link that is no bridge",
                    cri.bridge
                ));
            }
            me.write_cni_config(cri)?;
        }
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
        let disabled = if self.cri.is_some() {
            "[]".to_string()
        } else {
            r#"["io.containerd.grpc.v1.cri"]"#.to_string()
        };
        let mut config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = {disabled}\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  level = \"debug\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
        );
        if let Some(cri) = &self.cri {
            config.push_str(&self.cri_config(cri));
        }
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).map_err(|e| format!("writing the config: {e}"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(again)
            .truncate(!again)
            .open(dir.join("containerd.log"))
            .map_err(|e| format!("containerd log: {e}"))?;
        let host_path =
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        // No shim folder (a runc-only test): nothing in front, so no empty
        // entry (the current folder) either.
        let path = if spec.shim_dir.as_os_str().is_empty() {
            host_path
        } else {
            format!("{}:{host_path}", spec.shim_dir.display())
        };
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

    /// Import an image archive (OCI or Docker, e.g. from
    /// [`crate::images::busybox_archive`]) into the CRI plugin's namespace
    /// `k8s.io` (the only one it sees), unpacked for its snapshotter.
    pub fn import_image(&self, archive: &Path) -> Result<(), String> {
        let archive_arg = archive.display().to_string();
        let out = self
            .ctr(&[
                "-n",
                CRI_NAMESPACE,
                "images",
                "import",
                "--all-platforms",
                &archive_arg,
            ])
            .map_err(|e| format!("running ctr (Debian package containerd): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ctr -n {CRI_NAMESPACE} images import {archive_arg} failed: {}\n\
                 containerd's log:\n{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                self.log_tail(20)
            ));
        }
        Ok(())
    }

    /// The folder holding the CNI network config (the CRI plugin's `conf_dir`).
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni/net.d")
    }

    /// Write the CNI network config: one conflist, a bridge with host-local
    /// IPAM whose allocations live in this containerd's folder.
    fn write_cni_config(&self, cri: &CriSpec) -> Result<(), String> {
        if cri.bridge.is_empty() || cri.bridge.len() > 15 || cri.subnet.is_empty() {
            return Err(format!(
                "CriSpec needs a bridge name (1 to 15 characters) and a subnet: {cri:?}"
            ));
        }
        let conf_dir = self.cni_conf_dir();
        let _ = std::fs::remove_dir_all(&conf_dir);
        std::fs::create_dir_all(&conf_dir).map_err(|e| format!("{}: {e}", conf_dir.display()))?;
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("beacon-{}", cri.bridge),
            "plugins": [{
                "type": "bridge",
                "bridge": cri.bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": cri.subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": self.dir.join("cni/ipam").display().to_string(),
                },
            }],
        });
        let path = conf_dir.join("10-beacon.conflist");
        let text = serde_json::to_string_pretty(&conflist).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))
    }

    /// The config's CRI plugin section (containerd 1.6's
    /// `pkg/cri/config/config.go` keys). Set for minimal hosts: no AppArmor or
    /// SELinux labels, and no oom_score_adj below containerd's own (the pause
    /// container asks for -998, which needs CAP_SYS_RESOURCE: runc fails with
    /// "can't get final child's PID from pipe" in sandboxes without it).
    fn cri_config(&self, cri: &CriSpec) -> String {
        const CRI: &str = "plugins.\"io.containerd.grpc.v1.cri\"";
        let path = |p: PathBuf| toml_string(&p.display().to_string());
        let mut out = [
            format!("[{CRI}]"),
            format!(
                "  sandbox_image = {}",
                toml_string(crate::images::PAUSE_IMAGE)
            ),
            "  disable_apparmor = true".into(),
            "  enable_selinux = false".into(),
            "  restrict_oom_score_adj = true".into(),
            "  stream_server_address = \"127.0.0.1\"".into(),
            "  stream_server_port = \"0\"".into(),
            format!("[{CRI}.cni]"),
            format!("  bin_dir = {}", toml_string(CNI_BIN_DIR)),
            format!("  conf_dir = {}", path(self.cni_conf_dir())),
            "  max_conf_num = 1".into(),
            format!("[{CRI}.containerd]"),
            "  default_runtime_name = \"runc\"".into(),
            format!("[{CRI}.containerd.runtimes.runc]"),
            "  runtime_type = \"io.containerd.runc.v2\"".into(),
            // runc's state in this containerd's folder, not /run/containerd/runc.
            format!("[{CRI}.containerd.runtimes.runc.options]"),
            format!("  Root = {}", path(self.dir.join("runc"))),
            String::new(),
        ]
        .join("\n");
        for r in &cri.runtimes {
            let table = format!("{CRI}.containerd.runtimes.{}", toml_string(&r.handler));
            out.push_str(&format!(
                "[{table}]\n  runtime_type = {}\n",
                toml_string(&r.runtime_type)
            ));
            if let Some(config) = &r.config_path {
                out.push_str(&format!(
                    "[{table}.options]\n  ConfigPath = {}\n",
                    toml_string(&config.display().to_string())
                ));
            }
        }
        out
    }

    /// Stop and remove every pod sandbox the CRI plugin still has (so their
    /// shims, network namespaces and mounts go), each call with a short
    /// timeout; errors are only printed (this runs when dropped).
    fn remove_leftover_pods(&self) {
        let cri = match crate::cri::Cri::connect(&self.socket) {
            Ok(cri) => cri.with_timeout(Duration::from_secs(30)),
            Err(e) => return eprintln!("containerd: no CRI client to remove its pods: {e}"),
        };
        let pods = match cri.list_pod_sandbox() {
            Ok(pods) => pods,
            Err(e) => return eprintln!("containerd: listing its pods: {e}"),
        };
        for pod in pods {
            eprintln!("containerd: removing pod {} left behind", pod.id);
            if let Err(e) = cri
                .stop_pod_sandbox(&pod.id)
                .and_then(|()| cri.remove_pod_sandbox(&pod.id))
            {
                eprintln!("containerd: removing pod {}: {e}", pod.id);
            }
        }
    }

    /// containerd's whole log so far (the shims' log lines included).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// The last `lines` lines of containerd's log (shim logs included).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let running = self.lock_child().is_some();
        if running && self.cri.is_some() {
            // Never a panic out of a drop (it would abort a failing test).
            let removed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.remove_leftover_pods()
            }));
            if removed.is_err() {
                eprintln!("containerd: removing the pods left behind panicked");
            }
        }
        if let Some(mut c) = self.lock_child().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(cri) = &self.cri {
            if is_bridge(&cri.bridge) {
                if let Err(e) = delete_link(&cri.bridge) {
                    eprintln!("containerd: {e}");
                }
            }
        }
    }
}

/// `s` as a TOML basic string (JSON's escapes are TOML's).
fn toml_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// An error naming the Debian package unless the CNI plugins the CRI config
/// uses (bridge, host-local, and loopback, which containerd adds itself) are
/// in [`CNI_BIN_DIR`].
fn check_cni_plugins() -> Result<(), String> {
    let missing: Vec<&str> = ["bridge", "host-local", "loopback"]
        .into_iter()
        .filter(|p| !Path::new(CNI_BIN_DIR).join(p).is_file())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "CNI plugins {missing:?} are missing from {CNI_BIN_DIR}: install the Debian \
             package containernetworking-plugins (resources/install.sh)"
        ))
    }
}

/// Whether network interface `name` exists.
fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Whether network interface `name` exists and is a bridge.
fn is_bridge(name: &str) -> bool {
    Path::new("/sys/class/net")
        .join(name)
        .join("bridge")
        .is_dir()
}

/// `ip link del <name>`.
fn delete_link(name: &str) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["link", "del", name])
        .output()
        .map_err(|e| format!("running ip (Debian package iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip link del {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
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
