//! Usage history: what each account did recently and what accounts share, bounded in memory.
//!
//! Gateways and billing stream [`UsageEvent`]s in; [`UsageAggregator::facts`] turns an
//! account's history into the [`UsageFacts`] the classifier reads. Per account it keeps request
//! and token counts (5-minute buckets for 24 h, hourly for 7 days), recently seen IPs, networks
//! (/24, /48), countries, regions, ASNs and API keys, and its country runs (switches, impossible
//! travel). Across accounts it keeps which accounts used each payment fingerprint and each
//! network. All three maps are moka caches with an idle TTL of 7 days and a byte ceiling that
//! evicts (never grows past it); sets saturate at fixed sizes, so one account's cost is bounded.

pub mod window;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::sync::Cache;

use crate::classify::UsageFacts;
use crate::region::{CountryCode, RegionCode};
use window::{CountryRuns, Counts, HISTORY_SECS, Recent, Series};

const HOUR: i64 = 3600;
const DAY: i64 = 86_400;
/// What one moka entry costs beyond its value: the key's allocation, the Arc and Mutex, the
/// cache's node, hash slot and access-order links. Calibrated against resident memory with
/// `cargo bench --bench usage` (see README, Usage signals).
const ENTRY_OVERHEAD: usize = 400;
/// Set sizes: counts saturate here.
const MAX_IPS: usize = 64;
const MAX_NETWORKS: usize = 32;
const MAX_COUNTRIES: usize = 32;
const MAX_ASNS: usize = 32;
const MAX_API_KEYS: usize = 16;
const MAX_RUNS: usize = 64;
const MAX_ACCOUNTS_PER_KEY: usize = 256;

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
}

struct AccountState {
    series: Series,
    ips: Recent<IpAddr>,
    networks: Recent<NetworkKey>,
    countries: Recent<CountryCode>,
    regions: Recent<RegionCode>,
    asns: Recent<u32>,
    api_keys: Recent<Arc<str>>,
    runs: CountryRuns<CountryCode>,
    oldest: i64,
    /// The size this state was last weighed at (moka weighs on insert).
    weighed: usize,
}

impl AccountState {
    fn new(t: i64) -> Self {
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
            weighed: 0,
        }
    }

    /// Estimated bytes: what the memory ceiling counts (allocations by capacity, plus the
    /// cache's own per-entry cost).
    fn bytes(&self) -> usize {
        ENTRY_OVERHEAD
            + std::mem::size_of::<Self>()
            + self.series.heap_bytes()
            + self.ips.heap_bytes()
            + self.networks.heap_bytes()
            + self.countries.heap_bytes()
            + self.regions.heap_bytes()
            + self.asns.heap_bytes()
            + self.api_keys.heap_bytes()
            + self.api_keys.len() * 48
            + self.runs.heap_bytes()
    }
}

type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves counters, not invariants: keep using them.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sizes, for metrics, the README and the memory benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageStats {
    pub accounts: u64,
    pub payment_fingerprints: u64,
    pub networks: u64,
    /// Weighted bytes held, as the ceiling counts them.
    pub bytes: u64,
}

pub struct UsageAggregator {
    accounts: Cache<Arc<str>, Shared<AccountState>>,
    payments: Cache<Arc<str>, Shared<Recent<Arc<str>>>>,
    networks: Cache<NetworkKey, Shared<Recent<Arc<str>>>>,
}

fn shared_cache<K: std::hash::Hash + Eq + Send + Sync + 'static>(
    max_bytes: u64,
) -> Cache<K, Shared<Recent<Arc<str>>>> {
    Cache::builder()
        .max_capacity(max_bytes)
        .time_to_idle(Duration::from_secs(HISTORY_SECS as u64))
        .weigher(|_, v: &Shared<Recent<Arc<str>>>| shared_entry_bytes(&lock(v)))
        .build()
}

/// Bytes one shared-key entry (payment fingerprint or network) costs.
fn shared_entry_bytes(set: &Recent<Arc<str>>) -> u32 {
    (ENTRY_OVERHEAD + std::mem::size_of::<Recent<Arc<str>>>() + set.heap_bytes())
        .min(u32::MAX as usize) as u32
}

impl UsageAggregator {
    /// `max_bytes` bounds the estimated memory of all three maps together (70% accounts, 15%
    /// payment fingerprints, 15% networks).
    pub fn new(max_bytes: u64) -> Self {
        let idle = Duration::from_secs(HISTORY_SECS as u64);
        Self {
            accounts: Cache::builder()
                .max_capacity(max_bytes / 100 * 70)
                .time_to_idle(idle)
                .weigher(|k: &Arc<str>, v: &Shared<AccountState>| {
                    (lock(v).bytes() + k.len()).min(u32::MAX as usize) as u32
                })
                .build(),
            payments: shared_cache(max_bytes / 100 * 15),
            networks: shared_cache(max_bytes / 100 * 15),
        }
    }

    pub fn record(&self, event: &UsageEvent, location: &EventLocation) {
        let t = event.timestamp;
        let entry = self.accounts.get_with(event.account_id.clone(), || {
            Arc::new(Mutex::new(AccountState::new(t)))
        });
        let reweigh = {
            let mut state = lock(&entry);
            let counts = Counts {
                requests: event.requests,
                tokens: event.input_tokens.saturating_add(event.output_tokens),
                anonymized: if location.anonymized {
                    event.requests
                } else {
                    0
                },
            };
            state.series.add(t, counts);
            state.oldest = state.oldest.min(t);
            state.ips.touch(event.ip.to_canonical(), t);
            state.networks.touch(NetworkKey::of(event.ip), t);
            if let Some(country) = location.country {
                state.countries.touch(country, t);
                state.regions.touch(RegionCode::country_only(country), t);
                state.runs.observe(t, country);
                state.runs.prune(t - DAY);
            }
            for region in &location.subdivisions {
                state.regions.touch(*region, t);
            }
            if let Some(asn) = location.asn {
                state.asns.touch(asn, t);
            }
            if let Some(key) = &event.api_key_id {
                state.api_keys.touch(key.clone(), t);
            }
            let bytes = state.bytes();
            let drifted =
                bytes > state.weighed + state.weighed / 4 || bytes + bytes / 4 < state.weighed;
            if drifted {
                state.weighed = bytes;
            }
            drifted
        };
        if reweigh {
            self.accounts.insert(event.account_id.clone(), entry);
        }
        if let Some(fingerprint) = &event.payment_fingerprint {
            Self::touch_shared(&self.payments, fingerprint.clone(), &event.account_id, t);
        }
        Self::touch_shared(
            &self.networks,
            NetworkKey::of(event.ip),
            &event.account_id,
            t,
        );
    }

    fn touch_shared<K>(
        cache: &Cache<K, Shared<Recent<Arc<str>>>>,
        key: K,
        account: &Arc<str>,
        t: i64,
    ) where
        K: std::hash::Hash + Eq + Send + Sync + Clone + 'static,
    {
        let entry = cache.get_with(key.clone(), || {
            Arc::new(Mutex::new(Recent::new(MAX_ACCOUNTS_PER_KEY)))
        });
        let grew = {
            let mut accounts = lock(&entry);
            let before = accounts.len();
            accounts.touch(account.clone(), t);
            accounts.len() != before && accounts.len().is_power_of_two()
        };
        if grew {
            // Re-weigh as the set doubles, so the byte ceiling follows it.
            cache.insert(key, entry);
        }
    }

    /// The account's usage facts at `now`, counting shared keys with this request's IP and
    /// payment fingerprint (this account included). `None` when nothing is known.
    pub fn facts(
        &self,
        account_id: Option<&str>,
        ip: IpAddr,
        payment_fingerprint: Option<&str>,
        now: i64,
    ) -> Option<UsageFacts> {
        let sharing = |set: Option<Shared<Recent<Arc<str>>>>, since: i64| -> Option<u32> {
            let set = set?;
            let set = lock(&set);
            let others = set
                .since(since)
                .filter(|a| Some(&***a) != account_id)
                .count() as u32;
            Some(others + u32::from(account_id.is_some()))
        };
        let payment =
            payment_fingerprint.and_then(|f| sharing(self.payments.get(f), now - HISTORY_SECS));
        let network = sharing(self.networks.get(&NetworkKey::of(ip)), now - DAY);
        let state = account_id.and_then(|id| self.accounts.get(id));
        if state.is_none() && payment.is_none() && network.is_none() {
            return None;
        }
        let mut facts = UsageFacts {
            accounts_sharing_payment: payment.unwrap_or(0),
            accounts_sharing_network: network.unwrap_or(0),
            ..UsageFacts::default()
        };
        if let Some(state) = state {
            let state = lock(&state);
            let hour = state.series.sum(now, HOUR);
            let day = state.series.sum(now, DAY);
            let week = state.series.sum(now, HISTORY_SECS);
            let observed_hours = ((now - state.oldest) / HOUR).clamp(1, HISTORY_SECS / HOUR - 1);
            let (switches, fastest) = state.runs.switches_since(now - DAY);
            facts.requests_1h = hour.requests;
            facts.baseline_requests_per_hour =
                week.requests.saturating_sub(hour.requests) as f64 / observed_hours as f64;
            facts.requests_24h = day.requests;
            facts.anonymized_requests_24h = day.anonymized;
            facts.distinct_countries_24h = state.countries.count_since(now - DAY);
            facts.distinct_ips_24h = state.ips.count_since(now - DAY);
            facts.distinct_networks_24h = state.networks.count_since(now - DAY);
            facts.distinct_asns_24h = state.asns.count_since(now - DAY);
            facts.country_switches_24h = switches;
            facts.fastest_country_switch_secs = fastest;
            facts.api_keys_24h = state.api_keys.count_since(now - DAY);
            facts.regions_7d = state.regions.since(now - HISTORY_SECS).copied().collect();
        }
        Some(facts)
    }

    pub fn stats(&self) -> UsageStats {
        for cache in [
            &self.accounts as &dyn Pending,
            &self.payments,
            &self.networks,
        ] {
            cache.pending();
        }
        UsageStats {
            accounts: self.accounts.entry_count(),
            payment_fingerprints: self.payments.entry_count(),
            networks: self.networks.entry_count(),
            bytes: self.accounts.weighted_size()
                + self.payments.weighted_size()
                + self.networks.weighted_size(),
        }
    }
}

/// Lets `stats` flush moka's pending bookkeeping so counts are current.
trait Pending {
    fn pending(&self);
}

impl<K: std::hash::Hash + Eq + Send + Sync + 'static, V: Clone + Send + Sync + 'static> Pending
    for Cache<K, V>
{
    fn pending(&self) {
        self.run_pending_tasks();
    }
}

#[cfg(test)]
mod tests;
