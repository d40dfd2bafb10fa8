//! One MaxMind-format database in one role (location, anonymous-IP or ASN).
//!
//! A database is opened from bytes, then every network in its search tree is walked and every
//! record decoded in the shape its role needs; only then is it offered for use. A file that opens
//! but cannot be decoded (MaxMind's Broken-Double-Format test file, a truncated copy) is refused
//! here rather than failing requests later. (The reader's own `verify()` is stricter about
//! metadata than real-world writers are: the ip-location-db files have an empty description.)

use std::collections::HashMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use maxminddb::{LookupResult, MaxMindDbError, Reader, WithinOptions};
use serde::Deserialize;

use crate::classify::AnonymizerFlags;
use crate::region::{CountryCode, RegionCode};

/// What a database is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DbRole {
    Location,
    Anonymous,
    Asn,
}

impl DbRole {
    pub const ALL: [DbRole; 3] = [DbRole::Location, DbRole::Anonymous, DbRole::Asn];

    pub fn as_str(self) -> &'static str {
        match self {
            DbRole::Location => "location",
            DbRole::Anonymous => "anonymous",
            DbRole::Asn => "asn",
        }
    }
}

/// Why a database could not be loaded or read.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("{source_name}: not a readable MaxMind DB: {error}")]
    Open {
        source_name: String,
        error: MaxMindDbError,
    },
    #[error("{source_name}: verification failed: {error}")]
    Verify {
        source_name: String,
        error: MaxMindDbError,
    },
    #[error("{source_name}: has no {role} data (database_type {database_type:?})")]
    WrongRole {
        source_name: String,
        role: &'static str,
        database_type: String,
    },
    #[error("{role} database lookup failed: {error}")]
    Lookup {
        role: &'static str,
        error: MaxMindDbError,
    },
    #[error("no location database is loaded")]
    NoLocationDatabase,
    #[error("reading {path}: {error}")]
    Read { path: String, error: std::io::Error },
}

/// A record, decoded in the shape of one role.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocationRecord {
    pub country: Option<CountryCode>,
    pub registered_country: Option<CountryCode>,
    pub subdivisions: Vec<RegionCode>,
    pub accuracy_radius_km: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AsnRecord {
    pub asn: Option<u32>,
    pub organization: Option<String>,
}

/// A record handle and the network the answer covers.
type Found<'a> = (LookupResult<'a, Vec<u8>>, IpNetwork);

/// A cell's record when the database has none for its addresses.
pub(crate) const NO_RECORD: u32 = u32::MAX;

/// One network of a database's search tree: the addresses from `start` on that one lookup
/// answers alike (`prefix` bits of the family), and its record (an index into
/// [`Partition::records`], or [`NO_RECORD`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cell<K> {
    pub start: K,
    pub record: u32,
    pub prefix: u8,
}

/// Every network of a database, walked once at load, with each distinct data record decoded
/// once in its role's shape. Cells are sorted and disjoint; addresses no cell covers (the
/// IPv6 aliases of the IPv4 subtree, such as 6to4) are for the reader to answer.
#[derive(Debug, Default)]
pub(crate) struct Partition {
    pub v4: Vec<Cell<u32>>,
    pub v6: Vec<Cell<u128>>,
    pub records: Records,
}

/// The distinct records of one database, decoded in its role's shape.
#[derive(Debug)]
pub(crate) enum Records {
    Location(Vec<LocationRecord>),
    Anonymous(Vec<AnonymizerFlags>),
    Asn(Vec<AsnRecord>),
}

impl Default for Records {
    fn default() -> Self {
        Records::Location(Vec::new())
    }
}

impl Records {
    /// Appends `record` to its role's list: its index, or `None` past what a table holds.
    fn push(&mut self, record: Decoded) -> Option<u32> {
        let len = match (self, record) {
            (Records::Location(list), Decoded::Location(r)) => {
                list.push(r);
                list.len()
            }
            (Records::Anonymous(list), Decoded::Anonymous(r)) => {
                list.push(r);
                list.len()
            }
            (Records::Asn(list), Decoded::Asn(r)) => {
                list.push(r);
                list.len()
            }
            _ => return None,
        };
        u32::try_from(len - 1).ok().filter(|&i| i < NO_RECORD)
    }
}

/// One record as its role reads it.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Decoded {
    Location(LocationRecord),
    Anonymous(AnonymizerFlags),
    Asn(AsnRecord),
}

/// Whether `net` lies inside one of the IPv6 aliases of the IPv4 subtree MaxMind's writers
/// install: IPv4-mapped `::ffff:0:0/96` (normalised to IPv4 before any lookup), Teredo
/// `2001::/32` and 6to4 `2002::/16`.
fn is_alias(net: ipnetwork::Ipv6Network) -> bool {
    const ALIASES: [(u128, u8); 3] = [
        (0xffff_0000_0000, 96),
        (0x2001_0000 << 96, 32),
        (0x2002 << 112, 16),
    ];
    let start = u128::from(net.network());
    ALIASES.iter().any(|&(base, len)| {
        net.prefix() >= len && start & (u128::MAX << (128 - u32::from(len))) == base
    })
}

/// A loaded database with its metadata.
pub struct GeoDatabase {
    role: DbRole,
    reader: Reader<Vec<u8>>,
    source_name: String,
    /// The walk made at load, until the first compile takes it (a later compile walks again,
    /// so it is not held in memory beside the tables).
    walked: std::sync::Mutex<Option<Partition>>,
}

impl std::fmt::Debug for GeoDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoDatabase")
            .field("role", &self.role)
            .field("source", &self.source_name)
            .field("database_type", &self.database_type())
            .field("build_epoch", &self.build_epoch())
            .finish()
    }
}

// --- wire shapes: both MaxMind's nested layout and the flat `country_code` layout ---

#[derive(Deserialize)]
struct IsoRef<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct RadiusRef {
    #[serde(default)]
    accuracy_radius: Option<u16>,
}

#[derive(Deserialize)]
struct RawLocation<'a> {
    #[serde(borrow, default)]
    country: Option<IsoRef<'a>>,
    #[serde(borrow, default)]
    registered_country: Option<IsoRef<'a>>,
    #[serde(borrow, default)]
    subdivisions: Option<Vec<IsoRef<'a>>>,
    #[serde(default)]
    location: Option<RadiusRef>,
    #[serde(borrow, default)]
    country_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct RawAnonymous {
    #[serde(default)]
    is_anonymous_vpn: Option<bool>,
    #[serde(default)]
    is_tor_exit_node: Option<bool>,
    #[serde(default)]
    is_public_proxy: Option<bool>,
    #[serde(default)]
    is_residential_proxy: Option<bool>,
    #[serde(default)]
    is_hosting_provider: Option<bool>,
}

#[derive(Deserialize)]
struct RawAsn<'a> {
    #[serde(default)]
    autonomous_system_number: Option<u32>,
    #[serde(borrow, default)]
    autonomous_system_organization: Option<&'a str>,
}

impl GeoDatabase {
    /// Opens, verifies and probes `bytes` as a database for `role`.
    pub fn from_bytes(role: DbRole, bytes: Vec<u8>, source_name: &str) -> Result<Self, GeoError> {
        let source_name = source_name.to_owned();
        let reader = Reader::from_source(bytes).map_err(|error| GeoError::Open {
            source_name: source_name.clone(),
            error,
        })?;
        let db = Self {
            role,
            reader,
            source_name,
            walked: Default::default(),
        };
        let walked = db.walk()?;
        *db.walked.lock().unwrap_or_else(|e| e.into_inner()) = Some(walked);
        Ok(db)
    }

    /// Reads a file fully into memory (so a later rename or truncation cannot affect it).
    pub fn open(role: DbRole, path: &std::path::Path) -> Result<Self, GeoError> {
        let bytes = std::fs::read(path).map_err(|error| GeoError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::from_bytes(role, bytes, &path.display().to_string())
    }

    pub fn role(&self) -> DbRole {
        self.role
    }

    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    pub fn database_type(&self) -> &str {
        &self.reader.metadata().database_type
    }

    pub fn build_epoch(&self) -> u64 {
        self.reader.metadata().build_epoch
    }

    /// Every network of the tree, each distinct record decoded in this role's shape; at least
    /// one record must carry role data.
    fn walk(&self) -> Result<Partition, GeoError> {
        let verify = |error| GeoError::Verify {
            source_name: self.source_name.clone(),
            error,
        };
        let mut partition = Partition {
            records: match self.role {
                DbRole::Location => Records::Location(Vec::new()),
                DbRole::Anonymous => Records::Anonymous(Vec::new()),
                DbRole::Asn => Records::Asn(Vec::new()),
            },
            ..Partition::default()
        };
        // A tree of n nodes has n + 1 leaves (more with aliases): reserved, so that the lists
        // are not copied as they grow (capacity never written to is never resident).
        let leaves = self.reader.metadata().node_count as usize + 1;
        partition.v4.reserve(leaves);
        partition.v6.reserve(leaves);
        // Offsets already decoded, and each distinct decoded record's index: City records that
        // differ only in fields no role reads (names, postcodes, coordinates) are one record.
        let mut seen: HashMap<usize, u32> = Default::default();
        let mut distinct: HashMap<Decoded, u32> = Default::default();
        let mut useful = false;
        // Aliases included: a database without IPv4 data has its empty node where the IPv4
        // subtree would be, and the walker skips every empty node equal to it as an alias.
        let options = WithinOptions::default()
            .include_networks_without_data()
            .include_aliased_networks();
        // A tree of n nodes has n + 1 leaves, each reached at most four times (the IPv4
        // subtree and its three aliases); more means nodes shared between branches, a file
        // made to be walked without end.
        let most = 4 * leaves + 16;
        for (walked, item) in self.reader.networks(options).map_err(verify)?.enumerate() {
            if walked > most {
                return Err(verify(MaxMindDbError::invalid_database(
                    "the search tree has more networks than nodes to hold them (shared nodes)",
                )));
            }
            let found = item.map_err(verify)?;
            let network = found.network().map_err(verify)?;
            if let IpNetwork::V6(net) = network
                && is_alias(net)
            {
                // The same IPv4 data again; the readers answer these addresses.
                continue;
            }
            let record = match found.offset() {
                None => NO_RECORD,
                Some(offset) => match seen.get(&offset) {
                    Some(&index) => index,
                    None => {
                        let decoded = self.decode(&found, &mut useful).map_err(verify)?;
                        let index = match distinct.get(&decoded) {
                            Some(&index) => index,
                            None => {
                                let index = partition.records.push(decoded.clone());
                                let index = index.ok_or_else(|| {
                                    verify(MaxMindDbError::invalid_database(
                                        "more distinct records than a compiled table holds",
                                    ))
                                })?;
                                distinct.insert(decoded, index);
                                index
                            }
                        };
                        seen.insert(offset, index);
                        index
                    }
                },
            };
            let prefix = network.prefix();
            match network {
                IpNetwork::V4(net) => partition.v4.push(Cell {
                    start: u32::from(net.network()),
                    record,
                    prefix,
                }),
                IpNetwork::V6(net) => {
                    let start = u128::from(net.network());
                    // A network above the IPv4 subtree answers every IPv4 address, as IPv4 /0.
                    if start == 0 && net.prefix() <= 96 {
                        partition.v4.push(Cell {
                            start: 0,
                            prefix: 0,
                            record,
                        });
                    }
                    partition.v6.push(Cell {
                        start,
                        record,
                        prefix,
                    });
                }
            }
        }
        if self.reader.metadata().ip_version == 4 {
            // An IPv4 database cannot know an IPv6 address: all of IPv6, no record.
            partition.v6 = vec![Cell {
                start: 0,
                prefix: 0,
                record: NO_RECORD,
            }];
        }
        partition.v4.sort_unstable_by_key(|c| c.start);
        partition.v6.sort_unstable_by_key(|c| c.start);
        if useful {
            Ok(partition)
        } else {
            Err(GeoError::WrongRole {
                source_name: self.source_name.clone(),
                role: self.role.as_str(),
                database_type: self.database_type().to_owned(),
            })
        }
    }

    /// Decodes `found` in this role's shape, saying whether it carries role data.
    fn decode(
        &self,
        found: &LookupResult<'_, Vec<u8>>,
        useful: &mut bool,
    ) -> Result<Decoded, MaxMindDbError> {
        Ok(match self.role {
            DbRole::Location => {
                let record = found.decode::<RawLocation>()?.map(location_of);
                let record = record.unwrap_or_default();
                *useful |= record.country.is_some();
                Decoded::Location(record)
            }
            DbRole::Anonymous => {
                let flags = found.decode::<RawAnonymous>()?.map(|r| anonymizer_of(&r));
                let flags = flags.unwrap_or_default();
                *useful |= flags != AnonymizerFlags::default();
                Decoded::Anonymous(flags)
            }
            DbRole::Asn => {
                let record = found.decode::<RawAsn>()?.map(asn_of).unwrap_or_default();
                *useful |= record.asn.is_some();
                Decoded::Asn(record)
            }
        })
    }

    /// Drops the walk made at load (the databases are not compiled).
    pub(crate) fn forget_walk(&self) {
        self.walked.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Every network and its decoded record: the walk made at load, or a new one.
    pub(crate) fn partition(&self) -> Result<Partition, GeoError> {
        let walked = self.walked.lock().unwrap_or_else(|e| e.into_inner()).take();
        walked.map_or_else(|| self.walk(), Ok)
    }

    fn lookup_error(&self) -> impl Fn(MaxMindDbError) -> GeoError + '_ {
        move |error| GeoError::Lookup {
            role: self.role.as_str(),
            error,
        }
    }

    /// The tree walk: the record handle and the network the answer covers.
    /// `None` for an IPv6 address in an IPv4-only database, which cannot know it.
    fn find(&self, ip: IpAddr) -> Result<Option<Found<'_>>, GeoError> {
        if ip.is_ipv6() && self.reader.metadata().ip_version == 4 {
            return Ok(None);
        }
        let found = self.reader.lookup(ip).map_err(self.lookup_error())?;
        let network = found.network().map_err(self.lookup_error())?;
        Ok(Some((found, network)))
    }

    /// The network an unknowable address is answered for: all of IPv6.
    fn whole_v6() -> IpNetwork {
        IpNetwork::V6(
            ipnetwork::Ipv6Network::new(std::net::Ipv6Addr::UNSPECIFIED, 0).expect("/0 is valid"),
        )
    }

    pub fn location(&self, ip: IpAddr) -> Result<(Option<LocationRecord>, IpNetwork), GeoError> {
        let Some((found, network)) = self.find(ip)? else {
            return Ok((None, Self::whole_v6()));
        };
        let record = found.decode::<RawLocation>().map_err(self.lookup_error())?;
        Ok((record.map(location_of), network))
    }

    pub fn anonymizer(&self, ip: IpAddr) -> Result<(Option<AnonymizerFlags>, IpNetwork), GeoError> {
        let Some((found, network)) = self.find(ip)? else {
            return Ok((None, Self::whole_v6()));
        };
        let record = found
            .decode::<RawAnonymous>()
            .map_err(self.lookup_error())?;
        Ok((record.map(|r| anonymizer_of(&r)), network))
    }

    pub fn asn(&self, ip: IpAddr) -> Result<(Option<AsnRecord>, IpNetwork), GeoError> {
        let Some((found, network)) = self.find(ip)? else {
            return Ok((None, Self::whole_v6()));
        };
        let record = found.decode::<RawAsn>().map_err(self.lookup_error())?;
        Ok((record.map(asn_of), network))
    }
}

fn location_of(raw: RawLocation<'_>) -> LocationRecord {
    let country = raw
        .country
        .and_then(|c| c.iso_code)
        .or(raw.country_code)
        .and_then(CountryCode::from_record);
    let subdivisions = match (country, raw.subdivisions) {
        (Some(c), Some(subs)) => subs
            .iter()
            .filter_map(|s| s.iso_code.and_then(|code| RegionCode::subdivision(c, code)))
            .collect(),
        _ => Vec::new(),
    };
    LocationRecord {
        country,
        registered_country: raw
            .registered_country
            .and_then(|c| c.iso_code)
            .and_then(CountryCode::from_record),
        subdivisions,
        accuracy_radius_km: raw.location.and_then(|l| l.accuracy_radius),
    }
}

fn asn_of(raw: RawAsn<'_>) -> AsnRecord {
    AsnRecord {
        asn: raw.autonomous_system_number,
        organization: raw.autonomous_system_organization.map(str::to_owned),
    }
}

fn anonymizer_of(raw: &RawAnonymous) -> AnonymizerFlags {
    AnonymizerFlags {
        vpn: raw.is_anonymous_vpn.unwrap_or(false),
        tor: raw.is_tor_exit_node.unwrap_or(false),
        public_proxy: raw.is_public_proxy.unwrap_or(false),
        residential_proxy: raw.is_residential_proxy.unwrap_or(false),
        hosting: raw.is_hosting_provider.unwrap_or(false),
    }
}
