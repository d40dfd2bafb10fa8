//! The embedded store: SQLite (WAL) in the configured data directory, schema migrations from
//! `migrations/`, the tamper-evident audit chain, the review queue and overrides.
//!
//! One writer thread owns the write connection ([`writer`]); the request path only hands it
//! rows through a bounded channel. Reads open their own connections (WAL lets them run beside
//! the writer) and run on blocking threads.

pub mod chain;
pub mod consistency;
pub mod writer;

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

pub use chain::{AuditRow, ChainBreak};

pub use consistency::TableMismatch;

/// Versioned schema migrations, applied in order, each once.
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../../migrations/0001_init.sql"))];
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

const ROW_COLUMNS: &str = "seq, kind, ref_id, recorded_at_ms, actor, account_id, verdict, country, reasons, body, prev_hash, row_hash";

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, AuditRow, String, String)> {
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

/// Why `verify` does not pass.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error(transparent)]
    Chain(#[from] ChainBreak),
    #[error(transparent)]
    Table(#[from] TableMismatch),
}

/// Walks the whole chain, streaming (constant memory whatever its length), then checks the
/// `overrides` and `review_queue` tables against it. `Ok(rows)` when all hold, else the first
/// break, naming the row.
pub fn verify(conn: &Connection) -> Result<Result<u64, Broken>, rusqlite::Error> {
    let mut walker = chain::Walker::default();
    let mut expected = consistency::Expected::default();
    let mut stmt = conn.prepare(&format!("SELECT {ROW_COLUMNS} FROM audit_log ORDER BY seq"))?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (seq, row, prev_hash, row_hash) = read_row(r)?;
        if let Err(broken) = walker.push(seq, &row, &prev_hash, &row_hash) {
            return Ok(Err(broken.into()));
        }
        expected.observe(seq, &row);
    }
    Ok(check_tables(conn, &expected)?.map(|()| walker.count()))
}

/// The mutable tables against what the verified chain says they hold.
fn check_tables(
    conn: &Connection,
    expected: &consistency::Expected,
) -> Result<Result<(), Broken>, rusqlite::Error> {
    if let Err(mismatch) = expected.check_overrides(&overrides(conn)?) {
        return Ok(Err(mismatch.into()));
    }
    let mut stmt = conn.prepare(
        "SELECT q.decision_id, q.status, q.outcome, q.note, q.resolved_by, q.resolved_at_ms, a.kind, a.ref_id, a.verdict \
         FROM review_queue q LEFT JOIN audit_log a ON a.seq = q.seq ORDER BY q.seq",
    )?;
    let mut items = stmt.query([])?;
    while let Some(r) = items.next()? {
        let decision_id: String = r.get(0)?;
        let state = queue_state(r, 1)?.expect("status is NOT NULL");
        let row: (Option<String>, Option<String>, Option<String>) =
            (r.get(6)?, r.get(7)?, r.get(8)?);
        let decision = match &row {
            (Some(kind), Some(ref_id), Some(verdict)) => {
                Some((kind.as_str(), ref_id.as_str(), verdict.as_str()))
            }
            _ => None,
        };
        if let Err(mismatch) = expected.check_queue_item(&decision_id, decision, &state) {
            return Ok(Err(mismatch.into()));
        }
    }
    // A REVIEW decision, or a resolution, whose queue item is gone.
    let orphan: Option<String> = conn
        .query_row(
            "SELECT a.ref_id FROM audit_log a LEFT JOIN review_queue q ON q.decision_id = a.ref_id \
             WHERE a.kind = 'decision' AND a.verdict = 'REVIEW' AND q.decision_id IS NULL ORDER BY a.seq LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let mut in_queue =
        conn.prepare("SELECT EXISTS(SELECT 1 FROM review_queue WHERE decision_id = ?1)")?;
    let mut unqueued_resolution = None;
    for id in expected.resolved_decisions() {
        if !in_queue.query_row([id], |r| r.get::<_, bool>(0))? {
            unqueued_resolution = Some(id.to_owned());
            break;
        }
    }
    if let Some(id) = orphan.or(unqueued_resolution) {
        return Ok(Err(TableMismatch {
            table: "review_queue",
            key: id,
            problem: "in the audit log but missing from the queue (deleted)".into(),
        }
        .into()));
    }
    Ok(Ok(()))
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
