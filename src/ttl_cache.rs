//! A bounded map whose entries are valid for a fixed TTL: the gateway's decision cache (a
//! check's identity to its decision) and the Redis usage adapter's cache of reads.
//!
//! Not moka, on measurement: under a steady stream of new clients (every check a miss, each
//! decision inserted and expiring a second later) moka's get-miss, insert and housekeeping cost
//! about 10 µs of a forward-auth check's 30 (its concurrent table rehashes every key it holds
//! to clear expired ones). This cache needs none of moka's policies: a key is reused only within
//! its TTL, and when a shard is full the expired entries go first, then arbitrary ones, so that
//! a full shard costs amortised O(1) per insert. Shards are plain `Mutex<HashMap>`s with
//! foldhash (seeded per process: keys hold client-chosen parts).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::sharded::{lock, shard_of};

/// A power of two.
const SHARDS: usize = 16;

/// One shard's entries, each with the time it was inserted.
type Entries<K, V> = HashMap<K, (Instant, V), foldhash::fast::RandomState>;

pub struct TtlCache<K, V> {
    shards: Box<[Mutex<Entries<K, V>>]>,
    hasher: foldhash::fast::RandomState,
    per_shard: usize,
    ttl: Duration,
}

impl<K: Hash + Eq, V: Clone> TtlCache<K, V> {
    /// At most `capacity` entries (rounded up to a multiple of the shard count), each for `ttl`.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        let per_shard = usize::try_from(capacity)
            .unwrap_or(usize::MAX)
            .div_ceil(SHARDS)
            .max(1);
        let hasher = foldhash::fast::RandomState::default();
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(hasher.clone())))
                .collect(),
            hasher,
            per_shard,
            ttl,
        }
    }

    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> MutexGuard<'_, Entries<K, V>> {
        lock(&self.shards[shard_of(&self.hasher, key, SHARDS)])
    }

    /// The value for `key` if it was inserted less than the TTL ago (as of `now`).
    pub fn get<Q>(&self, key: &Q, now: Instant) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut shard = self.shard(key);
        match shard.get(key) {
            Some((at, value)) if now.saturating_duration_since(*at) < self.ttl => {
                Some(value.clone())
            }
            Some(_) => {
                shard.remove(key);
                None
            }
            None => None,
        }
    }

    /// Inserts `value` for `key` as of `now`, making room in a full shard first.
    pub fn insert(&self, key: K, value: V, now: Instant) {
        let mut shard = self.shard(&key);
        self.make_room(&mut shard, &key, now);
        shard.insert(key, (now, value));
    }

    /// As `insert`, unless the entry `key` holds is live and `keep` says to keep it; in one
    /// look at the shard, so no insert can come between the look and the write. Whether it
    /// inserted.
    pub fn insert_unless(
        &self,
        key: K,
        value: V,
        now: Instant,
        keep: impl FnOnce(&V) -> bool,
    ) -> bool {
        let mut shard = self.shard(&key);
        let live = |(at, _): &(Instant, V)| now.saturating_duration_since(*at) < self.ttl;
        if shard
            .get(&key)
            .is_some_and(|entry| live(entry) && keep(&entry.1))
        {
            return false;
        }
        self.make_room(&mut shard, &key, now);
        shard.insert(key, (now, value));
        true
    }

    /// In a full shard that does not hold `key`: drops the expired entries, then arbitrary
    /// ones down to 7/8 full.
    fn make_room(&self, shard: &mut Entries<K, V>, key: &K, now: Instant) {
        if shard.len() >= self.per_shard && !shard.contains_key(key) {
            let ttl = self.ttl;
            shard.retain(|_, (at, _)| now.saturating_duration_since(*at) < ttl);
            // Still more than 7/8 full with live entries: drop arbitrary ones down to 7/8, so
            // the next inserts do not each walk the shard again.
            let keep = self.per_shard - self.per_shard / 8 - 1;
            if shard.len() > keep {
                let mut excess = shard.len() - keep;
                shard.retain(|_, _| {
                    if excess > 0 {
                        excess -= 1;
                        false
                    } else {
                        true
                    }
                });
            }
        }
    }

    /// Entries held, expired ones not yet removed included.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_live_for_the_ttl_only() {
        let cache = TtlCache::new(100, Duration::from_millis(1000));
        let t0 = Instant::now();
        cache.insert("a".to_owned(), 1, t0);
        assert_eq!(cache.get("a", t0 + Duration::from_millis(999)), Some(1));
        assert_eq!(cache.get("a", t0 + Duration::from_millis(1000)), None);
        assert_eq!(cache.len(), 0, "an expired entry found is removed");
        assert_eq!(cache.get("b", t0), None);
        cache.insert("a".to_owned(), 2, t0);
        cache.insert("a".to_owned(), 3, t0 + Duration::from_millis(10));
        assert_eq!(cache.get("a", t0 + Duration::from_millis(500)), Some(3));
    }

    #[test]
    fn insert_unless_keeps_a_live_entry_it_is_told_to_keep_only() {
        let cache = TtlCache::new(64, Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(
            cache.insert_unless("k", 1, t0, |_| true),
            "nothing there yet"
        );
        assert!(!cache.insert_unless("k", 2, t0, |held| *held == 1));
        assert_eq!(cache.get("k", t0), Some(1));
        assert!(cache.insert_unless("k", 3, t0, |held| *held == 2));
        assert_eq!(cache.get("k", t0), Some(3));
        // An expired entry is replaced whatever `keep` says.
        let later = t0 + Duration::from_secs(2);
        assert!(cache.insert_unless("k", 4, later, |_| true));
        assert_eq!(cache.get("k", later), Some(4));
    }

    #[test]
    fn a_full_cache_stays_bounded_and_keeps_taking_new_entries() {
        let capacity = 160;
        let cache = TtlCache::new(capacity, Duration::from_secs(60));
        let now = Instant::now();
        for i in 0..10_000u32 {
            cache.insert(i, i, now);
            assert!(cache.len() <= capacity as usize, "{} at {i}", cache.len());
            assert_eq!(cache.get(&i, now), Some(i), "the newest entry is there");
        }
        assert!(cache.len() > capacity as usize / 2, "{}", cache.len());
        // Expired entries make room before live ones are dropped.
        let later = now + Duration::from_secs(61);
        for i in 20_000..20_010u32 {
            cache.insert(i, i, later);
        }
        for i in 20_000..20_010u32 {
            assert_eq!(cache.get(&i, later), Some(i));
        }
    }
}
