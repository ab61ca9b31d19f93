//! Integration tests of beacon-netmgr against a real kernel. Every test that touches
//! links or nftables runs in its own network namespace (see `harness`).

mod harness;

mod cli;
mod cni;
mod concurrency;
mod hostile;
mod legacy;
mod liveness;
mod release_db;
mod traffic;
