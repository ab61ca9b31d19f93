//! CNI mode with Debian's bridge + host-local plugins (containernetworking-plugins,
//! /usr/lib/cni; override with BEACON_TEST_CNI_BIN_DIR).

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use beacon_netmgr::cni::{example_conflist, netns};
use beacon_netmgr::{link, tap, CniConfig, NetError, NetworkAttachment, NetworkManager};

use crate::harness::{bridge_ports, legacy_config, own, rt, wait_links_ready, wait_until};
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

/// ARP for the gateway through the sandbox TAP, from inside its namespace, once the
/// path is ready: the veth's host end forwarding on the CNI bridge, and inside the
/// namespace the TAP (carrier once opened) and the veth up.
async fn arp_through_tap(a: &NetworkAttachment, bridge: &str) -> bool {
    let h = link::connect().unwrap();
    let ports = bridge_ports(&h, bridge).await;
    let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
    wait_links_ready(&h, &ports).await;
    let (tap_name, mac, ip, gw) = (a.tap.clone(), a.mac, a.ip, a.gateway);
    netns::run_in(a.netns.as_ref().unwrap(), move || async move {
        let mut t = tap::open_tap_plain(&tap_name)?;
        let h = link::connect()?;
        wait_links_ready(&h, &[&tap_name, "eth0"]).await;
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
            let _owner = own(&mgr, id);
            let a = mgr.setup(id).await.unwrap();
            assert_eq!(a.prefix, 16);
            assert_eq!(a.gateway, "10.99.0.1".parse::<Ipv4Addr>().unwrap());
            assert!(a.ip.octets()[..2] == [10, 99] && a.ip != a.gateway, "{}", a.ip);
            let ns = a.netns.clone().unwrap();
            assert!(netns::is_mounted(&ns));
            assert!(tap_in_netns(&a));
            assert_eq!(env.reserved(), vec![a.ip.to_string()]);
            // Frames go TAP -> tc redirect -> veth -> bridge and the reply comes back.
            assert!(arp_through_tap(&a, "cnitest0").await, "the CNI bridge answered through the TAP");
            mgr.check(id).await.unwrap();
            // The VMM opens the TAP from inside the namespace.
            drop(a.open_tap().unwrap());
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
                let _owner = own(&mgr, "crashed");
                mgr.setup("crashed").await.unwrap()
                // The "shim" dies here without teardown.
            };
            let ns = a.netns.clone().unwrap();
            assert!(netns::is_mounted(&ns));
            assert_eq!(env.reserved().len(), 1);
            let mgr = NetworkManager::new(env.standard()).unwrap();
            // A namespace no lease names (crash between DEL and the lease release).
            let orphan = ns.parent().unwrap().join("beacon0123orphan");
            netns::create(&orphan).unwrap();
            let report = mgr.reconcile(&|_: &str| false).await.unwrap();
            assert_eq!(report.released, vec!["crashed".to_string()]);
            assert_eq!(report.orphan_netns, vec![orphan.clone()]);
            assert!(!orphan.exists());
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
            let _owner = own(&mgr, "sb");
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
            let _owner = own(&mgr, "sb");
            let err = mgr.setup("sb").await.unwrap_err();
            assert!(matches!(err, NetError::CniConfig { .. }), "{err}");
            assert!(err.to_string().contains("10-beacon.conflist"), "{err}");
            assert!(mgr.leases().list().unwrap().is_empty());
        });
    }
}

netns_test! {
    fn a_tap_in_the_chain_result_is_used_directly() {
        let env = Env::new();
        // Stand-in for tc-redirect-tap: makes a TAP in the sandbox and reports it.
        let script = r#"#!/bin/sh
set -e
cat >/dev/null
if [ "$CNI_COMMAND" = ADD ]; then
  nsenter --net="$CNI_NETNS" ip tuntap add dev tap0 mode tap
  nsenter --net="$CNI_NETNS" ip link set tap0 address 02:aa:bb:cc:dd:ee
  echo "{\"cniVersion\":\"1.0.0\",\"interfaces\":[{\"name\":\"tap0\",\"mac\":\"02:aa:bb:cc:dd:ee\",\"sandbox\":\"$CNI_NETNS\"}],\"ips\":[{\"address\":\"10.77.0.5/24\",\"gateway\":\"10.77.0.1\",\"interface\":0}],\"dns\":{\"nameservers\":[\"10.77.0.53\"]}}"
fi
"#;
        let bin = bin_dir_with(&env, "fake-tap", script);
        let list = serde_json::json!({"cniVersion": "1.0.0", "name": "beacon-net", "plugins": [{"type": "fake-tap"}]});
        rt().block_on(async {
            let mgr = NetworkManager::new(env.config(&list.to_string(), &bin)).unwrap();
            let _owner = own(&mgr, "tapped");
            let a = mgr.setup("tapped").await.unwrap();
            assert_eq!(a.tap, "tap0");
            assert_eq!(a.mac.to_string(), "02:aa:bb:cc:dd:ee");
            assert_eq!(a.ip, "10.77.0.5".parse::<Ipv4Addr>().unwrap());
            assert_eq!((a.prefix, a.gateway), (24, "10.77.0.1".parse().unwrap()));
            assert_eq!(a.dns, vec!["10.77.0.53".parse::<Ipv4Addr>().unwrap()]);
            assert!(tap_in_netns(&a));
            // No extra TAP was made next to it.
            let extra = beacon_netmgr::naming::tap_name("tapped");
            let probe = NetworkAttachment { tap: extra, ..a.clone() };
            assert!(!tap_in_netns(&probe));
            let ns = a.netns.clone().unwrap();
            mgr.teardown("tapped").await.unwrap();
            assert!(!ns.exists());
        });
    }
}

/// Start `beacon-net setup --hold interrupted` (a stand-in for a shim) in CNI mode
/// with a chain whose second plugin hangs, and SIGKILL it once the hanging plugin
/// runs, that is once the bridge plugin's ADD (and its address reservation) is
/// complete. The hanging plugin is killed too (by the pid it wrote).
fn crash_mid_add(env: &Env) -> beacon_netmgr::NetConfig {
    let marker = env.dir.path().join("hang.pid");
    let bin = bin_dir_with(
        env,
        "hang",
        &format!(
            "#!/bin/sh\ncat >/dev/null\n[ \"$CNI_COMMAND\" = ADD ] || exit 0\n\
             echo $$ > '{m}.tmp' && mv '{m}.tmp' '{m}'\nexec sleep 600\n",
            m = marker.display()
        ),
    );
    let cfg = env.config(&two_plugin_list(env, "hang"), &bin);
    let cni = cfg.cni.clone().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_beacon-net"))
        .args(["setup", "--hold", "interrupted"])
        .env("BEACON_STATE_DIR", env.dir.path().join("state"))
        .env("BEACON_RUN_DIR", env.dir.path().join("run"))
        .env("BEACON_CNI_MODE", "1")
        .env("BEACON_CNI_CONF_DIR", &cni.conf_dir)
        .env("BEACON_CNI_BIN_DIR", &cni.bin_dir)
        .env("BEACON_CNI_NETNS_DIR", &cni.netns_dir)
        .spawn()
        .unwrap();
    // The deadline bounds a hang; it is not a timing assumption.
    let started = wait_until(Duration::from_secs(60), || marker.exists());
    assert!(started, "the hanging plugin started");
    assert_eq!(env.reserved().len(), 1, "bridge ADD ran");
    child.kill().unwrap(); // SIGKILL: no teardown runs
    child.wait().unwrap();
    let pid: i32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill has no memory-safety preconditions; `pid` is the hanging plugin
    // this test started, still sleeping (its parent was killed, not it).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    cfg
}

netns_test! {
    fn sigkill_in_the_middle_of_add_is_cleaned_by_the_reconciler() {
        let env = Env::new();
        let cfg = crash_mid_add(&env);
        let netns_dir = cfg.cni.clone().unwrap().netns_dir;
        rt().block_on(async {
            let mgr = NetworkManager::new(cfg).unwrap();
            let leases = mgr.leases().list().unwrap();
            assert_eq!(leases.len(), 1, "the pending lease was committed before ADD");
            assert!(leases[0].ip.is_unspecified());
            // The real liveness check: the lock died with the killed owner.
            let report = mgr.reconcile_once().await.unwrap();
            assert_eq!(report.released, vec!["interrupted".to_string()], "{report:?}");
            assert!(env.reserved().is_empty(), "DEL freed the address");
            assert!(mgr.leases().list().unwrap().is_empty());
            let leftovers: Vec<_> = std::fs::read_dir(&netns_dir).unwrap().collect();
            assert!(leftovers.is_empty(), "namespace removed");
        });
    }
}

netns_test! {
    fn setup_again_after_a_crash_mid_add_does_not_leak_an_address() {
        let env = Env::new();
        crash_mid_add(&env);
        rt().block_on(async {
            let mgr = NetworkManager::new(env.standard()).unwrap();
            let _owner = own(&mgr, "interrupted");
            let a = mgr.setup("interrupted").await.unwrap();
            assert_eq!(env.reserved(), vec![a.ip.to_string()], "the first address was DELeted");
            assert!(arp_through_tap(&a, "cnitest0").await);
            mgr.teardown("interrupted").await.unwrap();
            assert!(env.reserved().is_empty());
        });
    }
}

fn iptables_rules() -> String {
    let out = std::process::Command::new("iptables")
        .arg("-S")
        .output()
        .expect("iptables (Debian package iptables)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

netns_test! {
    fn bridge_host_local_and_firewall_chain() {
        let env = Env::new();
        let list = two_plugin_list(&env, "firewall");
        rt().block_on(async {
            let mgr = NetworkManager::new(env.config(&list, &plugin_dir())).unwrap();
            let _owner = own(&mgr, "fw");
            let a = mgr.setup("fw").await.unwrap();
            let rules = iptables_rules();
            assert!(rules.contains("CNI-FORWARD") && rules.contains(&format!("{}/32", a.ip)), "{rules}");
            assert!(arp_through_tap(&a, "cnitest0").await);
            mgr.check("fw").await.unwrap();
            mgr.teardown("fw").await.unwrap();
            assert!(!iptables_rules().contains(&format!("{}/32", a.ip)));
            assert!(env.reserved().is_empty());
        });
    }
}

/// Run one plugin of `conflist` by hand, as containerd's CRI plugin does before
/// a shim sees the pod; returns the plugin's stdout.
fn run_plugin(command: &str, conflist: &str, ns: &Path, id: &str) -> String {
    let list: serde_json::Value = serde_json::from_str(conflist).unwrap();
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    let mut child = std::process::Command::new(plugin_dir().join("bridge"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", ns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", plugin_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the bridge plugin (containernetworking-plugins)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "bridge {command}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The stdout of shell `command` run inside `ns`.
fn nsenter(ns: &Path, command: &str) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["sh", "-c", command])
        .output()
        .expect("nsenter (util-linux)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tc qdisc show` and `ip -o link` inside `ns`.
fn tc_and_links(ns: &Path) -> String {
    nsenter(ns, "tc qdisc show; ip -o link")
}

netns_test! {
    fn a_pod_network_made_by_the_cri_plugin_is_joined_and_left_clean() {
        use beacon_netmgr::cni::pod;
        let env = Env::new();
        let conflist = example_conflist("pod-net", "cripod0", "10.98.0.0/24", &env.ipam());
        let ns = env.dir.path().join("cni-1234");
        netns::create(&ns).unwrap();
        let result = run_plugin("ADD", &conflist, &ns, "pod1");
        let p = pod::attach(&ns, "pod 1").unwrap();
        assert_eq!(p.interface, "eth0");
        assert_eq!(p.network.prefix, 24);
        assert_eq!(p.network.gateway, "10.98.0.1".parse::<Ipv4Addr>().unwrap());
        assert!(result.contains(&p.network.ip.to_string()), "the guest takes the address the chain gave: {result}");
        assert_eq!(p.network.netns.as_deref(), Some(ns.as_path()));
        assert_ne!(p.network.tap, "eth0");
        let seen = tc_and_links(&ns);
        assert!(seen.contains(&p.network.tap) && seen.contains("ingress"), "{seen}");
        // The guest answers as the veth: its MAC, its address, through the TAP.
        rt().block_on(async {
            assert!(arp_through_tap(&p.network, "cripod0").await, "the CNI bridge answered through the TAP");
        });
        drop(p.network.open_tap().unwrap());

        // CRI PortForward: what the namespace dials on its loopback reaches
        // the listener, which learns the port that was dialled.
        nsenter(&ns, "ip link set lo up");
        let listener = pod::forward_localhost(&ns).unwrap();
        for (addr, port) in [("127.0.0.1", 8080u16), ("127.0.0.1", 1), ("127.9.9.9", 65535)] {
            let target = format!("{addr}:{port}");
            let dialled = std::thread::scope(|t| {
                let ns = ns.clone();
                let dial = t.spawn(move || {
                    netns::run_in(&ns, move || async move {
                        Ok(std::net::TcpStream::connect(target).map(|_| ()))
                    })
                });
                let (conn, _) = listener.accept().unwrap();
                dial.join().unwrap().unwrap().unwrap();
                pod::original_port(&conn).unwrap()
            });
            assert_eq!(dialled, port, "{addr}:{port}");
        }
        assert!(nsenter(&ns, "nft list tables").contains("beacon_portfwd"));
        // A second call (a restarted forwarder) replaces the rule, not adds one.
        let listener = pod::forward_localhost(&ns).unwrap();
        let rules = nsenter(&ns, "nft list table ip beacon_portfwd");
        assert_eq!(rules.matches("redirect").count(), 1, "{rules}");
        drop(listener);

        pod::detach(&p).unwrap();
        let seen = tc_and_links(&ns);
        assert!(!seen.contains(&p.network.tap) && !seen.contains("ingress"), "the TAP and the redirect are gone: {seen}");
        assert!(!nsenter(&ns, "nft list tables").contains("beacon_portfwd"), "the port forward table is gone");
        assert!(seen.contains("eth0"), "the chain's interface stays for CNI DEL: {seen}");
        // Idempotent; and once the CRI plugin removed the namespace, nothing to do.
        pod::detach(&p).unwrap();
        run_plugin("DEL", &conflist, &ns, "pod1");
        netns::remove(&ns).unwrap();
        pod::detach(&p).unwrap();
    }
}

netns_test! {
    fn a_pod_namespace_without_an_ipv4_interface_is_refused_and_left_as_it_was() {
        use beacon_netmgr::cni::pod;
        let env = Env::new();
        let ns = env.dir.path().join("cni-empty");
        netns::create(&ns).unwrap();
        let e = pod::attach(&ns, "pod2").unwrap_err();
        assert!(matches!(e, NetError::PodNetwork { .. }) && e.to_string().contains("no interface other than loopback"), "{e}");
        let seen = tc_and_links(&ns);
        assert!(!seen.contains(&beacon_netmgr::naming::tap_name("pod2")) && !seen.contains("ingress"), "{seen}");
        netns::remove(&ns).unwrap();
    }
}
