//! virtio-net against a real TAP in a private network namespace (each test
//! body runs on a thread that unshared its network namespace, so nothing touches
//! the host's links), driven by the miniature driver and a real event loop.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use super::userspace::{check_tx_header, fix_rx_header};
use super::*;
use crate::tap::TapError;
use crate::virtio::testing::{DriverQueue, Harness, DESC_F_NEXT};
use crate::virtio::VirtioSubscriber;

const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);
const RXQ: u64 = 0x10_0000;
const TXQ: u64 = 0x20_0000;
const BUF: u64 = 0x40_0000;

/// Run `body` on a thread with its own network namespace.
fn in_netns<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare only changes the namespaces of this thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET) failed: {}; the virtio-net tests need root (CAP_SYS_ADMIN)",
            io::Error::last_os_error()
        );
        body()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn sh(script: &str) {
    let out = std::process::Command::new("sh")
        .args(["-ec", script])
        .output()
        .expect("run sh (iproute2 is needed: resources/install.sh)");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// TAP `t0` (10.9.0.1/24, up, IPv6 off so the kernel sends nothing on its
/// own), a static neighbour for the guest's address, and a UDP socket on the
/// host end.
fn host_end() -> (Tap, UdpSocket) {
    sh("echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6
        ip link set lo up
        ip tuntap add t0 mode tap
        ip addr add 10.9.0.1/24 dev t0
        ip link set t0 up
        ip neigh add 10.9.0.2 lladdr 02:00:00:00:00:02 dev t0 nud permanent");
    let tap = Tap::open("t0").expect("open t0");
    let sock = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 5000)).expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    (tap, sock)
}

fn tap_mac(name: &str) -> [u8; 6] {
    let text =
        std::fs::read_to_string(format!("/sys/class/net/{name}/address")).unwrap_or_else(|_| {
            // /sys shows the namespace it was mounted in; ask ip instead.
            let out = std::process::Command::new("ip")
                .args(["-br", "link", "show", name])
                .output()
                .expect("ip");
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .nth(2)
                .unwrap_or_default()
                .to_string()
        });
    let mac: MacAddr = text.trim().parse().expect("tap mac");
    mac.0
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A net header (all zero) and an Ethernet/IPv4/UDP frame from the guest.
fn guest_udp(dst_mac: [u8; 6], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&MAC.0);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&GUEST_IP.octets());
    ip.extend_from_slice(&HOST_IP.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// The UDP payload of a received frame (net header included), if it is one.
fn udp_payload(frame: &[u8]) -> Option<&[u8]> {
    let eth = frame.get(VNET_HDR_LEN..)?;
    if eth.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = eth.get(14..)?;
    let ihl = usize::from(ip.first()? & 0xf) * 4;
    if *ip.get(9)? != 17 {
        return None;
    }
    ip.get(ihl + 8..)
}

/// A device on a TAP, brought up by the miniature driver, on a real event loop.
struct Rig {
    h: Harness,
    rx: DriverQueue,
    tx: DriverQueue,
    em: EventManager<VirtioSubscriber>,
}

impl Rig {
    fn new(tap: Tap, accept: u64) -> Self {
        let device = Arc::new(Mutex::new(Net::new(tap, MAC)));
        let mut h = Harness::new(device, 16);
        let mut em = EventManager::new().expect("event manager");
        em.add_subscriber(h.subscriber());
        let rx = DriverQueue::new(RXQ, 64);
        let tx = DriverQueue::new(TXQ, 128);
        assert_eq!(h.bring_up(accept, &[rx.clone(), tx.clone()]) & 0x4f, 0xf);
        let mut rig = Self { h, rx, tx, em };
        rig.turns(3);
        rig
    }

    /// Let the event loop run until it is idle (at most `n` turns).
    fn turns(&mut self, n: usize) -> usize {
        let mut total = 0;
        for _ in 0..n {
            let got = self.em.run_with_timeout(50).expect("loop turn");
            total += got;
            if got == 0 {
                break;
            }
        }
        total
    }

    fn kick(&mut self, queue: usize) {
        self.h.queue_events[queue].write(1).expect("kick");
        self.turns(20);
    }

    fn send(&mut self, frame: &[u8], at: u64) -> u16 {
        let mem = self.h.mem.memory();
        mem.write_slice(frame, GuestAddress(at)).expect("frame");
        drop(mem);
        self.tx
            .add_chain(&self.h.mem, &[(at, frame.len() as u32, false)])
    }

    fn read(&self, at: u64, len: u32) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        self.h
            .mem
            .memory()
            .read_slice(&mut v, GuestAddress(at))
            .expect("read");
        v
    }

    /// The avail_event field the device wrote into the receive used ring.
    fn rx_avail_event(&self) -> u16 {
        let at = self.rx.used + 4 + 8 * u64::from(self.rx.size);
        self.h
            .mem
            .memory()
            .read_obj(GuestAddress(at))
            .expect("avail_event")
    }
}

fn host_send(sock: &UdpSocket, payload: &[u8]) {
    sock.send_to(payload, SocketAddrV4::new(GUEST_IP, 6000))
        .expect("send to the guest");
}

#[test]
fn tap_offloads_follow_the_accepted_features() {
    use features::*;
    assert_eq!(tap_offloads(0), 0);
    assert_eq!(
        tap_offloads(GUEST_TSO4 | GUEST_TSO6),
        0,
        "TSO needs checksums"
    );
    assert_eq!(tap_offloads(GUEST_CSUM), TUN_F_CSUM);
    assert_eq!(
        tap_offloads(GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | CSUM | HOST_TSO4),
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    );
}

#[test]
fn headers_are_checked_against_the_negotiated_features() {
    use features::*;
    let mut hdr = [0u8; VNET_HDR_LEN];
    assert_eq!(check_tx_header(&hdr, 0), Ok(()));
    hdr[0] = 1;
    assert!(check_tx_header(&hdr, 0).is_err(), "NEEDS_CSUM without CSUM");
    assert_eq!(check_tx_header(&hdr, CSUM), Ok(()));
    hdr[0] = 0x80;
    assert!(check_tx_header(&hdr, CSUM).is_err(), "unknown flag");
    hdr[0] = 1;
    hdr[1] = 1;
    assert!(check_tx_header(&hdr, CSUM).is_err(), "TSO4 not negotiated");
    assert_eq!(check_tx_header(&hdr, CSUM | HOST_TSO4), Ok(()));
    hdr[1] = 3;
    assert!(
        check_tx_header(&hdr, u64::MAX).is_err(),
        "UFO is never offered"
    );
    assert!(check_tx_header(&[0u8; 1], u64::MAX).is_err());

    let mut rx = [0u8; VNET_HDR_LEN];
    rx[0] = 2; // DATA_VALID
    fix_rx_header(&mut rx, 0, 1).expect("plain");
    assert_eq!(rx[0], 0, "flags cleared without GUEST_CSUM");
    assert_eq!(u16::from_le_bytes([rx[10], rx[11]]), 1);
    rx[0] = 1;
    assert!(fix_rx_header(&mut rx, 0, 1).is_err());
    rx[1] = 4;
    assert!(fix_rx_header(&mut rx, GUEST_CSUM | GUEST_TSO4, 3).is_err());
    fix_rx_header(&mut rx, GUEST_CSUM | GUEST_TSO6, 3).expect("tso6");
    assert_eq!(u16::from_le_bytes([rx[10], rx[11]]), 3);
}

#[test]
fn offers_features_mac_and_link_status() {
    in_netns(|| {
        let (tap, _sock) = host_end();
        let net = Net::new(tap, MAC);
        assert_eq!(net.device_type(), VIRTIO_ID_NET);
        assert_eq!(net.features(), OFFERED_FEATURES);
        assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        let mut c = [0xffu8; 8];
        net.read_config(0, &mut c);
        assert_eq!(c, [2, 0, 0, 0, 0, 2, 1, 0], "MAC then LINK_UP");
        let mut tail = [0xffu8; 4];
        net.read_config(6, &mut tail);
        assert_eq!(tail, [1, 0, 0, 0], "past the config space reads zero");
        net.read_config(u64::MAX, &mut tail);
        assert_eq!(tail, [0; 4]);
        assert!(net.handles_queue_notifications());
    });
}

#[test]
fn transmits_frames_and_drops_hostile_chains() {
    in_netns(|| {
        let (tap, sock) = host_end();
        let host_mac = tap_mac("t0");
        // No CSUM, no HOST_TSO4: headers asking for them are refused.
        let mut rig = Rig::new(tap, VIRTIO_RING_F_EVENT_IDX | features::MRG_RXBUF);
        rig.send(&guest_udp(host_mac, 5000, b"first"), BUF);
        rig.kick(TX_QUEUE);
        let mut got = [0u8; 2048];
        let (n, from) = sock.recv_from(&mut got).expect("first datagram");
        assert_eq!(&got[..n], b"first");
        assert_eq!(
            from,
            std::net::SocketAddr::from(SocketAddrV4::new(GUEST_IP, 4000))
        );

        let shattered = [b's'; 300];
        // The header in its own descriptor, the frame in three more (written
        // straight from guest memory), and a frame in 70 pieces (copied first).
        for (payload, pieces, at) in [
            (&b"split"[..], 4usize, BUF + 0x1000),
            (&shattered[..], 70, BUF + 0x3000),
        ] {
            let frame = guest_udp(host_mac, 5000, payload);
            rig.h
                .mem
                .memory()
                .write_slice(&frame, GuestAddress(at))
                .expect("frame");
            let mut cuts = vec![0, VNET_HDR_LEN];
            let rest = frame.len() - VNET_HDR_LEN;
            for i in 1..pieces - 1 {
                cuts.push(VNET_HDR_LEN + rest * i / (pieces - 1));
            }
            cuts.push(frame.len());
            let chain: Vec<(u64, u32, bool)> = cuts
                .windows(2)
                .map(|w| (at + w[0] as u64, (w[1] - w[0]) as u32, false))
                .collect();
            rig.tx.add_chain(&rig.h.mem, &chain);
            rig.kick(TX_QUEUE);
            let (n, _) = sock.recv_from(&mut got).expect("a frame in pieces");
            assert_eq!(&got[..n], payload);
        }

        // Shorter than the header.
        rig.send(&[0u8; 8], BUF);
        // Longer than 64 KiB plus header.
        let mut long = guest_udp(host_mac, 5000, b"long");
        long.resize(VNET_HDR_LEN + MAX_TX_FRAME + 1, 0);
        rig.send(&long, BUF + 0x2_0000);
        // Outside guest memory, and crossing its end.
        rig.tx.add_chain(&rig.h.mem, &[(1 << 40, 64, false)]);
        rig.tx
            .add_chain(&rig.h.mem, &[((16 << 20) - 16, 64, false)]);
        // Offloads that were not negotiated.
        let mut csum = guest_udp(host_mac, 5000, b"csum");
        csum[0] = 1;
        rig.send(&csum, BUF + 0x4_0000);
        let mut tso = guest_udp(host_mac, 5000, b"tso");
        tso[1] = 1;
        rig.send(&tso, BUF + 0x5_0000);
        // A descriptor that points to itself (over bytes that are no header).
        let junk = BUF + 0x7_0000;
        rig.h
            .mem
            .memory()
            .write_slice(&[0xff; 64], GuestAddress(junk))
            .expect("junk");
        rig.tx.write_desc(&rig.h.mem, 40, junk, 64, DESC_F_NEXT, 40);
        rig.tx.publish(&rig.h.mem, 40);
        rig.send(&guest_udp(host_mac, 5000, b"after"), BUF + 0x6_0000);
        rig.kick(TX_QUEUE);
        let used = rig.tx.take_used(&rig.h.mem);
        assert_eq!(used.len(), 11, "every chain is returned: {used:?}");
        assert!(used.iter().all(|&(_, len)| len == 0));
        let (n, _) = sock
            .recv_from(&mut got)
            .expect("the good frame after the bad ones");
        assert_eq!(&got[..n], b"after", "nothing malformed reached the host");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        assert!(
            sock.recv_from(&mut got).is_err(),
            "no other datagram arrived"
        );
    });
}

#[test]
fn receives_into_mergeable_buffers_and_waits_for_more() {
    in_netns(|| {
        let (tap, sock) = host_end();
        let mut rig = Rig::new(
            tap,
            VIRTIO_RING_F_EVENT_IDX | features::MRG_RXBUF | features::GUEST_CSUM,
        );
        // 12 + 14 + 20 + 8 + 1000 = 1054 bytes need five 256-byte buffers.
        let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        for i in 0..2 {
            rig.rx.add_chain(&rig.h.mem, &[(BUF + i * 256, 256, true)]);
        }
        host_send(&sock, &payload);
        rig.kick(RX_QUEUE);
        assert!(rig.rx.take_used(&rig.h.mem).is_empty(), "not delivered cut");
        assert_eq!(rig.rx_avail_event(), 2, "the next buffer will notify");
        assert_eq!(
            rig.turns(3),
            0,
            "the readable TAP does not make the loop spin"
        );
        for i in 2..6 {
            rig.rx.add_chain(&rig.h.mem, &[(BUF + i * 256, 256, true)]);
        }
        rig.kick(RX_QUEUE);
        let used = rig.rx.take_used(&rig.h.mem);
        assert_eq!(used.len(), 5, "{used:?}");
        let mut frame = Vec::new();
        for (i, &(head, len)) in used.iter().enumerate() {
            assert_eq!(head, i as u32);
            frame.extend(rig.read(BUF + u64::from(head) * 256, len));
        }
        assert_eq!(frame.len(), 1054);
        assert_eq!(u16::from_le_bytes([frame[10], frame[11]]), 5, "num_buffers");
        assert_eq!(frame[0] & !1, 0, "only NEEDS_CSUM may be set");
        assert_eq!(udp_payload(&frame), Some(&payload[..]));
        assert!(rig.h.irq.read().expect("interrupt") >= 1);
    });
}

#[test]
fn without_buffers_frames_wait_in_the_tap_without_spinning_or_loss() {
    in_netns(|| {
        let (tap, sock) = host_end();
        let mut rig = Rig::new(tap, VIRTIO_RING_F_EVENT_IDX | features::MRG_RXBUF);
        for i in 0..20u8 {
            host_send(&sock, &[i; 100]);
        }
        rig.turns(5);
        assert_eq!(
            rig.turns(3),
            0,
            "with frames waiting and no buffers the loop is idle"
        );
        assert_eq!(rig.rx_avail_event(), 0, "the first buffer will notify");
        for i in 0..32 {
            rig.rx
                .add_chain(&rig.h.mem, &[(BUF + i * 2048, 2048, true)]);
        }
        rig.kick(RX_QUEUE);
        let used = rig.rx.take_used(&rig.h.mem);
        assert_eq!(used.len(), 20, "every frame arrived once: {used:?}");
        for (i, &(head, len)) in used.iter().enumerate() {
            let frame = rig.read(BUF + u64::from(head) * 2048, len);
            assert_eq!(udp_payload(&frame), Some(&[i as u8; 100][..]), "in order");
        }
        // Drained: the TAP is watched again, and idle.
        assert_eq!(rig.turns(3), 0);
        host_send(&sock, b"late");
        rig.turns(5);
        let used = rig.rx.take_used(&rig.h.mem);
        assert_eq!(
            used.len(),
            1,
            "a later frame comes in through the TAP's readiness"
        );
    });
}

#[test]
fn frames_too_big_for_the_posted_buffers_are_dropped_not_cut() {
    in_netns(|| {
        let (tap, sock) = host_end();
        // No mergeable buffers: each frame needs one chain big enough.
        let mut rig = Rig::new(tap, VIRTIO_RING_F_EVENT_IDX);
        rig.rx.add_chain(&rig.h.mem, &[(BUF, 512, true)]);
        host_send(&sock, &[7u8; 1000]);
        host_send(&sock, b"small");
        rig.kick(RX_QUEUE);
        let used = rig.rx.take_used(&rig.h.mem);
        assert_eq!(used.len(), 1, "{used:?}");
        let frame = rig.read(BUF, used[0].1);
        assert_eq!(udp_payload(&frame), Some(&b"small"[..]));
        assert_eq!(u16::from_le_bytes([frame[10], frame[11]]), 1);

        // A receive buffer outside guest memory gets nothing, and nothing spins.
        rig.rx.add_chain(&rig.h.mem, &[(1 << 40, 2048, true)]);
        host_send(&sock, b"lost");
        rig.kick(RX_QUEUE);
        assert!(rig.rx.take_used(&rig.h.mem).is_empty());
        assert_eq!(rig.turns(3), 0);

        // A wild available index: receiving stops, nothing spins, a reset heals.
        rig.rx.set_avail_idx(&rig.h.mem, 40_000);
        host_send(&sock, b"wild");
        rig.kick(RX_QUEUE);
        assert_eq!(rig.turns(3), 0);
        rig.h.write32(0x70, 0);
        let mut fresh = DriverQueue::new(0x30_0000, 64);
        let tx = DriverQueue::new(0x38_0000, 64);
        assert_eq!(
            rig.h
                .bring_up(VIRTIO_RING_F_EVENT_IDX, &[fresh.clone(), tx])
                & 0x4f,
            0xf
        );
        fresh.add_chain(&rig.h.mem, &[(BUF, 2048, true)]);
        host_send(&sock, b"healed");
        rig.h.queue_events[RX_QUEUE].write(1).expect("kick");
        rig.turns(20);
        let used = fresh.take_used(&rig.h.mem);
        let payloads: Vec<Vec<u8>> = used
            .iter()
            .map(|&(_, len)| rig.read(BUF, len))
            .filter_map(|f| udp_payload(&f).map(<[u8]>::to_vec))
            .collect();
        assert_eq!(payloads.last().map(Vec::as_slice), Some(&b"healed"[..]));
    });
}

#[test]
fn checksum_offload_reaches_the_guest_only_when_accepted() {
    in_netns(|| {
        let (tap, sock) = host_end();
        let mut rig = Rig::new(
            tap,
            VIRTIO_RING_F_EVENT_IDX | features::GUEST_CSUM | features::GUEST_TSO4,
        );
        rig.rx.add_chain(&rig.h.mem, &[(BUF, 2048, true)]);
        host_send(&sock, b"partial");
        rig.kick(RX_QUEUE);
        let used = rig.rx.take_used(&rig.h.mem);
        assert_eq!(used.len(), 1);
        let frame = rig.read(BUF, used[0].1);
        assert_eq!(
            frame[0], 1,
            "NEEDS_CSUM: the TAP left the checksum to the guest"
        );

        // The driver resets and accepts no offloads: checksums are complete.
        rig.h.write32(0x70, 0);
        let mut rx = DriverQueue::new(0x30_0000, 64);
        let tx = DriverQueue::new(0x38_0000, 64);
        assert_eq!(
            rig.h.bring_up(VIRTIO_RING_F_EVENT_IDX, &[rx.clone(), tx]) & 0x4f,
            0xf
        );
        rig.turns(3);
        rx.add_chain(&rig.h.mem, &[(BUF, 2048, true)]);
        host_send(&sock, b"complete");
        rig.h.queue_events[RX_QUEUE].write(1).expect("kick");
        rig.turns(20);
        let used = rx.take_used(&rig.h.mem);
        assert_eq!(used.len(), 1);
        let frame = rig.read(BUF, used[0].1);
        assert_eq!(frame[0], 0, "no header flags without GUEST_CSUM");
        let udp_csum = &frame[VNET_HDR_LEN + 14 + 20 + 6..VNET_HDR_LEN + 14 + 20 + 8];
        assert_ne!(udp_csum, [0, 0], "the host filled in the UDP checksum");
    });
}

#[test]
fn caller_fds_are_attached_checked_and_never_closed() {
    in_netns(|| {
        sh("ip tuntap add t1 mode tap; ip tuntap add t2 mode tap");
        // An unattached /dev/net/tun descriptor is attached to the named TAP.
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("tun");
        let fd = tun.as_raw_fd();
        assert!(matches!(
            Tap::from_caller_fd(fd, ""),
            Err(TapError::UnattachedWithoutName(_))
        ));
        let tap = Tap::from_caller_fd(fd, "t1").expect("attach");
        assert_eq!(tap.name(), "t1");
        // Opening it again by name: it is busy.
        assert!(matches!(Tap::open("t1"), Err(TapError::Busy(_))));
        drop(tap);
        // SAFETY: F_GETFD only reads the descriptor table.
        let still_open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
        assert!(still_open, "caller's fd open");
        // Now attached: taken as it is, the name must match.
        let again = Tap::from_caller_fd(fd, "").expect("attached fd");
        assert_eq!(again.name(), "t1");
        assert!(matches!(
            Tap::from_caller_fd(fd, "t2"),
            Err(TapError::NameMismatch { .. })
        ));
        drop(again);
        drop(tun);

        // A TAP opened without IFF_VNET_HDR is refused, saying so.
        let plain = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("tun");
        let mut req = [0u8; 40];
        req[..2].copy_from_slice(b"t2");
        req[16..18].copy_from_slice(&(0x0002u16 | 0x1000).to_ne_bytes());
        // SAFETY: `req` is a 40-byte ifreq that outlives the call.
        let rc = unsafe { libc::ioctl(plain.as_raw_fd(), 0x4004_54ca, req.as_mut_ptr()) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        let err = Tap::from_caller_fd(plain.as_raw_fd(), "t2").expect_err("no vnet hdr");
        assert!(err.to_string().contains("IFF_VNET_HDR"), "{err}");

        // Not a TAP at all.
        assert!(matches!(Tap::open("lo"), Err(TapError::NotATap(_))));
    });
}

#[test]
fn vhost_net_is_used_when_present_and_refused_clearly_when_not() {
    in_netns(|| {
        let (tap, _sock) = host_end();
        let mem = crate::virtio::testing::guest_memory(16);
        match Net::with_vhost(tap, MAC, mem) {
            Ok(net) => {
                assert!(std::path::Path::new(VHOST_NET_DEVICE).exists());
                assert!(net.is_vhost());
                assert!(!net.handles_queue_notifications());
                assert_eq!(net.features() & !OFFERED_FEATURES, 0);
                assert_ne!(net.features() & VIRTIO_F_VERSION_1, 0);
            }
            Err(e) => {
                assert!(!std::path::Path::new(VHOST_NET_DEVICE).exists(), "{e}");
                assert!(matches!(e, NetError::VhostMissing));
                assert!(e.to_string().contains("modprobe vhost_net"));
            }
        }
    });
}

#[test]
fn a_tap_deleted_under_the_device_does_not_make_the_loop_spin() {
    in_netns(|| {
        let (tap, _sock) = host_end();
        let mut rig = Rig::new(tap, VIRTIO_RING_F_EVENT_IDX | features::MRG_RXBUF);
        rig.rx.add_chain(&rig.h.mem, &[(BUF, 2048, true)]);
        rig.kick(RX_QUEUE);
        sh("ip link del t0");
        rig.turns(5);
        assert_eq!(rig.turns(3), 0, "an fd in error leaves the epoll set");
        // Transmitting into the dead TAP fails quietly, and the loop stays idle.
        rig.send(&guest_udp([2, 0, 0, 0, 0, 1], 5000, b"void"), BUF + 0x1000);
        rig.kick(TX_QUEUE);
        assert_eq!(rig.tx.take_used(&rig.h.mem).len(), 1);
        assert_eq!(rig.turns(3), 0);
    });
}
