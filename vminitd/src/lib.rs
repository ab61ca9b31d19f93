//! vminitd: the guest PID 1 of beaconbox. It serves the containerd Task API
//! over ttrpc on vsock (or a unix socket on a host, for tests), runs
//! containers with crun, carries their stdio and events to the host over a
//! second stream port, and, when it is PID 1, sets up the VM (`pid1`).
//! Ports and wire formats: README.md.

pub mod bundle;
pub mod cgroup;
pub mod crun;
pub mod error;
pub mod events;
pub mod fdio;
pub mod forward;
pub mod ids;
pub mod pid1;
pub mod reaper;
pub mod stdio;
pub mod streams;
pub mod task;
pub mod transport;
