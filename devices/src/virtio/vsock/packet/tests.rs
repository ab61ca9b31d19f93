//! The packet header parser against every field, length and op a guest can send.

use super::*;

const CID: u64 = 3;

fn hdr() -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: 0x1122_3344,
        dst_port: 0x5566_7788,
        len: 0,
        type_: TYPE_STREAM,
        op: Op::Request as u16,
        flags: 0x99aa_bbcc,
        buf_alloc: 0xddee_ff00,
        fwd_cnt: 0x0102_0304,
    }
}

#[test]
fn every_field_round_trips_at_its_offset() {
    let h = Header {
        src_cid: 0x0102_0304_0506_0708,
        dst_cid: 0x1112_1314_1516_1718,
        len: 0x2122_2324,
        type_: 0x3132,
        op: 0x4142,
        ..hdr()
    };
    let b = h.encode();
    assert_eq!(b.len(), HEADER_LEN);
    assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(&b[8..16], &0x1112_1314_1516_1718u64.to_le_bytes());
    assert_eq!(&b[16..20], &0x1122_3344u32.to_le_bytes());
    assert_eq!(&b[20..24], &0x5566_7788u32.to_le_bytes());
    assert_eq!(&b[24..28], &0x2122_2324u32.to_le_bytes());
    assert_eq!(&b[28..30], &0x3132u16.to_le_bytes());
    assert_eq!(&b[30..32], &0x4142u16.to_le_bytes());
    assert_eq!(&b[32..36], &0x99aa_bbccu32.to_le_bytes());
    assert_eq!(&b[36..40], &0xddee_ff00u32.to_le_bytes());
    assert_eq!(&b[40..44], &0x0102_0304u32.to_le_bytes());
    assert_eq!(Header::decode(&b), Ok(h));
    // Bytes after the header are not the header's business.
    let mut longer = b.to_vec();
    longer.extend_from_slice(&[0xff; 100]);
    assert_eq!(Header::decode(&longer), Ok(h));
}

#[test]
fn short_buffers_are_refused() {
    for n in [0, 1, 43] {
        assert_eq!(
            parse_header(&vec![0u8; n], 0, CID),
            Err(HeaderError::Short(n))
        );
    }
}

#[test]
fn every_op_is_known_and_others_are_not() {
    for (v, op) in [
        (1, Op::Request),
        (2, Op::Response),
        (3, Op::Rst),
        (4, Op::Shutdown),
        (5, Op::Rw),
        (6, Op::CreditUpdate),
        (7, Op::CreditRequest),
    ] {
        assert_eq!(Op::from_wire(v), Some(op));
        let h = Header { op: v, ..hdr() };
        assert_eq!(parse_header(&h.encode(), 0, CID).map(|p| p.op), Ok(op));
    }
    for v in [0u16, 8, 0xffff] {
        let h = Header { op: v, ..hdr() };
        assert_eq!(
            parse_header(&h.encode(), 0, CID),
            Err(HeaderError::UnknownOp(v))
        );
    }
}

#[test]
fn only_stream_sockets_from_the_guest_to_the_host_pass() {
    let h = Header {
        type_: TYPE_SEQPACKET,
        ..hdr()
    };
    assert_eq!(
        parse_header(&h.encode(), 0, CID),
        Err(HeaderError::UnsupportedType(TYPE_SEQPACKET))
    );
    let h = Header { type_: 0, ..hdr() };
    assert_eq!(
        parse_header(&h.encode(), 0, CID),
        Err(HeaderError::UnsupportedType(0))
    );
    let h = Header {
        src_cid: 4,
        ..hdr()
    };
    assert_eq!(
        parse_header(&h.encode(), 0, CID),
        Err(HeaderError::WrongSourceCid {
            got: 4,
            expected: CID
        })
    );
    let h = Header {
        dst_cid: 1,
        ..hdr()
    };
    assert_eq!(
        parse_header(&h.encode(), 0, CID),
        Err(HeaderError::WrongDestinationCid(1))
    );
}

#[test]
fn lengths_are_checked_against_the_limit_and_the_buffers() {
    let rw = |len| Header {
        op: Op::Rw as u16,
        len,
        ..hdr()
    };
    assert!(parse_header(&rw(0).encode(), 0, CID).is_ok());
    assert!(parse_header(&rw(MAX_PAYLOAD).encode(), MAX_PAYLOAD as usize, CID).is_ok());
    assert_eq!(
        parse_header(&rw(u32::MAX).encode(), usize::MAX, CID),
        Err(HeaderError::TooLong { len: u32::MAX })
    );
    assert_eq!(
        parse_header(&rw(MAX_PAYLOAD + 1).encode(), usize::MAX, CID),
        Err(HeaderError::TooLong {
            len: MAX_PAYLOAD + 1
        })
    );
    assert_eq!(
        parse_header(&rw(100).encode(), 99, CID),
        Err(HeaderError::Truncated {
            len: 100,
            available: 99
        })
    );
    let req = Header { len: 1, ..hdr() };
    assert_eq!(
        parse_header(&req.encode(), 1, CID),
        Err(HeaderError::PayloadOnControl {
            op: Op::Request,
            len: 1
        })
    );
}

/// Any byte string parses to a value or an error, never a panic (a cheap
/// stand-in for the fuzz target: every length, pseudo-random contents).
#[test]
fn arbitrary_bytes_never_panic() {
    let mut x = 0x1234_5678_9abc_def0u64;
    for n in 0..200usize {
        let bytes: Vec<u8> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for avail in [0, 1, 4096, usize::MAX] {
            let _ = parse_header(&bytes, avail, CID);
        }
    }
}
