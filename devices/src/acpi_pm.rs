//! The hardware-reduced ACPI power-management registers on three I/O ports: sleep
//! control (the guest writes `SLP_TYP << 2 | SLP_EN` to enter a sleep state; S5 is
//! power off), sleep status (reads 0), and the reset register.
//!
//! The device only decodes guest writes and calls back; what "power off" and "reset"
//! mean belongs to the VMM. Odd sizes and offsets are ignored, never a panic.

use crate::bus::BusDevice;

/// Offsets inside the device's three-port range.
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
pub const SLEEP_STATUS_OFFSET: u64 = 1;
pub const RESET_OFFSET: u64 = 2;
/// Number of ports the device occupies.
pub const ACPI_PM_PORT_LEN: u64 = 3;
/// The SLP_TYP value that means S5 (soft off); the DSDT's `\_S5` must match.
pub const S5_SLEEP_TYPE: u8 = 5;
/// SLP_EN bit of the sleep control register.
pub const SLEEP_ENABLE: u8 = 1 << 5;
/// The value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 0x42;

/// Is this sleep-control value a request to power off?
pub fn is_poweroff_request(value: u8) -> bool {
    value & SLEEP_ENABLE != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE
}

type Callback = Box<dyn FnMut() + Send>;

pub struct AcpiPm {
    on_poweroff: Callback,
    on_reset: Callback,
}

impl AcpiPm {
    pub fn new(on_poweroff: Callback, on_reset: Callback) -> Self {
        Self {
            on_poweroff,
            on_reset,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status (WAK_STS) and the others read as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            tracing::debug!(offset, len = data.len(), "ignoring non-byte ACPI PM write");
            return;
        };
        match offset {
            SLEEP_CONTROL_OFFSET if is_poweroff_request(*value) => {
                tracing::info!("guest requested ACPI power off (S5)");
                (self.on_poweroff)();
            }
            SLEEP_CONTROL_OFFSET => {
                tracing::debug!(value, "ignoring a sleep state other than S5");
            }
            RESET_OFFSET if *value == RESET_VALUE => {
                tracing::info!("guest requested an ACPI reset");
                (self.on_reset)();
            }
            _ => tracing::debug!(offset, value, "ignoring ACPI PM write"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn device() -> (AcpiPm, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let off = Arc::new(AtomicUsize::new(0));
        let reset = Arc::new(AtomicUsize::new(0));
        let (o, r) = (Arc::clone(&off), Arc::clone(&reset));
        let pm = AcpiPm::new(
            Box::new(move || {
                o.fetch_add(1, Ordering::SeqCst);
            }),
            Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }),
        );
        (pm, off, reset)
    }

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let (mut pm, off, reset) = device();
        pm.write(SLEEP_CONTROL_OFFSET, &[S5_SLEEP_TYPE << 2 | SLEEP_ENABLE]);
        assert_eq!(off.load(Ordering::SeqCst), 1);
        pm.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(reset.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn everything_else_is_ignored() {
        let (mut pm, off, reset) = device();
        pm.write(SLEEP_CONTROL_OFFSET, &[S5_SLEEP_TYPE << 2]); // no SLP_EN
        pm.write(SLEEP_CONTROL_OFFSET, &[3 << 2 | SLEEP_ENABLE]); // S3
        pm.write(SLEEP_CONTROL_OFFSET, &[]);
        pm.write(SLEEP_CONTROL_OFFSET, &[0x34, 0x00]);
        pm.write(RESET_OFFSET, &[0x41]);
        pm.write(SLEEP_STATUS_OFFSET, &[0xff]);
        pm.write(u64::MAX, &[RESET_VALUE]);
        assert_eq!(off.load(Ordering::SeqCst), 0);
        assert_eq!(reset.load(Ordering::SeqCst), 0);
        let mut buf = [0xaa; 8];
        pm.read(SLEEP_STATUS_OFFSET, &mut buf);
        assert_eq!(buf, [0; 8]);
        pm.read(99, &mut []);
    }
}
