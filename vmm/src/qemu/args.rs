//! Translate a [`VmConfig`] into a `qemu-system-x86_64` command line.
//!
//! Pure function of its inputs (no process is started here), so every mapping is
//! unit-tested. Settings QEMU cannot express are refused with a clear error
//! instead of being silently dropped.
//!
//! The machine is `microvm` (virtio-mmio devices, no firmware), QEMU's fastest,
//! unless the VM can grow: microvm cannot hotplug, so a VM with room for more
//! vCPUs or memory gets [`HOTPLUG_MACHINE`] instead (SeaBIOS, ACPI CPU and
//! memory hotplug, virtio-pci devices), with one DIMM slot per hotplug block.
//!
//! Every value that goes into a QEMU option string (`driver,key=value,...`) goes
//! through [`QemuOpts`], which doubles commas (QEMU reads `,,` as one literal comma),
//! so a TAP name, an fs tag or a path cannot end the value early and smuggle in
//! options of its own. Arguments QEMU takes whole (`-kernel`, `-initrd`, `-append`)
//! pass unchanged. `-serial file:PATH` takes its path whole too, so a console file
//! is a `file` chardev instead, where the path is an escaped option value.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use crate::backend::VmError;
use crate::config::{ConsoleConfig, DeviceConfig, VmConfig, HOTPLUG_BLOCK_MIB};
use crate::resize::MOVABLE_MEMORY_PARAM;

pub use beacon_devices::legacy::BOOT_TIMER_PORT;

/// The machine a VM that can grow runs on (see the module doc).
pub const HOTPLUG_MACHINE: &str = "q35";

/// Whether `config` needs [`HOTPLUG_MACHINE`] instead of microvm.
pub fn needs_hotplug_machine(config: &VmConfig) -> bool {
    config.vcpus.max > config.vcpus.boot || config.memory.hotplug_mib > 0
}

/// Private sockets QEMU is told to create.
pub struct QemuSockets<'a> {
    pub qmp: &'a Path,
    pub boot_timer: &'a Path,
}

fn os(s: impl Into<OsString>) -> OsString {
    s.into()
}

/// One QEMU option string: a fixed leading item (a driver or backend name, or a
/// constant `key=value`) and `key=value` pairs whose values are escaped.
struct QemuOpts(Vec<u8>);

impl QemuOpts {
    /// Starts with `head`: a fixed driver or backend name (or first `key=value`),
    /// never user input.
    fn new(head: &str) -> Self {
        Self(head.as_bytes().to_vec())
    }

    /// Appends `,key=value`.
    fn set(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.0.push(b',');
        self.0.extend_from_slice(key.as_bytes());
        self.0.push(b'=');
        self.0.extend_from_slice(&escape(value.as_ref()));
        self
    }

    fn build(self) -> OsString {
        OsString::from_vec(self.0)
    }
}

/// A value as QEMU's option parser needs it: every `,` doubled.
fn escape(value: &OsStr) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    out
}

/// Build the argument list (without the program name).
pub fn build_args(config: &VmConfig, sockets: &QemuSockets<'_>) -> Result<Vec<OsString>, VmError> {
    let hotplug = needs_hotplug_machine(config);
    let mem = config.memory.size_mib;
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| os(*s)));
    if hotplug {
        push(&["-M", "q35,memory-backend=ram0"]);
    } else {
        push(&["-M", "microvm,x-option-roms=off,memory-backend=ram0"]);
    }
    push(&[
        "-enable-kvm",
        "-cpu",
        "host",
        "-nodefaults",
        "-no-user-config",
    ]);
    push(&["-display", "none", "-no-reboot", "-S"]);
    // Named threads ("CPU 1/KVM", ...), as ours are: per-vCPU CPU time in
    // /proc, and a hot-removed vCPU's thread can be seen to end.
    push(&["-name", "guest=beacon,debug-threads=on"]);
    a.push(os("-smp"));
    a.push(os(if hotplug {
        format!("{},maxcpus={}", config.vcpus.boot, config.vcpus.max)
    } else {
        config.vcpus.boot.to_string()
    }));
    a.push(os("-m"));
    let slots = config.memory.hotplug_mib / HOTPLUG_BLOCK_MIB;
    a.push(os(if slots > 0 {
        format!(
            "{mem}M,slots={slots},maxmem={}M",
            mem + config.memory.hotplug_mib
        )
    } else {
        format!("{mem}M")
    }));
    // memfd-backed shared RAM: vhost-user devices (virtio-fs) must map guest memory.
    a.push(os("-object"));
    a.push(os(format!(
        "memory-backend-memfd,id=ram0,size={mem}M,share=on"
    )));
    if let ConsoleConfig::File(p) = &config.console {
        a.push(os("-chardev"));
        a.push(
            QemuOpts::new("file")
                .set("id", "console")
                .set("path", p)
                .build(),
        );
    }
    a.push(os("-serial"));
    a.push(os(match &config.console {
        ConsoleConfig::Stdout => "stdio",
        ConsoleConfig::Off => "null",
        ConsoleConfig::File(_) => "chardev:console",
    }));
    a.push(os("-kernel"));
    a.push(config.kernel.clone().into_os_string());
    if let Some(initrd) = &config.initrd {
        a.push(os("-initrd"));
        a.push(initrd.clone().into_os_string());
    }
    a.push(os("-append"));
    a.push(os(if config.memory.hotplug_mib > 0 {
        format!("{}{MOVABLE_MEMORY_PARAM}", config.cmdline)
    } else {
        config.cmdline.clone()
    }));
    for (id, path) in [("qmp", sockets.qmp), ("boottimer", sockets.boot_timer)] {
        a.push(os("-chardev"));
        a.push(
            QemuOpts::new("socket")
                .set("id", id)
                .set("path", path)
                .set("server", "on")
                .set("wait", "off")
                .build(),
        );
    }
    a.push(os("-mon"));
    a.push(os("chardev=qmp,mode=control"));
    a.push(os("-device"));
    a.push(os(format!(
        "isa-debugcon,iobase={BOOT_TIMER_PORT:#x},chardev=boottimer"
    )));
    for (i, device) in config.devices.iter().enumerate() {
        a.extend(device_args(i, device, hotplug)?);
    }
    Ok(a)
}

/// The descriptor number QEMU finds device `i`'s caller-owned TAP at (the
/// backend duplicates it there between fork and exec).
pub fn tap_fd_in_child(i: usize) -> i32 {
    100 + i32::try_from(i).unwrap_or(0)
}

/// The QEMU driver of virtio device `kind` ("virtio-net", "vhost-vsock", ...)
/// on the machine's transport: virtio-mmio on microvm, PCI on the hotplug machine.
fn virtio_driver(kind: &str, pci: bool) -> String {
    format!("{kind}-{}", if pci { "pci" } else { "device" })
}

fn device_args(i: usize, device: &DeviceConfig, pci: bool) -> Result<Vec<OsString>, VmError> {
    let driver = |kind: &str| QemuOpts::new(&virtio_driver(kind, pci));
    Ok(match device {
        DeviceConfig::Net {
            tap,
            mac,
            vhost,
            tap_fd,
        } => {
            // A caller-owned TAP (one opened in another network namespace)
            // reaches QEMU as an inherited descriptor; see `tap_fd_in_child`.
            let mut netdev = QemuOpts::new("tap").set("id", format!("net{i}"));
            netdev = match tap_fd {
                Some(_) => netdev.set("fd", tap_fd_in_child(i).to_string()),
                None => netdev
                    .set("ifname", tap)
                    .set("script", "no")
                    .set("downscript", "no"),
            };
            if *vhost {
                netdev = netdev.set("vhost", "on");
            }
            vec![
                os("-netdev"),
                netdev.build(),
                os("-device"),
                {
                    let nic = driver("virtio-net")
                        .set("netdev", format!("net{i}"))
                        .set("mac", mac.to_string());
                    // No iPXE option ROM: the kernel is loaded directly.
                    if pci {
                        nic.set("romfile", "")
                    } else {
                        nic
                    }
                }
                .build(),
            ]
        }
        DeviceConfig::Vsock {
            guest_cid,
            uds_path,
        } => {
            if uds_path.is_some() {
                return Err(VmError::Unsupported(
                    "the hybrid unix-socket vsock backend (uds=PATH) exists only in the KVM backend; use --backend kvm, or drop uds= to use /dev/vhost-vsock with QEMU".into(),
                ));
            }
            vec![
                os("-device"),
                driver("vhost-vsock")
                    .set("guest-cid", guest_cid.to_string())
                    .build(),
            ]
        }
        DeviceConfig::Fs {
            tag,
            socket,
            queue_size,
        } => vec![
            os("-chardev"),
            QemuOpts::new("socket")
                .set("id", format!("fs{i}"))
                .set("path", socket)
                .build(),
            os("-device"),
            driver("vhost-user-fs")
                .set("chardev", format!("fs{i}"))
                .set("tag", tag)
                .set("queue-size", queue_size.to_string())
                .build(),
        ],
        DeviceConfig::Block { path, read_only } => vec![
            os("-drive"),
            QemuOpts::new("if=none")
                .set("file", path)
                .set("id", format!("blk{i}"))
                .set("format", "raw")
                .set("readonly", if *read_only { "on" } else { "off" })
                .build(),
            os("-device"),
            driver("virtio-blk").set("drive", format!("blk{i}")).build(),
        ],
        DeviceConfig::Rng => vec![
            os("-object"),
            QemuOpts::new("rng-random")
                .set("id", format!("rng{i}"))
                .set("filename", "/dev/urandom")
                .build(),
            os("-device"),
            driver("virtio-rng").set("rng", format!("rng{i}")).build(),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MacAddr, VcpuConfig};
    use std::path::PathBuf;
    use std::time::Duration;

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn sockets() -> (PathBuf, PathBuf) {
        (
            PathBuf::from("/run/x/qmp.sock"),
            PathBuf::from("/run/x/bt.sock"),
        )
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn basic_vm() {
        let mut c = VmConfig::new("/k/vmlinux");
        c.initrd = Some("/k/initrd".into());
        c.cmdline = "console=ttyS0 quiet".into();
        c.vcpus = VcpuConfig { boot: 2, max: 2 };
        c.memory.size_mib = 256;
        let (q, b) = sockets();
        let args = strings(
            &build_args(
                &c,
                &QemuSockets {
                    qmp: &q,
                    boot_timer: &b,
                },
            )
            .expect("args"),
        );
        assert_eq!(after(&args, "-smp"), ["2"]);
        assert_eq!(after(&args, "-m"), ["256M"]);
        assert_eq!(after(&args, "-kernel"), ["/k/vmlinux"]);
        assert_eq!(after(&args, "-initrd"), ["/k/initrd"]);
        assert_eq!(after(&args, "-append"), ["console=ttyS0 quiet"]);
        assert_eq!(after(&args, "-serial"), ["stdio"]);
        assert_eq!(
            after(&args, "-chardev"),
            [
                "socket,id=qmp,path=/run/x/qmp.sock,server=on,wait=off",
                "socket,id=boottimer,path=/run/x/bt.sock,server=on,wait=off"
            ]
        );
        assert_eq!(after(&args, "-mon"), ["chardev=qmp,mode=control"]);
        assert_eq!(after(&args, "-name"), ["guest=beacon,debug-threads=on"]);
        assert!(args.contains(&"-S".to_string()));
        assert!(
            after(&args, "-object").contains(&"memory-backend-memfd,id=ram0,size=256M,share=on")
        );
        assert!(after(&args, "-device").contains(&"isa-debugcon,iobase=0x440,chardev=boottimer"));
    }

    #[test]
    fn devices_map_to_mmio_devices() {
        let mut c = VmConfig::new("/k");
        c.console = ConsoleConfig::File("/log/vm.log".into());
        c.devices = vec![
            DeviceConfig::Net {
                tap: "beacon-ab".into(),
                mac: MacAddr([2, 0, 0, 0, 0, 9]),
                vhost: false,
                tap_fd: None,
            },
            DeviceConfig::Vsock {
                guest_cid: 7,
                uds_path: None,
            },
            DeviceConfig::Fs {
                tag: "rootfs".into(),
                socket: "/run/fs.sock".into(),
                queue_size: 1024,
            },
            DeviceConfig::Block {
                path: "/img.erofs".into(),
                read_only: true,
            },
            DeviceConfig::Rng,
        ];
        let (q, b) = sockets();
        let args = strings(
            &build_args(
                &c,
                &QemuSockets {
                    qmp: &q,
                    boot_timer: &b,
                },
            )
            .expect("args"),
        );
        assert_eq!(after(&args, "-serial"), ["chardev:console"]);
        assert!(after(&args, "-chardev").contains(&"file,id=console,path=/log/vm.log"));
        assert!(after(&args, "-chardev").contains(&"socket,id=fs2,path=/run/fs.sock"));
        let devices = after(&args, "-device");
        assert!(devices.contains(&"virtio-net-device,netdev=net0,mac=02:00:00:00:00:09"));
        assert!(devices.contains(&"vhost-vsock-device,guest-cid=7"));
        assert!(devices.contains(&"vhost-user-fs-device,chardev=fs2,tag=rootfs,queue-size=1024"));
        assert!(devices.contains(&"virtio-blk-device,drive=blk3"));
        assert!(devices.contains(&"virtio-rng-device,rng=rng4"));
        assert!(after(&args, "-netdev")
            .contains(&"tap,id=net0,ifname=beacon-ab,script=no,downscript=no"));
        assert!(after(&args, "-drive")
            .contains(&"if=none,file=/img.erofs,id=blk3,format=raw,readonly=on"));
        assert!(after(&args, "-object").contains(&"rng-random,id=rng4,filename=/dev/urandom"));
    }

    #[test]
    fn refuses_what_qemu_cannot_do() {
        let (q, b) = sockets();
        let s = QemuSockets {
            qmp: &q,
            boot_timer: &b,
        };
        let mut c = VmConfig::new("/k");
        c.devices = vec![DeviceConfig::Vsock {
            guest_cid: 3,
            uds_path: Some("/run/v.sock".into()),
        }];
        assert!(build_args(&c, &s).is_err());
    }

    /// A VM that can grow runs on the hotplug machine, its devices on PCI,
    /// with a DIMM slot per block and removable hot-added memory; one that
    /// cannot stays on microvm.
    #[test]
    fn a_vm_that_can_grow_runs_on_the_hotplug_machine() {
        let (q, b) = sockets();
        let s = QemuSockets {
            qmp: &q,
            boot_timer: &b,
        };
        let mut c = VmConfig::new("/k");
        c.cmdline = "console=ttyS0".into();
        c.vcpus = VcpuConfig { boot: 1, max: 2 };
        c.memory.size_mib = 512;
        c.memory.hotplug_mib = 2048;
        c.devices = vec![
            DeviceConfig::Net {
                tap: "t0".into(),
                mac: MacAddr([2, 0, 0, 0, 0, 9]),
                vhost: false,
                tap_fd: None,
            },
            DeviceConfig::Vsock {
                guest_cid: 7,
                uds_path: None,
            },
            DeviceConfig::Fs {
                tag: "rootfs".into(),
                socket: "/run/fs.sock".into(),
                queue_size: 1024,
            },
            DeviceConfig::Rng,
        ];
        let args = strings(&build_args(&c, &s).expect("args"));
        assert_eq!(after(&args, "-M"), ["q35,memory-backend=ram0"]);
        assert_eq!(after(&args, "-smp"), ["1,maxcpus=2"]);
        assert_eq!(after(&args, "-m"), ["512M,slots=16,maxmem=2560M"]);
        assert_eq!(
            after(&args, "-append"),
            ["console=ttyS0 memhp_default_state=online_movable"]
        );
        let devices = after(&args, "-device");
        assert!(devices.contains(&"virtio-net-pci,netdev=net0,mac=02:00:00:00:00:09,romfile="));
        assert!(devices.contains(&"vhost-vsock-pci,guest-cid=7"));
        assert!(devices.contains(&"vhost-user-fs-pci,chardev=fs2,tag=rootfs,queue-size=1024"));
        assert!(devices.contains(&"virtio-rng-pci,rng=rng3"));

        // Room for vCPUs only: no DIMM slots, the command line as given.
        c.memory.hotplug_mib = 0;
        let args = strings(&build_args(&c, &s).expect("args"));
        assert_eq!(after(&args, "-M"), ["q35,memory-backend=ram0"]);
        assert_eq!(after(&args, "-m"), ["512M"]);
        assert_eq!(after(&args, "-append"), ["console=ttyS0"]);

        // No room at all: microvm.
        c.vcpus = VcpuConfig { boot: 2, max: 2 };
        let args = strings(&build_args(&c, &s).expect("args"));
        assert_eq!(
            after(&args, "-M"),
            ["microvm,x-option-roms=off,memory-backend=ram0"]
        );
        assert_eq!(after(&args, "-smp"), ["2"]);
        assert!(after(&args, "-device").contains(&"vhost-vsock-device,guest-cid=7"));
    }

    #[test]
    fn a_caller_owned_tap_reaches_qemu_as_an_inherited_descriptor() {
        let mut c = VmConfig::new("/k");
        c.devices = vec![DeviceConfig::Net {
            tap: "tap0".into(),
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            vhost: false,
            tap_fd: Some(0),
        }];
        let (q, b) = sockets();
        let args = strings(
            &build_args(
                &c,
                &QemuSockets {
                    qmp: &q,
                    boot_timer: &b,
                },
            )
            .expect("args"),
        );
        let netdev = args
            .iter()
            .find(|a| a.starts_with("tap,"))
            .expect("a tap netdev");
        assert_eq!(netdev, &format!("tap,id=net0,fd={}", tap_fd_in_child(0)));
    }

    #[test]
    fn net_with_vhost_maps_to_a_vhost_tap_netdev() {
        let mut c = VmConfig::new("/k");
        c.devices = vec![DeviceConfig::Net {
            tap: "bt0".into(),
            mac: MacAddr([2, 0, 0, 0, 0, 2]),
            vhost: true,
            tap_fd: None,
        }];
        let (q, b) = sockets();
        let args = strings(
            &build_args(
                &c,
                &QemuSockets {
                    qmp: &q,
                    boot_timer: &b,
                },
            )
            .expect("args"),
        );
        assert_eq!(
            after(&args, "-netdev"),
            ["tap,id=net0,ifname=bt0,script=no,downscript=no,vhost=on"]
        );
        assert!(after(&args, "-device")
            .contains(&"virtio-net-device,netdev=net0,mac=02:00:00:00:00:02"));
    }

    /// Every value a user or the system chose, with commas in it.
    fn comma_config() -> VmConfig {
        let mut c = VmConfig::new("/k,1/vmlinux");
        c.initrd = Some("/k,1/initrd".into());
        c.cmdline = "console=ttyS0 x=a,b".into();
        c.console = ConsoleConfig::File("/log,1/vm,2.log".into());
        c.devices = vec![
            DeviceConfig::Net {
                tap: "t,ap".into(),
                mac: MacAddr([2, 0, 0, 0, 0, 9]),
                vhost: false,
                tap_fd: None,
            },
            DeviceConfig::Fs {
                tag: "root,fs=x".into(),
                socket: "/run/f,s.sock".into(),
                queue_size: 1024,
            },
            DeviceConfig::Block {
                path: "/img,readonly=off".into(),
                read_only: true,
            },
        ];
        c
    }

    #[test]
    fn commas_in_every_value_are_doubled() {
        let c = comma_config();
        let (q, b) = (PathBuf::from("/r,un/qmp"), PathBuf::from("/r,un/bt"));
        let args = strings(
            &build_args(
                &c,
                &QemuSockets {
                    qmp: &q,
                    boot_timer: &b,
                },
            )
            .expect("args"),
        );
        assert_eq!(
            after(&args, "-chardev"),
            [
                "file,id=console,path=/log,,1/vm,,2.log",
                "socket,id=qmp,path=/r,,un/qmp,server=on,wait=off",
                "socket,id=boottimer,path=/r,,un/bt,server=on,wait=off",
                "socket,id=fs1,path=/run/f,,s.sock",
            ]
        );
        assert_eq!(
            after(&args, "-netdev"),
            ["tap,id=net0,ifname=t,,ap,script=no,downscript=no"]
        );
        assert!(after(&args, "-device")
            .contains(&"vhost-user-fs-device,chardev=fs1,tag=root,,fs=x,queue-size=1024"));
        assert_eq!(
            after(&args, "-drive"),
            ["if=none,file=/img,,readonly=off,id=blk2,format=raw,readonly=on"]
        );
        // Taken whole by QEMU: unchanged.
        assert_eq!(after(&args, "-kernel"), ["/k,1/vmlinux"]);
        assert_eq!(after(&args, "-initrd"), ["/k,1/initrd"]);
        assert_eq!(after(&args, "-append"), ["console=ttyS0 x=a,b"]);
    }

    #[test]
    fn escaping_keeps_every_other_byte() {
        let raw = OsStr::from_bytes(b",a,,b=c \xff,");
        assert_eq!(escape(raw), b",,a,,,,b=c \xff,,".to_vec());
        assert_eq!(
            QemuOpts::new("x").set("k", raw).build().as_bytes(),
            b"x,k=,,a,,,,b=c \xff,,"
        );
    }

    /// QEMU 7.2 itself reads the escaped values back as the original ones: it
    /// creates the QMP, boot-timer and console files at their comma paths, connects
    /// to the virtio-fs socket, opens the block file and names the TAP. Runs QEMU
    /// without KVM (`-M none -accel tcg -S`) in a private network namespace (the
    /// TAP lives and dies there), with the options `build_args` produced.
    #[test]
    fn qemu_reads_escaped_values_back() {
        use std::os::unix::fs::FileTypeExt;
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};

        let qemu = "qemu-system-x86_64";
        let version = Command::new(qemu)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("{qemu} is required (Debian qemu-system-x86): {e}"));
        assert!(version.status.success(), "{qemu} --version failed");

        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a,b");
        std::fs::create_dir(&dir).expect("mkdir");
        let qmp = dir.join("qmp,sock");
        let boot_timer = dir.join("boot,timer");
        let console = dir.join("con,sole.log");
        let fs_sock = dir.join("fs,sock");
        let disk = dir.join("d,isk.img");
        std::fs::write(&disk, vec![0u8; 4096]).expect("disk");
        let fs_listener = std::os::unix::net::UnixListener::bind(&fs_sock).expect("bind");

        let mut c = VmConfig::new("/unused");
        c.console = ConsoleConfig::File(console.clone());
        c.devices = vec![
            DeviceConfig::Net {
                tap: "t,ap".into(),
                mac: MacAddr([2, 0, 0, 0, 0, 9]),
                vhost: false,
                tap_fd: None,
            },
            DeviceConfig::Fs {
                tag: "fs".into(),
                socket: fs_sock.clone(),
                queue_size: 1024,
            },
            DeviceConfig::Block {
                path: disk.clone(),
                read_only: true,
            },
        ];
        let args = build_args(
            &c,
            &QemuSockets {
                qmp: &qmp,
                boot_timer: &boot_timer,
            },
        )
        .expect("args");
        // Everything but the microvm machine, KVM and its devices (-M none has no
        // bus for them): the chardevs, the monitor, the serial port, the drive, the
        // TAP.
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", "--", qemu, "-M", "none", "-accel", "tcg", "-S"])
            .args(["-display", "none", "-nodefaults", "-no-user-config"]);
        for pair in args.windows(2) {
            if ["-chardev", "-mon", "-serial", "-drive", "-netdev"]
                .iter()
                .any(|f| pair[0] == OsStr::new(f))
            {
                cmd.args(pair);
            }
        }
        cmd.stdin(Stdio::null())
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
        let child = cmd.spawn().expect("spawn unshare + qemu (util-linux)");
        struct Reap(std::process::Child);
        impl Drop for Reap {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut child = Reap(child);

        // QMP greets once every option has been set up; a QEMU that rejected its
        // options exits instead.
        let started = std::time::Instant::now();
        let monitor = loop {
            if let Some(status) = child.0.try_wait().expect("try_wait") {
                use std::io::Read;
                let mut said = String::new();
                if let Some(mut err) = child.0.stderr.take() {
                    let _ = err.read_to_string(&mut said);
                }
                panic!("QEMU exited ({status}) instead of serving QMP:\n{said}");
            }
            match super::super::qmp::Qmp::connect(&qmp, Duration::from_millis(200)) {
                Ok(m) => break m,
                Err(e) if started.elapsed() > Duration::from_secs(120) => {
                    panic!("QMP on {qmp:?} never came up: {e}")
                }
                Err(_) => {}
            }
        };
        assert!(std::fs::metadata(&boot_timer)
            .expect("boot-timer socket at its comma path")
            .file_type()
            .is_socket());
        assert!(console.is_file(), "console file at its comma path");
        fs_listener.set_nonblocking(true).expect("nonblocking");
        fs_listener
            .accept()
            .expect("QEMU connected to the virtio-fs socket at its comma path");
        let blocks = monitor.execute("query-block").expect("query-block");
        let file = blocks
            .as_array()
            .and_then(|b| b.iter().find(|d| d["device"] == "blk2"))
            .and_then(|d| d["inserted"]["file"].as_str())
            .map(str::to_string);
        assert_eq!(
            file.as_deref(),
            Some(disk.to_str().expect("utf8")),
            "{blocks}"
        );
        let pid = child.0.id();
        let links = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).expect("net/dev");
        assert!(
            links.lines().any(|l| l.trim_start().starts_with("t,ap:")),
            "no TAP named t,ap in QEMU's namespace:\n{links}"
        );
        let _ = monitor.execute("quit");
    }
}
