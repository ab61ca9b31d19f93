//! Reading a container's cgroup v2 directory: Stats (cpu, memory, pids, io
//! as containerd's `io.containerd.cgroups.v2.Metrics`), its process list,
//! and the OOM watch on `memory.events`. crun creates and writes each
//! container's cgroup (limits, freezer); this module only reads it. The one
//! thing it writes is the containers' common parent's `pids.max`
//! ([`reserve_pids`]), so that no container can take the last free pids of
//! the guest from vminitd and crun.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

use crate::events::{Event, EventHub};

/// Parses flat-keyed files (`cpu.stat`, `memory.stat`, `memory.events`).
pub fn parse_flat(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Parses a single-value file; `max` is reported as 0 (no limit), as
/// containerd does.
pub fn parse_single(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        Some(0)
    } else {
        t.parse().ok()
    }
}

/// Parses `io.stat`: `MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=..` lines.
pub fn parse_io(text: &str) -> Vec<IOEntry> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (maj, min) = words.next()?.split_once(':')?;
            let mut e = IOEntry {
                major: maj.parse().ok()?,
                minor: min.parse().ok()?,
                ..Default::default()
            };
            for w in words {
                let (k, v) = w.split_once('=')?;
                let v: u64 = v.parse().ok()?;
                match k {
                    "rbytes" => e.rbytes = v,
                    "wbytes" => e.wbytes = v,
                    "rios" => e.rios = v,
                    "wios" => e.wios = v,
                    _ => {}
                }
            }
            Some(e)
        })
        .collect()
}

/// Pids the guest keeps for vminitd, crun and the kernel whatever the
/// containers do: a fork bomb in a container stops at the kernel's pid limit
/// minus these, so vminitd can still run `crun kill` and answer the host.
pub const RESERVED_PIDS: u64 = 256;

/// Create the containers' parent cgroup `parent` under `mount` and cap it at
/// `pid_max` (the kernel's `/proc/sys/kernel/pid_max`) minus
/// [`RESERVED_PIDS`]; returns the cap. Needs the pids controller enabled at
/// the mount's root.
pub fn reserve_pids(mount: &Path, parent: &str, pid_max: u64) -> std::io::Result<u64> {
    let dir = mount.join(parent);
    std::fs::create_dir_all(&dir)?;
    let cap = pid_max.saturating_sub(RESERVED_PIDS).max(1);
    std::fs::write(dir.join("pids.max"), cap.to_string())?;
    Ok(cap)
}

/// One container's cgroup directory.
#[derive(Debug, Clone)]
pub struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// `mount` is the cgroup2 mount (normally `/sys/fs/cgroup`); `path` is
    /// the spec's `linux.cgroupsPath`.
    pub fn new(mount: &Path, path: &str) -> Cgroup {
        Cgroup {
            dir: mount.join(path.trim_start_matches('/')),
        }
    }

    fn read(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(file)).ok()
    }

    /// Pids in the cgroup.
    pub fn procs(&self) -> std::io::Result<Vec<u32>> {
        let text = std::fs::read_to_string(self.dir.join("cgroup.procs"))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Everything the cgroup exposes; controllers that are not enabled leave
    /// their part of the metrics empty.
    pub fn metrics(&self) -> Metrics {
        let mut m = Metrics::new();
        if let Some(cpu) = self.read("cpu.stat").map(|t| parse_flat(&t)) {
            let g = |k: &str| cpu.get(k).copied().unwrap_or(0);
            m.cpu = Some(CPUStat {
                usage_usec: g("usage_usec"),
                user_usec: g("user_usec"),
                system_usec: g("system_usec"),
                nr_periods: g("nr_periods"),
                nr_throttled: g("nr_throttled"),
                throttled_usec: g("throttled_usec"),
                ..Default::default()
            })
            .into();
        }
        if let Some(usage) = self.read("memory.current").and_then(|t| parse_single(&t)) {
            let stat = self
                .read("memory.stat")
                .map(|t| parse_flat(&t))
                .unwrap_or_default();
            let g = |k: &str| stat.get(k).copied().unwrap_or(0);
            m.memory = Some(MemoryStat {
                usage,
                usage_limit: self
                    .read("memory.max")
                    .and_then(|t| parse_single(&t))
                    .unwrap_or(0),
                max_usage: self
                    .read("memory.peak")
                    .and_then(|t| parse_single(&t))
                    .unwrap_or(0),
                swap_usage: self
                    .read("memory.swap.current")
                    .and_then(|t| parse_single(&t))
                    .unwrap_or(0),
                anon: g("anon"),
                file: g("file"),
                kernel_stack: g("kernel_stack"),
                slab: g("slab"),
                sock: g("sock"),
                shmem: g("shmem"),
                file_mapped: g("file_mapped"),
                file_dirty: g("file_dirty"),
                pgfault: g("pgfault"),
                pgmajfault: g("pgmajfault"),
                ..Default::default()
            })
            .into();
        }
        if let Some(ev) = self.read("memory.events").map(|t| parse_flat(&t)) {
            let g = |k: &str| ev.get(k).copied().unwrap_or(0);
            m.memory_events = Some(MemoryEvents {
                low: g("low"),
                high: g("high"),
                max: g("max"),
                oom: g("oom"),
                oom_kill: g("oom_kill"),
                ..Default::default()
            })
            .into();
        }
        if let Some(current) = self.read("pids.current").and_then(|t| parse_single(&t)) {
            m.pids = Some(PidsStat {
                current,
                limit: self
                    .read("pids.max")
                    .and_then(|t| parse_single(&t))
                    .unwrap_or(0),
                ..Default::default()
            })
            .into();
        }
        if let Some(io) = self.read("io.stat") {
            m.io = Some(IOStat {
                usage: parse_io(&io),
                ..Default::default()
            })
            .into();
        }
        m
    }

    /// Watches `memory.events` and raises an OOM event each time `oom_kill`
    /// grows. Returns None when the memory controller is not enabled.
    pub fn watch_oom(
        &self,
        container_id: String,
        events: EventHub,
    ) -> Option<tokio::task::JoinHandle<()>> {
        watch_oom_file(self.dir.join("memory.events"), container_id, events)
    }
}

/// Lets tokio poll an inotify instance.
struct InotifyFd(Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// OOM watch on any file shaped like `memory.events` (tests use a plain
/// file; the kernel raises IN_MODIFY on the cgroup file the same way).
pub fn watch_oom_file(
    file: PathBuf,
    container_id: String,
    events: EventHub,
) -> Option<tokio::task::JoinHandle<()>> {
    let count = |f: &Path| {
        std::fs::read_to_string(f)
            .ok()
            .map(|t| parse_flat(&t).get("oom_kill").copied().unwrap_or(0))
    };
    let mut seen = count(&file)?;
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
    ino.add_watch(&file, AddWatchFlags::IN_MODIFY).ok()?;
    // SAFETY: the AsyncFd owns the Inotify (and so its descriptor) for its
    // whole life; the descriptor number never changes.
    let fd = unsafe { AsyncFd::register(InotifyFd(ino)) }.ok()?;
    Some(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable().await else {
                return;
            };
            match guard.try_io(|i| i.get_ref().0.read_events().map_err(std::io::Error::from)) {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!("OOM watch on {} failed: {e}", file.display());
                    return;
                }
                Err(_would_block) => continue,
            }
            let Some(now) = count(&file) else { return };
            if now > seen {
                seen = now;
                events.send(Event::Oom {
                    container_id: container_id.clone(),
                });
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    #[test]
    fn the_containers_parent_keeps_pids_for_vminitd() {
        let mount = tempfile::tempdir().expect("tempdir");
        let cap = reserve_pids(mount.path(), "vminitd", 4096).expect("reserve");
        assert_eq!(cap, 4096 - RESERVED_PIDS);
        assert_eq!(
            std::fs::read_to_string(mount.path().join("vminitd/pids.max")).expect("pids.max"),
            (4096 - RESERVED_PIDS).to_string()
        );
        assert_eq!(reserve_pids(mount.path(), "vminitd", 100).expect("tiny"), 1);
    }

    #[test]
    fn parses_cgroup_files() {
        let cpu = parse_flat("usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n");
        assert_eq!(cpu.get("usage_usec"), Some(&1234));
        assert_eq!(parse_single("max\n"), Some(0));
        assert_eq!(parse_single("4096\n"), Some(4096));
        assert_eq!(parse_single("junk"), None);
        let io = parse_io("254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n");
        assert_eq!(io.len(), 1);
        assert_eq!((io[0].major, io[0].minor), (254, 0));
        assert_eq!(
            (io[0].rbytes, io[0].wbytes, io[0].rios, io[0].wios),
            (4096, 8192, 1, 2)
        );
    }

    #[test]
    fn metrics_from_a_fake_cgroup() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("vminitd/c1");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("memory.current"), "8192\n").expect("write");
        std::fs::write(dir.join("memory.max"), "max\n").expect("write");
        std::fs::write(dir.join("memory.stat"), "anon 4096\nfile 0\n").expect("write");
        std::fs::write(dir.join("pids.current"), "3\n").expect("write");
        std::fs::write(dir.join("pids.max"), "100\n").expect("write");
        let m = Cgroup::new(t.path(), "/vminitd/c1").metrics();
        assert_eq!(m.memory.usage, 8192);
        assert_eq!(m.memory.anon, 4096);
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.pids.limit, 100);
        assert!(m.cpu.is_none());
    }

    async fn next(
        lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::io::DuplexStream>>,
    ) -> serde_json::Value {
        let line = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
            .await
            .expect("an event")
            .expect("io")
            .expect("line");
        serde_json::from_str(&line).unwrap_or(serde_json::Value::Null)
    }

    /// A write that leaves `oom_kill` alone raises nothing; one that raises
    /// it raises exactly one event. Whether the watcher sees the two writes
    /// apart or together, the next line after that event must be the
    /// sentinel the test sends through the same hub afterwards.
    #[tokio::test(flavor = "current_thread")]
    async fn oom_kill_increase_raises_one_event() {
        let t = tempfile::tempdir().expect("tempdir");
        let f = t.path().join("memory.events");
        std::fs::write(&f, "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n").expect("write");
        let hub = EventHub::start();
        let task = watch_oom_file(f.clone(), "c1".into(), hub.clone()).expect("watch");
        std::fs::write(&f, "low 0\nhigh 0\nmax 3\noom 0\noom_kill 0\n").expect("write");
        std::fs::write(&f, "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\n").expect("write");
        let (ours, theirs) = tokio::io::duplex(1024);
        hub.subscribe(Box::new(ours));
        let mut lines = tokio::io::BufReader::new(theirs).lines();
        assert_eq!(
            next(&mut lines).await,
            serde_json::Value::Null,
            "the OK line"
        );
        let v = next(&mut lines).await;
        assert_eq!(v["topic"], crate::events::TOPIC_OOM);
        assert_eq!(v["container_id"], "c1");
        hub.send(Event::Oom {
            container_id: "sentinel".into(),
        });
        assert_eq!(
            next(&mut lines).await["container_id"],
            "sentinel",
            "a second OOM event"
        );
        task.abort();
    }
}
