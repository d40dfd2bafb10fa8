//! The store in PostgreSQL, on a real throwaway server (`support::postgres::PgServer`) with
//! real replicas (the `regionguard` binary, one process each): overrides made on one apply on
//! the other within a second; the queue, Explain and export on either see both; `audit verify
//! --postgres-url` passes while both write and names a row edited or deleted behind their
//! backs; and with PostgreSQL stopped under load no call fails and no decision that must be
//! kept is lost.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use regionguard::auth::token_sha256;
use regionguard::grpc::pb::{self, Verdict, classifier_client::ClassifierClient};
use support::postgres::PgServer;
use support::replica::Replica;
use support::{codes, request, verdict};
use tonic::Code;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_regionguard");
const ALICE: &str = "alice-reviewer-token";
const SANCTIONED: &str = "5.1.2.3";
const ALLOWED: &str = "216.160.83.57";
const TOR: &str = "65.1.0.1";

/// A replica on the shared database, with its own spool and a reviewer.
async fn pg_replica(dir: &Path, name: &str, url: &str) -> Replica {
    let config = format!(
        "[store]\npostgres_url = {url:?}\ndata_dir = {spool:?}\n\
         [[auth.callers]]\nname = \"alice@compliance\"\nrole = \"reviewer\"\ntoken_sha256 = {token:?}\n",
        spool = dir.join(format!("{name}-spool")).display().to_string(),
        token = token_sha256(ALICE),
    );
    Replica::start(dir, name, &config).await
}

fn as_alice<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {ALICE}").parse().unwrap());
    request
}

fn account(ip: &str, account_id: &str, flow: pb::Flow) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        account: Some(pb::Account {
            account_id: account_id.into(),
            ..Default::default()
        }),
        flow: flow.into(),
        ..request(ip)
    }
}

fn verify(url: &str) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify", "--postgres-url", url])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn queue_ids(replica: &Replica) -> Vec<String> {
    replica
        .review()
        .await
        .list_queue(as_alice(pb::ListQueueRequest {
            status: "all".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .items
        .into_iter()
        .map(|i| i.decision.unwrap().decision.unwrap().decision_id)
        .collect()
}

async fn export_ids(replica: &Replica) -> Vec<String> {
    let mut stream = replica
        .review()
        .await
        .export_decisions(as_alice(pb::ExportDecisionsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(record) = stream.message().await.unwrap() {
        ids.push(record.decision.unwrap().decision_id);
    }
    ids
}

/// Classifies `account` on `replica` until `done` holds for the answer; the time it took.
async fn until(
    replica: &Replica,
    request: &pb::ClassifyRequest,
    done: impl Fn(&pb::ClassifyResponse) -> bool,
) -> Duration {
    let mut client = replica.classifier().await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let answer = client.classify(request.clone()).await.unwrap().into_inner();
        if done(&answer) {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_overrides_queue_export_and_one_verified_chain() {
    let pg = PgServer::start_new().await;
    let dir = tempfile::tempdir().unwrap();
    // Started together: the migrations are applied once, under the advisory lock.
    let url = pg.url();
    let (a, b) = tokio::join!(
        pg_replica(dir.path(), "a", &url),
        pg_replica(dir.path(), "b", &url)
    );
    let db = pg.client().await;
    let version: i64 = db
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    let shipped = std::fs::read_dir("migrations/postgres").unwrap().count() as i64;
    assert_eq!(version, shipped, "every shipped migration applied");

    // Decisions on both replicas; each replica's queue, Explain and export see both.
    let mut ca = a.classifier().await;
    let mut cb = b.classifier().await;
    let on_a = ca
        .classify(account(TOR, "acct-a", pb::Flow::Login))
        .await
        .unwrap()
        .into_inner();
    let on_b = cb
        .classify(account(TOR, "acct-b", pb::Flow::Login))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (verdict(&on_a), verdict(&on_b)),
        (Verdict::Review, Verdict::Review)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    for replica in [&a, &b] {
        let queue = queue_ids(replica).await;
        assert!(
            queue.contains(&on_a.decision_id) && queue.contains(&on_b.decision_id),
            "{queue:?}"
        );
        let exported = export_ids(replica).await;
        assert!(
            exported.contains(&on_a.decision_id) && exported.contains(&on_b.decision_id),
            "{exported:?}"
        );
    }
    let explained = a
        .review()
        .await
        .explain(as_alice(pb::ExplainRequest {
            decision_id: on_b.decision_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(explained.account_id, "acct-b");
    assert_eq!(explained.decision.unwrap(), on_b);

    // An override set on A applies on B within a second, and its removal on B applies on A.
    let probe = account(ALLOWED, "acct-x", pb::Flow::ApiRequest);
    let before = cb.classify(probe.clone()).await.unwrap().into_inner();
    assert_eq!(verdict(&before), Verdict::Allow);
    let set = a
        .review()
        .await
        .set_override(as_alice(pb::SetOverrideRequest {
            scope: "account".into(),
            value: "acct-x".into(),
            action: "DENY".into(),
            reason: "fraud ring".into(),
            expires_at_unix_ms: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    let took = until(&b, &probe, |r| codes(r).contains(&"OVERRIDE_DENY")).await;
    support::record(format_args!(
        "postgres: override set on replica A applied on replica B after {took:?}"
    ));
    assert!(took < Duration::from_secs(1), "{took:?}");
    b.review()
        .await
        .remove_override(as_alice(pb::RemoveOverrideRequest {
            id: set.id.clone(),
            reason: "cleared".into(),
        }))
        .await
        .unwrap();
    let took = until(&a, &probe, |r| !codes(r).contains(&"OVERRIDE_DENY")).await;
    assert!(took < Duration::from_secs(1), "{took:?}");

    // A resolution on B of A's decision: both see it resolved.
    let resolved = b
        .review()
        .await
        .resolve(as_alice(pb::ResolveRequest {
            decision_id: on_a.decision_id.clone(),
            outcome: "cleared".into(),
            note: "known".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.status, "resolved");

    // verify passes while both write.
    let load = |replica: &Replica, tag: &'static str| {
        let addr = replica.addr.clone();
        tokio::spawn(async move {
            let mut client =
                ClassifierClient::new(Channel::from_shared(addr).unwrap().connect().await.unwrap());
            let mut n = 0u32;
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(1500) {
                let ip = if n.is_multiple_of(2) { SANCTIONED } else { TOR };
                client
                    .classify(account(ip, &format!("{tag}-{n}"), pb::Flow::Signup))
                    .await
                    .unwrap();
                n += 1;
            }
            n
        })
    };
    let (la, lb) = (load(&a, "la"), load(&b, "lb"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Trust authentication ignores the password: it is there to show it is never printed.
    let (ok, out) = tokio::task::spawn_blocking({
        let url = pg.url().replace("postgres@", "postgres:s3cret@");
        move || verify(&url)
    })
    .await
    .unwrap();
    assert!(ok, "verify while both replicas write: {out}");
    assert!(out.contains("overrides and review queue match it"), "{out}");
    assert!(
        !out.contains("s3cret") && out.contains("postgres:***@"),
        "{out}"
    );
    let (na, nb) = (la.await.unwrap(), lb.await.unwrap());
    // Every signup decision of both replicas reaches the one chain (the writers may still be
    // catching up on a busy machine).
    let started = Instant::now();
    let per_replica = loop {
        let rows = db
            .query(
                "SELECT substr(account_id, 1, 2), count(*) FROM audit_log WHERE kind = 'decision' AND account_id LIKE 'l_-%' GROUP BY 1 ORDER BY 1",
                &[],
            )
            .await
            .unwrap();
        let counts: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let expected = vec![
            ("la".to_owned(), i64::from(na)),
            ("lb".to_owned(), i64::from(nb)),
        ];
        if counts == expected || started.elapsed() > Duration::from_secs(20) {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        per_replica,
        vec![
            ("la".to_owned(), i64::from(na)),
            ("lb".to_owned(), i64::from(nb))
        ]
    );
    let (ok, out) = verify(&pg.url());
    assert!(ok, "{out}");
    support::record(format_args!(
        "postgres: two replicas wrote {na} + {nb} decisions under load; {}",
        out.lines().next().unwrap_or("")
    ));

    // Replay reads the shared store too: the API ALLOW probes on B would be denied with the
    // US sanctioned.
    let candidate = dir.path().join("candidate.toml");
    std::fs::write(&candidate, support::with_extra_sanctioned("US")).unwrap();
    let replay = Command::new(BIN)
        .args([
            "replay",
            "--since",
            "1h",
            "--postgres-url",
            &pg.url(),
            "--policy",
        ])
        .arg(&candidate)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&replay.stdout);
    assert!(
        replay.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert!(
        report.contains("ALLOW -> DENY") && report.contains("decisions replayed"),
        "{report}"
    );

    // Behind their backs: an edited row is named, then a deleted one.
    let seq: i64 = db
        .query_one(
            "SELECT seq FROM audit_log WHERE kind = 'decision' ORDER BY seq OFFSET 5 LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    db.execute(
        "UPDATE audit_log SET verdict = CASE WHEN verdict = 'DENY' THEN 'ALLOW' ELSE 'DENY' END WHERE seq = $1",
        &[&seq],
    )
    .await
    .unwrap();
    let (ok, out) = verify(&pg.url());
    assert!(!ok);
    assert!(
        out.starts_with(&format!("BROKEN: row seq {seq} (decision ")) && out.contains("(edited)"),
        "{out}"
    );
    db.execute("DELETE FROM audit_log WHERE seq = $1", &[&seq])
        .await
        .unwrap();
    let (ok, out) = verify(&pg.url());
    assert!(!ok);
    assert!(
        out.starts_with(&format!("BROKEN: row seq {seq} is missing (deleted)")),
        "{out}"
    );
    // An override changed around the Review API is named too (once the chain holds again,
    // on a fresh server this would be the first finding; here the chain break comes first).
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_an_override_edited_behind_the_api_and_a_head_cut_from_the_end() {
    let pg = PgServer::start_new().await;
    let dir = tempfile::tempdir().unwrap();
    let a = pg_replica(dir.path(), "a", &pg.url()).await;
    a.review()
        .await
        .set_override(as_alice(pb::SetOverrideRequest {
            scope: "account".into(),
            value: "acct-y".into(),
            action: "DENY".into(),
            reason: "chargebacks".into(),
            expires_at_unix_ms: 0,
        }))
        .await
        .unwrap();
    // The last row: a decision, which the test then cuts from the end of the chain.
    a.classifier()
        .await
        .classify(account(SANCTIONED, "acct-last", pb::Flow::Login))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (ok, out) = verify(&pg.url());
    assert!(ok, "{out}");
    // The head printed, kept outside, and passed back.
    let head = out
        .split("head ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let expect = |head: &str| {
        let out = Command::new(BIN)
            .args([
                "audit",
                "verify",
                "--postgres-url",
                &pg.url(),
                "--expect-head",
                head,
            ])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert!(expect(&head).0, "{head}");
    let (seq, _) = head.split_once(':').unwrap();
    let (ok, out) = expect(&format!("{seq}:{}", "0".repeat(64)));
    assert!(!ok);
    assert!(
        out.starts_with(&format!(
            "BROKEN: row seq {seq} does not have the recorded head hash"
        )),
        "{out}"
    );
    let db = pg.client().await;
    db.execute(
        "DELETE FROM audit_log WHERE seq = (SELECT max(seq) FROM audit_log)",
        &[],
    )
    .await
    .unwrap();
    assert!(verify(&pg.url()).0, "a chain cannot show its end was cut");
    let (ok, out) = expect(&head);
    assert!(!ok);
    assert!(out.contains("recorded as the head is gone"), "{out}");
    db.execute("UPDATE overrides SET action = 'ALLOW'", &[])
        .await
        .unwrap();
    let (ok, out) = verify(&pg.url());
    assert!(!ok);
    assert!(
        out.contains("BROKEN: overrides:")
            && out.contains("action is \"ALLOW\" in the table but \"DENY\" in the audit log"),
        "{out}"
    );
}

/// The listener resyncs every override on reconnect: a change it was never notified of (made
/// here as the writer makes one, the table row with its chained reviewer row, but without
/// NOTIFY) applies once its connection comes back. A row written into the table alone is
/// never enforced: what the audit log does not record did not happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_are_resynced_when_the_listener_reconnects() {
    let mut pg = PgServer::start_new().await;
    let dir = tempfile::tempdir().unwrap();
    let replica = pg_replica(dir.path(), "a", &pg.url()).await;
    let probe = account(ALLOWED, "acct-r", pb::Flow::ApiRequest);
    let db = pg.client().await;
    // Once the listener has listened and made its first resync, its session's last query is
    // the read of the overrides.
    let started = Instant::now();
    loop {
        let listening: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'SELECT%FROM overrides%'",
                &[&regionguard::store::postgres::LISTENER_NAME],
            )
            .await
            .unwrap()
            .get(0);
        if listening == 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the listener never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.execute(
        "INSERT INTO overrides (id, scope, value, action, reviewer, reason, created_at_ms) \
         VALUES ('o-planted', 'account', 'acct-p', 'DENY', 'dba', 'not on record', $1)",
        &[&regionguard::store::now_ms()],
    )
    .await
    .unwrap();
    let planted = account(ALLOWED, "acct-p", pb::Flow::ApiRequest);
    change_on_record_without_notify(&db, "o-quiet", "acct-r").await;
    drop(db);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut client = replica.classifier().await;
    let answer = client.classify(probe.clone()).await.unwrap().into_inner();
    assert!(
        !codes(&answer).contains(&"OVERRIDE_DENY"),
        "not notified, not applied yet"
    );
    pg.stop();
    pg.start();
    let took = until(&replica, &probe, |r| codes(r).contains(&"OVERRIDE_DENY")).await;
    support::record(format_args!(
        "postgres: overrides resynced {took:?} after the database restarted"
    ));
    let answer = client.classify(planted).await.unwrap().into_inner();
    assert!(
        !codes(&answer).contains(&"OVERRIDE_DENY"),
        "an override the audit log does not record is not enforced"
    );
    // Deleted from the table, the recorded override still holds, and is removed through the
    // Review API as it was set; the table row comes back, marked removed.
    let db = pg.client().await;
    db.execute("DELETE FROM overrides WHERE id = 'o-quiet'", &[])
        .await
        .unwrap();
    // The writer reconnects after the restart when it next has work: until then, UNAVAILABLE.
    let started = Instant::now();
    loop {
        let removed = replica
            .review()
            .await
            .remove_override(as_alice(pb::RemoveOverrideRequest {
                id: "o-quiet".into(),
                reason: "done".into(),
            }))
            .await;
        match removed {
            Ok(_) => break,
            Err(status) if status.code() == Code::Unavailable => {
                assert!(started.elapsed() < Duration::from_secs(20), "{status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    until(&replica, &probe, |r| !codes(r).contains(&"OVERRIDE_DENY")).await;
    let removed_by: String = db
        .query_one("SELECT removed_by FROM overrides WHERE id = 'o-quiet'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(removed_by, "alice@compliance");
}

/// Sets a DENY override on `account_id` as the writer does (the table row, and the reviewer row
/// that records it chained after the head, in one transaction), without notifying anyone.
async fn change_on_record_without_notify(db: &tokio_postgres::Client, id: &str, account_id: &str) {
    use regionguard::store::{AuditRow, OverrideRecord, chain::GENESIS};
    let now = regionguard::store::now_ms();
    let record = OverrideRecord {
        id: id.into(),
        scope: "account".into(),
        value: account_id.into(),
        action: "DENY".into(),
        reviewer: "dba".into(),
        reason: "no notify".into(),
        created_at_ms: now,
        expires_at_ms: None,
        removed_at_ms: None,
        removed_by: String::new(),
    };
    let row = AuditRow {
        kind: "review".into(),
        ref_id: format!("quiet-{id}"),
        recorded_at_ms: now,
        actor: "dba".into(),
        reasons: "SetOverride".into(),
        body: serde_json::json!({ "rpc": "SetOverride", "request": {}, "applied": { "override": record } })
            .to_string(),
        ..Default::default()
    };
    // Under the chain's lock, as every writer appends.
    db.batch_execute("BEGIN").await.unwrap();
    db.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&regionguard::store::postgres::CHAIN_LOCK],
    )
    .await
    .unwrap();
    let (seq, prev): (i64, String) = db
        .query_opt(
            "SELECT seq, row_hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .map_or((0, GENESIS.to_owned()), |r| (r.get(0), r.get(1)));
    let hash = row.hash(seq + 1, &prev);
    db.execute(
        "INSERT INTO audit_log (seq, kind, ref_id, recorded_at_ms, actor, account_id, verdict, country, reasons, body, prev_hash, row_hash) \
         VALUES ($1, $2, $3, $4, $5, '', '', '', $6, $7, $8, $9)",
        &[&(seq + 1), &row.kind, &row.ref_id, &now, &row.actor, &row.reasons, &row.body, &prev, &hash],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO overrides (id, scope, value, action, reviewer, reason, created_at_ms) \
         VALUES ($1, 'account', $2, 'DENY', 'dba', 'no notify', $3)",
        &[&id, &account_id, &now],
    )
    .await
    .unwrap();
    db.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_under_load_fails_no_call_and_loses_no_decision_that_must_be_kept() {
    let mut pg = PgServer::start_new().await;
    let dir = tempfile::tempdir().unwrap();
    let replica = pg_replica(dir.path(), "a", &pg.url()).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..4u32 {
        let addr = replica.addr.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut client =
                ClassifierClient::new(Channel::from_shared(addr).unwrap().connect().await.unwrap());
            let (mut kept, mut answered) = (Vec::new(), 0u64);
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // A mix: signup, login, API ALLOW (need not be kept) and API DENY.
                let (ip, flow) = match (worker + i) % 4 {
                    0 => (ALLOWED, pb::Flow::Signup),
                    1 => (ALLOWED, pb::Flow::Login),
                    2 => (ALLOWED, pb::Flow::ApiRequest),
                    _ => (SANCTIONED, pb::Flow::ApiRequest),
                };
                let answer = client
                    .classify(account(ip, &format!("w{worker}-{i}"), flow))
                    .await
                    .unwrap_or_else(|s| panic!("a call failed during the outage: {s}"))
                    .into_inner();
                answered += 1;
                if flow != pb::Flow::ApiRequest || verdict(&answer) != Verdict::Allow {
                    kept.push(answer.decision_id);
                }
                i += 1;
            }
            (kept, answered)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.stop();
    let stopped_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let depth = replica.metric("regionguard_store_spool_depth");
    assert!(depth > 0.0, "must-keep decisions are spooled: {depth}");
    // Reviewer writes fail, clearly, while the database is away.
    let refused = replica
        .review()
        .await
        .set_override(as_alice(pb::SetOverrideRequest {
            scope: "account".into(),
            value: "acct-z".into(),
            action: "ALLOW".into(),
            reason: "contract".into(),
            expires_at_unix_ms: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("PostgreSQL store is unreachable"),
        "{}",
        refused.message()
    );
    // Envoy's Check keeps answering too, and its must-keep decision is spooled.
    let checked = AuthorizationClient::new(replica.channel().await)
        .check(support::envoy::check_request(
            SANCTIONED,
            "/signup",
            &[("x-account-id", "acct-envoy")],
            &[("regionguard.flow", "signup")],
        ))
        .await
        .expect("Check answers during the outage")
        .into_inner();
    let Some(HttpResponse::DeniedResponse(denied)) = checked.http_response else {
        panic!("a sanctioned signup is denied: {checked:?}");
    };
    let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
    let check_id = body["decision_id"].as_str().unwrap().to_owned();
    pg.start();
    let outage = stopped_at.elapsed();
    let returned = Instant::now();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut kept, mut answered) = (vec![check_id], 1);
    for worker in workers {
        let (k, n) = worker.await.unwrap();
        kept.extend(k);
        answered += n;
    }
    // Drained in order within seconds of the database's return.
    let db = pg.client().await;
    let back = Instant::now();
    let missing = loop {
        let found: Vec<String> = db
            .query(
                "SELECT ref_id FROM audit_log WHERE kind = 'decision' AND ref_id = ANY($1)",
                &[&kept],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let missing = kept.len() - found.len();
        if (missing == 0 && replica.metric("regionguard_store_spool_depth") == 0.0)
            || back.elapsed() > Duration::from_secs(10)
        {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        missing,
        0,
        "every must-keep decision reached PostgreSQL ({} of them)",
        kept.len()
    );
    let (ok, out) = verify(&pg.url());
    assert!(ok, "{out}");
    // The Review API's reads reconnected too, and see the spooled decisions.
    let last = kept.last().unwrap().clone();
    let explained = replica
        .review()
        .await
        .explain(as_alice(pb::ExplainRequest {
            decision_id: last.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(explained.decision.unwrap().decision_id, last);
    let row: (i64, i64, i64) = {
        let r = db
            .query_one(
                "SELECT count(*), pg_total_relation_size('audit_log'), pg_table_size('audit_log') FROM audit_log",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    support::record(format_args!(
        "postgres outage of {outage:?} under load: {answered} calls answered, none failed; {} must-keep decisions all in PostgreSQL {:?} after it was back \
         (load went on for 700 ms of that); {} audit rows take {} bytes with indexes ({} B/row; table and TOAST alone {} B/row)",
        kept.len(),
        returned.elapsed(),
        row.0,
        row.1,
        row.1 / row.0.max(1),
        row.2 / row.0.max(1),
    ));
}

/// Decision ids of `kept` found in the audit log of the database at `db`, waited for up to 10 s.
async fn until_stored(db: &tokio_postgres::Client, kept: &[String]) -> usize {
    let started = Instant::now();
    loop {
        let found: i64 = db
            .query_one(
                "SELECT count(*) FROM audit_log WHERE kind = 'decision' AND ref_id = ANY($1)",
                &[&kept],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if found as usize == kept.len() || started.elapsed() > Duration::from_secs(10) {
            return found as usize;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A replica (re)started while PostgreSQL is down serves anyway: with the overrides it last
/// read (kept beside its spool), its must-keep decisions spooled; a replica that never reached
/// its database starts too, with none, and migrates the database when it answers. Once it is
/// back, every spooled decision is in PostgreSQL and both chains verify. (Before, a replica
/// could not start without its database.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_while_postgres_is_down_serves_with_the_overrides_it_last_read() {
    let mut pg = PgServer::start_new().await;
    let fresh_url = format!("postgres://postgres@127.0.0.1:{}/fresh", pg.port());
    pg.client()
        .await
        .batch_execute("CREATE DATABASE fresh")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let held = account(ALLOWED, "acct-held", pb::Flow::ApiRequest);
    {
        let replica = pg_replica(dir.path(), "a", &pg.url()).await;
        replica
            .review()
            .await
            .set_override(as_alice(pb::SetOverrideRequest {
                scope: "account".into(),
                value: "acct-held".into(),
                action: "DENY".into(),
                reason: "case 7".into(),
                expires_at_unix_ms: 0,
            }))
            .await
            .unwrap();
        until(&replica, &held, |r| codes(r).contains(&"OVERRIDE_DENY")).await;
        // The listener's resync after the change keeps its copy beside the spool.
        let copy = dir.path().join("a-spool/regionguard-overrides.json");
        let started = Instant::now();
        while !std::fs::read_to_string(&copy).is_ok_and(|c| c.contains("acct-held")) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "no copy of the overrides"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    pg.stop();

    // A replica that never read the overrides would serve without any: refused, unless the
    // operator says so.
    let config = dir.path().join("refused.toml");
    std::fs::write(
        &config,
        format!(
            "metrics_listen = \"127.0.0.1:{}\"\n[store]\npostgres_url = {fresh_url:?}\ndata_dir = {:?}\n",
            support::free_port(),
            dir.path().join("refused-spool").display().to_string()
        ),
    )
    .unwrap();
    let mut refused = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", support::free_port()),
        ])
        .env("REGIONGUARD_CONFIG", &config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = refused.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = refused.kill();
            panic!("a replica with no copy of the overrides started without its database");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut refused.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("start_without_overrides"), "{stderr}");

    let a = pg_replica(dir.path(), "a", &pg.url()).await;
    let b = {
        let config = format!(
            "[store]\npostgres_url = {fresh_url:?}\ndata_dir = {spool:?}\nstart_without_overrides = true\n",
            spool = dir.path().join("b-spool").display().to_string(),
        );
        Replica::start(dir.path(), "b", &config).await
    };
    let mut client = a.classifier().await;
    let answer = client.classify(held.clone()).await.unwrap().into_inner();
    assert!(
        codes(&answer).contains(&"OVERRIDE_DENY") && verdict(&answer) == Verdict::Deny,
        "the override last read holds: {answer:?}"
    );
    let mut kept = (Vec::new(), Vec::new());
    for i in 0..10 {
        for (replica, ids) in [(&a, &mut kept.0), (&b, &mut kept.1)] {
            let answer = replica
                .classifier()
                .await
                .classify(account(ALLOWED, &format!("s-{i}"), pb::Flow::Signup))
                .await
                .expect("a signup is answered while the database is down")
                .into_inner();
            ids.push(answer.decision_id);
        }
    }
    kept.0.push(answer.decision_id);
    for replica in [&a, &b] {
        let depth = replica.metric("regionguard_store_spool_depth");
        assert!(depth >= 10.0, "must-keep decisions are spooled: {depth}");
    }

    pg.start();
    let found = until_stored(&pg.client().await, &kept.0).await;
    assert_eq!(
        found,
        kept.0.len(),
        "a's spooled decisions reached PostgreSQL"
    );
    let found = until_stored(&pg.connect("fresh").await, &kept.1).await;
    assert_eq!(
        found,
        kept.1.len(),
        "b migrated its database, then drained its spool"
    );
    for url in [pg.url(), fresh_url] {
        let (ok, out) = verify(&url);
        assert!(ok, "{url}: {out}");
    }
}
