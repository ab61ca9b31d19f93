//! Strip symbols and debug information from ELF files before they are packed: an
//! unstripped release `vminitd` is several times the size of the stripped one, and
//! every VM boot reads the whole initrd.
//!
//! Works on a private copy (binutils' `strip -o` into a temporary folder); the
//! source file is never opened for writing. Files without a symbol table or debug
//! sections (Debian's binaries and libraries) are returned untouched, without
//! running anything.

use std::path::Path;
use std::process::Command;

use crate::{elf, BuildError};

/// The program that strips (binutils).
const STRIP: &str = "strip";

/// How much to remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripLevel {
    /// Every symbol and debug section (`--strip-all`): executables.
    All,
    /// What relocation processing does not need (`--strip-unneeded`): shared
    /// libraries, as Debian strips its own.
    Unneeded,
}

/// `data` (read from `source`, named in errors) without symbols and debug sections.
pub fn stripped(data: &[u8], source: &Path, level: StripLevel) -> Result<Vec<u8>, BuildError> {
    if !elf::has_symbols_or_debug(data) {
        return Ok(data.to_vec());
    }
    let fail = |reason: String| BuildError::Strip {
        path: source.to_path_buf(),
        reason,
    };
    let dir = tempfile::Builder::new()
        .prefix("beacon-initrd-strip.")
        .tempdir()
        .map_err(|e| fail(format!("temporary folder: {e}")))?;
    let input = dir.path().join("in");
    let output = dir.path().join("out");
    std::fs::write(&input, data).map_err(|e| fail(format!("writing a copy: {e}")))?;
    let flag = match level {
        StripLevel::All => "--strip-all",
        StripLevel::Unneeded => "--strip-unneeded",
    };
    let out = Command::new(STRIP)
        .arg(flag)
        .arg("-o")
        .arg(&output)
        .arg(&input)
        .output()
        .map_err(|e| {
            fail(format!(
                "cannot run `{STRIP}` ({e}); install binutils (resources/install.sh), \
                 or pass --keep-symbols"
            ))
        })?;
    if !out.status.success() {
        return Err(fail(format!(
            "`{STRIP} {flag}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::read(&output).map_err(|e| fail(format!("reading the stripped copy: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_a_copy_and_leaves_stripped_files_alone() {
        let me = std::env::current_exe().expect("exe");
        let before = std::fs::read(&me).expect("read self");
        assert!(
            elf::has_symbols_or_debug(&before),
            "this test needs an unstripped test binary"
        );
        let small = stripped(&before, &me, StripLevel::All).expect("strip");
        assert!(!elf::has_symbols_or_debug(&small));
        assert!(small.len() < before.len());
        assert_eq!(elf::interpreter(&small), elf::interpreter(&before));
        assert_eq!(
            std::fs::read(&me).expect("reread"),
            before,
            "source changed"
        );

        let ls = std::fs::read("/bin/ls").expect("read /bin/ls");
        let same = stripped(&ls, Path::new("/bin/ls"), StripLevel::Unneeded).expect("no-op");
        assert_eq!(same, ls);
    }

    #[test]
    fn a_file_strip_rejects_is_a_clear_error() {
        // Our parser still sees a .symtab, but binutils knows no machine 0xffff.
        let mut odd = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        odd[0x12..0x14].copy_from_slice(&0xffffu16.to_le_bytes());
        assert!(elf::has_symbols_or_debug(&odd));
        let err = stripped(&odd, Path::new("/odd/file"), StripLevel::All).expect_err("rejected");
        let text = err.to_string();
        assert!(
            text.contains("/odd/file") && text.contains("strip"),
            "{text}"
        );
    }
}
