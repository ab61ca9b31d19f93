//! The vhost-vsock backend: the kernel's `/dev/vhost-vsock` serves the RX and
//! TX queues; host programs use `AF_VSOCK` with the guest's CID.
//!
//! Opened and given its CID when the device is created, so a missing module or
//! a CID another VM holds fails before the guest boots. On activation the
//! kernel gets the negotiated features, the guest RAM layout, the rings, the
//! queues' notification eventfds as kick fds (the VMM's ioeventfds, so guest
//! kicks never leave the kernel), and call eventfds of ours: virtio-mmio's
//! driver ignores an interrupt whose InterruptStatus bit is not set, so each
//! call goes through the event loop, which sets the bit and raises the line.
//! The event queue stays in userspace. After memory hotplug the kernel gets the
//! new RAM layout; if it refuses it, the device reports DEVICE_NEEDS_RESET. A
//! driver reset stops the vhost worker before the rings go away. This module
//! never reads the RX or TX rings itself.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use vhost::vhost_kern::vsock::Vsock;
use vhost::vsock::VhostVsock as _;
use vhost::{VhostBackend, VringConfigData};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::super::device::{
    ActivateError, Activation, GuestMem, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use super::super::events::DEVICE_TOKEN_BASE;
use super::super::vhost_kernel::set_memory_table;
use super::{EventQueue, EVENT_QUEUE, QUEUE_SIZES, RX_QUEUE, TX_QUEUE, VIRTIO_ID_VSOCK};

/// Event data of the RX and TX call eventfds.
const TOKEN_CALL: [u32; 2] = [DEVICE_TOKEN_BASE, DEVICE_TOKEN_BASE + 1];

/// Why the vhost-vsock device could not be created or started.
#[derive(Debug, thiserror::Error)]
pub enum VhostVsockError {
    #[error("cannot open /dev/vhost-vsock: {0}; load the module (`modprobe vhost_vsock`) or use the hybrid backend (uds=PATH)")]
    Open(#[source] std::io::Error),
    #[error("guest CID {cid} is already used by another VM on this host; pick another CID")]
    CidInUse { cid: u64 },
    #[error("vhost-vsock: {what}: {source}")]
    Ioctl {
        what: String,
        #[source]
        source: vhost::Error,
    },
    #[error("vhost-vsock: creating a call eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

fn ioctl(what: impl Into<String>) -> impl FnOnce(vhost::Error) -> VhostVsockError {
    let what = what.into();
    move |source| VhostVsockError::Ioctl { what, source }
}

struct Active {
    interrupt: Arc<Interrupt>,
    mem: GuestMem,
    events: EventQueue,
}

/// A vsock device served by the kernel's vhost-vsock.
pub struct VhostVsock {
    guest_cid: u64,
    backend: Vsock<GuestMem>,
    offered: u64,
    calls: [EventFd; 2],
    active: Option<Active>,
    running: bool,
    /// The kernel refused a new memory table: the device needs a reset.
    broken: bool,
}

impl VhostVsock {
    /// Open `/dev/vhost-vsock` for a guest with `guest_cid` and RAM `mem`.
    pub fn new(guest_cid: u64, mem: GuestMem) -> Result<Self, VhostVsockError> {
        let backend = Vsock::new(mem).map_err(|e| match e {
            vhost::Error::VhostOpen(io) => VhostVsockError::Open(io),
            other => VhostVsockError::Open(std::io::Error::other(other.to_string())),
        })?;
        backend.set_owner().map_err(ioctl("VHOST_SET_OWNER"))?;
        let features = backend
            .get_features()
            .map_err(ioctl("VHOST_GET_FEATURES"))?;
        backend.set_guest_cid(guest_cid).map_err(|e| match &e {
            vhost::Error::IoctlError(io) if io.raw_os_error() == Some(libc::EADDRINUSE) => {
                VhostVsockError::CidInUse { cid: guest_cid }
            }
            _ => VhostVsockError::Ioctl {
                what: format!("setting guest CID {guest_cid}"),
                source: e,
            },
        })?;
        let call = || EventFd::new(libc::EFD_NONBLOCK).map_err(VhostVsockError::EventFd);
        let calls = [call()?, call()?];
        let offered =
            features & (VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC);
        tracing::info!(guest_cid, "vsock: vhost-vsock backend ready");
        Ok(Self {
            guest_cid,
            backend,
            offered: offered | VIRTIO_F_VERSION_1,
            calls,
            active: None,
            running: false,
            broken: false,
        })
    }

    /// Hand the rings to the kernel and start its worker.
    fn start(&mut self, a: &Activation) -> Result<(), VhostVsockError> {
        self.backend
            .set_features(a.acked_features & self.offered)
            .map_err(ioctl("VHOST_SET_FEATURES"))?;
        set_memory_table(&self.backend, &a.mem).map_err(ioctl("VHOST_SET_MEM_TABLE"))?;
        for index in [RX_QUEUE, TX_QUEUE] {
            let (Some(q), Some(kick), Some(call)) = (
                a.queues.get(index),
                a.queue_events.get(index),
                self.calls.get(index),
            ) else {
                continue;
            };
            let config = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: q.desc_table(),
                used_ring_addr: q.used_ring(),
                avail_ring_addr: q.avail_ring(),
                log_addr: None,
            };
            let what = |op: &str| format!("{op} for queue {index}");
            self.backend
                .set_vring_num(index, q.size())
                .map_err(ioctl(what("VHOST_SET_VRING_NUM")))?;
            self.backend
                .set_vring_addr(index, &config)
                .map_err(ioctl(what("VHOST_SET_VRING_ADDR")))?;
            self.backend
                .set_vring_base(index, 0)
                .map_err(ioctl(what("VHOST_SET_VRING_BASE")))?;
            self.backend
                .set_vring_call(index, call)
                .map_err(ioctl(what("VHOST_SET_VRING_CALL")))?;
            self.backend
                .set_vring_kick(index, kick)
                .map_err(ioctl(what("VHOST_SET_VRING_KICK")))?;
        }
        self.backend
            .start()
            .map_err(ioctl("VHOST_VSOCK_SET_RUNNING"))?;
        self.running = true;
        Ok(())
    }

    fn stop(&mut self) {
        if std::mem::take(&mut self.running) {
            if let Err(e) = self.backend.stop() {
                tracing::error!("vsock: stopping the vhost-vsock worker failed: {e}");
            }
        }
        for call in &self.calls {
            let _ = call.read();
        }
    }
}

impl VirtioDevice for VhostVsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config(self.guest_cid, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        for index in [RX_QUEUE, TX_QUEUE, EVENT_QUEUE] {
            if !activation.queues.get(index).is_some_and(|q| q.ready()) {
                return Err(ActivateError::QueueNotReady { index });
            }
        }
        if let Err(e) = self.start(&activation) {
            self.stop();
            return Err(ActivateError::Backend(e.to_string()));
        }
        let Some(ev) = activation.queues.into_iter().nth(EVENT_QUEUE) else {
            self.stop();
            return Err(ActivateError::QueueNotReady { index: EVENT_QUEUE });
        };
        self.active = Some(Active {
            interrupt: activation.interrupt,
            mem: activation.mem,
            events: EventQueue::new(ev),
        });
        tracing::debug!(
            guest_cid = self.guest_cid,
            "vsock: vhost-vsock worker started"
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
        self.active = None;
        self.broken = false;
    }

    fn memory_changed(&mut self, mem: &GuestMem) {
        // The ioctl returns once the kernel uses the new table, so a removed
        // region is no longer touched afterwards.
        let Some(a) = self.active.as_ref() else {
            return;
        };
        if let Err(e) = set_memory_table(&self.backend, mem) {
            tracing::error!(
                guest_cid = self.guest_cid,
                "vsock: vhost-vsock refused the new guest memory table (VHOST_SET_MEM_TABLE: {e}); the device needs a reset"
            );
            self.broken = true;
            a.interrupt.signal_config_change();
        }
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    fn handles_queue_notifications(&self) -> bool {
        false
    }

    fn queue_notified(&mut self, index: usize, _ops: &mut EventOps) {
        if index == EVENT_QUEUE {
            if let Some(a) = self.active.as_mut() {
                a.events.deliver(&a.mem, &a.interrupt);
            }
        }
    }

    fn init_events(&mut self, ops: &mut EventOps) {
        for (call, token) in self.calls.iter().zip(TOKEN_CALL) {
            if let Err(e) = ops.add(Events::with_data_raw(call.as_raw_fd(), token, EventSet::IN)) {
                tracing::error!("vsock: cannot watch a vhost call eventfd: {e:?}");
            }
        }
    }

    fn handle_event(&mut self, events: Events, _ops: &mut EventOps) {
        let Some(call) = TOKEN_CALL
            .iter()
            .position(|t| *t == events.data())
            .and_then(|i| self.calls.get(i))
        else {
            return;
        };
        let _ = call.read();
        if let Some(a) = self.active.as_ref() {
            a.interrupt.signal_used_queue();
        }
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

impl Drop for VhostVsock {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::guest_memory;

    /// Without the module the error says how to get it or what to use
    /// instead; with it, a CID can be held by one device only. (The VM suite
    /// runs vhost-vsock for real, and checks the CID error through the CLI.)
    #[test]
    fn missing_module_or_cid_in_use_is_a_clear_error() {
        let mem = guest_memory(4);
        if !std::path::Path::new("/dev/vhost-vsock").exists() {
            let e = VhostVsock::new(77, mem).err().expect("no /dev/vhost-vsock");
            assert!(matches!(e, VhostVsockError::Open(_)), "{e}");
            assert!(e.to_string().contains("modprobe vhost_vsock"), "{e}");
            assert!(e.to_string().contains("uds=PATH"), "{e}");
            return;
        }
        let first = VhostVsock::new(77_777, mem.clone()).expect("first holder");
        let e = VhostVsock::new(77_777, mem).err().expect("CID in use");
        assert!(
            matches!(e, VhostVsockError::CidInUse { cid: 77_777 }),
            "{e}"
        );
        assert!(e.to_string().contains("77777"), "{e}");
        assert_eq!(first.queue_max_sizes().len(), 3);
        assert!(first.features() & VIRTIO_F_VERSION_1 != 0);
        assert!(!first.handles_queue_notifications());
    }
}
