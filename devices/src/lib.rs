//! Device models: legacy serial, i8042, boot timer, virtio transport and devices
