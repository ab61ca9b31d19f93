//! `make test`'s closing report: the wall time and counts of every test binary
//! (suite) that `cargo test` ran, the timed phases around it (lint, build, the
//! relocated-checkout run), the lab's freeze-and-retry warnings, and one closing
//! `tests: N passed, N failed, N skipped` line.
//!
//! [`SuiteTracker`] reads `cargo test`'s merged stdout and stderr line by line (the
//! `beacon-test-report suites` command passes every line through unchanged); the
//! results go to a tab-separated log that [`summary`] turns into the report. This
//! module never decides whether a run passed: exit codes do.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// How a suite or phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Failed,
    /// The binary ended without libtest's `test result:` line (crashed or killed).
    NoResult,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "FAILED",
            Status::NoResult => "NO-RESULT",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "ok" => Some(Status::Ok),
            "FAILED" => Some(Status::Failed),
            "NO-RESULT" => Some(Status::NoResult),
            _ => None,
        }
    }
}

/// One line of the log: a test binary's run, or a timed phase (no counts).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// `suite` or `phase`.
    pub kind: String,
    /// Which run it belongs to (`main`, `relocated`, ...).
    pub group: String,
    pub name: String,
    pub status: Status,
    pub seconds: f64,
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Record {
    /// The log line (tab-separated, no tabs or newlines inside fields).
    pub fn to_line(&self) -> String {
        let clean = |s: &str| s.replace(['\t', '\n'], " ");
        format!(
            "{}\t{}\t{}\t{}\t{:.3}\t{}\t{}\t{}\n",
            clean(&self.kind),
            clean(&self.group),
            clean(&self.name),
            self.status.as_str(),
            self.seconds,
            self.passed,
            self.failed,
            self.ignored
        )
    }

    pub fn from_line(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.trim_end_matches('\n').split('\t').collect();
        let [kind, group, name, status, seconds, passed, failed, ignored] = f[..] else {
            return None;
        };
        Some(Record {
            kind: kind.into(),
            group: group.into(),
            name: name.into(),
            status: Status::parse(status)?,
            seconds: seconds.parse().ok()?,
            passed: passed.parse().ok()?,
            failed: failed.parse().ok()?,
            ignored: ignored.parse().ok()?,
        })
    }
}

/// The counts of libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TestResult {
    ok: bool,
    passed: u64,
    failed: u64,
    ignored: u64,
}

fn parse_test_result(line: &str) -> Option<TestResult> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (verdict, counts) = rest.split_once(". ")?;
    let count = |what: &str| -> Option<u64> {
        counts
            .split(';')
            .map(str::trim)
            .find_map(|c| c.strip_suffix(what).map(str::trim))?
            .parse()
            .ok()
    };
    Some(TestResult {
        ok: verdict == "ok",
        passed: count(" passed")?,
        failed: count(" failed")?,
        ignored: count(" ignored").unwrap_or(0),
    })
}

/// `     Running tests/lab_boot.rs (target/debug/deps/lab_boot-0123abcd)` gives
/// `lab_boot: tests/lab_boot.rs`; `   Doc-tests beacon_vmm` gives
/// `beacon_vmm: doc-tests`.
fn parse_suite_start(line: &str) -> Option<String> {
    let indented = line.starts_with(' ');
    let line = line.trim();
    if !indented {
        return None;
    }
    if let Some(krate) = line.strip_prefix("Doc-tests ") {
        if !krate.is_empty() && !krate.contains(' ') {
            return Some(format!("{krate}: doc-tests"));
        }
        return None;
    }
    let rest = line.strip_prefix("Running ")?;
    let (source, binary) = rest.strip_suffix(')')?.rsplit_once(" (")?;
    let file = binary.rsplit('/').next()?;
    // Test binaries are named `<crate>-<16 hex digits>`.
    let stem = match file.rsplit_once('-') {
        Some((stem, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            stem
        }
        _ => file,
    };
    Some(format!("{stem}: {source}"))
}

/// Strip ANSI colour sequences (`ESC [ ... m`), in case colour was forced on.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Follows `cargo test` output and records each suite as it ends.
#[derive(Debug)]
pub struct SuiteTracker {
    group: String,
    current: Option<OpenSuite>,
    done: Vec<Record>,
}

#[derive(Debug)]
struct OpenSuite {
    name: String,
    started: Instant,
    /// The last `test result:` line seen and when (a failing test's captured
    /// output may quote a child's result line before the suite's own).
    result: Option<(TestResult, Instant)>,
}

impl SuiteTracker {
    pub fn new(group: &str) -> Self {
        Self {
            group: group.to_string(),
            current: None,
            done: Vec::new(),
        }
    }

    /// Feed one output line that arrived at `now`; returns the suite it finished,
    /// if any.
    pub fn line(&mut self, line: &str, now: Instant) -> Option<Record> {
        let line = strip_ansi(line);
        if let Some(name) = parse_suite_start(&line) {
            let finished = self.close(now);
            self.current = Some(OpenSuite {
                name,
                started: now,
                result: None,
            });
            return finished;
        }
        if let (Some(open), Some(result)) = (self.current.as_mut(), parse_test_result(&line)) {
            open.result = Some((result, now));
        }
        None
    }

    /// The output ended (at `now`): close the open suite.
    pub fn finish(&mut self, now: Instant) -> Option<Record> {
        self.close(now)
    }

    /// Every suite finished so far, in run order.
    pub fn records(&self) -> &[Record] {
        &self.done
    }

    fn close(&mut self, now: Instant) -> Option<Record> {
        let open = self.current.take()?;
        let (status, end, counts) = match open.result {
            Some((r, at)) => (
                if r.ok { Status::Ok } else { Status::Failed },
                at,
                (r.passed, r.failed, r.ignored),
            ),
            None => (Status::NoResult, now, (0, 0, 0)),
        };
        let record = Record {
            kind: "suite".into(),
            group: self.group.clone(),
            name: open.name,
            status,
            seconds: end.saturating_duration_since(open.started).as_secs_f64(),
            passed: counts.0,
            failed: counts.1,
            ignored: counts.2,
        };
        self.done.push(record.clone());
        Some(record)
    }
}

/// A phase's record (lint, build, ...): its wall time and whether it succeeded.
pub fn phase(group: &str, name: &str, took: Duration, ok: bool) -> Record {
    Record {
        kind: "phase".into(),
        group: group.into(),
        name: name.into(),
        status: if ok { Status::Ok } else { Status::Failed },
        seconds: took.as_secs_f64(),
        passed: 0,
        failed: 0,
        ignored: 0,
    }
}

/// The report: per group, phases then suites (slowest first) with times and
/// counts; the lab warnings; the total; and the closing counts line.
pub fn summary(records: &[Record], lab_warnings: &str, total: Option<Duration>) -> String {
    let mut out = String::from("\n== make test: where the time went\n");
    let mut groups: Vec<&str> = Vec::new();
    for r in records {
        if !groups.contains(&r.group.as_str()) {
            groups.push(&r.group);
        }
    }
    let width = records
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(20, 70);
    for group in groups {
        let _ = writeln!(out, "-- {group}");
        let mut mine: Vec<&Record> = records.iter().filter(|r| r.group == group).collect();
        // Phases in the order they ran, then suites slowest first.
        mine.sort_by(|a, b| match (a.kind.as_str(), b.kind.as_str()) {
            ("phase", "phase") => std::cmp::Ordering::Equal,
            ("phase", _) => std::cmp::Ordering::Less,
            (_, "phase") => std::cmp::Ordering::Greater,
            _ => b.seconds.total_cmp(&a.seconds),
        });
        let mut suite_seconds = 0.0;
        let mut suites = 0;
        for r in mine {
            let counts = if r.kind == "suite" {
                suite_seconds += r.seconds;
                suites += 1;
                format!(
                    "  {} passed, {} failed, {} ignored",
                    r.passed, r.failed, r.ignored
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{:<6}{:<width$}{:>9.1} s  {:<9}{counts}",
                r.kind,
                r.name,
                r.seconds,
                r.status.as_str(),
            );
        }
        if suites > 0 {
            let _ = writeln!(out, "{suites} test binaries, {suite_seconds:.1} s in all");
        }
    }
    let warnings: Vec<&str> = lab_warnings.lines().filter(|l| !l.is_empty()).collect();
    if warnings.is_empty() {
        out.push_str("lab: no frozen lab VM was retried\n");
    } else {
        let _ = writeln!(
            out,
            "lab: {} frozen lab VM(s) started over (the tests passed only on a retry):",
            warnings.len()
        );
        for w in warnings {
            let _ = writeln!(out, "  {w}");
        }
    }
    let bad: Vec<String> = records
        .iter()
        .filter(|r| r.status != Status::Ok)
        .map(|r| format!("{} {} ({})", r.group, r.name, r.status.as_str()))
        .collect();
    if !bad.is_empty() {
        let _ = writeln!(out, "not ok: {}", bad.join("; "));
    }
    if let Some(total) = total {
        let _ = writeln!(out, "total: {:.1} s", total.as_secs_f64());
    }
    let suites = records.iter().filter(|r| r.kind == "suite");
    let (passed, failed, ignored) = suites.fold((0, 0, 0), |(p, f, i), r| {
        (p + r.passed, f + r.failed, i + r.ignored)
    });
    let _ = writeln!(
        out,
        "tests: {passed} passed, {failed} failed, {ignored} skipped"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CARGO_OUTPUT: &str = "\
   Compiling beacon-tests v0.1.0 (/tmp/x/tests)
    Finished `test` profile [unoptimized + debuginfo] target(s) in 9.10s
     Running unittests src/lib.rs (/tmp/x/target/debug/deps/beacon_tests-0123456789abcdef)

running 2 tests
test a ... ok
test b ... ok

test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s

     Running tests/lab_boot.rs (target/debug/deps/lab_boot-fedcba9876543210)

running 1 test
test boots ... FAILED

failures:

---- boots stdout ----
test result: ok. 9 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s
thread 'boots' panicked

test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.00s

error: test failed, to rerun pass `-p beacon-tests --test lab_boot`
     Running tests/crash.rs (target/debug/deps/crash-00112233445566ff)

running 1 test
error: test failed, to rerun pass `-p beacon-tests --test crash`
   Doc-tests beacon_vmm

running 0 tests

test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
";

    #[test]
    fn suites_times_and_counts_from_cargo_output() {
        let t0 = Instant::now();
        let mut tracker = SuiteTracker::new("main");
        for (i, line) in CARGO_OUTPUT.lines().enumerate() {
            tracker.line(line, t0 + Duration::from_secs(i as u64));
        }
        tracker.finish(t0 + Duration::from_secs(100));
        let r = tracker.records();
        let names: Vec<&str> = r.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "beacon_tests: unittests src/lib.rs",
                "lab_boot: tests/lab_boot.rs",
                "crash: tests/crash.rs",
                "beacon_vmm: doc-tests"
            ]
        );
        assert_eq!((r[0].status, r[0].passed, r[0].ignored), (Status::Ok, 2, 1));
        // Running on line 2, its result on line 8.
        assert_eq!(r[0].seconds, 6.0);
        // The suite's own (last) result line wins over a quoted one.
        assert_eq!(
            (r[1].status, r[1].passed, r[1].failed),
            (Status::Failed, 0, 1)
        );
        assert_eq!(r[2].status, Status::NoResult);
        assert_eq!(r[3].status, Status::Ok);
        assert!(r.iter().all(|r| r.group == "main" && r.kind == "suite"));
    }

    #[test]
    fn lines_that_only_look_like_cargo_are_ignored() {
        let mut tracker = SuiteTracker::new("main");
        let t = Instant::now();
        for line in [
            "Running tests/x.rs (target/debug/deps/x-0123456789abcdef)",
            "  running something else",
            "test result: ok. 1 passed; 0 failed; 0 ignored",
            "   Doc-tests two words",
        ] {
            assert_eq!(tracker.line(line, t), None);
        }
        assert_eq!(tracker.finish(t), None);
        assert!(tracker.records().is_empty());
        // Forced colour still counts.
        tracker.line(
            "\u{1b}[1m\u{1b}[92m     Running\u{1b}[0m tests/y.rs (deps/y)",
            t,
        );
        let r = tracker.finish(t).expect("suite");
        assert_eq!(
            (r.name.as_str(), r.status),
            ("y: tests/y.rs", Status::NoResult)
        );
    }

    #[test]
    fn records_round_trip_through_the_log() {
        let r = Record {
            kind: "suite".into(),
            group: "relocated".into(),
            name: "a\tb".into(),
            status: Status::NoResult,
            seconds: 1.5,
            passed: 3,
            failed: 1,
            ignored: 2,
        };
        let back = Record::from_line(&r.to_line()).expect("parse");
        assert_eq!(back.name, "a b");
        assert_eq!(
            (
                back.status,
                back.seconds,
                back.passed,
                back.failed,
                back.ignored
            ),
            (Status::NoResult, 1.5, 3, 1, 2)
        );
        assert_eq!(Record::from_line("garbage"), None);
    }

    #[test]
    fn summary_shows_times_warnings_and_closing_counts() {
        let suite = |group: &str, name: &str, s: f64, p, f| Record {
            kind: "suite".into(),
            group: group.into(),
            name: name.into(),
            status: if f == 0 { Status::Ok } else { Status::Failed },
            seconds: s,
            passed: p,
            failed: f,
            ignored: 1,
        };
        let records = vec![
            phase("main", "lint", Duration::from_secs(40), true),
            suite("main", "fast: tests/fast.rs", 0.5, 10, 0),
            suite("main", "slow: tests/slow.rs", 300.0, 2, 0),
            suite("relocated", "pid1: tests/pid1.rs", 2.0, 0, 1),
        ];
        let text = summary(
            &records,
            "beacon-lab: WARNING: the lab VM froze\n",
            Some(Duration::from_secs(1000)),
        );
        let slow = text.find("slow: tests/slow.rs").expect("slow listed");
        let fast = text.find("fast: tests/fast.rs").expect("fast listed");
        assert!(
            text.find("lint").expect("phase") < slow && slow < fast,
            "{text}"
        );
        assert!(text.contains("300.0 s"), "{text}");
        assert!(text.contains("-- relocated"), "{text}");
        assert!(text.contains("1 frozen lab VM(s) started over"), "{text}");
        assert!(text.contains("not ok: relocated pid1: tests/pid1.rs (FAILED)"));
        assert!(text.contains("total: 1000.0 s"), "{text}");
        assert!(
            text.ends_with("\ntests: 12 passed, 1 failed, 3 skipped\n"),
            "{text}"
        );
        assert!(summary(&[], "", None).contains("lab: no frozen lab VM was retried"));
    }
}
