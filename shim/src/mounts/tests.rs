use super::*;
use serde_json::json;

#[test]
fn options_split_into_flags_and_data() {
    let (flags, data) = parse_options(&[
        "ro".into(),
        "rbind".into(),
        "lowerdir=/a:/b".into(),
        "upperdir=/u".into(),
        "rprivate".into(),
    ]);
    assert!(flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REC));
    assert_eq!(data, "lowerdir=/a:/b,upperdir=/u");
}

#[test]
fn specs_are_rewritten_for_the_guest() {
    let mut spec = json!({
        "root": {"path": "/run/containerd/io.containerd.runtime.v2.task/default/c1/rootfs", "readonly": true},
        "hooks": {"prestart": [{"path": "/usr/bin/nvidia"}]},
        "process": {"args": ["sh"], "apparmorProfile": "docker-default", "selinuxLabel": "x"},
        "linux": {
            "mountLabel": "y",
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"}
            ]
        }
    });
    rewrite_spec(&mut spec);
    assert_eq!(spec["root"], json!({"path": "rootfs", "readonly": true}));
    assert!(spec.get("hooks").is_none());
    assert!(spec["process"].get("apparmorProfile").is_none());
    assert!(spec["linux"].get("mountLabel").is_none());
    assert_eq!(
        spec["linux"]["namespaces"],
        json!([{"type": "pid"}, {"type": "ipc"}])
    );
}

#[test]
fn only_host_binds_are_carried() {
    assert!(is_bind(
        &json!({"type": "bind", "source": "/a", "destination": "/b"})
    ));
    assert!(is_bind(
        &json!({"type": "none", "source": "/a", "destination": "/b", "options": ["rbind", "ro"]})
    ));
    assert!(!is_bind(
        &json!({"type": "proc", "source": "proc", "destination": "/proc"})
    ));
    assert!(!is_bind(
        &json!({"type": "tmpfs", "source": "tmpfs", "destination": "/dev", "options": ["bind"]})
    ));
}

/// Mounting needs root and a private mount namespace: the test re-runs itself
/// under `unshare --mount` so nothing touches the host's mounts.
#[test]
fn binds_and_rootfs_mount_and_unmount_in_a_private_namespace() {
    const INNER: &str = "BEACON_SHIM_MOUNT_TEST_INNER";
    if std::env::var_os(INNER).is_none() {
        let exe = std::env::current_exe().expect("exe");
        let status = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--"])
            .arg(exe)
            .args([
                "--exact",
                "mounts::tests::binds_and_rootfs_mount_and_unmount_in_a_private_namespace",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(INNER, "1")
            .status()
            .expect("unshare (util-linux) must be installed; run resources/install.sh");
        assert!(
            status.success(),
            "the test failed inside its mount namespace"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let share = dir.path().join("share");
    prepare_share(&share).expect("share");
    prepare_share(&share).expect("twice is fine");
    assert!(is_mountpoint(&share));

    // A bundle rootfs bound into the share.
    let bundle_rootfs = dir.path().join("bundle/rootfs");
    std::fs::create_dir_all(bundle_rootfs.join("etc")).expect("rootfs");
    std::fs::write(bundle_rootfs.join("etc/hostname"), "c1\n").expect("file");
    let cdir = share.join("c1");
    mount_rootfs(&[], &bundle_rootfs, &cdir.join("rootfs")).expect("rootfs");
    assert_eq!(
        std::fs::read_to_string(cdir.join("rootfs/etc/hostname")).expect("seen"),
        "c1\n"
    );

    // A read-write directory bind, a read-only one and a file bind.
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data");
    let ro = dir.path().join("ro");
    std::fs::create_dir_all(&ro).expect("ro");
    let file = dir.path().join("hosts");
    std::fs::write(&file, "127.0.0.1 localhost\n").expect("file");
    let mut spec = json!({"mounts": [
        {"type": "proc", "source": "proc", "destination": "/proc"},
        {"type": "bind", "source": data, "destination": "/data", "options": ["rbind", "rw"]},
        {"type": "bind", "source": ro, "destination": "/ro", "options": ["rbind", "ro"]},
        {"type": "bind", "source": file, "destination": "/etc/hosts", "options": ["rbind", "ro"]}
    ]});
    let mounted = carry_bind_mounts(&mut spec, &cdir, "/run/vminitd/shares/sb/c1").expect("carry");
    assert_eq!(mounted.len(), 3);
    assert_eq!(spec["mounts"][0]["source"], "proc");
    assert_eq!(
        spec["mounts"][1]["source"],
        "/run/vminitd/shares/sb/c1/mounts/1"
    );
    std::fs::write(cdir.join("mounts/1/new"), "x").expect("rw bind writes through");
    assert!(data.join("new").exists());
    assert!(
        std::fs::write(cdir.join("mounts/2/new"), "x").is_err(),
        "the read-only bind refuses writes"
    );
    assert_eq!(
        std::fs::read_to_string(cdir.join("mounts/3")).expect("file bind"),
        "127.0.0.1 localhost\n"
    );

    let mut all = vec![cdir.join("rootfs")];
    all.extend(mounted);
    unmount_all(&all);
    unmount_all(&all);
    assert!(!cdir.join("rootfs/etc/hostname").exists());
    assert!(!cdir.join("mounts/1/new").exists());

    // Removing a tree never crosses a mount point.
    let keep = dir.path().join("keep");
    std::fs::create_dir_all(&keep).expect("keep");
    std::fs::write(keep.join("precious"), "x").expect("precious");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).expect("tree");
    std::fs::write(tree.join("a/file"), "y").expect("file");
    std::fs::create_dir_all(tree.join("m")).expect("m");
    mount(
        Some(&keep),
        &tree.join("m"),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind");
    let blocked = remove_tree_within_mount(&tree);
    assert_eq!(blocked, vec![tree.join("m")]);
    assert!(
        keep.join("precious").exists(),
        "nothing removed through the mount"
    );
    assert!(!tree.join("a").exists(), "the rest is gone");
    unmount_all(&[tree.join("m")]);
    assert!(remove_tree_within_mount(&tree).is_empty());
    assert!(!tree.exists());

    // A missing bind source is a clear error.
    let mut bad =
        json!({"mounts": [{"type": "bind", "source": "/nonexistent/x", "destination": "/x"}]});
    let err = carry_bind_mounts(&mut bad, &cdir, "/g").expect_err("missing source");
    assert!(err.to_string().contains("/nonexistent/x"), "{err}");
    unmount_all(&[share]);
}
