//! Configuration of host networking: bridge, subnet, IP pool, database path, CNI
//! settings. Resolved once from the environment ([`NetConfig::from_env`]) or built by
//! tests; it never touches the system.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use beacon_paths::BeaconPaths;

use crate::error::{NetError, Result};

/// Default bridge of legacy mode.
pub const DEFAULT_BRIDGE: &str = "beacon0";
/// Default gateway (the bridge's own address).
pub const DEFAULT_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
/// Default prefix length of the legacy subnet.
pub const DEFAULT_PREFIX: u8 = 16;
/// nftables table holding the forward rules for the bridge.
pub const FILTER_TABLE: &str = "beacon_runner_filter";
/// nftables table holding the masquerade rule.
pub const NAT_TABLE: &str = "beacon_runner_nat";
/// Prefix of every TAP we create (`beacon-<8 hex>`).
pub const TAP_PREFIX: &str = "beacon-";

/// Inclusive range of addresses the allocator may hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolRange {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl PoolRange {
    /// Parse `A.B.C.D-E.F.G.H`.
    pub fn parse(text: &str) -> Result<Self> {
        let (a, b) = text
            .split_once('-')
            .ok_or_else(|| NetError::Config(format!("pool range {text:?} is not FIRST-LAST")))?;
        let parse = |s: &str| {
            s.trim()
                .parse::<Ipv4Addr>()
                .map_err(|e| NetError::Config(format!("pool range {text:?}: {s:?}: {e}")))
        };
        let range = PoolRange {
            first: parse(a)?,
            last: parse(b)?,
        };
        if u32::from(range.first) > u32::from(range.last) {
            return Err(NetError::Config(format!(
                "pool range {text:?} ends before it starts"
            )));
        }
        Ok(range)
    }

    /// Number of addresses in the range.
    pub fn size(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }
}

impl std::fmt::Display for PoolRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// CNI-mode settings (`BEACON_CNI_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniConfig {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub network: String,
    /// Folder holding one bind-mounted network namespace file per sandbox.
    pub netns_dir: PathBuf,
    /// Interface name the plugins create inside the namespace.
    pub ifname: String,
}

/// Everything the [`crate::NetworkManager`] needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    pub pool: PoolRange,
    pub db_path: PathBuf,
    /// Folder of the sandboxes' liveness locks (`$BEACON_RUN_DIR/sandboxes`, see
    /// [`crate::liveness`]).
    pub liveness_dir: PathBuf,
    /// `nft` program to run (a name looked up in PATH, or a path).
    pub nft_program: String,
    pub dns: Vec<Ipv4Addr>,
    /// `Some` selects CNI mode.
    pub cni: Option<CniConfig>,
}

impl NetConfig {
    /// Legacy defaults with the database under `paths`.
    pub fn legacy(paths: &BeaconPaths) -> Self {
        NetConfig {
            bridge: DEFAULT_BRIDGE.to_string(),
            gateway: DEFAULT_GATEWAY,
            prefix: DEFAULT_PREFIX,
            pool: PoolRange {
                first: Ipv4Addr::new(10, 88, 0, 2),
                last: Ipv4Addr::new(10, 88, 255, 254),
            },
            db_path: paths.network_db(),
            liveness_dir: paths.liveness_dir(),
            nft_program: "nft".to_string(),
            dns: Vec::new(),
            cni: None,
        }
    }

    /// Resolve from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Resolve with a custom variable lookup (tests pass a map).
    ///
    /// Variables: `BEACON_STATE_DIR` and `BEACON_RUN_DIR` (through beacon-paths),
    /// `BEACON_POOL_RANGE`,
    /// `BEACON_BRIDGE`, `BEACON_NFT`, `BEACON_DNS` (comma separated),
    /// `BEACON_CNI_MODE=1`, `BEACON_CNI_CONF_DIR`, `BEACON_CNI_BIN_DIR`,
    /// `BEACON_CNI_NETWORK`, `BEACON_CNI_NETNS_DIR`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let paths = BeaconPaths::from_lookup(|k| lookup(k).map(Into::into));
        let mut cfg = NetConfig::legacy(&paths);
        if let Some(range) = lookup("BEACON_POOL_RANGE") {
            cfg.pool = PoolRange::parse(&range)?;
        }
        if let Some(bridge) = lookup("BEACON_BRIDGE") {
            cfg.bridge = bridge;
        }
        if let Some(nft) = lookup("BEACON_NFT") {
            cfg.nft_program = nft;
        }
        cfg.dns = match lookup("BEACON_DNS") {
            Some(list) => parse_dns_list(&list)?,
            None => host_nameservers(),
        };
        if lookup("BEACON_CNI_MODE").as_deref() == Some("1") {
            cfg.cni = Some(CniConfig {
                conf_dir: lookup("BEACON_CNI_CONF_DIR")
                    .unwrap_or_else(|| "/etc/cni/net.d".into())
                    .into(),
                bin_dir: lookup("BEACON_CNI_BIN_DIR")
                    .unwrap_or_else(|| "/opt/cni/bin".into())
                    .into(),
                network: lookup("BEACON_CNI_NETWORK").unwrap_or_else(|| "beacon-net".into()),
                netns_dir: lookup("BEACON_CNI_NETNS_DIR")
                    .map_or_else(|| paths.cni_netns_dir(), PathBuf::from),
                ifname: "eth0".to_string(),
            });
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check that the pool lies inside the subnet and avoids the gateway.
    pub fn validate(&self) -> Result<()> {
        if self.prefix == 0 || self.prefix > 30 {
            return Err(NetError::Config(format!(
                "prefix /{} must be 1..=30",
                self.prefix
            )));
        }
        if self.bridge.is_empty() || self.bridge.len() > 15 {
            return Err(NetError::Config(format!(
                "bridge name {:?} must be 1..=15 bytes",
                self.bridge
            )));
        }
        let mask = u32::MAX << (32 - u32::from(self.prefix));
        let net = u32::from(self.gateway) & mask;
        for ip in [self.pool.first, self.pool.last] {
            if u32::from(ip) & mask != net {
                return Err(NetError::Config(format!(
                    "pool {} is not inside {}/{}",
                    self.pool, self.gateway, self.prefix
                )));
            }
        }
        let gw = u32::from(self.gateway);
        if (u32::from(self.pool.first)..=u32::from(self.pool.last)).contains(&gw) {
            return Err(NetError::Config(format!(
                "pool {} contains the gateway {}",
                self.pool, self.gateway
            )));
        }
        Ok(())
    }

    /// The subnet address (gateway with host bits cleared).
    pub fn subnet(&self) -> Ipv4Addr {
        let mask = u32::MAX << (32 - u32::from(self.prefix));
        Ipv4Addr::from(u32::from(self.gateway) & mask)
    }
}

fn parse_dns_list(list: &str) -> Result<Vec<Ipv4Addr>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|e| NetError::Config(format!("BEACON_DNS entry {s:?}: {e}")))
        })
        .collect()
}

/// Non-loopback IPv4 nameservers of the host (a guest cannot reach 127.0.0.53).
fn host_nameservers() -> Vec<Ipv4Addr> {
    let Ok(text) = std::fs::read_to_string("/etc/resolv.conf") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<Ipv4Addr>().ok())
        .filter(|ip| !ip.is_loopback())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<NetConfig> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        NetConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_and_overrides() {
        let c = cfg(&[("BEACON_STATE_DIR", "/s"), ("BEACON_DNS", "1.1.1.1")]).unwrap();
        assert_eq!(c.db_path, PathBuf::from("/s/network.db"));
        assert_eq!(c.liveness_dir, PathBuf::from("/run/beacon/sandboxes"));
        assert_eq!(c.pool.size(), 65533);
        assert_eq!(c.dns, vec![Ipv4Addr::new(1, 1, 1, 1)]);
        assert!(c.cni.is_none());
        let c = cfg(&[
            ("BEACON_POOL_RANGE", "10.88.0.2-10.88.0.4"),
            ("BEACON_CNI_MODE", "1"),
        ])
        .unwrap();
        assert_eq!(c.pool.size(), 3);
        let cni = c.cni.unwrap();
        assert_eq!(cni.network, "beacon-net");
        assert_eq!(cni.netns_dir, PathBuf::from("/run/beacon/netns"));
        let c = cfg(&[("BEACON_RUN_DIR", "/r"), ("BEACON_CNI_MODE", "1")]).unwrap();
        assert_eq!(c.liveness_dir, PathBuf::from("/r/sandboxes"));
        assert_eq!(c.cni.unwrap().netns_dir, PathBuf::from("/r/netns"));
        assert_eq!(cni.bin_dir, PathBuf::from("/opt/cni/bin"));
    }

    #[test]
    fn rejects_bad_pools() {
        assert!(cfg(&[("BEACON_POOL_RANGE", "10.88.0.9-10.88.0.2")]).is_err());
        assert!(cfg(&[("BEACON_POOL_RANGE", "10.89.0.2-10.89.0.9")]).is_err());
        assert!(cfg(&[("BEACON_POOL_RANGE", "10.88.0.1-10.88.0.9")]).is_err());
        assert!(cfg(&[("BEACON_POOL_RANGE", "garbage")]).is_err());
        assert!(cfg(&[("BEACON_DNS", "not-an-ip")]).is_err());
    }
}
