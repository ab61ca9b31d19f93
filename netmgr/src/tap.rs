//! Creating persistent TAP devices through `/dev/net/tun` (the kernel cannot create
//! TAPs over rtnetlink). A TAP made here is `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`,
//! persistent (it outlives our file descriptor so the VMM can open it by name) and
//! owned by our effective uid and gid. Attaching and deleting happen in [`crate::link`].

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

use crate::error::{NetError, Result};

use beacon_common::tun::{
    IfReq, IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUNSETGROUP, TUNSETIFF, TUNSETOWNER, TUNSETPERSIST,
};

fn tap_err(action: &'static str, tap: &str, source: std::io::Error) -> NetError {
    NetError::Tap {
        action,
        tap: tap.to_string(),
        source,
    }
}

/// Open `/dev/net/tun` and bind the file to the TAP `name` (creating it if needed).
fn bind(name: &str, flags: libc::c_short) -> Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(NetError::Config(format!(
            "interface name {name:?} must be 1..=15 bytes"
        )));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| tap_err("open /dev/net/tun for", name, e))?;
    let mut req = IfReq::new(name, flags);
    // SAFETY: `file` is an open tun fd and `req` is a properly sized, initialised
    // ifreq that outlives the call; TUNSETIFF only reads and writes within it.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(tap_err("create", name, std::io::Error::last_os_error()));
    }
    Ok(file)
}

fn set_int(
    file: &File,
    name: &str,
    request: libc::c_ulong,
    value: libc::c_ulong,
    action: &'static str,
) -> Result<()> {
    // SAFETY: `file` is a tun fd bound to a device; these requests take an integer
    // argument by value and touch no memory of ours.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, value) };
    if rc < 0 {
        return Err(tap_err(action, name, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Create (or reuse) the persistent TAP `name` with a virtio-net header, owned by
/// the calling process's effective uid and gid. Does not bring it up.
pub fn create_persistent_tap(name: &str) -> Result<()> {
    let file = bind(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)?;
    // SAFETY: geteuid/getegid cannot fail and have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    set_int(
        &file,
        name,
        TUNSETOWNER,
        libc::c_ulong::from(uid),
        "set the owner of",
    )?;
    set_int(
        &file,
        name,
        TUNSETGROUP,
        libc::c_ulong::from(gid),
        "set the group of",
    )?;
    set_int(&file, name, TUNSETPERSIST, 1, "make persistent")?;
    Ok(())
}

/// Open a queue of the TAP `name` as the VMM's virtio-net backend needs it
/// (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`). When `netns` is given (CNI mode) the TAP
/// is opened from a short-lived thread inside that namespace; the returned file
/// keeps working from any thread.
pub fn open_tap_for_vm(name: &str, netns: Option<&std::path::Path>) -> Result<File> {
    let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    let Some(ns) = netns else {
        return bind(name, flags);
    };
    let ns_file = File::open(ns).map_err(|e| NetError::Netns {
        path: ns.to_path_buf(),
        detail: e.to_string(),
    })?;
    let owned = name.to_string();
    let shown = ns.to_path_buf();
    std::thread::spawn(move || {
        nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
            NetError::Netns {
                path: shown,
                detail: format!("setns: {e}"),
            }
        })?;
        bind(&owned, flags)
    })
    .join()
    .map_err(|_| NetError::Netns {
        path: ns.to_path_buf(),
        detail: "TAP opening thread panicked".into(),
    })?
}

/// Open an existing TAP for packet I/O without the virtio-net header (tests and
/// diagnostics; the VMM opens its own queue with `IFF_VNET_HDR`).
pub fn open_tap_plain(name: &str) -> Result<File> {
    bind(name, IFF_TAP | IFF_NO_PI)
}
