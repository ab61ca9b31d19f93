//! Network bring-up over rtnetlink: link up, one IPv4 address, a default
//! route. Hand-built messages on a raw NETLINK_ROUTE socket keep the init
//! small (no async netlink stack). Owns nothing but these three requests.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_GATEWAY: u16 = 5;
const RTA_OIF: u16 = 4;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
const IFF_UP: u32 = 0x1;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One netlink request being built.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(kind: u16, flags: u16) -> Msg {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf[8..12].copy_from_slice(&1u32.to_ne_bytes());
        Msg { buf }
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Msg {
        self.buf.extend_from_slice(b);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Msg {
        let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.bytes(payload)
    }

    fn finish(&mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        std::mem::take(&mut self.buf)
    }
}

/// `RTM_NEWLINK` setting IFF_UP on `index`.
pub fn link_up_msg(index: u32) -> Vec<u8> {
    let mut ifi = [0u8; 16];
    ifi[0] = libc::AF_UNSPEC as u8;
    ifi[4..8].copy_from_slice(&index.to_ne_bytes());
    ifi[8..12].copy_from_slice(&IFF_UP.to_ne_bytes());
    ifi[12..16].copy_from_slice(&IFF_UP.to_ne_bytes());
    Msg::new(RTM_NEWLINK, 0).bytes(&ifi).finish()
}

/// `RTM_NEWADDR` adding `addr/prefix` to `index`.
pub fn add_addr_msg(index: u32, addr: Ipv4Addr, prefix: u8) -> Vec<u8> {
    let mut ifa = [0u8; 8];
    ifa[0] = libc::AF_INET as u8;
    ifa[1] = prefix;
    ifa[3] = RT_SCOPE_UNIVERSE;
    ifa[4..8].copy_from_slice(&index.to_ne_bytes());
    Msg::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE)
        .bytes(&ifa)
        .attr(IFA_LOCAL, &addr.octets())
        .attr(IFA_ADDRESS, &addr.octets())
        .finish()
}

/// `RTM_NEWROUTE` for a default route via `gw` out of `index`.
pub fn default_route_msg(index: u32, gw: Ipv4Addr) -> Vec<u8> {
    let rtm = [
        libc::AF_INET as u8,
        0, // dst_len: default route
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
        0,
        0,
        0,
        0,
    ];
    Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE)
        .bytes(&rtm)
        .attr(RTA_GATEWAY, &gw.octets())
        .attr(RTA_OIF, &index.to_ne_bytes())
        .finish()
}

/// A NETLINK_ROUTE socket that sends one request at a time and waits for
/// its acknowledgement.
pub struct Rtnl {
    fd: OwnedFd,
}

impl Rtnl {
    pub fn open() -> io::Result<Rtnl> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Rtnl { fd })
    }

    /// Sends one request and returns the kernel's verdict.
    pub fn request(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl is plain data; zero is a valid value for it.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `msg` and `sa` are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `buf` is valid for writes of its full length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let reply = buf
                .get(..usize::try_from(n).unwrap_or(0))
                .unwrap_or_default();
            if let Some(r) = parse_ack(reply) {
                return r;
            }
        }
    }
}

/// Reads an NLMSG_ERROR acknowledgement: Some(Ok) for success, Some(Err)
/// for a kernel error, None if the message is something else.
pub fn parse_ack(reply: &[u8]) -> Option<io::Result<()>> {
    let kind = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
    if kind != NLMSG_ERROR {
        return None;
    }
    let err = i32::from_ne_bytes(reply.get(16..20)?.try_into().ok()?);
    Some(if err == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-err))
    })
}

/// Index of an interface by name.
pub fn index_of(name: &str) -> io::Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(io::Error::from)
}

/// Brings `lo` up, and `dev` up with `ip` and an optional default route.
pub fn configure(dev: &str, ip: Option<(Ipv4Addr, u8)>, gw: Option<Ipv4Addr>) -> io::Result<()> {
    let nl = Rtnl::open()?;
    nl.request(&link_up_msg(index_of("lo")?))?;
    let Some((addr, prefix)) = ip else {
        return Ok(());
    };
    let idx = index_of(dev)?;
    nl.request(&link_up_msg(idx))?;
    nl.request(&add_addr_msg(idx, addr, prefix))?;
    if let Some(gw) = gw {
        nl.request(&default_route_msg(idx, gw))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_message_layout() {
        let m = add_addr_msg(7, Ipv4Addr::new(10, 0, 0, 2), 24);
        // header 16 + ifaddrmsg 8 + two 8-byte attributes
        assert_eq!(m.len(), 40);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().expect("len")), 40);
        assert_eq!(
            u16::from_ne_bytes(m[4..6].try_into().expect("type")),
            RTM_NEWADDR
        );
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], 24);
        assert_eq!(u32::from_ne_bytes(m[20..24].try_into().expect("idx")), 7);
        assert_eq!(&m[28..32], &[10, 0, 0, 2]);
    }

    #[test]
    fn ack_parsing() {
        let mut ok = vec![0u8; 36];
        ok[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert!(matches!(parse_ack(&ok), Some(Ok(()))));
        ok[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        let e = parse_ack(&ok).expect("ack").expect_err("error");
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        assert!(parse_ack(&[0u8; 3]).is_none());
    }

    /// Real kernel, private network namespace on a dedicated thread (network
    /// namespaces are per thread): lo up, an address and a default route.
    #[test]
    fn configures_a_private_network_namespace() {
        let out = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            configure(
                "lo",
                Some((Ipv4Addr::new(10, 9, 8, 7), 24)),
                Some(Ipv4Addr::new(10, 9, 8, 1)),
            )
            .expect("configure");
            // No child processes here: the reaper test in this binary may
            // be collecting children with waitpid(-1) at the same time.
            let mut addrs = Vec::new();
            for ifa in nix::ifaddrs::getifaddrs().expect("getifaddrs") {
                if let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
                    let up = ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP);
                    addrs.push(format!("{} {} up={up}", ifa.interface_name, sin.ip()));
                }
            }
            let routes = std::fs::read_to_string("/proc/thread-self/net/route").expect("routes");
            (addrs.join("\n"), routes)
        })
        .join()
        .expect("thread");
        assert!(out.0.contains("lo 10.9.8.7 up=true"), "{}", out.0);
        // Default route (destination 0) via 10.9.8.1, in /proc's hex form.
        let gw = format!("{:08X}", u32::from_ne_bytes([10, 9, 8, 1]));
        assert!(
            out.1
                .lines()
                .any(|l| l.starts_with(&format!("lo\t00000000\t{gw}"))),
            "{}",
            out.1
        );
    }
}
