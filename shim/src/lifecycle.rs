//! The two short-lived actions containerd runs the shim binary for: `start`
//! (find or start the sandbox's server and print its address) and `delete`
//! (clean up after a server that is gone, and print a DeleteResponse).
//!
//! `start` prints nothing but the address: containerd reads stdout and stderr
//! together. Nothing here logs to either.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::SystemTime;

use anyhow::Context;
use beacon_paths::BeaconPaths;
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::{Message, MessageField};

use crate::bundle::Bundle;
use crate::events::timestamp;
use crate::invocation::{socket_dir, Invocation};
use crate::sandbox::{run_root, SandboxDirs};
use crate::server::{LISTEN_FD, LISTEN_FD_ENV};

/// `start`: the address of the sandbox's shim server, starting it if needed.
pub fn start(inv: &Invocation) -> anyhow::Result<String> {
    let cwd = std::env::current_dir().context("the bundle folder (cwd)")?;
    let bundle = Bundle::load(&cwd).context("reading the bundle")?;
    let sandbox_id = bundle.sandbox_id(&inv.id).to_string();
    anyhow::ensure!(
        beacon_common::id::valid_id(&sandbox_id),
        "sandbox id {sandbox_id:?} is not a valid id"
    );
    let dir = socket_dir();
    let path = inv.socket_path(&dir, &sandbox_id)?;
    let address = format!("unix://{}", path.display());
    // A running server for this sandbox takes the container (pods).
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        write_files(&cwd, &address, None)?;
        return Ok(address);
    }
    if !bundle.starts_sandbox() && sandbox_id != inv.id {
        anyhow::bail!("sandbox {sandbox_id} has no running shim; create the sandbox first");
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the stale {}", path.display())),
    }
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .with_context(|| format!("binding {}", path.display()))?;
    let exe = std::env::current_exe().context("finding this binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "-namespace",
        &inv.namespace,
        "-id",
        &sandbox_id,
        "-address",
        &inv.containerd_address,
    ]);
    if let Some(pb) = &inv.publish_binary {
        cmd.arg("-publish-binary").arg(pb);
    }
    if inv.debug {
        cmd.arg("-debug");
    }
    let fd = listener.as_raw_fd();
    cmd.current_dir(&cwd)
        .env(LISTEN_FD_ENV, LISTEN_FD.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if fd != LISTEN_FD {
                if libc::dup2(fd, LISTEN_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the shim server")?;
    drop(listener);
    write_files(&cwd, &address, Some(child.id()))?;
    Ok(address)
}

fn write_files(bundle: &Path, address: &str, pid: Option<u32>) -> anyhow::Result<()> {
    std::fs::write(bundle.join("address"), address).context("writing the address file")?;
    if let Some(pid) = pid {
        std::fs::write(bundle.join("shim.pid"), pid.to_string())
            .context("writing the shim.pid file")?;
    }
    Ok(())
}

/// `delete`: the server of this container is gone; undo what it left on the
/// host (mounts, the sandbox's run folder, its network) and answer containerd.
///
/// containerd 1.6 also runs it for every task it deleted normally (closing
/// that task's connection counts as a dead shim), so for each container of a
/// pod while its server still runs: a server that answers on its socket owns
/// the sandbox and has cleaned up after the container itself, and nothing is
/// touched (unmounting the run folder would pull the share from under the
/// pod's other containers).
pub fn delete(inv: &Invocation) -> anyhow::Result<Vec<u8>> {
    let bundle_dir = inv
        .bundle
        .clone()
        .or_else(|| std::env::current_dir().ok())
        .context("no bundle folder")?;
    // The bundle may be half gone; without it the container is its own sandbox.
    let bundle = Bundle::load(&bundle_dir).ok();
    let sandbox_id = bundle
        .as_ref()
        .map_or_else(|| inv.id.clone(), |b| b.sandbox_id(&inv.id).to_string());
    let server_alive = inv
        .socket_path(&socket_dir(), &sandbox_id)
        .is_ok_and(|p| std::os::unix::net::UnixStream::connect(p).is_ok());
    if !server_alive {
        clean_up_after(inv, &sandbox_id, bundle.as_ref())?;
    }
    let resp = DeleteResponse {
        pid: 0,
        exit_status: 128 + 9,
        exited_at: MessageField::some(timestamp(SystemTime::now())),
        ..Default::default()
    };
    resp.write_to_bytes().context("encoding the DeleteResponse")
}

/// What a dead server of `sandbox_id` left on the host: mounts, the run
/// folder, and for a sandbox's own container its cgroup and network.
fn clean_up_after(
    inv: &Invocation,
    sandbox_id: &str,
    bundle: Option<&Bundle>,
) -> anyhow::Result<()> {
    let paths = BeaconPaths::from_env();
    let dirs = SandboxDirs::of(&paths, &run_root(), sandbox_id);
    // Every mount under the sandbox's run folder, deepest first.
    crate::mounts::unmount_under(&dirs.run);
    for m in crate::mounts::remove_tree_within_mount(&dirs.run) {
        eprintln!("{} is still mounted", m.display());
    }
    if let Some(path) = bundle
        .filter(|_| sandbox_id == inv.id)
        .and_then(Bundle::cgroups_path)
    {
        crate::host_cgroup::remove_leftover(path);
    }
    if sandbox_id == inv.id {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("a runtime for the network teardown")?;
        rt.block_on(async {
            match beacon_netmgr::config::NetConfig::from_env()
                .and_then(beacon_netmgr::NetworkManager::new)
            {
                Ok(net) => {
                    if let Err(e) = net.teardown(sandbox_id).await {
                        tracing::warn!("network teardown of {sandbox_id}: {e}");
                    }
                }
                Err(e) => tracing::warn!("network manager: {e}"),
            }
        });
    }
    Ok(())
}

/// Write `bytes` to stdout and flush.
pub fn print(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()?;
    Ok(())
}
