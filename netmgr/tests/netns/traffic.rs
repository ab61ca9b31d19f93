//! A TAP from `setup` really passes frames to the bridge: an ARP request written
//! into one sandbox's TAP is flooded to another sandbox's TAP (guest-to-guest
//! traffic enabled) and answered by the bridge's own address. The frame helpers
//! here serve `hostile` too.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use beacon_netmgr::{link, tap, MacAddr, NetworkManager};

use crate::harness::{legacy_config, link_ready, own, rt, wait_links_ready};
use crate::netns_test;

pub fn arp_request(mac: MacAddr, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f.resize(60, 0);
    f
}

/// Wait up to `timeout` for a frame on `tap` that satisfies `pred`.
pub fn wait_frame(
    tap: &mut File,
    timeout: Duration,
    pred: impl Fn(&[u8]) -> bool,
) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 2048];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
        if n <= 0 {
            continue;
        }
        let len = tap.read(&mut buf).unwrap();
        if pred(&buf[..len]) {
            return Some(buf[..len].to_vec());
        }
    }
    None
}

pub fn is_arp(frame: &[u8], oper: u8, spa: Ipv4Addr, tpa: Ipv4Addr) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x06]
        && frame[21] == oper
        && frame[28..32] == spa.octets()
        && frame[38..42] == tpa.octets()
}

netns_test! {
    fn a_frame_written_to_the_tap_reaches_the_bridge_and_other_taps() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mut cfg = legacy_config(dir.path());
            cfg.guest_to_guest = true;
            let mgr = NetworkManager::new(cfg).unwrap();
            let _owners = (own(&mgr, "vm-a"), own(&mgr, "vm-b"));
            let a = mgr.setup("vm-a").await.unwrap();
            let b = mgr.setup("vm-b").await.unwrap();
            let h = link::connect().unwrap();
            // Nobody has the TAP open yet: no carrier, so not ready (the wait below
            // checks a real condition).
            assert!(!link_ready(&h, &a.tap).await);
            let mut tap_a = tap::open_tap_plain(&a.tap).unwrap();
            let mut tap_b = tap::open_tap_plain(&b.tap).unwrap();
            // Carrier comes up with the open; the bridge then moves the ports to
            // forwarding. Wait for exactly that before sending.
            wait_links_ready(&h, &[&a.tap, &b.tap, "beacon0"]).await;

            tap_a.write_all(&arp_request(a.mac, a.ip, a.gateway)).unwrap();
            let reply = wait_frame(&mut tap_a, Duration::from_secs(5), |f| is_arp(f, 2, a.gateway, a.ip))
                .expect("the bridge answered the ARP request");
            assert_eq!(&reply[0..6], &a.mac.0, "reply is addressed to the guest MAC");
            let flooded = wait_frame(&mut tap_b, Duration::from_secs(5), |f| is_arp(f, 1, a.ip, a.gateway))
                .expect("the broadcast was flooded to the other sandbox's TAP");
            assert_eq!(&flooded[6..12], &a.mac.0);
        });
    }
}
