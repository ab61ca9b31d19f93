//! The cgroup-v2-only checks of `host_resources` (Stats with memory, pids
//! and io; a memory limit through Update read back from `memory.max`; the
//! OOM event) run for real where every controller is there, and so does
//! `pid1_smoke` on a pure cgroup v2 host (this host is hybrid).
//!
//! This host mounts cgroup v1 with a v2 hierarchy holding only `hugetlb`, so
//! those checks skip here (`LAB-ONLY`). This test has cargo build (or find
//! fresh) the `host_resources` and `pid1_smoke` test binaries and runs them
//! with `VMINITD_REQUIRE_CGROUP2=1` (missing controllers become failures)
//! and a filter naming the two `host_resources` tests: inside the nested lab
//! (pure cgroup2 at /sys/fs/cgroup) when /sys/fs/cgroup here is not a pure
//! cgroup2 mount with memory, pids and io; directly otherwise. It then
//! asserts every test passed, that each check reported its values, and that
//! pid1_smoke left no cgroup behind.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use beacon_tests::assets::lab_visible_tempdir;
use beacon_tests::lab::{Lab, LabOutput};
use beacon_tests::script::{section, sh_quote as quote};
use common::{has_controller, pure_cgroup2, REQUIRE_CGROUP2_ENV};

const TESTS: &[&str] = &[
    "stats_pause_resume_update",
    "memory_limit_oom_raises_oom_event",
];

/// The test binary `name` of this package, built (or found fresh) by cargo
/// for the same profile as this test: `cargo test --no-run` reports its
/// path.
fn test_binary(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("current exe");
    let release = me.components().any(|c| c.as_os_str() == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["test", "-p", "vminitd", "--test", name, "--no-run"])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(std::process::Stdio::inherit());
    if release {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("run cargo");
    assert!(out.status.success(), "cargo test --no-run failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo reported no {name} test executable"))
}

#[test]
fn cgroup_v2_checks_pass_where_cgroup_v2_is_complete() {
    let bin = test_binary("host_resources");
    let pid1 = test_binary("pid1_smoke");
    eprintln!("running {} {TESTS:?} and {}", bin.display(), pid1.display());
    let tmp = lab_visible_tempdir().expect("lab-visible tempdir");
    // The test binary's stdout (libtest's report) and stderr (vminitd's
    // logs) go to separate files so the report lines stay whole.
    let mut cmd = vec![
        quote(&bin.display().to_string()),
        "--exact".into(),
        "--test-threads=1".into(),
        "--show-output".into(),
    ];
    cmd.extend(TESTS.iter().map(|t| quote(t)));
    let script = format!(
        "d=$(mktemp -d) || exit 90\n\
         export {REQUIRE_CGROUP2_ENV}=1\n\
         echo \"cgroup controllers: $(cat /sys/fs/cgroup/cgroup.controllers 2>&1)\"\n\
         {cmd} >\"$d/out\" 2>\"$d/err\"\n\
         rc=$?\n\
         echo '=== BEGIN stderr'; cat \"$d/err\"; echo '=== END stderr'\n\
         echo '=== BEGIN report'; cat \"$d/out\"; echo '=== END report'\n\
         {pid1} --test-threads=1 >\"$d/pid1\" 2>&1\n\
         prc=$?\n\
         echo '=== BEGIN pid1'; cat \"$d/pid1\"; echo \"pid1 exit $prc\"\n\
         echo \"cgroups left: $(ls /sys/fs/cgroup | grep vminitd-pid1)\"; echo '=== END pid1'\n\
         rm -rf \"$d\"\n\
         [ $prc = 0 ] || exit $prc\n\
         exit $rc\n",
        cmd = cmd.join(" "),
        pid1 = quote(&pid1.display().to_string()),
    );
    let script_path = tmp.path().join("cgroup-checks.sh");
    std::fs::write(&script_path, script).expect("write script");
    let argv = ["sh".to_string(), script_path.display().to_string()];

    let complete = pure_cgroup2() && ["memory", "pids", "io"].iter().all(|c| has_controller(c));
    let (out, where_) = if complete {
        let o = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .expect("run the checks");
        let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&o.stderr));
        (
            LabOutput {
                exit_code: o.status.code().unwrap_or(-1),
                console: text.clone(),
                output: text,
                elapsed: Duration::ZERO,
            },
            "this host",
        )
    } else {
        let mut lab = Lab {
            timeout: Duration::from_secs(1200),
            ..Lab::new()
        };
        lab.env.push((REQUIRE_CGROUP2_ENV.into(), "1".into()));
        (lab.run(&argv).expect("lab run"), "the nested lab")
    };

    let report = section(&out.output, "report").unwrap_or_else(|| {
        panic!(
            "no test report from {where_} (exit {}):\n{}",
            out.exit_code, out.console
        )
    });
    let stderr = section(&out.output, "stderr").unwrap_or_default();
    let context = || format!("report:\n{report}\nstderr (tail):\n{}", tail(stderr, 60));
    assert_eq!(
        out.exit_code,
        0,
        "the cgroup v2 checks failed in {where_}:\n{}",
        context()
    );
    for t in TESTS {
        assert!(
            report.contains(&format!("test {t} ... ok")),
            "{t} did not pass in {where_}:\n{}",
            context()
        );
    }
    assert!(
        report.contains(&format!("test result: ok. {} passed", TESTS.len())),
        "{}",
        context()
    );
    for check in [
        "CGROUP2-CHECKED stats: memory.usage=",
        "CGROUP2-CHECKED update: memory.max=67108864",
        "CGROUP2-CHECKED oom: events",
    ] {
        assert!(
            report.contains(check),
            "missing {check:?} in {where_}:\n{}",
            context()
        );
    }
    assert!(
        !report.contains("LAB-ONLY"),
        "a check skipped:\n{}",
        context()
    );
    let pid1_report = section(&out.output, "pid1").unwrap_or_default();
    assert!(
        pid1_report.contains("test result: ok. 3 passed") && pid1_report.contains("pid1 exit 0"),
        "pid1_smoke did not pass in {where_}:\n{}",
        tail(pid1_report, 60)
    );
    assert!(
        pid1_report.contains("cgroups left: \n"),
        "pid1_smoke left cgroups in {where_}:\n{}",
        tail(pid1_report, 5)
    );
    for l in report.lines().filter(|l| l.contains("CGROUP2-CHECKED")) {
        eprintln!("{l}");
    }
    eprintln!(
        "cgroup v2 checks passed in {where_} ({:.1} s)",
        out.elapsed.as_secs_f64()
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
