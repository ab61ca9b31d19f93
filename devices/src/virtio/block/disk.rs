//! The host side of a virtio-blk disk: the backing file, opened and checked
//! once ([`DiskFile::open`]), and the execution of validated requests against
//! it ([`execute`]).
//!
//! Data moves between the file and guest memory with one `preadv`/`pwritev` per
//! request, straight into and out of guest pages (no bounce buffer).
//! This module never parses guest data (that is [`super::request`]) and never
//! runs on the event loop: [`execute`] blocks on the disk and is called from the
//! device's I/O thread (or synchronously by tests and fuzz targets).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

use super::request::{Operation, Request, Segment, ID_LEN, SECTOR_SIZE};

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

/// Most iovecs one `preadv`/`pwritev` takes (Linux's IOV_MAX).
const IOV_MAX: usize = 1024;

/// Move the whole byte range of `segments` between guest memory and the file at
/// `offset`, with as few `preadv`/`pwritev` calls as the kernel allows (one,
/// normally): `to_guest` reads the file into guest memory, otherwise guest
/// memory is written to the file. A short transfer continues where it stopped;
/// end of file is an error (the parser keeps requests inside the capacity).
fn transfer(
    file: &File,
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    offset: u64,
    to_guest: bool,
) -> Result<(), IoFailure> {
    let mut slices = Vec::with_capacity(segments.len());
    for s in segments {
        for slice in mem.get_slices(s.addr, s.len as usize) {
            slices.push(slice?);
        }
    }
    // The guards keep the host mappings valid while the kernel uses them.
    let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(slices.len());
    let mut read_guards = Vec::new();
    let mut write_guards = Vec::new();
    for slice in &slices {
        let base = if to_guest {
            let guard = slice.ptr_guard_mut();
            let p = guard.as_ptr();
            write_guards.push(guard);
            p
        } else {
            let guard = slice.ptr_guard();
            let p = guard.as_ptr().cast_mut();
            read_guards.push(guard);
            p
        };
        iovecs.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: slice.len(),
        });
    }
    let result = transfer_iovecs(file, &mut iovecs, offset, to_guest);
    if to_guest {
        // Bytes may have landed even when it failed part way.
        for slice in &slices {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
    result
}

fn transfer_iovecs(
    file: &File,
    iovecs: &mut [libc::iovec],
    mut offset: u64,
    to_guest: bool,
) -> Result<(), IoFailure> {
    // The first iovec not yet (fully) moved.
    let mut next = 0usize;
    loop {
        while iovecs.get(next).is_some_and(|v| v.iov_len == 0) {
            next += 1;
        }
        let Some(pending) = iovecs.get(next..).filter(|p| !p.is_empty()) else {
            return Ok(());
        };
        let at = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let count = pending.len().min(IOV_MAX) as libc::c_int;
        // SAFETY: every iovec points into guest memory mapped for at least
        // `iov_len` bytes, kept mapped by the guards the caller holds; the fd is
        // open for the life of `file`; `count` iovecs are in the slice.
        let n = unsafe {
            if to_guest {
                libc::preadv(file.as_raw_fd(), pending.as_ptr(), count, at)
            } else {
                libc::pwritev(file.as_raw_fd(), pending.as_ptr(), count, at)
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if n == 0 {
            let kind = if to_guest {
                std::io::ErrorKind::UnexpectedEof
            } else {
                std::io::ErrorKind::WriteZero
            };
            return Err(std::io::Error::new(kind, "the image ended before the request did").into());
        }
        let mut done = n.unsigned_abs();
        offset += done as u64;
        // Skip what was moved; a partly moved iovec is advanced.
        while let Some(v) = iovecs.get_mut(next) {
            if done >= v.iov_len {
                done -= v.iov_len;
                next += 1;
            } else {
                // SAFETY: `done` < iov_len, so the pointer stays inside the buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(done) }.cast();
                v.iov_len -= done;
                break;
            }
        }
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
            let offset = sector.saturating_mul(SECTOR_SIZE);
            transfer(&disk.file, mem, &request.data, offset, true)?;
            Ok(request.data_len)
        }
        Operation::Write { sector } => {
            let offset = sector.saturating_mul(SECTOR_SIZE);
            transfer(&disk.file, mem, &request.data, offset, false)?;
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
