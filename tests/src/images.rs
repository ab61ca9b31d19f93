//! Container images built locally (no registry is reachable from the machines
//! the tests run on): a busybox image as an OCI archive that `ctr images import`
//! takes, and a pause image (a static binary that waits for a signal).

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// The name the busybox image is imported under.
pub const BUSYBOX_IMAGE: &str = "docker.io/beacon/busybox:test";
/// The name the pause image is imported under (the CRI plugin's sandbox image,
/// see [`crate::containerd::CriSpec`]).
pub const PAUSE_IMAGE: &str = "docker.io/beacon/pause:test";

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
    let root = fresh_root(dir, "busybox")?;
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
    let config = serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"});
    oci_archive(dir, "busybox", name, &config)
}

/// Build an OCI archive of the pause image (named `name`, normally
/// [`PAUSE_IMAGE`]): only `/pause`, compiled now from `tests/images/pause.rs`
/// into a static binary, as the entrypoint. Returns the archive path.
pub fn pause_archive(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let root = fresh_root(dir, "pause")?;
    build_pause(&root.join("pause"))?;
    let config = serde_json::json!({"Entrypoint": ["/pause"], "WorkingDir": "/"});
    oci_archive(dir, "pause", name, &config)
}

/// Compile the pause program (`tests/images/pause.rs`, no crates) with rustc
/// (`$RUSTC`, else `rustc` on PATH) into a static executable at `out`.
fn build_pause(out: &Path) -> Result<(), String> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/pause.rs");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    run(Command::new(&rustc)
        .args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
        ])
        .args(["-C", "strip=symbols", "-o"])
        .arg(out)
        .arg(&source))
    .map_err(|e| format!("compiling the pause program: {e}"))?;
    let bytes = std::fs::read(out).map_err(|e| format!("reading {}: {e}", out.display()))?;
    match elf_interpreter(&bytes) {
        Ok(false) => Ok(()),
        Ok(true) => Err(format!(
            "{} is dynamically linked (it has an ELF interpreter) although built with \
             +crt-static: the static C library is missing (Debian package libc6-dev)",
            out.display()
        )),
        Err(e) => Err(format!("{}: {e}", out.display())),
    }
}

/// Whether a 64-bit little-endian ELF executable asks for a program
/// interpreter (a `PT_INTERP` program header: it needs the dynamic loader, so
/// it cannot run alone in an image); an error when it is no such ELF file.
fn elf_interpreter(elf: &[u8]) -> Result<bool, String> {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&elf[32..40]);
    let phoff = usize::try_from(u64::from_le_bytes(phoff)).map_err(|e| e.to_string())?;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum)
        .map(|i| phoff.saturating_add(i * phentsize))
        .try_fold(false, |interp, at| {
            let header = elf
                .get(at..at.saturating_add(4))
                .ok_or("program headers past the end of the file")?;
            let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            Ok(interp || kind == PT_INTERP)
        })
}

/// An empty `dir/<stem>-root` to lay an image's files out in.
fn fresh_root(dir: &Path, stem: &str) -> Result<PathBuf, String> {
    let root = dir.join(format!("{stem}-root"));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).map_err(|e| format!("mkdir {}: {e}", root.display()))?;
    Ok(root)
}

/// Pack `dir/<stem>-root` as the single layer of an image with the OCI image
/// config `config` (its `config` object: entrypoint, environment, ...), named
/// `name`, into an OCI image layout (`dir/<stem>-layout`) and archive that as
/// `dir/<stem>-oci.tar`, which `ctr images import` takes. Returns the archive.
fn oci_archive(
    dir: &Path,
    stem: &str,
    name: &str,
    config: &serde_json::Value,
) -> Result<PathBuf, String> {
    let root = dir.join(format!("{stem}-root"));
    let layout = dir.join(format!("{stem}-layout"));
    let _ = std::fs::remove_dir_all(&layout);
    std::fs::create_dir_all(layout.join("blobs/sha256")).map_err(|e| format!("layout: {e}"))?;
    let layer_tar = dir.join(format!("{stem}-layer.tar"));
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
        "config": config,
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
    let archive = dir.join(format!("{stem}-oci.tar"));
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg("."))?;
    Ok(archive)
}
