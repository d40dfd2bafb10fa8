//! The embedded store: SQLite (WAL) in the configured data directory, schema migrations from
//! `migrations/`, the tamper-evident audit chain, the review queue and overrides.
//!
//! One writer thread owns the write connection ([`writer`]); the request path only hands it
//! rows through a bounded channel. Reads open their own connections (WAL lets them run beside
//! the writer) and run on blocking threads.

pub mod chain;
pub mod consistency;
pub mod retention;
pub mod writer;

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

pub use chain::{AuditRow, ChainBreak, ChainKey};

pub use consistency::TableMismatch;

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

/// Why `verify` does not pass.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error(transparent)]
    Chain(#[from] ChainBreak),
    #[error(transparent)]
    Table(#[from] TableMismatch),
}

/// What `verify` established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Rows whose chain holds.
    pub rows: u64,
    /// The last row retention removed (the chain starts after it), if any.
    pub pruned_through: Option<i64>,
    /// The first keyed row (checked with the chain key), if any.
    pub keyed_from: Option<i64>,
    /// The shortest window a checkpoint still in the chain kept (its time minus its cutoff),
    /// to compare with the retention the operator promised.
    pub shortest_retention_ms: Option<i64>,
    /// `Some(seq)`: reviewer changes from before rows recorded them (the first at `seq`), so
    /// the overrides and queue tables were not checked.
    pub tables_unchecked_from: Option<i64>,
}

fn broken<T>(b: impl Into<Broken>) -> rusqlite::Result<Result<T, Broken>> {
    Ok(Err(b.into()))
}

/// Walks the whole chain (streaming: memory holds the overrides table, not the log), then
/// checks the `overrides` and `review_queue` tables against it, all in one read snapshot, so a
/// server writing meanwhile cannot make them disagree. `Ok` when all hold, else the first
/// break, naming the row.
pub fn verify(conn: &Connection) -> rusqlite::Result<Result<Verified, Broken>> {
    verify_keyed(conn, None)
}

/// As `verify`, checking keyed rows with `key`; with a key, the chain's rows must be keyed.
pub fn verify_keyed(
    conn: &Connection,
    key: Option<&ChainKey>,
) -> rusqlite::Result<Result<Verified, Broken>> {
    let tx = conn.unchecked_transaction()?;
    let checkpoint = match retention::latest(&tx)? {
        None => None,
        Some((seq, Ok(checkpoint))) => Some((seq, checkpoint)),
        Some((seq, Err(error))) => {
            return broken(TableMismatch {
                table: "audit_log",
                key: format!("row seq {seq}"),
                problem: format!("retention checkpoint cannot be read ({error})"),
            });
        }
    };
    let first: Option<(i64, String)> = tx
        .query_row(
            "SELECT seq, prev_hash FROM audit_log ORDER BY seq LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let mut walker = match (first, &checkpoint) {
        (None | Some((1, _)), _) => chain::Walker::default(),
        // Rows through the checkpoint may be gone, or going (deleted a chunk at a time).
        (Some((seq, prev)), Some((_, c))) if seq > 1 && seq - 1 <= c.through_seq => {
            let last_hash = if seq - 1 == c.through_seq {
                c.through_hash.clone()
            } else {
                prev
            };
            chain::Walker::resume(seq - 1, last_hash)
        }
        (Some((seq, _)), _) => return broken(ChainBreak::Unanchored { seq }),
    }
    .with_key(key.cloned());
    let mut expected = consistency::Expected::from_overrides(
        checkpoint
            .as_ref()
            .map(|(_, c)| c.overrides.clone())
            .unwrap_or_default(),
    );
    let mut resolutions_matched = 0u64;
    let mut shortest_retention_ms: Option<i64> = None;
    let mut stmt = tx.prepare(&format!("SELECT {ROW_COLUMNS} FROM audit_log ORDER BY seq"))?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (seq, row, prev_hash, row_hash) = read_row(r)?;
        if let Err(b) = walker.push(seq, &row, &prev_hash, &row_hash) {
            return broken(b);
        }
        if let Some((at, c)) = &checkpoint
            && seq == c.through_seq
            && row_hash != c.through_hash
        {
            return broken(ChainBreak::Checkpoint {
                seq,
                checkpoint: *at,
            });
        }
        if row.kind == retention::KIND {
            match retention::window_kept(seq, &row) {
                Ok(kept) => {
                    shortest_retention_ms =
                        Some(shortest_retention_ms.map_or(kept, |s| s.min(kept)));
                }
                Err(problem) => {
                    return broken(TableMismatch {
                        table: "audit_log",
                        key: format!("row seq {seq}"),
                        problem: format!("retention checkpoint {problem}"),
                    });
                }
            }
        }
        if let Some(resolution) = expected.observe(seq, &row) {
            let item = queue_item(&tx, &resolution.decision_id)?;
            if item.is_none() && !decision_exists(&tx, &resolution.decision_id)? {
                continue; // the decision and its item went with retention
            }
            if let Err(m) = consistency::check_resolution(&resolution, item.as_ref()) {
                return broken(m);
            }
            resolutions_matched += 1;
        }
    }
    let rows = match walker.finish() {
        Ok(rows) => rows,
        Err(b) => return broken(b),
    };
    let verified = Verified {
        rows,
        keyed_from: walker.keyed_from(),
        pruned_through: checkpoint.as_ref().map(|(_, c)| c.through_seq),
        shortest_retention_ms,
        // A checkpoint made from a chain with unrecorded changes carries that on.
        tables_unchecked_from: expected.legacy().or(checkpoint
            .as_ref()
            .filter(|(_, c)| c.legacy)
            .map(|(seq, _)| *seq)),
    };
    if verified.tables_unchecked_from.is_some() {
        return Ok(Ok(verified));
    }
    let table = overrides(&tx)?;
    if let Err(m) = expected
        .check_readable()
        .and_then(|()| expected.check_overrides(&table))
    {
        return broken(m);
    }
    if let Err(b) = check_queue(&tx, resolutions_matched)? {
        return broken(b);
    }
    Ok(Ok(verified))
}

fn queue_item(conn: &Connection, decision_id: &str) -> rusqlite::Result<Option<QueueState>> {
    conn.query_row(
        "SELECT status, outcome, note, resolved_by, resolved_at_ms FROM review_queue WHERE decision_id = ?1",
        [decision_id],
        |r| queue_state(r, 0),
    )
    .optional()
    .map(Option::flatten)
}

fn decision_exists(conn: &Connection, decision_id: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM audit_log WHERE kind = 'decision' AND ref_id = ?1)",
        [decision_id],
        |r| r.get(0),
    )
}

/// Every queue item against its decision row; resolved items counted against the chain's
/// resolutions (each already matched to its item); REVIEW decisions without an item.
fn check_queue(conn: &Connection, resolutions: u64) -> rusqlite::Result<Result<(), Broken>> {
    let mut stmt = conn.prepare(
        "SELECT q.decision_id, q.status, q.outcome, q.note, q.resolved_by, q.resolved_at_ms, a.kind, a.ref_id, a.verdict \
         FROM review_queue q LEFT JOIN audit_log a ON a.seq = q.seq ORDER BY q.seq",
    )?;
    let mut items = stmt.query([])?;
    let mut resolved = 0u64;
    while let Some(r) = items.next()? {
        let decision_id: String = r.get(0)?;
        let Some(state) = queue_state(r, 1)? else {
            return broken(TableMismatch {
                table: "review_queue",
                key: decision_id,
                problem: "has no status".into(),
            });
        };
        let row: (Option<String>, Option<String>, Option<String>) =
            (r.get(6)?, r.get(7)?, r.get(8)?);
        let decision = match &row {
            (Some(kind), Some(ref_id), Some(verdict)) => {
                Some((kind.as_str(), ref_id.as_str(), verdict.as_str()))
            }
            _ => None,
        };
        if let Err(m) = consistency::check_queue_item(&decision_id, decision, &state) {
            return broken(m);
        }
        resolved += u64::from(state.status == "resolved");
    }
    if resolved != resolutions {
        // Rare and already broken: name the item, at the cost of holding the resolutions' ids.
        let recorded = resolved_ids(conn)?;
        let mut stmt = conn.prepare(
            "SELECT decision_id FROM review_queue WHERE status = 'resolved' ORDER BY seq",
        )?;
        let ids = stmt.query_map([], |r| r.get::<_, String>(0))?;
        for id in ids {
            let id = id?;
            if !recorded.contains(&id) {
                return broken(TableMismatch {
                    table: "review_queue",
                    key: id,
                    problem: "resolved in the table, with no resolution in the audit log".into(),
                });
            }
        }
        return broken(TableMismatch {
            table: "review_queue",
            key: format!("{resolved} resolved items"),
            problem: format!("the audit log resolves {resolutions}"),
        });
    }
    let orphan: Option<String> = conn
        .query_row(
            "SELECT a.ref_id FROM audit_log a LEFT JOIN review_queue q ON q.decision_id = a.ref_id \
             WHERE a.kind = 'decision' AND a.verdict = 'REVIEW' AND q.decision_id IS NULL ORDER BY a.seq LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match orphan {
        Some(id) => broken(TableMismatch {
            table: "review_queue",
            key: id,
            problem: "a REVIEW decision in the audit log but missing from the queue (deleted)"
                .into(),
        }),
        None => Ok(Ok(())),
    }
}

/// The decisions the chain's reviewer rows resolve.
fn resolved_ids(conn: &Connection) -> rusqlite::Result<std::collections::HashSet<String>> {
    let mut stmt = conn.prepare(
        "SELECT json_extract(body, '$.applied.queue_item.decision_id') FROM audit_log \
         WHERE kind = 'review' AND json_extract(body, '$.applied.queue_item.decision_id') IS NOT NULL",
    )?;
    let ids = stmt.query_map([], |r| r.get::<_, String>(0))?;
    ids.collect()
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
