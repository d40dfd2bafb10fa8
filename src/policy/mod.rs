//! The policy: which regions are restricted and for what, signal weights, thresholds.
//!
//! Policy is data (`data/policy.toml`); [`load`] parses and validates it into this compiled,
//! read-only form whose lookups cost no allocation. A `Policy` is swapped whole on reload.

mod load;

pub use load::{PolicyError, parse_policy};

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::classify::{Flow, LinkKind, ReasonCode, VerificationKind};
use crate::region::{CountryCode, RegionCode};

/// The policy's restricted lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ListKind {
    Sanctioned,
    Unsupported,
}

impl ListKind {
    pub const ALL: [ListKind; 2] = [ListKind::Sanctioned, ListKind::Unsupported];

    pub fn as_str(self) -> &'static str {
        match self {
            ListKind::Sanctioned => "sanctioned",
            ListKind::Unsupported => "unsupported",
        }
    }

    fn bit(self) -> u8 {
        match self {
            ListKind::Sanctioned => 1,
            ListKind::Unsupported => 2,
        }
    }
}

/// The account or request attributes a restricted list can apply to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Attribute {
    Ip,
    Billing,
    Payment,
    Phone,
    Declared,
    Ownership,
    Hints,
}

impl Attribute {
    pub const ALL: [Attribute; 7] = [
        Attribute::Ip,
        Attribute::Billing,
        Attribute::Payment,
        Attribute::Phone,
        Attribute::Declared,
        Attribute::Ownership,
        Attribute::Hints,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Attribute::Ip => "ip",
            Attribute::Billing => "billing",
            Attribute::Payment => "payment",
            Attribute::Phone => "phone",
            Attribute::Declared => "declared",
            Attribute::Ownership => "ownership",
            Attribute::Hints => "hints",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Scores at or above `review` give REVIEW; at or above `deny`, DENY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub review: u8,
    pub deny: u8,
}

/// What an IP with no known country leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownLocation {
    /// Adds the IP_LOCATION_UNKNOWN weight to the score, nothing more.
    Score,
    /// As `Score`, and the verdict is at least REVIEW.
    Review,
    /// IP_LOCATION_UNKNOWN becomes a hard reason: DENY.
    Deny,
}

/// Thresholds for the usage-history signals (USAGE_* reasons).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UsageRules {
    pub country_hopping_min_countries: u32,
    pub impossible_travel_max_secs: u64,
    /// 0..=1.
    pub anonymizer_share_min: f64,
    pub anonymizer_share_min_requests: u64,
    pub volume_spike_factor: f64,
    pub volume_spike_min_requests: u64,
    pub shared_payment_min_accounts: u32,
    pub shared_network_min_accounts: u32,
}

/// What links accounts into fleets, and the fleet reasons' thresholds (`[fleets]`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FleetRules {
    /// Per [`LinkKind`] (by `as usize`): accounts that must share one value before it links
    /// them; `None` when the kind does not link.
    pub links: [Option<u32>; LinkKind::ALL.len()],
    /// USAGE_FLEET: a fleet of at least this many accounts.
    pub min_accounts: u32,
    /// USAGE_COORDINATED_ACTIVITY: co-active member pairs at least this many times chance...
    pub coordinated_min_ratio: f64,
    /// ...with at least this many members active in the hour.
    pub coordinated_min_members: u32,
    /// USAGE_TEMPLATE_REPETITION: one prompt-template fingerprint sent by this many accounts.
    pub template_min_accounts: u32,
}

impl FleetRules {
    /// The minimum strength of `kind`, when it links.
    pub fn link(&self, kind: LinkKind) -> Option<u32> {
        self.links[kind as usize]
    }
}

impl Default for FleetRules {
    /// What a policy without `[fleets]` gets.
    fn default() -> Self {
        let mut links = [Some(2); LinkKind::ALL.len()];
        links[LinkKind::Network as usize] = Some(20);
        Self {
            links,
            min_accounts: 10,
            coordinated_min_ratio: 4.0,
            coordinated_min_members: 5,
            template_min_accounts: 20,
        }
    }
}

/// `<declared date>+<first 12 hex digits of the file's SHA-256>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyVersion {
    text: Arc<str>,
    /// A hash of `text`, computed once: versions key caches that rehash their keys often.
    fingerprint: u64,
}

impl PolicyVersion {
    pub(crate) fn new(text: String) -> Self {
        // FNV-1a: equal texts, equal fingerprints; the text itself decides equality.
        let fingerprint = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Self {
            text: text.into(),
            fingerprint,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl std::hash::Hash for PolicyVersion {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.fingerprint);
    }
}

impl fmt::Display for PolicyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A validated, compiled policy.
#[derive(Clone, Debug)]
pub struct Policy {
    version: PolicyVersion,
    /// Per list: the attributes it applies to (bit set of [`Attribute::bit`]).
    applies_to: [u8; 2],
    /// Per country index: the lists naming the whole country (bit set of [`ListKind::bit`]).
    countries: Box<[u8; 676]>,
    subdivisions: HashMap<RegionCode, u8>,
    /// Indexed by `ReasonCode as usize`.
    weights: Box<[u8]>,
    thresholds: [Thresholds; 3],
    /// Indexed by `ReasonCode as usize`.
    verifications: Box<[Vec<VerificationKind>]>,
    /// Indexed by `VerificationKind as usize`: how long a verification clears reasons.
    verification_max_age_secs: [i64; VerificationKind::ALL.len()],
    ownership_threshold_percent: f64,
    new_account_max_age_secs: i64,
    unknown_location: UnknownLocation,
    timezones: HashMap<String, RegionCode>,
    usage: UsageRules,
    fleets: FleetRules,
    overrides_may_lift_sanctions: bool,
}

impl Policy {
    pub fn version(&self) -> &PolicyVersion {
        &self.version
    }

    /// The list that restricts `region` for `attribute`, sanctions first. A subdivision is
    /// restricted if it is listed itself or its whole country is.
    pub fn restriction(&self, region: RegionCode, attribute: Attribute) -> Option<ListKind> {
        let mut lists = self.countries[region.country().index()];
        if region.is_subdivision() {
            lists |= self.subdivisions.get(&region).copied().unwrap_or(0);
        }
        ListKind::ALL.into_iter().find(|list| {
            lists & list.bit() != 0 && self.applies_to[*list as usize] & attribute.bit() != 0
        })
    }

    pub fn country_restriction(
        &self,
        country: CountryCode,
        attribute: Attribute,
    ) -> Option<ListKind> {
        self.restriction(RegionCode::country_only(country), attribute)
    }

    /// Whether any list applies to `attribute` at all (used to skip work).
    pub fn applies(&self, list: ListKind, attribute: Attribute) -> bool {
        self.applies_to[list as usize] & attribute.bit() != 0
    }

    /// The contribution of a soft reason; hard reasons are not weighted.
    pub fn weight(&self, code: ReasonCode) -> u8 {
        self.weights.get(code as usize).copied().unwrap_or(0)
    }

    pub fn thresholds(&self, flow: Flow) -> Thresholds {
        self.thresholds[flow as usize]
    }

    /// Verifications that clear a soft reason (all of them, fresh), and that signup asks for.
    pub fn verifications(&self, code: ReasonCode) -> &[VerificationKind] {
        self.verifications
            .get(code as usize)
            .map_or(&[], Vec::as_slice)
    }

    /// How old a verification of `kind` may be and still clear reasons.
    pub fn verification_max_age_secs(&self, kind: VerificationKind) -> i64 {
        self.verification_max_age_secs[kind as usize]
    }

    pub fn ownership_threshold_percent(&self) -> f64 {
        self.ownership_threshold_percent
    }

    pub fn new_account_max_age_secs(&self) -> i64 {
        self.new_account_max_age_secs
    }

    pub fn unknown_location(&self) -> UnknownLocation {
        self.unknown_location
    }

    /// The region an IANA time zone name points to, where the policy maps it.
    pub fn timezone_region(&self, timezone: &str) -> Option<RegionCode> {
        self.timezones.get(timezone).copied()
    }

    pub fn usage(&self) -> &UsageRules {
        &self.usage
    }

    pub fn fleets(&self) -> &FleetRules {
        &self.fleets
    }

    /// Whether a reviewer's ALLOW override may lift a DENY from the sanctioned list.
    pub fn overrides_may_lift_sanctions(&self) -> bool {
        self.overrides_may_lift_sanctions
    }

    /// Every listed region with its list, for reports (`policy check`).
    pub fn listed_regions(&self) -> Vec<(RegionCode, ListKind)> {
        let mut out = Vec::new();
        for list in ListKind::ALL {
            for (index, bits) in self.countries.iter().enumerate() {
                if bits & list.bit() != 0 {
                    let code = [b'A' + (index / 26) as u8, b'A' + (index % 26) as u8];
                    let text = std::str::from_utf8(&code).unwrap_or("??");
                    if let Some(country) = CountryCode::from_record(text) {
                        out.push((RegionCode::country_only(country), list));
                    }
                }
            }
            let mut subs: Vec<_> = self
                .subdivisions
                .iter()
                .filter(|(_, bits)| *bits & list.bit() != 0)
                .map(|(r, _)| *r)
                .collect();
            subs.sort();
            out.extend(subs.into_iter().map(|r| (r, list)));
        }
        out
    }
}

/// The default policy shipped in `data/policy.toml`, compiled into the binary.
pub const EMBEDDED_POLICY: &str = include_str!("../../data/policy.toml");

/// The embedded default policy, parsed (it is tested to be valid).
pub fn embedded_policy() -> Result<Policy, PolicyError> {
    parse_policy(EMBEDDED_POLICY, "data/policy.toml")
}
