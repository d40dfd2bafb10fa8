//! The writer's account index: which rows belong to which account (`audit_account`), added in
//! sorted batches rather than with every commit.
//!
//! An index on `audit_log(account_id, seq)` costs a commit a page of its own for nearly every
//! row (account ids are spread over the index, and a commit writes each page it dirtied whole to
//! the WAL): more WAL than the row itself. Here the writer keeps the committed rows' accounts in
//! memory and adds them sorted, a slice at a time between its batches, so rows of the same
//! account and of neighbouring accounts share the pages they dirty. Every row through
//! `audit_account_through` that has an account is in `audit_account`; readers find the rows
//! after it in the log's tail (`account_decisions`). What is in memory is only a cache of that
//! tail: after a restart, or a failed slice, it is read again from the log.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};

use super::account_index_through;
use crate::store::writer::Counters;

/// A batch starts once this many rows are past the mark, or [`EVERY`] after the last one.
const ROWS: i64 = 8_192;
const EVERY: Duration = Duration::from_secs(1);
/// Entries a transaction adds: a slice is a few milliseconds of the writer's time, so callers
/// waiting for their commit wait at most that long behind it.
const SLICE: usize = 2_048;

pub(super) struct AccountIndex {
    /// Every row through this seq that has an account is in `audit_account`.
    through: i64,
    /// Rows committed after `through` (and after the batch being added), not added yet.
    pending: Vec<(String, i64)>,
    /// The batch being added, sorted, and the head it covers.
    batch: Option<Batch>,
    /// When the last batch ended.
    since: Instant,
    /// `pending` is not to be trusted (a slice failed): read the tail again.
    stale: bool,
}

struct Batch {
    entries: Vec<(String, i64)>,
    done: usize,
    head: i64,
}

impl AccountIndex {
    /// The mark and the rows after it, as the store has them.
    pub(super) fn load(conn: &Connection) -> rusqlite::Result<Self> {
        let mut index = Self {
            through: 0,
            pending: Vec::new(),
            batch: None,
            since: Instant::now(),
            stale: true,
        };
        index.reload(conn)?;
        Ok(index)
    }

    fn reload(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        self.through = account_index_through(conn)?;
        self.pending = conn
            .prepare("SELECT account_id, seq FROM audit_log WHERE seq > ?1 AND account_id <> '' ORDER BY seq")?
            .query_map([self.through], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        self.batch = None;
        self.stale = false;
        Ok(())
    }

    /// Rows a transaction has committed: (account, seq), accounts not empty.
    pub(super) fn committed(&mut self, rows: Vec<(String, i64)>) {
        if self.pending.is_empty() {
            self.pending = rows;
        } else {
            self.pending.extend(rows);
        }
    }

    /// Sets the gauge of rows past the mark (`head`: the last committed seq).
    pub(super) fn report(&self, counters: &Counters, head: i64) {
        let behind = (head - self.through).max(0) as u64;
        counters
            .account_index_behind
            .store(behind, Ordering::Relaxed);
    }

    /// Whether there is work for a quiet writer, and how long until it is due: `None` when the
    /// index is up to date with `head`.
    pub(super) fn idle_work(&self, head: i64) -> Option<Duration> {
        if self.batch.is_some() {
            Some(Duration::ZERO)
        } else if head > self.through {
            Some(EVERY.saturating_sub(self.since.elapsed()))
        } else {
            None
        }
    }

    /// Adds one slice when a batch is under way or due (`head`: the last committed seq).
    pub(super) fn step(&mut self, conn: &mut Connection, head: i64) {
        if let Err(error) = self.try_step(conn, head, false) {
            self.failed(&error);
        }
    }

    /// Takes in every row through `head` now. Retention calls it before it deletes rows, so
    /// that the entries of the rows it deletes are there to be deleted with them (an entry
    /// added after its row went would stay for good).
    pub(super) fn catch_up(&mut self, conn: &mut Connection, head: i64) -> rusqlite::Result<()> {
        while self.through < head {
            if let Err(error) = self.try_step(conn, head, true) {
                self.failed(&error);
                return Err(error);
            }
        }
        Ok(())
    }

    fn failed(&mut self, error: &rusqlite::Error) {
        tracing::warn!(%error, "audit store: adding rows to the account index failed; the next pass reads them from the log again");
        self.batch = None;
        self.pending.clear();
        self.stale = true;
        self.since = Instant::now();
    }

    fn try_step(&mut self, conn: &mut Connection, head: i64, now: bool) -> rusqlite::Result<()> {
        if self.batch.is_none() {
            let behind = head - self.through;
            if behind <= 0 || (!now && behind < ROWS && self.since.elapsed() < EVERY) {
                return Ok(());
            }
            if self.stale {
                self.reload(conn)?;
            }
            let mut entries = std::mem::take(&mut self.pending);
            entries.sort_unstable();
            self.batch = Some(Batch {
                entries,
                done: 0,
                head,
            });
        }
        let Some(batch) = self.batch.as_mut() else {
            return Ok(());
        };
        let end = (batch.done + SLICE).min(batch.entries.len());
        let tx = conn.transaction()?;
        {
            // Retention takes the index up to date before it deletes (`catch_up`), so every
            // row here is still in the log. Already there after a failed batch: ignored.
            let mut add = tx.prepare_cached(
                "INSERT OR IGNORE INTO audit_account (account_id, seq) VALUES (?1, ?2)",
            )?;
            for (account, seq) in &batch.entries[batch.done..end] {
                add.execute(params![account, seq])?;
            }
        }
        let last = end == batch.entries.len();
        if last {
            tx.prepare_cached(
                "INSERT INTO audit_account_through (id, seq) VALUES (1, ?1) \
                 ON CONFLICT (id) DO UPDATE SET seq = excluded.seq",
            )?
            .execute([batch.head])?;
        }
        tx.commit()?;
        batch.done = end;
        if last {
            self.through = batch.head;
            self.batch = None;
            self.since = Instant::now();
        }
        Ok(())
    }
}
