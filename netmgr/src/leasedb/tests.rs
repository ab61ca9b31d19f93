//! Unit tests of the lease database (files in temporary folders).
use super::*;
use std::collections::HashSet;

fn db(dir: &Path, last: &str) -> LeaseDb {
    LeaseDb::new(
        dir.join("network.db"),
        PoolRange {
            first: "10.88.0.2".parse().unwrap(),
            last: last.parse().unwrap(),
        },
        "10.88.0.1".parse().unwrap(),
        16,
    )
}

fn mac() -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, 1])
}

#[test]
fn allocate_release_is_idempotent_and_persistent() {
    let dir = tempfile::tempdir().unwrap();
    let d = db(dir.path(), "10.88.255.254");
    let a = d
        .allocate("sb-a", "beacon-aaaaaaaa", mac(), LeaseOwner::Shim)
        .unwrap();
    assert_eq!(a.ip, "10.88.0.2".parse::<Ipv4Addr>().unwrap());
    let again = d
        .allocate("sb-a", "beacon-aaaaaaaa", mac(), LeaseOwner::Shim)
        .unwrap();
    assert_eq!(a, again);
    let b = d
        .allocate("sb-b", "beacon-bbbbbbbb", mac(), LeaseOwner::Shim)
        .unwrap();
    assert_ne!(a.ip, b.ip);
    let reopened = db(dir.path(), "10.88.255.254");
    assert_eq!(reopened.list().unwrap().len(), 2);
    assert_eq!(reopened.release("sb-a").unwrap().unwrap().ip, a.ip);
    assert_eq!(reopened.release("sb-a").unwrap(), None);
    assert_eq!(reopened.leased_addresses().unwrap(), vec![b.ip]);
}

#[test]
fn two_hundred_allocations_are_unique() {
    let dir = tempfile::tempdir().unwrap();
    let d = db(dir.path(), "10.88.255.254");
    let mut seen = HashSet::new();
    for i in 0..200 {
        let l = d
            .allocate(
                &format!("sb-{i}"),
                &format!("beacon-{i:08x}"),
                mac(),
                LeaseOwner::Shim,
            )
            .unwrap();
        assert!(seen.insert(l.ip), "duplicate {}", l.ip);
    }
    assert_eq!(d.list().unwrap().len(), 200);
    assert_eq!(d.leased_addresses().unwrap().len(), 200);
}

#[test]
fn exhaustion_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = db(dir.path(), "10.88.0.4");
    for i in 0..3 {
        d.allocate(
            &format!("sb-{i}"),
            &format!("beacon-{i:08x}"),
            mac(),
            LeaseOwner::Shim,
        )
        .unwrap();
    }
    let err = d
        .allocate("sb-x", "beacon-ffffffff", mac(), LeaseOwner::Shim)
        .unwrap_err();
    assert!(
        matches!(err, NetError::PoolExhausted { size: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("10.88.0.2-10.88.0.4"));
    d.release("sb-1").unwrap();
    assert_eq!(
        d.allocate("sb-x", "beacon-ffffffff", mac(), LeaseOwner::Shim)
            .unwrap()
            .ip,
        "10.88.0.3".parse::<Ipv4Addr>().unwrap()
    );
}

#[test]
fn tap_collision_and_pool_change_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = db(dir.path(), "10.88.0.9");
    d.allocate("sb-a", "beacon-00000000", mac(), LeaseOwner::Shim)
        .unwrap();
    let err = d
        .allocate("sb-b", "beacon-00000000", mac(), LeaseOwner::Shim)
        .unwrap_err();
    assert!(matches!(err, NetError::TapNameCollision { .. }), "{err}");
    let other = db(dir.path(), "10.88.0.20");
    let err = other
        .allocate("sb-c", "beacon-11111111", mac(), LeaseOwner::Shim)
        .unwrap_err();
    assert!(matches!(err, NetError::PoolChanged { .. }), "{err}");
}

#[test]
fn corrupt_and_truncated_files_are_refused_never_reinitialised() {
    let dir = tempfile::tempdir().unwrap();
    let d = db(dir.path(), "10.88.0.9");
    d.allocate("sb-a", "beacon-00000000", mac(), LeaseOwner::Shim)
        .unwrap();
    let good = std::fs::read(d.path()).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() / 2].to_vec()),
        ("header only", good[..64.min(good.len())].to_vec()),
        ("empty", Vec::new()),
        ("garbage", vec![0x5a; good.len()]),
    ];
    drop(d);
    for (what, bytes) in cases {
        // A fresh handle, as a new shim process would open it.
        let d = db(dir.path(), "10.88.0.9");
        std::fs::write(d.path(), &bytes).unwrap();
        let err = d
            .allocate("sb-b", "beacon-11111111", mac(), LeaseOwner::Shim)
            .unwrap_err();
        assert!(
            matches!(err, NetError::DatabaseCorrupt { .. }),
            "{what}: {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&d.path().display().to_string()),
            "{what}: {msg}"
        );
        assert!(msg.contains("beacon-net recover-db"), "{what}: {msg}");
        assert_eq!(
            std::fs::read(d.path()).unwrap(),
            bytes,
            "{what}: file not reinitialised, not even touched"
        );
        let again = db(dir.path(), "10.88.0.9").list().unwrap_err();
        assert!(
            matches!(again, NetError::DatabaseCorrupt { .. }),
            "{what} again: {again}"
        );
    }
    let d = db(dir.path(), "10.88.0.9");
    let moved = d.recover().unwrap().unwrap();
    assert!(moved.exists());
    assert_eq!(d.list().unwrap(), vec![]);
}

#[test]
fn repair_aligns_bitmap_with_leases() {
    let dir = tempfile::tempdir().unwrap();
    let d = db(dir.path(), "10.88.0.9");
    let a = d
        .allocate("sb-a", "beacon-00000000", mac(), LeaseOwner::Shim)
        .unwrap();
    // Simulate drift: a bit without a lease.
    d.write(|me, txn| {
        let (mut map, _) = me.load_bitmap(txn)?;
        map.set("10.88.0.8".parse().unwrap(), true);
        map.set(a.ip, false);
        me.store_bitmap(txn, &map, None)
    })
    .unwrap();
    let report = d.repair().unwrap();
    assert_eq!(
        report.bits_cleared,
        vec!["10.88.0.8".parse::<Ipv4Addr>().unwrap()]
    );
    assert_eq!(report.bits_set, vec![a.ip]);
    assert_eq!(d.repair().unwrap(), RepairReport::default());
}

#[test]
fn leases_written_with_the_old_mac_format_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let d = db(dir.path(), "10.88.0.9");
    let lease = d
        .allocate("old", "beacon-0000000a", mac(), LeaseOwner::Shim)
        .unwrap();
    // The record exactly as netmgr stored it while it had its own MacAddr (a
    // six-number array), before the type moved to beacon-common.
    let old = br#"{"sandbox_id":"old","ip":"10.88.0.2","prefix":16,"gateway":"10.88.0.1","tap":"beacon-0000000a","mac":[2,0,0,0,0,1],"created_unix":1764000000,"mode":"legacy","netns":null,"cni":null}"#;
    d.write(|me, txn| {
        let mut leases = txn.open_table(LEASES).map_err(|e| me.err(e))?;
        leases.insert("old", &old[..]).map_err(|e| me.err(e))?;
        Ok(())
    })
    .unwrap();
    drop(d);
    let reopened = db(dir.path(), "10.88.0.9");
    let listed = reopened.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].mac, mac());
    assert_eq!(listed[0].ip, lease.ip);
    assert_eq!(listed[0].created_unix, 1_764_000_000);
    assert_eq!(
        listed[0].owner,
        LeaseOwner::Shim,
        "no owner recorded: a shim's"
    );
    // Written back, the address is stored as text from now on.
    reopened.record(&listed[0]).unwrap();
    let raw = reopened
        .with_db(|db| {
            let txn = db.begin_read().map_err(|e| reopened.err(e))?;
            let leases = txn.open_table(LEASES).map_err(|e| reopened.err(e))?;
            let v = leases.get("old").map_err(|e| reopened.err(e))?;
            Ok(v.map(|v| v.value().to_vec()))
        })
        .unwrap()
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    assert!(text.contains(r#""mac":"02:00:00:00:00:01""#), "{text}");
    assert_eq!(reopened.release("old").unwrap().unwrap().mac, mac());
}
