//! The databases compiled for lookup: one flat longest-prefix-match table per address family
//! over pre-decoded, shared records.
//!
//! At load (off the request path, as every reload is) the networks of the loaded databases
//! (location, anonymous-IP, ASN; each walked once when it was opened) are merged into one
//! partition of the address space: a piece is the narrowest network of the three answers, the
//! network a reader lookup would report, with the three records combined into one
//! [`GeoRecord`] shared by every piece that has the same three records. Neighbouring pieces with
//! the same record and prefix length are one range. A lookup is then an index on the top 16
//! bits, a binary search among the few range starts under it, and a read of the range's value:
//! a handful of cache lines, where the reader's tree walk and decoding touch dozens.
//!
//! Addresses no database cell covers (the IPv6 aliases of the IPv4 subtree, such as 6to4 and
//! Teredo, and `::/96`) are gaps: the table says so and the reader answers them as before.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

use super::GeoRecord;
use super::database::{
    AsnRecord, Cell, DbRole, GeoDatabase, LocationRecord, NO_RECORD, Partition, Records,
};
use crate::classify::AnonymizerFlags;

/// The record part of a range's value that marks a gap (the reader answers).
const GAP: u32 = (1 << 24) - 1;
/// Most distinct combined records a table holds (24 bits of a value).
const MAX_RECORDS: usize = GAP as usize;

/// One family's ranges: sorted starts, and for each `record << 8 | prefix`.
struct Table<K> {
    /// Vectors, not boxed slices: shrinking them to size would copy them.
    starts: Vec<K>,
    values: Vec<u32>,
    /// `index[b]`: how many starts lie below `b << (BITS - 16)`.
    index: Box<[u32]>,
}

trait Key: Copy + Ord {
    const BITS: u32;
    fn from_u128(v: u128) -> Self;
    fn to_u128(self) -> u128;
    fn top16(self) -> usize;
}

impl Key for u32 {
    const BITS: u32 = 32;
    fn from_u128(v: u128) -> Self {
        v as u32
    }
    fn to_u128(self) -> u128 {
        self.into()
    }
    fn top16(self) -> usize {
        (self >> 16) as usize
    }
}

impl Key for u128 {
    const BITS: u32 = 128;
    fn from_u128(v: u128) -> Self {
        v
    }
    fn to_u128(self) -> u128 {
        self
    }
    fn top16(self) -> usize {
        (self >> 112) as usize
    }
}

impl<K: Key> Table<K> {
    /// Ranges sorted by start, the first at 0.
    fn new((starts, values): (Vec<K>, Vec<u32>)) -> Self {
        let mut index = vec![0u32; (1 << 16) + 1];
        let mut below = 0usize;
        for (b, slot) in index.iter_mut().enumerate() {
            while below < starts.len() && starts[below].top16() < b {
                below += 1;
            }
            *slot = below as u32;
        }
        Self {
            starts,
            values,
            index: index.into(),
        }
    }

    /// The value of the range holding `key`.
    #[inline]
    fn find(&self, key: K) -> u32 {
        let b = key.top16();
        let (lo, hi) = (self.index[b] as usize, self.index[b + 1] as usize);
        let within = self.starts[lo..hi].partition_point(|s| *s <= key);
        // The first range starts at 0, so some start is at or below any key.
        self.values[(lo + within).saturating_sub(1)]
    }

    fn bytes(&self) -> usize {
        self.starts.len() * std::mem::size_of::<K>() + self.values.len() * 4 + self.index.len() * 4
    }
}

/// The loaded databases as one lookup table per family.
pub(crate) struct Compiled {
    v4: Table<u32>,
    v6: Table<u128>,
    records: Box<[Arc<GeoRecord>]>,
    /// The databases' networks the tables were compiled from (the IPv4 aliases not counted).
    networks: usize,
}

/// What compiling cost, for logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompiledStats {
    /// The databases' networks compiled (every network of every database, IPv4 aliases aside).
    pub networks: usize,
    pub ranges_v4: usize,
    pub ranges_v6: usize,
    pub records: usize,
    pub bytes: usize,
}

impl Compiled {
    /// Compiles the databases; `None` without a location database (every lookup then fails as
    /// the reader's would) or with more distinct records than a table holds.
    pub(crate) fn new(
        location: Option<&GeoDatabase>,
        anonymous: Option<&GeoDatabase>,
        asn: Option<&GeoDatabase>,
    ) -> Option<Self> {
        let location = location?;
        // Each loaded database with its slot in a combination (0 location, 1 anonymous, 2 ASN).
        let mut parts = Vec::new();
        for (slot, db) in [Some(location), anonymous, asn].into_iter().enumerate() {
            if let Some(db) = db {
                if db.role() != DbRole::ALL[slot] {
                    // Combined by slot, decoded by role: they must agree (the app opens each
                    // database in its slot's role).
                    tracing::error!(
                        role = db.role().as_str(),
                        "a database in another role's slot is not compiled"
                    );
                    return None;
                }
                match db.partition() {
                    Ok(partition) => parts.push((slot, partition)),
                    Err(error) => {
                        // It was walked once at load; only a bug makes a second walk fail.
                        tracing::error!(%error, "a database cannot be compiled; lookups read it");
                        return None;
                    }
                }
            }
        }
        let mut combined = Combiner::new(&parts);
        let v4 = merge(&parts, |p| &p.v4, &mut combined);
        let v6 = merge(&parts, |p| &p.v6, &mut combined);
        let (Some(v4), Some(v6)) = (v4, v6) else {
            tracing::warn!(
                "the databases have more than {MAX_RECORDS} distinct record combinations; lookups read them"
            );
            return None;
        };
        let networks = parts.iter().map(|(_, p)| p.v4.len() + p.v6.len()).sum();
        let records = combined.records.into();
        // The walks are done with: freed before the tables are finished.
        drop(parts);
        Some(Self {
            v4: Table::new(v4),
            v6: Table::new(v6),
            records,
            networks,
        })
    }

    /// The record and network for `ip`, or `None` when the reader must answer (a gap).
    #[inline]
    pub(crate) fn lookup(&self, ip: IpAddr) -> Option<(&Arc<GeoRecord>, IpNetwork)> {
        match ip {
            IpAddr::V4(v4) => {
                let key = u32::from(v4);
                let (record, prefix) = split(self.v4.find(key))?;
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                let network = Ipv4Network::new(Ipv4Addr::from(key & mask), prefix).ok()?;
                Some((self.records.get(record)?, IpNetwork::V4(network)))
            }
            IpAddr::V6(v6) => {
                let key = u128::from(v6);
                let (record, prefix) = split(self.v6.find(key))?;
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                let network = Ipv6Network::new(Ipv6Addr::from(key & mask), prefix).ok()?;
                Some((self.records.get(record)?, IpNetwork::V6(network)))
            }
        }
    }

    pub(crate) fn stats(&self) -> CompiledStats {
        CompiledStats {
            networks: self.networks,
            ranges_v4: self.v4.starts.len(),
            ranges_v6: self.v6.starts.len(),
            records: self.records.len(),
            bytes: self.v4.bytes()
                + self.v6.bytes()
                + self.records.len() * (std::mem::size_of::<GeoRecord>() + 16),
        }
    }
}

fn split(value: u32) -> Option<(usize, u8)> {
    let record = value >> 8;
    (record != GAP).then_some((record as usize, value as u8))
}

/// Combines one record of each database into one shared [`GeoRecord`], once per distinct
/// combination.
struct Combiner<'a> {
    location: &'a [LocationRecord],
    anonymous: &'a [AnonymizerFlags],
    asn: &'a [AsnRecord],
    ids: std::collections::HashMap<[u32; 3], u32>,
    records: Vec<Arc<GeoRecord>>,
}

impl<'a> Combiner<'a> {
    fn new(parts: &'a [(usize, Partition)]) -> Self {
        let mut combiner = Self {
            location: &[],
            anonymous: &[],
            asn: &[],
            ids: Default::default(),
            records: Vec::new(),
        };
        for (_, part) in parts {
            match &part.records {
                Records::Location(list) => combiner.location = list,
                Records::Anonymous(list) => combiner.anonymous = list,
                Records::Asn(list) => combiner.asn = list,
            }
        }
        combiner
    }

    /// The shared record for one record index per database (location, anonymous, ASN;
    /// [`NO_RECORD`] where it has none or is not loaded).
    fn id(&mut self, of: [u32; 3]) -> Option<u32> {
        if let Some(&id) = self.ids.get(&of) {
            return Some(id);
        }
        if self.records.len() >= MAX_RECORDS {
            return None;
        }
        let location = self.location.get(of[0] as usize);
        let anonymous = self.anonymous.get(of[1] as usize);
        let asn = self.asn.get(of[2] as usize);
        let record = GeoRecord::combine(location, anonymous, asn);
        let id = self.records.len() as u32;
        self.records.push(Arc::new(record));
        self.ids.insert(of, id);
        Some(id)
    }
}

/// The databases' cells of one family merged into ranges: their starts, sorted, the first at
/// 0, and for each `record << 8 | prefix`. `None` when there are more distinct records than a
/// table holds.
fn merge<K: Key>(
    parts: &[(usize, Partition)],
    cells: impl Fn(&Partition) -> &Vec<Cell<K>>,
    combined: &mut Combiner<'_>,
) -> Option<(Vec<K>, Vec<u32>)> {
    let last = u128::MAX >> (128 - K::BITS);
    let lists: Vec<(usize, &[Cell<K>])> = parts
        .iter()
        .map(|(slot, p)| (*slot, cells(p).as_slice()))
        .collect();
    let mut at = vec![0usize; lists.len()];
    // At most one range per cell, and one per gap between cells.
    let bound = lists.iter().map(|(_, l)| 2 * l.len()).sum::<usize>() + 1;
    let (mut starts, mut values) = (Vec::with_capacity(bound), Vec::with_capacity(bound));
    let mut pos: u128 = 0;
    loop {
        // Per database: the cell holding `pos`, or a gap up to its next cell.
        let mut end = last;
        let mut prefix = 0u8;
        let mut gap = false;
        let mut of = [NO_RECORD; 3];
        for (d, &(slot, list)) in lists.iter().enumerate() {
            while at[d] + 1 < list.len() && list[at[d] + 1].start.to_u128() <= pos {
                at[d] += 1;
            }
            let cell = list.get(at[d]).filter(|c| c.start.to_u128() <= pos);
            match cell.map(|c| (c, cell_end(c))) {
                Some((c, cell_end)) if cell_end >= pos => {
                    end = end.min(cell_end);
                    prefix = prefix.max(c.prefix);
                    of[slot] = c.record;
                }
                _ => {
                    gap = true;
                    let next = list[at[d]..].iter().find(|c| c.start.to_u128() > pos);
                    if let Some(next) = next {
                        end = end.min(next.start.to_u128() - 1);
                    }
                }
            }
        }
        let value = if gap {
            GAP << 8
        } else {
            combined.id(of)? << 8 | u32::from(prefix)
        };
        if values.last() != Some(&value) {
            starts.push(K::from_u128(pos));
            values.push(value);
        }
        if end >= last {
            return Some((starts, values));
        }
        pos = end + 1;
    }
}

/// The last address of `cell`'s network.
fn cell_end<K: Key>(cell: &Cell<K>) -> u128 {
    let size_bits = K::BITS - u32::from(cell.prefix);
    cell.start.to_u128() | u128::MAX.checked_shr(128 - size_bits).unwrap_or(0)
}
