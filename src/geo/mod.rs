//! IP geolocation at the edge: MaxMind-format readers, the prefix cache, reloadable snapshots.
//!
//! A [`Geo`] holds an immutable snapshot of up to three databases (location, anonymous-IP,
//! ASN) behind an `ArcSwap`: a lookup never takes a lock, and a reload swaps the snapshot whole
//! with a new generation number, which also keys the cache. This module knows nothing of policy.

mod cache;
mod database;

pub use cache::CacheStats;
pub use database::{AsnRecord, DbRole, GeoDatabase, GeoError, LocationRecord};

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use ipnetwork::IpNetwork;

use crate::classify::IpFacts;
use crate::region::CountryCode;
use cache::PrefixCache;

/// What the databases say of one network: constant for every address in `network`.
#[derive(Clone, Debug, PartialEq)]
pub struct GeoRecord {
    pub facts: IpFacts,
    pub registered_country: Option<CountryCode>,
    pub asn: Option<u32>,
    pub as_org: Option<String>,
    /// The most specific network of all the databases' answers: the one the answer holds for.
    pub network: IpNetwork,
    pub accuracy_radius_km: Option<u16>,
    /// Whether any database had a record for the address.
    pub found: bool,
}

#[cfg(test)]
impl GeoRecord {
    pub(crate) fn unknown_for_tests() -> Self {
        GeoRecord {
            facts: IpFacts::default(),
            registered_country: None,
            asn: None,
            as_org: None,
            network: "0.0.0.0/0".parse().unwrap(),
            accuracy_radius_km: None,
            found: false,
        }
    }
}

/// A database as loaded: role, type and build time (for staleness reports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseMeta {
    pub role: DbRole,
    pub database_type: Arc<str>,
    pub build_epoch: u64,
    pub source: Arc<str>,
}

/// One lookup's answer, with the snapshot it came from.
#[derive(Clone, Debug)]
pub struct GeoLookup {
    /// The address as looked up: IPv4-mapped IPv6 is normalised to IPv4.
    pub ip: IpAddr,
    pub record: Arc<GeoRecord>,
    pub databases: Arc<[DatabaseMeta]>,
    /// The snapshot's generation: changes whenever any database is replaced.
    pub generation: u64,
}

/// The databases in use at one moment; replaced whole on reload.
struct GeoSnapshot {
    generation: u64,
    location: Option<Arc<GeoDatabase>>,
    anonymous: Option<Arc<GeoDatabase>>,
    asn: Option<Arc<GeoDatabase>>,
    databases: Arc<[DatabaseMeta]>,
}

impl GeoSnapshot {
    fn new(
        generation: u64,
        location: Option<Arc<GeoDatabase>>,
        anonymous: Option<Arc<GeoDatabase>>,
        asn: Option<Arc<GeoDatabase>>,
    ) -> Self {
        let databases = [&location, &anonymous, &asn]
            .into_iter()
            .flatten()
            .map(|db| DatabaseMeta {
                role: db.role(),
                database_type: db.database_type().into(),
                build_epoch: db.build_epoch(),
                source: db.source_name().into(),
            })
            .collect();
        Self {
            generation,
            location,
            anonymous,
            asn,
            databases,
        }
    }

    fn slot(&self, role: DbRole) -> &Option<Arc<GeoDatabase>> {
        match role {
            DbRole::Location => &self.location,
            DbRole::Anonymous => &self.anonymous,
            DbRole::Asn => &self.asn,
        }
    }
}

/// Reads IPv4-mapped IPv6 (`::ffff:a.b.c.d`) as the IPv4 address it carries.
pub fn normalize(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// The geolocation service: current databases plus the cache.
pub struct Geo {
    snapshot: ArcSwap<GeoSnapshot>,
    /// `None` when configured off (capacity 0): for flat databases a lookup is cheaper than a
    /// cache probe (see docs/operations.md, Performance).
    cache: Option<PrefixCache>,
    generations: AtomicU64,
}

impl Geo {
    pub fn new(
        location: Option<GeoDatabase>,
        anonymous: Option<GeoDatabase>,
        asn: Option<GeoDatabase>,
        cache_capacity: u64,
    ) -> Self {
        let snapshot = GeoSnapshot::new(
            1,
            location.map(Arc::new),
            anonymous.map(Arc::new),
            asn.map(Arc::new),
        );
        Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            cache: (cache_capacity > 0).then(|| PrefixCache::new(cache_capacity)),
            generations: AtomicU64::new(1),
        }
    }

    /// Puts `db` in its role (or empties the role with `None`); requests in flight finish on the
    /// snapshot they started with.
    pub fn replace(&self, role: DbRole, db: Option<GeoDatabase>) {
        let db = db.map(Arc::new);
        self.snapshot.rcu(|current| {
            let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
            let mut slots = [
                current.location.clone(),
                current.anonymous.clone(),
                current.asn.clone(),
            ];
            slots[role as usize] = db.clone();
            let [location, anonymous, asn] = slots;
            GeoSnapshot::new(generation, location, anonymous, asn)
        });
    }

    pub fn databases(&self) -> Arc<[DatabaseMeta]> {
        self.snapshot.load().databases.clone()
    }

    pub fn has(&self, role: DbRole) -> bool {
        self.snapshot.load().slot(role).is_some()
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache
            .as_ref()
            .map(PrefixCache::stats)
            .unwrap_or_default()
    }

    /// Looks `ip` up in every loaded database, bypassing the cache (benchmark baseline,
    /// diagnostics). Requests use [`Geo::lookup`].
    pub fn lookup_uncached(&self, ip: IpAddr) -> Result<GeoRecord, GeoError> {
        lookup_uncached(&self.snapshot.load(), normalize(ip))
    }

    /// Looks `ip` up in every loaded database, through the cache.
    pub fn lookup(&self, ip: IpAddr) -> Result<GeoLookup, GeoError> {
        let ip = normalize(ip);
        let snapshot = self.snapshot.load();
        let cached = self
            .cache
            .as_ref()
            .and_then(|cache| cache.get(snapshot.generation, ip));
        let record = match cached {
            Some(record) => record,
            None => {
                let record = Arc::new(lookup_uncached(&snapshot, ip)?);
                if let Some(cache) = &self.cache {
                    cache.insert(snapshot.generation, ip, record.clone());
                }
                record
            }
        };
        Ok(GeoLookup {
            ip,
            record,
            databases: snapshot.databases.clone(),
            generation: snapshot.generation,
        })
    }
}

fn lookup_uncached(snapshot: &GeoSnapshot, ip: IpAddr) -> Result<GeoRecord, GeoError> {
    let location_db = snapshot
        .location
        .as_ref()
        .ok_or(GeoError::NoLocationDatabase)?;
    let (location, network) = location_db.location(ip)?;
    // Compare prefixes only within the query's family: a match above the IPv4 subtree comes back
    // as an IPv6 network and must be expressed as IPv4 before a narrower IPv4 answer can win.
    let mut network = same_family(network, ip);
    let mut found = location.is_some();
    let location = location.unwrap_or_default();
    let mut narrow = |other: IpNetwork| {
        let other = same_family(other, ip);
        if other.prefix() > network.prefix() {
            network = other;
        }
    };
    let mut anonymizer = Default::default();
    if let Some(db) = &snapshot.anonymous {
        let (flags, net) = db.anonymizer(ip)?;
        narrow(net);
        found |= flags.is_some();
        anonymizer = flags.unwrap_or_default();
    }
    let mut asn = AsnRecord::default();
    if let Some(db) = &snapshot.asn {
        let (record, net) = db.asn(ip)?;
        narrow(net);
        found |= record.is_some();
        asn = record.unwrap_or_default();
    }
    Ok(GeoRecord {
        facts: IpFacts {
            country: location.country,
            subdivisions: location.subdivisions,
            anonymizer,
        },
        registered_country: location.registered_country,
        asn: asn.asn,
        as_org: asn.organization,
        network,
        accuracy_radius_km: location.accuracy_radius_km,
        found,
    })
}

/// A reader may answer an IPv4 query with an IPv6 network (a match above the IPv4 subtree);
/// express it as the IPv4 network it covers so containment checks work.
fn same_family(network: IpNetwork, ip: IpAddr) -> IpNetwork {
    match (network, ip) {
        (IpNetwork::V6(v6), IpAddr::V4(v4)) => {
            let prefix = v6.prefix().saturating_sub(96);
            IpNetwork::new(IpAddr::V4(v4), prefix)
                .map(|n| IpNetwork::new(n.network(), prefix).unwrap_or(n))
                .unwrap_or(network)
        }
        _ => network,
    }
}

#[cfg(test)]
#[path = "../../tests/support/fixtures.rs"]
pub(crate) mod fixtures;

#[cfg(test)]
mod tests;
