//! The session cache: bounded, sharded by a keyed hash of the session id, entries expiring after
//! the lifetime and wiped when they go.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::server::StoresServerSessions;
use zeroize::Zeroizing;

use super::lock;

const SHARDS: usize = 16;

struct Entry {
    value: Zeroizing<Vec<u8>>,
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
        self.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    /// Drops (and wipes) every entry.
    pub fn clear(&self) {
        for s in self.shards.iter() {
            let mut s = lock(s);
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
        lock(&self.shards[i])
    }

    fn put_at(&self, key: Vec<u8>, value: Vec<u8>, now: Instant) -> bool {
        let mut s = self.shard(&key);
        s.seq += 1;
        let seq = s.seq;
        s.order.push_back((seq, key.clone()));
        s.map.insert(
            key,
            Entry {
                value: Zeroizing::new(value),
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

    fn get_at(&self, key: &[u8], now: Instant, take: bool) -> Option<Vec<u8>> {
        let mut s = self.shard(key);
        let expired = now.duration_since(s.map.get(key)?.born) > self.lifetime;
        if expired || take {
            let e = s.map.remove(key)?;
            return (!expired).then(|| e.value.to_vec());
        }
        s.map.get(key).map(|e| e.value.to_vec())
    }
}

impl StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.put_at(key, value, Instant::now())
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.get_at(key, Instant::now(), false)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.get_at(key, Instant::now(), true)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_bounded_and_expires() {
        let c = SessionCache::new(32, Duration::from_secs(10));
        let t = Instant::now();
        for i in 0..1000u32 {
            c.put_at(i.to_be_bytes().to_vec(), vec![1; 8], t);
        }
        assert!(c.len() <= 32, "{} entries", c.len());
        let k = b"fresh".to_vec();
        c.put_at(k.clone(), b"v".to_vec(), t);
        assert_eq!(
            c.get_at(&k, t + Duration::from_secs(10), false),
            Some(b"v".to_vec())
        );
        assert_eq!(c.get_at(&k, t + Duration::from_secs(11), false), None);
        assert_eq!(c.get_at(&k, t, false), None, "expired entries are removed");
        c.put_at(k.clone(), b"v".to_vec(), t);
        assert_eq!(c.get_at(&k, t, true), Some(b"v".to_vec()));
        assert_eq!(c.get_at(&k, t, true), None, "take is single use");
        c.put_at(k.clone(), b"v".to_vec(), t);
        c.clear();
        assert!(c.is_empty());
    }
}
