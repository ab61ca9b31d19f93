//! Build the beacon initrd: an init (later `vminitd`), optionally busybox (for
//! debugging) and `crun`, the shared libraries they load (resolved with `ldd`), and
//! extra files, packed as a reproducible newc cpio (sorted entries, fixed mtime,
//! root ownership), gzip-compressed or not. ELF files are stripped of symbols and
//! debug information on the way in ([`strip`]; the sources stay as they are)
//! unless [`InitrdSpec::keep_symbols`] asks otherwise.
//!
//! [`verify`] checks an archive independently of how it was built: every ELF's
//! interpreter and every `DT_NEEDED` library must be inside.

pub mod cpio;
pub mod elf;
pub mod ldd;
pub mod strip;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use cpio::Entry;
use strip::StripLevel;

/// Folders every initrd has, so init can mount onto them.
const BASE_DIRS: &[&str] = &[
    "bin", "dev", "etc", "mnt", "proc", "root", "run", "sbin", "sys", "tmp", "usr", "usr/bin",
];

/// Where the dynamic loader looks inside the initrd (Debian multiarch layout).
const LIB_DIRS: &[&str] = &[
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib64",
    "lib",
    "usr/lib",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Compression {
    #[default]
    Gzip,
    None,
}

/// What goes into one initrd.
#[derive(Debug, Clone, Default)]
pub struct InitrdSpec {
    /// Becomes `/init` (a binary or a `#!` script).
    pub init: PathBuf,
    /// Becomes `/bin/busybox` with a `/bin/sh` link.
    pub busybox: Option<PathBuf>,
    /// Becomes `/usr/bin/crun`.
    pub crun: Option<PathBuf>,
    /// Extra files: (host source, absolute path inside the initrd).
    pub extra: Vec<(PathBuf, String)>,
    pub compression: Compression,
    /// mtime of every member (seconds since the epoch); `SOURCE_DATE_EPOCH` or 0.
    pub mtime: u32,
    /// Pack ELF files as they are, symbols and debug sections included (for
    /// debugging inside the guest). By default they are stripped.
    pub keep_symbols: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot read {path:?}: {source}; check the path")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("resolving libraries of {binary:?}: {reason}")]
    Ldd { binary: PathBuf, reason: String },
    #[error("two different files want {0:?} in the initrd")]
    Conflict(String),
    #[error("destination {0:?} must be an absolute path without '..'")]
    BadDestination(String),
    #[error("writing the archive: {0}")]
    Write(#[from] std::io::Error),
    #[error("the archive is incomplete: {0}")]
    Incomplete(String),
    #[error("stripping {path:?}: {reason}")]
    Strip { path: PathBuf, reason: String },
}

/// Members being collected, keyed by path so duplicates are caught and output is sorted.
#[derive(Default)]
struct Tree {
    entries: BTreeMap<String, Entry>,
    keep_symbols: bool,
}

impl Tree {
    fn add(&mut self, entry: Entry) -> Result<(), BuildError> {
        // Create parents first; BTreeMap order then puts them before children.
        let mut parent = Path::new(&entry.path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            let key = p.to_string_lossy().into_owned();
            self.entries
                .entry(key.clone())
                .or_insert_with(|| Entry::dir(&key));
            parent = p.parent();
        }
        match self.entries.get(&entry.path) {
            Some(existing) if *existing == entry => Ok(()),
            Some(existing) if existing.is_dir() && entry.is_dir() => Ok(()),
            Some(_) => Err(BuildError::Conflict(entry.path)),
            None => {
                self.entries.insert(entry.path.clone(), entry);
                Ok(())
            }
        }
    }

    fn add_host_file(&mut self, src: &Path, dest: &str, perm: u32) -> Result<(), BuildError> {
        let data = std::fs::read(src).map_err(|source| BuildError::Read {
            path: src.to_path_buf(),
            source,
        })?;
        self.add(Entry::file(dest, perm, data))
    }

    /// Add a file, with ELF symbols and debug sections stripped unless they are
    /// kept (anything else, a `#!` script say, goes in as it is).
    fn add_program(&mut self, src: &Path, dest: &str, level: StripLevel) -> Result<(), BuildError> {
        let data = std::fs::read(src).map_err(|source| BuildError::Read {
            path: src.to_path_buf(),
            source,
        })?;
        let data = if self.keep_symbols {
            data
        } else {
            strip::stripped(&data, src, level)?
        };
        self.add(Entry::file(dest, 0o755, data))
    }

    /// Add a binary and every library ldd says it loads, at the same paths.
    fn add_binary(&mut self, src: &Path, dest: &str) -> Result<(), BuildError> {
        self.add_program(src, dest, StripLevel::All)?;
        for lib in ldd::resolve(src)? {
            let dest = lib.to_string_lossy().into_owned();
            self.add_program(&lib, &dest, StripLevel::Unneeded)?;
        }
        Ok(())
    }
}

fn check_destination(dest: &str) -> Result<(), BuildError> {
    if !dest.starts_with('/') || dest.split('/').any(|c| c == "..") || dest == "/" {
        return Err(BuildError::BadDestination(dest.to_string()));
    }
    Ok(())
}

/// Collect every member of the initrd described by `spec`, sorted.
pub fn collect(spec: &InitrdSpec) -> Result<Vec<Entry>, BuildError> {
    let mut tree = Tree {
        keep_symbols: spec.keep_symbols,
        ..Tree::default()
    };
    for dir in BASE_DIRS {
        tree.add(Entry::dir(dir))?;
    }
    // The kernel opens /dev/console for init's stdio before anything is mounted.
    tree.add(Entry::char_dev("dev/console", 0o600, 5, 1))?;
    tree.add(Entry::char_dev("dev/null", 0o666, 1, 3))?;
    tree.add_binary(&spec.init, "init")?;
    if let Some(busybox) = &spec.busybox {
        tree.add_binary(busybox, "bin/busybox")?;
        tree.add(Entry::symlink("bin/sh", "busybox"))?;
    }
    if let Some(crun) = &spec.crun {
        tree.add_binary(crun, "usr/bin/crun")?;
    }
    for (src, dest) in &spec.extra {
        check_destination(dest)?;
        let perm = std::fs::metadata(src)
            .map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.permissions().mode() & 0o777
            })
            .map_err(|source| BuildError::Read {
                path: src.clone(),
                source,
            })?;
        if elf::is_elf(&std::fs::read(src).map_err(|source| BuildError::Read {
            path: src.clone(),
            source,
        })?) {
            tree.add_binary(src, dest)?;
        } else {
            tree.add_host_file(src, dest, perm)?;
        }
    }
    Ok(tree.entries.into_values().collect())
}

/// Build the initrd and write it to `out`. The archive is verified before writing.
pub fn build(spec: &InitrdSpec, out: &mut impl Write) -> Result<(), BuildError> {
    let entries = collect(spec)?;
    verify(&entries)?;
    match spec.compression {
        Compression::None => cpio::write_archive(out, &entries, spec.mtime)?,
        Compression::Gzip => {
            // mtime 0 in the gzip header keeps the output byte-identical across runs.
            let mut gz = flate2::GzBuilder::new()
                .mtime(0)
                .write(out, flate2::Compression::best());
            cpio::write_archive(&mut gz, &entries, spec.mtime)?;
            gz.finish()?;
        }
    }
    Ok(())
}

/// Read an initrd (gzip or plain) back into its members.
pub fn read(mut input: impl Read) -> Result<Vec<Entry>, BuildError> {
    let mut bytes = Vec::new();
    input.read_to_end(&mut bytes)?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        Ok(cpio::read_archive(flate2::read::GzDecoder::new(
            &bytes[..],
        ))?)
    } else {
        Ok(cpio::read_archive(&bytes[..])?)
    }
}

/// Every ELF's interpreter and `DT_NEEDED` libraries are present; symlinks inside
/// the archive are followed. Returns all problems at once.
pub fn verify(entries: &[Entry]) -> Result<(), BuildError> {
    let by_path: BTreeMap<&str, &Entry> = entries.iter().map(|e| (e.path.as_str(), e)).collect();
    let present = |path: &str| -> bool {
        let mut current = path.trim_start_matches('/').to_string();
        for _ in 0..8 {
            match by_path.get(current.as_str()) {
                Some(e) if e.is_symlink() => {
                    let target = String::from_utf8_lossy(&e.data).into_owned();
                    current = if let Some(abs) = target.strip_prefix('/') {
                        abs.to_string()
                    } else {
                        let parent = Path::new(&current).parent().unwrap_or(Path::new(""));
                        parent.join(target).to_string_lossy().into_owned()
                    };
                }
                Some(e) => return e.is_file(),
                None => return false,
            }
        }
        false
    };
    let mut problems = Vec::new();
    for e in entries
        .iter()
        .filter(|e| e.is_file() && elf::is_elf(&e.data))
    {
        if let Some(interp) = elf::interpreter(&e.data) {
            if !present(&interp) {
                problems.push(format!("{}: interpreter {interp} missing", e.path));
            }
        }
        for lib in elf::needed(&e.data) {
            if !LIB_DIRS.iter().any(|d| present(&format!("{d}/{lib}"))) {
                problems.push(format!("{}: library {lib} missing", e.path));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(BuildError::Incomplete(problems.join("; ")))
    }
}
