//! One sandbox: a microVM and everything around it on the host (its network,
//! its share folder and virtiofsd, its run folder), and the connection to
//! vminitd inside it. Containers live in the sandbox; this module builds and
//! tears down the sandbox only, never decides about containers.
//!
//! Building is a fixed sequence, each step recorded so that a failure undoes
//! exactly what was done, in reverse: the sandbox's host cgroup (joined by
//! this process, see [`crate::host_cgroup`]) → run folder (mode 0700) → with
//! vhost-vsock (config, or the QEMU backend), a CID lease and a copy of the
//! initrd carrying the VM's secret → network (netmgr's bridge, or a CRI pod's
//! own network namespace joined with a TAP) → share folder (a shared
//! mount) → virtiofsd → VM (the in-process KVM backend on threads of this
//! process, or QEMU) → vminitd answering on vsock → event stream.
//! Teardown is the same list backwards and keeps going when a step fails, so
//! nothing leaks because something else went wrong. virtiofsd dying on its own
//! ends the VM (the guest's files are gone), which the service sees as the
//! VM's end.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use beacon_common::guest_protocol::{GuestEvent, VsockSecret, GUEST_SECRET_FILE};
use beacon_netmgr::cni::pod::{self, PodAttachment};
use beacon_netmgr::{NetworkAttachment, NetworkManager};
use beacon_paths::BeaconPaths;
use beacon_virtiofsd_launch::{ShareConfig, Virtiofsd};
use beacon_vmm::{
    create_backend, BackendKind, ConsoleConfig, DeviceConfig, VmBackend, VmConfig, VmExit,
};
use containerd_shim_protos::shim_async::TaskClient;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::config::{NetworkMode, RuntimeConfig, VmSettings, VsockMode};
use crate::guest::{GuestError, GuestLink, ReadySignal};
use crate::host_cgroup::HostCgroup;
use crate::mounts::{self, MountError};
use crate::portfwd::PortForwarder;

/// Name of the one virtio-fs share (tag and guest folder name).
pub const SHARE_NAME: &str = "sb";
/// virtio-fs tag of the share.
pub const SHARE_TAG: &str = "beacon";
/// Guest CID used with the hybrid vsock backend (private to the VM).
pub const HYBRID_GUEST_CID: u32 = 3;
/// The kernel's vhost-vsock device.
const VHOST_VSOCK_DEV: &str = "/dev/vhost-vsock";
/// vhost-vsock CIDs the shim hands out: [CID_BASE, CID_BASE + CID_COUNT),
/// clear of the small CIDs hand-started VMs tend to use.
const CID_BASE: u32 = 10_000;
const CID_COUNT: u32 = 1 << 16;

/// One vhost-vsock guest CID, held (`flock` on `<run>/vsock-cids/<cid>`) for as
/// long as this value lives, so concurrent shims never pick the same one; a
/// killed shim's lock goes with its process.
struct CidLease {
    cid: u32,
    _lock: std::fs::File,
}

impl CidLease {
    /// The first free CID, starting from one derived from `sandbox_id`.
    fn acquire(dir: &Path, sandbox_id: &str) -> Result<Self, SandboxError> {
        use std::os::fd::AsRawFd;
        create_private_dir(dir)?;
        let digest = Sha256::digest(sandbox_id.as_bytes());
        let start = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]) % CID_COUNT;
        for i in 0..CID_COUNT {
            let cid = CID_BASE + (start + i) % CID_COUNT;
            let path = dir.join(cid.to_string());
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|source| SandboxError::Io {
                    what: format!("opening {}", path.display()),
                    source,
                })?;
            // SAFETY: flock(2) on a descriptor `file` owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Self { cid, _lock: file });
            }
        }
        Err(SandboxError::Unsupported(format!(
            "no free vhost-vsock CID under {}: {CID_COUNT} VMs hold one",
            dir.display()
        )))
    }
}

/// `base` with a cpio member carrying `secret` appended (the kernel unpacks
/// concatenated archives, compressed or not, in order), written to `out`
/// (mode 0600, in the sandbox's private run folder).
fn write_initrd_with_secret(
    base: &Path,
    out: &Path,
    secret: &VsockSecret,
) -> Result<(), SandboxError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |what: String| move |source| SandboxError::Io { what, source };
    let mut bytes = std::fs::read(base).map_err(io(format!("reading {}", base.display())))?;
    // A cpio header must start 4-byte aligned.
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    let member = beacon_initrd::cpio::Entry::file(GUEST_SECRET_FILE, 0o400, secret.to_file());
    beacon_initrd::cpio::write_archive(&mut bytes, &[member], 0)
        .map_err(io("writing the secret's cpio member".into()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(out)
        .map_err(io(format!("creating {}", out.display())))?;
    f.write_all(&bytes)
        .map_err(io(format!("writing {}", out.display())))
}

/// How long a VM gets to power off after vminitd was asked to shut down.
const POWEROFF_GRACE: Duration = Duration::from_secs(10);

/// Why a sandbox could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest kernel {0:?} is missing; run `make install` or set vm.kernel in the runtime config")]
    NoKernel(PathBuf),
    #[error("the guest initrd {0:?} is missing; run `make install` or set vm.initrd in the runtime config")]
    NoInitrd(PathBuf),
    #[error("network: {0}")]
    Network(#[from] beacon_netmgr::NetError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("virtiofsd: {0}")]
    Virtiofsd(#[from] beacon_virtiofsd_launch::LaunchError),
    #[error("the VM: {0}")]
    Vm(#[from] beacon_vmm::VmError),
    #[error("vminitd: {0}")]
    Guest(#[from] GuestError),
    #[error("{0}")]
    Unsupported(String),
}

/// The host folders of one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxDirs {
    /// `<run>/sandboxes/<key>`: sockets (mode 0700, short enough for sun_path).
    pub run: PathBuf,
    /// `<run>/share`: what virtiofsd exports.
    pub share: PathBuf,
    /// The hybrid vsock socket.
    pub vsock: PathBuf,
    /// virtiofsd's vhost-user socket.
    pub fs_socket: PathBuf,
    /// The VM's console log.
    pub vm_log: PathBuf,
}

/// Environment variable overriding the runtime folder for sockets and shares.
pub const RUN_DIR_ENV: &str = "BEACON_RUN_DIR";
/// Default runtime folder (a tmpfs: nothing survives a host reboot).
pub const DEFAULT_RUN_DIR: &str = "/run/beacon";

/// The runtime folder.
pub fn run_root() -> PathBuf {
    std::env::var_os(RUN_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
}

impl SandboxDirs {
    /// The folders of `sandbox_id` (nothing is created).
    pub fn of(paths: &BeaconPaths, run_root: &Path, sandbox_id: &str) -> Self {
        let digest = Sha256::digest(sandbox_id.as_bytes());
        let key: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let run = run_root.join("sandboxes").join(key);
        Self {
            share: run.join("share"),
            vsock: run.join("vsock.sock"),
            fs_socket: run.join("fs.sock"),
            vm_log: paths.vm_log(sandbox_id),
            run,
        }
    }
}

/// What the guest's eth0 gets (no gateway when the network has no default
/// route).
fn net_params(a: &NetworkAttachment) -> String {
    let mut p = format!(" beacon.ip={}/{}", a.ip, a.prefix);
    if !a.gateway.is_unspecified() {
        p.push_str(&format!(" beacon.gw={}", a.gateway));
    }
    if !a.dns.is_empty() {
        let dns: Vec<String> = a.dns.iter().map(Ipv4Addr::to_string).collect();
        p.push_str(&format!(" beacon.dns={}", dns.join(",")));
    }
    p
}

/// How long each step of [`Sandbox::build`] took, for the log line that says
/// the VM is up (`pod_bench` and `start_bench` read it back).
struct Phases {
    begun: Instant,
    last: Instant,
    marks: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn start() -> Self {
        let now = Instant::now();
        Phases {
            begun: now,
            last: now,
            marks: Vec::new(),
        }
    }

    /// The step `name` ended now.
    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.marks.push((name, now - self.last));
        self.last = now;
    }
}

/// `in 2.310 s (host cgroup 0 ms, network 45 ms, ...)`.
impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "in {:.3} s (", (self.last - self.begun).as_secs_f64())?;
        for (i, (name, took)) in self.marks.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{name} {} ms", took.as_millis())?;
        }
        f.write_str(")")
    }
}

/// What was built so far (undone in reverse).
#[derive(Default)]
struct Built {
    /// Left last, once the VM and virtiofsd are gone.
    cgroup: Option<HostCgroup>,
    run_dir: Option<PathBuf>,
    /// Holds the sandbox alive for netmgr's reconciler; released last.
    liveness: Option<beacon_netmgr::LivenessGuard>,
    network: Option<String>,
    /// A CRI pod's network joined in its own namespace.
    pod: Option<PodAttachment>,
    /// Serves CRI PortForward for a pod; stopped first.
    port_forward: Option<PortForwarder>,
    /// PortForward's listener being made (while the VM boots); awaited
    /// before the pod network is left, so nothing is added after.
    forward_setup: Option<tokio::task::JoinHandle<beacon_netmgr::Result<std::net::TcpListener>>>,
    share: Option<PathBuf>,
    virtiofsd: Option<Virtiofsd>,
    /// The vhost-vsock CID, held until the VM is gone.
    cid: Option<CidLease>,
    /// VM console logs to prune once everything else is undone.
    logs: Option<LogRetention>,
}

/// How many VM console logs (`<log>/<id>.vm.log`) stay after a sandbox ends.
struct LogRetention {
    dir: PathBuf,
    keep: usize,
    liveness: PathBuf,
}

impl LogRetention {
    /// Remove the oldest `*.vm.log` beyond the newest `keep`, sparing those
    /// of sandboxes still alive (their liveness lock held). Failures are
    /// logged: a log left behind must not fail a teardown.
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut logs: Vec<(std::time::SystemTime, String, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let id = name.strip_suffix(".vm.log")?.to_string();
                let modified = e.metadata().ok()?.modified().ok()?;
                Some((modified, id, e.path()))
            })
            .collect();
        logs.sort_by_key(|l| std::cmp::Reverse(l.0));
        let liveness = beacon_netmgr::SandboxLiveness::new(&self.liveness);
        for (_, id, path) in logs.into_iter().skip(self.keep) {
            if liveness.is_alive(&id).unwrap_or(false) {
                continue;
            }
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("removing the old VM log {}: {e}", path.display());
            }
        }
    }
}

/// A running sandbox.
pub struct Sandbox {
    pub id: String,
    pub dirs: SandboxDirs,
    pub link: GuestLink,
    pub task: TaskClient,
    pub network: Option<NetworkAttachment>,
    vm: Arc<dyn VmBackend>,
    vm_exit: watch::Receiver<Option<VmExit>>,
    built: Built,
    net: Option<Arc<NetworkManager>>,
    /// vCPUs and memory the VM booted with (what a resize never goes below).
    boot: (u8, u64),
}

/// The shim's network manager, or why it did not start (what a sandbox that
/// asks for a network is then told).
pub type NetManager = Result<Arc<NetworkManager>, Arc<str>>;

/// Everything [`Sandbox::create`] needs.
pub struct SandboxRequest<'a> {
    pub id: &'a str,
    pub paths: &'a BeaconPaths,
    pub run_root: &'a Path,
    pub config: &'a RuntimeConfig,
    pub vm: VmSettings,
    pub net: NetManager,
    /// A network namespace made and configured by someone else (a CRI pod's,
    /// after its CNI chain ran): the VM joins that network instead of taking
    /// one from netmgr.
    pub pod_netns: Option<&'a Path>,
    /// The spec's `linux.cgroupsPath`: the host cgroup this process joins
    /// before the VM boots, so the VM is accounted there.
    pub cgroups_path: Option<&'a str>,
}

impl Sandbox {
    /// Build the sandbox and wait for vminitd. On error everything built so far
    /// is undone before returning.
    pub async fn create(
        req: SandboxRequest<'_>,
    ) -> Result<(Self, mpsc::Receiver<GuestEvent>), SandboxError> {
        let mut built = Built::default();
        match Self::build(&req, &mut built).await {
            Ok(parts) => Ok(parts),
            Err(e) => {
                tracing::warn!(
                    sandbox = req.id,
                    "building the sandbox failed ({e}); undoing"
                );
                undo(built, req.net.as_deref().ok(), req.id).await;
                Err(e)
            }
        }
    }

    async fn build(
        req: &SandboxRequest<'_>,
        built: &mut Built,
    ) -> Result<(Self, mpsc::Receiver<GuestEvent>), SandboxError> {
        let mut phases = Phases::start();
        let dirs = SandboxDirs::of(req.paths, req.run_root, req.id);
        built.logs = dirs.vm_log.parent().map(|dir| LogRetention {
            dir: dir.to_path_buf(),
            keep: req.config.keep_vm_logs,
            liveness: req.paths.liveness_dir(),
        });
        let kernel = req.vm.kernel.clone().unwrap_or_else(|| req.paths.kernel());
        let initrd = req.vm.initrd.clone().unwrap_or_else(|| req.paths.initrd());
        if !kernel.is_file() {
            return Err(SandboxError::NoKernel(kernel));
        }
        if !initrd.is_file() {
            return Err(SandboxError::NoInitrd(initrd));
        }
        // QEMU has no hybrid vsock: it always takes vhost-vsock.
        let vhost = req.config.vsock == VsockMode::Vhost || req.vm.backend == BackendKind::Qemu;
        if vhost && !Path::new(VHOST_VSOCK_DEV).exists() {
            return Err(SandboxError::Unsupported(format!(
                "vhost-vsock (vsock = \"vhost\" or the QEMU backend) needs {VHOST_VSOCK_DEV}: \
                 load the vhost_vsock module, or use vsock = \"hybrid\" with the KVM backend"
            )));
        }

        // The host cgroup first: the VM's memory and virtiofsd are charged
        // where this process is when they start.
        if let Some(path) = req.cgroups_path {
            match HostCgroup::join(path) {
                Ok(cg) => {
                    tracing::debug!(
                        sandbox = req.id,
                        "joined the host cgroup {}",
                        cg.dir().display()
                    );
                    built.cgroup = Some(cg);
                }
                Err(e) => tracing::warn!(
                    sandbox = req.id,
                    "the VM is not accounted to the sandbox's cgroup: {e}"
                ),
            }
        }

        phases.mark("host cgroup");
        // Run folder: only this user may enter (the vsock socket is inside).
        create_private_dir(&dirs.run)?;
        built.run_dir = Some(dirs.run.clone());

        // vhost-vsock: a CID no other shim holds, and the secret vminitd will
        // ask of every connection, put in a copy of the initrd in the run
        // folder (never on the command line: containers read /proc/cmdline).
        let (link, initrd) = if vhost {
            let cid = CidLease::acquire(&req.paths.vsock_cid_dir(), req.id)?;
            let secret = VsockSecret::generate().map_err(|source| SandboxError::Io {
                what: "generating the vsock secret".into(),
                source,
            })?;
            let with_secret = dirs.run.join("initrd");
            write_initrd_with_secret(&initrd, &with_secret, &secret)?;
            let link = GuestLink::Vhost {
                cid: cid.cid,
                secret: Arc::new(secret),
            };
            built.cid = Some(cid);
            (link, with_secret)
        } else {
            let link = GuestLink::Hybrid {
                uds: dirs.vsock.clone(),
            };
            (link, initrd)
        };
        // vminitd's ready signal (hybrid only: with vhost-vsock the host end
        // would be a host-wide vsock port): listening before the VM starts.
        let ready = match &link {
            GuestLink::Hybrid { uds } => Some(ReadySignal::listen(uds)?),
            _ => None,
        };
        let guest_cid = match &link {
            GuestLink::Vhost { cid, .. } => *cid,
            _ => HYBRID_GUEST_CID,
        };
        if let Some(parent) = dirs.vm_log.parent() {
            std::fs::create_dir_all(parent).map_err(|source| SandboxError::Io {
                what: format!("creating the log folder {}", parent.display()),
                source,
            })?;
        }

        phases.mark("run folder");
        // The share, then virtiofsd, which starts while the network is made
        // (it is waited for below, before the VM connects to it).
        mounts::prepare_share(&dirs.share)?;
        built.share = Some(dirs.share.clone());
        let mut share = ShareConfig::new(&dirs.share, &dirs.fs_socket);
        if let Some(cache) = &req.config.virtiofs_cache {
            share.cache = match cache.as_str() {
                "never" => beacon_virtiofsd_launch::CachePolicy::Never,
                "always" => beacon_virtiofsd_launch::CachePolicy::Always,
                _ => beacon_virtiofsd_launch::CachePolicy::Auto,
            };
        }
        built.virtiofsd = Some(Virtiofsd::start(&share)?);

        // Network: the sandbox is alive (for the reconciler) while this
        // process holds its lock, then gets its lease and TAP.
        let network = match (req.config.network, req.pod_netns, &req.net) {
            (NetworkMode::None, _, _) => None,
            (NetworkMode::Bridge, Some(ns), _) => {
                let ns = ns.to_path_buf();
                let id = req.id.to_string();
                let pod = tokio::task::spawn_blocking(move || pod::attach(&ns, &id))
                    .await
                    .map_err(|e| SandboxError::Io {
                        what: "joining the pod network".into(),
                        source: std::io::Error::other(e.to_string()),
                    })??;
                let network = pod.network.clone();
                let ns = pod.netns.clone();
                built.pod = Some(pod);
                // Made while the VM boots; served once vminitd answers.
                built.forward_setup = Some(tokio::task::spawn_blocking(move || {
                    pod::forward_localhost(&ns)
                }));
                Some(network)
            }
            (NetworkMode::Bridge, None, Ok(net)) => {
                let liveness = net.liveness().clone();
                let id = req.id.to_string();
                let guard = tokio::task::spawn_blocking(move || liveness.acquire(&id))
                    .await
                    .map_err(|e| SandboxError::Io {
                        what: "taking the sandbox's liveness lock".into(),
                        source: std::io::Error::other(e.to_string()),
                    })??;
                built.liveness = Some(guard);
                built.network = Some(req.id.to_string());
                Some(net.setup(req.id).await?)
            }
            (NetworkMode::Bridge, None, Err(why)) => {
                return Err(SandboxError::Unsupported(format!(
                    "bridge networking needs the network manager, which did not start: {why}; fix that, or set network = \"none\" in the runtime config"
                )))
            }
        };

        phases.mark("network");
        if let Some(fsd) = built.virtiofsd.as_mut() {
            tokio::task::block_in_place(|| fsd.wait_ready(share.ready_timeout))?;
        }
        phases.mark("virtiofsd");

        // The VM.
        let mut cmdline =
            format!("console=ttyS0 reboot=k panic=-1 quiet beacon.share={SHARE_TAG}:{SHARE_NAME}");
        if let Some(a) = &network {
            cmdline.push_str(&net_params(a));
        }
        if req.config.guest_debug {
            cmdline.push_str(" beacon.log=debug");
        }
        if !req.vm.kernel_params.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&req.vm.kernel_params);
        }
        let mut config = VmConfig::new(kernel);
        config.initrd = Some(initrd);
        config.cmdline = cmdline;
        config.vcpus.boot = req.vm.cpus;
        config.vcpus.max = req.vm.max_cpus;
        config.memory.size_mib = req.vm.memory_mib;
        config.memory.hotplug_mib = req.vm.hotplug_memory_mib;
        config.console = ConsoleConfig::File(dirs.vm_log.clone());
        config.seccomp = req.config.seccomp;
        config.require_confinement = req.config.require_confinement;
        config.devices.push(DeviceConfig::Vsock {
            guest_cid,
            uds_path: (!vhost).then(|| dirs.vsock.clone()),
        });
        config.devices.push(DeviceConfig::Fs {
            tag: SHARE_TAG.into(),
            socket: dirs.fs_socket.clone(),
            queue_size: 1024,
        });
        // A TAP inside another namespace (a pod's, or netmgr's CNI mode) is
        // opened from there and handed over; the VMM keeps its own copy.
        let mut tap_file = None;
        if let Some(a) = &network {
            if a.netns.is_some() {
                let opened = a.clone();
                tap_file = Some(
                    tokio::task::spawn_blocking(move || opened.open_tap())
                        .await
                        .map_err(|e| SandboxError::Io {
                            what: "opening the TAP".into(),
                            source: std::io::Error::other(e.to_string()),
                        })??,
                );
            }
            config.devices.push(DeviceConfig::Net {
                tap: a.tap.clone(),
                mac: a.mac,
                vhost: false,
                tap_fd: tap_file.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
            });
        }
        let vm: Arc<dyn VmBackend> = Arc::from(tokio::task::block_in_place(|| {
            create_backend(req.vm.backend, config)
        })?);
        drop(tap_file);
        let (exit_tx, vm_exit) = watch::channel(None);
        vm.start()?;
        phases.mark("VM built");
        // virtiofsd dying on its own leaves every container without its files
        // (the guest would wait on the share forever): end the VM, so each
        // process exits non-zero and containerd hears of it.
        if let Some(fsd) = &built.virtiofsd {
            let vm = Arc::downgrade(&vm);
            let id = req.id.to_string();
            fsd.on_exit(move |exited| {
                if exited.requested {
                    return;
                }
                tracing::error!(
                    sandbox = id,
                    "virtiofsd died ({}): the containers lost their files; ending the VM. \
                     Its log: {}",
                    exited.status_text(),
                    exited.stderr_tail.trim()
                );
                if let Some(vm) = vm.upgrade() {
                    if let Err(e) = vm.kill() {
                        tracing::warn!(sandbox = id, "ending the VM: {e}");
                    }
                }
            });
        }
        let waiter = vm.clone();
        std::thread::Builder::new()
            .name("beacon-vm-wait".into())
            .spawn(move || {
                let exit = waiter
                    .wait()
                    .unwrap_or_else(|e| VmExit::Crashed(format!("waiting for the VM: {e}")));
                let _ = exit_tx.send(Some(exit));
            })
            .map_err(|source| SandboxError::Io {
                what: "starting the VM waiter thread".into(),
                source,
            })?;

        // vminitd.
        let ended = vm_exit.clone();
        let connected = link
            .connect_task(
                Duration::from_secs(req.vm.boot_timeout_secs),
                move || ended.borrow().is_some(),
                ready,
            )
            .await;
        let task = match connected {
            Ok(t) => t,
            Err(e) => {
                stop_vm(&vm, &vm_exit).await;
                return Err(e.into());
            }
        };
        phases.mark("vminitd");
        let events = match link.subscribe_events().await {
            Ok(rx) => rx,
            Err(e) => {
                stop_vm(&vm, &vm_exit).await;
                return Err(e.into());
            }
        };
        if let Some(made) = built.forward_setup.take() {
            let served = match made.await {
                Ok(Ok(listener)) => PortForwarder::start(listener, link.clone(), req.id)
                    .map_err(|e| format!("serving its listener: {e}")),
                Ok(Err(e)) => Err(format!(
                    "{e} (it needs nftables with the nft_redir and nf_nat modules)"
                )),
                Err(e) => Err(format!("setting it up: {e}")),
            };
            match served {
                Ok(fw) => built.port_forward = Some(fw),
                Err(e) => tracing::warn!(
                    sandbox = req.id,
                    "CRI PortForward will not reach this pod: {e}"
                ),
            }
        }
        phases.mark("events");
        tracing::info!(sandbox = req.id, "sandbox VM up {phases}");
        Ok((
            Self {
                id: req.id.to_string(),
                dirs,
                link,
                task,
                network,
                vm,
                vm_exit,
                built: std::mem::take(built),
                net: req.net.clone().ok(),
                boot: (req.vm.cpus, req.vm.memory_mib),
            },
            events,
        ))
    }

    /// How the VM ended, once it has.
    pub fn vm_exit(&self) -> watch::Receiver<Option<VmExit>> {
        self.vm_exit.clone()
    }

    /// The VM backend (pause, resume, stats).
    pub fn vm(&self) -> &Arc<dyn VmBackend> {
        &self.vm
    }

    /// The VM's size now and its limits.
    pub fn shape(&self) -> crate::resize::VmShape {
        crate::resize::VmShape {
            boot_cpus: self.boot.0,
            cpus: self.vm.vcpu_count(),
            max_cpus: self.vm.max_vcpus(),
            boot_mib: self.boot.1,
            memory_mib: self.vm.memory_mib(),
            max_mib: self.vm.max_memory_mib(),
        }
    }

    /// Stop the VM (asking vminitd first when `graceful`) and undo everything.
    pub async fn destroy(self, graceful: bool) {
        if graceful && self.vm_exit.borrow().is_none() {
            let req = containerd_shim_protos::api::ShutdownRequest {
                id: self.id.clone(),
                now: true,
                ..Default::default()
            };
            let asked = tokio::time::timeout(
                Duration::from_secs(5),
                self.task.shutdown(crate::guest::call_context(), &req),
            )
            .await;
            if !matches!(asked, Ok(Ok(_))) {
                tracing::debug!(
                    sandbox = self.id,
                    "vminitd did not take the shutdown; stopping the VM"
                );
            }
        }
        stop_vm(&self.vm, &self.vm_exit).await;
        // The VM's devices go before what they used: its vhost-user link
        // keeps virtiofsd's worker (a child of the process `undo` stops, in
        // the sandbox's host cgroup) alive until it closes.
        let Sandbox {
            id, vm, built, net, ..
        } = self;
        if Arc::strong_count(&vm) > 1 {
            tracing::debug!(
                sandbox = id,
                "the VM is still referenced; its devices go later"
            );
        }
        drop(vm);
        undo(built, net.as_deref(), &id).await;
    }
}

/// Wait a moment for the VM to end by itself, then end it; returns when it has.
async fn stop_vm(vm: &Arc<dyn VmBackend>, exit: &watch::Receiver<Option<VmExit>>) {
    let mut exit = exit.clone();
    let ended = tokio::time::timeout(POWEROFF_GRACE, exit.wait_for(|e| e.is_some()))
        .await
        .is_ok();
    if !ended {
        if let Err(e) = vm.kill() {
            tracing::warn!("ending the VM: {e}");
        }
        let _ = exit.wait_for(|e| e.is_some()).await;
    }
}

fn create_private_dir(dir: &Path) -> Result<(), SandboxError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|source| SandboxError::Io {
            what: format!("creating {}", parent.display()),
            source,
        })?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| SandboxError::Io {
                    what: format!("making {} private", dir.display()),
                    source,
                },
            )
        }
        Err(source) => Err(SandboxError::Io {
            what: format!("creating {}", dir.display()),
            source,
        }),
    }
}

/// Undo what was built, in reverse; every step runs even if one fails.
async fn undo(built: Built, net: Option<&NetworkManager>, id: &str) {
    drop(built.port_forward);
    if let Some(setup) = built.forward_setup {
        let _ = setup.await;
    }
    if let Some(fsd) = built.virtiofsd {
        let stopped = tokio::task::block_in_place(|| fsd.stop(Duration::from_secs(2)));
        if let Err(e) = stopped {
            tracing::warn!(sandbox = id, "stopping virtiofsd: {e}");
        }
    }
    if let Some(share) = built.share {
        mounts::unmount_all(std::slice::from_ref(&share));
    }
    if let Some(pod) = built.pod {
        let detached = tokio::task::spawn_blocking(move || pod::detach(&pod)).await;
        match detached {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                sandbox = id,
                "leaving the pod network: {e}; its namespace's removal takes the rest"
            ),
            Err(e) => tracing::warn!(sandbox = id, "leaving the pod network: {e}"),
        }
    }
    if let (Some(sid), Some(net)) = (built.network, net) {
        if let Err(e) = net.teardown(&sid).await {
            tracing::warn!(
                sandbox = id,
                "network teardown: {e}; the reconciler will retry"
            );
        }
    }
    if let Some(run) = built.run_dir {
        for m in mounts::remove_tree_within_mount(&run) {
            tracing::warn!(
                sandbox = id,
                "{} is still mounted; it and the folders above it stay",
                m.display()
            );
        }
    }
    if let Some(logs) = built.logs {
        logs.prune();
    }
    if let Some(cg) = built.cgroup {
        tokio::task::block_in_place(|| cg.leave());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_read_as_the_benchmarks_parse_them() {
        let begun = Instant::now();
        let mut p = Phases {
            begun,
            last: begun,
            marks: Vec::new(),
        };
        p.last = begun + Duration::from_millis(45);
        p.marks.push(("network", Duration::from_millis(45)));
        p.last = begun + Duration::from_millis(2310);
        p.marks.push(("VM built", Duration::from_millis(2265)));
        assert_eq!(
            p.to_string(),
            "in 2.310 s (network 45 ms, VM built 2265 ms)"
        );
    }
    use std::time::{Duration, SystemTime};

    #[test]
    fn only_the_newest_vm_logs_stay_and_live_sandboxes_keep_theirs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let logs = tmp.path().join("log");
        std::fs::create_dir(&logs).expect("log dir");
        let t0 = SystemTime::now() - Duration::from_secs(3600);
        for (i, id) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            let f = std::fs::File::create(logs.join(format!("{id}.vm.log"))).expect("log");
            f.set_modified(t0 + Duration::from_secs(60 * i as u64))
                .expect("mtime");
        }
        std::fs::write(logs.join("other.log"), "not a VM log").expect("other");
        // "a", the oldest, belongs to a sandbox that still runs.
        let liveness = tmp.path().join("live");
        let _alive = beacon_netmgr::SandboxLiveness::new(&liveness)
            .acquire("a")
            .expect("lock");
        LogRetention {
            dir: logs.clone(),
            keep: 2,
            liveness,
        }
        .prune();
        let mut left: Vec<String> = std::fs::read_dir(&logs)
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["a.vm.log", "d.vm.log", "e.vm.log", "other.log"]);
    }

    #[test]
    fn the_secret_rides_in_an_appended_cpio_member() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = tmp.path().join("base");
        // An odd length: the member must start 4-byte aligned all the same.
        std::fs::write(&base, b"xyz").expect("base");
        let out = tmp.path().join("initrd");
        let secret = VsockSecret::generate().expect("secret");
        write_initrd_with_secret(&base, &out, &secret).expect("write");
        let bytes = std::fs::read(&out).expect("read");
        assert_eq!(&bytes[..4], b"xyz\0");
        let entries = beacon_initrd::cpio::read_archive(&bytes[4..]).expect("cpio");
        let member = entries
            .iter()
            .find(|e| e.path == GUEST_SECRET_FILE)
            .expect("secret member");
        assert_eq!(member.mode & 0o777, 0o400);
        assert_eq!(
            VsockSecret::parse_file(&member.data).expect("parse"),
            secret
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
