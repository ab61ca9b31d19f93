//! Building blocks for the fuzz targets in `src/bin/` (one file per target):
//! guest memory, split virtqueues whose descriptors, rings and indirect tables
//! are laid out from fuzz input, devices behind the virtio-mmio transport, and
//! a scratch disk image.
//!
//! How the targets run: libFuzzer through `libfuzzer-sys`, on the **stable**
//! toolchain, built by `../run` with the SanitizerCoverage flags rustc accepts
//! on stable (`-Cpasses=sancov-module` and `-Cllvm-args=-sanitizer-coverage-*`),
//! no sanitizer: the code under test has no `unsafe` that fuzz input reaches
//! except the disk `pread`/`pwrite` on vm-memory slices, and the property we
//! fuzz for is "no panic, no hang, no unbounded work" (panics abort; libFuzzer's
//! `-timeout` catches hangs and spins). `cargo fuzz` itself would pass the same
//! flags, but needs `cargo install cargo-fuzz` on every machine and defaults to
//! AddressSanitizer, which needs nightly.
//!
//! Targets: `virtqueue_chains` (the shared queue loop), `blk_request` (the
//! block parser and executor), `mmio_registers` (the transport), `net_header`
//! (virtio-net's TX header check and per-chain transmit, into a stand-in for
//! the TAP through `virtio::net::tx`, hidden from the docs and there only for
//! it), `vsock_packet` (the vsock packet header, then whole packets through
//! the hybrid device), `guest_protocol` (the event and stream lines between
//! the shim and vminitd, and the vsock auth line) and `task_replies` (the
//! ttrpc frames and Task API replies the shim decodes). Adding a target for another parser is one file in
//! `src/bin/` with `libfuzzer_sys::fuzz_target!`; `../run` finds it.
//! This crate never runs outside fuzzing and its helpers may panic on their own
//! set-up failures (not on fuzz input).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::OnceLock;

pub use beacon_devices::virtio::testing::{
    DriverQueue, Harness, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
};
pub use libfuzzer_sys::arbitrary::{self, Unstructured};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

pub use beacon_devices::virtio::GuestMem;

/// Guest memory the targets use (MiB); buffers may point anywhere, also outside.
pub const MEM_MIB: usize = 2;
/// Bytes of guest memory.
pub const MEM_BYTES: u64 = (MEM_MIB as u64) << 20;
/// Where the queue's rings live.
pub const RING_BASE: u64 = 0x1_0000;
/// Where indirect tables laid out from input go.
pub const INDIRECT_BASE: u64 = 0x4_0000;
/// Where data buffers cluster (the rest of memory up to the end).
pub const BUFFER_BASE: u64 = 0x8_0000;

/// A fresh guest memory.
pub fn guest_memory() -> GuestMem {
    beacon_devices::virtio::testing::guest_memory(MEM_MIB)
}

/// A guest address: mostly inside the buffer area, sometimes near or past
/// the end of memory, sometimes anything.
pub fn address(u: &mut Unstructured<'_>) -> arbitrary::Result<u64> {
    Ok(match u.int_in_range(0u8..=9)? {
        0..=6 => BUFFER_BASE + u64::from(u.int_in_range(0u32..=0x1000)?) * 16,
        7 => MEM_BYTES.wrapping_sub(u64::from(u.int_in_range(0u16..=1024)?)),
        8 => INDIRECT_BASE + u64::from(u.int_in_range(0u16..=0x3fff)?) * 16,
        _ => u.arbitrary()?,
    })
}

/// A buffer length: small, whole sectors, around limits, or anything.
pub fn length(u: &mut Unstructured<'_>) -> arbitrary::Result<u32> {
    Ok(match u.int_in_range(0u8..=7)? {
        0 => 0,
        1 => 1,
        2 => 16,
        3 | 4 => u32::from(u.int_in_range(1u16..=16)?) * 512,
        5 => u32::from(u.int_in_range(0u16..=4096)?),
        6 => (1 << 20) + u32::from(u.int_in_range(0u16..=1024)?) - 512,
        _ => u.arbitrary()?,
    })
}

/// Write one descriptor of a table at `table`.
pub fn write_desc(
    mem: &GuestMem,
    table: u64,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let at = table + 16 * u64::from(index);
    let m = mem.memory();
    // Tables are inside memory by construction; a failed write only means an
    // index the caller let run past the end, which the walker then sees as zeros.
    let _ = m.write_obj(addr, GuestAddress(at));
    let _ = m.write_obj(len, GuestAddress(at + 8));
    let _ = m.write_obj(flags, GuestAddress(at + 12));
    let _ = m.write_obj(next, GuestAddress(at + 14));
}

/// Fill the descriptor table and the available ring of `q` from input:
/// well-formed chains, broken links, loops, indirect tables (also nested and
/// looping), heads past the table, and an available index that may lie.
pub fn lay_out_queue(
    u: &mut Unstructured<'_>,
    mem: &GuestMem,
    q: &mut DriverQueue,
) -> arbitrary::Result<()> {
    let size = q.size;
    let descs = u.int_in_range(0..=size)?;
    for i in 0..descs {
        let mut flags = match u.int_in_range(0u8..=9)? {
            0..=3 => DESC_F_NEXT,
            4..=6 => DESC_F_NEXT | DESC_F_WRITE,
            7 => DESC_F_WRITE,
            8 => 0,
            _ => u.arbitrary()?,
        };
        let next = if u.ratio(7u8, 8)? {
            (i + 1) % size
        } else {
            u.arbitrary()?
        };
        let (mut addr, mut len) = (address(u)?, length(u)?);
        if u.ratio(1u8, 16)? {
            // An indirect table laid out from input.
            let n = u.int_in_range(0u16..=64)?;
            let table = INDIRECT_BASE + u64::from(u.int_in_range(0u16..=32)?) * 0x200;
            for j in 0..n {
                let f = if u.ratio(1u8, 32)? {
                    DESC_F_INDIRECT
                } else {
                    0
                } | if u.ratio(3u8, 4)? { DESC_F_NEXT } else { 0 }
                    | if u.ratio(1u8, 2)? { DESC_F_WRITE } else { 0 };
                let nx = if u.ratio(7u8, 8)? {
                    j + 1
                } else {
                    u.arbitrary()?
                };
                write_desc(mem, table, j, address(u)?, length(u)?, f, nx);
            }
            addr = table;
            len = if u.ratio(7u8, 8)? {
                u32::from(n) * 16
            } else {
                u.arbitrary()?
            };
            flags = DESC_F_INDIRECT | if u.ratio(1u8, 8)? { DESC_F_NEXT } else { 0 };
        }
        write_desc(mem, q.desc, i, addr, len, flags, next);
    }
    let published = u.int_in_range(0..=size)?;
    for _ in 0..published {
        let head = if u.ratio(15u8, 16)? {
            u.int_in_range(0..=size.saturating_sub(1))?
        } else {
            u.arbitrary()?
        };
        q.publish(mem, head);
    }
    if u.ratio(1u8, 16)? {
        let idx = u.arbitrary()?;
        q.set_avail_idx(mem, idx);
    }
    Ok(())
}

/// Where the descriptors of `q`'s table point (as laid out, e.g. by
/// [`lay_out_queue`]): the places a device reads a request or packet header
/// from, for targets that put headers there.
pub fn descriptor_addresses(mem: &GuestMem, q: &DriverQueue) -> Vec<u64> {
    let m = mem.memory();
    (0..u64::from(q.size))
        .filter_map(|i| m.read_obj(GuestAddress(q.desc + 16 * i)).ok())
        .collect()
}

/// Scatter fuzz bytes over guest memory (headers, buffer contents).
pub fn sprinkle(u: &mut Unstructured<'_>, mem: &GuestMem, at_most: usize) -> arbitrary::Result<()> {
    let n = u.int_in_range(0..=at_most)?;
    for _ in 0..n {
        let at = address(u)?;
        let len = u.int_in_range(1usize..=64)?;
        let bytes = u.bytes(len)?;
        let _ = mem.memory().write_slice(bytes, GuestAddress(at));
    }
    Ok(())
}

/// Sectors of the scratch disk.
pub const DISK_SECTORS: u64 = 64;

/// A scratch disk image of [`DISK_SECTORS`] sectors in an anonymous memory file
/// (nothing left behind), shared by every run of a process: the file and a path
/// the block device can open.
pub fn scratch_disk() -> &'static (File, PathBuf) {
    static DISK: OnceLock<(File, PathBuf)> = OnceLock::new();
    DISK.get_or_init(|| {
        let name = c"beacon-fuzz-disk";
        // SAFETY: memfd_create with a valid NUL-terminated name; the returned fd
        // is checked and then owned by the File.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(DISK_SECTORS * 512)
            .expect("size the scratch disk");
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        (file, path)
    })
}
