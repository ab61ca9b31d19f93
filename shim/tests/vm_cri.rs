//! Kubernetes pods through containerd 1.6.20's CRI plugin on the `beaconbox`
//! runtime handler: a Rust CRI v1 client (`beacon_tests::cri`) drives a
//! private containerd whose CNI chain is Debian's bridge + host-local plugins,
//! with locally built pause and busybox images. It needs a KVM that runs real
//! guests, so on hosts without hardware KVM it runs inside the nested lab.
//!
//! Mirrors these critest categories: runtime info (Version, Status), pod
//! lifecycle (run, status with the CNI IP, stop and remove, each twice),
//! container lifecycle (create, start, status, stop, remove, each twice),
//! exec (ExecSync output, exit code, timeout), multi-container networking
//! (localhost between the containers of a pod, the pod IP from the host),
//! PortForward (the WebSocket protocol, two at once, a closed port), a
//! volume shared by two containers, a read-only projected volume (configMap
//! style) whose update kubelet's way shows in the container, the VM sized
//! from the pod's resources, stats, resource updates and an OOM kill;
//! the pod's host cgroup (made with a memory limit, as kubelet would) holding
//! the shim and virtiofsd and charged with the VM's memory; the same pod on
//! the QEMU backend (a second handler) under a systemd-driver style cgroup
//! path, reached on its pod IP and through PortForward, whose app
//! container exits when its sandbox (pause) task is killed. Bad input: a
//! hostNetwork pod, the same pod twice, a container for a pod that does not
//! exist. Afterwards nothing is left: no shim (and so no VMM), virtiofsd, pod
//! namespace, sandbox cgroup, mount or run folder.

mod common;

use common::sh;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use beacon_tests::containerd::{
    shim_env, Containerd, ContainerdSpec, CriRuntime, CriSpec, RUNTIME,
};
use beacon_tests::cri::{api, forward_once, ContainerSpec, Cri, PodSpec};
use beacon_tests::images::{busybox_archive, pause_archive, BUSYBOX_IMAGE, PAUSE_IMAGE};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-beaconbox-v1");
/// The runtime handler a RuntimeClass would name.
const HANDLER: &str = "beaconbox";
/// A second handler whose runtime config picks the QEMU backend (parity).
const QEMU_HANDLER: &str = "beaconbox-qemu";
/// The CNI bridge and subnet of this test's pods (no other test uses them).
const BRIDGE: &str = "bcnpod0";
const SUBNET_PREFIX: &str = "10.76.0.";

/// The pids of this test's shims.
fn shims() -> Vec<u32> {
    let o = Command::new("pgrep")
        .args(["-f", &format!("{SHIM} -namespace")])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The processes that run vCPU threads (`beacon-vcpu<N>`), each with its count.
fn vcpu_processes() -> Vec<(u32, usize)> {
    let mut out = Vec::new();
    for pid in shims() {
        let n = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks
                    .filter_map(Result::ok)
                    .filter(|t| {
                        std::fs::read_to_string(t.path().join("comm"))
                            .is_ok_and(|c| c.starts_with("beacon-vcpu"))
                    })
                    .count()
            })
            .unwrap_or(0);
        if n > 0 {
            out.push((pid, n));
        }
    }
    out
}

/// The pod namespaces the CRI plugin has made (`/var/run/netns/cni-*`).
fn pod_namespaces() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("cni-"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Where the cgroup v2 hierarchy is (the nested lab mounts one).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// What kubelet makes for a pod: a cgroup with a memory limit, under a parent
/// of this test's, with the controllers enabled on the way. Returns it.
fn kubelet_pod_cgroup(name: &str, memory_max: u64) -> PathBuf {
    let root = Path::new(CGROUP_ROOT);
    assert!(
        std::fs::read_to_string(root.join("cgroup.controllers"))
            .is_ok_and(|c| c.contains("memory")),
        "{CGROUP_ROOT} must be a cgroup v2 hierarchy with the memory controller"
    );
    let parent = root.join("beacon-test-pods");
    let pod = parent.join(name);
    for (dir, child) in [(root, &parent), (parent.as_path(), &pod)] {
        let _ = std::fs::create_dir(child);
        for c in ["+memory", "+cpu", "+pids"] {
            // Fails when already on, or the controller is missing: checked below.
            let _ = std::fs::write(dir.join("cgroup.subtree_control"), c);
        }
    }
    std::fs::write(pod.join("memory.max"), memory_max.to_string()).expect("the pod's memory.max");
    pod
}

fn cgroup_value(dir: &Path, file: &str) -> u64 {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// An HTTP/1.0 GET of `path` from `addr`; the body.
fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(20))
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .map_err(|e| format!("sending to {addr}: {e}"))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    Ok(reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or(reply))
}

// tests/run-all runs this in its vm lane and skips it by this name in its
// main lane: keep the name, or change it there too.
#[test]
fn cri_pods_run_in_one_microvm_per_pod() {
    let Some(share) = common::vm_test_here("cri_pods_run_in_one_microvm_per_pod", &[]) else {
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("beacon-shim-cri")
        .tempdir()
        .expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let shim_dir = Path::new(SHIM).parent().expect("shim dir").to_path_buf();
    let run_dir = dir.join("run");
    // The runtime config reaches the shim the way Kubernetes users set it:
    // containerd's `[...runtimes.beaconbox.options] ConfigPath`. Inside the
    // emulated lab a guest takes over a minute to boot.
    let config = dir.join("runtime.toml");
    std::fs::write(&config, "[vm]\nboot_timeout_secs = 600\n").expect("runtime config");
    let qemu_config = dir.join("runtime-qemu.toml");
    std::fs::write(
        &qemu_config,
        "[vm]\nbackend = \"qemu\"\nboot_timeout_secs = 600\n",
    )
    .expect("QEMU runtime config");
    let mut env = shim_env(&dir, &share);
    env.push(("BEACON_LOG".into(), "debug".into()));
    let namespaces_before = pod_namespaces();
    let containerd = Containerd::start_cri(
        &dir.join("containerd"),
        &ContainerdSpec { shim_dir, env },
        &CriSpec {
            bridge: BRIDGE.into(),
            subnet: format!("{SUBNET_PREFIX}0/24"),
            runtimes: vec![
                CriRuntime {
                    handler: HANDLER.into(),
                    runtime_type: RUNTIME.into(),
                    config_path: Some(config.clone()),
                },
                CriRuntime {
                    handler: QEMU_HANDLER.into(),
                    runtime_type: RUNTIME.into(),
                    config_path: Some(qemu_config.clone()),
                },
            ],
        },
    )
    .expect("containerd with its CRI plugin");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).expect("images dir");
    containerd
        .import_image(&busybox_archive(&images, BUSYBOX_IMAGE, &[]).expect("busybox image"))
        .expect("importing busybox");
    containerd
        .import_image(&pause_archive(&images, PAUSE_IMAGE).expect("pause image"))
        .expect("importing pause");
    let cri = Cri::connect(&containerd.socket)
        .expect("CRI client")
        .with_timeout(Duration::from_secs(600));
    let logs = dir.join("pod-logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    let vm_logs = || {
        sh(&format!(
            "tail -n 30 {}/log/*.log 2>/dev/null",
            dir.display()
        ))
    };
    let why = |what: &str, e: &dyn std::fmt::Display| {
        format!(
            "{what}: {e}\ncontainerd log:\n{}\nVM logs:\n{}",
            containerd.log_tail(80),
            vm_logs()
        )
    };
    let started = Instant::now();

    // Runtime info.
    let v = cri
        .version()
        .unwrap_or_else(|e| panic!("{}", why("Version", &e)));
    assert_eq!(v.runtime_name, "containerd", "{v:?}");
    let st = cri
        .status()
        .unwrap_or_else(|e| panic!("{}", why("Status", &e)));
    let conditions = st.status.map(|s| s.conditions).unwrap_or_default();
    for kind in ["RuntimeReady", "NetworkReady"] {
        assert!(
            conditions.iter().any(|c| c.r#type == kind && c.status),
            "{kind} is not true: {conditions:?}"
        );
    }

    // Bad input: a hostNetwork pod cannot run in a VM; nothing is left of it.
    let host_pod = PodSpec::new("hostnet", &logs).host_network();
    let e = cri
        .run_pod_sandbox(&host_pod.config(), HANDLER)
        .expect_err("a hostNetwork pod on beaconbox");
    assert!(
        e.message().contains("hostNetwork"),
        "the refusal names the reason: {e:?}"
    );
    assert!(
        cri.list_pod_sandbox()
            .expect("ListPodSandbox")
            .iter()
            .all(|p| p.state() != api::PodSandboxState::SandboxReady),
        "the refused pod is not ready"
    );

    // A pod: one VM, its IP from the CRI plugin's CNI chain, in a pod cgroup
    // with a memory limit as kubelet makes it.
    let pod_limit: u64 = 2 << 30;
    let pod_cgroup = kubelet_pod_cgroup("pod-web", pod_limit);
    let pod_spec = PodSpec::new("web", &logs);
    let mut pod = pod_spec.config();
    // The pod's resources as kubelet >= 1.23 sends them (the sum of its
    // containers' limits): the VM is sized from them.
    let pod_memory: i64 = 256 << 20;
    if let Some(linux) = pod.linux.as_mut() {
        linux.cgroup_parent = "/beacon-test-pods/pod-web".into();
        linux.resources = Some(api::LinuxContainerResources {
            memory_limit_in_bytes: pod_memory,
            cpu_period: 100_000,
            cpu_quota: 100_000,
            ..Default::default()
        });
    }
    let t0 = Instant::now();
    let pod_id = cri
        .run_pod_sandbox(&pod, HANDLER)
        .unwrap_or_else(|e| panic!("{}", why("RunPodSandbox", &e)));
    let run_pod = t0.elapsed();
    let status = cri
        .pod_sandbox_status(&pod_id)
        .unwrap_or_else(|e| panic!("{}", why("PodSandboxStatus", &e)))
        .status
        .expect("PodSandboxStatus has a status");
    let pod_ip = status
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    assert!(
        pod_ip.starts_with(SUBNET_PREFIX),
        "the pod IP comes from the CNI chain: {status:?}"
    );
    assert_eq!(
        status.state(),
        api::PodSandboxState::SandboxReady,
        "{status:?}"
    );
    assert_eq!(shims().len(), 1, "one shim for the pod");
    // Bad input: the same pod again while it runs.
    let e = cri
        .run_pod_sandbox(&pod, HANDLER)
        .expect_err("a second sandbox of the same pod");
    println!("cri: the same pod twice: {}", e.message());
    assert_eq!(
        shims().len(),
        1,
        "the refused second sandbox started no shim"
    );

    // The pod's host cgroup holds the shim (and so the VMM's threads) and
    // virtiofsd, and accounts for the VM's memory.
    let sandbox_cgroup = pod_cgroup.join(&pod_id);
    let procs = std::fs::read_to_string(sandbox_cgroup.join("cgroup.procs")).unwrap_or_default();
    let members: Vec<u32> = procs
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(
        shims().iter().all(|p| members.contains(p)),
        "the shim is in {}: {members:?}",
        sandbox_cgroup.display()
    );
    let fsd: Vec<u32> = sh("pgrep -x virtiofsd || true")
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(
        !fsd.is_empty() && fsd.iter().all(|p| members.contains(p)),
        "virtiofsd {fsd:?} is in {}: {members:?}",
        sandbox_cgroup.display()
    );
    let charged = cgroup_value(&pod_cgroup, "memory.current");
    println!(
        "cri: the pod's host cgroup holds {} MiB with the VM booted (limit {} MiB)",
        charged >> 20,
        pod_limit >> 20
    );
    assert!(
        charged > 16 << 20,
        "the VM's memory is charged to the pod: {charged} bytes"
    );

    // Two containers sharing an emptyDir-like volume, in the pod's one VM.
    let volume = dir.join("volume");
    std::fs::create_dir_all(&volume).expect("volume");
    let mut server = ContainerSpec::new(
        "server",
        BUSYBOX_IMAGE,
        &["httpd", "-f", "-p", "8080", "-h", "/data"],
    );
    server.mounts.push((volume.clone(), "/data".into(), false));
    let mut client = ContainerSpec::new("client", BUSYBOX_IMAGE, &["sleep", "3600"]);
    client.mounts.push((volume.clone(), "/data".into(), false));
    // A projected volume (configMap, secret) as kubelet lays it out: the
    // files behind a `..data` symlink it swaps atomically on an update.
    let projected = dir.join("projected");
    std::fs::create_dir_all(projected.join("..v1")).expect("projected volume");
    std::fs::write(projected.join("..v1/key"), "v1\n").expect("projected key");
    std::os::unix::fs::symlink("..v1", projected.join("..data")).expect("..data");
    std::os::unix::fs::symlink("..data/key", projected.join("key")).expect("key link");
    client.mounts.push((projected.clone(), "/cfg".into(), true));
    let mut ids = Vec::new();
    for c in [&server, &client] {
        let t = Instant::now();
        let id = cri
            .create_container(&pod_id, &c.config(), &pod)
            .unwrap_or_else(|e| panic!("{}", why(&format!("CreateContainer {}", c.name), &e)));
        cri.start_container(&id)
            .unwrap_or_else(|e| panic!("{}", why(&format!("StartContainer {}", c.name), &e)));
        println!("cri: {} created and started in {:?}", c.name, t.elapsed());
        ids.push(id);
    }
    let (server_id, client_id) = (ids[0].clone(), ids[1].clone());
    for id in &ids {
        let s = cri
            .container_status(id)
            .unwrap_or_else(|e| panic!("{}", why("ContainerStatus", &e)))
            .status
            .expect("ContainerStatus has a status");
        assert_eq!(s.state(), api::ContainerState::ContainerRunning, "{s:?}");
    }
    let vcpus = vcpu_processes();
    assert_eq!(
        vcpus.len(),
        1,
        "the pod's containers share one VM (one process with vCPU threads): {vcpus:?}"
    );
    assert_eq!(shims().len(), 1, "still one shim for the pod");

    // The VM is the pod's size (its memory plus the guest's overhead), not
    // the default.
    let out = cri
        .exec_sync(
            &client_id,
            &["head", "-n", "1", "/proc/meminfo"],
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{}", why("ExecSync meminfo", &e)));
    let total_kib: i64 = out
        .stdout
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let vm_mib = (pod_memory >> 20) + beacon_shim::config::GUEST_OVERHEAD_MIB as i64;
    println!(
        "cri: the pod's VM has MemTotal {} MiB (sized {vm_mib} MiB)",
        total_kib >> 10
    );
    assert!(
        total_kib > (pod_memory >> 10) && total_kib <= vm_mib << 10,
        "the VM is sized for the pod: {out:?}"
    );

    // Exec: output, exit code, timeout.
    let out = cri
        .exec_sync(
            &client_id,
            &["sh", "-c", "echo hi; echo oops >&2; exit 3"],
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{}", why("ExecSync", &e)));
    assert_eq!(
        (out.exit_code, out.stdout.as_str(), out.stderr.as_str()),
        (3, "hi\n", "oops\n")
    );
    let t = Instant::now();
    let timed_out = cri.exec_sync(&client_id, &["sleep", "60"], Duration::from_secs(2));
    assert!(
        t.elapsed() < Duration::from_secs(50),
        "ExecSync's timeout ended the exec ({timed_out:?} after {:?})",
        t.elapsed()
    );
    assert!(
        timed_out
            .as_ref()
            .map_or_else(|e| e.message().contains("timeout"), |o| o.exit_code != 0),
        "an ExecSync past its timeout fails: {timed_out:?}"
    );

    // The volume: written in one container, served by the other, on
    // localhost inside the pod and on the pod IP from the host.
    let out = cri
        .exec_sync(
            &client_id,
            &["sh", "-c", "echo hello-from-the-pod > /data/hello"],
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{}", why("ExecSync write", &e)));
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(
        std::fs::read_to_string(volume.join("hello")).expect("the volume on the host"),
        "hello-from-the-pod\n"
    );
    let out = cri
        .exec_sync(
            &client_id,
            &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/hello"],
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{}", why("ExecSync wget", &e)));
    assert_eq!(
        (out.exit_code, out.stdout.as_str()),
        (0, "hello-from-the-pod\n"),
        "the client reached the server on localhost: {out:?}"
    );
    let body = http_get(&format!("{pod_ip}:8080"), "/hello")
        .unwrap_or_else(|e| panic!("{}", why("the pod IP from the host", &e)));
    assert_eq!(body, "hello-from-the-pod\n");

    // PortForward (kubectl port-forward): containerd dials localhost:8080 in
    // the pod's namespace; the shim carries it to the guest's loopback. Twice
    // at once, and a port nothing listens on, which the error channel reports.
    let request = b"GET /hello HTTP/1.0\r\n\r\n";
    let forwards: Vec<_> = (0..2)
        .map(|_| {
            let url = cri
                .port_forward(&pod_id, 8080)
                .unwrap_or_else(|e| panic!("{}", why("PortForward", &e)));
            std::thread::spawn(move || forward_once(&url, 8080, request, Duration::from_secs(60)))
        })
        .collect();
    for f in forwards {
        let fwd = f
            .join()
            .expect("forward thread")
            .unwrap_or_else(|e| panic!("{}", why("forwarding 8080", &e)));
        let text = String::from_utf8_lossy(&fwd.data);
        assert!(
            text.starts_with("HTTP/1.") && text.ends_with("\r\n\r\nhello-from-the-pod\n"),
            "{fwd:?}"
        );
        assert_eq!(fwd.error, "", "{fwd:?}");
    }
    let url = cri
        .port_forward(&pod_id, 9)
        .unwrap_or_else(|e| panic!("{}", why("PortForward", &e)));
    let fwd = forward_once(&url, 9, b"", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{}", why("forwarding 9", &e)));
    assert!(
        fwd.data.is_empty() && fwd.error.contains("error forwarding port 9"),
        "{fwd:?}"
    );
    println!(
        "cri: PortForward to 8080 answered; to 9: {}",
        fwd.error.trim()
    );

    // The projected volume: read-only in the container, and an update the
    // way kubelet makes one (new folder, `..data` swapped by a rename) shows.
    let read_cfg = || {
        cri.exec_sync(&client_id, &["cat", "/cfg/key"], Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{}", why("ExecSync cat /cfg/key", &e)))
    };
    assert_eq!(read_cfg().stdout, "v1\n");
    let out = cri
        .exec_sync(&client_id, &["touch", "/cfg/new"], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{}", why("ExecSync touch /cfg/new", &e)));
    assert_ne!(out.exit_code, 0, "a read-only volume took a write: {out:?}");
    std::fs::create_dir_all(projected.join("..v2")).expect("update");
    std::fs::write(projected.join("..v2/key"), "v2\n").expect("updated key");
    std::os::unix::fs::symlink("..v2", projected.join("..data_tmp")).expect("..data_tmp");
    std::fs::rename(projected.join("..data_tmp"), projected.join("..data")).expect("swap");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = read_cfg();
        if seen.stdout == "v2\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the volume update never showed in the container: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Stats and resource updates.
    let stats = cri
        .container_stats(&server_id)
        .unwrap_or_else(|e| panic!("{}", why("ContainerStats", &e)))
        .expect("stats of the server");
    let memory = stats
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .map_or(0, |v| v.value);
    assert!(memory > 0, "the server's memory is reported: {stats:?}");
    let limit = 96 * 1024 * 1024;
    cri.update_container_resources(
        &client_id,
        &api::LinuxContainerResources {
            memory_limit_in_bytes: limit,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}", why("UpdateContainerResources", &e)));
    let out = cri
        .exec_sync(
            &client_id,
            &["cat", "/sys/fs/cgroup/memory.max"],
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{}", why("ExecSync memory.max", &e)));
    assert_eq!(out.stdout.trim(), limit.to_string(), "{out:?}");

    // An OOM kill: exit 137, reason OOMKilled.
    let mut hog = ContainerSpec::new(
        "hog",
        BUSYBOX_IMAGE,
        &[
            "sh",
            "-c",
            "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done",
        ],
    );
    hog.resources = Some(api::LinuxContainerResources {
        memory_limit_in_bytes: 32 * 1024 * 1024,
        ..Default::default()
    });
    let hog_id = cri
        .create_container(&pod_id, &hog.config(), &pod)
        .unwrap_or_else(|e| panic!("{}", why("CreateContainer hog", &e)));
    cri.start_container(&hog_id)
        .unwrap_or_else(|e| panic!("{}", why("StartContainer hog", &e)));
    let deadline = Instant::now() + Duration::from_secs(300);
    let hog_status = loop {
        let s = cri
            .container_status(&hog_id)
            .unwrap_or_else(|e| panic!("{}", why("ContainerStatus hog", &e)))
            .status
            .expect("ContainerStatus has a status");
        if s.state() == api::ContainerState::ContainerExited {
            break s;
        }
        assert!(Instant::now() < deadline, "the hog never ended: {s:?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        (hog_status.exit_code, hog_status.reason.as_str()),
        (137, "OOMKilled"),
        "{hog_status:?}"
    );

    // Removing one container leaves the others of the pod untouched
    // (containerd 1.6 runs the shim's `delete` after every task delete, as
    // if the shim had died: the pod's share must stay mounted).
    for _ in 0..2 {
        cri.remove_container(&hog_id)
            .unwrap_or_else(|e| panic!("{}", why("RemoveContainer hog", &e)));
    }
    std::thread::sleep(Duration::from_secs(3));
    let out = cri
        .exec_sync(&client_id, &["cat", "/data/hello"], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{}", why("ExecSync after a removal", &e)));
    assert_eq!(
        (out.exit_code, out.stdout.as_str()),
        (0, "hello-from-the-pod\n"),
        "{}",
        why(
            "the pod's files after one container was removed",
            &format!("{out:?}")
        )
    );
    let body = http_get(&format!("{pod_ip}:8080"), "/hello")
        .unwrap_or_else(|e| panic!("{}", why("the pod IP after a removal", &e)));
    assert_eq!(body, "hello-from-the-pod\n");

    // A container that ends on its own, stopped as soon as its output is
    // out (before containerd may have heard of the exit): the stop succeeds,
    // as it does with runc (the kill of a finished process is "not found").
    let oneshot = ContainerSpec::new("oneshot", BUSYBOX_IMAGE, &["echo", "done"]);
    let oneshot_id = cri
        .create_container(&pod_id, &oneshot.config(), &pod)
        .unwrap_or_else(|e| panic!("{}", why("CreateContainer oneshot", &e)));
    cri.start_container(&oneshot_id)
        .unwrap_or_else(|e| panic!("{}", why("StartContainer oneshot", &e)));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(logs.join("oneshot.log")).is_ok_and(|l| l.contains(" done")) {
        assert!(Instant::now() < deadline, "oneshot never wrote its line");
        std::thread::sleep(Duration::from_millis(5));
    }
    cri.stop_container(&oneshot_id, Duration::from_secs(5))
        .unwrap_or_else(|e| {
            panic!(
                "{}",
                why("StopContainer of a container that just ended", &e)
            )
        });
    cri.remove_container(&oneshot_id)
        .unwrap_or_else(|e| panic!("{}", why("RemoveContainer oneshot", &e)));

    // Bad input: a container for a pod that does not exist.
    let e = cri
        .create_container("no-such-pod", &client.config(), &pod)
        .expect_err("a container of a pod that does not exist");
    println!("cri: a container of a missing pod: {}", e.message());

    // Teardown, each call twice.
    for id in [&client_id, &server_id] {
        for _ in 0..2 {
            cri.stop_container(id, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("{}", why("StopContainer", &e)));
        }
        for _ in 0..2 {
            cri.remove_container(id)
                .unwrap_or_else(|e| panic!("{}", why("RemoveContainer", &e)));
        }
    }
    for _ in 0..2 {
        cri.stop_pod_sandbox(&pod_id)
            .unwrap_or_else(|e| panic!("{}", why("StopPodSandbox", &e)));
    }
    for _ in 0..2 {
        cri.remove_pod_sandbox(&pod_id)
            .unwrap_or_else(|e| panic!("{}", why("RemovePodSandbox", &e)));
    }
    assert!(
        cri.list_pod_sandbox().expect("ListPodSandbox").is_empty(),
        "no pod is left"
    );

    // Parity: a pod on the QEMU backend, its TAP in the pod's namespace
    // handed to QEMU as a descriptor. Its parent is a systemd slice, as with
    // kubelet's systemd cgroup driver: containerd passes the cgroupsPath as
    // `slice:cri-containerd:ID`.
    let mut qemu_pod = PodSpec::new("qemu", &logs).config();
    if let Some(linux) = qemu_pod.linux.as_mut() {
        linux.cgroup_parent = "beacontest-podq.slice".into();
    }
    let t0 = Instant::now();
    let qemu_pod_id = cri
        .run_pod_sandbox(&qemu_pod, QEMU_HANDLER)
        .unwrap_or_else(|e| panic!("{}", why("RunPodSandbox (QEMU)", &e)));
    let run_qemu_pod = t0.elapsed();
    let slice_root = Path::new(CGROUP_ROOT).join("beacontest.slice");
    let scope = slice_root
        .join("beacontest-podq.slice")
        .join(format!("cri-containerd-{qemu_pod_id}.scope"));
    let members = std::fs::read_to_string(scope.join("cgroup.procs")).unwrap_or_default();
    let members: Vec<u32> = members
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let qemu_procs: Vec<u32> = sh("pgrep -x qemu-system-x86 || true")
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(
        !shims().is_empty()
            && shims()
                .iter()
                .chain(&qemu_procs)
                .all(|p| members.contains(p)),
        "the shim {:?} and QEMU {qemu_procs:?} are in the systemd-style scope {}: {members:?}",
        shims(),
        scope.display()
    );
    let qemu_ip = cri
        .pod_sandbox_status(&qemu_pod_id)
        .ok()
        .and_then(|s| s.status)
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    let web = ContainerSpec::new(
        "web",
        BUSYBOX_IMAGE,
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo served-by-qemu > /www/hello && exec httpd -f -p 8080 -h /www",
        ],
    );
    let web_id = cri
        .create_container(&qemu_pod_id, &web.config(), &qemu_pod)
        .unwrap_or_else(|e| panic!("{}", why("CreateContainer (QEMU)", &e)));
    cri.start_container(&web_id)
        .unwrap_or_else(|e| panic!("{}", why("StartContainer (QEMU)", &e)));
    let deadline = Instant::now() + Duration::from_secs(120);
    let body = loop {
        match http_get(&format!("{qemu_ip}:8080"), "/hello") {
            Ok(body) if body == "served-by-qemu\n" => break body,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "{}",
                    why("the QEMU pod's IP from the host", &format!("{other:?}"))
                );
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    println!("cri: the QEMU pod at {qemu_ip} answered {body:?}");
    // PortForward over vhost-vsock (the QEMU backend's guest link).
    let url = cri
        .port_forward(&qemu_pod_id, 8080)
        .unwrap_or_else(|e| panic!("{}", why("PortForward (QEMU)", &e)));
    let fwd = forward_once(
        &url,
        8080,
        b"GET /hello HTTP/1.0\r\n\r\n",
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{}", why("forwarding 8080 (QEMU)", &e)));
    assert!(
        String::from_utf8_lossy(&fwd.data).ends_with("\r\n\r\nserved-by-qemu\n")
            && fwd.error.is_empty(),
        "{fwd:?}"
    );
    // Killing the pod's sandbox task (pause) ends its VM: the app container
    // exits too, and the shim goes once the pod is removed.
    let o = containerd
        .ctr(&[
            "-n",
            "k8s.io",
            "task",
            "kill",
            "-s",
            "SIGKILL",
            &qemu_pod_id,
        ])
        .expect("ctr task kill");
    assert!(o.status.success(), "killing the pause task: {o:?}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = cri
            .container_status(&web_id)
            .ok()
            .and_then(|s| s.status)
            .map(|s| s.state());
        if s == Some(api::ContainerState::ContainerExited) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            why(
                "the app container after its pod's sandbox was killed",
                &format!("{s:?}")
            )
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    cri.stop_pod_sandbox(&qemu_pod_id)
        .unwrap_or_else(|e| panic!("{}", why("StopPodSandbox (QEMU)", &e)));
    cri.remove_pod_sandbox(&qemu_pod_id)
        .unwrap_or_else(|e| panic!("{}", why("RemovePodSandbox (QEMU)", &e)));

    // Nothing left: no shim (its VMM with it), virtiofsd, pod namespace,
    // mount or run folder.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut left = Vec::new();
        let shims = shims();
        if !shims.is_empty() {
            left.push(format!("shims {shims:?}"));
        }
        let fsd = sh("pgrep -x virtiofsd || true");
        if !fsd.trim().is_empty() {
            left.push(format!("virtiofsd {}", fsd.trim()));
        }
        let namespaces: Vec<String> = pod_namespaces()
            .into_iter()
            .filter(|n| !namespaces_before.contains(n))
            .collect();
        if !namespaces.is_empty() {
            left.push(format!("pod namespaces {namespaces:?}"));
        }
        let mounts = sh(&format!(
            "grep '{}' /proc/self/mountinfo || true",
            run_dir.display()
        ));
        if !mounts.trim().is_empty() {
            left.push(format!("mounts {}", mounts.trim()));
        }
        let folders = sh(&format!(
            "find {} -mindepth 2 2>/dev/null",
            run_dir.join("sandboxes").display()
        ));
        if !folders.trim().is_empty() {
            left.push(format!("run folders {}", folders.trim()));
        }
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left a minute after the pod was removed: {}\ncontainerd log:\n{}",
            left.join("; "),
            containerd.log_tail(60)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        !sandbox_cgroup.exists(),
        "the shim removed the sandbox's cgroup {}",
        sandbox_cgroup.display()
    );
    assert!(
        !slice_root.exists(),
        "the shim removed the slices it made for the systemd-style path: {}",
        slice_root.display()
    );
    let _ = std::fs::remove_dir(&pod_cgroup);
    let _ = std::fs::remove_dir(Path::new(CGROUP_ROOT).join("beacon-test-pods"));
    println!(
        "cri: RunPodSandbox {run_pod:?} (QEMU backend {run_qemu_pod:?}); all scenarios {:?}",
        started.elapsed()
    );
}
