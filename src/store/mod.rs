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

pub mod chain;
pub mod consistency;
pub mod postgres;
pub mod spool;
pub mod sqlite;
pub mod writer;

use std::path::{Path, PathBuf};

use rusqlite::Connection;

pub use chain::{AuditRow, ChainBreak, ChainKey};

pub use consistency::TableMismatch;
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

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
