//! The PostgreSQL writer: the same contract as the SQLite one ([`crate::store::writer`]): a
//! bounded channel, batches of up to 256 rows in one transaction, the overflow policy on the
//! request side, must-keep decisions that wait, reviewer changes committed with their audit row
//! or not at all.
//!
//! **One chain, several writers.** Each batch's transaction first takes
//! `pg_advisory_xact_lock(CHAIN_LOCK)`, then reads the chain head, hashes its rows after it in
//! order and inserts them; the lock is released by the commit. So the writers of all replicas
//! append to one chain, one batch at a time, and `audit verify` is the SQLite walk over the
//! same rows. The lock is held for one batch's inserts (about a millisecond), which bounds the
//! chain's rate to roughly a batch per round trip set, far above what replicas record.
//!
//! **The database away.** The writer runs on its own thread and runtime, so a database that
//! hangs never holds a request. When a batch cannot reach the database, its must-keep
//! decisions are appended to the local spool ([`Spool`], fsynced) and its other ALLOW
//! decisions are dropped (counted); reviewer actions fail with `Unavailable`. While the spool
//! holds rows, new must-keep rows go after them, so the chain keeps the order they were
//! answered in; the writer retries the database every half second and drains the spool, in
//! order, before anything else.

use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_postgres::{Client, Transaction};

use super::last_overrides;
use super::{CHAIN_LOCK, CHANNEL, Reader, is_unavailable, pg_error};
use crate::store::chain::{ChainKey, GENESIS, KEYED};
use crate::store::consistency::OnRecord;
use crate::store::spool::Spool;
use crate::store::writer::{
    Applied, Change, Command, Counters, Keep, Overflow, Recorder, ReviewCommand, with_applied,
};
use crate::store::{AuditRow, DecisionCounts, OverrideRecord, QueueState, Reads, StoreError};

const BATCH: usize = 256;
/// Spool pages (of `BATCH` rows) drained between two looks at the channel.
const DRAIN_CHUNK: usize = 8;
/// How often the writer tries the database again while it is away.
const RETRY: Duration = Duration::from_millis(500);
/// How long one batch may take before the database counts as away (a batch takes
/// milliseconds; past this, must-keep decisions would start waiting for room in the channel).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects to the store at `url` (migrating it), checks the chain's keying, reads the
/// overrides and starts the writer thread.
///
/// A database that cannot be reached at start does not stop the replica: it starts with the
/// overrides it last read ([`super::last_overrides`]; a replica that never read any starts only
/// with `start_without_overrides`, then with none), spools what must be kept, and migrates and
/// checks the chain's keying when the database answers, before draining the spool. A
/// database that answers and refuses (a keying that does not match, a failed migration) stops
/// the start.
pub fn open(
    url: &str,
    spool_dir: &Path,
    (capacity, overflow): (usize, Overflow),
    key: Option<ChainKey>,
    start_without_overrides: bool,
) -> Result<crate::store::Opened, StoreError> {
    let config = super::parse_url(url)?;
    let spool = Spool::open(spool_dir)?;
    let spool_dir = spool_dir.to_path_buf();
    let counters = Arc::new(Counters::default());
    counters.spool_depth.store(spool.len(), Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let (ready, started) = std::sync::mpsc::channel();
    let thread_config = config.clone();
    let reads_key = key.clone();
    let thread_counters = counters.clone();
    let redacted = super::redact(url);
    let spool_path = spool_dir.clone();
    std::thread::Builder::new()
        .name("regionguard-store".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = ready.send(Err(StoreError::Postgres(format!(
                        "starting the writer's runtime: {error}"
                    ))));
                    return;
                }
            };
            runtime.block_on(async move {
                let start = async {
                    let client = set_up(&thread_config, key.as_ref()).await?;
                    let on_record = tokio::sync::Mutex::new(OnRecord::keyed(key.clone()));
                    let overrides = super::overrides_on_record(&client, &on_record)
                        .await
                        .map(crate::store::enforced)
                        .map_err(pg_error)?;
                    Ok::<_, StoreError>((client, overrides))
                };
                let (client, overrides) = match start.await {
                    Ok((client, overrides)) => {
                        if let Err(error) = last_overrides::save(&spool_dir, &overrides) {
                            tracing::warn!(%error, "postgres store: the local copy of the overrides could not be written");
                        }
                        (Some(client), overrides)
                    }
                    Err(StoreError::Unavailable(message)) => match last_overrides::load(&spool_dir) {
                        Ok(None) if !start_without_overrides => {
                            let _ = ready.send(Err(StoreError::Unavailable(format!(
                                "{message}; and this replica has no copy of the overrides in {} (it never reached the database), so it would serve without any: start it once the database answers, or set store.start_without_overrides = true",
                                spool_dir.display()
                            ))));
                            return;
                        }
                        Ok(copy) => {
                            let (overrides, age_s) = match copy {
                                Some((overrides, written)) => (
                                    overrides,
                                    written.elapsed().map_or(0, |age| age.as_secs()),
                                ),
                                None => (Vec::new(), 0),
                            };
                            tracing::error!(
                                %message,
                                overrides = overrides.len(),
                                copy_age_s = age_s,
                                spool = %spool.path().display(),
                                "postgres store unreachable at start: serving with the overrides last read (none if never), must-keep decisions go to the spool, reviewer changes fail until it answers"
                            );
                            (None, overrides)
                        }
                        Err(error) => {
                            let _ = ready.send(Err(StoreError::Unavailable(format!(
                                "{message}; and the local copy of the overrides cannot be read ({error}): remove it to start with none"
                            ))));
                            return;
                        }
                    },
                    Err(error) => {
                        let _ = ready.send(Err(error));
                        return;
                    }
                };
                let _ = ready.send(Ok(overrides));
                let mut writer = Writer {
                    config: thread_config,
                    setup_pending: client.is_none(),
                    client,
                    reconnect: None,
                    last_attempt: Instant::now(),
                    key,
                    spool,
                    stalled: false,
                    counters: thread_counters,
                };
                writer.run(rx).await;
            });
        })
        .map_err(|error| StoreError::Dir {
            path: spool_path.display().to_string(),
            error,
        })?;
    let overrides = started
        .recv()
        .map_err(|_| StoreError::WriterGone)?
        .map_err(|error| match error {
            StoreError::Unavailable(message) => {
                StoreError::Unavailable(format!("store.postgres_url {redacted}: {message}"))
            }
            other => other,
        })?;
    tracing::info!(url = %redacted, spool = %spool_path.display(), "postgres store open");
    Ok(crate::store::Opened {
        recorder: Recorder::from_parts(tx, overflow, counters),
        reads: Reads::Postgres(
            Reader::new(config)
                .checking_with(reads_key)
                .keeping_overrides_in(spool_path),
        ),
        overrides,
    })
}

/// A connection to a database made ready for this replica: migrated, its chain keyed as this
/// replica writes it.
async fn set_up(
    config: &tokio_postgres::Config,
    key: Option<&ChainKey>,
) -> Result<Client, StoreError> {
    let mut client = super::connect(config).await?;
    super::migrate(&mut client).await.map_err(pg_error)?;
    check_keying(&client, key).await?;
    Ok(client)
}

/// Every replica must write the chain the same way: with the key once the chain is keyed,
/// and only onto a keyed chain with one (keying an existing plain chain is not supported on
/// PostgreSQL; start keyed from the first row).
async fn check_keying(client: &Client, key: Option<&ChainKey>) -> Result<(), StoreError> {
    let head = client
        .query_opt(
            "SELECT seq, row_hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(pg_error)?;
    let Some(head) = head else { return Ok(()) };
    let (seq, hash): (i64, String) = (
        head.try_get(0).map_err(pg_error)?,
        head.try_get(1).map_err(pg_error)?,
    );
    // The first keyed row still in the log is the one asked (rows appended at the end cannot
    // make the right key look wrong, nor one row written under another key a wrong one right).
    if let Some(key) = key {
        let first_keyed = client
            .query_opt(
                &format!(
                    "SELECT {} FROM audit_log WHERE row_hash LIKE '{KEYED}%' ORDER BY seq LIMIT 1",
                    super::ROW_COLUMNS
                ),
                &[],
            )
            .await
            .map_err(pg_error)?;
        if let Some(first) = first_keyed {
            let (seq, row, prev, hash) = super::read_row(&first).map_err(pg_error)?;
            if let Err(broken) =
                crate::store::chain::check_row(seq, &row, (&prev, &hash), None, Some(key))
            {
                return Err(StoreError::Conflict(format!(
                    "postgres store: the configured chain key is not the audit chain's: {broken}; every replica must use the [store] chain_key_file the chain was written with"
                )));
            }
        }
    }
    match (key, hash.starts_with(KEYED)) {
        (Some(_), false) => Err(StoreError::Conflict(format!(
            "postgres store: a chain key is configured but the audit chain's head (row seq {seq}) is not keyed; every replica must use the same [store] chain_key_file, from the chain's first row"
        ))),
        (None, true) => Err(StoreError::Conflict(format!(
            "postgres store: the audit chain is keyed (row seq {seq}); set [store] chain_key_file to the key it was written with"
        ))),
        _ => Ok(()),
    }
}

// Decisions are the bulk and stay inline; the rare reviewer actions are boxed.
#[allow(clippy::large_enum_variant)]
enum Item {
    /// `must_keep`: spooled while the database is away (rows from the spool itself too);
    /// `keep` says who waits for the answer.
    Decision {
        row: AuditRow,
        must_keep: bool,
        keep: Keep,
    },
    Review(Box<ReviewCommand>),
}

/// What committing one item did.
enum Committed {
    Decision,
    Review(Box<Result<Applied, StoreError>>),
}

struct Writer {
    config: tokio_postgres::Config,
    /// The database was not reachable at start: migrate it and check the chain's keying on
    /// the first connection, before anything is written.
    setup_pending: bool,
    client: Option<Client>,
    /// A connection attempt in progress while the database is away (with the set-up, if
    /// pending).
    reconnect: Option<tokio::task::JoinHandle<Result<Client, StoreError>>>,
    last_attempt: Instant,
    key: Option<ChainKey>,
    spool: Spool,
    /// The last drain moved nothing (the spool could not be read): wait before the next.
    stalled: bool,
    counters: Arc<Counters>,
}

impl Writer {
    async fn run(&mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            // Catching up on the spool with the database there: no waiting between chunks.
            let catching_up = !self.spool.is_empty()
                && !self.stalled
                && self.client.as_ref().is_some_and(|c| !c.is_closed());
            let first = if catching_up {
                match rx.try_recv() {
                    Ok(command) => Some(command),
                    Err(mpsc::error::TryRecvError::Empty) => None,
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            } else {
                match tokio::time::timeout(RETRY, rx.recv()).await {
                    Ok(Some(command)) => Some(command),
                    Ok(None) => break,
                    Err(_) => None,
                }
            };
            if !self.spool.is_empty() {
                self.drain().await;
            }
            let Some(first) = first else { continue };
            let mut commands = vec![first];
            while commands.len() < BATCH {
                match rx.try_recv() {
                    Ok(command) => commands.push(command),
                    Err(_) => break,
                }
            }
            let mut items = Vec::with_capacity(commands.len());
            let mut acks = Vec::new();
            for command in commands {
                match command {
                    Command::Decision(build, keep) => match catch_unwind(AssertUnwindSafe(build)) {
                        Ok(row) => items.push(Item::Decision {
                            row,
                            must_keep: keep.must_keep(),
                            keep,
                        }),
                        Err(_) => {
                            tracing::error!(
                                "building a decision's audit row panicked; it is not recorded"
                            );
                            self.counters.failed.fetch_add(1, Ordering::Relaxed);
                            keep.answer(Err(StoreError::Task(
                                "building the decision's audit row failed".into(),
                            )));
                        }
                    },
                    Command::Review(review) => items.push(Item::Review(review)),
                    Command::Flush(ack) => acks.push(ack),
                    Command::Retain { done, .. } => {
                        let _ = done.send(Err(StoreError::Conflict(
                            "retention ([store] retain_days) is not available with store.postgres_url".into(),
                        )));
                    }
                }
            }
            self.write(items).await;
            for ack in acks {
                let _ = ack.send(());
            }
        }
        // Closing: what the spool still holds after one more chunk stays there for the next
        // start.
        if !self.spool.is_empty() {
            self.drain().await;
        }
    }

    /// A live connection, or none while the database is away. Reconnecting runs beside the
    /// writer (a task started at most every `RETRY`), so a database that does not answer
    /// (a partition: connects hang until their timeout) never stops the writer from taking
    /// and spooling rows.
    async fn connected(&mut self) -> bool {
        if self.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return true;
        }
        if self.client.take().is_some() {
            tracing::error!(spool = %self.spool.path().display(), "postgres store unreachable: decisions that must be kept go to the spool; reviewer changes fail");
            self.last_attempt = Instant::now();
            return false;
        }
        if let Some(attempt) = self.reconnect.take_if(|a| a.is_finished()) {
            match attempt.await {
                Ok(Ok(client)) => {
                    tracing::info!(spooled = self.spool.len(), "postgres store reachable again");
                    self.setup_pending = false;
                    self.client = Some(client);
                    return true;
                }
                Ok(Err(error @ StoreError::Unavailable(_))) => {
                    tracing::debug!(%error, "postgres store still unreachable")
                }
                // The database answers but refuses this replica (a chain keyed otherwise, a
                // migration that fails): nothing is written to it; the spool keeps what must
                // be kept, and every attempt says why.
                Ok(Err(error)) => {
                    tracing::error!(%error, spooled = self.spool.len(), "postgres store refuses this replica; must-keep decisions stay in the spool")
                }
                Err(error) => tracing::warn!(%error, "postgres reconnect task failed"),
            }
        }
        if self.reconnect.is_none() && self.last_attempt.elapsed() >= RETRY {
            self.last_attempt = Instant::now();
            let (config, key) = (self.config.clone(), self.key.clone());
            let setup = self.setup_pending;
            self.reconnect = Some(tokio::spawn(async move {
                if setup {
                    set_up(&config, key.as_ref()).await
                } else {
                    super::connect(&config).await
                }
            }));
        }
        false
    }

    fn lost(&mut self, error: &StoreError) {
        if self.client.take().is_some() {
            tracing::error!(%error, spool = %self.spool.path().display(), "postgres store unreachable: decisions that must be kept go to the spool; reviewer changes fail");
        }
        self.last_attempt = Instant::now();
    }

    /// Commits `items` (after the spool: rows keep the order they were answered in), or, with
    /// the database away, spools what must be kept.
    async fn write(&mut self, items: Vec<Item>) {
        if !self.spool.is_empty() || !self.connected().await {
            return self.away(items);
        }
        // A batch of flushes alone has nothing to commit.
        if items.is_empty() {
            return;
        }
        match self.commit(&items).await {
            Ok(done) => self.deliver(items, done.into_iter().map(Ok).collect()),
            Err(error) if matches!(error, StoreError::Unavailable(_)) => {
                self.lost(&error);
                self.away(items);
            }
            Err(error) => {
                tracing::warn!(%error, items = items.len(), "audit batch failed; committing its items one by one");
                let mut outcomes = Vec::with_capacity(items.len());
                let mut rest = items.into_iter();
                let mut done_items = Vec::new();
                for item in rest.by_ref() {
                    let result = self.commit(std::slice::from_ref(&item)).await;
                    if let Err(error @ StoreError::Unavailable(_)) = &result {
                        self.lost(error);
                        let mut left = vec![item];
                        left.extend(rest);
                        self.deliver(done_items, outcomes);
                        return self.away(left);
                    }
                    outcomes.push(result.and_then(|done| {
                        done.into_iter().next().ok_or_else(|| {
                            StoreError::Postgres("a commit answered for no item".into())
                        })
                    }));
                    done_items.push(item);
                }
                self.deliver(done_items, outcomes);
            }
        }
    }

    fn deliver(&self, items: Vec<Item>, outcomes: Vec<Result<Committed, StoreError>>) {
        for (item, outcome) in items.into_iter().zip(outcomes) {
            match (item, outcome) {
                (Item::Decision { keep, .. }, Ok(_)) => {
                    self.counters.recorded.fetch_add(1, Ordering::Relaxed);
                    keep.answer(Ok(()));
                }
                (Item::Review(review), Ok(Committed::Review(result))) => {
                    let _ = review.reply.send(*result);
                }
                (Item::Review(review), Ok(Committed::Decision)) => {
                    let _ = review.reply.send(Ok(Applied::Nothing));
                }
                (Item::Decision { row, keep, .. }, Err(error)) => {
                    tracing::error!(%error, kind = %row.kind, ref_id = %row.ref_id, "audit row failed to commit; it is not recorded");
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    keep.answer(Err(error));
                }
                (Item::Review(review), Err(error)) => {
                    tracing::error!(%error, ref_id = %review.row.ref_id, "reviewer row failed to commit");
                    let _ = review.reply.send(Err(error));
                }
            }
        }
    }

    /// The database is away: must-keep decisions to the spool, others dropped, reviewer
    /// actions refused.
    fn away(&mut self, items: Vec<Item>) {
        let mut keep = Vec::new();
        let mut waiting = Vec::new();
        for item in items {
            match item {
                Item::Decision {
                    row,
                    must_keep: true,
                    keep: waiter,
                } => {
                    keep.push(row);
                    waiting.push(waiter);
                }
                Item::Decision { .. } => {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Item::Review(review) => {
                    let message = if self.client.as_ref().is_some_and(|c| !c.is_closed()) {
                        format!(
                            "the PostgreSQL store is catching up on {} decisions recorded while it was unreachable: reviewer actions wait until it has; try again in a moment",
                            self.spool.len()
                        )
                    } else {
                        "the PostgreSQL store is unreachable: reviewer actions are not recorded until it is back; try again later".into()
                    };
                    let _ = review.reply.send(Err(StoreError::Unavailable(message)));
                }
            }
        }
        if keep.is_empty() {
            return;
        }
        match self.spool.append(&keep) {
            Ok(()) => {
                self.counters
                    .spool_depth
                    .store(self.spool.len(), Ordering::Relaxed);
                // On disk (fsynced) until the database takes them: kept.
                waiting.into_iter().for_each(|w| w.answer(Ok(())));
            }
            Err(error) => {
                tracing::error!(%error, rows = keep.len(), "spool: rows could not be written; they are not recorded");
                self.counters
                    .failed
                    .fetch_add(keep.len() as u64, Ordering::Relaxed);
                let message = format!(
                    "the PostgreSQL store is unreachable and the local spool cannot be written: {error}"
                );
                for waiter in waiting {
                    waiter.answer(Err(StoreError::Unavailable(message.clone())));
                }
            }
        }
    }

    /// Moves up to `DRAIN_CHUNK` pages of the spool into the database, in order, a batch per
    /// transaction (fewer if it empties or the database goes away again). A chunk at a time, so
    /// that the channel is taken between chunks (newer must-keep rows go to the spool behind
    /// the older ones) and no request waits for room behind a long catch-up.
    async fn drain(&mut self) {
        let start = self.spool.len();
        self.stalled = true;
        for _ in 0..DRAIN_CHUNK {
            if self.spool.is_empty() {
                break;
            }
            if !self.connected().await {
                return;
            }
            let (rows, bytes, lines) = match self.spool.peek(BATCH) {
                Ok(page) => page,
                Err(error) => {
                    tracing::error!(%error, "spool: cannot be read; retrying");
                    return;
                }
            };
            let unreadable = lines - rows.len() as u64;
            let items: Vec<Item> = rows
                .into_iter()
                .map(|row| Item::Decision {
                    row,
                    must_keep: true,
                    keep: Keep::Optional,
                })
                .collect();
            let committed = match self.commit(&items).await {
                Ok(done) => done.len() as u64,
                Err(error @ StoreError::Unavailable(_)) => {
                    self.lost(&error);
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "spool batch failed; committing its rows one by one");
                    let mut committed = 0;
                    for item in &items {
                        match self.commit(std::slice::from_ref(item)).await {
                            Ok(_) => committed += 1,
                            Err(error @ StoreError::Unavailable(_)) => {
                                self.lost(&error);
                                return; // the page is drained again, its committed rows skipped
                            }
                            Err(error) => {
                                let Item::Decision { row, .. } = item else {
                                    continue;
                                };
                                tracing::error!(%error, ref_id = %row.ref_id, "spooled row failed to commit; it is not recorded");
                                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    committed
                }
            };
            self.counters
                .recorded
                .fetch_add(committed, Ordering::Relaxed);
            self.counters
                .failed
                .fetch_add(unreadable, Ordering::Relaxed);
            self.stalled = false;
            if let Err(error) = self.spool.advance(bytes, lines) {
                tracing::error!(%error, "spool: cannot mark rows drained; they will be offered again (and skipped as already recorded)");
                return;
            }
            self.counters
                .spool_depth
                .store(self.spool.len(), Ordering::Relaxed);
            if self.spool.is_empty() {
                tracing::info!(
                    rows = start,
                    "spool drained into the postgres store (rows: those waiting when this last chunk began)"
                );
            }
        }
    }

    /// Commits `items` in one transaction, chained after the head under the chain lock.
    async fn commit(&mut self, items: &[Item]) -> Result<Vec<Committed>, StoreError> {
        let key = self.key.clone();
        let Some(client) = self.client.as_mut() else {
            return Err(StoreError::Unavailable(
                "the PostgreSQL store is unreachable".into(),
            ));
        };
        match tokio::time::timeout(COMMIT_TIMEOUT, commit(client, items, key.as_ref())).await {
            Ok(Ok(done)) => {
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
                Ok(done)
            }
            Ok(Err(Failure::Pg(error))) => Err(pg_error(error)),
            Ok(Err(Failure::Store(error))) => Err(error),
            Err(_) => {
                // A hung connection: drop it, so the next attempt reconnects.
                self.client = None;
                Err(StoreError::Unavailable(
                    "the PostgreSQL store did not answer in time".into(),
                ))
            }
        }
    }
}

enum Failure {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(error: tokio_postgres::Error) -> Self {
        Failure::Pg(error)
    }
}

/// Rows hashed and waiting to be inserted together.
#[derive(Default)]
struct Pending {
    seq: Vec<i64>,
    kind: Vec<String>,
    ref_id: Vec<String>,
    recorded_at_ms: Vec<i64>,
    actor: Vec<String>,
    account_id: Vec<String>,
    verdict: Vec<String>,
    country: Vec<String>,
    reasons: Vec<String>,
    body: Vec<String>,
    prev_hash: Vec<String>,
    row_hash: Vec<String>,
}

impl Pending {
    fn push(&mut self, seq: i64, row: &AuditRow, prev: &str, hash: &str) {
        self.seq.push(seq);
        self.kind.push(row.kind.clone());
        self.ref_id.push(row.ref_id.clone());
        self.recorded_at_ms.push(row.recorded_at_ms);
        self.actor.push(row.actor.clone());
        self.account_id.push(row.account_id.clone());
        self.verdict.push(row.verdict.clone());
        self.country.push(row.country.clone());
        self.reasons.push(row.reasons.clone());
        self.body.push(row.body.clone());
        self.prev_hash.push(prev.to_owned());
        self.row_hash.push(hash.to_owned());
    }

    /// Inserts the rows in one statement, and queue items for the REVIEW decisions.
    async fn insert(&mut self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        if self.seq.is_empty() {
            return Ok(());
        }
        tx.execute(
            "INSERT INTO audit_log (seq, kind, ref_id, recorded_at_ms, actor, account_id, verdict, country, reasons, body, prev_hash, row_hash) \
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[])",
            &[
                &self.seq, &self.kind, &self.ref_id, &self.recorded_at_ms, &self.actor, &self.account_id,
                &self.verdict, &self.country, &self.reasons, &self.body, &self.prev_hash, &self.row_hash,
            ],
        )
        .await?;
        let (mut queue_ids, mut queue_seqs, mut queue_fleets) =
            (Vec::new(), Vec::new(), Vec::new());
        for i in (0..self.seq.len())
            .filter(|&i| self.kind[i] == "decision" && self.verdict[i] == "REVIEW")
        {
            queue_ids.push(self.ref_id[i].as_str());
            queue_seqs.push(self.seq[i]);
            queue_fleets.push(crate::store::queued_fleet_id(&self.body[i]));
        }
        if !queue_ids.is_empty() {
            tx.execute(
                "INSERT INTO review_queue (decision_id, seq, fleet_id) SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[]) ON CONFLICT DO NOTHING",
                &[&queue_ids, &queue_seqs, &queue_fleets],
            )
            .await?;
        }
        let mut counts = DecisionCounts::default();
        for i in (0..self.seq.len()).filter(|&i| self.kind[i] == "decision") {
            counts.count(
                self.recorded_at_ms[i],
                &self.verdict[i],
                &self.country[i],
                &self.reasons[i],
                1,
            );
        }
        let (mut hours, mut verdicts, mut countries, mut reasons, mut ns) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((hour, verdict, country, reason), n) in counts.into_rows() {
            hours.push(hour);
            verdicts.push(verdict);
            countries.push(country);
            reasons.push(reason);
            ns.push(n);
        }
        if !hours.is_empty() {
            tx.execute(
                "INSERT INTO decision_counts (hour_ms, verdict, country, reason, n) \
                 SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[]) \
                 ON CONFLICT (hour_ms, verdict, country, reason) DO UPDATE SET n = decision_counts.n + excluded.n",
                &[&hours, &verdicts, &countries, &reasons, &ns],
            )
            .await?;
        }
        *self = Self::default();
        Ok(())
    }
}

async fn commit(
    client: &mut Client,
    items: &[Item],
    key: Option<&ChainKey>,
) -> Result<Vec<Committed>, Failure> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CHAIN_LOCK])
        .await?;
    let head = tx
        .query_opt(
            "SELECT seq, row_hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await?;
    let (mut seq, mut prev): (i64, String) = match head {
        Some(row) => (row.try_get(0)?, row.try_get(1)?),
        None => (0, GENESIS.to_owned()),
    };
    // Replicas configured differently must not mix keyed and plain rows in the one chain
    // (checked at start too; this catches a replica that started on an empty chain).
    if seq > 0 && key.is_some() != prev.starts_with(KEYED) {
        return Err(Failure::Store(StoreError::Conflict(format!(
            "the audit chain's head (row seq {seq}) is {} but this replica {} a chain key: every replica needs the same [store] chain_key_file",
            if prev.starts_with(KEYED) {
                "keyed"
            } else {
                "plain"
            },
            if key.is_some() { "has" } else { "has no" },
        ))));
    }
    // A decision recorded twice (the gateway's cache, a spool drained again) is skipped.
    let ids: Vec<&str> = items
        .iter()
        .filter_map(|item| match item {
            Item::Decision { row, .. } => Some(row.ref_id.as_str()),
            Item::Review(_) => None,
        })
        .collect();
    let mut seen: HashSet<String> = if ids.is_empty() {
        HashSet::new()
    } else {
        tx.query(
            "SELECT ref_id FROM audit_log WHERE kind = 'decision' AND ref_id = ANY($1)",
            &[&ids],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?
    };
    let mut pending = Pending::default();
    let mut done = Vec::with_capacity(items.len());
    let mut notify = false;
    for item in items {
        match item {
            Item::Decision { row, .. } => {
                if seen.insert(row.ref_id.clone()) || row.kind != "decision" {
                    let hash = row.hash_with(seq + 1, &prev, key);
                    pending.push(seq + 1, row, &prev, &hash);
                    seq += 1;
                    prev = hash;
                }
                done.push(Committed::Decision);
            }
            Item::Review(review) => {
                pending.insert(&tx).await?;
                tx.batch_execute("SAVEPOINT review").await?;
                let outcome = match apply(&tx, &review.change, key).await {
                    Ok(applied) => {
                        let row = with_applied(&review.row, &review.change, &applied);
                        let hash = row.hash_with(seq + 1, &prev, key);
                        let mut one = Pending::default();
                        one.push(seq + 1, &row, &prev, &hash);
                        match one.insert(&tx).await {
                            Ok(()) => Ok((applied, hash)),
                            Err(error) if is_unavailable(&error) => return Err(error.into()),
                            Err(error) => Err(StoreError::Postgres(error.to_string())),
                        }
                    }
                    Err(Failure::Pg(error)) if is_unavailable(&error) => {
                        return Err(error.into());
                    }
                    Err(Failure::Pg(error)) => Err(StoreError::Postgres(error.to_string())),
                    Err(Failure::Store(error)) => Err(error),
                };
                match outcome {
                    Ok((applied, hash)) => {
                        tx.batch_execute("RELEASE SAVEPOINT review").await?;
                        notify |= matches!(applied, Applied::Override(_));
                        seq += 1;
                        prev = hash;
                        done.push(Committed::Review(Box::new(Ok(applied))));
                    }
                    Err(error) => {
                        tx.batch_execute("ROLLBACK TO SAVEPOINT review; RELEASE SAVEPOINT review")
                            .await?;
                        done.push(Committed::Review(Box::new(Err(error))));
                    }
                }
            }
        }
    }
    pending.insert(&tx).await?;
    if notify {
        // Delivered to every listening replica when this transaction commits.
        tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL]).await?;
    }
    tx.commit().await?;
    Ok(done)
}

async fn apply(
    tx: &Transaction<'_>,
    change: &Change,
    key: Option<&ChainKey>,
) -> Result<Applied, Failure> {
    match change {
        Change::None => Ok(Applied::Nothing),
        Change::SetOverride(record) => {
            tx.execute(
                "INSERT INTO overrides (id, scope, value, action, reviewer, reason, created_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[&record.id, &record.scope, &record.value, &record.action, &record.reviewer, &record.reason, &record.created_at_ms, &record.expires_at_ms],
            )
            .await?;
            Ok(Applied::Override(record.clone()))
        }
        Change::RemoveOverride { id, by, at_ms } => {
            // The override as the audit log records it (the one enforced), not as the table
            // holds it: a row deleted or edited there can still be removed, and is put back
            // as recorded. The table only when the log cannot say.
            let recorded = match super::recorded_override(tx, id, key).await? {
                Some(recorded) => recorded,
                None => tx
                    .query_opt(
                        &format!(
                            "SELECT {} FROM overrides WHERE id = $1 FOR UPDATE",
                            super::OVERRIDE_COLUMNS
                        ),
                        &[id],
                    )
                    .await?
                    .map(|row| super::read_override(&row))
                    .transpose()?,
            };
            let mut record: OverrideRecord = match recorded {
                Some(record) => record,
                None => {
                    return Err(Failure::Store(StoreError::NotFound(format!(
                        "override {id} does not exist"
                    ))));
                }
            };
            if record.removed_at_ms.is_some() {
                return Err(Failure::Store(StoreError::Conflict(format!(
                    "override {id} was already removed by {}",
                    record.removed_by
                ))));
            }
            record.removed_at_ms = Some(*at_ms);
            record.removed_by = by.clone();
            tx.execute(
                "INSERT INTO overrides (id, scope, value, action, reviewer, reason, created_at_ms, expires_at_ms, removed_at_ms, removed_by) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO UPDATE SET scope = excluded.scope, \
                 value = excluded.value, action = excluded.action, reviewer = excluded.reviewer, reason = excluded.reason, \
                 created_at_ms = excluded.created_at_ms, expires_at_ms = excluded.expires_at_ms, \
                 removed_at_ms = excluded.removed_at_ms, removed_by = excluded.removed_by",
                &[&record.id, &record.scope, &record.value, &record.action, &record.reviewer, &record.reason, &record.created_at_ms, &record.expires_at_ms, &record.removed_at_ms, &record.removed_by],
            )
            .await?;
            Ok(Applied::Override(record))
        }
        Change::Resolve {
            decision_id,
            outcome,
            note,
            by,
            at_ms,
        } => {
            let status: Option<String> = tx
                .query_opt(
                    "SELECT status FROM review_queue WHERE decision_id = $1 FOR UPDATE",
                    &[decision_id],
                )
                .await?
                .map(|r| r.try_get(0))
                .transpose()?;
            match status.as_deref() {
                None => {
                    return Err(Failure::Store(StoreError::NotFound(format!(
                        "decision {decision_id} is not in the review queue"
                    ))));
                }
                Some("resolved") => {
                    return Err(Failure::Store(StoreError::Conflict(format!(
                        "decision {decision_id} is already resolved"
                    ))));
                }
                Some(_) => {}
            }
            tx.execute(
                "UPDATE review_queue SET status = 'resolved', outcome = $2, note = $3, resolved_by = $4, resolved_at_ms = $5 WHERE decision_id = $1",
                &[decision_id, outcome, note, by, at_ms],
            )
            .await?;
            Ok(Applied::Queue(QueueState {
                status: "resolved".into(),
                outcome: outcome.clone(),
                note: note.clone(),
                resolved_by: by.clone(),
                resolved_at_ms: Some(*at_ms),
            }))
        }
    }
}
