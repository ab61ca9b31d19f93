//! containerd shim v2 for beaconbox.
//!
//! - [`invocation`]: how containerd invokes the binary (flags, the `start` and
//!   `delete` actions, the address the shim serves on);
//! - [`bundle`]: the OCI bundle it is handed;
//! - [`config`]: the runtime config and how big each sandbox's VM is;
//! - [`events`]: task events published to containerd, in order;
//! - [`fault`]: `BEACON_FAULT`, the shim killing itself at a named step (crash tests);
//! - [`guest`]: the connection to vminitd in the guest (Task API, streams, events);
//! - [`host_cgroup`]: the sandbox's cgroup on the host, which the shim (its VM
//!   and virtiofsd with it) joins so the pod's cgroup accounts for the VM;
//! - [`guest_events`]: which of the guest's events reach containerd (unknown
//!   and repeated exits dropped, OOM floods rate-limited);
//! - [`lifecycle`]: the `start` and `delete` actions;
//! - [`logfifo`]: the server's non-blocking log sink;
//! - [`mounts`]: a container's files on both sides of the VM boundary;
//! - [`sandbox`]: one sandbox's VM and what surrounds it on the host;
//! - [`server`]: the long-running ttrpc server;
//! - [`service`]: the Task API containerd calls, carried into the sandbox;
//! - [`stdio`]: a process's stdio between containerd's FIFOs (or files, or a
//!   logging binary) and the guest's streams.

pub mod bundle;
pub mod config;
pub mod events;
pub mod fault;
pub mod guest;
pub mod guest_events;
pub mod host_cgroup;
pub mod invocation;
pub mod lifecycle;
pub mod logfifo;
pub mod mounts;
pub mod portfwd;
pub mod resize;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod stdio;
