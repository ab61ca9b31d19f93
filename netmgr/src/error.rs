//! The one error type of the library. Every message names the failing thing and
//! says what the operator should do next.

use std::path::PathBuf;

/// Everything that can go wrong while managing host networking.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "Network database {path} is corrupt or truncated ({detail}). No IP was handed out. \
         Stop all beaconbox sandboxes, then run `beacon-net recover-db` (moves the file aside \
         and starts an empty database)"
    )]
    DatabaseCorrupt { path: PathBuf, detail: String },

    #[error("Network database {path}: {detail}. Check the file's permissions and free disk space")]
    Database { path: PathBuf, detail: String },

    #[error(
        "Network database {path} was created for pool {stored} but the configured pool is \
         {configured}: restore the old BEACON_SUBNET / BEACON_POOL_RANGE, or stop all sandboxes and run \
         `beacon-net recover-db`"
    )]
    PoolChanged {
        path: PathBuf,
        stored: String,
        configured: String,
    },

    #[error(
        "IP pool {range} is exhausted ({size} addresses leased): tear down stopped sandboxes \
         or run `beacon-net reconcile`, or configure a larger BEACON_POOL_RANGE"
    )]
    PoolExhausted { range: String, size: u32 },

    #[error(
        "TAP name {tap} of sandbox {sandbox_id:?} is already leased to sandbox {other:?} \
         (hash collision): rename one of the sandboxes"
    )]
    TapNameCollision {
        tap: String,
        sandbox_id: String,
        other: String,
    },

    #[error(
        "Sandbox {sandbox_id:?} has no live owner (nobody holds {lock}): acquire its liveness \
         guard (SandboxLiveness::acquire) before setup and keep it until after teardown, or the \
         reconciler frees its network. Operators: `beacon-net setup` keeps a network until \
         `beacon-net teardown`"
    )]
    SandboxNotAlive { sandbox_id: String, lock: PathBuf },

    #[error(
        "Subnet {subnet} of bridge {bridge} is already in use on this host: {owner}. Another \
         network (containerd's example CNI config uses 10.88.0.0/16 too) owns it, and \
         guests could not reach it. Choose a free subnet for beaconbox: set BEACON_SUBNET to \
         the bridge address and prefix (e.g. BEACON_SUBNET=10.123.0.1/16; the pool follows, \
         or set BEACON_POOL_RANGE inside it), then run `beacon-net recover-db` if leases of \
         the old subnet exist"
    )]
    SubnetConflict {
        subnet: String,
        bridge: String,
        /// What owns it: an address or a route, with its device.
        owner: String,
    },

    #[error("Invalid network configuration: {0}")]
    Config(String),

    #[error("Sandbox id {0:?} is invalid: it must be 1 to 1024 bytes without NUL characters")]
    InvalidSandboxId(String),

    #[error("Cannot {action} TAP device {tap}: {source}. Is /dev/net/tun present (modprobe tun) and are we root?")]
    Tap {
        action: &'static str,
        tap: String,
        source: std::io::Error,
    },

    #[error("Netlink request failed while {action}: {detail}")]
    Netlink { action: String, detail: String },

    #[error(
        "The nft program {program:?} was not found: install the nftables package (apt-get \
         install nftables) or set BEACON_NFT to its path"
    )]
    NftMissing { program: String },

    #[error("nft failed while {action}: {detail}")]
    Nft { action: String, detail: String },

    #[error("CNI configuration {path}: {detail}")]
    CniConfig { path: PathBuf, detail: String },

    #[error("CNI plugin {plugin} ({command}) failed: {detail}; stderr: {stderr}")]
    CniPlugin {
        plugin: String,
        command: &'static str,
        detail: String,
        stderr: String,
    },

    #[error(
        "CNI plugin {plugin} not found in {bin_dir}: install containernetworking-plugins or set \
         BEACON_CNI_BIN_DIR"
    )]
    CniPluginMissing { plugin: String, bin_dir: PathBuf },

    #[error(
        "Pod network namespace {netns}: {detail}; check the CNI configuration of the CRI plugin: \
         it must give the pod one interface with an IPv4 address"
    )]
    PodNetwork { netns: PathBuf, detail: String },

    #[error("Network namespace {path}: {detail}")]
    Netns { path: PathBuf, detail: String },

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl NetError {
    pub(crate) fn netlink(action: impl Into<String>, err: rtnetlink::Error) -> Self {
        NetError::Netlink {
            action: action.into(),
            detail: err.to_string(),
        }
    }
}

/// Result alias used across the crate.
pub type Result<T> = std::result::Result<T, NetError>;
