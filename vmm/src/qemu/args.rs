//! Translate a [`VmConfig`] into a `qemu-system-x86_64 -M microvm` command line.
//!
//! Pure function of its inputs (no process is started here), so every mapping is
//! unit-tested. Settings microvm cannot express are refused with a clear error
//! instead of being silently dropped.

use std::ffi::OsString;
use std::path::Path;

use crate::backend::VmError;
use crate::config::{ConsoleConfig, DeviceConfig, VmConfig};

/// I/O port of the boot timer the guest init writes (same as the KVM backend).
pub const BOOT_TIMER_PORT: u16 = 0x440;

/// Private sockets QEMU is told to create.
pub struct QemuSockets<'a> {
    pub qmp: &'a Path,
    pub boot_timer: &'a Path,
}

fn os(s: impl Into<OsString>) -> OsString {
    s.into()
}

/// Build the argument list (without the program name).
pub fn build_args(config: &VmConfig, sockets: &QemuSockets<'_>) -> Result<Vec<OsString>, VmError> {
    let unsupported = |what: &str| {
        VmError::Qemu(format!(
            "{what} is not supported by the QEMU microvm backend; use --backend kvm"
        ))
    };
    if config.vcpus.max > config.vcpus.boot {
        return Err(unsupported("CPU hotplug (max vCPUs above boot vCPUs)"));
    }
    if config.memory.hotplug_mib > 0 {
        return Err(unsupported("memory hotplug"));
    }
    let mem = config.memory.size_mib;
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| os(*s)));
    push(&["-M", "microvm,x-option-roms=off,memory-backend=ram0"]);
    push(&[
        "-enable-kvm",
        "-cpu",
        "host",
        "-nodefaults",
        "-no-user-config",
    ]);
    push(&["-display", "none", "-no-reboot", "-S"]);
    a.push(os("-smp"));
    a.push(os(config.vcpus.boot.to_string()));
    a.push(os("-m"));
    a.push(os(format!("{mem}M")));
    // memfd-backed shared RAM: vhost-user devices (virtio-fs) must map guest memory.
    a.push(os("-object"));
    a.push(os(format!(
        "memory-backend-memfd,id=ram0,size={mem}M,share=on"
    )));
    a.push(os("-serial"));
    a.push(match &config.console {
        ConsoleConfig::Stdout => os("stdio"),
        ConsoleConfig::Off => os("null"),
        ConsoleConfig::File(p) => {
            let mut s = os("file:");
            s.push(p.as_os_str());
            s
        }
    });
    a.push(os("-kernel"));
    a.push(config.kernel.clone().into_os_string());
    if let Some(initrd) = &config.initrd {
        a.push(os("-initrd"));
        a.push(initrd.clone().into_os_string());
    }
    a.push(os("-append"));
    a.push(os(config.cmdline.clone()));
    a.push(os("-qmp"));
    a.push(socket_chardev("unix:", sockets.qmp, ",server=on,wait=off"));
    a.push(os("-chardev"));
    a.push(socket_chardev(
        "socket,id=boottimer,path=",
        sockets.boot_timer,
        ",server=on,wait=off",
    ));
    a.push(os("-device"));
    a.push(os(format!(
        "isa-debugcon,iobase={BOOT_TIMER_PORT:#x},chardev=boottimer"
    )));
    for (i, device) in config.devices.iter().enumerate() {
        a.extend(device_args(i, device)?);
    }
    Ok(a)
}

fn socket_chardev(prefix: &str, path: &Path, suffix: &str) -> OsString {
    let mut s = os(prefix);
    s.push(path.as_os_str());
    s.push(suffix);
    s
}

fn device_args(i: usize, device: &DeviceConfig) -> Result<Vec<OsString>, VmError> {
    let comma_free = |p: &Path, what: &str| {
        if p.to_string_lossy().contains(',') {
            Err(VmError::Qemu(format!(
                "{what} path {p:?} contains a comma, which QEMU's option syntax cannot carry"
            )))
        } else {
            Ok(p.to_string_lossy().into_owned())
        }
    };
    Ok(match device {
        DeviceConfig::Net { tap, mac } => vec![
            os("-netdev"),
            os(format!(
                "tap,id=net{i},ifname={tap},script=no,downscript=no"
            )),
            os("-device"),
            os(format!("virtio-net-device,netdev=net{i},mac={mac}")),
        ],
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
                os(format!("vhost-vsock-device,guest-cid={guest_cid}")),
            ]
        }
        DeviceConfig::Fs {
            tag,
            socket,
            queue_size,
        } => vec![
            os("-chardev"),
            os(format!(
                "socket,id=fs{i},path={}",
                comma_free(socket, "virtio-fs socket")?
            )),
            os("-device"),
            os(format!(
                "vhost-user-fs-device,chardev=fs{i},tag={tag},queue-size={queue_size}"
            )),
        ],
        DeviceConfig::Block { path, read_only } => vec![
            os("-drive"),
            os(format!(
                "file={},if=none,id=blk{i},format=raw,readonly={}",
                comma_free(path, "block device")?,
                if *read_only { "on" } else { "off" }
            )),
            os("-device"),
            os(format!("virtio-blk-device,drive=blk{i}")),
        ],
        DeviceConfig::Rng => vec![
            os("-object"),
            os(format!("rng-random,id=rng{i},filename=/dev/urandom")),
            os("-device"),
            os(format!("virtio-rng-device,rng=rng{i}")),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MacAddr, VcpuConfig};
    use std::path::PathBuf;

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
            after(&args, "-qmp"),
            ["unix:/run/x/qmp.sock,server=on,wait=off"]
        );
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
        assert_eq!(after(&args, "-serial"), ["file:/log/vm.log"]);
        let devices = after(&args, "-device");
        assert!(devices.contains(&"virtio-net-device,netdev=net0,mac=02:00:00:00:00:09"));
        assert!(devices.contains(&"vhost-vsock-device,guest-cid=7"));
        assert!(devices.contains(&"vhost-user-fs-device,chardev=fs2,tag=rootfs,queue-size=1024"));
        assert!(devices.contains(&"virtio-blk-device,drive=blk3"));
        assert!(devices.contains(&"virtio-rng-device,rng=rng4"));
        assert!(after(&args, "-netdev")
            .contains(&"tap,id=net0,ifname=beacon-ab,script=no,downscript=no"));
        assert!(after(&args, "-drive")
            .contains(&"file=/img.erofs,if=none,id=blk3,format=raw,readonly=on"));
    }

    #[test]
    fn refuses_what_microvm_cannot_do() {
        let (q, b) = sockets();
        let s = QemuSockets {
            qmp: &q,
            boot_timer: &b,
        };
        let mut c = VmConfig::new("/k");
        c.vcpus = VcpuConfig { boot: 1, max: 4 };
        assert!(build_args(&c, &s).is_err());
        let mut c = VmConfig::new("/k");
        c.memory.hotplug_mib = 1024;
        assert!(build_args(&c, &s).is_err());
        let mut c = VmConfig::new("/k");
        c.devices = vec![DeviceConfig::Vsock {
            guest_cid: 3,
            uds_path: Some("/run/v.sock".into()),
        }];
        assert!(build_args(&c, &s).is_err());
        let mut c = VmConfig::new("/k");
        c.devices = vec![DeviceConfig::Block {
            path: "/a,b".into(),
            read_only: false,
        }];
        let err = build_args(&c, &s).expect_err("comma");
        assert!(err.to_string().contains("comma"));
    }
}
