//! PID 1 duties inside the VM: file systems, console, hostname, network,
//! shares, onlining hot-added CPUs and memory, and power-off. Nothing here runs in host mode. Orphan reaping is
//! the `reaper` module's (it runs in both modes).

pub mod cmdline;
pub mod hotplug;
pub mod mounts;
pub mod net;

use std::os::fd::AsRawFd;
use std::path::Path;

use cmdline::BootParams;

/// Before logging exists: the API file systems and a console on fds 0-2
/// (an initramfs without /dev/console starts init with none).
pub fn early_setup(cmdline_file: &Path) -> BootParams {
    mounts::mount_api_filesystems();
    attach_console();
    // Ctrl-Alt-Del becomes SIGINT to us: a clean power-off, not a reset.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        eprintln!("vminitd: disabling Ctrl-Alt-Del: {e}");
    }
    let text = std::fs::read_to_string(cmdline_file).unwrap_or_default();
    let (params, complaints) = cmdline::parse(&text);
    for c in complaints {
        // Logging is not up yet; the console is.
        eprintln!("vminitd: {c}");
    }
    params
}

fn attach_console() {
    // SAFETY: fcntl(F_GETFD) only queries descriptor 2.
    if unsafe { libc::fcntl(2, libc::F_GETFD) } >= 0 {
        return;
    }
    let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors, which are closed.
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
}

/// cgroup delegation, hostname, network and shares. Failures are logged;
/// the Task API still comes up so the host can see what went wrong.
pub fn setup(params: &BootParams, shares_dir: &Path, cgroup_mount: &Path) {
    mounts::enable_controllers(cgroup_mount);
    hotplug::start();
    if let Some(h) = &params.hostname {
        if let Err(e) = nix::unistd::sethostname(h) {
            tracing::warn!("sethostname {h}: {e}");
        }
    }
    match net::configure("eth0", params.ip, params.gateway) {
        Ok(()) => tracing::info!(ip = ?params.ip, gw = ?params.gateway, "network up"),
        Err(e) => tracing::error!("network setup: {e}"),
    }
    if !params.dns.is_empty() {
        let _ = std::fs::create_dir_all("/etc");
        if let Err(e) = std::fs::write("/etc/resolv.conf", cmdline::resolv_conf(&params.dns)) {
            tracing::warn!("writing /etc/resolv.conf: {e}");
        }
    }
    mounts::mount_shares(&params.shares, shares_dir);
}

/// Syncs and powers the VM off. Never returns.
pub fn power_off() -> ! {
    tracing::info!("powering off");
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    std::process::exit(1)
}
