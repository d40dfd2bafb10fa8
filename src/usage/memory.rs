//! In-process usage history: the embedded default, for one replica.
//!
//! All three maps (accounts, payment fingerprints, networks) are moka caches with an idle TTL
//! of 7 days and a byte ceiling that evicts (never grows past it); sets saturate at fixed
//! sizes, so one account's cost is bounded.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::sync::Cache;

use super::account::{self, AccountState, MAX_ACCOUNTS_PER_KEY};
use super::fleet::FleetGraph;
use super::window::{HISTORY_SECS, Recent};
use super::{
    DAY, EventLocation, NetworkKey, PendingFleet, UsageEvent, UsageHistory, UsageLookup,
    UsageQuery, UsageStats,
};
use crate::classify::UsageFacts;
use crate::policy::FleetRules;

/// What one moka entry costs beyond its value: the key's allocation, the Arc and Mutex, the
/// cache's node, hash slot and access-order links. Calibrated against resident memory with
/// `cargo bench --bench usage` (see docs/usage-signals.md).
const ENTRY_OVERHEAD: usize = 400;

struct Entry {
    state: AccountState,
    /// The size this entry was last weighed at (moka weighs on insert).
    weighed: usize,
}

impl Entry {
    /// Estimated bytes: what the memory ceiling counts (allocations by capacity, plus the
    /// cache's own per-entry cost).
    fn bytes(&self) -> usize {
        ENTRY_OVERHEAD + std::mem::size_of::<Self>() + self.state.heap_bytes()
    }
}

type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves counters, not invariants: keep using them.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub struct UsageAggregator {
    /// Fleets: the link graph (a fifth of `max_bytes`).
    fleets: Mutex<FleetGraph>,
    accounts: Cache<Arc<str>, Shared<Entry>>,
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

/// Resident bytes per weighed byte in the usage maps, as measured by `cargo bench --bench usage`
/// (a million one-event accounts under a ceiling: 2457 B resident for 1892 B weighed): moka's
/// tables and deques and the allocator's rounding, which the weigher does not see.
const MAP_OVERHEAD_PERCENT: u64 = 130;

impl UsageAggregator {
    /// `max_bytes` bounds the resident memory of the whole history: a fifth for the fleet
    /// graph, the rest for the three maps (70% accounts, 15% payment fingerprints, 15%
    /// networks), their weighed sizes scaled down by the overhead measured beside them.
    pub fn new(max_bytes: u64) -> Self {
        let idle = Duration::from_secs(HISTORY_SECS as u64);
        let graph = max_bytes / 5;
        let maps = (max_bytes - graph) / MAP_OVERHEAD_PERCENT * 100;
        Self {
            fleets: Mutex::new(FleetGraph::new(graph, FleetRules::default())),
            accounts: Cache::builder()
                .max_capacity(maps / 100 * 70)
                .time_to_idle(idle)
                .weigher(|k: &Arc<str>, v: &Shared<Entry>| {
                    (lock(v).bytes() + k.len()).min(u32::MAX as usize) as u32
                })
                .build(),
            payments: shared_cache(maps / 100 * 15),
            networks: shared_cache(maps / 100 * 15),
        }
    }

    pub fn record(&self, event: &UsageEvent, location: &EventLocation) {
        lock(&self.fleets).record(event);
        let t = event.timestamp;
        let entry = self.accounts.get_with(event.account_id.clone(), || {
            Arc::new(Mutex::new(Entry {
                state: AccountState::new(t),
                weighed: 0,
            }))
        });
        let reweigh = {
            let mut entry = lock(&entry);
            entry.state.apply(event, location);
            let bytes = entry.bytes();
            let drifted =
                bytes > entry.weighed + entry.weighed / 4 || bytes + bytes / 4 < entry.weighed;
            if drifted {
                entry.weighed = bytes;
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
        let others = |set: Option<Shared<Recent<Arc<str>>>>, since: i64| -> Option<u32> {
            // Known when any account was seen in the window (the asking one included), as
            // the Redis adapter counts it.
            let set = set?;
            let set = lock(&set);
            let (mut seen, mut others) = (0u32, 0u32);
            for account in set.since(since) {
                seen += 1;
                others += u32::from(Some(&**account) != account_id);
            }
            (seen > 0).then_some(others)
        };
        let payment =
            payment_fingerprint.and_then(|f| others(self.payments.get(f), now - HISTORY_SECS));
        let network = others(self.networks.get(&NetworkKey::of(ip)), now - DAY);
        let entry = account_id.and_then(|id| self.accounts.get(id));
        let entry = entry.as_ref().map(|e| lock(e));
        let mut facts = account::facts(
            entry.as_ref().map(|e| &e.state),
            payment,
            network,
            account_id.is_some(),
            now,
        )?;
        if let Some(id) = account_id {
            (facts.fleet, facts.accounts_sharing_template) = lock(&self.fleets).facts(id, now);
        }
        Some(facts)
    }

    pub fn stats(&self) -> UsageStats {
        self.accounts.run_pending_tasks();
        self.payments.run_pending_tasks();
        self.networks.run_pending_tasks();
        UsageStats {
            accounts: self.accounts.entry_count(),
            payment_fingerprints: self.payments.entry_count(),
            networks: self.networks.entry_count(),
            bytes: self.accounts.weighted_size()
                + self.payments.weighted_size()
                + self.networks.weighted_size(),
            ..UsageStats::default()
        }
    }
}

impl UsageHistory for UsageAggregator {
    fn record(&self, event: &UsageEvent, location: &EventLocation) -> bool {
        UsageAggregator::record(self, event, location);
        true
    }

    fn facts<'a>(&'a self, q: UsageQuery<'_>) -> UsageLookup<'a> {
        UsageLookup::Ready(UsageAggregator::facts(
            self,
            q.account_id,
            q.ip,
            q.payment_fingerprint,
            q.now,
        ))
    }

    fn stats(&self) -> UsageStats {
        UsageAggregator::stats(self)
    }

    fn describe(&self) -> String {
        "in-process".into()
    }

    fn set_fleet_rules(&self, rules: &FleetRules) {
        lock(&self.fleets).set_rules(*rules);
    }

    fn fleet<'a>(&'a self, fleet_id: &'a str, now: i64) -> PendingFleet<'a> {
        let report = lock(&self.fleets).report(fleet_id, now);
        let fleet = report.map(|report| {
            super::fleet_from(report, |account| {
                let mut usage = UsageFacts::default();
                if let Some(entry) = self.accounts.get(account) {
                    lock(&entry).state.fill(&mut usage, now);
                }
                usage
            })
        });
        Box::pin(async move { Ok(fleet) })
    }
}
