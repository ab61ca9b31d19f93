//! The virtio-vsock packet header (virtio 1.2, 5.10.6): its wire layout, a pure
//! parser that checks every field a guest controls, and the encoder for headers
//! the device sends.
//!
//! [`parse_header`] is the one place guest header bytes are interpreted; it is a
//! pure function of a byte slice (a fuzz target) and never allocates or panics.
//! This module never touches queues, sockets or connection state.

/// Bytes of a `struct virtio_vsock_hdr`.
pub const HEADER_LEN: usize = 44;
/// The largest payload one packet may carry (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`); a header claiming more is refused.
pub const MAX_PAYLOAD: u32 = 64 << 10;
/// The host's CID.
pub const HOST_CID: u64 = 2;

/// `type`: a connection-oriented byte stream (the only type we serve).
pub const TYPE_STREAM: u16 = 1;
/// `type`: seqpacket (not offered; refused with RST).
pub const TYPE_SEQPACKET: u16 = 2;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// `op`: what a packet asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl Op {
    /// The op for a wire value; `None` for 0 (invalid) and unknown values.
    pub fn from_wire(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Rst,
            4 => Self::Shutdown,
            5 => Self::Rw,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            _ => return None,
        })
    }
}

/// A header as it is on the wire (little endian), every field kept raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Why a guest packet header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the packet is {0} bytes, shorter than the {HEADER_LEN}-byte header")]
    Short(usize),
    #[error("unknown op {0}")]
    UnknownOp(u16),
    #[error("unsupported socket type {0} (only stream, 1, is served)")]
    UnsupportedType(u16),
    #[error("payload length {len} exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLong { len: u32 },
    #[error("payload length {len} exceeds the {available} bytes the buffers hold")]
    Truncated { len: u32, available: usize },
    #[error("op {op:?} carries {len} payload bytes; only RW may")]
    PayloadOnControl { op: Op, len: u32 },
    #[error("source CID {got} is not the guest's CID {expected}")]
    WrongSourceCid { got: u64, expected: u64 },
    #[error("destination CID {0} is not the host (2)")]
    WrongDestinationCid(u64),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut w = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        w.copy_from_slice(s);
    }
    u16::from_le_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

impl Header {
    /// Decode the raw fields of the first [`HEADER_LEN`] bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderError> {
        if bytes.len() < HEADER_LEN {
            return Err(HeaderError::Short(bytes.len()));
        }
        Ok(Self {
            src_cid: u64_at(bytes, 0),
            dst_cid: u64_at(bytes, 8),
            src_port: u32_at(bytes, 16),
            dst_port: u32_at(bytes, 20),
            len: u32_at(bytes, 24),
            type_: u16_at(bytes, 28),
            op: u16_at(bytes, 30),
            flags: u32_at(bytes, 32),
            buf_alloc: u32_at(bytes, 36),
            fwd_cnt: u32_at(bytes, 40),
        })
    }

    /// The wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A guest packet header that passed every check: a known op on a stream
/// socket, from the guest's CID to the host, with a payload length that is
/// bounded and fits the buffers the guest provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestPacket {
    pub header: Header,
    pub op: Op,
}

/// Parse and check a header the guest sent (`bytes`: at least its first
/// [`HEADER_LEN`] bytes), where `payload_available` is how many bytes the
/// guest's buffers hold after the header and `guest_cid` the device's CID.
///
/// The order of checks is fixed, so a caller can still answer a packet with a
/// bad type or unknown op with RST: [`Header::decode`] gives the raw fields.
pub fn parse_header(
    bytes: &[u8],
    payload_available: usize,
    guest_cid: u64,
) -> Result<GuestPacket, HeaderError> {
    let header = Header::decode(bytes)?;
    if header.src_cid != guest_cid {
        return Err(HeaderError::WrongSourceCid {
            got: header.src_cid,
            expected: guest_cid,
        });
    }
    if header.dst_cid != HOST_CID {
        return Err(HeaderError::WrongDestinationCid(header.dst_cid));
    }
    if header.type_ != TYPE_STREAM {
        return Err(HeaderError::UnsupportedType(header.type_));
    }
    let op = Op::from_wire(header.op).ok_or(HeaderError::UnknownOp(header.op))?;
    if header.len > MAX_PAYLOAD {
        return Err(HeaderError::TooLong { len: header.len });
    }
    if op != Op::Rw && header.len != 0 {
        return Err(HeaderError::PayloadOnControl {
            op,
            len: header.len,
        });
    }
    if header.len as usize > payload_available {
        return Err(HeaderError::Truncated {
            len: header.len,
            available: payload_available,
        });
    }
    Ok(GuestPacket { header, op })
}

#[cfg(test)]
mod tests;
