//! virtio-net's kernel data path: vhost-net moves frames between the TAP and
//! the queues on its own worker thread.
//!
//! The VMM gives vhost-net the guest memory table (from the RAM regions), the
//! rings' addresses, the queues' notification eventfds as its kick fds (the
//! ioeventfds KVM signals), its own call eventfds, and the TAP as backend. The
//! call eventfds come back to the VMM's event loop, not to the irqfd: the
//! virtio-mmio driver reads InterruptStatus and ignores an interrupt whose bit
//! is not set, so the used-ring signal has to go through
//! [`Interrupt::signal_used_queue`].
//!
//! When guest memory is hot-added or removed, a running worker gets the new
//! table ([`VhostPath::memory_changed`]); if vhost-net refuses it the device
//! reports DEVICE_NEEDS_RESET.
//!
//! A driver reset closes the vhost-net descriptor, which stops and joins the
//! kernel worker, and opens a fresh one for the next activation. This module
//! never reads the queues or the TAP itself and never blocks the event loop.

use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use vhost::net::VhostNet;
use vhost::vhost_kern::net::Net as KernelNet;
use vhost::{VhostBackend, VringConfigData};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::{NetError, VHOST_CALL_TOKEN};
use crate::tap::Tap;
use crate::virtio::device::{ActivateError, Activation, GuestMem, Interrupt};
use crate::virtio::vhost_kernel::set_memory_table;

/// The kernel's vhost-net device node.
pub const VHOST_NET_DEVICE: &str = "/dev/vhost-net";

fn open(mem: &GuestMem, tap: &Tap) -> Result<KernelNet<GuestMem>, NetError> {
    if !Path::new(VHOST_NET_DEVICE).exists() {
        return Err(NetError::VhostMissing);
    }
    KernelNet::new(mem.clone()).map_err(|e| NetError::Vhost {
        action: "open /dev/vhost-net",
        tap: tap.name().into(),
        reason: e.to_string(),
    })
}

/// The vhost-net data path's state.
pub(super) struct VhostPath {
    tap: Arc<Tap>,
    mem: GuestMem,
    /// The open vhost-net instance; None only if reopening after a reset failed.
    kernel: Option<KernelNet<GuestMem>>,
    supported: u64,
    /// vhost-net signals these when it used buffers of queue 0 and 1.
    calls: [EventFd; 2],
    /// Set while the driver has the device activated.
    interrupt: Option<Arc<Interrupt>>,
    /// vhost-net refused a new memory table: the device needs a reset.
    needs_reset: bool,
}

impl VhostPath {
    pub(super) fn new(tap: Arc<Tap>, mem: GuestMem) -> Result<Self, NetError> {
        let kernel = open(&mem, &tap)?;
        let supported = kernel.get_features().map_err(|e| NetError::Vhost {
            action: "read vhost-net's features",
            tap: tap.name().into(),
            reason: e.to_string(),
        })?;
        let eventfd = || {
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| NetError::EventFd {
                tap: tap.name().into(),
                source,
            })
        };
        let calls = [eventfd()?, eventfd()?];
        Ok(Self {
            tap,
            mem,
            kernel: Some(kernel),
            supported,
            calls,
            interrupt: None,
            needs_reset: false,
        })
    }

    /// Feature bits vhost-net implements.
    pub(super) fn supported_features(&self) -> u64 {
        self.supported
    }

    pub(super) fn is_activated(&self) -> bool {
        self.interrupt.is_some()
    }

    pub(super) fn needs_reset(&self) -> bool {
        self.needs_reset
    }

    /// Guest memory gained or lost regions: give the running worker the new
    /// table (the ioctl returns once the kernel uses it, so a removed region is
    /// no longer touched afterwards). Not activated: the next activation sends it.
    pub(super) fn memory_changed(&mut self, mem: &GuestMem) {
        let (Some(interrupt), Some(kernel)) = (&self.interrupt, &self.kernel) else {
            return;
        };
        if let Err(e) = set_memory_table(kernel, mem) {
            tracing::error!(
                tap = self.tap.name(),
                "virtio-net: vhost-net refused the new guest memory table (VHOST_SET_MEM_TABLE: {e}); the device needs a reset"
            );
            self.needs_reset = true;
            interrupt.signal_config_change();
        }
    }

    pub(super) fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let result = self.start(&activation);
        if result.is_err() {
            // Leave no half-configured worker behind.
            self.restart_kernel();
        } else {
            self.interrupt = Some(activation.interrupt);
        }
        result
    }

    fn start(&self, activation: &Activation) -> Result<(), ActivateError> {
        let kernel = self.kernel.as_ref().ok_or_else(|| {
            ActivateError::Backend(format!(
                "vhost-net for TAP {} could not be reopened after the last reset",
                self.tap.name()
            ))
        })?;
        let fail = |action: &'static str| {
            let tap = self.tap.name().to_string();
            move |e: vhost::Error| {
                ActivateError::Backend(format!("vhost-net for TAP {tap}: {action}: {e}"))
            }
        };
        kernel.set_owner().map_err(fail("VHOST_SET_OWNER"))?;
        kernel
            .set_features(activation.acked_features & self.supported)
            .map_err(fail("VHOST_SET_FEATURES"))?;
        set_memory_table(kernel, &activation.mem).map_err(fail("VHOST_SET_MEM_TABLE"))?;
        for (index, (queue, kick)) in activation
            .queues
            .iter()
            .zip(&activation.queue_events)
            .enumerate()
        {
            let call = self
                .calls
                .get(index)
                .ok_or_else(|| ActivateError::Backend("virtio-net has only two queues".into()))?;
            kernel
                .set_vring_num(index, queue.size())
                .map_err(fail("VHOST_SET_VRING_NUM"))?;
            let rings = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: queue.desc_table(),
                used_ring_addr: queue.used_ring(),
                avail_ring_addr: queue.avail_ring(),
                log_addr: None,
            };
            kernel
                .set_vring_addr(index, &rings)
                .map_err(fail("VHOST_SET_VRING_ADDR"))?;
            kernel
                .set_vring_base(index, 0)
                .map_err(fail("VHOST_SET_VRING_BASE"))?;
            kernel
                .set_vring_call(index, call)
                .map_err(fail("VHOST_SET_VRING_CALL"))?;
            kernel
                .set_vring_kick(index, kick)
                .map_err(fail("VHOST_SET_VRING_KICK"))?;
        }
        for index in 0..activation.queues.len() {
            kernel
                .set_backend(index, Some(self.tap.file()))
                .map_err(fail("VHOST_NET_SET_BACKEND"))?;
        }
        Ok(())
    }

    /// Make the vhost-net instance ready for the next activation.
    /// `VHOST_RESET_OWNER` stops the kernel's worker and drops its rings,
    /// backends and memory table, and the same fd takes `VHOST_SET_OWNER`
    /// again; EPERM means nobody owns it yet, so there is nothing to reset.
    /// Closing it and opening a fresh one is the fallback only: that needs
    /// `/dev/vhost-net`, which a confined vCPU thread (where resets happen)
    /// cannot open.
    fn restart_kernel(&mut self) {
        if let Some(kernel) = &self.kernel {
            // Logged on both sides: a reset that never returns (seen once in
            // the lab, the guest's unbind hung) then shows where it waits.
            tracing::info!(tap = self.tap.name(), "virtio-net: resetting vhost-net");
            let started = std::time::Instant::now();
            let result = kernel.reset_owner();
            tracing::info!(
                tap = self.tap.name(),
                ms = started.elapsed().as_millis() as u64,
                ok = result.is_ok(),
                "virtio-net: VHOST_RESET_OWNER returned"
            );
            match result {
                Ok(()) => return,
                Err(vhost::Error::IoctlError(e)) if e.raw_os_error() == Some(libc::EPERM) => return,
                Err(e) => tracing::warn!(
                    tap = self.tap.name(),
                    "virtio-net: VHOST_RESET_OWNER failed ({e}); opening a new vhost-net instance"
                ),
            }
        }
        self.kernel = None;
        match open(&self.mem, &self.tap) {
            Ok(k) => self.kernel = Some(k),
            Err(e) => tracing::error!(tap = self.tap.name(), "virtio-net: {e}"),
        }
    }

    pub(super) fn reset(&mut self) {
        self.interrupt = None;
        self.needs_reset = false;
        self.restart_kernel();
        for call in &self.calls {
            let _ = call.read();
        }
    }

    pub(super) fn init_events(&mut self, ops: &mut EventOps) {
        for (token, call) in (VHOST_CALL_TOKEN..).zip(&self.calls) {
            if let Err(e) = ops.add(Events::with_data(call, token, EventSet::IN)) {
                tracing::error!(
                    tap = self.tap.name(),
                    "virtio-net: cannot watch a vhost-net call eventfd: {e:?}"
                );
            }
        }
    }

    pub(super) fn handle_event(&mut self, events: Events) {
        let Some(call) = events
            .data()
            .checked_sub(VHOST_CALL_TOKEN)
            .and_then(|i| self.calls.get(i as usize))
        else {
            return;
        };
        // Clears the counter; WouldBlock only means nothing was pending.
        let _ = call.read();
        if let Some(interrupt) = &self.interrupt {
            interrupt.signal_used_queue();
        }
    }
}
