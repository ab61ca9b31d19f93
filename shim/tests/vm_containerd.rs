//! containerd → shim → its own microVM (the in-process KVM backend) → vminitd →
//! crun: the product's main job, end to end, with Debian's containerd 1.6.20,
//! `ctr`, the beacon kernel and an initrd with vminitd as /init, netmgr's
//! bridge, virtiofsd and hybrid vsock. It needs a KVM that runs real guests, so
//! on hosts without hardware KVM it runs inside the nested lab.
//!
//! Scenarios: the basic ones the host-mode test also runs (exact output, exit
//! codes, 10 MiB, stdin, exec, kill, a bad id), then what only a VM has: the
//! network to the bridge (ping allowed by BEACON_HOST_ACCESS=icmp, a host TCP
//! port out of reach), metrics, pause and resume, bind mounts (read-only
//! and read-write), a terminal with its size, SIGTERM, the QEMU backend with
//! vhost-vsock and the VM's secret (another host user reaching either vsock
//! backend gets nowhere), containerd's Tasks.Update growing and shrinking the
//! VM on both backends, a guest kernel panic and
//! a killed virtiofsd under running containers (non-zero exit, nothing hangs),
//! the shim killed at a step of the Task API (`BEACON_FAULT`; the steps come
//! from `BEACON_TEST_FAULT_STEPS`) and containerd killed and restarted under a
//! running container, several containers at once, and after each failure and
//! at the end nothing left behind (TAP, lease, mounts, virtiofsd, shim, run
//! folders; VM logs beyond the configured retention at the end).

mod common;

use common::sh;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use beacon_tests::containerd::{shim_env, Containerd, ContainerdSpec, RUNTIME};
use beacon_tests::images::{busybox_archive, BUSYBOX_IMAGE};
use beacon_tests::lab::rerun_in_lab;

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-beaconbox-v1");
/// VM console logs the runtime config keeps (the test runs more sandboxes).
const KEEP_VM_LOGS: usize = 3;
/// The steps at which the shim is killed (`BEACON_FAULT`), comma-separated;
/// `make faults` sets all four (create,start,exec,delete), `make test` runs
/// [`DEFAULT_FAULT_STEPS`] (each costs a VM boot in the emulated lab).
const FAULT_STEPS_ENV: &str = "BEACON_TEST_FAULT_STEPS";
const DEFAULT_FAULT_STEPS: &str = "start";
/// Which container (or exec) each step's fault applies to.
const FAULTS: &str = "create:fault-create,start:fault-start,exec:fault-exec-e,delete:fault-delete";

/// Wait up to a minute for every shim and virtiofsd to be gone; otherwise fail
/// naming each leftover, its threads and where they wait, and what containerd
/// still lists. `after` says which scenario just ended.
fn no_shim_left(containerd: &Containerd, after: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // pgrep run directly: a shell around it would match its own pattern.
        let pgrep = |args: &[&str]| {
            Command::new("pgrep")
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let pids = pgrep(&["-f", &format!("{SHIM} -namespace")]) + &pgrep(&["-x", "virtiofsd"]);
        let pids = pids.split_whitespace().collect::<Vec<_>>().join(" ");
        if pids.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            let detail = sh(&format!(
                "for p in {pids}; do echo \"== $p: $(tr '\\0' ' ' </proc/$p/cmdline)\"; \
                 for t in /proc/$p/task/*; do echo \"  $(cat $t/comm) $(cat $t/wchan)\"; done; done; \
                 ctr --address {sock} task ls; ctr --address {sock} containers ls",
                sock = containerd.socket.display(),
            ));
            panic!(
                "after {after}: still running [{pids}]\n{detail}\ncontainerd log:\n{}",
                containerd.log_tail(60)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `ctr run --rm` of `script` in container `id` (with `options`), which must
/// print `armed`; then `kill` runs, and ctr must return non-zero within five
/// minutes (the kernel-panic case first eats the guest's memory, which took
/// 2.5 minutes in a loaded lab). Returns ctr's output and the shim log's tail.
fn guest_dies(
    containerd: &Containerd,
    id: &str,
    options: &[&str],
    script: &str,
    kill: impl FnOnce(),
) -> (std::process::Output, String) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new("ctr")
        .arg("--address")
        .arg(&containerd.socket)
        .args(["run", "--rm", "--runtime", RUNTIME])
        .args(options)
        .args([BUSYBOX_IMAGE, id, "sh", "-c", script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ctr run");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    if first != "armed" {
        let _ = child.kill();
        let o = child.wait_with_output().expect("ctr");
        panic!(
            "{id}: never armed (first line {first:?})\n{}",
            common::failure(containerd, id, &o)
        );
    }
    kill();
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait().expect("ctr").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().expect("ctr");
            panic!(
                "{id}: ctr still running 5 minutes after the failure\n{}",
                common::failure(containerd, id, &o)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = child.wait_with_output().expect("ctr");
    assert!(
        !o.status.success(),
        "{id}: the task did not fail\n{}",
        common::failure(containerd, id, &o)
    );
    (o, containerd.log_tail(40))
}

/// Run a `/usr/bin/python3` `script` as user nobody; its stdout (and stderr, for the
/// failure message).
fn as_nobody(script: &str) -> String {
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            // Debian's: a python3 earlier in root's PATH may live where
            // nobody cannot enter.
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .output()
        .expect("setpriv");
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// containerd's Tasks.Update for task `id` with OCI LinuxResources `json`
/// (what `ctr` 1.6 cannot send), in the `default` namespace.
fn update_task(socket: &Path, id: &str, json: &str) -> Result<(), String> {
    use containerd_client::services::v1::{tasks_client::TasksClient, UpdateTaskRequest};
    use containerd_client::tonic::Request;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let channel = containerd_client::connect(socket)
            .await
            .map_err(|e| format!("connecting to containerd: {e}"))?;
        let request = UpdateTaskRequest {
            container_id: id.into(),
            resources: Some(prost_types::Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
                value: json.as_bytes().to_vec(),
            }),
            annotations: Default::default(),
        };
        let request = containerd_client::with_namespace!(request, "default");
        TasksClient::new(channel)
            .update(request)
            .await
            .map(drop)
            .map_err(|s| s.message().to_string())
    })
}

/// containerd's Tasks.Update resizes the VM of container `id` on `backend`:
/// a CPU quota of 2 and a 640 MiB limit grow a 1-vCPU, 512 MiB VM (with
/// room for 1 more vCPU and 256 MiB) before vminitd applies them; beyond the
/// room is refused with nothing changed; lowering them shrinks the VM after
/// the cgroup.
fn resize_through_update(containerd: &Containerd, id: &str, backend: &str) {
    let failure = |what: &str, o: &std::process::Output| common::failure(containerd, what, o);
    let o = containerd
        .ctr(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--annotation",
            &format!("io.beaconbox.vm.backend={backend}"),
            "--annotation",
            "io.beaconbox.vm.max_cpus=2",
            "--annotation",
            "io.beaconbox.vm.hotplug_memory_mib=256",
            BUSYBOX_IMAGE,
            id,
            "sleep",
            "600",
        ])
        .expect("ctr run");
    assert!(o.status.success(), "{}", failure("resize run", &o));
    let in_vm = |script: &str| {
        let o = containerd
            .ctr(&["task", "exec", "--exec-id", "look", id, "sh", "-c", script])
            .expect("exec");
        assert!(o.status.success(), "{}", failure(script, &o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    // vCPUs and MemTotal in MiB as the container sees them, and its cgroup
    // memory limit as vminitd reports it (containers here see no cgroup fs).
    let shape = "echo $(nproc) $(awk '/^MemTotal:/{print int($2/1024)}' /proc/meminfo)";
    let limit = || {
        let o = containerd.ctr(&["task", "metrics", id]).expect("metrics");
        assert!(o.status.success(), "{}", failure("metrics", &o));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("memory.usage_limit"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let before = in_vm(shape);
    let update = |json: &str| update_task(&containerd.socket, id, json);
    update(r#"{"cpu":{"quota":200000,"period":100000},"memory":{"limit":671088640}}"#)
        .unwrap_or_else(|e| panic!("{}", failure(&format!("update: {e}"), &o)));
    // vminitd onlines the new vCPU when the kernel announces it.
    let mut grown = String::new();
    for _ in 0..600 {
        grown = in_vm(shape);
        if grown.starts_with("2 ") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let fields: Vec<&str> = grown.split_whitespace().collect();
    let mem_before: u64 = before
        .split_whitespace()
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("MemTotal before: {before:?}"));
    assert_eq!(
        fields.first(),
        Some(&"2"),
        "vCPUs after the update: {grown:?} (before: {before:?})"
    );
    let mem_after: u64 = fields.get(1).and_then(|m| m.parse().ok()).unwrap_or(0);
    assert_eq!(
        mem_after,
        mem_before + 256,
        "MemTotal after the update: {grown:?} (before: {before:?})"
    );
    assert_eq!(limit(), "671088640", "the container's memory limit");
    let err = update(r#"{"cpu":{"quota":300000,"period":100000}}"#).expect_err("3 vCPUs > max 2");
    assert!(err.contains("max_cpus"), "{err}");
    let err = update(r#"{"memory":{"limit":1073741824}}"#).expect_err("beyond the room");
    assert!(err.contains("hotplug_memory_mib"), "{err}");
    assert_eq!(in_vm(shape), grown, "a refused update changes nothing");
    assert_eq!(limit(), "671088640", "a refused update changes no limit");
    update(r#"{"cpu":{"quota":100000,"period":100000},"memory":{"limit":268435456}}"#)
        .unwrap_or_else(|e| panic!("shrink: {e}"));
    let shrunk = in_vm(shape);
    assert_eq!(
        shrunk,
        format!("1 {mem_before}"),
        "after lowering the limits (before: {before:?}, grown: {grown:?})"
    );
    assert_eq!(limit(), "268435456", "the lowered memory limit");
    let o = containerd
        .ctr(&["task", "kill", "-s", "SIGKILL", id])
        .expect("kill");
    assert!(o.status.success(), "{}", failure("resize kill", &o));
    common::wait_stopped(containerd, id);
    common::remove(containerd, id);
    no_shim_left(containerd, &format!("the resize on {backend}"));
}

// tests/run-all runs this in its vm lane and skips it by this name in its
// main lane: keep the name, or change it there too.
#[test]
fn ctr_runs_containers_in_microvms_of_our_own_vmm() {
    let Some(share) = common::vm_test_here(
        "ctr_runs_containers_in_microvms_of_our_own_vmm",
        &[(
            FAULT_STEPS_ENV,
            std::env::var(FAULT_STEPS_ENV).unwrap_or_else(|_| DEFAULT_FAULT_STEPS.into()),
        )],
    ) else {
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("beacon-shim-vm")
        .tempdir()
        .expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let shim_dir = Path::new(SHIM).parent().expect("shim dir").to_path_buf();
    let run_dir = dir.join("run");
    // Inside the emulated lab a guest takes over a minute to boot, longer when
    // several boot at once: a runtime config file (the one the shim reads from
    // BEACON_RUNTIME_CONFIG when containerd passes none) gives it room.
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!("keep_vm_logs = {KEEP_VM_LOGS}\n[vm]\nboot_timeout_secs = 600\n"),
    )
    .expect("runtime config");
    let mut env = shim_env(&dir, &share);
    env.push(("BEACON_LOG".into(), "debug".into()));
    env.push(("BEACON_RUNTIME_CONFIG".into(), config.display().to_string()));
    // netmgr lets guests reach nothing on the host by default: allow ping only,
    // and check below that it works and that a TCP service still is out of reach.
    env.push(("BEACON_HOST_ACCESS".into(), "icmp".into()));
    // Shims of the fault containers below kill themselves at their step.
    env.push((beacon_shim::fault::FAULT_ENV.into(), FAULTS.into()));
    let containerd = Containerd::start(
        &dir.join("containerd"),
        &ContainerdSpec {
            shim_dir,
            env: env.clone(),
        },
    )
    .expect("containerd");
    let archive = busybox_archive(&dir, BUSYBOX_IMAGE, &[]).expect("image");
    let import = containerd
        .ctr(&["images", "import", &archive.display().to_string()])
        .expect("ctr import");
    assert!(import.status.success(), "import: {}", common::text(&import));
    let failure = |what: &str, o: &std::process::Output| {
        let logs = sh(&format!(
            "tail -n 40 {}/log/*.log 2>/dev/null",
            dir.display()
        ));
        format!(
            "{}\nVM logs:\n{logs}",
            common::failure(&containerd, what, o)
        )
    };

    // Nothing of a sandbox outlives it: no shim or virtiofsd, lease, TAP,
    // mount or run folder.
    let shim_paths = beacon_paths::BeaconPaths::from_lookup(|k| {
        env.iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.into())
    });
    // The leases and TAPs of past sandboxes, named.
    let network_left = || {
        let mut left = Vec::new();
        let net = beacon_netmgr::config::NetConfig::legacy(&shim_paths);
        let leases =
            beacon_netmgr::leasedb::LeaseDb::new(&net.db_path, net.pool, net.gateway, net.prefix)
                .list()
                .expect("reading the shims' lease database");
        if !leases.is_empty() {
            left.push(format!("leases {leases:?}"));
        }
        let taps = sh("ip -o link show | grep -o 'beacon-[0-9a-f]*' || true");
        if !taps.trim().is_empty() {
            left.push(format!("TAPs {}", taps.trim()));
        }
        left
    };
    // What is left of past sandboxes now, each kind named; the network only
    // with `network`.
    let leftovers = |network: bool| {
        let mut left = if network { network_left() } else { Vec::new() };
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
            left.push(format!("sandbox run folders {}", folders.trim()));
        }
        left
    };
    // containerd cleans up after a dead shim on its own time (it runs the
    // shim's `delete` once it notices the closed connection): wait up to a
    // minute for everything to go.
    let nothing_left_but = |after: &str, network: bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            no_shim_left(&containerd, after);
            let left = leftovers(network);
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after {after}, still left a minute later: {}\ncontainerd log:\n{}",
                left.join("; "),
                containerd.log_tail(60)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let nothing_left = |after: &str| nothing_left_but(after, true);

    // Bind mounts: read-write visible both ways, read-only refused.
    let data = dir.join("data");
    let ro = dir.join("ro");
    std::fs::create_dir_all(&data).expect("data");
    std::fs::create_dir_all(&ro).expect("ro");
    std::fs::write(ro.join("hello"), "from-the-host\n").expect("ro file");
    // A host service on every address, not in BEACON_HOST_ACCESS: only netmgr's
    // input chain keeps the container's connect from completing. nc must fail to
    // connect (exit 1: timed out; a connected nc would hang until `timeout`), and
    // no handshake may reach the listener (checked after the container ran).
    let closed = std::net::TcpListener::bind(("0.0.0.0", 0)).expect("host listener");
    closed.set_nonblocking(true).expect("non-blocking listener");
    let closed_port = closed.local_addr().expect("listener port").port();
    let one_shot_checks = format!(
        "ping -c 1 -W 10 10.88.0.1 && \
         {{ timeout 60 nc -w 10 10.88.0.1 {closed_port} </dev/null; test $? = 1; }} && \
         test \"$(cat /ro/hello)\" = from-the-host && echo written > /data/out && \
         ! touch /ro/x 2>/dev/null"
    );
    let while_running = |containerd: &Containerd| {
        let failure = |what: &str, o: &std::process::Output| common::failure(containerd, what, o);
        // A terminal for an exec, with the size ctr's side has. ctr starts
        // the exec before it sends the size (containerd 1.6's `task exec -t`
        // resizes after Start), so the process waits up to 10 s for a size
        // to arrive rather than racing ctr's own resize (while the pty is
        // still 0x0 busybox's `stty size` prints an error and exits 0).
        let o = Command::new("script")
            .args(["-qec"])
            .arg(format!(
                "stty rows 40 cols 100; ctr --address {} task exec -t --exec-id tty c5 \
                 sh -c 'for i in $(seq 100); do s=$(stty size 2>&1); \
                 case \"$s\" in [1-9]*) break ;; esac; sleep 0.1; done; echo \"$s\"'",
                containerd.socket.display()
            ))
            .arg("/dev/null")
            .output()
            .expect("script");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("40 100"),
            "{}",
            failure("exec terminal size", &o)
        );
        let o = containerd.ctr(&["task", "metrics", "c5"]).expect("metrics");
        let metrics = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success() && metrics.contains("memory"),
            "{}",
            failure("metrics", &o)
        );
        let o = containerd.ctr(&["task", "pause", "c5"]).expect("pause");
        assert!(o.status.success(), "{}", failure("pause", &o));
        let o = containerd.ctr(&["task", "ls"]).expect("ls");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("PAUSED"),
            "{}",
            failure("paused state", &o)
        );
        let o = containerd.ctr(&["task", "resume", "c5"]).expect("resume");
        assert!(o.status.success(), "{}", failure("resume", &o));
        // Hybrid vsock: another host user cannot even reach the VM's socket.
        let sockets = sh(&format!("ls {}/sandboxes/*/vsock.sock", run_dir.display()));
        let socket = sockets.lines().next().expect("c5's hybrid vsock socket");
        let tried = as_nobody(&format!(
            "import socket\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect({socket:?}); print('connected')\nexcept PermissionError: print('refused')\n"
        ));
        assert_eq!(tried.trim(), "refused", "a non-root user reached {socket}");
    };
    let started = Instant::now();
    common::basic_scenarios(
        &containerd,
        &common::Extras {
            run_options: vec![
                "--mount".into(),
                format!(
                    "type=bind,src={},dst=/data,options=rbind:rw",
                    data.display()
                ),
                "--mount".into(),
                format!("type=bind,src={},dst=/ro,options=rbind:ro", ro.display()),
            ],
            one_shot_checks: &one_shot_checks,
            while_running: Some(&while_running),
        },
    );
    assert_eq!(
        std::fs::read_to_string(data.join("out")).expect("written by the container"),
        "written\n"
    );
    match closed.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => {
            panic!("a guest reached a host TCP port BEACON_HOST_ACCESS does not allow: {other:?}")
        }
    }

    no_shim_left(&containerd, "the basic scenarios");
    // On hybrid vsock the shim dials vminitd when the guest signals it is
    // serving, rather than polling the booting guest.
    assert!(
        containerd
            .log_text()
            .contains("vminitd signalled it is serving"),
        "no shim got vminitd's ready signal:\n{}",
        containerd.log_tail(80)
    );

    eprintln!(
        "basic scenarios (2 VMs): {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The QEMU backend, so vhost-vsock with the VM's secret: a container runs
    // and execs work; another host user reaching the guest's CID is closed
    // without an answer on both of vminitd's ports.
    let started = Instant::now();
    let o = containerd
        .ctr(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--annotation",
            "io.beaconbox.vm.backend=qemu",
            BUSYBOX_IMAGE,
            "q1",
            "sleep",
            "600",
        ])
        .expect("ctr run");
    assert!(o.status.success(), "{}", failure("qemu run", &o));
    let o = containerd
        .ctr(&["task", "exec", "--exec-id", "e1", "q1", "echo", "from-qemu"])
        .expect("exec");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "from-qemu\n",
        "{}",
        failure("qemu exec", &o)
    );
    let cids = sh(&format!("ls {}/vsock-cids", run_dir.display()));
    let cid: u32 = cids
        .split_whitespace()
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no CID lease file: {cids:?}"));
    for (port, first) in [(1024, "\\0\\0\\0\\x10"), (1025, "EVENTS\\n")] {
        let tried = as_nobody(&format!(
            "import socket\ns=socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\ns.settimeout(30)\ns.connect(({cid}, {port}))\ns.sendall(b'{first}' + b'x' * 100)\nprint('closed' if s.recv(100) == b'' else 'answered')\n"
        ));
        assert_eq!(
            tried.trim(),
            "closed",
            "a non-root user got an answer from guest CID {cid} port {port}"
        );
    }
    let o = containerd
        .ctr(&["task", "kill", "-s", "SIGKILL", "q1"])
        .expect("kill");
    assert!(o.status.success(), "{}", failure("qemu kill", &o));
    common::wait_stopped(&containerd, "q1");
    common::remove(&containerd, "q1");
    no_shim_left(&containerd, "the QEMU backend");
    // pgrep run directly (a shell around it would match its own pattern); -f
    // because a process name (comm) is cut to 15 characters.
    let qemu = Command::new("pgrep")
        .args(["-f", "qemu-system-x86_64"])
        .output()
        .expect("pgrep");
    assert!(
        qemu.stdout.is_empty(),
        "a QEMU process is left: {}",
        String::from_utf8_lossy(&qemu.stdout)
    );
    eprintln!(
        "QEMU backend with vhost-vsock (1 VM): {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // containerd's Tasks.Update resizes the VM, on both backends (QEMU's
    // through QMP, on its hotplug machine).
    for (id, backend) in [("up1", "kvm"), ("uq1", "qemu")] {
        let started = Instant::now();
        resize_through_update(&containerd, id, backend);
        eprintln!(
            "resize through Tasks.Update on {backend} (1 VM): {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }

    // The guest or its file server dies under a running container: the task
    // exits non-zero, ctr returns, and (checked at the end) nothing is left.
    let started = Instant::now();
    // A real kernel panic: a privileged container arms panic_on_oom and eats
    // the guest's memory (panic=-1 turns the panic into a reset, as for PID 1,
    // vminitd, dying: the kernel panics then too, and no container can reach
    // vminitd to kill it).
    let (o, log) = guest_dies(
        &containerd,
        "panic",
        &["--privileged"],
        "echo 2 >/proc/sys/vm/panic_on_oom && echo armed && tail /dev/zero",
        || {},
    );
    let vm_log = std::fs::read_to_string(dir.join("log").join("panic.vm.log")).unwrap_or_default();
    assert!(
        vm_log.contains("Kernel panic"),
        "no kernel panic in the VM log:\n{vm_log}\n{}\n{log}",
        failure("panic", &o)
    );
    // virtiofsd killed: the shim ends the VM (the guest would wait on the
    // share forever).
    guest_dies(&containerd, "fsdie", &[], "echo armed && sleep 600", || {
        let o = Command::new("pkill")
            .args(["-KILL", "-x", "virtiofsd"])
            .output()
            .expect("pkill");
        assert!(o.status.success(), "no virtiofsd to kill");
    });
    no_shim_left(&containerd, "the guest failures");
    eprintln!(
        "guest failures (2 VMs): {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The shim killed (SIGKILL) at a step of the Task API: ctr fails or the
    // task ends, containerd cleans up through the shim's `delete`, nothing is
    // left, and the next containers (below) start.
    let steps = std::env::var(FAULT_STEPS_ENV).unwrap_or_else(|_| DEFAULT_FAULT_STEPS.into());
    for step in steps.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let started = Instant::now();
        let id = format!("fault-{step}");
        let run = |detach: bool, cmd: &[&str]| {
            let mut a = vec![
                "run",
                if detach { "-d" } else { "--rm" },
                "--runtime",
                RUNTIME,
            ];
            a.extend([BUSYBOX_IMAGE, id.as_str()]);
            a.extend(cmd);
            containerd.ctr(&a).expect("ctr run")
        };
        match step {
            "create" | "start" => {
                let o = run(false, &["echo", "never"]);
                assert!(
                    !o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("never"),
                    "{}",
                    failure(&format!("killed at {step}"), &o)
                );
            }
            "exec" => {
                let o = run(true, &["sleep", "600"]);
                assert!(o.status.success(), "{}", failure("run -d before exec", &o));
                let o = containerd
                    .ctr(&["task", "exec", "--exec-id", "fault-exec-e", &id, "true"])
                    .expect("exec");
                assert!(!o.status.success(), "{}", failure("killed at exec", &o));
            }
            "delete" => {
                // The task ends normally; the shim dies as ctr deletes it.
                let _ = run(false, &["true"]);
            }
            other => panic!("{FAULT_STEPS_ENV}: unknown step {other:?}"),
        }
        // What containerd still holds of it goes the normal way.
        let _ = containerd.ctr(&["task", "rm", "-f", &id]);
        let _ = containerd.ctr(&["containers", "rm", &id]);
        // containerd gives the shim's `delete` 5 s and kills it after that
        // (its cleanup timeout), which a loaded lab exceeds: mounts and run
        // folders go first and must be gone; a lease and TAP left then are
        // the reconciler's, which every shim runs as it starts (checked
        // after the next container below).
        let after = format!("the shim killed at {step}");
        nothing_left_but(&after, false);
        let left = network_left();
        if !left.is_empty() {
            eprintln!(
                "after {after}, left for the next shim's reconciler: {}",
                left.join("; ")
            );
        }
        let o = containerd.ctr(&["containers", "ls", "-q"]).expect("ls");
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains(&id),
            "{}",
            failure(&format!("{id} still listed"), &o)
        );
        eprintln!(
            "shim killed at {step}: cleaned up in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }

    // containerd killed and started again while a container runs: its shim
    // keeps it, containerd reconnects to the shim, `task ls` still shows it
    // running, an exec still works, and it ends and goes the normal way.
    let started = Instant::now();
    let o = containerd
        .ctr(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            BUSYBOX_IMAGE,
            "survivor",
            "sleep",
            "600",
        ])
        .expect("ctr run -d");
    assert!(o.status.success(), "{}", failure("run -d survivor", &o));
    // The survivor's shim reconciled as it started: no fault sandbox keeps
    // a lease or TAP.
    let left = network_left().join("; ");
    for step in steps.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let id = format!("fault-{step}");
        let tap = beacon_netmgr::naming::tap_name(&id);
        assert!(
            !left.contains(&format!("\"{id}\"")) && !left.contains(&tap),
            "{id}'s lease or TAP {tap} left after the next shim started: {left}"
        );
    }
    containerd.restart().expect("containerd restarted");
    let o = containerd.ctr(&["task", "ls"]).expect("task ls");
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.starts_with("survivor") && l.contains("RUNNING")),
        "{}",
        failure("survivor listed after the restart", &o)
    );
    let o = containerd
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "after",
            "survivor",
            "echo",
            "still-here",
        ])
        .expect("exec");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "still-here\n",
        "{}",
        failure("exec after the restart", &o)
    );
    let o = containerd
        .ctr(&["task", "kill", "-s", "SIGKILL", "survivor"])
        .expect("kill");
    assert!(o.status.success(), "{}", failure("kill survivor", &o));
    common::wait_stopped(&containerd, "survivor");
    common::remove(&containerd, "survivor");
    nothing_left("a containerd restart");
    eprintln!(
        "containerd restarted under a running container (1 VM): {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Several containers (and so several VMs) at once: five on a host with
    // hardware KVM; two inside the lab, whose one emulated CPU boots VMs one
    // after the other at about half a minute each.
    let at_once = if rerun_in_lab() { 2 } else { 5 };
    let started = Instant::now();
    let many: Vec<_> = (0..at_once)
        .map(|i| {
            let socket = containerd.socket.clone();
            std::thread::spawn(move || {
                Command::new("ctr")
                    .arg("--address")
                    .arg(&socket)
                    .args([
                        "run",
                        "--rm",
                        "--runtime",
                        RUNTIME,
                        BUSYBOX_IMAGE,
                        &format!("many{i}"),
                        "echo",
                        &format!("many-{i}"),
                    ])
                    .output()
                    .expect("ctr")
            })
        })
        .collect();
    for (i, h) in many.into_iter().enumerate() {
        let o = h.join().expect("thread");
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            format!("many-{i}\n"),
            "{}",
            failure("parallel", &o)
        );
    }
    eprintln!(
        "{at_once} containers at once: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Nothing is left behind.
    nothing_left("the end");
    let vm_logs: Vec<_> = std::fs::read_dir(dir.join("log"))
        .expect("log folder")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".vm.log"))
        .map(|e| e.file_name())
        .collect();
    assert!(
        vm_logs.len() <= KEEP_VM_LOGS,
        "more VM logs than the {KEEP_VM_LOGS} configured: {vm_logs:?}"
    );
}
