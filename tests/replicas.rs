//! Several replicas, one truth: real `regionguard serve` processes sharing usage history through
//! a throwaway `redis-server`, with Redis killed and restarted under load.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use regionguard::grpc::pb::{self, classifier_client::ClassifierClient, usage_client::UsageClient};
use support::redis::RedisServer;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_regionguard");

/// One `regionguard serve` process; killed when dropped.
struct Replica {
    child: Child,
    channel: Channel,
    metrics_port: u16,
}

impl Replica {
    async fn start(dir: &Path, name: &str, usage: &str) -> Self {
        let (port, metrics_port) = (support::free_port(), support::free_port());
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\n\n[usage]\n{usage}\n"),
        )
        .unwrap();
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--policy", "data/policy.toml"])
            .arg("--location-db")
            .arg(dir.join("city.mmdb"))
            .arg("--anonymous-db")
            .arg(dir.join("anonymous.mmdb"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let address = format!("http://127.0.0.1:{port}");
        for _ in 0..400 {
            if let Ok(channel) = Channel::from_shared(address.clone())
                .unwrap()
                .connect()
                .await
            {
                return Self {
                    child,
                    channel,
                    metrics_port,
                };
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("{name} did not start");
    }

    fn classifier(&self) -> ClassifierClient<Channel> {
        ClassifierClient::new(self.channel.clone())
    }

    async fn report(&self, events: Vec<pb::UsageEvent>) -> pb::ReportSummary {
        UsageClient::new(self.channel.clone())
            .report(tokio_stream::iter(events))
            .await
            .unwrap()
            .into_inner()
    }

    /// A metric's value from `/metrics`.
    fn metric(&self, name: &str) -> Option<f64> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn world() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("city.mmdb"), support::fixtures::city_db()).unwrap();
    std::fs::write(
        dir.path().join("anonymous.mmdb"),
        support::fixtures::anonymous_db(),
    )
    .unwrap();
    dir
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_split_between_two_replicas_counts_as_on_one() {
    let redis = RedisServer::start();
    let dir = world();
    let shared = format!("redis_url = \"{}\"\nredis_cache_ms = 200", redis.url());
    let a = Replica::start(dir.path(), "a", &shared).await;
    let b = Replica::start(dir.path(), "b", &shared).await;
    let alone = Replica::start(dir.path(), "alone", "enabled = true").await;

    let now = now_ms();
    let events: Vec<pb::UsageEvent> = (0..50).map(|i| hop("hopper", i, now)).collect();
    let (even, odd): (Vec<_>, Vec<_>) = events
        .iter()
        .cloned()
        .enumerate()
        .partition(|(i, _)| i % 2 == 0);
    let strip = |v: Vec<(usize, pb::UsageEvent)>| v.into_iter().map(|(_, e)| e).collect::<Vec<_>>();
    assert_eq!(a.report(strip(even)).await.accepted, 25);
    assert_eq!(b.report(strip(odd)).await.accepted, 25);
    assert_eq!(alone.report(events).await.accepted, 50);

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
    support::record(format_args!(
        "two replicas on one Redis: {} requests, {} countries, reasons {:?} on each, as on one replica",
        usage.requests_24h,
        usage.distinct_countries_24h,
        reasons(&one)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_degrades_and_recovers() {
    let mut redis = RedisServer::start();
    let dir = world();
    let replica = Replica::start(
        dir.path(),
        "r",
        &format!("redis_url = \"{}\"\nredis_cache_ms = 50", redis.url()),
    )
    .await;
    let now = now_ms();
    replica
        .report((0..12).map(|i| hop("before", i, now)).collect())
        .await;
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
        let mut client = replica.classifier();
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
    assert!(
        replica
            .metric("regionguard_usage_backend_errors")
            .unwrap_or(0.0)
            > 0.0
    );

    // Back without restarting regionguard: new history is written and read again.
    let now = now_ms();
    replica
        .report((0..7).map(|i| hop("after", i, now)).collect())
        .await;
    let after = settled(&replica, "after", 7).await;
    let usage = after.usage.unwrap();
    assert_eq!(
        usage.requests_24h, 7,
        "history works again once Redis is back"
    );
    assert!(!usage.degraded);
}
