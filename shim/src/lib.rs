//! containerd shim v2 for beaconbox.
//!
//! - [`invocation`]: how containerd invokes the binary (flags, the `start` and
//!   `delete` actions, the address the shim serves on);
//! - [`bundle`]: the OCI bundle it is handed;
//! - [`events`]: task events published to containerd, in order;
//! - [`guest`]: the connection to vminitd in the guest (Task API, streams, events);
//! - [`stdio`]: a process's stdio between containerd's FIFOs (or files, or a
//!   logging binary) and the guest's streams.

pub mod bundle;
pub mod events;
pub mod guest;
pub mod invocation;
pub mod stdio;
