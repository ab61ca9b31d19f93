//! Sandbox liveness dies with its owner: leases of SIGKILLed owners and of
//! sandboxes from before a reboot are reclaimed, live owners' and operators'
//! leases are kept.

use std::os::unix::process::ExitStatusExt;

use beacon_netmgr::{link, NetworkManager};

use crate::cli::{beacon_net, state_of, Holder};
use crate::harness::{legacy_config, own, rt};
use crate::netns_test;

async fn tap_exists(name: &str) -> bool {
    let h = link::connect().unwrap();
    link::get_link(&h, name).await.unwrap().is_some()
}

netns_test! {
    fn cli_setup_survives_reconcile_until_teardown() {
        // Reproduced before: `beacon-net setup X` then `beacon-net reconcile` freed
        // X's lease and deleted its TAP.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let out = beacon_net(root, &["setup", "X"]);
        let tap = out.split_whitespace().next().unwrap().trim_start_matches("tap=").to_string();
        let rec = beacon_net(root, &["reconcile"]);
        assert!(rec.contains("released: []") && rec.contains("orphan taps deleted: []"), "{rec}");
        assert!(beacon_net(root, &["list"]).contains("X "));
        rt().block_on(async { assert!(tap_exists(&tap).await) });
        beacon_net(root, &["teardown", "X"]);
        assert_eq!(beacon_net(root, &["list"]), "");
        rt().block_on(async { assert!(!tap_exists(&tap).await) });
    }
}

netns_test! {
    fn a_sigkilled_owner_is_reclaimed_and_a_live_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let live = Holder::start(root, "live");
        let killed = Holder::start(root, "killed");
        let (live_tap, killed_tap) = (live.tap(), killed.tap());
        killed.sigkill();

        let rec = beacon_net(root, &["reconcile"]);
        assert!(rec.contains("released: [\"killed\"]"), "{rec}");
        let list = beacon_net(root, &["list"]);
        assert!(list.contains("live ") && !list.contains("killed"), "{list}");
        rt().block_on(async {
            assert!(tap_exists(&live_tap).await, "the live owner's TAP is kept");
            assert!(!tap_exists(&killed_tap).await, "the dead owner's TAP is deleted");
        });
        // Nothing left to do while the owner lives.
        let rec = beacon_net(root, &["reconcile"]);
        assert!(rec.contains("released: []"), "{rec}");

        // An owner stopped cleanly tears its own network down.
        let mut live = live;
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        assert_eq!(unsafe { libc::kill(live.child.id() as i32, libc::SIGTERM) }, 0);
        let status = live.child.wait().unwrap();
        assert!(status.success(), "{status:?} (signal {:?})", status.signal());
        assert_eq!(beacon_net(root, &["list"]), "");
        rt().block_on(async { assert!(!tap_exists(&live_tap).await) });
    }
}

netns_test! {
    fn stale_state_after_a_reboot_is_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let before = Holder::start(root, "before-reboot");
        let tap = before.tap();
        // The reboot: every process dies, links and nftables vanish, the runtime
        // folder (a tmpfs) comes back empty. What lives under the state folder
        // stays, including the folder the old liveness check trusted.
        before.sigkill();
        beacon_net(root, &["cleanup"]);
        rt().block_on(async {
            let h = link::connect().unwrap();
            link::delete_link(&h, &tap).await.unwrap();
        });
        std::fs::remove_dir_all(root.join("run")).unwrap();
        std::fs::create_dir_all(state_of(root).join("sandboxes").join("before-reboot")).unwrap();

        let rec = beacon_net(root, &["reconcile"]);
        assert!(rec.contains("released: [\"before-reboot\"]"), "{rec}");
        assert_eq!(beacon_net(root, &["list"]), "");
        let cfg = legacy_config(root);
        let db = beacon_netmgr::LeaseDb::new(cfg.db_path, cfg.pool, cfg.gateway, cfg.prefix);
        assert!(db.leased_addresses().unwrap().is_empty(), "the address is free again");
        // And the host works as after any reboot.
        Holder::start(root, "after-reboot").sigkill();
    }
}

netns_test! {
    fn the_shim_api_keeps_its_own_sandbox_and_frees_it_after_the_guard() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mgr = NetworkManager::new(legacy_config(dir.path())).unwrap();
            let guard = own(&mgr, "mine");
            let a = mgr.setup("mine").await.unwrap();
            // A shim starting (its own guard held) reconciles without harm to itself
            // or to other live owners, here a second manager as another shim.
            let other = NetworkManager::new(legacy_config(dir.path())).unwrap();
            let report = other.reconcile_once().await.unwrap();
            assert!(report.released.is_empty() && report.failed.is_empty(), "{report:?}");
            assert!(tap_exists(&a.tap).await);
            // A guard dropped without teardown (the shim died): freed by the next pass.
            drop(guard);
            let report = other.reconcile_once().await.unwrap();
            assert_eq!(report.released, vec!["mine".to_string()]);
            assert!(!tap_exists(&a.tap).await);
            assert!(mgr.leases().list().unwrap().is_empty());
        });
    }
}
