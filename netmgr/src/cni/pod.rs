//! Pod networks someone else made: containerd's CRI plugin creates a pod's
//! network namespace and runs its own CNI chain in it before the shim sees the
//! pod. [`attach`] connects a VM to what it finds there: the one interface with
//! an IPv4 address (its address, prefix, default gateway and MAC), a TAP beside
//! it, and tc redirects both ways ([`super::redirect::plug`]), so the guest
//! answers on the pod IP Kubernetes reports. [`detach`] removes exactly what
//! `attach` added.
//!
//! CRI PortForward: containerd's CRI plugin serves it by dialing
//! `localhost:PORT` inside the pod's namespace, where nothing listens (the
//! pod's processes run in the VM). [`forward_localhost`] binds a listener on
//! the namespace's loopback and adds the [`PORTFWD_TABLE`] nftables table
//! there, whose NAT output chain redirects every TCP connection the namespace
//! makes to 127.0.0.0/8 to that listener; [`original_port`] tells which port
//! was dialled, so the caller can carry it into the guest. [`detach`] removes
//! the table too.
//!
//! Never runs a plugin, allocates an address or writes the lease database: the
//! namespace and everything its chain made belong to the CRI plugin, which
//! removes them (CNI DEL, then the namespace). A shim that dies leaves only its
//! TAP inside that namespace, which goes with the namespace.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkFlags;
use netlink_packet_route::route::{RouteAddress, RouteAttribute};
use netlink_packet_route::tc::{TcAttribute, TcHandle};
use rtnetlink::{Handle, RouteMessageBuilder};
use serde_json::json;

use super::{netns, redirect};
use crate::attachment::NetworkAttachment;
use crate::config::{nft_program_from_env, PORTFWD_TABLE};
use crate::error::{NetError, Result};
use crate::{firewall, link, naming};

/// What [`attach`] made in a pod's namespace (what [`detach`] removes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAttachment {
    /// The namespace (as the container spec names it).
    pub netns: PathBuf,
    /// The interface the CNI chain made, whose address the guest takes.
    pub interface: String,
    /// What the VMM and the guest need. Its `tap` equals `interface` when the
    /// chain made a TAP itself (then `detach` leaves it to the chain).
    pub network: NetworkAttachment,
}

/// The interface the CNI chain configured in a pod's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodInterface {
    name: String,
    ip: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
}

fn pod_err(netns: &Path, detail: impl Into<String>) -> NetError {
    NetError::PodNetwork {
        netns: netns.to_path_buf(),
        detail: detail.into(),
    }
}

/// One address of a link, as read from netlink.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LinkAddress {
    index: u32,
    ip: IpAddr,
    prefix: u8,
}

/// Choose the pod's interface among `links` (index, name, is loopback) and
/// their `addresses`: the one holding an IPv4 address, `eth0` first when
/// several do. `Err` says what is wrong in words (no interface, IPv6 only).
fn choose(
    links: &[(u32, String, bool)],
    addresses: &[LinkAddress],
) -> std::result::Result<(u32, String, Ipv4Addr, u8), String> {
    let mut found: Vec<(u32, String, Ipv4Addr, u8)> = Vec::new();
    let mut v6_only = Vec::new();
    for (index, name, loopback) in links {
        if *loopback {
            continue;
        }
        let mine: Vec<&LinkAddress> = addresses.iter().filter(|a| a.index == *index).collect();
        match mine.iter().find_map(|a| match a.ip {
            IpAddr::V4(ip) => Some((ip, a.prefix)),
            IpAddr::V6(_) => None,
        }) {
            Some((ip, prefix)) => found.push((*index, name.clone(), ip, prefix)),
            None if mine.iter().any(|a| a.ip.is_ipv6() && !is_link_local(a.ip)) => {
                v6_only.push(name.clone())
            }
            None => {}
        }
    }
    found.sort_by_key(|f| f.1 != "eth0");
    if let Some(first) = found.into_iter().next() {
        return Ok(first);
    }
    if v6_only.is_empty() {
        Err(
            "no interface other than loopback has an IPv4 address: the CNI chain \
             configured nothing the VM could take"
                .into(),
        )
    } else {
        Err(format!(
            "{} has only IPv6 addresses: beaconbox pods need an IPv4 address from the CNI \
             chain (IPv6-only pod networks are not supported yet)",
            v6_only.join(", ")
        ))
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        IpAddr::V4(v4) => v4.is_link_local(),
    }
}

/// Read the namespace's links, addresses and default route (run inside it).
async fn inspect(h: &Handle, netns: &Path) -> Result<PodInterface> {
    let links: Vec<(u32, String, bool)> = link::list_links(h)
        .await?
        .iter()
        .map(|m| {
            (
                m.header.index,
                link::link_name(m).unwrap_or_default().to_string(),
                m.header.flags.contains(LinkFlags::Loopback),
            )
        })
        .collect();
    let addresses: Vec<LinkAddress> = h
        .address()
        .get()
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e| NetError::netlink("listing the pod's addresses", e))?
        .into_iter()
        .filter_map(|m| {
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })?;
            Some(LinkAddress {
                index: m.header.index,
                ip,
                prefix: m.header.prefix_len,
            })
        })
        .collect();
    let (index, name, ip, prefix) = choose(&links, &addresses).map_err(|d| pod_err(netns, d))?;
    let routes: Vec<_> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetError::netlink("listing the pod's routes", e))?;
    let gateway = routes.iter().find_map(|r| {
        if r.header.destination_prefix_length != 0 {
            return None;
        }
        let oif = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if oif.is_some_and(|o| o != index) {
            return None;
        }
        r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(gw)) => Some(*gw),
            _ => None,
        })
    });
    Ok(PodInterface {
        name,
        ip,
        prefix,
        gateway,
    })
}

/// Connect a VM of `sandbox_id` to the pod network in `netns`: the guest gets
/// the address, prefix, gateway and MAC of the interface the CNI chain made;
/// a TAP is created beside it and frames are redirected both ways. On error
/// nothing is left behind.
pub fn attach(netns: &Path, sandbox_id: &str) -> Result<PodAttachment> {
    naming::validate_sandbox_id(sandbox_id)?;
    if !netns::is_mounted(netns) {
        return Err(pod_err(
            netns,
            "not a network namespace (nothing is mounted there): the CRI plugin made no \
             pod network, or it is already gone",
        ));
    }
    let tap_name = naming::tap_name(sandbox_id);
    let shown = netns.to_path_buf();
    let (found, tap, mac) = netns::run_in(netns, move || async move {
        let h = link::connect()?;
        let found = inspect(&h, &shown).await?;
        match redirect::plug(found.name.clone(), tap_name.clone()).await {
            Ok((tap, mac)) => Ok((found, tap, mac)),
            Err(e) => {
                // plug made at most the TAP (its filters go with it) and the
                // interface's ingress qdisc.
                let _ = link::delete_link(&h, &tap_name).await;
                let _ = remove_ingress(&h, &found.name).await;
                Err(e)
            }
        }
    })?;
    Ok(PodAttachment {
        netns: netns.to_path_buf(),
        interface: found.name,
        network: NetworkAttachment {
            tap,
            mac,
            ip: found.ip,
            prefix: found.prefix,
            gateway: found.gateway.unwrap_or(Ipv4Addr::UNSPECIFIED),
            // The CRI plugin gives each container its resolv.conf.
            dns: Vec::new(),
            netns: Some(netns.to_path_buf()),
        },
    })
}

/// Remove the interface's ingress qdisc (and so its redirect filter); one
/// that is not there is fine.
async fn remove_ingress(h: &Handle, interface: &str) -> Result<()> {
    let Some(index) = link::link_index(h, interface).await? else {
        return Ok(());
    };
    let index = i32::try_from(index).map_err(|_| NetError::Netlink {
        action: "removing a redirect".into(),
        detail: format!("interface index {index} out of range"),
    })?;
    let mut req = h.qdisc().del(index);
    let msg = req.message_mut();
    msg.header.parent = TcHandle::INGRESS;
    msg.header.handle = TcHandle::from(0xffff_0000);
    msg.attributes.push(TcAttribute::Kind("ingress".into()));
    match req.execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(m))
            if matches!(-m.raw_code(), libc::ENOENT | libc::EINVAL | libc::ENODEV) =>
        {
            Ok(())
        }
        Err(e) => Err(NetError::netlink(
            "removing the pod interface's redirect",
            e,
        )),
    }
}

/// Remove what [`attach`] and [`forward_localhost`] made: the TAP (unless the
/// chain made it), the redirect on the pod's interface and the port forward
/// table. A namespace already gone (the CRI plugin removed the pod's network
/// first) leaves nothing to do.
pub fn detach(pod: &PodAttachment) -> Result<()> {
    if !netns::is_mounted(&pod.netns) {
        return Ok(());
    }
    let (interface, tap) = (pod.interface.clone(), pod.network.tap.clone());
    netns::run_in(&pod.netns, move || async move {
        let h = link::connect()?;
        if tap != interface {
            link::delete_link(&h, &tap).await?;
        }
        let unplugged = remove_ingress(&h, &interface).await;
        // Adding and deleting in one batch: no error when it was never made.
        let dropped = firewall::apply(
            &nft_program_from_env(),
            "removing the pod's port forward table",
            json!({"nftables": [
                {"add": {"table": {"family": "ip", "name": PORTFWD_TABLE}}},
                {"delete": {"table": {"family": "ip", "name": PORTFWD_TABLE}}},
            ]}),
        );
        unplugged.and(dropped)
    })
}

/// The batch that makes [`PORTFWD_TABLE`] redirect every new TCP connection
/// to 127.0.0.0/8 made in the namespace to `listener_port`.
fn portfwd_ruleset(listener_port: u16) -> serde_json::Value {
    let table = json!({"family": "ip", "name": PORTFWD_TABLE});
    json!({"nftables": [
        {"add": {"table": table}},
        {"flush": {"table": table}},
        {"add": {"chain": {"family": "ip", "table": PORTFWD_TABLE, "name": "output",
            "type": "nat", "hook": "output", "prio": -100, "policy": "accept"}}},
        {"add": {"rule": {"family": "ip", "table": PORTFWD_TABLE, "chain": "output", "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                "right": {"prefix": {"addr": "127.0.0.0", "len": 8}}}},
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
            {"redirect": {"port": listener_port}},
        ]}}},
    ]})
}

/// A listener on the loopback of the pod's namespace that receives every TCP
/// connection made there to any port of 127.0.0.0/8 (see the module docs);
/// [`original_port`] on an accepted connection says which port was dialled.
/// Blocking; the caller makes it non-blocking if it wants. Needs the
/// `nft_redir` and `nf_nat` kernel modules (loaded on demand on a normal host).
pub fn forward_localhost(netns: &Path) -> Result<std::net::TcpListener> {
    if !netns::is_mounted(netns) {
        return Err(pod_err(
            netns,
            "not a network namespace (nothing is mounted there): the pod's network is gone",
        ));
    }
    let shown = netns.to_path_buf();
    netns::run_in(netns, move || async move {
        // A socket belongs to the namespace it was made in, wherever it is
        // used later.
        let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| pod_err(&shown, format!("binding the port forward listener: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| pod_err(&shown, format!("the port forward listener's port: {e}")))?
            .port();
        // nft runs as a child of this thread, so in its namespace.
        firewall::apply(
            &nft_program_from_env(),
            "adding the pod's port forward table",
            portfwd_ruleset(port),
        )?;
        Ok(listener)
    })
}

/// The port a connection accepted by [`forward_localhost`]'s listener was
/// dialled to (from the NAT's record of it).
pub fn original_port(conn: &impl std::os::fd::AsFd) -> std::io::Result<u16> {
    let addr = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::OriginalDst)
        .map_err(std::io::Error::from)?;
    Ok(u16::from_be(addr.sin_port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(index: u32, ip: &str, prefix: u8) -> LinkAddress {
        LinkAddress {
            index,
            ip: ip.parse().expect("ip"),
            prefix,
        }
    }

    fn links() -> Vec<(u32, String, bool)> {
        vec![
            (1, "lo".into(), true),
            (2, "net1".into(), false),
            (3, "eth0".into(), false),
        ]
    }

    #[test]
    fn the_ipv4_interface_is_chosen_eth0_first() {
        let addrs = [
            addr(1, "127.0.0.1", 8),
            addr(2, "10.1.0.5", 24),
            addr(3, "fe80::1", 64),
            addr(3, "10.77.0.9", 16),
        ];
        assert_eq!(
            choose(&links(), &addrs),
            Ok((3, "eth0".into(), "10.77.0.9".parse().expect("ip"), 16))
        );
        let addrs = [addr(1, "127.0.0.1", 8), addr(2, "10.1.0.5", 24)];
        assert_eq!(
            choose(&links(), &addrs),
            Ok((2, "net1".into(), "10.1.0.5".parse().expect("ip"), 24))
        );
    }

    #[test]
    fn no_usable_interface_and_ipv6_only_are_told_apart() {
        let only_lo = [addr(1, "127.0.0.1", 8), addr(3, "fe80::1", 64)];
        let e = choose(&links(), &only_lo).expect_err("nothing usable");
        assert!(e.contains("no interface other than loopback"), "{e}");
        let v6 = [addr(3, "fe80::1", 64), addr(3, "fd00::5", 64)];
        let e = choose(&links(), &v6).expect_err("IPv6 only");
        assert!(
            e.contains("eth0 has only IPv6") && e.contains("IPv4"),
            "{e}"
        );
    }

    #[test]
    fn the_port_forward_ruleset_matches_the_nftables_schema() {
        let doc = portfwd_ruleset(40123);
        let parsed: nftables::schema::Nftables = serde_json::from_value(doc).expect("schema");
        // add + flush table, the chain, the rule.
        assert_eq!(parsed.objects.len(), 4);
        let text = serde_json::to_string(&parsed).expect("json");
        assert!(text.contains("\"redirect\":{\"port\":40123"), "{text}");
        assert!(text.contains("\"hook\":\"output\""), "{text}");
    }

    #[test]
    fn a_path_that_is_no_namespace_is_refused_clearly() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let e = attach(&tmp.path().join("cni-none"), "pod1").expect_err("no namespace");
        assert!(e.to_string().contains("not a network namespace"), "{e}");
        let e = forward_localhost(&tmp.path().join("cni-none")).expect_err("no namespace");
        assert!(e.to_string().contains("not a network namespace"), "{e}");
        let e = attach(tmp.path(), "").expect_err("bad id");
        assert!(matches!(e, NetError::InvalidSandboxId(_)), "{e}");
    }
}
