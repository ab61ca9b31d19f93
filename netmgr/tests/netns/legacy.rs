//! Legacy mode: bridge, nftables, TAPs, leases, reconciler, bad input.

use std::collections::HashSet;

use beacon_netmgr::{link, naming, tap, LeaseOwner, NetError, NetworkManager, PoolRange};

use crate::harness::{count, legacy_config, nft_ruleset, own, rt, sysfs};
use crate::netns_test;

netns_test! {
    fn bridge_and_nat_rules_exist_and_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mgr = NetworkManager::new(legacy_config(dir.path())).unwrap();
            for _ in 0..3 {
                mgr.ensure_host(true).await.unwrap();
            }
            // A second manager (another shim process) finds everything in place.
            let other = NetworkManager::new(legacy_config(dir.path())).unwrap();
            other.ensure_host(false).await.unwrap();
            let _owner = own(&other, "sb-1");
            other.setup("sb-1").await.unwrap();

            let rules = nft_ruleset();
            assert_eq!(count(&rules, "table", "beacon_runner_filter"), 1);
            assert_eq!(count(&rules, "table", "beacon_runner_nat"), 1);
            // forward: guest to guest via the host, from the bridge, replies to
            // it, drop; input: replies, DNS 192.0.2.53 (udp, tcp), drop.
            assert_eq!(count(&rules, "rule", "beacon_runner_filter"), 8, "{rules}");
            assert_eq!(count(&rules, "table", "beacon_runner_guard"), 1);
            assert_eq!(count(&rules, "rule", "beacon_runner_nat"), 1, "{rules}");
            let text = rules.to_string();
            assert!(text.contains("masquerade") && text.contains("\"10.88.0.0\""));
            assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap().trim(), "1");

            let h = link::connect().unwrap();
            let bridge = link::get_link(&h, "beacon0").await.unwrap().expect("bridge exists");
            let ifflags = u32::from_str_radix(sysfs("beacon0", "flags").unwrap().trim_start_matches("0x"), 16).unwrap();
            assert_eq!(ifflags & 1, 1, "bridge is up");
            let addrs = std::process::Command::new("ip").args(["-4", "-o", "addr", "show", "dev", "beacon0"]).output().unwrap();
            assert!(String::from_utf8_lossy(&addrs.stdout).contains("10.88.0.1/16"));
            assert!(bridge.header.index > 0);

            mgr.cleanup().await.unwrap();
            let rules = nft_ruleset();
            assert_eq!(count(&rules, "table", "beacon_runner_filter"), 0);
            assert_eq!(count(&rules, "table", "beacon_runner_nat"), 0);
            assert_eq!(count(&rules, "table", "beacon_runner_guard"), 0);
            assert!(link::get_link(&h, "beacon0").await.unwrap().is_none());
            mgr.cleanup().await.unwrap();
        });
    }
}

netns_test! {
    fn setup_creates_an_attached_vnet_tap_and_teardown_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mgr = NetworkManager::new(legacy_config(dir.path())).unwrap();
            let id = "odd id/with spaces;$(and) ünïcode";
            let owner = own(&mgr, id);
            let a = mgr.setup(id).await.unwrap();
            assert_eq!(a.tap, naming::tap_name(id));
            assert!(a.tap.len() <= 15);
            assert_eq!(a.ip, "10.88.0.2".parse::<std::net::Ipv4Addr>().unwrap());
            assert_eq!((a.prefix, a.gateway), (16, "10.88.0.1".parse().unwrap()));
            assert_eq!(a.dns, vec!["192.0.2.53".parse::<std::net::Ipv4Addr>().unwrap()]);
            assert_eq!(a.netns, None);

            let h = link::connect().unwrap();
            let bridge = link::link_index(&h, "beacon0").await.unwrap().unwrap();
            let tap_msg = link::get_link(&h, &a.tap).await.unwrap().expect("tap exists");
            assert_eq!(link::link_controller(&tap_msg), Some(bridge));
            let flags = u32::from_str_radix(sysfs(&a.tap, "tun_flags").unwrap().trim_start_matches("0x"), 16).unwrap();
            assert_eq!(flags & 0x0002, 0x0002, "IFF_TAP");
            assert_eq!(flags & 0x4000, 0x4000, "IFF_VNET_HDR");
            assert_eq!(flags & 0x0800, 0x0800, "IFF_PERSIST");
            // SAFETY: geteuid has no preconditions.
            let euid = unsafe { libc::geteuid() };
            assert_eq!(sysfs(&a.tap, "owner").unwrap(), euid.to_string());
            let ifflags = u32::from_str_radix(sysfs(&a.tap, "flags").unwrap().trim_start_matches("0x"), 16).unwrap();
            assert_eq!(ifflags & 1, 1, "IFF_UP");

            // The VMM can open it with the virtio-net header.
            drop(a.open_tap().unwrap());
            // Setup again: same attachment, nothing new.
            assert_eq!(mgr.setup(id).await.unwrap(), a);
            assert_eq!(mgr.leases().list().unwrap().len(), 1);

            mgr.teardown(id).await.unwrap();
            assert!(link::get_link(&h, &a.tap).await.unwrap().is_none());
            assert!(mgr.leases().list().unwrap().is_empty());
            assert!(mgr.leases().leased_addresses().unwrap().is_empty());
            mgr.teardown(id).await.unwrap();
            mgr.teardown("never-existed").await.unwrap();
            drop(owner);

            // Deferred teardown: the lease is gone at once, the TAP once the thread ends.
            let _owner = own(&mgr, "deferred");
            let b = mgr.setup("deferred").await.unwrap();
            let thread = mgr.teardown_deferred("deferred").await.unwrap().expect("legacy");
            assert!(mgr.leases().get("deferred").unwrap().is_none());
            assert!(thread.join().unwrap().unwrap(), "the TAP existed and was deleted");
            assert!(link::get_link(&h, &b.tap).await.unwrap().is_none());

            assert!(matches!(mgr.setup("").await, Err(NetError::InvalidSandboxId(_))));
            assert!(matches!(mgr.setup("a\0b").await, Err(NetError::InvalidSandboxId(_))));
            // Nobody owns "orphan": setup refuses rather than hand out a lease the
            // next reconciler pass would free.
            let err = mgr.setup("orphan").await.unwrap_err();
            assert!(matches!(err, NetError::SandboxNotAlive { .. }), "{err}");
            assert!(err.to_string().contains("beacon-net teardown"), "{err}");
            assert!(mgr.leases().get("orphan").unwrap().is_none());
        });
    }
}

netns_test! {
    fn two_hundred_setups_get_unique_ips_and_taps() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mgr = NetworkManager::new(legacy_config(dir.path())).unwrap();
            let mut ips = HashSet::new();
            let mut taps = HashSet::new();
            let mut owners = Vec::new();
            for i in 0..200 {
                owners.push(own(&mgr, &format!("sandbox-{i}")));
                let a = mgr.setup(&format!("sandbox-{i}")).await.unwrap();
                assert!(ips.insert(a.ip), "duplicate ip {}", a.ip);
                assert!(taps.insert(a.tap.clone()), "duplicate tap {}", a.tap);
            }
            let h = link::connect().unwrap();
            let bridge = link::link_index(&h, "beacon0").await.unwrap().unwrap();
            let attached = link::list_links(&h)
                .await
                .unwrap()
                .iter()
                .filter(|m| link::link_controller(m) == Some(bridge))
                .count();
            assert_eq!(attached, 200);
            assert_eq!(mgr.leases().leased_addresses().unwrap().len(), 200);
        });
    }
}

netns_test! {
    fn pool_exhaustion_is_a_clear_error_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mut cfg = legacy_config(dir.path());
            cfg.pool = PoolRange::parse("10.88.0.2-10.88.0.4").unwrap();
            let mgr = NetworkManager::new(cfg).unwrap();
            let _owners: Vec<_> = ["sb-0", "sb-1", "sb-2", "sb-too-many"].iter().map(|id| own(&mgr, id)).collect();
            for i in 0..3 {
                mgr.setup(&format!("sb-{i}")).await.unwrap();
            }
            let err = mgr.setup("sb-too-many").await.unwrap_err();
            assert!(matches!(err, NetError::PoolExhausted { size: 3, .. }), "{err}");
            assert!(err.to_string().contains("exhausted"));
            let h = link::connect().unwrap();
            assert!(link::get_link(&h, &naming::tap_name("sb-too-many")).await.unwrap().is_none());
            mgr.teardown("sb-1").await.unwrap();
            assert_eq!(mgr.setup("sb-too-many").await.unwrap().ip, "10.88.0.3".parse::<std::net::Ipv4Addr>().unwrap());
        });
    }
}

netns_test! {
    fn reconciler_frees_dead_sandboxes_and_orphan_taps() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mgr = NetworkManager::new(legacy_config(dir.path())).unwrap();
            let _owners: Vec<_> = ["alive-a", "dead-b", "alive-c"].iter().map(|id| own(&mgr, id)).collect();
            let a = mgr.setup("alive-a").await.unwrap();
            let dead = mgr.setup("dead-b").await.unwrap();
            let c = mgr.setup("alive-c").await.unwrap();
            // A TAP left by a crash between lease release and TAP deletion.
            tap::create_persistent_tap("beacon-deadbeef").unwrap();
            // A lease whose TAP is already gone (crash after TAP deletion).
            mgr.leases().allocate("dead-no-tap", &naming::tap_name("dead-no-tap"), naming::guest_mac("dead-no-tap"), LeaseOwner::Shim).unwrap();
            // An operator's lease: never freed by the reconciler, whatever liveness says.
            let pinned = mgr.setup_as("dead-but-pinned", LeaseOwner::Cli).await.unwrap();

            let alive = |id: &str| id.starts_with("alive-");
            let report = mgr.reconcile(&alive).await.unwrap();
            let mut released = report.released.clone();
            released.sort();
            assert_eq!(released, vec!["dead-b".to_string(), "dead-no-tap".to_string()]);
            assert_eq!(report.orphan_taps, vec!["beacon-deadbeef".to_string()]);
            assert!(report.failed.is_empty());

            let h = link::connect().unwrap();
            assert!(link::get_link(&h, &dead.tap).await.unwrap().is_none());
            assert!(link::get_link(&h, "beacon-deadbeef").await.unwrap().is_none());
            assert!(link::get_link(&h, &a.tap).await.unwrap().is_some());
            assert!(link::get_link(&h, &c.tap).await.unwrap().is_some());
            assert!(link::get_link(&h, &pinned.tap).await.unwrap().is_some());
            let mut left: Vec<_> = mgr.leases().leased_addresses().unwrap();
            left.sort();
            assert_eq!(left, vec![a.ip, c.ip, pinned.ip]);

            let again = mgr.reconcile(&alive).await.unwrap();
            assert_eq!(again, beacon_netmgr::ReconcileReport::default());
            // The reconciler refreshed the nftables tables: still exactly one copy.
            assert_eq!(count(&nft_ruleset(), "rule", "beacon_runner_nat"), 1);
        });
    }
}

netns_test! {
    fn missing_nft_is_reported_clearly() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mut cfg = legacy_config(dir.path());
            cfg.nft_program = "/nonexistent/nft".into();
            let mgr = NetworkManager::new(cfg).unwrap();
            let _owner = own(&mgr, "sb");
            let err = mgr.setup("sb").await.unwrap_err();
            assert!(matches!(err, NetError::NftMissing { .. }), "{err}");
            assert!(err.to_string().contains("nftables"));
            assert!(mgr.leases().list().unwrap().is_empty());
        });
    }
}
