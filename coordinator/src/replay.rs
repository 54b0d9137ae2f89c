//! Replay protection for signed requests inside the timestamp window: the signatures each
//! key used recently, so an exact copy of a request already accepted is refused.
//!
//! A signed request's `timestamp` must be within [`crate::keys::TIMESTAMP_WINDOW_MS`] of the
//! coordinator's clock; outside it the request is stale. Inside it, this cache remembers
//! every accepted signature until its timestamp leaves the window. Memory is bounded per
//! key: when a key has [`ReplayCache::per_key`] signatures remembered, the oldest (by
//! timestamp) is forgotten and the key's *floor* rises to its timestamp; from then on a
//! request of that key timestamped at or before the floor is refused too, because it could
//! be a copy of a forgotten one. An honest client (timestamps within a few seconds of each
//! other) only meets the floor after `per_key` requests in far less time than the window.
//!
//! Architecture Invariant: pure. Times are arguments (ms since the Unix epoch); no IO.

use std::collections::{BTreeSet, HashMap};

/// Signatures remembered per key by default (about 200 KiB per busy key).
pub const DEFAULT_PER_KEY: usize = 4096;

/// Refused: this key has used this signature already, or the request is older than what
/// the cache can still vouch for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("replayed request")]
pub struct Replayed;

#[derive(Debug, Default)]
struct Seen {
    /// (timestamp ms, signature), ordered by timestamp so the oldest leave first.
    signatures: BTreeSet<(i64, [u8; 32])>,
    /// Requests timestamped at or before this are refused (their signature may have been
    /// forgotten to keep memory bounded).
    floor: Option<i64>,
}

/// Recent signatures of every signed key.
#[derive(Debug)]
pub struct ReplayCache {
    window_ms: i64,
    per_key: usize,
    keys: HashMap<i64, Seen>,
    /// Checks since the last [`ReplayCache::sweep`]; every [`SWEEP_EVERY`] the cache sweeps.
    since_sweep: u32,
}

/// How many checks between sweeps of keys that went quiet.
const SWEEP_EVERY: u32 = 1024;

impl ReplayCache {
    /// Remembers signatures for `window_ms` (the timestamp window), at most `per_key` each.
    pub fn new(window_ms: i64, per_key: usize) -> ReplayCache {
        ReplayCache {
            window_ms,
            per_key: per_key.max(1),
            keys: HashMap::new(),
            since_sweep: 0,
        }
    }

    /// Records that `key` sent `signature` with `timestamp_ms`, at `now_ms`; refuses it if
    /// it was seen before (or may have been). Call only for requests whose signature was
    /// verified and whose timestamp is within the window: the cache trusts both.
    pub fn check(
        &mut self,
        key: i64,
        timestamp_ms: i64,
        signature: [u8; 32],
        now_ms: i64,
    ) -> Result<(), Replayed> {
        self.since_sweep += 1;
        if self.since_sweep >= SWEEP_EVERY {
            self.sweep(now_ms);
        }
        let window = self.window_ms;
        let per_key = self.per_key;
        let seen = self.keys.entry(key).or_default();
        // Entries whose timestamp has left the window would be refused as stale anyway.
        let expired = now_ms - window;
        while let Some(&(at, _)) = seen.signatures.first() {
            if at >= expired {
                break;
            }
            seen.signatures.pop_first();
        }
        if seen.floor.is_some_and(|floor| floor < expired) {
            seen.floor = None;
        }
        if seen.floor.is_some_and(|floor| timestamp_ms <= floor)
            || !seen.signatures.insert((timestamp_ms, signature))
        {
            return Err(Replayed);
        }
        while seen.signatures.len() > per_key {
            if let Some((at, _)) = seen.signatures.pop_first() {
                seen.floor = Some(seen.floor.map_or(at, |f| f.max(at)));
            }
        }
        Ok(())
    }

    /// Forgets keys with nothing left in the window (call now and then).
    pub fn sweep(&mut self, now_ms: i64) {
        self.since_sweep = 0;
        let expired = now_ms - self.window_ms;
        self.keys.retain(|_, seen| {
            seen.signatures.retain(|&(at, _)| at >= expired);
            seen.floor = seen.floor.filter(|&f| f >= expired);
            !seen.signatures.is_empty() || seen.floor.is_some()
        });
    }

    /// Signatures remembered for `key` (tests of the memory bound).
    pub fn remembered(&self, key: i64) -> usize {
        self.keys.get(&key).map_or(0, |s| s.signatures.len())
    }

    /// Keys with something remembered.
    pub fn keys(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(n: u32) -> [u8; 32] {
        let mut s = [0u8; 32];
        s[..4].copy_from_slice(&n.to_be_bytes());
        s
    }

    const WINDOW: i64 = 300_000;

    #[test]
    fn an_exact_replay_is_refused_and_a_new_request_is_not() {
        let mut cache = ReplayCache::new(WINDOW, 16);
        let now = 1_000_000_000;
        assert_eq!(cache.check(1, now, sig(1), now), Ok(()));
        assert_eq!(cache.check(1, now, sig(1), now + 10), Err(Replayed));
        // Same millisecond, different request: a different signature.
        assert_eq!(cache.check(1, now, sig(2), now + 10), Ok(()));
        // Another key may (by chance) send the same bytes.
        assert_eq!(cache.check(2, now, sig(1), now + 10), Ok(()));
    }

    #[test]
    fn the_whole_window_is_covered_then_forgotten() {
        let mut cache = ReplayCache::new(WINDOW, 16);
        let t = 5_000_000;
        assert!(cache.check(1, t, sig(1), t).is_ok());
        // Replayed at the very end of the window: still refused.
        assert_eq!(cache.check(1, t, sig(1), t + WINDOW), Err(Replayed));
        // Past it the entry is gone (the request would be refused as stale before this).
        assert!(cache.check(1, t + WINDOW, sig(9), t + WINDOW + 1).is_ok());
        assert_eq!(cache.remembered(1), 1);
    }

    #[test]
    fn memory_is_bounded_per_key_and_the_floor_refuses_what_was_forgotten() {
        let mut cache = ReplayCache::new(WINDOW, 8);
        let t = 10_000_000;
        for i in 0..100u32 {
            assert!(cache.check(1, t + i64::from(i), sig(i), t + 200).is_ok());
            assert!(cache.remembered(1) <= 8);
        }
        // Signature 0 was forgotten; its replay is still refused, by the floor.
        assert_eq!(cache.check(1, t, sig(0), t + 200), Err(Replayed));
        // Newer than the floor and new: accepted.
        assert!(cache.check(1, t + 150, sig(500), t + 200).is_ok());
        // Older than the floor but never seen: refused (cannot be told from a replay).
        assert_eq!(cache.check(1, t + 10, sig(501), t + 200), Err(Replayed));
    }

    #[test]
    fn the_floor_expires_with_the_window() {
        let mut cache = ReplayCache::new(WINDOW, 1);
        let t = 10_000_000;
        assert!(cache.check(1, t, sig(1), t).is_ok());
        assert!(cache.check(1, t + 1, sig(2), t).is_ok());
        assert_eq!(cache.check(1, t, sig(3), t + 1), Err(Replayed));
        let later = t + WINDOW + 10;
        assert!(cache.check(1, later, sig(4), later).is_ok());
    }

    #[test]
    fn sweep_forgets_idle_keys() {
        let mut cache = ReplayCache::new(WINDOW, 4);
        for key in 0..1000 {
            assert!(cache.check(key, 1_000, sig(1), 1_000).is_ok());
        }
        assert_eq!(cache.keys(), 1000);
        cache.sweep(1_000 + WINDOW - 1);
        assert_eq!(cache.keys(), 1000);
        cache.sweep(1_000 + WINDOW + 1);
        assert_eq!(cache.keys(), 0);
    }
}
