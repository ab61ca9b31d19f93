//! The OCI bundle containerd hands the shim: `config.json` plus a rootfs folder.
//!
//! The spec is kept whole as JSON (vminitd receives it, minus the network
//! namespace); this module extracts and checks what the shim itself needs.

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

    /// The sandbox this container belongs to: the CRI sandbox id, else `own_id`
    /// (a plain `ctr run` container is its own sandbox).
    pub fn sandbox_id<'a>(&'a self, own_id: &'a str) -> &'a str {
        self.annotation(SANDBOX_ID_ANNOTATION).unwrap_or(own_id)
    }

    /// Does this container start a new sandbox (and so a new VM)?
    pub fn starts_sandbox(&self) -> bool {
        self.annotation(CONTAINER_TYPE_ANNOTATION)
            .is_none_or(|t| t == "sandbox")
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
