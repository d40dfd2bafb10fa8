//! The in-process history's maps: sharded hash maps bounded in bytes, whose entries expire
//! when idle.
//!
//! Not moka, on measurement: a decision for an account with history read three moka caches,
//! and their hash probes, `MiniArc` drops and access-order deques were the largest frames of
//! the whole decision (BENCHMARKS.md, In process). These maps need little of moka's policy:
//! - an entry is weighed on every change (an account's weight is the sum of a few capacities);
//! - a shard over its share of the ceiling drops what was used longest ago (by a per-shard
//!   access sequence, the cutoff found by selection) down to 7/8 of its share in one O(n)
//!   pass, so a full shard costs amortised O(1) per insert (the pass holds that shard's lock,
//!   a 64th of the keys, once per eighth of its entries inserted); one entry heavier than its
//!   shard's whole share (a ceiling of a few MiB) is kept, alone;
//! - entries idle for the TTL are dropped when read, and by a pass at most once an hour per
//!   shard;
//! - a read runs under its shard's lock, with no reference count to take or drop.
//!
//! Shards are `Mutex<HashMap>`s with foldhash, seeded per process: keys are client-chosen.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};

use crate::sharded::{lock, shard_of};

/// A power of two.
const SHARDS: usize = 64;
/// Idle entries are looked for at most this often per shard (seconds).
const SWEEP_SECS: u32 = 3600;

struct Slot<V> {
    value: V,
    /// The shard's access sequence when last used: the eviction order.
    seq: u64,
    /// When last used, in the map's seconds: the idle expiry.
    used: u32,
    /// What the entry weighed when last changed (bytes).
    weighed: u32,
}

struct Shard<K, V> {
    map: HashMap<K, Slot<V>, foldhash::fast::RandomState>,
    bytes: u64,
    seq: u64,
    swept: u32,
}

impl<K: Hash + Eq, V> Shard<K, V> {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn drop_idle(&mut self, now: u32, idle: u32) {
        self.swept = self.swept.max(now);
        let mut freed = 0;
        self.map.retain(|_, slot| {
            let keep = now.saturating_sub(slot.used) < idle;
            if !keep {
                freed += u64::from(slot.weighed);
            }
            keep
        });
        self.bytes -= freed;
    }

    /// Drops the least recently used entries until the shard weighs at most `target`, never
    /// the one used at `keep`.
    fn drop_oldest(&mut self, target: u64, keep: u64) {
        let Some(excess) = self.bytes.checked_sub(target).filter(|e| *e > 0) else {
            return;
        };
        let mut order: Vec<(u64, u32)> = self
            .map
            .values()
            .filter(|slot| slot.seq != keep)
            .map(|slot| (slot.seq, slot.weighed))
            .collect();
        if order.is_empty() {
            return;
        }
        // The k oldest by a selection (O(n), not a sort), k first guessed from the mean weight
        // and grown until they free enough.
        let mean = (self.bytes / (order.len() as u64 + 1)).max(1);
        let mut k = usize::try_from(excess / mean + 1)
            .unwrap_or(usize::MAX)
            .min(order.len());
        let (cutoff, freed) = loop {
            let len = order.len();
            let (older, nth, _) = order.select_nth_unstable_by_key(k - 1, |(seq, _)| *seq);
            let freed = older.iter().map(|(_, w)| u64::from(*w)).sum::<u64>() + u64::from(nth.1);
            if freed >= excess || k == len {
                break (nth.0, freed);
            }
            k = (k + k / 2 + 1).min(len);
        };
        self.map
            .retain(|_, slot| slot.seq > cutoff || slot.seq == keep);
        self.bytes -= freed;
        // Removal leaves tombstones, and a table that runs out of room while more than half
        // full doubles rather than rehashing in place: a shard that evicts over and over would
        // end up with four slots per entry. Rebuilt at its size instead (O(n), as the pass).
        self.map.shrink_to(0);
    }
}

pub(crate) struct BoundedMap<K, V> {
    shards: Box<[Mutex<Shard<K, V>>]>,
    hasher: foldhash::fast::RandomState,
    per_shard: u64,
    idle: u32,
    /// The entry's own bytes (its heap allocations, its key's); the map adds its slot.
    weigh: fn(&K, &V) -> usize,
}

impl<K: Hash + Eq, V> BoundedMap<K, V> {
    /// Entries weighing `max_bytes` in all at most, each dropped after `idle_secs` unused.
    pub fn new(max_bytes: u64, idle_secs: u32, weigh: fn(&K, &V) -> usize) -> Self {
        let hasher = foldhash::fast::RandomState::default();
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::with_hasher(hasher.clone()),
                        bytes: 0,
                        seq: 0,
                        swept: 0,
                    })
                })
                .collect(),
            hasher,
            per_shard: (max_bytes / SHARDS as u64).max(1),
            idle: idle_secs,
            weigh,
        }
    }

    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> MutexGuard<'_, Shard<K, V>> {
        // A panic while holding the lock leaves counters, not invariants: keep using them.
        lock(&self.shards[shard_of(&self.hasher, key, SHARDS)])
    }

    /// What one entry weighs: its own bytes and its slot in the table (at the table's mean
    /// load, 3/2 slots and control bytes per entry).
    fn weight(&self, key: &K, value: &V) -> u32 {
        let slot = (std::mem::size_of::<(K, Slot<V>)>() + 1) * 3 / 2;
        ((self.weigh)(key, value) + slot).min(u32::MAX as usize) as u32
    }

    /// `f` of the value for `key` (which may change what the weight does not count), marked
    /// used at `now` (the caller's time in seconds; an earlier time than the entry's last use
    /// leaves that); `None` when absent or idle for the TTL.
    pub fn read<Q, R>(&self, key: &Q, now: u32, f: impl FnOnce(&mut V) -> R) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut shard = self.shard(key);
        let seq = shard.next_seq();
        let slot = shard.map.get_mut(key)?;
        if now.saturating_sub(slot.used) >= self.idle {
            let weighed = slot.weighed;
            shard.map.remove(key);
            shard.bytes -= u64::from(weighed);
            return None;
        }
        slot.seq = seq;
        slot.used = slot.used.max(now);
        Some(f(&mut slot.value))
    }

    /// Changes the value for `key` with `f` (made by `make` when absent or idle), re-weighs it
    /// and makes room in its shard when the shard is over its share of the ceiling: the least
    /// recently used go (idle ones among the first), never the one just changed.
    pub fn update(&self, key: K, now: u32, make: impl FnOnce() -> V, f: impl FnOnce(&mut V)) {
        let mut shard = self.shard(&key);
        if now.saturating_sub(shard.swept) >= SWEEP_SECS {
            shard.drop_idle(now, self.idle);
        }
        let seq = shard.next_seq();
        let (before, after) = match shard.map.entry(key) {
            Entry::Occupied(mut entry) => {
                let slot = entry.get_mut();
                if now.saturating_sub(slot.used) >= self.idle {
                    slot.value = make();
                }
                slot.seq = seq;
                slot.used = slot.used.max(now);
                f(&mut slot.value);
                let before = slot.weighed;
                let after = self.weight(entry.key(), &entry.get().value);
                entry.get_mut().weighed = after;
                (before, after)
            }
            Entry::Vacant(entry) => {
                let mut value = make();
                f(&mut value);
                let after = self.weight(entry.key(), &value);
                entry.insert(Slot {
                    value,
                    seq,
                    used: now,
                    weighed: after,
                });
                (0, after)
            }
        };
        shard.bytes = shard.bytes - u64::from(before) + u64::from(after);
        if shard.bytes > self.per_shard {
            // Idle entries are the least recently used: they go first.
            shard.drop_oldest(self.per_shard - self.per_shard / 8, seq);
        }
    }

    /// Entries held and their weight in bytes.
    pub fn size(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(n, bytes), shard| {
            let shard = lock(shard);
            (n + shard.map.len() as u64, bytes + shard.bytes)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weigh(_: &u32, v: &Vec<u8>) -> usize {
        v.capacity()
    }

    #[test]
    fn the_weight_follows_every_change() {
        let map = BoundedMap::new(1 << 20, 100, weigh);
        map.update(1, 0, Vec::new, |v| v.reserve_exact(1000));
        let (n, one) = map.size();
        assert_eq!(n, 1);
        assert!(one >= 1000, "{one}");
        map.update(1, 0, Vec::new, |v| v.reserve_exact(3000));
        assert!(map.size().1 >= one + 2000, "{:?}", map.size());
        map.update(1, 0, Vec::new, |v| *v = Vec::new());
        assert!(map.size().1 < 1000, "{:?}", map.size());
        assert_eq!(map.read(&1, 0, |v| v.capacity()), Some(0));
        assert_eq!(map.read(&2, 0, |v| v.capacity()), None);
    }

    #[test]
    fn a_full_map_drops_the_least_recently_used_and_stays_under_its_ceiling() {
        let ceiling = 64 * 10_000;
        let map = BoundedMap::new(ceiling, u32::MAX, weigh);
        // Key 0 is read between inserts, so it is never the least recently used.
        map.update(0, 0, || vec![0; 500], |_| {});
        for key in 1..20_000u32 {
            // Weights from 100 to 1,000 bytes: the pass frees by weight, not by count.
            map.update(
                key,
                0,
                || vec![0; 100 + (key as usize * 7919) % 900],
                |_| {},
            );
            assert!(
                map.read(&0, 0, |_| ()).is_some(),
                "kept while used, at {key}"
            );
            assert!(map.read(&key, 0, |_| ()).is_some(), "the newest is kept");
            assert!(map.size().1 <= ceiling, "{:?} at {key}", map.size());
        }
        let (held, _) = map.size();
        assert!(held > 500, "still holds many: {held}");
        // The oldest went first: of the last inserted, most are there; of the first, none.
        let recent = (19_900..20_000).filter(|k| map.read(k, 0, |_| ()).is_some());
        assert!(recent.count() > 50);
        assert!((1..100).all(|k| map.read(&k, 0, |_| ()).is_none()));
    }

    #[test]
    fn idle_entries_expire_when_read_or_swept() {
        let map = BoundedMap::new(1 << 20, 100, weigh);
        map.update(1, 0, || vec![0; 10], |_| {});
        map.update(2, 0, || vec![0; 10], |_| {});
        assert!(map.read(&1, 99, |_| ()).is_some());
        assert!(map.read(&1, 198, |_| ()).is_some(), "a read keeps it");
        assert!(map.read(&1, 298, |_| ()).is_none(), "idle for the TTL");
        // Expired, an entry starts again.
        map.update(2, 500, || vec![1], |v| v.push(2));
        assert_eq!(map.read(&2, 500, |v| v.clone()), Some(vec![1, 2]));
        // The hourly pass drops idle entries nobody reads (2,000 keys reach every shard).
        for key in 10..200 {
            map.update(key, 1000, Vec::new, |_| {});
        }
        let later = 1100 + SWEEP_SECS;
        for key in 10_000..12_000 {
            map.update(key, later, Vec::new, |_| {});
        }
        assert_eq!(map.size().0, 2000, "{:?}", map.size());
    }
}
