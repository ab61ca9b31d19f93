//! CNI mode (`BEACON_CNI_MODE=1`): per sandbox, a network namespace, the configured
//! plugin chain (ADD/CHECK/DEL with `prevResult` chaining), and a TAP inside that
//! namespace for the VM.
//!
//! Takes only what it uses from the caller: the lease database and the DNS list
//! (never the `NetworkManager`, which calls into this module).
//!
//! Crash safety: a lease (mode `cni`, address 0.0.0.0) naming the namespace and the
//! configuration list is committed *before* ADD runs, so a crash at any point leaves
//! a record from which the reconciler can run DEL and remove the namespace.

pub mod conflist;
pub mod netns;
pub mod plugin;
pub mod pod;
pub mod redirect;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::attachment::NetworkAttachment;
use crate::config::CniConfig;
use crate::error::{NetError, Result};
use crate::leasedb::{IpLease, LeaseDb, LeaseMode, LeaseOwner};
use crate::naming;
use conflist::ConfList;
use plugin::{CniCommand, Invocation};

/// The CNI container id of a sandbox: `beacon` and 32 hex digits, valid whatever
/// characters the sandbox id holds.
pub fn container_id(sandbox_id: &str) -> String {
    let d = Sha256::digest(sandbox_id.as_bytes());
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("beacon{hex}")
}

/// A bridge + host-local configuration list for tests and the benchmark.
pub fn example_conflist(network: &str, bridge: &str, subnet: &str, ipam_dir: &Path) -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [{
            "type": "bridge",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": ipam_dir,
            }
        }]
    })
    .to_string()
}

/// The address part of a CNI result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultAddress {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    /// Name of the last interface placed in the sandbox.
    pub sandbox_ifname: Option<String>,
}

/// Pull the first IPv4 address, gateway, DNS servers and sandbox interface out of
/// a result (spec versions 0.3.x to 1.0).
pub fn parse_result(result: &Value) -> Option<ResultAddress> {
    let ipcfg = result["ips"]
        .as_array()?
        .iter()
        .find(|i| i["address"].as_str().is_some_and(|a| a.contains('.')))?;
    let (ip, prefix) = ipcfg["address"].as_str()?.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
    let gateway = ipcfg["gateway"]
        .as_str()
        .and_then(|g| g.parse().ok())
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    let dns = result["dns"]["nameservers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str()?.parse().ok())
        .collect();
    let sandbox_ifname = result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["sandbox"].as_str().is_some_and(|s| !s.is_empty()))
        .filter_map(|i| i["name"].as_str().map(str::to_string))
        .next_back();
    Some(ResultAddress {
        ip,
        prefix,
        gateway,
        dns,
        sandbox_ifname,
    })
}

fn netns_path(cni: &CniConfig, sandbox_id: &str) -> PathBuf {
    cni.netns_dir.join(container_id(sandbox_id))
}

fn run_chain(
    list: &ConfList,
    inv: &Invocation<'_>,
    command: CniCommand,
    prev: Option<&Value>,
) -> Result<Option<Value>> {
    let mut prev = prev.cloned();
    let order: Vec<usize> = match command {
        CniCommand::Del => (0..list.plugins.len()).rev().collect(),
        _ => (0..list.plugins.len()).collect(),
    };
    for i in order {
        let ty = list.plugins[i]["type"].as_str().unwrap_or_default();
        let out = plugin::exec(inv, command, ty, &list.plugin_stdin(i, prev.as_ref()))?;
        if command == CniCommand::Add && !out.is_null() {
            prev = Some(out);
        }
    }
    Ok(prev)
}

/// Give `sandbox_id` a network through the plugin chain, recording its lease (kept
/// by `owner`) in `db`; `dns` is used when the chain's result names no DNS servers.
pub(crate) fn setup(
    db: &LeaseDb,
    dns: &[Ipv4Addr],
    cni: &CniConfig,
    sandbox_id: &str,
    owner: LeaseOwner,
) -> Result<NetworkAttachment> {
    if let Some(lease) = db.get(sandbox_id)? {
        if lease.mode == LeaseMode::Cni && !lease.ip.is_unspecified() {
            return Ok(NetworkAttachment::from_lease(&lease, dns.to_vec()));
        }
        if lease.mode == LeaseMode::Cni {
            // A setup of this sandbox crashed mid-ADD: DEL what it made first, so
            // the IPAM plugin does not keep a second address for it.
            teardown(&lease)?;
        }
    }
    let list = ConfList::load(&cni.conf_dir, &cni.network)?;
    let cid = container_id(sandbox_id);
    let ns = netns_path(cni, sandbox_id);
    let tap_name = naming::tap_name(sandbox_id);
    let mut lease = IpLease {
        sandbox_id: sandbox_id.to_string(),
        ip: Ipv4Addr::UNSPECIFIED,
        prefix: 0,
        gateway: Ipv4Addr::UNSPECIFIED,
        tap: tap_name.clone(),
        mac: naming::guest_mac(sandbox_id),
        created_unix: 0,
        mode: LeaseMode::Cni,
        netns: Some(ns.clone()),
        cni: Some(json!({
            "containerId": cid,
            "ifname": cni.ifname,
            "binDir": cni.bin_dir,
            "conflist": list.to_json(),
        })),
        owner,
    };
    db.record(&lease)?;
    match add(cni, &list, &cid, &ns, &tap_name) {
        Ok((result, addr, tap, mac)) => {
            lease.ip = addr.ip;
            lease.prefix = addr.prefix;
            lease.gateway = addr.gateway;
            lease.tap = tap;
            lease.mac = mac;
            lease.created_unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if let Some(Value::Object(info)) = lease.cni.as_mut() {
                info.insert("result".into(), result);
            }
            let dns = if addr.dns.is_empty() {
                dns.to_vec()
            } else {
                addr.dns
            };
            db.record(&lease)?;
            Ok(NetworkAttachment::from_lease(&lease, dns))
        }
        Err(e) => {
            if let Err(cleanup) = teardown(&lease) {
                tracing::warn!(sandbox_id, error = %cleanup, "CNI cleanup after a failed ADD failed; the reconciler retries");
                return Err(e);
            }
            db.release(sandbox_id)?;
            Err(e)
        }
    }
}

type Added = (Value, ResultAddress, String, beacon_common::MacAddr);

fn add(cni: &CniConfig, list: &ConfList, cid: &str, ns: &Path, tap_name: &str) -> Result<Added> {
    netns::create(ns)?;
    let ns_text = ns.to_string_lossy().into_owned();
    let inv = Invocation {
        bin_dir: &cni.bin_dir,
        container_id: cid,
        netns: &ns_text,
        ifname: &cni.ifname,
    };
    let result =
        run_chain(list, &inv, CniCommand::Add, None)?.ok_or_else(|| NetError::CniConfig {
            path: list.path.clone(),
            detail: "the plugin chain returned no result".into(),
        })?;
    let addr = parse_result(&result).ok_or_else(|| NetError::CniConfig {
        path: list.path.clone(),
        detail: format!("the chain's result has no IPv4 address: {result}"),
    })?;
    let ifname = addr
        .sandbox_ifname
        .clone()
        .unwrap_or_else(|| cni.ifname.clone());
    let tap_owned = tap_name.to_string();
    let (tap, mac) = netns::run_in(ns, move || redirect::plug(ifname, tap_owned))?;
    Ok((result, addr, tap, mac))
}

struct Stored {
    list: ConfList,
    cid: String,
    ifname: String,
    bin_dir: PathBuf,
    result: Option<Value>,
}

fn stored(lease: &IpLease) -> Result<Stored> {
    let bad = |d: &str| NetError::CniConfig {
        path: PathBuf::from(format!("lease of {}", lease.sandbox_id)),
        detail: d.to_string(),
    };
    let info = lease.cni.as_ref().ok_or_else(|| bad("has no CNI record"))?;
    let list_json = info["conflist"].to_string();
    Ok(Stored {
        list: ConfList::parse(&list_json, Path::new("(stored with the lease)"))?,
        cid: info["containerId"]
            .as_str()
            .ok_or_else(|| bad("has no containerId"))?
            .to_string(),
        ifname: info["ifname"].as_str().unwrap_or("eth0").to_string(),
        bin_dir: info["binDir"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| bad("has no binDir"))?,
        result: info.get("result").cloned(),
    })
}

/// DEL the chain (with the stored result) and remove the namespace. Safe to repeat,
/// also when the namespace is already gone.
pub(crate) fn teardown(lease: &IpLease) -> Result<()> {
    let s = stored(lease)?;
    let ns = lease.netns.clone().unwrap_or_default();
    let ns_text = if netns::is_mounted(&ns) {
        ns.to_string_lossy().into_owned()
    } else {
        String::new()
    };
    let inv = Invocation {
        bin_dir: &s.bin_dir,
        container_id: &s.cid,
        netns: &ns_text,
        ifname: &s.ifname,
    };
    run_chain(&s.list, &inv, CniCommand::Del, s.result.as_ref())?;
    if !ns.as_os_str().is_empty() {
        netns::remove(&ns)?;
    }
    Ok(())
}

/// Remove namespace files in the CNI namespace folder that no lease names (left by
/// a crash between a DEL and the lease release). `leased` lists the namespaces the
/// leases name, read *after* the folder was listed: setup commits its lease before
/// it creates the namespace, so a concurrent setup is never mistaken for an orphan.
pub(crate) fn orphan_namespaces(cni: &CniConfig) -> Vec<PathBuf> {
    std::fs::read_dir(&cni.netns_dir)
        .map(|dir| {
            dir.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("beacon") && !n.contains('.'))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Run CHECK over the chain for a set-up sandbox.
pub(crate) fn check(lease: &IpLease) -> Result<()> {
    let s = stored(lease)?;
    let ns = lease.netns.clone().unwrap_or_default();
    let ns_text = ns.to_string_lossy().into_owned();
    let inv = Invocation {
        bin_dir: &s.bin_dir,
        container_id: &s.cid,
        netns: &ns_text,
        ifname: &s.ifname,
    };
    run_chain(&s.list, &inv, CniCommand::Check, s.result.as_ref())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CNI path runs with just a lease database and a DNS list: no
    /// `NetworkManager`, runtime or netlink socket.
    #[test]
    fn setup_needs_only_the_lease_database_and_dns() {
        let dir = tempfile::tempdir().unwrap();
        let paths = beacon_paths::BeaconPaths::under(dir.path());
        let cfg = crate::NetConfig::legacy(&paths);
        let db = LeaseDb::new(cfg.db_path, cfg.pool, cfg.gateway, cfg.prefix);
        let conf_dir = dir.path().join("net.d");
        std::fs::create_dir_all(&conf_dir).unwrap();
        std::fs::write(conf_dir.join("10-beacon.conflist"), "{ not json").unwrap();
        let cni = CniConfig {
            conf_dir,
            bin_dir: dir.path().join("bin"),
            network: "beacon-net".into(),
            netns_dir: dir.path().join("netns"),
            ifname: "eth0".into(),
        };
        let dns = ["192.0.2.53".parse().unwrap()];
        let err = setup(&db, &dns, &cni, "sb", LeaseOwner::Shim).unwrap_err();
        assert!(matches!(err, NetError::CniConfig { .. }), "{err}");
        assert!(db.list().unwrap().is_empty(), "nothing recorded");

        // A completed lease is answered from the database, with the caller's DNS.
        let lease = IpLease {
            sandbox_id: "done".into(),
            ip: "10.99.0.5".parse().unwrap(),
            prefix: 16,
            gateway: "10.99.0.1".parse().unwrap(),
            tap: naming::tap_name("done"),
            mac: naming::guest_mac("done"),
            created_unix: 1,
            mode: LeaseMode::Cni,
            netns: Some(netns_path(&cni, "done")),
            cni: None,
            owner: LeaseOwner::Shim,
        };
        db.record(&lease).unwrap();
        let a = setup(&db, &dns, &cni, "done", LeaseOwner::Shim).unwrap();
        assert_eq!(a, NetworkAttachment::from_lease(&lease, dns.to_vec()));
    }

    #[test]
    fn container_ids_are_valid_for_odd_sandbox_ids() {
        let id = container_id("odd id/with ünïcode");
        assert_eq!(id.len(), 38);
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn parses_results_of_several_versions() {
        let v1 = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "cni0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/run/netns/x"}],
            "ips": [{"address": "fd00::2/64"}, {"address": "10.99.0.5/16", "gateway": "10.99.0.1", "interface": 2}],
            "dns": {"nameservers": ["10.99.0.1", "fd00::1"]}
        });
        let a = parse_result(&v1).unwrap();
        assert_eq!(a.ip, "10.99.0.5".parse::<Ipv4Addr>().unwrap());
        assert_eq!((a.prefix, a.gateway), (16, "10.99.0.1".parse().unwrap()));
        assert_eq!(a.dns, vec!["10.99.0.1".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(a.sandbox_ifname.as_deref(), Some("eth0"));
        assert!(parse_result(&json!({"ips": [{"address": "garbage"}]})).is_none());
        assert!(parse_result(&json!({})).is_none());
    }
}
