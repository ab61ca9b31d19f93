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
/// nftables table (bridge family) pinning each TAP to its lease's MAC and IP and
/// isolating the guests from each other.
pub const GUARD_TABLE: &str = "beacon_runner_guard";
/// nftables table (family `ip`) inside a CRI pod's network namespace that sends
/// the namespace's own TCP connections to its loopback to the shim's port
/// forward listener ([`crate::cni::pod::forward_localhost`]).
pub const PORTFWD_TABLE: &str = "beacon_portfwd";
/// Environment variable: the `nft` program to run (a name looked up in PATH,
/// or a path); [`DEFAULT_NFT`] when unset.
pub const NFT_ENV: &str = "BEACON_NFT";
/// The `nft` program when [`NFT_ENV`] is unset.
pub const DEFAULT_NFT: &str = "nft";

/// The `nft` program to run: [`NFT_ENV`] as `lookup` gives it (empty counts
/// as unset), else [`DEFAULT_NFT`]. The one place that reads the variable.
pub fn nft_program(lookup: impl Fn(&str) -> Option<String>) -> String {
    lookup(NFT_ENV)
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_NFT.to_string())
}

/// [`nft_program`] from the process environment.
pub fn nft_program_from_env() -> String {
    nft_program(|k| std::env::var(k).ok())
}

/// File (under `$BEACON_RUN_DIR`) whose `flock` serialises rebuilds of
/// [`GUARD_TABLE`] across processes.
pub const FIREWALL_LOCK_FILE: &str = "firewall.lock";
/// Environment variable: the bridge's address and prefix (`GATEWAY/PREFIX`).
pub const SUBNET_ENV: &str = "BEACON_SUBNET";
/// Environment variable: the legacy IP pool (`FIRST-LAST`).
pub const POOL_RANGE_ENV: &str = "BEACON_POOL_RANGE";
/// Environment variable: what guests may reach on the host ([`HostService`] list).
pub const HOST_ACCESS_ENV: &str = "BEACON_HOST_ACCESS";
/// Environment variable: `1` lets guests on the bridge reach each other.
pub const GUEST_TO_GUEST_ENV: &str = "BEACON_GUEST_TO_GUEST";
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

/// One kind of traffic guests may send to the host itself (any host address,
/// reached through the bridge): an entry of `BEACON_HOST_ACCESS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostService {
    /// `tcp/PORT` or `tcp/FIRST-LAST`.
    Tcp { first: u16, last: u16 },
    /// `udp/PORT` or `udp/FIRST-LAST`.
    Udp { first: u16, last: u16 },
    /// `icmp`: every ICMP message (echo requests included).
    Icmp,
}

impl HostService {
    /// Parse one entry: `tcp/53`, `udp/1000-2000`, `icmp`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |why: &str| {
            NetError::Config(format!(
                "{HOST_ACCESS_ENV} entry {text:?}: {why} (expected tcp/PORT, udp/PORT, \
                 tcp/FIRST-LAST, udp/FIRST-LAST or icmp, comma separated)"
            ))
        };
        let text = text.trim();
        if text.eq_ignore_ascii_case("icmp") {
            return Ok(HostService::Icmp);
        }
        let (proto, ports) = text
            .split_once('/')
            .ok_or_else(|| bad("no protocol/port"))?;
        let port = |s: &str| match s.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(bad("ports are 1..=65535")),
            Ok(p) => Ok(p),
        };
        let (first, last) = match ports.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(ports)?, port(ports)?),
        };
        if first > last {
            return Err(bad("the range ends before it starts"));
        }
        match proto.trim().to_ascii_lowercase().as_str() {
            "tcp" => Ok(HostService::Tcp { first, last }),
            "udp" => Ok(HostService::Udp { first, last }),
            _ => Err(bad("unknown protocol")),
        }
    }

    /// Parse a comma-separated list; empty entries are ignored.
    pub fn parse_list(list: &str) -> Result<Vec<Self>> {
        list.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(Self::parse)
            .collect()
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
    /// What guests may send to the host (legacy mode); empty: nothing but replies.
    pub host_access: Vec<HostService>,
    /// Whether guests on the bridge may reach each other (legacy mode).
    pub guest_to_guest: bool,
    /// Lock file serialising rebuilds of the guard table
    /// (`$BEACON_RUN_DIR/firewall.lock`).
    pub firewall_lock: PathBuf,
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
            nft_program: DEFAULT_NFT.to_string(),
            dns: Vec::new(),
            host_access: Vec::new(),
            guest_to_guest: false,
            firewall_lock: paths.run_dir().join(FIREWALL_LOCK_FILE),
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
    /// `BEACON_SUBNET`, `BEACON_POOL_RANGE`, `BEACON_HOST_ACCESS`,
    /// `BEACON_GUEST_TO_GUEST`,
    /// `BEACON_BRIDGE`, `BEACON_NFT`, `BEACON_DNS` (comma separated),
    /// `BEACON_CNI_MODE=1`, `BEACON_CNI_CONF_DIR`, `BEACON_CNI_BIN_DIR`,
    /// `BEACON_CNI_NETWORK`, `BEACON_CNI_NETNS_DIR`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let paths = BeaconPaths::from_lookup(|k| lookup(k).map(Into::into));
        let mut cfg = NetConfig::legacy(&paths);
        if let Some(subnet) = lookup(SUBNET_ENV) {
            (cfg.gateway, cfg.prefix) = parse_subnet(&subnet)?;
            if lookup(POOL_RANGE_ENV).is_none() {
                cfg.pool = default_pool(cfg.gateway, cfg.prefix).ok_or_else(|| {
                    NetError::Config(format!(
                        "{SUBNET_ENV}={subnet}: no addresses are left for guests above the \
                         gateway: use the subnet's first address as the gateway, or set \
                         {POOL_RANGE_ENV}"
                    ))
                })?;
            }
        }
        if let Some(range) = lookup(POOL_RANGE_ENV) {
            cfg.pool = PoolRange::parse(&range)?;
        }
        if let Some(list) = lookup(HOST_ACCESS_ENV) {
            cfg.host_access = HostService::parse_list(&list)?;
        }
        cfg.guest_to_guest = match lookup(GUEST_TO_GUEST_ENV).as_deref() {
            None | Some("0") => false,
            Some("1") => true,
            Some(other) => {
                return Err(NetError::Config(format!(
                    "{GUEST_TO_GUEST_ENV}={other:?}: use 0 (guests isolated, the default) or 1"
                )))
            }
        };
        if let Some(bridge) = lookup("BEACON_BRIDGE") {
            cfg.bridge = bridge;
        }
        cfg.nft_program = nft_program(&lookup);
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
        if gw == net || gw == net | !mask {
            return Err(NetError::Config(format!(
                "gateway {} is the network or broadcast address of its /{} (set {SUBNET_ENV})",
                self.gateway, self.prefix
            )));
        }
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

/// Parse `GATEWAY/PREFIX` (`10.89.0.1/16`): the bridge's address and prefix.
fn parse_subnet(text: &str) -> Result<(Ipv4Addr, u8)> {
    let bad = |why: String| {
        NetError::Config(format!(
            "{SUBNET_ENV}={text:?}: {why} (expected the bridge address and prefix, e.g. 10.89.0.1/16)"
        ))
    };
    let (ip, prefix) = text
        .trim()
        .split_once('/')
        .ok_or_else(|| bad("no /PREFIX".into()))?;
    let ip = ip.parse().map_err(|e| bad(format!("{ip:?}: {e}")))?;
    let prefix = prefix
        .parse()
        .map_err(|e| bad(format!("prefix {prefix:?}: {e}")))?;
    if !(1..=30).contains(&prefix) {
        return Err(bad(format!("prefix /{prefix} must be 1..=30")));
    }
    Ok((ip, prefix))
}

/// The addresses above `gateway` up to the last before the broadcast address, or
/// `None` if there are none (or the prefix is out of range: `validate` says why).
fn default_pool(gateway: Ipv4Addr, prefix: u8) -> Option<PoolRange> {
    if prefix == 0 || prefix > 30 {
        return None;
    }
    let mask = u32::MAX << (32 - u32::from(prefix));
    let last = (u32::from(gateway) | !mask) - 1;
    let first = u32::from(gateway) + 1;
    (first <= last).then(|| PoolRange {
        first: first.into(),
        last: last.into(),
    })
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

    #[test]
    fn subnet_setting_moves_gateway_and_pool() {
        let c = cfg(&[]).unwrap();
        assert_eq!((c.gateway, c.prefix), (DEFAULT_GATEWAY, DEFAULT_PREFIX));
        assert_eq!(c.pool.to_string(), "10.88.0.2-10.88.255.254");
        let c = cfg(&[("BEACON_SUBNET", "10.123.0.1/24")]).unwrap();
        assert_eq!(c.gateway, Ipv4Addr::new(10, 123, 0, 1));
        assert_eq!((c.prefix, c.subnet()), (24, Ipv4Addr::new(10, 123, 0, 0)));
        assert_eq!(c.pool.to_string(), "10.123.0.2-10.123.0.254");
        let c = cfg(&[
            ("BEACON_SUBNET", "10.123.0.1/24"),
            ("BEACON_POOL_RANGE", "10.123.0.100-10.123.0.110"),
        ])
        .unwrap();
        assert_eq!(c.pool.size(), 11);
        for bad in [
            "10.123.0.1",
            "10.123.0.1/33",
            "x/24",
            "10.123.0.254/24",
            "10.123.0.0/24",
        ] {
            let err = cfg(&[("BEACON_SUBNET", bad)]).unwrap_err();
            assert!(err.to_string().contains("BEACON_"), "{bad}: {err}");
        }
    }

    #[test]
    fn host_access_parses_and_rejects_bad_entries() {
        assert!(cfg(&[]).unwrap().host_access.is_empty());
        let c = cfg(&[("BEACON_HOST_ACCESS", "udp/53, tcp/53,ICMP,tcp/8000-8010,")]).unwrap();
        assert_eq!(
            c.host_access,
            vec![
                HostService::Udp {
                    first: 53,
                    last: 53
                },
                HostService::Tcp {
                    first: 53,
                    last: 53
                },
                HostService::Icmp,
                HostService::Tcp {
                    first: 8000,
                    last: 8010
                },
            ]
        );
        for bad in [
            "tcp",
            "tcp/",
            "tcp/0",
            "tcp/65536",
            "sctp/5",
            "udp/9-1",
            "udp/x",
            "53",
        ] {
            let err = cfg(&[("BEACON_HOST_ACCESS", bad)]).unwrap_err();
            assert!(matches!(err, NetError::Config(_)), "{bad}: {err}");
            let text = err.to_string();
            assert!(
                text.contains("BEACON_HOST_ACCESS") && text.contains(bad),
                "{text}"
            );
        }
    }

    #[test]
    fn guest_to_guest_is_off_unless_one() {
        assert!(!cfg(&[]).unwrap().guest_to_guest);
        assert!(
            !cfg(&[("BEACON_GUEST_TO_GUEST", "0")])
                .unwrap()
                .guest_to_guest
        );
        assert!(
            cfg(&[("BEACON_GUEST_TO_GUEST", "1")])
                .unwrap()
                .guest_to_guest
        );
        let err = cfg(&[("BEACON_GUEST_TO_GUEST", "yes")]).unwrap_err();
        assert!(err.to_string().contains("BEACON_GUEST_TO_GUEST"), "{err}");
    }
}
