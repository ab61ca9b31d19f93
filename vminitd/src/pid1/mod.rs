//! PID 1 duties inside the VM: file systems, hostname, network, shares,
//! and power-off. Nothing here runs in host mode.

pub mod cmdline;

use std::path::Path;

/// First things after exec as init: nothing yet that needs the runtime.
pub fn early_setup() {}

/// Mounts, hostname, network and shares, from the kernel command line.
pub async fn setup(_shares_dir: &Path) {}

/// Syncs and powers the VM off. Never returns.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    std::process::exit(1)
}
