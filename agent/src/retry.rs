//! Retrying calls to a coordinator that may be down for a while: exponential backoff, and
//! logging that says "it is failing" once instead of on every attempt.

use std::fmt::Display;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Exponential backoff: `initial`, doubling up to `max`, with ±10 % jitter so that a fleet of
/// agents does not hammer a restarted coordinator in lockstep.
#[derive(Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    current: Option<Duration>,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            current: None,
        }
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = match self.current {
            None => self.initial,
            Some(previous) => previous.saturating_mul(2).min(self.max),
        };
        self.current = Some(delay);
        delay.mul_f64(rand::random_range(0.9..=1.1))
    }

    /// True when no failure happened since the last success.
    pub(crate) fn is_fresh(&self) -> bool {
        self.current.is_none()
    }

    pub(crate) fn reset(&mut self) {
        self.current = None;
    }
}

/// Logs a repeated failure at `warn` once per [`FailureLog::WARN_EVERY`] and at `debug`
/// otherwise, and says so at `info` when things work again.
#[derive(Debug)]
pub(crate) struct FailureLog {
    what: &'static str,
    failures: u64,
    last_warned: Option<Instant>,
}

impl FailureLog {
    const WARN_EVERY: Duration = Duration::from_secs(30);

    pub(crate) fn new(what: &'static str) -> Self {
        FailureLog {
            what,
            failures: 0,
            last_warned: None,
        }
    }

    pub(crate) fn failed(&mut self, error: &dyn Display) {
        self.failures += 1;
        let what = self.what;
        let failures = self.failures;
        let due = self
            .last_warned
            .is_none_or(|at| at.elapsed() >= Self::WARN_EVERY);
        if due {
            self.last_warned = Some(Instant::now());
            warn!(failures, "{what} failed: {error}");
        } else {
            debug!(failures, "{what} failed: {error}");
        }
    }

    pub(crate) fn succeeded(&mut self) {
        if self.failures > 0 {
            let what = self.what;
            info!(failures = self.failures, "{what} works again");
        }
        self.failures = 0;
        self.last_warned = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let within = |d: Duration, nominal_ms: f64| {
            let ms = d.as_secs_f64() * 1000.0;
            ms >= nominal_ms * 0.89 && ms <= nominal_ms * 1.11
        };
        assert!(backoff.is_fresh());
        for nominal in [100.0, 200.0, 400.0, 800.0, 1600.0, 2000.0, 2000.0] {
            let delay = backoff.next_delay();
            assert!(
                within(delay, nominal),
                "{delay:?} is not about {nominal} ms"
            );
        }
        assert!(!backoff.is_fresh());
        backoff.reset();
        assert!(within(backoff.next_delay(), 100.0));
    }
}
