//! The store: the tamper-evident audit chain, the review queue and overrides.
//!
//! **The port.** The rest of the service sees the store through two handles, whichever adapter
//! runs: a [`writer::Recorder`] (a bounded channel to one writer, which commits decision rows
//! in batches and reviewer changes with their audit row in one transaction) and [`Reads`]
//! (decision by id, the queue, an account's decisions, paging through decisions, overrides).
//! [`open`] picks the adapter from the config's [`Backend`], in this one place.
//!
//! **The adapters.** SQLite (this module, `writer`, `verify`, `retention`): WAL in the
//! configured data directory, schema migrations from `migrations/`, one writer thread that owns
//! the write connection; reads open their own connections and run on blocking threads.
//! PostgreSQL ([`postgres`]): several replicas on one database, migrations from
//! `migrations/postgres/`, one writer per replica whose batches are chained in order under an
//! advisory lock, a local spool for decisions that must be kept while the database is away,
//! and LISTEN/NOTIFY for overrides. Both share the row hashing ([`chain`]) and the checks of
//! the tables against the chain ([`consistency`]).
//!
//! `Reads` is an enum rather than a trait object: the set of adapters is closed and chosen in
//! one place, the SQLite side is blocking (rusqlite) while PostgreSQL is async, and an enum
//! lets each method be a plain `async fn` without boxing every future.

pub mod chain;
pub mod consistency;
pub mod postgres;
pub mod retention;
pub mod spool;
mod verify;
pub mod writer;

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

pub use chain::{AuditRow, ChainBreak, ChainKey};

pub use consistency::TableMismatch;
pub use verify::{Broken, Verified, verify, verify_keyed};

/// Versioned schema migrations, applied in order, each once.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/0001_init.sql")),
    (
        2,
        include_str!("../../migrations/0002_retention_indexes.sql"),
    ),
];
const DB_FILE: &str = "regionguard.sqlite3";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {error}")]
    Sqlite {
        path: String,
        error: rusqlite::Error,
    },
    #[error("creating data directory {path}: {error}")]
    Dir { path: String, error: std::io::Error },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the store's writer has stopped")]
    WriterGone,
    /// PostgreSQL: a query failed (not the connection).
    #[error("postgres: {0}")]
    Postgres(String),
    /// A read task did not finish (panicked or was cancelled).
    #[error("{0}")]
    Task(String),
    /// The database cannot be reached now; the call may be retried once it is back.
    #[error("{0}")]
    Unavailable(String),
}

/// Which store the config names: the one place the adapter is chosen.
#[derive(Clone, Debug)]
pub enum Backend {
    /// The embedded SQLite store in this directory.
    Sqlite { dir: PathBuf },
    /// PostgreSQL at `url`; `spool_dir` (the config's `data_dir`) holds only the local spool.
    Postgres { url: String, spool_dir: PathBuf },
}

/// An open store: its writer, its read side, and the overrides it holds.
pub struct Opened {
    pub recorder: writer::Recorder,
    pub reads: Reads,
    pub overrides: Vec<OverrideRecord>,
}

/// Opens the store `backend` names (creating and migrating it) and starts its writer; rows are
/// keyed with `key` when there is one.
pub fn open(
    backend: &Backend,
    capacity: usize,
    overflow: writer::Overflow,
    key: Option<ChainKey>,
) -> Result<Opened, StoreError> {
    match backend {
        Backend::Sqlite { dir } => {
            let recorder = writer::Recorder::start_keyed(dir, capacity, overflow, key)?;
            let overrides = open_for_reading(dir).and_then(|c| {
                overrides(&c).map_err(|error| StoreError::Sqlite {
                    path: dir.display().to_string(),
                    error,
                })
            })?;
            Ok(Opened {
                recorder,
                reads: Reads::Sqlite { dir: dir.clone() },
                overrides,
            })
        }
        Backend::Postgres { url, spool_dir } => {
            postgres::open(url, spool_dir, capacity, overflow, key)
        }
    }
}

/// The store's read side, whichever adapter runs.
#[derive(Clone)]
pub enum Reads {
    Sqlite { dir: PathBuf },
    Postgres(postgres::Reader),
}

impl Reads {
    /// Runs a SQLite read on a blocking thread with its own connection.
    async fn sqlite<T: Send + 'static>(
        dir: &Path,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let conn = open_for_reading(&dir)?;
            query(&conn).map_err(|error| StoreError::Sqlite {
                path: dir.display().to_string(),
                error,
            })
        })
        .await
        .map_err(|e| StoreError::Task(format!("store read task: {e}")))?
    }

    /// A decision by its id, with its queue state.
    pub async fn decision(&self, decision_id: &str) -> Result<Option<StoredDecision>, StoreError> {
        let id = decision_id.to_owned();
        match self {
            Reads::Sqlite { dir } => Self::sqlite(dir, move |c| decision(c, &id)).await,
            Reads::Postgres(pg) => pg.decision(&id).await,
        }
    }

    /// Queue items matching `filter`, in seq order.
    pub async fn queue(&self, filter: &QueueFilter) -> Result<Vec<StoredDecision>, StoreError> {
        let f = filter.clone();
        match self {
            Reads::Sqlite { dir } => Self::sqlite(dir, move |c| queue(c, &f)).await,
            Reads::Postgres(pg) => pg.queue(&f).await,
        }
    }

    /// An account's decisions, newest first (at most `limit`).
    pub async fn account_decisions(
        &self,
        account_id: &str,
        limit: u32,
    ) -> Result<Vec<StoredDecision>, StoreError> {
        let id = account_id.to_owned();
        match self {
            Reads::Sqlite { dir } => {
                Self::sqlite(dir, move |c| account_decisions(c, &id, limit)).await
            }
            Reads::Postgres(pg) => pg.account_decisions(&id, limit).await,
        }
    }

    /// Decisions recorded at or after `since_ms`, oldest first, after `after_seq` (paging).
    pub async fn decisions_since(
        &self,
        since_ms: i64,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<StoredDecision>, StoreError> {
        match self {
            Reads::Sqlite { dir } => {
                Self::sqlite(dir, move |c| decisions_since(c, since_ms, after_seq, limit)).await
            }
            Reads::Postgres(pg) => pg.decisions_since(since_ms, after_seq, limit).await,
        }
    }

    /// Every override, removed and expired ones included.
    pub async fn overrides(&self) -> Result<Vec<OverrideRecord>, StoreError> {
        match self {
            Reads::Sqlite { dir } => Self::sqlite(dir, overrides).await,
            Reads::Postgres(pg) => pg.overrides().await,
        }
    }

    /// Keeps `engine`'s overrides in step with changes other replicas make. SQLite has one
    /// writer, this process, whose Review service reloads them itself: nothing to watch.
    pub fn watch_overrides(&self, engine: std::sync::Arc<crate::engine::Engine>) {
        if let Reads::Postgres(pg) = self {
            pg.watch_overrides(engine);
        }
    }
}

/// An override as stored.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OverrideRecord {
    pub id: String,
    /// `account`, `domain` or `network`.
    pub scope: String,
    pub value: String,
    /// `ALLOW` or `DENY`.
    pub action: String,
    pub reviewer: String,
    pub reason: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub removed_at_ms: Option<i64>,
    pub removed_by: String,
}

impl OverrideRecord {
    pub fn active_at(&self, now_ms: i64) -> bool {
        self.removed_at_ms.is_none() && self.expires_at_ms.is_none_or(|t| t > now_ms)
    }
}

/// A stored decision row with its queue state, if it is in the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDecision {
    pub seq: i64,
    pub row: AuditRow,
    pub queue: Option<QueueState>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    pub status: String,
    pub outcome: String,
    pub note: String,
    pub resolved_by: String,
    pub resolved_at_ms: Option<i64>,
}

/// Filters for the review queue.
#[derive(Clone, Debug, Default)]
pub struct QueueFilter {
    /// `open`, `resolved`, or empty for both.
    pub status: String,
    pub country: String,
    pub reason: String,
    pub account_id: String,
    pub since_ms: i64,
    /// Rows after this seq (pagination).
    pub after_seq: i64,
    pub limit: u32,
}

pub fn db_path(dir: &Path) -> PathBuf {
    dir.join(DB_FILE)
}

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |error| StoreError::Sqlite {
        path: path.display().to_string(),
        error,
    }
}

/// Opens (creating if needed) the store in `dir` and applies pending migrations.
pub fn open_for_writing(dir: &Path) -> Result<Connection, StoreError> {
    std::fs::create_dir_all(dir).map_err(|error| StoreError::Dir {
        path: dir.display().to_string(),
        error,
    })?;
    let path = db_path(dir);
    let err = sqlite(&path);
    let mut conn = Connection::open(&path).map_err(&err)?;
    // Decision rows are about 2 KB: on 4 KB pages a page holds one or two with much left over;
    // 16 KB pages waste a fraction of that. Takes effect only when the file is created.
    conn.pragma_update(None, "page_size", 16_384)
        .map_err(&err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(&err)?;
    // NORMAL in WAL mode: a committed transaction survives a process crash (kill -9); only an
    // OS crash or power loss can take the last commits.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(&err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(&err)?;
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at_ms INTEGER NOT NULL)").map_err(&err)?;
    for (version, sql) in MIGRATIONS {
        let applied: bool = conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM schema_migrations WHERE version = ?1)",
                [version],
                |r| r.get(0),
            )
            .map_err(&err)?;
        if !applied {
            let tx = conn.transaction().map_err(&err)?;
            tx.execute_batch(sql).map_err(&err)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (?1, ?2)",
                params![version, now_ms()],
            )
            .map_err(&err)?;
            tx.commit().map_err(&err)?;
        }
    }
    Ok(conn)
}

/// A read-only connection to the store in `dir`.
pub fn open_for_reading(dir: &Path) -> Result<Connection, StoreError> {
    let path = db_path(dir);
    let conn = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(sqlite(&path))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sqlite(&path))?;
    Ok(conn)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub(crate) const ROW_COLUMNS: &str = "seq, kind, ref_id, recorded_at_ms, actor, account_id, verdict, country, reasons, body, prev_hash, row_hash";

pub(crate) fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, AuditRow, String, String)> {
    Ok((
        r.get(0)?,
        AuditRow {
            kind: r.get(1)?,
            ref_id: r.get(2)?,
            recorded_at_ms: r.get(3)?,
            actor: r.get(4)?,
            account_id: r.get(5)?,
            verdict: r.get(6)?,
            country: r.get(7)?,
            reasons: r.get(8)?,
            body: r.get(9)?,
        },
        r.get(10)?,
        r.get(11)?,
    ))
}

/// The hash of row `seq`, if the row exists (to check an externally recorded chain head).
pub fn row_hash(conn: &Connection, seq: i64) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT row_hash FROM audit_log WHERE seq = ?1",
        [seq],
        |r| r.get(0),
    )
    .optional()
}

/// The last row's seq and hash: the chain head to record outside the store.
pub fn head(conn: &Connection) -> rusqlite::Result<Option<(i64, String)>> {
    conn.query_row(
        "SELECT seq, row_hash FROM audit_log ORDER BY seq DESC LIMIT 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
}

fn queue_state(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Option<QueueState>> {
    let status: Option<String> = r.get(at)?;
    Ok(match status {
        None => None,
        Some(status) => Some(QueueState {
            status,
            outcome: r.get(at + 1)?,
            note: r.get(at + 2)?,
            resolved_by: r.get(at + 3)?,
            resolved_at_ms: r.get(at + 4)?,
        }),
    })
}

const DECISION_SELECT: &str = "SELECT a.seq, a.kind, a.ref_id, a.recorded_at_ms, a.actor, a.account_id, a.verdict, a.country, a.reasons, a.body, a.prev_hash, a.row_hash, \
     q.status, q.outcome, q.note, q.resolved_by, q.resolved_at_ms FROM audit_log a LEFT JOIN review_queue q ON q.decision_id = a.ref_id";

fn stored(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredDecision> {
    let (seq, row, _, _) = read_row(r)?;
    Ok(StoredDecision {
        seq,
        row,
        queue: queue_state(r, 12)?,
    })
}

pub fn decision(conn: &Connection, decision_id: &str) -> rusqlite::Result<Option<StoredDecision>> {
    conn.query_row(
        &format!("{DECISION_SELECT} WHERE a.kind = 'decision' AND a.ref_id = ?1"),
        [decision_id],
        stored,
    )
    .optional()
}

pub fn queue(conn: &Connection, f: &QueueFilter) -> rusqlite::Result<Vec<StoredDecision>> {
    let sql = format!(
        "{DECISION_SELECT} WHERE a.kind = 'decision' AND q.decision_id IS NOT NULL AND a.seq > ?1 AND a.recorded_at_ms >= ?2 \
         AND (?3 = '' OR q.status = ?3) AND (?4 = '' OR a.country = ?4) AND (?5 = '' OR ',' || a.reasons || ',' LIKE '%,' || ?5 || ',%') \
         AND (?6 = '' OR a.account_id = ?6) ORDER BY a.seq LIMIT ?7"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(
        params![
            f.after_seq,
            f.since_ms,
            f.status,
            f.country,
            f.reason,
            f.account_id,
            f.limit.clamp(1, 1001)
        ],
        stored,
    )?;
    rows.collect()
}

/// An account's decisions, newest first (at most `limit`).
pub fn account_decisions(
    conn: &Connection,
    account_id: &str,
    limit: u32,
) -> rusqlite::Result<Vec<StoredDecision>> {
    let mut stmt = conn.prepare(&format!("{DECISION_SELECT} WHERE a.kind = 'decision' AND a.account_id = ?1 ORDER BY a.seq DESC LIMIT ?2"))?;
    let rows = stmt.query_map(params![account_id, limit.clamp(1, 10_000)], stored)?;
    rows.collect()
}

/// Decisions recorded at or after `since_ms`, oldest first, after `after_seq` (for paging).
pub fn decisions_since(
    conn: &Connection,
    since_ms: i64,
    after_seq: i64,
    limit: u32,
) -> rusqlite::Result<Vec<StoredDecision>> {
    let mut stmt = conn.prepare(&format!("{DECISION_SELECT} WHERE a.kind = 'decision' AND a.recorded_at_ms >= ?1 AND a.seq > ?2 ORDER BY a.seq LIMIT ?3"))?;
    let rows = stmt.query_map(params![since_ms, after_seq, limit], stored)?;
    rows.collect()
}

fn read_override(r: &rusqlite::Row<'_>) -> rusqlite::Result<OverrideRecord> {
    Ok(OverrideRecord {
        id: r.get(0)?,
        scope: r.get(1)?,
        value: r.get(2)?,
        action: r.get(3)?,
        reviewer: r.get(4)?,
        reason: r.get(5)?,
        created_at_ms: r.get(6)?,
        expires_at_ms: r.get(7)?,
        removed_at_ms: r.get(8)?,
        removed_by: r.get(9)?,
    })
}

const OVERRIDE_COLUMNS: &str = "id, scope, value, action, reviewer, reason, created_at_ms, expires_at_ms, removed_at_ms, removed_by";

pub fn overrides(conn: &Connection) -> rusqlite::Result<Vec<OverrideRecord>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {OVERRIDE_COLUMNS} FROM overrides ORDER BY created_at_ms"
    ))?;
    let rows = stmt.query_map([], read_override)?;
    rows.collect()
}

pub fn override_by_id(conn: &Connection, id: &str) -> rusqlite::Result<Option<OverrideRecord>> {
    conn.query_row(
        &format!("SELECT {OVERRIDE_COLUMNS} FROM overrides WHERE id = ?1"),
        [id],
        read_override,
    )
    .optional()
}

#[cfg(test)]
mod tests;
