//! Just enough ELF64 reading to verify an initrd: is a file ELF, what is its
//! program interpreter (`PT_INTERP`), which libraries does it need (`DT_NEEDED`),
//! and does it still carry symbols or debug information (section names).
//!
//! Resolution uses `ldd` (see [`crate::ldd`]); this parser exists so the result can
//! be checked independently of the tool that produced it. Malformed input gives
//! `None`/empty, never a panic.

const PT_INTERP: u32 = 3;
const PT_DYNAMIC: u32 = 2;
const PT_LOAD: u32 = 1;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;

/// Is this an ELF file at all?
pub fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

fn u16_at(d: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(d.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(d: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(d: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(d.get(off..off + 8)?.try_into().ok()?))
}

struct Phdr {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

fn phdrs(d: &[u8]) -> Option<Vec<Phdr>> {
    // ELFCLASS64, little endian only: the initrd is for x86_64.
    if !is_elf(d) || d.get(4) != Some(&2) || d.get(5) != Some(&1) {
        return None;
    }
    let phoff = usize::try_from(u64_at(d, 0x20)?).ok()?;
    let phentsize = usize::from(u16_at(d, 0x36)?);
    let phnum = usize::from(u16_at(d, 0x38)?);
    if phentsize < 56 {
        return None;
    }
    (0..phnum)
        .map(|i| {
            let base = phoff.checked_add(i.checked_mul(phentsize)?)?;
            Some(Phdr {
                kind: u32_at(d, base)?,
                offset: u64_at(d, base + 8)?,
                vaddr: u64_at(d, base + 16)?,
                filesz: u64_at(d, base + 32)?,
            })
        })
        .collect()
}

fn slice(d: &[u8], offset: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    d.get(start..end)
}

/// The `PT_INTERP` path (for example `/lib64/ld-linux-x86-64.so.2`), if any.
pub fn interpreter(d: &[u8]) -> Option<String> {
    let ph = phdrs(d)?.into_iter().find(|p| p.kind == PT_INTERP)?;
    let raw = slice(d, ph.offset, ph.filesz)?;
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8(raw[..end].to_vec()).ok()
}

/// The `DT_NEEDED` sonames, in file order. Empty for static or malformed files.
pub fn needed(d: &[u8]) -> Vec<String> {
    needed_inner(d).unwrap_or_default()
}

fn needed_inner(d: &[u8]) -> Option<Vec<String>> {
    let headers = phdrs(d)?;
    let dynamic = headers.iter().find(|p| p.kind == PT_DYNAMIC)?;
    let dyn_bytes = slice(d, dynamic.offset, dynamic.filesz)?;
    let mut strtab_vaddr = None;
    let mut needed_offsets = Vec::new();
    for entry in dyn_bytes.chunks_exact(16) {
        let tag = u64_at(entry, 0)?;
        let val = u64_at(entry, 8)?;
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed_offsets.push(val),
            DT_STRTAB => strtab_vaddr = Some(val),
            _ => {}
        }
    }
    // DT_STRTAB is a virtual address: map it to a file offset through PT_LOAD.
    let vaddr = strtab_vaddr?;
    let load = headers
        .iter()
        .find(|p| p.kind == PT_LOAD && vaddr >= p.vaddr && vaddr < p.vaddr + p.filesz)?;
    let strtab_off = load.offset + (vaddr - load.vaddr);
    needed_offsets
        .into_iter()
        .map(|off| {
            let start = usize::try_from(strtab_off.checked_add(off)?).ok()?;
            let rest = d.get(start..)?;
            let end = rest.iter().position(|&b| b == 0)?;
            String::from_utf8(rest[..end].to_vec()).ok()
        })
        .collect()
}

/// One section header, as far as stripping cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    /// `SHF_ALLOC`: loaded at run time (strip must keep it).
    pub alloc: bool,
}

const SHF_ALLOC: u64 = 0x2;

/// The section headers, in file order. Empty for malformed files or files without
/// section headers.
pub fn sections(d: &[u8]) -> Vec<Section> {
    sections_inner(d).unwrap_or_default()
}

fn sections_inner(d: &[u8]) -> Option<Vec<Section>> {
    phdrs(d)?; // ELF64 little endian, as for everything else here
    let shoff = usize::try_from(u64_at(d, 0x28)?).ok()?;
    let shentsize = usize::from(u16_at(d, 0x3a)?);
    let shnum = usize::from(u16_at(d, 0x3c)?);
    let shstrndx = usize::from(u16_at(d, 0x3e)?);
    if shoff == 0 || shnum == 0 || shentsize < 64 || shstrndx >= shnum {
        return None;
    }
    let header = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
    let strtab = header(shstrndx)?;
    let strtab = slice(d, u64_at(d, strtab + 0x18)?, u64_at(d, strtab + 0x20)?)?;
    (0..shnum)
        .map(|i| {
            let base = header(i)?;
            let name = usize::try_from(u32_at(d, base)?).ok()?;
            let rest = strtab.get(name..)?;
            let end = rest.iter().position(|&b| b == 0)?;
            Some(Section {
                name: String::from_utf8(rest[..end].to_vec()).ok()?,
                alloc: u64_at(d, base + 8)? & SHF_ALLOC != 0,
            })
        })
        .collect()
}

/// Does the file still carry what `strip` removes: a symbol table or debug
/// sections that are not loaded at run time? (Rust's `.debug_gdb_scripts` is
/// loaded, so it stays.) False for non-ELF and malformed input.
pub fn has_symbols_or_debug(d: &[u8]) -> bool {
    sections(d).iter().any(|s| {
        s.name == ".symtab"
            || (!s.alloc && (s.name.starts_with(".debug") || s.name.starts_with(".zdebug")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_real_dynamic_binary() {
        // /bin/ls exists on every Debian machine and is dynamically linked.
        let data = std::fs::read("/bin/ls").expect("read /bin/ls");
        assert!(is_elf(&data));
        assert_eq!(
            interpreter(&data).as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert!(needed(&data).iter().any(|n| n == "libc.so.6"));
    }

    #[test]
    fn garbage_never_panics() {
        for junk in [
            &b""[..],
            b"\x7fELF",
            b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\xff\xff",
            &[0xffu8; 128][..],
        ] {
            assert_eq!(interpreter(junk), None);
            assert!(needed(junk).is_empty());
        }
        let mut truncated = std::fs::read("/bin/ls").expect("read /bin/ls");
        truncated.truncate(100);
        assert!(needed(&truncated).is_empty());
        assert!(sections(&truncated).is_empty());
        assert!(!has_symbols_or_debug(&[0xffu8; 128]));
    }

    #[test]
    fn section_names_tell_stripped_from_unstripped() {
        // Debian's /bin/ls is stripped; this test binary (dev profile) is not.
        let ls = std::fs::read("/bin/ls").expect("read /bin/ls");
        let found = sections(&ls);
        assert!(
            found.iter().any(|s| s.name == ".text" && s.alloc),
            "{found:?}"
        );
        assert!(!has_symbols_or_debug(&ls), "{found:?}");
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read self");
        let found = sections(&me);
        assert!(
            found.iter().any(|s| s.name == ".symtab" && !s.alloc),
            "{found:?}"
        );
        assert!(
            found.iter().any(|s| s.name == ".debug_info" && !s.alloc),
            "{found:?}"
        );
        assert!(has_symbols_or_debug(&me));
    }
}
