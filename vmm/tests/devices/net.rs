//! virtio-net: our userspace data path and vhost-net on the KVM backend, QEMU's
//! tap netdev with and without vhost=on.
//!
//! Per boot, the host side (inside the lab VM) makes a TAP with an address and
//! starts `iperf3 -s`; the guest checks its MAC came from config space and that
//! checksum, TSO, mergeable-buffer and event-index features were negotiated,
//! configures eth0 with busybox `ip`, pings the host end, and runs iperf3 both
//! ways to completion, measuring the average size of the frames eth0 sent
//! during the upload and received during the download: above the largest
//! Ethernet frame only if TSO carried them, so TSO is checked end to end and not
//! just in the feature bits. On our backend the guest then unbinds and rebinds
//! the driver (a reset and a second activation, on confined vCPU threads) and
//! pings again.
//!
//! The KVM userspace variant hands the VMM an unattached `/dev/net/tun`
//! descriptor (`fd=5`) that it must attach to the TAP itself: the path pods use.

use std::path::PathBuf;

use beacon_tests::device_suite::Scenario;

const MAC: &str = "02:00:00:00:77:02";

/// Feature bits (1-based columns of the guest's features string) that must be
/// negotiated: CSUM, GUEST_CSUM, GUEST_TSO4, GUEST_TSO6, HOST_TSO4, HOST_TSO6,
/// MRG_RXBUF, STATUS, EVENT_IDX. (Not VERSION_1: QEMU's microvm runs its
/// virtio-mmio devices in legacy mode; ours are modern only.)
const FEATURE_COLUMNS: &str = "1,2,8,9,12,13,16,17,30";

/// How the guest's NIC reaches the TAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// KVM backend, our userspace data path, the TAP as an inherited fd.
    User,
    /// vhost-net (KVM backend or QEMU).
    Vhost,
    /// QEMU's tap netdev without vhost.
    QemuTap,
}

fn checks() -> String {
    format!(
        r#"
set -e
ip link set lo up
echo "NET-MAC: $(cat /sys/class/net/eth0/address)"
echo "NET-FEATURES: $(cut -c{FEATURE_COLUMNS} /sys/class/net/eth0/device/features)"
ip link set eth0 up
ip addr add 10.77.0.2/24 dev eth0
ping -c 3 -W 10 10.77.0.1
echo NET-PING-OK
s=/sys/class/net/eth0/statistics
# measure DIR CMD...: run CMD (an iperf3 client) to completion, print its
# summary, and set $avg to the average size of the frames eth0 moved in DIR
# meanwhile: above the 1514-byte Ethernet maximum only if TSO carried them.
measure() {{
    d=$1; shift
    b0=$(cat $s/${{d}}_bytes); p0=$(cat $s/${{d}}_packets)
    "$@" >/tmp/iperf.out 2>&1 || {{ cat /tmp/iperf.out; return 1; }}
    grep -E "sender|receiver" /tmp/iperf.out
    grep -q receiver /tmp/iperf.out
    b1=$(cat $s/${{d}}_bytes); p1=$(cat $s/${{d}}_packets)
    avg=$(( (b1 - b0) / (p1 - p0 + 1) ))
}}
measure tx iperf3 -c 10.77.0.1 -t 2 -f m
tx=$avg
echo NET-IPERF-TX-OK
measure rx iperf3 -c 10.77.0.1 -t 2 -f m -R
rx=$avg
echo NET-IPERF-RX-OK
echo "NET-AVG-FRAME: sent $tx, received $rx"
if [ "$tx" -le 1600 ] || [ "$rx" -le 1600 ]; then exit 1; fi
echo NET-TSO-OK
# On our backend: the driver lets go of the device and takes it again (a reset,
# then a second activation: vhost-net's instance is reset and owned again, on a
# confined vCPU thread), and the link works as before.
if grep -q -- '-kvm-' /proc/cmdline; then
    dev=$(basename "$(readlink /sys/class/net/eth0/device)")
    echo "$dev" >/sys/bus/virtio/drivers/virtio_net/unbind
    echo "$dev" >/sys/bus/virtio/drivers/virtio_net/bind
    i=0
    while [ ! -e /sys/class/net/eth0 ]; do
        i=$((i + 1)); [ $i -lt 100 ] || {{ echo NET-REBIND-NO-ETH0; exit 1; }}; sleep 0.1
    done
    ip link set eth0 up
    ip addr add 10.77.0.2/24 dev eth0
    ping -c 3 -W 10 10.77.0.1
    echo NET-REBIND-OK
fi
"#
    )
}

/// Make the TAP (replacing one a failed case left) and start the iperf3 server.
const HOST_BEFORE: &str = r#"
ip link del bt0 2>/dev/null
ip tuntap add bt0 mode tap
ip addr add 10.77.0.1/24 dev bt0
ip link set bt0 up
iperf3 -s -D -B 10.77.0.1 --pidfile "$WORK/iperf3.pid"
"#;

/// Stop the server, report what crossed the TAP, delete it.
const HOST_AFTER: &str = r#"
s=/sys/class/net/bt0/statistics
echo "NET-HOST-TAP: from guest $(cat $s/rx_bytes) bytes in $(cat $s/rx_packets) frames, to guest $(cat $s/tx_bytes) bytes in $(cat $s/tx_packets) frames"
kill "$(cat "$WORK/iperf3.pid")" 2>/dev/null
ip link del bt0
"#;

fn iperf3() -> PathBuf {
    let p = PathBuf::from("/usr/bin/iperf3");
    assert!(
        p.exists(),
        "iperf3 is missing on this host: run resources/install.sh (Debian package iperf3)"
    );
    p
}

/// The net part of a device boot, named after its variant.
/// `backend` is the boot's: on ours the guest also rebinds the driver.
pub fn part(variant: Variant, backend: &'static str) -> Scenario {
    let (name, backends, net, host_before) = match variant {
        Variant::User => (
            "net-user",
            vec!["kvm"],
            format!("tap=bt0,mac={MAC},fd=5"),
            // An unattached /dev/net/tun descriptor the VMM inherits and attaches.
            format!("{HOST_BEFORE}exec 5<>/dev/net/tun\n"),
        ),
        Variant::Vhost => (
            "net-vhost",
            vec!["kvm", "qemu"],
            format!("tap=bt0,mac={MAC},vhost=on"),
            HOST_BEFORE.to_string(),
        ),
        Variant::QemuTap => (
            "net-tap",
            vec!["qemu"],
            format!("tap=bt0,mac={MAC}"),
            HOST_BEFORE.to_string(),
        ),
    };
    Scenario {
        name,
        backends,
        vmm_args: vec!["--net".into(), net],
        checks: checks(),
        stock_modules: vec!["virtio_mmio", "virtio_net"],
        guest_files: vec![(iperf3(), "/usr/bin/iperf3".into())],
        host_before,
        host_after: HOST_AFTER.into(),
        expect: vec![
            format!("NET-MAC: {MAC}"),
            "NET-FEATURES: 111111111".into(),
            "NET-PING-OK".into(),
            "NET-IPERF-TX-OK".into(),
            "NET-IPERF-RX-OK".into(),
            "receiver".into(),
            "NET-TSO-OK".into(),
        ]
        .into_iter()
        .chain((backend == "kvm").then(|| "NET-REBIND-OK".to_string()))
        .collect(),
        ..Scenario::default()
    }
}
