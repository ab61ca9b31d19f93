//! Just enough of an i8042 keyboard controller for Linux to probe it quickly and to
//! reset the machine through it (`reboot=k`: command 0xfe on port 0x64).
//!
//! Ports are decoded relative to 0x60: offset 0 is the data port, offset 4 the
//! status/command port. There is no keyboard behind it; the controller answers the
//! probe commands Linux sends (self test, read/write command byte, interface test)
//! so the driver does not wait for timeouts. A reset request is handed to the
//! callback the VMM gave; the device never stops anything itself.

use crate::bus::BusDevice;

/// Data port offset (0x60 - 0x60).
pub const DATA_OFFSET: u64 = 0;
/// Status (read) / command (write) port offset (0x64 - 0x60).
pub const COMMAND_OFFSET: u64 = 4;
/// The span of ports the controller decodes from its base.
pub const I8042_PORT_LEN: u64 = 5;

/// Status bit: output buffer full (a byte waits on the data port).
const SB_OUT_FULL: u8 = 0x01;
/// Status bit: the last write was a command (port 0x64).
const SB_LAST_WAS_CMD: u8 = 0x08;
/// Status bit: keyboard not inhibited.
const SB_KBD_ENABLED: u8 = 0x10;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_WRITE_AUX: u8 = 0xd4;
/// Pulse the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// Default command byte: keyboard interrupt on, system flag set, translation on.
const CTR_DEFAULT: u8 = 0x47;

/// Something to call when the guest pulses the reset line.
pub type ResetCallback = Box<dyn Fn() + Send>;

/// The controller.
pub struct I8042 {
    status: u8,
    ctr: u8,
    /// The byte waiting on the data port, if any.
    output: Option<u8>,
    /// A command that takes its parameter from the next data-port write.
    pending: Option<u8>,
    on_reset: ResetCallback,
    resets: u64,
}

impl I8042 {
    /// A controller that calls `on_reset` when the guest asks for a CPU reset.
    pub fn new(on_reset: ResetCallback) -> Self {
        Self {
            status: SB_KBD_ENABLED,
            ctr: CTR_DEFAULT,
            output: None,
            pending: None,
            on_reset,
            resets: 0,
        }
    }

    /// How many reset requests the guest made (tests and logs).
    pub fn resets(&self) -> u64 {
        self.resets
    }

    fn push_output(&mut self, byte: u8) {
        self.output = Some(byte);
        self.status |= SB_OUT_FULL;
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_CMD;
        match cmd {
            CMD_READ_CTR => self.push_output(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_AUX => self.pending = Some(cmd),
            CMD_SELF_TEST => self.push_output(0x55),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push_output(0x00),
            CMD_DISABLE_KBD => self.status &= !SB_KBD_ENABLED,
            CMD_ENABLE_KBD => self.status |= SB_KBD_ENABLED,
            CMD_DISABLE_AUX | CMD_ENABLE_AUX => {}
            CMD_RESET_CPU => {
                self.resets += 1;
                tracing::info!("i8042: guest requested a CPU reset");
                (self.on_reset)();
            }
            other => tracing::debug!(command = other, "i8042: ignored command"),
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !SB_LAST_WAS_CMD;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            // No mouse: the byte meant for it goes nowhere.
            Some(_) => {}
            // A byte for the keyboard itself: acknowledge it (0xfa) so the driver's
            // keyboard probe ends at once instead of timing out.
            None => self.push_output(0xfa),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(byte) = data.first_mut() else {
            return;
        };
        match offset {
            DATA_OFFSET => {
                *byte = self.output.take().unwrap_or(0);
                self.status &= !SB_OUT_FULL;
            }
            COMMAND_OFFSET => *byte = self.status,
            _ => tracing::debug!(offset, "i8042: ignored read"),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            tracing::debug!(offset, len = data.len(), "i8042: ignored write of odd size");
            return;
        };
        match offset {
            DATA_OFFSET => self.data(*value),
            COMMAND_OFFSET => self.command(*value),
            _ => tracing::debug!(offset, "i8042: ignored write"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn controller() -> (I8042, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        let dev = I8042::new(Box::new(move || {
            seen.fetch_add(1, Ordering::SeqCst);
        }));
        (dev, count)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_calls_back() {
        let (mut dev, count) = controller();
        // Linux waits for the input buffer to drain (status bit 1) before writing.
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & 0x02, 0);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(count.load(Ordering::SeqCst), 1);
        assert_eq!(dev.resets(), 1);
        // 0xfe on the data port is a keyboard byte, not a reset.
        dev.write(DATA_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn answers_the_linux_probe() {
        let (mut dev, _) = controller();
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut dev, COMMAND_OFFSET) & SB_OUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x55);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & SB_OUT_FULL, 0);

        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_OFFSET), CTR_DEFAULT);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x65]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x65);
    }

    #[test]
    fn hostile_accesses_never_reset_or_panic() {
        let (mut dev, count) = controller();
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU, 0]);
        dev.write(COMMAND_OFFSET, &[]);
        dev.write(u64::MAX, &[CMD_RESET_CPU]);
        dev.write(1, &[CMD_RESET_CPU]);
        let mut wide = [0xffu8; 8];
        dev.read(COMMAND_OFFSET, &mut wide);
        assert_eq!(&wide[1..], &[0; 7]);
        dev.read(3, &mut wide);
        dev.read(0, &mut []);
        assert_eq!(count.load(Ordering::SeqCst), 0);
        for cmd in 0..=u8::MAX {
            if cmd != CMD_RESET_CPU {
                dev.write(COMMAND_OFFSET, &[cmd]);
                dev.write(DATA_OFFSET, &[cmd]);
            }
        }
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }
}
