//! Retention: audit rows older than the configured age leave the store without breaking what
//! `verify` can prove.
//!
//! The writer first appends a chained `checkpoint` row naming the last row to go (its seq and
//! hash), the cutoff, and the `overrides` table as it stands (their setting rows may be among
//! those that go). Then it deletes the rows through that seq a chunk at a time, with their
//! queue items, between its normal batches. `verify` starts the chain at the checkpoint's hash:
//! rows missing without a checkpoint that covers them are still deletions, and a checkpoint
//! cannot be added or edited without breaking the chain after it.
//!
//! Rows go only up to the first open queue item, so nothing a reviewer still has to look at
//! leaves; the file does not shrink (SQLite reuses the freed pages), so the disk it takes stops
//! growing once the retained window is full.

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

use super::chain::AuditRow;
use super::{OverrideRecord, overrides};

/// What a checkpoint row's body holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The last row that may be deleted, and its hash (the next row's `prev_hash`).
    pub through_seq: i64,
    pub through_hash: String,
    /// Rows recorded before this time were due.
    pub cutoff_ms: i64,
    /// The `overrides` table when the checkpoint was written.
    pub overrides: Vec<OverrideRecord>,
}

pub const KIND: &str = "checkpoint";

/// The latest checkpoint and its seq: `Err` when its body cannot be read.
pub fn latest(conn: &Connection) -> rusqlite::Result<Option<(i64, Result<Checkpoint, String>)>> {
    conn.query_row(
        "SELECT seq, body FROM audit_log WHERE kind = ?1 ORDER BY seq DESC LIMIT 1",
        [KIND],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
    )
    .optional()
    .map(|found| {
        found.map(|(seq, body)| {
            let checkpoint = serde_json::from_str(&body).map_err(|e| e.to_string());
            (seq, checkpoint)
        })
    })
}

/// The last seq rows may be deleted through for `cutoff_ms`: every row before the first one
/// recorded at or after the cutoff, and before the first open queue item.
fn due_through(conn: &Connection, cutoff_ms: i64) -> rusqlite::Result<i64> {
    let first_kept: Option<i64> = conn.query_row(
        "SELECT MIN(seq) FROM audit_log WHERE recorded_at_ms >= ?1",
        [cutoff_ms],
        |r| r.get(0),
    )?;
    let first_open: Option<i64> = conn.query_row(
        "SELECT MIN(seq) FROM review_queue WHERE status = 'open'",
        [],
        |r| r.get(0),
    )?;
    let last: i64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM audit_log", [], |r| {
        r.get(0)
    })?;
    // The newest row always stays: the chain's head must remain to continue from.
    let limit = [first_kept, first_open, Some(last)]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(0);
    Ok(limit - 1)
}

/// The checkpoint row to append for `cutoff_ms`, when it lets more rows go than the latest
/// checkpoint did.
pub fn checkpoint_row(
    conn: &Connection,
    cutoff_ms: i64,
    now_ms: i64,
    ref_id: String,
) -> rusqlite::Result<Option<AuditRow>> {
    let through = due_through(conn, cutoff_ms)?;
    let covered = match latest(conn)? {
        Some((_, Ok(checkpoint))) => checkpoint.through_seq,
        _ => 0,
    };
    if through <= covered {
        return Ok(None);
    }
    let through_hash: String = conn.query_row(
        "SELECT row_hash FROM audit_log WHERE seq = ?1",
        [through],
        |r| r.get(0),
    )?;
    let checkpoint = Checkpoint {
        through_seq: through,
        through_hash,
        cutoff_ms,
        overrides: overrides(conn)?,
    };
    Ok(Some(AuditRow {
        kind: KIND.into(),
        ref_id,
        recorded_at_ms: now_ms,
        actor: "retention".into(),
        reasons: format!("through seq {through}"),
        body: serde_json::to_string(&checkpoint).unwrap_or_default(),
        ..Default::default()
    }))
}

/// Rows still to delete under the latest checkpoint: `Some(through_seq)` while any remain.
pub fn pending(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    let Some((_, Ok(checkpoint))) = latest(conn)? else {
        return Ok(None);
    };
    let first: Option<i64> = conn.query_row("SELECT MIN(seq) FROM audit_log", [], |r| r.get(0))?;
    Ok(first
        .filter(|&first| first <= checkpoint.through_seq)
        .map(|_| checkpoint.through_seq))
}

/// Deletes up to `limit` of the oldest rows through `through`, with their queue items.
/// Returns how many rows went.
pub fn delete_chunk(tx: &Transaction<'_>, through: i64, limit: usize) -> rusqlite::Result<usize> {
    let Some(upper): Option<i64> = tx.query_row(
        "SELECT MAX(seq) FROM (SELECT seq FROM audit_log WHERE seq <= ?1 ORDER BY seq LIMIT ?2)",
        params![through, limit as i64],
        |r| r.get(0),
    )?
    else {
        return Ok(0);
    };
    tx.execute("DELETE FROM review_queue WHERE seq <= ?1", [upper])?;
    tx.execute("DELETE FROM audit_log WHERE seq <= ?1", [upper])
}
