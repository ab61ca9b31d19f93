//! Built assets the VM tests need, found or built on demand through the project's
//! own scripts (so tests, `make` and CI share one cache).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Run a script that prints one folder path on its last stdout line.
pub fn folder_from_script(script: &Path) -> Result<PathBuf, String> {
    let out = Command::new(script)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("").trim();
    if line.is_empty() {
        return Err(format!("{} printed no folder", script.display()));
    }
    Ok(PathBuf::from(line))
}

/// The beacon kernel build folder (`vmlinux`, `bzImage`, `config`), building it if needed.
pub fn beacon_kernel_dir() -> Result<PathBuf, String> {
    folder_from_script(&repo_root().join("kernel-config/build.sh"))
}

/// Where [`lab_visible_tempdir`] makes its folders: `lab-tmp` in the target
/// directory (`CARGO_TARGET_DIR`, else the repository's `target`). The lab re-exposes
/// it when it lies under /tmp or /run (see `Lab`'s keep list), so it is visible
/// wherever the checkout and the target directory live.
pub fn lab_tmp_base() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("lab-tmp")
}

/// A folder for test files that the nested lab can also see: under the target
/// directory (the lab's own /tmp is a fresh tmpfs, so host temp dirs are invisible).
pub fn lab_visible_tempdir() -> Result<tempfile::TempDir, String> {
    let base = lab_tmp_base();
    std::fs::create_dir_all(&base).map_err(|e| format!("creating {}: {e}", base.display()))?;
    tempfile::Builder::new()
        .prefix("t.")
        .tempdir_in(&base)
        .map_err(|e| format!("temp dir in {}: {e}", base.display()))
}

/// Debian's cloud kernel (a stock bzImage), fetched on demand.
pub fn stock_kernel() -> Result<PathBuf, String> {
    Ok(folder_from_script(&repo_root().join("tests/lab/stock-kernel"))?.join("vmlinuz"))
}

/// Build the hello initrd (resources/hello-init + busybox) into `dir`.
pub fn hello_initrd(dir: &Path) -> Result<PathBuf, String> {
    hello_initrd_with_marker(dir, None)
}

/// The hello initrd with `/etc/beacon-marker` holding `marker`, which the init prints
/// as `BEACON-HELLO-MARKER: ...` (proof that the initrd's files are visible).
pub fn hello_initrd_with_marker(dir: &Path, marker: Option<&str>) -> Result<PathBuf, String> {
    let out = dir.join("hello-initrd.gz");
    let mut extra = Vec::new();
    if let Some(m) = marker {
        let f = dir.join("beacon-marker");
        std::fs::write(&f, m).map_err(|e| format!("writing {}: {e}", f.display()))?;
        extra.push((f, "/etc/beacon-marker".to_string()));
    }
    let spec = beacon_initrd::InitrdSpec {
        init: repo_root().join("resources/hello-init"),
        busybox: Some(PathBuf::from("/bin/busybox")),
        extra,
        ..Default::default()
    };
    let mut file =
        std::fs::File::create(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    beacon_initrd::build(&spec, &mut file).map_err(|e| e.to_string())?;
    Ok(out)
}
