//! `audit verify --postgres-url`: the SQLite verify over the shared store. The whole chain is
//! walked in one REPEATABLE READ snapshot, streamed through a cursor (memory holds the
//! overrides, not the log), so replicas writing meanwhile cannot make it disagree; then the
//! `overrides` and `review_queue` tables are held to it.

use tokio_postgres::{Client, IsolationLevel, Transaction};

use super::{ROW_COLUMNS, pg_error, read_row};
use crate::store::chain::{ChainBreak, ChainKey, Walker};
use crate::store::consistency::{self, Expected, TableMismatch};
use crate::store::{Broken, Verified};
use crate::store::{QueueState, StoreError};

/// What a walk of the PostgreSQL store found, with the head it saw.
pub struct Report {
    pub result: Result<Verified, Broken>,
    /// `(seq, hash)` of the last row in the snapshot.
    pub head: Option<(i64, String)>,
    /// The hash of the row `--expect-head` named, if asked and the row exists.
    pub expected_row_hash: Option<String>,
}

/// Verifies the store at `url`; `expect_seq` is a row whose hash to report too.
pub async fn verify(
    url: &str,
    key: Option<&ChainKey>,
    expect_seq: Option<i64>,
) -> Result<Report, StoreError> {
    let config = super::parse_url(url)?;
    verify_config(&config, key, expect_seq)
        .await
        .map_err(|e| match e {
            StoreError::Unavailable(m) => {
                StoreError::Unavailable(format!("{}: {m}", super::redact(url)))
            }
            other => other,
        })
}

/// As [`verify`], with the connection settings parsed.
pub async fn verify_config(
    config: &tokio_postgres::Config,
    key: Option<&ChainKey>,
    expect_seq: Option<i64>,
) -> Result<Report, StoreError> {
    let mut client = super::connect(config).await?;
    walk(&mut client, key, expect_seq).await.map_err(pg_error)
}

async fn walk(
    client: &mut Client,
    key: Option<&ChainKey>,
    expect_seq: Option<i64>,
) -> Result<Report, tokio_postgres::Error> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let head = tx
        .query_opt(
            "SELECT seq, row_hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await?
        .map(|r| Ok::<_, tokio_postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
        .transpose()?;
    let expected_row_hash = match expect_seq {
        Some(seq) => tx
            .query_opt("SELECT row_hash FROM audit_log WHERE seq = $1", &[&seq])
            .await?
            .map(|r| r.try_get(0))
            .transpose()?,
        None => None,
    };
    let result = check(&tx, key).await?;
    tx.commit().await?;
    Ok(Report {
        result,
        head,
        expected_row_hash,
    })
}

async fn check(
    tx: &Transaction<'_>,
    key: Option<&ChainKey>,
) -> Result<Result<Verified, Broken>, tokio_postgres::Error> {
    let first: Option<i64> = tx
        .query_opt("SELECT seq FROM audit_log ORDER BY seq LIMIT 1", &[])
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    if let Some(seq) = first.filter(|&s| s != 1) {
        // No retention on PostgreSQL: the chain starts at row 1.
        return Ok(Err(ChainBreak::Unanchored { seq }.into()));
    }
    let mut walker = Walker::default().with_key(key.cloned());
    let mut expected = Expected::default();
    let mut resolutions_matched = 0u64;
    let portal = tx
        .bind(
            &format!("SELECT {ROW_COLUMNS} FROM audit_log ORDER BY seq"),
            &[],
        )
        .await?;
    loop {
        let page = tx.query_portal(&portal, 1000).await?;
        if page.is_empty() {
            break;
        }
        for r in &page {
            let (seq, row, prev_hash, row_hash) = read_row(r)?;
            if let Err(b) = walker.push(seq, &row, &prev_hash, &row_hash) {
                return Ok(Err(b.into()));
            }
            if let Some(resolution) = expected.observe(seq, &row) {
                let item = queue_item(tx, &resolution.decision_id).await?;
                if let Err(m) = consistency::check_resolution(&resolution, item.as_ref()) {
                    return Ok(Err(m.into()));
                }
                resolutions_matched += 1;
            }
        }
    }
    let rows = match walker.finish() {
        Ok(rows) => rows,
        Err(b) => return Ok(Err(b.into())),
    };
    let verified = Verified {
        rows,
        keyed_from: walker.keyed_from(),
        pruned_through: None,
        shortest_retention_ms: None,
        tables_unchecked_from: expected.legacy(),
    };
    if verified.tables_unchecked_from.is_some() {
        return Ok(Ok(verified));
    }
    let table = super::load_overrides(tx).await?;
    if let Err(m) = expected
        .check_readable()
        .and_then(|()| expected.check_overrides(&table))
    {
        return Ok(Err(m.into()));
    }
    if let Err(b) = check_queue(tx, resolutions_matched).await? {
        return Ok(Err(b));
    }
    Ok(Ok(verified))
}

async fn queue_item(
    tx: &Transaction<'_>,
    decision_id: &str,
) -> Result<Option<QueueState>, tokio_postgres::Error> {
    match tx
        .query_opt(
            "SELECT status, outcome, note, resolved_by, resolved_at_ms FROM review_queue WHERE decision_id = $1",
            &[&decision_id],
        )
        .await?
    {
        Some(r) => super::queue_state(&r, 0),
        None => Ok(None),
    }
}

fn broken(table: &'static str, key: String, problem: impl Into<String>) -> Broken {
    TableMismatch {
        table,
        key,
        problem: problem.into(),
    }
    .into()
}

/// As the SQLite `check_queue`: every item against its decision row, resolved items counted
/// against the chain's resolutions, REVIEW decisions without an item.
async fn check_queue(
    tx: &Transaction<'_>,
    resolutions: u64,
) -> Result<Result<(), Broken>, tokio_postgres::Error> {
    let portal = tx
        .bind(
            "SELECT q.decision_id, q.status, q.outcome, q.note, q.resolved_by, q.resolved_at_ms, a.kind, a.ref_id, a.verdict \
             FROM review_queue q LEFT JOIN audit_log a ON a.seq = q.seq ORDER BY q.seq",
            &[],
        )
        .await?;
    let mut resolved = 0u64;
    loop {
        let page = tx.query_portal(&portal, 1000).await?;
        if page.is_empty() {
            break;
        }
        for r in &page {
            let decision_id: String = r.try_get(0)?;
            let Some(state) = super::queue_state(r, 1)? else {
                return Ok(Err(broken("review_queue", decision_id, "has no status")));
            };
            let row: (Option<String>, Option<String>, Option<String>) =
                (r.try_get(6)?, r.try_get(7)?, r.try_get(8)?);
            let decision = match &row {
                (Some(kind), Some(ref_id), Some(verdict)) => {
                    Some((kind.as_str(), ref_id.as_str(), verdict.as_str()))
                }
                _ => None,
            };
            if let Err(m) = consistency::check_queue_item(&decision_id, decision, &state) {
                return Ok(Err(m.into()));
            }
            resolved += u64::from(state.status == "resolved");
        }
    }
    if resolved != resolutions {
        let unrecorded = tx
            .query_opt(
                "SELECT q.decision_id FROM review_queue q WHERE q.status = 'resolved' AND NOT EXISTS ( \
                   SELECT 1 FROM audit_log a WHERE a.kind = 'review' \
                   AND (a.body::jsonb #>> '{applied,queue_item,decision_id}') = q.decision_id) \
                 ORDER BY q.seq LIMIT 1",
                &[],
            )
            .await?;
        if let Some(r) = unrecorded {
            return Ok(Err(broken(
                "review_queue",
                r.try_get(0)?,
                "resolved in the table, with no resolution in the audit log",
            )));
        }
        return Ok(Err(broken(
            "review_queue",
            format!("{resolved} resolved items"),
            format!("the audit log resolves {resolutions}"),
        )));
    }
    let orphan = tx
        .query_opt(
            "SELECT a.ref_id FROM audit_log a LEFT JOIN review_queue q ON q.decision_id = a.ref_id \
             WHERE a.kind = 'decision' AND a.verdict = 'REVIEW' AND q.decision_id IS NULL ORDER BY a.seq LIMIT 1",
            &[],
        )
        .await?;
    Ok(match orphan {
        Some(r) => Err(broken(
            "review_queue",
            r.try_get(0)?,
            "a REVIEW decision in the audit log but missing from the queue (deleted)",
        )),
        None => Ok(()),
    })
}
