//! A small host-side client of a vminitd inside a VM, over vsock: runs one
//! container to its end (stdout and stderr through the stream port) or asks
//! vminitd to shut the VM down. Used by `tests/vm_vsock.rs`; handy by hand:
//!
//! ```text
//! vminitd-vsock-client --cid 3 run --id c1 -- /bin/busybox echo hi
//! vminitd-vsock-client --cid 3 shutdown
//! ```
//!
//! `run` expects the bundle `<shares>/<id>` with a `rootfs` in the guest,
//! sends an inline OCI spec, and prints one JSON line:
//! `{"id":..,"stdout":..,"stderr":..,"exit_status":..}`. It connects until
//! `--wait-secs` pass, so it can be started while the VM boots.
//!
//! `probe` is the other side: run inside the guest (in a container), it
//! tries the Task API and the stream port at `--cid` once each, the way a
//! hostile container would, and prints one JSON line per port:
//! `{"cid":..,"port":..,"outcome":"refused"|"served"|"no-answer","detail":..}`.
//! `refused`: the connection failed or was closed before a byte came back;
//! `served`: vminitd answered (a ttrpc reply, or `OK` to `EVENTS`).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use containerd_shim_protos::api::{
    CreateTaskRequest, DeleteRequest, ShutdownRequest, StartRequest, WaitRequest,
};
use containerd_shim_protos::shim_async::TaskClient;
use protobuf::well_known_types::any::Any;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_vsock::{VsockAddr, VsockStream};
use vminitd::transport::{STREAM_VSOCK_PORT, TASK_VSOCK_PORT};

const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

#[derive(Debug, Parser)]
struct Args {
    /// The guest's vsock CID.
    #[arg(long)]
    cid: u32,
    #[arg(long, default_value_t = TASK_VSOCK_PORT)]
    task_port: u32,
    #[arg(long, default_value_t = STREAM_VSOCK_PORT)]
    stream_port: u32,
    /// How long to keep trying to connect (the VM may still be booting).
    #[arg(long, default_value_t = 240)]
    wait_secs: u64,
    /// Limit for the whole command, connecting included.
    #[arg(long, default_value_t = 420)]
    timeout_secs: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create, start, collect output, wait and delete one container.
    Run {
        #[arg(long)]
        id: String,
        /// The container's command line.
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// Shutdown: vminitd stops every container and powers the VM off.
    Shutdown,
    /// From inside the guest: is vminitd served to us? (It must not be.)
    Probe,
}

/// How long one probe may take (a connect that goes nowhere times out
/// after 2 s in the kernel; emulation stretches that).
const PROBE_LIMIT: Duration = Duration::from_secs(30);

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(60_000_000_000)
}

async fn task_client(a: &Args, deadline: Instant) -> anyhow::Result<TaskClient> {
    let addr = format!("vsock://{}:{}", a.cid, a.task_port);
    loop {
        match ttrpc::asynchronous::Client::connect(&addr).await {
            Ok(c) => return Ok(TaskClient::new(c)),
            Err(e) if Instant::now() > deadline => {
                bail!("connecting to {addr}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// One stream-port connection after its `OK`.
async fn stream(a: &Args, line: &str, deadline: Instant) -> anyhow::Result<VsockStream> {
    let addr = VsockAddr::new(a.cid, a.stream_port);
    let mut s = loop {
        match VsockStream::connect(addr).await {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                bail!("connecting to vsock://{}:{}: {e}", a.cid, a.stream_port)
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    handshake(&mut s, line).await?;
    Ok(s)
}

async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, line: &str) -> anyhow::Result<()> {
    s.write_all(format!("{line}\n").as_bytes()).await?;
    let mut reply = Vec::new();
    let mut b = [0u8; 1];
    while reply.len() < 512 {
        if s.read(&mut b).await? == 0 {
            break;
        }
        if b[0] == b'\n' {
            break;
        }
        reply.push(b[0]);
    }
    if reply != b"OK" {
        bail!(
            "stream handshake {line:?}: {}",
            String::from_utf8_lossy(&reply)
        );
    }
    Ok(())
}

async fn read_all(mut s: VsockStream) -> anyhow::Result<String> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.context("reading a stream")?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn spec(args: &[String]) -> serde_json::Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}],
        },
    })
}

async fn run(a: &Args, id: &str, args: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(a.wait_secs);
    let c = task_client(a, deadline).await?;
    let req = CreateTaskRequest {
        id: id.into(),
        bundle: id.into(),
        stdout: "vsock:stdout".into(),
        stderr: "vsock:stderr".into(),
        options: Some(Any {
            type_url: SPEC_TYPE_URL.into(),
            value: serde_json::to_vec(&spec(args))?,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    c.create(ctx(), &req).await.context("Create")?;
    // Create announced the streams; the init runs only at Start, so
    // nothing it writes is missed.
    let out = stream(a, &format!("STDIO {id} - stdout"), deadline).await?;
    let err = stream(a, &format!("STDIO {id} - stderr"), deadline).await?;
    c.start(
        ctx(),
        &StartRequest {
            id: id.into(),
            ..Default::default()
        },
    )
    .await
    .context("Start")?;
    let (stdout, stderr) = tokio::try_join!(read_all(out), read_all(err))?;
    let w = c
        .wait(
            ctx(),
            &WaitRequest {
                id: id.into(),
                ..Default::default()
            },
        )
        .await
        .context("Wait")?;
    c.delete(
        ctx(),
        &DeleteRequest {
            id: id.into(),
            ..Default::default()
        },
    )
    .await
    .context("Delete")?;
    println!(
        "{}",
        json!({"id": id, "stdout": stdout, "stderr": stderr, "exit_status": w.exit_status})
    );
    Ok(())
}

async fn shutdown(a: &Args) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(a.wait_secs);
    let c = task_client(a, deadline).await?;
    c.shutdown(
        ctx(),
        &ShutdownRequest {
            now: true,
            ..Default::default()
        },
    )
    .await
    .context("Shutdown")?;
    Ok(())
}

async fn probe(a: &Args) -> anyhow::Result<()> {
    for port in [a.task_port, a.stream_port] {
        let task_api = port == a.task_port;
        let (outcome, detail) =
            match tokio::time::timeout(PROBE_LIMIT, probe_one(a.cid, port, task_api)).await {
                Ok(r) => r,
                Err(_) => ("no-answer", format!("nothing within {PROBE_LIMIT:?}")),
            };
        println!(
            "{}",
            json!({"cid": a.cid, "port": port, "outcome": outcome, "detail": detail})
        );
    }
    Ok(())
}

async fn probe_one(cid: u32, port: u32, task_api: bool) -> (&'static str, String) {
    if task_api {
        let addr = format!("vsock://{cid}:{port}");
        let c = match ttrpc::asynchronous::Client::connect(&addr).await {
            Ok(c) => TaskClient::new(c),
            Err(e) => return ("refused", format!("connect: {e}")),
        };
        let req = containerd_shim_protos::api::ConnectRequest::default();
        let call = c.connect(ttrpc::context::with_timeout(10_000_000_000), &req);
        return match call.await {
            Ok(r) => ("served", format!("Connect answered: {}", r.version)),
            Err(e) => ("refused", format!("Connect failed: {e}")),
        };
    }
    let mut s = match VsockStream::connect(VsockAddr::new(cid, port)).await {
        Ok(s) => s,
        Err(e) => return ("refused", format!("connect: {e}")),
    };
    if let Err(e) = s.write_all(b"EVENTS\n").await {
        return ("refused", format!("write: {e}"));
    }
    let mut reply = [0u8; 64];
    match s.read(&mut reply).await {
        Ok(0) => ("refused", "closed without a byte".into()),
        Ok(n) => (
            "served",
            format!(
                "answered {:?}",
                String::from_utf8_lossy(reply.get(..n).unwrap_or_default())
            ),
        ),
        Err(e) => ("refused", format!("read: {e}")),
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Building the tokio runtime")?;
    let limit = Duration::from_secs(a.timeout_secs);
    rt.block_on(async {
        let work = async {
            match &a.cmd {
                Cmd::Run { id, args } => run(&a, id, args).await,
                Cmd::Shutdown => shutdown(&a).await,
                Cmd::Probe => probe(&a).await,
            }
        };
        tokio::time::timeout(limit, work)
            .await
            .unwrap_or_else(|_| bail!("no answer within {limit:?}"))
    })
}
