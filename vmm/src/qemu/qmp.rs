//! A minimal QMP client: greeting, `qmp_capabilities`, commands, and events.
//!
//! One reader thread owns the read side: replies go to whoever sent the command
//! (one command at a time, serialised by a mutex), events are recorded for the
//! backend (`RESUME` marks the guest running, `SHUTDOWN` says why QEMU will exit),
//! and the guest's answers to hotplug requests (`ACPI_DEVICE_OST`,
//! `DEVICE_DELETED`) are queued, at most [`MAX_DEVICE_EVENTS`] of them (the
//! guest causes them, so the oldest go first), for the one resize that waits.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::backend::VmError;

/// Events the backend cares about.
#[derive(Debug, Default)]
pub struct QmpEvents {
    /// When QEMU first reported the guest running.
    pub resumed_at: Option<Instant>,
    /// The `reason` of the SHUTDOWN event (`guest-shutdown`, `guest-reset`, ...).
    pub shutdown_reason: Option<String>,
    /// The guest panicked (GUEST_PANICKED event).
    pub panicked: bool,
}

/// The guest's answer about one device, as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// `ACPI_DEVICE_OST`: the guest ran the device's `_OST` method. `source`
    /// is the ACPI event it answers (1 an insertion, 3 an eject request),
    /// `status` its result (0 success, 0x84 an ejection in progress).
    Ost {
        device: String,
        source: u64,
        status: u64,
    },
    /// `DEVICE_DELETED`: QEMU removed the device (the guest ejected it).
    Deleted { device: String },
}

/// Most device events kept while nobody waits for them.
pub const MAX_DEVICE_EVENTS: usize = 256;

#[derive(Default)]
struct DeviceEvents {
    queue: Mutex<(VecDeque<DeviceEvent>, bool)>,
    arrived: Condvar,
}

pub struct Qmp {
    writer: Mutex<(UnixStream, Receiver<Value>)>,
    pub events: Arc<Mutex<QmpEvents>>,
    devices: Arc<DeviceEvents>,
}

const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

impl Qmp {
    /// [`Self::connect_while`] with a QEMU assumed alive (tests).
    #[cfg(test)]
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, VmError> {
        Self::connect_while(path, timeout, || true)
    }

    /// Connect to QEMU's QMP socket, retrying until it exists, `timeout` passes
    /// or `alive` says QEMU is gone, and leave capabilities negotiation done.
    pub fn connect_while(
        path: &Path,
        timeout: Duration,
        alive: impl Fn() -> bool,
    ) -> Result<Self, VmError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if !alive() => {
                    return Err(VmError::Qemu(format!(
                        "QEMU exited before its QMP socket {path:?} came up: {e}"
                    )))
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(VmError::Qemu(format!(
                        "QMP socket {path:?} did not come up within {timeout:?}: {e}"
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        let read_half = stream
            .try_clone()
            .map_err(VmError::io("cloning the QMP socket"))?;
        let (tx, rx) = mpsc::channel();
        let events = Arc::new(Mutex::new(QmpEvents::default()));
        let ev = Arc::clone(&events);
        let devices = Arc::new(DeviceEvents::default());
        let dev = Arc::clone(&devices);
        std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || {
                let reader = BufReader::new(read_half);
                for line in reader.lines() {
                    let Ok(line) = line else { break };
                    let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                        tracing::warn!(%line, "unparsable QMP message");
                        continue;
                    };
                    if let Some(name) = msg.get("event").and_then(Value::as_str) {
                        record_event(&ev, name, &msg);
                        if let Some(d) = device_event(name, &msg) {
                            dev.push(d);
                        }
                    } else if tx.send(msg).is_err() {
                        break;
                    }
                }
                dev.close();
            })
            .map_err(VmError::io("starting the QMP reader thread"))?;
        let qmp = Self {
            writer: Mutex::new((stream, rx)),
            events,
            devices,
        };
        // The greeting arrives as the first non-event message. QEMU answers
        // it, and the negotiation, only once its machine is set up: under
        // emulation and load that took longer than REPLY_TIMEOUT (seen in
        // `make test`), so the start-up budget applies here.
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .max(REPLY_TIMEOUT);
        qmp.receive(budget)?;
        qmp.execute_within("qmp_capabilities", budget)?;
        Ok(qmp)
    }

    fn receive(&self, timeout: Duration) -> Result<Value, VmError> {
        let guard = self
            .writer
            .lock()
            .map_err(|_| VmError::Qemu("QMP lock poisoned".into()))?;
        guard
            .1
            .recv_timeout(timeout)
            .map_err(|_| VmError::Qemu("QEMU closed QMP or did not answer".into()))
    }

    /// Run one command and return its `return` value.
    pub fn execute(&self, command: &str) -> Result<Value, VmError> {
        self.execute_within(command, REPLY_TIMEOUT)
    }

    /// Run one command with `arguments` (a JSON object) and return its
    /// `return` value.
    pub fn execute_with(&self, command: &str, arguments: Value) -> Result<Value, VmError> {
        self.send(
            command,
            serde_json::json!({ "execute": command, "arguments": arguments }),
            REPLY_TIMEOUT,
        )
    }

    fn execute_within(&self, command: &str, timeout: Duration) -> Result<Value, VmError> {
        self.send(command, serde_json::json!({ "execute": command }), timeout)
    }

    /// Forget the device events queued so far (before a request whose
    /// answers are then waited for).
    pub fn clear_device_events(&self) {
        if let Ok(mut q) = self.devices.queue.lock() {
            q.0.clear();
        }
    }

    /// Hand each device event to `f`, as they arrive, until it returns
    /// `Some`, `deadline` passes (`None`) or QEMU closes QMP (`None`).
    pub fn wait_device_event<T>(
        &self,
        deadline: Instant,
        mut f: impl FnMut(&DeviceEvent) -> Option<T>,
    ) -> Option<T> {
        let mut guard = self.devices.queue.lock().ok()?;
        loop {
            while let Some(event) = guard.0.pop_front() {
                if let Some(done) = f(&event) {
                    return Some(done);
                }
            }
            let now = Instant::now();
            if guard.1 || now >= deadline {
                return None;
            }
            guard = self
                .devices
                .arrived
                .wait_timeout(guard, deadline - now)
                .ok()?
                .0;
        }
    }

    fn send(&self, command: &str, request: Value, timeout: Duration) -> Result<Value, VmError> {
        let mut guard = self
            .writer
            .lock()
            .map_err(|_| VmError::Qemu("QMP lock poisoned".into()))?;
        let (stream, rx) = &mut *guard;
        writeln!(stream, "{request}").map_err(VmError::io(format!("sending QMP {command}")))?;
        let reply = rx
            .recv_timeout(timeout)
            .map_err(|_| VmError::Qemu(format!("no QMP reply to {command} within {timeout:?}")))?;
        if let Some(err) = reply.get("error") {
            return Err(VmError::Qemu(format!("QMP {command} failed: {err}")));
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }
}

impl DeviceEvents {
    fn push(&self, event: DeviceEvent) {
        let Ok(mut q) = self.queue.lock() else { return };
        if q.0.len() >= MAX_DEVICE_EVENTS {
            q.0.pop_front();
        }
        q.0.push_back(event);
        self.arrived.notify_all();
    }

    fn close(&self) {
        if let Ok(mut q) = self.queue.lock() {
            q.1 = true;
        }
        self.arrived.notify_all();
    }
}

/// The device event in a QMP event message, if it is one (and well formed).
fn device_event(name: &str, msg: &Value) -> Option<DeviceEvent> {
    match name {
        "ACPI_DEVICE_OST" => {
            let info = msg.pointer("/data/info")?;
            Some(DeviceEvent::Ost {
                device: info.get("device")?.as_str()?.to_string(),
                source: info.get("source")?.as_u64()?,
                status: info.get("status")?.as_u64()?,
            })
        }
        "DEVICE_DELETED" => Some(DeviceEvent::Deleted {
            device: msg.pointer("/data/device")?.as_str()?.to_string(),
        }),
        _ => None,
    }
}

fn record_event(events: &Mutex<QmpEvents>, name: &str, msg: &Value) {
    let Ok(mut e) = events.lock() else { return };
    match name {
        "RESUME" => {
            e.resumed_at.get_or_insert_with(Instant::now);
        }
        "SHUTDOWN" => {
            let reason = msg
                .pointer("/data/reason")
                .and_then(Value::as_str)
                .unwrap_or("unknown");
            e.shutdown_reason.get_or_insert_with(|| reason.to_string());
        }
        "GUEST_PANICKED" => e.panicked = true,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU: greeting, capabilities, an event interleaved before a reply.
    #[test]
    fn talks_to_a_fake_qemu() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut line = String::new();
            writeln!(s, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).expect("greet");
            r.read_line(&mut line).expect("caps");
            assert!(line.contains("qmp_capabilities"));
            writeln!(s, r#"{{"return": {{}}}}"#).expect("caps reply");
            line.clear();
            r.read_line(&mut line).expect("cont");
            assert!(line.contains("\"cont\""));
            writeln!(s, r#"{{"event": "RESUME", "data": {{}}}}"#).expect("event");
            writeln!(s, r#"{{"return": {{}}}}"#).expect("cont reply");
            line.clear();
            r.read_line(&mut line).expect("bogus");
            writeln!(
                s,
                r#"{{"error": {{"class": "CommandNotFound", "desc": "no"}}}}"#
            )
            .expect("error reply");
            writeln!(
                s,
                r#"{{"event": "SHUTDOWN", "data": {{"guest": true, "reason": "guest-reset"}}}}"#
            )
            .expect("shutdown");
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).expect("connect");
        qmp.execute("cont").expect("cont");
        assert!(qmp.events.lock().expect("lock").resumed_at.is_some());
        let err = qmp.execute("bogus").expect_err("error reply");
        assert!(err.to_string().contains("CommandNotFound"));
        server.join().expect("server");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            qmp.events.lock().expect("lock").shutdown_reason.as_deref(),
            Some("guest-reset")
        );
    }

    /// The guest's hotplug answers are queued (bounded), handed to a waiter
    /// in order, malformed ones dropped; a closed QMP ends the wait.
    #[test]
    fn device_events_are_queued_bounded_and_waited_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let (go, gone) = mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut line = String::new();
            writeln!(s, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).expect("greet");
            r.read_line(&mut line).expect("caps");
            writeln!(s, r#"{{"return": {{}}}}"#).expect("caps reply");
            line.clear();
            r.read_line(&mut line).expect("device_add");
            assert!(
                line.contains(r#""arguments":{"driver":"pc-dimm""#),
                "{line}"
            );
            // A flood before the reply (so all of it is queued before anyone
            // waits): only the newest MAX_DEVICE_EVENTS stay.
            for i in 0..MAX_DEVICE_EVENTS + 10 {
                writeln!(
                    s,
                    r#"{{"event": "DEVICE_DELETED", "data": {{"device": "flood{i}"}}}}"#
                )
                .expect("flood");
            }
            writeln!(
                s,
                r#"{{"event": "ACPI_DEVICE_OST", "data": {{"info": {{"device": 5}}}}}}"#
            )
            .expect("malformed");
            writeln!(s, r#"{{"return": {{}}}}"#).expect("reply");
            writeln!(
                s,
                r#"{{"event": "ACPI_DEVICE_OST", "data": {{"info": {{"device": "dimm0", "slot": "0", "slot-type": "DIMM", "source": 1, "status": 0}}}}}}"#
            )
            .expect("ost");
            gone.recv().expect("test done");
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).expect("connect");
        qmp.execute_with(
            "device_add",
            serde_json::json!({"driver": "pc-dimm", "id": "dimm0"}),
        )
        .expect("device_add");
        let mut seen = Vec::new();
        let ost = qmp.wait_device_event(Instant::now() + Duration::from_secs(5), |e| {
            seen.push(e.clone());
            match e {
                DeviceEvent::Ost { device, .. } if device == "dimm0" => Some(e.clone()),
                _ => None,
            }
        });
        assert_eq!(
            ost,
            Some(DeviceEvent::Ost {
                device: "dimm0".into(),
                source: 1,
                status: 0
            })
        );
        // The oldest ten (or eleven, if the answer came before the wait)
        // were dropped; the malformed event never queued.
        let first = |n: usize| DeviceEvent::Deleted {
            device: format!("flood{n}"),
        };
        match seen.len() {
            n if n == MAX_DEVICE_EVENTS + 1 => assert_eq!(seen[0], first(10)),
            n if n == MAX_DEVICE_EVENTS => assert_eq!(seen[0], first(11)),
            n => panic!("{n} events seen"),
        }
        assert_eq!(seen.last(), ost.as_ref());
        // Nothing more comes: the wait ends at its deadline.
        let start = Instant::now();
        assert_eq!(
            qmp.wait_device_event(start + Duration::from_millis(100), |_| Some(())),
            None
        );
        assert!(start.elapsed() >= Duration::from_millis(100));
        // QEMU goes: a long wait ends at once.
        go.send(()).expect("end server");
        server.join().expect("server");
        let start = Instant::now();
        assert_eq!(
            qmp.wait_device_event(start + Duration::from_secs(600), |_| Some(())),
            None
        );
        assert!(start.elapsed() < Duration::from_secs(60));
    }

    #[test]
    fn missing_socket_times_out_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = match Qmp::connect(&dir.path().join("none"), Duration::from_millis(50)) {
            Err(e) => e,
            Ok(_) => panic!("connected to nothing"),
        };
        assert!(err.to_string().contains("did not come up"));
    }

    #[test]
    fn a_qemu_that_exited_is_not_waited_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = match Qmp::connect_while(
            &dir.path().join("none"),
            Duration::from_secs(600),
            || false,
        ) {
            Err(e) => e,
            Ok(_) => panic!("connected to nothing"),
        };
        // Only the liveness check says "exited"; the deadline is ten minutes away.
        assert!(err.to_string().contains("exited"), "{err}");
    }
}
