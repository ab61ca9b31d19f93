//! vminitd as PID 1 without a VM: a new pid, mount, network and uts
//! namespace stands in for the guest. Checks the PID 1 path end to end:
//! API mounts, `beacon.*` parameters, hostname, eth0 over rtnetlink, cgroup
//! controller delegation, a container run through it, reaping, and
//! power-off through reboot(2) on Shutdown (in a child pid namespace the
//! kernel turns that into the namespace's init exiting).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use containerd_shim_protos::api::{ExecProcessRequest, ShutdownRequest, StartRequest, WaitRequest};
use protobuf::well_known_types::any::Any;

/// Kills the namespace (unshare --kill-child takes PID 1 with it) if the
/// test fails before Shutdown did.
struct NamespaceGuard(std::process::Child, String);

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // Kill the namespace's init first, so unshare reaps it.
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.0.id()))
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
            let _ = self.0.wait();
        }
        // crun made the container cgroups in the host's real unified
        // hierarchy (mounted at /sys/fs/cgroup inside the namespace).
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup/unified").join(&self.1));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn pid1_sets_up_the_namespace_runs_a_container_and_powers_off() {
    // Not under /tmp or /run: PID 1 mounts fresh tmpfs there.
    let dir = tempfile::Builder::new()
        .prefix("vminitd-pid1")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir");
    let p = |n: &str| -> PathBuf { dir.path().join(n) };
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
        .arg(
            "ip link add eth0 type veth peer name veth1 && \
             mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$0\" \"$@\"",
        )
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
    let mut guard = NamespaceGuard(child, cgroup_parent.clone());
    let child = &mut guard.0;
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
    let real_cgroup = Path::new("/sys/fs/cgroup/unified").join(&cgroup_parent);
    let cg_left: Vec<_> = std::fs::read_dir(&real_cgroup)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name())
                .collect()
        })
        .unwrap_or_default();
    assert!(cg_left.is_empty(), "container cgroups left: {cg_left:?}");
    drop(v);
}
