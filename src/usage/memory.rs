//! In-process usage history: the embedded default, for one replica.
//!
//! All three maps (accounts, payment fingerprints, networks) are [`BoundedMap`]s with an idle
//! TTL of 7 days and a byte ceiling that evicts (never grows past it); sets saturate at fixed
//! sizes, so one account's cost is bounded.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use super::account::{self, AccountState, MAX_ACCOUNTS_PER_KEY, OwnFacts};
use super::bounded::BoundedMap;
use super::fleet::FleetGraph;
use super::shared_fleets::SharedFleets;
use super::window::{HISTORY_SECS, Recent};
use super::{
    DAY, EventLocation, NetworkKey, PendingFleet, UsageEvent, UsageHistory, UsageLookup,
    UsageQuery, UsageStats,
};
use crate::classify::UsageFacts;
use crate::policy::FleetRules;

/// The heap bytes of an `Arc<str>` key: its counts and its text.
fn text_bytes(text: &Arc<str>) -> usize {
    16 + text.len()
}

/// The maps' time: seconds since the epoch, as the events and queries give it (until 2106).
fn tick(t: i64) -> u32 {
    t.clamp(0, i64::from(u32::MAX)) as u32
}

/// One account: its state, and its own facts as last read (for the second they were read at;
/// any event makes them stale). Boxed: accounts that are only reported on never hold them.
struct Account {
    state: AccountState,
    read: Option<Box<OwnFacts>>,
}

impl Account {
    /// The account's own facts at `now`, read off its state at most once a second.
    fn own_facts(&mut self, now: i64) -> OwnFacts {
        match &mut self.read {
            Some(read) if read.at == now => (**read).clone(),
            Some(read) => {
                **read = OwnFacts::of(&self.state, now);
                (**read).clone()
            }
            None => (**self.read.insert(Box::new(OwnFacts::of(&self.state, now)))).clone(),
        }
    }

    /// Bytes beyond the state: the facts last read, once the account has been asked about
    /// (weighed from the next event on).
    fn read_bytes(&self) -> usize {
        self.read.as_ref().map_or(0, |read| {
            std::mem::size_of::<OwnFacts>() + read.heap_bytes()
        })
    }
}

/// Which accounts used one payment fingerprint or network.
type Sharing = Recent<Arc<str>>;

pub struct UsageAggregator {
    /// Fleets: the link graph (a fifth of `max_bytes`), rebuilt off the request path.
    fleets: Arc<SharedFleets>,
    accounts: BoundedMap<Arc<str>, Account>,
    payments: BoundedMap<Arc<str>, Sharing>,
    networks: BoundedMap<NetworkKey, Sharing>,
}

/// Resident bytes per weighed byte in the usage maps, as measured by `cargo bench --bench usage`
/// (a million one-event accounts through a 256 MiB ceiling, evicting all along: 202 MiB
/// resident for 126 MiB weighed; 1.4 for accounts that were never evicted): the allocator's
/// rounding and the reuse of what eviction frees, the account ids that sharing sets keep alive,
/// and the tables' spare room beyond their mean, none of which the weights see.
const MAP_OVERHEAD_PERCENT: u64 = 160;

impl UsageAggregator {
    /// `max_bytes` bounds the resident memory of the whole history: a fifth for the fleet
    /// graph, the rest for the three maps (70% accounts, 15% payment fingerprints, 15%
    /// networks), their weights scaled down by the overhead measured beside them.
    pub fn new(max_bytes: u64) -> Self {
        let idle = HISTORY_SECS as u32;
        let graph = max_bytes / 5;
        let maps = (max_bytes - graph) / MAP_OVERHEAD_PERCENT * 100;
        Self {
            fleets: SharedFleets::new(FleetGraph::new(graph, FleetRules::default()), graph),
            accounts: BoundedMap::new(maps / 100 * 70, idle, |id, account| {
                text_bytes(id) + account.state.heap_bytes() + account.read_bytes()
            }),
            payments: BoundedMap::new(maps / 100 * 15, idle, |fingerprint, sharing| {
                text_bytes(fingerprint) + sharing.heap_bytes()
            }),
            networks: BoundedMap::new(maps / 100 * 15, idle, |_, sharing| sharing.heap_bytes()),
        }
    }

    pub fn record(&self, event: &UsageEvent, location: &EventLocation) {
        self.fleets.record(event);
        let (t, tick) = (event.timestamp, tick(event.timestamp));
        self.accounts.update(
            event.account_id.clone(),
            tick,
            || Account {
                state: AccountState::new(t),
                read: None,
            },
            |account| {
                if let Some(read) = &mut account.read {
                    read.at = i64::MIN;
                }
                account.state.apply(event, location);
            },
        );
        let shared = || Recent::new(MAX_ACCOUNTS_PER_KEY);
        let touch = |sharing: &mut Sharing| sharing.touch(event.account_id.clone(), t);
        if let Some(fingerprint) = &event.payment_fingerprint {
            self.payments
                .update(fingerprint.clone(), tick, shared, touch);
        }
        self.networks
            .update(NetworkKey::of(event.ip), tick, shared, touch);
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
        let tick = tick(now);
        let others = |since: i64| {
            move |sharing: &mut Sharing| -> Option<u32> {
                // Known when any account was seen in the window (the asking one included), as
                // the Redis adapter counts it.
                let (mut seen, mut others) = (0u32, 0u32);
                for account in sharing.since(since) {
                    seen += 1;
                    others += u32::from(Some(&**account) != account_id);
                }
                (seen > 0).then_some(others)
            }
        };
        let payment = payment_fingerprint
            .and_then(|f| self.payments.read(f, tick, others(now - HISTORY_SECS)))
            .flatten();
        let network = self
            .networks
            .read(&NetworkKey::of(ip), tick, others(now - DAY))
            .flatten();
        let known = account_id.and_then(|id| {
            self.accounts
                .read(id, tick, |account| account.own_facts(now))
        });
        let mut facts = account::facts(known, payment, network, account_id.is_some())?;
        if let Some(id) = account_id {
            match self.fleets.facts(id, now) {
                Some(fleet) => (facts.fleet, facts.accounts_sharing_template) = fleet,
                // The graph is being rebuilt: this decision goes without fleet facts, and says so.
                None => facts.degraded = true,
            }
        }
        Some(facts)
    }

    pub fn stats(&self) -> UsageStats {
        let (accounts, account_bytes) = self.accounts.size();
        let (payment_fingerprints, payment_bytes) = self.payments.size();
        let (networks, network_bytes) = self.networks.size();
        UsageStats {
            accounts,
            payment_fingerprints,
            networks,
            bytes: account_bytes + payment_bytes + network_bytes,
            degraded_reads: self.fleets.degraded_reads(),
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
        self.fleets.with(|graph| graph.set_rules(*rules));
    }

    fn flush(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            while self.fleets.busy() {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                // Whatever a rebuild left held is applied by the next holder: be it.
                self.fleets.try_with(|_| ());
            }
        })
    }

    fn fleet<'a>(&'a self, fleet_id: &'a str, now: i64) -> PendingFleet<'a> {
        let Some(report) = self.fleets.try_with(|graph| graph.report(fleet_id, now)) else {
            return Box::pin(async {
                Err(
                    "the fleet graph is being rebuilt (its hourly expiry); try again in a moment"
                        .into(),
                )
            });
        };
        let fleet = report.map(|report| {
            super::fleet_from(report, |account| {
                let mut usage = UsageFacts::default();
                self.accounts.read(account, tick(now), |account| {
                    account.state.fill(&mut usage, now)
                });
                usage
            })
        });
        Box::pin(async move { Ok(fleet) })
    }
}
