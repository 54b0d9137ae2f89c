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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyMode, Role, hash_token};
    use std::sync::atomic::AtomicUsize;

    /// Keys in memory, counting lookups.
    #[derive(Default)]
    struct Counting {
        keys: Mutex<Vec<ApiKey>>,
        lookups: AtomicUsize,
    }

    #[async_trait]
    impl KeyStore for Counting {
        async fn create_key(&self, key: &NewKey, now: f64) -> Result<ApiKey, StoreError> {
            let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
            let stored = ApiKey {
                key_id: keys.len() as i64 + 1,
                name: key.name.clone(),
                role: key.role,
                mode: key.mode,
                token_hash: key.token_hash(),
                secret: key.secret.clone(),
                created_at: now,
                revoked_at: None,
            };
            keys.push(stored.clone());
            Ok(stored)
        }

        async fn keys(&self) -> Result<Vec<ApiKey>, StoreError> {
            Ok(self
                .keys
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone())
        }

        async fn key_by_token_hash(&self, hash: &str) -> Result<Option<ApiKey>, StoreError> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
            Ok(keys.iter().find(|k| k.token_hash == hash).cloned())
        }

        async fn revoke_key(&self, key_id: i64, now: f64) -> Result<Option<ApiKey>, StoreError> {
            let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
            let key = keys.iter_mut().find(|k| k.key_id == key_id);
            Ok(key.map(|k| {
                k.revoked_at.get_or_insert(now);
                k.clone()
            }))
        }
    }

    #[tokio::test]
    async fn lookups_are_cached_until_a_revoke_through_the_cache() {
        let inner = Arc::new(Counting::default());
        let cache = CachedKeys::new(inner.clone(), Duration::from_secs(3600));
        let new = NewKey::generate("a", Role::Viewer, KeyMode::Simple);
        let key = cache.create_key(&new, 1.0).await.expect("create");
        let hash = hash_token(&new.token);
        for _ in 0..10 {
            let found = cache.key_by_token_hash(&hash).await.expect("lookup");
            assert_eq!(found.map(|k| k.revoked_at), Some(None));
        }
        assert_eq!(inner.lookups.load(Ordering::SeqCst), 1);
        // Unknown tokens are not remembered: a key created elsewhere works at once.
        assert!(
            cache
                .key_by_token_hash("nope")
                .await
                .expect("lookup")
                .is_none()
        );
        assert!(
            cache
                .key_by_token_hash("nope")
                .await
                .expect("lookup")
                .is_none()
        );
        assert_eq!(inner.lookups.load(Ordering::SeqCst), 3);

        cache.revoke_key(key.key_id, 2.0).await.expect("revoke");
        let found = cache.key_by_token_hash(&hash).await.expect("lookup");
        assert_eq!(found.and_then(|k| k.revoked_at), Some(2.0));
    }

    #[tokio::test]
    async fn a_revoke_elsewhere_is_seen_after_the_ttl() {
        let inner = Arc::new(Counting::default());
        let cache = CachedKeys::new(inner.clone(), Duration::ZERO);
        let new = NewKey::generate("a", Role::Viewer, KeyMode::Simple);
        let key = cache.create_key(&new, 1.0).await.expect("create");
        let hash = hash_token(&new.token);
        assert!(
            cache
                .key_by_token_hash(&hash)
                .await
                .expect("lookup")
                .is_some()
        );
        // Revoked behind the cache's back (another process, the CLI).
        inner.revoke_key(key.key_id, 2.0).await.expect("revoke");
        let found = cache.key_by_token_hash(&hash).await.expect("lookup");
        assert_eq!(found.and_then(|k| k.revoked_at), Some(2.0));
    }
}
