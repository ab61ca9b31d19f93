//! Test support for beaconbox: where a real KVM is ([`kvm_host`]), the nested KVM
//! lab ([`lab`]) that provides one on hosts without it, and the project's built
//! assets ([`assets`]: the beacon kernel).

pub mod assets;
pub mod lab;

pub use lab::{kvm_host, KvmHost, Lab, LabError, LabOutput};
