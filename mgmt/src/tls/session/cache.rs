//! The session cache: bounded, sharded by a keyed hash of the session id, entries expiring after
//! the lifetime and wiped when they go. Each entry records the client-auth policy its session
//! was made under ([`super::policy`]); a lookup under another policy finds nothing.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::server::StoresServerSessions;
use zeroize::Zeroizing;

use super::policy::{refused, PolicyDigest, Refusal};

const SHARDS: usize = 16;

struct Entry {
    value: Zeroizing<Vec<u8>>,
    policy: PolicyDigest,
    born: Instant,
    seq: u64,
}

#[derive(Default)]
struct Shard {
    map: HashMap<Vec<u8>, Entry>,
    order: VecDeque<(u64, Vec<u8>)>,
    seq: u64,
}

/// A bounded session store whose entries expire after the lifetime; values are wiped when
/// evicted, expired or taken.
pub struct SessionCache {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    lifetime: Duration,
    hasher: RandomState,
}

impl fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionCache")
            .field("shards", &self.shards.len())
            .field("per_shard", &self.per_shard)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl SessionCache {
    /// A cache of at most `size` entries (> 0) that live at most `lifetime`.
    pub fn new(size: usize, lifetime: Duration) -> Self {
        let size = size.max(1);
        let shards = SHARDS.min(size);
        Self {
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: size.div_ceil(shards),
            lifetime,
            hasher: RandomState::new(),
        }
    }

    /// Entries held now (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map.len()).sum()
    }

    /// Drops (and wipes) every entry.
    pub fn clear(&self) {
        for s in self.shards.iter() {
            let mut s = s.lock();
            s.map.clear();
            s.order.clear();
        }
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &[u8]) -> MutexGuard<'_, Shard> {
        // The hasher is keyed per process, so a client cannot aim its ids at one shard.
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        self.shards[i].lock()
    }

    fn put_at(&self, key: Vec<u8>, policy: PolicyDigest, value: Vec<u8>, now: Instant) -> bool {
        let mut s = self.shard(&key);
        s.seq += 1;
        let seq = s.seq;
        s.order.push_back((seq, key.clone()));
        s.map.insert(
            key,
            Entry {
                value: Zeroizing::new(value),
                policy,
                born: now,
                seq,
            },
        );
        // Oldest first: sweep what has expired, then what is over the bound.
        while let Some((seq, k)) = s.order.front().cloned() {
            let (live, expired) = match s.map.get(&k) {
                Some(e) => (e.seq == seq, now.duration_since(e.born) > self.lifetime),
                None => (false, false),
            };
            if !live {
                s.order.pop_front();
            } else if expired || s.map.len() > self.per_shard {
                s.order.pop_front();
                s.map.remove(&k);
            } else {
                break;
            }
        }
        if s.order.len() > 2 * self.per_shard + 16 {
            let Shard { map, order, .. } = &mut *s;
            order.retain(|(seq, k)| map.get(k).is_some_and(|e| e.seq == *seq));
        }
        true
    }

    /// The entry for `key` if it is live; `Err` when it was made under another policy than
    /// `policy` (left in place: it is not this lookup's to take, and it expires as usual).
    fn get_at(
        &self,
        key: &[u8],
        policy: &PolicyDigest,
        now: Instant,
        take: bool,
    ) -> Result<Option<Vec<u8>>, Refusal> {
        let mut s = self.shard(key);
        let Some(entry) = s.map.get(key) else {
            return Ok(None);
        };
        let expired = now.duration_since(entry.born) > self.lifetime;
        if !expired && entry.policy != *policy {
            return Err(Refusal::PolicyChanged);
        }
        if expired || take {
            let e = s.map.remove(key);
            return Ok(e.filter(|_| !expired).map(|e| e.value.to_vec()));
        }
        Ok(s.map.get(key).map(|e| e.value.to_vec()))
    }
}

/// A listener's session cache as one snapshot's rustls configuration uses it: entries are stored
/// with that snapshot's client-auth policy, and only entries made under it are found. The
/// [`SessionCache`] is shared by every snapshot of the listener.
#[derive(Debug)]
pub struct BoundCache {
    inner: Arc<SessionCache>,
    policy: PolicyDigest,
    listener: String,
}

impl BoundCache {
    /// `inner`, for sessions of `listener` under `policy`.
    pub fn new(inner: Arc<SessionCache>, policy: PolicyDigest, listener: &str) -> Self {
        Self {
            inner,
            policy,
            listener: listener.to_owned(),
        }
    }

    fn lookup(&self, key: &[u8], take: bool) -> Option<Vec<u8>> {
        match self.inner.get_at(key, &self.policy, Instant::now(), take) {
            Ok(v) => v,
            Err(reason) => {
                refused(&self.listener, reason);
                None
            }
        }
    }
}

impl StoresServerSessions for BoundCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.inner.put_at(key, self.policy, value, Instant::now())
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lookup(key, false)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lookup(key, true)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> PolicyDigest {
        PolicyDigest::no_client_auth()
    }

    #[test]
    fn the_cache_is_bounded_and_expires() {
        let c = SessionCache::new(32, Duration::from_secs(10));
        let t = Instant::now();
        for i in 0..1000u32 {
            c.put_at(i.to_be_bytes().to_vec(), p(), vec![1; 8], t);
        }
        assert!(c.len() <= 32, "{} entries", c.len());
        let k = b"fresh".to_vec();
        let get = |at: Instant, take: bool| c.get_at(&k, &p(), at, take).expect("same policy");
        c.put_at(k.clone(), p(), b"v".to_vec(), t);
        assert_eq!(get(t + Duration::from_secs(10), false), Some(b"v".to_vec()));
        assert_eq!(get(t + Duration::from_secs(11), false), None);
        assert_eq!(get(t, false), None, "expired entries are removed");
        c.put_at(k.clone(), p(), b"v".to_vec(), t);
        assert_eq!(get(t, true), Some(b"v".to_vec()));
        assert_eq!(get(t, true), None, "take is single use");
        c.put_at(k.clone(), p(), b"v".to_vec(), t);
        c.clear();
        assert!(c.is_empty());
    }

    #[test]
    fn an_entry_made_under_another_client_auth_policy_is_not_found() {
        use crate::tls::client_auth::ClientAuthMode;
        let c = Arc::new(SessionCache::new(32, Duration::from_secs(10)));
        let required = PolicyDigest::client_auth(
            ClientAuthMode::Required,
            &[rustls_pki_types::CertificateDer::from(vec![1u8])],
        );
        let before = BoundCache::new(c.clone(), p(), "l");
        let after = BoundCache::new(c.clone(), required, "l");
        assert!(before.put(b"id".to_vec(), b"state".to_vec()));
        assert_eq!(after.get(b"id"), None);
        assert_eq!(after.take(b"id"), None);
        // Refused, not consumed: the entry is still the old policy's.
        assert_eq!(before.get(b"id"), Some(b"state".to_vec()));
        assert!(after.put(b"id2".to_vec(), b"new".to_vec()));
        assert_eq!(after.take(b"id2"), Some(b"new".to_vec()));
    }
}
