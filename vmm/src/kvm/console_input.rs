//! Host console input for the guest's serial port, and the VMM's device event loop
//! (event-manager) that serves it on its own thread, `beacon-events`.
//!
//! Input is read from a duplicate of stdin only while the UART's receive FIFO has
//! room; what does not fit yet stays in [`ConsoleInput::pending`] and is offered
//! again on the next turn of the loop, so no byte is dropped. A stdin that cannot
//! be polled (`/dev/null`, a regular file) simply gives no input. The loop ends
//! when the VM stops.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use beacon_devices::legacy::SerialDevice;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use super::control::VcpuControl;
use crate::backend::VmError;

/// How long one turn of the event loop may wait (it then re-offers pending input
/// and checks whether the VM is stopping).
const LOOP_TICK_MS: i32 = 20;

/// The VM's console sink.
pub type ConsoleSink = Box<dyn Write + Send>;
/// COM1 as shared by the I/O bus and the event loop.
pub type SharedSerial = Arc<Mutex<SerialDevice<ConsoleSink>>>;
type SharedInput = Arc<Mutex<ConsoleInput<ConsoleSink>>>;

/// Feeds host bytes into the guest's UART.
pub struct ConsoleInput<W: Write + Send> {
    input: File,
    serial: Arc<Mutex<SerialDevice<W>>>,
    /// Read from the host, not yet taken by the UART.
    pending: Vec<u8>,
    open: bool,
}

impl<W: Write + Send> ConsoleInput<W> {
    pub fn new(input: File, serial: Arc<Mutex<SerialDevice<W>>>) -> Self {
        Self {
            input,
            serial,
            pending: Vec::new(),
            open: true,
        }
    }

    /// Hand as much pending input to the UART as its FIFO takes.
    pub fn flush_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let taken = match self.serial.lock() {
            Ok(mut s) => s.queue_input(&self.pending),
            Err(p) => p.into_inner().queue_input(&self.pending),
        };
        self.pending.drain(..taken);
    }

    /// Bytes read from the host but not yet in the UART.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Read what the UART has room for. False when the input has ended.
    fn read_input(&mut self) -> bool {
        if !self.pending.is_empty() {
            // The FIFO is still full: leave the rest in the host's pipe.
            return true;
        }
        let room = match self.serial.lock() {
            Ok(s) => s.input_room(),
            Err(p) => p.into_inner().input_room(),
        };
        if room == 0 {
            return true;
        }
        let mut buf = vec![0u8; room];
        match self.input.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                self.flush_pending();
                true
            }
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => true,
            Err(e) => {
                tracing::warn!("console input failed ({e}); no more input for the guest");
                false
            }
        }
    }
}

impl<W: Write + Send> MutEventSubscriber for ConsoleInput<W> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.input.as_fd(), EventSet::IN)) {
            // /dev/null and regular files cannot be polled: no console input.
            tracing::debug!("console input not pollable ({e:?}); the guest gets no input");
            self.open = false;
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let set = events.event_set();
        let still_open = if set.contains(EventSet::IN) {
            self.read_input()
        } else {
            !set.intersects(EventSet::HANG_UP | EventSet::ERROR)
        };
        if !still_open && self.open {
            self.open = false;
            if let Err(e) = ops.remove(events) {
                tracing::debug!("removing console input from the event loop: {e:?}");
            }
        }
        // While the FIFO is full the fd stays readable; back off until the guest
        // has read instead of spinning on it.
        if self.open && !self.pending.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(
                u64::try_from(LOOP_TICK_MS).unwrap_or(20),
            ));
        }
    }
}

/// Duplicate stdin for the console (the VMM must not close the process's stdin).
pub fn stdin_dup() -> Option<File> {
    std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .map_err(|e| tracing::debug!("cannot duplicate stdin for console input: {e}"))
        .ok()
        .filter(|f| f.as_raw_fd() >= 0)
}

/// Start the device event loop with the console input; it ends when the VM stops.
pub fn spawn_event_loop(
    input: Option<File>,
    serial: SharedSerial,
    control: Arc<VcpuControl>,
) -> Result<JoinHandle<()>, VmError> {
    let mut manager: EventManager<SharedInput> =
        EventManager::new().map_err(|e| VmError::Device {
            device: "event loop".into(),
            reason: format!("creating the epoll set: {e:?}"),
        })?;
    let console = input.map(|f| Arc::new(Mutex::new(ConsoleInput::new(f, serial))));
    if let Some(c) = &console {
        manager.add_subscriber(Arc::clone(c));
    }
    std::thread::Builder::new()
        .name("beacon-events".into())
        .spawn(move || {
            while !control.should_stop() {
                if let Err(e) = manager.run_with_timeout(LOOP_TICK_MS) {
                    tracing::warn!("device event loop failed: {e:?}");
                    break;
                }
                if let Some(c) = &console {
                    if let Ok(mut c) = c.lock() {
                        c.flush_pending();
                    }
                }
            }
        })
        .map_err(VmError::io("starting the device event loop thread"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use beacon_devices::BusDevice;
    use vmm_sys_util::eventfd::EventFd;

    fn uart() -> Arc<Mutex<SerialDevice<Vec<u8>>>> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        Arc::new(Mutex::new(SerialDevice::new(irq, Vec::new())))
    }

    fn guest_reads(serial: &Arc<Mutex<SerialDevice<Vec<u8>>>>, n: usize) -> Vec<u8> {
        let mut s = serial.lock().expect("lock");
        (0..n)
            .map(|_| {
                let mut b = [0u8];
                s.read(0, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn input_reaches_the_guest_in_order_without_loss() {
        let (reader, mut writer) = std::io::pipe().expect("pipe");
        let serial = uart();
        let mut input = ConsoleInput::new(
            File::from(std::os::fd::OwnedFd::from(reader)),
            serial.clone(),
        );
        let room = serial.lock().expect("lock").input_room();
        let data: Vec<u8> = (0..room * 3).map(|i| (i % 251) as u8).collect();
        writer.write_all(&data).expect("write");
        drop(writer);
        let mut got = Vec::new();
        // The guest reads whatever is in the FIFO each turn; the input refills it.
        while got.len() < data.len() {
            assert!(input.read_input() || input.pending() > 0 || got.len() < data.len());
            let avail = room - serial.lock().expect("lock").input_room();
            got.extend(guest_reads(&serial, avail));
            input.flush_pending();
        }
        assert_eq!(got, data);
        assert!(!input.read_input(), "end of input is noticed");
    }

    #[test]
    fn event_loop_ends_when_the_vm_stops() {
        let (reader, _writer) = std::io::pipe().expect("pipe");
        let serial: SharedSerial = {
            let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            Arc::new(Mutex::new(SerialDevice::new(
                irq,
                Box::new(std::io::sink()) as Box<dyn Write + Send>,
            )))
        };
        let control = Arc::new(VcpuControl::new());
        let handle = spawn_event_loop(
            Some(File::from(std::os::fd::OwnedFd::from(reader))),
            serial,
            control.clone(),
        )
        .expect("spawn");
        control.request_stop(crate::backend::VmExit::PowerOff);
        handle.join().expect("event loop thread ended");
    }
}
