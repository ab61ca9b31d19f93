//! The typed description of one VM, as a user or the shim states it.
//!
//! This module owns validation of everything that can be checked before a backend
//! touches KVM or spawns QEMU: files exist and look like what they claim, counts and
//! sizes are in range, device settings do not collide. It never opens `/dev/kvm`.

use std::collections::HashSet;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::seccomp::SeccompMode;

/// Smallest guest RAM we accept: below this a Linux kernel with an initrd does not
/// reach init, so we say so up front instead of letting the guest die obscurely.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Largest guest RAM accepted by configuration (1 TiB); the host may still refuse less.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Memory is hot-added and removed in blocks of this many MiB (Linux's x86
/// memory block size), each one ACPI memory device.
pub const HOTPLUG_BLOCK_MIB: u64 = 128;
/// Upper bound on vCPUs that the boot tables we write can describe (x2APIC ids fit
/// easily; KVM's own `KVM_CAP_MAX_VCPUS` is checked again by the backend).
pub const MAX_VCPUS: u8 = 254;
/// x86 `COMMAND_LINE_SIZE` in Linux, including the terminating NUL.
pub const MAX_CMDLINE_LEN: usize = 2048;

/// Everything needed to build one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub vcpus: VcpuConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default)]
    pub console: ConsoleConfig,
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    /// Also name the virtio-mmio devices on the kernel command line
    /// (`virtio_mmio.device=`), for kernels built without ACPI. The KVM backend
    /// always describes them in the DSDT.
    #[serde(default)]
    pub virtio_mmio_cmdline: bool,
    /// How the VMM's own threads (vCPUs, device event loop, control socket)
    /// are confined: seccomp allowlists, Landlock, no capabilities (see
    /// [`crate::seccomp`]). The KVM backend only; QEMU is its own process.
    #[serde(default)]
    pub seccomp: SeccompMode,
    /// Refuse to run unless every thread gets all of its confinement: a
    /// mode that stops forbidden calls, seccomp filters and Landlock in the
    /// kernel ([`crate::seccomp::require_full_confinement`]). KVM backend only.
    #[serde(default)]
    pub require_confinement: bool,
}

/// Boot and hotpluggable vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuConfig {
    /// vCPUs online at boot.
    pub boot: u8,
    /// Upper bound for ACPI CPU hotplug; equals `boot` when hotplug is not wanted.
    pub max: u8,
}

impl Default for VcpuConfig {
    fn default() -> Self {
        Self { boot: 1, max: 1 }
    }
}

/// Guest RAM at boot and the room reserved for memory hotplug.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    pub size_mib: u64,
    #[serde(default)]
    pub hotplug_mib: u64,
    /// Back the boot RAM with 2 MiB transparent huge pages where the host
    /// allows (see `kvm::memory`): far fewer nested page faults while the
    /// guest first touches its memory, so a faster boot, for up to 2 MiB of
    /// host memory per region the guest touches at all. Off by default until
    /// a resize flake seen with it on (a shrink through containerd's Update
    /// left the VM grown, once in two CI-like runs) is understood.
    #[serde(default)]
    pub huge_pages: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size_mib: 512,
            hotplug_mib: 0,
            huge_pages: false,
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleConfig {
    #[default]
    Stdout,
    File(PathBuf),
    /// Discard console output (benchmarks).
    Off,
}

impl FromStr for ConsoleConfig {
    type Err = std::convert::Infallible;

    /// `stdout`, `off`, or anything else as a file path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdout" => Self::Stdout,
            "off" | "none" => Self::Off,
            path => Self::File(PathBuf::from(path)),
        })
    }
}

/// A guest device beyond the legacy ones every VM has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceConfig {
    /// virtio-net backed by an existing TAP device: opened by name, or, with
    /// `tap_fd`, an already-open TAP descriptor the caller keeps owning (the VMM
    /// duplicates it; `tap` may then be empty). `vhost` moves the frames in the
    /// kernel's vhost-net instead of the VMM's event loop.
    Net {
        tap: String,
        mac: MacAddr,
        #[serde(default)]
        vhost: bool,
        #[serde(default)]
        tap_fd: Option<i32>,
    },
    /// virtio-vsock with the given guest CID; `uds_path` is the hybrid unix-socket
    /// backend's listening socket (None: kernel vhost-vsock).
    Vsock {
        guest_cid: u32,
        uds_path: Option<PathBuf>,
    },
    /// vhost-user-fs to a running virtiofsd.
    Fs {
        tag: String,
        socket: PathBuf,
        #[serde(default = "default_fs_queue_size")]
        queue_size: u16,
    },
    /// virtio-blk backed by a host file.
    Block { path: PathBuf, read_only: bool },
    /// virtio-rng fed from the host's getrandom.
    Rng,
}

impl DeviceConfig {
    /// A virtio-blk device from the CLI's `path=P[,ro]` (the path cannot hold a
    /// comma).
    pub fn parse_disk(arg: &str) -> Result<Self, ConfigError> {
        let bad = |why| ConfigError::BadDiskArg(arg.to_string(), why);
        let mut path = None;
        let mut read_only = false;
        for item in arg.split(',') {
            match item.split_once('=') {
                Some(("path", p)) if !p.is_empty() && path.is_none() => {
                    path = Some(PathBuf::from(p));
                }
                Some(("path", _)) => return Err(bad("give one non-empty path=")),
                None if item == "ro" => read_only = true,
                _ => return Err(bad("expected path=FILE[,ro]")),
            }
        }
        let path = path.ok_or_else(|| bad("path=FILE is missing"))?;
        Ok(Self::Block { path, read_only })
    }
}

fn default_fs_queue_size() -> u16 {
    1024
}

pub use beacon_common::MacAddr;

/// What a kernel image file turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF `vmlinux` (PVH note or 64-bit entry).
    Elf,
    /// A bzImage (Linux x86 boot protocol, "HdrS" at offset 0x202).
    BzImage,
}

impl KernelFormat {
    /// Sniff the format from the file's first bytes.
    pub fn detect(path: &Path) -> Result<Self, ConfigError> {
        let unreadable = |e: std::io::Error| ConfigError::Unreadable {
            what: "kernel",
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut file = File::open(path).map_err(unreadable)?;
        let mut head = [0u8; 4];
        let n = read_up_to(&mut file, &mut head).map_err(unreadable)?;
        if n == 4 && head == *b"\x7fELF" {
            return Ok(Self::Elf);
        }
        let mut magic = [0u8; 4];
        file.seek(SeekFrom::Start(0x202)).map_err(unreadable)?;
        let n = read_up_to(&mut file, &mut magic).map_err(unreadable)?;
        if n == 4 && magic == *b"HdrS" {
            return Ok(Self::BzImage);
        }
        Err(ConfigError::NotAKernel(path.to_path_buf()))
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Why a [`VmConfig`] cannot be used; each message says what to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{what} {path:?} cannot be read: {reason}; check the path and its permissions")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{0:?} is neither an ELF vmlinux nor a bzImage; pass an uncompressed vmlinux or an arch/x86/boot/bzImage")]
    NotAKernel(PathBuf),
    #[error("boot vCPUs must be at least 1 (got {0})")]
    NoVcpus(u8),
    #[error("boot vCPUs ({boot}) exceed the maximum ({max}); raise --max-cpus or lower --cpus")]
    BootAboveMax { boot: u8, max: u8 },
    #[error("at most {MAX_VCPUS} vCPUs are supported (asked for {0})")]
    TooManyVcpus(u16),
    #[error(
        "guest memory of {0} MiB is too small to boot Linux; give at least {MIN_MEMORY_MIB} MiB"
    )]
    MemoryTooSmall(u64),
    #[error("a memory hotplug room of {0} MiB is not a multiple of the {HOTPLUG_BLOCK_MIB} MiB block size; round it to one")]
    HotplugRoomNotBlocks(u64),
    #[error("guest memory of {0} MiB (with hotplug room) exceeds the {MAX_MEMORY_MIB} MiB limit")]
    MemoryTooLarge(u64),
    #[error("initrd {path:?} is {size} bytes, more than half of guest memory ({memory_mib} MiB); give the VM more memory")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        memory_mib: u64,
    },
    #[error("kernel command line is {0} bytes; the x86 limit is 2047 bytes")]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error(transparent)]
    BadMac(#[from] beacon_common::MacParseError),
    #[error("MAC {0} is a multicast address; the first octet must be even")]
    MulticastMac(MacAddr),
    #[error("vsock guest CID {0} is reserved; use 3 or above")]
    ReservedCid(u32),
    #[error("only one vsock device per VM is supported")]
    DuplicateVsock,
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes")]
    BadFsTag(String),
    #[error("virtio-fs tag {0:?} is used twice")]
    DuplicateFsTag(String),
    #[error("virtio-fs queue size {0} must be a power of two between 2 and 32768")]
    BadQueueSize(u16),
    #[error("TAP name {0:?} must be 1 to 15 bytes without '/' or whitespace")]
    BadTapName(String),
    /// A disk image that cannot back a virtio-blk device (the message names it
    /// and says what to do).
    #[error("{0}")]
    Disk(String),
    #[error("--disk {0:?}: {1}")]
    BadDiskArg(String, &'static str),
    #[error("TAP {0:?} is named by two net devices; give each its own TAP")]
    DuplicateTap(String),
    #[error(
        "tap_fd {0} is not an open file descriptor of this process; pass an fd the VMM inherits"
    )]
    BadTapFd(i32),
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            vcpus: VcpuConfig::default(),
            memory: MemoryConfig::default(),
            console: ConsoleConfig::default(),
            devices: Vec::new(),
            virtio_mmio_cmdline: false,
            seccomp: SeccompMode::default(),
            require_confinement: false,
        }
    }

    /// Check everything that can be checked without a hypervisor; returns the
    /// kernel's format so the caller does not sniff the file twice.
    pub fn validate(&self) -> Result<KernelFormat, ConfigError> {
        self.validate_vcpus()?;
        self.validate_memory()?;
        if self.cmdline.len() >= MAX_CMDLINE_LEN {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        let format = KernelFormat::detect(&self.kernel)?;
        if let Some(initrd) = &self.initrd {
            let size = std::fs::metadata(initrd)
                .and_then(|m| {
                    // Opening proves readability, not just existence.
                    File::open(initrd).map(|_| m.len())
                })
                .map_err(|e| ConfigError::Unreadable {
                    what: "initrd",
                    path: initrd.clone(),
                    reason: e.to_string(),
                })?;
            if size > self.memory.size_mib * (1 << 20) / 2 {
                return Err(ConfigError::InitrdTooLarge {
                    path: initrd.clone(),
                    size,
                    memory_mib: self.memory.size_mib,
                });
            }
        }
        self.validate_devices()?;
        Ok(format)
    }

    fn validate_vcpus(&self) -> Result<(), ConfigError> {
        let VcpuConfig { boot, max } = self.vcpus;
        if boot == 0 {
            return Err(ConfigError::NoVcpus(boot));
        }
        if max > MAX_VCPUS {
            return Err(ConfigError::TooManyVcpus(max.into()));
        }
        if boot > max {
            return Err(ConfigError::BootAboveMax { boot, max });
        }
        Ok(())
    }

    fn validate_memory(&self) -> Result<(), ConfigError> {
        // Huge pages are a preference with a fallback: nothing to check.
        let MemoryConfig {
            size_mib,
            hotplug_mib,
            huge_pages: _,
        } = self.memory;
        if size_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(size_mib));
        }
        if !hotplug_mib.is_multiple_of(HOTPLUG_BLOCK_MIB) {
            return Err(ConfigError::HotplugRoomNotBlocks(hotplug_mib));
        }
        let total = size_mib.saturating_add(hotplug_mib);
        if total > MAX_MEMORY_MIB {
            return Err(ConfigError::MemoryTooLarge(total));
        }
        Ok(())
    }

    fn validate_devices(&self) -> Result<(), ConfigError> {
        let mut vsock_seen = false;
        let mut fs_tags = HashSet::new();
        let mut taps = HashSet::new();
        for device in &self.devices {
            match device {
                DeviceConfig::Net {
                    tap, mac, tap_fd, ..
                } => {
                    let unnamed_fd = tap.is_empty() && tap_fd.is_some();
                    if !unnamed_fd && !beacon_devices::tap::valid_tap_name(tap) {
                        return Err(ConfigError::BadTapName(tap.clone()));
                    }
                    if !tap.is_empty() && !taps.insert(tap.as_str()) {
                        return Err(ConfigError::DuplicateTap(tap.clone()));
                    }
                    if let Some(fd) = *tap_fd {
                        // SAFETY: F_GETFD only reads the descriptor table.
                        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                            return Err(ConfigError::BadTapFd(fd));
                        }
                    }
                    if !mac.is_unicast() {
                        return Err(ConfigError::MulticastMac(*mac));
                    }
                }
                DeviceConfig::Vsock { guest_cid, .. } => {
                    if vsock_seen {
                        return Err(ConfigError::DuplicateVsock);
                    }
                    vsock_seen = true;
                    if *guest_cid < 3 || *guest_cid == u32::MAX {
                        return Err(ConfigError::ReservedCid(*guest_cid));
                    }
                }
                DeviceConfig::Fs {
                    tag, queue_size, ..
                } => {
                    if tag.is_empty() || tag.len() > 36 {
                        return Err(ConfigError::BadFsTag(tag.clone()));
                    }
                    if !fs_tags.insert(tag.as_str()) {
                        return Err(ConfigError::DuplicateFsTag(tag.clone()));
                    }
                    if !queue_size.is_power_of_two() || *queue_size < 2 || *queue_size > 32768 {
                        return Err(ConfigError::BadQueueSize(*queue_size));
                    }
                }
                DeviceConfig::Block { path, read_only } => {
                    // Opened (and locked) once to prove it usable, then closed.
                    beacon_devices::virtio::block::DiskFile::open(path, *read_only)
                        .map_err(|e| ConfigError::Disk(e.to_string()))?;
                }
                DeviceConfig::Rng => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn elf_kernel(dir: &Path) -> PathBuf {
        let p = dir.join("vmlinux");
        let mut f = File::create(&p).expect("create");
        f.write_all(b"\x7fELF\x02\x01\x01").expect("write");
        p
    }

    fn bzimage(dir: &Path) -> PathBuf {
        let p = dir.join("bzImage");
        let mut data = vec![0u8; 0x300];
        data[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&p, data).expect("write");
        p
    }

    #[test]
    fn detects_elf_and_bzimage() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            KernelFormat::detect(&elf_kernel(tmp.path())),
            Ok(KernelFormat::Elf)
        );
        assert_eq!(
            KernelFormat::detect(&bzimage(tmp.path())),
            Ok(KernelFormat::BzImage)
        );
    }

    #[test]
    fn rejects_non_kernel_and_missing_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let junk = tmp.path().join("junk");
        std::fs::write(&junk, b"hello").expect("write");
        assert_eq!(
            VmConfig::new(&junk).validate(),
            Err(ConfigError::NotAKernel(junk.clone()))
        );
        let missing = tmp.path().join("missing");
        let err = VmConfig::new(&missing).validate().unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Unreadable { what: "kernel", .. }
        ));
        assert!(err.to_string().contains("missing"));
    }

    #[test]
    fn vcpu_and_memory_bounds() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut c = VmConfig::new(elf_kernel(tmp.path()));
        c.vcpus = VcpuConfig { boot: 0, max: 1 };
        assert_eq!(c.validate(), Err(ConfigError::NoVcpus(0)));
        c.vcpus = VcpuConfig { boot: 4, max: 2 };
        assert_eq!(
            c.validate(),
            Err(ConfigError::BootAboveMax { boot: 4, max: 2 })
        );
        c.vcpus = VcpuConfig { boot: 1, max: 255 };
        assert_eq!(c.validate(), Err(ConfigError::TooManyVcpus(255)));
        c.vcpus = VcpuConfig { boot: 2, max: 8 };
        c.memory.size_mib = 16;
        assert_eq!(c.validate(), Err(ConfigError::MemoryTooSmall(16)));
        c.memory.size_mib = 128;
        assert_eq!(c.validate(), Ok(KernelFormat::Elf));
    }

    #[test]
    fn initrd_must_exist_and_fit() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut c = VmConfig::new(elf_kernel(tmp.path()));
        c.initrd = Some(tmp.path().join("nope"));
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Unreadable { what: "initrd", .. })
        ));
        let big = tmp.path().join("big");
        File::create(&big)
            .and_then(|f| f.set_len(40 << 20))
            .expect("sparse file");
        c.initrd = Some(big);
        c.memory.size_mib = 64;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn cmdline_limits() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut c = VmConfig::new(elf_kernel(tmp.path()));
        c.cmdline = "a".repeat(MAX_CMDLINE_LEN);
        assert_eq!(
            c.validate(),
            Err(ConfigError::CmdlineTooLong(MAX_CMDLINE_LEN))
        );
        c.cmdline = "console=ttyS0\0".into();
        assert_eq!(c.validate(), Err(ConfigError::CmdlineNul));
    }

    #[test]
    fn device_rules() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut c = VmConfig::new(elf_kernel(tmp.path()));
        let mac: MacAddr = "02:00:00:00:00:01".parse().expect("mac");
        let net = |tap: &str, tap_fd: Option<i32>| DeviceConfig::Net {
            tap: tap.into(),
            mac,
            vhost: false,
            tap_fd,
        };
        c.devices = vec![net("this-name-is-too-long", None)];
        assert!(matches!(c.validate(), Err(ConfigError::BadTapName(_))));
        c.devices = vec![net("", None)];
        assert!(matches!(c.validate(), Err(ConfigError::BadTapName(_))));
        c.devices = vec![net("tap0", None), net("tap0", None)];
        assert!(matches!(c.validate(), Err(ConfigError::DuplicateTap(_))));
        c.devices = vec![net("", Some(-1))];
        assert_eq!(c.validate(), Err(ConfigError::BadTapFd(-1)));
        c.devices = vec![net("", Some(1_000_000))];
        assert_eq!(c.validate(), Err(ConfigError::BadTapFd(1_000_000)));
        let open = std::fs::File::open("/dev/null").expect("null");
        c.devices = vec![net("", Some(std::os::fd::AsRawFd::as_raw_fd(&open)))];
        assert!(
            c.validate().is_ok(),
            "an open fd without a name is accepted"
        );
        c.devices = vec![DeviceConfig::Net {
            tap: "tap0".into(),
            mac: MacAddr([1, 0, 0, 0, 0, 1]),
            vhost: false,
            tap_fd: None,
        }];
        assert!(matches!(c.validate(), Err(ConfigError::MulticastMac(_))));
        let vsock = DeviceConfig::Vsock {
            guest_cid: 3,
            uds_path: None,
        };
        c.devices = vec![vsock.clone(), vsock];
        assert_eq!(c.validate(), Err(ConfigError::DuplicateVsock));
        c.devices = vec![DeviceConfig::Vsock {
            guest_cid: 2,
            uds_path: None,
        }];
        assert_eq!(c.validate(), Err(ConfigError::ReservedCid(2)));
        let fs = DeviceConfig::Fs {
            tag: "rootfs".into(),
            socket: "/tmp/s".into(),
            queue_size: 1024,
        };
        c.devices = vec![fs.clone(), fs];
        assert!(matches!(c.validate(), Err(ConfigError::DuplicateFsTag(_))));
        c.devices = vec![DeviceConfig::Fs {
            tag: "rootfs".into(),
            socket: "/tmp/s".into(),
            queue_size: 1000,
        }];
        assert_eq!(c.validate(), Err(ConfigError::BadQueueSize(1000)));
    }

    #[test]
    fn disk_args_and_images() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            DeviceConfig::parse_disk("path=/a/b.img,ro"),
            Ok(DeviceConfig::Block {
                path: "/a/b.img".into(),
                read_only: true
            })
        );
        assert_eq!(
            DeviceConfig::parse_disk("path=/a/b.img"),
            Ok(DeviceConfig::Block {
                path: "/a/b.img".into(),
                read_only: false
            })
        );
        for bad in [
            "",
            "ro",
            "/a/b.img",
            "path=",
            "path=/a,path=/b",
            "path=/a,rw",
        ] {
            let e = DeviceConfig::parse_disk(bad).expect_err(bad);
            assert!(matches!(e, ConfigError::BadDiskArg(..)), "{bad}: {e}");
        }
        let mut c = VmConfig::new(elf_kernel(tmp.path()));
        let missing = tmp.path().join("missing.img");
        c.devices = vec![DeviceConfig::Block {
            path: missing,
            read_only: true,
        }];
        let e = c.validate().expect_err("missing image");
        assert!(
            matches!(&e, ConfigError::Disk(m) if m.contains("missing.img")),
            "{e}"
        );
        let img = tmp.path().join("disk.img");
        File::create(&img)
            .and_then(|f| f.set_len(1 << 20))
            .expect("image");
        c.devices = vec![DeviceConfig::Block {
            path: img,
            read_only: false,
        }];
        assert_eq!(c.validate(), Ok(KernelFormat::Elf));
    }

    #[test]
    fn json_round_trip() {
        let mut c = VmConfig::new("/k");
        c.devices = vec![
            DeviceConfig::Net {
                tap: "beacon-1".into(),
                mac: MacAddr([2, 0, 0, 0, 0, 1]),
                vhost: true,
                tap_fd: Some(7),
            },
            DeviceConfig::Rng,
        ];
        c.console = ConsoleConfig::File("/log".into());
        let json = serde_json::to_string(&c).expect("serialize");
        assert!(json.contains("\"02:00:00:00:00:01\""));
        let back: VmConfig = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, c);
        // Configs written before vhost and tap_fd existed still read.
        let old = r#"{"type":"net","tap":"beacon-1","mac":"02:00:00:00:00:01"}"#;
        let net: DeviceConfig = serde_json::from_str(old).expect("old net config");
        assert_eq!(
            net,
            DeviceConfig::Net {
                tap: "beacon-1".into(),
                mac: MacAddr([2, 0, 0, 0, 0, 1]),
                vhost: false,
                tap_fd: None,
            }
        );
    }
}
