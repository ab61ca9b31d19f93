//! The QEMU backend: `qemu-system-x86_64` as a child process (`-M microvm`,
//! or the hotplug machine for a VM that can grow: see [`args`] and [`hotplug`]).
//!
//! Kept for parity and performance comparison with the in-process KVM backend. This
//! module owns the child process, its private sockets (QMP, boot timer) in a
//! temporary folder, and copies of caller-owned TAPs (`tap_fd`, for a TAP in
//! another network namespace), which QEMU inherits at [`tap_fd_in_child`]; QEMU is killed when this process dies (`PR_SET_PDEATHSIG`,
//! which is why the process's one long-lived launcher thread forks it),
//! when the backend is dropped, and on [`VmBackend::kill`], and it is always reaped.

mod args;
mod hotplug;
mod qmp;

pub use args::{
    build_args, needs_hotplug_machine, tap_fd_in_child, QemuSockets, BOOT_TIMER_PORT,
    HOTPLUG_MACHINE,
};

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::{BackendKind, BootTimes, VmBackend, VmError, VmExit};
use crate::config::{ConsoleConfig, VmConfig};
use qmp::Qmp;

/// Environment variable naming the QEMU binary (default `qemu-system-x86_64`).
pub const QEMU_BINARY_ENV: &str = "BEACON_QEMU";
/// How long QEMU may take to create its sockets (QMP, boot timer). Generous:
/// in the nested lab QEMU with a `vhost=on` netdev takes about 25 s to get there.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest gets to power off after `shutdown()` before QEMU is killed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub struct QemuVm {
    config: VmConfig,
    program: OsString,
    created: Instant,
    sockets: tempfile::TempDir,
    started: AtomicBool,
    host_stop: Arc<AtomicBool>,
    child: Arc<Mutex<Option<Child>>>,
    pid: Mutex<Option<i32>>,
    qmp: Mutex<Option<Arc<Qmp>>>,
    init_reached: Arc<Mutex<Option<Duration>>>,
    stderr: Arc<Mutex<String>>,
    exit: Mutex<Option<VmExit>>,
    /// Copies of the caller-owned TAPs (`tap_fd`), each with the descriptor
    /// number QEMU finds it at.
    tap_fds: Vec<(std::os::fd::OwnedFd, i32)>,
    hotplug: hotplug::Hotplug,
}

/// Lowest descriptor number the copies of caller-owned TAPs take, above every
/// number [`tap_fd_in_child`] hands out, so moving one into place in the
/// child never overwrites another.
const TAP_FD_COPY_MIN: i32 = 1000;

impl QemuVm {
    /// Validate the config and locate QEMU; nothing runs until [`VmBackend::start`].
    pub fn create(config: VmConfig) -> Result<Self, VmError> {
        let created = Instant::now();
        config.validate()?;
        if config.require_confinement {
            return Err(VmError::Unsupported(
                "require_confinement confines the VMM's own threads (the kvm backend); QEMU is a process of its own that beaconbox does not confine: use the kvm backend, or drop require_confinement".into(),
            ));
        }
        let program: OsString = std::env::var_os(QEMU_BINARY_ENV)
            .unwrap_or_else(|| OsString::from("qemu-system-x86_64"));
        if !on_path(&program) {
            return Err(VmError::Qemu(format!(
                "{} not found; install Debian's qemu-system-x86 (resources/install.sh) or set {QEMU_BINARY_ENV}",
                program.to_string_lossy()
            )));
        }
        let sockets = tempfile::Builder::new()
            .prefix("beacon-qemu.")
            .tempdir()
            .map_err(VmError::io("creating the QEMU socket folder"))?;
        // Check the mapping now so bad settings fail before start().
        build_args(
            &config,
            &QemuSockets {
                qmp: &sockets.path().join("qmp.sock"),
                boot_timer: &sockets.path().join("boot-timer.sock"),
            },
        )?;
        let mut tap_fds = Vec::new();
        for (i, device) in config.devices.iter().enumerate() {
            if let crate::config::DeviceConfig::Net {
                tap_fd: Some(fd), ..
            } = device
            {
                use std::os::fd::FromRawFd;
                // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor table
                // (validate() checked `fd` is open); a bad fd fails with EBADF.
                let copy = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, TAP_FD_COPY_MIN) };
                if copy < 0 {
                    return Err(VmError::io(format!("copying the TAP descriptor {fd}"))(
                        std::io::Error::last_os_error(),
                    ));
                }
                // SAFETY: `copy` was just created by fcntl and nothing else owns it.
                tap_fds.push((
                    unsafe { std::os::fd::OwnedFd::from_raw_fd(copy) },
                    tap_fd_in_child(i),
                ));
            }
        }
        Ok(Self {
            tap_fds,
            hotplug: hotplug::Hotplug::new(config.vcpus, config.memory),
            config,
            program,
            created,
            sockets,
            started: AtomicBool::new(false),
            host_stop: Arc::new(AtomicBool::new(false)),
            child: Arc::new(Mutex::new(None)),
            pid: Mutex::new(None),
            qmp: Mutex::new(None),
            init_reached: Arc::new(Mutex::new(None)),
            stderr: Arc::new(Mutex::new(String::new())),
            exit: Mutex::new(None),
        })
    }

    /// The QEMU process id once started (for benchmarks reading /proc).
    pub fn pid(&self) -> Option<i32> {
        self.pid.lock().ok().and_then(|p| *p)
    }

    fn qmp(&self) -> Result<Arc<Qmp>, VmError> {
        self.qmp
            .lock()
            .ok()
            .and_then(|q| q.clone())
            .ok_or(VmError::WrongState {
                operation: "this",
                expected: "running",
                actual: "not started",
            })
    }

    /// QMP, if the guest is running now (not paused, stopping or gone).
    fn running_qmp(&self, operation: &'static str) -> Result<Arc<Qmp>, VmError> {
        let state = |actual| VmError::WrongState {
            operation,
            expected: "running",
            actual,
        };
        if self.host_stop.load(Ordering::SeqCst) {
            return Err(state("stopping"));
        }
        let qmp = self.qmp().map_err(|_| state("not started"))?;
        let status = qmp.execute("query-status")?;
        match status.get("status").and_then(serde_json::Value::as_str) {
            Some("running") => Ok(qmp),
            Some("paused") => Err(state("paused")),
            Some("shutdown") => Err(state("stopping")),
            _ => Err(state("not running")),
        }
    }

    fn stderr_tail(&self) -> String {
        let s = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    fn spawn(&self) -> Result<Child, VmError> {
        let qmp_path = self.sockets.path().join("qmp.sock");
        let bt_path = self.sockets.path().join("boot-timer.sock");
        let args = build_args(
            &self.config,
            &QemuSockets {
                qmp: &qmp_path,
                boot_timer: &bt_path,
            },
        )?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&args).stdin(Stdio::null()).stderr(Stdio::piped());
        cmd.stdout(match self.config.console {
            ConsoleConfig::Stdout => Stdio::inherit(),
            _ => Stdio::null(),
        });
        tracing::debug!(program = ?self.program, ?args, "starting QEMU");
        if !self.tap_fds.is_empty() {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let moves: Vec<(i32, i32)> = self
                .tap_fds
                .iter()
                .map(|(fd, target)| (fd.as_raw_fd(), *target))
                .collect();
            // SAFETY: runs in the forked child before exec; dup2(2) is
            // async-signal-safe, the closure only reads its own Vec of plain
            // integers, and the descriptors stay open in this process (owned
            // by `self`) until the spawn below has returned. dup2 leaves the
            // target without FD_CLOEXEC, so QEMU inherits it.
            unsafe {
                cmd.pre_exec(move || {
                    for (from, to) in &moves {
                        if libc::dup2(*from, *to) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        // Forked by the process's one long-lived launcher thread, with
        // PR_SET_PDEATHSIG: that signal fires when the *forking thread* ends,
        // and the caller's thread may be short-lived (in the shim, a tokio
        // thread that retires when idle, which killed QEMU under a running
        // container).
        beacon_virtiofsd_launch::launcher::spawn(cmd).map_err(VmError::io(format!(
            "starting {}",
            self.program.to_string_lossy()
        )))
    }

    /// QEMU was started and has not exited yet.
    fn child_running(&self) -> bool {
        self.child
            .lock()
            .ok()
            .and_then(|mut guard| guard.as_mut().map(|c| matches!(c.try_wait(), Ok(None))))
            .unwrap_or(false)
    }

    fn kill_child(&self) {
        if let Ok(mut guard) = self.child.lock() {
            if let Some(child) = guard.as_mut() {
                let _ = child.kill();
            }
        }
    }

    fn exit_from_status(&self, status: std::process::ExitStatus) -> VmExit {
        let host_stop = self.host_stop.load(Ordering::SeqCst);
        let (reason, panicked) = self
            .qmp
            .lock()
            .ok()
            .and_then(|q| q.clone())
            .and_then(|q| {
                q.events
                    .lock()
                    .ok()
                    .map(|e| (e.shutdown_reason.clone(), e.panicked))
            })
            .unwrap_or((None, false));
        if panicked {
            return VmExit::Crashed(format!("the guest kernel panicked\n{}", self.stderr_tail()));
        }
        if host_stop {
            return VmExit::PowerOff;
        }
        if let Some(sig) = status.signal() {
            return VmExit::Crashed(format!(
                "QEMU was killed by signal {sig}\n{}",
                self.stderr_tail()
            ));
        }
        if !status.success() {
            return VmExit::Crashed(format!("QEMU failed ({status}):\n{}", self.stderr_tail()));
        }
        match reason.as_deref() {
            Some("guest-reset") => VmExit::Reboot,
            Some("guest-panic") => VmExit::Crashed("the guest kernel panicked".into()),
            _ => VmExit::PowerOff,
        }
    }
}

fn on_path(program: &OsString) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let ok = |p: &std::path::Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    let p = std::path::Path::new(program);
    if p.components().count() > 1 {
        return ok(p);
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| ok(&d.join(p))))
        .unwrap_or(false)
}

/// Read the boot-timer chardev; record the first magic byte's time.
fn watch_boot_timer(
    path: std::path::PathBuf,
    created: Instant,
    slot: Arc<Mutex<Option<Duration>>>,
) {
    let spawned = std::thread::Builder::new()
        .name("qemu-boot-timer".into())
        .spawn(move || {
            let deadline = Instant::now() + STARTUP_TIMEOUT;
            let mut stream = loop {
                match UnixStream::connect(&path) {
                    Ok(s) => break s,
                    // Until QEMU opens it, or the VM (and its socket folder) is gone.
                    Err(_)
                        if Instant::now() < deadline && path.parent().is_some_and(Path::exists) =>
                    {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => {
                        tracing::warn!("boot-timer socket unavailable: {e}");
                        return;
                    }
                }
            };
            let mut byte = [0u8; 1];
            while let Ok(1) = stream.read(&mut byte) {
                if byte[0] == beacon_devices::legacy::BOOT_TIMER_MAGIC {
                    let t = created.elapsed();
                    if let Ok(mut s) = slot.lock() {
                        if s.is_none() {
                            *s = Some(t);
                            tracing::info!(
                                "guest init reached after {} µs since VMM start",
                                t.as_micros()
                            );
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the boot-timer thread: {e}");
    }
}

impl VmBackend for QemuVm {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn start(&self) -> Result<(), VmError> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Err(VmError::WrongState {
                operation: "start",
                expected: "created",
                actual: "already started",
            });
        }
        let mut child = self.spawn()?;
        if let Ok(mut pid) = self.pid.lock() {
            *pid = i32::try_from(child.id()).ok();
        }
        if let Some(err) = child.stderr.take() {
            let sink = Arc::clone(&self.stderr);
            let _ = std::thread::Builder::new()
                .name("qemu-stderr".into())
                .spawn(move || {
                    for line in BufReader::new(err).lines().map_while(Result::ok) {
                        tracing::warn!(target: "qemu", "{line}");
                        if let Ok(mut s) = sink.lock() {
                            s.push_str(&line);
                            s.push('\n');
                        }
                    }
                });
        }
        if let Ok(mut guard) = self.child.lock() {
            *guard = Some(child);
        }
        watch_boot_timer(
            self.sockets.path().join("boot-timer.sock"),
            self.created,
            Arc::clone(&self.init_reached),
        );
        // Wait for the socket, but not for a QEMU that already gave up (bad
        // options, a vhost-user socket nobody listens on): its stderr says why.
        let qmp = match Qmp::connect_while(
            &self.sockets.path().join("qmp.sock"),
            STARTUP_TIMEOUT,
            || self.child_running(),
        ) {
            Ok(q) => Arc::new(q),
            Err(e) => {
                let e = if self.child_running() {
                    e.to_string()
                } else {
                    "QEMU exited during start-up".to_string()
                };
                self.kill_child();
                let _ = self.wait();
                return Err(VmError::Qemu(format!("{e}\n{}", self.stderr_tail())));
            }
        };
        if let Ok(mut slot) = self.qmp.lock() {
            *slot = Some(Arc::clone(&qmp));
        }
        if let Err(e) = qmp.execute("cont") {
            self.kill_child();
            let _ = self.wait();
            return Err(e);
        }
        Ok(())
    }

    fn wait(&self) -> Result<VmExit, VmError> {
        // One waiter at a time; later callers get the recorded result.
        let mut exit = self
            .exit
            .lock()
            .map_err(|_| VmError::Qemu("exit lock poisoned".into()))?;
        if let Some(e) = exit.as_ref() {
            return Ok(e.clone());
        }
        let Some(pid) = self.pid() else {
            return Err(VmError::WrongState {
                operation: "wait",
                expected: "started",
                actual: "not started",
            });
        };
        // Wait without reaping, so kill() can still signal the (zombie) pid safely.
        loop {
            // SAFETY: siginfo_t is plain data; waitid writes into it and we only read
            // it after a successful return.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: valid pid and out-pointer; WNOWAIT leaves the child reapable.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(VmError::io("waiting for QEMU")(err));
            }
        }
        let status = {
            let mut guard = self
                .child
                .lock()
                .map_err(|_| VmError::Qemu("child lock poisoned".into()))?;
            let child = guard.as_mut().ok_or(VmError::WrongState {
                operation: "wait",
                expected: "started",
                actual: "already reaped",
            })?;
            let status = child.wait().map_err(VmError::io("reaping QEMU"))?;
            *guard = None;
            status
        };
        let result = self.exit_from_status(status);
        *exit = Some(result.clone());
        Ok(result)
    }

    fn shutdown(&self) -> Result<(), VmError> {
        self.host_stop.store(true, Ordering::SeqCst);
        let asked = self.qmp().and_then(|q| q.execute("system_powerdown"));
        if let Err(e) = &asked {
            tracing::warn!("system_powerdown failed ({e}); killing QEMU");
            self.kill_child();
            return Ok(());
        }
        // Guests without an ACPI power-button handler ignore the request: end hard
        // after a grace period.
        let child = Arc::clone(&self.child);
        let _ = std::thread::Builder::new()
            .name("qemu-shutdown-grace".into())
            .spawn(move || {
                std::thread::sleep(SHUTDOWN_GRACE);
                if let Ok(mut guard) = child.lock() {
                    if let Some(c) = guard.as_mut() {
                        tracing::warn!(
                            "guest ignored the power button for {SHUTDOWN_GRACE:?}; killing QEMU"
                        );
                        let _ = c.kill();
                    }
                }
            });
        Ok(())
    }

    fn kill(&self) -> Result<(), VmError> {
        self.host_stop.store(true, Ordering::SeqCst);
        self.kill_child();
        Ok(())
    }

    fn pause(&self) -> Result<(), VmError> {
        self.qmp()?.execute("stop").map(|_| ())
    }

    fn resume(&self) -> Result<(), VmError> {
        self.qmp()?.execute("cont").map(|_| ())
    }

    fn vcpu_count(&self) -> u8 {
        self.hotplug.vcpus()
    }

    fn max_vcpus(&self) -> u8 {
        self.config.vcpus.max
    }

    fn resize_vcpus(&self, target: u8) -> Result<u8, VmError> {
        let qmp = self.running_qmp("resize")?;
        self.hotplug.resize_vcpus(&qmp, target)
    }

    fn memory_mib(&self) -> u64 {
        self.hotplug.memory_mib()
    }

    fn max_memory_mib(&self) -> u64 {
        self.config.memory.size_mib + self.config.memory.hotplug_mib
    }

    fn resize_memory(&self, total_mib: u64) -> Result<u64, VmError> {
        let qmp = self.running_qmp("resize")?;
        self.hotplug.resize_memory(&qmp, total_mib)
    }

    fn boot_times(&self) -> BootTimes {
        let first_run = self
            .qmp
            .lock()
            .ok()
            .and_then(|q| q.clone())
            .and_then(|q| q.events.lock().ok().and_then(|e| e.resumed_at))
            .map(|t| t.saturating_duration_since(self.created));
        BootTimes {
            first_run,
            init_reached: self.init_reached.lock().ok().and_then(|t| *t),
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.child.lock() {
            if let Some(mut c) = guard.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
