//! A 16550A UART on the bus, backed by `vm_superio::Serial`.
//!
//! The register model is vm-superio's; this wrapper adapts it to [`BusDevice`]
//! (byte accesses at offsets 0..8) and raises the interrupt through an eventfd the
//! VMM registers as an irqfd. Guest output goes to any `Write` sink; a failing
//! sink loses bytes but never stops the guest. When the guest has read the
//! receive FIFO empty, an optional "room" eventfd is written, so whoever feeds
//! host input can wait for room instead of polling.

use std::io::Write;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// The number of I/O ports a 16550 decodes.
pub const SERIAL_PORT_LEN: u64 = 8;

/// An eventfd that vm-superio can trigger (the VMM wires it to the guest IRQ).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Signals "the receive FIFO has room again" through an eventfd.
#[derive(Debug)]
pub struct InputRoom(Option<EventFd>);

impl SerialEvents for InputRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Some(evt) = &self.0 {
            let _ = evt.write(1);
        }
    }
}

/// A UART whose output goes to `W`.
pub struct SerialDevice<W: Write + Send> {
    uart: Serial<EventFdTrigger, InputRoom, W>,
    /// Writes the sink refused, reported once so a full disk does not flood the log.
    lost_warned: bool,
}

impl<W: Write + Send> SerialDevice<W> {
    /// A UART raising `interrupt` and writing guest output to `out`.
    pub fn new(interrupt: EventFd, out: W) -> Self {
        Self::with_input_room(interrupt, out, None)
    }

    /// Like [`Self::new`], and writes `room` each time the guest has emptied the
    /// receive FIFO.
    pub fn with_input_room(interrupt: EventFd, out: W, room: Option<EventFd>) -> Self {
        Self {
            uart: Serial::with_events(EventFdTrigger(interrupt), InputRoom(room), out),
            lost_warned: false,
        }
    }

    /// The output sink (tests read what the guest wrote).
    pub fn sink(&self) -> &W {
        self.uart.writer()
    }

    /// Free space in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Offer host input to the guest; returns how many leading bytes the receive
    /// FIFO took. The caller keeps the rest and offers it again once the guest has
    /// read (nothing is dropped here).
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        let fits = bytes.len().min(self.uart.fifo_capacity());
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            // The bytes are queued before the interrupt is raised, so a failed
            // trigger still consumed them.
            Err(e) => {
                tracing::warn!("serial: raising the receive interrupt failed: {e:?}");
                fits
            }
        }
    }
}

impl<W: Write + Send> BusDevice for SerialDevice<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [byte]) if u64::from(off) < SERIAL_PORT_LEN => *byte = self.uart.read(off),
            (_, data) => {
                tracing::debug!(offset, len = data.len(), "serial: ignored odd read");
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), [value]) = (u8::try_from(offset), data) else {
            tracing::debug!(offset, len = data.len(), "serial: ignored odd write");
            return;
        };
        if u64::from(off) >= SERIAL_PORT_LEN {
            tracing::debug!(offset, "serial: ignored write past the UART");
            return;
        }
        if let Err(e) = self.uart.write(off, *value) {
            if !self.lost_warned {
                tracing::warn!(
                    "serial: console output or interrupt failed, bytes may be lost: {e:?}"
                );
                self.lost_warned = true;
            }
        }
        // The console is read by people and log collectors while the guest runs:
        // push each line out as it completes.
        if *value == b'\n' && off == 0 {
            let _ = self.uart.writer_mut().flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (SerialDevice<Vec<u8>>, EventFd) {
        let irq = EventFd::new(libc_nonblock()).expect("eventfd");
        let dev = SerialDevice::new(irq.try_clone().expect("clone"), Vec::new());
        (dev, irq)
    }

    fn libc_nonblock() -> i32 {
        // EFD_NONBLOCK without a libc dependency for one constant.
        0o4000
    }

    #[test]
    fn transmitted_bytes_reach_the_sink() {
        let (mut dev, _irq) = device();
        for b in b"hello\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(dev.sink().as_slice(), b"hello\n");
    }

    #[test]
    fn thr_empty_interrupt_fires_when_enabled() {
        let (mut dev, irq) = device();
        // IER: enable the "transmitter holding register empty" interrupt.
        dev.write(1, &[0x02]);
        dev.write(0, b"x");
        assert!(irq.read().expect("interrupt raised") >= 1);
        // LSR (offset 5) says the transmitter is empty again.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty bit set");
    }

    #[test]
    fn host_input_fills_the_fifo_and_the_guest_reads_it_in_order() {
        let (mut dev, irq) = device();
        // IER: enable the "received data available" interrupt.
        dev.write(1, &[0x01]);
        let room = dev.input_room();
        assert!(room > 0);
        let input: Vec<u8> = (0..room + 10).map(|i| i as u8).collect();
        let taken = dev.queue_input(&input);
        assert_eq!(taken, room, "exactly the free space is taken");
        assert_eq!(
            dev.queue_input(&input[taken..]),
            0,
            "a full FIFO takes nothing"
        );
        assert!(irq.read().expect("receive interrupt raised") >= 1);
        for expected in &input[..taken] {
            let mut byte = [0u8];
            dev.read(0, &mut byte);
            assert_eq!(byte[0], *expected);
        }
        assert_eq!(
            dev.queue_input(&input[taken..]),
            10,
            "room again after reads"
        );
    }

    #[test]
    fn emptying_the_fifo_signals_room() {
        let irq = EventFd::new(libc_nonblock()).expect("eventfd");
        let room = EventFd::new(libc_nonblock()).expect("eventfd");
        let mut dev =
            SerialDevice::with_input_room(irq, Vec::new(), Some(room.try_clone().expect("clone")));
        dev.queue_input(b"ab");
        let mut byte = [0u8];
        dev.read(0, &mut byte);
        assert!(room.read().is_err(), "one byte still in the FIFO");
        dev.read(0, &mut byte);
        assert_eq!(room.read().expect("room signalled"), 1);
    }

    #[test]
    fn hostile_accesses_are_ignored() {
        let (mut dev, _irq) = device();
        let mut wide = [0xaau8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
        dev.write(0, &[1, 2, 3, 4]);
        dev.write(0, &[]);
        dev.read(0, &mut []);
        dev.write(8, b"z");
        dev.write(u64::MAX, b"z");
        let mut one = [0xaau8];
        dev.read(u64::MAX, &mut one);
        assert_eq!(one, [0]);
        assert!(dev.sink().is_empty(), "no odd access produced output");
    }
}
