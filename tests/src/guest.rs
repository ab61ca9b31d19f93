//! Guest initrds for the VM device tests: `tests/guest/device-init` with busybox,
//! a checks script the test writes, extra files, and, for Debian's stock cloud
//! kernel (whose virtio drivers are modules), the modules to load first.

use std::path::{Path, PathBuf};

use crate::assets::repo_root;

/// The stock kernel's modules `names` (with their dependencies), as initrd extra
/// files: each `.ko` under `/lib/modules/`, and `/etc/beacon-modules` listing the
/// load order for the device init.
pub fn stock_modules(names: &[&str]) -> Result<Vec<(PathBuf, String)>, String> {
    let script = repo_root().join("tests/lab/stock-modules");
    let out = std::process::Command::new(&script)
        .args(names)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let folder = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let order = folder.join("load-order");
    let list =
        std::fs::read_to_string(&order).map_err(|e| format!("reading {}: {e}", order.display()))?;
    let mut files: Vec<(PathBuf, String)> = list
        .lines()
        .filter(|l| !l.is_empty())
        .map(|m| (folder.join("modules").join(m), format!("/lib/modules/{m}")))
        .collect();
    files.push((order, "/etc/beacon-modules".into()));
    Ok(files)
}

/// What one device-test guest carries.
#[derive(Debug, Default, Clone)]
pub struct DeviceGuest {
    /// Shell run by the init after the modules are loaded (its exit code is
    /// printed as `BEACON-CHECKS-RC: N`).
    pub checks: String,
    /// Stock kernel modules to load first (empty for the beacon kernel).
    pub stock_modules: Vec<&'static str>,
    /// More files: (host path, path in the guest).
    pub extra: Vec<(PathBuf, String)>,
}

/// Build the initrd for `guest` as `dir/name`.
pub fn device_initrd(dir: &Path, name: &str, guest: &DeviceGuest) -> Result<PathBuf, String> {
    let checks = dir.join(format!("{name}.checks.sh"));
    std::fs::write(&checks, &guest.checks)
        .map_err(|e| format!("writing {}: {e}", checks.display()))?;
    let mut extra = vec![(checks, "/etc/beacon-checks.sh".to_string())];
    if !guest.stock_modules.is_empty() {
        extra.extend(stock_modules(&guest.stock_modules)?);
    }
    extra.extend(guest.extra.iter().cloned());
    let spec = beacon_initrd::InitrdSpec {
        init: repo_root().join("tests/guest/device-init"),
        busybox: Some(PathBuf::from("/bin/busybox")),
        extra,
        ..Default::default()
    };
    let out = dir.join(name);
    let mut file =
        std::fs::File::create(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    beacon_initrd::build(&spec, &mut file).map_err(|e| e.to_string())?;
    Ok(out)
}
