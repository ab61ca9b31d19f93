//! Links over rtnetlink: the bridge with its address, attaching TAPs to it, deleting
//! and listing links. Operates in the network namespace the netlink socket was
//! opened in; never shells out to `ip`.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

use crate::error::{NetError, Result};

fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Open a netlink connection in the current namespace; the connection task runs on
/// the current tokio runtime.
pub fn connect() -> Result<Handle> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetError::Netlink {
        action: "opening a netlink socket".into(),
        detail: "no tokio runtime: create the NetworkManager inside one".into(),
    })?;
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| NetError::Netlink {
        action: "opening a netlink socket".into(),
        detail: e.to_string(),
    })?;
    runtime.spawn(conn);
    Ok(handle)
}

/// Name of a link message.
pub fn link_name(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// Controller (bridge) index of a link message.
pub fn link_controller(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

/// The link called `name`, if it exists.
pub async fn get_link(handle: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    let mut stream = handle.link().get().match_name(name.to_string()).execute();
    match stream.try_next().await {
        Ok(msg) => Ok(msg),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(NetError::netlink(format!("looking up link {name}"), e)),
    }
}

/// Index of `name`, if it exists.
pub async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>> {
    Ok(get_link(handle, name).await?.map(|m| m.header.index))
}

/// Every link in the namespace.
pub async fn list_links(handle: &Handle) -> Result<Vec<LinkMessage>> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetError::netlink("listing links", e))
}

/// Make sure the bridge `name` exists, carries `gateway/prefix` and is up. Safe to
/// run concurrently from several processes. Returns the bridge's index and whether
/// this call created it.
pub async fn ensure_bridge(
    handle: &Handle,
    name: &str,
    gateway: Ipv4Addr,
    prefix: u8,
) -> Result<(u32, bool)> {
    let mut created = false;
    let index = match link_index(handle, name).await? {
        Some(i) => i,
        None => {
            match handle
                .link()
                .add(LinkBridge::new(name).build())
                .execute()
                .await
            {
                Ok(()) => created = true,
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(NetError::netlink(format!("creating bridge {name}"), e)),
            }
            link_index(handle, name)
                .await?
                .ok_or_else(|| NetError::Netlink {
                    action: format!("creating bridge {name}"),
                    detail: "the bridge vanished right after creation".into(),
                })?
        }
    };
    if created || !has_address(handle, index, gateway).await? {
        match handle
            .address()
            .add(index, IpAddr::V4(gateway), prefix)
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(NetError::netlink(
                    format!("adding {gateway}/{prefix} to {name}"),
                    e,
                ))
            }
        }
    }
    set_up(handle, index, None).await?;
    Ok((index, created))
}

async fn has_address(handle: &Handle, index: u32, ip: Ipv4Addr) -> Result<bool> {
    use netlink_packet_route::address::AddressAttribute;
    let addrs: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetError::netlink("listing bridge addresses", e))?;
    Ok(addrs.iter().any(|m| {
        m.attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(a)) | AddressAttribute::Address(IpAddr::V4(a)) if *a == ip))
    }))
}

/// Bring link `index` up, optionally enslaving it to `controller` in the same request.
pub async fn set_up(handle: &Handle, index: u32, controller: Option<u32>) -> Result<()> {
    let mut msg = LinkUnspec::new_with_index(index).up();
    if let Some(c) = controller {
        msg = msg.controller(c);
    }
    handle
        .link()
        .set(msg.build())
        .execute()
        .await
        .map_err(|e| NetError::netlink(format!("bringing up link {index}"), e))
}

/// Delete link `name`; a missing link is not an error. Returns whether it existed.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<bool> {
    let Some(index) = link_index(handle, name).await? else {
        return Ok(false);
    };
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(NetError::netlink(format!("deleting link {name}"), e)),
    }
}

/// The kernel's `local` routing table (addresses of this host, checked as addresses).
const RT_TABLE_LOCAL: u32 = 255;

/// Whether `a/a_len` and `b/b_len` share an address.
pub fn prefixes_overlap(a: Ipv4Addr, a_len: u8, b: Ipv4Addr, b_len: u8) -> bool {
    let len = a_len.min(b_len).min(32);
    if len == 0 {
        return true;
    }
    let mask = u32::MAX << (32 - u32::from(len));
    u32::from(a) & mask == u32::from(b) & mask
}

/// What already uses `subnet/prefix` on this host, other than the bridge `bridge`
/// itself: an IPv4 address on another interface, or a route (any table but
/// `local`, the default route excepted) through another device or none. `None`
/// when the subnet is free. The text names the address or route and its device.
pub async fn subnet_owner(
    handle: &Handle,
    bridge: &str,
    subnet: Ipv4Addr,
    prefix: u8,
) -> Result<Option<String>> {
    use netlink_packet_route::address::AddressAttribute;
    use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteType};
    use rtnetlink::RouteMessageBuilder;

    let addrs: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetError::netlink("listing addresses", e))?;
    let routes: Vec<_> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetError::netlink("listing routes", e))?;
    // Links last: every address and route listed above belongs to a link that
    // exists in this list (unless it was deleted since), so a bridge another
    // process created meanwhile is recognised by its name.
    let links = list_links(handle).await?;
    let name_of = |index: u32| {
        links
            .iter()
            .find(|m| m.header.index == index)
            .and_then(link_name)
            .map_or_else(|| format!("ifindex {index}"), str::to_string)
    };
    let bridge_index = links
        .iter()
        .find(|m| link_name(m) == Some(bridge))
        .map(|m| m.header.index);

    for msg in addrs {
        if Some(msg.header.index) == bridge_index {
            continue;
        }
        let ip = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => {
                Some(*ip)
            }
            _ => None,
        });
        if let Some(ip) = ip {
            if prefixes_overlap(ip, msg.header.prefix_len, subnet, prefix) {
                return Ok(Some(format!(
                    "address {ip}/{} on {}",
                    msg.header.prefix_len,
                    name_of(msg.header.index)
                )));
            }
        }
    }

    for msg in routes {
        let table = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(msg.header.table));
        let len = msg.header.destination_prefix_length;
        if table == RT_TABLE_LOCAL
            || len == 0
            || matches!(
                msg.header.kind,
                RouteType::Local | RouteType::Broadcast | RouteType::Anycast | RouteType::Multicast
            )
        {
            continue;
        }
        let dst = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        let oif = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        let Some(dst) = dst else { continue };
        if oif.is_some() && oif == bridge_index {
            continue;
        }
        if prefixes_overlap(dst, len, subnet, prefix) {
            let dev = oif.map_or_else(
                || "no device".to_string(),
                |i| format!("dev {}", name_of(i)),
            );
            let kind = match msg.header.kind {
                RouteType::Unicast => String::new(),
                other => format!("{other:?} ").to_lowercase(),
            };
            return Ok(Some(format!(
                "route {kind}{dst}/{len} ({dev}, table {table})"
            )));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::prefixes_overlap;

    #[test]
    fn overlap_is_symmetric_and_exact() {
        let ip = |s: &str| s.parse().unwrap();
        assert!(prefixes_overlap(ip("10.88.5.1"), 24, ip("10.88.0.0"), 16));
        assert!(prefixes_overlap(ip("10.88.0.0"), 16, ip("10.88.5.1"), 24));
        assert!(prefixes_overlap(ip("10.0.0.0"), 8, ip("10.88.0.0"), 16));
        assert!(!prefixes_overlap(ip("10.89.0.0"), 16, ip("10.88.0.0"), 16));
        assert!(!prefixes_overlap(
            ip("192.168.1.7"),
            32,
            ip("10.88.0.0"),
            16
        ));
        assert!(prefixes_overlap(
            ip("10.88.255.255"),
            32,
            ip("10.88.0.0"),
            16
        ));
    }
}
