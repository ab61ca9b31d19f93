//! What the shim lets through of vminitd's event stream. The guest is not
//! trusted: it may report exits of processes that do not exist, report the
//! same exit again and again, or flood OOM events. [`EventGate`] decides, per
//! event, whether it reaches containerd; everything it drops is logged at most
//! once per [`LOG_INTERVAL`](beacon_devices::throttle::LOG_INTERVAL) per kind,
//! with a count of what was held back.
//!
//! It never publishes anything and never touches a process's state: the
//! shim's event loop (`service::event_loop`) asks it, then acts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use beacon_devices::throttle::Throttle;

/// The shortest time between two OOM events of one container that both reach
/// containerd (kubelet needs one to report OOMKilled; more say nothing new).
pub const OOM_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// How many containers' last OOM times are remembered (a shim serves one
/// pod's containers; beyond this, the oldest entries go).
const MAX_OOM_ENTRIES: usize = 1024;

/// Whether a process an exit names is known, and whether it already exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitTarget {
    Unknown,
    Running,
    AlreadyExited,
}

/// The per-shim gate of guest events (see the module doc).
#[derive(Debug, Default)]
pub struct EventGate {
    unknown_exit: Throttle,
    repeated_exit: Throttle,
    unknown_oom: Throttle,
    oom_flood: Throttle,
    last_oom: HashMap<String, Instant>,
}

impl EventGate {
    /// Whether an exit of `id` in `container` goes on to containerd.
    pub fn admit_exit(&mut self, container: &str, id: &str, target: ExitTarget) -> bool {
        match target {
            ExitTarget::Running => true,
            ExitTarget::Unknown => {
                if let Some(held_back) = self.unknown_exit.allow() {
                    tracing::warn!(
                        container,
                        id,
                        held_back,
                        "the guest reported the exit of an unknown process; ignored"
                    );
                }
                false
            }
            ExitTarget::AlreadyExited => {
                if let Some(held_back) = self.repeated_exit.allow() {
                    tracing::warn!(
                        container,
                        id,
                        held_back,
                        "the guest reported a process's exit again; ignored"
                    );
                }
                false
            }
        }
    }

    /// Whether an OOM event of `container` goes on to containerd at `now`.
    pub fn admit_oom(&mut self, container: &str, known: bool, now: Instant) -> bool {
        if !known {
            if let Some(held_back) = self.unknown_oom.allow() {
                tracing::warn!(
                    container,
                    held_back,
                    "the guest reported an OOM of an unknown container; ignored"
                );
            }
            return false;
        }
        if let Some(last) = self.last_oom.get(container) {
            if now.saturating_duration_since(*last) < OOM_EVENT_INTERVAL {
                if let Some(held_back) = self.oom_flood.allow() {
                    tracing::warn!(
                        container,
                        held_back,
                        "OOM events arrive faster than one per {OOM_EVENT_INTERVAL:?}; the extra ones are dropped"
                    );
                }
                return false;
            }
        }
        if self.last_oom.len() >= MAX_OOM_ENTRIES && !self.last_oom.contains_key(container) {
            if let Some(oldest) = self
                .last_oom
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| k.clone())
            {
                self.last_oom.remove(&oldest);
            }
        }
        self.last_oom.insert(container.to_string(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_pass_once_and_only_for_known_processes() {
        let mut gate = EventGate::default();
        assert!(gate.admit_exit("c", "c", ExitTarget::Running));
        for _ in 0..10_000 {
            assert!(!gate.admit_exit("c", "c", ExitTarget::AlreadyExited));
            assert!(!gate.admit_exit("ghost", "x", ExitTarget::Unknown));
        }
    }

    #[test]
    fn an_oom_flood_reaches_containerd_once_per_interval_per_container() {
        let mut gate = EventGate::default();
        let t0 = Instant::now();
        let passed = (0..100_000)
            .filter(|i| gate.admit_oom("c", true, t0 + Duration::from_micros(*i)))
            .count();
        assert_eq!(passed, 1, "a flood within 100 ms");
        assert!(gate.admit_oom("other", true, t0), "containers are apart");
        assert!(gate.admit_oom("c", true, t0 + OOM_EVENT_INTERVAL));
        assert!(!gate.admit_oom("ghost", false, t0 + OOM_EVENT_INTERVAL * 5));
    }

    #[test]
    fn the_oom_memory_stays_bounded() {
        let mut gate = EventGate::default();
        let t0 = Instant::now();
        for i in 0..(MAX_OOM_ENTRIES * 3) {
            assert!(gate.admit_oom(&format!("c{i}"), true, t0 + Duration::from_millis(i as u64)));
        }
        assert!(gate.last_oom.len() <= MAX_OOM_ENTRIES);
    }
}
