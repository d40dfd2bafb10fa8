//! Usage history: what each account did recently and what accounts share — the port the engine
//! and `Usage/Report` call, and its two adapters.
//!
//! Gateways and billing stream [`UsageEvent`]s in; a [`UsageHistory`] turns an account's
//! history into the [`UsageFacts`] the classifier reads. Per account it keeps request and token
//! counts (5-minute buckets for 24 h, hourly for 7 days), recently seen IPs, networks (/24,
//! /48), countries, regions, ASNs and API keys, and its country runs (switches, impossible
//! travel); across accounts, which accounts used each payment fingerprint and each network.
//!
//! - [`memory`]: in-process (one replica), the embedded default.
//! - [`redis`]: shared by every replica through Redis (`[usage] redis_url`).
//! - [`account`] and [`window`]: the counting both share, so both answer alike; [`codec`]: the
//!   account state as Redis stores it.

mod account;
mod bounded;
mod codec;
pub mod fleet;
pub mod memory;
pub mod redis;
mod shared_fleets;
pub mod window;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use crate::classify::UsageFacts;
use crate::region::{CountryCode, RegionCode};

pub use memory::UsageAggregator;

const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

/// One usage report, checked at the edge.
#[derive(Clone, Debug)]
pub struct UsageEvent {
    pub account_id: Arc<str>,
    pub ip: IpAddr,
    /// Seconds since the Unix epoch.
    pub timestamp: i64,
    pub api_key_id: Option<Arc<str>>,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub payment_fingerprint: Option<Arc<str>>,
    pub device_id: Option<Arc<str>>,
    pub prompt_fingerprint: Option<Arc<str>>,
    /// Lowercase, without a trailing dot.
    pub organization_domain: Option<Arc<str>>,
}

/// What the geo databases said of an event's IP.
#[derive(Clone, Debug, Default)]
pub struct EventLocation {
    pub country: Option<CountryCode>,
    /// ISO 3166-2 subdivisions of the location.
    pub subdivisions: Vec<RegionCode>,
    pub asn: Option<u32>,
    /// VPN, Tor, proxy or hosting.
    pub anonymized: bool,
}

/// The /24 (IPv4) or /48 (IPv6) an address is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetworkKey {
    bits: u128,
    v6: bool,
}

impl NetworkKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self {
                bits: u128::from(u32::from(v4) & 0xffff_ff00),
                v6: false,
            },
            IpAddr::V6(v6) => Self {
                bits: u128::from(v6) & (u128::MAX << 80),
                v6: true,
            },
        }
    }

    pub(crate) fn parts(&self) -> (u128, bool) {
        (self.bits, self.v6)
    }

    /// From [`NetworkKey::parts`]; bits beyond the prefix are cleared.
    pub(crate) fn from_parts(bits: u128, v6: bool) -> Self {
        if v6 {
            Self {
                bits: bits & (u128::MAX << 80),
                v6,
            }
        } else {
            Self {
                bits: bits & 0xffff_ff00,
                v6,
            }
        }
    }
}

impl std::fmt::Display for NetworkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.v6 {
            write!(f, "{}/48", std::net::Ipv6Addr::from(self.bits))
        } else {
            write!(f, "{}/24", std::net::Ipv4Addr::from(self.bits as u32))
        }
    }
}

/// What a decision asks of the history: the account, this request's address and payment
/// fingerprint (sharing is counted against both).
#[derive(Clone, Copy, Debug)]
pub struct UsageQuery<'a> {
    pub account_id: Option<&'a str>,
    pub ip: IpAddr,
    pub payment_fingerprint: Option<&'a str>,
    /// Seconds since the Unix epoch.
    pub now: i64,
}

/// A read that waits on a remote engine; it never takes longer than the adapter's timeout and
/// then answers from what it holds locally, marked degraded.
pub type PendingFacts<'a> = Pin<Box<dyn Future<Output = Option<UsageFacts>> + Send + 'a>>;

/// The answer to a [`UsageQuery`]: at once (in-process, or from the adapter's short cache), or
/// after a bounded round trip.
pub enum UsageLookup<'a> {
    Ready(Option<UsageFacts>),
    Pending(PendingFacts<'a>),
}

impl UsageLookup<'_> {
    pub async fn resolve(self) -> Option<UsageFacts> {
        match self {
            UsageLookup::Ready(facts) => facts,
            UsageLookup::Pending(read) => read.await,
        }
    }
}

/// Sizes and health, for metrics, the docs and the benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageStats {
    /// Accounts held (in-process only; a remote engine is sized from its own metrics).
    pub accounts: u64,
    pub payment_fingerprints: u64,
    pub networks: u64,
    /// Weighted bytes held in this process, as the ceiling counts them.
    pub bytes: u64,
    /// Calls to the remote engine that failed or timed out.
    pub backend_errors: u64,
    /// Decisions made without the remote engine (`UsageSummary.degraded`).
    pub degraded_reads: u64,
    /// Events accepted but not yet written to the remote engine.
    pub pending_events: u64,
    /// Events that could not be kept (the pending bound was reached, or the remote engine
    /// refused their account's key for good): counted, never silent.
    pub lost_events: u64,
    /// Events written to the remote engine.
    pub written_events: u64,
    /// Connections to the remote engine replaced because they stopped answering.
    pub reconnects: u64,
}

/// One fleet as reviewers see it: who is in it, what they did, what links them.
#[derive(Clone, Debug, PartialEq)]
pub struct Fleet {
    pub facts: crate::classify::FleetFacts,
    /// At most [`Fleet::MAX_LISTED`], by account id.
    pub members: Vec<FleetMember>,
    /// The values that link members: kind, value, members sharing it; most shared first.
    pub links: Vec<(crate::classify::LinkKind, String, u32)>,
    /// Of the members listed: combined requests in 24 hours, countries used from in 7 days.
    pub requests_24h: u64,
    pub countries: Vec<CountryCode>,
}

impl Fleet {
    pub const MAX_LISTED: usize = 1000;
}

/// A fleet report on its way: `Err` says why the history could not be read.
pub type PendingFleet<'a> =
    Pin<Box<dyn Future<Output = Result<Option<Fleet>, String>> + Send + 'a>>;

/// A fleet for reviewers from the graph's report and each listed member's usage.
pub(crate) fn fleet_from(
    report: fleet::FleetReport,
    mut usage_of: impl FnMut(&str) -> UsageFacts,
) -> Fleet {
    let fleet::FleetReport {
        facts,
        members,
        links,
    } = report;
    let mut countries = std::collections::BTreeSet::new();
    let members: Vec<FleetMember> = members
        .into_iter()
        .take(Fleet::MAX_LISTED)
        .map(|account_id| {
            let usage = usage_of(&account_id);
            let countries_7d: Vec<_> = usage
                .regions_7d
                .iter()
                .filter(|r| !r.is_subdivision())
                .map(|r| r.country())
                .collect();
            countries.extend(countries_7d.iter().copied());
            FleetMember {
                account_id,
                requests_24h: usage.requests_24h,
                countries_7d,
            }
        })
        .collect();
    Fleet {
        facts,
        requests_24h: members.iter().map(|m| m.requests_24h).sum(),
        members,
        links,
        countries: countries.into_iter().collect(),
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct FleetMember {
    pub account_id: Arc<str>,
    pub requests_24h: u64,
    pub countries_7d: Vec<CountryCode>,
}

/// The usage-history port. Implementations must answer a query without blocking the calling
/// thread; writes may be deferred (batched), reads may come from a short cache.
pub trait UsageHistory: Send + Sync {
    /// Records one event, located by the geo databases. Returns false when the event could not
    /// be kept (counted in [`UsageStats::lost_events`]).
    fn record(&self, event: &UsageEvent, location: &EventLocation) -> bool;

    /// The facts for a decision.
    fn facts<'a>(&'a self, query: UsageQuery<'_>) -> UsageLookup<'a>;

    fn stats(&self) -> UsageStats;

    /// Waits until every event recorded before the call is written (in-process: until a fleet
    /// rebuild in progress is done and the events it held back are applied).
    fn flush(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }

    /// Which adapter this is, for the start log.
    fn describe(&self) -> String;

    /// Which link kinds make fleets, from the policy (on start and on every reload).
    fn set_fleet_rules(&self, _rules: &crate::policy::FleetRules) {}

    /// A fleet by its id, for reviewers; `Ok(None)` when unknown, `Err` when the engine that
    /// holds fleets cannot be read.
    fn fleet<'a>(&'a self, _fleet_id: &'a str, _now: i64) -> PendingFleet<'a> {
        Box::pin(async { Ok(None) })
    }
}

#[cfg(test)]
mod tests;
