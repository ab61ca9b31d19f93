//! The nested KVM lab: run a command inside a VM that has a real `/dev/kvm`.
//!
//! On hosts without hardware KVM (this workplace's `/dev/kvm` is a paravirtual PVM
//! that boots only PVM-patched guests), QEMU emulates an AMD CPU with SVM (`-accel
//! tcg -cpu max,-xsave -smp 1`, see [`LAB_CPU`]) and boots Debian's generic kernel with a busybox initramfs
//! (`tests/lab/prepare`, `tests/lab/init`). The host root is exported read-only over
//! 9p under an overlay with a tmpfs upper layer, so the command sees the host's
//! files at the same paths and may write anywhere without touching the host;
//! `/tmp` and `/run` are tmpfs. A private shared folder carries the command in and
//! its output and exit code out (mounted at `/lab` inside).
//!
//! This module owns the QEMU process: it is killed on timeout, on error, and when
//! this process dies (`PR_SET_PDEATHSIG`), so a lab never outlives its caller.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::assets::{folder_from_script, lab_tmp_base, repo_root};

/// A lab VM whose heartbeat is older than this has frozen.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(90);
/// A lab VM with no heartbeat this long after QEMU started has frozen while booting.
pub const FIRST_HEARTBEAT_WITHIN: Duration = Duration::from_secs(180);

/// The lab's emulated CPU. Without XSAVE: QEMU's emulated SVM lets a nested
/// guest's XSETBV through without the exit KVM relies on, so KVM never learns
/// the guest's XCR0. Every guest in the lab (under QEMU or our VMM alike) then
/// warned "XSAVE consistency problem" at boot (CPUID 0xD's size never followed
/// XCR0), and KVM saved and restored the guest's extended state for the wrong
/// XCR0, the likely cause of user programs that use AVX (glibc's string
/// functions do) crashing now and then (busybox `ping` in `make test`). With
/// FXSAVE only, the warning is gone and the guests' FPU state is plain.
pub const LAB_CPU: &str = "max,-xsave";

/// Forces [`kvm_host`]: `hardware` (use this host's /dev/kvm) or `lab`.
pub const KVM_MODE_ENV: &str = "BEACON_KVM";
/// QEMU binary to run the lab with (default `qemu-system-x86_64` from PATH).
pub const QEMU_ENV: &str = "BEACON_LAB_QEMU";
/// A file every freeze-and-retry is appended to, one line each (see
/// [`Lab::warnings_file`]). `make test` sets it and prints the file at the end.
pub const WARNINGS_FILE_ENV: &str = "BEACON_LAB_WARNINGS";

/// Where VM tests get their KVM from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmHost {
    /// Hardware KVM (`kvm_intel` or `kvm_amd` loaded): run VMs directly.
    Hardware,
    /// No usable KVM (PVM or none): run VMs inside the nested lab.
    Lab,
}

/// Decide, from `BEACON_KVM` or the loaded modules, where VMs can run.
pub fn kvm_host() -> KvmHost {
    let hardware_module = ["/sys/module/kvm_intel", "/sys/module/kvm_amd"]
        .iter()
        .any(|m| Path::new(m).exists());
    decide_kvm_host(
        std::env::var(KVM_MODE_ENV).ok().as_deref(),
        hardware_module,
        Path::new("/dev/kvm").exists(),
    )
}

/// [`kvm_host`]'s decision from what it found: a forced mode wins; otherwise only a
/// hardware KVM module with `/dev/kvm` counts (a PVM `/dev/kvm` alone does not).
fn decide_kvm_host(forced: Option<&str>, hardware_module: bool, dev_kvm: bool) -> KvmHost {
    match forced {
        Some("hardware") | Some("direct") => KvmHost::Hardware,
        Some("lab") => KvmHost::Lab,
        _ if hardware_module && dev_kvm => KvmHost::Hardware,
        _ => KvmHost::Lab,
    }
}

/// What a lab run produced.
#[derive(Debug, Clone)]
pub struct LabOutput {
    /// The command's exit code (128+N for a signal, as the shell reports it).
    pub exit_code: i32,
    /// The command's stdout and stderr, interleaved, exactly as written.
    pub output: String,
    /// The lab VM's serial console: kernel messages, lab init lines, command output.
    pub console: String,
    /// Wall time from QEMU start to QEMU exit.
    pub elapsed: Duration,
}

impl LabOutput {
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("QEMU ({0}) is not installed or not executable; run resources/install.sh (Debian package qemu-system-x86)")]
    QemuMissing(String),
    #[error("preparing the lab assets failed: {0}")]
    Prepare(String),
    #[error("the lab command timed out after {after:?}; QEMU was killed. Last console lines:\n{console_tail}")]
    Timeout {
        after: Duration,
        console_tail: String,
    },
    #[error(
        "the lab VM ended without a result (QEMU {status}). Last console lines:\n{console_tail}"
    )]
    NoResult {
        status: String,
        console_tail: String,
    },
    #[error("lab I/O ({what}): {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the lab command needs at least a program name")]
    EmptyCommand,
    #[error("the lab VM froze (no heartbeat for {stale:?}) on every try; QEMU was killed. Last console lines:\n{console_tail}")]
    Frozen {
        stale: Duration,
        console_tail: String,
    },
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |source| LabError::Io {
        what: what.to_string(),
        source,
    }
}

/// Settings of one lab run.
#[derive(Debug, Clone)]
pub struct Lab {
    pub timeout: Duration,
    pub memory_mib: u32,
    /// Working directory of the command inside the lab (default: the caller's).
    pub cwd: PathBuf,
    /// Environment for the command. By default PATH, HOME, TERM, RUST_*, CARGO_*,
    /// BEACON_* (but not BEACON_KVM, which the lab sets to `hardware`).
    pub env: Vec<(String, String)>,
    /// Echo the console to this process's stderr while the lab runs.
    pub echo_console: bool,
    /// How often to start over when the lab VM itself froze (not the command).
    pub retries_on_freeze: u32,
    /// Where each freeze-and-retry is also recorded, one line appended per retry
    /// (default: `BEACON_LAB_WARNINGS`). The warning always goes to this process's
    /// stderr too, written to the file descriptor itself so libtest's output
    /// capture cannot hide it; the file lets `make test` list retries after a run
    /// whose tests all passed.
    pub warnings_file: Option<PathBuf>,
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Lab {
    pub fn new() -> Self {
        let mut env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| {
                matches!(k.as_str(), "PATH" | "HOME" | "TERM" | "USER")
                    || k.starts_with("RUST_")
                    || k.starts_with("CARGO_")
                    || (k.starts_with("BEACON_") && k != KVM_MODE_ENV)
            })
            .collect();
        env.push((KVM_MODE_ENV.into(), "hardware".into()));
        Self {
            timeout: Duration::from_secs(600),
            memory_mib: 3072,
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            env,
            echo_console: false,
            retries_on_freeze: 1,
            warnings_file: std::env::var_os(WARNINGS_FILE_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        }
    }

    /// Run `argv` inside the lab and wait for it (or the timeout). A lab VM that
    /// freezes (its heartbeat stops) is killed and the run starts over, up to
    /// [`Lab::retries_on_freeze`] times, with a warning (see [`Lab::warnings_file`]).
    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, argv: &[S]) -> Result<LabOutput, LabError> {
        let command = argv
            .iter()
            .map(|a| a.as_ref().to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        self.retrying_on_freeze(&command, &mut std::io::stderr(), || self.run_once(argv))
    }

    /// Call `attempt` until it does not report a frozen lab VM, at most
    /// 1 + [`Lab::retries_on_freeze`] times, reporting every retry to `stderr`
    /// (this process's, written directly) and [`Lab::warnings_file`].
    fn retrying_on_freeze<T>(
        &self,
        command: &str,
        stderr: &mut dyn Write,
        mut attempt: impl FnMut() -> Result<T, LabError>,
    ) -> Result<T, LabError> {
        let mut retries = 0;
        loop {
            match attempt() {
                Err(LabError::Frozen {
                    stale,
                    console_tail,
                }) if retries < self.retries_on_freeze => {
                    retries += 1;
                    self.report_freeze(command, stale, retries, &console_tail, stderr);
                }
                other => return other,
            }
        }
    }

    /// Make a retry visible where a passing test's output is not: on the stderr
    /// file descriptor (libtest captures only `print!`/`eprint!`, not writes to
    /// `std::io::stderr()`) and as a line in [`Lab::warnings_file`].
    fn report_freeze(
        &self,
        command: &str,
        stale: Duration,
        retry: u32,
        console_tail: &str,
        stderr: &mut dyn Write,
    ) {
        let current = std::thread::current();
        let test = current.name().filter(|n| *n != "main").unwrap_or("-");
        let exe = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let command: String = command.replace('\n', "; ").chars().take(200).collect();
        let line = format!(
            "beacon-lab: WARNING: the lab VM froze (no heartbeat for {:.0} s); started over \
             ({retry} of {}); test {test} in {exe}: {command}\n",
            stale.as_secs_f64(),
            self.retries_on_freeze
        );
        let _ = stderr.write_all(
            format!("{line}beacon-lab: last console lines of the frozen VM:\n{console_tail}\n")
                .as_bytes(),
        );
        if let Some(path) = &self.warnings_file {
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = written {
                let _ = stderr.write_all(
                    format!(
                        "beacon-lab: cannot record the warning in {} ({WARNINGS_FILE_ENV}): {e}\n",
                        path.display()
                    )
                    .as_bytes(),
                );
            }
        }
    }

    fn run_once<S: AsRef<std::ffi::OsStr>>(&self, argv: &[S]) -> Result<LabOutput, LabError> {
        if argv.is_empty() {
            return Err(LabError::EmptyCommand);
        }
        let qemu = std::env::var(QEMU_ENV).unwrap_or_else(|_| "qemu-system-x86_64".into());
        if !is_executable(&qemu) {
            return Err(LabError::QemuMissing(qemu));
        }
        let assets = folder_from_script(&repo_root().join("tests/lab/prepare"))
            .map_err(LabError::Prepare)?;
        let shared = tempfile::Builder::new()
            .prefix("beacon-lab.")
            .tempdir()
            .map_err(io_err("creating the shared folder"))?;
        std::fs::write(shared.path().join("cmd.sh"), self.script(argv))
            .map_err(io_err("writing cmd.sh"))?;
        std::fs::write(shared.path().join("keep"), self.keep_list())
            .map_err(io_err("writing the keep list"))?;

        let mut cmd = Command::new(&qemu);
        cmd.args(["-accel", "tcg", "-cpu", LAB_CPU, "-smp", "1"])
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
            .args(["-nic", "none", "-no-reboot", "-nodefaults"])
            .arg("-kernel")
            .arg(assets.join("vmlinuz"))
            .arg("-initrd")
            .arg(assets.join("initrd.gz"))
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            .args([
                "-virtfs",
                "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
            ])
            .arg("-virtfs")
            .arg(shared_folder_option(shared.path()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let start = Instant::now();
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                LabError::QemuMissing(qemu.clone())
            } else {
                LabError::Io {
                    what: format!("starting {qemu}"),
                    source: e,
                }
            }
        })?;
        let console = Arc::new(Mutex::new(String::new()));
        let readers = spawn_readers(&mut child, &console, self.echo_console);
        let heartbeat = shared.path().join("heartbeat");
        let status = wait_watched(
            &mut child,
            start + self.timeout,
            Some(Heartbeat {
                path: &heartbeat,
                stale: HEARTBEAT_STALE,
                first_within: FIRST_HEARTBEAT_WITHIN,
            }),
            start,
        );
        for r in readers {
            let _ = r.join();
        }
        let elapsed = start.elapsed();
        let console = console.lock().map(|c| c.clone()).unwrap_or_default();
        let status = match status {
            Waited::Exited(s) => s.map_err(io_err("waiting for QEMU"))?,
            Waited::TimedOut => {
                return Err(LabError::Timeout {
                    after: self.timeout,
                    console_tail: tail(&console, 30),
                })
            }
            Waited::Frozen(stale) => {
                return Err(LabError::Frozen {
                    stale,
                    console_tail: tail(&console, 30),
                })
            }
        };
        let rc = std::fs::read_to_string(shared.path().join("rc")).ok();
        let Some(exit_code) = rc.and_then(|s| s.trim().parse::<i32>().ok()) else {
            return Err(LabError::NoResult {
                status: status.to_string(),
                console_tail: tail(&console, 30),
            });
        };
        let output = std::fs::read(shared.path().join("output"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(io_err("reading the command output"))?;
        Ok(LabOutput {
            exit_code,
            output,
            console,
            elapsed,
        })
    }

    /// Host folders the command needs even when they sit under /tmp or /run (which
    /// are fresh tmpfs in the lab): the working directory, the repository, the
    /// cargo target directory and the base of [`lab_visible_tempdir`]'s folders. The
    /// lab init re-exposes those under /tmp or /run.
    ///
    /// [`lab_visible_tempdir`]: crate::assets::lab_visible_tempdir
    fn keep_list(&self) -> String {
        let mut keep = vec![self.cwd.clone(), repo_root(), lab_tmp_base()];
        if let Some(t) = std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
            keep.push(PathBuf::from(t));
        }
        let mut keep: Vec<PathBuf> = keep
            .into_iter()
            .map(|p| p.canonicalize().unwrap_or(p))
            .filter(|p| p.starts_with("/tmp/") || p.starts_with("/run/"))
            .filter(|p| !p.to_string_lossy().contains('\n'))
            .collect();
        // Parents first; a folder inside one already kept comes along with it.
        keep.sort();
        let mut out = String::new();
        let mut kept: Vec<PathBuf> = Vec::new();
        for p in keep {
            if kept.iter().any(|k| p.starts_with(k)) {
                continue;
            }
            out.push_str(&p.to_string_lossy());
            out.push('\n');
            kept.push(p);
        }
        out
    }

    /// The shell script the lab init runs in its chroot.
    fn script<S: AsRef<std::ffi::OsStr>>(&self, argv: &[S]) -> Vec<u8> {
        let mut s = Vec::new();
        for (k, v) in &self.env {
            if k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                s.extend_from_slice(format!("export {k}=").as_bytes());
                s.extend_from_slice(&shell_quote(v.as_bytes()));
                s.push(b'\n');
            }
        }
        s.extend_from_slice(b"cd ");
        s.extend_from_slice(&shell_quote(self.cwd.as_os_str().as_bytes()));
        s.extend_from_slice(b" || exit 125\nexec");
        for a in argv {
            s.push(b' ');
            s.extend_from_slice(&shell_quote(a.as_ref().as_bytes()));
        }
        s.push(b'\n');
        s
    }
}

/// The `-virtfs` option exporting the shared folder as `lab`. QEMU reads `,,` in a
/// value as one comma (a `TMPDIR` with a comma in it would end the path early).
fn shared_folder_option(path: &Path) -> String {
    format!(
        "local,path={},mount_tag=lab,security_model=none,multidevs=remap",
        path.display().to_string().replace(',', ",,")
    )
}

/// Make the child get SIGKILL when this process dies, so no VM outlives its caller.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls
    // prctl(2), which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Quote for POSIX sh: everything inside single quotes, `'` as `'\''`.
fn shell_quote(raw: &[u8]) -> Vec<u8> {
    let mut out = vec![b'\''];
    for &b in raw {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

fn is_executable(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let ok = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        return ok(Path::new(program));
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| ok(&d.join(program))))
        .unwrap_or(false)
}

fn spawn_readers(
    child: &mut Child,
    console: &Arc<Mutex<String>>,
    echo: bool,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut handles = Vec::new();
    let streams: [Option<Box<dyn std::io::Read + Send>>; 2] = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ];
    for stream in streams.into_iter().flatten() {
        let console = Arc::clone(console);
        handles.push(std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            while let Ok(n) = reader.read_until(b'\n', &mut line) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&line).replace('\r', "");
                if echo {
                    let _ = std::io::stderr().write_all(text.as_bytes());
                }
                if let Ok(mut c) = console.lock() {
                    c.push_str(&text);
                }
                line.clear();
            }
        }));
    }
    handles
}

enum Waited {
    Exited(std::io::Result<std::process::ExitStatus>),
    TimedOut,
    /// The heartbeat went stale for this long.
    Frozen(Duration),
}

/// How long ago the heartbeat file was last written, if it exists.
fn heartbeat_age(path: &Path) -> Option<Duration> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
    Some(modified.elapsed().unwrap_or_default())
}

/// Wait until the child exits, the deadline passes, or (with a heartbeat file) the
/// lab VM stops beating; in the last two cases kill and reap it.
/// A heartbeat file and how stale it may get.
struct Heartbeat<'a> {
    path: &'a Path,
    stale: Duration,
    first_within: Duration,
}

fn wait_watched(
    child: &mut Child,
    deadline: Instant,
    heartbeat: Option<Heartbeat<'_>>,
    start: Instant,
) -> Waited {
    let end = |child: &mut Child, outcome: Waited| {
        let _ = child.kill();
        let _ = child.wait();
        outcome
    };
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Waited::Exited(Ok(status)),
            Ok(None) => {}
            Err(e) => return end(child, Waited::Exited(Err(e))),
        }
        if Instant::now() >= deadline {
            return end(child, Waited::TimedOut);
        }
        if let Some(hb) = &heartbeat {
            match heartbeat_age(hb.path) {
                Some(age) if age > hb.stale => return end(child, Waited::Frozen(age)),
                None if start.elapsed() > hb.first_within => {
                    return end(child, Waited::Frozen(start.elapsed()))
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Run `argv` where a real KVM is: directly on hardware-KVM hosts, else in the lab.
/// Either way the result has the same shape.
pub fn run_with_kvm<S: AsRef<std::ffi::OsStr>>(
    argv: &[S],
    timeout: Duration,
) -> Result<LabOutput, LabError> {
    match kvm_host() {
        KvmHost::Lab => Lab {
            timeout,
            ..Lab::new()
        }
        .run(argv),
        KvmHost::Hardware => run_direct(argv, timeout),
    }
}

fn run_direct<S: AsRef<std::ffi::OsStr>>(
    argv: &[S],
    timeout: Duration,
) -> Result<LabOutput, LabError> {
    let (program, rest) = argv.split_first().ok_or(LabError::EmptyCommand)?;
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(io_err("starting the command"))?;
    let output = Arc::new(Mutex::new(String::new()));
    let readers = spawn_readers(&mut child, &output, false);
    let status = wait_watched(&mut child, start + timeout, None, start);
    for r in readers {
        let _ = r.join();
    }
    let output = output.lock().map(|o| o.clone()).unwrap_or_default();
    let status = match status {
        Waited::Exited(s) => s.map_err(io_err("waiting for the command"))?,
        Waited::TimedOut | Waited::Frozen(_) => {
            return Err(LabError::Timeout {
                after: timeout,
                console_tail: tail(&output, 30),
            })
        }
    };
    use std::os::unix::process::ExitStatusExt;
    let exit_code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1);
    Ok(LabOutput {
        exit_code,
        console: output.clone(),
        output,
        elapsed: start.elapsed(),
    })
}

/// Parse `K=V` pairs for [`Lab::env`].
pub fn parse_env(pairs: &[String]) -> Result<Vec<(String, String)>, String> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("--env {p:?}: expected KEY=VALUE"))
        })
        .collect()
}

/// Convert OS strings for [`Lab::run`].
pub fn os_args(args: &[String]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Set inside the lab for a test binary that re-ran itself there: no second hop.
pub const RERUN_ENV: &str = "BEACON_TEST_IN_LAB";

/// True inside the lab for a test that [`here_or_in_lab`] re-ran there (its
/// KVM is real but emulated: one slow CPU).
pub fn rerun_in_lab() -> bool {
    std::env::var_os(RERUN_ENV).is_some()
}

/// For tests that need what this host lacks (a KVM that runs real guests,
/// capabilities the host's sandbox withholds): when `here` is true, return true
/// and let the caller run. Otherwise run `test` of the calling test binary
/// inside the nested lab with `env` added, assert it passed there, and return
/// false (the caller then returns). `why` names what is missing, for the log.
/// Inside the lab, `here` must hold: a test never passes without having run.
pub fn here_or_in_lab(here: bool, why: &str, test: &str, env: &[(&str, String)]) -> bool {
    if here {
        return true;
    }
    assert!(
        std::env::var_os(RERUN_ENV).is_none(),
        "{test}: inside the nested lab and still {why}"
    );
    let exe = std::env::current_exe()
        .expect("test binary path")
        .display()
        .to_string();
    let mut lab = Lab::new();
    // The longest suite (vm_containerd) takes 750-1050 s of a loaded lab and
    // once hit 1200 s while still progressing. A frozen lab VM is caught
    // sooner by the heartbeat (HEARTBEAT_STALE); a test that hangs inside a
    // live one costs up to this cap.
    lab.timeout = Duration::from_secs(2400);
    lab.env.push((RERUN_ENV.into(), "1".into()));
    lab.env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let out = lab
        .run(&[
            exe.as_str(),
            "--exact",
            test,
            "--test-threads=1",
            "--nocapture",
        ])
        .expect("running the test in the nested lab");
    assert!(
        out.success() && out.output.contains("test result: ok. 1 passed"),
        "{test} failed in the nested lab (exit {}):\n{}",
        out.exit_code,
        out.output
    );
    // What it printed there (timings, scenario lines): shown with --nocapture.
    eprintln!(
        "{test}: {why} here; ran and passed in the nested lab:\n{}",
        out.output.trim_end()
    );
    false
}

/// Like [`here_or_in_lab`], but all tests of this binary that pass the same
/// `group` share ONE lab run, so the lab VM starts once for them instead of
/// once per test: the first caller runs `group` (a libtest name filter that
/// must select every test of the group, `test` included) there, one test at a
/// time, and every caller then asserts that its own test ran and passed in that
/// run. Tests the filter selects that need no lab simply run there once more.
pub fn here_or_in_lab_shared(
    here: bool,
    why: &str,
    test: &str,
    group: &str,
    env: &[(&str, String)],
) -> bool {
    type Run = Arc<std::sync::OnceLock<Result<LabOutput, String>>>;
    static RUNS: Mutex<Vec<(String, Run)>> = Mutex::new(Vec::new());
    if here {
        return true;
    }
    assert!(
        std::env::var_os(RERUN_ENV).is_none(),
        "{test}: inside the nested lab and still {why}"
    );
    assert!(
        test.contains(group),
        "{test} is not in its lab group {group:?}"
    );
    let run: Run = {
        let mut runs = RUNS.lock().unwrap_or_else(|e| e.into_inner());
        match runs.iter().find(|(g, _)| g == group) {
            Some((_, r)) => r.clone(),
            None => {
                let r = Run::default();
                runs.push((group.to_string(), r.clone()));
                r
            }
        }
    };
    let out = run.get_or_init(|| {
        let exe = std::env::current_exe()
            .map_err(|e| format!("test binary path: {e}"))?
            .display()
            .to_string();
        let mut lab = Lab::new();
        lab.timeout = Duration::from_secs(1200);
        lab.env.push((RERUN_ENV.into(), "1".into()));
        lab.env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
        eprintln!("lab group {group:?}: {why} here; running the group in the nested lab");
        lab.run(&[exe.as_str(), group, "--test-threads=1"])
            .map_err(|e| e.to_string())
    });
    let out = match out {
        Ok(out) => out,
        Err(e) => panic!("{test}: running lab group {group:?} in the nested lab failed: {e}"),
    };
    let passed = out
        .output
        .lines()
        .any(|l| l == format!("test {test} ... ok"));
    let failure = format!("---- {test} stdout ----");
    assert!(
        passed,
        "{test} {} in the nested lab (group {group:?}, exit {}):\n{}",
        if out.output.contains(&format!("test {test} ")) {
            "failed"
        } else {
            "did not run"
        },
        out.exit_code,
        out.output
            .find(&failure)
            .map(|i| &out.output[i..])
            .unwrap_or(&out.output)
    );
    eprintln!("{test}: {why} here; ran and passed in the nested lab (group {group:?})");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_hostile_strings() {
        assert_eq!(shell_quote(b"a b"), b"'a b'".to_vec());
        assert_eq!(shell_quote(b"it's"), b"'it'\\''s'".to_vec());
        assert_eq!(shell_quote(b"$(x)`y`"), b"'$(x)`y`'".to_vec());
    }

    #[test]
    fn script_sets_env_cwd_and_execs() {
        let lab = Lab {
            cwd: PathBuf::from("/work dir"),
            env: vec![("A".into(), "1".into()), ("BAD KEY".into(), "x".into())],
            ..Lab::new()
        };
        let s = String::from_utf8(lab.script(&["echo", "hi there"])).expect("utf8");
        assert!(s.contains("export A='1'\n"));
        assert!(!s.contains("BAD KEY"));
        assert!(s.contains("cd '/work dir' || exit 125\n"));
        assert!(s.ends_with("exec 'echo' 'hi there'\n"));
    }

    #[test]
    fn shared_folder_path_commas_are_escaped() {
        assert_eq!(
            shared_folder_option(Path::new("/tmp/x,y/beacon-lab.1")),
            "local,path=/tmp/x,,y/beacon-lab.1,mount_tag=lab,security_model=none,multidevs=remap"
        );
    }

    #[test]
    fn keep_list_only_names_hidden_folders_once() {
        let lab = Lab {
            cwd: PathBuf::from("/tmp/nonexistent-clone/tests"),
            ..Lab::new()
        };
        let keep = lab.keep_list();
        assert!(keep
            .lines()
            .all(|l| l.starts_with("/tmp/") || l.starts_with("/run/")));
        assert_eq!(
            keep.lines()
                .filter(|l| l.starts_with("/tmp/nonexistent-clone"))
                .count(),
            1
        );
    }

    fn sleeper() -> Child {
        Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep")
    }

    #[test]
    fn stale_or_missing_heartbeat_means_frozen_and_kills() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hb = dir.path().join("heartbeat");
        let file = std::fs::File::create(&hb).expect("create");
        file.set_modified(std::time::SystemTime::now() - Duration::from_secs(10))
            .expect("age the heartbeat");
        let start = Instant::now();
        let mut child = sleeper();
        let watch = Heartbeat {
            path: &hb,
            stale: Duration::from_secs(1),
            first_within: Duration::from_secs(60),
        };
        let outcome = wait_watched(
            &mut child,
            start + Duration::from_secs(20),
            Some(watch),
            start,
        );
        assert!(matches!(outcome, Waited::Frozen(_)));
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(child.try_wait().expect("reaped").is_some(), "child killed");

        let start = Instant::now();
        let mut child = sleeper();
        let watch = Heartbeat {
            path: &dir.path().join("never-written"),
            stale: Duration::from_secs(60),
            first_within: Duration::from_millis(200),
        };
        let outcome = wait_watched(
            &mut child,
            start + Duration::from_secs(20),
            Some(watch),
            start,
        );
        assert!(matches!(outcome, Waited::Frozen(_)));
        assert!(child.try_wait().expect("reaped").is_some(), "child killed");
    }

    #[test]
    fn a_fresh_heartbeat_lets_the_command_finish() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hb = dir.path().join("heartbeat");
        std::fs::write(&hb, "1").expect("write");
        let start = Instant::now();
        let mut child = Command::new("true").spawn().expect("spawn");
        let watch = Heartbeat {
            path: &hb,
            stale: Duration::from_secs(60),
            first_within: Duration::from_secs(60),
        };
        let outcome = wait_watched(
            &mut child,
            start + Duration::from_secs(20),
            Some(watch),
            start,
        );
        assert!(matches!(outcome, Waited::Exited(Ok(s)) if s.success()));
    }

    #[test]
    fn forced_mode_wins_and_only_hardware_kvm_counts() {
        use KvmHost::{Hardware, Lab};
        for (forced, module, dev_kvm, want) in [
            (Some("hardware"), false, false, Hardware),
            (Some("direct"), false, true, Hardware),
            (Some("lab"), true, true, Lab),
            (None, true, true, Hardware),
            // PVM: /dev/kvm without kvm_intel/kvm_amd boots only PVM guests.
            (None, false, true, Lab),
            (None, true, false, Lab),
            (None, false, false, Lab),
            (Some("something-else"), true, true, Hardware),
            (Some("something-else"), false, true, Lab),
        ] {
            assert_eq!(
                decide_kvm_host(forced, module, dev_kvm),
                want,
                "BEACON_KVM={forced:?}, hardware module {module}, /dev/kvm {dev_kvm}"
            );
        }
    }

    fn frozen() -> LabError {
        LabError::Frozen {
            stale: Duration::from_secs(93),
            console_tail: "last words".into(),
        }
    }

    #[test]
    fn a_frozen_lab_is_retried_and_every_retry_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("lab-warnings.log");
        let lab = Lab {
            retries_on_freeze: 1,
            warnings_file: Some(log.clone()),
            ..Lab::new()
        };
        let mut stderr = Vec::new();
        let mut calls = 0;
        let out = lab.retrying_on_freeze("sh -c 'x\ny'", &mut stderr, || {
            calls += 1;
            if calls == 1 {
                Err(frozen())
            } else {
                Ok(7)
            }
        });
        assert_eq!(out.expect("second try"), 7);
        assert_eq!(calls, 2);
        let text = std::fs::read_to_string(&log).expect("warnings file");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("froze (no heartbeat for 93 s)"), "{text}");
        assert!(text.contains("(1 of 1)"), "{text}");
        assert!(
            text.contains("test lab::tests::a_frozen_lab_is_retried_and_every_retry_recorded"),
            "{text}"
        );
        assert!(text.contains("sh -c 'x; y'"), "one line per retry: {text}");
        let stderr = String::from_utf8(stderr).expect("utf8");
        assert!(stderr.starts_with(text.as_str()), "{stderr}");
        assert!(stderr.contains("last words"), "{stderr}");

        // Frozen every time: one retry, then the error; one more line.
        let mut calls = 0;
        let err = lab
            .retrying_on_freeze("true", &mut Vec::new(), || -> Result<(), LabError> {
                calls += 1;
                Err(frozen())
            })
            .expect_err("frozen twice");
        assert!(matches!(err, LabError::Frozen { .. }));
        assert_eq!(calls, 2);
        let text = std::fs::read_to_string(&log).expect("warnings file");
        assert_eq!(text.lines().count(), 2, "{text}");

        // Other errors and successes are never retried.
        let mut calls = 0;
        let err = lab
            .retrying_on_freeze("true", &mut Vec::new(), || -> Result<(), LabError> {
                calls += 1;
                Err(LabError::EmptyCommand)
            })
            .expect_err("not retried");
        assert!(matches!(err, LabError::EmptyCommand));
        assert_eq!(calls, 1);
        let text = std::fs::read_to_string(&log).expect("warnings file");
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    /// A retry inside a test that passes, run the way `cargo test` runs it (output
    /// captured), still reaches the run's output. Runs itself as a child test.
    #[test]
    fn a_retry_shows_in_the_output_of_a_passing_captured_test() {
        const CHILD: &str = "BEACON_LAB_RETRY_CHILD";
        let name = "lab::tests::a_retry_shows_in_the_output_of_a_passing_captured_test";
        if std::env::var_os(CHILD).is_some() {
            eprintln!("captured-by-libtest");
            let lab = Lab {
                warnings_file: None,
                ..Lab::new()
            };
            let mut calls = 0;
            let out = lab.retrying_on_freeze("child", &mut std::io::stderr(), || {
                calls += 1;
                if calls == 1 {
                    Err(frozen())
                } else {
                    Ok(())
                }
            });
            assert!(out.is_ok());
            return;
        }
        let out = Command::new(std::env::current_exe().expect("current exe"))
            .args(["--exact", name, "--test-threads=1"])
            .env(CHILD, "1")
            .env_remove("RUST_TEST_NOCAPTURE")
            .output()
            .expect("run the child test");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "child test failed:\n{text}");
        assert!(text.contains("1 passed"), "child ran no test:\n{text}");
        // The harness did capture this test's eprintln!, so the check below means
        // something: the warning got past the capture.
        assert!(!text.contains("captured-by-libtest"), "{text}");
        assert!(
            text.contains("beacon-lab: WARNING: the lab VM froze"),
            "retry hidden by the capture:\n{text}"
        );
        assert!(text.contains("last words"), "{text}");
    }

    #[test]
    fn missing_qemu_is_a_clear_error() {
        // Only this test's own Lab value: no process-wide env mutation.
        assert!(!is_executable("/nonexistent/qemu-system-x86_64"));
        assert!(is_executable("sh"));
    }

    #[test]
    fn env_pairs_parse() {
        assert_eq!(
            parse_env(&["A=b=c".into()]).expect("parse"),
            vec![("A".to_string(), "b=c".to_string())]
        );
        assert!(parse_env(&["nope".into()]).is_err());
    }
}
