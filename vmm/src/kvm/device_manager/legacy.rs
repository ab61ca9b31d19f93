//! The legacy PC devices every VM has, at the architectural places a stock kernel
//! looks for them: COM1 (0x3f8, ISA IRQ 4) with the console behind it, the i8042
//! (0x60/0x64) whose reset ends the VM, the boot timer (0x440), and the ACPI PM
//! registers (sleep control/status and reset, described by the FADT).
//!
//! The device models live in `beacon-devices`; this module wires them to the
//! VM: ports reserved in the resource allocator, COM1's irqfd, the console's
//! buffer and event-loop subscribers, and what a reset or power-off request does.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use beacon_devices::acpi_pm::{AcpiPm, ACPI_PM_PORT_LEN};
use beacon_devices::legacy::i8042::I8042_PORT_LEN;
use beacon_devices::legacy::serial::SERIAL_PORT_LEN;
use beacon_devices::legacy::{BootTimer, SerialDevice, BOOT_TIMER_PORT, I8042};
use beacon_devices::{Bus, BusError};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::resources::ResourceAllocator;
use crate::backend::{VmError, VmExit};
use crate::config::ConsoleConfig;
use crate::kvm::console::{
    self, ConsoleBuffer, ConsoleDrain, ConsoleInput, ConsoleOutput, ConsoleSink, RotatingLog,
    SharedSerial, CONSOLE_BUFFER_BYTES, CONSOLE_LOG_MAX_BYTES,
};
use crate::kvm::control::VcpuControl;
use crate::kvm::event_loop::Subscriber;

/// COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's ISA IRQ, also its GSI with the in-kernel irqchip.
pub const COM1_GSI: u32 = 4;
/// The i8042 data port; the command port is this + 4.
pub const I8042_PORT: u16 = 0x60;

/// What the legacy devices leave the device manager to keep and to schedule.
pub struct Legacy {
    /// COM1, also fed by the console input.
    pub serial: SharedSerial,
    /// Subscribers for the event loop (console output drain, console input).
    pub subscribers: Vec<Subscriber>,
    /// COM1's irqfd; kept so the fd stays open as long as the VM.
    pub serial_irq: EventFd,
    /// The console's output buffer (None when the console is off).
    pub console: Option<Arc<ConsoleBuffer>>,
}

/// How the legacy devices end the VM and report boot time.
pub struct LegacyHooks {
    pub control: Arc<VcpuControl>,
    pub created: Instant,
    pub init_reached: Arc<OnceLock<Duration>>,
}

fn bus_err(device: &'static str) -> impl FnOnce(BusError) -> VmError {
    move |e| VmError::Device {
        device: device.into(),
        reason: e.to_string(),
    }
}

fn device_io(device: &'static str, what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |e| VmError::Device {
        device: device.into(),
        reason: format!("{what}: {e}"),
    }
}

/// A console buffer and the event-loop subscriber that drains it.
type DrainedConsole = (Arc<ConsoleBuffer>, Subscriber);

/// The console sink for `console` (or `output` instead of what it names), its
/// buffer, and the subscriber that drains it; no buffer for `off`.
fn console_sink(
    console: &ConsoleConfig,
    output: Option<ConsoleOutput>,
) -> Result<(ConsoleSink, Option<DrainedConsole>), VmError> {
    let output = match (output, console) {
        (Some(output), _) => output,
        (None, ConsoleConfig::Off) => return Ok((Box::new(std::io::sink()), None)),
        (None, ConsoleConfig::Stdout) => ConsoleOutput::stdout()?,
        (None, ConsoleConfig::File(path)) => ConsoleOutput::File(Box::new(
            RotatingLog::open(path, CONSOLE_LOG_MAX_BYTES).map_err(|e| VmError::Device {
                device: "serial console".into(),
                reason: format!("cannot open {path:?} for the console log: {e}"),
            })?,
        )),
    };
    let buffer = ConsoleBuffer::new(CONSOLE_BUFFER_BYTES)?;
    let drain: Subscriber = Box::new(ConsoleDrain::new(buffer.clone(), output));
    Ok((buffer.sink(), Some((buffer, drain))))
}

/// Put the legacy devices on `io_bus` and register COM1's interrupt.
pub fn attach(
    vm: &VmFd,
    io_bus: &Bus,
    resources: &mut ResourceAllocator,
    console: &ConsoleConfig,
    output: Option<ConsoleOutput>,
    hooks: LegacyHooks,
) -> Result<Legacy, VmError> {
    resources.reserve_ports(COM1_PORT, SERIAL_PORT_LEN as u16, "serial")?;
    resources.reserve_ports(I8042_PORT, I8042_PORT_LEN as u16, "i8042")?;
    resources.reserve_ports(BOOT_TIMER_PORT, 1, "boot timer")?;
    resources.reserve_ports(
        crate::acpi::SLEEP_CONTROL_PORT,
        ACPI_PM_PORT_LEN as u16,
        "ACPI power management",
    )?;

    let serial_irq = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(device_io("serial", "creating its interrupt eventfd"))?;
    vm.register_irqfd(&serial_irq, COM1_GSI)
        .map_err(|e| VmError::Hypervisor {
            what: format!("KVM_IRQFD for the serial port on GSI {COM1_GSI}"),
            source: e.into(),
        })?;
    let (sink, drained) = console_sink(console, output)?;
    let (buffer, drain) = drained.unzip();
    let mut subscribers: Vec<Subscriber> = drain.into_iter().collect();
    // Console input only when the console is this process's terminal side.
    let input = match console {
        ConsoleConfig::Stdout => console::stdin_dup(),
        _ => None,
    };
    let room = match input {
        Some(_) => Some(
            EventFd::new(libc::EFD_NONBLOCK)
                .map_err(device_io("serial", "creating its input eventfd"))?,
        ),
        None => None,
    };
    let serial: SharedSerial = Arc::new(Mutex::new(SerialDevice::with_input_room(
        serial_irq
            .try_clone()
            .map_err(device_io("serial", "cloning its interrupt eventfd"))?,
        sink,
        room.as_ref()
            .map(EventFd::try_clone)
            .transpose()
            .map_err(device_io("serial", "cloning its input eventfd"))?,
    )));
    if let (Some(input), Some(room)) = (input, room) {
        subscribers.push(Box::new(ConsoleInput::new(input, serial.clone(), room)));
    }

    let LegacyHooks {
        control,
        created,
        init_reached,
    } = hooks;
    let (off, reset) = (Arc::clone(&control), Arc::clone(&control));
    let acpi_pm = AcpiPm::new(
        Box::new(move || off.request_stop(VmExit::PowerOff)),
        Box::new(move || reset.request_stop(VmExit::Reboot)),
    );
    let i8042 = I8042::new(Box::new(move || control.request_stop(VmExit::Reboot)));
    let timer = BootTimer::new(created, init_reached);

    io_bus
        .insert(u64::from(COM1_PORT), SERIAL_PORT_LEN, serial.clone())
        .map_err(bus_err("serial"))?;
    io_bus
        .insert(
            u64::from(I8042_PORT),
            I8042_PORT_LEN,
            Arc::new(Mutex::new(i8042)),
        )
        .map_err(bus_err("i8042"))?;
    io_bus
        .insert(u64::from(BOOT_TIMER_PORT), 1, Arc::new(Mutex::new(timer)))
        .map_err(bus_err("boot timer"))?;
    io_bus
        .insert(
            u64::from(crate::acpi::SLEEP_CONTROL_PORT),
            ACPI_PM_PORT_LEN,
            Arc::new(Mutex::new(acpi_pm)),
        )
        .map_err(bus_err("ACPI power management"))?;
    Ok(Legacy {
        serial,
        subscribers,
        serial_irq,
        console: buffer,
    })
}
