//! IP geolocation at the edge: MaxMind-format readers, the prefix cache, reloadable snapshots.
//!
//! A [`Geo`] holds an immutable snapshot of up to three databases (location, anonymous-IP,
//! ASN) behind an `ArcSwap`: a lookup never takes a lock, and a reload swaps the snapshot whole
//! with a new generation number, which also keys the cache. This module knows nothing of policy.

mod cache;
mod compiled;
mod database;

pub use cache::CacheStats;
pub use compiled::CompiledStats;
pub use database::{AsnRecord, DbRole, GeoDatabase, GeoError, LocationRecord};

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use ipnetwork::IpNetwork;

use crate::classify::IpFacts;
use crate::region::CountryCode;
use cache::PrefixCache;
use compiled::Compiled;

/// What the databases say of an address: shared by every network with the same records.
#[derive(Clone, Debug, PartialEq)]
pub struct GeoRecord {
    pub facts: IpFacts,
    pub registered_country: Option<CountryCode>,
    pub asn: Option<u32>,
    pub as_org: Option<String>,
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
            accuracy_radius_km: None,
            found: false,
        }
    }
}

impl GeoRecord {
    /// What the three databases' records for an address say together (`None`: the database
    /// has no record there, or is not loaded). The readers' path and the compiled tables both
    /// build their records here, so they cannot differ.
    pub(crate) fn combine(
        location: Option<&LocationRecord>,
        anonymous: Option<&crate::classify::AnonymizerFlags>,
        asn: Option<&AsnRecord>,
    ) -> Self {
        let none = LocationRecord::default();
        let l = location.unwrap_or(&none);
        GeoRecord {
            facts: IpFacts {
                country: l.country,
                subdivisions: l.subdivisions.clone(),
                anonymizer: anonymous.copied().unwrap_or_default(),
            },
            registered_country: l.registered_country,
            asn: asn.and_then(|a| a.asn),
            as_org: asn.and_then(|a| a.organization.clone()),
            accuracy_radius_km: l.accuracy_radius_km,
            found: location.is_some() || anonymous.is_some() || asn.is_some(),
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
    /// The most specific network of all the databases' answers: the one the answer holds for.
    pub network: IpNetwork,
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
    /// The databases as one table per family, when compiling is on.
    compiled: Option<Compiled>,
}

impl GeoSnapshot {
    fn new(generation: u64, (location, anonymous, asn): Slots, compile: bool) -> Self {
        let compiled = compile
            .then(|| Compiled::new(location.as_deref(), anonymous.as_deref(), asn.as_deref()))
            .flatten();
        // What a compile did not take (compiling off, or given up) is not kept.
        for db in [&location, &anonymous, &asn].into_iter().flatten() {
            db.forget_walk();
        }
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
            compiled,
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

type Slots = (
    Option<Arc<GeoDatabase>>,
    Option<Arc<GeoDatabase>>,
    Option<Arc<GeoDatabase>>,
);

/// How lookups are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GeoOptions {
    /// Compile the databases into flat tables at load (on by default); off, every lookup walks
    /// the readers' trees, through the cache.
    pub compile: bool,
    /// Networks the cache in front of the readers holds at most (0: no cache). With compiled
    /// tables it serves only the addresses the tables leave to the readers.
    pub cache_capacity: u64,
}

/// The geolocation service: current databases plus the cache.
pub struct Geo {
    snapshot: ArcSwap<GeoSnapshot>,
    /// `None` when configured off (capacity 0).
    cache: Option<PrefixCache>,
    generations: AtomicU64,
    compile: bool,
}

impl Geo {
    /// Compiled tables, and a cache of `cache_capacity` networks in front of the readers.
    pub fn new(
        location: Option<GeoDatabase>,
        anonymous: Option<GeoDatabase>,
        asn: Option<GeoDatabase>,
        cache_capacity: u64,
    ) -> Self {
        let options = GeoOptions {
            compile: true,
            cache_capacity,
        };
        Self::with_options(location, anonymous, asn, options)
    }

    pub fn with_options(
        location: Option<GeoDatabase>,
        anonymous: Option<GeoDatabase>,
        asn: Option<GeoDatabase>,
        options: GeoOptions,
    ) -> Self {
        let slots = (
            location.map(Arc::new),
            anonymous.map(Arc::new),
            asn.map(Arc::new),
        );
        let snapshot = GeoSnapshot::new(1, slots, options.compile);
        Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            cache: (options.cache_capacity > 0).then(|| PrefixCache::new(options.cache_capacity)),
            generations: AtomicU64::new(1),
            compile: options.compile,
        }
    }

    /// What the compiled tables hold (`None` when compiling is off or no location database is
    /// loaded).
    pub fn compiled_stats(&self) -> Option<CompiledStats> {
        self.snapshot.load().compiled.as_ref().map(Compiled::stats)
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
            GeoSnapshot::new(generation, (location, anonymous, asn), self.compile)
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

    /// Looks `ip` up in every loaded database's reader, bypassing the compiled tables and the
    /// cache (benchmark baseline, diagnostics, tests). Requests use [`Geo::lookup`].
    pub fn lookup_uncached(&self, ip: IpAddr) -> Result<(GeoRecord, IpNetwork), GeoError> {
        lookup_uncached(&self.snapshot.load(), normalize(ip))
    }

    /// Looks `ip` up: in the compiled tables, else through the cache in the readers.
    pub fn lookup(&self, ip: IpAddr) -> Result<GeoLookup, GeoError> {
        let ip = normalize(ip);
        let snapshot = self.snapshot.load();
        let compiled = snapshot.compiled.as_ref().and_then(|c| c.lookup(ip));
        let (record, network) = match compiled {
            Some((record, network)) => (record.clone(), network),
            None => self.read(&snapshot, ip)?,
        };
        Ok(GeoLookup {
            ip,
            record,
            network,
            databases: snapshot.databases.clone(),
            generation: snapshot.generation,
        })
    }

    /// The readers' answer, through the cache.
    fn read(
        &self,
        snapshot: &GeoSnapshot,
        ip: IpAddr,
    ) -> Result<(Arc<GeoRecord>, IpNetwork), GeoError> {
        let cached = self
            .cache
            .as_ref()
            .and_then(|cache| cache.get(snapshot.generation, ip));
        if let Some(answer) = cached {
            return Ok(answer);
        }
        let (record, network) = lookup_uncached(snapshot, ip)?;
        let record = Arc::new(record);
        if let Some(cache) = &self.cache {
            cache.insert(snapshot.generation, ip, record.clone(), network);
        }
        Ok((record, network))
    }
}

fn lookup_uncached(snapshot: &GeoSnapshot, ip: IpAddr) -> Result<(GeoRecord, IpNetwork), GeoError> {
    let location_db = snapshot
        .location
        .as_ref()
        .ok_or(GeoError::NoLocationDatabase)?;
    let (location, network) = location_db.location(ip)?;
    // Compare prefixes only within the query's family: a match above the IPv4 subtree comes back
    // as an IPv6 network and must be expressed as IPv4 before a narrower IPv4 answer can win.
    let mut network = same_family(network, ip);
    let mut narrow = |other: IpNetwork| {
        let other = same_family(other, ip);
        if other.prefix() > network.prefix() {
            network = other;
        }
    };
    let mut anonymizer = None;
    if let Some(db) = &snapshot.anonymous {
        let (flags, net) = db.anonymizer(ip)?;
        narrow(net);
        anonymizer = flags;
    }
    let mut asn = None;
    if let Some(db) = &snapshot.asn {
        let (record, net) = db.asn(ip)?;
        narrow(net);
        asn = record;
    }
    let record = GeoRecord::combine(location.as_ref(), anonymizer.as_ref(), asn.as_ref());
    Ok((record, network))
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
