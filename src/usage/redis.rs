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
//! the connection manager reconnects. Writes never happen on the request path: events go
//! through a bounded queue to one writer task that merges them per account and pipelines them;
//! a failed batch is retried with back-off, and an event that finds the queue full is counted
//! as lost.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use tokio::sync::{mpsc, oneshot};

use super::account::{self, AccountState, MAX_ACCOUNTS_PER_KEY};
use super::window::HISTORY_SECS;
use super::{
    DAY, EventLocation, NetworkKey, UsageEvent, UsageHistory, UsageLookup, UsageQuery, UsageStats,
    codec,
};
use crate::classify::UsageFacts;

/// Settings, from `[usage]`.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    pub url: String,
    pub prefix: String,
    /// Longest a decision waits for Redis.
    pub timeout: Duration,
    /// How long a read answers later decisions for the same account, network and card.
    pub cache_ttl: Duration,
    /// Events accepted but not yet written, at most; beyond it events are lost (counted).
    pub max_pending_events: usize,
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
/// Events one write batch takes at most.
const BATCH_EVENTS: usize = 8_192;
/// How long the writer gathers events after the first one, to merge more per account.
const GATHER: Duration = Duration::from_millis(5);
/// Accounts per pipeline (a pipeline's reply must come back within the write timeout).
const PIPELINE_ACCOUNTS: usize = 1_024;
/// Longest a write pipeline may take before it is retried (off the request path).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Compare-and-set rounds before a batch's contended accounts wait for the next batch.
const CAS_ROUNDS: usize = 8;
/// Cached reads are kept this long in all, to answer degraded decisions.
const STALE_KEEP: Duration = Duration::from_secs(60);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
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

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    account: Option<Arc<str>>,
    network: NetworkKey,
    payment: Option<Arc<str>>,
}

#[derive(Clone)]
struct Cached {
    at: Instant,
    facts: Arc<Option<UsageFacts>>,
}

enum Message {
    Event(Box<(UsageEvent, EventLocation)>),
    Flush(oneshot::Sender<()>),
}

pub struct RedisUsage {
    reads: ConnectionManager,
    keys: Keys,
    timeout: Duration,
    cache_ttl: Duration,
    cache: Cache<CacheKey, Cached>,
    queue: mpsc::Sender<Message>,
    counters: Arc<Counters>,
    /// Milliseconds since `epoch` before which reads skip Redis.
    skip_until_ms: AtomicU64,
    epoch: Instant,
    url: String,
}

/// A reconnecting multiplexed connection; `response_timeout` None leaves the bound to the caller.
fn manager(
    client: redis::Client,
    response_timeout: Option<Duration>,
) -> Result<ConnectionManager, RedisStartError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(response_timeout)
        .set_min_delay(BACKOFF_MIN)
        .set_max_delay(BACKOFF_MAX)
        // A few attempts per reconnection; the next call after they fail starts another, so
        // nothing waits on a reconnection that never ends.
        .set_number_of_retries(4);
    ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| RedisStartError(e.to_string()))
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
        let reads = manager(client.clone(), None)?;
        let writes = manager(client, Some(WRITE_TIMEOUT))?;
        let keys = Keys {
            prefix: settings.prefix.as_str().into(),
        };
        let counters = Arc::new(Counters::default());
        let (queue, rx) = mpsc::channel(settings.max_pending_events.max(1));
        let writer = Writer {
            conn: writes,
            keys: keys.clone(),
            counters: counters.clone(),
            cas: Script::new(CAS),
            script_loaded: false,
        };
        tokio::spawn(writer.run(rx));
        Ok(Self {
            reads,
            keys,
            timeout: settings.timeout,
            cache_ttl: settings.cache_ttl,
            cache: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(STALE_KEEP.max(settings.cache_ttl))
                .build(),
            queue,
            counters,
            skip_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            url: redacted(&settings.url),
        })
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

    async fn read(
        &self,
        q: &UsageQuery<'_>,
        key: CacheKey,
        stale: Option<Cached>,
    ) -> Option<UsageFacts> {
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
        let mut conn = self.reads.clone();
        let reply =
            tokio::time::timeout(self.timeout, pipe.query_async::<Vec<Value>>(&mut conn)).await;
        let values = match reply {
            Ok(Ok(values)) => values,
            Ok(Err(error)) => {
                self.failed(&format!("read: {error}"));
                return self.degraded(stale);
            }
            Err(_) => {
                self.failed("read: timed out");
                return self.degraded(stale);
            }
        };
        match self.answer(q, values) {
            Ok(facts) => {
                self.skip_until_ms.store(0, Ordering::Relaxed);
                self.cache.insert(
                    key,
                    Cached {
                        at: Instant::now(),
                        facts: Arc::new(facts.clone()),
                    },
                );
                facts
            }
            Err(message) => {
                self.counters.backend_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%message, "usage history in Redis: unreadable answer");
                self.degraded(stale)
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
                    Some(decode_versioned(&bytes).map_err(|e| e.to_string())?.1)
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
        Ok(account::facts(
            state.as_ref(),
            payment,
            network,
            q.account_id.is_some(),
            q.now,
        ))
    }
}

/// A write call, given up after [`WRITE_TIMEOUT`] (a reconnection in progress included).
async fn bounded<T>(call: impl Future<Output = redis::RedisResult<T>>) -> redis::RedisResult<T> {
    match tokio::time::timeout(WRITE_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "write timed out",
        ))),
    }
}

/// Splits a stored value into its version and the account state.
fn decode_versioned(bytes: &[u8]) -> Result<(&[u8], AccountState), codec::DecodeError> {
    if bytes.len() < VERSION_LEN {
        return Err(codec::DecodeError::SHORT);
    }
    let (version, state) = bytes.split_at(VERSION_LEN);
    Ok((version, codec::decode(state)?))
}

impl UsageHistory for RedisUsage {
    fn record(&self, event: &UsageEvent, location: &EventLocation) -> bool {
        match self
            .queue
            .try_send(Message::Event(Box::new((event.clone(), location.clone()))))
        {
            Ok(()) => {
                self.counters.pending.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
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
        let key = CacheKey {
            account: q.account_id.map(Arc::from),
            network: NetworkKey::of(q.ip),
            payment: q.payment_fingerprint.map(Arc::from),
        };
        let cached = self.cache.get(&key);
        if let Some(hit) = &cached
            && hit.at.elapsed() < self.cache_ttl
        {
            return UsageLookup::Ready(hit.facts.as_ref().clone());
        }
        if self.elapsed_ms() < self.skip_until_ms.load(Ordering::Relaxed) {
            return UsageLookup::Ready(self.degraded(cached));
        }
        let query = OwnedQuery::from(&q);
        UsageLookup::Pending(Box::pin(async move {
            let q = query.borrowed();
            self.read(&q, key, cached).await
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
        format!("redis {} (prefix {:?})", self.url, &*self.keys.prefix)
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

/// The one task that writes: merges a batch of events per account, then pipelines reads,
/// compare-and-sets and the sharing sets.
struct Writer {
    conn: ConnectionManager,
    keys: Keys,
    counters: Arc<Counters>,
    cas: Script,
    /// Whether Redis is known to hold the script (a restarted Redis does not).
    script_loaded: bool,
}

/// A batch, merged.
#[derive(Default)]
struct Batch {
    events: usize,
    accounts: HashMap<Arc<str>, Vec<(UsageEvent, EventLocation)>>,
    /// Versions written by compare-and-sets whose reply has not been seen.
    attempted: HashMap<Arc<str>, [u8; VERSION_LEN]>,
    /// Sharing-set key → account → latest time, and the key's TTL.
    shared: HashMap<String, (HashMap<Arc<str>, i64>, Duration)>,
    flushes: Vec<oneshot::Sender<()>>,
}

impl Batch {
    fn add(&mut self, keys: &Keys, event: UsageEvent, location: EventLocation) {
        self.events += 1;
        let t = event.timestamp;
        let mut share = |key: String, ttl: Duration| {
            let (members, _) = self
                .shared
                .entry(key)
                .or_insert_with(|| (HashMap::new(), ttl));
            let seen = members.entry(event.account_id.clone()).or_insert(t);
            *seen = (*seen).max(t);
        };
        if let Some(fingerprint) = &event.payment_fingerprint {
            share(
                keys.payment(fingerprint),
                Duration::from_secs(HISTORY_SECS as u64),
            );
        }
        share(
            keys.network(NetworkKey::of(event.ip)),
            Duration::from_secs(DAY as u64),
        );
        self.accounts
            .entry(event.account_id.clone())
            .or_default()
            .push((event, location));
    }
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        let mut backoff = BACKOFF_MIN;
        while let Some(first) = rx.recv().await {
            let mut batch = Batch::default();
            self.take(&mut batch, first);
            let deadline = tokio::time::Instant::now() + GATHER;
            while batch.events < BATCH_EVENTS && batch.flushes.is_empty() {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(message)) => self.take(&mut batch, message),
                    _ => break,
                }
            }
            // Retried until Redis takes it; meanwhile new events wait in the bounded queue.
            loop {
                match self.write(&mut batch).await {
                    Ok(()) => {
                        backoff = BACKOFF_MIN;
                        break;
                    }
                    Err(error) => {
                        let errors = self.counters.backend_errors.fetch_add(1, Ordering::Relaxed);
                        if errors.is_multiple_of(100) {
                            tracing::warn!(%error, pending = batch.events, "usage history: writing to Redis failed; retrying");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            self.counters
                .pending
                .fetch_sub(batch.events as u64, Ordering::Relaxed);
            self.counters
                .written
                .fetch_add(batch.events as u64, Ordering::Relaxed);
            for done in batch.flushes {
                let _ = done.send(());
            }
        }
    }

    fn take(&self, batch: &mut Batch, message: Message) {
        match message {
            Message::Event(event) => {
                let (event, location) = *event;
                batch.add(&self.keys, event, location);
            }
            Message::Flush(done) => batch.flushes.push(done),
        }
    }

    /// Writes what is left of `batch`; what was written is taken out of it, so a retry after an
    /// error never applies an event twice. A compare-and-set whose reply was lost (a timeout, a
    /// dropped connection) is recognised on the retry by the version it wrote.
    async fn write(&mut self, batch: &mut Batch) -> redis::RedisResult<()> {
        if !self.script_loaded {
            bounded(self.cas.load_async(&mut self.conn)).await?;
            self.script_loaded = true;
        }
        for _ in 0..CAS_ROUNDS {
            if batch.accounts.is_empty() {
                break;
            }
            let ids: Vec<Arc<str>> = batch.accounts.keys().cloned().collect();
            for chunk in ids.chunks(PIPELINE_ACCOUNTS) {
                self.write_accounts(batch, chunk).await?;
            }
        }
        if !batch.accounts.is_empty() {
            // Contended beyond the rounds: the next attempt reads again.
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "account states kept changing under compare-and-set",
            )));
        }
        if !batch.shared.is_empty() {
            let mut pipe = redis::pipe();
            for (key, (members, ttl)) in &batch.shared {
                let mut zadd = redis::cmd("ZADD");
                zadd.arg(key).arg("GT");
                for (account, t) in members {
                    zadd.arg(*t).arg(&**account);
                }
                pipe.add_command(zadd).ignore();
                pipe.cmd("ZREMRANGEBYRANK")
                    .arg(key)
                    .arg(0)
                    .arg(-(MAX_ACCOUNTS_PER_KEY as i64) - 1)
                    .ignore();
                pipe.cmd("PEXPIRE")
                    .arg(key)
                    .arg(ttl.as_millis() as u64)
                    .ignore();
            }
            bounded(pipe.query_async::<()>(&mut self.conn)).await?;
            batch.shared.clear();
        }
        Ok(())
    }

    /// One round for some of the batch's accounts: read, merge, compare-and-set.
    async fn write_accounts(
        &mut self,
        batch: &mut Batch,
        ids: &[Arc<str>],
    ) -> redis::RedisResult<()> {
        let mut get = redis::pipe();
        for id in ids {
            get.cmd("GET").arg(self.keys.account(id));
        }
        let current: Vec<Option<Vec<u8>>> = bounded(get.query_async(&mut self.conn)).await?;
        let mut set = redis::pipe();
        let mut sent = Vec::with_capacity(ids.len());
        for (id, stored) in ids.iter().zip(&current) {
            let stored = stored.as_deref();
            let version = stored.map(|b| &b[..VERSION_LEN.min(b.len())]);
            if version.is_some() && batch.attempted.get(id).map(|v| &v[..]) == version {
                // Written by an attempt whose reply was lost.
                batch.accounts.remove(id);
                batch.attempted.remove(id);
                continue;
            }
            let mut state = match stored.map(decode_versioned) {
                Some(Ok((_, state))) => Some(state),
                Some(Err(error)) => {
                    tracing::warn!(account = %id, %error, "usage history in Redis: unreadable account state replaced");
                    None
                }
                None => None,
            };
            let Some(events) = batch.accounts.get(id) else {
                continue;
            };
            for (event, location) in events {
                state
                    .get_or_insert_with(|| AccountState::new(event.timestamp))
                    .apply(event, location);
            }
            let Some(state) = state else { continue };
            let mut ours = [0u8; VERSION_LEN];
            ours.copy_from_slice(&uuid::Uuid::now_v7().as_bytes()[VERSION_LEN..]);
            let mut value = ours.to_vec();
            value.extend_from_slice(&codec::encode(&state));
            set.cmd("EVALSHA")
                .arg(self.cas.get_hash())
                .arg(1)
                .arg(self.keys.account(id))
                .arg(version.unwrap_or_default())
                .arg(value)
                .arg(HISTORY_SECS * 1000);
            batch.attempted.insert(id.clone(), ours);
            sent.push(id.clone());
        }
        if sent.is_empty() {
            return Ok(());
        }
        let applied: Vec<i64> = match bounded(set.query_async(&mut self.conn)).await {
            Ok(applied) => applied,
            Err(error) => {
                // Perhaps a Redis restarted without the script (NOSCRIPT): load it again first.
                self.script_loaded = false;
                return Err(error);
            }
        };
        for (id, ok) in sent.iter().zip(applied) {
            batch.attempted.remove(id);
            if ok == 1 {
                batch.accounts.remove(id);
            }
        }
        Ok(())
    }
}
