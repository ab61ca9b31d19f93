//! The guard table of legacy mode, `beacon_runner_guard` (family `bridge`): it
//! pins each guest's TAP to its lease and keeps guests apart on the bridge.
//!
//! * set `guest_addrs` (`ifname . ether_addr . ipv4_addr`): one element per legacy
//!   lease, (TAP, MAC, IP);
//! * chain `prerouting` (hook prerouting, every frame entering a bridge port):
//!   frames from ports not named `beacon-*` pass untouched; a frame from a
//!   `beacon-*` TAP passes only if it is IPv4 whose (TAP, Ethernet source, IP
//!   source) is in the set, or an Ethernet/IPv4 ARP packet whose Ethernet source,
//!   sender MAC and sender IP all are the lease's. Everything else from a guest is
//!   counted and dropped: spoofed MAC or IP, ARP probes from 0.0.0.0, IPv6, VLAN
//!   tags, any other ethertype, and every frame of a TAP that has no lease yet;
//! * chain `forward` (hook forward): unless guest-to-guest traffic is enabled
//!   (`BEACON_GUEST_TO_GUEST=1`), frames from one `beacon-*` TAP to another are
//!   dropped. Host ↔ guest frames never take the bridge's forward hook.
//!
//! Keyed by interface name, so rules may exist before or after their TAP (unlike a
//! netdev chain, which needs its device). [`rebuild`] recreates the whole table
//! from the lease database in one atomic batch (add, delete, add), under an
//! exclusive `flock` that serialises rebuilds across processes, so the last
//! rebuild always reflects every lease committed before it and the table holds
//! exactly one copy of each rule. Never touches tables it does not own.

use std::net::Ipv4Addr;
use std::path::Path;

use beacon_common::MacAddr;
use serde_json::json;

use crate::config::{GUARD_TABLE, TAP_PREFIX};
use crate::error::{NetError, Result};
use crate::firewall::apply;
use crate::leasedb::{IpLease, LeaseMode};

/// Name of the set of allowed (TAP, MAC, IP) triples.
pub const GUEST_ADDRS_SET: &str = "guest_addrs";

/// One guest's pinned addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPin {
    pub tap: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
}

impl GuestPin {
    /// The pins of the legacy leases among `leases` (CNI leases live in their own
    /// namespaces and are not ours to guard here).
    pub fn of_leases(leases: &[IpLease]) -> Vec<GuestPin> {
        leases
            .iter()
            .filter(|l| l.mode == LeaseMode::Legacy)
            .map(|l| GuestPin {
                tap: l.tap.clone(),
                mac: l.mac,
                ip: l.ip,
            })
            .collect()
    }
}

/// The batch that recreates the guard table with `pins`.
pub fn ruleset(pins: &[GuestPin], guest_to_guest: bool) -> serde_json::Value {
    let table = json!({"family": "bridge", "name": GUARD_TABLE});
    let taps = format!("{TAP_PREFIX}*");
    let iif = json!({"meta": {"key": "iifname"}});
    let payload =
        |protocol: &str, field: &str| json!({"payload": {"protocol": protocol, "field": field}});
    let is = |left: serde_json::Value, right: serde_json::Value| json!({"match": {"op": "==", "left": left, "right": right}});
    let pinned = |mac: serde_json::Value, ip: serde_json::Value| {
        is(
            json!({"concat": [iif.clone(), mac, ip]}),
            json!(format!("@{GUEST_ADDRS_SET}")),
        )
    };
    let rule = |chain: &str, expr: Vec<serde_json::Value>| {
        json!({"add": {"rule": {"family": "bridge", "table": GUARD_TABLE, "chain": chain,
            "expr": expr}}})
    };
    let chain = |name: &str| {
        json!({"add": {"chain": {"family": "bridge", "table": GUARD_TABLE, "name": name,
            "type": "filter", "hook": name, "prio": -200, "policy": "accept"}}})
    };
    let accept = json!({"accept": null});
    let drop = json!({"drop": null});

    let mut cmds = vec![
        // Add first so that the delete never fails, then start from nothing.
        json!({"add": {"table": table.clone()}}),
        json!({"delete": {"table": table.clone()}}),
        json!({"add": {"table": table}}),
        json!({"add": {"set": {"family": "bridge", "table": GUARD_TABLE,
            "name": GUEST_ADDRS_SET, "type": ["ifname", "ether_addr", "ipv4_addr"]}}}),
    ];
    if !pins.is_empty() {
        let elem: Vec<_> = pins
            .iter()
            .map(|p| json!({"concat": [p.tap, p.mac.to_string(), p.ip.to_string()]}))
            .collect();
        cmds.push(
            json!({"add": {"element": {"family": "bridge", "table": GUARD_TABLE,
            "name": GUEST_ADDRS_SET, "elem": elem}}}),
        );
    }
    cmds.extend([
        chain("prerouting"),
        rule(
            "prerouting",
            vec![
                json!({"match": {"op": "!=", "left": iif.clone(), "right": taps}}),
                accept.clone(),
            ],
        ),
        rule(
            "prerouting",
            vec![
                is(payload("ether", "type"), json!("ip")),
                pinned(payload("ether", "saddr"), payload("ip", "saddr")),
                accept.clone(),
            ],
        ),
        rule(
            "prerouting",
            vec![
                is(payload("ether", "type"), json!("arp")),
                is(payload("arp", "htype"), json!(1)),
                is(payload("arp", "ptype"), json!("ip")),
                is(payload("arp", "hlen"), json!(6)),
                is(payload("arp", "plen"), json!(4)),
                // Ethernet source and ARP sender MAC both the lease's, with its IP.
                pinned(payload("ether", "saddr"), payload("arp", "saddr ip")),
                pinned(payload("arp", "saddr ether"), payload("arp", "saddr ip")),
                accept,
            ],
        ),
        rule("prerouting", vec![json!({"counter": null}), drop.clone()]),
        chain("forward"),
    ]);
    if !guest_to_guest {
        let taps = format!("{TAP_PREFIX}*");
        cmds.push(rule(
            "forward",
            vec![
                is(iif, json!(taps)),
                is(json!({"meta": {"key": "oifname"}}), json!(taps)),
                json!({"counter": null}),
                drop,
            ],
        ));
    }
    json!({ "nftables": cmds })
}

/// Recreate the guard table from `pins()`, which runs under the exclusive lock
/// `lock_path` (read the lease database there, so no rebuild can undo a newer one).
pub fn rebuild(
    program: &str,
    lock_path: &Path,
    guest_to_guest: bool,
    pins: impl FnOnce() -> Result<Vec<GuestPin>>,
) -> Result<()> {
    let _lock = crate::leasedb::lock_file(lock_path).map_err(|source| NetError::Io {
        path: lock_path.to_path_buf(),
        source,
    })?;
    let pins = pins()?;
    apply(
        program,
        "rebuilding the guard table (per-TAP anti-spoofing; the bridge family's rules need the kernel modules nf_tables and nft_meta_bridge: `modprobe nft_meta_bridge` if the kernel cannot load it by itself)",
        ruleset(&pins, guest_to_guest),
    )?;
    tracing::debug!(guests = pins.len(), guest_to_guest, "guard table rebuilt");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nftables::schema::Nftables;

    fn pin(n: u8) -> GuestPin {
        GuestPin {
            tap: format!("beacon-0000000{n}"),
            mac: MacAddr([2, 0, 0, 0, 0, n]),
            ip: Ipv4Addr::new(10, 88, 0, n),
        }
    }

    #[test]
    fn ruleset_matches_the_nftables_schema() {
        for (pins, g2g, objects) in [
            (vec![], false, 11),
            (vec![pin(2), pin(3)], false, 12),
            (vec![pin(2)], true, 11),
        ] {
            let doc = ruleset(&pins, g2g);
            let parsed: Nftables = serde_json::from_value(doc.clone()).unwrap();
            assert_eq!(parsed.objects.len(), objects, "{doc}");
            let text = doc.to_string();
            assert!(text.contains("\"family\":\"bridge\""), "{text}");
            assert!(text.contains("\"beacon-*\""), "{text}");
            assert_eq!(text.contains("oifname"), !g2g, "{text}");
        }
    }

    #[test]
    fn elements_are_tap_mac_ip_triples() {
        let doc = ruleset(&[pin(2), pin(3)], false);
        let add = doc["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["add"]["element"].is_object())
            .expect("an element batch");
        assert_eq!(
            add["add"]["element"]["elem"],
            json!([
                {"concat": ["beacon-00000002", "02:00:00:00:00:02", "10.88.0.2"]},
                {"concat": ["beacon-00000003", "02:00:00:00:00:03", "10.88.0.3"]},
            ])
        );
    }

    #[test]
    fn only_legacy_leases_are_pinned() {
        let lease = |id: &str, mode| IpLease {
            sandbox_id: id.into(),
            ip: Ipv4Addr::new(10, 88, 0, 9),
            prefix: 16,
            gateway: Ipv4Addr::new(10, 88, 0, 1),
            tap: crate::naming::tap_name(id),
            mac: crate::naming::guest_mac(id),
            created_unix: 0,
            mode,
            netns: None,
            cni: None,
            owner: Default::default(),
        };
        let pins =
            GuestPin::of_leases(&[lease("a", LeaseMode::Legacy), lease("b", LeaseMode::Cni)]);
        assert_eq!(pins.len(), 1);
        assert_eq!(pins[0].tap, crate::naming::tap_name("a"));
    }
}
