//! The store: the tamper-evident audit chain, the review queue and overrides.
//!
//! **The port.** The rest of the service sees the store through two handles, whichever adapter
//! runs: a [`writer::Recorder`] (a bounded channel to one writer, which commits decision rows
//! in batches and reviewer changes with their audit row in one transaction) and [`Reads`]
//! (decision by id, the queue, an account's decisions, paging through decisions, overrides).
//! [`open`] picks the adapter from the config's [`Backend`], in this one place.
//!
//! **The adapters.** SQLite ([`sqlite`]: opening, queries, `writer`, `verify`, `retention`): WAL in the
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

/// The columns of a stored decision with its queue state (`a`: audit_log, `q`: review_queue),
/// in the order both adapters read them.
macro_rules! decision_columns {
    () => {
        "SELECT a.seq, a.kind, a.ref_id, a.recorded_at_ms, a.actor, a.account_id, a.verdict, a.country, a.reasons, a.body, a.prev_hash, a.row_hash, \
         q.status, q.outcome, q.note, q.resolved_by, q.resolved_at_ms"
    };
}
pub(crate) use decision_columns;

pub mod chain;
pub mod consistency;
pub mod postgres;
pub mod spool;
pub mod sqlite;
pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

pub use chain::{AuditRow, ChainBreak, ChainKey};

use crate::sharded::lock;
pub use consistency::TableMismatch;
use consistency::{OnRecord, Resolved};
// The SQLite adapter's direct API (the CLI's verify and replay, tests), at its old paths.
pub use sqlite::verify::{verify, verify_keyed};
pub use sqlite::{
    account_decisions, db_path, decision, decisions_since, head, open_for_reading,
    open_for_writing, override_by_id, overrides, queue, retention, row_hash,
};

/// Why a verify (either adapter) does not pass.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error(transparent)]
    Chain(#[from] ChainBreak),
    #[error(transparent)]
    Table(#[from] TableMismatch),
}

/// What a verify (either adapter) established.
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
    /// PostgreSQL at `url`; `spool_dir` (the config's `data_dir`) holds only the local spool
    /// and the copy of the overrides last read. `start_without_overrides`: whether a replica
    /// that has no such copy may start while the database is unreachable (with none).
    Postgres {
        url: String,
        spool_dir: PathBuf,
        start_without_overrides: bool,
    },
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
            let on_record = Arc::new(Mutex::new(OnRecord::keyed(key.clone())));
            let recorder = writer::Recorder::start_keyed(dir, capacity, overflow, key)?;
            let overrides = open_for_reading(dir).and_then(|c| {
                sqlite::retention::overrides_on_record(&c, &mut lock(&on_record))
                    .map(enforced)
                    .map_err(|error| StoreError::Sqlite {
                        path: dir.display().to_string(),
                        error,
                    })
            })?;
            Ok(Opened {
                recorder,
                reads: Reads::Sqlite {
                    dir: dir.clone(),
                    on_record,
                },
                overrides,
            })
        }
        Backend::Postgres {
            url,
            spool_dir,
            start_without_overrides,
        } => postgres::open(
            url,
            spool_dir,
            (capacity, overflow),
            key,
            *start_without_overrides,
        ),
    }
}

/// The store's read side, whichever adapter runs.
#[derive(Clone)]
pub enum Reads {
    Sqlite {
        dir: PathBuf,
        /// The overrides the chain records, as far as this side has read it.
        on_record: Arc<Mutex<OnRecord>>,
    },
    Postgres(postgres::Reader),
}

/// The overrides to enforce, reporting a table that differs from the chain: a row written,
/// changed or deleted around the Review API.
pub(crate) fn enforced(resolved: Resolved) -> Vec<OverrideRecord> {
    if let Some(mismatch) = &resolved.off_record {
        tracing::error!(
            %mismatch,
            "the overrides table differs from the audit log: enforcing the overrides the log records (run `regionguard audit verify`)"
        );
    }
    resolved.overrides
}

impl Reads {
    /// The read side of the SQLite store in `dir`, without the chain key (the command line's
    /// reads: keyed reviewer rows are not taken as overrides on record without it).
    pub fn sqlite_at(dir: PathBuf) -> Self {
        Reads::Sqlite {
            dir,
            on_record: Arc::default(),
        }
    }

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
            Reads::Sqlite { dir, .. } => Self::sqlite(dir, move |c| decision(c, &id)).await,
            Reads::Postgres(pg) => pg.decision(&id).await,
        }
    }

    /// Queue items matching `filter`, in seq order.
    pub async fn queue(&self, filter: &QueueFilter) -> Result<Vec<StoredDecision>, StoreError> {
        let f = filter.clone();
        match self {
            Reads::Sqlite { dir, .. } => Self::sqlite(dir, move |c| queue(c, &f)).await,
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
            Reads::Sqlite { dir, .. } => {
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
            Reads::Sqlite { dir, .. } => {
                Self::sqlite(dir, move |c| decisions_since(c, since_ms, after_seq, limit)).await
            }
            Reads::Postgres(pg) => pg.decisions_since(since_ms, after_seq, limit).await,
        }
    }

    /// Every override the audit log records ([`OnRecord`]), removed and expired ones included.
    pub async fn overrides(&self) -> Result<Vec<OverrideRecord>, StoreError> {
        match self {
            Reads::Sqlite { dir, on_record } => {
                let on_record = on_record.clone();
                Self::sqlite(dir, move |c| {
                    sqlite::retention::overrides_on_record(c, &mut lock(&on_record))
                })
                .await
                .map(enforced)
            }
            Reads::Postgres(pg) => pg.overrides().await,
        }
    }

    /// The dashboard's counts from `since_ms` (rounded down to its hour), the queue's depth and
    /// age.
    pub async fn dashboard(&self, since_ms: i64) -> Result<Dashboard, StoreError> {
        let since = since_ms / HOUR_MS * HOUR_MS;
        match self {
            Reads::Sqlite { dir, .. } => {
                Self::sqlite(dir, move |c| sqlite::dashboard(c, since)).await
            }
            Reads::Postgres(pg) => pg.dashboard(since).await,
        }
    }

    /// Walks the whole chain and holds the tables to it, as `audit verify` does, with the head
    /// it saw.
    pub async fn verify(&self, key: Option<ChainKey>) -> Result<VerifyReport, StoreError> {
        match self {
            Reads::Sqlite { dir, .. } => {
                Self::sqlite(dir, move |c| {
                    Ok(VerifyReport {
                        head: sqlite::head(c)?,
                        result: sqlite::verify::verify_keyed(c, key.as_ref())?,
                    })
                })
                .await
            }
            Reads::Postgres(pg) => {
                let report = pg.verify(key.as_ref()).await?;
                Ok(VerifyReport {
                    result: report.result,
                    head: report.head,
                })
            }
        }
    }

    /// Hands every override to `apply` whenever another replica changes them (the server
    /// loads them into the engine). SQLite has one writer, this process, whose Review service
    /// reloads them itself: nothing to watch.
    pub fn watch_overrides(
        &self,
        apply: std::sync::Arc<dyn Fn(Vec<OverrideRecord>) + Send + Sync>,
    ) {
        if let Reads::Postgres(pg) = self {
            pg.watch_overrides(apply);
        }
    }
}

/// A verify's outcome and the chain head it saw (`(seq, hash)`; none when the log is empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub result: Result<Verified, Broken>,
    pub head: Option<(i64, String)>,
}

impl VerifyReport {
    /// The head as `audit verify` prints it and `--expect-head` takes it: `SEQ:HASH`.
    pub fn head_text(&self) -> String {
        self.head
            .as_ref()
            .map_or("empty".to_owned(), |(seq, hash)| format!("{seq}:{hash}"))
    }

    /// What `audit verify` says of it, line by line (the first says ok or BROKEN); false when
    /// the chain or the tables do not hold, or a checkpoint kept fewer than `min_retain_days`.
    pub fn lines(&self, location: &str, min_retain_days: Option<u32>) -> (bool, Vec<String>) {
        const DAY_MS: f64 = 86_400_000.0;
        let verified = match &self.result {
            Ok(verified) => verified,
            Err(broken) => return (false, vec![format!("BROKEN: {broken}")]),
        };
        let mut notes = Vec::new();
        if let Some(through) = verified.pruned_through {
            let kept = verified.shortest_retention_ms.unwrap_or(0) as f64 / DAY_MS;
            notes.push(format!(
                "  rows through seq {through} removed by retention (shortest window kept: {kept:.1} days)"
            ));
        }
        if let (Some(days), Some(kept)) = (min_retain_days, verified.shortest_retention_ms)
            && (kept as f64) < f64::from(days) * DAY_MS
        {
            return (
                false,
                vec![format!(
                    "BROKEN: a retention checkpoint kept only {:.1} days, fewer than --min-retain-days {days}",
                    kept as f64 / DAY_MS
                )],
            );
        }
        if let Some(seq) = verified.keyed_from {
            notes.push(format!("  rows keyed with the chain key from seq {seq}"));
        }
        notes.push(match verified.tables_unchecked_from {
            Some(seq) => format!(
                "  overrides and review queue NOT checked: row seq {seq} predates recorded changes"
            ),
            None => "  overrides and review queue match it".into(),
        });
        let mut lines = vec![format!(
            "ok: {} audit rows verified in {location}; head {}",
            verified.rows,
            self.head_text()
        )];
        lines.extend(notes);
        (true, lines)
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
    /// The fleet the decision's account was in (`review_queue.fleet_id`).
    pub fleet_id: String,
    pub since_ms: i64,
    /// Rows after this seq (pagination).
    pub after_seq: i64,
    pub limit: u32,
}

/// The fleet a decision row's body says the account was in (`inputs.usage.fleet.id`), for
/// `review_queue.fleet_id`; empty when it names none.
pub(crate) fn queued_fleet_id(body: &str) -> String {
    #[derive(Default, serde::Deserialize)]
    #[serde(default)]
    struct Body {
        inputs: Inputs,
    }
    #[derive(Default, serde::Deserialize)]
    #[serde(default)]
    struct Inputs {
        usage: Option<Usage>,
    }
    #[derive(Default, serde::Deserialize)]
    #[serde(default)]
    struct Usage {
        fleet: Option<Fleet>,
    }
    #[derive(Default, serde::Deserialize)]
    #[serde(default)]
    struct Fleet {
        id: String,
    }
    serde_json::from_str::<Body>(body)
        .ok()
        .and_then(|b| b.inputs.usage?.fleet)
        .map(|f| f.id)
        .unwrap_or_default()
}

/// Parses "24h", "30d" or a Unix time in milliseconds into Unix milliseconds, `now_ms` being
/// now; the error says what is expected.
pub fn parse_since(text: &str, now_ms: i64) -> Result<i64, String> {
    let (number, unit) = text.split_at(
        text.trim_end_matches(|c: char| c.is_ascii_alphabetic())
            .len(),
    );
    let n: i64 = number
        .parse()
        .ok()
        .filter(|n: &i64| *n >= 0)
        .ok_or_else(|| {
            format!(
                "{:?}: expected e.g. 24h, 30d or Unix milliseconds",
                crate::excerpt(text)
            )
        })?;
    match unit {
        "" => Ok(n),
        "h" => Ok(now_ms.saturating_sub(n.saturating_mul(3_600_000))),
        "d" => Ok(now_ms.saturating_sub(n.saturating_mul(86_400_000))),
        other => Err(format!(
            "{:?}: unknown unit {:?} (h or d)",
            crate::excerpt(text),
            crate::excerpt(other)
        )),
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// An hour in the dashboard's counts: its first millisecond (UTC).
pub const HOUR_MS: i64 = 3_600_000;

/// Decisions counted by hour, verdict, country and reason code, as a writer's batch commits
/// them (`decision_counts`; reason `""` counts the decisions themselves). Each key is written
/// once per batch, however many rows share it. Keys borrow the batch's rows: nothing is copied.
#[derive(Debug, Default)]
pub(crate) struct DecisionCounts<'a>(
    std::collections::BTreeMap<(i64, &'a str, &'a str, &'a str), i64>,
);

impl<'a> DecisionCounts<'a> {
    /// Counts `row` if it is a decision.
    pub(crate) fn add(&mut self, row: &'a AuditRow) {
        if row.kind == "decision" {
            self.count(
                row.recorded_at_ms,
                &row.verdict,
                &row.country,
                &row.reasons,
                1,
            );
        }
    }

    /// Adds `by` (negative: retention deleting the row) to a decision's counts: the decision
    /// itself (reason `""`) and each of its comma-separated reason codes.
    pub(crate) fn count(
        &mut self,
        recorded_at_ms: i64,
        verdict: &'a str,
        country: &'a str,
        reasons: &'a str,
        by: i64,
    ) {
        let hour = recorded_at_ms / HOUR_MS * HOUR_MS;
        let reasons = reasons.split(',').filter(|r| !r.is_empty());
        for reason in std::iter::once("").chain(reasons) {
            *self.0.entry((hour, verdict, country, reason)).or_default() += by;
        }
    }

    pub(crate) fn into_rows(self) -> impl Iterator<Item = ((i64, &'a str, &'a str, &'a str), i64)> {
        self.0.into_iter()
    }
}

/// What the console's dashboard shows, from `decision_counts`, the queue and the overrides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dashboard {
    /// Decisions per hour and verdict since the asked time: `(hour_ms, verdict, count)`.
    pub hourly: Vec<(i64, String, i64)>,
    /// DENY and REVIEW decisions by country: `(country, verdict, count)`.
    pub by_country: Vec<(String, String, i64)>,
    /// The most frequent reason codes, most frequent first: `(code, count)`.
    pub top_reasons: Vec<(String, i64)>,
    /// Open queue items, and when the oldest was recorded.
    pub queue_open: i64,
    pub oldest_open_ms: Option<i64>,
}

/// The dashboard's queries, the same on both adapters (`$1`, the first hour counted, binds by
/// position in SQLite too). Sums are cast: PostgreSQL's `SUM(bigint)` is `numeric`.
pub(crate) mod dashboard_sql {
    pub const HOURLY: &str = "SELECT hour_ms, verdict, CAST(SUM(n) AS BIGINT) FROM decision_counts \
        WHERE hour_ms >= $1 AND reason = '' GROUP BY hour_ms, verdict ORDER BY hour_ms, verdict";
    /// The 40 countries with the most DENY and REVIEW decisions, both counts of each.
    pub const BY_COUNTRY: &str = "WITH top AS (SELECT country FROM decision_counts \
        WHERE hour_ms >= $1 AND reason = '' AND verdict IN ('DENY', 'REVIEW') \
        GROUP BY country ORDER BY SUM(n) DESC, country LIMIT 40) \
        SELECT c.country, c.verdict, CAST(SUM(c.n) AS BIGINT) FROM decision_counts c JOIN top ON top.country = c.country \
        WHERE c.hour_ms >= $1 AND c.reason = '' AND c.verdict IN ('DENY', 'REVIEW') \
        GROUP BY c.country, c.verdict ORDER BY 3 DESC, 1, 2";
    pub const TOP_REASONS: &str = "SELECT reason, CAST(SUM(n) AS BIGINT) FROM decision_counts \
        WHERE hour_ms >= $1 AND reason <> '' GROUP BY reason ORDER BY 2 DESC, 1 LIMIT 12";
    pub const QUEUE_OPEN: &str = "SELECT COUNT(*) FROM review_queue WHERE status = 'open'";
    pub const OLDEST_OPEN: &str = "SELECT a.recorded_at_ms FROM review_queue q JOIN audit_log a ON a.seq = q.seq \
        WHERE q.status = 'open' ORDER BY q.seq LIMIT 1";
}

#[cfg(test)]
mod counts_tests {
    use super::*;

    #[test]
    fn a_decision_counts_once_and_once_per_reason_in_its_hour() {
        let mut counts = DecisionCounts::default();
        let row = |at: i64, reasons: &str| AuditRow {
            kind: "decision".into(),
            recorded_at_ms: at,
            verdict: "DENY".into(),
            country: "IR".into(),
            reasons: reasons.into(),
            ..AuditRow::default()
        };
        let batch = [
            row(HOUR_MS * 5 + 1, "SANCTIONED_COUNTRY,VPN"),
            row(HOUR_MS * 6 - 1, "VPN"),
            row(HOUR_MS * 6, ""),
            AuditRow {
                kind: "review".into(),
                ..row(HOUR_MS, "SetOverride")
            },
        ];
        for r in &batch {
            counts.add(r);
        }
        let rows: Vec<_> = counts
            .into_rows()
            .map(|((h, _, _, r), n)| (h / HOUR_MS, r.to_owned(), n))
            .collect();
        assert_eq!(
            rows,
            vec![
                (5, String::new(), 2),
                (5, "SANCTIONED_COUNTRY".into(), 1),
                (5, "VPN".into(), 2),
                (6, String::new(), 1),
            ]
        );
    }
}
