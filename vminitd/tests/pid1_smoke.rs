//! vminitd as PID 1 without a VM: a new pid, mount, network and uts
//! namespace stands in for the guest. Checks the PID 1 path end to end:
//! API mounts, `beacon.*` parameters, hostname, eth0 over rtnetlink, cgroup
//! controller delegation, a container run through it (its cgroup found in
//! the host's real cgroup2 hierarchy, wherever that is mounted, and gone
//! afterwards), reaping, and power-off through reboot(2) on Shutdown (in a
//! child pid namespace the kernel turns that into the namespace's init
//! exiting).
//!
//! The test's files live where PID 1's fresh mounts (`/tmp`, `/run`, ...)
//! cannot hide them (`common::pid1_visible_tempdir`), so it passes wherever
//! the checkout and the target dir are. It removes the cgroups it made.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use containerd_shim_protos::api::{ExecProcessRequest, ShutdownRequest, StartRequest, WaitRequest};
use protobuf::well_known_types::any::Any;

/// Kills the namespace (unshare --kill-child takes PID 1 with it) if the
/// test fails before Shutdown did, and removes the cgroup parent (and any
/// container cgroup left in it) that crun made in the real hierarchy.
struct NamespaceGuard {
    child: std::process::Child,
    cgroup: PathBuf,
}

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Kill the namespace's init first, so unshare reaps it.
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.child.id()))
                    .unwrap_or_default();
            for pid in children
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = self.child.wait();
        }
        if let Err(e) = remove_cgroup_tree(&self.cgroup, Duration::from_secs(10)) {
            eprintln!("LEAK: {e}");
        }
    }
}

/// Removes `dir` and the cgroups directly in it (a cgroup can be removed
/// once its last task is gone, which can take a moment after a kill).
fn remove_cgroup_tree(dir: &Path, patience: Duration) -> Result<(), String> {
    let deadline = Instant::now() + patience;
    loop {
        let children: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default();
        for c in &children {
            let _ = std::fs::remove_dir(c);
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("cannot remove cgroup {}: {e}", dir.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn the_cgroup2_mount_is_found_wherever_it_is() {
    let pure = "22 1 0:21 / / rw - ext4 /dev/vda1 rw\n\
                30 22 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
    assert_eq!(
        cgroup2_mount_in(pure),
        Some(PathBuf::from("/sys/fs/cgroup"))
    );
    let hybrid = "22 1 0:21 / / rw - ext4 /dev/vda1 rw\n\
                  30 22 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                  31 30 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                  32 30 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
    assert_eq!(
        cgroup2_mount_in(hybrid),
        Some(PathBuf::from("/sys/fs/cgroup/unified"))
    );
    // A bind of a sub-cgroup is not the hierarchy's root; escapes decoded.
    let odd = "40 22 0:26 /sub /mnt/sub rw - cgroup2 cgroup2 rw\n\
               41 22 0:26 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
    assert_eq!(
        cgroup2_mount_in(odd),
        Some(PathBuf::from("/mnt/with space"))
    );
    assert_eq!(
        cgroup2_mount_in("22 1 0:21 / / rw - ext4 /dev/vda1 rw\n"),
        None
    );
    // And this host has one (the pid1 test below needs it).
    assert!(cgroup_root().join("cgroup.procs").exists());
}

#[test]
fn pid1_test_files_avoid_what_pid1_mounts() {
    let base = pid1_visible_base(&[
        PathBuf::from("/tmp"),
        PathBuf::from("/run"),
        PathBuf::from("/var/tmp"),
    ]);
    assert_eq!(base, Some(PathBuf::from("/var/tmp")));
    // A checkout (and so its target dir) under /tmp is passed over.
    let under_tmp = tempfile::tempdir_in("/tmp").expect("tempdir");
    let t = under_tmp.path().join("target/tmp");
    assert_eq!(pid1_visible_base(std::slice::from_ref(&t)), None);
}

#[tokio::test(flavor = "current_thread")]
async fn pid1_sets_up_the_namespace_runs_a_container_and_powers_off() {
    // Not under /tmp, /run, ...: PID 1 mounts fresh file systems there.
    let dir = pid1_visible_tempdir("vminitd-pid1");
    let p = |n: &str| -> PathBuf { dir.path().join(n) };
    // The host's real cgroup2 hierarchy, which crun writes to from inside.
    let real_root = cgroup_root();
    // A stand-in cgroup root, so delegation is observable and the host's
    // real hierarchy is left alone.
    std::fs::create_dir_all(p("cg")).expect("cg");
    std::fs::write(p("cg/cgroup.controllers"), "cpu memory pids\n").expect("controllers");
    std::fs::write(
        p("cmdline"),
        "console=ttyS0 beacon.hostname=pid1box beacon.ip=10.77.0.2/24 beacon.gw=10.77.0.1 \
         beacon.share=nosuchtag:s0 beacon.ip=bogus",
    )
    .expect("cmdline");

    let cgroup_parent = format!("vminitd-pid1-test-{}", std::process::id());
    // crun needs cgroup2 at /sys/fs/cgroup: mount it there unless it already
    // is (a pure cgroup v2 host refuses a second mount).
    let setup = if pure_cgroup2() {
        "ip link add eth0 type veth peer name veth1 && exec \"$0\" \"$@\""
    } else {
        "ip link add eth0 type veth peer name veth1 && \
         mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$0\" \"$@\""
    };
    let child = Command::new("unshare")
        .args([
            "-p",
            "-f",
            "-m",
            "-n",
            "-u",
            "--propagation",
            "private",
            "--kill-child",
            "sh",
            "-c",
        ])
        .arg(setup)
        .arg(env!("CARGO_BIN_EXE_vminitd"))
        .args(["--mode", "pid1"])
        .arg(format!("--task-addr=unix://{}", p("task.sock").display()))
        .arg(format!(
            "--stream-addr=unix://{}",
            p("streams.sock").display()
        ))
        .arg("--state-dir")
        .arg(p("state"))
        .arg("--shares-dir")
        .arg(p("shares"))
        .arg("--cgroup-mount")
        .arg(p("cg"))
        .arg("--cgroup-parent")
        .arg(&cgroup_parent)
        .arg("--cmdline-file")
        .arg(p("cmdline"))
        .spawn()
        .expect("spawn");
    let real_cgroup = real_root.join(&cgroup_parent);
    let mut guard = NamespaceGuard {
        child,
        cgroup: real_cgroup.clone(),
    };
    let child = &mut guard.child;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(std::os::unix::net::UnixStream::connect(p("task.sock")).is_ok()
        && std::os::unix::net::UnixStream::connect(p("streams.sock")).is_ok())
    {
        assert!(Instant::now() < deadline, "PID 1 vminitd did not come up");
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "PID 1 vminitd died"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // Controllers were delegated.
    assert_eq!(
        std::fs::read_to_string(p("cg/cgroup.subtree_control")).expect("subtree_control"),
        "+cpu +memory +pids"
    );

    // Drive it with the host harness's helpers.
    let v = Vminitd {
        dir: tempfile::tempdir().expect("unused"),
        child: None,
        task_sock: p("task.sock"),
        stream_sock: p("streams.sock"),
        shares: p("shares"),
        state: p("state"),
        cgroup_parent: cgroup_parent.clone(),
    };
    let c = v.client().await;
    v.rootfs("net");
    // No uts namespace: the container sees the VM's hostname, and (with no
    // network namespace, which vminitd strips anyway) the VM's eth0.
    let mut s = spec(&["sleep", "100"], false);
    s["linux"]["namespaces"] =
        serde_json::json!([{"type": "pid"}, {"type": "mount"}, {"type": "network"}]);
    s.as_object_mut().expect("spec").remove("hostname");
    let req = create_req("net", &s, false, false, false);
    c.create(ctx(), &req).await.expect("create");
    c.start(
        ctx(),
        &StartRequest {
            id: "net".into(),
            ..Default::default()
        },
    )
    .await
    .expect("start");
    // crun put the container into the real hierarchy, under our parent.
    let procs = real_cgroup.join("net/cgroup.procs");
    let members = std::fs::read_to_string(&procs)
        .unwrap_or_else(|e| panic!("the container's cgroup {}: {e}", procs.display()));
    assert!(
        !members.trim().is_empty(),
        "no process in {}",
        procs.display()
    );
    let process = serde_json::json!({
        "args": ["sh", "-c", "hostname; cat /proc/net/route; cat /proc/net/fib_trie"],
        "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0},
    });
    c.exec(
        ctx(),
        &ExecProcessRequest {
            id: "net".into(),
            exec_id: "look".into(),
            stdout: "s".into(),
            spec: Some(Any {
                value: serde_json::to_vec(&process).expect("json"),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        },
    )
    .await
    .expect("exec");
    let out = stream(&v, "net", "look", "stdout").await;
    c.start(
        ctx(),
        &StartRequest {
            id: "net".into(),
            exec_id: "look".into(),
            ..Default::default()
        },
    )
    .await
    .expect("start exec");
    let text = read_all(out).await;
    let w = c
        .wait(
            ctx(),
            &WaitRequest {
                id: "net".into(),
                exec_id: "look".into(),
                ..Default::default()
            },
        )
        .await
        .expect("wait");
    assert_eq!(w.exit_status, 0, "{text}");
    assert!(text.starts_with("pid1box\n"), "{text}");
    let gw = format!("{:08X}", u32::from_ne_bytes([10, 77, 0, 1]));
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("eth0\t00000000\t{gw}"))),
        "no default route via eth0: {text}"
    );
    assert!(text.contains("10.77.0.2"), "no eth0 address: {text}");

    // Shutdown: containers stopped, sync, reboot(2) power-off, PID 1 gone.
    c.shutdown(
        ctx(),
        &ShutdownRequest {
            now: true,
            ..Default::default()
        },
    )
    .await
    .expect("shutdown");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "PID 1 vminitd did not power off");
        std::thread::sleep(Duration::from_millis(10));
    };
    // The namespace died with its init: the kernel reports the reboot as
    // SIGINT (power off / halt) to the parent; unshare passes it on.
    eprintln!("PID 1 exit as seen by the test: {status:?}");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGINT),
        "{status:?}"
    );
    let crun_left: Vec<_> = std::fs::read_dir(p("state/crun"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(crun_left.is_empty(), "crun state left: {crun_left:?}");
    // crun deleted the container's cgroup; the parent is ours to remove
    // (as PID 1, vminitd removes it under its own --cgroup-mount, here the
    // stand-in).
    let cg_left: Vec<_> = std::fs::read_dir(&real_cgroup)
        .unwrap_or_else(|e| panic!("the parent cgroup {}: {e}", real_cgroup.display()))
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name())
        .collect();
    assert!(cg_left.is_empty(), "container cgroups left: {cg_left:?}");
    remove_cgroup_tree(&real_cgroup, Duration::from_secs(10)).expect("remove our cgroup");
    assert!(!real_cgroup.exists(), "{} leaked", real_cgroup.display());
    drop(v);
}
