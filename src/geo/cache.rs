//! The lookup cache: one entry answers a whole network, not one address.
//!
//! Keys are (database generation, bucket), where a bucket is the address's /24 (IPv4) or /48
//! (IPv6). When the databases' answer covers the bucket or more, the bucket holds it whole and
//! every address in the bucket hits; when the answer's network is narrower (a /29, a /32),
//! the bucket holds a short list of such networks and a lookup picks the one containing the
//! address. A database reload bumps the generation, so stale answers are never served; they age
//! out under the size bound. Bounded by weight (one unit per network held), with hit/miss counts.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ipnetwork::IpNetwork;
use moka::sync::Cache;

use super::GeoRecord;

/// A record and the network it was answered for.
type Answer = (Arc<GeoRecord>, IpNetwork);

const V4_BUCKET: u8 = 24;
const V6_BUCKET: u8 = 48;
/// Most narrow networks one bucket keeps; more are looked up uncached.
const MAX_SPLIT: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    generation: u64,
    bucket: u128,
    v6: bool,
}

#[derive(Clone)]
enum Slot {
    Whole(Answer),
    Split(Arc<[Answer]>),
}

/// Counters for operators and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: u64,
}

pub struct PrefixCache {
    cache: Cache<Key, Slot>,
    hits: AtomicU64,
    misses: AtomicU64,
}

fn bucket_of(ip: IpAddr) -> (Key, u8) {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u128::from(u32::from(v4) & (u32::MAX << (32 - V4_BUCKET)));
            (
                Key {
                    generation: 0,
                    bucket: bits,
                    v6: false,
                },
                V4_BUCKET,
            )
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & (u128::MAX << (128 - V6_BUCKET));
            (
                Key {
                    generation: 0,
                    bucket: bits,
                    v6: true,
                },
                V6_BUCKET,
            )
        }
    }
}

impl PrefixCache {
    /// `capacity` is the number of networks held at most.
    pub fn new(capacity: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(capacity)
            .weigher(|_, slot: &Slot| match slot {
                Slot::Whole(_) => 1,
                Slot::Split(list) => list.len() as u32,
            })
            .build();
        Self {
            cache,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn get(&self, generation: u64, ip: IpAddr) -> Option<Answer> {
        let (mut key, _) = bucket_of(ip);
        key.generation = generation;
        let found = match self.cache.get(&key) {
            Some(Slot::Whole(answer)) => Some(answer),
            Some(Slot::Split(list)) => list.iter().find(|(_, n)| n.contains(ip)).cloned(),
            None => None,
        };
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    pub fn insert(&self, generation: u64, ip: IpAddr, record: Arc<GeoRecord>, network: IpNetwork) {
        let (mut key, bucket_len) = bucket_of(ip);
        key.generation = generation;
        if network.prefix() <= bucket_len {
            self.cache.insert(key, Slot::Whole((record, network)));
            return;
        }
        // A full bucket stays as it is: rebuilding it on every miss would churn for nothing.
        if let Some(Slot::Split(list)) = self.cache.get(&key)
            && list.len() >= MAX_SPLIT
        {
            return;
        }
        self.cache.entry(key).and_upsert_with(|existing| {
            let mut list: Vec<Answer> = match existing.map(|e| e.into_value()) {
                Some(Slot::Split(list)) => list
                    .iter()
                    .filter(|(_, n)| *n != network)
                    .cloned()
                    .collect(),
                _ => Vec::new(),
            };
            if list.len() < MAX_SPLIT {
                list.push((record.clone(), network));
            }
            Slot::Split(list.into())
        });
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.cache.entry_count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::IpFacts;

    fn record(net: &str) -> (Arc<GeoRecord>, IpNetwork) {
        let record = GeoRecord {
            facts: IpFacts::default(),
            ..GeoRecord::unknown_for_tests()
        };
        (Arc::new(record), net.parse().unwrap())
    }

    fn insert(
        cache: &PrefixCache,
        generation: u64,
        ip: IpAddr,
        (r, n): (Arc<GeoRecord>, IpNetwork),
    ) {
        cache.insert(generation, ip, r, n);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn wide_network_serves_the_whole_bucket() {
        let cache = PrefixCache::new(100);
        insert(&cache, 1, ip("10.1.2.3"), record("10.0.0.0/8"));
        assert!(cache.get(1, ip("10.1.2.250")).is_some());
        assert!(cache.get(1, ip("10.1.3.1")).is_none(), "another bucket");
        assert!(cache.get(2, ip("10.1.2.3")).is_none(), "another generation");
        assert_eq!(cache.stats().hits, 1);
        assert_eq!(cache.stats().misses, 2);
    }

    #[test]
    fn narrow_networks_share_a_bucket() {
        let cache = PrefixCache::new(100);
        insert(&cache, 1, ip("81.2.69.142"), record("81.2.69.142/31"));
        insert(&cache, 1, ip("81.2.69.160"), record("81.2.69.160/27"));
        assert_eq!(
            cache.get(1, ip("81.2.69.143")).unwrap().1.to_string(),
            "81.2.69.142/31"
        );
        assert_eq!(
            cache.get(1, ip("81.2.69.170")).unwrap().1.to_string(),
            "81.2.69.160/27"
        );
        assert!(cache.get(1, ip("81.2.69.1")).is_none());
    }

    #[test]
    fn a_full_bucket_keeps_its_networks_and_still_answers() {
        let cache = PrefixCache::new(1000);
        for i in 0..(MAX_SPLIT as u8 + 8) {
            let addr = format!("81.2.69.{i}");
            insert(&cache, 1, ip(&addr), record(&format!("{addr}/32")));
        }
        assert!(cache.get(1, ip("81.2.69.0")).is_some());
        assert!(
            cache
                .get(1, ip(&format!("81.2.69.{}", MAX_SPLIT - 1)))
                .is_some()
        );
        assert!(
            cache
                .get(1, ip(&format!("81.2.69.{}", MAX_SPLIT)))
                .is_none(),
            "past the bound: looked up uncached"
        );
    }

    #[test]
    fn ipv6_buckets_are_48_bits() {
        let cache = PrefixCache::new(100);
        insert(&cache, 1, ip("2a02:d2c0::1"), record("2a02:d2c0::/29"));
        assert!(cache.get(1, ip("2a02:d2c0:0:ffff::1")).is_some());
        assert!(cache.get(1, ip("2a02:d2c0:1::1")).is_none());
    }
}
