//! A hostile guest: raw frames written into a sandbox's TAP must not get past the
//! confinement of legacy mode, while host ↔ guest traffic keeps working:
//!
//! * spoofed IP, spoofed MAC, spoofed ARP, IPv6 and other ethertypes from guest A
//!   reach neither guest B nor a host listener; A's real frames reach the host,
//!   and B only with guest-to-guest traffic enabled (isolated by default);
//! * guest → host UDP, TCP and ICMP to the gateway and to another host address are
//!   dropped by default and pass as `BEACON_HOST_ACCESS` allows (only those
//!   ports), and port 53 of the DNS server the guests were given passes; host → A
//!   and A's reply pass;
//! * another network cannot open connections to a guest; the guest's NATed
//!   egress and its reply pass;
//! * the guard set follows the leases (setup, teardown, ensure twice, reconcile
//!   after `nft flush`, cleanup, concurrent setups in many processes);
//! * a subnet another device uses (address or route) is refused with nothing left.
//!
//! "Not seen" is proved with a witness, never with a timeout alone: a frame the
//! test writes into a TAP is processed synchronously by the kernel (bridge,
//! routing, local delivery) before `write` returns, and everything it triggers is
//! queued in order. So the test sends the forbidden frame first and an allowed
//! witness frame after it, waits (bounded) for the witness, and asserts that the
//! forbidden frame did not arrive before it.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use beacon_netmgr::{
    link, tap, HostService, MacAddr, NetConfig, NetError, NetworkAttachment, NetworkManager,
};

use crate::harness::{
    count, legacy_config, nft_json, nft_ruleset, own, rt, sysfs, wait_links_ready,
};
use crate::netns_test;
use crate::traffic::{is_arp, wait_frame};

/// Bound of every wait for a frame that must arrive (normally microseconds).
const MUST_ARRIVE: Duration = Duration::from_secs(5);

// ---- frames -----------------------------------------------------------------

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ethernet(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f.resize(f.len().max(60), 0);
    f
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let len = (20 + payload.len()) as u16;
    let mut h = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
    h[2..4].copy_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let sum = checksum(&[&h]);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// IPv4/UDP packet with a valid UDP checksum.
fn udp_packet(src: SocketAddrV4, dst: SocketAddrV4, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&src.port().to_be_bytes());
    u.extend_from_slice(&dst.port().to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    let sum = checksum(&[&pseudo_header(*src.ip(), *dst.ip(), 17, u.len()), &u]);
    u[6..8].copy_from_slice(&sum.to_be_bytes());
    ipv4(*src.ip(), *dst.ip(), 17, &u)
}

/// Guest IPv4/UDP frame with a valid UDP checksum.
fn udp_frame(
    eth: (MacAddr, MacAddr),
    src: SocketAddrV4,
    dst: SocketAddrV4,
    data: &[u8],
) -> Vec<u8> {
    ethernet(eth.0, eth.1, 0x0800, &udp_packet(src, dst, data))
}

/// Guest IPv4/TCP SYN with a valid checksum.
fn tcp_syn(eth: (MacAddr, MacAddr), src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&src.port().to_be_bytes());
    t.extend_from_slice(&dst.port().to_be_bytes());
    t.extend_from_slice(&0x1000_0000u32.to_be_bytes()); // seq
    t.extend_from_slice(&0u32.to_be_bytes()); // ack
    t.extend_from_slice(&[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]); // 20 bytes, SYN, window
    let sum = checksum(&[&pseudo_header(*src.ip(), *dst.ip(), 6, t.len()), &t]);
    t[16..18].copy_from_slice(&sum.to_be_bytes());
    ethernet(eth.0, eth.1, 0x0800, &ipv4(*src.ip(), *dst.ip(), 6, &t))
}

/// ARP request with Ethernet source `eth_src`, sender `sha`/`spa`, target `tpa`.
fn arp(eth_src: MacAddr, sha: MacAddr, spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
    a.extend_from_slice(&sha.0);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&tpa.octets());
    ethernet(MacAddr([0xff; 6]), eth_src, 0x0806, &a)
}

/// IPv4 source and destination of a frame, if it is IPv4.
fn ip_addrs(f: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    (f.len() >= 34 && f[12..14] == [0x08, 0x00]).then(|| {
        (
            Ipv4Addr::new(f[26], f[27], f[28], f[29]),
            Ipv4Addr::new(f[30], f[31], f[32], f[33]),
        )
    })
}

/// UDP payload of an IPv4/UDP frame (20-byte IP header, as ours and the kernel's).
fn udp_payload(f: &[u8]) -> Option<&[u8]> {
    (ip_addrs(f).is_some() && f[23] == 17 && f.len() >= 42).then(|| {
        let len = usize::from(u16::from_be_bytes([f[38], f[39]]));
        &f[42..(34 + len).min(f.len())]
    })
}

fn is_syn_ack_from(f: &[u8], src: Ipv4Addr, port: u16) -> bool {
    ip_addrs(f).is_some_and(|(s, _)| s == src)
        && f[23] == 6
        && f.len() >= 54
        && u16::from_be_bytes([f[34], f[35]]) == port
        && f[47] & 0x12 == 0x12
}

/// The next frame on `tap`, waiting until `deadline` at most.
fn next_frame(tap: &mut File, deadline: Instant) -> Option<Vec<u8>> {
    wait_frame(
        tap,
        deadline.saturating_duration_since(Instant::now()),
        |_| true,
    )
}

/// Read frames from `tap` until `witness` holds (bounded by [`MUST_ARRIVE`]);
/// return the frames that came before it.
fn frames_before(tap: &mut File, what: &str, witness: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + MUST_ARRIVE;
    let mut before = Vec::new();
    loop {
        let frame = next_frame(tap, deadline).unwrap_or_else(|| {
            panic!("the witness frame ({what}) never arrived; before it: {before:?}")
        });
        if witness(&frame) {
            return before;
        }
        before.push(frame);
    }
}

/// Packets the drop rule of the guard's `chain` counted.
fn guard_drops(chain: &str) -> u64 {
    nft_ruleset()["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| r["table"] == "beacon_runner_guard" && r["chain"] == chain)
        .flat_map(|r| r["expr"].as_array().unwrap().clone())
        .filter_map(|e| e["counter"]["packets"].as_u64())
        .sum()
}

/// Read what is queued on `tap` right now without waiting.
fn drain(tap: &mut File) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 2048];
    loop {
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call; zero timeout.
        if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 {
            return frames;
        }
        let n = tap.read(&mut buf).unwrap();
        frames.push(buf[..n].to_vec());
    }
}

// ---- the lab ----------------------------------------------------------------

/// Two sandboxes on the bridge, their TAPs open as the guests' side.
struct Lab {
    mgr: NetworkManager,
    a: NetworkAttachment,
    b: NetworkAttachment,
    tap_a: File,
    tap_b: File,
    bridge_mac: MacAddr,
    _owners: Vec<beacon_netmgr::LivenessGuard>,
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    async fn start(dir: &std::path::Path, guest_to_guest: bool, access: &str) -> Lab {
        Lab::start_with(dir, |cfg| {
            cfg.guest_to_guest = guest_to_guest;
            cfg.host_access = HostService::parse_list(access).unwrap();
        })
        .await
    }

    async fn start_with(dir: &std::path::Path, tweak: impl FnOnce(&mut NetConfig)) -> Lab {
        let mut cfg = legacy_config(dir);
        tweak(&mut cfg);
        let mgr = NetworkManager::new(cfg).unwrap();
        let owners = vec![own(&mgr, "guest-a"), own(&mgr, "guest-b")];
        let a = mgr.setup("guest-a").await.unwrap();
        let b = mgr.setup("guest-b").await.unwrap();
        let tap_a = tap::open_tap_plain(&a.tap).unwrap();
        let tap_b = tap::open_tap_plain(&b.tap).unwrap();
        let h = link::connect().unwrap();
        wait_links_ready(&h, &[&a.tap, &b.tap, "beacon0"]).await;
        let bridge_mac: MacAddr = sysfs("beacon0", "address").unwrap().parse().unwrap();
        // The host knows the guests' MACs (a real guest answers ARP; this one is a
        // test), so host → guest needs no ARP round trip.
        for g in [&a, &b] {
            run(&[
                "ip",
                "neigh",
                "replace",
                &g.ip.to_string(),
                "lladdr",
                &g.mac.to_string(),
                "dev",
                "beacon0",
                "nud",
                "permanent",
            ]);
        }
        Lab {
            mgr,
            a,
            b,
            tap_a,
            tap_b,
            bridge_mac,
            _owners: owners,
        }
    }

    fn send_a(&mut self, frame: &[u8]) {
        self.tap_a.write_all(frame).unwrap();
    }

    /// Host → guest A from `from` (a socket bound on the gateway) to A's `port`:
    /// must reach A's TAP. Returns nothing; the frame is consumed by the caller's
    /// witness wait.
    fn host_to_a(&self, from: &UdpSocket, port: u16, data: &[u8]) {
        from.send_to(data, SocketAddrV4::new(self.a.ip, port))
            .unwrap();
    }
}

fn udp_listener(port: u16) -> UdpSocket {
    let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).unwrap();
    s.set_read_timeout(Some(MUST_ARRIVE)).unwrap();
    s
}

/// Datagrams on `sock` until one equals `witness` (bounded); the ones before it.
fn datagrams_before(sock: &UdpSocket, witness: &[u8]) -> Vec<Vec<u8>> {
    let mut before = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let (n, _) = sock
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("witness datagram {witness:?} never arrived: {e}"));
        if &buf[..n] == witness {
            return before;
        }
        before.push(buf[..n].to_vec());
    }
}

/// A packet on the host's UDP `port` from guest A, with the given Ethernet source
/// and IP source: what `udp_frame` sends to the gateway.
fn to_host(
    lab: &Lab,
    eth_src: MacAddr,
    ip_src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    data: &[u8],
) -> Vec<u8> {
    udp_frame(
        (lab.bridge_mac, eth_src),
        SocketAddrV4::new(ip_src, 40000),
        SocketAddrV4::new(dst, port),
        data,
    )
}

// ---- anti-spoofing ------------------------------------------------------------

/// Spoofed IP, spoofed MAC and spoofed ARP from A reach neither B nor a host
/// listener; the same frames with A's real addresses reach the host, and B only
/// when `guest_to_guest`.
async fn spoofing(guest_to_guest: bool) {
    let dir = tempfile::tempdir().unwrap();
    const PORT: u16 = 5300;
    let mut lab = Lab::start(dir.path(), guest_to_guest, &format!("udp/{PORT}")).await;
    let (a, b) = (lab.a.clone(), lab.b.clone());
    let fake_mac = MacAddr([0x02, 0xde, 0xad, 0xbe, 0xef, 0x01]);
    let fake_ip = Ipv4Addr::new(10, 88, 0, 200);
    let gw = a.gateway;

    // Guest A → host listener: spoofed IP (a free one, and B's), spoofed MAC
    // (a made-up one, and B's), then the real one as the witness.
    let host = udp_listener(PORT);
    for (mac, ip, tag) in [
        (a.mac, fake_ip, "spoofed ip"),
        (a.mac, b.ip, "ip of b"),
        (fake_mac, a.ip, "spoofed mac"),
        (b.mac, a.ip, "mac of b"),
        (b.mac, b.ip, "b's mac and ip"),
    ] {
        let frame = to_host(&lab, mac, ip, gw, PORT, tag.as_bytes());
        lab.send_a(&frame);
    }
    lab.send_a(&to_host(&lab, a.mac, a.ip, gw, PORT, b"real"));
    let leaked = datagrams_before(&host, b"real");
    assert!(
        leaked.is_empty(),
        "spoofed packets reached the host: {leaked:?}"
    );

    // Guest A → guest B (unicast to B's MAC and IP): spoofed ones, then the real
    // one. With guest-to-guest traffic on, the real one is the witness; off, the
    // witness is a host → B packet sent after everything.
    let to_b = |mac: MacAddr, ip: Ipv4Addr, tag: &str| {
        udp_frame(
            (b.mac, mac),
            SocketAddrV4::new(ip, 40000),
            SocketAddrV4::new(b.ip, 6000),
            tag.as_bytes(),
        )
    };
    for (mac, ip, tag) in [
        (a.mac, fake_ip, "spoofed ip"),
        (fake_mac, a.ip, "spoofed mac"),
        (fake_mac, fake_ip, "spoofed both"),
    ] {
        lab.send_a(&to_b(mac, ip, tag));
    }
    // ARP from A: claiming B's IP (poisoning), a sender MAC that is not A's, an
    // Ethernet source that is not A's, a probe from 0.0.0.0; then the real one.
    for frame in [
        arp(a.mac, a.mac, b.ip, gw),
        arp(a.mac, fake_mac, a.ip, gw),
        arp(fake_mac, a.mac, a.ip, gw),
        arp(a.mac, a.mac, Ipv4Addr::UNSPECIFIED, gw),
    ] {
        lab.send_a(&frame);
    }
    lab.send_a(&to_b(a.mac, a.ip, "real"));
    lab.send_a(&arp(a.mac, a.mac, a.ip, gw));
    // To B's IP through the gateway's MAC: the host routes it back onto the bridge
    // (source MAC the bridge's, so it is told apart by its payload).
    lab.send_a(&udp_frame(
        (lab.bridge_mac, a.mac),
        SocketAddrV4::new(a.ip, 40001),
        SocketAddrV4::new(b.ip, 6000),
        b"routed",
    ));
    let witness_sock = UdpSocket::bind(SocketAddrV4::new(gw, 0)).unwrap();
    witness_sock
        .send_to(b"host witness", SocketAddrV4::new(b.ip, 6001))
        .unwrap();
    let before = frames_before(&mut lab.tap_b, "host → B", |f| {
        udp_payload(f) == Some(b"host witness")
    });
    // What A wrote carries A's MAC or one it made up (the host's own frames, such
    // as IPv6 multicast reports, are not A's business here).
    let from_a: Vec<_> = before
        .iter()
        .filter(|f| {
            [a.mac.0, fake_mac.0, b.mac.0]
                .iter()
                .any(|m| f[6..12] == m[..])
        })
        .collect();
    let payloads: Vec<_> = from_a.iter().filter_map(|f| udp_payload(f)).collect();
    let arps: Vec<_> = from_a
        .iter()
        .filter(|f| f[12..14] == [0x08, 0x06])
        .collect();
    let routed = before
        .iter()
        .filter(|f| f[6..12] == lab.bridge_mac.0 && udp_payload(f) == Some(b"routed"))
        .count();
    assert_eq!(
        routed,
        usize::from(guest_to_guest),
        "routed via the host: {before:?}"
    );
    if guest_to_guest {
        assert_eq!(
            payloads,
            vec![b"real".as_slice()],
            "only the real packet reaches B"
        );
        assert_eq!(
            arps.len(),
            1,
            "only the real ARP request is flooded to B: {arps:?}"
        );
        assert!(is_arp(arps[0], 1, a.ip, gw) && arps[0][22..28] == a.mac.0);
    } else {
        assert!(
            from_a.is_empty(),
            "guests are isolated, yet B saw {from_a:?}"
        );
    }

    // The host answered only the real ARP request: not the one claiming B's IP.
    let replies: Vec<_> = drain(&mut lab.tap_a)
        .into_iter()
        .filter(|f| f[12..14] == [0x08, 0x06] && f[21] == 2)
        .collect();
    assert_eq!(
        replies.len(),
        1,
        "one ARP reply, to the real request: {replies:?}"
    );
    assert_eq!(&replies[0][32..38], &a.mac.0);
    assert_eq!(&replies[0][38..42], &a.ip.octets());

    // IPv6 and any other ethertype from a guest are dropped: an IPv6 frame to the
    // all-nodes group and a made-up ethertype, then a real ARP as the witness
    // (answered by the host, so it reached the bridge).
    let mut v6 = vec![0x60, 0, 0, 0, 0, 0, 59, 64];
    v6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    v6.extend_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    lab.send_a(&ethernet(
        MacAddr([0x33, 0x33, 0, 0, 0, 1]),
        a.mac,
        0x86dd,
        &v6,
    ));
    lab.send_a(&ethernet(
        MacAddr([0xff; 6]),
        a.mac,
        0x88b5,
        b"local experimental",
    ));
    lab.send_a(&arp(a.mac, a.mac, a.ip, gw));
    wait_frame(&mut lab.tap_a, MUST_ARRIVE, |f| is_arp(f, 2, gw, a.ip))
        .expect("the host answered the witness ARP");
    if guest_to_guest {
        let before = frames_before(&mut lab.tap_b, "flooded ARP", |f| is_arp(f, 1, a.ip, gw));
        // Only A's: the host's own IPv6 (its link-local address's neighbour
        // discovery and MLD) reaches B at any time, rightly.
        assert!(
            !before.iter().any(|f| f[6..12] == a.mac.0),
            "IPv6 or another ethertype crossed the bridge: {before:?}"
        );
    }
    // The drops were counted where an operator looks: 5 to the host, 3 to B,
    // 4 ARP, IPv6 and the other ethertype.
    assert_eq!(guard_drops("prerouting"), 14);
    assert_eq!(guard_drops("forward") > 0, !guest_to_guest);
}

netns_test! {
    fn spoofed_frames_are_dropped_and_real_ones_pass_between_guests_when_enabled() {
        rt().block_on(spoofing(true));
    }
}

netns_test! {
    fn spoofed_frames_are_dropped_and_guests_are_isolated_by_default() {
        rt().block_on(spoofing(false));
    }
}

// ---- guest → host -------------------------------------------------------------

/// From guest A: UDP to `udp_port` and a TCP SYN to `tcp_port`, to the gateway and
/// to another host address. Returns (UDP datagrams received, SYN-ACKs sent back),
/// each as "port@address". Host → A and A's reply are checked on the way (they
/// serve as witnesses).
async fn probe_host(lab: &mut Lab, udp_port: u16, tcp_port: u16) -> (Vec<String>, Vec<String>) {
    let a = lab.a.clone();
    let other = Ipv4Addr::new(198, 51, 100, 1);
    let udp = udp_listener(udp_port);
    let tcp = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, tcp_port)).unwrap();
    let host_sock = UdpSocket::bind(SocketAddrV4::new(a.gateway, 7000)).unwrap();
    host_sock.set_read_timeout(Some(MUST_ARRIVE)).unwrap();
    let mut received = Vec::new();
    let mut syn_acks = Vec::new();
    for dst in [a.gateway, other] {
        // New connections from the guest first...
        lab.send_a(&to_host(
            lab,
            a.mac,
            a.ip,
            dst,
            udp_port,
            dst.to_string().as_bytes(),
        ));
        let syn = tcp_syn(
            (lab.bridge_mac, a.mac),
            SocketAddrV4::new(a.ip, 41000),
            SocketAddrV4::new(dst, tcp_port),
        );
        lab.send_a(&syn);
        // ...then host → guest, which must reach A's TAP...
        lab.host_to_a(&host_sock, 9000, b"host to a");
        let before = frames_before(&mut lab.tap_a, "host → A", |f| {
            udp_payload(f) == Some(b"host to a")
        });
        if before.iter().any(|f| is_syn_ack_from(f, dst, tcp_port)) {
            syn_acks.push(format!("{tcp_port}@{dst}"));
        }
        // ...and A's reply, which must reach the host (established traffic).
        lab.send_a(&udp_frame(
            (lab.bridge_mac, a.mac),
            SocketAddrV4::new(a.ip, 9000),
            SocketAddrV4::new(a.gateway, 7000),
            b"a replies",
        ));
        let mut buf = [0u8; 64];
        let (n, from) = host_sock
            .recv_from(&mut buf)
            .expect("A's reply reached the host");
        assert_eq!(
            (&buf[..n], from),
            (
                b"a replies".as_slice(),
                SocketAddrV4::new(a.ip, 9000).into()
            )
        );
        // The guest's datagram was processed before the reply: it is queued now
        // if it passed.
        udp.set_nonblocking(true).unwrap();
        while let Ok((n, _)) = udp.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            received.push(format!("{udp_port}@{text}"));
        }
        udp.set_nonblocking(false).unwrap();
    }
    drop(tcp);
    (received, syn_acks)
}

/// Another address of the host, outside the guests' subnet.
fn add_other_host_address() {
    run(&["ip", "link", "set", "lo", "up"]);
    run(&["ip", "addr", "add", "198.51.100.1/32", "dev", "lo"]);
}

netns_test! {
    fn guests_reach_no_host_service_by_default() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            add_other_host_address();
            let mut lab = Lab::start(dir.path(), false, "").await;
            let (udp, tcp) = probe_host(&mut lab, 5301, 5302).await;
            assert!(udp.is_empty(), "UDP reached the host: {udp:?}");
            assert!(tcp.is_empty(), "the host answered TCP SYNs: {tcp:?}");
            // ICMP too: an echo request to the gateway is not answered.
            let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
            let sum = checksum(&[&icmp]);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            let (a, gw, bridge_mac) = (lab.a.clone(), lab.a.gateway, lab.bridge_mac);
            lab.send_a(&ethernet(bridge_mac, a.mac, 0x0800, &ipv4(a.ip, gw, 1, &icmp)));
            let host_sock = UdpSocket::bind(SocketAddrV4::new(gw, 7001)).unwrap();
            lab.host_to_a(&host_sock, 9001, b"witness");
            let before = frames_before(&mut lab.tap_a, "host → A", |f| udp_payload(f) == Some(b"witness"));
            assert!(
                !before
                    .iter()
                    .any(|f| ip_addrs(f).is_some() && f[23] == 1 && f[34] == 0),
                "the host answered a ping: {before:?}"
            );
        });
    }
}

netns_test! {
    fn guests_reach_exactly_the_configured_host_services() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            add_other_host_address();
            let mut lab = Lab::start(dir.path(), false, "udp/5303,tcp/5304").await;
            let (udp, tcp) = probe_host(&mut lab, 5303, 5304).await;
            assert_eq!(udp, vec!["5303@10.88.0.1", "5303@198.51.100.1"]);
            assert_eq!(tcp, vec!["5304@10.88.0.1", "5304@198.51.100.1"]);
            // Ports that were not configured stay closed.
            let (udp, tcp) = probe_host(&mut lab, 5305, 5306).await;
            assert!(udp.is_empty() && tcp.is_empty(), "{udp:?} {tcp:?}");
        });
    }
}

netns_test! {
    fn the_dns_server_the_guests_were_given_is_reachable_on_the_host() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            add_other_host_address();
            // A resolver on the gateway, handed to the guests as their DNS.
            let mut lab = Lab::start_with(dir.path(), |cfg| cfg.dns = vec![cfg.gateway]).await;
            let (udp, tcp) = probe_host(&mut lab, 53, 53).await;
            // Port 53 of that address only: not of the host's other addresses.
            assert_eq!(udp, vec!["53@10.88.0.1"]);
            assert_eq!(tcp, vec!["53@10.88.0.1"]);
        });
    }
}

// ---- from outside the bridge -------------------------------------------------------

/// A TUN device `name` (IFF_TUN | IFF_NO_PI): IPv4 packets written to the
/// returned file arrive on `name` as if from another network.
fn outside_network(name: &str, addr: &str) -> File {
    use beacon_common::tun::{IfReq, IFF_NO_PI, IFF_TUN, TUNSETIFF};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let mut req = IfReq::new(name, IFF_TUN | IFF_NO_PI);
    // SAFETY: `file` is an open tun fd and `req` a properly sized, initialised
    // ifreq that outlives the call; TUNSETIFF only reads and writes within it.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    assert!(
        rc >= 0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    run(&["ip", "addr", "add", addr, "dev", name]);
    run(&["ip", "link", "set", name, "up"]);
    file
}

/// UDP payload and source of an IPv4 packet without link header.
fn udp_in_packet(p: &[u8]) -> Option<(SocketAddrV4, &[u8])> {
    (p.len() >= 28 && p[0] == 0x45 && p[9] == 17).then(|| {
        let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
        let port = u16::from_be_bytes([p[20], p[21]]);
        (SocketAddrV4::new(src, port), &p[28..])
    })
}

netns_test! {
    fn new_connections_from_outside_into_guests_are_dropped_and_replies_pass() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mut lab = Lab::start(dir.path(), false, "").await;
            let a = lab.a.clone();
            let mut outside = outside_network("outside0", "198.51.100.1/24");
            let peer = Ipv4Addr::new(198, 51, 100, 2);

            // Another network opens connections to guest A: UDP and a TCP SYN.
            outside
                .write_all(&udp_packet(
                    SocketAddrV4::new(peer, 5000),
                    SocketAddrV4::new(a.ip, 6000),
                    b"from outside",
                ))
                .unwrap();
            let syn = tcp_syn((lab.bridge_mac, a.mac), SocketAddrV4::new(peer, 5002), SocketAddrV4::new(a.ip, 22));
            outside.write_all(&syn[14..34 + 20]).unwrap();

            // Guest A talks to that network (NATed egress) and gets its reply.
            lab.send_a(&udp_frame(
                (lab.bridge_mac, a.mac),
                SocketAddrV4::new(a.ip, 7000),
                SocketAddrV4::new(peer, 5001),
                b"a out",
            ));
            let deadline = Instant::now() + MUST_ARRIVE;
            let nat = loop {
                let p = next_frame(&mut outside, deadline).expect("A's packet left through outside0");
                if let Some((src, b"a out")) = udp_in_packet(&p) {
                    break src;
                }
            };
            assert_eq!(*nat.ip(), Ipv4Addr::new(198, 51, 100, 1), "masqueraded");
            outside
                .write_all(&udp_packet(SocketAddrV4::new(peer, 5001), nat, b"reply"))
                .unwrap();
            let before = frames_before(&mut lab.tap_a, "the reply to A", |f| udp_payload(f) == Some(b"reply"));
            let from_outside: Vec<_> = before
                .iter()
                .filter(|f| ip_addrs(f).is_some_and(|(src, _)| src == peer))
                .collect();
            assert!(from_outside.is_empty(), "new connections reached A: {from_outside:?}");
        });
    }
}

// ---- rules follow the leases ----------------------------------------------------

/// The (TAP, MAC, IP) elements of the guard set, as nft prints them.
fn guard_elements() -> Vec<String> {
    let doc = nft_json(&[
        "list",
        "set",
        "bridge",
        "beacon_runner_guard",
        "guest_addrs",
    ]);
    let set = doc["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o.get("set"))
        .expect("the set");
    let mut elems: Vec<String> = set["elem"]
        .as_array()
        .map(|e| e.iter().map(|x| x["concat"].to_string()).collect())
        .unwrap_or_default();
    elems.sort();
    elems
}

fn pinned(att: &NetworkAttachment) -> String {
    serde_json::json!([att.tap, att.mac.to_string(), att.ip.to_string()]).to_string()
}

netns_test! {
    fn guard_rules_follow_the_leases() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mut lab = Lab::start(dir.path(), false, "udp/5307").await;
            let (a, b) = (lab.a.clone(), lab.b.clone());
            let mut both = vec![pinned(&a), pinned(&b)];
            both.sort();
            assert_eq!(guard_elements(), both);

            // Running ensure twice leaves one copy of everything.
            lab.mgr.ensure_host(true).await.unwrap();
            lab.mgr.ensure_host(true).await.unwrap();
            let rules = nft_ruleset();
            assert_eq!(count(&rules, "table", "beacon_runner_guard"), 1);
            assert_eq!(count(&rules, "set", "beacon_runner_guard"), 1);
            assert_eq!(count(&rules, "chain", "beacon_runner_guard"), 2);
            // prerouting: other ports, IPv4, ARP, drop; forward: isolation.
            assert_eq!(count(&rules, "rule", "beacon_runner_guard"), 5, "{rules}");
            assert_eq!(count(&rules, "rule", "beacon_runner_filter"), 9, "{rules}");
            assert_eq!(guard_elements(), both);

            // A manual flush unconfines nobody for long: reconcile restores the
            // rules. First the rules only, then everything (`flush ruleset`, as a
            // firewall reload does).
            run(&["nft", "flush", "table", "bridge", "beacon_runner_guard"]);
            run(&["nft", "flush", "table", "ip", "beacon_runner_filter"]);
            assert_eq!(count(&nft_ruleset(), "rule", "beacon_runner_guard"), 0);
            lab.mgr.reconcile_once().await.unwrap();
            assert_eq!(guard_elements(), both);
            assert_eq!(count(&nft_ruleset(), "rule", "beacon_runner_guard"), 5);
            run(&["nft", "flush", "ruleset"]);
            assert_eq!(count(&nft_ruleset(), "table", "beacon_runner_guard"), 0);
            lab.mgr.reconcile_once().await.unwrap();
            assert_eq!(guard_elements(), both);
            let rules = nft_ruleset();
            assert_eq!(count(&rules, "rule", "beacon_runner_guard"), 5, "{rules}");
            assert_eq!(count(&rules, "rule", "beacon_runner_filter"), 9, "{rules}");
            // ... and they work again: a spoofed packet is dropped, the real one passes.
            let host = udp_listener(5307);
            let gw = a.gateway;
            lab.send_a(&to_host(&lab, a.mac, b.ip, gw, 5307, b"spoofed"));
            lab.send_a(&to_host(&lab, a.mac, a.ip, gw, 5307, b"real"));
            assert!(datagrams_before(&host, b"real").is_empty());

            // Teardown of A removes A's element, and only A's.
            lab.mgr.teardown("guest-a").await.unwrap();
            assert_eq!(guard_elements(), vec![pinned(&b)]);
            lab.mgr.teardown("guest-b").await.unwrap();
            assert!(guard_elements().is_empty());
            assert_eq!(count(&nft_ruleset(), "rule", "beacon_runner_guard"), 5);

            // cleanup removes the guard table with the others, and a teardown
            // afterwards does not bring it back.
            lab.mgr.cleanup().await.unwrap();
            assert_eq!(count(&nft_ruleset(), "table", "beacon_runner_guard"), 0);
            lab.mgr.teardown("guest-a").await.unwrap();
            assert_eq!(count(&nft_ruleset(), "table", "beacon_runner_guard"), 0);
        });
    }
}

// ---- subnet conflict -----------------------------------------------------------

/// Nothing of ours exists: no bridge, no beacon table, no lease.
async fn nothing_left(mgr: &NetworkManager) {
    let h = link::connect().unwrap();
    assert!(
        link::get_link(&h, "beacon0").await.unwrap().is_none(),
        "bridge left"
    );
    let rules = nft_ruleset();
    for table in [
        "beacon_runner_filter",
        "beacon_runner_nat",
        "beacon_runner_guard",
    ] {
        assert_eq!(count(&rules, "table", table), 0, "{table} left: {rules}");
    }
    assert!(mgr.leases().list().unwrap().is_empty(), "lease left");
}

netns_test! {
    fn setup_refuses_a_subnet_another_device_uses() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            // What containerd's example CNI config would leave: a bridge cni0 with
            // an address in 10.88/16 (this kernel may lack the dummy driver).
            run(&["ip", "link", "add", "cni0", "type", "bridge"]);
            run(&["ip", "addr", "add", "10.88.5.1/24", "dev", "cni0"]);
            run(&["ip", "link", "set", "cni0", "up"]);
            let mgr = NetworkManager::new(legacy_config(dir.path())).unwrap();
            let _owner = own(&mgr, "sb");
            let err = mgr.setup("sb").await.unwrap_err();
            assert!(matches!(err, NetError::SubnetConflict { .. }), "{err}");
            let text = err.to_string();
            for part in ["10.88.0.0/16", "beacon0", "10.88.5.1/24", "cni0", "BEACON_SUBNET"] {
                assert!(text.contains(part), "{part:?} missing from: {text}");
            }
            nothing_left(&mgr).await;

            // A route alone (no address) is a conflict too.
            run(&["ip", "addr", "flush", "dev", "cni0"]);
            run(&["ip", "route", "add", "10.88.128.0/17", "dev", "cni0"]);
            let err = mgr.setup("sb").await.unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, NetError::SubnetConflict { .. }), "{err}");
            assert!(text.contains("route 10.88.128.0/17") && text.contains("dev cni0"), "{text}");
            nothing_left(&mgr).await;

            // The advice works: another subnet is accepted while cni0 keeps its own.
            let moved = beacon_netmgr::NetConfig::from_lookup(|k| {
                (k == "BEACON_SUBNET").then(|| "10.123.0.1/24".to_string())
            })
            .unwrap();
            let mut cfg = legacy_config(dir.path());
            (cfg.gateway, cfg.prefix, cfg.pool) = (moved.gateway, moved.prefix, moved.pool);
            cfg.db_path = dir.path().join("other.db");
            let other = NetworkManager::new(cfg).unwrap();
            let att = other.setup("sb").await.unwrap();
            assert_eq!(att.ip, Ipv4Addr::new(10, 123, 0, 2));
            // Our own bridge existing already is fine.
            let again = NetworkManager::new(other.config().clone()).unwrap();
            again.ensure_host(true).await.unwrap();
        });
    }
}

netns_test! {
    fn concurrent_setups_in_many_processes_all_get_their_guard_element() {
        let dir = tempfile::tempdir().unwrap();
        // Each process rebuilds the table from the leases it sees; the lock keeps a
        // rebuild that read the leases early from landing last and dropping a newer
        // sandbox's element. (That race is narrow: this test checks the end state,
        // it did not fail with the lock removed in three runs.)
        let children: Vec<_> = (0..12)
            .map(|i| {
                crate::cli::command(dir.path(), &["setup", &format!("many-{i}")])
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut child in children {
            assert!(child.wait().unwrap().success());
        }
        let leases = crate::cli::beacon_net(dir.path(), &["list", "--json"]);
        let mut expected: Vec<String> = leases
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                serde_json::json!([v["tap"], v["mac"], v["ip"]]).to_string()
            })
            .collect();
        expected.sort();
        assert_eq!(expected.len(), 12);
        assert_eq!(guard_elements(), expected);
    }
}
