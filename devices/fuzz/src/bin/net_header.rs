//! Fuzz target: virtio-net's transmit path, what the guest controls there: the
//! `virtio_net_hdr_v1` in front of every frame (flags, gso type, and the
//! gso/csum fields the TAP's kernel side checks) and the chain it comes in.
//! The header check (`check_tx_header`) runs on raw bytes under any accepted
//! features, then the device's own per-chain transmit (`transmit`, what its TX
//! queue loop calls) runs on chains laid out from the input, with headers
//! written where they point, writing into a stand-in for the TAP (a fuzz
//! process cannot open one). Must hold: no panic or hang; a header is accepted
//! exactly when its flags and gso type are ones the guest negotiated; a frame
//! reaches the TAP exactly when the chain's readable part is all in guest
//! memory, longer than the header, at most header + `MAX_TX_FRAME` bytes and
//! its header is acceptable, and then it is exactly those bytes.
#![no_main]

use std::cell::RefCell;

use beacon_devices::virtio::net::tx::{
    check_tx_header, transmit, FrameSink, TxError, TX_BUFFER_LEN,
};
use beacon_devices::virtio::net::{features, MAX_TX_FRAME, OFFERED_FEATURES, VNET_HDR_LEN};
use beacon_devices_fuzz::{
    arbitrary, descriptor_addresses, guest_memory, lay_out_queue, sprinkle, DriverQueue,
    Unstructured, RING_BASE,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

/// The TAP's stand-in: keeps every frame written, or fails when told to.
#[derive(Default)]
struct Capture {
    frames: RefCell<Vec<Vec<u8>>>,
    fail: bool,
}

impl FrameSink for Capture {
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        if self.fail {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.frames.borrow_mut().push(frame.to_vec());
        Ok(frame.len())
    }

    fn write_frame_vectored(&self, iovs: &[libc::iovec]) -> std::io::Result<usize> {
        if self.fail {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        let mut frame = Vec::new();
        for iov in iovs {
            if iov.iov_len == 0 {
                continue;
            }
            // SAFETY: the device promises (as it does to writev) that every
            // iovec points to memory readable for the call: its header copy
            // or mapped guest memory. A wrong pointer here is the bug this
            // target looks for, and faults.
            let bytes =
                unsafe { std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len) };
            frame.extend_from_slice(bytes);
        }
        let n = frame.len();
        self.frames.borrow_mut().push(frame);
        Ok(n)
    }
}

/// What the header check must accept (the spec's rules, written out anew):
/// flags only NEEDS_CSUM and only with CSUM; gso NONE, or TCPv4 / TCPv6 with
/// HOST_TSO4 / HOST_TSO6. No ECN, no UDP, no other flags.
fn acceptable(hdr: &[u8], acked: u64) -> bool {
    let (Some(&flags), Some(&gso)) = (hdr.first(), hdr.get(1)) else {
        return false;
    };
    let flags_ok = flags == 0 || (flags == 1 && acked & features::CSUM != 0);
    let gso_ok = match gso {
        0 => true,
        1 => acked & features::HOST_TSO4 != 0,
        4 => acked & features::HOST_TSO6 != 0,
        _ => false,
    };
    flags_ok && gso_ok
}

fn acked_features(u: &mut Unstructured<'_>) -> arbitrary::Result<u64> {
    Ok(match u.int_in_range(0u8..=3)? {
        0 => OFFERED_FEATURES,
        1 => 0,
        2 => OFFERED_FEATURES & u.arbitrary::<u64>()?,
        _ => u.arbitrary()?,
    })
}

/// A net header: mostly plausible flags and gso types, any lengths.
fn net_header(u: &mut Unstructured<'_>) -> arbitrary::Result<[u8; VNET_HDR_LEN]> {
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = *u.choose(&[0u8, 0, 1, 1, 2, 3, 0x80])?;
    h[1] = *u.choose(&[0u8, 0, 1, 4, 3, 5, 0x81, 0x84])?;
    if u.ratio(1u8, 8)? {
        h[0] = u.arbitrary()?;
        h[1] = u.arbitrary()?;
    }
    // hdr_len, gso_size, csum_start, csum_offset, num_buffers: the device
    // passes these to the TAP, whose kernel side checks them.
    u.fill_buffer(&mut h[2..])?;
    Ok(h)
}

/// The chain's readable bytes, as the guest laid them out; `None` when one of
/// them is outside guest memory or there are more than the device takes (then
/// it must drop the frame).
fn readable_bytes(
    m: &vm_memory::GuestMemoryMmap,
    chain: &virtio_queue::DescriptorChain<&vm_memory::GuestMemoryMmap>,
) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for desc in chain.clone().readable() {
        let len = desc.len() as usize;
        if out.len() + len > TX_BUFFER_LEN {
            return None;
        }
        let at = out.len();
        out.resize(at + len, 0);
        m.read_slice(&mut out[at..], desc.addr()).ok()?;
    }
    Some(out)
}

fn run(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let acked = acked_features(u)?;

    // The header check on its own, on raw bytes of any length.
    let len = u.int_in_range(0usize..=VNET_HDR_LEN + 2)?;
    let raw = u.bytes(len)?;
    assert_eq!(
        check_tx_header(raw, acked).is_ok(),
        acceptable(raw, acked),
        "{raw:?} under {acked:#x}"
    );

    // Whole chains through the transmit path.
    let mem = guest_memory();
    let size = 1u16 << u.int_in_range(0u8..=8)?;
    let mut driver = DriverQueue::new(RING_BASE, size);
    lay_out_queue(u, &mem, &mut driver)?;
    // Net headers where descriptors point (chains' first buffers among them).
    for at in descriptor_addresses(&mem, &driver) {
        if u.ratio(3u8, 4)? {
            let _ = mem.memory().write_slice(&net_header(u)?, GuestAddress(at));
        }
    }
    sprinkle(u, &mem, 4)?;
    let mut queue = Queue::new(256).expect("queue");
    queue.set_size(size);
    queue.set_desc_table_address(Some(driver.desc as u32), Some(0));
    queue.set_avail_ring_address(Some(driver.avail as u32), Some(0));
    queue.set_used_ring_address(Some(driver.used as u32), Some(0));
    queue.set_ready(true);
    let m = mem.memory();
    let mut buf = vec![0u8; TX_BUFFER_LEN];
    for _ in 0..512 {
        let Some(chain) = queue.pop_descriptor_chain(&*m) else {
            break;
        };
        let expected =
            readable_bytes(&m, &chain).filter(|f| f.len() > VNET_HDR_LEN && acceptable(f, acked));
        let sink = Capture {
            fail: u.ratio(1u8, 16)?,
            ..Capture::default()
        };
        let result = transmit(&sink, &m, chain, acked, &mut buf);
        let frames = sink.frames.into_inner();
        match result {
            Ok(()) => {
                assert_eq!(frames.len(), 1);
                let frame = &frames[0];
                assert!(frame.len() > VNET_HDR_LEN, "{}", frame.len());
                assert!(
                    frame.len() <= VNET_HDR_LEN + MAX_TX_FRAME,
                    "{}",
                    frame.len()
                );
                assert!(acceptable(frame, acked), "{:?}", &frame[..VNET_HDR_LEN]);
                assert_eq!(
                    Some(frame),
                    expected.as_ref(),
                    "frame differs from the chain"
                );
            }
            Err(TxError::Dropped(why)) => {
                assert!(frames.is_empty(), "{why}");
                assert!(expected.is_none(), "a good frame dropped: {why}");
            }
            Err(TxError::Tap(_)) => {
                assert!(sink.fail);
                assert!(expected.is_some(), "a bad frame offered to the TAP");
            }
        }
    }
    Ok(())
}
