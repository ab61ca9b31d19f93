//! The boot-timer port: the guest init writes [`BOOT_TIMER_MAGIC`] to it once it
//! runs, and the VMM learns how long the boot took.
//!
//! The timer measures from an instant the VMM chooses (its own start) and stores the
//! first mark in a shared cell; later writes are ignored so a guest cannot move the
//! figure. It records and logs, nothing else.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::bus::BusDevice;

/// The byte the guest writes to mark "init reached" (Firecracker's convention).
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// The I/O port the guest writes it to, on every backend (guest inits write
/// through `/dev/port`; the QEMU backend listens there with `isa-debugcon`).
pub const BOOT_TIMER_PORT: u16 = 0x440;

/// The boot-timer device.
pub struct BootTimer {
    start: Instant,
    init_reached: Arc<OnceLock<Duration>>,
}

impl BootTimer {
    /// A timer measuring from `start` that stores the mark in `init_reached`.
    pub fn new(start: Instant, init_reached: Arc<OnceLock<Duration>>) -> Self {
        Self {
            start,
            init_reached,
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&BOOT_TIMER_MAGIC) {
            tracing::debug!(offset, len = data.len(), "boot timer: ignored write");
            return;
        }
        let elapsed = self.start.elapsed();
        if self.init_reached.set(elapsed).is_ok() {
            tracing::info!(
                "guest init reached after {} µs since VMM start",
                elapsed.as_micros()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_first_magic_write_only() {
        let cell = Arc::new(OnceLock::new());
        let start = Instant::now();
        let mut timer = BootTimer::new(start, cell.clone());
        timer.write(0, &[0]);
        timer.write(1, &[BOOT_TIMER_MAGIC]);
        timer.write(0, &[]);
        assert!(
            cell.get().is_none(),
            "wrong value, offset or size records nothing"
        );

        timer.write(0, &[BOOT_TIMER_MAGIC]);
        let first = *cell.get().expect("recorded");
        assert!(first <= start.elapsed());
        std::thread::sleep(Duration::from_millis(2));
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(
            cell.get(),
            Some(&first),
            "a second write does not move the mark"
        );
    }

    #[test]
    fn reads_and_odd_writes_are_harmless() {
        let cell = Arc::new(OnceLock::new());
        let mut timer = BootTimer::new(Instant::now(), cell.clone());
        let mut data = [0xffu8; 8];
        timer.read(u64::MAX, &mut data);
        assert_eq!(data, [0; 8]);
        timer.write(u64::MAX, &[BOOT_TIMER_MAGIC; 8]);
        assert!(cell.get().is_none());
        // A wide write starting with the magic at offset 0 still counts: some
        // tools write the port with `outl`.
        timer.write(0, &[BOOT_TIMER_MAGIC, 0, 0, 0]);
        assert!(cell.get().is_some());
    }
}
