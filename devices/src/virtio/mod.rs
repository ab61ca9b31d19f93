//! virtio 1.x devices (modern only) on the virtio-mmio transport.
//!
//! - [`device`]: the [`VirtioDevice`] trait every device model implements, what a
//!   device is handed when the driver activates it ([`Activation`]), and its
//!   interrupt line ([`Interrupt`]);
//! - [`mmio`]: the virtio-mmio register block ([`MmioTransport`]), a
//!   [`BusDevice`](crate::BusDevice) the VMM puts on its MMIO bus;
//! - [`events`]: the adapter that puts a device on the VMM's event loop
//!   ([`VirtioSubscriber`]): queue notifications and the device's own fds;
//! - [`vhost_kernel`]: the guest memory table the kernel's vhost devices get;
//! - one module per device.
//!
//! Nothing here knows about KVM: interrupts leave through an eventfd the VMM
//! registered as an irqfd, queue notifications arrive through eventfds it
//! registered as ioeventfds. Everything in guest memory is hostile: descriptor
//! chains are walked by `virtio-queue` (bounded, loop-safe, every buffer checked
//! against guest memory) and a bad chain is dropped with a throttled log line.

pub mod block;
pub mod device;
pub mod events;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod vhost_kernel;
pub mod vsock;

pub use device::{
    ActivateError, Activation, GuestMem, Interrupt, VirtioDevice, DEVICE_NEEDS_RESET,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
pub use events::VirtioSubscriber;
pub use mmio::{MmioTransport, QueueState, TransportState, MMIO_REGION_SIZE, NOTIFY_REG_OFFSET};
pub use queue::{return_used, serve_queue, ChainOutcome, Served};
