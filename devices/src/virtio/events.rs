//! A virtio device on the VMM's event loop.
//!
//! [`VirtioSubscriber`] registers the device's queue-notification eventfds (data
//! = queue index) and lets the device register its own fds (data at or above
//! [`DEVICE_TOKEN_BASE`]). A notification clears its eventfd and reaches the
//! device only once the driver has activated it, so a guest kicking queues early
//! costs one read and nothing more. The subscriber never blocks: eventfds are
//! non-blocking and devices must not block in their handlers.

use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::device::VirtioDevice;
use crate::throttle::Throttle;

/// Event data values below this are queue indexes; devices use values from here up.
pub const DEVICE_TOKEN_BASE: u32 = 0x1_0000;

/// One virtio device's event-loop half.
pub struct VirtioSubscriber {
    device: Arc<Mutex<dyn VirtioDevice>>,
    queue_events: Vec<EventFd>,
    early: Throttle,
}

impl VirtioSubscriber {
    /// `queue_events` are the queues' notification eventfds, in queue order
    /// (non-blocking; the VMM registered them, or duplicates, as ioeventfds).
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, queue_events: Vec<EventFd>) -> Self {
        Self {
            device,
            queue_events,
            early: Throttle::default(),
        }
    }
}

impl MutEventSubscriber for VirtioSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        let mut device = beacon_common::lock(&self.device);
        if device.handles_queue_notifications() {
            for (index, evt) in (0u32..).zip(&self.queue_events) {
                if let Err(e) = ops.add(Events::with_data(evt, index, EventSet::IN)) {
                    tracing::error!(
                        device = device.device_type(),
                        index,
                        "cannot watch a queue notification eventfd: {e:?}"
                    );
                }
            }
        }
        device.init_events(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if data >= DEVICE_TOKEN_BASE {
            beacon_common::lock(&self.device).handle_event(events, ops);
            return;
        }
        let index = data as usize;
        if let Some(evt) = self.queue_events.get(index) {
            // Clears the counter; WouldBlock only means another read got it first.
            let _ = evt.read();
        }
        let mut device = beacon_common::lock(&self.device);
        if device.is_activated() {
            device.queue_notified(index, ops);
        } else if let Some(suppressed) = self.early.allow() {
            tracing::debug!(
                device = device.device_type(),
                index,
                suppressed,
                "queue notified before the driver activated the device; ignored"
            );
        }
    }
}
