//! VMM-side wiring of the legacy devices: where they sit on the I/O bus, which
//! IRQ they raise, where the console goes, and what a reset or ACPI power-off
//! request does.
//!
//! The device models themselves live in `beacon-devices`; this module only
//! connects them to KVM (irqfd) and to the VM's control.

use std::fs::OpenOptions;
use std::io::{LineWriter, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use beacon_devices::acpi_pm::{AcpiPm, ACPI_PM_PORT_LEN};
use beacon_devices::legacy::i8042::I8042_PORT_LEN;
use beacon_devices::legacy::serial::SERIAL_PORT_LEN;
use beacon_devices::legacy::{BootTimer, SerialDevice, I8042};
use beacon_devices::Bus;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::control::VcpuControl;
use crate::backend::{VmError, VmExit};
use crate::config::ConsoleConfig;

/// COM1.
pub const SERIAL_PORT: u64 = 0x3f8;
/// COM1's ISA IRQ (also its GSI with the in-kernel irqchip).
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port; the command port is this + 4.
pub const I8042_PORT: u64 = 0x60;
/// The boot-timer port the guest init writes 123 to.
pub const BOOT_TIMER_PORT: u64 = 0x440;

/// The legacy devices of one VM; keeps what must live as long as the VM.
pub struct LegacyDevices {
    pub io_bus: Arc<Bus>,
    /// COM1, also fed by the console input of the device event loop.
    pub serial: super::console_input::SharedSerial,
    /// Registered as irqfd for [`SERIAL_IRQ`]; kept so the fd stays open.
    _serial_irq: EventFd,
}

fn console_writer(console: &ConsoleConfig) -> Result<Box<dyn Write + Send>, VmError> {
    Ok(match console {
        ConsoleConfig::Stdout => Box::new(std::io::stdout()),
        ConsoleConfig::Off => Box::new(std::io::sink()),
        ConsoleConfig::File(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| VmError::Device {
                    device: "serial console".into(),
                    reason: format!("cannot open {path:?} for the console log: {e}"),
                })?;
            Box::new(LineWriter::new(file))
        }
    })
}

/// Build the I/O bus with serial, i8042, boot timer and ACPI PM registers.
pub fn build(
    vm: &VmFd,
    console: &ConsoleConfig,
    control: Arc<VcpuControl>,
    created: Instant,
    init_reached: Arc<OnceLock<Duration>>,
) -> Result<LegacyDevices, VmError> {
    let device_err = |device: &str| {
        let device = device.to_string();
        move |e: beacon_devices::BusError| VmError::Device {
            device,
            reason: e.to_string(),
        }
    };
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Device {
        device: "serial".into(),
        reason: format!("creating its interrupt eventfd: {e}"),
    })?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(|e| VmError::Hypervisor {
            what: format!("KVM_IRQFD for the serial port on GSI {SERIAL_IRQ}"),
            source: e.into(),
        })?;
    let serial_evt = serial_irq.try_clone().map_err(|e| VmError::Device {
        device: "serial".into(),
        reason: format!("cloning its interrupt eventfd: {e}"),
    })?;
    let serial: super::console_input::SharedSerial = Arc::new(Mutex::new(SerialDevice::new(
        serial_evt,
        console_writer(console)?,
    )));

    let (off, reset) = (Arc::clone(&control), Arc::clone(&control));
    let acpi_pm = AcpiPm::new(
        Box::new(move || off.request_stop(VmExit::PowerOff)),
        Box::new(move || reset.request_stop(VmExit::Reboot)),
    );
    let i8042 = I8042::new(Box::new(move || control.request_stop(VmExit::Reboot)));
    let timer = BootTimer::new(created, init_reached);

    let mut bus = Bus::new();
    bus.insert(SERIAL_PORT, SERIAL_PORT_LEN, serial.clone())
        .map_err(device_err("serial"))?;
    bus.insert(I8042_PORT, I8042_PORT_LEN, Arc::new(Mutex::new(i8042)))
        .map_err(device_err("i8042"))?;
    bus.insert(BOOT_TIMER_PORT, 1, Arc::new(Mutex::new(timer)))
        .map_err(device_err("boot timer"))?;
    bus.insert(
        u64::from(crate::acpi::SLEEP_CONTROL_PORT),
        ACPI_PM_PORT_LEN,
        Arc::new(Mutex::new(acpi_pm)),
    )
    .map_err(device_err("ACPI power management"))?;
    Ok(LegacyDevices {
        io_bus: Arc::new(bus),
        serial,
        _serial_irq: serial_irq,
    })
}
