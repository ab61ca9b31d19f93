//! The `beacon-net` operator binary and the background reconciler, end to end.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use beacon_netmgr::{link, spawn_reconciler, NetworkManager};

use crate::harness::{count, legacy_config, nft_ruleset, rt};
use crate::netns_test;

const BIN: &str = env!("CARGO_BIN_EXE_beacon-net");

fn beacon_net(state: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env("BEACON_STATE_DIR", state)
        .env("BEACON_DNS", "192.0.2.53")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "beacon-net {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

netns_test! {
    fn operator_commands_list_reconcile_cleanup_and_recover() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        // "running" has a sandbox state folder, "gone" does not.
        std::fs::create_dir_all(state.join("sandboxes").join("running")).unwrap();
        let out = beacon_net(&state, &["setup", "running"]);
        assert!(out.contains("ip=10.88.0.2/16") && out.contains("gateway=10.88.0.1"), "{out}");
        beacon_net(&state, &["setup", "gone"]);
        let list = beacon_net(&state, &["list"]);
        assert!(list.contains("running") && list.contains("gone") && list.contains("10.88.0.3"), "{list}");
        let json = beacon_net(&state, &["list", "--json"]);
        assert_eq!(json.lines().count(), 2);

        let rec = beacon_net(&state, &["reconcile"]);
        assert!(rec.contains("released: [\"gone\"]"), "{rec}");
        let list = beacon_net(&state, &["list"]);
        assert!(list.contains("running") && !list.contains("gone"), "{list}");

        // recover-db refuses while beacon TAPs exist.
        let out = Command::new(BIN).arg("recover-db").env("BEACON_STATE_DIR", &state).output().unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));

        beacon_net(&state, &["teardown", "running"]);
        beacon_net(&state, &["cleanup"]);
        let rules = nft_ruleset();
        assert_eq!(count(&rules, "table", "beacon_runner_nat"), 0);
        std::fs::write(state.join("network.db"), b"not a database").unwrap();
        let out = Command::new(BIN).arg("list").env("BEACON_STATE_DIR", &state).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("network.db") && err.contains("recover-db"), "{err}");
        let moved = beacon_net(&state, &["recover-db"]);
        assert!(moved.contains("corrupt-"), "{moved}");
        assert_eq!(beacon_net(&state, &["list"]), "");
    }
}

netns_test! {
    fn background_reconciler_frees_dead_leases() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mgr = Arc::new(NetworkManager::new(legacy_config(dir.path())).unwrap());
            let dead = mgr.setup("dead").await.unwrap();
            mgr.setup("alive").await.unwrap();
            let task = spawn_reconciler(
                mgr.clone(),
                Duration::from_millis(50),
                Arc::new(|id: &str| id == "alive"),
            );
            let h = link::connect().unwrap();
            let mut freed = false;
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if mgr.leases().get("dead").unwrap().is_none() {
                    freed = true;
                    break;
                }
            }
            task.abort();
            assert!(freed, "the reconciler freed the dead sandbox's lease");
            assert!(link::get_link(&h, &dead.tap).await.unwrap().is_none());
            assert!(mgr.leases().get("alive").unwrap().is_some());
        });
    }
}
