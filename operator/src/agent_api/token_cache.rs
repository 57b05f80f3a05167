//! Remembers what the API server said about a bearer token for a short while, so an
//! agent's reports and long-polls do not cost one TokenReview each. Keyed by the
//! token's sha256 (the tokens themselves are not kept), bounded in size.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an accepted token is trusted without asking again, at most: never past
/// the token's own expiry, and not once the pod it is bound to has been deleted
/// (the agent API checks both before it takes a verdict from here).
pub const ACCEPTED_TTL: Duration = Duration::from_secs(60);
/// How long a rejected token is refused without asking again; short, so that a
/// token that was not yet valid (clock skew, a pod just created) recovers soon.
pub const REJECTED_TTL: Duration = Duration::from_secs(10);
/// Most tokens remembered; well above one per agent of a large fleet.
pub const CAPACITY: usize = 20_000;

pub struct TokenCache<T> {
    capacity: usize,
    entries: Mutex<HashMap<[u8; 32], Entry<T>>>,
}

struct Entry<T> {
    verdict: T,
    expires: Instant,
}

impl<T: Clone> TokenCache<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The remembered verdict on `token`, unless it expired.
    pub fn get(&self, token: &str, now: Instant) -> Option<T> {
        let key = token_key(token);
        let mut entries = self.lock();
        match entries.get(&key) {
            Some(entry) if entry.expires > now => Some(entry.verdict.clone()),
            Some(_) => {
                entries.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Remembers `verdict` on `token` for `ttl`. When full, expired entries go
    /// first, then the one closest to expiry.
    pub fn put(&self, token: &str, verdict: T, ttl: Duration, now: Instant) {
        let key = token_key(token);
        let mut entries = self.lock();
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            entries.retain(|_, entry| entry.expires > now);
            if entries.len() >= self.capacity {
                let soonest = entries
                    .iter()
                    .min_by_key(|(_, entry)| entry.expires)
                    .map(|(key, _)| *key);
                if let Some(soonest) = soonest {
                    entries.remove(&soonest);
                }
            }
        }
        entries.insert(
            key,
            Entry {
                verdict,
                expires: now + ttl,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry<T>>> {
        crate::runtime::lock(&self.entries)
    }
}

pub fn token_key(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_expiry() {
        let cache = TokenCache::new(10);
        let now = Instant::now();
        assert_eq!(cache.get("t1", now), None);
        cache.put("t1", "ok", Duration::from_secs(60), now);
        assert_eq!(cache.get("t1", now + Duration::from_secs(59)), Some("ok"));
        assert_eq!(cache.get("t2", now), None);
        assert_eq!(cache.get("t1", now + Duration::from_secs(60)), None);
        assert!(cache.is_empty(), "an expired entry is dropped when read");
    }

    #[test]
    fn stays_within_capacity() {
        let cache = TokenCache::new(3);
        let now = Instant::now();
        cache.put("short", 1, Duration::from_secs(1), now);
        cache.put("long-a", 2, Duration::from_secs(100), now);
        cache.put("long-b", 3, Duration::from_secs(100), now);
        // Full: the entry closest to expiry makes room.
        cache.put("new", 4, Duration::from_secs(100), now);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get("short", now), None);
        assert_eq!(cache.get("new", now), Some(4));
        // Replacing a known token needs no room.
        cache.put("new", 5, Duration::from_secs(100), now);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get("long-a", now), Some(2));
        // Expired entries go before live ones.
        let later = now + Duration::from_secs(150);
        cache.put("fresh", 6, Duration::from_secs(100), later);
        assert_eq!(cache.len(), 1);
    }
}
