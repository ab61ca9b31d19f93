//! The crun driver against the real crun: errors for unknown containers map
//! to NOT_FOUND with crun's own words. Its own test binary, because the
//! reaper collects every child of the process.

use vminitd::crun::Crun;
use vminitd::reaper::Reaper;

#[tokio::test(flavor = "current_thread")]
async fn unknown_containers_are_not_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    for d in ["root", "logs"] {
        std::fs::create_dir_all(dir.path().join(d)).expect("mkdir");
    }
    let reaper = Reaper::start().expect("reaper");
    let crun = Crun::new(
        "/usr/bin/crun".into(),
        dir.path().join("root"),
        dir.path().join("logs"),
        reaper,
    );
    let e = crun.state("ghost").await.expect_err("state of nothing");
    assert_eq!(e.code(), ttrpc::Code::NOT_FOUND, "{e}");
    assert!(e.to_string().contains("ghost"), "{e}");
    let e = crun
        .kill("ghost", 9, false)
        .await
        .expect_err("kill nothing");
    assert_eq!(e.code(), ttrpc::Code::NOT_FOUND, "{e}");
    let e = crun.start("ghost").await.expect_err("start nothing");
    assert_eq!(e.code(), ttrpc::Code::NOT_FOUND, "{e}");
    // Per-call logs are removed after reading.
    let logs: Vec<_> = std::fs::read_dir(dir.path().join("logs"))
        .expect("logs")
        .collect();
    assert!(logs.is_empty(), "{logs:?}");
}
