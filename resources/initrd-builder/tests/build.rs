//! The initrd as a whole: reproducible, complete, and clear about bad input.

use std::path::{Path, PathBuf};

use beacon_initrd::{build, collect, read, verify, Compression, InitrdSpec};

fn spec(init: &Path) -> InitrdSpec {
    InitrdSpec {
        init: init.to_path_buf(),
        busybox: Some(PathBuf::from("/bin/busybox")),
        crun: Some(PathBuf::from("/usr/bin/crun")),
        extra: Vec::new(),
        compression: Compression::Gzip,
        mtime: 0,
        keep_symbols: false,
    }
}

fn init_script(dir: &Path) -> PathBuf {
    let p = dir.join("init");
    std::fs::write(&p, "#!/bin/sh\necho hello\n").expect("write init");
    p
}

#[test]
fn crun_busybox_and_libraries_are_inside() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut out = Vec::new();
    build(&spec(&init_script(tmp.path())), &mut out).expect("build");
    let entries = read(&out[..]).expect("read back");
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    for want in [
        "init",
        "bin/busybox",
        "bin/sh",
        "usr/bin/crun",
        "dev/console",
        "lib64/ld-linux-x86-64.so.2",
    ] {
        assert!(paths.contains(&want), "{want} missing from {paths:?}");
    }
    // crun's libraries, found by parsing its ELF (independent of ldd).
    let crun = entries
        .iter()
        .find(|e| e.path == "usr/bin/crun")
        .expect("crun");
    let needed = beacon_initrd::elf::needed(&crun.data);
    assert!(
        needed.iter().any(|n| n.starts_with("libseccomp")),
        "{needed:?}"
    );
    verify(&entries).expect("every interpreter and library present");
    // Sorted, so parents come before children.
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted);
}

#[test]
fn reproducible_bytes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = spec(&init_script(tmp.path()));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    build(&s, &mut a).expect("build a");
    build(&s, &mut b).expect("build b");
    assert_eq!(a, b);
}

#[test]
fn verify_catches_a_missing_library() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut entries = collect(&spec(&init_script(tmp.path()))).expect("collect");
    entries.retain(|e| !e.path.contains("libseccomp"));
    let err = verify(&entries).expect_err("must notice");
    assert!(err.to_string().contains("libseccomp"), "{err}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("no-such-init");
    let err = collect(&spec(&missing)).expect_err("missing init");
    assert!(err.to_string().contains("no-such-init"), "{err}");

    let mut s = spec(&init_script(tmp.path()));
    s.extra = vec![(PathBuf::from("/bin/ls"), "../escape".into())];
    assert!(collect(&s).is_err());
    s.extra = vec![(PathBuf::from("/etc/hostname"), "/init".into())];
    assert!(matches!(
        collect(&s),
        Err(beacon_initrd::BuildError::Conflict(_))
    ));
}

#[test]
fn plain_cpio_when_asked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut s = spec(&init_script(tmp.path()));
    s.compression = Compression::None;
    s.busybox = None;
    s.crun = None;
    let mut out = Vec::new();
    build(&s, &mut out).expect("build");
    assert!(out.starts_with(b"070701"));
}

/// This test binary: dynamically linked and (dev profile) full of symbols and
/// debug information, like an unstripped `vminitd`.
fn unstripped_elf() -> (PathBuf, Vec<u8>) {
    let me = std::env::current_exe().expect("current exe");
    let data = std::fs::read(&me).expect("read self");
    assert!(
        beacon_initrd::elf::has_symbols_or_debug(&data),
        "this test needs an unstripped binary; {} has no .symtab",
        me.display()
    );
    (me, data)
}

fn member<'a>(entries: &'a [beacon_initrd::cpio::Entry], path: &str) -> &'a [u8] {
    &entries
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("{path} missing"))
        .data
}

#[test]
fn packed_binaries_are_stripped_and_their_sources_untouched() {
    let (me, before) = unstripped_elf();
    let mut s = spec(&me);
    s.compression = Compression::None;
    s.extra = vec![(me.clone(), "/usr/bin/extra-tool".into())];
    let mut out = Vec::new();
    build(&s, &mut out).expect("build");
    let entries = read(&out[..]).expect("read back");
    for path in ["init", "usr/bin/extra-tool"] {
        let packed = member(&entries, path);
        let sections = beacon_initrd::elf::sections(packed);
        assert!(
            sections.iter().any(|s| s.name == ".text"),
            "{path}: {sections:?}"
        );
        // Only loaded sections may stay (Rust's .debug_gdb_scripts is one).
        assert!(
            !sections
                .iter()
                .any(|s| s.name == ".symtab" || (s.name.starts_with(".debug") && !s.alloc)),
            "{path} still has symbols or debug sections: {sections:?}"
        );
        assert!(!beacon_initrd::elf::has_symbols_or_debug(packed));
        assert!(
            packed.len() < before.len() / 2,
            "{path}: {} bytes",
            packed.len()
        );
    }
    assert_eq!(
        std::fs::read(&me).expect("reread"),
        before,
        "source changed"
    );
    verify(&entries).expect("stripped binaries keep interpreter and libraries");
    // Stripping is deterministic: the archive stays reproducible.
    let mut again = Vec::new();
    build(&s, &mut again).expect("build again");
    assert!(again == out, "two builds differ");
}

#[test]
fn symbols_are_kept_when_asked() {
    let (me, before) = unstripped_elf();
    let mut s = spec(&me);
    s.compression = Compression::None;
    s.busybox = None;
    s.crun = None;
    s.keep_symbols = true;
    let mut out = Vec::new();
    build(&s, &mut out).expect("build");
    let entries = read(&out[..]).expect("read back");
    assert!(member(&entries, "init") == before.as_slice());
}
