//! Shared-library resolution through the system's `ldd`, so the initrd carries
//! exactly what the host's dynamic loader would load (no hard-coded lists).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::BuildError;

/// Absolute paths of the interpreter and every library `binary` loads, transitively
/// (ldd already walks the whole tree). Empty for a static binary.
pub fn resolve(binary: &Path) -> Result<Vec<PathBuf>, BuildError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| BuildError::Ldd {
            binary: binary.to_path_buf(),
            reason: format!("cannot run ldd ({e}); install libc-bin"),
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // glibc's ldd exits 1 with "not a dynamic executable" for static binaries.
    if stdout.contains("not a dynamic executable")
        || stderr.contains("not a dynamic executable")
        || stdout.contains("statically linked")
    {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(BuildError::Ldd {
            binary: binary.to_path_buf(),
            reason: format!("ldd failed: {}", stderr.trim()),
        });
    }
    parse(&stdout).map_err(|line| BuildError::Ldd {
        binary: binary.to_path_buf(),
        reason: format!("library not found: {line}"),
    })
}

/// Parse ldd's output; `Err` carries the first "not found" line.
pub fn parse(output: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in output.lines().map(str::trim) {
        if line.contains("not found") {
            return Err(line.to_string());
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso lines have no path.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    libs.sort();
    libs.dedup();
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse(out).expect("parse"),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn missing_library_is_an_error() {
        let out = "\tlibfoo.so.1 => not found\n";
        assert!(parse(out).is_err());
    }

    #[test]
    fn resolves_crun_or_ls() {
        let libs = resolve(Path::new("/bin/ls")).expect("ldd /bin/ls");
        assert!(libs.iter().any(|p| p.ends_with("libc.so.6")));
        assert!(libs.iter().any(|p| p.ends_with("ld-linux-x86-64.so.2")));
    }
}
