//! One virtio-blk request, parsed and validated from a descriptor chain the
//! guest wrote.
//!
//! This is the guest-facing parser of the block device: [`parse`] turns a
//! chain into a [`Request`] whose every guest buffer is inside guest memory,
//! in the right direction and within the request limits (`SEG_MAX`,
//! `SIZE_MAX`), and whose sector range fits the disk; or into a
//! [`Rejected`] saying which status (IOERR or UNSUPP) goes back, and where, if
//! the chain has a status byte at all. It makes no assumption about framing
//! (the 16-byte header and the data may share or split descriptors, as the spec
//! allows). It keeps at most [`MAX_DESCRIPTORS`] descriptors and walks at most
//! [`WALK_LIMIT`].
//!
//! It only reads the header from guest memory; it never writes guest memory and
//! never touches the disk (that is [`super::disk`]'s job, on the I/O thread).

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Bytes in a sector (the unit of `sector` and of the capacity, whatever the
/// disk's real block size).
pub const SECTOR_SIZE: u64 = 512;
/// Most data segments one request may carry (VIRTIO_BLK_F_SEG_MAX).
pub const SEG_MAX: u32 = 128;
/// Largest single data segment (VIRTIO_BLK_F_SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most descriptors walked for one request: the data segments plus one for the
/// header and one for the status byte.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Most descriptors walked to find the status byte of an overlong request; a
/// longer chain (only an indirect table can hold one) is returned unanswered.
pub const WALK_LIMIT: usize = 1024;
/// Bytes of the request header (type, reserved, sector).
pub const HEADER_LEN: usize = 16;
/// Bytes of the device id GET_ID answers with.
pub const ID_LEN: usize = 20;

/// What the parser needs to know about the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskShape {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    pub read_only: bool,
}

/// One guest buffer of a request's data, inside guest memory when parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// What a valid request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Disk to guest, starting at `sector`.
    Read { sector: u64 },
    /// Guest to disk, starting at `sector`.
    Write { sector: u64 },
    /// Make completed writes durable.
    Flush,
    /// The device id string.
    GetId,
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Operation,
    /// Device-writable buffers for reads and GET_ID, device-readable ones for
    /// writes; empty for flushes. At most [`SEG_MAX`], each at most [`SIZE_MAX`].
    pub data: Vec<Segment>,
    /// Sum of the data segments' lengths.
    pub data_len: u64,
    /// Where the status byte goes (writable, inside guest memory).
    pub status: GuestAddress,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("empty descriptor chain")]
    EmptyChain,
    #[error("more than {MAX_DESCRIPTORS} descriptors (header, {SEG_MAX} data segments, status)")]
    TooManyDescriptors,
    #[error(
        "the last descriptor is not a device-writable buffer of at least one byte (no status byte)"
    )]
    NoStatusByte,
    #[error("the status byte at {0:#x} is outside guest memory")]
    StatusOutsideMemory(u64),
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the header needs {HEADER_LEN} device-readable bytes, the chain has {0}")]
    HeaderTooShort(u64),
    #[error("the header cannot be read from guest memory")]
    HeaderUnreadable,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("a {0} request carries data in the wrong direction")]
    WrongDirection(&'static str),
    #[error("a GET_ID request has no buffer for the id")]
    NoIdBuffer,
    #[error("a flush request carries data")]
    FlushWithData,
    #[error("more than {SEG_MAX} data segments")]
    TooManySegments,
    #[error("a data segment of {0} bytes exceeds the {SIZE_MAX}-byte limit")]
    SegmentTooLarge(u32),
    #[error("a data buffer at {addr:#x}+{len:#x} is outside guest memory")]
    BufferOutsideMemory { addr: u64, len: u32 },
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    NotSectorMultiple(u64),
    #[error("sectors {sector}+{sectors} are beyond the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
}

impl RequestError {
    /// The status byte the driver gets for it.
    pub fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A refused request: the status goes to `status` when the chain has a usable
/// status byte; without one the chain is returned with nothing written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub status: Option<GuestAddress>,
    pub error: RequestError,
}

/// The request types, by name, for messages.
fn type_name(kind: u32) -> &'static str {
    match kind {
        VIRTIO_BLK_T_IN => "read",
        VIRTIO_BLK_T_OUT => "write",
        VIRTIO_BLK_T_GET_ID => "get-id",
        _ => "other",
    }
}

/// Parse and validate the chain `descriptors` (as the queue walker yields them)
/// against guest memory `mem` and the disk `shape`.
pub fn parse(
    descriptors: impl Iterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
    shape: DiskShape,
) -> Result<Request, Rejected> {
    let reject = |status, error| Rejected { status, error };
    let mut descs: Vec<Descriptor> = Vec::with_capacity(4);
    // Past the limit, only the last descriptor (the status byte) is kept, so an
    // overlong request still gets IOERR; past WALK_LIMIT the walk stops.
    let mut overlong: Option<Descriptor> = None;
    for (walked, d) in descriptors.enumerate() {
        if walked >= WALK_LIMIT {
            return Err(reject(None, RequestError::TooManyDescriptors));
        }
        if descs.len() < MAX_DESCRIPTORS {
            descs.push(d);
        } else {
            overlong = Some(d);
        }
    }
    let Some(last) = overlong.as_ref().or(descs.last()) else {
        return Err(reject(None, RequestError::EmptyChain));
    };
    if !last.is_write_only() || last.len() == 0 {
        return Err(reject(None, RequestError::NoStatusByte));
    }
    let status = last
        .addr()
        .0
        .checked_add(u64::from(last.len()) - 1)
        .map(GuestAddress)
        .filter(|a| mem.address_in_range(*a))
        .ok_or_else(|| reject(None, RequestError::StatusOutsideMemory(last.addr().0)))?;
    let fail = |error| Err(reject(Some(status), error));
    if overlong.is_some() {
        return fail(RequestError::TooManyDescriptors);
    }

    // Device-readable descriptors first, then device-writable ones.
    let first_writable = descs
        .iter()
        .position(Descriptor::is_write_only)
        .unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(first_writable);
    if !writable.iter().all(Descriptor::is_write_only) {
        return fail(RequestError::ReadableAfterWritable);
    }

    // The header: the first 16 readable bytes, wherever they are.
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0usize;
    let mut out_data = Vec::new();
    for d in readable {
        let len = d.len() as usize;
        let take = len.min(HEADER_LEN - filled);
        if take > 0 {
            let Some(dst) = header.get_mut(filled..filled + take) else {
                return fail(RequestError::HeaderUnreadable);
            };
            if mem.read_slice(dst, d.addr()).is_err() {
                return fail(RequestError::HeaderUnreadable);
            }
            filled += take;
        }
        if len > take {
            // `take` <= 16, so the rest fits the descriptor's u32 length.
            out_data.push(Segment {
                addr: GuestAddress(d.addr().0.wrapping_add(take as u64)),
                len: (len - take) as u32,
            });
        }
    }
    if filled < HEADER_LEN {
        let readable_bytes = readable.iter().map(|d| u64::from(d.len())).sum();
        return fail(RequestError::HeaderTooShort(readable_bytes));
    }
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
    let kind = u32::from_le_bytes([t0, t1, t2, t3]);
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);

    // Writable data: everything but the status byte at the very end.
    let mut in_data = Vec::new();
    for (i, d) in writable.iter().enumerate() {
        let len = if i + 1 == writable.len() {
            d.len() - 1
        } else {
            d.len()
        };
        if len > 0 {
            in_data.push(Segment {
                addr: d.addr(),
                len,
            });
        }
    }

    let (op, data) = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID if !out_data.is_empty() => {
            return fail(RequestError::WrongDirection(type_name(kind)));
        }
        VIRTIO_BLK_T_IN => (Operation::Read { sector }, in_data),
        VIRTIO_BLK_T_GET_ID if in_data.is_empty() => return fail(RequestError::NoIdBuffer),
        VIRTIO_BLK_T_GET_ID => (Operation::GetId, in_data),
        VIRTIO_BLK_T_OUT if !in_data.is_empty() => {
            return fail(RequestError::WrongDirection(type_name(kind)));
        }
        VIRTIO_BLK_T_OUT if shape.read_only => return fail(RequestError::ReadOnly),
        VIRTIO_BLK_T_OUT => (Operation::Write { sector }, out_data),
        VIRTIO_BLK_T_FLUSH if !out_data.is_empty() || !in_data.is_empty() => {
            return fail(RequestError::FlushWithData);
        }
        VIRTIO_BLK_T_FLUSH => (Operation::Flush, Vec::new()),
        other => return fail(RequestError::Unsupported(other)),
    };

    if data.len() > SEG_MAX as usize {
        return fail(RequestError::TooManySegments);
    }
    let mut data_len = 0u64;
    for s in &data {
        if s.len > SIZE_MAX {
            return fail(RequestError::SegmentTooLarge(s.len));
        }
        if !GuestMemoryBackend::check_range(mem, s.addr, s.len as usize) {
            return fail(RequestError::BufferOutsideMemory {
                addr: s.addr.0,
                len: s.len,
            });
        }
        data_len += u64::from(s.len);
    }
    if let Operation::Read { sector } | Operation::Write { sector } = op {
        if !data_len.is_multiple_of(SECTOR_SIZE) {
            return fail(RequestError::NotSectorMultiple(data_len));
        }
        let sectors = data_len / SECTOR_SIZE;
        if sector
            .checked_add(sectors)
            .is_none_or(|end| end > shape.capacity)
        {
            return fail(RequestError::OutOfRange {
                sector,
                sectors,
                capacity: shape.capacity,
            });
        }
    }
    Ok(Request {
        op,
        data,
        data_len,
        status,
    })
}
