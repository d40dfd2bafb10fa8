//! The one task that writes usage history to Redis: it gathers events from the bounded queue,
//! merges them per account, and writes them in pipelines of at most [`PIPELINE_ACCOUNTS`]
//! accounts, several pipelines at once (Redis works on one while this process merges the next).
//!
//! Each account is read, merged and replaced by compare-and-set. What was written is taken out
//! of the batch, so a retry after an error never applies an event twice; a compare-and-set
//! whose reply was lost (a timeout, a dropped connection) is recognised on the retry by the
//! version it wrote. The sharing sets take `ZADD GT` (idempotent), then a trim to the cap and
//! their TTL. A key Redis refuses for good ([`refused_for_good`]) costs only what was meant for
//! it, counted; any other error retries the batch with back-off.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use super::fleet::{self, FleetLimits, Graph};
use super::link::Link;
use super::{CAS, Counters, Keys, VERSION_LEN, decode_stored, encode_stored};
use crate::policy::FleetRules;
use crate::usage::account::{AccountState, MAX_ACCOUNTS_PER_KEY};
use crate::usage::window::HISTORY_SECS;
use crate::usage::{DAY, EventLocation, NetworkKey, UsageEvent};

/// Events one batch takes at most. A writer that falls behind takes bigger batches from the
/// queue, so an account's events merge into fewer writes exactly when Redis is busiest.
const BATCH_EVENTS: usize = 262_144;
/// How long the writer gathers events after the first one, to merge more per account.
const GATHER: Duration = Duration::from_millis(5);
/// Accounts per pipeline (a pipeline's reply must come back within the write timeout).
const PIPELINE_ACCOUNTS: usize = 1_024;
/// Longest a write call may take before it is retried (off the request path).
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pipelines in flight at once: enough to keep Redis busy while the next is merged, few enough
/// that a pipeline's timeout is not spent queueing behind the others.
const IN_FLIGHT: usize = 4;
/// Sharing-set keys per pipeline (three commands each).
const PIPELINE_KEYS: usize = 2_048;
/// Compare-and-set rounds before a batch's contended accounts wait for the next attempt.
const CAS_ROUNDS: usize = 8;
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) enum Message {
    Event(Box<(UsageEvent, EventLocation)>),
    Flush(oneshot::Sender<()>),
}

/// One account's share of a batch.
#[derive(Default)]
struct Pending {
    events: Vec<(UsageEvent, EventLocation)>,
    /// The sequence of this writer's first compare-and-set for these events whose reply was
    /// not seen: if the stored value holds it (or a later one of ours), the events are in.
    attempted: Option<u64>,
}

type Accounts = Vec<(Arc<str>, Pending)>;

/// A batch, merged.
#[derive(Default)]
struct Batch {
    /// The link rules when the batch began.
    rules: FleetRules,
    /// What the fleet graph takes of each account.
    fleets: fleet::Records,
    events: usize,
    accounts: HashMap<Arc<str>, Pending>,
    /// Sharing-set key → account → latest time, and the key's TTL.
    shared: HashMap<String, (HashMap<Arc<str>, i64>, Duration)>,
    flushes: Vec<oneshot::Sender<()>>,
}

impl Batch {
    fn add(
        &mut self,
        keys: &Keys,
        sent: &mut fleet::Sent,
        event: UsageEvent,
        location: EventLocation,
    ) {
        self.events += 1;
        fleet::add(&mut self.fleets, sent, &self.rules, &event);
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
            .events
            .push((event, location));
    }
}

pub(super) struct Writer {
    conn: Arc<Link>,
    keys: Keys,
    counters: Arc<Counters>,
    cas: Arc<Script>,
    /// Whether Redis is known to hold the script (a restarted Redis does not).
    script_loaded: bool,
    /// This process's writer id and the sequence of its compare-and-sets.
    me: Arc<Me>,
    in_flight: Arc<Semaphore>,
    fleets: Fleets,
    /// The fleet graph's start as Redis last said (`WriteStatus::epoch`), and whether it
    /// changed in the last write.
    epoch: Option<String>,
    epoch_changed: bool,
}

/// What merges queued events into batches: apart from the writer, so that the next batch is
/// merged while the last one is written.
struct Merger {
    keys: Keys,
    /// What the fleet graph was sent lately.
    sent: fleet::Sent,
}

impl Merger {
    fn take(&mut self, batch: &mut Batch, message: Message) {
        match message {
            Message::Event(event) => {
                let (event, location) = *event;
                batch.add(&self.keys, &mut self.sent, event, location);
            }
            Message::Flush(done) => batch.flushes.push(done),
        }
    }
}

/// What the writer needs of the fleet graph.
pub(super) struct Fleets {
    pub graph: Arc<Graph>,
    pub rules: Arc<Mutex<FleetRules>>,
    pub limits: FleetLimits,
    /// Whether a rebuild is in progress here (at most one per process); a flush waits until
    /// it is not. (A mutex that flushes also took made a due rebuild skip while a flush held
    /// it for a moment.)
    pub rebuilding: Arc<tokio::sync::watch::Sender<bool>>,
    /// When this process's last rebuild failed: the next waits [`REBUILD_BACKOFF`].
    pub failed_at: Arc<Mutex<Option<std::time::Instant>>>,
}

/// Marks the rebuild in progress done when dropped (however the rebuild ends).
struct Running(Arc<tokio::sync::watch::Sender<bool>>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.send_replace(false);
    }
}

/// After a failed rebuild, this process tries again no sooner (another replica may).
const REBUILD_BACKOFF: Duration = Duration::from_secs(60);

/// Who writes: a random id per process, and a sequence per compare-and-set.
pub(super) struct Me {
    id: u64,
    seq: AtomicU64,
}

/// A write call, given up after [`WRITE_TIMEOUT`] (a reconnection in progress included).
pub(super) async fn bounded<T>(
    call: impl Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    match tokio::time::timeout(WRITE_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "write timed out",
        ))),
    }
}

/// Whether Redis refuses one key for good: another type of value under our name (a prefix
/// shared with another application: WRONGTYPE) or an ACL that denies the key (NOPERM). No retry
/// can succeed, so what was meant for that key is dropped, counted and logged, and the rest of
/// the batch goes on. Any other error (LOADING, BUSY, OOM, READONLY, NOSCRIPT, a timeout) is
/// Redis as a whole refusing for now: the batch is retried.
pub(super) fn refused_for_good(error: &redis::RedisError) -> bool {
    const FOR_GOOD: [&str; 2] = ["WRONGTYPE", "NOPERM"];
    // Redis 7 raises a script's failed call with the call's own code; Redis 6 wraps it in
    // `ERR Error running script …: WRONGTYPE …`.
    let for_good = |code: &str, detail: Option<&str>| {
        FOR_GOOD.contains(&code)
            || (code == "ERR" && detail.is_some_and(|d| FOR_GOOD.iter().any(|c| d.contains(c))))
    };
    match error.code() {
        Some(code) => for_good(code, error.detail()),
        // A pipeline's errors (without `ignore_errors`): refused for good if every one is.
        None => error.clone().into_server_errors().is_some_and(|errors| {
            !errors.is_empty() && errors.iter().all(|(_, e)| for_good(e.code(), e.details()))
        }),
    }
}

impl Writer {
    pub(super) fn new(
        conn: Arc<Link>,
        keys: Keys,
        counters: Arc<Counters>,
        fleets: Fleets,
    ) -> Self {
        Self {
            conn,
            keys,
            counters,
            cas: Arc::new(Script::new(CAS)),
            script_loaded: false,
            me: Arc::new(Me {
                id: u64::from_le_bytes(
                    uuid::Uuid::now_v7().as_bytes()[8..]
                        .try_into()
                        .expect("8 bytes"),
                ),
                seq: AtomicU64::new(1),
            }),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
            fleets,
            epoch: None,
            epoch_changed: false,
        }
    }

    fn new_batch(&self) -> Batch {
        Batch {
            rules: *lock(&self.fleets.rules),
            ..Batch::default()
        }
    }

    /// Writes batch after batch; while one is written, the next is merged from the queue.
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        let mut merger = Merger {
            keys: self.keys.clone(),
            sent: fleet::Sent::default(),
        };
        let mut backoff = BACKOFF_MIN;
        let mut closed = false;
        let mut next: Option<Batch> = None;
        loop {
            let mut batch = match next.take() {
                Some(batch) if batch.events > 0 || !batch.flushes.is_empty() => batch,
                _ => {
                    if closed {
                        break;
                    }
                    let Some(first) = rx.recv().await else {
                        break;
                    };
                    let mut batch = self.new_batch();
                    merger.take(&mut batch, first);
                    let deadline = tokio::time::Instant::now() + GATHER;
                    while batch.events < BATCH_EVENTS && batch.flushes.is_empty() {
                        match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some(message)) => merger.take(&mut batch, message),
                            Ok(None) => {
                                closed = true;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    batch
                }
            };
            let mut following = self.new_batch();
            // While Redis refuses writes, events stay in the bounded queue rather than pile up
            // in the next batch beyond it.
            let retrying = AtomicBool::new(false);
            {
                let write = self.write_until_done(&mut batch, &mut backoff, &retrying);
                tokio::pin!(write);
                loop {
                    tokio::select! {
                        biased;
                        () = &mut write => break,
                        message = rx.recv(), if !closed
                            && !retrying.load(Ordering::Relaxed)
                            && following.events < BATCH_EVENTS
                            && following.flushes.is_empty() =>
                        {
                            match message {
                                Some(message) => merger.take(&mut following, message),
                                None => closed = true,
                            }
                        }
                    }
                }
            }
            if std::mem::take(&mut self.epoch_changed) {
                // Redis lost the fleet graph: what this writer sent is not there any more, and
                // the next batch, merged meanwhile, left out what was sent before.
                merger.sent.clear();
                following.fleets.clear();
                for (event, _) in following.accounts.values().flat_map(|p| &p.events) {
                    fleet::add(
                        &mut following.fleets,
                        &mut merger.sent,
                        &following.rules,
                        event,
                    );
                }
            }
            let events = batch.events as u64;
            self.counters.pending.fetch_sub(events, Ordering::Relaxed);
            self.counters.written.fetch_add(events, Ordering::Relaxed);
            if !batch.flushes.is_empty() {
                // A flush also waits for a fleet rebuild in progress (without holding up writes).
                let mut rebuilding = self.fleets.rebuilding.subscribe();
                let flushes = std::mem::take(&mut batch.flushes);
                tokio::spawn(async move {
                    let _ = rebuilding.wait_for(|running| !*running).await;
                    for done in flushes {
                        let _ = done.send(());
                    }
                });
            }
            next = Some(following);
        }
    }

    /// Writes `batch`, retried until Redis takes it; meanwhile new events wait in the bounded
    /// queue (and the next batch is merged from it).
    async fn write_until_done(
        &mut self,
        batch: &mut Batch,
        backoff: &mut Duration,
        retrying: &AtomicBool,
    ) {
        loop {
            match self.write(batch).await {
                Ok(()) => {
                    *backoff = BACKOFF_MIN;
                    return;
                }
                Err(error) => {
                    // Perhaps a Redis restarted without the script: load it again first.
                    self.script_loaded = false;
                    let errors = self.counters.backend_errors.fetch_add(1, Ordering::Relaxed);
                    if errors.is_multiple_of(100) {
                        tracing::warn!(%error, pending = batch.events, "usage history: writing to Redis failed; retrying");
                    }
                    retrying.store(true, Ordering::Relaxed);
                    tokio::time::sleep(*backoff).await;
                    *backoff = (*backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// `events` of the batch will never be written: counted as lost, not as written.
    fn lose(&self, batch: &mut Batch, events: usize) {
        self.counters
            .lost
            .fetch_add(events as u64, Ordering::Relaxed);
        self.counters
            .pending
            .fetch_sub(events as u64, Ordering::Relaxed);
        batch.events -= events.min(batch.events);
    }

    /// Updates that Redis refused for good (sharing sets, fleet links): dropped, and counted
    /// with the backend's errors (the events themselves are counted apart).
    fn refuse(&self, updates: u64) {
        if updates > 0 {
            self.counters
                .backend_errors
                .fetch_add(updates, Ordering::Relaxed);
        }
    }

    /// Writes what is left of `batch`, taking out what was written.
    async fn write(&mut self, batch: &mut Batch) -> redis::RedisResult<()> {
        if !self.script_loaded {
            let mut conn = self.conn.get();
            bounded(self.cas.load_async(&mut conn)).await?;
            bounded(self.fleets.graph.script.load_async(&mut conn)).await?;
            self.script_loaded = true;
        }
        // The fleet graph's share goes beside the accounts' writes, on its own pipelines.
        let fleets = (!batch.fleets.is_empty()).then(|| {
            let (graph, mut conn) = (self.fleets.graph.clone(), self.conn.get());
            let (rules, limits) = (batch.rules, self.fleets.limits);
            let mut records = std::mem::take(&mut batch.fleets);
            tokio::spawn(async move {
                let mut refused = 0;
                let result = graph
                    .write(&mut conn, &rules, limits, &mut records, &mut refused)
                    .await;
                (records, refused, result)
            })
        });
        let mut shared = JoinSet::new();
        let mut keys = std::mem::take(&mut batch.shared).into_iter();
        loop {
            let chunk: Shared = keys.by_ref().take(PIPELINE_KEYS).collect();
            if chunk.is_empty() {
                break;
            }
            shared.spawn(write_shared(
                self.conn.clone(),
                self.in_flight.clone(),
                chunk,
            ));
        }
        let mut failed = None;
        for _ in 0..CAS_ROUNDS {
            if batch.accounts.is_empty() {
                break;
            }
            let mut chunks = JoinSet::new();
            let mut accounts = batch.accounts.drain();
            let mut sizes = HashMap::new();
            loop {
                let chunk: Accounts = accounts.by_ref().take(PIPELINE_ACCOUNTS).collect();
                if chunk.is_empty() {
                    break;
                }
                let events: usize = chunk.iter().map(|(_, p)| p.events.len()).sum();
                let task = chunks.spawn(write_accounts(
                    Chunk {
                        link: self.conn.clone(),
                        keys: self.keys.clone(),
                        cas: self.cas.clone(),
                        me: self.me.clone(),
                        in_flight: self.in_flight.clone(),
                    },
                    chunk,
                ));
                sizes.insert(task.id(), events);
            }
            drop(accounts);
            while let Some(done) = chunks.join_next_with_id().await {
                match done {
                    Ok((_, (left, lost, result))) => {
                        self.lose(batch, lost);
                        batch.accounts.extend(left);
                        if let Err(error) = result {
                            failed.get_or_insert(error);
                        }
                    }
                    Err(error) => {
                        // Short of a bug a chunk cannot panic; if one did, its events are lost,
                        // and counted as such.
                        let events = sizes.get(&error.id()).copied().unwrap_or(0);
                        tracing::error!(%error, events, "usage history: a Redis write task failed");
                        self.lose(batch, events);
                    }
                }
            }
            if failed.is_some() {
                break;
            }
        }
        while let Some(done) = shared.join_next().await {
            match done {
                Ok((left, refused, result)) => {
                    self.refuse(refused);
                    batch.shared.extend(left);
                    if let Err(error) = result {
                        failed.get_or_insert(error);
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "usage history: a Redis write task failed; sharing updates of a batch lost")
                }
            }
        }
        if let Some(task) = fleets {
            match task.await {
                Ok((left, refused, result)) => {
                    if result.is_ok() {
                        self.conn.answered();
                    }
                    self.refuse(refused);
                    batch.fleets.extend(left);
                    match result {
                        Ok(Some(status)) => {
                            if self.epoch.as_ref().is_some_and(|e| *e != status.epoch) {
                                // Redis lost the graph (a restart, a failover to an empty
                                // replica): what this writer sent is not there any more.
                                tracing::warn!(
                                    "usage history in Redis: the fleet graph was started anew; sending every link again"
                                );
                                self.epoch_changed = true;
                            }
                            self.epoch = Some(status.epoch.clone());
                            if status.rebuild_due {
                                self.rebuild_fleets(status.newest, batch.rules)
                            }
                        }
                        Ok(None) => {}
                        Err(error) => {
                            failed.get_or_insert(error);
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "usage history: a Redis write task failed; fleet updates of a batch lost")
                }
            }
        }
        if let Some(error) = failed {
            return Err(error);
        }
        if !batch.accounts.is_empty() {
            // Contended beyond the rounds: the next attempt reads again.
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "account states kept changing under compare-and-set",
            )));
        }
        Ok(())
    }
}

impl Writer {
    /// Starts a rebuild of the fleet graph unless one is running here; another replica may hold
    /// the lock, and then this one does nothing.
    fn rebuild_fleets(&self, newest: i64, rules: FleetRules) {
        if lock(&self.fleets.failed_at).is_some_and(|at| at.elapsed() < REBUILD_BACKOFF) {
            return;
        }
        if !self
            .fleets
            .rebuilding
            .send_if_modified(|running| !std::mem::replace(running, true))
        {
            return;
        }
        let running = Running(self.fleets.rebuilding.clone());
        let failed_at = self.fleets.failed_at.clone();
        let (graph, mut conn) = (self.fleets.graph.clone(), self.conn.get());
        let (me, counters) = (format!("{:016x}", self.me.id), self.counters.clone());
        tokio::spawn(async move {
            let _running = running;
            let started = std::time::Instant::now();
            match graph.rebuild(&mut conn, &rules, &me, newest).await {
                Ok(true) => tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "usage history in Redis: fleet graph rebuilt (expired links dropped)"
                ),
                Ok(false) => {}
                Err(error) => {
                    counters.backend_errors.fetch_add(1, Ordering::Relaxed);
                    *lock(&failed_at) = Some(std::time::Instant::now());
                    tracing::warn!(%error, "usage history in Redis: fleet rebuild failed; tried again in a minute");
                }
            }
        });
    }
}

/// Drops an account's events because Redis refuses its key for good; how many were lost.
fn refuse_account(id: &str, pending: &mut Pending, error: &redis::RedisError) -> usize {
    tracing::warn!(account = %id, %error, events = pending.events.len(), "usage history in Redis: the account's key is refused; events lost");
    let lost = pending.events.len();
    pending.events.clear();
    lost
}

/// What a chunk task needs.
struct Chunk {
    link: Arc<Link>,
    keys: Keys,
    cas: Arc<Script>,
    me: Arc<Me>,
    in_flight: Arc<Semaphore>,
}

/// One round for some accounts: read, merge, compare-and-set. Returns the accounts not yet
/// written (changed under the compare-and-set, or not answered).
/// Also returns how many events cannot be written (their account's value is unreadable).
async fn write_accounts(
    c: Chunk,
    mut chunk: Accounts,
) -> (Accounts, usize, redis::RedisResult<()>) {
    let Ok(_permit) = c.in_flight.clone().acquire_owned().await else {
        return (chunk, 0, Ok(()));
    };
    let mut lost = 0;
    let mut get = redis::pipe();
    get.ignore_errors();
    for (id, _) in &chunk {
        get.cmd("GET").arg(c.keys.account(id));
    }
    let mut conn = c.link.get();
    let current: Vec<redis::RedisResult<Option<Vec<u8>>>> =
        match bounded(get.query_async(&mut conn)).await {
            Ok(current) => current,
            Err(error) => return (chunk, 0, Err(error)),
        };
    c.link.answered();
    let mut set = redis::pipe();
    set.ignore_errors();
    let mut sent = Vec::with_capacity(chunk.len());
    let mut failed = None;
    for (i, ((id, pending), stored)) in chunk.iter_mut().zip(current).enumerate() {
        let stored = match stored {
            Ok(stored) => stored,
            Err(error) if refused_for_good(&error) => {
                lost += refuse_account(id, pending, &error);
                continue;
            }
            Err(error) => {
                // Retried with the next attempt; the others go on.
                failed.get_or_insert(error);
                continue;
            }
        };
        let stored = match stored.as_deref().map(decode_stored) {
            None => None,
            Some(Ok(stored)) => Some(stored),
            Some(Err(error)) => {
                // Not a value this version can read (a newer replica's, or damage): it is not
                // overwritten, and these events are lost, counted.
                tracing::warn!(account = %id, %error, events = pending.events.len(), "usage history in Redis: unreadable account state left as it is; events lost");
                lost += pending.events.len();
                pending.events.clear();
                continue;
            }
        };
        let ours = stored.as_ref().and_then(|s| {
            s.writers
                .iter()
                .find(|(writer, _)| *writer == c.me.id)
                .map(|(_, seq)| *seq)
        });
        if let (Some(first), Some(stored_seq)) = (pending.attempted, ours)
            && stored_seq >= first
        {
            // An attempt whose reply was lost took effect (other writes may have come since).
            pending.events.clear();
            continue;
        }
        let (version, previous, mut state) = match stored {
            Some(s) => (Some(s.version), s.writers, s.state),
            None => (
                None,
                Vec::new(),
                AccountState::new(pending.events.first().map_or(0, |(e, _)| e.timestamp)),
            ),
        };
        for (event, location) in &pending.events {
            state.apply(event, location);
        }
        let seq = c.me.seq.fetch_add(1, Ordering::Relaxed);
        let mut new_version = [0u8; VERSION_LEN];
        new_version.copy_from_slice(&uuid::Uuid::now_v7().as_bytes()[VERSION_LEN..]);
        set.cmd("EVALSHA")
            .arg(c.cas.get_hash())
            .arg(1)
            .arg(c.keys.account(id))
            .arg(version.unwrap_or_default())
            .arg(encode_stored(
                new_version,
                &previous,
                (c.me.id, seq),
                &state,
            ))
            .arg(HISTORY_SECS * 1000);
        pending.attempted.get_or_insert(seq);
        sent.push(i);
    }
    if !sent.is_empty() {
        match bounded(set.query_async::<Vec<redis::RedisResult<i64>>>(&mut conn)).await {
            Ok(applied) => {
                c.link.answered();
                for (&i, reply) in sent.iter().zip(applied) {
                    let (id, pending) = &mut chunk[i];
                    match reply {
                        // Answered: written (1), or not written because the value changed (0).
                        Ok(ok) => {
                            pending.attempted = None;
                            if ok == 1 {
                                pending.events.clear();
                            }
                        }
                        // The script stopped before its SET: nothing was written.
                        Err(error) if refused_for_good(&error) => {
                            lost += refuse_account(id, pending, &error);
                        }
                        Err(error) => {
                            failed.get_or_insert(error);
                        }
                    }
                }
            }
            Err(error) => {
                failed.get_or_insert(error);
            }
        }
    }
    chunk.retain(|(_, pending)| !pending.events.is_empty());
    (chunk, lost, failed.map_or(Ok(()), Err))
}

type Shared = HashMap<String, (HashMap<Arc<str>, i64>, Duration)>;

/// Commands per sharing-set key in [`write_shared`]'s pipeline.
const SHARED_COMMANDS: usize = 3;

/// The sharing sets: `ZADD GT` (a retry cannot move a time back), the cap, the TTL. Returns
/// the keys to try again and how many Redis refused for good (their updates are dropped).
async fn write_shared(
    link: Arc<Link>,
    in_flight: Arc<Semaphore>,
    mut shared: Shared,
) -> (Shared, u64, redis::RedisResult<()>) {
    let Ok(_permit) = in_flight.acquire_owned().await else {
        return (shared, 0, Ok(()));
    };
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let keys: Vec<&String> = shared.keys().collect();
    for key in &keys {
        let (members, ttl) = &shared[*key];
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(*key).arg("GT");
        for (account, t) in members {
            zadd.arg(*t).arg(&**account);
        }
        pipe.add_command(zadd);
        pipe.cmd("ZREMRANGEBYRANK")
            .arg(*key)
            .arg(0)
            .arg(-(MAX_ACCOUNTS_PER_KEY as i64) - 1);
        pipe.cmd("PEXPIRE").arg(*key).arg(ttl.as_millis() as u64);
    }
    let mut conn = link.get();
    let replies =
        match bounded(pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut conn)).await {
            Ok(replies) => replies,
            Err(error) => return (shared, 0, Err(error)),
        };
    link.answered();
    let (mut again, mut refused, mut failed) = (std::collections::HashSet::new(), 0, None);
    for (key, replies) in keys.iter().zip(replies.chunks(SHARED_COMMANDS)) {
        let Some(error) = replies.iter().find_map(|r| r.as_ref().err()) else {
            continue;
        };
        if refused_for_good(error) {
            tracing::warn!(%key, %error, "usage history in Redis: a sharing set's key is refused; its update dropped");
            refused += 1;
        } else {
            // Each of the three commands may be repeated: the ZADD is GT, the others settle.
            again.insert((*key).clone());
            failed.get_or_insert_with(|| error.clone());
        }
    }
    drop(keys);
    shared.retain(|key, _| again.contains(key));
    (shared, refused, failed.map_or(Ok(()), Err))
}

#[cfg(test)]
mod tests {
    use super::refused_for_good;

    fn server(code: &str, detail: &str) -> redis::RedisError {
        redis::make_extension_error(code.into(), Some(detail.into()))
    }

    #[test]
    fn only_a_key_refused_for_good_is_dropped() {
        let wrong = server(
            "WRONGTYPE",
            "Operation against a key holding the wrong kind of value",
        );
        assert!(refused_for_good(&wrong));
        assert!(refused_for_good(&server(
            "NOPERM",
            "No permissions to access a key"
        )));
        // Redis 6 wraps a script's failed call.
        assert!(refused_for_good(&server(
            "ERR",
            "Error running script (call to f_1): @user_script:3: WRONGTYPE Operation against a key holding the wrong kind of value"
        )));
        for transient in [
            server("OOM", "command not allowed when used memory > 'maxmemory'"),
            server("BUSY", "Redis is busy running a script"),
            server("ERR", "max number of clients reached"),
        ] {
            assert!(!refused_for_good(&transient), "{transient}");
        }
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(!refused_for_good(&io));
    }
}
