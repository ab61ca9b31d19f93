//! Container images built locally (no registry is reachable from the machines
//! the tests run on): a busybox image as an OCI archive that `ctr images import`
//! takes, and a pause image (a static binary that waits for a signal).

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// The name the busybox image is imported under.
pub const BUSYBOX_IMAGE: &str = "docker.io/beacon/busybox:test";

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn blob(dir: &Path, bytes: &[u8]) -> Result<(String, u64), String> {
    let digest: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = dir.join("blobs/sha256").join(&digest);
    std::fs::write(&path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok((format!("sha256:{digest}"), bytes.len() as u64))
}

/// Build an OCI archive of an image whose root holds busybox (with its applet
/// links in /bin) and `extra` files `(host path, path in the image)`, named
/// `name`. Returns the archive path.
pub fn busybox_archive(
    dir: &Path,
    name: &str,
    extra: &[(PathBuf, String)],
) -> Result<PathBuf, String> {
    let root = dir.join("image-root");
    let layout = dir.join("image-layout");
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&layout);
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "root"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| format!("mkdir {d}: {e}"))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .map_err(|e| format!("copying /bin/busybox: {e}; run resources/install.sh"))?;
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .map_err(|e| format!("busybox --list: {e}"))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet.is_empty() || applet.contains('/') || applet == "busybox" {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .map_err(|e| format!("passwd: {e}"))?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n").map_err(|e| format!("group: {e}"))?;
    for (src, dst) in extra {
        let target = root.join(dst.trim_start_matches('/'));
        if let Some(p) = target.parent() {
            std::fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
        }
        std::fs::copy(src, &target).map_err(|e| format!("copying {}: {e}", src.display()))?;
    }
    std::fs::create_dir_all(layout.join("blobs/sha256")).map_err(|e| format!("layout: {e}"))?;
    let layer_tar = dir.join("layer.tar");
    run(Command::new("tar")
        .args([
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--sort=name",
            "--mtime=@0",
        ])
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&layer_tar)
        .arg("."))?;
    let layer = std::fs::read(&layer_tar).map_err(|e| format!("reading the layer: {e}"))?;
    let (layer_digest, layer_size) = blob(&layout, &layer)?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = blob(&layout, config.to_string().as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = blob(&layout, manifest.to_string().as_bytes())?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": name.rsplit(':').next().unwrap_or("latest"),
            },
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string())
        .map_err(|e| format!("index: {e}"))?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .map_err(|e| format!("oci-layout: {e}"))?;
    let archive = dir.join("busybox-oci.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg("."))?;
    Ok(archive)
}
