//! What a test hands to the lab is visible inside it wherever the checkout and the
//! target directory live. The lab's /tmp and /run are fresh tmpfs, so a checkout
//! under /tmp needs the lab's keep list. Only `make test` runs this test, from a
//! copy of the checkout under /tmp (`tests/run-all`); `test = false` keeps it out
//! of `cargo test --workspace`, where it would cost a lab boot to check little.

use std::time::Duration;

use beacon_tests::assets::{lab_visible_tempdir, repo_root};
use beacon_tests::lab::Lab;
use beacon_tests::script::{section, section_exit_code, sh_command, sh_quote, sh_section};

const LAB_BINARY: &str = env!("CARGO_BIN_EXE_beacon-lab");

#[test]
fn the_lab_sees_the_checkout_the_target_dir_and_lab_visible_files() {
    let tmp = lab_visible_tempdir().expect("lab-visible tempdir");
    let marker = tmp.path().join("marker");
    let token = format!("visible-{}", std::process::id());
    std::fs::write(&marker, &token).expect("write marker");
    let cwd = std::env::current_dir().expect("cwd");
    eprintln!(
        "checkout {}, target binary {LAB_BINARY}, lab-visible folder {}, cwd {}",
        repo_root().display(),
        tmp.path().display(),
        cwd.display()
    );
    let checks = [
        (
            "marker",
            format!("cat {}", sh_quote(&marker.display().to_string())),
        ),
        (
            "checkout",
            format!(
                "test -f {}",
                sh_quote(&repo_root().join("Cargo.toml").display().to_string())
            ),
        ),
        ("cwd", "pwd".to_string()),
        ("binary", sh_command(&[LAB_BINARY, "--help"])),
    ];
    let script: String = checks.iter().map(|(n, c)| sh_section(n, c)).collect();
    let lab = Lab {
        timeout: Duration::from_secs(300),
        ..Lab::new()
    };
    let out = lab.run(&["sh", "-c", &script]).expect("lab run");
    assert_eq!(out.exit_code, 0, "console:\n{}", out.console);
    for (name, command) in &checks {
        assert_eq!(
            section_exit_code(&out.output, name),
            Some(0),
            "`{command}` failed inside the lab:\n{}",
            out.output
        );
    }
    assert_eq!(
        section(&out.output, "marker").map(str::trim),
        Some(token.as_str())
    );
    assert_eq!(
        section(&out.output, "cwd").map(str::trim),
        Some(cwd.to_str().expect("utf8 cwd"))
    );
    assert!(
        section(&out.output, "binary").is_some_and(|s| s.contains("beacon-lab")),
        "{}",
        out.output
    );
}
