//! `beacon-vmm run --fs`: the share specs, and for `dir=` shares the virtiofsd
//! behind each, owned by the CLI for the life of the VM.
//!
//! `--fs tag=T,socket=PATH` hands the VM an already running vhost-user backend;
//! `--fs tag=T,dir=PATH[,ro][,cache=..][,sandbox=..][,log=FILE]` starts virtiofsd
//! through `beacon-virtiofsd-launch` (a private socket folder, its stderr in a
//! log), reports its death in the log while the VM runs, and stops it (nothing
//! left behind) when the VM has ended. The `vmm` library only ever takes a
//! socket: this module is the one place the CLI deals with virtiofsd, and it
//! never touches the VM itself.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use beacon_virtiofsd_launch::{CachePolicy, SandboxMode, ShareConfig, Virtiofsd};
use beacon_vmm::DeviceConfig;

/// How long virtiofsd gets to exit on SIGTERM when the VM has ended.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Where a share's vhost-user backend comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsSource {
    /// An already running backend.
    Socket(PathBuf),
    /// A folder the CLI starts virtiofsd for.
    Dir {
        path: PathBuf,
        readonly: bool,
        cache: CachePolicy,
        sandbox: SandboxMode,
        log: Option<PathBuf>,
    },
}

/// One `--fs` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsShare {
    pub tag: String,
    pub source: FsSource,
}

/// Parse `tag=T,dir=PATH[,ro][,cache=auto|always|never][,sandbox=namespace|chroot|none][,log=FILE]`
/// or `tag=T,socket=PATH`.
pub fn parse_share(spec: &str) -> Result<FsShare, String> {
    let mut tag = None;
    let mut dir = None;
    let mut socket = None;
    let mut readonly = false;
    let mut cache = None;
    let mut sandbox = None;
    let mut log = None;
    for item in spec.split(',') {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        let needs_value = |v: &str| {
            if v.is_empty() {
                Err(format!("{key}= needs a value"))
            } else {
                Ok(v.to_string())
            }
        };
        match key {
            "tag" => tag = Some(needs_value(value)?),
            "dir" => dir = Some(PathBuf::from(needs_value(value)?)),
            "socket" => socket = Some(PathBuf::from(needs_value(value)?)),
            "ro" if value.is_empty() => readonly = true,
            "cache" => cache = Some(value.parse::<CachePolicy>()?),
            "sandbox" => sandbox = Some(value.parse::<SandboxMode>()?),
            "log" => log = Some(PathBuf::from(needs_value(value)?)),
            _ => {
                return Err(format!(
                    "unknown --fs item {item:?}; expected tag=, dir= or socket=, ro, cache=, sandbox=, log="
                ))
            }
        }
    }
    let tag = tag.ok_or("--fs needs tag=NAME (what the guest mounts)")?;
    if tag.is_empty() || tag.len() > 36 {
        return Err(format!("--fs tag {tag:?} must be 1 to 36 bytes"));
    }
    let source = match (dir, socket) {
        (Some(path), None) => FsSource::Dir {
            path,
            readonly,
            cache: cache.unwrap_or_default(),
            sandbox: sandbox.unwrap_or_default(),
            log,
        },
        (None, Some(path)) => {
            if readonly || cache.is_some() || sandbox.is_some() || log.is_some() {
                return Err(format!(
                    "--fs tag={tag}: ro, cache=, sandbox= and log= apply to dir= shares; give them to the virtiofsd behind socket= yourself"
                ));
            }
            FsSource::Socket(path)
        }
        _ => {
            return Err(format!(
                "--fs tag={tag}: give exactly one of dir=PATH (beacon-vmm starts virtiofsd) or socket=PATH (a running one)"
            ))
        }
    };
    Ok(FsShare { tag, source })
}

/// The shares of one VM and the virtiofsd processes the CLI started for them.
pub struct FsShares {
    devices: Vec<DeviceConfig>,
    daemons: Vec<(String, Virtiofsd)>,
    /// Set while the VM runs: only then is a virtiofsd ending a death to
    /// report (before, the VM's own connect fails clearly; after, it ends
    /// because its frontend, the VM, hung up).
    watching: Arc<AtomicBool>,
    /// Sockets (and default logs) of started virtiofsd; removed last.
    _runtime: Option<tempfile::TempDir>,
}

impl FsShares {
    /// Start virtiofsd for every `dir=` share and wait for its socket; on any
    /// failure everything started so far is stopped again.
    pub fn start(shares: &[FsShare]) -> anyhow::Result<Self> {
        let mut me = Self {
            devices: Vec::new(),
            daemons: Vec::new(),
            watching: Arc::new(AtomicBool::new(false)),
            _runtime: None,
        };
        for (i, share) in shares.iter().enumerate() {
            let socket = match &share.source {
                FsSource::Socket(path) => path.clone(),
                FsSource::Dir {
                    path,
                    readonly,
                    cache,
                    sandbox,
                    log,
                } => {
                    if me._runtime.is_none() {
                        me._runtime = Some(
                            tempfile::Builder::new()
                                .prefix("beacon-vmm-fs.")
                                .tempdir()
                                .context("creating a folder for virtiofsd sockets")?,
                        );
                    }
                    let runtime = me._runtime.as_ref().map(|d| d.path().to_path_buf());
                    let socket = runtime.unwrap_or_default().join(format!("fs{i}.sock"));
                    let mut cfg = ShareConfig::new(path, &socket);
                    cfg.readonly = *readonly;
                    cfg.cache = *cache;
                    cfg.sandbox = *sandbox;
                    cfg.log_path = log.clone();
                    let fs = Virtiofsd::spawn(&cfg).with_context(|| {
                        format!("starting virtiofsd for --fs tag={}", share.tag)
                    })?;
                    let (tag, dir, watching) =
                        (share.tag.clone(), path.clone(), me.watching.clone());
                    fs.on_exit(move |exited| {
                        if exited.requested || !watching.load(Ordering::SeqCst) {
                            return;
                        }
                        if exited.status.is_some_and(|s| s.success()) {
                            // virtiofsd ends cleanly when its frontend hangs up,
                            // which a QEMU backend does as it exits.
                            tracing::info!(tag = %tag, "virtiofsd for share {tag:?} ended: its frontend closed the connection");
                        } else {
                            tracing::error!(
                                tag = %tag,
                                "virtiofsd for share {tag:?} ({}) died: {exited}; the guest's file system {tag:?} no longer answers",
                                dir.display()
                            );
                        }
                    });
                    tracing::info!(tag = %share.tag, dir = %path.display(), log = %fs.log_path().display(), "virtiofsd started");
                    me.daemons.push((share.tag.clone(), fs));
                    socket
                }
            };
            me.devices.push(DeviceConfig::Fs {
                tag: share.tag.clone(),
                socket,
                queue_size: 1024,
            });
        }
        Ok(me)
    }

    /// The VM's virtio-fs devices.
    pub fn devices(&self) -> Vec<DeviceConfig> {
        self.devices.clone()
    }

    /// Report virtiofsd deaths until the guard drops; take it once the VM is
    /// created and drop it before the VM (which closes the backends' sockets).
    pub fn watch_while_running(&self) -> WatchGuard {
        self.watching.store(true, Ordering::SeqCst);
        WatchGuard(self.watching.clone())
    }

    /// Stop every virtiofsd started here (the VM has ended).
    pub fn stop(mut self) {
        self.watching.store(false, Ordering::SeqCst);
        for (tag, fs) in self.daemons.drain(..) {
            match fs.stop(STOP_GRACE) {
                Ok(exited) => tracing::debug!(tag = %tag, "virtiofsd stopped ({exited})"),
                Err(e) => tracing::error!(tag = %tag, "stopping virtiofsd: {e}"),
            }
        }
    }
}

/// Ends the death watch when dropped (see [`FsShares::watch_while_running`]).
pub struct WatchGuard(Arc<AtomicBool>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_specs_parse() {
        assert_eq!(
            parse_share("tag=root,dir=/srv/a,ro,cache=never,sandbox=none,log=/l"),
            Ok(FsShare {
                tag: "root".into(),
                source: FsSource::Dir {
                    path: "/srv/a".into(),
                    readonly: true,
                    cache: CachePolicy::Never,
                    sandbox: SandboxMode::None,
                    log: Some("/l".into()),
                },
            })
        );
        assert_eq!(
            parse_share("socket=/run/fs.sock,tag=x"),
            Ok(FsShare {
                tag: "x".into(),
                source: FsSource::Socket("/run/fs.sock".into()),
            })
        );
        for bad in [
            "dir=/a",
            "tag=,dir=/a",
            "tag=x",
            "tag=x,dir=/a,socket=/s",
            "tag=x,socket=/s,ro",
            "tag=x,dir=/a,rw",
            "tag=x,dir=/a,cache=sometimes",
            "tag=x,dir=",
            &format!("tag={},dir=/a", "t".repeat(37)),
        ] {
            assert!(parse_share(bad).is_err(), "{bad}");
        }
    }
}
