//! The write side of the store port: the request path hands audit rows to the adapter's one
//! writer (`sqlite::writer`, `postgres::writer`) through a bounded channel, and the writer
//! commits them in batches, so no request waits on disk or on the network.
//!
//! Decisions that must be recorded (by default signup and login decisions and every non-ALLOW
//! decision: `[store] must_record`) are answered only once their row is committed: the caller
//! waits for its batch (group commit: the writer takes everything queued while the previous
//! batch committed, so one WAL commit serves every caller waiting on it), and an error when the
//! row cannot be committed. Other decisions are handed over and not waited for; when the
//! channel is full they follow the configured overflow policy (wait briefly, or be sampled out)
//! and every one left out is counted. Reviewer actions always wait, and their change (override,
//! resolution) commits in the same transaction as their audit row.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::chain::ChainKey;
use super::{AuditRow, OverrideRecord, QueueState, StoreError};

/// What an ALLOW decision that need not be kept does when the writer is behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// Wait up to this long for room, then leave it out (counted).
    Block(Duration),
    /// Leave it out at once (counted).
    Sample,
}

/// A reviewer's change, committed with its audit row.
#[derive(Clone, Debug)]
pub enum Change {
    None,
    SetOverride(OverrideRecord),
    RemoveOverride {
        id: String,
        by: String,
        at_ms: i64,
    },
    Resolve {
        decision_id: String,
        outcome: String,
        note: String,
        by: String,
        at_ms: i64,
    },
}

/// What a change did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    Nothing,
    Override(OverrideRecord),
    Queue(QueueState),
}

/// Builds a decision's audit row on the writer thread, so serialising it costs the request path
/// nothing.
pub type RowBuilder = Box<dyn FnOnce() -> AuditRow + Send>;

/// Whether a decision's caller waits for its row, and where the answer goes.
pub(crate) enum Keep {
    /// May be left out when the writer is behind; nobody waits.
    Optional,
    /// Must be recorded: the writer answers once the row is committed (or, with the PostgreSQL
    /// store away, durably spooled), or with why it is not.
    Wait(oneshot::Sender<Result<(), StoreError>>),
}

impl Keep {
    pub(crate) fn must_keep(&self) -> bool {
        matches!(self, Keep::Wait(_))
    }

    /// Tells a waiting caller how its row went; an optional row's failure is only counted.
    pub(crate) fn answer(self, result: Result<(), StoreError>) {
        if let Keep::Wait(reply) = self {
            let _ = reply.send(result);
        }
    }
}

pub(crate) enum Command {
    /// A decision's row, and whether its caller waits for the commit.
    Decision(RowBuilder, Keep),
    // Boxed: reviewer actions are rare, decisions are the bulk of the channel.
    Review(Box<ReviewCommand>),
    Flush(oneshot::Sender<()>),
    /// Let rows recorded before `cutoff_ms` go (`retention`); answers with the rows deleted.
    Retain {
        cutoff_ms: i64,
        min_interval_ms: i64,
        done: oneshot::Sender<Result<u64, StoreError>>,
    },
}

pub(crate) struct ReviewCommand {
    pub(crate) row: AuditRow,
    pub(crate) change: Change,
    pub(crate) reply: oneshot::Sender<Result<Applied, StoreError>>,
}

/// Counters for operators and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecorderStats {
    pub recorded: u64,
    pub dropped: u64,
    pub failed: u64,
    /// Rows removed by retention.
    pub pruned: u64,
    /// Decision rows waiting in the local spool for the database to come back (PostgreSQL).
    pub spool_depth: u64,
    /// Must-record decisions whose row could not be committed: their callers got an error
    /// (Classify UNAVAILABLE, Check the `on_error` answer) instead of the decision.
    pub unrecorded: u64,
    /// Transactions committed: `recorded / commits` is how many rows a commit serves.
    pub commits: u64,
    /// Rows past the SQLite account index's mark, which account lookups read from the log's
    /// tail (it stays under about 10,000 while the writer keeps up).
    pub account_index_behind: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) recorded: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) pruned: AtomicU64,
    pub(crate) spool_depth: AtomicU64,
    pub(crate) unrecorded: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) account_index_behind: AtomicU64,
}

/// The request path's handle on the writer.
pub struct Recorder {
    tx: mpsc::Sender<Command>,
    overflow: Overflow,
    counters: Arc<Counters>,
}

impl Recorder {
    /// Opens the store in `dir` (migrating it) and starts the writer thread; rows are hashed
    /// plain (no chain key).
    pub fn start(dir: &Path, capacity: usize, overflow: Overflow) -> Result<Self, StoreError> {
        Self::start_keyed(dir, capacity, overflow, None)
    }

    /// As `start`, keying every row it writes with `key` when there is one.
    pub fn start_keyed(
        dir: &Path,
        capacity: usize,
        overflow: Overflow,
        key: Option<ChainKey>,
    ) -> Result<Self, StoreError> {
        super::sqlite::writer::start(dir, capacity, overflow, key)
    }

    /// A recorder over a writer another adapter runs.
    pub(crate) fn from_parts(
        tx: mpsc::Sender<Command>,
        overflow: Overflow,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            tx,
            overflow,
            counters,
        }
    }

    /// Hands a decision's audit row (built later, on the writer thread) to the writer.
    ///
    /// `must_record`: waits until the row is committed, at most `wait` (the writer behind, the
    /// disk stalled), and says why not when it is not. Otherwise it is not waited for: it
    /// follows the overflow policy when the writer is behind, and always answers `Ok`.
    pub async fn decision(
        &self,
        row: RowBuilder,
        must_record: Option<Duration>,
    ) -> Result<(), StoreError> {
        let Some(wait) = must_record else {
            let command = Command::Decision(row, Keep::Optional);
            let sent = match self.overflow {
                Overflow::Sample => self.tx.try_send(command).is_ok(),
                Overflow::Block(wait) => matches!(
                    tokio::time::timeout(wait, self.tx.send(command)).await,
                    Ok(Ok(()))
                ),
            };
            if !sent {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(());
        };
        let (reply, answer) = oneshot::channel();
        let committed = tokio::time::timeout(wait, async {
            self.tx
                .send(Command::Decision(row, Keep::Wait(reply)))
                .await
                .map_err(|_| StoreError::WriterGone)?;
            answer.await.map_err(|_| StoreError::WriterGone)?
        })
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "the audit store did not commit the decision within {} ms",
                wait.as_millis()
            )))
        });
        if committed.is_err() {
            self.counters.unrecorded.fetch_add(1, Ordering::Relaxed);
        }
        committed
    }

    /// Commits a reviewer's action and its change; answers once both are on disk.
    pub async fn review(&self, row: AuditRow, change: Change) -> Result<Applied, StoreError> {
        self.ask(|reply| Command::Review(Box::new(ReviewCommand { row, change, reply })))
            .await
    }

    /// Sends the writer a command that answers, and waits for the answer.
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(command(reply))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Applies retention for `cutoff_ms`: appends a checkpoint when rows are due and the latest
    /// checkpoint is at least `min_interval` old, then deletes due rows while the writer has
    /// nothing else to do (the rest goes a chunk after each batch). Answers with the rows
    /// deleted by this call.
    pub async fn retain(&self, cutoff_ms: i64, min_interval: Duration) -> Result<u64, StoreError> {
        let min_interval_ms = i64::try_from(min_interval.as_millis()).unwrap_or(i64::MAX);
        self.ask(|done| Command::Retain {
            cutoff_ms,
            min_interval_ms,
            done,
        })
        .await
    }

    /// Waits until everything handed over before this call is committed (on PostgreSQL while
    /// the database is away or being caught up with: committed or in the spool).
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Command::Flush(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    pub fn stats(&self) -> RecorderStats {
        RecorderStats {
            recorded: self.counters.recorded.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            pruned: self.counters.pruned.load(Ordering::Relaxed),
            spool_depth: self.counters.spool_depth.load(Ordering::Relaxed),
            unrecorded: self.counters.unrecorded.load(Ordering::Relaxed),
            commits: self.counters.commits.load(Ordering::Relaxed),
            account_index_behind: self.counters.account_index_behind.load(Ordering::Relaxed),
        }
    }
}

/// The reviewer's row with the table row its change left (`"applied"` in the body), so the
/// chain itself says what `overrides` and `review_queue` must hold (`consistency`).
pub(crate) fn with_applied(row: &AuditRow, change: &Change, applied: &Applied) -> AuditRow {
    let applied = match (change, applied) {
        (_, Applied::Nothing) => return row.clone(),
        (_, Applied::Override(record)) => serde_json::json!({ "override": record }),
        (change, Applied::Queue(state)) => {
            // Only Resolve changes the queue.
            let decision_id = match change {
                Change::Resolve { decision_id, .. } => decision_id.as_str(),
                _ => "",
            };
            serde_json::json!({ "queue_item": { "decision_id": decision_id, "state": state } })
        }
    };
    let mut body = match serde_json::from_str::<serde_json::Value>(&row.body) {
        Ok(serde_json::Value::Object(body)) => body,
        _ if row.body.is_empty() => serde_json::Map::new(),
        // Not an object: kept whole beside what was applied.
        _ => serde_json::Map::from_iter([("text".to_owned(), row.body.clone().into())]),
    };
    body.insert("applied".to_owned(), applied);
    AuditRow {
        body: serde_json::Value::Object(body).to_string(),
        ..row.clone()
    }
}
