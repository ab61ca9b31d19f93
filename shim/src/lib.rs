//! containerd shim v2 for beaconbox.
//!
//! So far this crate owns the shim's inputs: how containerd invokes the binary
//! ([`invocation`]: flags, the `start`/`delete` actions, the socket address the
//! shim serves on) and the OCI bundle it is handed ([`bundle`]). The Task API
//! server, the sandbox lifecycle and event forwarding build on these.

pub mod bundle;
pub mod invocation;
