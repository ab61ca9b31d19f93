//! The newc ("070701") cpio format the Linux initramfs unpacker reads.
//!
//! This module owns byte-exact writing (and, for tests and `--list`, reading) of
//! archives. Entries are written in the order given; the caller sorts them so the
//! same inputs always give the same bytes. It knows nothing about ELF or libraries.

use std::io::{self, Read, Write};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";

/// File type bits of `st_mode`.
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;
const S_IFMT: u32 = 0o170000;

/// One archive member. Paths are relative (no leading `/`), as the kernel expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub mode: u32,
    /// File contents, or the target of a symlink.
    pub data: Vec<u8>,
    /// (major, minor) for device nodes.
    pub rdev: (u32, u32),
}

impl Entry {
    pub fn dir(path: &str) -> Self {
        Self::new(path, S_IFDIR | 0o755, Vec::new())
    }

    pub fn file(path: &str, perm: u32, data: Vec<u8>) -> Self {
        Self::new(path, S_IFREG | (perm & 0o7777), data)
    }

    pub fn symlink(path: &str, target: &str) -> Self {
        Self::new(path, S_IFLNK | 0o777, target.as_bytes().to_vec())
    }

    pub fn char_dev(path: &str, perm: u32, major: u32, minor: u32) -> Self {
        let mut e = Self::new(path, S_IFCHR | (perm & 0o7777), Vec::new());
        e.rdev = (major, minor);
        e
    }

    fn new(path: &str, mode: u32, data: Vec<u8>) -> Self {
        Self {
            path: path.trim_start_matches('/').to_string(),
            mode,
            data,
            rdev: (0, 0),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }

    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }

    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
}

fn pad4(out: &mut impl Write, len: usize) -> io::Result<()> {
    let pad = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..pad])
}

/// Header and name of one member (`ino`, `nlink`, `mtime` are archive-level choices).
fn write_header(
    out: &mut impl Write,
    entry: &Entry,
    ino: u32,
    nlink: u32,
    mtime: u32,
) -> io::Result<()> {
    let size = u32::try_from(entry.data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio member over 4 GiB"))?;
    let name_len = entry.path.len() + 1;
    let fields = [
        ino,
        entry.mode,
        0, // uid: root
        0, // gid: root
        nlink,
        mtime,
        size,
        0, // devmajor
        0, // devminor
        entry.rdev.0,
        entry.rdev.1,
        name_len as u32,
        0, // check
    ];
    out.write_all(MAGIC)?;
    for f in fields {
        write!(out, "{f:08x}")?;
    }
    out.write_all(entry.path.as_bytes())?;
    out.write_all(&[0])?;
    pad4(out, 110 + name_len)
}

/// Write `entries` then the trailer. Every member gets `mtime` and a sequential inode.
pub fn write_archive(out: &mut impl Write, entries: &[Entry], mtime: u32) -> io::Result<()> {
    for (i, e) in entries.iter().enumerate() {
        let nlink = if e.is_dir() { 2 } else { 1 };
        write_header(out, e, (i + 1) as u32, nlink, mtime)?;
        out.write_all(&e.data)?;
        pad4(out, e.data.len())?;
    }
    let trailer = Entry {
        path: TRAILER.to_string(),
        mode: 0,
        data: Vec::new(),
        rdev: (0, 0),
    };
    write_header(out, &trailer, 0, 1, 0)
}

/// Read every member up to the trailer (used by `--list` and by tests).
pub fn read_archive(mut input: impl Read) -> io::Result<Vec<Entry>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut entries = Vec::new();
    let mut offset = 0usize;
    loop {
        let mut header = [0u8; 110];
        input.read_exact(&mut header)?;
        offset += 110;
        if &header[..6] != MAGIC {
            return Err(bad("not a newc cpio member (magic 070701 missing)"));
        }
        let field = |i: usize| -> io::Result<u32> {
            let s = std::str::from_utf8(&header[6 + i * 8..14 + i * 8])
                .map_err(|_| bad("non-ASCII header field"))?;
            u32::from_str_radix(s, 16).map_err(|_| bad("non-hex header field"))
        };
        let mode = field(1)?;
        let size = field(6)? as usize;
        let rdev = (field(9)?, field(10)?);
        let name_len = field(11)? as usize;
        if name_len == 0 || name_len > 4096 {
            return Err(bad("implausible name length"));
        }
        let mut name = vec![0u8; name_len];
        input.read_exact(&mut name)?;
        offset += name_len;
        skip(&mut input, (4 - offset % 4) % 4, &mut offset)?;
        name.pop(); // trailing NUL
        let name = String::from_utf8(name).map_err(|_| bad("non-UTF-8 name"))?;
        if name == TRAILER {
            return Ok(entries);
        }
        let mut data = vec![0u8; size];
        input.read_exact(&mut data)?;
        offset += size;
        skip(&mut input, (4 - offset % 4) % 4, &mut offset)?;
        entries.push(Entry {
            path: name,
            mode,
            data,
            rdev,
        });
    }
}

fn skip(input: &mut impl Read, n: usize, offset: &mut usize) -> io::Result<()> {
    let mut pad = [0u8; 3];
    input.read_exact(&mut pad[..n])?;
    *offset += n;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_alignment() {
        let entries = vec![
            Entry::dir("bin"),
            Entry::file("bin/x", 0o755, b"abcde".to_vec()),
            Entry::symlink("bin/sh", "busybox"),
            Entry::char_dev("dev/console", 0o600, 5, 1),
        ];
        let mut buf = Vec::new();
        write_archive(&mut buf, &entries, 0).expect("write");
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.starts_with(b"070701"));
        let back = read_archive(&buf[..]).expect("read");
        assert_eq!(back, entries);
    }

    #[test]
    fn same_input_same_bytes() {
        let entries = vec![Entry::file("init", 0o755, vec![1, 2, 3])];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        write_archive(&mut a, &entries, 0).expect("write");
        write_archive(&mut b, &entries, 0).expect("write");
        assert_eq!(a, b);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(read_archive(&b"070701zzzz"[..]).is_err());
        assert!(read_archive(&[0u8; 200][..]).is_err());
        let mut header = b"070701".to_vec();
        header.extend(std::iter::repeat_n(b'f', 104));
        assert!(read_archive(&header[..]).is_err());
    }
}
