//! `verify`: the chain walked in one read snapshot (resuming at a retention checkpoint,
//! checking keyed rows with the chain key), then the `overrides` and `review_queue` tables
//! and the account index (`audit_account`) held to it.

use rusqlite::{Connection, OptionalExtension};

use super::{ROW_COLUMNS, overrides, queue_state, read_row, retention};
use crate::store::consistency::{self, TableMismatch};
use crate::store::{Broken, ChainBreak, ChainKey, QueueState, Verified, chain};

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
    if let Err(b) = check_account_index(&tx)? {
        return broken(b);
    }
    Ok(Ok(verified))
}

/// The account index against the log: every row with an account, through the index's mark,
/// has its entry, and every entry its row. Reviewers find an account's decisions through it,
/// so an entry deleted would hide a decision from them while the chain itself verifies.
fn check_account_index(conn: &Connection) -> rusqlite::Result<Result<(), Broken>> {
    let through = super::account_index_through(conn)?;
    let head: i64 = conn.query_row("SELECT coalesce(max(seq), 0) FROM audit_log", [], |r| {
        r.get(0)
    })?;
    if through > head {
        return broken(TableMismatch {
            table: "audit_account_through",
            key: format!("seq {through}"),
            problem: format!("marks rows as indexed past the log's last row (seq {head})"),
        });
    }
    let missing: Option<(i64, String)> = conn
        .query_row(
            "SELECT l.seq, l.account_id FROM audit_log l WHERE l.seq <= ?1 AND l.account_id <> '' \
             AND NOT EXISTS (SELECT 1 FROM audit_account a WHERE a.account_id = l.account_id AND a.seq = l.seq) \
             ORDER BY l.seq LIMIT 1",
            [through],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((seq, account)) = missing {
        return broken(TableMismatch {
            table: "audit_account",
            key: format!("{account:?} row seq {seq}"),
            problem: "missing (deleted): the account's row is not found by account".into(),
        });
    }
    let stray: Option<(i64, String)> = conn
        .query_row(
            "SELECT a.seq, a.account_id FROM audit_account a WHERE NOT EXISTS \
             (SELECT 1 FROM audit_log l WHERE l.seq = a.seq AND l.account_id = a.account_id) LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match stray {
        Some((seq, account)) => broken(TableMismatch {
            table: "audit_account",
            key: format!("{account:?} row seq {seq}"),
            problem: "names a row the log does not hold for that account".into(),
        }),
        None => Ok(Ok(())),
    }
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
         WHERE kind = 'review' AND kind <> 'decision' AND json_extract(body, '$.applied.queue_item.decision_id') IS NOT NULL",
    )?;
    let ids = stmt.query_map([], |r| r.get::<_, String>(0))?;
    ids.collect()
}
