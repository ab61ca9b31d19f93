//! Runs test bodies inside a fresh network (and mount) namespace: the test re-executes
//! its own binary under `unshare --net --mount`, with a private /sys, and checks the
//! child ran exactly that one test and passed. Nothing here touches the host's links
//! or nftables.

use std::os::unix::fs::MetadataExt;
use std::process::Command;

const CHILD_ENV: &str = "BEACON_NETMGR_NETNS_CHILD";

/// Run `body` in a fresh network namespace. `name` is the test's path without the
/// crate (`module::test`).
pub fn in_fresh_netns(name: &str, body: impl FnOnce()) {
    let mine = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    if let Some(parent) = std::env::var_os(CHILD_ENV) {
        assert_ne!(
            parent.to_string_lossy(),
            mine.to_string(),
            "refusing to run a network test in the parent's namespace"
        );
        body();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args([
            "--net",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
        ])
        .arg("mount -t sysfs sysfs /sys && exec \"$0\" \"$@\"")
        .arg(&exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mine.to_string())
        .output()
        .expect("run unshare (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "test {name} in a fresh netns failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
}

/// Declare a `#[test]` whose body runs in a fresh network namespace.
#[macro_export]
macro_rules! netns_test {
    ($(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            let path = module_path!();
            let module = path.split_once("::").map_or("", |(_, m)| m);
            let name = if module.is_empty() {
                stringify!($name).to_string()
            } else {
                format!("{module}::{}", stringify!($name))
            };
            $crate::harness::in_fresh_netns(&name, || $body);
        }
    };
}

/// Poll `ready` until it holds or `limit` passed; returns whether it held. The
/// limit only bounds a hang: pick it far above the expected wait.
pub fn wait_until(limit: std::time::Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if ready() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Whether the link `name` passes frames: operationally up (for a TAP: a queue is
/// open, so it has carrier) and, if it is a bridge port, in the forwarding state.
pub async fn link_ready(h: &rtnetlink::Handle, name: &str) -> bool {
    use netlink_packet_route::link::{
        BridgePortState, InfoBridgePort, InfoPortData, LinkAttribute, LinkInfo, State,
    };
    let Ok(Some(msg)) = beacon_netmgr::link::get_link(h, name).await else {
        return false;
    };
    let up = msg
        .attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::OperState(State::Up)));
    let port_states: Vec<BridgePortState> = msg
        .attributes
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => Some(infos),
            _ => None,
        })
        .flatten()
        .filter_map(|i| match i {
            LinkInfo::PortData(InfoPortData::BridgePort(port)) => Some(port),
            _ => None,
        })
        .flatten()
        .filter_map(|p| match p {
            InfoBridgePort::State(s) => Some(*s),
            _ => None,
        })
        .collect();
    up && port_states
        .iter()
        .all(|s| *s == BridgePortState::Forwarding)
}

/// Wait until every link in `names` passes frames ([`link_ready`]). The limit only
/// bounds a hang; readiness normally takes milliseconds.
pub async fn wait_links_ready(h: &rtnetlink::Handle, names: &[&str]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut all = true;
        for name in names {
            all &= link_ready(h, name).await;
        }
        if all {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "links {names:?} did not come up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// The bridge ports of `bridge`, by name.
pub async fn bridge_ports(h: &rtnetlink::Handle, bridge: &str) -> Vec<String> {
    let index = beacon_netmgr::link::link_index(h, bridge)
        .await
        .unwrap()
        .expect("the bridge exists");
    beacon_netmgr::link::list_links(h)
        .await
        .unwrap()
        .iter()
        .filter(|m| beacon_netmgr::link::link_controller(m) == Some(index))
        .filter_map(|m| beacon_netmgr::link::link_name(m).map(str::to_string))
        .collect()
}

/// A current-thread tokio runtime (everything stays on the test's thread and namespace).
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Own `sandbox_id` (hold its liveness lock) as its shim would, for the guard's life.
pub fn own(mgr: &beacon_netmgr::NetworkManager, sandbox_id: &str) -> beacon_netmgr::LivenessGuard {
    mgr.liveness().acquire(sandbox_id).unwrap()
}

/// A legacy configuration with its database, lock and namespace folders in `dir`.
pub fn legacy_config(dir: &std::path::Path) -> beacon_netmgr::NetConfig {
    let mut cfg = beacon_netmgr::NetConfig::legacy(&beacon_paths::BeaconPaths::under(dir));
    cfg.dns = vec!["192.0.2.53".parse().unwrap()];
    cfg
}

/// `nft -j list ruleset` of the current namespace.
pub fn nft_ruleset() -> serde_json::Value {
    nft_json(&["list", "ruleset"])
}

/// `nft -j ARGS...` in the current namespace, parsed (it must succeed).
pub fn nft_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new("nft").arg("-j").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Count the (table, kind) objects of family ip in a ruleset.
pub fn count(ruleset: &serde_json::Value, kind: &str, table: &str) -> usize {
    ruleset["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| {
            let obj = &o[kind];
            let t = if kind == "table" {
                &obj["name"]
            } else {
                &obj["table"]
            };
            t.as_str() == Some(table)
        })
        .count()
}

/// Read a `/sys/class/net/<dev>/<attr>` value (needs the private /sys of the harness).
pub fn sysfs(dev: &str, attr: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/{attr}"))
        .ok()
        .map(|s| s.trim().to_string())
}
