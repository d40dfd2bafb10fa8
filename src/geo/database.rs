//! One MaxMind-format database in one role (location, anonymous-IP or ASN).
//!
//! A database is opened from bytes, then every network in its search tree is walked and every
//! record decoded in the shape its role needs; only then is it offered for use. A file that opens
//! but cannot be decoded (MaxMind's Broken-Double-Format test file, a truncated copy) is refused
//! here rather than failing requests later. (The reader's own `verify()` is stricter about
//! metadata than real-world writers are: the ip-location-db files have an empty description.)

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
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LocationRecord {
    pub country: Option<CountryCode>,
    pub registered_country: Option<CountryCode>,
    pub subdivisions: Vec<RegionCode>,
    pub accuracy_radius_km: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct AsnRecord {
    pub asn: Option<u32>,
    pub organization: Option<String>,
}

/// A record handle and the network the answer covers.
type Found<'a> = (LookupResult<'a, Vec<u8>>, IpNetwork);

/// A loaded database with its metadata.
pub struct GeoDatabase {
    role: DbRole,
    reader: Reader<Vec<u8>>,
    source_name: String,
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
        };
        db.probe()?;
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

    /// Decodes every record in this role's shape; at least one must carry role data.
    fn probe(&self) -> Result<(), GeoError> {
        let verify = |error| GeoError::Verify {
            source_name: self.source_name.clone(),
            error,
        };
        let mut useful = false;
        for item in self
            .reader
            .networks(WithinOptions::default())
            .map_err(verify)?
        {
            let found = item.map_err(verify)?;
            useful |= match self.role {
                DbRole::Location => found
                    .decode::<RawLocation>()
                    .map_err(verify)?
                    .is_some_and(|r| location_of(r).country.is_some()),
                DbRole::Anonymous => found
                    .decode::<RawAnonymous>()
                    .map_err(verify)?
                    .is_some_and(|r| anonymizer_of(&r) != AnonymizerFlags::default()),
                DbRole::Asn => found
                    .decode::<RawAsn>()
                    .map_err(verify)?
                    .is_some_and(|r| r.autonomous_system_number.is_some()),
            };
        }
        if useful {
            Ok(())
        } else {
            Err(GeoError::WrongRole {
                source_name: self.source_name.clone(),
                role: self.role.as_str(),
                database_type: self.database_type().to_owned(),
            })
        }
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
        let asn = record.map(|r| AsnRecord {
            asn: r.autonomous_system_number,
            organization: r.autonomous_system_organization.map(str::to_owned),
        });
        Ok((asn, network))
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

fn anonymizer_of(raw: &RawAnonymous) -> AnonymizerFlags {
    AnonymizerFlags {
        vpn: raw.is_anonymous_vpn.unwrap_or(false),
        tor: raw.is_tor_exit_node.unwrap_or(false),
        public_proxy: raw.is_public_proxy.unwrap_or(false),
        residential_proxy: raw.is_residential_proxy.unwrap_or(false),
        hosting: raw.is_hosting_provider.unwrap_or(false),
    }
}
