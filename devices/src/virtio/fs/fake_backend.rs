//! A vhost-user backend in miniature for the virtio-fs tests: it answers the
//! frontend over one end of a socketpair (with the `vhost` crate's own backend
//! request handler, the one virtiofsd uses), records every request, maps the
//! guest memory it is handed (the whole table, or with `CONFIGURE_MEM_SLOTS`
//! regions added and removed one at a time), and can serve one request from a
//! ring the way virtiofsd would: kick fd in, used ring and call fd out. It can
//! also go mute after some requests, to play a hung backend.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::*;
use vhost::vhost_user::{Backend, BackendReqHandler, GpuBackend, VhostUserBackendReqHandlerMut};
use vhost::vhost_user::{Error as VuError, Result as VuResult};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// What the fake offers.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    pub queue_num: u64,
    pub max_mem_slots: u64,
    /// Stop answering after this many requests (a hung backend).
    pub mute_after: Option<usize>,
}

/// virtiofsd 1.14's offer.
pub const VIRTIOFSD_FEATURES: u64 = (1 << 32) | (1 << 28) | (1 << 29) | (1 << 30) | (1 << 26);

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            features: VIRTIOFSD_FEATURES,
            protocol: VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::BACKEND_REQ
                | VhostUserProtocolFeatures::BACKEND_SEND_FD
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::DEVICE_STATE
                | VhostUserProtocolFeatures::RESET_DEVICE,
            queue_num: 2,
            max_mem_slots: 32,
            mute_after: None,
        }
    }
}

/// One vring as the frontend described it.
#[derive(Debug, Default)]
pub struct FakeVring {
    pub num: u32,
    pub base: u32,
    /// Frontend virtual addresses.
    pub desc: u64,
    pub used: u64,
    pub avail: u64,
    pub kick: Option<File>,
    pub call: Option<File>,
    pub enabled: bool,
}

/// Everything the frontend told the fake.
#[derive(Default)]
pub struct Recorded {
    pub log: Vec<String>,
    pub acked_features: u64,
    pub acked_protocol: u64,
    pub regions: Vec<(VhostUserMemoryRegion, File)>,
    pub vrings: BTreeMap<u32, FakeVring>,
}

struct Handler {
    config: FakeConfig,
    rec: Arc<Mutex<Recorded>>,
}

fn not_here<T>() -> VuResult<T> {
    Err(VuError::InvalidOperation("not in the fake backend"))
}

impl Handler {
    fn note(&self, entry: String) {
        beacon_common::lock(&self.rec).log.push(entry);
    }
}

impl VhostUserBackendReqHandlerMut for Handler {
    fn set_owner(&mut self) -> VuResult<()> {
        self.note("SET_OWNER".into());
        Ok(())
    }
    fn reset_owner(&mut self) -> VuResult<()> {
        self.note("RESET_OWNER".into());
        Ok(())
    }
    fn reset_device(&mut self) -> VuResult<()> {
        self.note("RESET_DEVICE".into());
        Ok(())
    }
    fn get_features(&mut self) -> VuResult<u64> {
        self.note("GET_FEATURES".into());
        Ok(self.config.features)
    }
    fn set_features(&mut self, features: u64) -> VuResult<()> {
        self.note(format!("SET_FEATURES {features:#x}"));
        if features & !self.config.features != 0 {
            return Err(VuError::InvalidParam);
        }
        beacon_common::lock(&self.rec).acked_features = features;
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.note(format!("SET_MEM_TABLE {}", ctx.len()));
        beacon_common::lock(&self.rec).regions = ctx.iter().copied().zip(files).collect();
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        self.note(format!("SET_VRING_NUM {index} {num}"));
        beacon_common::lock(&self.rec)
            .vrings
            .entry(index)
            .or_default()
            .num = num;
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        self.note(format!("SET_VRING_ADDR {index}"));
        let mut rec = beacon_common::lock(&self.rec);
        let v = rec.vrings.entry(index).or_default();
        v.desc = descriptor;
        v.used = used;
        v.avail = available;
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.note(format!("SET_VRING_BASE {index} {base}"));
        beacon_common::lock(&self.rec)
            .vrings
            .entry(index)
            .or_default()
            .base = base;
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.note(format!("GET_VRING_BASE {index}"));
        let mut rec = beacon_common::lock(&self.rec);
        let v = rec.vrings.entry(index).or_default();
        v.kick = None;
        v.call = None;
        v.enabled = false;
        Ok(VhostUserVringState::new(index, v.base))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.note(format!("SET_VRING_KICK {index}"));
        beacon_common::lock(&self.rec)
            .vrings
            .entry(u32::from(index))
            .or_default()
            .kick = fd;
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.note(format!("SET_VRING_CALL {index}"));
        beacon_common::lock(&self.rec)
            .vrings
            .entry(u32::from(index))
            .or_default()
            .call = fd;
        Ok(())
    }
    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VuResult<()> {
        not_here()
    }
    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        self.note("GET_PROTOCOL_FEATURES".into());
        Ok(self.config.protocol)
    }
    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.note(format!("SET_PROTOCOL_FEATURES {features:#x}"));
        beacon_common::lock(&self.rec).acked_protocol = features;
        Ok(())
    }
    fn get_queue_num(&mut self) -> VuResult<u64> {
        self.note("GET_QUEUE_NUM".into());
        Ok(self.config.queue_num)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.note(format!("SET_VRING_ENABLE {index} {enable}"));
        beacon_common::lock(&self.rec)
            .vrings
            .entry(index)
            .or_default()
            .enabled = enable;
        Ok(())
    }
    fn get_config(
        &mut self,
        _offset: u32,
        _size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        not_here()
    }
    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        not_here()
    }
    fn set_backend_req_fd(&mut self, _backend: Backend) {}
    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        not_here()
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        not_here()
    }
    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        not_here()
    }
    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        not_here()
    }
    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        self.note("GET_MAX_MEM_SLOTS".into());
        Ok(self.config.max_mem_slots)
    }
    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        let (gpa, size) = (region.guest_phys_addr, region.memory_size);
        self.note(format!("ADD_MEM_REG {gpa:#x} {size:#x}"));
        let mut rec = beacon_common::lock(&self.rec);
        if rec.regions.len() as u64 >= self.config.max_mem_slots {
            return Err(VuError::InvalidParam);
        }
        rec.regions.push((**region, fd));
        Ok(None)
    }
    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (gpa, size) = (region.guest_phys_addr, region.memory_size);
        self.note(format!("REM_MEM_REG {gpa:#x} {size:#x}"));
        let mut rec = beacon_common::lock(&self.rec);
        let before = rec.regions.len();
        rec.regions
            .retain(|(r, _)| (r.guest_phys_addr, r.memory_size) != (gpa, size));
        if rec.regions.len() == before {
            // Like virtiofsd: removing what is not there is an error.
            return Err(VuError::InvalidParam);
        }
        Ok(())
    }
    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        not_here()
    }
    fn check_device_state(&mut self) -> VuResult<()> {
        not_here()
    }
    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        not_here()
    }
    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        not_here()
    }
}

/// A running fake backend.
pub struct FakeBackend {
    pub rec: Arc<Mutex<Recorded>>,
    thread: Option<JoinHandle<()>>,
    /// Dropping it lets a mute fake end (and close its socket).
    release: Option<mpsc::Sender<()>>,
    /// A duplicate of the fake's socket, to hang up on the frontend.
    socket: UnixStream,
}

impl FakeBackend {
    /// A fake on one end of a socketpair; the other end is for the frontend.
    pub fn start(config: FakeConfig) -> (Self, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let rec = Arc::new(Mutex::new(Recorded::default()));
        let mute_after = config.mute_after;
        let handler = Arc::new(Mutex::new(Handler {
            config,
            rec: rec.clone(),
        }));
        let (release, released) = mpsc::channel::<()>();
        let socket = ours.try_clone().expect("dup socket");
        let thread = std::thread::spawn(move || {
            let mut req = BackendReqHandler::from_stream(ours, handler);
            let mut served = 0usize;
            loop {
                if mute_after.is_some_and(|n| served >= n) {
                    // Hold the socket open without reading, until released.
                    let _ = released.recv();
                    return;
                }
                if req.handle_request().is_err() {
                    return;
                }
                served += 1;
            }
        });
        (
            Self {
                rec,
                thread: Some(thread),
                release: Some(release),
                socket,
            },
            theirs,
        )
    }

    pub fn log(&self) -> Vec<String> {
        beacon_common::lock(&self.rec).log.clone()
    }

    /// Wait until the log holds `entry` (requests arrive from the link's thread).
    pub fn wait_for(&self, entry: &str) {
        self.wait_for_count(entry, 1);
    }

    /// How often the log holds `entry`.
    pub fn count(&self, entry: &str) -> usize {
        beacon_common::lock(&self.rec)
            .log
            .iter()
            .filter(|l| *l == entry)
            .count()
    }

    /// Wait until the log holds `entry` `n` times.
    pub fn wait_for_count(&self, entry: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.count(entry) < n {
            assert!(
                Instant::now() < deadline,
                "the backend never saw {entry:?}; it saw {:?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Wait for the frontend to hang up (the handler thread ends).
    pub fn wait_disconnected(&mut self) {
        if let Some(t) = self.thread.take() {
            t.join().expect("fake backend thread");
        }
    }

    /// The guest memory as the backend maps it (from the memfds it was sent),
    /// and a translation from frontend addresses to guest addresses.
    fn map_memory(&self) -> (GuestMemoryMmap, Vec<(u64, u64, u64)>) {
        let rec = beacon_common::lock(&self.rec);
        let mut regions = Vec::new();
        let mut va_map = Vec::new();
        for (r, file) in &rec.regions {
            let file = file.try_clone().expect("dup memfd");
            let size = usize::try_from(r.memory_size).expect("size");
            regions.push(
                GuestRegionMmap::<()>::from_range(
                    GuestAddress(r.guest_phys_addr),
                    size,
                    Some(FileOffset::new(file, r.mmap_offset)),
                )
                .expect("map the guest's memfd"),
            );
            va_map.push((r.user_addr, r.memory_size, r.guest_phys_addr));
        }
        (
            GuestMemoryMmap::from_regions(regions).expect("memory"),
            va_map,
        )
    }

    /// Wait for a kick on `index`, then answer the first chain: `respond` gets
    /// the request bytes and returns the reply written into the writable part.
    pub fn serve_one(&self, index: u32, respond: impl FnOnce(&[u8]) -> Vec<u8>) {
        let (mem, va_map) = self.map_memory();
        let gpa = |va: u64| {
            va_map
                .iter()
                .find(|(start, len, _)| va >= *start && va < start + len)
                .map(|(start, _, gpa)| va - start + gpa)
                .expect("a ring address inside the memory table")
        };
        let (mut kick, call, mut queue, event_idx) = {
            let rec = beacon_common::lock(&self.rec);
            let v = rec.vrings.get(&index).expect("vring set up");
            assert!(v.enabled, "ring {index} enabled");
            let mut q = Queue::new(u16::try_from(v.num).expect("num")).expect("queue");
            q.set_size(u16::try_from(v.num).expect("num"));
            q.try_set_desc_table_address(GuestAddress(gpa(v.desc)))
                .expect("desc");
            q.try_set_avail_ring_address(GuestAddress(gpa(v.avail)))
                .expect("avail");
            q.try_set_used_ring_address(GuestAddress(gpa(v.used)))
                .expect("used");
            q.set_next_avail(u16::try_from(v.base).expect("base"));
            q.set_ready(true);
            (
                v.kick.as_ref().expect("kick").try_clone().expect("dup"),
                v.call.as_ref().expect("call").try_clone().expect("dup"),
                q,
                rec.acked_features & (1 << 29) != 0,
            )
        };
        queue.set_event_idx(event_idx);
        let mut counter = [0u8; 8];
        kick.read_exact(&mut counter).expect("a kick");
        let chain = queue
            .pop_descriptor_chain(&mem)
            .expect("a chain after the kick");
        let head = chain.head_index();
        let mut request = Vec::new();
        let mut writable = Vec::new();
        for d in chain {
            if d.is_write_only() {
                writable.push(d);
            } else {
                let mut buf = vec![0u8; d.len() as usize];
                mem.read_slice(&mut buf, d.addr()).expect("read request");
                request.extend(buf);
            }
        }
        let reply = respond(&request);
        let mut written = 0usize;
        for d in writable {
            let n = (d.len() as usize).min(reply.len() - written);
            mem.write_slice(&reply[written..written + n], d.addr())
                .expect("write reply");
            written += n;
        }
        queue
            .add_used(&mem, head, u32::try_from(written).expect("len"))
            .expect("used");
        let mut call = call;
        call.write_all(&1u64.to_ne_bytes()).expect("call");
    }
}

impl FakeBackend {
    /// Play a crash: hang up on the frontend and end.
    pub fn die(&mut self) {
        self.release = None;
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.die();
    }
}
