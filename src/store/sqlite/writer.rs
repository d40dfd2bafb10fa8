//! The SQLite writer: one thread owns the write connection and commits the `Recorder`'s
//! commands in batches (up to 256 rows a transaction: everything queued while the last batch
//! committed, so callers waiting for a must-record row share one commit); when a batch fails,
//! its items are committed one by one, so a bad row costs only itself. Each waiting caller is
//! answered after the transaction holding its row commits. Retention runs here too.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::mpsc;

use super::account_index::AccountIndex;
use super::{open_for_writing, retention};
use crate::store::chain::{ChainKey, GENESIS, KEYED};
use crate::store::writer::{
    Applied, Change, Command, Counters, Keep, Overflow, Recorder, ReviewCommand, with_applied,
};
use crate::store::{AuditRow, DecisionCounts, QueueState, StoreError};

/// Opens the store in `dir` (migrating it) and starts the writer thread, keying every row it
/// writes with `key` when there is one.
pub(crate) fn start(
    dir: &Path,
    capacity: usize,
    overflow: Overflow,
    key: Option<ChainKey>,
) -> Result<Recorder, StoreError> {
    let conn = open_for_writing(dir)?;
    let path = dir.display().to_string();
    let (seq, prev): (i64, String) = super::head(&conn)
        .map_err(|error| StoreError::Sqlite {
            path: path.clone(),
            error,
        })?
        .unwrap_or((0, GENESIS.to_owned()));
    check_keying(&path, seq, &prev, key.as_ref())?;
    check_key(&conn, &path, seq, key.as_ref())?;
    let accounts = AccountIndex::load(&conn).map_err(|error| StoreError::Sqlite {
        path: path.clone(),
        error,
    })?;
    // Checkpoints run beside the writer, not inside one of its commits: a commit that has to
    // copy the WAL back first is what callers waiting on it would see as their slowest answers.
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .map_err(|error| StoreError::Sqlite {
            path: path.clone(),
            error,
        })?;

    let checkpoints = open_for_writing(dir)?;
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let counters = Arc::new(Counters::default());
    let thread_counters = counters.clone();
    let sweeps = Arc::new(Sweeps::default());
    let thread_sweeps = sweeps.clone();
    std::thread::Builder::new()
        .name("regionguard-checkpoint".into())
        .spawn(move || checkpoint_while(&checkpoints, &thread_sweeps))
        .map_err(|error| StoreError::Dir {
            path: path.clone(),
            error,
        })?;
    std::thread::Builder::new()
        .name("regionguard-store".into())
        .spawn(move || {
            let own = OwnCheckpoint {
                sweeps: sweeps.clone(),
                since: None,
            };
            let chain = (seq, prev);
            run(
                conn,
                rx,
                chain,
                key.as_ref(),
                &thread_counters,
                (own, accounts),
            );
            sweeps.writing.store(false, Ordering::Relaxed);
        })
        .map_err(|error| StoreError::Dir { path, error })?;
    Ok(Recorder::from_parts(tx, overflow, counters))
}

/// How often the WAL is copied back into the database, beside the writer.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// How long after the checkpoint thread's pass the writer runs its own even though commands
/// are waiting (it runs at once when none are).
const OWN_CHECKPOINT_WITHIN: Duration = Duration::from_millis(50);

/// What the checkpoint thread and the writer share.
struct Sweeps {
    /// Until the writer stops.
    writing: AtomicBool,
    /// The thread has copied the WAL back since the writer's last checkpoint.
    swept: AtomicBool,
}

impl Default for Sweeps {
    fn default() -> Self {
        Self {
            writing: AtomicBool::new(true),
            swept: AtomicBool::new(false),
        }
    }
}

/// Passive checkpoints (they never block the writer or readers) until the writer stops.
fn checkpoint_while(conn: &Connection, sweeps: &Sweeps) {
    while sweeps.writing.load(Ordering::Relaxed) {
        std::thread::sleep(CHECKPOINT_EVERY);
        match passive_checkpoint(conn) {
            Ok(_) => sweeps.swept.store(true, Ordering::Relaxed),
            Err(error) => {
                tracing::warn!(%error, "audit store: WAL checkpoint failed; the next one retries")
            }
        }
    }
}

/// The writer's own passive checkpoint, between its transactions: the checkpoint thread copies
/// most of the WAL back, but only a checkpoint that completes while no write is in progress
/// lets the next transaction start the WAL from its beginning (and `journal_size_limit` cut it
/// back); under a writer that never pauses that never happened, and the WAL grew without end
/// (2.4 GB after 13 s at 27k rows/s). It runs just after each of the thread's passes, so it
/// copies only what was written since, and when no command waits, or within
/// [`OWN_CHECKPOINT_WITHIN`] when commands keep coming.
struct OwnCheckpoint {
    sweeps: Arc<Sweeps>,
    /// When the writer first saw the thread's latest pass.
    since: Option<std::time::Instant>,
}

impl OwnCheckpoint {
    fn between_transactions(&mut self, conn: &Connection, idle: bool) {
        if !self.sweeps.swept.load(Ordering::Relaxed) {
            return;
        }
        let since = *self.since.get_or_insert_with(std::time::Instant::now);
        if !idle && since.elapsed() < OWN_CHECKPOINT_WITHIN {
            return;
        }
        self.sweeps.swept.store(false, Ordering::Relaxed);
        self.since = None;
        if let Err(error) = passive_checkpoint(conn) {
            tracing::warn!(%error, "audit store: WAL checkpoint failed; the next one retries");
        }
    }
}

fn passive_checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
}

/// Rows deleted per transaction while retention catches up, between normal batches.
const RETENTION_CHUNK: usize = 2_000;
const RETENTION_PAUSE: Duration = Duration::from_millis(50);

/// Most commands one transaction takes.
const BATCH: usize = 256;

/// How long rows nobody waits for (ALLOW decisions outside `must_record`) may gather before
/// they commit. A commit writes every page it dirtied to the WAL, whole (the table's last
/// page, one per index, the hourly counts), however few rows it holds: committing each
/// millisecond's handful of rows wrote about 7 KB of WAL per row at 27k rows/s (16 KB pages). A caller that
/// waits (a must-record decision, a reviewer, a flush) ends the gathering within
/// [`GATHER_POLL`].
const ASYNC_GATHER: Duration = Duration::from_millis(5);
/// How often the gathering looks for a caller that waits: what it can add to such a caller's
/// wait, at most.
const GATHER_POLL: Duration = Duration::from_micros(250);

/// At most this many yields, and this long, gather a commit that callers wait on (a yield to
/// a busy thread can cost a time slice).
const YIELD_ROUNDS: usize = 8;
const YIELD_AT_MOST: Duration = Duration::from_millis(1);

/// Whether somebody waits for this command's commit.
fn waited_on(command: &Command) -> bool {
    match command {
        Command::Decision(_, keep) => keep.must_keep(),
        Command::Review(_) | Command::Flush(_) | Command::Retain { .. } => true,
    }
}

/// A keyed chain is only continued keyed, and a plain one is keyed only by an explicit
/// adoption (`adopt_key`): otherwise someone who can write the file but lacks the key could
/// replace the chain with a plain one and have the server key its way past it.
fn check_keying(
    path: &str,
    seq: i64,
    head: &str,
    key: Option<&ChainKey>,
) -> Result<(), StoreError> {
    match (key, seq > 0, head.starts_with(KEYED)) {
        (Some(_), true, false) => Err(StoreError::Conflict(format!(
            "{path}: a chain key is configured but the audit chain's head (row seq {seq}) is not keyed; \
             to key an existing store, run `regionguard audit adopt-key --data-dir {path} --key-file FILE` once, with the server stopped"
        ))),
        (None, _, true) => Err(StoreError::Conflict(format!(
            "{path}: the audit chain is keyed (row seq {seq}); set [store] chain_key_file to the key it was written with"
        ))),
        _ => Ok(()),
    }
}

/// The configured key must be the chain's: a server started with another key would take none
/// of the chain's reviewer rows (its overrides on record) and write rows that no verify with
/// the chain's key accepts. The first keyed row still in the log is the one asked: rows
/// appended around the writer at the end cannot make the right key look wrong, nor a row
/// written once under another key make a wrong one look right.
fn check_key(
    conn: &Connection,
    path: &str,
    seq: i64,
    key: Option<&ChainKey>,
) -> Result<(), StoreError> {
    let Some(key) = key.filter(|_| seq > 0) else {
        return Ok(());
    };
    let first_keyed = conn
        .query_row(
            &format!(
                "SELECT {} FROM audit_log WHERE row_hash LIKE '{KEYED}%' ORDER BY seq LIMIT 1",
                super::ROW_COLUMNS
            ),
            [],
            super::read_row,
        )
        .optional()
        .map_err(|error| StoreError::Sqlite {
            path: path.to_owned(),
            error,
        })?;
    let Some((seq, row, prev, hash)) = first_keyed else {
        return Ok(());
    };
    crate::store::chain::check_row(seq, &row, (&prev, &hash), None, Some(key)).map_err(|broken| {
        StoreError::Conflict(format!(
            "{path}: the configured chain key is not the audit chain's: {broken}; set [store] chain_key_file to the key the chain was written with"
        ))
    })
}

/// Keys an existing plain store: appends a keyed `keying` row after its head, from which every
/// row must be keyed. Run with the server stopped. Returns the seq keying starts at.
pub fn adopt_key(dir: &Path, key: &ChainKey) -> Result<i64, StoreError> {
    let mut conn = open_for_writing(dir)?;
    let path = dir.display().to_string();
    let sql = |error| StoreError::Sqlite {
        path: path.clone(),
        error,
    };
    let head = super::head(&conn).map_err(sql)?;
    let Some((mut seq, mut prev)) = head else {
        return Err(StoreError::Conflict(format!(
            "{path}: the store is empty: a server started with the key keys it from its first row"
        )));
    };
    if prev.starts_with(KEYED) {
        return Err(StoreError::Conflict(format!(
            "{path}: the audit chain is already keyed (head row seq {seq})"
        )));
    }
    let row = AuditRow {
        kind: "keying".into(),
        ref_id: uuid::Uuid::now_v7().to_string(),
        recorded_at_ms: super::now_ms(),
        actor: "operator".into(),
        body: serde_json::json!({ "keyed_from_seq": seq + 1 }).to_string(),
        ..Default::default()
    };
    let tx = conn.transaction().map_err(sql)?;
    append(&tx, &mut seq, &mut prev, &row, Some(key)).map_err(sql)?;
    tx.commit().map_err(sql)?;
    Ok(seq)
}

/// Appends `row` to the chain. A row whose (kind, ref_id) is already there is skipped (a
/// decision recorded twice), so the chain stays gap-free.
fn append(
    tx: &Transaction<'_>,
    seq: &mut i64,
    prev: &mut String,
    row: &AuditRow,
    key: Option<&ChainKey>,
) -> rusqlite::Result<bool> {
    // Only a repeated (kind, ref_id) is skipped (the upsert clause names that index alone); any
    // other conflict (a second writer on the same store, say) fails the batch rather than hide
    // a row. One statement a row, not a look-up first: the insert finds the repeat itself.
    // Prepared once per connection (the statement cache), not parsed again for every row.
    let next = *seq + 1;
    let hash = row.hash_with(next, prev, key);
    let inserted = tx.prepare_cached(
        "INSERT INTO audit_log (seq, kind, ref_id, recorded_at_ms, actor, account_id, verdict, country, reasons, body, prev_hash, row_hash) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) ON CONFLICT (kind, ref_id) DO NOTHING",
    )?
    .execute(params![next, &row.kind, row.ref_id, row.recorded_at_ms, row.actor, row.account_id, row.verdict, row.country, row.reasons, row.body, *prev, hash])?;
    if inserted == 1 {
        *seq = next;
        *prev = hash;
    }
    Ok(inserted == 1)
}

fn apply(
    tx: &Transaction<'_>,
    change: &Change,
    key: Option<&ChainKey>,
) -> Result<Applied, StoreError> {
    let sql = |error| StoreError::Sqlite {
        path: "store".into(),
        error,
    };
    match change {
        Change::None => Ok(Applied::Nothing),
        Change::SetOverride(record) => {
            tx.execute(
                "INSERT INTO overrides (id, scope, value, action, reviewer, reason, created_at_ms, expires_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![record.id, record.scope, record.value, record.action, record.reviewer, record.reason, record.created_at_ms, record.expires_at_ms],
            )
            .map_err(sql)?;
            Ok(Applied::Override(record.clone()))
        }
        Change::RemoveOverride { id, by, at_ms } => {
            // The override as the audit log records it (the one enforced), not as the table
            // holds it: a row deleted or edited there can still be removed, and is put back
            // as recorded. The table only when the log cannot say.
            let recorded = match retention::recorded_override(tx, id, key).map_err(sql)? {
                Some(recorded) => recorded,
                None => super::override_by_id(tx, id).map_err(sql)?,
            };
            let mut record = recorded
                .ok_or_else(|| StoreError::NotFound(format!("override {id} does not exist")))?;
            if record.removed_at_ms.is_some() {
                return Err(StoreError::Conflict(format!(
                    "override {id} was already removed by {}",
                    record.removed_by
                )));
            }
            record.removed_at_ms = Some(*at_ms);
            record.removed_by = by.clone();
            tx.execute(
                "INSERT INTO overrides (id, scope, value, action, reviewer, reason, created_at_ms, expires_at_ms, removed_at_ms, removed_by) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (id) DO UPDATE SET scope = excluded.scope, \
                 value = excluded.value, action = excluded.action, reviewer = excluded.reviewer, reason = excluded.reason, \
                 created_at_ms = excluded.created_at_ms, expires_at_ms = excluded.expires_at_ms, \
                 removed_at_ms = excluded.removed_at_ms, removed_by = excluded.removed_by",
                params![record.id, record.scope, record.value, record.action, record.reviewer, record.reason, record.created_at_ms, record.expires_at_ms, record.removed_at_ms, record.removed_by],
            )
            .map_err(sql)?;
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
                .query_row(
                    "SELECT status FROM review_queue WHERE decision_id = ?1",
                    [decision_id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql)?;
            match status.as_deref() {
                None => {
                    return Err(StoreError::NotFound(format!(
                        "decision {decision_id} is not in the review queue"
                    )));
                }
                Some("resolved") => {
                    return Err(StoreError::Conflict(format!(
                        "decision {decision_id} is already resolved"
                    )));
                }
                Some(_) => {}
            }
            tx.execute(
                "UPDATE review_queue SET status = 'resolved', outcome = ?2, note = ?3, resolved_by = ?4, resolved_at_ms = ?5 WHERE decision_id = ?1",
                params![decision_id, outcome, note, by, at_ms],
            )
            .map_err(sql)?;
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

/// One command, ready to commit: a decision's row already built, or a reviewer's action.
enum Item {
    Decision(AuditRow, Keep),
    // Boxed, as in `Command`: reviewer actions are rare.
    Review { row: AuditRow, change: Box<Change> },
}

/// What committing one item did.
enum Committed {
    /// A decision's row is on disk (or was already: a repeat is skipped).
    Decision,
    /// A reviewer's action: its change and row are on disk, or neither is.
    Review(Box<Result<Applied, StoreError>>),
}

/// What a transaction committed: per item, and the (account, seq) of its rows that have an
/// account, for the account index.
type Commit = (Vec<Committed>, Vec<(String, i64)>);

/// Commits `items` in one transaction, continuing the chain at `seq`/`prev`, which move on only
/// when the transaction commits.
fn commit(
    conn: &mut Connection,
    items: &[Item],
    seq: &mut i64,
    prev: &mut String,
    key: Option<&ChainKey>,
) -> rusqlite::Result<Commit> {
    let (mut next_seq, mut next_prev) = (*seq, prev.clone());
    let tx = conn.transaction()?;
    let mut done = Vec::with_capacity(items.len());
    let mut accounts = Vec::with_capacity(items.len());
    let mut of_account = |row: &AuditRow, seq: i64| {
        if !row.account_id.is_empty() {
            accounts.push((row.account_id.clone(), seq));
        }
    };
    let mut counts = DecisionCounts::default();
    for item in items {
        match item {
            Item::Decision(row, _) => {
                if append(&tx, &mut next_seq, &mut next_prev, row, key)? {
                    of_account(row, next_seq);
                    counts.add(row);
                    if row.verdict == "REVIEW" {
                        tx.prepare_cached(
                            "INSERT OR IGNORE INTO review_queue (decision_id, seq, fleet_id) VALUES (?1, ?2, ?3)",
                        )?
                        .execute(params![
                            row.ref_id,
                            next_seq,
                            crate::store::queued_fleet_id(&row.body)
                        ])?;
                    }
                }
                done.push(Committed::Decision);
            }
            Item::Review { row, change } => {
                tx.execute("SAVEPOINT review", [])?;
                let applied = apply(&tx, change, key).map(|applied| {
                    let row = with_applied(row, change, &applied);
                    (applied, row)
                });
                match applied {
                    Ok((applied, row))
                        if append(&tx, &mut next_seq, &mut next_prev, &row, key)? =>
                    {
                        of_account(&row, next_seq);
                        tx.execute("RELEASE review", [])?;
                        done.push(Committed::Review(Box::new(Ok(applied))));
                    }
                    outcome => {
                        // The change failed, or its audit row could not be appended: undo it.
                        let error = outcome.err().unwrap_or_else(|| {
                            StoreError::Conflict(format!(
                                "review action {} is already recorded",
                                row.ref_id
                            ))
                        });
                        tx.execute("ROLLBACK TO review", [])?;
                        tx.execute("RELEASE review", [])?;
                        done.push(Committed::Review(Box::new(Err(error))));
                    }
                }
            }
        }
    }
    let mut upsert = tx.prepare_cached(
        "INSERT INTO decision_counts (hour_ms, verdict, country, reason, n) VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (hour_ms, verdict, country, reason) DO UPDATE SET n = n + excluded.n",
    )?;
    for ((hour, verdict, country, reason), n) in counts.into_rows() {
        upsert.execute(params![hour, verdict, country, reason, n])?;
    }
    drop(upsert);
    tx.commit()?;
    *seq = next_seq;
    *prev = next_prev;
    Ok((done, accounts))
}

fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Command>,
    (mut seq, mut prev): (i64, String),
    key: Option<&ChainKey>,
    counters: &Counters,
    (mut own, mut accounts): (OwnCheckpoint, AccountIndex),
) {
    // A deletion a restart interrupted goes on.
    let mut pending = retention::pending(&conn, key).unwrap_or_else(|error| {
        tracing::error!(%error, "audit retention: cannot tell what is left to delete; the next run will");
        None
    });
    let mut last_chunk = std::time::Instant::now();
    // Only to wait for a command with a time limit (see `next_command`).
    let timer = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .inspect_err(|error| tracing::warn!(%error, "audit store: no timer; the account index catches up only while commands come"))
        .ok();
    while let Some(first) = next_command(
        &mut rx,
        &mut conn,
        &mut accounts,
        seq,
        (timer.as_ref(), counters),
    ) {
        let mut waiting = waited_on(&first);
        let mut commands = vec![first];
        while commands.len() < BATCH {
            match rx.try_recv() {
                Ok(command) => {
                    waiting |= waited_on(&command);
                    commands.push(command);
                }
                Err(_) => break,
            }
        }
        // Polled in short sleeps rather than woken per row: a wake per row is a context switch
        // per row on a busy core.
        let gathering = std::time::Instant::now();
        while !waiting && commands.len() < BATCH && gathering.elapsed() < ASYNC_GATHER {
            std::thread::sleep(GATHER_POLL);
            loop {
                if commands.len() >= BATCH {
                    break;
                }
                match rx.try_recv() {
                    Ok(command) => {
                        waiting |= waited_on(&command);
                        commands.push(command);
                    }
                    Err(_) => break,
                }
            }
        }
        // Callers wait on this commit: first let the threads that have work run (a yield
        // returns at once when nothing else waits for this core), and take what they add, for
        // as long as each round adds something. On a shared core the request workers finish
        // the calls already read, so one commit serves them all instead of each handful
        // costing a commit of its own (durability bench: 46 rows a commit instead of 11,
        // must-record throughput +10 %).
        if waiting {
            let yielding = std::time::Instant::now();
            for _ in 0..YIELD_ROUNDS {
                let before = commands.len();
                if before >= BATCH || yielding.elapsed() >= YIELD_AT_MOST {
                    break;
                }
                std::thread::yield_now();
                while commands.len() < BATCH {
                    match rx.try_recv() {
                        Ok(command) => commands.push(command),
                        Err(_) => break,
                    }
                }
                if commands.len() == before || commands.len() >= BATCH {
                    break;
                }
            }
        }
        let mut items = Vec::with_capacity(commands.len());
        let mut replies = Vec::with_capacity(commands.len());
        let mut acks = Vec::new();
        let mut retains = Vec::new();
        for command in commands {
            match command {
                // A row builder that panics loses its own decision (counted), not the writer.
                Command::Decision(build, keep) => match catch_unwind(AssertUnwindSafe(build)) {
                    Ok(row) => {
                        items.push(Item::Decision(row, keep));
                        replies.push(None);
                    }
                    Err(_) => {
                        tracing::error!(
                            "building a decision's audit row panicked; it is not recorded"
                        );
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        keep.answer(Err(StoreError::Task(
                            "building the decision's audit row failed".into(),
                        )));
                    }
                },
                Command::Review(review) => {
                    let ReviewCommand { row, change, reply } = *review;
                    items.push(Item::Review {
                        row,
                        change: Box::new(change),
                    });
                    replies.push(Some(reply));
                }
                Command::Flush(ack) => acks.push(ack),
                Command::Retain {
                    cutoff_ms,
                    min_interval_ms,
                    done,
                } => retains.push((cutoff_ms, min_interval_ms, done)),
            }
        }
        // One transaction for the batch; if it fails, each item alone, so that one bad row
        // costs only itself.
        // A batch of flushes and retention requests alone has nothing to commit.
        let batch = if items.is_empty() {
            Ok((Vec::new(), Vec::new()))
        } else {
            commit(&mut conn, &items, &mut seq, &mut prev, key)
        };
        let outcomes: Vec<Result<Committed, rusqlite::Error>> = match batch {
            Ok((done, _)) if done.is_empty() => Vec::new(),
            Ok((done, of_accounts)) => {
                counters.commits.fetch_add(1, Ordering::Relaxed);
                accounts.committed(of_accounts);
                done.into_iter().map(Ok).collect()
            }
            Err(error) => {
                tracing::warn!(%error, items = items.len(), "audit batch failed; committing its items one by one");
                items
                    .iter()
                    .map(|item| {
                        commit(
                            &mut conn,
                            std::slice::from_ref(item),
                            &mut seq,
                            &mut prev,
                            key,
                        )
                        .map(|(mut done, of_accounts)| {
                            counters.commits.fetch_add(1, Ordering::Relaxed);
                            accounts.committed(of_accounts);
                            done.remove(0)
                        })
                    })
                    .collect()
            }
        };
        // Before the callers hear of their rows: a caller then reads a count that has them.
        accounts.report(counters, seq);
        for ((item, reply), outcome) in items.into_iter().zip(replies).zip(outcomes) {
            match (outcome, reply) {
                (Ok(Committed::Decision), _) => {
                    counters.recorded.fetch_add(1, Ordering::Relaxed);
                    if let Item::Decision(_, keep) = item {
                        keep.answer(Ok(()));
                    }
                }
                (Ok(Committed::Review(result)), reply) => {
                    if let Some(reply) = reply {
                        let _ = reply.send(*result);
                    }
                }
                (Err(error), reply) => {
                    let (Item::Decision(row, _) | Item::Review { row, .. }) = &item;
                    tracing::error!(%error, kind = %row.kind, ref_id = %row.ref_id, "audit row failed to commit; it is not recorded");
                    let failure = StoreError::Sqlite {
                        path: "store".into(),
                        error,
                    };
                    match (item, reply) {
                        (_, Some(reply)) => {
                            let _ = reply.send(Err(failure));
                        }
                        (Item::Decision(_, keep), None) => {
                            counters.failed.fetch_add(1, Ordering::Relaxed);
                            keep.answer(Err(failure));
                        }
                        (Item::Review { .. }, None) => {
                            counters.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        for ack in acks {
            let _ = ack.send(());
        }
        for (cutoff_ms, min_interval_ms, done) in retains {
            let window = (cutoff_ms, min_interval_ms);
            let head = (&mut seq, &mut prev, key);
            let result = retain(
                &mut conn,
                head,
                window,
                (&mut pending, &mut own, &mut accounts),
                &rx,
            );
            if let Ok(deleted) = result {
                counters.pruned.fetch_add(deleted, Ordering::Relaxed);
            }
            if let Err(error) = &result {
                tracing::error!(%error, "audit retention failed; the rows stay");
            }
            let _ = done.send(result.map_err(|error| StoreError::Sqlite {
                path: "store".into(),
                error,
            }));
        }
        own.between_transactions(&conn, rx.is_empty());
        accounts.step(&mut conn, seq);
        accounts.report(counters, seq);
        // Retention catching up: a chunk between batches at most every RETENTION_PAUSE (up to
        // 40k rows a second), so decisions never wait long behind it.
        if let Some(through) = pending.filter(|_| last_chunk.elapsed() >= RETENTION_PAUSE) {
            last_chunk = std::time::Instant::now();
            match delete_chunk(&mut conn, through) {
                Ok(0) => pending = None,
                Ok(n) => drop(counters.pruned.fetch_add(n as u64, Ordering::Relaxed)),
                Err(error) => {
                    tracing::error!(%error, "audit retention failed; the rows stay");
                    pending = None;
                }
            }
        }
    }
}

/// The next command, waiting for one; while none comes, the account index catches up with the
/// head when it is due (so it does not lag behind through a quiet spell). `timer` waits for a
/// command at most until then.
fn next_command(
    rx: &mut mpsc::Receiver<Command>,
    conn: &mut Connection,
    accounts: &mut AccountIndex,
    head: i64,
    (timer, counters): (Option<&tokio::runtime::Runtime>, &Counters),
) -> Option<Command> {
    loop {
        let (Some(pause), Some(timer)) = (accounts.idle_work(head), timer) else {
            return rx.blocking_recv();
        };
        if pause.is_zero() {
            match rx.try_recv() {
                Ok(command) => return Some(command),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    accounts.step(conn, head);
                    accounts.report(counters, head);
                }
            }
        } else if let Ok(command) =
            timer.block_on(async { tokio::time::timeout(pause, rx.recv()).await })
        {
            return command;
        }
    }
}

fn delete_chunk(conn: &mut Connection, through: i64) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let deleted = retention::delete_chunk(&tx, through, RETENTION_CHUNK)?;
    tx.commit()?;
    Ok(deleted)
}

/// Appends a checkpoint if rows are due for `cutoff_ms`, then deletes due rows for as long as
/// no other command waits.
fn retain(
    conn: &mut Connection,
    (seq, prev, key): (&mut i64, &mut String, Option<&ChainKey>),
    (cutoff_ms, min_interval_ms): (i64, i64),
    (pending, own, accounts): (&mut Option<i64>, &mut OwnCheckpoint, &mut AccountIndex),
    rx: &mpsc::Receiver<Command>,
) -> rusqlite::Result<u64> {
    accounts.catch_up(conn, *seq)?;
    let row = retention::checkpoint_row(
        conn,
        key,
        cutoff_ms,
        min_interval_ms,
        super::now_ms(),
        uuid::Uuid::now_v7().to_string(),
    )?;
    if let Some(row) = row {
        commit(conn, &[Item::Decision(row, Keep::Optional)], seq, prev, key)?;
    }
    // Recomputed each time, so a deletion an error stopped goes on.
    *pending = retention::pending(conn, key)?;
    let mut deleted = 0;
    while let Some(through) = *pending {
        if !rx.is_empty() {
            break;
        }
        match delete_chunk(conn, through)? {
            0 => *pending = None,
            n => deleted += n as u64,
        }
        // A long catch-up is a writer that never pauses too: the WAL must restart meanwhile.
        own.between_transactions(conn, true);
    }
    Ok(deleted)
}
