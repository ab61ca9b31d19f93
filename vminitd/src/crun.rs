//! The crun driver: builds crun command lines with vminitd's own state root,
//! runs them through the reaper, and turns crun's JSON error log into typed
//! Task API errors. Owns nothing about containers beyond one invocation.
//!
//! Every command line ends its options with `--` before the container id
//! (crun 1.8 parses with argp, which honours it for every subcommand), so an
//! id can never be read as an option even if one slipped past `ids`.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::AsyncReadExt;

use crate::error::{TaskError, TaskResult};
use crate::fdio::{pipe, FdStream};
use crate::reaper::{boot_ticks_now, BirthWindow, Reaper};

/// The three descriptors a container process inherits from `crun create`
/// or `crun exec` (when it has no terminal).
pub struct ProcessStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

fn to_stdio(fd: Option<OwnedFd>) -> Stdio {
    fd.map(Stdio::from).unwrap_or_else(Stdio::null)
}

/// Runs crun with a private `--root`.
pub struct Crun {
    binary: PathBuf,
    root: PathBuf,
    log_dir: PathBuf,
    reaper: Reaper,
    serial: AtomicU64,
    /// `crun create --no-pivot`: our root is the initramfs, where
    /// pivot_root(2) fails with EINVAL (the rootfs mount has no parent).
    no_pivot: bool,
}

/// Whether `/` is the kernel's initial `rootfs` (an initramfs never
/// switched away from), judged from the text of `/proc/self/mountinfo`:
/// the last mount on `/` is the visible one.
pub fn root_is_initramfs(mountinfo: &str) -> bool {
    mountinfo
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let mount_point = f.nth(4)?;
            let (_, after) = l.split_once(" - ")?;
            let fstype = after.split(' ').next()?;
            Some((mount_point, fstype))
        })
        .rfind(|(mp, _)| *mp == "/")
        .is_some_and(|(_, fstype)| fstype == "rootfs")
}

impl Crun {
    /// `root` holds crun's state; `log_dir` its per-call error logs.
    pub fn new(binary: PathBuf, root: PathBuf, log_dir: PathBuf, reaper: Reaper) -> Crun {
        Crun {
            binary,
            root,
            log_dir,
            reaper,
            serial: AtomicU64::new(0),
            no_pivot: std::fs::read_to_string("/proc/self/mountinfo")
                .map(|m| root_is_initramfs(&m))
                .unwrap_or(false),
        }
    }

    async fn run(
        &self,
        op: &'static str,
        args: Vec<OsString>,
        stdio: Option<ProcessStdio>,
        capture: bool,
    ) -> TaskResult<Vec<u8>> {
        let n = self.serial.fetch_add(1, Ordering::Relaxed);
        let log = self.log_dir.join(format!("crun-{n}.log"));
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(&self.root)
            .arg(format!("--log={}", log.display()))
            .arg("--log-format=json")
            .args(&args);
        let mut out_reader = None;
        match stdio {
            Some(s) => {
                cmd.stdin(to_stdio(s.stdin))
                    .stdout(to_stdio(s.stdout))
                    .stderr(to_stdio(s.stderr));
            }
            None if capture => {
                let (r, w) = pipe().map_err(|e| TaskError::io("pipe for crun output", e))?;
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::from(w))
                    .stderr(Stdio::null());
                out_reader =
                    Some(FdStream::new(r, false).map_err(|e| TaskError::io("crun output", e))?);
            }
            None => {
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
            }
        }
        let born = boot_ticks_now();
        let child = cmd
            .spawn()
            .map_err(|e| TaskError::io(format!("spawn {}", self.binary.display()), e))?;
        // Closes our copies of the descriptors handed to crun.
        drop(cmd);
        let pid = i32::try_from(child.id())
            .map_err(|_| TaskError::FailedPrecondition("pid out of range".into()))?;
        let exited = self
            .reaper
            .subscribe(pid, BirthWindow::since(born))
            .map_err(|e| TaskError::Crun {
                op,
                msg: format!("lost track of crun itself: {e}"),
            })?;
        let mut output = Vec::new();
        if let Some(mut r) = out_reader {
            r.read_to_end(&mut output)
                .await
                .map_err(|e| TaskError::io("read crun output", e))?;
        }
        let info = exited
            .await
            .map_err(|_| TaskError::FailedPrecondition("reaper stopped".into()))?;
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        if info.status != 0 {
            return Err(map_error(op, info.status, &log_text));
        }
        Ok(output)
    }

    /// `crun create`; the container init inherits `stdio`.
    pub async fn create(
        &self,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        console_socket: Option<&Path>,
        stdio: ProcessStdio,
    ) -> TaskResult<()> {
        let mut args: Vec<OsString> = vec!["create".into(), "--bundle".into(), bundle.into()];
        if self.no_pivot {
            args.push("--no-pivot".into());
        }
        args.push("--pid-file".into());
        args.push(pid_file.into());
        if let Some(sock) = console_socket {
            args.push("--console-socket".into());
            args.push(sock.into());
        }
        args.extend(["--".into(), id.into()]);
        self.run("create", args, Some(stdio), false).await.map(drop)
    }

    /// `crun start`: runs the user process of a created container.
    pub async fn start(&self, id: &str) -> TaskResult<()> {
        self.run(
            "start",
            vec!["start".into(), "--".into(), id.into()],
            None,
            false,
        )
        .await
        .map(drop)
    }

    /// `crun exec --detach` with a process JSON file.
    pub async fn exec(
        &self,
        id: &str,
        process_file: &Path,
        pid_file: &Path,
        console_socket: Option<&Path>,
        stdio: ProcessStdio,
    ) -> TaskResult<()> {
        let mut args: Vec<OsString> = vec![
            "exec".into(),
            "--detach".into(),
            "--process".into(),
            process_file.into(),
            "--pid-file".into(),
            pid_file.into(),
        ];
        if let Some(sock) = console_socket {
            args.push("--console-socket".into());
            args.push(sock.into());
        }
        args.extend(["--".into(), id.into()]);
        self.run("exec", args, Some(stdio), false).await.map(drop)
    }

    /// `crun kill [--all] -- <id> <signal>`.
    pub async fn kill(&self, id: &str, signal: u32, all: bool) -> TaskResult<()> {
        let mut args: Vec<OsString> = vec!["kill".into()];
        if all {
            args.push("--all".into());
        }
        args.extend(["--".into(), id.into(), signal.to_string().into()]);
        self.run("kill", args, None, false).await.map(drop)
    }

    /// `crun delete [--force] -- <id>`.
    pub async fn delete(&self, id: &str, force: bool) -> TaskResult<()> {
        let mut args: Vec<OsString> = vec!["delete".into()];
        if force {
            args.push("--force".into());
        }
        args.extend(["--".into(), id.into()]);
        self.run("delete", args, None, false).await.map(drop)
    }

    /// `crun pause -- <id>` (cgroup freezer).
    pub async fn pause(&self, id: &str) -> TaskResult<()> {
        self.run(
            "pause",
            vec!["pause".into(), "--".into(), id.into()],
            None,
            false,
        )
        .await
        .map(drop)
    }

    /// `crun resume -- <id>`.
    pub async fn resume(&self, id: &str) -> TaskResult<()> {
        self.run(
            "resume",
            vec!["resume".into(), "--".into(), id.into()],
            None,
            false,
        )
        .await
        .map(drop)
    }

    /// `crun update --resources <file> -- <id>` with OCI LinuxResources JSON.
    pub async fn update(&self, id: &str, resources_file: &Path) -> TaskResult<()> {
        let args: Vec<OsString> = vec![
            "update".into(),
            "--resources".into(),
            resources_file.into(),
            "--".into(),
            id.into(),
        ];
        self.run("update", args, None, false).await.map(drop)
    }

    /// `crun state -- <id>`, parsed.
    pub async fn state(&self, id: &str) -> TaskResult<serde_json::Value> {
        let out = self
            .run(
                "state",
                vec!["state".into(), "--".into(), id.into()],
                None,
                true,
            )
            .await?;
        serde_json::from_slice(&out).map_err(|e| TaskError::Crun {
            op: "state",
            msg: format!("unparseable output: {e}"),
        })
    }
}

/// The last error message in crun's JSON log, or the whole text.
fn last_error(log: &str) -> String {
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("msg").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_else(|| log.trim().to_string())
}

/// Maps a failed crun call onto a Task API error.
pub fn map_error(op: &'static str, status: u32, log: &str) -> TaskError {
    let msg = last_error(log);
    let msg = if msg.is_empty() {
        format!("exit status {status}")
    } else {
        msg
    };
    let lower = msg.to_ascii_lowercase();
    if lower.contains("executable file") || lower.contains("not found in $path") {
        TaskError::InvalidArgument(format!("process binary not found: {msg}"))
    } else if lower.contains("already exists") {
        TaskError::AlreadyExists(format!("container ({msg})"))
    } else if lower.contains("/status`: no such file") || lower.contains("does not exist") {
        TaskError::NotFound(format!("container ({msg})"))
    } else {
        TaskError::Crun { op, msg }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crun_errors_map_to_codes() {
        let log = concat!(
            "{\"msg\":\"warn\",\"level\":\"warning\"}\n",
            "{\"msg\":\"executable file `nope` not found in $PATH: No such file or directory\",\"level\":\"error\"}\n"
        );
        assert_eq!(
            map_error("create", 1, log).code(),
            ttrpc::Code::INVALID_ARGUMENT
        );
        let log = "{\"msg\":\"error opening file `/r/c9/status`: No such file or directory\"}";
        assert_eq!(map_error("kill", 1, log).code(), ttrpc::Code::NOT_FOUND);
        let e = map_error("start", 1, "");
        assert_eq!(e.code(), ttrpc::Code::INTERNAL);
        assert!(e.to_string().contains("exit status 1"));
    }

    #[test]
    fn initramfs_root_is_detected() {
        let initramfs = "1 1 0:2 / / rw - rootfs rootfs rw,size=120k\n\
                         20 1 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw\n";
        assert!(root_is_initramfs(initramfs));
        let disk = "1 1 0:2 / / rw - rootfs rootfs rw\n\
                    25 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n\
                    26 25 0:5 / /dev rw - devtmpfs devtmpfs rw\n";
        assert!(!root_is_initramfs(disk));
        let host = "22 1 0:21 / / rw - overlay overlay rw\n";
        assert!(!root_is_initramfs(host));
        assert!(!root_is_initramfs(""));
    }
}
