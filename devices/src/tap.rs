//! A TAP device as virtio-net's host end: opened by name, or taken over from a
//! file descriptor the caller owns, always `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`,
//! non-blocking, with the virtio 1.x net header (12 bytes) in front of every
//! frame in both directions.
//!
//! This module owns the TAP's ioctls (attach, checks, header size, offloads) and
//! its non-blocking reads and writes. It never creates a TAP (a name that does
//! not exist is an error, not a new interface), never closes a descriptor it did
//! not duplicate itself, and never blocks.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use beacon_common::tun::{
    IfReq, IFF_NO_PI, IFF_TAP, IFF_TUN, IFF_VNET_HDR, TUNGETIFF, TUNSETIFF, TUNSETOFFLOAD,
    TUNSETVNETHDRSZ,
};

/// Offload flags for `TUNSETOFFLOAD`: what the reader of the TAP (the guest)
/// accepts in frames coming from the host.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

/// Size of the virtio 1.x net header (`struct virtio_net_hdr_v1`) in front of
/// every frame.
pub const VNET_HDR_LEN: usize = 12;

/// Why a TAP cannot be used; each message names the TAP and the fix.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} must be 1 to 15 bytes without '/', NUL or whitespace")]
    BadName(String),
    #[error("TAP {0} does not exist; create it with `ip tuntap add {0} mode tap` or pass another")]
    Missing(String),
    #[error("cannot open /dev/net/tun for TAP {tap}: {source}; load the tun module (`modprobe tun`) and run with CAP_NET_ADMIN")]
    OpenTun {
        tap: String,
        #[source]
        source: io::Error,
    },
    #[error("TAP {0} is in use by another process (a TAP without multi_queue takes one user); stop it or pass another TAP")]
    Busy(String),
    #[error("{0} is not a TAP device (a TUN, a multi-queue TAP, or another kind of interface); pass the name of a TAP made with `ip tuntap add NAME mode tap`")]
    NotATap(String),
    #[error("no permission to attach TAP {0}; run with CAP_NET_ADMIN or create the TAP owned by this user (`ip tuntap add {0} mode tap user $USER`)")]
    Permission(String),
    #[error("cannot {action} TAP {tap}: {source}")]
    Ioctl {
        action: &'static str,
        tap: String,
        #[source]
        source: io::Error,
    },
    #[error("tap_fd {fd} is not an open file descriptor of this process ({source}); pass an fd the VMM inherits")]
    BadFd {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("tap_fd {0} is not a TUN/TAP descriptor (from /dev/net/tun); pass the fd of an attached TAP")]
    NotTunFd(RawFd),
    #[error("tap_fd {0} is a /dev/net/tun descriptor not attached to any interface and no TAP name was given to attach it to")]
    UnattachedWithoutName(RawFd),
    #[error("tap_fd {fd} is attached to {actual:?}, not to the TAP {expected:?} the config names; fix the name or the fd")]
    NameMismatch {
        fd: RawFd,
        expected: String,
        actual: String,
    },
    #[error("tap_fd {fd} (TAP {tap}) was opened {what}; reopen it with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")]
    WrongFlags {
        fd: RawFd,
        tap: String,
        what: &'static str,
    },
}

/// An attached TAP file descriptor.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Whether `name` may name a network interface.
pub fn valid_tap_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name.contains('/')
        && !name.contains('\0')
        && !name.chars().any(char::is_whitespace)
}

fn interface_exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// TUNGETIFF: the interface name and flags of a tun descriptor.
fn get_iff(fd: RawFd) -> io::Result<IfReq> {
    let mut req = IfReq::new("", 0);
    // SAFETY: `req` is a properly sized, initialised ifreq that outlives the
    // call; TUNGETIFF writes only within it. A non-tun fd fails with ENOTTY.
    let rc = unsafe { libc::ioctl(fd, TUNGETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(req)
}

/// TUNSETIFF: attach `fd` to the TAP `name` with our flags.
fn attach(fd: RawFd, name: &str) -> Result<(), TapError> {
    let mut req = IfReq::new(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
    // SAFETY: `fd` is an open /dev/net/tun descriptor and `req` a properly sized,
    // initialised ifreq that outlives the call; TUNSETIFF reads and writes only within it.
    let rc = unsafe { libc::ioctl(fd, TUNSETIFF, &mut req as *mut IfReq) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    Err(match e.raw_os_error() {
        Some(libc::EBUSY) => TapError::Busy(name.into()),
        Some(libc::EINVAL) => TapError::NotATap(name.into()),
        Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission(name.into()),
        _ => TapError::Ioctl {
            action: "attach to",
            tap: name.into(),
            source: e,
        },
    })
}

impl Tap {
    /// Open the existing TAP `name` (never creates one).
    pub fn open(name: &str) -> Result<Self, TapError> {
        if !valid_tap_name(name) {
            return Err(TapError::BadName(name.into()));
        }
        // TUNSETIFF would create a missing TAP (and it would vanish with us).
        if !interface_exists(name) {
            return Err(TapError::Missing(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                tap: name.into(),
                source,
            })?;
        attach(file.as_raw_fd(), name)?;
        let tap = Self {
            file,
            name: name.into(),
        };
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    /// Take over a TAP descriptor the caller owns: it is duplicated (the
    /// caller's descriptor is never closed), checked to be an
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` TAP, or, when it is a
    /// `/dev/net/tun` descriptor not attached yet, attached to `name` (in the
    /// network namespace it was opened in). `name` may be empty for an attached
    /// descriptor; otherwise it must match. The shared file description is made
    /// non-blocking, so the caller's descriptor becomes non-blocking too.
    pub fn from_caller_fd(fd: RawFd, name: &str) -> Result<Self, TapError> {
        if !name.is_empty() && !valid_tap_name(name) {
            return Err(TapError::BadName(name.into()));
        }
        // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor table; a bad fd fails with EBADF.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(TapError::BadFd {
                fd,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `dup` was just created by fcntl and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(dup) };
        let name = match get_iff(dup) {
            Ok(req) => {
                let actual = req.name();
                if !name.is_empty() && actual != name {
                    return Err(TapError::NameMismatch {
                        fd,
                        expected: name.into(),
                        actual,
                    });
                }
                let what = if req.flags & IFF_TUN != 0 || req.flags & IFF_TAP == 0 {
                    Some("as a TUN, not a TAP")
                } else if req.flags & IFF_NO_PI == 0 {
                    Some("without IFF_NO_PI")
                } else if req.flags & IFF_VNET_HDR == 0 {
                    Some("without IFF_VNET_HDR")
                } else {
                    None
                };
                if let Some(what) = what {
                    return Err(TapError::WrongFlags {
                        fd,
                        tap: actual,
                        what,
                    });
                }
                actual
            }
            // A /dev/net/tun descriptor not attached to an interface yet.
            Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                if name.is_empty() {
                    return Err(TapError::UnattachedWithoutName(fd));
                }
                attach(dup, name)?;
                name.to_string()
            }
            Err(_) => return Err(TapError::NotTunFd(fd)),
        };
        let tap = Self { file, name };
        tap.set_nonblocking()?;
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    /// The interface name (in the namespace the TAP lives in).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TAP as a file (vhost-net takes it as its backend).
    pub fn file(&self) -> &File {
        &self.file
    }

    fn ioctl_int(&self, request: libc::c_ulong, value: libc::c_int) -> io::Result<()> {
        // SAFETY: the file is an attached tun descriptor; these requests read one
        // int through the pointer, which outlives the call.
        let rc =
            unsafe { libc::ioctl(self.file.as_raw_fd(), request, &value as *const libc::c_int) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_vnet_hdr_len(&self) -> Result<(), TapError> {
        self.ioctl_int(TUNSETVNETHDRSZ, VNET_HDR_LEN as libc::c_int)
            .map_err(|source| TapError::Ioctl {
                action: "set the virtio-net header size of",
                tap: self.name.clone(),
                source,
            })
    }

    fn set_nonblocking(&self) -> Result<(), TapError> {
        let fd = self.file.as_raw_fd();
        let ioctl = |source| TapError::Ioctl {
            action: "make non-blocking",
            tap: self.name.clone(),
            source,
        };
        // SAFETY: F_GETFL/F_SETFL only read and change this descriptor's status flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(ioctl(io::Error::last_os_error()));
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(ioctl(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Tell the kernel which offloads the reader (the guest) accepts in frames
    /// from the host: `TUN_F_*` bits.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: the file is an attached tun descriptor; TUNSETOFFLOAD takes its
        // argument by value and touches no memory of ours.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(TapError::Ioctl {
                action: "set offloads of",
                tap: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Read one frame (with its net header) into `buf`; `WouldBlock` when the
    /// TAP's queue is empty.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Write one frame (with its net header).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: `frame` is valid for reads of `frame.len()` bytes for the call.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Write one frame (with its net header) gathered from `iovs`. The kernel
    /// only reads the memory they describe; a bad pointer fails with EFAULT.
    pub fn write_frame_vectored(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iovs.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `iovs` is a valid array of `count` iovecs for the call; writev
        // only reads the memory they point to and reports EFAULT for bad pointers.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iovs.as_ptr(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_anything_is_opened() {
        for bad in ["", "a/b", "with space", "sixteen-bytes-xx", "nul\0"] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::BadName(_))),
                "{bad:?}"
            );
        }
        let err = Tap::open("beacon-nx0").expect_err("missing");
        assert!(matches!(err, TapError::Missing(_)));
        assert!(err
            .to_string()
            .contains("ip tuntap add beacon-nx0 mode tap"));
    }

    #[test]
    fn caller_fds_that_are_not_taps_are_refused_and_left_open() {
        let err = Tap::from_caller_fd(-1, "").expect_err("bad fd");
        assert!(matches!(err, TapError::BadFd { .. }), "{err}");
        let file = File::open("/dev/null").expect("null");
        let fd = file.as_raw_fd();
        let err = Tap::from_caller_fd(fd, "tap0").expect_err("not tun");
        assert!(matches!(err, TapError::NotTunFd(_)), "{err}");
        // SAFETY: F_GETFD only reads the descriptor table.
        let still_open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
        assert!(still_open, "caller's fd still open");
    }
}
