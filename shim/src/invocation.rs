//! containerd's shim v2 command line: `BINARY [flags] start|delete` with Go-style
//! single-dash flags (`-namespace ns -id id -address /run/containerd/containerd.sock
//! -publish-binary /usr/bin/containerd [-bundle DIR] [-debug]`), plus the address the
//! shim's ttrpc server listens on, derived the same way for `start` and later calls.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Longest path a unix socket address can carry (`sun_path` minus the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start (or reuse) the shim server and print its address.
    Start,
    /// Clean up after a shim that is gone; print a DeleteResponse.
    Delete,
    /// No action: run as the ttrpc server (containerd starts us this way from `start`).
    Serve,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub namespace: String,
    pub id: String,
    /// containerd's own ttrpc address, for publishing events.
    pub containerd_address: String,
    pub publish_binary: Option<PathBuf>,
    pub bundle: Option<PathBuf>,
    pub debug: bool,
    pub action: Action,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvocationError {
    #[error("flag {0} needs a value")]
    MissingValue(String),
    #[error("unknown flag {0}; containerd passes -namespace, -id, -address, -publish-binary, -bundle, -debug")]
    UnknownFlag(String),
    #[error("unknown action {0:?}; expected start or delete")]
    UnknownAction(String),
    #[error("-{0} is required")]
    Required(&'static str),
    #[error("{what} {value:?} is not valid: {rule}", rule = beacon_common::id::ID_RULE)]
    BadName { what: &'static str, value: String },
    #[error("shim socket path {0:?} is longer than {MAX_SOCKET_PATH} bytes; set BEACON_SHIM_SOCKET_DIR to a shorter folder")]
    SocketPathTooLong(PathBuf),
}

impl Invocation {
    /// Parse the arguments after the program name.
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Self, InvocationError> {
        let mut namespace = None;
        let mut id = None;
        let mut address = None;
        let mut publish_binary = None;
        let mut bundle = None;
        let mut debug = false;
        let mut action = Action::Serve;
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            // Go's flag package accepts -flag, --flag and -flag=value.
            let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
                action = match arg.as_str() {
                    "start" => Action::Start,
                    "delete" => Action::Delete,
                    other => return Err(InvocationError::UnknownAction(other.to_string())),
                };
                continue;
            };
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (flag.to_string(), None),
            };
            if name == "debug" {
                debug = inline.map(|v| v != "false").unwrap_or(true);
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None => it
                    .next()
                    .ok_or_else(|| InvocationError::MissingValue(arg.clone()))?,
            };
            match name.as_str() {
                "namespace" => namespace = Some(value),
                "id" => id = Some(value),
                "address" => address = Some(value),
                "publish-binary" => publish_binary = Some(PathBuf::from(value)),
                "bundle" => bundle = Some(PathBuf::from(value)),
                _ => return Err(InvocationError::UnknownFlag(arg)),
            }
        }
        let namespace = namespace.ok_or(InvocationError::Required("namespace"))?;
        check_name("namespace", &namespace)?;
        let id = id.ok_or(InvocationError::Required("id"))?;
        check_name("id", &id)?;
        Ok(Self {
            namespace,
            id,
            containerd_address: address.ok_or(InvocationError::Required("address"))?,
            publish_binary,
            bundle,
            debug,
            action,
        })
    }

    /// The unix socket the shim of sandbox `sandbox_id` serves on, the way
    /// containerd's own shims name it: `<dir>/<sha256(address/namespace/id)>`
    /// (`dir` is `/run/containerd/s` unless [`SOCKET_DIR_ENV`] says otherwise).
    /// Stable, so `start` for a second container of the sandbox finds it.
    pub fn socket_path(&self, dir: &Path, sandbox_id: &str) -> Result<PathBuf, InvocationError> {
        let joined = format!(
            "{}/{}/{}",
            self.containerd_address.trim_end_matches('/'),
            self.namespace,
            sandbox_id
        );
        let digest = Sha256::digest(joined.as_bytes());
        let name: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let path = dir.join(name);
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(InvocationError::SocketPathTooLong(path));
        }
        Ok(path)
    }

    /// The address `start` prints: containerd 1.6 through 2.x accept a plain
    /// `unix://` address (the JSON form of newer shims is not understood by 1.6).
    pub fn address(&self, dir: &Path, sandbox_id: &str) -> Result<String, InvocationError> {
        Ok(format!(
            "unix://{}",
            self.socket_path(dir, sandbox_id)?.display()
        ))
    }
}

/// Environment variable overriding where shim sockets go.
pub const SOCKET_DIR_ENV: &str = "BEACON_SHIM_SOCKET_DIR";
/// Where containerd's own shims put their sockets.
pub const DEFAULT_SOCKET_DIR: &str = "/run/containerd/s";

/// The folder for shim sockets.
pub fn socket_dir() -> PathBuf {
    std::env::var_os(SOCKET_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_DIR))
}

/// Ids and namespaces become file names and ttrpc paths: they follow
/// containerd's identifier rule.
fn check_name(what: &'static str, value: &str) -> Result<(), InvocationError> {
    if beacon_common::id::valid_id(value) {
        Ok(())
    } else {
        Err(InvocationError::BadName {
            what,
            value: value.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn parses_what_containerd_sends() {
        let inv = Invocation::parse(args(
            "-namespace default -address /run/containerd/containerd.sock \
             -publish-binary /usr/bin/containerd -id c1 -debug start",
        ))
        .expect("parse");
        assert_eq!(inv.namespace, "default");
        assert_eq!(inv.id, "c1");
        assert_eq!(inv.containerd_address, "/run/containerd/containerd.sock");
        assert_eq!(
            inv.publish_binary.as_deref(),
            Some(Path::new("/usr/bin/containerd"))
        );
        assert!(inv.debug);
        assert_eq!(inv.action, Action::Start);

        let inv = Invocation::parse(args(
            "--namespace=k8s.io -id=abc -address=/a -bundle /run/b delete",
        ))
        .expect("parse");
        assert_eq!(inv.action, Action::Delete);
        assert_eq!(inv.bundle.as_deref(), Some(Path::new("/run/b")));
        assert!(!inv.debug);
        let serve = Invocation::parse(args("-namespace n -id i -address /a")).expect("parse");
        assert_eq!(serve.action, Action::Serve);
    }

    #[test]
    fn bad_invocations_are_clear() {
        assert_eq!(
            Invocation::parse(args("-id x -address /a start")),
            Err(InvocationError::Required("namespace"))
        );
        assert_eq!(
            Invocation::parse(args("-namespace n -id")),
            Err(InvocationError::MissingValue("-id".into()))
        );
        assert!(matches!(
            Invocation::parse(args("-namespace n -id x -address /a -bogus 1")),
            Err(InvocationError::UnknownFlag(_))
        ));
        assert!(matches!(
            Invocation::parse(args("-namespace n -id x -address /a frobnicate")),
            Err(InvocationError::UnknownAction(_))
        ));
        assert!(matches!(
            Invocation::parse(args("-namespace n -id ../x -address /a")),
            Err(InvocationError::BadName { what: "id", .. })
        ));
    }

    #[test]
    fn socket_is_containerds_name_stable_distinct_and_short() {
        let a = Invocation::parse(args(
            "-namespace default -id a -address /run/containerd/containerd.sock",
        ))
        .expect("a");
        let dir = Path::new("/run/containerd/s");
        assert_eq!(a.socket_path(dir, "a").ok(), a.socket_path(dir, "a").ok());
        assert_ne!(a.socket_path(dir, "a").ok(), a.socket_path(dir, "b").ok());
        // containerd: sha256("/run/containerd/containerd.sock/default/a").
        let expected: String = Sha256::digest(b"/run/containerd/containerd.sock/default/a")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            a.address(dir, "a").expect("address"),
            format!("unix:///run/containerd/s/{expected}")
        );
        let long = PathBuf::from(format!("/{}", "d".repeat(100)));
        assert!(matches!(
            a.socket_path(&long, "a"),
            Err(InvocationError::SocketPathTooLong(_))
        ));
    }
}
