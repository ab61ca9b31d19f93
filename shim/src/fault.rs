//! Fault injection for the runtime's crash tests: `BEACON_FAULT` names steps
//! of the Task API at which the shim kills itself with SIGKILL, as a crash or
//! the OOM killer would, leaving containerd to clean up through `delete`.
//!
//! `BEACON_FAULT=STEP:ID[,STEP:ID...]`: the shim dies at STEP of the
//! container (or exec) ID; `STEP` alone matches every id. Steps:
//! - `create`: the sandbox is up and vminitd created the container, before
//!   containerd hears of it;
//! - `start`: vminitd started the process, before containerd hears of it;
//! - `exec`: vminitd registered the exec, before containerd hears of it;
//! - `delete`: vminitd deleted the process, before the host side is cleaned.
//!
//! Unset or empty, nothing happens; the variable is read once. A malformed
//! entry is refused when read (logged, and no fault armed), never guessed.
//! This module never decides anything else: it only ends the process.

use std::sync::OnceLock;

/// The environment variable (see the module doc).
pub const FAULT_ENV: &str = "BEACON_FAULT";

/// A step of the Task API where a fault can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Create,
    Start,
    Exec,
    Delete,
}

impl Step {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "create" => Some(Self::Create),
            "start" => Some(Self::Start),
            "exec" => Some(Self::Exec),
            "delete" => Some(Self::Delete),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Start => "start",
            Self::Exec => "exec",
            Self::Delete => "delete",
        }
    }
}

/// Armed faults: a step, and the id it applies to (`None`: every id).
pub type Faults = Vec<(Step, Option<String>)>;

/// Parse a `BEACON_FAULT` value.
pub fn parse(value: &str) -> Result<Faults, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|entry| {
            let (step, id) = match entry.split_once(':') {
                Some((s, id)) if !id.is_empty() => (s, Some(id.to_string())),
                Some(_) => return Err(format!("{entry:?}: an id must follow the ':'")),
                None => (entry, None),
            };
            let step = Step::parse(step).ok_or_else(|| {
                format!("{entry:?}: unknown step {step:?}; use create, start, exec or delete")
            })?;
            Ok((step, id))
        })
        .collect()
}

fn armed() -> &'static Faults {
    static FAULTS: OnceLock<Faults> = OnceLock::new();
    FAULTS.get_or_init(|| {
        let value = std::env::var(FAULT_ENV).unwrap_or_default();
        parse(&value).unwrap_or_else(|e| {
            tracing::error!("{FAULT_ENV} refused ({e}); no fault armed");
            Vec::new()
        })
    })
}

/// Whether `faults` end the shim at `step` of `id`.
pub fn matches(faults: &Faults, step: Step, id: &str) -> bool {
    faults
        .iter()
        .any(|(s, want)| *s == step && want.as_deref().is_none_or(|w| w == id))
}

/// The shim reached `step` of `id`: die here if a fault is armed for it.
pub fn at(step: Step, id: &str) {
    if matches(armed(), step, id) {
        tracing::warn!(step = step.name(), id, "fault injection: killing the shim");
        // SAFETY: raise(2) with a constant signal; SIGKILL does not return.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_match_their_step_and_id() {
        let f = parse("start:c1, delete ,exec:e2").expect("parses");
        assert!(matches(&f, Step::Start, "c1"));
        assert!(!matches(&f, Step::Start, "c2"));
        assert!(matches(&f, Step::Delete, "anything"));
        assert!(matches(&f, Step::Exec, "e2"));
        assert!(!matches(&f, Step::Create, "c1"));
        assert_eq!(parse("").expect("empty"), Vec::new());
        for bad in ["boot", "start:", "stop:c1"] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains(bad.split(':').next().unwrap_or(bad)), "{err}");
        }
    }
}
