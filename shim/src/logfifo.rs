//! The shim server's log sink: the bundle's `log` FIFO, which containerd copies
//! into its own log. Written without blocking: when containerd does not read,
//! log lines are dropped (and counted) rather than stalling the shim.

use std::fs::File;
use std::io::{ErrorKind, Write};

/// A non-blocking writer over the `log` FIFO.
pub struct LogFifo {
    file: File,
    dropped: u64,
}

impl LogFifo {
    /// `file` must be open with O_NONBLOCK.
    pub fn new(file: File) -> Self {
        Self { file, dropped: 0 }
    }

    /// Lines dropped because the FIFO was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl Write for LogFifo {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.file.write(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.dropped += 1;
                Ok(buf.len())
            }
            // A reader that went away: logs go nowhere, the shim keeps going.
            Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(buf.len()),
            Err(e) => Err(e),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
