//! Several replicas, one truth: real `regionguard serve` processes sharing usage history through
//! a throwaway `redis-server`, with Redis killed and restarted under load.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use regionguard::grpc::pb;
use support::postgres::PgServer;
use support::redis::RedisServer;
use support::replica::Replica;

/// A replica on one Redis (and, given, one PostgreSQL: the store too).
async fn replica(dir: &Path, name: &str, usage: &str, store: &str) -> Replica {
    Replica::start(dir, name, &format!("[usage]\n{usage}\n{store}")).await
}

async fn report(replica: &Replica, events: Vec<pb::UsageEvent>) -> pb::ReportSummary {
    replica
        .usage()
        .await
        .report(tokio_stream::iter(events))
        .await
        .unwrap()
        .into_inner()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The US, GB, DE (IPv6) and NL (a Tor exit) in the fixture databases.
const HOPS: [&str; 4] = ["24.1.2.3", "81.2.69.170", "2001:db8:1::5", "65.1.0.1"];

fn hop(account: &str, i: usize, now: i64) -> pb::UsageEvent {
    pb::UsageEvent {
        account_id: account.into(),
        ip: HOPS[i % HOPS.len()].into(),
        timestamp_unix_ms: now - 5 * 3_600_000 + i as i64 * 6 * 60_000,
        api_key_id: format!("key-{}", i % 3),
        request_count: 1,
        payment_fingerprint: "card-hopper".into(),
        ..Default::default()
    }
}

fn ask(account: &str) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        ip: HOPS[0].into(),
        account: Some(pb::Account {
            account_id: account.into(),
            payment_fingerprint: "card-hopper".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Classifies until the usage summary shows `requests` requests in 24 h (writes are batched and
/// reads cached for `redis_cache_ms`).
async fn settled(replica: &Replica, account: &str, requests: u64) -> pb::ClassifyResponse {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = replica
            .classifier()
            .await
            .classify(ask(account))
            .await
            .unwrap()
            .into_inner();
        let seen = answer.usage.as_ref().map_or(0, |u| u.requests_24h);
        if seen == requests || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn reasons(answer: &pb::ClassifyResponse) -> Vec<String> {
    let mut codes: Vec<String> = answer.reasons.iter().map(|r| r.code.clone()).collect();
    codes.sort();
    codes
}

/// Two replicas on one Redis and one PostgreSQL, usage split between them round-robin: the same
/// counts, reasons and score as one replica that saw everything; each replica's decisions are in
/// the shared store, Explain on either gives the answer as the other made it, and the one chain
/// verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_split_between_two_replicas_counts_as_on_one() {
    let redis = RedisServer::start();
    let pg = PgServer::start_new().await;
    let dir = tempfile::tempdir().unwrap();
    let shared = format!("redis_url = \"{}\"\nredis_cache_ms = 200", redis.url());
    let store = |name: &str| {
        format!(
            "[store]\npostgres_url = {:?}\ndata_dir = {:?}\n[[auth.callers]]\nname = \"rita\"\nrole = \"reviewer\"\ntoken_sha256 = {:?}\n",
            pg.url(),
            dir.path()
                .join(format!("{name}-spool"))
                .display()
                .to_string(),
            regionguard::auth::token_sha256(REVIEWER)
        )
    };
    let a = replica(dir.path(), "a", &shared, &store("a")).await;
    let b = replica(dir.path(), "b", &shared, &store("b")).await;
    let alone = replica(dir.path(), "alone", "enabled = true", "").await;

    let now = now_ms();
    let events: Vec<pb::UsageEvent> = (0..50).map(|i| hop("hopper", i, now)).collect();
    let (even, odd): (Vec<_>, Vec<_>) = events
        .iter()
        .cloned()
        .enumerate()
        .partition(|(i, _)| i % 2 == 0);
    let strip = |v: Vec<(usize, pb::UsageEvent)>| v.into_iter().map(|(_, e)| e).collect::<Vec<_>>();
    assert_eq!(report(&a, strip(even)).await.accepted, 25);
    assert_eq!(report(&b, strip(odd)).await.accepted, 25);
    assert_eq!(report(&alone, events).await.accepted, 50);

    let one = settled(&alone, "hopper", 50).await;
    let on_a = settled(&a, "hopper", 50).await;
    let on_b = settled(&b, "hopper", 50).await;
    let usage = one.usage.clone().unwrap();
    assert_eq!(usage.requests_24h, 50);
    assert_eq!(usage.distinct_countries_24h, 4);
    assert!(
        reasons(&one).contains(&"USAGE_COUNTRY_HOPPING".to_owned()),
        "{:?}",
        reasons(&one)
    );
    for (name, answer) in [("a", &on_a), ("b", &on_b)] {
        assert_eq!(
            answer.usage.as_ref(),
            Some(&usage),
            "replica {name} counts as one replica does"
        );
        assert_eq!(
            reasons(answer),
            reasons(&one),
            "replica {name} gives the same reasons"
        );
        assert_eq!(
            (answer.verdict, answer.risk_score),
            (one.verdict, one.risk_score)
        );
        assert!(!answer.usage.as_ref().unwrap().degraded);
    }
    // A decision made on A, explained by B from the shared store, with the usage it saw.
    let explained = explain(&b, &on_a.decision_id).await;
    assert_eq!(
        explained.usage.as_ref(),
        Some(&usage),
        "B explains A's decision as A answered it"
    );
    let explained = explain(&a, &on_b.decision_id).await;
    assert_eq!(reasons(&explained), reasons(&on_b));
    let verify = Command::new(env!("CARGO_BIN_EXE_regionguard"))
        .args(["audit", "verify", "--postgres-url", &pg.url()])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    support::record(format_args!(
        "two replicas on one Redis and one PostgreSQL: {} requests, {} countries, reasons {:?} on each, as on one replica; {}",
        usage.requests_24h,
        usage.distinct_countries_24h,
        reasons(&one),
        String::from_utf8_lossy(&verify.stdout).trim()
    ));
}

const REVIEWER: &str = "rita-reviewer-token";

/// The answer a stored decision gave, through the Review API (waiting for the deciding
/// replica's writer to commit it).
async fn explain(replica: &Replica, decision_id: &str) -> pb::ClassifyResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut request = tonic::Request::new(pb::ExplainRequest {
            decision_id: decision_id.into(),
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {REVIEWER}").parse().unwrap(),
        );
        match replica.review().await.explain(request).await {
            Ok(record) => {
                return record
                    .into_inner()
                    .decision
                    .expect("the decision as answered");
            }
            Err(status) if status.code() == tonic::Code::NotFound && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("explain {decision_id}: {status}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_degrades_and_recovers() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let replica = replica(
        dir.path(),
        "r",
        &format!("redis_url = \"{}\"\nredis_cache_ms = 50", redis.url()),
        "",
    )
    .await;
    let now = now_ms();
    report(&replica, (0..12).map(|i| hop("before", i, now)).collect()).await;
    assert_eq!(
        settled(&replica, "before", 12)
            .await
            .usage
            .unwrap()
            .requests_24h,
        12
    );

    // Four clients classify for ~3 s; Redis dies after 0.8 s and is back at 2 s.
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..4 {
        let mut client = replica.classifier().await;
        workers.push(tokio::spawn(async move {
            let (mut latencies, mut degraded, mut failed) = (Vec::new(), 0u32, 0u32);
            let mut i = 0u32;
            while started.elapsed() < Duration::from_secs(3) {
                let t = Instant::now();
                match client.classify(ask(&format!("load-{w}-{}", i % 40))).await {
                    Ok(answer) => {
                        let answer = answer.into_inner();
                        degraded += u32::from(answer.usage.is_some_and(|u| u.degraded));
                    }
                    Err(_) => failed += 1,
                }
                latencies.push(t.elapsed());
                i += 1;
            }
            (latencies, degraded, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    redis.restart();
    let (mut latencies, mut degraded, mut failed) = (Vec::new(), 0, 0);
    for worker in workers {
        let (l, d, f) = worker.await.unwrap();
        latencies.extend(l);
        degraded += d;
        failed += f;
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    support::record(format_args!(
        "redis killed under load: {} calls, {failed} failed, {degraded} degraded, p50 {:?}, p99 {p99:?}, max {:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies.last().unwrap()
    ));
    assert_eq!(failed, 0, "no call fails while Redis is down");
    assert!(degraded > 0, "answers made without Redis say so");
    // The budget is 5 ms; the bound leaves room for a debug build on a shared 2-core machine,
    // and is far below any stall (the request timeout is 30 s).
    assert!(p99 < Duration::from_millis(250), "p99 {p99:?}");
    assert!(replica.metric("regionguard_usage_backend_errors_total") > 0.0);
    assert!(replica.metric("regionguard_usage_degraded_reads_total") > 0.0);

    // Back without restarting regionguard: new history is written and read again.
    let now = now_ms();
    report(&replica, (0..7).map(|i| hop("after", i, now)).collect()).await;
    let after = settled(&replica, "after", 7).await;
    let usage = after.usage.unwrap();
    assert_eq!(
        usage.requests_24h, 7,
        "history works again once Redis is back"
    );
    assert!(!usage.degraded);
}
