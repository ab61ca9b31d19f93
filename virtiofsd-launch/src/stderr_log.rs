//! Draining virtiofsd's stderr into a log file, continuously.
//!
//! virtiofsd logs to stderr. A pipe holds 64 KiB; a pipe nobody reads makes
//! virtiofsd block in `write(2)` on its next log line, and with it the request
//! it was serving, so the guest's filesystem stalls. [`StderrLog`] reads the
//! pipe on its own thread for as long as any process holds its write end, and
//! appends everything to a log file that is rotated (`<log>.1`) when it grows
//! past a limit, so a chatty virtiofsd can neither stall nor fill the disk. The
//! last few KiB are also kept in memory for error messages.
//!
//! This module never touches the process itself; end of file on the pipe is how
//! it learns every holder (virtiofsd and any child it forked) has exited.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::launcher::lock;

/// Bytes of the end of the log kept in memory for error messages.
pub const TAIL_BYTES: usize = 8 << 10;

#[derive(Default)]
struct Shared {
    tail: VecDeque<u8>,
    /// End of file reached (every writer is gone) or the pipe failed.
    done: bool,
}

/// The drain of one virtiofsd's stderr.
pub struct StderrLog {
    shared: Arc<(Mutex<Shared>, Condvar)>,
    thread: Mutex<Option<JoinHandle<()>>>,
    path: PathBuf,
}

/// The log file, rotated past `max_bytes`.
struct RotatingFile {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    max_bytes: u64,
}

impl RotatingFile {
    fn open(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            path: path.to_path_buf(),
            file: Some(file),
            written,
            max_bytes: max_bytes.max(1),
        })
    }

    fn write(&mut self, data: &[u8]) {
        if self.written.saturating_add(data.len() as u64) > self.max_bytes && self.written > 0 {
            self.rotate();
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        match file.write_all(data) {
            Ok(()) => self.written = self.written.saturating_add(data.len() as u64),
            Err(e) => {
                // Keep draining (virtiofsd must never block on us); stop writing.
                tracing::warn!(log = ?self.path, "cannot write virtiofsd's log any more: {e}; its output is discarded from now on");
                self.file = None;
            }
        }
    }

    fn rotate(&mut self) {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        self.file = None;
        if let Err(e) = std::fs::rename(&self.path, &old) {
            tracing::warn!(log = ?self.path, "cannot rotate virtiofsd's log: {e}");
        }
        match OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)
        {
            Ok(f) => {
                self.file = Some(f);
                self.written = 0;
            }
            Err(e) => {
                tracing::warn!(log = ?self.path, "cannot reopen virtiofsd's log: {e}; its output is discarded from now on")
            }
        }
    }
}

impl StderrLog {
    /// Open (append to) the log at `path`; nothing is read yet.
    pub fn open(path: &Path, max_bytes: u64) -> std::io::Result<PendingLog> {
        Ok(PendingLog {
            file: RotatingFile::open(path, max_bytes)?,
        })
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last [`TAIL_BYTES`] of output, lossily decoded.
    pub fn tail(&self) -> String {
        let guard = lock(&self.shared.0);
        let (a, b) = guard.tail.as_slices();
        let mut bytes = Vec::with_capacity(a.len() + b.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    /// Wait up to `timeout` for end of file; true when reached.
    pub fn wait_done(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.shared;
        let mut guard = lock(m);
        while !guard.done {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = match cv.wait_timeout(guard, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }

    /// Join the thread if it has finished (end of file); otherwise leave it to
    /// finish on its own when the last holder of the pipe exits.
    pub fn finish(&self, timeout: Duration) -> bool {
        let done = self.wait_done(timeout);
        if done {
            if let Some(t) = lock(&self.thread).take() {
                let _ = t.join();
            }
        }
        done
    }
}

/// A log file opened before the process exists (so a bad path fails before
/// anything is spawned).
pub struct PendingLog {
    file: RotatingFile,
}

impl PendingLog {
    /// Start draining `pipe` into the file.
    pub fn drain(self, mut pipe: impl Read + Send + 'static) -> std::io::Result<StderrLog> {
        let shared: Arc<(Mutex<Shared>, Condvar)> = Arc::default();
        let path = self.file.path.clone();
        let mut file = self.file;
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vfsd-log".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match pipe.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::warn!("reading virtiofsd's stderr failed: {e}");
                            break;
                        }
                    };
                    let chunk = &buf[..n];
                    file.write(chunk);
                    let mut guard = lock(&for_thread.0);
                    let keep = chunk.len().min(TAIL_BYTES);
                    let tail = &mut guard.tail;
                    tail.extend(&chunk[chunk.len() - keep..]);
                    let excess = tail.len().saturating_sub(TAIL_BYTES);
                    tail.drain(..excess);
                }
                lock(&for_thread.0).done = true;
                for_thread.1.notify_all();
            })?;
        Ok(StderrLog {
            shared,
            thread: Mutex::new(Some(thread)),
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_is_written_the_tail_is_bounded_and_the_file_rotates() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("v.log");
        let (reader, mut writer) = std::io::pipe().expect("pipe");
        let log = StderrLog::open(&path, 300 << 10)
            .expect("open")
            .drain(reader)
            .expect("drain");
        // 1 MiB through a 64 KiB pipe: only possible while the drain reads.
        let line = [b'x'; 1023];
        for _ in 0..1024 {
            writer.write_all(&line).expect("write");
            writer.write_all(b"\n").expect("newline");
        }
        writer.write_all(b"last words\n").expect("write");
        drop(writer);
        assert!(log.wait_done(Duration::from_secs(10)), "end of file seen");
        let tail = log.tail();
        assert!(tail.ends_with("last words"), "{}", &tail[tail.len() - 40..]);
        assert!(tail.len() <= TAIL_BYTES);
        let current = std::fs::metadata(&path).expect("log").len();
        let rotated = std::fs::metadata(tmp.path().join("v.log.1"))
            .expect("rotated log")
            .len();
        assert!(
            current <= 300 << 10 && rotated <= 300 << 10,
            "{current} {rotated}"
        );
        assert!(std::fs::read_to_string(&path)
            .expect("read")
            .ends_with("last words\n"));
        assert!(log.finish(Duration::from_secs(1)));
    }
}
