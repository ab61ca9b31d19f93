//! The OCI bundle containerd hands the shim: `config.json` plus a rootfs folder.
//!
//! The spec is kept whole as JSON (vminitd receives it, minus the network
//! namespace); this module extracts and checks what the shim itself needs.
//!
//! The sandbox id annotation names folders, logs, locks and the VM a container
//! joins, so it is held to containerd's own id rule
//! ([`beacon_common::id::valid_id`]) when the bundle loads; a bundle with a
//! malformed one is refused rather than mapped onto some other sandbox.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// CRI annotation naming a container's sandbox (pod).
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// CRI annotation: "sandbox" for the pause container, "container" otherwise.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read {path:?}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path:?} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("config.json: {0}")]
    Invalid(String),
    #[error(
        "config.json: annotation {SANDBOX_ID_ANNOTATION} is {value}, which is not a valid \
         sandbox id: it must start with an ASCII letter or digit, contain only letters, digits, \
         '_', '.' and '-', and be at most {max} bytes (containerd's id rule). Fix whatever \
         wrote the annotation (the CRI plugin writes the pod sandbox's container id)",
        max = beacon_paths::MAX_VERBATIM_LEN
    )]
    InvalidSandboxId { value: String },
}

/// The network a sandbox's spec asks for (`linux.namespaces`, type `network`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetNamespace {
    /// No network namespace: the host's (a CRI `hostNetwork` pod).
    Host,
    /// A new namespace of its own (`ctr run`): the runtime config's network.
    Own,
    /// A namespace someone else made and configured (a CRI pod's, after its
    /// CNI chain ran): the VM joins that network.
    Join(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    /// The whole OCI runtime spec.
    pub spec: Value,
    /// `root.path`, resolved against the bundle folder.
    pub rootfs: PathBuf,
    pub readonly_rootfs: bool,
    pub args: Vec<String>,
    pub terminal: bool,
}

impl Bundle {
    pub fn load(dir: &Path) -> Result<Self, BundleError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| BundleError::Read {
            path: path.clone(),
            source,
        })?;
        let spec: Value = serde_json::from_str(&text).map_err(|source| BundleError::Json {
            path: path.clone(),
            source,
        })?;
        let invalid = |m: &str| BundleError::Invalid(m.to_string());
        if !spec.is_object() {
            return Err(invalid("the top level must be an object"));
        }
        spec.get("ociVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("ociVersion is missing"))?;
        let root = spec
            .pointer("/root/path")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("root.path is missing"))?;
        if root.is_empty() {
            return Err(invalid("root.path is empty"));
        }
        let rootfs = dir.join(root);
        let readonly_rootfs = spec
            .pointer("/root/readonly")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let args = match spec.pointer("/process/args") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| invalid("process.args must be strings"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(invalid("process.args must be an array")),
        };
        if spec.get("process").is_some() && args.is_empty() {
            return Err(invalid("process.args is empty"));
        }
        let terminal = spec
            .pointer("/process/terminal")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        check_sandbox_id(&spec)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            spec,
            rootfs,
            readonly_rootfs,
            args,
            terminal,
        })
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.spec
            .get("annotations")
            .and_then(|a| a.get(key))
            .and_then(Value::as_str)
    }

    /// The sandbox this container belongs to: the CRI sandbox id (checked by
    /// [`Bundle::load`]), else `own_id` (a plain `ctr run` container is its own
    /// sandbox).
    pub fn sandbox_id<'a>(&'a self, own_id: &'a str) -> &'a str {
        self.annotation(SANDBOX_ID_ANNOTATION).unwrap_or(own_id)
    }

    /// Is this the sandbox (pause) container of a CRI pod?
    pub fn is_pod_sandbox(&self) -> bool {
        self.annotation(CONTAINER_TYPE_ANNOTATION) == Some("sandbox")
    }

    /// The network namespace the spec asks for.
    pub fn network_namespace(&self) -> NetNamespace {
        let found = self
            .spec
            .pointer("/linux/namespaces")
            .and_then(Value::as_array)
            .and_then(|ns| {
                ns.iter()
                    .find(|n| n.get("type").and_then(Value::as_str) == Some("network"))
            });
        match found {
            None => NetNamespace::Host,
            Some(n) => match n.get("path").and_then(Value::as_str) {
                Some(p) if !p.is_empty() => NetNamespace::Join(PathBuf::from(p)),
                _ => NetNamespace::Own,
            },
        }
    }

    /// `linux.cgroupsPath`, when set.
    pub fn cgroups_path(&self) -> Option<&str> {
        self.spec
            .pointer("/linux/cgroupsPath")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
    }

    /// Does this container start a new sandbox (and so a new VM)?
    pub fn starts_sandbox(&self) -> bool {
        self.annotation(CONTAINER_TYPE_ANNOTATION)
            .is_none_or(|t| t == "sandbox")
    }
}

/// A present sandbox id annotation must be a string obeying containerd's id rule.
fn check_sandbox_id(spec: &Value) -> Result<(), BundleError> {
    let Some(value) = spec
        .get("annotations")
        .and_then(|a| a.get(SANDBOX_ID_ANNOTATION))
    else {
        return Ok(());
    };
    match value.as_str() {
        Some(id) if beacon_common::id::valid_id(id) => Ok(()),
        Some(id) => Err(BundleError::InvalidSandboxId {
            value: format!("{:?}", id.chars().take(100).collect::<String>()),
        }),
        None => Err(BundleError::InvalidSandboxId {
            value: format!("not a string ({value})"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(json: &str) -> (tempfile::TempDir, Result<Bundle, BundleError>) {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("config.json"), json).expect("write");
        let b = Bundle::load(tmp.path());
        (tmp, b)
    }

    #[test]
    fn reads_a_ctr_bundle() {
        let (tmp, b) = bundle(
            r#"{"ociVersion":"1.0.2","process":{"args":["sh","-c","echo hi"],"terminal":true,"cwd":"/"},
                "root":{"path":"rootfs","readonly":true},"linux":{"namespaces":[{"type":"network"}]}}"#,
        );
        let b = b.expect("load");
        assert_eq!(b.rootfs, tmp.path().join("rootfs"));
        assert!(b.readonly_rootfs && b.terminal);
        assert_eq!(b.args, ["sh", "-c", "echo hi"]);
        assert_eq!(b.sandbox_id("c1"), "c1");
        assert!(b.starts_sandbox());
        assert!(
            b.spec.pointer("/linux/namespaces").is_some(),
            "spec kept whole"
        );
    }

    #[test]
    fn the_network_namespace_is_host_own_or_one_to_join() {
        let ns = |linux: &str| {
            let json = format!(
                r#"{{"ociVersion":"1.0.2","process":{{"args":["sh"]}},"root":{{"path":"rootfs"}},{linux}
                "annotations":{{"io.kubernetes.cri.container-type":"sandbox"}}}}"#
            );
            let (_d, b) = bundle(&json);
            let b = b.expect("bundle");
            assert!(b.is_pod_sandbox());
            b.network_namespace()
        };
        assert_eq!(ns(""), NetNamespace::Host);
        assert_eq!(
            ns(r#""linux":{"namespaces":[{"type":"pid"}]},"#),
            NetNamespace::Host
        );
        assert_eq!(
            ns(r#""linux":{"namespaces":[{"type":"network"}]},"#),
            NetNamespace::Own
        );
        assert_eq!(
            ns(r#""linux":{"namespaces":[{"type":"network","path":"/var/run/netns/cni-1"}]},"#),
            NetNamespace::Join("/var/run/netns/cni-1".into())
        );
    }

    #[test]
    fn reads_cri_annotations() {
        let (_t, b) = bundle(
            r#"{"ociVersion":"1.0.2","process":{"args":["nginx"]},"root":{"path":"/abs/rootfs"},
                "annotations":{"io.kubernetes.cri.sandbox-id":"pod1","io.kubernetes.cri.container-type":"container"}}"#,
        );
        let b = b.expect("load");
        assert_eq!(b.rootfs, PathBuf::from("/abs/rootfs"));
        assert_eq!(b.sandbox_id("c2"), "pod1");
        assert!(!b.starts_sandbox());
    }

    fn with_sandbox_id(id: &Value) -> String {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["nginx"]},
            "root": {"path": "rootfs"},
            "annotations": {
                SANDBOX_ID_ANNOTATION: id,
                CONTAINER_TYPE_ANNOTATION: "container",
            },
        })
        .to_string()
    }

    #[test]
    fn sandbox_ids_follow_containerd_rules() {
        let long_ok = "a".repeat(76);
        for ok in ["p", "0pod", "pod-1_a.b", long_ok.as_str()] {
            let (_t, b) = bundle(&with_sandbox_id(&Value::from(ok)));
            assert_eq!(b.expect(ok).sandbox_id("c"), ok);
        }
        let long_bad = "a".repeat(77);
        for bad in [
            Value::from(""),
            Value::from("a/b"),
            Value::from("../etc"),
            Value::from("_pod"),
            Value::from("-pod"),
            Value::from(".pod"),
            Value::from("pod 1"),
            Value::from("p\u{f6}d"),
            Value::from("pod\n"),
            Value::from(long_bad.as_str()),
            Value::from(7),
            Value::Null,
        ] {
            let (_t, b) = bundle(&with_sandbox_id(&bad));
            let err = b.expect_err(&bad.to_string());
            assert!(
                matches!(err, BundleError::InvalidSandboxId { .. }),
                "{bad}: {err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(SANDBOX_ID_ANNOTATION) && msg.contains("at most 76 bytes"),
                "{msg}"
            );
        }
    }

    #[test]
    fn malformed_bundles_are_clear_errors() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            Bundle::load(tmp.path()),
            Err(BundleError::Read { .. })
        ));
        for (json, needle) in [
            ("{not json", "not valid JSON"),
            ("[]", "top level"),
            (r#"{"root":{"path":"r"}}"#, "ociVersion"),
            (
                r#"{"ociVersion":"1","process":{"args":["a"]}}"#,
                "root.path",
            ),
            (
                r#"{"ociVersion":"1","root":{"path":"r"},"process":{"args":[1]}}"#,
                "strings",
            ),
            (
                r#"{"ociVersion":"1","root":{"path":"r"},"process":{"args":[]}}"#,
                "empty",
            ),
        ] {
            let (_t, b) = bundle(json);
            let err = b.expect_err(json).to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }
}
