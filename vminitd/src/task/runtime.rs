//! The containers vminitd runs and every Task operation on them, in domain
//! terms (no protobuf here). Owns the container table and each container's
//! private directory (`<state>/bundles/<id>`: config.json, pid files, exec
//! specs, console sockets).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use beacon_common::lock;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::bundle;
use crate::cgroup::Cgroup;
use crate::crun::Crun;
use crate::error::{TaskError, TaskResult};
use crate::events::EventHub;
use crate::ids::check_id;
use crate::reaper::{boot_ticks_now, BirthWindow, ExitInfo, Reaper};
use crate::stdio::{StdioSetup, WinSize};
use crate::streams::{StdioHub, StreamKey};
use crate::task::process::{ProcState, Process, StdioNames};

/// How long crun's pid file may take to show a pid.
const PID_FILE_WAIT: Duration = Duration::from_secs(2);

/// Directories and programs a runtime uses.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where the host's shares are mounted; bundles and rootfs live inside.
    pub shares_dir: PathBuf,
    /// vminitd's own state: crun root, bundles, logs.
    pub state_dir: PathBuf,
    /// The crun binary.
    pub crun: PathBuf,
    /// cgroup2 mount point.
    pub cgroup_mount: PathBuf,
    /// Parent cgroup (under the mount) for all containers.
    pub cgroup_parent: String,
}

/// One container.
pub struct Container {
    pub id: String,
    /// The bundle string the host sent (echoed by State).
    pub bundle: String,
    dir: PathBuf,
    pub cgroup: Cgroup,
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    paused: Mutex<bool>,
    oom_watch: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Container {
    fn execs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Process>>> {
        lock(&self.execs)
    }

    /// The init (exec id "") or a named exec.
    pub fn process(&self, exec_id: &str) -> TaskResult<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(format!("exec {exec_id} in container {}", self.id)))
    }

    /// Whether the container is frozen.
    pub fn paused(&self) -> bool {
        *lock(&self.paused)
    }

    /// Pids of exec processes by exec id.
    pub fn exec_pids(&self) -> HashMap<u32, String> {
        self.execs()
            .iter()
            .map(|(k, p)| (p.pid(), k.clone()))
            .collect()
    }
}

/// A request to create a container, in domain terms.
pub struct CreateParams {
    pub id: String,
    pub bundle: String,
    /// The spec JSON if the host sent it inline.
    pub spec: Option<Vec<u8>>,
    pub names: StdioNames,
    pub has_rootfs_mounts: bool,
}

enum Slot {
    Creating,
    Ready(Arc<Container>),
}

/// All containers and the services they use.
pub struct Runtime {
    cfg: RuntimeConfig,
    crun: Crun,
    reaper: Reaper,
    hub: StdioHub,
    events: EventHub,
    table: Mutex<HashMap<String, Slot>>,
}

fn read_pid(file: &Path) -> Option<u32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

impl Runtime {
    /// Sets up the state directories; call inside the tokio runtime.
    pub fn new(
        cfg: RuntimeConfig,
        reaper: Reaper,
        hub: StdioHub,
        events: EventHub,
    ) -> TaskResult<Runtime> {
        for d in ["crun", "bundles", "logs", "consoles"] {
            let p = cfg.state_dir.join(d);
            std::fs::create_dir_all(&p)
                .map_err(|e| TaskError::io(format!("create {}", p.display()), e))?;
        }
        let crun = Crun::new(
            cfg.crun.clone(),
            cfg.state_dir.join("crun"),
            cfg.state_dir.join("logs"),
            reaper.clone(),
        );
        Ok(Runtime {
            cfg,
            crun,
            reaper,
            hub,
            events,
            table: Mutex::new(HashMap::new()),
        })
    }

    /// The exit of the process crun named in its pid file, which started
    /// while crun ran (`window`): pids are reused, so the pid alone could
    /// name a stranger.
    fn watch_exit(
        &self,
        op: &'static str,
        pid: u32,
        window: BirthWindow,
    ) -> TaskResult<oneshot::Receiver<ExitInfo>> {
        let pid = i32::try_from(pid)
            .ok()
            .filter(|p| *p > 1)
            .ok_or_else(|| TaskError::Crun {
                op,
                msg: format!("pid file holds an impossible pid {pid}"),
            })?;
        self.reaper
            .subscribe(pid, window)
            .map_err(|e| TaskError::Crun {
                op,
                msg: format!("the process crun started: {e}"),
            })
    }

    /// Tells the stream port which host streams this process will use, so
    /// only those are accepted; all or none.
    fn announce_streams(&self, id: &str, exec_id: &str, names: &StdioNames) -> TaskResult<()> {
        for kind in names.request().kinds() {
            let key = StreamKey {
                container: id.to_string(),
                exec: exec_id.to_string(),
                kind,
            };
            if let Err(why) = self.hub.reserve(key) {
                self.hub.forget(id, exec_id);
                return Err(TaskError::FailedPrecondition(why));
            }
        }
        Ok(())
    }

    fn consoles_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("consoles")
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        lock(&self.table)
    }

    /// The container `id`.
    pub fn get(&self, id: &str) -> TaskResult<Arc<Container>> {
        match self.table().get(id) {
            Some(Slot::Ready(c)) => Ok(c.clone()),
            _ => Err(TaskError::NotFound(format!("container {id}"))),
        }
    }

    /// Ids of every ready container.
    pub fn ids(&self) -> Vec<String> {
        self.table()
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Ready(_)))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Create: writes the bundle and runs `crun create`. Returns the pid.
    pub async fn create(&self, p: CreateParams) -> TaskResult<u32> {
        check_id("container", &p.id)?;
        if p.has_rootfs_mounts {
            return Err(TaskError::InvalidArgument(
                "rootfs mounts are not supported: send a prepared rootfs on a share".into(),
            ));
        }
        {
            let mut t = self.table();
            if t.contains_key(&p.id) {
                return Err(TaskError::AlreadyExists(format!("container {}", p.id)));
            }
            t.insert(p.id.clone(), Slot::Creating);
        }
        let dir = self.cfg.state_dir.join("bundles").join(&p.id);
        // From now on the host may connect the init's streams.
        let result = match self.announce_streams(&p.id, "", &p.names) {
            Ok(()) => self.create_inner(&p, &dir).await,
            Err(e) => Err(e),
        };
        let mut t = self.table();
        match result {
            Ok(c) => {
                let pid = c.init.pid();
                t.insert(p.id.clone(), Slot::Ready(c));
                Ok(pid)
            }
            Err(e) => {
                t.remove(&p.id);
                let _ = std::fs::remove_dir_all(&dir);
                self.hub.forget(&p.id, "");
                Err(e)
            }
        }
    }

    async fn create_inner(&self, p: &CreateParams, dir: &Path) -> TaskResult<Arc<Container>> {
        let host_bundle = bundle::bundle_dir(&self.cfg.shares_dir, &p.bundle, &p.id)?;
        let spec_bytes = match &p.spec {
            Some(b) => b.clone(),
            None => std::fs::read(host_bundle.join("config.json")).map_err(|e| {
                TaskError::InvalidArgument(format!(
                    "no spec in the request and none readable in the bundle: {e}"
                ))
            })?,
        };
        let mut spec = bundle::parse_json("config.json", &spec_bytes)?;
        if let Some(process) = spec.get_mut("process").filter(|p| p.is_object()) {
            // The request's terminal flag decides; crun reads the spec's.
            process["terminal"] = Value::Bool(p.names.terminal);
        }
        let spec = bundle::rewrite_spec(
            spec,
            &self.cfg.shares_dir,
            &host_bundle,
            &p.id,
            &self.cfg.cgroup_parent,
        )?;
        let cgroups_path = spec
            .pointer("/linux/cgroupsPath")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        bundle::write_bundle(dir, &spec)?;

        let (setup, child_stdio, console) =
            StdioSetup::prepare(&p.id, "", p.names.request(), &self.consoles_dir())?;
        let pid_file = dir.join("init.pid");
        let born = boot_ticks_now();
        self.crun
            .create(&p.id, dir, &pid_file, console.as_deref(), child_stdio)
            .await?;
        let after_crun = async {
            let pid = read_pid(&pid_file).ok_or_else(|| TaskError::Crun {
                op: "create",
                msg: "no pid file".into(),
            })?;
            let exited = self.watch_exit("create", pid, BirthWindow::since(born))?;
            let io = setup.activate(&self.hub).await?;
            Ok::<_, TaskError>((pid, exited, io))
        };
        let (pid, exited, io) = match after_crun.await {
            Ok(v) => v,
            Err(e) => {
                let _ = self.crun.delete(&p.id, true).await;
                return Err(e);
            }
        };
        let init = Arc::new(Process::new(p.names.clone(), None));
        init.attach(
            pid,
            io,
            exited,
            self.events.clone(),
            p.id.clone(),
            p.id.clone(),
        );
        let cgroup = Cgroup::new(&self.cfg.cgroup_mount, &cgroups_path);
        let oom = cgroup.watch_oom(p.id.clone(), self.events.clone());
        tracing::info!(id = %p.id, pid, "container created");
        Ok(Arc::new(Container {
            id: p.id.clone(),
            bundle: p.bundle.clone(),
            dir: dir.to_path_buf(),
            cgroup,
            init,
            execs: Mutex::new(HashMap::new()),
            paused: Mutex::new(false),
            oom_watch: Mutex::new(oom),
        }))
    }

    /// Start: the init (`crun start`) or a registered exec (`crun exec`).
    pub async fn start(&self, id: &str, exec_id: &str) -> TaskResult<u32> {
        let c = self.get(id)?;
        let proc = c.process(exec_id)?;
        if proc.state() != ProcState::Created || !proc.claim_start() {
            return Err(TaskError::FailedPrecondition(format!(
                "process {} of {id} was already started",
                if exec_id.is_empty() { id } else { exec_id }
            )));
        }
        let r = self.start_claimed(&c, &proc, exec_id).await;
        if r.is_err() {
            proc.release_start();
        }
        r
    }

    async fn start_claimed(
        &self,
        c: &Container,
        proc: &Arc<Process>,
        exec_id: &str,
    ) -> TaskResult<u32> {
        let id = c.id.as_str();
        if exec_id.is_empty() {
            self.crun.start(id).await?;
            proc.set_running();
            return Ok(proc.pid());
        }
        if c.init.state() != ProcState::Running {
            return Err(TaskError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let spec = proc
            .exec_spec
            .as_ref()
            .ok_or_else(|| TaskError::FailedPrecondition("exec has no process spec".into()))?;
        let spec_file = c.dir.join(format!("exec-{exec_id}.json"));
        let spec = with_console_size(spec, proc.console_size());
        let bytes = serde_json::to_vec(&spec)
            .map_err(|e| TaskError::InvalidArgument(format!("exec spec: {e}")))?;
        std::fs::write(&spec_file, bytes)
            .map_err(|e| TaskError::io(format!("write {}", spec_file.display()), e))?;
        let (setup, child_stdio, console) =
            StdioSetup::prepare(id, exec_id, proc.names.request(), &self.consoles_dir())?;
        let pid_file = c.dir.join(format!("exec-{exec_id}.pid"));
        let born = boot_ticks_now();
        let res = self
            .crun
            .exec(id, &spec_file, &pid_file, console.as_deref(), child_stdio)
            .await;
        let _ = std::fs::remove_file(&spec_file);
        if let Err(e) = res {
            self.hub.forget(id, exec_id);
            return Err(e);
        }
        let pid = read_pid_waiting(&pid_file)
            .await
            .ok_or_else(|| TaskError::Crun {
                op: "exec",
                msg: "no pid file".into(),
            })?;
        let _ = std::fs::remove_file(&pid_file);
        let window = BirthWindow::since(born);
        let exited = match self.watch_exit("exec", pid, window) {
            Ok(rx) => rx,
            Err(e) => {
                self.hub.forget(id, exec_id);
                return Err(e);
            }
        };
        let io = match setup.activate(&self.hub).await {
            Ok(io) => io,
            Err(e) => {
                // Do not leave an untracked process behind.
                if let Some(p) = target_pid(pid) {
                    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
                }
                self.hub.forget(id, exec_id);
                return Err(e);
            }
        };
        proc.attach(
            pid,
            io,
            exited,
            self.events.clone(),
            id.to_string(),
            exec_id.to_string(),
        );
        proc.set_running();
        Ok(pid)
    }

    /// Exec: registers a process to run on Start.
    pub fn exec(&self, id: &str, exec_id: &str, names: StdioNames, spec: &[u8]) -> TaskResult<()> {
        check_id("exec", exec_id)?;
        let c = self.get(id)?;
        let mut spec = bundle::parse_json("exec process spec", spec)?;
        bundle::check_process(&spec)?;
        // The request's terminal flag decides; crun reads the JSON's.
        spec["terminal"] = Value::Bool(names.terminal);
        let mut execs = c.execs();
        if execs.contains_key(exec_id) {
            return Err(TaskError::AlreadyExists(format!("exec {exec_id} in {id}")));
        }
        // From now on the host may connect the exec's streams (before Start).
        self.announce_streams(id, exec_id, &names)?;
        execs.insert(
            exec_id.to_string(),
            Arc::new(Process::new(names, Some(spec))),
        );
        Ok(())
    }

    /// Kill: signals the init through crun, or an exec directly.
    pub async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> TaskResult<()> {
        let c = self.get(id)?;
        let proc = c.process(exec_id)?;
        if proc.state() == ProcState::Stopped {
            return Err(TaskError::NotFound(format!(
                "process {} of {id}: already finished",
                if exec_id.is_empty() { id } else { exec_id }
            )));
        }
        if exec_id.is_empty() {
            let killed = self.crun.kill(id, signal, all).await;
            if killed.is_err() {
                // The init may have ended between the check above and crun's
                // kill ("open pidfd: No such process"): a finished process,
                // which containerd is told as its runc shim tells it (not
                // found), so a stop of a container that just ended succeeds.
                let _ = tokio::time::timeout(Duration::from_secs(2), c.init.wait()).await;
                if c.init.state() == ProcState::Stopped {
                    return Err(TaskError::NotFound(format!(
                        "process {id} of {id}: already finished"
                    )));
                }
            }
            return killed;
        }
        let pid = proc.pid();
        if pid == 0 {
            return Err(TaskError::FailedPrecondition(format!(
                "exec {exec_id} was not started"
            )));
        }
        let sig = nix::sys::signal::Signal::try_from(i32::try_from(signal).unwrap_or(-1))
            .map_err(|_| TaskError::InvalidArgument(format!("bad signal {signal}")))?;
        let target = target_pid(pid)
            .ok_or_else(|| TaskError::FailedPrecondition(format!("exec {exec_id} has no pid")))?;
        nix::sys::signal::kill(target, sig)
            .map_err(|e| TaskError::io(format!("kill exec {exec_id}"), e.into()))
    }

    /// Delete: removes a stopped exec, or a stopped (or never started)
    /// container with its crun state and bundle. Returns (pid, exit).
    pub async fn delete(&self, id: &str, exec_id: &str) -> TaskResult<(u32, Option<ExitInfo>)> {
        let c = self.get(id)?;
        if !exec_id.is_empty() {
            let proc = c.process(exec_id)?;
            if proc.state() == ProcState::Running {
                return Err(TaskError::FailedPrecondition(format!(
                    "exec {exec_id} is still running"
                )));
            }
            proc.close_io();
            c.execs().remove(exec_id);
            self.hub.forget(id, exec_id);
            return Ok((proc.pid(), proc.exit()));
        }
        match c.init.state() {
            ProcState::Running => {
                return Err(TaskError::FailedPrecondition(format!(
                    "container {id} is running: kill it first"
                )))
            }
            ProcState::Created => {
                self.crun.delete(id, true).await?;
                // The init was killed by the force delete; its exit is due.
                let _ = tokio::time::timeout(Duration::from_secs(5), c.init.wait()).await;
            }
            ProcState::Stopped => self.crun.delete(id, false).await?,
        }
        self.forget(&c);
        Ok((c.init.pid(), c.init.exit()))
    }

    fn forget(&self, c: &Container) {
        if let Some(t) = lock(&c.oom_watch).take() {
            t.abort();
        }
        c.init.close_io();
        let execs: Vec<String> = c.execs().keys().cloned().collect();
        for e in &execs {
            if let Ok(p) = c.process(e) {
                p.close_io();
            }
            self.hub.forget(&c.id, e);
        }
        self.hub.forget(&c.id, "");
        let _ = std::fs::remove_dir_all(&c.dir);
        self.table().remove(&c.id);
        tracing::info!(id = %c.id, "container deleted");
    }

    /// Pause or resume through crun (cgroup freezer).
    pub async fn set_paused(&self, id: &str, pause: bool) -> TaskResult<()> {
        let c = self.get(id)?;
        if pause {
            self.crun.pause(id).await?;
        } else {
            self.crun.resume(id).await?;
        }
        *lock(&c.paused) = pause;
        Ok(())
    }

    /// Update: applies OCI LinuxResources JSON through `crun update`.
    pub async fn update(&self, id: &str, resources: &[u8]) -> TaskResult<()> {
        let c = self.get(id)?;
        let v = bundle::parse_json("resources", resources)?;
        let file = c.dir.join("update-resources.json");
        let bytes = serde_json::to_vec(&v)
            .map_err(|e| TaskError::InvalidArgument(format!("resources: {e}")))?;
        std::fs::write(&file, bytes)
            .map_err(|e| TaskError::io(format!("write {}", file.display()), e))?;
        let r = self.crun.update(id, &file).await;
        let _ = std::fs::remove_file(&file);
        r
    }

    /// Stops every container: SIGKILL, then force delete. For shutdown.
    pub async fn stop_all(&self) {
        for id in self.ids() {
            let Ok(c) = self.get(&id) else { continue };
            if c.init.state() == ProcState::Running {
                let _ = self.crun.kill(&id, 9, true).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), c.init.wait()).await;
            }
            if let Err(e) = self.crun.delete(&id, true).await {
                tracing::warn!(%id, "delete on shutdown failed: {e}");
            }
            self.forget(&c);
        }
    }
}

/// The exec's process JSON as crun gets it: a size from ResizePty before
/// Start becomes `consoleSize`, which crun sets on the pty before the
/// process runs (the pty master only reaches us after that, too late for a
/// process that asks its size at once, such as `stty size`).
fn with_console_size(spec: &Value, size: Option<WinSize>) -> Value {
    let mut spec = spec.clone();
    if let (Some(size), Some(obj)) = (size, spec.as_object_mut()) {
        obj.insert("consoleSize".into(), size.console_size_json());
    }
    spec
}

/// A pid that is safe to signal: never 0 or negative, which kill(2) would
/// read as a process group or every process.
fn target_pid(pid: u32) -> Option<nix::unistd::Pid> {
    i32::try_from(pid)
        .ok()
        .filter(|p| *p > 1)
        .map(nix::unistd::Pid::from_raw)
}

/// `crun exec --detach` writes the pid file before returning; a short wait
/// covers slow file systems.
async fn read_pid_waiting(file: &Path) -> Option<u32> {
    let deadline = tokio::time::Instant::now() + PID_FILE_WAIT;
    loop {
        if let Some(pid) = read_pid(file) {
            return Some(pid);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_size_goes_into_the_exec_spec() {
        let spec = serde_json::json!({"terminal": true, "args": ["stty", "size"]});
        assert_eq!(with_console_size(&spec, None), spec);
        let out = with_console_size(&spec, Some(WinSize::from_request(100, 40)));
        assert_eq!(
            out["consoleSize"],
            serde_json::json!({"height": 40, "width": 100})
        );
        assert_eq!(out["args"], spec["args"]);
        // A size the client sent in the spec is replaced by ResizePty's.
        let spec = serde_json::json!({"consoleSize": {"height": 1, "width": 2}});
        let out = with_console_size(&spec, Some(WinSize::from_request(80, 24)));
        assert_eq!(
            out["consoleSize"],
            serde_json::json!({"height": 24, "width": 80})
        );
    }
}
