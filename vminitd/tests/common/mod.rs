//! Host test harness: vminitd as a plain process on unix sockets, driving
//! the real crun, with busybox root file systems built per test.
//!
//! This host mounts cgroup v1 with only `hugetlb` in its v2 hierarchy, and
//! crun 1.8 refuses that hybrid layout. So each vminitd runs in a private
//! mount namespace (`unshare -m`) where the unified hierarchy is mounted at
//! /sys/fs/cgroup: crun sees pure cgroup v2, as in the guest. Controllers
//! bound to v1 here (memory, pids, io, cpu) are absent from it; the freezer
//! and `cgroup.procs` are core and work.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use containerd_shim_protos::api::{CreateTaskRequest, StartRequest, WaitRequest};
use containerd_shim_protos::shim_async::TaskClient;
use protobuf::well_known_types::any::Any;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
pub const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

static SERIAL: AtomicU32 = AtomicU32::new(0);

/// Busybox applets linked into every test rootfs.
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "true", "false", "stty", "head", "dd", "kill", "ls", "tail",
    "hostname",
];

/// With this set to `1`, tests that need the cgroup v2 memory, pids and io
/// controllers fail when those are missing instead of skipping their checks
/// (`tests/lab_cgroup.rs` sets it where they must run).
pub const REQUIRE_CGROUP2_ENV: &str = "VMINITD_REQUIRE_CGROUP2";

/// Whether /sys/fs/cgroup is a pure cgroup v2 mount (not this host's hybrid
/// v1 layout with `unified` beside it).
pub fn pure_cgroup2() -> bool {
    nix::sys::statfs::statfs("/sys/fs/cgroup")
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match octal {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount point of the cgroup v2 hierarchy's root in the text of a
/// `/proc/<pid>/mountinfo`: the first `cgroup2` mount whose root is `/`.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (before, after) = l.split_once(" - ")?;
        let mut f = before.split(' ');
        let root = f.nth(3)?;
        let mount_point = f.next()?;
        (after.split(' ').next() == Some("cgroup2") && root == "/")
            .then(|| PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// The cgroup v2 hierarchy as the test process sees it, wherever it is
/// mounted (`/sys/fs/cgroup` on a pure cgroup v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one). Panics when there is none:
/// every vminitd test needs one.
pub fn cgroup_root() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("/proc/self/mountinfo");
    cgroup2_mount_in(&mountinfo)
        .unwrap_or_else(|| panic!("no cgroup2 hierarchy is mounted here:\n{mountinfo}"))
}

/// A temp dir that vminitd running as PID 1 of a new mount namespace still
/// sees: PID 1 mounts fresh file systems on `/tmp`, `/run`, `/dev`, ...
/// (`pid1::mounts::api_mount_points`), hiding whatever was there. The
/// first of `CARGO_TARGET_TMPDIR` (inside the target dir, wherever the
/// checkout is) and `/var/tmp` that lies outside all of them; panics if
/// neither does.
pub fn pid1_visible_tempdir(prefix: &str) -> tempfile::TempDir {
    let candidates = [
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        PathBuf::from("/var/tmp"),
    ];
    let base = pid1_visible_base(&candidates).unwrap_or_else(|| {
        panic!(
            "none of {candidates:?} is outside the file systems vminitd mounts as PID 1 ({:?})",
            vminitd::pid1::mounts::api_mount_points().collect::<Vec<_>>()
        )
    });
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .unwrap_or_else(|e| panic!("temp dir in {}: {e}", base.display()))
}

/// The first candidate (symlinks resolved) under none of PID 1's mounts.
pub fn pid1_visible_base(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates
        .iter()
        .filter_map(|c| {
            std::fs::create_dir_all(c).ok()?;
            c.canonicalize().ok()
        })
        .find(|c| !vminitd::pid1::mounts::api_mount_points().any(|m| c.starts_with(m)))
}

/// Whether the cgroup v2 hierarchy offers `controller`.
pub fn has_controller(controller: &str) -> bool {
    std::fs::read_to_string(cgroup_root().join("cgroup.controllers"))
        .map(|s| s.split_whitespace().any(|c| c == controller))
        .unwrap_or(false)
}

/// Whether memory, pids and io are all usable through cgroup v2. Panics
/// when they are not and [`REQUIRE_CGROUP2_ENV`] is `1`: a run that must
/// check them may not quietly skip.
pub fn cgroup2_controllers_or_required() -> bool {
    let all = ["memory", "pids", "io"].iter().all(|c| has_controller(c));
    if !all && std::env::var(REQUIRE_CGROUP2_ENV).as_deref() == Ok("1") {
        panic!(
            "{REQUIRE_CGROUP2_ENV}=1 but the cgroup v2 hierarchy {} offers only {:?}",
            cgroup_root().display(),
            std::fs::read_to_string(cgroup_root().join("cgroup.controllers")).unwrap_or_default()
        );
    }
    all
}

/// One vminitd process and its directories.
pub struct Vminitd {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub task_sock: PathBuf,
    pub stream_sock: PathBuf,
    pub shares: PathBuf,
    pub state: PathBuf,
    pub cgroup_parent: String,
}

impl Vminitd {
    /// Starts vminitd and waits for its Task socket.
    pub fn spawn() -> Vminitd {
        let dir = tempfile::Builder::new()
            .prefix("vminitd-test")
            .tempdir()
            .expect("tempdir");
        let task_sock = dir.path().join("task.sock");
        let stream_sock = dir.path().join("streams.sock");
        let shares = dir.path().join("shares");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&shares).expect("shares");
        let cgroup_parent = format!(
            "vminitd-test-{}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        );
        // Where /sys/fs/cgroup already is cgroup2 it stays as it is.
        let setup = if pure_cgroup2() {
            "exec \"$0\" \"$@\""
        } else {
            "mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$0\" \"$@\""
        };
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(setup)
            .arg(env!("CARGO_BIN_EXE_vminitd"))
            .args(["--mode", "host", "--log", "vminitd=debug"])
            .arg(format!("--task-addr=unix://{}", task_sock.display()))
            .arg(format!("--stream-addr=unix://{}", stream_sock.display()))
            .arg("--state-dir")
            .arg(&state)
            .arg("--shares-dir")
            .arg(&shares)
            .arg("--cgroup-parent")
            .arg(&cgroup_parent)
            .spawn()
            .expect("spawn vminitd");
        // Generous: under emulation (the nested lab) loading the debug
        // binary alone takes seconds.
        let deadline = Instant::now() + Duration::from_secs(60);
        // The socket files appear at bind(); serving starts at listen().
        while !(std::os::unix::net::UnixStream::connect(&task_sock).is_ok()
            && std::os::unix::net::UnixStream::connect(&stream_sock).is_ok())
        {
            assert!(Instant::now() < deadline, "vminitd did not come up");
            std::thread::sleep(Duration::from_millis(5));
        }
        Vminitd {
            dir,
            child: Some(child),
            task_sock,
            stream_sock,
            shares,
            state,
            cgroup_parent,
        }
    }

    /// A Task API client.
    pub async fn client(&self) -> TaskClient {
        let c =
            ttrpc::asynchronous::Client::connect(&format!("unix://{}", self.task_sock.display()))
                .await
                .expect("connect task socket");
        TaskClient::new(c)
    }

    /// The container's cgroup directory as the test process sees it.
    pub fn cgroup_dir(&self, id: &str) -> PathBuf {
        cgroup_root().join(&self.cgroup_parent).join(id)
    }

    /// Builds `<shares>/<id>/rootfs` with busybox and its applets.
    pub fn rootfs(&self, id: &str) -> PathBuf {
        let bin = self.shares.join(id).join("rootfs/bin");
        std::fs::create_dir_all(&bin).expect("rootfs");
        for d in ["proc", "dev", "sys", "tmp", "etc"] {
            std::fs::create_dir_all(self.shares.join(id).join("rootfs").join(d)).expect("dir");
        }
        let shared = self.shares.join(".busybox");
        if !shared.exists() {
            std::fs::copy("/bin/busybox", &shared).expect("copy busybox");
        }
        std::fs::hard_link(&shared, bin.join("busybox")).expect("link busybox");
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", bin.join(a)).expect("applet");
        }
        self.shares.join(id)
    }

    /// Stops vminitd with SIGTERM and checks it cleaned up.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("vminitd did not stop on SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Asserts vminitd has no zombie children (it reaps every orphan that
    /// lands on it), allowing a moment for in-flight reaps.
    pub fn assert_no_zombies(&self) {
        let pid = self.child.as_ref().expect("running").id();
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let zombies = zombie_children(pid);
            if zombies.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "zombie children of vminitd: {zombies:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asserts nothing of vminitd's is left: crun state, bundles, cgroups.
    pub fn assert_clean(&self) {
        let crun_root = self.state.join("crun");
        let left: Vec<_> = std::fs::read_dir(&crun_root)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "crun state left behind: {left:?}");
        let bundles: Vec<_> = std::fs::read_dir(self.state.join("bundles"))
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(bundles.is_empty(), "bundles left behind: {bundles:?}");
        let cg = cgroup_root().join(&self.cgroup_parent);
        assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    }
}

impl Drop for Vminitd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Pids of zombie children of `parent`.
pub fn zombie_children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
    {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state, ppid, ...
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let mut f = rest.split(' ');
        let (state, ppid) = (f.next(), f.next().and_then(|p| p.parse::<u32>().ok()));
        if state == Some("Z") && ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// A minimal OCI spec for busybox; `network` is included on purpose (vminitd
/// must drop it).
pub fn spec(args: &[&str], terminal: bool) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/",
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}, {"type": "network"}],
        },
    })
}

/// A Create request carrying `spec` inline.
pub fn create_req(
    id: &str,
    spec: &Value,
    stdin: bool,
    stdout: bool,
    stderr: bool,
) -> CreateTaskRequest {
    let name = |on: bool, k: &str| {
        if on {
            format!("stream:{k}")
        } else {
            String::new()
        }
    };
    CreateTaskRequest {
        id: id.into(),
        bundle: id.into(),
        terminal: spec["process"]["terminal"].as_bool().unwrap_or(false),
        stdin: name(stdin, "stdin"),
        stdout: name(stdout, "stdout"),
        stderr: name(stderr, "stderr"),
        options: Some(Any {
            type_url: SPEC_TYPE_URL.into(),
            value: serde_json::to_vec(spec).expect("spec json"),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

/// Opens one stdio stream (`exec` "" for the init), after the Create or
/// Exec that announced it.
pub async fn stream(v: &Vminitd, id: &str, exec: &str, kind: &str) -> UnixStream {
    let mut s = UnixStream::connect(&v.stream_sock)
        .await
        .expect("stream port");
    let exec = if exec.is_empty() { "-" } else { exec };
    s.write_all(format!("STDIO {id} {exec} {kind}\n").as_bytes())
        .await
        .expect("handshake");
    let mut ok = [0u8; 3];
    s.read_exact(&mut ok).await.expect("handshake reply");
    assert_eq!(&ok, b"OK\n");
    s
}

/// Reads a stream to EOF as text.
pub async fn read_all(mut s: UnixStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("output in time")
        .expect("read output");
    String::from_utf8_lossy(&out).into_owned()
}

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

/// Create (with stdout/stderr streams), Start, read both, Wait: returns
/// (stdout, stderr, exit status).
pub async fn run_to_exit(
    v: &Vminitd,
    c: &TaskClient,
    id: &str,
    args: &[&str],
) -> (String, String, u32) {
    v.rootfs(id);
    c.create(
        ctx(),
        &create_req(id, &spec(args, false), false, true, true),
    )
    .await
    .expect("create");
    // Create announced them; nothing runs before Start.
    let out = stream(v, id, "", "stdout").await;
    let err = stream(v, id, "", "stderr").await;
    c.start(
        ctx(),
        &StartRequest {
            id: id.into(),
            ..Default::default()
        },
    )
    .await
    .expect("start");
    let (o, e) = tokio::join!(read_all(out), read_all(err));
    let w = c
        .wait(
            ctx(),
            &WaitRequest {
                id: id.into(),
                ..Default::default()
            },
        )
        .await
        .expect("wait");
    (o, e, w.exit_status)
}

/// The ttrpc status code of a failed call.
pub fn code_of<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> ttrpc::Code {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => s.code(),
        other => panic!("expected an RPC status error, got {other:?}"),
    }
}
