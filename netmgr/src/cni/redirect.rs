//! Inside a sandbox's namespace, give the VM a TAP: use the chain's TAP when the
//! last plugin made one (tc-redirect-tap style), otherwise create a TAP next to the
//! veth and redirect every frame between the two with tc ingress `mirred` filters
//! (the Kata Containers approach). The VM then uses the veth's MAC address.

use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};

use crate::error::{NetError, Result};
use crate::{link, tap};
use beacon_common::MacAddr;

const ETH_P_ALL: u16 = 0x0003;
const TC_H_INGRESS_PARENT: u32 = 0xffff_0000;

fn kind(msg: &LinkMessage) -> Option<InfoKind> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        }),
        _ => None,
    })
}

fn mac_of(msg: &LinkMessage) -> Option<MacAddr> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) if b.len() == 6 => {
            let mut m = [0u8; 6];
            m.copy_from_slice(b);
            Some(MacAddr(m))
        }
        _ => None,
    })
}

fn mtu_of(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

fn tc_err(action: &str, e: rtnetlink::Error) -> NetError {
    NetError::netlink(action.to_string(), e)
}

/// Add the ingress qdisc of `index` (tolerating one already there) and a filter
/// redirecting all its ingress frames to `to`.
async fn redirect_ingress(h: &Handle, index: u32, to: u32) -> Result<()> {
    let idx = i32::try_from(index).map_err(|_| NetError::Netlink {
        action: "redirecting traffic".into(),
        detail: format!("interface index {index} out of range"),
    })?;
    match h.qdisc().add(idx).ingress().execute().await {
        Ok(()) => {}
        Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::EEXIST => {}
        Err(e) => return Err(tc_err("adding an ingress qdisc", e)),
    }
    h.traffic_filter(idx)
        .add()
        .parent(TC_H_INGRESS_PARENT)
        // tcm_info carries the protocol in network byte order (iproute2: htons).
        .protocol(ETH_P_ALL.to_be())
        .redirect(to)
        .map_err(|e| tc_err("building a mirred filter", e))?
        .execute()
        .await
        .map_err(|e| tc_err("adding a mirred redirect filter", e))
}

/// Returns the TAP the VM should open and the MAC the guest must use. Runs inside
/// the sandbox namespace. `result_ifname` is the chain's last sandbox interface.
pub async fn plug(result_ifname: String, tap_name: String) -> Result<(String, MacAddr)> {
    let h = link::connect()?;
    let iface = link::get_link(&h, &result_ifname)
        .await?
        .ok_or_else(|| NetError::Netlink {
            action: "finding the CNI interface".into(),
            detail: format!("{result_ifname} does not exist in the sandbox namespace"),
        })?;
    let mac = mac_of(&iface).ok_or_else(|| NetError::Netlink {
        action: "reading the CNI interface".into(),
        detail: format!("{result_ifname} has no MAC address"),
    })?;
    if kind(&iface) == Some(InfoKind::Tun) {
        link::set_up(&h, iface.header.index, None).await?;
        return Ok((result_ifname, mac));
    }
    tap::create_persistent_tap(&tap_name)?;
    let tap_index = link::link_index(&h, &tap_name)
        .await?
        .ok_or_else(|| NetError::Netlink {
            action: "creating the sandbox TAP".into(),
            detail: format!("{tap_name} vanished"),
        })?;
    let mut msg = LinkUnspec::new_with_index(tap_index).up();
    if let Some(mtu) = mtu_of(&iface) {
        msg = msg.mtu(mtu);
    }
    h.link()
        .set(msg.build())
        .execute()
        .await
        .map_err(|e| NetError::netlink("bringing the sandbox TAP up", e))?;
    redirect_ingress(&h, iface.header.index, tap_index).await?;
    redirect_ingress(&h, tap_index, iface.header.index).await?;
    Ok((tap_name, mac))
}
