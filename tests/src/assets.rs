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
