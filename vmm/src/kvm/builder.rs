//! Assembles a KVM microVM from a [`VmConfig`], in a fixed order:
//! memory → VM and irqchip → device manager (legacy devices, then every
//! `config.devices` entry) → kernel and initrd → MP table and ACPI tables
//! generated from the device manager → vCPUs ([`super::cpu_manager`]) and
//! the memory hotplug room ([`super::memory_manager`]); with a hotplug
//! controller and GED when `--max-cpus` or `--hotplug-memory` leaves room.
//!
//! Everything that can fail happens here, before a vCPU runs, so a bad config is
//! a [`VmError`] with no thread started; every fd made so far is released by
//! drop. The result is a [`KvmVm`] that only knows how to run.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use beacon_devices::confine::ThreadHook;
use beacon_devices::tap::Tap;
use beacon_devices::virtio::block::Block;
use beacon_devices::virtio::fs::{FsConfig, VhostUserFs};
use beacon_devices::virtio::net::{Net, NetError};
use beacon_devices::virtio::rng::Rng;
use beacon_devices::virtio::vsock::{hybrid::HybridVsock, vhost::VhostVsock};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::{self, layout};
use super::console::ConsoleOutput;
use super::control::{self, VcpuControl};
use super::cpu_manager::{CpuManager, CpuSetup, VcpuLinks};
use super::device_manager::{DeviceManager, LegacyHooks};
use super::memory::GuestRam;
use super::memory_manager::{self, MemoryLinks, MemoryManager};
use super::KvmVm;
use crate::backend::VmError;
use crate::config::{ConfigError, DeviceConfig, VmConfig, MAX_CMDLINE_LEN};
use crate::seccomp::{SeccompMode, ThreadClass};

pub(crate) fn hv(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    let what = what.into();
    move |e| VmError::Hypervisor {
        what,
        source: e.into(),
    }
}

/// Refuse more vCPUs than this host's KVM runs in one VM (KVM_CAP_MAX_VCPUS).
pub(crate) fn check_vcpu_limit(asked: u8, kvm_max: usize) -> Result<(), VmError> {
    if usize::from(asked) <= kvm_max {
        return Ok(());
    }
    Err(VmError::Hypervisor {
        what: "checking the vCPU count".into(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "this host's KVM runs at most {kvm_max} vCPUs per VM (KVM_CAP_MAX_VCPUS), {asked} were asked for; lower --cpus/--max-cpus"
            ),
        ),
    })
}

/// What this backend cannot do yet, refused before anything is built.
fn refuse_unsupported(config: &VmConfig) -> Result<(), VmError> {
    if config.require_confinement {
        crate::seccomp::require_full_confinement(config.seccomp)?;
    }
    let wants_vhost_net = config
        .devices
        .iter()
        .any(|d| matches!(d, DeviceConfig::Net { vhost: true, .. }));
    if wants_vhost_net
        && !std::path::Path::new(beacon_devices::virtio::net::VHOST_NET_DEVICE).exists()
    {
        return Err(VmError::Unsupported(
            beacon_devices::virtio::net::NetError::VhostMissing.to_string(),
        ));
    }
    Ok(())
}

/// The hook a device's own threads run first: confinement under the VM's
/// mode (none when it is off).
fn worker_hook(config: &VmConfig) -> Option<ThreadHook> {
    let mode = config.seccomp;
    (mode != SeccompMode::Off).then(|| {
        ThreadHook::new(move |kind| {
            crate::seccomp::confine_or_warn(ThreadClass::of_worker(kind), mode)
        })
    })
}

/// Attach every configured virtio device.
fn attach_devices(dm: &mut DeviceManager, config: &VmConfig) -> Result<(), VmError> {
    for device in &config.devices {
        match device {
            DeviceConfig::Rng => {
                dm.attach_virtio("rng", Arc::new(Mutex::new(Rng::new())))?;
            }
            DeviceConfig::Block { path, read_only } => {
                let block =
                    Block::open_with_hook(path, *read_only, worker_hook(config)).map_err(|e| {
                        VmError::Device {
                            device: "virtio-blk".into(),
                            reason: e.to_string(),
                        }
                    })?;
                dm.attach_virtio("blk", Arc::new(Mutex::new(block)))?;
            }
            DeviceConfig::Net {
                tap,
                mac,
                vhost,
                tap_fd,
            } => {
                let net = || -> Result<Net, NetError> {
                    let tap = match tap_fd {
                        Some(fd) => Tap::from_caller_fd(*fd, tap)?,
                        None => Tap::open(tap)?,
                    };
                    if *vhost {
                        Net::with_vhost(tap, *mac, dm.guest_memory())
                    } else {
                        Ok(Net::new(tap, *mac))
                    }
                };
                let device = net().map_err(|e| VmError::Device {
                    device: "virtio-net".into(),
                    reason: e.to_string(),
                })?;
                dm.attach_virtio("net", Arc::new(Mutex::new(device)))?;
            }
            DeviceConfig::Vsock {
                guest_cid,
                uds_path,
            } => {
                let failed = |e: &dyn std::fmt::Display| VmError::Device {
                    device: "vsock".into(),
                    reason: e.to_string(),
                };
                let cid = u64::from(*guest_cid);
                let device: Arc<Mutex<dyn beacon_devices::virtio::VirtioDevice>> = match uds_path {
                    Some(path) => Arc::new(Mutex::new(
                        HybridVsock::new(cid, path).map_err(|e| failed(&e))?,
                    )),
                    None => Arc::new(Mutex::new(
                        VhostVsock::new(cid, dm.guest_memory()).map_err(|e| failed(&e))?,
                    )),
                };
                dm.attach_virtio("vsock", device)?;
            }
            DeviceConfig::Fs {
                tag,
                socket,
                queue_size,
            } => {
                let mut fs = FsConfig::new(tag.clone(), socket.clone());
                fs.queue_size = *queue_size;
                fs.thread_hook = worker_hook(config);
                let device = VhostUserFs::connect(&fs).map_err(|e| VmError::Device {
                    device: format!("virtio-fs {tag:?}"),
                    reason: e.to_string(),
                })?;
                dm.attach_virtio("fs", Arc::new(Mutex::new(device)))?;
            }
        }
    }
    Ok(())
}

fn write_acpi_tables(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    dm: &DeviceManager,
) -> Result<(), VmError> {
    let tables = crate::acpi::build(&crate::acpi::AcpiConfig {
        boot_vcpus: config.vcpus.boot,
        max_vcpus: config.vcpus.max,
        ioapic_addr: layout::IOAPIC_ADDR,
        lapic_addr: layout::LAPIC_ADDR,
        devices_aml: dm.dsdt_aml()?,
    })
    .map_err(|e| VmError::Memory(format!("building the ACPI tables: {e}")))?;
    for t in tables {
        mem.write_slice(&t.bytes, GuestAddress(t.addr))
            .map_err(|e| VmError::Memory(format!("writing the ACPI tables: {e}")))?;
    }
    Ok(())
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(hv("KVM_CREATE_VM"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(hv("KVM_SET_TSS_ADDR"))?;
    if kvm.check_extension(Cap::SetIdentityMapAddr) {
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
            .map_err(hv("KVM_SET_IDENTITY_MAP_ADDR"))?;
    }
    vm.create_irq_chip().map_err(hv("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(hv("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

/// Build the VM; nothing runs until it is started.
pub fn build(config: VmConfig) -> Result<KvmVm, VmError> {
    build_inner(config, None)
}

/// Like [`build`], with the console's output going to `console` instead of
/// where `config.console` says (tests: a pipe nobody reads).
#[doc(hidden)]
pub fn build_with_console(config: VmConfig, console: ConsoleOutput) -> Result<KvmVm, VmError> {
    build_inner(config, Some(console))
}

fn build_inner(config: VmConfig, console: Option<ConsoleOutput>) -> Result<KvmVm, VmError> {
    let created = Instant::now();
    let format = config.validate()?;
    refuse_unsupported(&config)?;
    let kvm = Kvm::new().map_err(|e| VmError::KvmUnavailable(format!("opening /dev/kvm: {e}")))?;
    check_vcpu_limit(config.vcpus.max, kvm.get_max_vcpus())?;

    // Memory, then the VM with its irqchip.
    let vm = Arc::new(create_vm(&kvm)?);
    let mem_bytes = config.memory.size_mib << 20;
    let ram = GuestRam::new(mem_bytes, config.memory.huge_pages)?;
    ram.register(&vm)?;

    // Devices.
    let control = Arc::new(VcpuControl::new());
    let init_reached = Arc::new(OnceLock::new());
    let mut devices = DeviceManager::new(vm.clone(), ram.shared())?;
    devices.attach_legacy(
        &config.console,
        console,
        LegacyHooks {
            control: control.clone(),
            created,
            init_reached: init_reached.clone(),
        },
    )?;
    attach_devices(&mut devices, &config)?;
    let memory_blocks =
        memory_manager::block_ranges(config.memory.size_mib, config.memory.hotplug_mib);
    let hotplug = if config.vcpus.max > config.vcpus.boot || !memory_blocks.is_empty() {
        Some(devices.attach_hotplug(config.vcpus.boot, config.vcpus.max, memory_blocks)?)
    } else {
        None
    };
    let memory = MemoryManager::new(
        MemoryLinks {
            vm: vm.clone(),
            mem: ram.shared(),
            control: control.clone(),
            devices: devices.virtio_handles(),
        },
        config.memory.size_mib,
        config.memory.hotplug_mib,
        hotplug.clone().filter(|_| config.memory.hotplug_mib > 0),
    )?;

    // Kernel, command line and initrd, then the tables that describe the devices.
    let mut boot_config = config.clone();
    if config.memory.hotplug_mib > 0 {
        // Hot-added memory goes to ZONE_MOVABLE, so it can be taken back.
        boot_config
            .cmdline
            .push_str(crate::resize::MOVABLE_MEMORY_PARAM);
    }
    if config.virtio_mmio_cmdline {
        boot_config.cmdline.push_str(&devices.virtio_cmdline());
    }
    if boot_config.cmdline.len() >= MAX_CMDLINE_LEN {
        return Err(ConfigError::CmdlineTooLong(boot_config.cmdline.len()).into());
    }
    let guest = ram.memory();
    let entry = boot::load(&guest, mem_bytes, &boot_config, format)?;
    write_acpi_tables(&guest, &config, &devices)?;
    drop(guest);
    tracing::info!(?entry, ?format, "kernel loaded");

    // vCPUs.
    let mut supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(hv("KVM_GET_SUPPORTED_CPUID"))?;
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        boot::cpuid::enable_tsc_deadline(supported_cpuid.as_mut_slice());
    }
    let msr_list = kvm
        .get_msr_index_list()
        .map_err(hv("KVM_GET_MSR_INDEX_LIST"))?;
    let msrs = boot::msr::boot_msrs(msr_list.as_slice());
    let first_run = Arc::new(OnceLock::new());
    let cpus = CpuManager::new(
        vm.clone(),
        CpuSetup {
            boot: config.vcpus.boot,
            max: config.vcpus.max,
            entry,
            supported_cpuid,
            msrs,
        },
        VcpuLinks {
            io_bus: devices.io_bus().clone(),
            mmio_bus: devices.mmio_bus().clone(),
            control: control.clone(),
            first_run: first_run.clone(),
            created,
            exits: Default::default(),
            seccomp: config.seccomp,
        },
        hotplug,
    )?;
    control::install_kick_handler().map_err(|e| VmError::Hypervisor {
        what: "installing the vCPU kick signal handler".into(),
        source: e,
    })?;

    Ok(KvmVm::assemble(
        config,
        control,
        cpus,
        memory,
        first_run,
        init_reached,
        devices,
        vm,
        ram,
    ))
}
