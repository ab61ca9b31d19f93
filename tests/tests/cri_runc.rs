//! The CRI test harness on the host, with runc (no VM): a private containerd
//! 1.6 with its CRI plugin (bridge `beacri0`, 10.77.0.0/24) runs a busybox pod
//! through the CRI v1 client, answers ExecSync (output, exit code, timeout),
//! gives the pod an address the host reaches, forwards a port with
//! PortForward (the WebSocket client), and stops and removes
//! everything idempotently, leaving no pod, network namespace or bridge.
//! Runs as root; fails (never skips) when containerd, runc or the CNI plugins
//! are missing.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use beacon_tests::containerd::{Containerd, ContainerdSpec, CriRuntime, CriSpec, RUNTIME};
use beacon_tests::cri::{api, forward_once, ContainerSpec, Cri, PodSpec};
use beacon_tests::images::{busybox_archive, pause_archive, BUSYBOX_IMAGE, PAUSE_IMAGE};

const BRIDGE: &str = "beacri0";
const SUBNET: &str = "10.77.0.0/24";
const PORT: u16 = 8080;

/// The network namespace (its bind mount under /var/run/netns) of the pod
/// whose verbose status info is `info`.
fn pod_netns(info: &std::collections::HashMap<String, String>) -> String {
    let info: serde_json::Value =
        serde_json::from_str(info.get("info").map(String::as_str).unwrap_or("null"))
            .expect("PodSandboxStatus info.info is JSON");
    info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["type"] == "network"))
        .and_then(|n| n["path"].as_str())
        .unwrap_or_else(|| panic!("no network namespace in the pod's spec: {info}"))
        .to_string()
}

/// Panics unless `program --version` runs.
fn require(program: &str, package: &str) {
    let ok = Command::new(program)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{program} is missing: install the Debian package {package} (resources/install.sh)"
    );
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

#[test]
fn cri_runc_pod_lifecycle() {
    let started = Instant::now();
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test runs containerd and must run as root");
    require("containerd", "containerd");
    require("ctr", "containerd");
    require("runc", "runc");

    let tmp = tempfile::Builder::new()
        .prefix("beacon-cri-")
        .tempdir()
        .expect("tempdir");
    let dir = tmp.path();
    let logs = dir.join("pod-logs");
    std::fs::create_dir_all(&logs).expect("log folder");
    let runtime_config = dir.join("beaconbox-runtime.toml");

    {
        let containerd = Containerd::start_cri(
            &dir.join("containerd"),
            &ContainerdSpec {
                ..Default::default()
            },
            &CriSpec {
                bridge: BRIDGE.into(),
                subnet: SUBNET.into(),
                // Not run here (no VM): only its configuration is checked.
                runtimes: vec![CriRuntime {
                    handler: "beaconbox".into(),
                    runtime_type: RUNTIME.into(),
                    config_path: Some(runtime_config.clone()),
                }],
            },
        )
        .expect("containerd with CRI");
        let log = |what: &str| format!("{what}\ncontainerd's log:\n{}", containerd.log_tail(40));

        for archive in [
            busybox_archive(dir, BUSYBOX_IMAGE, &[]).expect("busybox image"),
            pause_archive(dir, PAUSE_IMAGE).expect("pause image"),
        ] {
            containerd.import_image(&archive).expect("image import");
        }
        let cri = Cri::connect(&containerd.socket).expect("CRI client");

        // Version and Status.
        let version = cri
            .version()
            .unwrap_or_else(|e| panic!("{}", log(&format!("Version: {e}"))));
        assert_eq!(version.runtime_name, "containerd", "{version:?}");
        assert_eq!(version.runtime_api_version, "v1", "{version:?}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = cri
                .status()
                .unwrap_or_else(|e| panic!("{}", log(&format!("Status: {e}"))));
            let conditions = status.status.map(|s| s.conditions).unwrap_or_default();
            let ready = |kind: &str| conditions.iter().any(|c| c.r#type == kind && c.status);
            if ready("RuntimeReady") && ready("NetworkReady") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}",
                log(&format!("runtime or network not ready: {conditions:?}"))
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // The CRI config as containerd read it: both handlers, the second
        // with its options (ConfigPath for the shim).
        let info = cri.status_verbose().expect("Status").info;
        let config: serde_json::Value =
            serde_json::from_str(info.get("config").map(String::as_str).unwrap_or("null"))
                .expect("Status info.config is JSON");
        let runtimes = &config["containerd"]["runtimes"];
        assert_eq!(
            runtimes["runc"]["runtimeType"], "io.containerd.runc.v2",
            "{runtimes}"
        );
        assert_eq!(runtimes["beaconbox"]["runtimeType"], RUNTIME, "{runtimes}");
        assert_eq!(
            runtimes["beaconbox"]["options"]["ConfigPath"],
            runtime_config.display().to_string(),
            "{runtimes}"
        );
        assert_eq!(config["sandboxImage"], PAUSE_IMAGE, "{config}");
        let images = cri.list_images().expect("ListImages");
        for name in [BUSYBOX_IMAGE, PAUSE_IMAGE] {
            assert!(
                images.iter().any(|i| i.repo_tags.iter().any(|t| t == name)),
                "{name} not among the CRI images: {images:?}"
            );
        }

        // A pod on the CNI bridge.
        let pod_spec = PodSpec::new("cri-runc", &logs);
        let pod_config = pod_spec.config();
        let pod = cri
            .run_pod_sandbox(&pod_config, "runc")
            .unwrap_or_else(|e| panic!("{}", log(&format!("RunPodSandbox: {e}"))));
        let answer = cri
            .pod_sandbox_status_verbose(&pod)
            .expect("PodSandboxStatus");
        let netns = pod_netns(&answer.info);
        assert!(
            netns.starts_with("/var/run/netns/cni-") && Path::new(&netns).exists(),
            "pod network namespace {netns:?}"
        );
        let status = answer.status.expect("a sandbox status");
        assert_eq!(
            status.state(),
            api::PodSandboxState::SandboxReady,
            "{status:?}"
        );
        let ip: Ipv4Addr = status
            .network
            .as_ref()
            .map(|n| n.ip.as_str())
            .unwrap_or_default()
            .parse()
            .unwrap_or_else(|e| panic!("the pod has no IPv4 address ({e}): {status:?}"));
        assert_eq!(
            ip.octets()[..3],
            [10, 77, 0],
            "pod address {ip} outside {SUBNET}"
        );

        // A busybox container in it.
        let container_config =
            ContainerSpec::new("sleeper", BUSYBOX_IMAGE, &["sleep", "3600"]).config();
        let ctr = cri
            .create_container(&pod, &container_config, &pod_config)
            .unwrap_or_else(|e| panic!("{}", log(&format!("CreateContainer: {e}"))));
        cri.start_container(&ctr)
            .unwrap_or_else(|e| panic!("{}", log(&format!("StartContainer: {e}"))));
        let state = cri
            .container_status(&ctr)
            .expect("ContainerStatus")
            .status
            .expect("a container status")
            .state();
        assert_eq!(state, api::ContainerState::ContainerRunning);
        let listed = cri.list_containers().expect("ListContainers");
        assert!(listed.iter().any(|c| c.id == ctr), "{listed:?}");

        // Stats and a resource update (runc update).
        let stats = cri
            .container_stats(&ctr)
            .unwrap_or_else(|e| panic!("{}", log(&format!("ContainerStats: {e}"))))
            .expect("container stats");
        assert_eq!(stats.attributes.map(|a| a.id), Some(ctr.clone()));
        let resources = api::LinuxContainerResources {
            cpu_shares: 512,
            memory_limit_in_bytes: 256 << 20,
            ..Default::default()
        };
        cri.update_container_resources(&ctr, &resources)
            .unwrap_or_else(|e| panic!("{}", log(&format!("UpdateContainerResources: {e}"))));

        // ExecSync: output and exit code.
        let out = cri
            .exec_sync(
                &ctr,
                &["sh", "-c", "echo hi; exit 3"],
                Duration::from_secs(10),
            )
            .unwrap_or_else(|e| panic!("{}", log(&format!("ExecSync: {e}"))));
        assert_eq!((out.exit_code, out.stdout.as_str()), (3, "hi\n"), "{out:?}");

        // ExecSync past its timeout.
        let t = Instant::now();
        let timed_out = cri.exec_sync(&ctr, &["sleep", "10"], Duration::from_secs(1));
        let took = t.elapsed();
        // containerd 1.6 kills the process at the timeout and answers
        // DEADLINE_EXCEEDED ("failed to exec in container: timeout 1s exceeded").
        eprintln!("ExecSync of sleep 10 with a 1 s timeout: {timed_out:?} after {took:?}");
        let status = timed_out.expect_err("ExecSync past its timeout succeeded");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(
            status.message().contains("timeout 1s exceeded"),
            "{status:?}"
        );
        assert!(took < Duration::from_secs(6), "took {took:?}: {status:?}");

        // The host reaches the pod: a greeting served from inside it, over the
        // bridge (checked first: the address must not be routed anywhere else).
        let route = Command::new("ip")
            .args(["route", "get", &ip.to_string()])
            .output()
            .expect("ip route get");
        let route = String::from_utf8_lossy(&route.stdout);
        assert!(
            route.contains(&format!("dev {BRIDGE}")),
            "the pod address {ip} is not routed over {BRIDGE}: {route}"
        );
        let serve = format!("nc -ll -p {PORT} -e echo hello </dev/null >/dev/null 2>&1 &");
        let out = cri
            .exec_sync(&ctr, &["sh", "-c", &serve], Duration::from_secs(10))
            .expect("ExecSync starting the server");
        assert_eq!(out.exit_code, 0, "{out:?}");
        let addr = SocketAddr::from((ip, PORT));
        let deadline = Instant::now() + Duration::from_secs(10);
        let greeting = loop {
            let attempt =
                TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let mut text = String::new();
                    s.read_to_string(&mut text)?;
                    Ok(text)
                });
            match attempt {
                Ok(text) if !text.is_empty() => break text,
                other if Instant::now() > deadline => {
                    panic!("{}", log(&format!("no greeting from {addr}: {other:?}")))
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        assert_eq!(greeting, "hello\n");

        // PortForward: the same server through containerd's streaming server
        // (it dials localhost in the pod's namespace), and a port nothing
        // listens on, which the error channel reports.
        let url = cri
            .port_forward(&pod, PORT)
            .unwrap_or_else(|e| panic!("{}", log(&format!("PortForward: {e}"))));
        let fwd = forward_once(&url, PORT, b"", Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{}", log(&format!("forwarding {url}: {e}"))));
        assert_eq!(
            (
                String::from_utf8_lossy(&fwd.data).as_ref(),
                fwd.error.as_str()
            ),
            ("hello\n", ""),
            "{fwd:?}"
        );
        let url = cri.port_forward(&pod, 9).expect("PortForward");
        let fwd = forward_once(&url, 9, b"", Duration::from_secs(30)).expect("forward");
        assert!(
            fwd.data.is_empty() && fwd.error.contains("error forwarding port 9"),
            "{fwd:?}"
        );

        // Stop and remove, each twice: the second call succeeds too.
        for _ in 0..2 {
            cri.stop_container(&ctr, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("{}", log(&format!("StopContainer: {e}"))));
        }
        for _ in 0..2 {
            cri.remove_container(&ctr)
                .unwrap_or_else(|e| panic!("{}", log(&format!("RemoveContainer: {e}"))));
        }
        for _ in 0..2 {
            cri.stop_pod_sandbox(&pod)
                .unwrap_or_else(|e| panic!("{}", log(&format!("StopPodSandbox: {e}"))));
        }
        for _ in 0..2 {
            cri.remove_pod_sandbox(&pod)
                .unwrap_or_else(|e| panic!("{}", log(&format!("RemovePodSandbox: {e}"))));
        }
        assert_eq!(cri.list_pod_sandbox().expect("ListPodSandbox"), vec![]);
        assert_eq!(cri.list_containers().expect("ListContainers"), vec![]);
        assert!(
            !Path::new(&netns).exists(),
            "the pod's network namespace {netns} is left behind"
        );
        assert!(
            link_exists(BRIDGE),
            "the CNI plugin made no bridge {BRIDGE}"
        );
    }
    // Dropped: containerd killed, its bridge deleted.
    assert!(!link_exists(BRIDGE), "bridge {BRIDGE} left behind");
    eprintln!("cri_runc: passed in {:?}", started.elapsed());
}
