//! The release `beacon-net`, as shipped (`panic = "abort"`), on corrupt lease
//! databases: every kind of damage ends in the clear error naming the file and
//! `beacon-net recover-db`, a non-zero exit without a signal, and the file left as
//! it was. A `cargo test --release` build would not do: test builds unwind.
//!
//! The binary is built here with `cargo build --release` (minutes the first time,
//! a no-op afterwards) unless `BEACON_TEST_RELEASE_BEACON_NET` names one; either
//! way the test first checks it really aborts on panics.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn release_beacon_net() -> PathBuf {
    if let Some(path) = std::env::var_os("BEACON_TEST_RELEASE_BEACON_NET") {
        return PathBuf::from(path);
    }
    let cargo = std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "beacon-netmgr",
            "--bin",
            "beacon-net",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo");
    assert!(out.status.success(), "cargo build --release failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "beacon-net")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported the beacon-net executable")
}

fn command(bin: &Path, state: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("BEACON_STATE_DIR", state)
        .env("BEACON_RUN_DIR", state.join("run"));
    cmd
}

fn run(bin: &Path, state: &Path, args: &[&str]) -> Output {
    command(bin, state, args).output().unwrap()
}

/// Assert `out` is the clear corrupt-database error for `db`, from a process that
/// exited on its own.
fn assert_refused(what: &str, out: &Output, db: &Path) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), None, "{what}: died of a signal: {err}");
    assert_ne!(out.status.code(), Some(0), "{what}: succeeded");
    assert!(
        err.contains(&db.display().to_string()) && err.contains("beacon-net recover-db"),
        "{what}: {err}"
    );
    assert!(err.contains("corrupt"), "{what}: {err}");
}

/// Bytes that kill whoever reads them under [`abort_on_read_library`].
const ABORT_MARKER: &str = "abort-marker-7f3c9e1d";

/// An `LD_PRELOAD` library that makes a process abort the moment a `read` or
/// `pread64` returns bytes holding `BEACON_TEST_ABORT_ON`: what a redb panic on a
/// bad page does to a `panic = "abort"` build, without a hook in beacon-net.
fn abort_on_read_library(dir: &Path) -> PathBuf {
    let src = dir.join("abort_on_read.c");
    std::fs::write(
        &src,
        r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

static void abort_if_marked(const void *buf, ssize_t n) {
    const char *marker = getenv("BEACON_TEST_ABORT_ON");
    if (marker && n > 0 && memmem(buf, (size_t)n, marker, strlen(marker))) abort();
}

ssize_t pread64(int fd, void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pread64");
    ssize_t n = real(fd, buf, count, offset);
    abort_if_marked(buf, n);
    return n;
}

ssize_t read(int fd, void *buf, size_t count) {
    static ssize_t (*real)(int, void *, size_t);
    if (!real) real = dlsym(RTLD_NEXT, "read");
    ssize_t n = real(fd, buf, count);
    abort_if_marked(buf, n);
    return n;
}
"#,
    )
    .unwrap();
    let lib = dir.join("abort_on_read.so");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .status()
        .expect("a C compiler (cc) to build the abort-on-read library");
    assert!(status.success(), "building {}", lib.display());
    lib
}

#[test]
fn release_binary_refuses_corrupt_databases_without_dying() {
    let bin = release_beacon_net();
    let strategy = Command::new(&bin).arg("panic-strategy").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&strategy.stdout).trim(),
        "abort",
        "{} is not a panic=abort build: this test would prove nothing",
        bin.display()
    );

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let made = run(&bin, &state, &["allocate", "sb-a"]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let db = state.join("network.db");
    let good = std::fs::read(&db).unwrap();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() / 2].to_vec()),
        ("header only", good[..64].to_vec()),
        ("empty", Vec::new()),
        ("garbage", vec![0x5a; good.len()]),
    ];
    for (what, bytes) in cases {
        std::fs::write(&db, &bytes).unwrap();
        for args in [&["list"][..], &["allocate", "sb-b"][..]] {
            let out = run(&bin, &state, args);
            assert_refused(&format!("{what}, {args:?}"), &out, &db);
            assert_eq!(
                std::fs::read(&db).unwrap(),
                bytes,
                "{what}, {args:?}: the file was changed"
            );
        }
    }

    // The storage engine dying on the file, as a redb panic kills this build (no
    // corruption we could make has redb 4.6.0 panic; see the report of the change
    // that added this test). The lease record of "abort-marker-..." is the page
    // that kills its reader. Before the check moved to a child process, this killed
    // beacon-net itself with SIGABRT.
    std::fs::write(&db, &good).unwrap();
    let marked = run(&bin, &state, &["allocate", ABORT_MARKER]);
    assert!(
        marked.status.success(),
        "{}",
        String::from_utf8_lossy(&marked.stderr)
    );
    let marked = std::fs::read(&db).unwrap();
    let lib = abort_on_read_library(dir.path());
    for args in [&["list"][..], &["allocate", "sb-b"][..]] {
        let out = command(&bin, &state, args)
            .env("LD_PRELOAD", &lib)
            .env("BEACON_TEST_ABORT_ON", ABORT_MARKER)
            .output()
            .unwrap();
        assert_refused(&format!("engine abort, {args:?}"), &out, &db);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("crashed") && err.contains("SIGABRT"), "{err}");
        assert_eq!(std::fs::read(&db).unwrap(), marked, "the file was changed");
    }
    // The library really kills a reader of that file (else the case proves
    // nothing): `cat` dies of it.
    let cat = Command::new("cat")
        .arg(&db)
        .env("LD_PRELOAD", &lib)
        .env("BEACON_TEST_ABORT_ON", ABORT_MARKER)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(cat.signal(), Some(libc::SIGABRT), "{cat:?}");
    // Without it, the untouched file still works.
    let list = run(&bin, &state, &["list"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert!(String::from_utf8_lossy(&list.stdout).contains(ABORT_MARKER));
}
