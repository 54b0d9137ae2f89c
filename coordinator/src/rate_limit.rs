//! Per-key rate limits as pure token buckets: a key may make `burst` requests at once and
//! `per_second` on average; past that it is told how long to wait.
//!
//! Architecture Invariant: no IO and no clock. Time is an argument (seconds on any
//! monotonic scale), so the rules are unit-tested without sleeping. The HTTP edge owns the
//! one [`RateLimiter`] and decides which [`RateLimit`] a request is held to.

use std::collections::HashMap;

/// Buckets kept before idle (full) ones are forgotten. A forgotten bucket was full, so
/// forgetting it changes no answer: memory stays bounded by the keys that are busy.
const MAX_BUCKETS: usize = 4096;

/// A budget: `per_second` sustained, up to `burst` at once. `per_second == 0` is no limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

impl RateLimit {
    /// No limit at all.
    pub const OFF: RateLimit = RateLimit {
        per_second: 0.0,
        burst: 0.0,
    };

    /// `per_second` with a burst of `burst` (at least one request).
    pub fn new(per_second: f64, burst: f64) -> RateLimit {
        RateLimit {
            per_second: per_second.max(0.0),
            burst: burst.max(1.0),
        }
    }

    pub fn is_off(&self) -> bool {
        self.per_second.is_nan() || self.per_second <= 0.0
    }
}

/// Refused: the key's bucket is empty; a request can succeed after `retry_after_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limit exceeded: retry after {retry_after_secs} s")]
pub struct Throttled {
    /// Whole seconds, rounded up, at least 1 (what `Retry-After` carries).
    pub retry_after_secs: u64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: f64,
    /// The budget it was last charged against (a key's role, hence its budget, is fixed).
    limit: RateLimit,
}

impl Bucket {
    fn refill(&mut self, now: f64) {
        let elapsed = (now - self.updated).max(0.0);
        self.tokens = (self.tokens + elapsed * self.limit.per_second).min(self.limit.burst);
        self.updated = self.updated.max(now);
    }
}

/// One token bucket per key id.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: HashMap<i64, Bucket>,
}

impl RateLimiter {
    pub fn new() -> RateLimiter {
        RateLimiter::default()
    }

    /// Takes one token from `key`'s bucket at time `now`, or says how long to wait.
    pub fn admit(&mut self, key: i64, limit: RateLimit, now: f64) -> Result<(), Throttled> {
        if limit.is_off() {
            return Ok(());
        }
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(&key) {
            self.forget_full(now);
        }
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: limit.burst,
            updated: now,
            limit,
        });
        bucket.limit = limit;
        bucket.refill(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - bucket.tokens) / limit.per_second;
        Err(Throttled {
            retry_after_secs: (wait.ceil() as u64).max(1),
        })
    }

    /// Buckets held now (for tests of the memory bound).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    fn forget_full(&mut self, now: f64) {
        self.buckets.retain(|_, b| {
            b.refill(now);
            b.tokens < b.limit.burst
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let mut limiter = RateLimiter::new();
        let limit = RateLimit::new(2.0, 3.0);
        for _ in 0..3 {
            assert_eq!(limiter.admit(1, limit, 100.0), Ok(()));
        }
        assert_eq!(
            limiter.admit(1, limit, 100.0),
            Err(Throttled {
                retry_after_secs: 1
            })
        );
        // Half a second at 2/s is one token.
        assert_eq!(limiter.admit(1, limit, 100.5), Ok(()));
        assert!(limiter.admit(1, limit, 100.5).is_err());
        // A long pause refills to the burst, not beyond.
        for _ in 0..3 {
            assert_eq!(limiter.admit(1, limit, 1000.0), Ok(()));
        }
        assert!(limiter.admit(1, limit, 1000.0).is_err());
    }

    #[test]
    fn keys_have_their_own_buckets() {
        let mut limiter = RateLimiter::new();
        let limit = RateLimit::new(1.0, 1.0);
        assert!(limiter.admit(1, limit, 0.0).is_ok());
        assert!(limiter.admit(1, limit, 0.0).is_err());
        assert!(limiter.admit(2, limit, 0.0).is_ok());
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        let mut limiter = RateLimiter::new();
        let slow = RateLimit::new(0.1, 1.0);
        assert!(limiter.admit(7, slow, 0.0).is_ok());
        assert_eq!(
            limiter.admit(7, slow, 0.0),
            Err(Throttled {
                retry_after_secs: 10
            })
        );
        assert_eq!(
            limiter.admit(7, slow, 7.5),
            Err(Throttled {
                retry_after_secs: 3
            })
        );
        assert!(limiter.admit(7, slow, 10.0).is_ok());
    }

    #[test]
    fn off_admits_everything_and_keeps_nothing() {
        let mut limiter = RateLimiter::new();
        for _ in 0..10_000 {
            assert!(limiter.admit(1, RateLimit::OFF, 0.0).is_ok());
        }
        assert!(limiter.is_empty());
        assert!(RateLimit::new(0.0, 10.0).is_off());
    }

    #[test]
    fn clock_going_backwards_grants_nothing() {
        let mut limiter = RateLimiter::new();
        let limit = RateLimit::new(1.0, 1.0);
        assert!(limiter.admit(1, limit, 50.0).is_ok());
        assert!(limiter.admit(1, limit, 10.0).is_err());
        assert!(limiter.admit(1, limit, 50.5).is_err());
        assert!(limiter.admit(1, limit, 51.0).is_ok());
    }

    #[test]
    fn memory_is_bounded_by_busy_keys() {
        let mut limiter = RateLimiter::new();
        let limit = RateLimit::new(10.0, 5.0);
        for key in 0..(MAX_BUCKETS as i64 * 3) {
            // Each key makes one request and then is idle for a second: full again.
            assert!(limiter.admit(key, limit, key as f64).is_ok());
        }
        assert!(limiter.len() <= MAX_BUCKETS, "{}", limiter.len());
        // A key that is still draining its bucket is not forgotten.
        let mut limiter = RateLimiter::new();
        for _ in 0..5 {
            assert!(limiter.admit(-1, limit, 0.0).is_ok());
        }
        for key in 0..(MAX_BUCKETS as i64) {
            assert!(limiter.admit(key, limit, 0.0).is_ok());
        }
        assert!(
            limiter.admit(-1, limit, 0.0).is_err(),
            "the busy key kept its empty bucket"
        );
    }
}
