//! The product's main job, for `make run`: a private containerd (Debian's
//! 1.6.20, own root, state and sockets under a temporary folder) with
//! `containerd-shim-beaconbox-v1` as the runtime `io.containerd.beaconbox.v1`,
//! and `ctr run` of a busybox container that prints its greeting from inside
//! its own microVM, booted by our VMM on the shim's threads.
//!
//! Two steps, because the second needs a KVM that runs real guests (on hosts
//! without one, `resources/run-container` runs it inside the nested lab):
//!
//! ```text
//! run_container prepare DIR   # host: guest kernel + initrd, busybox OCI archive
//! run_container run DIR       # where KVM is: containerd, import, ctr run, clean up
//! ```
//!
//! Never touches the host's real containerd or beaconbox folders: everything
//! lives under DIR and is removed by `run` (DIR itself is the caller's).

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use beacon_tests::containerd::{
    example_shim_dir, install_guest, shim_env, Containerd, ContainerdSpec, RUNTIME,
};
use beacon_tests::images::{busybox_archive, BUSYBOX_IMAGE};

fn prepare(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let share = install_guest(dir).map_err(anyhow::Error::msg)?;
    let archive = busybox_archive(dir, BUSYBOX_IMAGE, &[]).map_err(anyhow::Error::msg)?;
    println!(
        "run_container: guest files in {}, image archive {}",
        share.display(),
        archive.display()
    );
    Ok(())
}

fn run(dir: &Path) -> anyhow::Result<()> {
    let share = dir.join("share");
    let archive = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "tar"))
        .context("no image archive: run `run_container prepare DIR` first")?;
    let work = tempfile::Builder::new()
        .prefix("beacon-run")
        .tempdir()
        .context("temporary folder")?;
    let containerd = Containerd::start(
        &work.path().join("containerd"),
        &ContainerdSpec {
            shim_dir: example_shim_dir().map_err(anyhow::Error::msg)?,
            env: shim_env(work.path(), &share),
        },
    )
    .map_err(anyhow::Error::msg)?;
    let ctr = |args: &[&str]| -> anyhow::Result<String> {
        let o = containerd.ctr(args).context("running ctr")?;
        if !o.status.success() {
            bail!(
                "ctr {} failed: {}{}\ncontainerd log:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
                containerd.log_tail(40)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    ctr(&["images", "import", &archive.display().to_string()])?;
    let started = Instant::now();
    let out = ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        BUSYBOX_IMAGE,
        "beacon-hello",
        "sh",
        "-c",
        "echo \"hello from a container in its own microVM: kernel $(uname -r), $(nproc) vCPU, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB\"",
    ])?;
    let took = started.elapsed();
    print!("{out}");
    println!(
        "run_container: `ctr run --runtime {RUNTIME}` took {:.1} s (start, run, exit, clean up)",
        took.as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [cmd, dir] if cmd == "prepare" => prepare(Path::new(dir)),
        [cmd, dir] if cmd == "run" => run(Path::new(dir)),
        _ => Err(anyhow::anyhow!(
            "usage: run_container prepare DIR | run_container run DIR"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("run_container: {e:#}");
            ExitCode::FAILURE
        }
    }
}
