//! How big a sandbox's VM is and how it is run: built-in defaults, then the
//! runtime's TOML config (the `ConfigPath` of containerd's runtime options, or
//! `BEACON_RUNTIME_CONFIG`), then the OCI annotations `io.beaconbox.vm.*`, then
//! the container's own CPU and memory limits (the VM grows to hold them).
//!
//! Every value a user can set is checked here, with an error naming the key.

use std::path::{Path, PathBuf};

use beacon_vmm::seccomp::SeccompMode;
use beacon_vmm::BackendKind;
use serde::Deserialize;
use serde_json::Value;

/// Environment variable naming a runtime config file when containerd passes none.
pub const CONFIG_ENV: &str = "BEACON_RUNTIME_CONFIG";
/// Annotation prefix for per-sandbox VM settings.
pub const ANNOTATION_PREFIX: &str = "io.beaconbox.vm.";
/// Guest memory the VM needs beyond a container's limit (kernel, vminitd, crun).
pub const GUEST_OVERHEAD_MIB: u64 = 128;
/// How large a VM may be made from annotations or limits.
pub const MAX_VCPUS: u8 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the runtime config {path:?}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("runtime config {path:?}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{key}: {reason}")]
    Bad { key: String, reason: String },
}

fn bad(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Bad {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// How the shim reaches vminitd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VsockMode {
    /// The VMM's unix socket (mode 0600, in a folder only the shim's user enters).
    #[default]
    Hybrid,
    /// Kernel vhost-vsock with a CID per VM.
    Vhost,
}

/// The guest's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// netmgr's bridge, TAP and address pool.
    #[default]
    Bridge,
    /// No network device (loopback only).
    None,
}

/// The `[vm]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmSettings {
    pub backend: BackendKind,
    pub cpus: u8,
    pub max_cpus: u8,
    pub memory_mib: u64,
    pub hotplug_memory_mib: u64,
    /// Defaults to the installed beacon kernel and initrd.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Appended to the kernel command line.
    pub kernel_params: String,
    /// How long the guest may take to answer on vsock.
    pub boot_timeout_secs: u64,
}

/// The shape of a VM nobody sized: the system we replace's (1 vCPU of 2,
/// 512 MiB with a 2 GiB hotplug room), so containerd's Update can grow it.
/// Room costs no memory until used; on the QEMU backend it means QEMU's
/// hotplug machine (q35) instead of microvm. `max_cpus = cpus` and
/// `hotplug_memory_mib = 0` in the runtime config give a VM that cannot grow.
pub const DEFAULT_SHAPE: (u8, u8, u64, u64) = (1, 2, 512, 2048);

impl Default for VmSettings {
    fn default() -> Self {
        let (cpus, max_cpus, memory_mib, hotplug_memory_mib) = DEFAULT_SHAPE;
        Self {
            backend: BackendKind::Kvm,
            cpus,
            max_cpus,
            memory_mib,
            hotplug_memory_mib,
            kernel: None,
            initrd: None,
            kernel_params: String::new(),
            boot_timeout_secs: 120,
        }
    }
}

/// The runtime config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    pub vm: VmSettings,
    pub vsock: VsockMode,
    pub network: NetworkMode,
    /// virtiofsd's `--cache` (auto, always, never).
    pub virtiofs_cache: Option<String>,
    /// Debug logging in the guest (`beacon.log=debug`).
    pub guest_debug: bool,
    /// VM console logs (`$BEACON_LOG_DIR/<id>.vm.log`) kept after their
    /// sandboxes end, newest first; older ones are removed when a sandbox ends.
    pub keep_vm_logs: usize,
    /// How the VMM's threads in the shim are confined (`kill`, `trap`, `log`,
    /// `off`; see `beacon_vmm::seccomp`). `kill` unless set.
    pub seccomp: SeccompMode,
    /// Refuse to start a sandbox unless its VMM threads get every layer of
    /// their confinement (`beacon_vmm::seccomp::require_full_confinement`):
    /// `seccomp` kill or trap, a kernel with seccomp filters and Landlock,
    /// the kvm backend. Off unless set.
    pub require_confinement: bool,
}

/// Default of [`RuntimeConfig::keep_vm_logs`].
pub const DEFAULT_KEEP_VM_LOGS: usize = 32;

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            vm: VmSettings::default(),
            vsock: VsockMode::default(),
            network: NetworkMode::default(),
            virtiofs_cache: None,
            guest_debug: false,
            keep_vm_logs: DEFAULT_KEEP_VM_LOGS,
            seccomp: SeccompMode::default(),
            require_confinement: false,
        }
    }
}

impl RuntimeConfig {
    /// Read `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        cfg.check()?;
        Ok(cfg)
    }

    /// The config at `path`, else `BEACON_RUNTIME_CONFIG`, else the defaults.
    pub fn resolve(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            Some(p) => Self::load(p),
            None => match std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
                Some(p) => Self::load(Path::new(&p)),
                None => Ok(Self::default()),
            },
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        let vm = &self.vm;
        if vm.cpus == 0 || vm.cpus > MAX_VCPUS {
            return Err(bad("vm.cpus", format!("must be 1 to {MAX_VCPUS}")));
        }
        if vm.max_cpus < vm.cpus || vm.max_cpus > MAX_VCPUS {
            return Err(bad(
                "vm.max_cpus",
                format!("must be vm.cpus to {MAX_VCPUS}"),
            ));
        }
        if vm.memory_mib < 64 {
            return Err(bad("vm.memory_mib", "must be at least 64"));
        }
        if vm.boot_timeout_secs == 0 {
            return Err(bad("vm.boot_timeout_secs", "must be above 0"));
        }
        if self.require_confinement {
            beacon_vmm::seccomp::check_mode_confines(self.seccomp)
                .map_err(|e| bad("require_confinement", e.to_string()))?;
        }
        Ok(())
    }

    /// The VM settings for one sandbox: annotations (`io.beaconbox.vm.*`) over
    /// this config, then grown to hold the container's limits from `spec`.
    pub fn vm_for(&self, spec: &Value) -> Result<VmSettings, ConfigError> {
        let mut vm = self.vm.clone();
        let mut explicit_memory = false;
        let annotations = spec.get("annotations").and_then(Value::as_object);
        for (key, value) in annotations.into_iter().flatten() {
            let Some(name) = key.strip_prefix(ANNOTATION_PREFIX) else {
                continue;
            };
            let text = value
                .as_str()
                .ok_or_else(|| bad(key, "annotation values are strings"))?;
            let number = || {
                text.parse::<u64>()
                    .map_err(|_| bad(key, format!("{text:?} is not a number")))
            };
            let cpus = |n: u64| {
                u8::try_from(n)
                    .ok()
                    .filter(|n| (1..=MAX_VCPUS).contains(n))
                    .ok_or_else(|| bad(key, format!("must be 1 to {MAX_VCPUS}")))
            };
            match name {
                "cpus" => vm.cpus = cpus(number()?)?,
                "max_cpus" => vm.max_cpus = cpus(number()?)?,
                "memory_mib" => {
                    vm.memory_mib = number()?;
                    explicit_memory = true;
                }
                "hotplug_memory_mib" => vm.hotplug_memory_mib = number()?,
                "backend" => {
                    vm.backend = match text {
                        "kvm" => BackendKind::Kvm,
                        "qemu" => BackendKind::Qemu,
                        _ => return Err(bad(key, "must be kvm or qemu")),
                    }
                }
                _ => {
                    return Err(bad(
                        key,
                        "unknown setting; known: cpus, max_cpus, memory_mib, hotplug_memory_mib, backend",
                    ))
                }
            }
        }
        // The container's own limits, and a CRI pod's (the sum of its
        // containers' limits, which kubelet >= 1.23 passes as sandbox
        // annotations): the VM must hold them. A pod whose memory is known
        // gets a VM of that size (plus the guest's overhead) rather than the
        // default, so it fits the pod's cgroup with the RuntimeClass overhead
        // declared; an explicit memory_mib annotation still sets a floor.
        let pod = annotations.map(pod_resources);
        if let Some(mib) = pod.as_ref().and_then(|p| ResourceNeeds::of(p).memory_mib) {
            if !explicit_memory {
                vm.memory_mib = mib;
            }
        }
        for resources in [spec.pointer("/linux/resources"), pod.as_ref()]
            .into_iter()
            .flatten()
        {
            let needs = ResourceNeeds::of(resources);
            if let Some(mib) = needs.memory_mib {
                vm.memory_mib = vm.memory_mib.max(mib);
            }
            if let Some(cpus) = needs.cpus {
                let want = cpus.min(u64::from(MAX_VCPUS)) as u8;
                vm.cpus = vm.cpus.max(want);
            }
        }
        vm.max_cpus = vm.max_cpus.max(vm.cpus);
        if vm.memory_mib < 64 {
            return Err(bad("memory_mib", "must be at least 64"));
        }
        Ok(vm)
    }
}

/// CRI annotations with a pod's resources (kubelet >= 1.23 through
/// containerd's CRI plugin): memory limit in bytes, CFS quota and period in µs.
pub const SANDBOX_MEMORY_ANNOTATION: &str = "io.kubernetes.cri.sandbox-memory";
pub const SANDBOX_CPU_QUOTA_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// The pod's resources from the CRI sandbox annotations, as OCI
/// `LinuxResources` JSON (what is absent, malformed or zero is left out).
fn pod_resources(annotations: &serde_json::Map<String, Value>) -> Value {
    let number = |key: &str| {
        annotations
            .get(key)
            .and_then(Value::as_str)
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|n| *n > 0)
    };
    let mut r = serde_json::json!({});
    if let Some(limit) = number(SANDBOX_MEMORY_ANNOTATION) {
        r["memory"] = serde_json::json!({ "limit": limit });
    }
    if let Some(quota) = number(SANDBOX_CPU_QUOTA_ANNOTATION) {
        r["cpu"] = serde_json::json!({ "quota": quota });
        if let Some(period) = number(SANDBOX_CPU_PERIOD_ANNOTATION) {
            r["cpu"]["period"] = serde_json::json!(period);
        }
    }
    r
}

/// What a container's OCI `LinuxResources` need of its VM: vCPUs for its
/// CPU quota (`ceil(quota / period)`), memory for its limit plus
/// [`GUEST_OVERHEAD_MIB`]. None where the resources set no bound. Used to
/// size the VM at create time and when containerd updates the limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceNeeds {
    pub cpus: Option<u64>,
    pub memory_mib: Option<u64>,
}

impl ResourceNeeds {
    /// The CFS period the kernel uses when none is given (100 ms).
    const DEFAULT_PERIOD_US: u64 = 100_000;

    pub fn of(resources: &Value) -> Self {
        let memory_mib = resources
            .pointer("/memory/limit")
            .and_then(Value::as_i64)
            .filter(|l| *l > 0)
            .map(|limit| {
                (limit as u64)
                    .div_ceil(1 << 20)
                    .saturating_add(GUEST_OVERHEAD_MIB)
            });
        let period = resources
            .pointer("/cpu/period")
            .and_then(Value::as_u64)
            .filter(|p| *p > 0)
            .unwrap_or(Self::DEFAULT_PERIOD_US);
        let cpus = resources
            .pointer("/cpu/quota")
            .and_then(Value::as_i64)
            .filter(|q| *q > 0)
            .map(|quota| (quota as u64).div_ceil(period));
        Self { cpus, memory_mib }
    }
}

/// The `ConfigPath` inside containerd's `runtimeoptions.v1.Options` (field 2 of
/// the message; the CRI plugin and `ctr --runtime-config-path` send it).
pub fn runtime_options_config_path(type_url: &str, value: &[u8]) -> Option<PathBuf> {
    if !type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut input = protobuf::CodedInputStream::from_bytes(value);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        if wire == 2 {
            let bytes = input.read_bytes().ok()?;
            if field == 2 {
                let path = String::from_utf8(bytes).ok()?;
                return (!path.is_empty()).then(|| PathBuf::from(path));
            }
        } else if input
            .skip_field(protobuf::rt::WireType::new(wire)?)
            .is_err()
        {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_unsized_vm_can_grow_by_default() {
        let vm = RuntimeConfig::default().vm_for(&json!({})).expect("vm");
        assert_eq!(
            (vm.cpus, vm.max_cpus, vm.memory_mib, vm.hotplug_memory_mib),
            (1, 2, 512, 2048)
        );
    }

    #[test]
    fn a_pods_resources_from_its_cri_annotations_size_the_vm() {
        let cfg = RuntimeConfig::default();
        let vm = cfg
            .vm_for(&json!({"annotations": {
                SANDBOX_MEMORY_ANNOTATION: "1073741824",
                SANDBOX_CPU_QUOTA_ANNOTATION: "250000",
                SANDBOX_CPU_PERIOD_ANNOTATION: "100000",
            }}))
            .expect("vm");
        assert_eq!(vm.memory_mib, 1024 + GUEST_OVERHEAD_MIB);
        assert_eq!(vm.cpus, 3);
        // A small pod gets a small VM (not the 512 MiB default), unless an
        // annotation asks for more.
        let small = json!({"annotations": {SANDBOX_MEMORY_ANNOTATION: "268435456"}});
        let vm = cfg.vm_for(&small).expect("vm");
        assert_eq!(vm.memory_mib, 256 + GUEST_OVERHEAD_MIB);
        let mut floor = small.clone();
        floor["annotations"]["io.beaconbox.vm.memory_mib"] = json!("1024");
        assert_eq!(cfg.vm_for(&floor).expect("vm").memory_mib, 1024);
        // Zero, malformed or absent: the defaults stand.
        let vm = cfg
            .vm_for(&json!({"annotations": {
                SANDBOX_MEMORY_ANNOTATION: "0",
                SANDBOX_CPU_QUOTA_ANNOTATION: "lots",
            }}))
            .expect("vm");
        let default = cfg.vm_for(&json!({})).expect("vm");
        assert_eq!((vm.cpus, vm.memory_mib), (default.cpus, default.memory_mib));
    }

    #[test]
    fn defaults_then_file_then_annotations_then_limits() {
        let cfg: RuntimeConfig = toml::from_str(
            "vsock = \"hybrid\"\n[vm]\ncpus = 2\nmax_cpus = 4\nmemory_mib = 256\nbackend = \"qemu\"\n",
        )
        .expect("toml");
        cfg.check().expect("valid");
        let vm = cfg.vm_for(&json!({})).expect("vm");
        assert_eq!((vm.cpus, vm.max_cpus, vm.memory_mib), (2, 4, 256));
        assert_eq!(vm.backend, BackendKind::Qemu);
        let spec = json!({
            "annotations": {
                "io.beaconbox.vm.cpus": "3",
                "io.beaconbox.vm.memory_mib": "300",
                "io.beaconbox.vm.backend": "kvm",
                "other": "x"
            },
            "linux": {"resources": {"memory": {"limit": 1073741824i64}, "cpu": {"quota": 450000, "period": 100000}}}
        });
        let vm = cfg.vm_for(&spec).expect("vm");
        assert_eq!(vm.backend, BackendKind::Kvm);
        assert_eq!(
            vm.memory_mib,
            1024 + GUEST_OVERHEAD_MIB,
            "grown to hold the limit"
        );
        assert_eq!(vm.cpus, 5, "4.5 CPUs of quota need 5 vCPUs");
        assert_eq!(vm.max_cpus, 5);
    }

    #[test]
    fn bad_values_name_their_key() {
        let cfg = RuntimeConfig::default();
        for (k, v) in [
            ("io.beaconbox.vm.cpus", "0"),
            ("io.beaconbox.vm.cpus", "many"),
            ("io.beaconbox.vm.backend", "xen"),
            ("io.beaconbox.vm.colour", "blue"),
        ] {
            let err = cfg
                .vm_for(&json!({"annotations": {k: v}}))
                .expect_err("refused");
            assert!(err.to_string().starts_with(k), "{err}");
        }
        let err = toml::from_str::<RuntimeConfig>("[vm]\ncpu = 1\n").expect_err("unknown key");
        assert!(err.to_string().contains("cpu"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("r.toml");
        std::fs::write(&p, "[vm]\ncpus = 0\n").expect("write");
        assert!(RuntimeConfig::load(&p).is_err());
        assert!(RuntimeConfig::load(&dir.path().join("missing")).is_err());
        // Demanding confinement with a mode that does not stop a call.
        for mode in ["off", "log"] {
            std::fs::write(
                &p,
                format!("seccomp = \"{mode}\"\nrequire_confinement = true\n"),
            )
            .expect("write");
            let err = RuntimeConfig::load(&p).expect_err("refused");
            assert!(
                err.to_string().contains("require_confinement"),
                "{mode}: {err}"
            );
        }
        std::fs::write(&p, "seccomp = \"kill\"\nrequire_confinement = true\n").expect("write");
        assert!(RuntimeConfig::load(&p).expect("loads").require_confinement);
    }

    #[test]
    fn config_path_from_runtime_options() {
        // field 1 (type_url) "x", field 2 (config_path) "/etc/b.toml".
        let mut msg = vec![0x0a, 1, b'x', 0x12, 11];
        msg.extend_from_slice(b"/etc/b.toml");
        assert_eq!(
            runtime_options_config_path("runtimeoptions.v1.Options", &msg),
            Some(PathBuf::from("/etc/b.toml"))
        );
        assert_eq!(runtime_options_config_path("other.Type", &msg), None);
        assert_eq!(
            runtime_options_config_path("runtimeoptions.v1.Options", &[0xff, 0xff]),
            None
        );
        assert_eq!(
            runtime_options_config_path("runtimeoptions.v1.Options", &[]),
            None
        );
    }
}
