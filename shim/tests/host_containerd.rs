//! containerd → shim → vminitd → crun, with no VM: vminitd runs as a host
//! process (its host mode) and the shim is pointed at its sockets
//! (`BEACON_SHIM_HOST_GUEST`). This proves the shim v2 protocol against the
//! real containerd 1.6.20 and `ctr` quickly; the same scenarios run against a
//! real VM in the nested lab (`vm_containerd.rs`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use beacon_tests::containerd::{workspace_bin, Containerd, ContainerdSpec};
use beacon_tests::images::{busybox_archive, BUSYBOX_IMAGE};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-beaconbox-v1");

/// Unmounts a folder when dropped.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        beacon_shim::mounts::unmount_all(std::slice::from_ref(&self.0));
    }
}

struct Vminitd(std::process::Child);

impl Drop for Vminitd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// crun raises RLIMIT_MEMLOCK to load the eBPF device filter of cgroup v2; a
/// host whose sandbox withholds CAP_SYS_RESOURCE cannot run containers.
fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

const VMINITD_ENV: &str = "BEACON_TEST_VMINITD";

fn start_vminitd(dir: &Path) -> Vminitd {
    let bin = std::env::var_os(VMINITD_ENV)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_bin("vminitd", "vminitd").expect("vminitd binary"));
    // Its own mount namespace (cgroup2 mounted privately where the host has a
    // hybrid hierarchy), receiving the shim's mounts from the host.
    let pure_v2 = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(" /sys/fs/cgroup ") && l.contains(" - cgroup2 "));
    let setup = if pure_v2 {
        "exec \"$0\" \"$@\""
    } else {
        "mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$0\" \"$@\""
    };
    let log = std::fs::File::create(dir.join("vminitd.log")).expect("log");
    let child = Command::new("unshare")
        .args(["-m", "--propagation", "slave", "sh", "-c", setup])
        .arg(bin)
        .args(["--mode", "host"])
        .arg(format!(
            "--task-addr=unix://{}",
            dir.join("task.sock").display()
        ))
        .arg(format!(
            "--stream-addr=unix://{}",
            dir.join("streams.sock").display()
        ))
        .arg("--state-dir")
        .arg(dir.join("vstate"))
        .arg("--shares-dir")
        .arg(dir.join("shares"))
        .arg("--cgroup-parent")
        .arg(format!("beacon-shim-test-{}", std::process::id()))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting vminitd");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(dir.join("streams.sock")).is_err() {
        assert!(Instant::now() < deadline, "vminitd did not come up");
        std::thread::sleep(Duration::from_millis(10));
    }
    Vminitd(child)
}

#[test]
fn ctr_runs_containers_through_the_shim_and_vminitd_on_the_host() {
    let vminitd = workspace_bin("vminitd", "vminitd").expect("vminitd binary");
    if !beacon_tests::lab::here_or_in_lab(
        has_cap_sys_resource(),
        "CAP_SYS_RESOURCE is missing (crun needs it for cgroup v2 device filters)",
        "ctr_runs_containers_through_the_shim_and_vminitd_on_the_host",
        &[(VMINITD_ENV, vminitd.display().to_string())],
    ) {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("beacon-shim-host")
        .tempdir()
        .expect("tempdir");
    let dir = &tmp.path().to_path_buf();
    // The shares folder is a shared mount before vminitd copies the mount
    // table into its namespace, so the shim's later mounts reach it.
    beacon_shim::mounts::prepare_share(&dir.join("shares")).expect("shares");
    let _unmount = Unmount(dir.join("shares"));
    let _vminitd = start_vminitd(dir);
    let shim_dir = Path::new(SHIM).parent().expect("shim dir").to_path_buf();
    let env = vec![
        (
            "BEACON_SHIM_HOST_GUEST".to_string(),
            format!(
                "{},{},{}",
                dir.join("task.sock").display(),
                dir.join("streams.sock").display(),
                dir.join("shares").display()
            ),
        ),
        (
            "BEACON_SHIM_SOCKET_DIR".into(),
            dir.join("s").display().to_string(),
        ),
        (
            "BEACON_RUN_DIR".into(),
            dir.join("run").display().to_string(),
        ),
        (
            "BEACON_STATE_DIR".into(),
            dir.join("state").display().to_string(),
        ),
        (
            "BEACON_LOG_DIR".into(),
            dir.join("log").display().to_string(),
        ),
        ("BEACON_LOG".into(), "debug".into()),
    ];
    let containerd = Containerd::start(&dir.join("containerd"), &ContainerdSpec { shim_dir, env })
        .expect("containerd");
    let archive = busybox_archive(dir, BUSYBOX_IMAGE, &[]).expect("image");
    let import = containerd
        .ctr(&["images", "import", &archive.display().to_string()])
        .expect("ctr import");
    assert!(import.status.success(), "import: {}", common::text(&import));

    common::basic_scenarios(&containerd, &common::Extras::default());

    // Nothing is left: no mounts under the run folder, no shim server.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let run_dir = dir.join("run").display().to_string();
    assert!(
        !mounts.lines().any(|l| l.contains(&run_dir)),
        "mounts left behind:\n{}",
        mounts
            .lines()
            .filter(|l| l.contains(&run_dir))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let shims = Command::new("pgrep")
            .args(["-f", &format!("{SHIM} -namespace")])
            .output()
            .expect("pgrep");
        let left = String::from_utf8_lossy(&shims.stdout).trim().to_string();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "shim servers still running: {left}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
