//! The PostgreSQL adapter (`[store] postgres_url`): one database shared by every replica.
//!
//! - Migrations from `migrations/postgres/`, applied at start under a session advisory lock,
//!   so replicas starting together apply each once (`schema_migrations`).
//! - One writer per replica ([`writer`]): a bounded channel as for SQLite; each batch is one
//!   transaction that takes `pg_advisory_xact_lock(CHAIN_LOCK)`, reads the chain head, hashes
//!   its rows in order and inserts them. Writers of several replicas so take turns on one
//!   chain: `verify` is the SQLite one over the same rows.
//! - When the database cannot be reached, decisions that must be kept go to a local spool
//!   ([`super::spool`]) and are drained in order once it is back; reviewer writes fail with
//!   [`StoreError::Unavailable`].
//! - Override changes `NOTIFY regionguard_overrides` in their transaction; every replica
//!   listens, and reloads every override on a notification and on every (re)connect, keeping
//!   a copy beside its spool ([`last_overrides`]) for a start while the database is away.

mod last_overrides;
pub mod verify;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, NoTls, Row};

pub use writer::open;

use super::chain::{ChainKey, check_row};
use super::consistency::{OnRecord, Resolved};
use super::{
    AuditRow, OverrideRecord, QueueFilter, QueueState, StoreError, StoredDecision, enforced,
};

/// Versioned migrations, applied in order, each once.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        include_str!("../../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        include_str!("../../../migrations/postgres/0002_decision_counts.sql"),
    ),
    (
        3,
        include_str!("../../../migrations/postgres/0003_queue_fleet.sql"),
    ),
];
/// Session lock held while migrating ("rg-migr").
const MIGRATION_LOCK: i64 = 0x0072_672d_6d69_6772;
/// Transaction lock every writer takes before it reads the chain head ("rg-chain").
pub const CHAIN_LOCK: i64 = 0x7267_2d63_6861_696e;
/// The channel override changes are announced on.
pub const CHANNEL: &str = "regionguard_overrides";
/// The listener session's `application_name`.
pub const LISTENER_NAME: &str = "regionguard overrides listener";
/// How long connecting may take before the database counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one read may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses `[store] postgres_url`. The error never repeats the URL (it may hold a password).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
        StoreError::Conflict(format!(
            "store.postgres_url is not a PostgreSQL connection URL ({e})"
        ))
    })?;
    if config.get_dbname().is_none() {
        return Err(StoreError::Conflict(
            "store.postgres_url names no database (postgres://USER@HOST:PORT/DATABASE)".into(),
        ));
    }
    config
        .connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .application_name("regionguard");
    Ok(config)
}

/// `url` with its password, if any, replaced, for logs and messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // A key=value connection string (or not a URL at all): nothing of it is shown.
        return "<connection string not shown>".into();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            let tail = redact_query(tail);
            format!("{scheme}://{user}{hidden}@{host}{tail}")
        }
        None => format!("{scheme}://{authority}{}", redact_query(tail)),
    }
}

fn redact_query(tail: &str) -> String {
    match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    }
}

/// Whether `error` means the database is away (connection lost or refused, server shutting
/// down) rather than a query the database refused.
pub(crate) fn is_unavailable(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    match error.code() {
        // Class 08 (connection exception), 57 (operator intervention: shutdown, crash).
        Some(code) => {
            let code = code.code();
            code.starts_with("08") || code.starts_with("57")
        }
        None => error.as_db_error().is_none(),
    }
}

/// The error with its causes ("error connecting to server: Connection refused (os error 111)").
fn describe(error: &tokio_postgres::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
        source = cause_of(source);
    }
    text
}

fn cause_of<'a>(
    error: Option<&'a (dyn std::error::Error + 'static)>,
) -> Option<&'a (dyn std::error::Error + 'static)> {
    error.and_then(std::error::Error::source)
}

pub(crate) fn pg_error(error: tokio_postgres::Error) -> StoreError {
    if is_unavailable(&error) {
        StoreError::Unavailable(format!(
            "the PostgreSQL store is unreachable ({}); try again once it is back",
            describe(&error)
        ))
    } else {
        StoreError::Postgres(describe(&error))
    }
}

fn timed_out() -> StoreError {
    StoreError::Unavailable(
        "the PostgreSQL store did not answer in time; try again once it is back".into(),
    )
}

/// Connects and drives the connection on the current runtime.
pub(crate) async fn connect(config: &tokio_postgres::Config) -> Result<Client, StoreError> {
    let (client, connection) =
        match tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls)).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(error)) => return Err(pg_error(error)),
            Err(_) => return Err(timed_out()),
        };
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "postgres connection ended");
        }
    });
    Ok(client)
}

/// Applies pending migrations under a session advisory lock (replicas starting together
/// take turns; each migration is applied once, in its own transaction).
pub(crate) async fn migrate(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = async {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
            )
            .await?;
        for (version, sql) in MIGRATIONS {
            let applied: bool = client
                .query_one(
                    "SELECT EXISTS(SELECT 1 FROM schema_migrations WHERE version = $1)",
                    &[version],
                )
                .await?
                .try_get(0)?;
            if !applied {
                let tx = client.transaction().await?;
                tx.batch_execute(sql).await?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at_ms) VALUES ($1, $2)",
                    &[version, &super::now_ms()],
                )
                .await?;
                tx.commit().await?;
                tracing::info!(version, "postgres store: migration applied");
            }
        }
        Ok(())
    }
    .await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result.and(unlocked.map(drop))
}

pub(crate) const ROW_COLUMNS: &str = "seq, kind, ref_id, recorded_at_ms, actor, account_id, verdict, country, reasons, body, prev_hash, row_hash";

/// `(seq, row, prev_hash, row_hash)` from columns in `ROW_COLUMNS` order starting at 0.
pub(crate) fn read_row(r: &Row) -> Result<(i64, AuditRow, String, String), tokio_postgres::Error> {
    Ok((
        r.try_get(0)?,
        AuditRow {
            kind: r.try_get(1)?,
            ref_id: r.try_get(2)?,
            recorded_at_ms: r.try_get(3)?,
            actor: r.try_get(4)?,
            account_id: r.try_get(5)?,
            verdict: r.try_get(6)?,
            country: r.try_get(7)?,
            reasons: r.try_get(8)?,
            body: r.try_get(9)?,
        },
        r.try_get(10)?,
        r.try_get(11)?,
    ))
}

/// A queue state from the five columns from `at` (status NULL: not in the queue).
pub(crate) fn queue_state(r: &Row, at: usize) -> Result<Option<QueueState>, tokio_postgres::Error> {
    let status: Option<String> = r.try_get(at)?;
    let text = |i: usize| -> Result<String, tokio_postgres::Error> {
        Ok(r.try_get::<_, Option<String>>(at + i)?.unwrap_or_default())
    };
    Ok(match status {
        None => None,
        Some(status) => Some(QueueState {
            status,
            outcome: text(1)?,
            note: text(2)?,
            resolved_by: text(3)?,
            resolved_at_ms: r.try_get(at + 4)?,
        }),
    })
}

const DECISION_SELECT: &str = concat!(
    crate::store::decision_columns!(),
    " FROM audit_log a LEFT JOIN review_queue q ON q.decision_id = a.ref_id"
);
/// The queue's rows, from `review_queue` in seq order, each joined to its decision by seq: a
/// page reads queue items, not the whole log.
const QUEUE_SELECT: &str = concat!(
    crate::store::decision_columns!(),
    " FROM review_queue q JOIN audit_log a ON a.seq = q.seq"
);

fn stored(r: &Row) -> Result<StoredDecision, tokio_postgres::Error> {
    let (seq, row, _, _) = read_row(r)?;
    Ok(StoredDecision {
        seq,
        row,
        queue: queue_state(r, 12)?,
    })
}

pub(crate) const OVERRIDE_COLUMNS: &str = "id, scope, value, action, reviewer, reason, created_at_ms, expires_at_ms, removed_at_ms, removed_by";

pub(crate) fn read_override(r: &Row) -> Result<OverrideRecord, tokio_postgres::Error> {
    Ok(OverrideRecord {
        id: r.try_get(0)?,
        scope: r.try_get(1)?,
        value: r.try_get(2)?,
        action: r.try_get(3)?,
        reviewer: r.try_get(4)?,
        reason: r.try_get(5)?,
        created_at_ms: r.try_get(6)?,
        expires_at_ms: r.try_get(7)?,
        removed_at_ms: r.try_get(8)?,
        removed_by: r.try_get(9)?,
    })
}

pub(crate) async fn load_overrides(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Vec<OverrideRecord>, tokio_postgres::Error> {
    client
        .query(
            &format!("SELECT {OVERRIDE_COLUMNS} FROM overrides ORDER BY created_at_ms, id"),
            &[],
        )
        .await?
        .iter()
        .map(read_override)
        .collect()
}

/// The overrides to enforce ([`OnRecord`]): `on_record` is first brought up to the chain's
/// head (PostgreSQL keeps every row: no retention), then held against the table. The two are
/// read in two statements; a reviewer change committed between them would look like a table
/// that differs, so a difference is read once more before it counts.
pub(crate) async fn overrides_on_record(
    client: &impl tokio_postgres::GenericClient,
    on_record: &tokio::sync::Mutex<OnRecord>,
) -> Result<Resolved, tokio_postgres::Error> {
    let mut on_record = on_record.lock().await;
    let mut resolved = None;
    for _ in 0..2 {
        take_reviews(client, &mut on_record, None).await?;
        let now = on_record.resolve(load_overrides(client).await?);
        let settled = now.off_record.is_none();
        resolved = Some(now);
        if settled {
            break;
        }
    }
    Ok(resolved.expect("read at least once"))
}

/// Override `id` as the chain records it ([`OnRecord::recorded`]), read inside the writer's
/// transaction (after the chain lock, so every change before is committed and seen).
pub(crate) async fn recorded_override(
    client: &impl tokio_postgres::GenericClient,
    id: &str,
    key: Option<&ChainKey>,
) -> Result<Option<Option<OverrideRecord>>, tokio_postgres::Error> {
    let mut view = OnRecord::keyed(key.cloned());
    take_reviews(client, &mut view, Some(id)).await?;
    Ok(view.recorded(id))
}

/// Takes the reviewer rows after `on_record`'s last (only those that may change override
/// `only`, when given: its own changes, and changing calls that do not record what they
/// changed), each once it holds where it stands.
async fn take_reviews(
    client: &impl tokio_postgres::GenericClient,
    on_record: &mut OnRecord,
    only: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    let columns = ROW_COLUMNS
        .split(", ")
        .map(|c| format!("r.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    // Each row with the hash of the row before it.
    let select = format!(
        "SELECT {columns}, p.row_hash FROM audit_log r LEFT JOIN audit_log p ON p.seq = r.seq - 1 \
         WHERE r.kind = 'review' AND r.seq > $1"
    );
    let after = on_record.after();
    // Most reviewer rows are reads (the console's pages, lists): only the rows that can change
    // an override, or make the chain unable to say, are sent. The newest reviewer row, read
    // first, bounds them (rows committed later come after it) and is where the next read
    // starts once it holds.
    let newest = client
        .query_opt(&format!("{select} ORDER BY r.seq DESC LIMIT 1"), &[&after])
        .await?;
    let Some(newest) = newest else {
        return Ok(());
    };
    let newest_seq: i64 = newest.try_get(0)?;
    let rows = match only {
        None => {
            let sql = format!(
                "{select} AND r.seq <= $2 AND (strpos(r.body, '\"override\"') > 0 OR (strpos(r.body, '\"applied\"') = 0 \
                 AND (strpos(r.body, '\"SetOverride\"') > 0 OR strpos(r.body, '\"RemoveOverride\"') > 0 \
                 OR strpos(r.body, '\"Resolve\"') > 0))) ORDER BY r.seq"
            );
            client.query(&sql, &[&after, &newest_seq]).await?
        }
        Some(id) => {
            let sql = format!(
                "{select} AND r.seq <= $2 AND (strpos(r.body, $3) > 0 OR (strpos(r.body, '\"applied\"') = 0 \
                 AND (strpos(r.body, '\"SetOverride\"') > 0 OR strpos(r.body, '\"RemoveOverride\"') > 0))) ORDER BY r.seq"
            );
            client.query(&sql, &[&after, &newest_seq, &id]).await?
        }
    };
    let holds = |r: &Row, on_record: &OnRecord| -> Result<_, tokio_postgres::Error> {
        let (seq, row, prev_hash, row_hash) = read_row(r)?;
        let predecessor: Option<String> = r.try_get(12)?;
        let holds = check_row(
            seq,
            &row,
            (&prev_hash, &row_hash),
            predecessor.as_deref(),
            on_record.key(),
        );
        Ok((seq, row, holds))
    };
    for r in &rows {
        match holds(r, on_record)? {
            (seq, row, Ok(())) => on_record.observe(seq, &row),
            (_, _, Err(broken)) => tracing::error!(
                %broken,
                "audit log: a reviewer row does not hold; the override change it records is not taken"
            ),
        }
    }
    // Past the rows not sent too, when the newest holds (a row planted far past the head does
    // not, and must not hide the rows the writers add before it).
    if let (seq, _, Ok(())) = holds(&newest, on_record)? {
        on_record.skip_to(seq);
    }
    Ok(())
}

/// The read side alone (for the command line): connects when first used.
pub fn reads(url: &str) -> Result<super::Reads, StoreError> {
    Ok(super::Reads::Postgres(Reader::new(parse_url(url)?)))
}

/// The read side: one shared connection (tokio-postgres pipelines concurrent queries on it),
/// made when first needed and again after it is lost.
#[derive(Clone)]
pub struct Reader {
    config: Arc<tokio_postgres::Config>,
    client: Arc<tokio::sync::Mutex<Option<Arc<Client>>>>,
    /// Where the override listener keeps its copy of the overrides (a serving replica's
    /// spool directory; none for the command line).
    overrides_copy: Option<Arc<std::path::Path>>,
    /// The overrides the chain records, as far as this side has read it (the override
    /// listener keeps its own, so that neither waits on the other's queries).
    on_record: Arc<tokio::sync::Mutex<OnRecord>>,
    /// What keyed reviewer rows are checked with.
    key: Option<ChainKey>,
}

impl Reader {
    pub(crate) fn new(config: tokio_postgres::Config) -> Self {
        Self {
            config: Arc::new(config),
            client: Arc::default(),
            overrides_copy: None,
            on_record: Arc::default(),
            key: None,
        }
    }

    /// Checks keyed reviewer rows with `key` before taking their overrides as on record.
    pub(crate) fn checking_with(mut self, key: Option<ChainKey>) -> Self {
        self.on_record = Arc::new(tokio::sync::Mutex::new(OnRecord::keyed(key.clone())));
        self.key = key;
        self
    }

    /// Keeps a copy of the overrides the listener reads in `dir` ([`last_overrides`]).
    pub(crate) fn keeping_overrides_in(mut self, dir: std::path::PathBuf) -> Self {
        self.overrides_copy = Some(dir.into());
        self
    }

    async fn client(&self) -> Result<Arc<Client>, StoreError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        let client = Arc::new(connect(&self.config).await?);
        *slot = Some(client.clone());
        Ok(client)
    }

    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        match tokio::time::timeout(QUERY_TIMEOUT, client.query(sql, params)).await {
            Ok(rows) => rows.map_err(pg_error),
            Err(_) => Err(timed_out()),
        }
    }

    async fn decisions(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<StoredDecision>, StoreError> {
        self.rows(sql, params)
            .await?
            .iter()
            .map(stored)
            .collect::<Result<_, _>>()
            .map_err(pg_error)
    }

    pub async fn decision(&self, decision_id: &str) -> Result<Option<StoredDecision>, StoreError> {
        let sql = format!("{DECISION_SELECT} WHERE a.kind = 'decision' AND a.ref_id = $1");
        Ok(self
            .decisions(&sql, &[&decision_id])
            .await?
            .into_iter()
            .next())
    }

    pub async fn queue(&self, f: &QueueFilter) -> Result<Vec<StoredDecision>, StoreError> {
        let sql = format!(
            "{QUEUE_SELECT} WHERE a.kind = 'decision' AND q.seq > $1 AND a.recorded_at_ms >= $2 \
             AND ($3::text = '' OR q.status = $3) AND ($4::text = '' OR a.country = $4) \
             AND ($5::text = '' OR ',' || a.reasons || ',' LIKE '%,' || $5 || ',%') \
             AND ($6::text = '' OR a.account_id = $6) AND ($8::text = '' OR q.fleet_id = $8) \
             ORDER BY q.seq LIMIT $7"
        );
        let limit = i64::from(f.limit.clamp(1, 1001));
        self.decisions(
            &sql,
            &[
                &f.after_seq,
                &f.since_ms,
                &f.status,
                &f.country,
                &f.reason,
                &f.account_id,
                &limit,
                &f.fleet_id,
            ],
        )
        .await
    }

    pub async fn account_decisions(
        &self,
        account_id: &str,
        limit: u32,
    ) -> Result<Vec<StoredDecision>, StoreError> {
        let sql = format!(
            "{DECISION_SELECT} WHERE a.kind = 'decision' AND a.account_id = $1 ORDER BY a.seq DESC LIMIT $2"
        );
        let limit = i64::from(limit.clamp(1, 10_000));
        self.decisions(&sql, &[&account_id, &limit]).await
    }

    pub async fn decisions_since(
        &self,
        since_ms: i64,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<StoredDecision>, StoreError> {
        let sql = format!(
            "{DECISION_SELECT} WHERE a.kind = 'decision' AND a.recorded_at_ms >= $1 AND a.seq > $2 ORDER BY a.seq LIMIT $3"
        );
        let limit = i64::from(limit);
        self.decisions(&sql, &[&since_ms, &after_seq, &limit]).await
    }

    /// The dashboard's counts from hour `since` on (see `store::dashboard_sql`).
    pub async fn dashboard(&self, since: i64) -> Result<super::Dashboard, StoreError> {
        use super::dashboard_sql as q;
        fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
            row: &'a Row,
            i: usize,
        ) -> Result<T, StoreError> {
            row.try_get(i).map_err(pg_error)
        }
        let mut hourly = Vec::new();
        for row in self.rows(q::HOURLY, &[&since]).await? {
            hourly.push((get(&row, 0)?, get(&row, 1)?, get(&row, 2)?));
        }
        let mut by_country = Vec::new();
        for row in self.rows(q::BY_COUNTRY, &[&since]).await? {
            by_country.push((get(&row, 0)?, get(&row, 1)?, get(&row, 2)?));
        }
        let mut top_reasons = Vec::new();
        for row in self.rows(q::TOP_REASONS, &[&since]).await? {
            top_reasons.push((get(&row, 0)?, get(&row, 1)?));
        }
        let open = self.rows(q::QUEUE_OPEN, &[]).await?;
        let oldest = self.rows(q::OLDEST_OPEN, &[]).await?;
        Ok(super::Dashboard {
            hourly,
            by_country,
            top_reasons,
            queue_open: open.first().map(|r| get(r, 0)).transpose()?.unwrap_or(0),
            oldest_open_ms: oldest.first().map(|r| get(r, 0)).transpose()?,
        })
    }

    /// `audit verify` over this reader's database, on a connection of its own.
    pub async fn verify(
        &self,
        key: Option<&super::ChainKey>,
    ) -> Result<verify::Report, StoreError> {
        verify::verify_config(&self.config, key, None).await
    }

    pub async fn overrides(&self) -> Result<Vec<OverrideRecord>, StoreError> {
        let client = self.client().await?;
        match tokio::time::timeout(
            QUERY_TIMEOUT,
            overrides_on_record(&*client, &self.on_record),
        )
        .await
        {
            Ok(resolved) => resolved.map(enforced).map_err(pg_error),
            Err(_) => Err(timed_out()),
        }
    }

    /// Spawns the override listener: `LISTEN regionguard_overrides` on its own connection;
    /// every notification, and every (re)connect, hands all overrides to `apply`.
    pub fn watch_overrides(&self, apply: Arc<dyn Fn(Vec<OverrideRecord>) + Send + Sync>) {
        let config = self.config.clone();
        let apply: Arc<dyn Fn(Vec<OverrideRecord>) + Send + Sync> = match self
            .overrides_copy
            .clone()
        {
            None => apply,
            Some(dir) => Arc::new(move |all: Vec<OverrideRecord>| {
                if let Err(error) = last_overrides::save(&dir, &all) {
                    tracing::warn!(%error, "override listener: the local copy of the overrides could not be written");
                }
                apply(all)
            }),
        };
        let on_record = tokio::sync::Mutex::new(OnRecord::keyed(self.key.clone()));
        tokio::spawn(async move {
            // Short: a change made while the listener is away applies when it is back.
            const FIRST: Duration = Duration::from_millis(100);
            let mut backoff = FIRST;
            loop {
                let mut listening = false;
                if let Err(error) = listen(&config, (&*apply, &on_record), &mut listening).await {
                    tracing::warn!(%error, "override listener: no PostgreSQL connection; reconnecting (overrides resync then)");
                }
                if listening {
                    backoff = FIRST;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        });
    }
}

/// One listening session: returns when its connection ends.
/// Where a resync's overrides go, and what the chain said at the last one.
type Resync<'a> = (
    &'a (dyn Fn(Vec<OverrideRecord>) + Send + Sync),
    &'a tokio::sync::Mutex<OnRecord>,
);

async fn listen(
    config: &tokio_postgres::Config,
    apply: Resync<'_>,
    listening: &mut bool,
) -> Result<(), StoreError> {
    // Named apart from the writer's and the reads' sessions in pg_stat_activity.
    let mut config = config.clone();
    config.application_name(LISTENER_NAME);
    let (client, mut connection) =
        match tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls)).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(error)) => return Err(pg_error(error)),
            Err(_) => return Err(timed_out()),
        };
    let (notify, mut notified) = tokio::sync::mpsc::unbounded_channel::<()>();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                    if notify.send(()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    tracing::debug!(%error, "override listener connection ended");
                    return;
                }
                None => return,
            }
        }
    });
    let session = async {
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(pg_error)?;
        // A change made while this replica was not listening is picked up here.
        resync(&client, apply).await?;
        *listening = true;
        tracing::info!("override listener: listening on {CHANNEL}; overrides resynced");
        while notified.recv().await.is_some() {
            // Several notifications in a row: one reload covers them all.
            while notified.try_recv().is_ok() {}
            resync(&client, apply).await?;
        }
        Err(StoreError::Unavailable(
            "override listener: connection ended".into(),
        ))
    };
    let result = session.await;
    driver.abort();
    result
}

async fn resync(client: &Client, (apply, on_record): Resync<'_>) -> Result<(), StoreError> {
    let all =
        match tokio::time::timeout(QUERY_TIMEOUT, overrides_on_record(client, on_record)).await {
            Ok(resolved) => enforced(resolved.map_err(pg_error)?),
            Err(_) => return Err(timed_out()),
        };
    apply(all);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_and_checked() {
        assert_eq!(
            redact("postgres://rg:s3cret@db.internal:5432/regionguard"),
            "postgres://rg:***@db.internal:5432/regionguard"
        );
        assert_eq!(
            redact("postgres://db:5432/rg?user=rg&password=s3cret"),
            "postgres://db:5432/rg?user=rg&password=***"
        );
        assert_eq!(
            redact("postgres://rg@127.0.0.1/rg"),
            "postgres://rg@127.0.0.1/rg"
        );
        assert!(parse_url("postgres://rg@127.0.0.1:5432/rg").is_ok());
        let err = parse_url("postgres://rg:s3cret@127.0.0.1:5432")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("names no database") && !err.contains("s3cret"),
            "{err}"
        );
        let err = parse_url("mysql://x:s3cret@h/db").unwrap_err().to_string();
        assert!(!err.contains("s3cret"), "{err}");
    }
}
