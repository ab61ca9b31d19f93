//! A synchronous CRI v1 client for tests ([`Cri`]): Kubernetes' runtime and
//! image services over a containerd's unix socket (a private one from
//! [`crate::containerd::Containerd::start_cri`]), each call a thin wrapper
//! with a timeout, so a hung containerd fails the test instead of hanging it;
//! and builders of the typical pod and container configs ([`PodSpec`],
//! [`ContainerSpec`]) so tests stay short. The CRI types are re-exported as
//! [`api`].

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// The CRI v1 messages and enums (`k8s_cri::v1`).
pub use k8s_cri::v1 as api;

use api::{
    ContainerConfig, ContainerMetadata, ImageSpec, LinuxContainerConfig, LinuxContainerResources,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata,
};

/// How long a call may take unless [`Cri::with_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long [`Cri::connect`] may take (a local socket: at once, normally).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What [`Cri::exec_sync`] returns: the command's exit code and output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i32,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

/// A CRI client connected to one containerd, with its own current-thread
/// tokio runtime: every method blocks until the answer, or fails with
/// `DEADLINE_EXCEEDED` after the timeout.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    timeout: Duration,
}

impl Cri {
    /// Connect to the CRI services on containerd's gRPC socket.
    pub fn connect(socket: &Path) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting a tokio runtime: {e}"))?;
        let path = socket.to_path_buf();
        let connect = async move {
            // The URI is a placeholder: the connector dials the socket.
            Endpoint::try_from("http://[::]:50051")
                .map_err(|e| e.to_string())?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(|e| format!("{e:?}"))
        };
        // The timer needs the runtime: made inside `block_on`.
        let channel = rt
            .block_on(async { tokio::time::timeout(CONNECT_TIMEOUT, connect).await })
            .map_err(|_| format!("connecting to {}: timed out", socket.display()))?
            .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
        Ok(Self {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The same client with another timeout for each call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Run one call to its end, or fail with `DEADLINE_EXCEEDED` (naming the
    /// call) after `timeout`.
    fn call<T, F>(&self, what: &str, timeout: Duration, call: F) -> Result<T, tonic::Status>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match self
            .rt
            .block_on(async { tokio::time::timeout(timeout, call).await })
        {
            Ok(answer) => answer.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "{what}: no answer from containerd within {timeout:?}"
            ))),
        }
    }

    /// A request that also tells containerd the deadline (`grpc-timeout`).
    fn request<M>(&self, message: M) -> tonic::Request<M> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// `Version`: the runtime's name and version and its CRI API version.
    pub fn version(&self) -> Result<api::VersionResponse, tonic::Status> {
        let mut c = self.runtime.clone();
        let req = self.request(api::VersionRequest {
            version: "v1".into(),
        });
        self.call("Version", self.timeout, c.version(req))
    }

    /// `Status`: the runtime's conditions (RuntimeReady, NetworkReady).
    pub fn status(&self) -> Result<api::StatusResponse, tonic::Status> {
        self.status_request(false)
    }

    /// Verbose `Status`: also `info` (containerd's CRI config as JSON under
    /// `config`, the CNI config under `cniconfig`).
    pub fn status_verbose(&self) -> Result<api::StatusResponse, tonic::Status> {
        self.status_request(true)
    }

    fn status_request(&self, verbose: bool) -> Result<api::StatusResponse, tonic::Status> {
        let mut c = self.runtime.clone();
        let req = self.request(api::StatusRequest { verbose });
        self.call("Status", self.timeout, c.status(req))
    }

    /// `RunPodSandbox` with runtime handler `handler` (`""`: the default);
    /// returns the sandbox's id.
    pub fn run_pod_sandbox(
        &self,
        config: &PodSandboxConfig,
        handler: &str,
    ) -> Result<String, tonic::Status> {
        let mut c = self.runtime.clone();
        let req = self.request(api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        });
        self.call("RunPodSandbox", self.timeout, c.run_pod_sandbox(req))
            .map(|r| r.pod_sandbox_id)
    }

    /// `PodSandboxStatus` (not verbose).
    pub fn pod_sandbox_status(
        &self,
        pod_id: &str,
    ) -> Result<api::PodSandboxStatusResponse, tonic::Status> {
        self.pod_sandbox_status_request(pod_id, false)
    }

    /// Verbose `PodSandboxStatus`: also `info["info"]` (JSON: containerd's
    /// runtime spec with the network namespace path, the CNI result, ...).
    pub fn pod_sandbox_status_verbose(
        &self,
        pod_id: &str,
    ) -> Result<api::PodSandboxStatusResponse, tonic::Status> {
        self.pod_sandbox_status_request(pod_id, true)
    }

    fn pod_sandbox_status_request(
        &self,
        pod_id: &str,
        verbose: bool,
    ) -> Result<api::PodSandboxStatusResponse, tonic::Status> {
        let mut c = self.runtime.clone();
        let req = self.request(api::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.into(),
            verbose,
        });
        self.call("PodSandboxStatus", self.timeout, c.pod_sandbox_status(req))
    }

    /// `StopPodSandbox`.
    pub fn stop_pod_sandbox(&self, pod_id: &str) -> Result<(), tonic::Status> {
        let mut c = self.runtime.clone();
        let req = self.request(api::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.into(),
        });
        self.call("StopPodSandbox", self.timeout, c.stop_pod_sandbox(req))
            .map(drop)
    }

    /// `RemovePodSandbox`.
    pub fn remove_pod_sandbox(&self, pod_id: &str) -> Result<(), tonic::Status> {
        let mut c = self.runtime.clone();
        let req = self.request(api::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.into(),
        });
        self.call("RemovePodSandbox", self.timeout, c.remove_pod_sandbox(req))
            .map(drop)
    }

    /// `ListPodSandbox`, unfiltered.
    pub fn list_pod_sandbox(&self) -> Result<Vec<api::PodSandbox>, tonic::Status> {
        let mut c = self.runtime.clone();
        let req = self.request(api::ListPodSandboxRequest { filter: None });
        self.call("ListPodSandbox", self.timeout, c.list_pod_sandbox(req))
            .map(|r| r.items)
    }

    /// `CreateContainer` in pod `pod_id` (created from `sandbox`); returns the
    /// container's id.
    pub fn create_container(
        &self,
        pod_id: &str,
        config: &ContainerConfig,
        sandbox: &PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        let mut c = self.runtime.clone();
        let req = self.request(api::CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox.clone()),
        });
        self.call("CreateContainer", self.timeout, c.create_container(req))
            .map(|r| r.container_id)
    }

    /// `StartContainer`.
    pub fn start_container(&self, id: &str) -> Result<(), tonic::Status> {
        let mut c = self.runtime.clone();
        let req = self.request(api::StartContainerRequest {
            container_id: id.into(),
        });
        self.call("StartContainer", self.timeout, c.start_container(req))
            .map(drop)
    }

    /// `StopContainer`: SIGTERM (or the image's stop signal), SIGKILL after
    /// `grace` (whole seconds; 0 kills at once).
    pub fn stop_container(&self, id: &str, grace: Duration) -> Result<(), tonic::Status> {
        let mut c = self.runtime.clone();
        let mut req = self.request(api::StopContainerRequest {
            container_id: id.into(),
            timeout: i64::try_from(grace.as_secs()).unwrap_or(i64::MAX),
        });
        let timeout = self.timeout + grace;
        req.set_timeout(timeout);
        self.call("StopContainer", timeout, c.stop_container(req))
            .map(drop)
    }

    /// `RemoveContainer`.
    pub fn remove_container(&self, id: &str) -> Result<(), tonic::Status> {
        let mut c = self.runtime.clone();
        let req = self.request(api::RemoveContainerRequest {
            container_id: id.into(),
        });
        self.call("RemoveContainer", self.timeout, c.remove_container(req))
            .map(drop)
    }

    /// `ContainerStatus` (not verbose).
    pub fn container_status(
        &self,
        id: &str,
    ) -> Result<api::ContainerStatusResponse, tonic::Status> {
        let mut c = self.runtime.clone();
        let req = self.request(api::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        });
        self.call("ContainerStatus", self.timeout, c.container_status(req))
    }

    /// `ListContainers`, unfiltered.
    pub fn list_containers(&self) -> Result<Vec<api::Container>, tonic::Status> {
        let mut c = self.runtime.clone();
        let req = self.request(api::ListContainersRequest { filter: None });
        self.call("ListContainers", self.timeout, c.list_containers(req))
            .map(|r| r.containers)
    }

    /// `ExecSync`: run `cmd` in container `id` and wait for it, at most
    /// `timeout` (rounded up to whole seconds; zero: no limit) as containerd
    /// counts it; the call itself may take that plus the client's timeout.
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput, tonic::Status> {
        let mut c = self.runtime.clone();
        let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        let mut req = self.request(api::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: i64::try_from(secs).unwrap_or(i64::MAX),
        });
        let limit = self.timeout + Duration::from_secs(secs);
        req.set_timeout(limit);
        self.call("ExecSync", limit, c.exec_sync(req))
            .map(|r| ExecOutput {
                exit_code: r.exit_code,
                stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
            })
    }

    /// `PortForward`: the streaming URL that forwards to `port` of the pod's
    /// localhost ([`forward_once`] uses it).
    pub fn port_forward(&self, pod_id: &str, port: u16) -> Result<String, tonic::Status> {
        let mut c = self.runtime.clone();
        let req = self.request(api::PortForwardRequest {
            pod_sandbox_id: pod_id.into(),
            port: vec![i32::from(port)],
        });
        self.call("PortForward", self.timeout, c.port_forward(req))
            .map(|r| r.url)
    }

    /// `ContainerStats` (`None` when containerd has none yet).
    pub fn container_stats(&self, id: &str) -> Result<Option<api::ContainerStats>, tonic::Status> {
        let mut c = self.runtime.clone();
        let req = self.request(api::ContainerStatsRequest {
            container_id: id.into(),
        });
        self.call("ContainerStats", self.timeout, c.container_stats(req))
            .map(|r| r.stats)
    }

    /// `UpdateContainerResources` with the Linux resources `linux`.
    pub fn update_container_resources(
        &self,
        id: &str,
        linux: &LinuxContainerResources,
    ) -> Result<(), tonic::Status> {
        let mut c = self.runtime.clone();
        let req = self.request(api::UpdateContainerResourcesRequest {
            container_id: id.into(),
            linux: Some(linux.clone()),
            ..Default::default()
        });
        self.call(
            "UpdateContainerResources",
            self.timeout,
            c.update_container_resources(req),
        )
        .map(drop)
    }

    /// `ListImages` (image service), unfiltered.
    pub fn list_images(&self) -> Result<Vec<api::Image>, tonic::Status> {
        let mut c = self.images.clone();
        let req = self.request(api::ListImagesRequest { filter: None });
        self.call("ListImages", self.timeout, c.list_images(req))
            .map(|r| r.images)
    }
}

/// A typical pod, as kubelet would ask for it: metadata, hostname, log
/// folder, and the Linux namespaces (network per pod, or the host's for
/// `hostNetwork`; IPC per pod; PID per container).
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
    /// Where containerd writes the containers' logs (`<container name>.log`);
    /// must exist (a temporary folder of the test).
    pub log_dir: PathBuf,
    /// `NamespaceMode::Pod` (its own network) or `Node` (`hostNetwork`).
    pub network: NamespaceMode,
}

impl PodSpec {
    /// Pod `name` in namespace `beacon-test` (uid `<name>-<test process id>`),
    /// attempt 0, with its own network, logging into `log_dir`.
    pub fn new(name: &str, log_dir: &Path) -> Self {
        Self {
            name: name.into(),
            uid: format!("{name}-{}", std::process::id()),
            namespace: "beacon-test".into(),
            attempt: 0,
            log_dir: log_dir.to_path_buf(),
            network: NamespaceMode::Pod,
        }
    }

    /// The same pod on the host's network (`hostNetwork: true`).
    pub fn host_network(mut self) -> Self {
        self.network = NamespaceMode::Node;
        self
    }

    /// The `PodSandboxConfig` for `RunPodSandbox` and `CreateContainer`.
    pub fn config(&self) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: self.attempt,
            }),
            hostname: self.name.clone(),
            log_directory: self.log_dir.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: self.network.into(),
                        pid: NamespaceMode::Container.into(),
                        ipc: NamespaceMode::Pod.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// A typical container: image, command and arguments, bind mounts, and
/// optionally its Linux resources (CPU, memory limits).
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    /// Image reference, e.g. [`crate::images::BUSYBOX_IMAGE`] (imported into
    /// `k8s.io` with [`crate::containerd::Containerd::import_image`]).
    pub image: String,
    /// The entrypoint (empty: the image's).
    pub command: Vec<String>,
    /// Its arguments (empty: the image's `Cmd` when `command` is empty too).
    pub args: Vec<String>,
    /// Bind mounts: `(host path, container path, read-only)`.
    pub mounts: Vec<(PathBuf, String, bool)>,
    pub resources: Option<LinuxContainerResources>,
}

impl ContainerSpec {
    /// Container `name` of `image` running `command` (no arguments, mounts or
    /// resources).
    pub fn new(name: &str, image: &str, command: &[&str]) -> Self {
        Self {
            name: name.into(),
            image: image.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// The `ContainerConfig` for `CreateContainer` (log file `<name>.log` in
    /// the pod's log folder).
    pub fn config(&self) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: self.name.clone(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            command: self.command.clone(),
            args: self.args.clone(),
            mounts: self
                .mounts
                .iter()
                .map(|(host, container, readonly)| Mount {
                    host_path: host.display().to_string(),
                    container_path: container.clone(),
                    readonly: *readonly,
                    ..Default::default()
                })
                .collect(),
            log_path: format!("{}.log", self.name),
            linux: Some(LinuxContainerConfig {
                resources: self.resources.clone(),
                security_context: None,
            }),
            ..Default::default()
        }
    }
}

/// What one forwarded connection carried back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// What the pod's port sent, in order.
    pub data: Vec<u8>,
    /// The error channel's text (empty: containerd reported none).
    pub error: String,
}

/// One connection through a PortForward streaming `url` to `port`, with the
/// WebSocket protocol kubelet's streaming code (in containerd) speaks,
/// `v4.channel.k8s.io`: every message is binary, its first byte the channel
/// (0 data, 1 error), and the first message on each channel is the port (16
/// bits, little endian). Sends `request` on the data channel, then reads until
/// the server closes (after the pod's side closed), at most `limit`.
pub fn forward_once(
    url: &str,
    port: u16,
    request: &[u8],
    limit: Duration,
) -> Result<Forwarded, String> {
    use std::io::ErrorKind;
    use tungstenite::client::IntoClientRequest;
    use tungstenite::Message;

    let ws_url = match url.strip_prefix("http://") {
        Some(rest) => format!("ws://{rest}?port={port}"),
        None => return Err(format!("expected an http:// streaming URL, got {url:?}")),
    };
    let mut req = ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("{ws_url}: {e}"))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        tungstenite::http::HeaderValue::from_static("v4.channel.k8s.io"),
    );
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .ok_or_else(|| format!("{ws_url}: no host"))?;
    let tcp = std::net::TcpStream::connect(&authority)
        .map_err(|e| format!("connecting the streaming server {authority}: {e}"))?;
    let deadline = std::time::Instant::now() + limit;
    tcp.set_read_timeout(Some(limit))
        .map_err(|e| format!("read timeout: {e}"))?;
    let (mut ws, _) =
        tungstenite::client(req, tcp).map_err(|e| format!("WebSocket handshake: {e}"))?;
    let mut frame = vec![0u8];
    frame.extend_from_slice(request);
    ws.send(Message::binary(frame))
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut out = Forwarded {
        data: Vec::new(),
        error: String::new(),
    };
    // The port header each channel starts with, not yet seen.
    let mut header = [true, true];
    loop {
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "the forward did not end within {limit:?}; so far {out:?}"
            ));
        }
        let msg = match ws.read() {
            Ok(m) => m,
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => break,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                return Err(format!(
                    "no end of the forward within {limit:?}; so far {out:?}"
                ))
            }
            Err(e) => return Err(format!("reading the forward: {e}; so far {out:?}")),
        };
        let bytes = match msg {
            Message::Binary(b) => b,
            Message::Close(_) => break,
            _ => continue,
        };
        let Some((&channel, rest)) = bytes.split_first() else {
            continue;
        };
        let channel = usize::from(channel);
        if channel > 1 {
            return Err(format!(
                "a message on channel {channel}; only 0 and 1 exist"
            ));
        }
        let rest = if header[channel] {
            header[channel] = false;
            if rest.len() < 2 || u16::from_le_bytes([rest[0], rest[1]]) != port {
                return Err(format!(
                    "channel {channel} did not start with port {port}: {rest:?}"
                ));
            }
            &rest[2..]
        } else {
            rest
        };
        if channel == 0 {
            out.data.extend_from_slice(rest);
        } else {
            out.error.push_str(&String::from_utf8_lossy(rest));
        }
    }
    Ok(out)
}
