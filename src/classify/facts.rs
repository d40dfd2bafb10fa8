//! The classifier's input: everything known about one request, already parsed and checked.
//!
//! Built by the edges (geo lookup, proto conversion); the core never sees an unchecked string.

use crate::classify::ownership::Organization;
use crate::region::{CountryCode, RegionCode};

/// Where in the product the request comes from; thresholds are per flow.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    #[default]
    ApiRequest,
    Signup,
    Login,
}

impl Flow {
    pub const ALL: [Flow; 3] = [Flow::ApiRequest, Flow::Signup, Flow::Login];

    pub fn as_str(self) -> &'static str {
        match self {
            Flow::ApiRequest => "api_request",
            Flow::Signup => "signup",
            Flow::Login => "login",
        }
    }
}

/// Anonymizer flags from an Anonymous-IP database; all false when unknown.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(default)]
pub struct AnonymizerFlags {
    pub vpn: bool,
    pub tor: bool,
    pub public_proxy: bool,
    pub residential_proxy: bool,
    pub hosting: bool,
}

/// What the geo databases say about the IP.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct IpFacts {
    pub country: Option<CountryCode>,
    /// ISO 3166-2 subdivisions, least to most specific.
    pub subdivisions: Vec<RegionCode>,
    pub anonymizer: AnonymizerFlags,
}

/// What the caller told us about the account.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AccountFacts {
    pub billing_country: Option<CountryCode>,
    pub phone_country: Option<CountryCode>,
    pub payment_country: Option<CountryCode>,
    pub declared_country: Option<CountryCode>,
    pub created_at_unix: Option<i64>,
    pub organization: Option<Organization>,
    /// What the account holder has proved (phone, document, …), when and from where.
    pub verifications: Vec<Verification>,
}

/// A closed set of names (as policies, requests and evidence spell them): the enum, `ALL` in
/// declaration order, `as_str`, `parse`, `names` (for an error that says what is accepted) and
/// serde as the name.
macro_rules! closed_names {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($variant:ident = $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($variant,)*
        }

        impl $name {
            pub const ALL: [$name; [$($text),*].len()] = [$($name::$variant),*];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }

            pub fn parse(text: &str) -> Option<Self> {
                Self::ALL.into_iter().find(|k| k.as_str() == text)
            }

            pub fn names() -> String {
                Self::ALL.map(Self::as_str).join(", ")
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                Self::parse(&text).ok_or_else(|| {
                    serde::de::Error::custom(format!(concat!("unknown ", $what, " {:?}"), text))
                })
            }
        }
    };
}

closed_names! {
    /// What a verification proved, named as `[verifications]` and `required_verifications`
    /// name it.
    VerificationKind, "verification kind" {
        Phone = "PHONE",
        Email = "EMAIL",
        IdDocument = "ID_DOCUMENT",
        PaymentVerification = "PAYMENT_VERIFICATION",
        Address = "ADDRESS",
    }
}

closed_names! {
    /// What links two accounts into a fleet: a value both used within the usage window, named
    /// as the policy's `[fleets.links]` and the evidence's `links` name it.
    LinkKind, "link kind" {
        PaymentFingerprint = "PAYMENT_FINGERPRINT",
        ApiKey = "API_KEY",
        Device = "DEVICE",
        OrganizationDomain = "ORGANIZATION_DOMAIN",
        Network = "NETWORK",
        PromptTemplate = "PROMPT_TEMPLATE",
    }
}

impl LinkKind {
    pub const fn bit(self) -> u8 {
        1 << self as u8
    }

    /// The kinds in a bit set of [`LinkKind::bit`], in declaration order.
    pub fn from_bits(bits: u8) -> Vec<LinkKind> {
        Self::ALL
            .into_iter()
            .filter(|k| bits & k.bit() != 0)
            .collect()
    }
}

/// The fleet an account belongs to: the connected component of accounts linked by shared
/// values (see [`LinkKind`]), as the usage history holds it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct FleetFacts {
    /// Stable while the fleet's founding member stays in the window.
    pub id: String,
    /// The ids the fleet had before: those of fleets whose founders it now holds (fleets that
    /// merged into it; its own before an earlier member turned up). A DENY override on any of
    /// them holds for the fleet.
    pub formerly: Vec<String>,
    /// Accounts in the fleet, this one included.
    pub size: u32,
    /// The link kinds that hold it together.
    pub links: Vec<LinkKind>,
    /// Fleet members active in the last hour.
    pub active_members_1h: u32,
    /// Pairs of members active in the same minute over the last hour, and how many chance
    /// alone would give members with those activity levels.
    pub coactive_pairs_1h: u64,
    pub expected_coactive_pairs_1h: f64,
}

/// One verification the caller says the account passed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Verification {
    pub kind: VerificationKind,
    /// The number's or the document's country, where known.
    pub country: Option<CountryCode>,
    pub verified_at_unix: i64,
}

/// Client hints, parsed: regions named by Accept-Language and the IANA time zone.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct HintFacts {
    pub language_regions: Vec<CountryCode>,
    pub timezone: Option<String>,
}

/// What the account's recent history shows: from the usage aggregator, or sent inline by a
/// caller that keeps its own counters.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct UsageFacts {
    pub requests_1h: u64,
    /// Average requests per hour over the 7 days before the last hour.
    pub baseline_requests_per_hour: f64,
    pub requests_24h: u64,
    /// Requests in 24 hours that came through an anonymizer or hosting network.
    pub anonymized_requests_24h: u64,
    pub distinct_countries_24h: u32,
    pub distinct_ips_24h: u32,
    pub distinct_networks_24h: u32,
    pub distinct_asns_24h: u32,
    pub country_switches_24h: u32,
    /// The shortest time between use from one country and use from another, in 24 hours.
    pub fastest_country_switch_secs: Option<u64>,
    pub api_keys_24h: u32,
    /// Accounts (this one included) seen with the same payment fingerprint.
    pub accounts_sharing_payment: u32,
    /// Accounts (this one included) seen on this request's /24 or /48 in 24 hours.
    pub accounts_sharing_network: u32,
    /// Countries and subdivisions the account was used from in 7 days.
    pub regions_7d: Vec<RegionCode>,
    /// The fleet the account belongs to (at least two linked accounts).
    pub fleet: Option<FleetFacts>,
    /// Accounts (this one included) that sent the account's most widely shared prompt-template
    /// fingerprint in 7 days.
    pub accounts_sharing_template: u32,
    /// The shared usage history could not be read in time: these facts are what this replica
    /// held locally (possibly nothing), and may undercount.
    pub degraded: bool,
}

/// What a reviewer's override does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum OverrideAction {
    Allow,
    Deny,
}

/// A reviewer's override that matches this request (account, organisation domain, network or fleet),
/// active at the time of the request.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OverrideFact {
    pub id: String,
    pub action: OverrideAction,
    /// What it matched, e.g. `account:acct-42` or `network:198.51.100.0/24`.
    pub scope: String,
    pub reviewer: String,
    pub reason: String,
    pub expires_at_ms: Option<i64>,
}

/// One request's facts, borrowed from wherever the edges keep them.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub flow: Flow,
    /// "Now", in seconds since the Unix epoch: an argument, never read from a clock here.
    pub now_unix: i64,
    pub ip: &'a IpFacts,
    pub account: &'a AccountFacts,
    pub hints: &'a HintFacts,
    pub usage: Option<&'a UsageFacts>,
    pub overrides: &'a [OverrideFact],
}
