//! CNI mode with Debian's bridge + host-local plugins (containernetworking-plugins,
//! /usr/lib/cni; override with BEACON_TEST_CNI_BIN_DIR).

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use beacon_netmgr::cni::{example_conflist, netns};
use beacon_netmgr::{link, tap, CniConfig, NetError, NetworkAttachment, NetworkManager};

use crate::harness::{legacy_config, rt};
use crate::netns_test;
use crate::traffic::{arp_request, is_arp, wait_frame};

fn plugin_dir() -> PathBuf {
    std::env::var_os("BEACON_TEST_CNI_BIN_DIR")
        .map_or_else(|| PathBuf::from("/usr/lib/cni"), PathBuf::from)
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn ipam(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }
    fn config(&self, conflist: &str, bin_dir: &Path) -> beacon_netmgr::NetConfig {
        let conf_dir = self.dir.path().join("net.d");
        std::fs::create_dir_all(&conf_dir).unwrap();
        std::fs::write(conf_dir.join("10-beacon.conflist"), conflist).unwrap();
        let mut cfg = legacy_config(self.dir.path());
        cfg.cni = Some(CniConfig {
            conf_dir,
            bin_dir: bin_dir.to_path_buf(),
            network: "beacon-net".into(),
            netns_dir: self.dir.path().join("netns"),
            ifname: "eth0".into(),
        });
        cfg
    }
    fn standard(&self) -> beacon_netmgr::NetConfig {
        self.config(
            &example_conflist("beacon-net", "cnitest0", "10.99.0.0/16", &self.ipam()),
            &plugin_dir(),
        )
    }
    /// IPs host-local currently has reserved.
    fn reserved(&self) -> Vec<String> {
        let dir = self.ipam().join("beacon-net");
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|r| {
                r.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.contains('.') && !n.starts_with("last_reserved"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// ARP for the gateway through the sandbox TAP, from inside its namespace.
fn arp_through_tap(a: &NetworkAttachment) -> bool {
    let (tap_name, mac, ip, gw) = (a.tap.clone(), a.mac, a.ip, a.gateway);
    netns::run_in(a.netns.as_ref().unwrap(), move || async move {
        let mut t = tap::open_tap_plain(&tap_name)?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        t.write_all(&arp_request(mac, ip, gw)).unwrap();
        Ok(wait_frame(&mut t, Duration::from_secs(5), |f| is_arp(f, 2, gw, ip)).is_some())
    })
    .unwrap()
}

fn tap_in_netns(a: &NetworkAttachment) -> bool {
    let name = a.tap.clone();
    netns::run_in(a.netns.as_ref().unwrap(), move || async move {
        let h = link::connect()?;
        Ok(link::get_link(&h, &name).await?.is_some())
    })
    .unwrap()
}

netns_test! {
    fn add_gives_a_working_tap_and_del_cleans_up() {
        let env = Env::new();
        rt().block_on(async {
            let mgr = NetworkManager::new(env.standard()).unwrap();
            let id = "cni sandbox/odd ✓";
            let a = mgr.setup(id).await.unwrap();
            assert_eq!(a.prefix, 16);
            assert_eq!(a.gateway, "10.99.0.1".parse::<Ipv4Addr>().unwrap());
            assert!(a.ip.octets()[..2] == [10, 99] && a.ip != a.gateway, "{}", a.ip);
            let ns = a.netns.clone().unwrap();
            assert!(netns::is_mounted(&ns));
            assert!(tap_in_netns(&a));
            assert_eq!(env.reserved(), vec![a.ip.to_string()]);
            // Frames go TAP -> tc redirect -> veth -> bridge and the reply comes back.
            assert!(arp_through_tap(&a), "the CNI bridge answered through the TAP");
            mgr.check(id).await.unwrap();
            // Setup again returns the same attachment.
            assert_eq!(mgr.setup(id).await.unwrap(), a);

            mgr.teardown(id).await.unwrap();
            assert!(!ns.exists());
            assert!(mgr.leases().list().unwrap().is_empty());
            assert!(env.reserved().is_empty(), "host-local released the address");
            let h = link::connect().unwrap();
            let bridge = link::link_index(&h, "cnitest0").await.unwrap().unwrap();
            let ports = link::list_links(&h).await.unwrap().iter().filter(|m| link::link_controller(m) == Some(bridge)).count();
            assert_eq!(ports, 0, "the veth's host end is gone");
            mgr.teardown(id).await.unwrap();
        });
    }
}

netns_test! {
    fn reconciler_runs_del_after_a_crash() {
        let env = Env::new();
        rt().block_on(async {
            let a = {
                let mgr = NetworkManager::new(env.standard()).unwrap();
                mgr.setup("crashed").await.unwrap()
                // The "shim" dies here without teardown.
            };
            let ns = a.netns.clone().unwrap();
            assert!(netns::is_mounted(&ns));
            assert_eq!(env.reserved().len(), 1);
            let mgr = NetworkManager::new(env.standard()).unwrap();
            let report = mgr.reconcile(&|_: &str| false).await.unwrap();
            assert_eq!(report.released, vec!["crashed".to_string()]);
            assert!(report.failed.is_empty(), "{:?}", report.failed);
            assert!(!ns.exists());
            assert!(env.reserved().is_empty());
            assert!(mgr.leases().list().unwrap().is_empty());
        });
    }
}

fn bin_dir_with(env: &Env, name: &str, script: &str) -> PathBuf {
    let bin = env.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for p in ["bridge", "host-local"] {
        let _ = std::os::unix::fs::symlink(plugin_dir().join(p), bin.join(p));
    }
    let path = bin.join(name);
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

fn two_plugin_list(env: &Env, second: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&example_conflist(
        "beacon-net",
        "cnitest0",
        "10.99.0.0/16",
        &env.ipam(),
    ))
    .unwrap();
    v["plugins"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": second}));
    v.to_string()
}

netns_test! {
    fn failing_and_missing_plugins_are_named_and_rolled_back() {
        let env = Env::new();
        let bin = bin_dir_with(&env, "failer", "#!/bin/sh\necho 'failer: no luck today' >&2\n[ \"$CNI_COMMAND\" = DEL ] && exit 0\necho '{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"refused\"}'\nexit 1\n");
        rt().block_on(async {
            let mgr = NetworkManager::new(env.config(&two_plugin_list(&env, "failer"), &bin)).unwrap();
            let err = mgr.setup("sb").await.unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, NetError::CniPlugin { .. }), "{msg}");
            assert!(msg.contains("failer") && msg.contains("no luck today") && msg.contains("refused"), "{msg}");
            assert!(mgr.leases().list().unwrap().is_empty());
            assert!(env.reserved().is_empty(), "bridge/host-local were DELeted");

            let mgr = NetworkManager::new(env.config(&two_plugin_list(&env, "not-installed"), &bin)).unwrap();
            let err = mgr.setup("sb").await;
            // DEL of the missing plugin fails too, so the lease stays for the reconciler.
            let err = err.unwrap_err();
            assert!(matches!(err, NetError::CniPluginMissing { ref plugin, .. } if plugin == "not-installed"), "{err}");
            assert!(err.to_string().contains(&bin.display().to_string()));
        });
    }
}

netns_test! {
    fn an_unparsable_conflist_is_a_clear_error() {
        let env = Env::new();
        rt().block_on(async {
            let mgr = NetworkManager::new(env.config("{ this is not json", &plugin_dir())).unwrap();
            let err = mgr.setup("sb").await.unwrap_err();
            assert!(matches!(err, NetError::CniConfig { .. }), "{err}");
            assert!(err.to_string().contains("10-beacon.conflist"), "{err}");
            assert!(mgr.leases().list().unwrap().is_empty());
        });
    }
}
