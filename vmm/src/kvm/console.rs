//! The host side of the guest's serial console: where its output goes and where
//! its input comes from, without ever blocking a vCPU or the event loop.
//!
//! Output: the UART (on a vCPU thread) writes into a bounded [`ConsoleBuffer`] and
//! never waits; the device event loop drains it ([`ConsoleDrain`]) into stdout
//! (through a non-blocking file description of its own, so the process's stdout
//! stays blocking for everyone else), a size-capped log file ([`RotatingLog`]:
//! past [`CONSOLE_LOG_MAX_BYTES`] the file is copied to `<path>.1` and starts
//! over), or nowhere. When nobody reads stdout, bytes beyond the buffer are
//! dropped and counted, so a guest flooding COM1 can neither stall its vCPUs nor
//! keep `kill()` from ending the VM.
//!
//! Input: host stdin is read only as far as the UART's receive FIFO has room
//! ([`ConsoleInput`]); when it is full, stdin leaves the epoll set until the
//! guest has emptied the FIFO (the UART signals that through an eventfd). No
//! byte is dropped and nothing sleeps.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use beacon_common::lock;
use beacon_devices::legacy::SerialDevice;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::VmError;

/// Console bytes held for a slow reader before new ones are dropped.
pub const CONSOLE_BUFFER_BYTES: usize = 256 << 10;
/// Size at which a console log file is rotated to `<path>.1`.
pub const CONSOLE_LOG_MAX_BYTES: u64 = 4 << 20;

/// The UART's output sink.
pub type ConsoleSink = Box<dyn Write + Send>;
/// COM1, shared by the I/O bus and the console input.
pub type SharedSerial = Arc<Mutex<SerialDevice<ConsoleSink>>>;

#[derive(Default)]
struct Pending {
    bytes: VecDeque<u8>,
    dropped: u64,
}

/// Console output on its way from the UART to the host.
pub struct ConsoleBuffer {
    pending: Mutex<Pending>,
    /// Written when the buffer goes from empty to non-empty.
    ready: EventFd,
    capacity: usize,
}

impl ConsoleBuffer {
    pub fn new(capacity: usize) -> Result<Arc<Self>, VmError> {
        Ok(Arc::new(Self {
            pending: Mutex::new(Pending::default()),
            ready: EventFd::new(libc::EFD_NONBLOCK)
                .map_err(VmError::io("creating the console output eventfd"))?,
            capacity,
        }))
    }

    /// A writer for the UART: takes what fits, drops (and counts) the rest.
    pub fn sink(self: &Arc<Self>) -> ConsoleSink {
        Box::new(BufferWriter(self.clone()))
    }

    /// Bytes dropped because the buffer was full.
    pub fn dropped(&self) -> u64 {
        lock(&self.pending).dropped
    }
}

struct BufferWriter(Arc<ConsoleBuffer>);

impl Write for BufferWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut p = lock(&self.0.pending);
        let was_empty = p.bytes.is_empty();
        let take = buf.len().min(self.0.capacity.saturating_sub(p.bytes.len()));
        p.bytes.extend(&buf[..take]);
        p.dropped = p.dropped.saturating_add((buf.len() - take) as u64);
        drop(p);
        if was_empty && take > 0 {
            let _ = self.0.ready.write(1);
        }
        // Never an error: the guest must not see its console fail.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A log file that starts over (keeping one previous part) past a size limit.
///
/// Both files are opened when the log is: rotating copies the current part
/// into `<path>.1` and truncates the current part in place, with no path
/// operation, because it runs on the device event loop, whose thread may
/// open, rename or create no file once confined ([`crate::seccomp`]).
pub struct RotatingLog {
    file: File,
    previous: File,
    size: u64,
    max: u64,
}

impl RotatingLog {
    /// Append to `path`, rotating it into `<path>.1` past `max` bytes.
    pub fn open(path: &Path, max: u64) -> std::io::Result<Self> {
        let file = Self::open_file(path, true)?;
        let mut old = path.to_path_buf().into_os_string();
        old.push(".1");
        let previous = Self::open_file(Path::new(&old), false)?;
        let size = file.metadata()?.len();
        Ok(Self {
            file,
            previous,
            size,
            max,
        })
    }

    fn open_file(path: &Path, append: bool) -> std::io::Result<File> {
        OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .append(append)
            .mode(0o640)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
    }

    /// The current part becomes the previous one (a copy), then starts over.
    fn rotate(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.previous.set_len(0)?;
        let mut buf = [0u8; 64 << 10];
        let mut at = 0u64;
        loop {
            let n = self.file.read_at(&mut buf, at)?;
            if n == 0 {
                break;
            }
            self.previous.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        // Appends land at the new end: the start.
        self.file.set_len(0)?;
        self.size = 0;
        Ok(())
    }
}

impl Write for RotatingLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.size > 0 && self.size.saturating_add(buf.len() as u64) > self.max {
            self.rotate()?;
        }
        let n = self.file.write(buf)?;
        self.size = self.size.saturating_add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Where drained console bytes go.
pub enum ConsoleOutput {
    /// A pipe, FIFO or terminal, through a non-blocking description of our own.
    NonBlocking(File),
    /// A socket: non-blocking sends.
    Socket(OwnedFd),
    /// A regular file (writes do not wait on a reader).
    File(Box<dyn Write + Send>),
}

impl ConsoleOutput {
    /// This process's stdout, made safe to write from the event loop.
    pub fn stdout() -> Result<Self, VmError> {
        let stdout = std::io::stdout();
        let fd = stdout.as_fd();
        let dup = || {
            fd.try_clone_to_owned()
                .map_err(VmError::io("duplicating stdout for the console"))
        };
        let meta = File::from(dup()?)
            .metadata()
            .map_err(VmError::io("inspecting stdout for the console"))?;
        let kind = meta.file_type();
        if kind.is_file() {
            return Ok(Self::File(Box::new(File::from(dup()?))));
        }
        if kind.is_socket() {
            return Ok(Self::Socket(dup()?));
        }
        // A fresh open of the same pipe or terminal gets its own file status
        // flags, so O_NONBLOCK here does not change the process's stdout.
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
            .map(Self::NonBlocking)
            .map_err(|e| VmError::Device {
                device: "serial console".into(),
                reason: format!(
                    "cannot reopen stdout ({path}) without blocking: {e}; use --console FILE or off"
                ),
            })
    }

    fn write_some(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::NonBlocking(f) => f.write(buf),
            Self::File(w) => {
                w.write_all(buf)?;
                w.flush()?;
                Ok(buf.len())
            }
            Self::Socket(fd) => {
                // SAFETY: `buf` is valid for `buf.len()` bytes; `fd` is an open socket.
                let n = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        buf.as_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }
        }
    }

    fn raw_fd(&self) -> Option<i32> {
        match self {
            Self::NonBlocking(f) => Some(f.as_raw_fd()),
            Self::Socket(fd) => Some(fd.as_raw_fd()),
            Self::File(_) => None,
        }
    }
}

const TOKEN_READY: u32 = 0;
const TOKEN_WRITABLE: u32 = 1;

/// Drains a [`ConsoleBuffer`] into a [`ConsoleOutput`] on the event loop.
pub struct ConsoleDrain {
    buffer: Arc<ConsoleBuffer>,
    out: Option<ConsoleOutput>,
    waiting_writable: bool,
    reported_drops: u64,
}

impl ConsoleDrain {
    pub fn new(buffer: Arc<ConsoleBuffer>, out: ConsoleOutput) -> Self {
        Self {
            buffer,
            out: Some(out),
            waiting_writable: false,
            reported_drops: 0,
        }
    }

    /// Write out what is pending until done or the output would block.
    /// Returns true when the output would block with bytes still pending.
    fn flush(&mut self) -> bool {
        loop {
            let mut p = lock(&self.buffer.pending);
            let dropped = p.dropped;
            if p.bytes.is_empty() {
                drop(p);
                self.report_drops(dropped);
                return false;
            }
            let Some(out) = self.out.as_mut() else {
                p.bytes.clear();
                return false;
            };
            // Copy a bounded chunk out, so the UART is not held up by our write.
            let chunk: Vec<u8> = {
                let (a, _) = p.bytes.as_slices();
                a[..a.len().min(64 << 10)].to_vec()
            };
            drop(p);
            match out.write_some(&chunk) {
                Ok(0) => return true,
                Ok(n) => {
                    lock(&self.buffer.pending).bytes.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(
                        "console output failed ({e}); further guest console output is discarded"
                    );
                    self.out = None;
                }
            }
        }
    }

    fn report_drops(&mut self, dropped: u64) {
        if dropped > self.reported_drops {
            tracing::warn!(
                dropped,
                "console output nobody read in time was dropped ({} bytes in all)",
                dropped
            );
            self.reported_drops = dropped;
        }
    }

    fn serve(&mut self, ops: &mut EventOps) {
        let blocked = self.flush();
        let Some(fd) = self.out.as_ref().and_then(ConsoleOutput::raw_fd) else {
            return;
        };
        let writable = Events::with_data_raw(fd, TOKEN_WRITABLE, EventSet::OUT);
        if blocked && !self.waiting_writable {
            self.waiting_writable = ops.add(writable).is_ok();
        } else if !blocked && self.waiting_writable {
            let _ = ops.remove(writable);
            self.waiting_writable = false;
        }
    }
}

impl MutEventSubscriber for ConsoleDrain {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.buffer.ready,
            TOKEN_READY,
            EventSet::IN,
        )) {
            tracing::error!("console output cannot be watched ({e:?}); it is discarded");
            self.out = None;
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == TOKEN_READY {
            let _ = self.buffer.ready.read();
        }
        self.serve(ops);
    }
}

impl Drop for ConsoleDrain {
    fn drop(&mut self) {
        // The VM has ended: hand over what the guest said last, without waiting.
        self.flush();
    }
}

const TOKEN_INPUT: u32 = 0;
const TOKEN_ROOM: u32 = 1;

/// Feeds host bytes into the guest's UART as far as its receive FIFO has room.
pub struct ConsoleInput {
    input: File,
    serial: SharedSerial,
    /// Written by the UART when the guest emptied the receive FIFO.
    room: EventFd,
    /// Read from the host, not yet taken by the UART.
    pending: Vec<u8>,
    /// Whether `input` is in the epoll set.
    listening: bool,
    open: bool,
}

impl ConsoleInput {
    pub fn new(input: File, serial: SharedSerial, room: EventFd) -> Self {
        Self {
            input,
            serial,
            room,
            pending: Vec::new(),
            listening: false,
            open: true,
        }
    }

    fn input_events(&self) -> Events {
        Events::with_data(&self.input, TOKEN_INPUT, EventSet::IN)
    }

    fn listen(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.listening || (on && !self.open) {
            return;
        }
        let result = if on {
            ops.add(self.input_events())
        } else {
            ops.remove(self.input_events())
        };
        match result {
            Ok(()) => self.listening = on,
            Err(e) => {
                // /dev/null and regular files cannot be polled: no console input.
                tracing::debug!("console input not pollable ({e:?}); the guest gets no input");
                self.open = false;
                self.listening = false;
            }
        }
    }

    /// Hand as much pending input to the UART as its FIFO takes.
    fn flush_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let taken = lock(&self.serial).queue_input(&self.pending);
        self.pending.drain(..taken);
    }

    /// Read what the UART has room for; false when the input has ended.
    fn read_input(&mut self) -> bool {
        let room = lock(&self.serial).input_room();
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

    /// Bytes read from the host but not yet in the UART.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.room, TOKEN_ROOM, EventSet::IN)) {
            tracing::warn!("console input disabled: cannot watch the UART ({e:?})");
            self.open = false;
            return;
        }
        self.listen(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == TOKEN_ROOM {
            let _ = self.room.read();
            self.flush_pending();
        } else {
            let set = events.event_set();
            let still_open = if set.contains(EventSet::IN) {
                self.read_input()
            } else {
                !set.intersects(EventSet::HANG_UP | EventSet::ERROR)
            };
            if !still_open {
                self.listen(ops, false);
                self.open = false;
            }
        }
        // Full FIFO: stop reading the host until the guest has made room.
        let full = !self.pending.is_empty() || lock(&self.serial).input_room() == 0;
        self.listen(ops, !full);
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
}

#[cfg(test)]
mod tests;
