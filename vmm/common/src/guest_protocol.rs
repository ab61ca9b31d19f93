//! The wire protocol between the host (the shim) and vminitd in the guest,
//! beyond the Task API itself: the vsock ports, the stream port's handshake
//! line, and the JSON event lines. Both sides use these definitions, so they
//! cannot drift apart.
//!
//! Everything here parses input from the other side, which is not trusted:
//! lines are length-capped and every field is checked.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use crate::id::valid_id;

/// vsock port of the ttrpc Task API in the guest.
pub const TASK_PORT: u32 = 1024;
/// vsock port of the stdio and event streams in the guest.
pub const STREAM_PORT: u32 = 1025;
/// vsock port on the *host* (CID 2) that vminitd connects to once its Task API
/// listens, so the shim dials at once instead of polling a booting guest
/// (every refused attempt interrupts it). A hint only: the shim still polls,
/// slowly, when no signal comes, and a false one costs a refused attempt.
/// Only the hybrid backend carries it (to `<uds>_<READY_PORT>`).
pub const READY_PORT: u32 = 1026;
/// Longest handshake line, newline included.
pub const MAX_HANDSHAKE_LINE: usize = 512;
/// Longest event line, newline included.
pub const MAX_EVENT_LINE: usize = 4096;
/// Where vminitd mounts the shares it is told about (`beacon.share=TAG:NAME`
/// puts share NAME at `<GUEST_SHARES_DIR>/NAME`); container bundles live inside.
pub const GUEST_SHARES_DIR: &str = "/run/vminitd/shares";

/// Where the host puts the per-VM vsock secret in the guest's initramfs (a
/// path relative to its root, as cpio members are named). Only with kernel
/// vhost-vsock: there any host process that may open an `AF_VSOCK` socket can
/// reach a guest CID, so vminitd serves a connection only after its first line
/// is [`VsockSecret::auth_line`]. vminitd reads the file at start and removes
/// it; it is never on the kernel command line (`/proc/cmdline` is readable in
/// containers) and never in the shares containers see.
pub const GUEST_SECRET_FILE: &str = "beacon-vsock-secret";
/// Bytes of a [`VsockSecret`].
pub const SECRET_BYTES: usize = 32;
/// Longest authentication line accepted, newline included.
pub const MAX_AUTH_LINE: usize = 5 + 2 * SECRET_BYTES + 1;

/// The per-VM secret of a vhost-vsock link (see [`GUEST_SECRET_FILE`]). Its
/// `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct VsockSecret([u8; SECRET_BYTES]);

impl std::fmt::Debug for VsockSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VsockSecret(..)")
    }
}

impl VsockSecret {
    pub fn from_bytes(bytes: [u8; SECRET_BYTES]) -> Self {
        Self(bytes)
    }

    /// A fresh secret from the kernel's random source.
    pub fn generate() -> std::io::Result<Self> {
        let mut b = [0u8; SECRET_BYTES];
        let mut filled = 0;
        while filled < SECRET_BYTES {
            // SAFETY: writes at most the rest of `b`, which outlives the call.
            let n = unsafe {
                libc::getrandom(b[filled..].as_mut_ptr().cast(), SECRET_BYTES - filled, 0)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            filled += n as usize;
        }
        Ok(Self(b))
    }

    fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The secret file's contents (hex and a newline).
    pub fn to_file(&self) -> Vec<u8> {
        format!("{}\n", self.hex()).into_bytes()
    }

    /// Parse [`VsockSecret::to_file`]'s output.
    pub fn parse_file(text: &[u8]) -> Result<Self, ProtocolError> {
        let text = text.strip_suffix(b"\n").unwrap_or(text);
        if text.len() != 2 * SECRET_BYTES {
            return Err(ProtocolError::Malformed("secret: wrong length"));
        }
        // Hex digits only (`u8::from_str_radix` would also take a sign).
        let digit = |c: u8| {
            (c as char)
                .to_digit(16)
                .ok_or(ProtocolError::Malformed("secret: not hex"))
        };
        let mut b = [0u8; SECRET_BYTES];
        for (out, pair) in b.iter_mut().zip(text.chunks_exact(2)) {
            if let [hi, lo] = *pair {
                *out = (digit(hi)? * 16 + digit(lo)?) as u8;
            }
        }
        Ok(Self(b))
    }

    /// The first line a host connection sends: `AUTH <hex>\n`.
    pub fn auth_line(&self) -> String {
        format!("AUTH {}\n", self.hex())
    }

    /// Whether `line` (newline stripped or not) is this secret's auth line;
    /// compared in constant time.
    pub fn accepts(&self, line: &[u8]) -> bool {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let want = self.auth_line();
        let want = want
            .as_bytes()
            .strip_suffix(b"\n")
            .unwrap_or(want.as_bytes());
        if line.len() != want.len() {
            return false;
        }
        line.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// Topic of an exit event (containerd's name).
pub const TOPIC_EXIT: &str = "/tasks/exit";
/// Topic of an OOM event (containerd's name).
pub const TOPIC_OOM: &str = "/tasks/oom";

/// Which of a process's streams a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StdioStream {
    Stdin,
    Stdout,
    Stderr,
}

impl StdioStream {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdin => "stdin",
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// The first line of a connection to [`STREAM_PORT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamRequest {
    /// `STDIO <container-id> <exec-id or -> <stdin|stdout|stderr>`
    Stdio {
        container: String,
        /// None for the container's init process.
        exec: Option<String>,
        stream: StdioStream,
    },
    /// `EVENTS`
    Events,
    /// `FORWARD <port>`: connect TCP port `port` of the guest's loopback
    /// (127.0.0.1, else ::1) and carry bytes both ways from the `OK` on. The
    /// host serves CRI PortForward with it (containerd dials `localhost:PORT`
    /// in the pod's network namespace, which means the guest's).
    Forward { port: u16 },
}

/// Why a line from the other side was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("line is longer than {0} bytes")]
    TooLong(usize),
    #[error("malformed line: {0}")]
    Malformed(&'static str),
    #[error("invalid id {0:?}: {rule}", rule = crate::id::ID_RULE)]
    BadId(String),
    #[error("malformed event: {0}")]
    BadEvent(String),
}

fn check_id(id: &str) -> Result<String, ProtocolError> {
    if valid_id(id) {
        Ok(id.to_string())
    } else {
        Err(ProtocolError::BadId(id.chars().take(80).collect()))
    }
}

impl StreamRequest {
    /// The request as its line, newline included.
    pub fn to_line(&self) -> String {
        match self {
            Self::Stdio {
                container,
                exec,
                stream,
            } => format!(
                "STDIO {container} {} {}\n",
                exec.as_deref().unwrap_or("-"),
                stream.as_str()
            ),
            Self::Events => "EVENTS\n".to_string(),
            Self::Forward { port } => format!("FORWARD {port}\n"),
        }
    }

    /// Parse one line (with or without its newline).
    pub fn parse(line: &str) -> Result<Self, ProtocolError> {
        if line.len() > MAX_HANDSHAKE_LINE {
            return Err(ProtocolError::TooLong(MAX_HANDSHAKE_LINE));
        }
        let line = line.strip_suffix('\n').unwrap_or(line);
        let mut words = line.split(' ');
        match words.next() {
            Some("EVENTS") if words.next().is_none() => Ok(Self::Events),
            Some("STDIO") => {
                let (Some(c), Some(e), Some(s), None) =
                    (words.next(), words.next(), words.next(), words.next())
                else {
                    return Err(ProtocolError::Malformed("STDIO takes three words"));
                };
                let stream = match s {
                    "stdin" => StdioStream::Stdin,
                    "stdout" => StdioStream::Stdout,
                    "stderr" => StdioStream::Stderr,
                    _ => return Err(ProtocolError::Malformed("unknown stream")),
                };
                Ok(Self::Stdio {
                    container: check_id(c)?,
                    exec: if e == "-" { None } else { Some(check_id(e)?) },
                    stream,
                })
            }
            Some("FORWARD") => {
                let (Some(text), None) = (words.next(), words.next()) else {
                    return Err(ProtocolError::Malformed("FORWARD takes one port"));
                };
                // Digits only: `u16::from_str` would also take a `+`.
                match text.parse::<u16>() {
                    Ok(port) if port != 0 && text.bytes().all(|b| b.is_ascii_digit()) => {
                        Ok(Self::Forward { port })
                    }
                    _ => Err(ProtocolError::Malformed("FORWARD port must be 1 to 65535")),
                }
            }
            _ => Err(ProtocolError::Malformed(
                "expected STDIO, EVENTS or FORWARD",
            )),
        }
    }
}

/// A point in time as containerd's protobuf Timestamp carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireTime {
    pub seconds: u64,
    pub nanos: u32,
}

impl From<SystemTime> for WireTime {
    fn from(t: SystemTime) -> Self {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        Self {
            seconds: d.as_secs(),
            nanos: d.subsec_nanos(),
        }
    }
}

impl WireTime {
    /// The time it names, or `None` when that does not fit a `SystemTime`
    /// (a guest can send any number: `UNIX_EPOCH + u64::MAX s` would panic).
    pub fn to_system_time(self) -> Option<SystemTime> {
        UNIX_EPOCH.checked_add(Duration::new(self.seconds, self.nanos.min(999_999_999)))
    }
}

/// Something vminitd tells the host, one JSON object per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "topic")]
pub enum GuestEvent {
    /// A container's init or exec process ended.
    #[serde(rename = "/tasks/exit")]
    Exit {
        container_id: String,
        /// The exec id, or the container id for the init process.
        id: String,
        pid: u32,
        /// Exit code, or 128+N for death by signal N.
        exit_status: u32,
        exited_at: WireTime,
    },
    /// The container's cgroup saw an OOM kill.
    #[serde(rename = "/tasks/oom")]
    Oom { container_id: String },
}

impl GuestEvent {
    /// The event as one JSON line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        // Serialising plain strings and numbers cannot fail.
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Parse and check one line from the guest.
    pub fn parse(line: &[u8]) -> Result<Self, ProtocolError> {
        if line.len() > MAX_EVENT_LINE {
            return Err(ProtocolError::TooLong(MAX_EVENT_LINE));
        }
        let event: Self = serde_json::from_slice(line)
            .map_err(|e| ProtocolError::BadEvent(e.to_string().chars().take(200).collect()))?;
        match &event {
            Self::Exit {
                container_id,
                id,
                exited_at,
                ..
            } => {
                check_id(container_id)?;
                check_id(id)?;
                if exited_at.to_system_time().is_none() {
                    return Err(ProtocolError::BadEvent(format!(
                        "exit time {} s after the epoch is out of range",
                        exited_at.seconds
                    )));
                }
            }
            Self::Oom { container_id } => {
                check_id(container_id)?;
            }
        }
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_requests_round_trip_and_refuse_garbage() {
        let reqs = [
            StreamRequest::Events,
            StreamRequest::Stdio {
                container: "c1".into(),
                exec: None,
                stream: StdioStream::Stdout,
            },
            StreamRequest::Stdio {
                container: "c1".into(),
                exec: Some("e1".into()),
                stream: StdioStream::Stdin,
            },
            StreamRequest::Forward { port: 1 },
            StreamRequest::Forward { port: 65535 },
        ];
        for r in reqs {
            assert_eq!(StreamRequest::parse(&r.to_line()), Ok(r.clone()));
        }
        for bad in [
            "",
            "EVENTS x",
            "STDIO c1 - stdout extra",
            "STDIO c1 -",
            "STDIO -c - stdout",
            "STDIO c1 - stdwhat",
            "HELLO",
            "FORWARD",
            "FORWARD 0",
            "FORWARD 65536",
            "FORWARD +80",
            "FORWARD 80 81",
            "FORWARD http",
        ] {
            assert!(StreamRequest::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            StreamRequest::parse(&"E".repeat(600)),
            Err(ProtocolError::TooLong(MAX_HANDSHAKE_LINE))
        );
    }

    #[test]
    fn events_round_trip_in_vminitds_format() {
        let e = GuestEvent::Exit {
            container_id: "c1".into(),
            id: "c1".into(),
            pid: 42,
            exit_status: 137,
            exited_at: WireTime {
                seconds: 1_795_986_584,
                nanos: 544_194_308,
            },
        };
        let line = e.to_line();
        let text = String::from_utf8(line.clone()).expect("utf8");
        assert!(text.contains(r#""topic":"/tasks/exit""#), "{text}");
        assert_eq!(GuestEvent::parse(line.trim_ascii_end()), Ok(e));
        let oom = br#"{"topic":"/tasks/oom","container_id":"c1"}"#;
        assert_eq!(
            GuestEvent::parse(oom),
            Ok(GuestEvent::Oom {
                container_id: "c1".into()
            })
        );
        for bad in [
            &br#"{"topic":"/tasks/exit"}"#[..],
            br#"{"topic":"/tasks/oom","container_id":"-x"}"#,
            br#"{"topic":"/tasks/delete","container_id":"c1"}"#,
            b"not json",
            // A time no SystemTime holds (adding it to the epoch panicked,
            // which took the whole shim down: panic = "abort").
            br#"{"topic":"/tasks/exit","container_id":"c1","id":"c1","pid":1,"exit_status":0,"exited_at":{"seconds":18446744073709551615,"nanos":0}}"#,
        ] {
            assert!(GuestEvent::parse(bad).is_err());
        }
        assert!(GuestEvent::parse(&vec![b' '; MAX_EVENT_LINE + 1]).is_err());
    }

    #[test]
    fn vsock_secrets_round_trip_and_only_the_right_line_passes() {
        let a = VsockSecret::generate().expect("random");
        let b = VsockSecret::generate().expect("random");
        assert_ne!(a, b);
        assert_eq!(VsockSecret::parse_file(&a.to_file()).expect("parse"), a);
        assert!(a.accepts(a.auth_line().as_bytes()));
        assert!(!a.accepts(b.auth_line().as_bytes()));
        assert!(!a.accepts(b"AUTH "));
        assert!(!a.accepts(b""));
        assert!(a.auth_line().len() <= MAX_AUTH_LINE);
        assert!(!format!("{a:?}").contains(&a.hex()));
        assert!(VsockSecret::parse_file(b"zz").is_err());
        assert!(VsockSecret::parse_file(&[b'g'; 64]).is_err());
        assert!(VsockSecret::parse_file(&b"+f".repeat(SECRET_BYTES)).is_err());
    }
}
