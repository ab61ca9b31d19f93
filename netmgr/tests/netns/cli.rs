//! The `beacon-net` operator binary and the background reconciler, end to end.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use beacon_netmgr::{link, spawn_reconciler, NetworkManager};

use crate::harness::{count, legacy_config, nft_ruleset, own, rt, wait_until};
use crate::netns_test;

pub const BIN: &str = env!("CARGO_BIN_EXE_beacon-net");

/// `beacon-net` with every folder under `root` (`state/`, `run/`), as
/// `BeaconPaths::under(root)` lays them out.
pub fn command(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("BEACON_STATE_DIR", root.join("state"))
        .env("BEACON_RUN_DIR", root.join("run"))
        .env("BEACON_DNS", "192.0.2.53");
    cmd
}

/// Run `beacon-net`, assert success, return its stdout.
pub fn beacon_net(root: &Path, args: &[&str]) -> String {
    let out = command(root, args).output().unwrap();
    assert!(
        out.status.success(),
        "beacon-net {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running `beacon-net setup --hold ID`: owns the sandbox like a shim does.
pub struct Holder {
    pub child: Child,
    /// The attachment line it printed once the network was up.
    pub attachment: String,
}

impl Holder {
    pub fn start(root: &Path, sandbox_id: &str) -> Holder {
        let mut child = command(root, &["setup", "--hold", sandbox_id])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        // The deadline bounds a hang only; setup takes milliseconds.
        let attachment = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("beacon-net setup --hold printed its attachment");
        assert!(
            attachment.starts_with("tap="),
            "setup --hold {sandbox_id} failed (see its stderr above): {attachment:?}"
        );
        Holder { child, attachment }
    }

    pub fn tap(&self) -> String {
        let tap = self.attachment.split_whitespace().next().unwrap();
        tap.trim_start_matches("tap=").to_string()
    }

    /// SIGKILL: the owner dies without tearing anything down.
    pub fn sigkill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Holder {
    /// A failing test must not leave an owner running (it would keep the
    /// harness's output pipe open).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn state_of(root: &Path) -> PathBuf {
    root.join("state")
}

netns_test! {
    fn operator_commands_list_reconcile_cleanup_and_recover() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let out = beacon_net(root, &["setup", "pinned"]);
        assert!(out.contains("ip=10.88.0.2/16") && out.contains("gateway=10.88.0.1"), "{out}");
        let held = Holder::start(root, "held");
        assert!(held.attachment.contains("ip=10.88.0.3/16"), "{}", held.attachment);
        let list = beacon_net(root, &["list"]);
        assert!(list.contains("pinned") && list.contains("held") && list.contains("10.88.0.3"), "{list}");
        assert!(list.lines().any(|l| l.starts_with("pinned") && l.contains(" cli ")), "{list}");
        assert!(list.lines().any(|l| l.starts_with("held") && l.contains(" shim ")), "{list}");
        let json = beacon_net(root, &["list", "--json"]);
        assert_eq!(json.lines().count(), 2);
        assert!(json.contains(r#""owner":"cli""#) && json.contains(r#""mac":"02:"#), "{json}");

        // recover-db refuses while beacon TAPs exist.
        let out = command(root, &["recover-db"]).output().unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));

        held.sigkill();
        beacon_net(root, &["teardown", "pinned"]);
        let rec = beacon_net(root, &["reconcile"]);
        assert!(rec.contains("released: [\"held\"]"), "{rec}");
        beacon_net(root, &["cleanup"]);
        let rules = nft_ruleset();
        assert_eq!(count(&rules, "table", "beacon_runner_nat"), 0);
        std::fs::write(state_of(root).join("network.db"), b"not a database").unwrap();
        let out = command(root, &["list"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("network.db") && err.contains("recover-db"), "{err}");
        let moved = beacon_net(root, &["recover-db"]);
        assert!(moved.contains("corrupt-"), "{moved}");
        assert_eq!(beacon_net(root, &["list"]), "");
    }
}

netns_test! {
    fn background_reconciler_frees_dead_leases() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mgr = Arc::new(NetworkManager::new(legacy_config(dir.path())).unwrap());
            let _owners = (own(&mgr, "dead"), own(&mgr, "alive"));
            let dead = mgr.setup("dead").await.unwrap();
            mgr.setup("alive").await.unwrap();
            let task = spawn_reconciler(
                mgr.clone(),
                Duration::from_millis(50),
                Arc::new(|id: &str| id == "alive"),
            );
            // Poll the condition on a blocking thread while the reconciler task
            // runs on this one. The deadline only bounds a hang.
            let leases = mgr.leases().clone();
            let freed = tokio::task::spawn_blocking(move || {
                wait_until(Duration::from_secs(60), || leases.get("dead").unwrap().is_none())
            });
            let freed = freed.await.unwrap();
            task.abort();
            assert!(freed, "the reconciler freed the dead sandbox's lease");
            let h = link::connect().unwrap();
            assert!(link::get_link(&h, &dead.tap).await.unwrap().is_none());
            assert!(mgr.leases().get("alive").unwrap().is_some());
        });
    }
}
