//! One suite, every store adapter: the same calls through the port (`store::open` → the
//! `Recorder` and `Reads`) must behave the same on SQLite and on PostgreSQL (a real throwaway
//! server), and leave a chain that verifies with the tables matching it.

mod support;

use std::path::PathBuf;

use regionguard::store::writer::{Applied, Change, Overflow};
use regionguard::store::{
    self, AuditRow, Backend, ChainKey, OverrideRecord, QueueFilter, StoreError, Verified,
};
use support::postgres::PgServer;

/// Must-record decisions wait this long for their commit at most.
const MUST: Option<std::time::Duration> = Some(std::time::Duration::from_secs(10));

fn decision(id: &str, account: &str, verdict: &str, at: i64) -> AuditRow {
    AuditRow {
        kind: "decision".into(),
        ref_id: id.into(),
        recorded_at_ms: at,
        account_id: account.into(),
        verdict: verdict.into(),
        country: "IR".into(),
        reasons: "REGION_SANCTIONED,ANONYMIZER_TOR".into(),
        body: serde_json::json!({ "ip": "5.1.2.3", "inputs": { "usage": { "fleet": { "id": FLEET, "size": 12 } } } })
            .to_string(),
        ..Default::default()
    }
}

/// The fleet every test decision's account is in.
const FLEET: &str = "fl_00112233445566ff";

/// ListQueue by fleet: d1 under FLEET, nothing under another.
async fn assert_fleet_search(reads: &store::Reads, name: &str) {
    let by_fleet = |fleet: &str| QueueFilter {
        status: "open".into(),
        fleet_id: fleet.into(),
        limit: 10,
        ..Default::default()
    };
    let found = reads.queue(&by_fleet(FLEET)).await.unwrap();
    assert_eq!(
        found
            .iter()
            .map(|s| s.row.ref_id.as_str())
            .collect::<Vec<_>>(),
        ["d1"],
        "{name}"
    );
    assert!(
        reads
            .queue(&by_fleet("fl_0000000000000000"))
            .await
            .unwrap()
            .is_empty(),
        "{name}: another fleet"
    );
}

/// The statement of the queue_fleet migration that fills in the items queued before it.
fn fleet_backfill(migration: &str) -> &str {
    let at = migration
        .find("UPDATE review_queue")
        .expect("the migration fills in existing items");
    &migration[at..at + migration[at..].find(";\n").expect("one statement") + 1]
}

fn review_row(rpc: &str) -> AuditRow {
    AuditRow {
        kind: "review".into(),
        ref_id: uuid::Uuid::now_v7().to_string(),
        recorded_at_ms: store::now_ms(),
        actor: "alice@compliance".into(),
        reasons: rpc.into(),
        body: serde_json::json!({ "rpc": rpc }).to_string(),
        ..Default::default()
    }
}

enum Verifier {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Verifier {
    async fn verify(&self, key: Option<&ChainKey>) -> Result<Verified, String> {
        match self {
            Verifier::Sqlite(dir) => {
                let conn = store::open_for_reading(dir).unwrap();
                store::verify_keyed(&conn, key)
                    .unwrap()
                    .map_err(|b| b.to_string())
            }
            Verifier::Postgres(url) => store::postgres::verify::verify(url, key, None)
                .await
                .unwrap()
                .result
                .map_err(|b| b.to_string()),
        }
    }
}

/// The suite: decisions (a repeat skipped), the queue, reviewer changes with their audit row
/// or not at all, reads, paging, then verify; and a keyed chain that refuses an unkeyed writer.
async fn suite(backend: Backend, verifier: Verifier, name: &str) {
    let key = ChainKey::new(&[7u8; 32]).unwrap();
    let (opened, t0) = three_decisions(&backend, Some(key.clone())).await;
    assert!(opened.overrides.is_empty(), "{name}");
    let (recorder, reads) = (opened.recorder, opened.reads);

    let d1 = reads.decision("d1").await.unwrap().expect("d1 recorded");
    assert_eq!(d1.row.verdict, "REVIEW", "{name}");
    assert_eq!(
        d1.queue.as_ref().map(|q| q.status.as_str()),
        Some("open"),
        "{name}"
    );
    assert!(reads.decision("nope").await.unwrap().is_none(), "{name}");
    let open = QueueFilter {
        status: "open".into(),
        limit: 10,
        ..Default::default()
    };
    let queue = reads.queue(&open).await.unwrap();
    assert_eq!(
        queue
            .iter()
            .map(|s| s.row.ref_id.as_str())
            .collect::<Vec<_>>(),
        ["d1"],
        "{name}: one item, the repeat skipped"
    );
    let by_reason = QueueFilter {
        reason: "ANONYMIZER_TOR".into(),
        country: "IR".into(),
        ..open.clone()
    };
    assert_eq!(reads.queue(&by_reason).await.unwrap().len(), 1, "{name}");
    let other_reason = QueueFilter {
        reason: "ANONYMIZER".into(),
        ..open.clone()
    };
    assert!(
        reads.queue(&other_reason).await.unwrap().is_empty(),
        "{name}: reason codes match whole"
    );
    assert_counts(&reads, t0, name).await;
    assert_fleet_search(&reads, name).await;

    // Reviewer changes.
    let record = OverrideRecord {
        id: "o1".into(),
        scope: "account".into(),
        value: "acct-1".into(),
        action: "DENY".into(),
        reviewer: "alice@compliance".into(),
        reason: "ring".into(),
        created_at_ms: store::now_ms(),
        expires_at_ms: None,
        removed_at_ms: None,
        removed_by: String::new(),
    };
    let set = recorder
        .review(
            review_row("SetOverride"),
            Change::SetOverride(record.clone()),
        )
        .await
        .unwrap();
    assert_eq!(set, Applied::Override(record.clone()), "{name}");
    let remove = || Change::RemoveOverride {
        id: "o1".into(),
        by: "bob@compliance".into(),
        at_ms: store::now_ms(),
    };
    let removed = recorder
        .review(review_row("RemoveOverride"), remove())
        .await
        .unwrap();
    assert!(
        matches!(&removed, Applied::Override(o) if o.removed_by == "bob@compliance"),
        "{name}: {removed:?}"
    );
    let again = recorder
        .review(review_row("RemoveOverride"), remove())
        .await;
    assert!(
        matches!(&again, Err(StoreError::Conflict(m)) if m.contains("already removed by bob@compliance")),
        "{name}: {again:?}"
    );
    let resolve = |id: &str| Change::Resolve {
        decision_id: id.into(),
        outcome: "cleared".into(),
        note: "known".into(),
        by: "alice@compliance".into(),
        at_ms: store::now_ms(),
    };
    assert!(matches!(
        recorder.review(review_row("Resolve"), resolve("d1")).await,
        Ok(Applied::Queue(q)) if q.status == "resolved"
    ));
    assert!(matches!(
        recorder.review(review_row("Resolve"), resolve("d1")).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        recorder.review(review_row("Resolve"), resolve("d2")).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        recorder.review(review_row("ListQueue"), Change::None).await,
        Ok(Applied::Nothing)
    ));

    let overrides = reads.overrides().await.unwrap();
    assert_eq!(overrides.len(), 1, "{name}");
    assert!(overrides[0].removed_at_ms.is_some(), "{name}");
    assert!(reads.queue(&open).await.unwrap().is_empty(), "{name}");
    let newest_first = reads.account_decisions("acct-1", 10).await.unwrap();
    assert_eq!(
        newest_first
            .iter()
            .map(|s| s.row.ref_id.as_str())
            .collect::<Vec<_>>(),
        ["d3", "d2", "d1"],
        "{name}"
    );
    let first = reads.decisions_since(t0, 0, 2).await.unwrap();
    let rest = reads.decisions_since(t0, first[1].seq, 2).await.unwrap();
    assert_eq!(
        first
            .iter()
            .chain(&rest)
            .map(|s| s.row.ref_id.as_str())
            .collect::<Vec<_>>(),
        ["d1", "d2", "d3"],
        "{name}"
    );
    assert!(
        reads
            .decisions_since(t0 + 2, 0, 10)
            .await
            .unwrap()
            .iter()
            .all(|s| s.row.ref_id == "d3"),
        "{name}"
    );

    // 3 decisions, SetOverride, RemoveOverride, Resolve, ListQueue: failed changes left no row.
    let verified = verifier.verify(Some(&key)).await.unwrap();
    assert_eq!(verified.rows, 7, "{name}");
    assert_eq!(verified.keyed_from, Some(1), "{name}");
    assert_eq!(verified.tables_unchecked_from, None, "{name}");
    assert!(
        verifier
            .verify(None)
            .await
            .unwrap_err()
            .contains("pass the chain key"),
        "{name}"
    );
    drop(recorder);

    // A keyed chain is not continued without its key.
    let refused = store::open(&backend, 8, Overflow::Sample, None);
    assert!(
        matches!(&refused, Err(StoreError::Conflict(m)) if m.contains("chain_key_file")),
        "{name}: {:?}",
        refused.err()
    );
    // Nor with another key: it would take none of the chain's overrides on record.
    let other = regionguard::store::ChainKey::new(&[0x42; 32]).unwrap();
    let refused = store::open(&backend, 8, Overflow::Sample, Some(other));
    assert!(
        matches!(&refused, Err(StoreError::Conflict(m)) if m.contains("is not the audit chain's")),
        "{name}: {:?}",
        refused.err()
    );
    // With it, the same chain goes on, and the overrides come back for the engine.
    let reopened = store::open(&backend, 8, Overflow::Sample, Some(key.clone())).unwrap();
    assert_eq!(reopened.overrides.len(), 1, "{name}");
    let row = decision("d4", "acct-2", "DENY", store::now_ms());
    reopened
        .recorder
        .decision(Box::new(move || row), MUST)
        .await
        .unwrap();
    reopened.recorder.flush().await;
    assert_eq!(verifier.verify(Some(&key)).await.unwrap().rows, 8, "{name}");
    // The console's verify, through the port: the same walk and the head it saw.
    let report = reopened.reads.verify(Some(key.clone())).await.unwrap();
    let (ok, lines) = report.lines("the store", None);
    assert!(ok, "{name}: {lines:?}");
    assert!(
        lines[0].starts_with("ok: 8 audit rows verified in the store; head 8:k1:"),
        "{name}: {lines:?}"
    );
    assert!(
        !reopened
            .reads
            .verify(None)
            .await
            .unwrap()
            .lines("x", None)
            .0,
        "{name}: without the key"
    );
}

/// The dashboard's counts after d1 (REVIEW), d2 (DENY), d3 (ALLOW) and d1 again (skipped), all
/// from IR with two reasons each.
async fn assert_counts(reads: &store::Reads, t0: i64, name: &str) {
    let dashboard = reads.dashboard(t0 - store::HOUR_MS).await.unwrap();
    let mut by_verdict = std::collections::BTreeMap::new();
    for (_, verdict, n) in &dashboard.hourly {
        *by_verdict.entry(verdict.as_str()).or_insert(0) += n;
    }
    assert_eq!(
        by_verdict.into_iter().collect::<Vec<_>>(),
        [("ALLOW", 1), ("DENY", 1), ("REVIEW", 1)],
        "{name}: the repeat is not counted"
    );
    assert_eq!(
        dashboard.top_reasons,
        [
            ("ANONYMIZER_TOR".to_owned(), 3),
            ("REGION_SANCTIONED".to_owned(), 3)
        ],
        "{name}"
    );
    assert_eq!(
        dashboard.by_country,
        [
            ("IR".to_owned(), "DENY".to_owned(), 1),
            ("IR".to_owned(), "REVIEW".to_owned(), 1)
        ],
        "{name}"
    );
    assert_eq!(
        (dashboard.queue_open, dashboard.oldest_open_ms),
        (1, Some(t0)),
        "{name}"
    );
    // Nothing before the range asked for.
    let later = reads.dashboard(t0 + 2 * store::HOUR_MS).await.unwrap();
    assert!(
        later.hourly.is_empty() && later.top_reasons.is_empty(),
        "{name}"
    );
}

/// The part of a decision_counts migration that counts the rows already recorded.
fn backfill(migration: &str) -> &str {
    let at = migration
        .find("INSERT INTO decision_counts")
        .expect("the migration counts existing rows");
    // The statement before it (SQLite's split is a WITH … INSERT) starts after CREATE TABLE's end.
    let start = migration[..at].rfind(");").map_or(at, |i| i + 2);
    &migration[start..]
}

/// Writes d1 (REVIEW), d2 (DENY), d3 (ALLOW) and d1 again, and waits for the commit.
async fn three_decisions(backend: &Backend, key: Option<ChainKey>) -> (store::Opened, i64) {
    let opened = store::open(backend, 64, Overflow::Sample, key).unwrap();
    let t0 = store::now_ms() - 10_000;
    for (i, (id, verdict)) in [
        ("d1", "REVIEW"),
        ("d2", "DENY"),
        ("d3", "ALLOW"),
        ("d1", "REVIEW"),
    ]
    .into_iter()
    .enumerate()
    {
        let row = decision(id, "acct-1", verdict, t0 + i as i64);
        opened
            .recorder
            .decision(Box::new(move || row), MUST)
            .await
            .unwrap();
    }
    opened.recorder.flush().await;
    (opened, t0)
}

#[tokio::test]
async fn sqlite_counts_made_by_the_migration_equal_the_writers() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::Sqlite {
        dir: dir.path().to_path_buf(),
    };
    let (opened, t0) = three_decisions(&backend, None).await;
    assert_counts(&opened.reads, t0, "sqlite").await;
    let conn = rusqlite::Connection::open(store::db_path(dir.path())).unwrap();
    let migration = include_str!("../migrations/0003_decision_counts.sql");
    conn.execute_batch(&format!(
        "DELETE FROM decision_counts; {}",
        backfill(migration)
    ))
    .unwrap();
    assert_counts(&opened.reads, t0, "sqlite backfill").await;
    conn.execute_batch(&format!(
        "UPDATE review_queue SET fleet_id = ''; {}",
        fleet_backfill(include_str!("../migrations/0004_queue_fleet.sql"))
    ))
    .unwrap();
    assert_fleet_search(&opened.reads, "sqlite fleet backfill").await;
}

#[tokio::test]
async fn postgres_counts_made_by_the_migration_equal_the_writers() {
    let pg = PgServer::start_new().await;
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::Postgres {
        url: pg.url(),
        spool_dir: dir.path().join("spool"),
        start_without_overrides: false,
    };
    let (opened, t0) = three_decisions(&backend, None).await;
    assert_counts(&opened.reads, t0, "postgres").await;
    let migration = include_str!("../migrations/postgres/0002_decision_counts.sql");
    pg.client()
        .await
        .batch_execute(&format!(
            "DELETE FROM decision_counts; {}",
            backfill(migration)
        ))
        .await
        .unwrap();
    assert_counts(&opened.reads, t0, "postgres backfill").await;
    pg.client()
        .await
        .batch_execute(&format!(
            "UPDATE review_queue SET fleet_id = ''; {}",
            fleet_backfill(include_str!("../migrations/postgres/0003_queue_fleet.sql"))
        ))
        .await
        .unwrap();
    assert_fleet_search(&opened.reads, "postgres fleet backfill").await;
}

#[tokio::test]
async fn sqlite_adapter_passes_the_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    suite(
        Backend::Sqlite { dir: data.clone() },
        Verifier::Sqlite(data),
        "sqlite",
    )
    .await;
}

#[tokio::test]
async fn postgres_adapter_passes_the_store_suite() {
    let pg = PgServer::start_new().await;
    let dir = tempfile::tempdir().unwrap();
    suite(
        Backend::Postgres {
            url: pg.url(),
            spool_dir: dir.path().join("spool"),
            start_without_overrides: false,
        },
        Verifier::Postgres(pg.url()),
        "postgres",
    )
    .await;
}

/// How fast one PostgreSQL writer chains rows of a decision's size (about 1.7 KB of body),
/// and what they take on disk there. Measured, not asserted: it depends on the machine.
#[tokio::test]
async fn postgres_writer_rate_and_bytes_per_row() {
    let pg = PgServer::start_new().await;
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::Postgres {
        url: pg.url(),
        spool_dir: dir.path().join("spool"),
        start_without_overrides: false,
    };
    let opened = store::open(&backend, 10_000, Overflow::Sample, None).unwrap();
    let body = serde_json::json!({ "ip": "5.1.2.3", "pad": "x".repeat(1700) }).to_string();
    const ROWS: usize = 20_000;
    let start = std::time::Instant::now();
    for i in 0..ROWS {
        let row = AuditRow {
            body: body.clone(),
            ..decision(
                &format!("r{i}"),
                &format!("acct-{}", i % 97),
                "DENY",
                store::now_ms(),
            )
        };
        opened
            .recorder
            .decision(Box::new(move || row), MUST)
            .await
            .unwrap();
    }
    opened.recorder.flush().await;
    let took = start.elapsed();
    assert_eq!(opened.recorder.stats().recorded, ROWS as u64);
    let verified = Verifier::Postgres(pg.url()).verify(None).await.unwrap();
    assert_eq!(verified.rows, ROWS as u64);
    let db = pg.client().await;
    let r = db
        .query_one(
            "SELECT pg_total_relation_size('audit_log'), pg_table_size('audit_log') FROM audit_log LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let (total, table): (i64, i64) = (r.get(0), r.get(1));
    support::record(format_args!(
        "postgres writer: {ROWS} rows of {} B body chained in {took:?} ({:.0} rows/s); {} B/row with indexes, {} B/row table",
        body.len(),
        ROWS as f64 / took.as_secs_f64(),
        total / ROWS as i64,
        table / ROWS as i64,
    ));
}

/// A spool left by a run that ended while the database was away is drained at start, in
/// order and before newer rows, a chunk at a time: new decisions do not wait behind it.
#[tokio::test]
async fn postgres_spool_is_drained_in_order_before_newer_rows_without_holding_them() {
    let pg = PgServer::start_new().await;
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    const SPOOLED: usize = 20_000;
    {
        let mut spool = store::spool::Spool::open(&spool_dir).unwrap();
        let rows: Vec<AuditRow> = (0..SPOOLED)
            .map(|i| decision(&format!("s{i:05}"), "acct-s", "DENY", store::now_ms()))
            .collect();
        spool.append(&rows).unwrap();
    }
    let backend = Backend::Postgres {
        url: pg.url(),
        spool_dir: spool_dir.clone(),
        start_without_overrides: false,
    };
    // A small channel: a writer that held it while draining would make these wait.
    let opened = store::open(&backend, 16, Overflow::Sample, None).unwrap();
    assert_eq!(opened.recorder.stats().spool_depth, SPOOLED as u64);
    let mut slowest = std::time::Duration::ZERO;
    for i in 0..200 {
        let row = decision(&format!("n{i:03}"), "acct-n", "DENY", store::now_ms());
        let start = std::time::Instant::now();
        opened
            .recorder
            .decision(Box::new(move || row), MUST)
            .await
            .unwrap();
        slowest = slowest.max(start.elapsed());
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    opened.recorder.flush().await;
    let db = pg.client().await;
    let started = std::time::Instant::now();
    while opened.recorder.stats().spool_depth > 0 && started.elapsed().as_secs() < 30 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let ids: Vec<String> = db
        .query("SELECT ref_id FROM audit_log ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected: Vec<String> = (0..SPOOLED)
        .map(|i| format!("s{i:05}"))
        .chain((0..200).map(|i| format!("n{i:03}")))
        .collect();
    assert!(
        ids == expected,
        "spooled rows first, in order, then the new ones"
    );
    assert_eq!(
        std::fs::metadata(spool_dir.join("regionguard-spool.jsonl"))
            .unwrap()
            .len(),
        0
    );
    support::record(format_args!(
        "postgres spool: {SPOOLED} rows drained at start; the slowest of 200 new decisions meanwhile waited {slowest:?} for the writer"
    ));
    assert!(
        slowest < std::time::Duration::from_millis(500),
        "{slowest:?}"
    );
    assert_eq!(
        Verifier::Postgres(pg.url())
            .verify(None)
            .await
            .unwrap()
            .rows,
        SPOOLED as u64 + 200
    );
}

/// Replicas starting at once on an empty database: the migrations are applied once (under the
/// advisory lock) and every one of them opens the store.
#[tokio::test]
async fn postgres_replicas_starting_together_migrate_once() {
    let pg = PgServer::start_new().await;
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let starts: Vec<_> = (0..4)
        .map(|i| {
            let backend = Backend::Postgres {
                url: url.clone(),
                spool_dir: dir.path().join(format!("spool-{i}")),
                start_without_overrides: false,
            };
            std::thread::spawn(move || {
                store::open(&backend, 8, Overflow::Sample, None)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    for start in starts {
        start.join().unwrap().unwrap();
    }
    let db = pg.client().await;
    let applied: i64 = db
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    let shipped = std::fs::read_dir("migrations/postgres").unwrap().count() as i64;
    assert_eq!(applied, shipped, "each shipped version once");
}
