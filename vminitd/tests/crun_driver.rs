//! The crun driver against the real crun: errors for unknown containers map
//! to NOT_FOUND with crun's own words, and ids are never read as options.
//! Its own test binary with a single test, because the reaper collects every
//! child of the process: two reapers (one per test runtime) would steal each
//! other's exits.

use std::path::Path;

use vminitd::crun::{Crun, ProcessStdio};
use vminitd::reaper::Reaper;

#[tokio::test(flavor = "current_thread")]
async fn crun_driver_against_the_real_crun() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    for d in ["root", "logs"] {
        std::fs::create_dir_all(dir.join(d)).expect("mkdir");
    }
    let reaper = Reaper::start().expect("reaper");
    let crun = Crun::new(
        "/usr/bin/crun".into(),
        dir.join("root"),
        dir.join("logs"),
        reaper,
    );
    unknown_containers_are_not_found(&crun, dir).await;
    ids_are_never_read_as_crun_options(&crun, dir).await;
}

async fn unknown_containers_are_not_found(crun: &Crun, dir: &Path) {
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
    let logs: Vec<_> = std::fs::read_dir(dir.join("logs")).expect("logs").collect();
    assert!(logs.is_empty(), "{logs:?}");
}

/// Ids reach crun as positional arguments after `--`, never as options:
/// every operation on a dash-led id fails on the missing container named
/// by that id (crun's state path `<root>/-a`), not on argument parsing.
/// The Task API refuses such ids before they get here; this checks the
/// second line of defence against the real crun.
async fn ids_are_never_read_as_crun_options(crun: &Crun, dir: &Path) {
    let root = dir.join("root");
    // `-a` is `--all` for kill; `--help` would print help and exit 0.
    for id in ["-a", "--help"] {
        let named = format!("{}/{id}", root.display());
        let expect_named = |op: &str, r: vminitd::error::TaskResult<()>| {
            let e = r.expect_err(op);
            assert!(
                e.to_string().contains(&named),
                "{op} {id:?}: crun did not take the id as the container: {e}"
            );
        };
        expect_named("state", crun.state(id).await.map(drop));
        expect_named("start", crun.start(id).await);
        expect_named("kill", crun.kill(id, 9, false).await);
        expect_named("kill --all", crun.kill(id, 9, true).await);
        expect_named("pause", crun.pause(id).await);
        expect_named("resume", crun.resume(id).await);
        expect_named("delete", crun.delete(id, false).await);
        let res = dir.join("res.json");
        std::fs::write(&res, "{}").expect("write");
        expect_named("update", crun.update(id, &res).await);
        let process = dir.join("process.json");
        std::fs::write(&process, r#"{"args":["true"],"cwd":"/"}"#).expect("write");
        let none = || ProcessStdio {
            stdin: None,
            stdout: None,
            stderr: None,
        };
        expect_named(
            "exec",
            crun.exec(id, &process, &dir.join("pid"), None, none())
                .await,
        );
        // create reads the bundle's config.json first: failing on that (not
        // on an option, which crun answers with exit status 64) means the id
        // was parsed as the positional argument.
        let bundle = dir.join("empty-bundle");
        std::fs::create_dir_all(&bundle).expect("bundle dir");
        let e = crun
            .create(id, &bundle, &dir.join("pid"), None, none())
            .await
            .expect_err("create without a config.json");
        assert!(e.to_string().contains("config.json"), "create {id:?}: {e}");
    }
}
