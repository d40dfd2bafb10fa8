//! Usage history in Redis, shared by every replica (`[usage] redis_url`).
//!
//! Layout (every key under `redis_prefix`, every key with a TTL, every set capped):
//! - `{prefix}{a:ACCOUNT}`: the account's whole state ([`super::codec`]: buckets, recently-seen
//!   sets, country runs) behind an 8-byte version; TTL 7 days. One key per account, so the
//!   layout is Redis Cluster-safe; it is replaced by compare-and-set (a short Lua script), so
//!   replicas writing the same account never lose each other's events.
//! - `{prefix}{p:FINGERPRINT}` and `{prefix}{n:NETWORK}`: sorted sets of accounts scored by
//!   the last time each was seen with that payment fingerprint (TTL 7 days) or on that /24 or
//!   /48 (TTL 24 h), capped at 256 members (the oldest go first).
//!
//! The request path never waits longer than `redis_timeout_ms`: one pipelined round trip reads
//! an account's state and both sharing counts, and answers are cached for `redis_cache_ms`.
//! When Redis is slow or down, decisions go on from what this replica last read (or nothing),
//! marked `degraded`; a failed read keeps the request path off Redis for a short back-off while
//! the connection manager reconnects (and [`link`] replaces a connection that went silent).
//! Writes never happen on the request path: events go through a bounded queue to one writer
//! task that merges them per account and pipelines them;
//! a failed batch is retried with back-off, and an event that finds the queue full is counted
//! as lost.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::Value;
use tokio::sync::{mpsc, oneshot};

use super::account::{self, AccountState};
use super::window::HISTORY_SECS;
use super::{
    DAY, EventLocation, NetworkKey, PendingFleet, UsageEvent, UsageHistory, UsageLookup,
    UsageQuery, UsageStats, codec,
};
use crate::classify::UsageFacts;
use crate::policy::FleetRules;
use crate::ttl_cache::TtlCache;
use fleet::Graph;
use link::Link;
use writer::{Message, Writer};

mod fleet;
mod link;
mod writer;

pub use fleet::FleetLimits;

/// Settings, from `[usage]`.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    pub url: String,
    pub prefix: String,
    /// Longest a decision waits for Redis.
    pub timeout: Duration,
    /// How long a read answers later decisions for the same account, network and card.
    pub cache_ttl: Duration,
    /// Events waiting in the queue to Redis, at most (the writer holds up to 262,144 more in
    /// the batch it is writing); beyond it events are lost (counted).
    pub max_pending_events: usize,
    /// Accounts the shared fleet graph holds at most (link values: twice as many).
    pub fleet_max_accounts: u64,
}

/// Why the adapter cannot start.
#[derive(Debug, thiserror::Error)]
#[error("usage.redis_url: {0}")]
pub struct RedisStartError(String);

/// Replaces an account's state only if it still holds the version this writer read (or is
/// still absent): replicas that write the same account at once retry instead of overwriting.
const CAS: &str = r"
local cur = redis.call('GET', KEYS[1])
if (cur == false and ARGV[1] == '') or (cur and string.sub(cur, 1, 8) == ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

const VERSION_LEN: usize = 8;
/// Cached reads held at most (accounts, networks and cards a replica answers for at once).
const CACHE_ENTRIES: u64 = 100_000;
/// Cached reads are kept this long in all, to answer degraded decisions.
const STALE_KEEP: Duration = Duration::from_secs(60);
/// After a failed read, decisions skip Redis for this long (the connection manager
/// reconnects meanwhile).
const READ_BACKOFF: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Counters {
    backend_errors: AtomicU64,
    degraded_reads: AtomicU64,
    pending: AtomicU64,
    lost: AtomicU64,
    written: AtomicU64,
}

#[derive(Clone)]
struct Keys {
    prefix: Arc<str>,
}

impl Keys {
    fn account(&self, id: &str) -> String {
        format!("{}{{a:{id}}}", self.prefix)
    }
    fn payment(&self, fingerprint: &str) -> String {
        format!("{}{{p:{fingerprint}}}", self.prefix)
    }
    fn network(&self, network: NetworkKey) -> String {
        format!("{}{{n:{network}}}", self.prefix)
    }
}

/// What a cached read answers for: the account, the request's network and its card. The cache
/// is keyed by a seeded hash of the three, taken from the query as borrowed (no allocation on
/// a hit); the entry keeps them to tell a collision from a hit.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CacheKey {
    account: Option<Arc<str>>,
    network: NetworkKey,
    payment: Option<Arc<str>>,
}

impl CacheKey {
    fn of(q: &UsageQuery<'_>) -> Self {
        Self {
            account: q.account_id.map(Arc::from),
            network: NetworkKey::of(q.ip),
            payment: q.payment_fingerprint.map(Arc::from),
        }
    }

    fn answers(&self, q: &UsageQuery<'_>) -> bool {
        self.account.as_deref() == q.account_id
            && self.network == NetworkKey::of(q.ip)
            && self.payment.as_deref() == q.payment_fingerprint
    }
}

#[derive(Clone)]
struct Cached {
    key: CacheKey,
    at: Instant,
    facts: Arc<Option<UsageFacts>>,
    /// A background read to replace this entry has started.
    refreshing: Arc<AtomicBool>,
}

pub struct RedisUsage {
    reads: Arc<Reads>,
    /// The writer's connection (for its count of replacements).
    writes: Arc<Link>,
    rules: Arc<std::sync::Mutex<FleetRules>>,
    queue: mpsc::Sender<Message>,
    counters: Arc<Counters>,
    url: String,
}

/// The read side, shared with the background reads that refresh hot entries.
struct Reads {
    conn: Arc<Link>,
    keys: Keys,
    timeout: Duration,
    cache_ttl: Duration,
    cache: TtlCache<u64, Cached>,
    /// Seeds the cache's hash of a query (keys hold caller-chosen parts).
    hasher: foldhash::fast::RandomState,
    counters: Arc<Counters>,
    /// Milliseconds since `epoch` before which reads skip Redis.
    skip_until_ms: AtomicU64,
    epoch: Instant,
    graph: Arc<Graph>,
    /// Whether Redis is known to hold the fleet script (a restarted Redis does not).
    fleet_loaded: AtomicBool,
}

/// The URL without its password, for logs.
pub fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

impl RedisUsage {
    /// Connects lazily (a Redis that is down at start is reconnected to, not fatal) and starts
    /// the writer task. Must be called inside a tokio runtime.
    pub fn start(settings: &RedisSettings) -> Result<Self, RedisStartError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(RedisStartError(
                "the Redis adapter needs a tokio runtime (an internal error)".into(),
            ));
        }
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| RedisStartError(e.to_string()))?;
        // Reads are bounded by `redis_timeout_ms` around each call; writes by WRITE_TIMEOUT.
        let reads = Link::open(client.clone(), None)?;
        let writes = Link::open(client, Some(writer::WRITE_TIMEOUT))?;
        let keys = Keys {
            prefix: settings.prefix.as_str().into(),
        };
        let counters = Arc::new(Counters::default());
        let (queue, rx) = mpsc::channel(settings.max_pending_events.max(1));
        let graph = Arc::new(Graph::new(&keys));
        let rules = Arc::new(std::sync::Mutex::new(FleetRules::default()));
        let fleets = writer::Fleets {
            graph: graph.clone(),
            rules: rules.clone(),
            limits: FleetLimits::for_accounts(settings.fleet_max_accounts),
            rebuilding: Arc::new(tokio::sync::watch::Sender::new(false)),
            failed_at: Arc::default(),
        };
        tokio::spawn(Writer::new(writes.clone(), keys.clone(), counters.clone(), fleets).run(rx));
        Ok(Self {
            rules,
            reads: Arc::new(Reads {
                conn: reads,
                keys,
                timeout: settings.timeout,
                cache_ttl: settings.cache_ttl,
                cache: TtlCache::new(CACHE_ENTRIES, STALE_KEEP.max(settings.cache_ttl)),
                hasher: foldhash::fast::RandomState::default(),
                counters: counters.clone(),
                skip_until_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                graph,
                fleet_loaded: AtomicBool::new(false),
            }),
            writes,
            queue,
            counters,
            url: redacted(&settings.url),
        })
    }
}

impl Reads {
    /// Reads for `q` in the background (an entry past three quarters of its life that decisions
    /// still ask for), so hot accounts never wait on Redis. Needs a runtime; without one, nothing.
    fn refresh(self: &Arc<Self>, q: &UsageQuery<'_>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (reads, query) = (self.clone(), OwnedQuery::from(q));
        runtime.spawn(async move {
            let q = query.borrowed();
            // A failure is counted and opens the back-off; the entry answers until its TTL.
            let _ = reads.read(&q, reads.refresh_timeout()).await;
        });
    }

    /// How long a background refresh may wait: off the request path, it need not hold to
    /// `redis_timeout_ms`, only land before the entry it replaces expires (a quarter of its
    /// life). A refresh held to 5 ms on a busy core failed, and the entry then expired into a
    /// decision that waited on Redis.
    fn refresh_timeout(&self) -> Duration {
        (self.cache_ttl / 4).max(self.timeout)
    }

    /// The cache's key for `q`: a seeded hash of its account, network and card, as borrowed.
    fn hash_of(&self, q: &UsageQuery<'_>) -> u64 {
        use std::hash::BuildHasher;
        self.hasher
            .hash_one((q.account_id, NetworkKey::of(q.ip), q.payment_fingerprint))
    }

    fn elapsed_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// What a decision gets when Redis cannot answer: the last read, if any, marked degraded.
    fn degraded(&self, stale: Option<Cached>) -> Option<UsageFacts> {
        self.counters.degraded_reads.fetch_add(1, Ordering::Relaxed);
        let mut facts = stale
            .and_then(|c| c.facts.as_ref().clone())
            .unwrap_or_default();
        facts.degraded = true;
        Some(facts)
    }

    /// One bounded read into the cache; `Err` when Redis did not answer in time (counted).
    async fn read(&self, q: &UsageQuery<'_>, timeout: Duration) -> Result<Option<UsageFacts>, ()> {
        let (asked, hash) = (Instant::now(), self.hash_of(q));
        let network = NetworkKey::of(q.ip);
        let mut pipe = redis::pipe();
        if let Some(id) = q.account_id {
            pipe.cmd("GET").arg(self.keys.account(id));
        }
        let mut shared = |key: String, since: i64| {
            pipe.cmd("ZCOUNT").arg(&key).arg(since).arg("+inf");
            if let Some(id) = q.account_id {
                pipe.cmd("ZSCORE").arg(&key).arg(id);
            }
        };
        if let Some(fingerprint) = q.payment_fingerprint {
            shared(self.keys.payment(fingerprint), q.now - HISTORY_SECS);
        }
        shared(self.keys.network(network), q.now - DAY);
        if let Some(id) = q.account_id {
            self.graph.read(&mut pipe, id, q.now);
        }
        // Errors come back in their places (see `answer`), so one failing script does not fail
        // the whole read.
        pipe.ignore_errors();
        let mut conn = self.conn.get();
        let reply = tokio::time::timeout(timeout, async {
            if !self.fleet_loaded.load(Ordering::Relaxed) {
                self.graph.script.load_async(&mut conn).await?;
                self.fleet_loaded.store(true, Ordering::Relaxed);
            }
            pipe.query_async::<Vec<Value>>(&mut conn).await
        })
        .await;
        let values = match reply {
            Ok(Ok(values)) => {
                self.conn.answered();
                values
            }
            Ok(Err(error)) => {
                if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) {
                    // Redis restarted without the script: the next read loads it again.
                    self.fleet_loaded.store(false, Ordering::Relaxed);
                }
                self.failed(&format!("read: {error}"));
                return Err(());
            }
            Err(_) => {
                self.failed("read: timed out");
                return Err(());
            }
        };
        match self.answer(q, values) {
            Ok(facts) => {
                self.skip_until_ms.store(0, Ordering::Relaxed);
                let now = Instant::now();
                // A slow refresh does not replace what a later read already put there.
                self.cache.insert_unless(
                    hash,
                    Cached {
                        key: CacheKey::of(q),
                        at: now,
                        facts: Arc::new(facts.clone()),
                        refreshing: Arc::default(),
                    },
                    now,
                    |held| held.at > asked && held.key.answers(q),
                );
                Ok(facts)
            }
            Err(message) => {
                self.counters.backend_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%message, "usage history in Redis: unreadable answer");
                Err(())
            }
        }
    }

    fn failed(&self, message: &str) {
        let errors = self.counters.backend_errors.fetch_add(1, Ordering::Relaxed);
        self.skip_until_ms.store(
            self.elapsed_ms() + READ_BACKOFF.as_millis() as u64,
            Ordering::Relaxed,
        );
        // One line per back-off, not one per request.
        if errors.is_multiple_of(100) {
            tracing::warn!(%message, errors = errors + 1, "usage history in Redis unavailable; deciding without it (degraded)");
        }
    }

    fn answer(&self, q: &UsageQuery<'_>, values: Vec<Value>) -> Result<Option<UsageFacts>, String> {
        let mut values = values.into_iter();
        let mut next = || values.next().ok_or_else(|| "short reply".to_owned());
        let state = match q.account_id {
            Some(_) => match next()? {
                Value::Nil => None,
                Value::BulkString(bytes) => {
                    Some(decode_stored(&bytes).map_err(|e| e.to_string())?.state)
                }
                other => return Err(format!("unexpected {other:?}")),
            },
            None => None,
        };
        let mut others = |since: i64| -> Result<Option<u32>, String> {
            let count: i64 = redis::from_redis_value(next()?).map_err(|e| e.to_string())?;
            let own = match q.account_id {
                Some(_) => {
                    let score: Option<f64> =
                        redis::from_redis_value(next()?).map_err(|e| e.to_string())?;
                    score.is_some_and(|s| s >= since as f64)
                }
                None => false,
            };
            let others = (count - i64::from(own)).max(0) as u32;
            Ok((count > 0).then_some(others))
        };
        let payment = match q.payment_fingerprint {
            Some(_) => others(q.now - HISTORY_SECS)?,
            None => None,
        };
        let network = others(q.now - DAY)?;
        // A fleet script that fails (NOSCRIPT after a failover, BUSY, OOM) costs the decision
        // its fleet facts only, and says so: the rest of the history stands.
        let mut fleet_failed = false;
        let fleet = match q.account_id {
            Some(_) => match next()? {
                Value::ServerError(error) => {
                    let error = redis::RedisError::from(error);
                    if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) {
                        self.fleet_loaded.store(false, Ordering::Relaxed);
                    }
                    let errors = self.counters.backend_errors.fetch_add(1, Ordering::Relaxed);
                    if errors.is_multiple_of(100) {
                        tracing::warn!(%error, "usage history in Redis: the fleet read failed; deciding without fleet facts (degraded)");
                    }
                    fleet_failed = true;
                    None
                }
                reply => Some(fleet::parse_read(reply)?),
            },
            None => None,
        };
        let mut facts = account::facts(
            state
                .as_ref()
                .map(|state| account::OwnFacts::of(state, q.now)),
            payment,
            network,
            q.account_id.is_some(),
        );
        if let (Some(facts), Some(fleet)) = (&mut facts, fleet) {
            (facts.fleet, facts.accounts_sharing_template) = fleet;
        }
        if fleet_failed && let Some(facts) = &mut facts {
            facts.degraded = true;
        }
        Ok(facts)
    }
}

/// Writers remembered in a stored value (the most recent first): more than the replicas that
/// write one account at once.
const MAX_WRITERS: usize = 8;

/// An account's value as Redis holds it: the version the compare-and-set compares, the last
/// write of each recent writer, then the state ([`codec`]).
///
/// `[8-byte version][1-byte n][n × (8-byte writer id, 8-byte sequence)][state]`. A writer whose
/// compare-and-set got no reply looks for its own sequence here on the retry: the write took
/// effect if the value holds that sequence or a later one from the same writer, whatever other
/// replicas wrote since.
pub(super) struct Stored<'a> {
    pub version: &'a [u8],
    pub writers: Vec<(u64, u64)>,
    pub state: AccountState,
}

pub(super) fn decode_stored(bytes: &[u8]) -> Result<Stored<'_>, codec::DecodeError> {
    let short = || codec::DecodeError::SHORT;
    let version = bytes.get(..VERSION_LEN).ok_or_else(short)?;
    let n = usize::from(*bytes.get(VERSION_LEN).ok_or_else(short)?).min(MAX_WRITERS);
    let table_end = VERSION_LEN + 1 + n * 16;
    let table = bytes.get(VERSION_LEN + 1..table_end).ok_or_else(short)?;
    let writers = table
        .chunks_exact(16)
        .map(|w| {
            let (id, seq) = w.split_at(8);
            (
                u64::from_le_bytes(id.try_into().expect("8 bytes")),
                u64::from_le_bytes(seq.try_into().expect("8 bytes")),
            )
        })
        .collect();
    Ok(Stored {
        version,
        writers,
        state: codec::decode(&bytes[table_end..])?,
    })
}

/// A new value: `writer`'s write `seq` goes first in the table, older writers after it.
pub(super) fn encode_stored(
    version: [u8; VERSION_LEN],
    previous: &[(u64, u64)],
    (writer, seq): (u64, u64),
    state: &AccountState,
) -> Vec<u8> {
    let others = previous.iter().filter(|(id, _)| *id != writer);
    let writers: Vec<(u64, u64)> = std::iter::once((writer, seq))
        .chain(others.copied())
        .take(MAX_WRITERS)
        .collect();
    let mut value = version.to_vec();
    value.push(writers.len() as u8);
    for (id, seq) in &writers {
        value.extend_from_slice(&id.to_le_bytes());
        value.extend_from_slice(&seq.to_le_bytes());
    }
    value.extend_from_slice(&codec::encode(state));
    value
}

impl UsageHistory for RedisUsage {
    fn record(&self, event: &UsageEvent, location: &EventLocation) -> bool {
        // Counted before it is sent: the writer may write it and count it down first.
        self.counters.pending.fetch_add(1, Ordering::Relaxed);
        match self
            .queue
            .try_send(Message::Event(Box::new((event.clone(), location.clone()))))
        {
            Ok(()) => true,
            Err(_) => {
                self.counters.pending.fetch_sub(1, Ordering::Relaxed);
                let lost = self.counters.lost.fetch_add(1, Ordering::Relaxed);
                if lost.is_multiple_of(10_000) {
                    tracing::error!(
                        lost = lost + 1,
                        "usage events lost: the queue to Redis is full"
                    );
                }
                false
            }
        }
    }

    fn facts<'a>(&'a self, q: UsageQuery<'_>) -> UsageLookup<'a> {
        let reads = &self.reads;
        let now = Instant::now();
        let cached = reads
            .cache
            .get(&reads.hash_of(&q), now)
            .filter(|c| c.key.answers(&q));
        if let Some(hit) = &cached {
            let age = now.saturating_duration_since(hit.at);
            if age < reads.cache_ttl {
                // Past three quarters of its life, a hot entry is read again in the
                // background: the next decisions keep answering at once, from an entry never
                // older than the TTL (the read has a quarter of it, 250 ms by default, to land).
                if age >= reads.cache_ttl / 4 * 3
                    && reads.elapsed_ms() >= reads.skip_until_ms.load(Ordering::Relaxed)
                    && !hit.refreshing.swap(true, Ordering::Relaxed)
                {
                    reads.refresh(&q);
                }
                return UsageLookup::Ready(hit.facts.as_ref().clone());
            }
        }
        if reads.elapsed_ms() < reads.skip_until_ms.load(Ordering::Relaxed) {
            return UsageLookup::Ready(reads.degraded(cached));
        }
        let query = OwnedQuery::from(&q);
        UsageLookup::Pending(Box::pin(async move {
            let q = query.borrowed();
            match reads.read(&q, reads.timeout).await {
                Ok(facts) => facts,
                Err(()) => reads.degraded(cached),
            }
        }))
    }

    fn stats(&self) -> UsageStats {
        let c = &self.counters;
        UsageStats {
            backend_errors: c.backend_errors.load(Ordering::Relaxed),
            degraded_reads: c.degraded_reads.load(Ordering::Relaxed),
            pending_events: c.pending.load(Ordering::Relaxed),
            lost_events: c.lost.load(Ordering::Relaxed),
            written_events: c.written.load(Ordering::Relaxed),
            reconnects: self.reads.conn.replaced() + self.writes.replaced(),
            ..UsageStats::default()
        }
    }

    fn flush(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let (done, wait) = oneshot::channel();
            if self.queue.send(Message::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        })
    }

    fn describe(&self) -> String {
        format!("redis {} (prefix {:?})", self.url, &*self.reads.keys.prefix)
    }

    fn set_fleet_rules(&self, rules: &FleetRules) {
        *self
            .rules
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = *rules;
    }

    fn fleet<'a>(&'a self, fleet_id: &'a str, now: i64) -> PendingFleet<'a> {
        Box::pin(async move {
            tokio::time::timeout(REPORT_TIMEOUT, self.reads.fleet(&self.rules, fleet_id, now))
                .await
                .unwrap_or_else(|_| Err("Redis did not answer in time".into()))
        })
    }
}

/// Longest a reviewer's fleet report may take.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

impl Reads {
    /// A fleet for reviewers, with its listed members' usage.
    async fn fleet(
        &self,
        rules: &std::sync::Mutex<FleetRules>,
        fleet_id: &str,
        now: i64,
    ) -> Result<Option<super::Fleet>, String> {
        let rules = *rules
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut conn = self.conn.get();
        let report = async {
            self.graph.script.load_async(&mut conn).await?;
            self.graph.report(&mut conn, &rules, fleet_id, now).await
        };
        let Some(report) = report.await.map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let listed: Vec<Arc<str>> = report
            .members
            .iter()
            .take(super::Fleet::MAX_LISTED)
            .cloned()
            .collect();
        let mut pipe = redis::pipe();
        for account in &listed {
            pipe.cmd("GET").arg(self.keys.account(account));
        }
        let states: Vec<Option<Vec<u8>>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let mut usage: std::collections::HashMap<&str, UsageFacts> = listed
            .iter()
            .zip(&states)
            .filter_map(|(account, stored)| {
                let stored = decode_stored(stored.as_deref()?).ok()?;
                let mut facts = UsageFacts::default();
                stored.state.fill(&mut facts, now);
                Some((&**account, facts))
            })
            .collect();
        let usage_of = |account: &str| usage.remove(account).unwrap_or_default();
        Ok(Some(super::fleet_from(report, usage_of)))
    }
}

/// A query's strings, owned by the pending read.
struct OwnedQuery {
    account_id: Option<String>,
    ip: IpAddr,
    payment_fingerprint: Option<String>,
    now: i64,
}

impl OwnedQuery {
    fn from(q: &UsageQuery<'_>) -> Self {
        Self {
            account_id: q.account_id.map(str::to_owned),
            ip: q.ip,
            payment_fingerprint: q.payment_fingerprint.map(str::to_owned),
            now: q.now,
        }
    }

    fn borrowed(&self) -> UsageQuery<'_> {
        UsageQuery {
            account_id: self.account_id.as_deref(),
            ip: self.ip,
            payment_fingerprint: self.payment_fingerprint.as_deref(),
            now: self.now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query<'a>(account: Option<&'a str>, ip: &str, card: Option<&'a str>) -> UsageQuery<'a> {
        UsageQuery {
            account_id: account,
            ip: ip.parse().unwrap(),
            payment_fingerprint: card,
            now: 1_790_000_000,
        }
    }

    /// The read cache is keyed by a 64-bit hash; an entry whose hash matches another query's
    /// must not answer it: the entry keeps what it was read for and is checked on every hit.
    #[test]
    fn a_cached_read_answers_the_query_it_was_read_for_only() {
        let asked = query(Some("acct-1"), "203.0.113.7", Some("card-1"));
        let key = CacheKey::of(&asked);
        assert!(key.answers(&asked));
        // The same /24 is the same network key: one read serves it.
        assert!(key.answers(&query(Some("acct-1"), "203.0.113.200", Some("card-1"))));
        for other in [
            query(Some("acct-2"), "203.0.113.7", Some("card-1")),
            query(None, "203.0.113.7", Some("card-1")),
            query(Some("acct-1"), "198.51.100.7", Some("card-1")),
            query(Some("acct-1"), "203.0.113.7", Some("card-2")),
            query(Some("acct-1"), "203.0.113.7", None),
        ] {
            assert!(!key.answers(&other), "{other:?}");
        }
    }
}
