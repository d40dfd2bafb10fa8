//! Retention: audit rows older than the configured age leave the store without breaking what
//! `verify` can prove.
//!
//! The writer first appends a chained `checkpoint` row naming the last row to go (its seq and
//! hash), the cutoff, and the overrides as the chain says they stand (the previous checkpoint's
//! copy plus the reviewer rows since; never the table itself, so an edit to the table is not
//! laundered into the copy). At most one checkpoint a `min_interval` (a day in the server). Then it deletes the rows through that seq a chunk at a time, with their
//! queue items and `audit_account` entries, between its normal batches. `verify` starts the chain at the checkpoint's hash:
//! rows missing without a checkpoint that covers them are still deletions, and a checkpoint
//! cannot be added or edited without breaking the chain after it.
//!
//! Rows go only up to the first open queue item, so nothing a reviewer still has to look at
//! leaves; the file does not shrink (SQLite reuses the freed pages), so the disk it takes stops
//! growing once the retained window is full.

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

use super::read_row;
use crate::store::OverrideRecord;
use crate::store::chain::AuditRow;
use crate::store::chain::{ChainBreak, ChainKey, KEYED, check_row};
use crate::store::consistency::{Expected, OnRecord, Resolved};

/// What a checkpoint row's body holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The last row that may be deleted, and its hash (the next row's `prev_hash`).
    pub through_seq: i64,
    pub through_hash: String,
    /// Rows recorded before this time were due.
    pub cutoff_ms: i64,
    /// The overrides as the chain said they stood when the checkpoint was written.
    pub overrides: Vec<OverrideRecord>,
    /// Some reviewer change in the chain predates rows recording their change: the copy is
    /// incomplete and the tables cannot be held to it.
    #[serde(default)]
    pub legacy: bool,
}

pub const KIND: &str = "checkpoint";

/// `kind <> 'decision'` is audit_log_kind's condition: it lets SQLite use that index.
pub(super) const LATEST: &str = "SELECT seq, body FROM audit_log WHERE kind = ?1 AND kind <> 'decision' ORDER BY seq DESC LIMIT 1";
/// Reviewer rows after a seq, in order (the columns go before it).
pub(super) const REVIEWS_AFTER: &str =
    "FROM audit_log WHERE kind = 'review' AND kind <> 'decision' AND seq > ?1 ORDER BY seq";

/// The latest checkpoint and its seq: `Err` when its body cannot be read.
pub fn latest(conn: &Connection) -> rusqlite::Result<Option<(i64, Result<Checkpoint, String>)>> {
    conn.query_row(LATEST, [KIND], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
    })
    .optional()
    .map(|found| {
        found.map(|(seq, body)| {
            let checkpoint = serde_json::from_str(&body).map_err(|e| e.to_string());
            (seq, checkpoint)
        })
    })
}

/// What [`vouched`] found: the checkpoint (its seq, its body or why it cannot be read), none,
/// or `Err` with the latest's seq when there are checkpoints and none holds.
pub type Vouched = Result<Option<(i64, Result<Checkpoint, String>)>, i64>;

/// The latest retention checkpoint that holds where it stands ([`check_row`]), what the
/// writer's retention and the overrides on record go on from. A checkpoint row that does not
/// hold (written around the writer, or edited) is passed over and named in the log: nothing is
/// deleted on its word, and its copy of the overrides counts for nothing. `Err(seq)` when
/// there are checkpoints, the latest at `seq`, and none of the last few holds.
pub fn vouched(conn: &Connection, key: Option<&ChainKey>) -> rusqlite::Result<Vouched> {
    let rows: Vec<(i64, AuditRow, String, String)> = conn
        .prepare_cached(&format!(
            "SELECT {} FROM audit_log WHERE kind = ?1 AND kind <> 'decision' ORDER BY seq DESC LIMIT 16",
            super::ROW_COLUMNS
        ))?
        .query_map([KIND], read_row)?
        .collect::<rusqlite::Result<_>>()?;
    for (seq, row, prev, hash) in &rows {
        match holds(conn, *seq, row, (prev, hash), key)? {
            Ok(()) => {
                let checkpoint = serde_json::from_str(&row.body).map_err(|e| e.to_string());
                return Ok(Ok(Some((*seq, checkpoint))));
            }
            Err(broken) => tracing::error!(
                %broken,
                "audit log: a retention checkpoint does not hold; passed over"
            ),
        }
    }
    Ok(match rows.first() {
        None => Ok(None),
        Some((latest, ..)) => Err(*latest),
    })
}

/// The last seq rows may be deleted through for `cutoff_ms`: every row before the first one
/// recorded at or after the cutoff, before the first open queue item, and before the newest row
/// (the head must stay to continue the chain from). The scan starts after what is already
/// covered and stops at the first row to keep.
fn due_through(conn: &Connection, cutoff_ms: i64, covered: i64) -> rusqlite::Result<i64> {
    let first_open: Option<i64> = conn.query_row(
        "SELECT MIN(seq) FROM review_queue WHERE status = 'open'",
        [],
        |r| r.get(0),
    )?;
    let last: i64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM audit_log", [], |r| {
        r.get(0)
    })?;
    let bound = first_open.map_or(last, |open| open.min(last));
    let first_kept: Option<i64> = conn
        .query_row(
            "SELECT seq FROM audit_log WHERE seq > ?1 AND seq < ?2 AND recorded_at_ms >= ?3 ORDER BY seq LIMIT 1",
            params![covered, bound, cutoff_ms],
            |r| r.get(0),
        )
        .optional()?;
    let through = first_kept.unwrap_or(bound) - 1;
    if first_kept.is_none() && first_open.is_some_and(|open| open < last) {
        tracing::warn!(
            open_item_seq = bound,
            "audit retention is held back by an open review item older than the window"
        );
    }
    Ok(through)
}

/// Whether the log holds every row from `from` to its head. Retention deletes only rows before
/// its latest checkpoint, so from that checkpoint (or from row 1, before the first) a missing
/// row was deleted around the writer.
fn whole_from(conn: &Connection, from: i64) -> rusqlite::Result<bool> {
    let (count, head): (i64, Option<i64>) = conn.query_row(
        "SELECT COUNT(*), MAX(seq) FROM audit_log WHERE seq >= ?1",
        [from],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(head.is_none_or(|head| count == head - from + 1))
}

/// The overrides as the chain says they stand: the latest checkpoint's copy, then every
/// reviewer row after that checkpoint that holds where it stands (a row written around the
/// writer is not laundered into the copy). `legacy` when a change was not recorded in its row.
fn overrides_from_chain(
    conn: &Connection,
    latest: Option<&(i64, Checkpoint)>,
    key: Option<&ChainKey>,
) -> rusqlite::Result<(Vec<OverrideRecord>, bool)> {
    let (after, mut expected, legacy) = match latest {
        Some((seq, c)) => (
            *seq,
            Expected::from_overrides(c.overrides.clone()),
            c.legacy,
        ),
        None => (0, Expected::default(), false),
    };
    reviews_after(conn, (after, Reviews::All), |seq, row, hashes| {
        match holds(conn, seq, row, hashes, key)? {
            Ok(()) => drop(expected.observe(seq, row)),
            Err(broken) => tracing::error!(
                %broken,
                "audit retention: a reviewer row does not hold; the checkpoint's copy of the overrides leaves it out"
            ),
        }
        Ok(())
    })?;
    // A copy the chain cannot vouch for says so, and stays so in every later checkpoint.
    let legacy = legacy || !expected.overrides_known();
    Ok((expected.into_overrides(), legacy))
}

/// Reviewer rows after a seq that may change override `?2`: its own changes, and changing
/// calls that do not record what they changed (which make the chain unable to say).
pub(super) const OVERRIDE_REVIEWS_AFTER: &str = "FROM audit_log WHERE kind = 'review' AND kind <> 'decision' AND seq > ?1 \
     AND (instr(body, ?2) > 0 OR (instr(body, '\"applied\"') = 0 \
     AND (instr(body, '\"SetOverride\"') > 0 OR instr(body, '\"RemoveOverride\"') > 0))) ORDER BY seq";

/// Reviewer rows after a seq that may change any override, or make the chain unable to say
/// (most reviewer rows are reads: the console's pages, lists).
pub(super) const OVERRIDES_REVIEWS_AFTER: &str = "FROM audit_log WHERE kind = 'review' AND kind <> 'decision' AND seq > ?1 \
     AND (instr(body, '\"override\"') > 0 OR (instr(body, '\"applied\"') = 0 \
     AND (instr(body, '\"SetOverride\"') > 0 OR instr(body, '\"RemoveOverride\"') > 0 OR instr(body, '\"Resolve\"') > 0))) \
     ORDER BY seq";

/// Which reviewer rows [`reviews_after`] hands over.
#[derive(Clone, Copy)]
enum Reviews<'a> {
    All,
    /// Those that may change an override.
    Overrides,
    /// Those that may change this override.
    Override(&'a str),
}

/// Hands the reviewer rows after `after` to `each`, in chain order, with their
/// `(prev_hash, row_hash)`.
fn reviews_after(
    conn: &Connection,
    (after, which): (i64, Reviews<'_>),
    mut each: impl FnMut(i64, &AuditRow, (&str, &str)) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    let columns = super::ROW_COLUMNS;
    let mut stmt;
    let mut rows = match which {
        Reviews::All => {
            stmt = conn.prepare_cached(&format!("SELECT {columns} {REVIEWS_AFTER}"))?;
            stmt.query(params![after])?
        }
        Reviews::Overrides => {
            stmt = conn.prepare_cached(&format!("SELECT {columns} {OVERRIDES_REVIEWS_AFTER}"))?;
            stmt.query(params![after])?
        }
        Reviews::Override(id) => {
            stmt = conn.prepare_cached(&format!("SELECT {columns} {OVERRIDE_REVIEWS_AFTER}"))?;
            stmt.query(params![after, id])?
        }
    };
    while let Some(r) = rows.next()? {
        let (seq, row, prev_hash, row_hash) = read_row(r)?;
        each(seq, &row, (&prev_hash, &row_hash))?;
    }
    Ok(())
}

/// The hash of row `seq`, if it is there.
fn hash_of(conn: &Connection, seq: i64) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT row_hash FROM audit_log WHERE seq = ?1")?
        .query_row([seq], |r| r.get(0))
        .optional()
}

/// Whether `row` (at `seq`) holds where it stands ([`check_row`]).
fn holds(
    conn: &Connection,
    seq: i64,
    row: &AuditRow,
    hashes: (&str, &str),
    key: Option<&ChainKey>,
) -> rusqlite::Result<Result<(), ChainBreak>> {
    // A keyed row vouches for itself: the row before it is not asked for.
    let predecessor = match hashes.1.starts_with(KEYED) {
        true => None,
        false => hash_of(conn, seq - 1)?,
    };
    Ok(check_row(seq, row, hashes, predecessor.as_deref(), key))
}

/// Brings `on_record` up to the chain's head as `conn` sees it (a snapshot, or the writer's
/// transaction): from the latest checkpoint when one was written since it last read (the rows
/// before it may be gone), then every reviewer row after, each taken once it holds.
pub(crate) fn catch_up(conn: &Connection, on_record: &mut OnRecord) -> rusqlite::Result<()> {
    catch_up_on(conn, on_record, None)
}

/// Override `id` as the chain records it ([`OnRecord::recorded`]), read inside the writer's
/// transaction: from the latest checkpoint's copy, then the rows that may change it.
pub(crate) fn recorded_override(
    conn: &Connection,
    id: &str,
    key: Option<&ChainKey>,
) -> rusqlite::Result<Option<Option<OverrideRecord>>> {
    let mut view = OnRecord::keyed(key.cloned());
    catch_up_on(conn, &mut view, Some(id))?;
    Ok(view.recorded(id))
}

fn catch_up_on(
    conn: &Connection,
    on_record: &mut OnRecord,
    only: Option<&str>,
) -> rusqlite::Result<()> {
    match vouched(conn, on_record.key())? {
        Ok(Some((seq, checkpoint))) if seq > on_record.after() => match checkpoint {
            Ok(c) if whole_from(conn, seq)? => {
                on_record.restart_at(seq, c.overrides, c.legacy);
            }
            // A row after it is missing (retention never deletes one): what the log says
            // since cannot be told. Unreadable: the same. Verify names either; the table stands.
            _ => {
                tracing::error!(
                    checkpoint_seq = seq,
                    "audit log: rows are missing after the latest retention checkpoint, or it cannot be read; the overrides are taken from the table (run `regionguard audit verify`)"
                );
                on_record.restart_at(seq, Vec::new(), true);
            }
        },
        // Checkpoints, and none holds: what they carried cannot be told; the table stands.
        Err(seq) if seq > on_record.after() => on_record.restart_at(seq, Vec::new(), true),
        // No checkpoint, yet the first rows are gone: the same.
        Ok(None) if on_record.after() == 0 => {
            let first: Option<i64> =
                conn.query_row("SELECT MIN(seq) FROM audit_log", [], |r| r.get(0))?;
            if let Some(first) = first.filter(|&first| first > 1) {
                tracing::error!(
                    first_seq = first,
                    "audit log: its first rows are missing and no retention checkpoint covers them; the overrides are taken from the table (run `regionguard audit verify`)"
                );
                on_record.restart_at(first - 1, Vec::new(), true);
            }
        }
        _ => {}
    }
    let which = only.map_or(Reviews::Overrides, Reviews::Override);
    reviews_after(conn, (on_record.after(), which), |seq, row, hashes| {
        match holds(conn, seq, row, hashes, on_record.key())? {
            Ok(()) => on_record.observe(seq, row),
            Err(broken) => tracing::error!(
                %broken,
                "audit log: a reviewer row does not hold; the override change it records is not taken"
            ),
        }
        Ok(())
    })?;
    // Past the rows not handed over too, when the newest reviewer row holds (one planted far
    // past the head does not, and must not hide the rows the writer adds before it).
    let newest = conn
        .prepare_cached(&format!(
            "SELECT {} FROM audit_log WHERE kind = 'review' AND kind <> 'decision' ORDER BY seq DESC LIMIT 1",
            super::ROW_COLUMNS
        ))?
        .query_row([], read_row)
        .optional()?;
    if let Some((seq, row, prev, hash)) = newest
        && seq > on_record.after()
        && holds(conn, seq, &row, (&prev, &hash), on_record.key())?.is_ok()
    {
        on_record.skip_to(seq);
    }
    Ok(())
}

/// The overrides to enforce ([`OnRecord`]): `on_record` brought up to the chain's head, then
/// held against the table, in one read snapshot.
pub fn overrides_on_record(
    conn: &Connection,
    on_record: &mut OnRecord,
) -> rusqlite::Result<Resolved> {
    let tx = conn.unchecked_transaction()?;
    catch_up(&tx, on_record)?;
    let table = super::overrides(&tx)?;
    Ok(on_record.resolve(table))
}

/// The checkpoint row to append for `cutoff_ms`: when the latest checkpoint is at least
/// `min_interval_ms` old and more rows are due than it covered.
pub fn checkpoint_row(
    conn: &Connection,
    key: Option<&ChainKey>,
    cutoff_ms: i64,
    min_interval_ms: i64,
    now_ms: i64,
    ref_id: String,
) -> rusqlite::Result<Option<AuditRow>> {
    let latest = match vouched(conn, key)? {
        Ok(Some((seq, Ok(checkpoint)))) => Some((seq, checkpoint)),
        // An unreadable checkpoint, or none that holds: verify names it; nothing is deleted
        // past it.
        Ok(Some((_, Err(_)))) | Err(_) => return Ok(None),
        Ok(None) => None,
    };
    if let Some((seq, _)) = &latest {
        let written: i64 = conn.query_row(
            "SELECT recorded_at_ms FROM audit_log WHERE seq = ?1",
            [seq],
            |r| r.get(0),
        )?;
        if now_ms.saturating_sub(written) < min_interval_ms {
            return Ok(None);
        }
    }
    // What this checkpoint vouches for must be whole: a row deleted around the writer since the
    // last checkpoint would be laundered into one that verify then starts from.
    let from = latest.as_ref().map_or(1, |(seq, _)| *seq);
    if !whole_from(conn, from)? {
        tracing::error!(
            from_seq = from,
            "audit retention: rows are missing from the log (deleted around the writer); no rows are removed until `regionguard audit verify` passes"
        );
        return Ok(None);
    }
    let covered = latest.as_ref().map_or(0, |(_, c)| c.through_seq);
    let through = due_through(conn, cutoff_ms, covered)?;
    if through <= covered {
        return Ok(None);
    }
    let through_hash: String = conn.query_row(
        "SELECT row_hash FROM audit_log WHERE seq = ?1",
        [through],
        |r| r.get(0),
    )?;
    let (overrides, legacy) = overrides_from_chain(conn, latest.as_ref(), key)?;
    let checkpoint = Checkpoint {
        through_seq: through,
        through_hash,
        cutoff_ms,
        overrides,
        legacy,
    };
    Ok(Some(AuditRow {
        kind: KIND.into(),
        ref_id,
        recorded_at_ms: now_ms,
        actor: ACTOR.into(),
        reasons: format!("through seq {through}"),
        body: serde_json::to_string(&checkpoint).unwrap_or_default(),
        ..Default::default()
    }))
}

/// The actor of checkpoint rows.
pub const ACTOR: &str = "retention";

/// The window a checkpoint row (at `seq`) kept: its time minus its cutoff; `Err` says why it
/// cannot be one the writer wrote.
pub fn window_kept(seq: i64, row: &AuditRow) -> Result<i64, String> {
    let checkpoint: Checkpoint =
        serde_json::from_str(&row.body).map_err(|e| format!("cannot be read ({e})"))?;
    match implausible(seq, row, &checkpoint) {
        Some(problem) => Err(problem),
        None => Ok(row.recorded_at_ms.saturating_sub(checkpoint.cutoff_ms)),
    }
}

/// Why a checkpoint row (at `seq`, recorded at `recorded_at_ms`) cannot be one the writer
/// wrote: it would cover itself, or rows from after its own cutoff's time.
fn implausible(seq: i64, row: &AuditRow, c: &Checkpoint) -> Option<String> {
    if row.actor != ACTOR {
        return Some(format!("actor is {:?}, not {ACTOR:?}", row.actor));
    }
    if c.through_seq >= seq || c.through_seq < 1 {
        return Some(format!("covers seq {} from seq {seq}", c.through_seq));
    }
    if c.cutoff_ms > row.recorded_at_ms {
        return Some(format!(
            "its cutoff {} is after its own time {}",
            c.cutoff_ms, row.recorded_at_ms
        ));
    }
    None
}

/// Rows still to delete under the latest checkpoint: `Some(through_seq)` while any remain.
pub fn pending(conn: &Connection, key: Option<&ChainKey>) -> rusqlite::Result<Option<i64>> {
    let Ok(Some((_, Ok(checkpoint)))) = vouched(conn, key)? else {
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
    // The dashboard's counts lose exactly the decisions that go (a chunk's rows, by seq).
    let rows: Vec<(i64, String, String, String)> = tx
        .prepare_cached(
            "SELECT recorded_at_ms, verdict, country, reasons FROM audit_log WHERE seq <= ?1 AND kind = 'decision'",
        )?
        .query_map([upper], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut gone = crate::store::DecisionCounts::default();
    for (at, verdict, country, reasons) in &rows {
        gone.count(*at, verdict, country, reasons, -1);
    }
    let mut update = tx.prepare_cached(
        "UPDATE decision_counts SET n = n + ?5 WHERE hour_ms = ?1 AND verdict = ?2 AND country = ?3 AND reason = ?4",
    )?;
    let mut prune = tx.prepare_cached(
        "DELETE FROM decision_counts WHERE hour_ms = ?1 AND verdict = ?2 AND country = ?3 AND reason = ?4 AND n <= 0",
    )?;
    for ((hour, verdict, country, reason), n) in gone.into_rows() {
        update.execute(params![hour, verdict, country, reason, n])?;
        prune.execute(params![hour, verdict, country, reason])?;
    }
    tx.execute("DELETE FROM review_queue WHERE seq <= ?1", [upper])?;
    tx.execute(
        "DELETE FROM audit_account WHERE (account_id, seq) IN \
         (SELECT account_id, seq FROM audit_log WHERE seq <= ?1 AND account_id <> '')",
        [upper],
    )?;
    tx.execute("DELETE FROM audit_log WHERE seq <= ?1", [upper])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_the_writer_could_not_have_written_is_named() {
        let row = |actor: &str, at: i64| AuditRow {
            kind: KIND.into(),
            actor: actor.into(),
            recorded_at_ms: at,
            ..Default::default()
        };
        let checkpoint = Checkpoint {
            through_seq: 10,
            through_hash: String::new(),
            cutoff_ms: 1_000,
            overrides: Vec::new(),
            legacy: false,
        };
        assert_eq!(implausible(20, &row(ACTOR, 5_000), &checkpoint), None);
        assert!(implausible(20, &row("mallory", 5_000), &checkpoint).is_some());
        assert!(implausible(10, &row(ACTOR, 5_000), &checkpoint).is_some());
        assert!(implausible(20, &row(ACTOR, 500), &checkpoint).is_some());
    }
}
