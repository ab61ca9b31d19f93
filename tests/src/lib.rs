//! Test support for beaconbox: where a real KVM is ([`kvm_host`]), the nested KVM
//! lab ([`lab`]) that provides one on hosts without it, and the project's built
//! assets ([`assets`]: the beacon kernel), guest initrds for device tests
//! ([`guest`]), the runner of device scenarios ([`device_suite`]), a private
//! containerd ([`containerd`]) and a CRI client for it ([`cri`]), locally built
//! images ([`images`]), helpers for
//! generated test scripts ([`script`]), `make test`'s timing report
//! ([`report`]), `make bench`'s sample lines and report ([`bench`]), and the
//! vsock test tool's logic ([`vsock_tool`]).

pub mod assets;
pub mod bench;
pub mod containerd;
pub mod cri;
pub mod device_suite;
pub mod guest;
pub mod images;
pub mod lab;
pub mod procfs;
pub mod report;
pub mod script;
pub mod vsock_tool;

pub use lab::{kvm_host, KvmHost, Lab, LabError, LabOutput};
