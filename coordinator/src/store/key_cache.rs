//! [`CachedKeys`]: a [`KeyStore`] that remembers keys it looked up, so an authenticated
//! request costs no database read.
//!
//! A revoke through this store (`DELETE /api/v1/keys/{id}`) drops the key from the cache
//! before it answers: the next request with it is refused. A revoke made by another process
//! (`lull-coordinator keys revoke` while this one runs) is seen once the entry is older than
//! [`CachedKeys::ttl`]. Unknown tokens are not cached (a key created by the CLI works at
//! once); the cache holds at most [`MAX_ENTRIES`] keys and starts over when full.

use super::{KeyStore, StoreError};
use crate::keys::{ApiKey, NewKey};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Most keys held at once.
pub const MAX_ENTRIES: usize = 1024;
/// How long a looked-up key is trusted before it is read again.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);

pub struct CachedKeys {
    inner: Arc<dyn KeyStore>,
    ttl: Duration,
    /// token hash → (key, when it was read).
    entries: Mutex<HashMap<String, (ApiKey, Instant)>>,
    /// Bumped by every revoke: a lookup that read the database before a revoke finished
    /// does not cache what it read.
    revokes: AtomicU64,
}

impl CachedKeys {
    pub fn new(inner: Arc<dyn KeyStore>, ttl: Duration) -> CachedKeys {
        CachedKeys {
            inner,
            ttl,
            entries: Mutex::new(HashMap::new()),
            revokes: AtomicU64::new(0),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, (ApiKey, Instant)>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl KeyStore for CachedKeys {
    async fn create_key(&self, key: &NewKey, now: f64) -> Result<ApiKey, StoreError> {
        self.inner.create_key(key, now).await
    }

    async fn keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        self.inner.keys().await
    }

    async fn key_by_token_hash(&self, token_hash: &str) -> Result<Option<ApiKey>, StoreError> {
        if let Some((key, at)) = self.entries().get(token_hash)
            && at.elapsed() < self.ttl
        {
            return Ok(Some(key.clone()));
        }
        let revokes = self.revokes.load(Ordering::SeqCst);
        let found = self.inner.key_by_token_hash(token_hash).await?;
        let mut entries = self.entries();
        match &found {
            Some(_) if self.revokes.load(Ordering::SeqCst) != revokes => {}
            Some(key) => {
                if entries.len() >= MAX_ENTRIES {
                    entries.clear();
                }
                entries.insert(token_hash.to_string(), (key.clone(), Instant::now()));
            }
            None => {
                entries.remove(token_hash);
            }
        }
        Ok(found)
    }

    async fn revoke_key(&self, key_id: i64, now: f64) -> Result<Option<ApiKey>, StoreError> {
        // Dropped before and after, and lookups in flight meanwhile cache nothing: no path
        // leaves the unrevoked key cached.
        self.revokes.fetch_add(1, Ordering::SeqCst);
        self.entries().retain(|_, (key, _)| key.key_id != key_id);
        let revoked = self.inner.revoke_key(key_id, now).await;
        self.revokes.fetch_add(1, Ordering::SeqCst);
        self.entries().retain(|_, (key, _)| key.key_id != key_id);
        revoked
    }
}
