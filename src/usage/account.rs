//! One account's usage history and the facts read from it: the part both adapters share, so
//! the in-process and the Redis history count the same way (Redis stores this state encoded by
//! [`super::codec`]).

use std::net::IpAddr;
use std::sync::Arc;

use super::window::{CountryRuns, Counts, HISTORY_SECS, Recent, Series};
use super::{DAY, EventLocation, HOUR, NetworkKey, UsageEvent};
use crate::classify::UsageFacts;
use crate::region::{CountryCode, RegionCode};

/// Set sizes: counts saturate here.
pub(crate) const MAX_IPS: usize = 64;
pub(crate) const MAX_NETWORKS: usize = 32;
pub(crate) const MAX_COUNTRIES: usize = 32;
pub(crate) const MAX_ASNS: usize = 32;
pub(crate) const MAX_API_KEYS: usize = 16;
pub(crate) const MAX_RUNS: usize = 64;
/// Accounts remembered per payment fingerprint or network.
pub(crate) const MAX_ACCOUNTS_PER_KEY: usize = 256;

/// What is kept of one account.
#[derive(Clone, Debug)]
pub(crate) struct AccountState {
    pub series: Series,
    pub ips: Recent<IpAddr>,
    pub networks: Recent<NetworkKey>,
    pub countries: Recent<CountryCode>,
    pub regions: Recent<RegionCode>,
    pub asns: Recent<u32>,
    pub api_keys: Recent<Arc<str>>,
    pub runs: CountryRuns<CountryCode>,
    /// The oldest event seen (for the baseline's observed hours).
    pub oldest: i64,
}

impl AccountState {
    pub fn new(t: i64) -> Self {
        Self {
            series: Series::default(),
            ips: Recent::new(MAX_IPS),
            networks: Recent::new(MAX_NETWORKS),
            countries: Recent::new(MAX_COUNTRIES),
            regions: Recent::new(MAX_COUNTRIES),
            asns: Recent::new(MAX_ASNS),
            api_keys: Recent::new(MAX_API_KEYS),
            runs: CountryRuns::new(MAX_RUNS),
            oldest: t,
        }
    }

    /// Adds one event.
    pub fn apply(&mut self, event: &UsageEvent, location: &EventLocation) {
        let t = event.timestamp;
        let counts = Counts {
            requests: event.requests,
            tokens: event.input_tokens.saturating_add(event.output_tokens),
            anonymized: if location.anonymized {
                event.requests
            } else {
                0
            },
        };
        self.series.add(t, counts);
        self.oldest = self.oldest.min(t);
        self.ips.touch(event.ip.to_canonical(), t);
        self.networks.touch(NetworkKey::of(event.ip), t);
        if let Some(country) = location.country {
            self.countries.touch(country, t);
            self.regions.touch(RegionCode::country_only(country), t);
            self.runs.observe(t, country);
            self.runs.prune(t - DAY);
        }
        for region in &location.subdivisions {
            self.regions.touch(*region, t);
        }
        if let Some(asn) = location.asn {
            self.asns.touch(asn, t);
        }
        if let Some(key) = &event.api_key_id {
            self.api_keys.touch(key.clone(), t);
        }
    }

    /// Heap bytes allocated by the state, for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        self.series.heap_bytes()
            + self.ips.heap_bytes()
            + self.networks.heap_bytes()
            + self.countries.heap_bytes()
            + self.regions.heap_bytes()
            + self.asns.heap_bytes()
            + self.api_keys.heap_bytes()
            + self.api_keys.len() * 48
            + self.runs.heap_bytes()
    }

    /// Writes the account's own facts at `now` into `facts` (sharing counts are the caller's).
    pub fn fill(&self, facts: &mut UsageFacts, now: i64) {
        OwnFacts::of(self, now).write_into(facts);
    }
}

/// An account's own facts at one second: what its state says, sharing counts aside. The
/// in-process history keeps the last one beside the state, so that an account asked about
/// many times a second reads its state (a dozen allocations) once.
#[derive(Clone, Debug)]
pub(crate) struct OwnFacts {
    /// The second these are the facts of.
    pub at: i64,
    requests_1h: u64,
    baseline_requests_per_hour: f64,
    requests_24h: u64,
    anonymized_requests_24h: u64,
    distinct_countries_24h: u32,
    distinct_ips_24h: u32,
    distinct_networks_24h: u32,
    distinct_asns_24h: u32,
    country_switches_24h: u32,
    fastest_country_switch_secs: Option<u64>,
    api_keys_24h: u32,
    regions_7d: Vec<RegionCode>,
}

impl OwnFacts {
    pub fn of(state: &AccountState, now: i64) -> Self {
        let hour = state.series.sum(now, HOUR);
        let day = state.series.sum(now, DAY);
        let week = state.series.sum(now, HISTORY_SECS);
        let observed_hours = ((now - state.oldest) / HOUR).clamp(1, HISTORY_SECS / HOUR - 1);
        let (switches, fastest) = state.runs.switches_since(now - DAY);
        let mut regions_7d: Vec<RegionCode> =
            state.regions.since(now - HISTORY_SECS).copied().collect();
        // A set: in code order, so the answer does not depend on the order events arrived in
        // (replicas write one account's events in any interleaving).
        regions_7d.sort_unstable();
        Self {
            at: now,
            requests_1h: hour.requests,
            baseline_requests_per_hour: week.requests.saturating_sub(hour.requests) as f64
                / observed_hours as f64,
            requests_24h: day.requests,
            anonymized_requests_24h: day.anonymized,
            distinct_countries_24h: state.countries.count_since(now - DAY),
            distinct_ips_24h: state.ips.count_since(now - DAY),
            distinct_networks_24h: state.networks.count_since(now - DAY),
            distinct_asns_24h: state.asns.count_since(now - DAY),
            country_switches_24h: switches,
            fastest_country_switch_secs: fastest,
            api_keys_24h: state.api_keys.count_since(now - DAY),
            regions_7d,
        }
    }

    /// Heap bytes allocated, for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        self.regions_7d.capacity() * std::mem::size_of::<RegionCode>()
    }

    pub fn write_into(self, facts: &mut UsageFacts) {
        facts.requests_1h = self.requests_1h;
        facts.baseline_requests_per_hour = self.baseline_requests_per_hour;
        facts.requests_24h = self.requests_24h;
        facts.anonymized_requests_24h = self.anonymized_requests_24h;
        facts.distinct_countries_24h = self.distinct_countries_24h;
        facts.distinct_ips_24h = self.distinct_ips_24h;
        facts.distinct_networks_24h = self.distinct_networks_24h;
        facts.distinct_asns_24h = self.distinct_asns_24h;
        facts.country_switches_24h = self.country_switches_24h;
        facts.fastest_country_switch_secs = self.fastest_country_switch_secs;
        facts.api_keys_24h = self.api_keys_24h;
        facts.regions_7d = self.regions_7d;
    }
}

/// Accounts sharing a key, this one included: `others` seen in the window besides the asking
/// account, plus one for the asking account when it is known.
pub(crate) fn sharing(others: u32, asking: bool) -> u32 {
    others + u32::from(asking)
}

/// Facts from what a history found (the account's own facts, and the other accounts seen with
/// the payment fingerprint and the network): `None` when it knows nothing of any of them.
pub(crate) fn facts(
    own: Option<OwnFacts>,
    payment_others: Option<u32>,
    network_others: Option<u32>,
    asking: bool,
) -> Option<UsageFacts> {
    if own.is_none() && payment_others.is_none() && network_others.is_none() {
        return None;
    }
    let mut facts = UsageFacts {
        accounts_sharing_payment: payment_others.map_or(0, |n| sharing(n, asking)),
        accounts_sharing_network: network_others.map_or(0, |n| sharing(n, asking)),
        ..UsageFacts::default()
    };
    if let Some(own) = own {
        own.write_into(&mut facts);
    }
    Some(facts)
}
