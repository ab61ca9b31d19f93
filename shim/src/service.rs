//! The containerd Task API of the shim: containerd calls it over ttrpc (under
//! both `containerd.task.v2.Task` and `containerd.task.v3.Task`), and it carries
//! each call into the sandbox's VM, to vminitd, keeping on the host only what
//! must live there: the sandbox, each container's files and stdio, exits and
//! events in order.
//!
//! One shim serves one sandbox (a pod, or a single `ctr run` container) and
//! every container in it. The first Create builds the sandbox; deleting its
//! last container tears it down; Shutdown ends the server once nothing is left.
//! Every process reports the shim's own pid to containerd (the VM runs in it).
//! Update also resizes the VM around vminitd's cgroup change: grown first,
//! shrunk after ([`crate::resize`] says to what).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use beacon_common::guest_protocol::{GuestEvent, GUEST_SHARES_DIR};
use beacon_common::id::valid_id;
use beacon_paths::BeaconPaths;
use containerd_shim_protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest,
    PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse,
    StateRequest, StateResponse, StatsRequest, StatsResponse, Status, UpdateTaskRequest,
    WaitRequest, WaitResponse,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::{create_task, Task, TaskClient};
use tokio::sync::{mpsc, watch, Mutex, Notify};
use ttrpc::asynchronous::TtrpcContext;
use ttrpc::Code;

use crate::bundle::{Bundle, NetNamespace};
use crate::config::{runtime_options_config_path, RuntimeConfig};
use crate::events::{timestamp, Publisher, TaskEvent};
use crate::guest::{call_context, GuestLink};
use crate::guest_events::{EventGate, ExitTarget};
use crate::mounts::{self, RootfsMount};
use crate::sandbox::{Sandbox, SandboxRequest, SHARE_NAME};
use crate::stdio::{ProcessIo, StdioSpec};

/// ttrpc service names the Task API is served under.
pub const SERVICE_NAMES: [&str; 2] = ["containerd.task.v2.Task", "containerd.task.v3.Task"];
/// `type_url` of a full OCI spec in vminitd's Create options.
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// How long a process's output may take to drain after its exit.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// Exit status reported for processes the VM took down with it.
pub const VM_GONE_STATUS: u32 = 255;

/// Resize the VM to `target`, memory first when growing (new vCPUs then find
/// it), vCPUs first when shrinking; off the async threads (a resize waits for
/// the guest's answer).
async fn resize_vm(
    vm: Arc<dyn beacon_vmm::VmBackend>,
    target: crate::resize::Target,
    why: &'static str,
) -> Result<(), String> {
    let grow = why == "grow";
    let joined = tokio::task::spawn_blocking(move || {
        let memory = |vm: &dyn beacon_vmm::VmBackend| {
            if vm.memory_mib() != target.memory_mib {
                vm.resize_memory(target.memory_mib)
                    .map(drop)
                    .map_err(|e| format!("memory to {} MiB: {e}", target.memory_mib))
            } else {
                Ok(())
            }
        };
        let cpus = |vm: &dyn beacon_vmm::VmBackend| {
            if vm.vcpu_count() != target.cpus {
                vm.resize_vcpus(target.cpus)
                    .map(drop)
                    .map_err(|e| format!("vCPUs to {}: {e}", target.cpus))
            } else {
                Ok(())
            }
        };
        if grow {
            memory(vm.as_ref()).and_then(|()| cpus(vm.as_ref()))
        } else {
            cpus(vm.as_ref()).and_then(|()| memory(vm.as_ref()))
        }
    })
    .await;
    let outcome = joined.map_err(|e| format!("the resize task failed: {e}"))?;
    outcome.map_err(|e| format!("cannot {why} the sandbox VM: {e}"))
}

fn status(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

/// How the shim reaches its guest: a VM it builds, or (tests) a vminitd that
/// already runs as a host process with its shares folder at `shares`.
#[derive(Debug, Clone)]
pub enum GuestMode {
    Vm,
    HostProcess { link: GuestLink, shares: PathBuf },
}

/// Exit of a process: (status, time).
type Exit = Option<(u32, SystemTime)>;

struct Process {
    io: Option<Arc<ProcessIo>>,
    exit: watch::Sender<Exit>,
    stdio: StdioSpec,
}

impl Process {
    fn new(io: Option<ProcessIo>, stdio: StdioSpec) -> Self {
        Self {
            io: io.map(Arc::new),
            exit: watch::channel(None).0,
            stdio,
        }
    }
}

struct Container {
    bundle: String,
    /// `<share>/<id>` on the host.
    host_dir: PathBuf,
    /// Mounts made for it, in order.
    mounts: Vec<PathBuf>,
    init: Process,
    execs: HashMap<String, Process>,
    /// The sandbox (pause) container of a CRI pod: when it ends, the pod's
    /// VM ends with every other container in it.
    pod_sandbox: bool,
}

/// The guest side of the sandbox, shared with the event loop.
struct Guest {
    task: TaskClient,
    link: GuestLink,
    share: PathBuf,
}

#[derive(Default)]
struct State {
    sandbox_id: Option<String>,
    vm: Option<Sandbox>,
    guest: Option<Arc<Guest>>,
    containers: HashMap<String, Container>,
}

/// The Task service.
pub struct Service {
    namespace: String,
    pid: u32,
    paths: BeaconPaths,
    run_root: PathBuf,
    mode: GuestMode,
    publisher: Publisher,
    net: crate::sandbox::NetManager,
    state: Arc<Mutex<State>>,
    shutdown: Arc<Notify>,
}

impl Service {
    pub fn new(
        namespace: String,
        paths: BeaconPaths,
        run_root: PathBuf,
        mode: GuestMode,
        publisher: Publisher,
        net: crate::sandbox::NetManager,
        shutdown: Arc<Notify>,
    ) -> Self {
        Self {
            namespace,
            pid: std::process::id(),
            paths,
            run_root,
            mode,
            publisher,
            net,
            state: Arc::new(Mutex::new(State::default())),
            shutdown,
        }
    }

    /// The ttrpc services to register, sharing `service`.
    pub fn services_of(service: Arc<Self>) -> HashMap<String, ttrpc::asynchronous::Service> {
        let svc: Arc<dyn Task + Send + Sync> = service;
        let mut out = HashMap::new();
        for name in SERVICE_NAMES {
            for (_, s) in create_task(svc.clone()) {
                out.insert(name.to_string(), s);
            }
        }
        out
    }

    /// Tear everything down (the server is ending): every container's mounts,
    /// then the sandbox.
    pub async fn cleanup(&self) {
        let mut st = self.state.lock().await;
        for (_, c) in st.containers.drain() {
            for p in std::iter::once(&c.init).chain(c.execs.values()) {
                if let Some(io) = &p.io {
                    io.abort().await;
                }
            }
            mounts::unmount_all(&c.mounts);
        }
        if let Some(vm) = st.vm.take() {
            vm.destroy(false).await;
        }
        st.guest = None;
    }

    async fn guest(&self) -> ttrpc::Result<Arc<Guest>> {
        let st = self.state.lock().await;
        if Self::vm_ended(&st) {
            return Err(status(
                Code::FAILED_PRECONDITION,
                "the sandbox's VM has ended; its processes are gone",
            ));
        }
        st.guest.clone().ok_or_else(|| {
            status(
                Code::FAILED_PRECONDITION,
                "no sandbox is running in this shim",
            )
        })
    }

    /// Whether the sandbox's VM has ended (then vminitd is gone too, and a
    /// call to it would only wait for its timeout).
    fn vm_ended(st: &State) -> bool {
        st.vm
            .as_ref()
            .is_some_and(|vm| vm.vm_exit().borrow().is_some())
    }

    /// Build (or, for tests, attach to) the sandbox.
    async fn start_sandbox(
        &self,
        st: &mut State,
        sandbox_id: &str,
        bundle: &Bundle,
        options: Option<&Any>,
    ) -> ttrpc::Result<()> {
        let (guest, events, vm_exit) = match &self.mode {
            GuestMode::HostProcess { link, shares } => {
                let task = link
                    .connect_task(Duration::from_secs(10), || false, None)
                    .await
                    .map_err(|e| status(Code::UNAVAILABLE, e))?;
                let events = link
                    .subscribe_events()
                    .await
                    .map_err(|e| status(Code::UNAVAILABLE, e))?;
                let share = shares.join(SHARE_NAME);
                mounts::prepare_share(&share).map_err(|e| status(Code::INTERNAL, e))?;
                (
                    Guest {
                        task,
                        link: link.clone(),
                        share,
                    },
                    events,
                    None,
                )
            }
            GuestMode::Vm => {
                let config_path =
                    options.and_then(|o| runtime_options_config_path(&o.type_url, &o.value));
                let config = RuntimeConfig::resolve(config_path.as_deref())
                    .map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
                let vm = config
                    .vm_for(&bundle.spec)
                    .map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
                let pod_netns = match bundle.network_namespace() {
                    NetNamespace::Join(path) => Some(path),
                    NetNamespace::Host if bundle.is_pod_sandbox() => {
                        return Err(status(
                            Code::INVALID_ARGUMENT,
                            format!(
                                "pod {sandbox_id} asks for the host's network (hostNetwork: \
                                 true): a VM cannot share the host's network namespace; run \
                                 hostNetwork pods with another RuntimeClass (runc)"
                            ),
                        ));
                    }
                    NetNamespace::Host | NetNamespace::Own => None,
                };
                let (sandbox, events) = Sandbox::create(SandboxRequest {
                    id: sandbox_id,
                    paths: &self.paths,
                    run_root: &self.run_root,
                    config: &config,
                    vm,
                    net: self.net.clone(),
                    pod_netns: pod_netns.as_deref(),
                    cgroups_path: bundle.cgroups_path(),
                })
                .await
                .map_err(|e| status(Code::UNAVAILABLE, format!("sandbox {sandbox_id}: {e}")))?;
                let guest = Guest {
                    task: sandbox.task.clone(),
                    link: sandbox.link.clone(),
                    share: sandbox.dirs.share.clone(),
                };
                let vm_exit = sandbox.vm_exit();
                st.vm = Some(sandbox);
                (guest, events, Some(vm_exit))
            }
        };
        st.sandbox_id = Some(sandbox_id.to_string());
        st.guest = Some(Arc::new(guest));
        tokio::spawn(event_loop(
            self.state.clone(),
            self.publisher.clone(),
            events,
            vm_exit,
        ));
        Ok(())
    }

    async fn create_container(
        &self,
        req: &CreateTaskRequest,
        bundle: Bundle,
        guest: &Guest,
    ) -> ttrpc::Result<Container> {
        let id = &req.id;
        let host_dir = guest.share.join(id);
        let guest_dir = format!("{GUEST_SHARES_DIR}/{SHARE_NAME}/{id}");
        let rootfs: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                kind: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let mut made = Vec::new();
        let mut spec = bundle.spec.clone();
        let prepared = (|| -> Result<(), mounts::MountError> {
            let root = host_dir.join("rootfs");
            mounts::mount_rootfs(&rootfs, &bundle.rootfs, &root)?;
            made.push(root);
            made.extend(mounts::carry_bind_mounts(&mut spec, &host_dir, &guest_dir)?);
            mounts::rewrite_spec(&mut spec);
            Ok(())
        })();
        if let Err(e) = prepared {
            mounts::unmount_all(&made);
            let _ = mounts::remove_tree_within_mount(&host_dir);
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("container {id}: {e}"),
            ));
        }
        let spec_any = Any {
            type_url: SPEC_TYPE_URL.into(),
            value: serde_json::to_vec(&spec).unwrap_or_default(),
            ..Default::default()
        };
        let guest_req = CreateTaskRequest {
            id: id.clone(),
            bundle: format!("{SHARE_NAME}/{id}"),
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            options: MessageField::some(spec_any),
            ..Default::default()
        };
        let undo = |made: &[PathBuf]| {
            mounts::unmount_all(made);
            let _ = mounts::remove_tree_within_mount(&host_dir);
        };
        if let Err(e) = guest.task.create(call_context(), &guest_req).await {
            undo(&made);
            return Err(e);
        }
        let stdio = StdioSpec {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let io = match ProcessIo::attach(&guest.link, &self.namespace, id, None, &stdio).await {
            Ok(io) => io,
            Err(e) => {
                let _ = guest
                    .task
                    .delete(
                        call_context(),
                        &DeleteRequest {
                            id: id.clone(),
                            ..Default::default()
                        },
                    )
                    .await;
                undo(&made);
                return Err(status(Code::INVALID_ARGUMENT, e));
            }
        };
        Ok(Container {
            pod_sandbox: bundle.is_pod_sandbox(),
            bundle: req.bundle.clone(),
            host_dir,
            mounts: made,
            init: Process::new(Some(io), stdio),
            execs: HashMap::new(),
        })
    }

    /// The sandbox is gone once its last container is: tear it down.
    async fn end_sandbox_if_empty(&self, st: &mut State) {
        if !st.containers.is_empty() {
            return;
        }
        if let Some(vm) = st.vm.take() {
            vm.destroy(true).await;
        }
        st.guest = None;
        st.sandbox_id = None;
    }

    fn exit_of(st: &State, id: &str, exec: &str) -> ttrpc::Result<watch::Receiver<Exit>> {
        let c = st
            .containers
            .get(id)
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))?;
        let p = if exec.is_empty() {
            &c.init
        } else {
            c.execs
                .get(exec)
                .ok_or_else(|| status(Code::NOT_FOUND, format!("exec {exec} not found in {id}")))?
        };
        Ok(p.exit.subscribe())
    }
}

/// Carry vminitd's events (and the VM's end) to containerd, in order, after
/// each process's output has drained.
async fn event_loop(
    state: Arc<Mutex<State>>,
    publisher: Publisher,
    mut events: mpsc::Receiver<GuestEvent>,
    vm_exit: Option<watch::Receiver<Option<beacon_vmm::VmExit>>>,
) {
    let mut vm_exit = vm_exit;
    let mut gate = EventGate::default();
    loop {
        let event = match vm_exit.as_mut() {
            Some(exit) => tokio::select! {
                e = events.recv() => e,
                _ = exit.wait_for(|e| e.is_some()) => None,
            },
            None => events.recv().await,
        };
        let Some(event) = event else {
            break;
        };
        match event {
            GuestEvent::Exit {
                container_id,
                id,
                exit_status,
                exited_at,
                ..
            } => {
                let (found, pod_ended) = {
                    let st = state.lock().await;
                    let c = st.containers.get(&container_id);
                    let found = c.and_then(|c| {
                        let p = if id == container_id {
                            Some(&c.init)
                        } else {
                            c.execs.get(&id)
                        };
                        p.map(|p| (p.io.clone(), p.exit.clone()))
                    });
                    let pod_ended = id == container_id && c.is_some_and(|c| c.pod_sandbox);
                    (found, pod_ended)
                };
                let target = match &found {
                    None => ExitTarget::Unknown,
                    Some((_, exit)) if exit.borrow().is_some() => ExitTarget::AlreadyExited,
                    Some(_) => ExitTarget::Running,
                };
                if !gate.admit_exit(&container_id, &id, target) {
                    continue;
                }
                let Some((io, exit)) = found else {
                    continue;
                };
                if let Some(io) = io {
                    if !io.finish(DRAIN_LIMIT).await {
                        tracing::warn!(
                            container = container_id,
                            id,
                            "output still flowing {DRAIN_LIMIT:?} after the exit"
                        );
                    }
                }
                // GuestEvent::parse refused times out of range.
                let at = exited_at.to_system_time().unwrap_or_else(SystemTime::now);
                exit.send_replace(Some((exit_status, at)));
                publisher.publish(TaskEvent::Exit {
                    container_id: container_id.clone(),
                    id,
                    pid: std::process::id(),
                    exit_status,
                    exited_at: at,
                });
                // The pod's sandbox ended (killed, or pause died): every
                // other container of the pod is killed, as when a pod's
                // namespaces go; the VM ends once they are deleted. Through
                // vminitd, not by ending the VM here: a call in flight (the
                // Kill that ended pause) still gets its answer.
                if pod_ended {
                    tokio::spawn(kill_pod_containers(state.clone(), container_id));
                }
            }
            GuestEvent::Oom { container_id } => {
                let known = state.lock().await.containers.contains_key(&container_id);
                if gate.admit_oom(&container_id, known, Instant::now()) {
                    publisher.publish(TaskEvent::Oom { container_id });
                }
            }
        }
    }
    // The guest is gone (VM ended or vminitd closed its events): every process
    // not yet exited ends now, non-zero, so nothing waits forever.
    let now = SystemTime::now();
    let st = state.lock().await;
    for (cid, c) in &st.containers {
        let procs = std::iter::once((cid.clone(), &c.init))
            .chain(c.execs.iter().map(|(e, p)| (e.clone(), p)));
        for (id, p) in procs {
            if p.exit.borrow().is_some() {
                continue;
            }
            if let Some(io) = &p.io {
                io.abort().await;
            }
            p.exit.send_replace(Some((VM_GONE_STATUS, now)));
            tracing::warn!(
                container = cid,
                id,
                "the guest ended under the process; reporting exit {VM_GONE_STATUS}"
            );
            publisher.publish(TaskEvent::Exit {
                container_id: cid.clone(),
                id,
                pid: std::process::id(),
                exit_status: VM_GONE_STATUS,
                exited_at: now,
            });
        }
    }
}

/// SIGKILL every process of every container of the pod but its sandbox
/// container `sandbox`, which has ended.
async fn kill_pod_containers(state: Arc<Mutex<State>>, sandbox: String) {
    let (guest, ids) = {
        let st = state.lock().await;
        let ids: Vec<String> = st
            .containers
            .iter()
            .filter(|(id, c)| **id != sandbox && c.init.exit.borrow().is_none())
            .map(|(id, _)| id.clone())
            .collect();
        (st.guest.clone(), ids)
    };
    let Some(guest) = guest else { return };
    if !ids.is_empty() {
        tracing::info!(
            sandbox,
            containers = ids.len(),
            "the pod's sandbox container ended; killing the pod's other containers"
        );
    }
    for id in ids {
        let req = KillRequest {
            id: id.clone(),
            signal: 9,
            all: true,
            ..Default::default()
        };
        if let Err(e) = guest.task.kill(call_context(), &req).await {
            tracing::warn!(sandbox, container = id, "killing the container: {e}");
        }
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        if !valid_id(&req.id) {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("container id {:?}: ids start with a letter or digit and hold only letters, digits, '.', '_' and '-' (at most 76)", req.id),
            ));
        }
        let bundle =
            Bundle::load(Path::new(&req.bundle)).map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        let sandbox_id = bundle.sandbox_id(&req.id).to_string();
        if !valid_id(&sandbox_id) {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("sandbox id {sandbox_id:?} is not a valid id"),
            ));
        }
        let mut st = self.state.lock().await;
        if st.containers.contains_key(&req.id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {} exists", req.id),
            ));
        }
        match &st.sandbox_id {
            Some(s) if *s != sandbox_id => {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("this shim runs sandbox {s}, not {sandbox_id}"),
                ))
            }
            Some(_) => {}
            None if !bundle.starts_sandbox() => {
                return Err(status(
                    Code::NOT_FOUND,
                    format!(
                        "container {}: its pod sandbox {sandbox_id} is not running in this \
                         shim; run the pod sandbox first",
                        req.id
                    ),
                ))
            }
            None => {
                self.start_sandbox(&mut st, &sandbox_id, &bundle, req.options.as_ref())
                    .await?
            }
        }
        let Some(guest) = st.guest.clone() else {
            return Err(status(Code::INTERNAL, "the sandbox has no guest"));
        };
        let created = self.create_container(&req, bundle, &guest).await;
        let container = match created {
            Ok(c) => c,
            Err(e) => {
                self.end_sandbox_if_empty(&mut st).await;
                return Err(e);
            }
        };
        st.containers.insert(req.id.clone(), container);
        crate::fault::at(crate::fault::Step::Create, &req.id);
        self.publisher.publish(TaskEvent::Create {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            pid: self.pid,
        });
        Ok(CreateTaskResponse {
            pid: self.pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let guest = self.guest().await?;
        {
            let st = self.state.lock().await;
            Self::exit_of(&st, &req.id, &req.exec_id)?;
        }
        guest.task.start(call_context(), &req).await?;
        crate::fault::at(crate::fault::Step::Start, &req.id);
        self.publisher.publish(if req.exec_id.is_empty() {
            TaskEvent::Start {
                container_id: req.id.clone(),
                pid: self.pid,
            }
        } else {
            TaskEvent::ExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid: self.pid,
            }
        });
        Ok(StartResponse {
            pid: self.pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        let mut st = self.state.lock().await;
        let exit = *Self::exit_of(&st, &req.id, &req.exec_id)?.borrow();
        let guest = st.guest.clone().filter(|_| !Self::vm_ended(&st));
        if let Some(guest) = guest {
            match guest.task.delete(call_context(), &req).await {
                Ok(_) => {}
                // The guest is gone, or already forgot it: finish on the host.
                Err(e) if exit.is_some() => {
                    tracing::debug!(id = req.id, "vminitd delete: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        crate::fault::at(crate::fault::Step::Delete, &req.id);
        let (code, at) = exit.unwrap_or((VM_GONE_STATUS, SystemTime::now()));
        if req.exec_id.is_empty() {
            if let Some(c) = st.containers.remove(&req.id) {
                for p in std::iter::once(&c.init).chain(c.execs.values()) {
                    if let Some(io) = &p.io {
                        io.abort().await;
                    }
                }
                mounts::unmount_all(&c.mounts);
                for m in mounts::remove_tree_within_mount(&c.host_dir) {
                    tracing::warn!(container = req.id, "{} is still mounted", m.display());
                }
            }
            self.publisher.publish(TaskEvent::Delete {
                container_id: req.id.clone(),
                pid: self.pid,
                exit_status: code,
                exited_at: at,
            });
            self.end_sandbox_if_empty(&mut st).await;
        } else if let Some(c) = st.containers.get_mut(&req.id) {
            if let Some(p) = c.execs.remove(&req.exec_id) {
                if let Some(io) = &p.io {
                    io.abort().await;
                }
            }
        }
        Ok(DeleteResponse {
            pid: self.pid,
            exit_status: code,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        })
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        if !valid_id(&req.exec_id) {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("exec id {:?} is not a valid id", req.exec_id),
            ));
        }
        let guest = self.guest().await?;
        let mut st = self.state.lock().await;
        let Some(c) = st.containers.get(&req.id) else {
            return Err(status(
                Code::NOT_FOUND,
                format!("container {} not found", req.id),
            ));
        };
        if c.execs.contains_key(&req.exec_id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("exec {} exists", req.exec_id),
            ));
        }
        guest.task.exec(call_context(), &req).await?;
        crate::fault::at(crate::fault::Step::Exec, &req.exec_id);
        let stdio = StdioSpec {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let io = match ProcessIo::attach(
            &guest.link,
            &self.namespace,
            &req.id,
            Some(&req.exec_id),
            &stdio,
        )
        .await
        {
            Ok(io) => io,
            Err(e) => {
                let _ = guest
                    .task
                    .delete(
                        call_context(),
                        &DeleteRequest {
                            id: req.id.clone(),
                            exec_id: req.exec_id.clone(),
                            ..Default::default()
                        },
                    )
                    .await;
                return Err(status(Code::INVALID_ARGUMENT, e));
            }
        };
        if let Some(c) = st.containers.get_mut(&req.id) {
            c.execs
                .insert(req.exec_id.clone(), Process::new(Some(io), stdio));
        }
        self.publisher.publish(TaskEvent::ExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
        });
        Ok(Empty::new())
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let (exit, stdio, bundle) = {
            let st = self.state.lock().await;
            let exit = *Self::exit_of(&st, &req.id, &req.exec_id)?.borrow();
            let c = st.containers.get(&req.id);
            let stdio = c.and_then(|c| {
                if req.exec_id.is_empty() {
                    Some(c.init.stdio.clone())
                } else {
                    c.execs.get(&req.exec_id).map(|p| p.stdio.clone())
                }
            });
            (
                exit,
                stdio.unwrap_or_default(),
                c.map(|c| c.bundle.clone()).unwrap_or_default(),
            )
        };
        let mut resp = match (self.guest().await, exit) {
            (Ok(g), None) => g.task.state(call_context(), &req).await?,
            _ => StateResponse {
                id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            },
        };
        if let Some((code, at)) = exit {
            resp.status = Status::STOPPED.into();
            resp.exit_status = code;
            resp.exited_at = MessageField::some(timestamp(at));
        }
        resp.pid = self.pid;
        resp.bundle = bundle;
        resp.stdin = stdio.stdin;
        resp.stdout = stdio.stdout;
        resp.stderr = stdio.stderr;
        resp.terminal = stdio.terminal;
        Ok(resp)
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let mut rx = {
            let st = self.state.lock().await;
            Self::exit_of(&st, &req.id, &req.exec_id)?
        };
        let exit = *rx
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| status(Code::NOT_FOUND, "the process went away"))?;
        let (code, at) = exit.unwrap_or((VM_GONE_STATUS, SystemTime::now()));
        Ok(WaitResponse {
            exit_status: code,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        {
            let st = self.state.lock().await;
            if Self::exit_of(&st, &req.id, &req.exec_id)?
                .borrow()
                .is_some()
            {
                // As containerd's runc shim answers: CRI's stop then succeeds.
                return Err(status(
                    Code::NOT_FOUND,
                    format!("process of {} already finished", req.id),
                ));
            }
        }
        self.guest().await?.task.kill(call_context(), &req).await
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        self.guest().await?.task.pids(call_context(), &req).await
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        self.guest().await?.task.pause(call_context(), &req).await?;
        self.publisher.publish(TaskEvent::Paused {
            container_id: req.id.clone(),
        });
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        self.guest()
            .await?
            .task
            .resume(call_context(), &req)
            .await?;
        self.publisher.publish(TaskEvent::Resumed {
            container_id: req.id.clone(),
        });
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        self.guest()
            .await?
            .task
            .resize_pty(call_context(), &req)
            .await
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        let io = {
            let st = self.state.lock().await;
            let c = st.containers.get(&req.id).ok_or_else(|| {
                status(Code::NOT_FOUND, format!("container {} not found", req.id))
            })?;
            let p = if req.exec_id.is_empty() {
                Some(&c.init)
            } else {
                c.execs.get(&req.exec_id)
            };
            p.and_then(|p| p.io.clone())
        };
        if let Some(io) = io {
            io.close_stdin().await;
        }
        self.guest()
            .await?
            .task
            .close_io(call_context(), &req)
            .await
    }

    /// Grow the VM to fit the new limits before vminitd applies them; shrink
    /// it after they were lowered ([`crate::resize`]).
    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let guest = self.guest().await?;
        let plan = {
            let st = self.state.lock().await;
            match (&st.vm, req.resources.as_ref()) {
                (Some(sandbox), Some(any)) => {
                    let shape = sandbox.shape();
                    let target = crate::resize::target(&shape, &any.value)
                        .map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
                    Some((sandbox.vm().clone(), shape, target))
                }
                // Attached to a host process (tests), or nothing to size by.
                _ => None,
            }
        };
        if let Some((vm, shape, target)) = &plan {
            let up = target.grown(shape);
            if !up.is(shape) {
                resize_vm(vm.clone(), up, "grow")
                    .await
                    .map_err(|e| status(Code::FAILED_PRECONDITION, e))?;
            }
        }
        guest.task.update(call_context(), &req).await?;
        if let Some((vm, shape, target)) = plan {
            if target != target.grown(&shape) {
                // The lower limits hold already; a VM that keeps more than
                // it needs is only wasteful, so this is not the update's error.
                if let Err(e) = resize_vm(vm, target, "shrink").await {
                    tracing::warn!(id = %req.id, "the new limits are applied, but the VM could not shrink to fit them: {e}");
                }
            }
        }
        Ok(Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        self.guest().await?.task.stats(call_context(), &req).await
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        Ok(ConnectResponse {
            shim_pid: self.pid,
            task_pid: self.pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: containerd_shim_protos::api::CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        Err(status(
            Code::UNIMPLEMENTED,
            "checkpointing a VM sandbox is not supported",
        ))
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        let st = self.state.lock().await;
        if st.containers.is_empty() {
            self.shutdown.notify_one();
        }
        Ok(Empty::new())
    }
}
