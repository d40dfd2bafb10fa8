//! The SQLite adapter: the store in `data_dir` (WAL), schema migrations from `migrations/`,
//! queries; one writer thread owns the write connection ([`writer`]). Reads open their own
//! connections (WAL lets them run beside the writer) and run on blocking threads.

mod account_index;
pub mod retention;
pub mod verify;
pub mod writer;

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    AuditRow, OverrideRecord, QueueFilter, QueueState, StoreError, StoredDecision, now_ms,
};

/// Versioned schema migrations, applied in order, each once.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../../migrations/0001_init.sql")),
    (
        2,
        include_str!("../../../migrations/0002_retention_indexes.sql"),
    ),
    (
        3,
        include_str!("../../../migrations/0003_decision_counts.sql"),
    ),
    (4, include_str!("../../../migrations/0004_queue_fleet.sql")),
    (
        5,
        include_str!("../../../migrations/0005_account_index.sql"),
    ),
    (
        6,
        include_str!("../../../migrations/0006_decision_row_indexes.sql"),
    ),
];
const DB_FILE: &str = "regionguard.sqlite3";

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
    // 4 KB pages. Each commit writes every page it dirtied to the WAL, and the account index
    // then in every commit (now `audit_account`, filled in batches) dirtied a page of its own for
    // nearly every row: on 16 KB pages a must-record commit of a few dozen rows wrote about
    // 20 KB of WAL a row.
    // Measured in one run of the durability bench: must-record throughput +29 % and p99 47 →
    // 16 ms for about 15 % more bytes on disk per row (rows of ~2 KB leave more of a 4 KB page
    // empty). Takes effect only when the file is created: an existing store keeps its pages.
    conn.pragma_update(None, "page_size", 4_096).map_err(&err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(&err)?;
    // NORMAL in WAL mode: a committed transaction survives a process crash (kill -9); only an
    // OS crash or power loss can take the last commits.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(&err)?;
    // The WAL is cut back to this once a checkpoint has copied it all (it grows to what the
    // busiest stretch between checkpoints wrote, and would stay that big).
    conn.pragma_update(None, "journal_size_limit", 64i64 << 20)
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

const DECISION_SELECT: &str = concat!(
    crate::store::decision_columns!(),
    " FROM audit_log a LEFT JOIN review_queue q ON q.decision_id = a.ref_id"
);
/// The queue's rows, driven from `review_queue` in seq order (`CROSS JOIN` keeps SQLite's
/// planner from starting at audit_log, which sorted every decision for a page), each joined to
/// its decision by seq (`a.seq = q.seq` in the query): a page reads queue items, not the log.
const QUEUE_SELECT: &str = concat!(
    crate::store::decision_columns!(),
    " FROM review_queue q CROSS JOIN audit_log a"
);

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
        "{QUEUE_SELECT} WHERE a.seq = q.seq AND a.kind = 'decision' AND q.seq > ?1 AND a.recorded_at_ms >= ?2 \
         AND (?3 = '' OR q.status = ?3) AND (?4 = '' OR a.country = ?4) AND (?5 = '' OR ',' || a.reasons || ',' LIKE '%,' || ?5 || ',%') \
         AND (?6 = '' OR a.account_id = ?6) AND (?8 = '' OR q.fleet_id = ?8) ORDER BY q.seq LIMIT ?7"
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
            f.limit.clamp(1, 1001),
            f.fleet_id
        ],
        stored,
    )?;
    rows.collect()
}

/// An account's rows in `audit_account`, each joined to its decision.
const ACCOUNT_SELECT: &str = concat!(
    crate::store::decision_columns!(),
    " FROM audit_account x CROSS JOIN audit_log a ON a.seq = x.seq LEFT JOIN review_queue q ON q.decision_id = a.ref_id"
);

/// An account's decisions, newest first (at most `limit`). The rows after
/// `audit_account_through` are not in `audit_account` yet (the writer adds them in batches):
/// they are looked for in the log's short tail first, then the older ones through
/// `audit_account`, both in one read transaction.
pub fn account_decisions(
    conn: &Connection,
    account_id: &str,
    limit: u32,
) -> rusqlite::Result<Vec<StoredDecision>> {
    let limit = limit.clamp(1, 10_000);
    let tx = conn.unchecked_transaction()?;
    let through = account_index_through(&tx)?;
    let mut rows = tx
        .prepare(&format!("{DECISION_SELECT} WHERE a.seq > ?1 AND a.account_id = ?2 AND +a.kind = 'decision' ORDER BY a.seq DESC LIMIT ?3"))?
        .query_map(params![through, account_id, limit], stored)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let left = limit as usize - rows.len().min(limit as usize);
    if left > 0 {
        let older = tx
            .prepare(&format!("{ACCOUNT_SELECT} WHERE x.account_id = ?1 AND x.seq <= ?2 AND +a.kind = 'decision' ORDER BY x.seq DESC LIMIT ?3"))?
            .query_map(params![account_id, through, left as i64], stored)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.extend(older);
    }
    Ok(rows)
}

/// Every row through this seq that has an account is in `audit_account`.
pub(crate) fn account_index_through(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT seq FROM audit_account_through WHERE id = 1",
        [],
        |r| r.get(0),
    )
    .optional()
    .map(Option::unwrap_or_default)
}

/// `+a.kind`: the log is walked by seq; through audit_log_ref SQLite would take every
/// decision and sort them, for every page.
const DECISIONS_SINCE: &str =
    "WHERE +a.kind = 'decision' AND a.recorded_at_ms >= ?1 AND a.seq > ?2 ORDER BY a.seq LIMIT ?3";

/// Decisions recorded at or after `since_ms`, oldest first, after `after_seq` (for paging).
pub fn decisions_since(
    conn: &Connection,
    since_ms: i64,
    after_seq: i64,
    limit: u32,
) -> rusqlite::Result<Vec<StoredDecision>> {
    let mut stmt = conn.prepare(&format!("{DECISION_SELECT} {DECISIONS_SINCE}"))?;
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

/// The dashboard's counts from hour `since` on (see `store::dashboard_sql`).
pub fn dashboard(conn: &Connection, since: i64) -> rusqlite::Result<super::Dashboard> {
    use super::dashboard_sql as q;
    let collect = |sql: &str| -> rusqlite::Result<Vec<(String, String, i64)>> {
        let mut stmt = conn.prepare_cached(sql)?;
        let rows = stmt.query_map([since], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect()
    };
    let mut hourly = conn.prepare_cached(q::HOURLY)?;
    let hourly = hourly
        .query_map([since], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut reasons = conn.prepare_cached(q::TOP_REASONS)?;
    let top_reasons = reasons
        .query_map([since], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(super::Dashboard {
        hourly,
        by_country: collect(q::BY_COUNTRY)?,
        top_reasons,
        queue_open: conn.query_row(q::QUEUE_OPEN, [], |r| r.get(0))?,
        oldest_open_ms: conn
            .query_row(q::OLDEST_OPEN, [], |r| r.get(0))
            .optional()?,
    })
}
