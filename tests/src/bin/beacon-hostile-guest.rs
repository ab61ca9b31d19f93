//! `beacon-hostile-guest`: a hostile guest program for the device suite. Run as
//! root inside a guest whose virtio-mmio devices no driver holds (the suite
//! unbinds them first), it finds every virtio-mmio window in `/proc/iomem`,
//! maps it through `/dev/mem` and, for each window, in seeded rounds:
//!
//! - writes garbage to every register and to the config space with every
//!   access width (1, 2, 4 and 8 bytes), reads everything back, notifies queues
//!   that were never set up;
//! - brings the device up (sometimes out of order, with features it never
//!   offered) with queues of bad sizes and rings outside guest memory,
//!   unaligned or straddling the end of RAM;
//! - publishes malformed queues in pages of its own (physical addresses from
//!   `/proc/self/pagemap`): looping and self-looping chains, `next` out of
//!   range, zero and huge lengths, buffers outside memory, indirect tables that
//!   point at themselves or have odd lengths, chains longer than the queue,
//!   available-ring indices that jump by thousands and heads out of range;
//!   and notifies them.
//!
//! Every buffer the device may write to is in the program's own pages or
//! outside RAM, so the guest kernel stays sound whatever the device does. At the
//! end each device is reset and must still answer (magic "virt", status 0):
//! a window that stops answering means the VMM's device or bus died, and the
//! program exits 1. It prints `HOSTILE-DONE windows=N ...` when all answered.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Write garbage to every virtio-mmio device (guest side, as root)")]
struct Cli {
    /// Fail unless at least this many virtio-mmio windows are found.
    #[arg(long, default_value_t = 1)]
    min_windows: usize,
    /// Rounds per window.
    #[arg(long, default_value_t = 16)]
    rounds: u32,
    /// Seed of the garbage (printed, so a failure can be replayed).
    #[arg(long, default_value_t = 0x5eed_beac)]
    seed: u64,
}

/// virtio-mmio registers (virtio 1.x, section 4.2.2).
mod reg {
    pub const MAGIC: usize = 0x000;
    pub const DEVICE_ID: usize = 0x008;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const INTERRUPT_STATUS: usize = 0x060;
    pub const INTERRUPT_ACK: usize = 0x064;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    pub const CONFIG: usize = 0x100;
    /// Registers and config space the program touches.
    pub const SPAN: usize = 0x200;
}

const MAGIC_VIRT: u32 = 0x7472_6976;
const ACK: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const DEVICE_NEEDS_RESET: u32 = 0x40;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
const PAGE: usize = 4096;
/// Queues per device the program sets up (net has 2, vsock 3, fs 2 or more).
const MAX_QUEUES: u32 = 4;

/// xorshift64*: deterministic garbage from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// One device's register window, mapped from `/dev/mem`.
struct Window {
    base: u64,
    ptr: *mut u8,
    len: usize,
    accesses: u64,
}

impl Window {
    fn map(mem: &File, base: u64, len: usize) -> Result<Window> {
        // SAFETY: mapping a physical range of /dev/mem; the result is checked
        // and only touched through volatile accesses inside `len`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mem.as_raw_fd(),
                base as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "mmap of /dev/mem at {base:#x}: {} (a driver still holds the window? unbind it)",
                std::io::Error::last_os_error()
            );
        }
        Ok(Window {
            base,
            ptr: ptr.cast(),
            len,
            accesses: 0,
        })
    }

    fn r32(&mut self, off: usize) -> u32 {
        self.accesses += 1;
        assert!(off + 4 <= self.len);
        // SAFETY: inside the mapping, 4-byte aligned (offsets are multiples of 4).
        unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<u32>()) }
    }

    fn w32(&mut self, off: usize, v: u32) {
        self.accesses += 1;
        assert!(off + 4 <= self.len);
        // SAFETY: as in `r32`.
        unsafe { std::ptr::write_volatile(self.ptr.add(off).cast::<u32>(), v) }
    }

    /// An access of `width` bytes at `off` (aligned down to the width).
    fn garbage(&mut self, off: usize, width: usize, v: u64, write: bool) {
        let off = off & !(width - 1);
        if off + width > self.len {
            return;
        }
        self.accesses += 1;
        // SAFETY: inside the mapping and aligned to the access width.
        unsafe {
            let p = self.ptr.add(off);
            match (width, write) {
                (1, true) => std::ptr::write_volatile(p, v as u8),
                (2, true) => std::ptr::write_volatile(p.cast::<u16>(), v as u16),
                (4, true) => std::ptr::write_volatile(p.cast::<u32>(), v as u32),
                (_, true) => std::ptr::write_volatile(p.cast::<u64>(), v),
                (1, false) => _ = std::ptr::read_volatile(p),
                (2, false) => _ = std::ptr::read_volatile(p.cast::<u16>()),
                (4, false) => _ = std::ptr::read_volatile(p.cast::<u32>()),
                (_, false) => _ = std::ptr::read_volatile(p.cast::<u64>()),
            }
        }
    }

    /// A 64-bit register pair: low word at `low`, high word after it.
    fn set64(&mut self, low: usize, v: u64) {
        self.w32(low, v as u32);
        self.w32(low + 4, (v >> 32) as u32);
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Locked pages of the program's own, with their guest-physical addresses.
struct Pages {
    ptr: *mut u8,
    count: usize,
    phys: Vec<u64>,
}

impl Pages {
    fn new(count: usize) -> Result<Pages> {
        let len = count * PAGE;
        // SAFETY: a fresh anonymous mapping; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_LOCKED,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("locked pages: {}", std::io::Error::last_os_error());
        }
        let ptr: *mut u8 = ptr.cast();
        let pagemap = File::open("/proc/self/pagemap").context("open /proc/self/pagemap")?;
        let mut phys = Vec::with_capacity(count);
        for i in 0..count {
            // SAFETY: inside the mapping; touching the page makes it present.
            unsafe { std::ptr::write_volatile(ptr.add(i * PAGE), 0) };
            let vpn = (ptr as usize + i * PAGE) / PAGE;
            let mut e = [0u8; 8];
            pagemap
                .read_exact_at(&mut e, (vpn * 8) as u64)
                .context("read /proc/self/pagemap")?;
            let e = u64::from_le_bytes(e);
            let pfn = e & ((1 << 55) - 1);
            if e >> 63 == 0 || pfn == 0 {
                bail!("page {i} has no physical address in pagemap (not root?)");
            }
            phys.push(pfn * PAGE as u64);
        }
        Ok(Pages { ptr, count, phys })
    }

    fn bytes(&mut self, page: usize) -> &mut [u8] {
        assert!(page < self.count);
        // SAFETY: one whole page inside the mapping, borrowed mutably from self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(page * PAGE), PAGE) }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.count * PAGE) };
    }
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    if off + 2 <= b.len() {
        b[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
}

/// Write descriptor `i` (16 bytes) into a descriptor table page.
fn desc(b: &mut [u8], i: usize, addr: u64, len: u32, flags: u16, next: u16) {
    let o = i * 16;
    if o + 16 > b.len() {
        return;
    }
    b[o..o + 8].copy_from_slice(&addr.to_le_bytes());
    b[o + 8..o + 12].copy_from_slice(&len.to_le_bytes());
    b[o + 12..o + 14].copy_from_slice(&flags.to_le_bytes());
    b[o + 14..o + 16].copy_from_slice(&next.to_le_bytes());
}

/// virtio-mmio windows from /proc/iomem: (base, length), deduplicated.
fn windows() -> Result<(Vec<(u64, u64)>, u64)> {
    let mut text = String::new();
    File::open("/proc/iomem")
        .context("open /proc/iomem")?
        .read_to_string(&mut text)?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut ram_end = 0u64;
    for line in text.lines() {
        let Some((range, name)) = line.trim().split_once(" : ") else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        if a == 0 && b == 0 {
            bail!("/proc/iomem shows zero addresses: run as root");
        }
        if name == "System RAM" {
            ram_end = ram_end.max(b + 1);
        }
        let virtio = name.contains("LNRO0005") || name.contains("virtio");
        if virtio && !out.iter().any(|(s, _)| *s == a) {
            out.push((a, b + 1 - a));
        }
    }
    out.sort();
    Ok((out, ram_end))
}

/// Addresses outside guest RAM: past its end, the LAPIC, far away, wrapping,
/// unaligned. The only ones a writable buffer or a device ring may get.
fn far_addresses(ram_end: u64) -> [u64; 5] {
    [
        ram_end + 0x1000,
        0xfee0_0000,
        1 << 46,
        u64::MAX - 7,
        ram_end + 0x1001,
    ]
}

/// [`far_addresses`] and one straddling the end of RAM: for buffers the
/// device only reads and for the descriptor table and driver ring.
fn bad_addresses(ram_end: u64) -> [u64; 6] {
    let f = far_addresses(ram_end);
    [f[0], f[1], f[2], f[3], f[4], ram_end - 8]
}

struct Stats {
    rounds: u64,
    notifies: u64,
    chains: u64,
}

/// Publish one malformed queue in `pages[q*3 ..]` (descriptors, driver ring,
/// device ring) and return the number of new available entries.
fn poison_queue(
    rng: &mut Rng,
    pages: &mut Pages,
    first: usize,
    size: u16,
    bad: &[u64],
    far: &[u64],
) -> u16 {
    let phys = pages.phys.clone();
    let own = |k: usize| phys[first + k];
    let n = size.clamp(1, 256) as usize;
    let kind = rng.below(9);
    {
        let d = pages.bytes(first);
        d.fill(0);
        for i in 0..n {
            // A default: a small readable buffer in the device-ring page's tail.
            desc(d, i, own(2) + 2048, 64, 0, 0);
        }
        match kind {
            // A loop through the whole table.
            0 => (0..n).for_each(|i| {
                desc(
                    d,
                    i,
                    own(2) + 2048,
                    16,
                    VIRTQ_DESC_F_NEXT,
                    ((i + 1) % n) as u16,
                )
            }),
            // A descriptor pointing at itself.
            1 => desc(d, 0, own(2) + 2048, 16, VIRTQ_DESC_F_NEXT, 0),
            // `next` out of range.
            2 => desc(d, 0, own(2) + 2048, 16, VIRTQ_DESC_F_NEXT, 0xffff),
            // Zero and huge lengths.
            3 => {
                desc(d, 0, own(2) + 2048, 0, VIRTQ_DESC_F_NEXT, 1);
                desc(d, 1, own(2) + 2048, u32::MAX, VIRTQ_DESC_F_NEXT, 2);
                desc(d, 2, far[0], u32::MAX, VIRTQ_DESC_F_WRITE, 0);
            }
            // Buffers outside guest memory (readable and writable).
            4 => (0..n.min(8)).for_each(|i| {
                let (addr, flags) = if i % 2 == 0 {
                    (bad[i % bad.len()], 0)
                } else {
                    (far[i % far.len()], VIRTQ_DESC_F_WRITE)
                };
                desc(d, i, addr, 4096, flags | VIRTQ_DESC_F_NEXT, (i + 1) as u16);
            }),
            // An indirect table that is the descriptor table itself.
            5 => desc(d, 0, own(0), (n * 16) as u32, VIRTQ_DESC_F_INDIRECT, 0),
            // Indirect with an odd length, with NEXT, and outside memory.
            6 => {
                desc(d, 0, own(0), 17, VIRTQ_DESC_F_INDIRECT, 0);
                desc(
                    d,
                    1,
                    own(0),
                    32,
                    VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT,
                    2,
                );
                desc(d, 2, bad[0], 4096, VIRTQ_DESC_F_INDIRECT, 0);
            }
            // A writable buffer before readable ones, then random flags.
            7 => {
                desc(
                    d,
                    0,
                    own(2) + 2048,
                    64,
                    VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                    1,
                );
                desc(d, 1, own(2) + 2048, 64, 0, 0);
                for i in 2..n.min(16) {
                    let flags = (rng.next() as u16) & 7 & !VIRTQ_DESC_F_INDIRECT;
                    let len = rng.below(8192) as u32;
                    let next = rng.below(n as u64 + 2) as u16;
                    desc(d, i, own(2) + 2048, len.min(2048), flags, next);
                }
            }
            // Pure garbage descriptors. A writable one points outside RAM and
            // an indirect one at this table (whose writable entries do too):
            // a device writing where the guest kernel lives would be the
            // guest's own doing, but would end the test early.
            _ => (0..n).for_each(|i| {
                let flags = rng.next() as u16;
                let addr = if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                    own(0)
                } else if flags & VIRTQ_DESC_F_WRITE != 0 {
                    rng.pick(far)
                } else {
                    rng.next()
                };
                desc(d, i, addr, rng.next() as u32, flags, rng.next() as u16)
            }),
        }
    }
    // The driver ring: flags, idx, ring[size], used_event.
    let entries = rng.pick(&[1u16, 2, 7, n as u16, n as u16 + 3, 0x8000, 0xffff]);
    let a = pages.bytes(first + 1);
    a.fill(0);
    put16(a, 0, rng.pick(&[0, 1, 0xffff]));
    put16(a, 2, entries);
    for i in 0..n {
        let head = if rng.below(4) == 0 {
            rng.next() as u16
        } else {
            rng.below(n as u64) as u16
        };
        put16(a, 4 + 2 * i, head);
    }
    put16(a, 4 + 2 * n, rng.next() as u16);
    pages.bytes(first + 2)[..2048].fill(0);
    entries
}

/// One window's rounds of garbage and malformed queues.
fn attack(
    w: &mut Window,
    rng: &mut Rng,
    pages: &mut Pages,
    ram_end: u64,
    rounds: u32,
    st: &mut Stats,
) -> Result<()> {
    let bad = bad_addresses(ram_end);
    let far = far_addresses(ram_end);
    for round in 0..rounds {
        st.rounds += 1;
        // 1. Garbage everywhere, every width, reads too.
        for _ in 0..24 {
            let off = rng.below(reg::SPAN as u64) as usize;
            let width = rng.pick(&[1usize, 2, 4, 8]);
            w.garbage(off, width, rng.next(), rng.below(3) != 0);
        }
        // Notifications for queues never set up (after a reset).
        w.w32(reg::STATUS, 0);
        for q in [0, 1, 7, 0xffff, rng.next() as u32] {
            w.w32(reg::QUEUE_NOTIFY, q);
            st.notifies += 1;
        }
        // Writes to read-only registers and the config space.
        for off in [
            reg::MAGIC,
            reg::DEVICE_ID,
            reg::QUEUE_NUM_MAX,
            reg::INTERRUPT_STATUS,
            0xfc,
        ] {
            w.w32(off, rng.next() as u32);
        }
        for _ in 0..16 {
            let off = reg::CONFIG + 4 * rng.below(64) as usize;
            w.w32(off, rng.next() as u32);
        }

        // 2. A bring-up, sometimes out of order, with bad queues.
        w.w32(reg::STATUS, 0);
        w.w32(reg::STATUS, ACK);
        w.w32(reg::STATUS, ACK | DRIVER);
        w.w32(reg::DEVICE_FEATURES_SEL, 1);
        let high = w.r32(reg::DEVICE_FEATURES);
        w.w32(reg::DEVICE_FEATURES_SEL, 0);
        let low = w.r32(reg::DEVICE_FEATURES);
        let extra = if round % 3 == 0 { rng.next() } else { 0 };
        let features = ((u64::from(high) << 32) | u64::from(low)) | extra;
        for sel in [0u32, 1, rng.below(8) as u32] {
            w.w32(reg::DRIVER_FEATURES_SEL, sel);
            w.w32(reg::DRIVER_FEATURES, (features >> (32 * (sel & 1))) as u32);
        }
        if round % 5 != 4 {
            w.w32(reg::STATUS, ACK | DRIVER | FEATURES_OK);
        }
        let mut live = Vec::new();
        for q in 0..MAX_QUEUES {
            w.w32(reg::QUEUE_SEL, q);
            let max = w.r32(reg::QUEUE_NUM_MAX);
            if max == 0 {
                continue;
            }
            let max16 = max.min(256) as u16;
            let size = match rng.below(6) {
                0 => max + 1,
                1 => 3,
                2 => 0,
                _ => u32::from(max16),
            };
            w.w32(reg::QUEUE_NUM, size);
            let first = q as usize * 3;
            let (dt, dr, ur) = (
                pages.phys[first],
                pages.phys[first + 1],
                pages.phys[first + 2],
            );
            let (dt, dr, ur) = match rng.below(8) {
                0 => (rng.pick(&bad), dr, ur),
                1 => (dt, rng.pick(&bad), ur),
                2 => (dt, dr, rng.pick(&far)),
                3 => (dt + 1, dr + 1, ur + 2),
                _ => (dt, dr, ur),
            };
            w.set64(reg::QUEUE_DESC_LOW, dt);
            w.set64(reg::QUEUE_DRIVER_LOW, dr);
            w.set64(reg::QUEUE_DEVICE_LOW, ur);
            w.w32(reg::QUEUE_READY, 1);
            live.push((q, first, max16));
        }
        w.w32(reg::STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        // Reconfiguring a live queue must be ignored.
        w.w32(reg::QUEUE_SEL, 0);
        w.w32(reg::QUEUE_NUM, 1);
        w.set64(reg::QUEUE_DESC_LOW, bad[0]);

        // 3. Malformed chains, notified.
        for _ in 0..3 {
            for &(q, first, size) in &live {
                poison_queue(rng, pages, first, size, &bad, &far);
                st.chains += 1;
                w.w32(reg::QUEUE_NOTIFY, q);
                st.notifies += 1;
            }
            let isr = w.r32(reg::INTERRUPT_STATUS);
            w.w32(reg::INTERRUPT_ACK, isr | rng.next() as u32);
        }
        // Config space while live, and a status the driver may not set.
        for off in (reg::CONFIG..reg::CONFIG + 32).step_by(4) {
            w.w32(off, rng.next() as u32);
        }
        w.w32(reg::STATUS, 0xff);
        // Let the device's thread see the rings before they change.
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// After the attack: reset, and the device must still answer: magic, then a
/// status of 0, or DEVICE_NEEDS_RESET alone from a device whose backend the
/// attack killed (a virtiofsd that gave up on the malformed queues: it cannot
/// come back, and the device says so). Returns (device id, whether it is dead).
fn still_answers(w: &mut Window) -> Result<(u32, bool)> {
    w.w32(reg::STATUS, 0);
    let magic = w.r32(reg::MAGIC);
    if magic != MAGIC_VIRT {
        bail!(
            "window {:#x}: magic reads {magic:#x} after the attack: the device stopped answering",
            w.base
        );
    }
    // A reset may complete asynchronously on a vhost device: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = w.r32(reg::STATUS);
        if status == 0 || status == DEVICE_NEEDS_RESET {
            return Ok((w.r32(reg::DEVICE_ID), status != 0));
        }
        if Instant::now() > deadline {
            bail!(
                "window {:#x}: status {status:#x} 10 s after a reset",
                w.base
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let started = Instant::now();
    let (found, ram_end) = windows()?;
    println!(
        "HOSTILE: seed {:#x}, RAM ends at {ram_end:#x}, {} virtio-mmio windows",
        cli.seed,
        found.len()
    );
    if found.len() < cli.min_windows {
        bail!(
            "{} virtio-mmio windows in /proc/iomem, want at least {}",
            found.len(),
            cli.min_windows
        );
    }
    if ram_end < 0x10_0000 {
        bail!("no System RAM in /proc/iomem");
    }
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open("/dev/mem")
        .context("open /dev/mem (CONFIG_DEVMEM, root)")?;
    let mut pages = Pages::new(MAX_QUEUES as usize * 3)?;
    let mut rng = Rng(cli.seed | 1);
    let mut st = Stats {
        rounds: 0,
        notifies: 0,
        chains: 0,
    };
    let mut accesses = 0;
    let mut ids = Vec::new();
    for &(base, len) in &found {
        let mut w = Window::map(&mem, base, (len as usize).clamp(PAGE, 64 * PAGE))?;
        let id = w.r32(reg::DEVICE_ID);
        let t = Instant::now();
        attack(&mut w, &mut rng, &mut pages, ram_end, cli.rounds, &mut st)?;
        let (after, dead) = still_answers(&mut w)?;
        if after != id {
            bail!("window {base:#x}: device id {id} became {after}");
        }
        println!(
            "HOSTILE-WINDOW {base:#x} device {id}: {} accesses in {:.1} s, answers after reset{}",
            w.accesses,
            t.elapsed().as_secs_f64(),
            if dead {
                " (needs reset: its backend is gone)"
            } else {
                ""
            }
        );
        accesses += w.accesses;
        ids.push(id);
    }
    println!(
        "HOSTILE-DONE windows={} devices={ids:?} rounds={} chains={} notifies={} accesses={accesses} in {:.1} s",
        found.len(),
        st.rounds,
        st.chains,
        st.notifies,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
