//! Rate limiting for log lines a guest can provoke at will.
//!
//! A hostile guest can repeat a bad access or a malformed descriptor millions of
//! times a second; logging each would fill the host's disk and cost more than the
//! access itself. [`Throttle`] lets one line through per interval and counts what
//! it held back, so the next line says how many were suppressed.

use std::time::{Duration, Instant};

/// Default interval between two log lines of the same kind.
pub const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// One kind of guest-triggered log line.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new(LOG_INTERVAL)
    }
}

impl Throttle {
    /// At most one line per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were held back
    /// since the previous one; `None` when this one must be dropped.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed = self.suppressed.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_a_count() {
        let mut t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(t.allow(), None);
        }
        t.last = Some(Instant::now() - Duration::from_secs(7200));
        assert_eq!(t.allow(), Some(1000));
    }
}
