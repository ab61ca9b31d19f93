//! OCI bundles as crun sees them inside the VM. Owns reading the spec sent
//! by the host, checking the rootfs stays inside the shares directory,
//! rewriting the spec for the guest (no network namespace: the container
//! shares the VM's eth0; our own cgroup path) and writing `config.json`.
//! Never runs crun.

use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use crate::error::{TaskError, TaskResult};

/// `type_url` suffix of a full OCI spec carried in `CreateTaskRequest.options`.
pub const SPEC_TYPE_SUFFIX: &str = "opencontainers/runtime-spec/1/Spec";

/// Parses JSON sent by the host, naming what it was on failure.
pub fn parse_json(what: &str, bytes: &[u8]) -> TaskResult<Value> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| TaskError::InvalidArgument(format!("malformed {what}: {e}")))?;
    if !v.is_object() {
        return Err(TaskError::InvalidArgument(format!(
            "malformed {what}: not a JSON object"
        )));
    }
    Ok(v)
}

/// Checks an OCI `process` object has a non-empty `args` list of strings.
pub fn check_process(process: &Value) -> TaskResult<()> {
    let args = process
        .get("args")
        .and_then(Value::as_array)
        .ok_or_else(|| TaskError::InvalidArgument("process.args is missing".into()))?;
    if args.is_empty() || !args.iter().all(Value::is_string) {
        return Err(TaskError::InvalidArgument(
            "process.args must be a non-empty list of strings".into(),
        ));
    }
    Ok(())
}

/// Joins a host-supplied relative path under `base`, refusing `..`, and
/// absolute components. Symlinks are checked later, after canonicalising.
fn join_relative(base: &Path, rel: &str) -> TaskResult<PathBuf> {
    let rel_path = Path::new(rel);
    let mut out = base.to_path_buf();
    for c in rel_path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => {
                return Err(TaskError::InvalidArgument(format!(
                    "path {rel:?} escapes the share"
                )))
            }
        }
    }
    Ok(out)
}

/// Resolves `rel` under `root` and proves the result (after following every
/// symlink) is still inside `root`.
pub fn resolve_inside(root: &Path, rel: &str) -> TaskResult<PathBuf> {
    let root = root
        .canonicalize()
        .map_err(|e| TaskError::io(format!("shares directory {}", root.display()), e))?;
    let joined = join_relative(&root, rel)?;
    let real = joined.canonicalize().map_err(|e| {
        TaskError::InvalidArgument(format!("path {rel:?} does not exist in the share: {e}"))
    })?;
    if !real.starts_with(&root) {
        return Err(TaskError::InvalidArgument(format!(
            "path {rel:?} escapes the share (resolves to {})",
            real.display()
        )));
    }
    Ok(real)
}

/// Where the bundle named in a Create request lives: `bundle` is relative to
/// the shares directory, or an absolute path inside it; empty means `<id>`.
pub fn bundle_dir(shares: &Path, bundle: &str, id: &str) -> TaskResult<PathBuf> {
    let rel = if bundle.is_empty() {
        id.to_string()
    } else if let Ok(stripped) = Path::new(bundle).strip_prefix(shares) {
        stripped.to_string_lossy().into_owned()
    } else {
        bundle.to_string()
    };
    resolve_inside(shares, &rel)
}

/// Rewrites a container spec for the guest and returns it:
/// drops the `network` namespace, points `root.path` at the checked rootfs
/// (relative paths are relative to the bundle directory) and sets
/// `linux.cgroupsPath` to `/<cgroup_parent>/<id>`.
pub fn rewrite_spec(
    mut spec: Value,
    shares: &Path,
    bundle: &Path,
    id: &str,
    cgroup_parent: &str,
) -> TaskResult<Value> {
    check_process(spec.get("process").unwrap_or(&Value::Null))?;
    let root_path = spec
        .pointer("/root/path")
        .and_then(Value::as_str)
        .ok_or_else(|| TaskError::InvalidArgument("root.path is missing".into()))?
        .to_string();
    let shares_real = shares
        .canonicalize()
        .map_err(|e| TaskError::io(format!("shares directory {}", shares.display()), e))?;
    let rel_to_shares = bundle.strip_prefix(&shares_real).map_err(|_| {
        TaskError::InvalidArgument(format!("bundle {} is outside the share", bundle.display()))
    })?;
    let rootfs_rel = if Path::new(&root_path).is_absolute() {
        Path::new(&root_path)
            .strip_prefix(&shares_real)
            .map_err(|_| {
                TaskError::InvalidArgument(format!("root.path {root_path:?} escapes the share"))
            })?
            .to_path_buf()
    } else {
        rel_to_shares.join(&root_path)
    };
    let rootfs = resolve_inside(&shares_real, &rootfs_rel.to_string_lossy())?;
    if !rootfs.is_dir() {
        return Err(TaskError::InvalidArgument(format!(
            "root.path {root_path:?} is not a directory"
        )));
    }
    spec["root"]["path"] = Value::String(rootfs.to_string_lossy().into_owned());

    let linux = spec
        .as_object_mut()
        .ok_or_else(|| TaskError::InvalidArgument("spec is not an object".into()))?
        .entry("linux")
        .or_insert_with(|| serde_json::json!({}));
    if !linux.is_object() {
        return Err(TaskError::InvalidArgument("linux is not an object".into()));
    }
    if let Some(ns) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
        ns.retain(|n| n.get("type").and_then(Value::as_str) != Some("network"));
    }
    linux["cgroupsPath"] = Value::String(format!("/{cgroup_parent}/{id}"));
    Ok(spec)
}

/// Writes `config.json` into a fresh bundle directory `dir`.
pub fn write_bundle(dir: &Path, spec: &Value) -> TaskResult<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| TaskError::io(format!("create bundle {}", dir.display()), e))?;
    let bytes = serde_json::to_vec(spec)
        .map_err(|e| TaskError::InvalidArgument(format!("spec does not serialise: {e}")))?;
    std::fs::write(dir.join("config.json"), bytes)
        .map_err(|e| TaskError::io(format!("write {}/config.json", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().expect("tempdir");
        let b = t.path().join("c1");
        std::fs::create_dir_all(b.join("rootfs/bin")).expect("mkdir");
        (t, b)
    }

    fn spec() -> Value {
        serde_json::json!({
            "process": {"args": ["/bin/true"]},
            "root": {"path": "rootfs"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}],
                      "cgroupsPath": "/default/c1"}
        })
    }

    #[test]
    fn network_namespace_removed_and_paths_fixed() {
        let (t, _) = share();
        let b = bundle_dir(t.path(), "c1", "c1").expect("bundle");
        let out = rewrite_spec(spec(), t.path(), &b, "c1", "vminitd").expect("rewrite");
        let ns: Vec<&str> = out["linux"]["namespaces"]
            .as_array()
            .expect("ns")
            .iter()
            .filter_map(|n| n["type"].as_str())
            .collect();
        assert_eq!(ns, ["pid", "mount"]);
        assert_eq!(out["linux"]["cgroupsPath"], "/vminitd/c1");
        let root = out["root"]["path"].as_str().expect("root");
        assert!(root.ends_with("c1/rootfs"), "{root}");
        assert!(Path::new(root).is_absolute());
    }

    #[test]
    fn dotdot_and_symlinks_out_are_refused() {
        let (t, b) = share();
        assert!(bundle_dir(t.path(), "../etc", "c1").is_err());
        let mut s = spec();
        s["root"]["path"] = "../../etc".into();
        let b = b.canonicalize().expect("canon");
        assert!(rewrite_spec(s, t.path(), &b, "c1", "v").is_err());
        std::os::unix::fs::symlink("/etc", b.join("evil")).expect("symlink");
        let mut s = spec();
        s["root"]["path"] = "evil".into();
        let e = rewrite_spec(s, t.path(), &b, "c1", "v").expect_err("escape");
        assert!(e.to_string().contains("escapes"), "{e}");
        let mut s = spec();
        s["root"]["path"] = "/etc".into();
        assert!(rewrite_spec(s, t.path(), &b, "c1", "v").is_err());
    }

    #[test]
    fn malformed_input() {
        assert!(parse_json("config.json", b"{not json").is_err());
        assert!(parse_json("config.json", b"[1]").is_err());
        let (t, b) = share();
        let b = b.canonicalize().expect("canon");
        let mut s = spec();
        s["process"]["args"] = serde_json::json!([]);
        assert!(rewrite_spec(s, t.path(), &b, "c1", "v").is_err());
        let mut s = spec();
        s["root"] = Value::Null;
        assert!(rewrite_spec(s, t.path(), &b, "c1", "v").is_err());
    }
}
