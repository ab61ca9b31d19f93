//! The TUN/TAP kernel interface (`<linux/if_tun.h>`): the `struct ifreq`
//! layout the TUN ioctls read and write, their request numbers and flags. One
//! definition for the VMM's TAP device (`beacon_devices::tap`, which opens and
//! attaches TAPs) and netmgr (`beacon_netmgr::tap`, which creates persistent
//! ones). Owns no file descriptor and issues no ioctl itself.

/// `ifr_flags`: a TUN (layer 3) device.
pub const IFF_TUN: libc::c_short = 0x0001;
/// `ifr_flags`: a TAP (Ethernet) device.
pub const IFF_TAP: libc::c_short = 0x0002;
/// `ifr_flags`: no packet-information prefix.
pub const IFF_NO_PI: libc::c_short = 0x1000;
/// `ifr_flags`: every frame carries a virtio-net header.
pub const IFF_VNET_HDR: libc::c_short = 0x4000;

// _IOW('T', n, int) and _IOR('T', n, unsigned int).
pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
pub const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
pub const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
pub const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;
pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
pub const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
pub const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// `struct ifreq` as far as the TUN ioctls read and write it (name and flags,
/// padded to the kernel's 40 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    /// `ifr_flags`.
    pub flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    /// A request for interface `name` (cut to 15 bytes; callers validate
    /// names first) with `flags`.
    pub fn new(name: &str, flags: libc::c_short) -> Self {
        let mut req = Self {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        let len = name.len().min(libc::IFNAMSIZ - 1);
        req.name[..len].copy_from_slice(&name.as_bytes()[..len]);
        req
    }

    /// The interface name the kernel wrote back (up to the first NUL).
    pub fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_the_kernel_layout_and_keeps_names_terminated() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(IfReq::new("tap0", IFF_TAP).name(), "tap0");
        let long = IfReq::new("a-very-long-interface-name", 0);
        assert_eq!(long.name().len(), libc::IFNAMSIZ - 1);
    }
}
