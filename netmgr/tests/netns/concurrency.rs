//! Many processes share one network.db: concurrent allocations never collide, and
//! a process killed with SIGKILL in the middle of allocating leaves a consistent
//! database. The allocations touch only the database; the final reconciler pass
//! runs in a fresh network namespace.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use beacon_netmgr::{LeaseDb, NetConfig, RepairReport};

use crate::netns_test;

const BIN: &str = env!("CARGO_BIN_EXE_beacon-net");

fn cfg(state: &std::path::Path) -> NetConfig {
    let state = state.as_os_str().to_owned();
    let mut cfg = NetConfig::legacy(&beacon_paths::BeaconPaths::from_lookup(|k| {
        (k == beacon_paths::STATE_DIR_ENV).then(|| state.clone())
    }));
    cfg.liveness_dir = std::path::Path::new(&state).join("run-sandboxes");
    cfg
}

fn db(state: &std::path::Path) -> LeaseDb {
    let c = cfg(state);
    LeaseDb::new(c.db_path, c.pool, c.gateway, c.prefix)
}

#[test]
fn fifty_concurrent_processes_get_distinct_ips() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let children: Vec<_> = (0..50)
        .map(|i| {
            Command::new(BIN)
                .args(["allocate", &format!("proc-{i}")])
                .env("BEACON_STATE_DIR", &state)
                .env("BEACON_RUN_DIR", dir.path().join("run"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ips = HashSet::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ip: Ipv4Addr = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert!(ips.insert(ip), "duplicate {ip}");
    }
    let d = db(&state);
    let leases = d.list().unwrap();
    assert_eq!(leases.len(), 50);
    let stored: HashSet<_> = leases.iter().map(|l| l.ip).collect();
    assert_eq!(stored, ips);
    assert_eq!(d.leased_addresses().unwrap().len(), 50);
    assert_eq!(d.repair().unwrap(), RepairReport::default());
}

netns_test! {
    fn sigkill_during_allocation_leaves_the_database_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut committed: HashMap<String, Ipv4Addr> = HashMap::new();
    for round in 0..6u64 {
        let mut child = Command::new(BIN)
            .args([
                "stress-allocate",
                "--prefix",
                &format!("r{round}"),
                "--count",
                "100000",
            ])
            .env("BEACON_STATE_DIR", &state)
            .env("BEACON_RUN_DIR", dir.path().join("run"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if got.is_empty() {
                    let _ = first_tx.send(());
                }
                got.push(line);
            }
            got
        });
        let start = Instant::now();
        first_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the allocator child committed a first lease");
        // Kill at a different point of the transaction stream each round.
        std::thread::sleep(Duration::from_millis(3 + round * 11));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        assert!(
            !lines.is_empty(),
            "round {round}: nothing allocated in {:?}",
            start.elapsed()
        );
        for line in lines {
            let (id, ip) = line.split_once(' ').unwrap();
            committed.insert(id.to_string(), ip.parse().unwrap());
        }

        // Open the file again as a fresh process would, and check it.
        let d = db(&state);
        let leases = d.list().unwrap();
        let by_id: HashMap<_, _> = leases
            .iter()
            .map(|l| (l.sandbox_id.clone(), l.ip))
            .collect();
        for (id, ip) in &committed {
            assert_eq!(
                by_id.get(id),
                Some(ip),
                "round {round}: committed lease {id} lost"
            );
        }
        // At most the one transaction in flight may have committed unreported.
        assert!(leases.len() <= committed.len() + round as usize + 1);
        let ips: HashSet<_> = leases.iter().map(|l| l.ip).collect();
        assert_eq!(ips.len(), leases.len(), "round {round}: duplicate IP");
        let mut bitmap = d.leased_addresses().unwrap();
        bitmap.sort();
        let mut lease_ips: Vec<_> = ips.into_iter().collect();
        lease_ips.sort();
        assert_eq!(bitmap, lease_ips, "round {round}: bitmap matches leases");
        assert_eq!(
            d.repair().unwrap(),
            RepairReport::default(),
            "round {round}"
        );
        for l in leases {
            committed.insert(l.sandbox_id, l.ip);
        }
        // And the pool keeps working.
        let next = d
            .allocate(
                &format!("after-{round}"),
                &format!("beacon-{round:08x}"),
                beacon_netmgr::MacAddr([2, 0, 0, 0, 0, 9]),
                beacon_netmgr::LeaseOwner::Cli,
            )
            .unwrap();
        assert!(!committed.values().any(|ip| *ip == next.ip));
        committed.insert(format!("after-{round}"), next.ip);
    }
    // A full reconciler pass (everything alive) finds nothing to fix either.
    let mut cfg = cfg(&state);
    cfg.dns = Vec::new();
    crate::harness::rt().block_on(async {
        let mgr = beacon_netmgr::NetworkManager::new(cfg).unwrap();
        let before = mgr.leases().list().unwrap();
        let report = mgr.reconcile(&|_: &str| true).await.unwrap();
        assert_eq!(report, beacon_netmgr::ReconcileReport::default());
        assert_eq!(mgr.leases().list().unwrap(), before);
    });
    }
}
