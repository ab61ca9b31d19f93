//! The control socket of a running VM (`beacon-vmm run --api-socket PATH`) and
//! its client (`beacon-vmm ctl`).
//!
//! One JSON object per line each way, on a unix socket only its owner may use
//! (mode 0600). Requests: `{"op":"info"}`,
//! `{"op":"resize","cpus":N,"memory_mib":M}` (either or both; `memory_mib` is
//! the new total), `{"op":"pause"}` and `{"op":"resume"}` (stop and restart
//! the vCPUs; a paused VM refuses resizes) and `{"op":"devices"}` (every
//! virtio device's transport and ring state, [`VirtioReport`], for a stalled
//! device); replies:
//! `{"ok":true,...}` with the VM's figures, or `{"ok":false,"error":
//! "..."}`. A request line longer than [`MAX_REQUEST`] bytes, one that is not
//! JSON or names an unknown operation gets an error reply; the VM keeps
//! running whatever arrives. Connections are served one at a time, and a
//! client that sends nothing within [`READ_TIMEOUT`] is dropped.
//!
//! This module only translates requests into [`VmBackend`] calls; it never
//! decides how a VM changes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::{VirtioReport, VmBackend};

/// The longest request line accepted.
pub const MAX_REQUEST: usize = 4096;
/// How long a connected client may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Info {},
    Resize {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpus: Option<u8>,
        /// The new total guest RAM.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory_mib: Option<u64>,
    },
    /// The virtio devices' state ([`VirtioReport`]).
    Devices {},
    /// Stop the vCPUs ([`VmBackend::pause`]).
    Pause {},
    /// Restart them ([`VmBackend::resume`]).
    Resume {},
}

/// The VM's figures, in every successful reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub backend: String,
    pub vcpus: u8,
    pub max_vcpus: u8,
    pub memory_mib: u64,
    pub max_memory_mib: u64,
}

/// A reply on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    #[serde(flatten, skip_serializing_if = "Option::is_none", default)]
    pub info: Option<Info>,
    /// For `devices`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub devices: Option<Vec<VirtioReport>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "{path}: another process serves a control socket there; choose another --api-socket path"
    )]
    InUse { path: PathBuf },
    #[error("cannot serve the control socket at {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the control socket at {path}: {source} (is the VM running with --api-socket?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the control socket failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the VM answered something that is not a reply: {0}")]
    BadReply(String),
}

fn info(vm: &dyn VmBackend) -> Info {
    Info {
        backend: format!("{:?}", vm.kind()).to_lowercase(),
        vcpus: vm.vcpu_count(),
        max_vcpus: vm.max_vcpus(),
        memory_mib: vm.memory_mib(),
        max_memory_mib: vm.max_memory_mib(),
    }
}

fn failure(error: String) -> Reply {
    Reply {
        ok: false,
        error: Some(error),
        info: None,
        devices: None,
    }
}

/// Answer one request line.
pub fn handle(vm: &dyn VmBackend, line: &str) -> Reply {
    let request: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            return failure(format!(
                "not a request ({e}); send {{\"op\":\"info\"}}, {{\"op\":\"resize\",\"cpus\":N,\"memory_mib\":M}}, {{\"op\":\"pause\"}}, {{\"op\":\"resume\"}} or {{\"op\":\"devices\"}}"
            ))
        }
    };
    let mut devices = None;
    let outcome = match request {
        Request::Info {} => Ok(()),
        Request::Devices {} => vm.virtio_report().map(|d| devices = Some(d)),
        Request::Pause {} => vm.pause(),
        Request::Resume {} => vm.resume(),
        Request::Resize {
            cpus: None,
            memory_mib: None,
        } => Err(crate::backend::VmError::Unsupported(
            "a resize needs \"cpus\" or \"memory_mib\" (or both)".into(),
        )),
        // Memory first: a bigger VM's new vCPUs find their memory there.
        Request::Resize { cpus, memory_mib } => memory_mib
            .map_or(Ok(()), |m| vm.resize_memory(m).map(|_| ()))
            .and_then(|()| cpus.map_or(Ok(()), |c| vm.resize_vcpus(c).map(|_| ()))),
    };
    match outcome {
        Ok(()) => Reply {
            ok: true,
            error: None,
            info: Some(info(vm)),
            devices,
        },
        Err(e) => failure(e.to_string()),
    }
}

/// Read one line of at most [`MAX_REQUEST`] bytes.
fn read_request(stream: &UnixStream) -> Result<String, String> {
    let mut reader = BufReader::new(stream.take(MAX_REQUEST as u64 + 1));
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(_) if line.len() > MAX_REQUEST => Err(format!(
            "request longer than {MAX_REQUEST} bytes; send one JSON object per line"
        )),
        Ok(0) => Err("no request".into()),
        Ok(_) => Ok(line),
        Err(e) => Err(format!("reading the request: {e}")),
    }
}

fn serve_one(vm: &dyn VmBackend, mut stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let reply = match read_request(&stream) {
        Ok(line) => handle(vm, &line),
        Err(e) => failure(e),
    };
    let mut text = serde_json::to_string(&reply)
        .unwrap_or_else(|_| r#"{"ok":false,"error":"internal: reply not encodable"}"#.into());
    text.push('\n');
    if let Err(e) = stream.write_all(text.as_bytes()) {
        tracing::debug!("control socket client went away: {e}");
    }
}

/// A serving control socket; dropping it stops serving and removes the file.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Serve `vm` at `path` (a stale socket nobody serves is replaced).
    pub fn start(path: &Path, vm: Arc<dyn VmBackend>) -> Result<Self, ApiError> {
        if UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse {
                path: path.to_path_buf(),
            });
        }
        let bind = |source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_dir() => {
                return Err(bind(std::io::Error::other("it is a directory")))
            }
            Ok(_) => std::fs::remove_file(path).map_err(bind)?,
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(bind)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("beacon-api".into())
                .spawn(move || {
                    crate::seccomp::confine_or_warn(
                        crate::seccomp::ThreadClass::Control,
                        vm.thread_confinement(),
                    );
                    for conn in listener.incoming() {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        match conn {
                            Ok(stream) => serve_one(vm.as_ref(), stream),
                            Err(e) => tracing::warn!("control socket accept failed: {e}"),
                        }
                    }
                })
                .map_err(bind)?
        };
        tracing::info!(path = %path.display(), "control socket ready");
        Ok(Self {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop; it sees the flag and ends.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Send one request and read the reply (client side, `beacon-vmm ctl`).
pub fn request(path: &Path, request: &Request, timeout: Duration) -> Result<Reply, ApiError> {
    let mut stream = UnixStream::connect(path).map_err(|source| ApiError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(request).map_err(|e| ApiError::BadReply(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream.take(64 * 1024)).read_line(&mut reply)?;
    serde_json::from_str(reply.trim()).map_err(|e| ApiError::BadReply(format!("{e}: {reply:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendKind, BootTimes, VmError, VmExit};
    use std::sync::Mutex;

    struct FakeVm {
        vcpus: Mutex<u8>,
        memory: Mutex<u64>,
        paused: Mutex<bool>,
    }

    impl FakeVm {
        fn running(&self) -> Result<(), VmError> {
            if *beacon_common::lock(&self.paused) {
                return Err(VmError::WrongState {
                    operation: "resize",
                    expected: "running",
                    actual: "paused",
                });
            }
            Ok(())
        }
    }

    impl VmBackend for FakeVm {
        fn kind(&self) -> BackendKind {
            BackendKind::Kvm
        }
        fn start(&self) -> Result<(), VmError> {
            Ok(())
        }
        fn wait(&self) -> Result<VmExit, VmError> {
            Ok(VmExit::PowerOff)
        }
        fn shutdown(&self) -> Result<(), VmError> {
            Ok(())
        }
        fn kill(&self) -> Result<(), VmError> {
            Ok(())
        }
        fn pause(&self) -> Result<(), VmError> {
            *beacon_common::lock(&self.paused) = true;
            Ok(())
        }
        fn resume(&self) -> Result<(), VmError> {
            *beacon_common::lock(&self.paused) = false;
            Ok(())
        }
        fn vcpu_count(&self) -> u8 {
            *beacon_common::lock(&self.vcpus)
        }
        fn max_vcpus(&self) -> u8 {
            4
        }
        fn resize_vcpus(&self, target: u8) -> Result<u8, VmError> {
            self.running()?;
            if target == 0 || target > 4 {
                return Err(VmError::Unsupported(format!("{target} is out of range")));
            }
            *beacon_common::lock(&self.vcpus) = target;
            Ok(target)
        }
        fn memory_mib(&self) -> u64 {
            *beacon_common::lock(&self.memory)
        }
        fn max_memory_mib(&self) -> u64 {
            512
        }
        fn resize_memory(&self, total_mib: u64) -> Result<u64, VmError> {
            self.running()?;
            if !(256..=512).contains(&total_mib) || !total_mib.is_multiple_of(128) {
                return Err(VmError::Unsupported(format!(
                    "{total_mib} MiB is out of range"
                )));
            }
            *beacon_common::lock(&self.memory) = total_mib;
            Ok(total_mib)
        }
        fn boot_times(&self) -> BootTimes {
            BootTimes::default()
        }
    }

    fn fake() -> Arc<FakeVm> {
        Arc::new(FakeVm {
            vcpus: Mutex::new(1),
            memory: Mutex::new(256),
            paused: Mutex::new(false),
        })
    }

    #[test]
    fn requests_are_parsed_and_answered() {
        let vm = fake();
        let r = handle(vm.as_ref(), r#"{"op":"info"}"#);
        assert!(r.ok);
        assert_eq!(r.info.as_ref().map(|i| i.vcpus), Some(1));
        let r = handle(vm.as_ref(), r#"{"op":"resize","cpus":3}"#);
        assert!(r.ok, "{r:?}");
        assert_eq!(r.info.map(|i| i.vcpus), Some(3));
        let r = handle(vm.as_ref(), r#"{"op":"resize","cpus":9}"#);
        assert!(!r.ok);
        assert!(r.error.unwrap_or_default().contains("out of range"));
        assert_eq!(vm.vcpu_count(), 3, "a refused request changes nothing");
        let r = handle(vm.as_ref(), r#"{"op":"resize","memory_mib":384}"#);
        assert!(r.ok, "{r:?}");
        assert_eq!(r.info.as_ref().map(|i| i.memory_mib), Some(384));
        assert_eq!(r.info.map(|i| i.max_memory_mib), Some(512));
        let r = handle(vm.as_ref(), r#"{"op":"resize","memory_mib":300,"cpus":2}"#);
        assert!(!r.ok, "memory is checked first, and nothing changes");
        assert_eq!((vm.vcpu_count(), vm.memory_mib()), (3, 384));
        let r = handle(vm.as_ref(), r#"{"op":"resize","memory_mib":512,"cpus":2}"#);
        assert!(r.ok, "{r:?}");
        assert_eq!((vm.vcpu_count(), vm.memory_mib()), (2, 512));
        // Paused, a resize is refused with the state; resumed, it works.
        assert!(handle(vm.as_ref(), r#"{"op":"pause"}"#).ok);
        let r = handle(vm.as_ref(), r#"{"op":"resize","cpus":1}"#);
        assert!(
            !r.ok && r.error.as_deref().unwrap_or_default().contains("paused"),
            "{r:?}"
        );
        assert!(handle(vm.as_ref(), r#"{"op":"resume"}"#).ok);
        assert!(handle(vm.as_ref(), r#"{"op":"resize","cpus":1}"#).ok);
        assert!(handle(vm.as_ref(), r#"{"op":"resize","cpus":2}"#).ok);
        // A backend without device reports says so (the KVM backend's are
        // checked with a real VM in kvm::tests).
        let r = handle(vm.as_ref(), r#"{"op":"devices"}"#);
        assert!(!r.ok);
        assert!(r.error.unwrap_or_default().contains("KVM backend only"));
        for bad in [
            "",
            "garbage",
            r#"{"op":"explode"}"#,
            r#"{"op":"resize"}"#,
            r#"{"op":"resize","cpus":-1}"#,
            r#"{"op":"resize","cpus":1000}"#,
            r#"{"op":"info","extra":1}"#,
            r#"{"op":"devices","queue":1}"#,
            r#"{"op":"pause","now":true}"#,
            r#"{"op":"resize","memory_mib":-5}"#,
            r#"{"op":"resize","memory_mib":"lots"}"#,
        ] {
            let r = handle(vm.as_ref(), bad);
            assert!(!r.ok, "{bad:?} was accepted");
            assert!(r.error.is_some());
        }
    }

    #[test]
    fn the_socket_serves_rejects_floods_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api.sock");
        let vm = fake();
        let server = ApiServer::start(&path, vm.clone()).expect("serve");
        let mode = std::fs::metadata(&path)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            ApiServer::start(&path, vm.clone()),
            Err(ApiError::InUse { .. })
        ));
        let reply = request(
            &path,
            &Request::Resize {
                cpus: Some(2),
                memory_mib: None,
            },
            Duration::from_secs(5),
        )
        .expect("reply");
        assert!(reply.ok);
        assert_eq!(vm.vcpu_count(), 2);
        // An over-long line gets an error, and the server keeps serving.
        let mut s = UnixStream::connect(&path).expect("connect");
        s.write_all(&vec![b'x'; MAX_REQUEST * 4]).expect("flood");
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer).expect("answer");
        assert!(answer.contains("longer than"), "{answer}");
        let reply = request(&path, &Request::Info {}, Duration::from_secs(5)).expect("reply");
        assert_eq!(reply.info.map(|i| i.max_vcpus), Some(4));
        drop(server);
        assert!(!path.exists(), "socket removed");
        assert!(matches!(
            request(&path, &Request::Info {}, Duration::from_secs(1)),
            Err(ApiError::Connect { .. })
        ));
    }
}
