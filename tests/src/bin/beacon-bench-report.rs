//! `make bench`'s report writer and result comparer.
//!
//! ```text
//! beacon-bench-report build LOG --out-dir DIR --kvm lab|hardware [--commit C]
//!     writes DIR/<date>-<host>.json, .md and .html from a `make bench` log
//! beacon-bench-report compare OLD.json NEW.json
//!     prints both runs' figures side by side and flags regressions
//! ```
//!
//! The line format and the report itself are `beacon_tests::bench`'s.

use std::path::{Path, PathBuf};

use anyhow::Context;
use beacon_tests::bench::{compare_text, Machine, Report};
use beacon_tests::procfs::meminfo_kib;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "make bench's report writer and result comparer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Writes the JSON, Markdown and HTML reports of one `make bench` log.
    Build {
        log: PathBuf,
        #[arg(long)]
        out_dir: PathBuf,
        /// Where the benchmarks ran: `lab` or `hardware`.
        #[arg(long)]
        kvm: String,
        /// The commit measured (default: `git rev-parse --short HEAD`).
        #[arg(long)]
        commit: Option<String>,
        /// The machine's name in the file names (default: this host's name).
        #[arg(long)]
        host: Option<String>,
    },
    /// Shows two result files side by side and flags regressions beyond
    /// both runs' spread (exit status 0 either way).
    Compare { old: PathBuf, new: PathBuf },
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let o = std::process::Command::new(cmd).args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn memory() -> String {
    meminfo_kib("MemTotal").map_or("?".into(), |kb| format!("{:.1} GiB", kb as f64 / 1048576.0))
}

fn read_report(path: &Path) -> anyhow::Result<Report> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Report::from_json(&path.display().to_string(), &text)?)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Build {
            log,
            out_dir,
            kvm,
            commit,
            host,
        } => {
            anyhow::ensure!(
                kvm == "lab" || kvm == "hardware",
                "--kvm must be `lab` or `hardware`, not {kvm:?}"
            );
            let text = std::fs::read_to_string(&log)
                .with_context(|| format!("reading the bench log {}", log.display()))?;
            let host = host
                .or_else(|| command_output("hostname", &[]))
                .unwrap_or_else(|| "unknown-host".into());
            let machine = Machine {
                date: command_output("date", &["-u", "+%Y-%m-%dT%H%MZ"])
                    .unwrap_or_else(|| "unknown-date".into()),
                host: host.clone(),
                commit: commit
                    .or_else(|| command_output("git", &["rev-parse", "--short", "HEAD"]))
                    .unwrap_or_else(|| "unknown".into()),
                kvm,
                cpus: std::thread::available_parallelism()
                    .map_or("?".into(), |n| n.get().to_string()),
                memory: memory(),
            };
            let report = Report::from_log(&text, machine);
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            let stem = out_dir.join(format!("{}-{}", report.machine.date, host));
            for (ext, body) in [
                ("json", report.to_json()),
                ("md", report.to_markdown()),
                ("html", report.to_html()),
            ] {
                let path = stem.with_extension(ext);
                std::fs::write(&path, body)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            if report.partial {
                println!(
                    "the report is PARTIAL: see its benchmark table for what failed or did not run"
                );
            }
            Ok(())
        }
        Cmd::Compare { old, new } => {
            print!("{}", compare_text(&read_report(&old)?, &read_report(&new)?));
            Ok(())
        }
    }
}
