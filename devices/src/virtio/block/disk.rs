//! The host side of a virtio-blk disk: the backing file, opened and checked
//! once ([`DiskFile::open`]), and the execution of validated requests against
//! it ([`execute`]).
//!
//! Data moves between the file and guest memory with `pread`/`pwrite` straight
//! into and out of guest pages (no bounce buffer, no allocation per request).
//! This module never parses guest data (that is [`super::request`]) and never
//! runs on the event loop: [`execute`] blocks on the disk and is called from the
//! device's I/O thread (or synchronously by tests and fuzz targets).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestMemoryMmap, ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile,
};

use super::request::{Operation, Request, ID_LEN, SECTOR_SIZE};

/// Why a disk image cannot back a virtio-blk device; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk image {path:?} cannot be opened {mode}: {source}; check that it exists and that this user may {mode_verb} it", mode_verb = if *read_only { "read" } else { "read and write" }, mode = if *read_only { "read-only" } else { "read-write" })]
    Open {
        path: PathBuf,
        read_only: bool,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {0:?} is neither a regular file nor a block device; pass an image file")]
    NotAFile(PathBuf),
    #[error("disk image {path:?} is {size} bytes, less than one {SECTOR_SIZE}-byte sector; pass a larger image")]
    TooSmall { path: PathBuf, size: u64 },
    #[error("disk image {path:?} is in use by another process (locked {lock}); stop the VM using it, or give this one a copy")]
    Locked { path: PathBuf, lock: &'static str },
    #[error("disk image {path:?}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A disk image opened for a virtio-blk device.
///
/// Read-write images are locked exclusively and read-only ones shared
/// (`flock`), so two VMs cannot write one image, nor one write what another
/// reads. The lock lives as long as the file is open.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: PathBuf,
    /// Whole 512-byte sectors in the image.
    capacity: u64,
    read_only: bool,
    serial: [u8; ID_LEN],
}

impl DiskFile {
    /// Open and check `path`. The capacity is the image size rounded **down** to
    /// whole sectors: a trailing partial sector (an image whose size is not a
    /// multiple of 512) is never shown to the guest, so the guest cannot read
    /// past the image's end nor grow it; a warning says how many bytes are
    /// hidden. An image smaller than one sector is refused.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_path_buf(),
                read_only,
                source,
            })?;
        let io = |what| {
            move |source| DiskError::Io {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        let meta = file.metadata().map_err(io("reading its metadata"))?;
        let kind = meta.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(DiskError::NotAFile(path.to_path_buf()));
        }
        let (op, lock) = if read_only {
            (libc::LOCK_SH, "by a writer")
        } else {
            (libc::LOCK_EX, "by a reader or a writer")
        };
        // SAFETY: flock on a file descriptor we own; it touches no memory.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(DiskError::Locked {
                    path: path.to_path_buf(),
                    lock,
                });
            }
            return Err(io("locking it")(e));
        }
        // Seeking to the end works for block devices too (their metadata length is 0).
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(io("finding its size"))?;
        if size < SECTOR_SIZE {
            return Err(DiskError::TooSmall {
                path: path.to_path_buf(),
                size,
            });
        }
        let hidden = size % SECTOR_SIZE;
        if hidden != 0 {
            tracing::warn!(
                path = %path.display(),
                size,
                "disk image size is not a multiple of {SECTOR_SIZE}; its last {hidden} bytes are not visible to the guest"
            );
        }
        Ok(Self {
            serial: serial_for(meta.dev(), meta.ino()),
            file,
            path: path.to_path_buf(),
            capacity: size / SECTOR_SIZE,
            read_only,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id GET_ID returns: stable for the same image file (derived from its
    /// device and inode numbers), ASCII, NUL-padded to 20 bytes.
    pub fn serial(&self) -> &[u8; ID_LEN] {
        &self.serial
    }

    /// The serial as text.
    pub fn serial_str(&self) -> String {
        String::from_utf8_lossy(&self.serial)
            .trim_end_matches('\0')
            .to_string()
    }
}

/// "bcn-" and 16 hex digits of an FNV-1a hash of the file's identity (stable
/// across runs and Rust versions, unlike std's hasher).
fn serial_for(dev: u64, ino: u64) -> [u8; ID_LEN] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in dev.to_le_bytes().into_iter().chain(ino.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let text = format!("bcn-{hash:016x}");
    let mut id = [0u8; ID_LEN];
    for (dst, src) in id.iter_mut().zip(text.bytes()) {
        *dst = src;
    }
    id
}

/// The file seen as a stream from `offset` on, through `pread`/`pwrite`, so
/// vm-memory can move bytes between it and guest memory slices directly.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    fn offset(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset).map_err(|_| {
            VolatileMemoryError::IOError(std::io::Error::from_raw_os_error(libc::EOVERFLOW))
        })
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the fd is open for the life of `self.file`; `guard` points to
        // `buf.len()` bytes of mapped guest memory that stay mapped while the
        // guard lives (the VolatileSlice's invariant).
        let n = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        if n < 0 {
            buf.bitmap().mark_dirty(0, buf.len());
            return Err(VolatileMemoryError::IOError(std::io::Error::last_os_error()));
        }
        let n = n.unsigned_abs();
        buf.bitmap().mark_dirty(0, n);
        self.offset += n as u64;
        Ok(n)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard();
        // SAFETY: the fd is open for the life of `self.file`; `guard` points to
        // `buf.len()` readable bytes of mapped guest memory while it lives.
        let n = unsafe {
            libc::pwrite(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        if n < 0 {
            return Err(VolatileMemoryError::IOError(std::io::Error::last_os_error()));
        }
        let n = n.unsigned_abs();
        self.offset += n as u64;
        Ok(n)
    }
}

/// What executing a request produced: the status byte and the used length
/// (bytes written into the chain, status byte included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    pub used_len: u32,
}

/// Why a valid request failed on the host.
#[derive(Debug, thiserror::Error)]
pub enum IoFailure {
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("{0}")]
    Disk(#[from] std::io::Error),
}

/// Execute `request` on `disk`, moving data to or from `mem`, and write its
/// status byte. `writethrough`: make each write durable before completing it
/// (the driver did not negotiate FLUSH). Blocks on the disk.
pub fn execute(
    disk: &DiskFile,
    mem: &GuestMemoryMmap,
    request: &Request,
    writethrough: bool,
) -> (Outcome, Option<IoFailure>) {
    let result = run(disk, mem, request, writethrough);
    let (status, used_len, failure) = match result {
        Ok(written) => (
            VIRTIO_BLK_S_OK as u8,
            u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX),
            None,
        ),
        Err(e) => (VIRTIO_BLK_S_IOERR as u8, 1, Some(e)),
    };
    if let Err(e) = mem.write_obj(status, request.status) {
        // Checked at parse time; only memory unplugged since then gets here.
        return (
            Outcome {
                status,
                used_len: 0,
            },
            Some(IoFailure::Memory(e)),
        );
    }
    (Outcome { status, used_len }, failure)
}

/// The data bytes written into guest memory.
fn run(
    disk: &DiskFile,
    mem: &GuestMemoryMmap,
    request: &Request,
    writethrough: bool,
) -> Result<u64, IoFailure> {
    match request.op {
        Operation::Read { sector } => {
            let mut src = FileAt {
                file: &disk.file,
                offset: sector.saturating_mul(SECTOR_SIZE),
            };
            for s in &request.data {
                mem.read_exact_volatile_from(s.addr, &mut src, s.len as usize)?;
            }
            Ok(request.data_len)
        }
        Operation::Write { sector } => {
            let mut dst = FileAt {
                file: &disk.file,
                offset: sector.saturating_mul(SECTOR_SIZE),
            };
            for s in &request.data {
                mem.write_all_volatile_to(s.addr, &mut dst, s.len as usize)?;
            }
            if writethrough {
                disk.file.sync_data()?;
            }
            Ok(0)
        }
        Operation::Flush => {
            if !disk.read_only {
                disk.file.sync_data()?;
            }
            Ok(0)
        }
        Operation::GetId => {
            let mut id: &[u8] = disk.serial();
            let mut written = 0u64;
            for s in &request.data {
                if id.is_empty() {
                    break;
                }
                let n = id.len().min(s.len as usize);
                let (now, rest) = id.split_at(n);
                mem.write_slice(now, s.addr)?;
                written += n as u64;
                id = rest;
            }
            Ok(written)
        }
    }
}
