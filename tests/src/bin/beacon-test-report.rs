//! `beacon-test-report`: the timing report of `make test` (see `tests/run-all`).
//!
//! ```text
//! cargo test ... 2>&1 | beacon-test-report suites --log LOG --group main
//! beacon-test-report phase --log LOG --group main --name lint -- make lint
//! beacon-test-report summary --log LOG --lab-warnings FILE --since UNIX_SECONDS
//! ```

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use beacon_tests::report::{phase, summary, Record, SuiteTracker};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about = "Per-suite wall times and the closing report of `make test`")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Pass `cargo test` output (stdin) through unchanged, logging each test binary.
    Suites {
        #[arg(long)]
        log: PathBuf,
        #[arg(long, default_value = "main")]
        group: String,
    },
    /// Run a command, log its wall time, and exit with its exit code.
    Phase {
        #[arg(long)]
        log: PathBuf,
        #[arg(long, default_value = "main")]
        group: String,
        #[arg(long)]
        name: String,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Print the report from the log.
    Summary {
        #[arg(long)]
        log: PathBuf,
        /// The lab's freeze-and-retry lines (BEACON_LAB_WARNINGS); may be absent.
        #[arg(long)]
        lab_warnings: Option<PathBuf>,
        /// When the run started (seconds since the epoch), for the total.
        #[arg(long)]
        since: Option<f64>,
    },
}

fn append(log: &Path, record: &Record) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    f.write_all(record.to_line().as_bytes())
        .with_context(|| format!("writing {}", log.display()))
}

fn suites(log: &Path, group: &str) -> anyhow::Result<()> {
    let mut tracker = SuiteTracker::new(group);
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut out = std::io::stdout().lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        if input
            .read_until(b'\n', &mut line)
            .context("reading stdin")?
            == 0
        {
            break;
        }
        // Pass through first (a closed stdout must not stop the run it reports on).
        let _ = out.write_all(&line).and_then(|()| out.flush());
        if let Some(done) = tracker.line(&String::from_utf8_lossy(&line), Instant::now()) {
            append(log, &done)?;
        }
    }
    if let Some(done) = tracker.finish(Instant::now()) {
        append(log, &done)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Suites { log, group } => suites(&log, &group),
        Cmd::Phase {
            log,
            group,
            name,
            command,
        } => {
            let start = Instant::now();
            let status = std::process::Command::new(&command[0])
                .args(&command[1..])
                .status()
                .with_context(|| format!("running {}", command[0]))?;
            append(
                &log,
                &phase(&group, &name, start.elapsed(), status.success()),
            )?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Summary {
            log,
            lab_warnings,
            since,
        } => {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let records: Vec<Record> = text.lines().filter_map(Record::from_line).collect();
            if records.is_empty() {
                bail!("{} holds no results: nothing ran", log.display());
            }
            let warnings = lab_warnings
                .map(|p| std::fs::read_to_string(p).unwrap_or_default())
                .unwrap_or_default();
            let total = since.and_then(|s| {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
                now.checked_sub(Duration::try_from_secs_f64(s).ok()?)
            });
            print!("{}", summary(&records, &warnings, total));
            Ok(())
        }
    }
}
