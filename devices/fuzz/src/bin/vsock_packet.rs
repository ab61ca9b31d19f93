//! Fuzz target: the vsock packet header the guest sends
//! (`vsock::packet`), then whole packets through the hybrid device.
//!
//! - Header level: `Header::decode`, `Header::encode` and
//!   `parse_header(bytes, payload_available, guest_cid)` on raw bytes and on
//!   headers built from mostly plausible fields. Must hold: no panic; decode
//!   takes exactly the first 44 bytes and round-trips through encode; a header
//!   is accepted exactly when it has a known op, the stream type, src = the
//!   guest's CID, dst = the host (2), len <= MAX_PAYLOAD and <= the payload
//!   available, and no payload on a control op.
//! - Device level: the hybrid device behind the virtio-mmio transport, its
//!   TX, RX and event queues laid out from the input with vsock headers
//!   written where descriptors point, a host program listening on one port (so
//!   guest REQUESTs can connect and RW payload reach a socket), queue
//!   notifications, event-loop turns and device resets in any order. Must
//!   hold: no panic or hang; never more than MAX_CONNECTIONS connections;
//!   guest data buffered for host sockets within each connection's credit
//!   (CONN_BUF_ALLOC).
#![no_main]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use beacon_devices::virtio::vsock::hybrid::conn::CONN_BUF_ALLOC;
use beacon_devices::virtio::vsock::hybrid::{HybridVsock, MAX_CONNECTIONS};
use beacon_devices::virtio::vsock::packet::{
    parse_header, Header, HeaderError, Op, HEADER_LEN, HOST_CID, MAX_PAYLOAD, TYPE_STREAM,
};
use beacon_devices::virtio::vsock::{EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use beacon_devices::virtio::VirtioSubscriber;
use beacon_devices_fuzz::{
    arbitrary, descriptor_addresses, lay_out_queue, sprinkle, DriverQueue, Harness, Unstructured,
    MEM_MIB,
};
use event_manager::{EventManager, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

/// The guest's CID.
const CID: u64 = 3;
/// The host port a program listens on.
const LISTEN_PORT: u32 = 1024;
/// Where the three queues' rings live (each under 12 KiB at 256 entries).
const QUEUE_BASES: [u64; 3] = [0x1_0000, 0x1_4000, 0x1_8000];

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = headers(&mut u);
    let _ = device(&mut u);
});

/// A header: a well-formed one (mostly a REQUEST or RW between a few guest
/// ports and the listening host port), often with one field broken, or any
/// 44 bytes.
fn header(u: &mut Unstructured<'_>) -> arbitrary::Result<Header> {
    if u.ratio(1u8, 16)? {
        return Ok(Header::decode(u.bytes(HEADER_LEN)?).expect("whole header"));
    }
    let op = *u.choose(&[
        Op::Request,
        Op::Request,
        Op::Rw,
        Op::Rw,
        Op::Rw,
        Op::Response,
        Op::Rst,
        Op::Shutdown,
        Op::CreditUpdate,
        Op::CreditRequest,
    ])?;
    let mut h = Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: u.int_in_range(1000u32..=1003)?,
        dst_port: if u.ratio(7u8, 8)? { LISTEN_PORT } else { 1025 },
        len: if op == Op::Rw {
            u.int_in_range(1..=64)?
        } else {
            0
        },
        type_: TYPE_STREAM,
        op: op as u16,
        flags: u.int_in_range(0u32..=3)?,
        buf_alloc: *u.choose(&[0u32, 4096, 256 << 10, u32::MAX])?,
        fwd_cnt: *u.choose(&[0u32, 1, 4096, u32::MAX])?,
    };
    if u.ratio(1u8, 2)? {
        match u.int_in_range(0u8..=6)? {
            0 => h.src_cid = *u.choose(&[HOST_CID, 0, u64::MAX, CID + (1 << 32)])?,
            1 => h.dst_cid = *u.choose(&[CID, 1, u64::MAX, HOST_CID + (1 << 32)])?,
            2 => h.type_ = *u.choose(&[0u16, 2, 3, u16::MAX])?,
            3 => h.op = *u.choose(&[0u16, 8, u16::MAX])?,
            4 => {
                h.len = match u.int_in_range(0u8..=3)? {
                    0 => MAX_PAYLOAD - u.int_in_range(0..=1)?,
                    1 => MAX_PAYLOAD + u.int_in_range(1..=2)?,
                    2 => u.int_in_range(1..=64)?,
                    _ => u.arbitrary()?,
                }
            }
            5 => h.flags = u.arbitrary()?,
            _ => {
                h.src_port = u.arbitrary()?;
                h.dst_port = u.arbitrary()?;
            }
        }
    }
    Ok(h)
}

/// The acceptance rule, written out anew from the spec and the device's limits.
fn acceptable(h: &Header, payload_available: usize, guest_cid: u64) -> bool {
    let op = Op::from_wire(h.op);
    op.is_some()
        && h.type_ == TYPE_STREAM
        && h.src_cid == guest_cid
        && h.dst_cid == HOST_CID
        && h.len <= MAX_PAYLOAD
        && h.len as usize <= payload_available
        && (op == Some(Op::Rw) || h.len == 0)
}

fn headers(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    for _ in 0..u.int_in_range(1u8..=8)? {
        let bytes = if u.arbitrary()? {
            let n = u.int_in_range(0usize..=HEADER_LEN + 8)?;
            u.bytes(n)?.to_vec()
        } else {
            let mut b = header(u)?.encode().to_vec();
            let extra = u.int_in_range(0usize..=4)?;
            b.extend_from_slice(u.bytes(extra)?);
            b
        };
        let payload_available = match u.int_in_range(0u8..=3)? {
            0 => 0,
            1 => u.int_in_range(0usize..=128)?,
            2 => MAX_PAYLOAD as usize + u.int_in_range(0usize..=2)? - 1,
            _ => u.arbitrary()?,
        };
        let guest_cid = if u.ratio(7u8, 8)? {
            CID
        } else {
            u.arbitrary()?
        };

        let decoded = Header::decode(&bytes);
        let parsed = parse_header(&bytes, payload_available, guest_cid);
        let Ok(h) = decoded else {
            assert!(bytes.len() < HEADER_LEN);
            assert_eq!(decoded, Err(HeaderError::Short(bytes.len())));
            assert_eq!(parsed, Err(HeaderError::Short(bytes.len())));
            continue;
        };
        assert_eq!(&h.encode()[..], &bytes[..HEADER_LEN], "encode(decode(b))");
        assert_eq!(Header::decode(&h.encode()), Ok(h), "decode(encode(h))");
        match parsed {
            Ok(pkt) => {
                assert_eq!(pkt.header, h);
                assert_eq!(pkt.op as u16, h.op);
                assert_eq!(h.type_, TYPE_STREAM);
                assert_eq!(h.src_cid, guest_cid);
                assert_eq!(h.dst_cid, HOST_CID);
                assert!(h.len <= MAX_PAYLOAD);
                assert!(h.len as usize <= payload_available);
                assert!(pkt.op == Op::Rw || h.len == 0, "{h:?}");
            }
            Err(e) => assert!(
                !acceptable(&h, payload_available, guest_cid),
                "{h:?} ({payload_available} available) refused: {e}"
            ),
        }
    }
    Ok(())
}

/// A directory for this process's sockets (removed at exit), the device's
/// socket path in it, and the host program's listener on [`LISTEN_PORT`].
fn sockets() -> &'static (PathBuf, UnixListener) {
    static SOCKETS: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    SOCKETS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("beacon-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("socket directory");
        extern "C" fn remove_dir() {
            let dir =
                std::env::temp_dir().join(format!("beacon-fuzz-vsock-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(dir);
        }
        // SAFETY: registers a plain function with no captured state.
        unsafe { libc::atexit(remove_dir) };
        let uds = dir.join("v.sock");
        let mut port = uds.as_os_str().to_owned();
        port.push(format!("_{LISTEN_PORT}"));
        let listener = UnixListener::bind(PathBuf::from(port)).expect("host listener");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        (uds, listener)
    })
}

/// One event-loop turn for the device's own fds (host sockets, timer).
fn pump(h: &Harness) {
    let Ok(mut manager) = EventManager::<Arc<Mutex<VirtioSubscriber>>>::new() else {
        return;
    };
    manager.add_subscriber(Arc::new(Mutex::new(h.subscriber())));
    let _ = manager.run_with_timeout(0);
}

fn device(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let (uds, listener) = sockets();
    let vsock = Arc::new(Mutex::new(
        HybridVsock::new(CID, uds).expect("vsock device"),
    ));
    let mut h = Harness::new(vsock.clone(), MEM_MIB);
    let size = 1u16 << u.int_in_range(0u8..=8)?;
    let mut queues: Vec<DriverQueue> = QUEUE_BASES
        .iter()
        .map(|&b| DriverQueue::new(b, size))
        .collect();
    h.bring_up(0, &queues);
    for _ in 0..u.int_in_range(1u8..=32)? {
        match u.int_in_range(0u8..=9)? {
            0..=2 => {
                // Packets on the TX queue: headers where chains point, then
                // payload bytes anywhere.
                queues[TX_QUEUE] = DriverQueue::new(QUEUE_BASES[TX_QUEUE], size);
                lay_out_queue(u, &h.mem, &mut queues[TX_QUEUE])?;
                for at in descriptor_addresses(&h.mem, &queues[TX_QUEUE]) {
                    if u.ratio(3u8, 4)? {
                        let _ = h
                            .mem
                            .memory()
                            .write_slice(&header(u)?.encode(), GuestAddress(at));
                    }
                }
                sprinkle(u, &h.mem, 4)?;
                h.notify(TX_QUEUE);
            }
            3 | 4 => {
                queues[RX_QUEUE] = DriverQueue::new(QUEUE_BASES[RX_QUEUE], size);
                lay_out_queue(u, &h.mem, &mut queues[RX_QUEUE])?;
                h.notify(RX_QUEUE);
            }
            5 => {
                queues[EVENT_QUEUE] = DriverQueue::new(QUEUE_BASES[EVENT_QUEUE], size);
                lay_out_queue(u, &h.mem, &mut queues[EVENT_QUEUE])?;
                h.notify(EVENT_QUEUE);
            }
            6 => pump(&h),
            7 => {
                // The host program accepts (and drops) what connected.
                while let Ok((stream, _)) = listener.accept() {
                    drop(stream);
                }
                pump(&h);
            }
            8 => h.write32(0x70, 0),
            _ => {
                let fresh: Vec<DriverQueue> = QUEUE_BASES
                    .iter()
                    .map(|&b| DriverQueue::new(b, size))
                    .collect();
                queues = fresh;
                h.bring_up(0, &queues);
            }
        }
        let dev = beacon_common::lock(&vsock);
        let conns = dev.connections();
        assert!(conns <= MAX_CONNECTIONS, "{conns}");
        let buffered = dev.buffered_bytes();
        assert!(
            buffered <= conns * CONN_BUF_ALLOC as usize,
            "{buffered} for {conns}"
        );
    }
    // Nothing connected waits in the listener's backlog for the next run.
    while let Ok((stream, _)) = listener.accept() {
        drop(stream);
    }
    Ok(())
}
