//! vCPU and memory hotplug on the QEMU backend, through QMP.
//!
//! Only a VM on the hotplug machine ([`super::args::HOTPLUG_MACHINE`]) can
//! grow. A vCPU is added with `device_add` of a free slot from
//! `query-hotpluggable-cpus`; memory with one `pc-dimm` per
//! [`HOTPLUG_BLOCK_MIB`] block, each backed by its own memfd RAM object
//! (shared, so vhost-user backends such as virtiofsd can map it; QEMU
//! updates their memory tables itself). An addition counts once the guest
//! acknowledged it (`ACPI_DEVICE_OST`, insertion, success); a removal once
//! QEMU deleted the device after the guest ejected it (`DEVICE_DELETED`),
//! then the block's RAM object goes too. The guest may refuse (an `_OST`
//! failure) or say nothing within [`HOTPLUG_ACK_TIMEOUT`]: the error says
//! so, and what QEMU holds then. QEMU cannot take a device back without
//! the guest, so an unanswered addition is left as a pending removal
//! request, not undone.
//!
//! This module owns the ids of what it adds (`beacon-cpu<N>`,
//! `beacon-dimm<N>`, `beacon-ram<N>`) and removes only those: the boot
//! vCPUs and boot memory stay. Every reply from QEMU is parsed without
//! trusting its shape; the guest only reaches this through QEMU's events.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::qmp::{DeviceEvent, Qmp};
use crate::backend::VmError;
use crate::config::{MemoryConfig, VcpuConfig, HOTPLUG_BLOCK_MIB};
use crate::resize::{check_vcpu_target, memory_blocks_for, HOTPLUG_ACK_TIMEOUT};

const CPU_ID: &str = "beacon-cpu";
const DIMM_ID: &str = "beacon-dimm";
const RAM_ID: &str = "beacon-ram";
/// ACPI event codes in `_OST` answers.
const OST_INSERT: u64 = 1;
const OST_EJECT: u64 = 3;
/// `_OST` status: success, and "ejection in progress" (not an answer yet;
/// Linux sends it before it tries).
const OST_SUCCESS: u64 = 0;
const OST_EJECT_IN_PROGRESS: u64 = 0x84;

/// The hotplug state of one QEMU VM.
pub struct Hotplug {
    vcpus: VcpuConfig,
    memory: MemoryConfig,
    resizing: Mutex<()>,
    vcpus_now: AtomicU8,
    memory_now: AtomicU64,
    ack_timeout: Duration,
}

/// One possible vCPU as `query-hotpluggable-cpus` lists it.
#[derive(Debug, Clone, PartialEq)]
struct CpuSlot {
    driver: String,
    props: Map<String, Value>,
    /// The device id, when plugged: ours (`beacon-cpu<N>`), or none for a boot vCPU.
    plugged: Option<Option<String>>,
}

/// One DIMM as `query-memory-devices` lists it.
#[derive(Debug, Clone, PartialEq)]
struct Dimm {
    id: Option<String>,
    size_mib: u64,
}

fn qemu(what: impl Into<String>) -> VmError {
    VmError::Qemu(what.into())
}

/// The `N` of one of our ids (`<prefix><N>`).
fn our_number(id: &str, prefix: &str) -> Option<u32> {
    id.strip_prefix(prefix)?.parse().ok()
}

/// The lowest numbers not in `used`, `count` of them.
fn free_numbers(used: &BTreeSet<u32>, count: usize) -> Vec<u32> {
    (0..).filter(|n| !used.contains(n)).take(count).collect()
}

fn cpu_slots(reply: &Value) -> Result<Vec<CpuSlot>, VmError> {
    let list = reply
        .as_array()
        .ok_or_else(|| qemu(format!("query-hotpluggable-cpus: not a list: {reply}")))?;
    list.iter()
        .map(|slot| {
            let driver = slot
                .get("type")
                .and_then(Value::as_str)
                .ok_or_else(|| qemu(format!("a CPU slot without a type: {slot}")))?
                .to_string();
            let props = slot
                .get("props")
                .and_then(Value::as_object)
                .cloned()
                .ok_or_else(|| qemu(format!("a CPU slot without props: {slot}")))?;
            let plugged = slot.get("qom-path").and_then(Value::as_str).map(|path| {
                path.strip_prefix("/machine/peripheral/")
                    .filter(|id| our_number(id, CPU_ID).is_some())
                    .map(str::to_string)
            });
            Ok(CpuSlot {
                driver,
                props,
                plugged,
            })
        })
        .collect()
}

/// A slot's place (socket, die, core, thread), to add the lowest first.
fn slot_order(slot: &CpuSlot) -> Vec<u64> {
    ["socket-id", "die-id", "core-id", "thread-id"]
        .iter()
        .map(|k| slot.props.get(*k).and_then(Value::as_u64).unwrap_or(0))
        .collect()
}

fn dimms(reply: &Value) -> Result<Vec<Dimm>, VmError> {
    let list = reply
        .as_array()
        .ok_or_else(|| qemu(format!("query-memory-devices: not a list: {reply}")))?;
    Ok(list
        .iter()
        .filter(|d| d.get("type").and_then(Value::as_str) == Some("dimm"))
        .filter_map(|d| {
            let data = d.get("data")?;
            Some(Dimm {
                id: data.get("id").and_then(Value::as_str).map(str::to_string),
                size_mib: data.get("size").and_then(Value::as_u64)? >> 20,
            })
        })
        .collect())
}

/// What the guest said about adding `ids`: `Some(Ok)` once every one is
/// acknowledged, `Some(Err)` at its first refusal.
struct Answers<'a> {
    pending: BTreeSet<&'a str>,
}

impl<'a> Answers<'a> {
    fn new(ids: &'a [String]) -> Self {
        Self {
            pending: ids.iter().map(String::as_str).collect(),
        }
    }

    /// Insertions: `_OST` success for each.
    fn inserted(&mut self, event: &DeviceEvent) -> Option<Result<(), String>> {
        if let DeviceEvent::Ost {
            device,
            source: OST_INSERT,
            status,
        } = event
        {
            if self.pending.contains(device.as_str()) {
                if *status != OST_SUCCESS {
                    return Some(Err(format!(
                        "the guest refused {device} (ACPI _OST status {status:#x})"
                    )));
                }
                self.pending.remove(device.as_str());
            }
        }
        self.pending.is_empty().then_some(Ok(()))
    }

    /// Removals: QEMU deleted each; an `_OST` failure to eject is a refusal.
    fn removed(&mut self, event: &DeviceEvent) -> Option<Result<(), String>> {
        match event {
            DeviceEvent::Deleted { device } => {
                self.pending.remove(device.as_str());
            }
            DeviceEvent::Ost {
                device,
                source: OST_EJECT,
                status,
            } if self.pending.contains(device.as_str())
                && *status != OST_SUCCESS
                && *status != OST_EJECT_IN_PROGRESS =>
            {
                return Some(Err(format!(
                    "the guest could not eject {device} (ACPI _OST status {status:#x}; for memory: it could not take the block offline)"
                )));
            }
            _ => {}
        }
        self.pending.is_empty().then_some(Ok(()))
    }
}

impl Hotplug {
    pub fn new(vcpus: VcpuConfig, memory: MemoryConfig) -> Self {
        Self {
            vcpus,
            memory,
            resizing: Mutex::new(()),
            vcpus_now: AtomicU8::new(vcpus.boot),
            memory_now: AtomicU64::new(memory.size_mib),
            ack_timeout: HOTPLUG_ACK_TIMEOUT,
        }
    }

    pub fn vcpus(&self) -> u8 {
        self.vcpus_now.load(Ordering::SeqCst)
    }

    pub fn memory_mib(&self) -> u64 {
        self.memory_now.load(Ordering::SeqCst)
    }

    fn refresh_vcpus(&self, qmp: &Qmp) -> Result<Vec<CpuSlot>, VmError> {
        let slots = cpu_slots(&qmp.execute("query-hotpluggable-cpus")?)?;
        let plugged = slots.iter().filter(|s| s.plugged.is_some()).count();
        self.vcpus_now
            .store(u8::try_from(plugged).unwrap_or(u8::MAX), Ordering::SeqCst);
        Ok(slots)
    }

    fn refresh_memory(&self, qmp: &Qmp) -> Result<Vec<Dimm>, VmError> {
        let dimms = dimms(&qmp.execute("query-memory-devices")?)?;
        let plugged: u64 = dimms.iter().map(|d| d.size_mib).sum();
        self.memory_now
            .store(self.memory.size_mib + plugged, Ordering::SeqCst);
        Ok(dimms)
    }

    /// Wait for the guest's answers about `ids`; `what` names the request.
    fn wait(&self, qmp: &Qmp, ids: &[String], what: &str, insert: bool) -> Result<(), String> {
        let mut answers = Answers::new(ids);
        let deadline = Instant::now() + self.ack_timeout;
        let answer = qmp.wait_device_event(deadline, |e| {
            if insert {
                answers.inserted(e)
            } else {
                answers.removed(e)
            }
        });
        match answer {
            Some(Ok(())) => Ok(()),
            Some(Err(refused)) => Err(format!("{what}: {refused}")),
            None => Err(format!(
                "{what}: the guest did not answer for {} within {:?} (does its kernel have ACPI {} hotplug?)",
                answers.pending.iter().copied().collect::<Vec<_>>().join(", "),
                self.ack_timeout,
                if ids.iter().any(|i| i.starts_with(CPU_ID)) { "CPU" } else { "memory" },
            )),
        }
    }

    /// Ask QEMU to take `ids` back (after an addition failed); the guest
    /// still has to eject them, so this is only a request.
    fn take_back(qmp: &Qmp, ids: &[String]) -> String {
        let mut asked = Vec::new();
        for id in ids {
            if qmp.execute_with("device_del", json!({ "id": id })).is_ok() {
                asked.push(id.as_str());
            }
        }
        if asked.is_empty() {
            String::new()
        } else {
            format!(
                "; asked QEMU to take back {} (done once the guest ejects them)",
                asked.join(", ")
            )
        }
    }

    /// Bring the VM to `target` vCPUs (see the module doc).
    pub fn resize_vcpus(&self, qmp: &Qmp, target: u8) -> Result<u8, VmError> {
        let _one_at_a_time = self
            .resizing
            .lock()
            .map_err(|_| qemu("resize lock poisoned"))?;
        check_vcpu_target(self.vcpus, target)?;
        let slots = self.refresh_vcpus(qmp)?;
        let current = self.vcpus();
        let result = if target > current {
            self.add_vcpus(qmp, &slots, usize::from(target - current))
        } else if target < current {
            self.remove_vcpus(qmp, &slots, usize::from(current - target))
        } else {
            Ok(())
        };
        let refreshed = self.refresh_vcpus(qmp);
        result?;
        refreshed?;
        Ok(self.vcpus())
    }

    fn add_vcpus(&self, qmp: &Qmp, slots: &[CpuSlot], count: usize) -> Result<(), VmError> {
        let used: BTreeSet<u32> = slots
            .iter()
            .filter_map(|s| s.plugged.clone().flatten())
            .filter_map(|id| our_number(&id, CPU_ID))
            .collect();
        let mut free: Vec<&CpuSlot> = slots.iter().filter(|s| s.plugged.is_none()).collect();
        free.sort_by_key(|s| slot_order(s));
        if free.len() < count {
            return Err(qemu(format!(
                "QEMU has {} free vCPU slots, {count} needed",
                free.len()
            )));
        }
        qmp.clear_device_events();
        let mut added = Vec::new();
        for (slot, n) in free.iter().zip(free_numbers(&used, count)) {
            let id = format!("{CPU_ID}{n}");
            let mut args = slot.props.clone();
            args.insert("driver".into(), json!(slot.driver));
            args.insert("id".into(), json!(id));
            if let Err(e) = qmp.execute_with("device_add", Value::Object(args)) {
                let back = Self::take_back(qmp, &added);
                return Err(qemu(format!("adding vCPU {id}: {e}{back}")));
            }
            added.push(id);
        }
        let what = format!("adding {count} vCPUs");
        self.wait(qmp, &added, &what, true).map_err(|e| {
            let back = Self::take_back(qmp, &added);
            qemu(format!("{e}{back}"))
        })?;
        tracing::info!(count, "vCPUs added; the guest acknowledged");
        Ok(())
    }

    fn remove_vcpus(&self, qmp: &Qmp, slots: &[CpuSlot], count: usize) -> Result<(), VmError> {
        let mut ours: Vec<(u32, String)> = slots
            .iter()
            .filter_map(|s| s.plugged.clone().flatten())
            .filter_map(|id| our_number(&id, CPU_ID).map(|n| (n, id)))
            .collect();
        if ours.len() < count {
            return Err(VmError::Unsupported(format!(
                "the QEMU backend removes only vCPUs it hot-added ({} now); the {} boot vCPUs stay: ask for {} or more",
                ours.len(),
                self.vcpus.boot,
                self.vcpus.boot
            )));
        }
        ours.sort();
        // Newest first, one at a time (as the guest ejects them).
        for (_, id) in ours.iter().rev().take(count) {
            qmp.clear_device_events();
            qmp.execute_with("device_del", json!({ "id": id }))?;
            let ids = [id.clone()];
            self.wait(qmp, &ids, &format!("removing vCPU {id}"), false)
                .map_err(|e| qemu(format!("{e}; the vCPU stays")))?;
        }
        tracing::info!(count, "vCPUs removed; the guest ejected them");
        Ok(())
    }

    /// Bring guest RAM to `total_mib` (see the module doc).
    pub fn resize_memory(&self, qmp: &Qmp, total_mib: u64) -> Result<u64, VmError> {
        let _one_at_a_time = self
            .resizing
            .lock()
            .map_err(|_| qemu("resize lock poisoned"))?;
        let want = memory_blocks_for(self.memory, total_mib)?;
        let dimms = self.refresh_memory(qmp)?;
        let mut ours: Vec<(u32, String)> = dimms
            .iter()
            .filter_map(|d| d.id.clone())
            .filter_map(|id| our_number(&id, DIMM_ID).map(|n| (n, id)))
            .collect();
        ours.sort();
        let result = if want > ours.len() {
            self.add_blocks(qmp, &ours, want - ours.len())
        } else if want < ours.len() {
            self.remove_blocks(qmp, &ours[want..])
        } else {
            Ok(())
        };
        let refreshed = self.refresh_memory(qmp);
        result?;
        refreshed?;
        Ok(self.memory_mib())
    }

    fn add_blocks(&self, qmp: &Qmp, ours: &[(u32, String)], count: usize) -> Result<(), VmError> {
        let used: BTreeSet<u32> = ours.iter().map(|(n, _)| *n).collect();
        qmp.clear_device_events();
        let mut added = Vec::new();
        for n in free_numbers(&used, count) {
            let (dimm, ram) = (format!("{DIMM_ID}{n}"), format!("{RAM_ID}{n}"));
            let plugged = qmp
                .execute_with(
                    "object-add",
                    json!({
                        "qom-type": "memory-backend-memfd",
                        "id": ram,
                        "size": HOTPLUG_BLOCK_MIB << 20,
                        "share": true,
                    }),
                )
                .and_then(|_| {
                    qmp.execute_with(
                        "device_add",
                        json!({ "driver": "pc-dimm", "id": dimm, "memdev": ram }),
                    )
                    .inspect_err(|_| {
                        let _ = qmp.execute_with("object-del", json!({ "id": ram }));
                    })
                });
            if let Err(e) = plugged {
                let back = Self::take_back(qmp, &added);
                return Err(qemu(format!("adding memory block {dimm}: {e}{back}")));
            }
            added.push(dimm);
        }
        let what = format!("adding {} MiB", count as u64 * HOTPLUG_BLOCK_MIB);
        self.wait(qmp, &added, &what, true).map_err(|e| {
            let back = Self::take_back(qmp, &added);
            qemu(format!("{e}{back}"))
        })?;
        tracing::info!(blocks = count, "memory added; the guest acknowledged");
        Ok(())
    }

    fn remove_blocks(&self, qmp: &Qmp, going: &[(u32, String)]) -> Result<(), VmError> {
        // Newest first, one at a time: a block the guest cannot offline
        // stops the removal there, with what was removed before it gone.
        for (n, dimm) in going.iter().rev() {
            qmp.clear_device_events();
            qmp.execute_with("device_del", json!({ "id": dimm }))?;
            let ids = [dimm.clone()];
            self.wait(qmp, &ids, &format!("removing memory block {dimm}"), false)
                .map_err(|e| {
                    qemu(format!(
                        "{e}; the block stays ({} MiB plugged now)",
                        self.refresh_memory(qmp)
                            .map(|_| self.memory_mib())
                            .unwrap_or(0)
                    ))
                })?;
            qmp.execute_with("object-del", json!({ "id": format!("{RAM_ID}{n}") }))?;
        }
        tracing::info!(blocks = going.len(), "memory removed; the guest ejected it");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::Arc;

    /// How the fake QEMU's guest answers additions.
    #[derive(Clone, Copy)]
    enum FakeGuest {
        /// Never (no `_OST`).
        Silent,
        /// `_OST` insertion with this status.
        Answers(u64),
    }

    /// A fake QEMU on a QMP socket: one boot vCPU and one free slot, no
    /// DIMMs; `device_add` plugs (and the guest answers as `guest` says),
    /// `device_del` is only recorded (the guest never ejects). Returns the
    /// client and the commands QEMU received (with their arguments).
    fn fake_qemu(dir: &std::path::Path, guest: FakeGuest) -> (Qmp, Arc<Mutex<Vec<Value>>>) {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            writeln!(s, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).expect("greet");
            let mut plugged: Vec<String> = Vec::new();
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let cmd: Value = serde_json::from_str(line.trim()).expect("QMP command");
                line.clear();
                beacon_common::lock(&log).push(cmd.clone());
                let args = cmd.get("arguments").cloned().unwrap_or(json!({}));
                let reply = match cmd["execute"].as_str().unwrap_or_default() {
                    "query-hotpluggable-cpus" => {
                        let mut slots = vec![json!({"type": "host-x86_64-cpu",
                            "props": {"socket-id": 0, "core-id": 0, "thread-id": 0},
                            "qom-path": "/machine/unattached/device[0]"})];
                        let mut free = json!({"type": "host-x86_64-cpu",
                            "props": {"socket-id": 1, "core-id": 0, "thread-id": 0}});
                        if let Some(id) = plugged.iter().find(|i| i.starts_with(CPU_ID)) {
                            free["qom-path"] = json!(format!("/machine/peripheral/{id}"));
                        }
                        slots.push(free);
                        json!(slots)
                    }
                    "query-memory-devices" => json!(plugged
                        .iter()
                        .filter(|i| i.starts_with(DIMM_ID))
                        .map(|i| json!({"type": "dimm", "data": {"id": i, "size": 134217728u64}}))
                        .collect::<Vec<_>>()),
                    "device_add" => {
                        let id = args["id"].as_str().unwrap_or_default().to_string();
                        plugged.push(id.clone());
                        if let FakeGuest::Answers(status) = guest {
                            writeln!(
                                s,
                                "{}",
                                json!({"event": "ACPI_DEVICE_OST", "data": {"info":
                                {"device": id, "source": OST_INSERT, "status": status}}})
                            )
                            .expect("ost");
                        }
                        json!({})
                    }
                    _ => json!({}),
                };
                writeln!(s, "{}", json!({ "return": reply })).expect("reply");
            }
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).expect("connect");
        (qmp, seen)
    }

    /// The commands named `execute` and their `id` arguments.
    fn ids_of(seen: &Mutex<Vec<Value>>, execute: &str) -> Vec<String> {
        beacon_common::lock(seen)
            .iter()
            .filter(|c| c["execute"] == execute)
            .filter_map(|c| c["arguments"]["id"].as_str().map(str::to_string))
            .collect()
    }

    fn hotplug() -> Hotplug {
        let mut h = Hotplug::new(
            VcpuConfig { boot: 1, max: 2 },
            MemoryConfig {
                size_mib: 512,
                hotplug_mib: 256,
                ..Default::default()
            },
        );
        h.ack_timeout = Duration::from_millis(300);
        h
    }

    /// A guest that never answers: the request fails after the timeout,
    /// says what is left, and asks QEMU to take the devices back.
    #[test]
    fn a_guest_that_never_answers_is_reported_and_asked_to_eject() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (qmp, seen) = fake_qemu(dir.path(), FakeGuest::Silent);
        let h = hotplug();
        let err = h.resize_vcpus(&qmp, 2).expect_err("no answer").to_string();
        assert!(err.contains("did not answer for beacon-cpu0"), "{err}");
        assert!(err.contains("asked QEMU to take back beacon-cpu0"), "{err}");
        assert_eq!(ids_of(&seen, "device_del"), ["beacon-cpu0"]);
        // The figure is what QEMU holds: plugged until the guest ejects it.
        assert_eq!(h.vcpus(), 2);

        let err = h
            .resize_memory(&qmp, 768)
            .expect_err("no answer")
            .to_string();
        assert!(
            err.contains("did not answer for beacon-dimm0, beacon-dimm1"),
            "{err}"
        );
        assert!(
            err.contains("(does its kernel have ACPI memory hotplug?)"),
            "{err}"
        );
        assert_eq!(
            ids_of(&seen, "device_del"),
            ["beacon-cpu0", "beacon-dimm0", "beacon-dimm1"]
        );
        assert_eq!(ids_of(&seen, "object-add"), ["beacon-ram0", "beacon-ram1"]);
    }

    /// A guest that refuses an addition (an `_OST` failure): reported at once.
    #[test]
    fn a_refused_addition_is_reported_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (qmp, seen) = fake_qemu(dir.path(), FakeGuest::Answers(1));
        let mut h = hotplug();
        h.ack_timeout = Duration::from_secs(60);
        let start = Instant::now();
        let err = h.resize_vcpus(&qmp, 2).expect_err("refused").to_string();
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "waited for the timeout"
        );
        assert!(
            err.contains("the guest refused beacon-cpu0 (ACPI _OST status 0x1)"),
            "{err}"
        );
        assert_eq!(ids_of(&seen, "device_del"), ["beacon-cpu0"]);
    }

    /// A guest that acknowledges: the new figures, nothing taken back.
    #[test]
    fn an_acknowledged_addition_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (qmp, seen) = fake_qemu(dir.path(), FakeGuest::Answers(0));
        let h = hotplug();
        assert_eq!(h.resize_vcpus(&qmp, 2).expect("added"), 2);
        assert_eq!(h.resize_memory(&qmp, 768).expect("added"), 768);
        assert!(ids_of(&seen, "device_del").is_empty());
        // Out of range: refused before QEMU is asked for anything.
        let before = beacon_common::lock(&seen).len();
        assert!(h.resize_vcpus(&qmp, 3).is_err());
        assert!(h.resize_memory(&qmp, 700).is_err());
        assert_eq!(beacon_common::lock(&seen).len(), before);
    }

    #[test]
    fn cpu_slots_are_read_from_qemus_reply() {
        let reply = json!([
            {"type": "host-x86_64-cpu", "vcpus-count": 1,
             "props": {"socket-id": 2, "core-id": 0, "thread-id": 0}},
            {"type": "host-x86_64-cpu", "vcpus-count": 1,
             "props": {"socket-id": 1, "core-id": 0, "thread-id": 0},
             "qom-path": "/machine/peripheral/beacon-cpu0"},
            {"type": "host-x86_64-cpu", "vcpus-count": 1,
             "props": {"socket-id": 0, "core-id": 0, "thread-id": 0},
             "qom-path": "/machine/unattached/device[0]"}
        ]);
        let slots = cpu_slots(&reply).expect("parsed");
        assert_eq!(slots.len(), 3);
        assert_eq!(slots[0].plugged, None);
        assert_eq!(slots[1].plugged, Some(Some("beacon-cpu0".into())));
        assert_eq!(slots[2].plugged, Some(None), "a boot vCPU is not ours");
        assert_eq!(slot_order(&slots[0]), [2, 0, 0, 0]);
        for bad in [json!({}), json!([{"props": {}}]), json!([{"type": "x"}])] {
            assert!(cpu_slots(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dimms_are_read_from_qemus_reply() {
        let reply = json!([
            {"type": "dimm", "data": {"id": "beacon-dimm1", "size": 134217728u64, "addr": 0}},
            {"type": "dimm", "data": {"size": 268435456u64}},
            {"type": "virtio-mem", "data": {"id": "vm0", "size": 1}},
            {"type": "dimm", "data": {"id": "broken"}}
        ]);
        assert_eq!(
            dimms(&reply).expect("parsed"),
            [
                Dimm {
                    id: Some("beacon-dimm1".into()),
                    size_mib: 128
                },
                Dimm {
                    id: None,
                    size_mib: 256
                }
            ]
        );
        assert!(dimms(&json!("no")).is_err());
    }

    #[test]
    fn ids_are_ours_only_and_numbers_are_reused() {
        assert_eq!(our_number("beacon-cpu12", CPU_ID), Some(12));
        assert_eq!(our_number("beacon-cpu", CPU_ID), None);
        assert_eq!(our_number("cpu1", CPU_ID), None);
        let used: BTreeSet<u32> = [0, 2].into_iter().collect();
        assert_eq!(free_numbers(&used, 3), [1, 3, 4]);
    }

    #[test]
    fn answers_count_acknowledgements_refusals_and_ejections() {
        let ost = |device: &str, source, status| DeviceEvent::Ost {
            device: device.into(),
            source,
            status,
        };
        let ids = ["a".to_string(), "b".to_string()];
        let mut a = Answers::new(&ids);
        assert_eq!(a.inserted(&ost("other", OST_INSERT, 1)), None);
        assert_eq!(a.inserted(&ost("a", OST_INSERT, 0)), None);
        assert_eq!(
            a.inserted(&ost("b", OST_EJECT, 0)),
            None,
            "not an insertion"
        );
        assert_eq!(a.inserted(&ost("b", OST_INSERT, 0)), Some(Ok(())));
        let mut a = Answers::new(&ids);
        assert!(matches!(a.inserted(&ost("b", OST_INSERT, 1)), Some(Err(_))));

        let one = ["d".to_string()];
        let mut r = Answers::new(&one);
        assert_eq!(r.removed(&ost("d", OST_EJECT, OST_EJECT_IN_PROGRESS)), None);
        assert_eq!(
            r.removed(&DeviceEvent::Deleted {
                device: "other".into()
            }),
            None
        );
        assert_eq!(
            r.removed(&DeviceEvent::Deleted { device: "d".into() }),
            Some(Ok(()))
        );
        let mut r = Answers::new(&one);
        let refused = r.removed(&ost("d", OST_EJECT, 0x81));
        assert!(
            matches!(&refused, Some(Err(e)) if e.contains("offline")),
            "{refused:?}"
        );
    }
}
