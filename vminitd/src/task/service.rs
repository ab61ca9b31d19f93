//! The containerd Task service over ttrpc: protobuf in, `Runtime` call,
//! protobuf out. Registered under both `containerd.task.v2.Task` and
//! `containerd.task.v3.Task` (same messages), so a shim can forward either.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim_protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest,
    PidsResponse, ProcessInfo, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, Status,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim_protos::shim_async::{create_task, Task};
use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::empty::Empty;
use protobuf::well_known_types::timestamp::Timestamp;
use protobuf::Message;
use tokio::sync::Notify;
use ttrpc::r#async::TtrpcContext;

use crate::bundle::SPEC_TYPE_SUFFIX;
use crate::error::TaskError;
use crate::reaper::ExitInfo;
use crate::stdio::WinSize;
use crate::task::process::{ProcState, StdioNames};
use crate::task::runtime::{CreateParams, Runtime};

/// ttrpc service names the Task API is served under.
pub const SERVICE_NAMES: [&str; 2] = ["containerd.task.v2.Task", "containerd.task.v3.Task"];

/// `type_url` of the Stats payload (containerd's cgroup v2 metrics).
pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// The Task service.
pub struct TaskService {
    runtime: Arc<Runtime>,
    shutdown: Arc<Notify>,
}

impl TaskService {
    /// `shutdown` is notified when the host asks vminitd to stop.
    pub fn new(runtime: Arc<Runtime>, shutdown: Arc<Notify>) -> TaskService {
        TaskService { runtime, shutdown }
    }

    /// The ttrpc service map under every name in `SERVICE_NAMES`.
    pub fn services(self) -> HashMap<String, ttrpc::r#async::Service> {
        let svc: Arc<dyn Task + Send + Sync> = Arc::new(self);
        let mut out = HashMap::new();
        for name in SERVICE_NAMES {
            for (_, s) in create_task(svc.clone()) {
                out.insert(name.to_string(), s);
            }
        }
        out
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

fn exit_fields(exit: Option<ExitInfo>) -> (u32, protobuf::MessageField<Timestamp>) {
    match exit {
        Some(e) => (e.status, Some(timestamp(e.at)).into()),
        None => (0, protobuf::MessageField::none()),
    }
}

fn log_call(method: &str, id: &str, exec_id: &str) {
    tracing::debug!(method, id, exec_id, "task call");
}

/// Logs a failed call once, then hands the error to ttrpc.
fn fail<'a>(method: &'static str, id: &'a str) -> impl FnOnce(TaskError) -> ttrpc::Error + 'a {
    move |e| {
        tracing::warn!(method, id, "{e}");
        e.into()
    }
}

type R<T> = ttrpc::Result<T>;

#[async_trait::async_trait]
impl Task for TaskService {
    async fn create(&self, _: &TtrpcContext, req: CreateTaskRequest) -> R<CreateTaskResponse> {
        log_call("Create", &req.id, "");
        let spec = req
            .options
            .as_ref()
            .filter(|a| a.type_url.ends_with(SPEC_TYPE_SUFFIX))
            .map(|a| a.value.clone());
        let pid = self
            .runtime
            .create(CreateParams {
                id: req.id.clone(),
                bundle: req.bundle.clone(),
                spec,
                names: StdioNames {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                },
                has_rootfs_mounts: !req.rootfs.is_empty(),
            })
            .await
            .map_err(fail("Create", &req.id))?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _: &TtrpcContext, req: StartRequest) -> R<StartResponse> {
        log_call("Start", &req.id, &req.exec_id);
        let pid = self
            .runtime
            .start(&req.id, &req.exec_id)
            .await
            .map_err(fail("Start", &req.id))?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(&self, _: &TtrpcContext, req: StateRequest) -> R<StateResponse> {
        let c = self.runtime.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let status = match p.state() {
            ProcState::Created => Status::CREATED,
            ProcState::Running if c.paused() => Status::PAUSED,
            ProcState::Running => Status::RUNNING,
            ProcState::Stopped => Status::STOPPED,
        };
        let (exit_status, exited_at) = exit_fields(p.exit());
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: p.pid(),
            status: status.into(),
            stdin: p.names.stdin.clone(),
            stdout: p.names.stdout.clone(),
            stderr: p.names.stderr.clone(),
            terminal: p.names.terminal,
            exit_status,
            exited_at,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> R<DeleteResponse> {
        log_call("Delete", &req.id, &req.exec_id);
        let (pid, exit) = self
            .runtime
            .delete(&req.id, &req.exec_id)
            .await
            .map_err(fail("Delete", &req.id))?;
        let (exit_status, exited_at) = exit_fields(exit);
        Ok(DeleteResponse {
            pid,
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    async fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> R<PidsResponse> {
        let c = self.runtime.get(&req.id)?;
        let pids = c
            .cgroup
            .procs()
            .map_err(|e| TaskError::io(format!("read cgroup of {}", req.id), e))?;
        let execs = c.exec_pids();
        let processes = pids
            .into_iter()
            .map(|pid| {
                let mut info = ProcessInfo {
                    pid,
                    ..Default::default()
                };
                if let Some(exec_id) = execs.get(&pid) {
                    // containerd reads ProcessDetails{exec_id}; field 1.
                    let mut value = vec![0x0a];
                    value.push(u8::try_from(exec_id.len()).unwrap_or(0));
                    value.extend_from_slice(exec_id.as_bytes());
                    info.info = Some(Any {
                        type_url: "containerd.runc.v1.ProcessDetails".into(),
                        value,
                        ..Default::default()
                    })
                    .into();
                }
                info
            })
            .collect();
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _: &TtrpcContext, req: PauseRequest) -> R<Empty> {
        log_call("Pause", &req.id, "");
        self.runtime
            .set_paused(&req.id, true)
            .await
            .map_err(fail("Pause", &req.id))?;
        Ok(Empty::new())
    }

    async fn resume(&self, _: &TtrpcContext, req: ResumeRequest) -> R<Empty> {
        log_call("Resume", &req.id, "");
        self.runtime
            .set_paused(&req.id, false)
            .await
            .map_err(fail("Resume", &req.id))?;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _: &TtrpcContext,
        _: containerd_shim_protos::api::CheckpointTaskRequest,
    ) -> R<Empty> {
        Err(TaskError::Unimplemented("Checkpoint").into())
    }

    async fn kill(&self, _: &TtrpcContext, req: KillRequest) -> R<Empty> {
        log_call("Kill", &req.id, &req.exec_id);
        self.runtime
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(fail("Kill", &req.id))?;
        Ok(Empty::new())
    }

    async fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> R<Empty> {
        log_call("Exec", &req.id, &req.exec_id);
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| TaskError::InvalidArgument("exec without a process spec".into()))?;
        self.runtime
            .exec(
                &req.id,
                &req.exec_id,
                StdioNames {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                },
                &spec,
            )
            .map_err(fail("Exec", &req.id))?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> R<Empty> {
        let c = self.runtime.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        p.resize(WinSize::from_request(req.width, req.height))?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> R<Empty> {
        log_call("CloseIO", &req.id, &req.exec_id);
        let c = self.runtime.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if req.stdin {
            p.with_io(|io| io.close_stdin());
        }
        Ok(Empty::new())
    }

    async fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> R<Empty> {
        log_call("Update", &req.id, "");
        let res = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| TaskError::InvalidArgument("update without resources".into()))?;
        self.runtime
            .update(&req.id, &res)
            .await
            .map_err(fail("Update", &req.id))?;
        Ok(Empty::new())
    }

    async fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> R<WaitResponse> {
        let c = self.runtime.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let exit = p.wait().await;
        let (exit_status, exited_at) = exit_fields(Some(exit));
        Ok(WaitResponse {
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    async fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> R<StatsResponse> {
        let c = self.runtime.get(&req.id)?;
        let metrics = c.cgroup.metrics();
        let value = metrics
            .write_to_bytes()
            .map_err(|e| TaskError::io("encode metrics", std::io::Error::other(e)))?;
        Ok(StatsResponse {
            stats: Some(Any {
                type_url: METRICS_TYPE_URL.into(),
                value,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
    }

    async fn connect(&self, _: &TtrpcContext, req: ConnectRequest) -> R<ConnectResponse> {
        let task_pid = self.runtime.get(&req.id).map(|c| c.init.pid()).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: concat!("vminitd/", env!("CARGO_PKG_VERSION")).into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, req: ShutdownRequest) -> R<Empty> {
        tracing::info!(now = req.now, "shutdown requested");
        self.shutdown.notify_one();
        Ok(Empty::new())
    }
}
