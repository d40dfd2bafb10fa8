//! Usage history in Redis against the in-process default, over the wire (real binaries):
//! - Classify for accounts with usage history, 64 in flight, the two servers in alternating
//!   rounds of the same run: throughput ratio and p99;
//! - `Usage/Report` into Redis from one replica: events/s until Redis holds them all;
//! - Redis memory per tracked account (`INFO memory`), one-event and dense.
//!
//! `cargo bench --bench replicas` (release; a throwaway redis-server on a free port). Servers on
//! core 0, the load generator on core 1 when `taskset` exists. Under `cargo test` it runs a few
//! hundred calls as a smoke test.

#[path = "support/load.rs"]
mod load;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use regionguard::grpc::pb::{self, classifier_client::ClassifierClient, usage_client::UsageClient};
use support::redis::RedisServer;

use load::{Server, cpu_seconds, median, metric};

async fn start(dir: &Path, name: &str, usage: &str) -> Server {
    load::start(dir, name, &format!("[usage]\n{usage}")).await
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Account `a`'s address: its own /24 in real address space (a fixed LCG).
fn address(a: u32) -> String {
    let x = a.wrapping_mul(2_654_435_761) | 0x0100_0000;
    std::net::Ipv4Addr::from(x & 0xffff_ff00 | (a % 200 + 1)).to_string()
}

fn event(a: u32, ms: i64) -> pb::UsageEvent {
    pb::UsageEvent {
        account_id: format!("acct-{a:07}"),
        ip: address(a),
        timestamp_unix_ms: ms,
        api_key_id: format!("key-{a}"),
        request_count: 1,
        input_tokens: 900,
        output_tokens: 300,
        model: "model-large".into(),
        payment_fingerprint: format!("card-{}", a / 2),
        user_agent: "sdk/1.0".into(),
        ..Default::default()
    }
}

/// Reports `events` over `streams` concurrent Report streams; the events accepted.
async fn report(server: &Server, events: Vec<pb::UsageEvent>, streams: usize) -> u64 {
    let chunk = events.len().div_ceil(streams.max(1)).max(1);
    let mut tasks = Vec::new();
    for part in events.chunks(chunk) {
        let (mut client, part) = (UsageClient::new(server.channel.clone()), part.to_vec());
        tasks.push(tokio::spawn(async move {
            client
                .report(tokio_stream::iter(part))
                .await
                .unwrap()
                .into_inner()
                .accepted
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await.unwrap();
    }
    accepted
}

/// Waits until the server has written `events` to Redis.
async fn written(server: &Server, events: f64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric(server, "regionguard_usage_written_events") < events {
        assert!(Instant::now() < deadline, "Redis writes did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Classify for accounts with history (API requests with billing country), `in_flight` at once.
async fn classify_round(
    server: &Server,
    accounts: u32,
    in_flight: usize,
    duration: Duration,
) -> load::Round {
    let client = ClassifierClient::new(server.channel.clone());
    load::round(in_flight, duration, move |worker, i| {
        let mut client = client.clone();
        let a = (worker as u32).wrapping_add((i as u32).wrapping_mul(7919)) % accounts;
        async move {
            let request = pb::ClassifyRequest {
                ip: address(a),
                account: Some(pb::Account {
                    account_id: format!("acct-{a:07}"),
                    billing_country: "DE".into(),
                    payment_fingerprint: format!("card-{}", a / 2),
                    ..Default::default()
                }),
                ..Default::default()
            };
            client.classify(request).await.is_ok()
        }
    })
    .await
}

fn redis_cpu_seconds(redis: &RedisServer) -> f64 {
    redis.info("used_cpu_user").unwrap_or(0.0) + redis.info("used_cpu_sys").unwrap_or(0.0)
}

/// Redis bytes per account for `accounts` accounts of `events_each` events 5 minutes apart.
async fn bytes_per_account(
    redis: &RedisServer,
    server: &Server,
    accounts: u32,
    events_each: i64,
    base: u32,
) -> f64 {
    let before = redis.info("used_memory").unwrap();
    let now = now_ms();
    let events: Vec<pb::UsageEvent> = (0..accounts)
        .flat_map(|a| (0..events_each).map(move |i| event(base + a, now - i * 300_000 - 1000)))
        .collect();
    let total = metric(server, "regionguard_usage_written_events") + events.len() as f64;
    report(server, events, 4).await;
    written(server, total).await;
    (redis.info("used_memory").unwrap() - before) / f64::from(accounts)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let benching = load::pin_load_generator();
    // `REGIONGUARD_BENCH_ACCOUNTS` (default 10,000): fewer accounts are each called more
    // often, so their cached reads are refreshed in the background rather than missed.
    let many = std::env::var("REGIONGUARD_BENCH_ACCOUNTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000u32);
    let (accounts, rounds, round, report_events) = if benching {
        (many, 5, Duration::from_secs(2), 1_000_000usize)
    } else {
        (200, 1, Duration::from_millis(200), 2_000)
    };
    // `REGIONGUARD_BENCH_REDIS_TIMEOUT_MS` sets `redis_timeout_ms` (default 5): on a machine
    // so slow that reads pass 5 ms, most decisions skip Redis (degraded, counted below) and
    // the rounds no longer measure the read path.
    let timeout = std::env::var("REGIONGUARD_BENCH_REDIS_TIMEOUT_MS")
        .map(|ms| format!("redis_timeout_ms = {ms}"))
        .unwrap_or_default();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let memory = start(dir.path(), "memory", "enabled = true").await;
    let remote = start(
        dir.path(),
        "redis",
        &format!("redis_url = \"{}\"\n{timeout}", redis.url()),
    )
    .await;

    // History for every account: 12 events over the last day.
    let now = now_ms();
    let history: Vec<pb::UsageEvent> = (0..accounts)
        .flat_map(|a| (0..12).map(move |i| event(a, now - i * 7_200_000 - 1000)))
        .collect();
    let seeded = history.len();
    assert_eq!(report(&memory, history.clone(), 4).await, seeded as u64);
    assert_eq!(report(&remote, history, 4).await, seeded as u64);
    written(&remote, seeded as f64).await;

    let (mut ratio, mut rates, mut p99s, mut cpus) = (
        Vec::new(),
        [Vec::new(), Vec::new()],
        [Vec::new(), Vec::new()],
        [Vec::new(), Vec::new()],
    );
    let mut errors = 0;
    let mut cold_p99s = Vec::new();
    for r in 0..rounds {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut this = [0.0; 2];
        for i in order {
            let server = if i == 0 { &memory } else { &remote };
            // Each server is measured in steady state, as a replica under continuous traffic
            // runs: after a quarter round of the same calls, not measured. (Straight after the
            // other server's round every Redis cache entry has expired, and the first pass over
            // the accounts waits on Redis; that cold pass is reported apart below.)
            let cold = classify_round(server, accounts, 64, round / 4).await;
            errors += cold.errors;
            if i == 1 {
                cold_p99s.push(cold.p99_us);
            }
            let pid = server.child.id();
            let cpu_before = load::cpu_seconds(pid);
            let got = classify_round(server, accounts, 64, round).await;
            let cpu = load::cpu_seconds(pid) - cpu_before;
            errors += got.errors;
            this[i] = got.rate;
            rates[i].push(got.rate);
            p99s[i].push(got.p99_us);
            cpus[i].push(cpu * 1e6 / got.calls.max(1) as f64);
        }
        ratio.push(this[1] / this[0]);
    }
    let (lo, hi) = (
        ratio.iter().copied().fold(f64::MAX, f64::min),
        ratio.iter().copied().fold(0.0, f64::max),
    );
    println!(
        "\n| Classify, account with history, 64 in flight | calls/s | p99 | server CPU µs/call |"
    );
    println!("| --- | --- | --- | --- |");
    for (i, name) in ["in-process usage", "Redis usage"].iter().enumerate() {
        println!(
            "| {name} | {:.0} | {:.0} µs | {:.1} |",
            median(rates[i].clone()),
            median(p99s[i].clone()),
            median(cpus[i].clone())
        );
    }
    println!(
        "Redis / in-process throughput: {:.2} (median of per-round ratios; rounds {lo:.2}-{hi:.2}); errors {errors}; degraded reads {}",
        median(ratio),
        metric(&remote, "regionguard_usage_degraded_reads")
    );
    println!(
        "Redis usage, the warm-up quarter round after the other server's round (cold cache): p99 {:.0} µs",
        median(cold_p99s)
    );

    // Report into Redis from one replica: until Redis holds every event.
    let now = now_ms();
    let events: Vec<pb::UsageEvent> = (0..report_events as u32)
        .map(|i| {
            event(
                accounts + i % 50_000,
                now - i64::from(i % 3600) * 1000 - 1000,
            )
        })
        .collect();
    let before = metric(&remote, "regionguard_usage_written_events");
    let (server_cpu, redis_cpu) = (cpu_seconds(remote.child.id()), redis_cpu_seconds(&redis));
    let started = Instant::now();
    let accepted = report(&remote, events, 4).await;
    let accepted_in = started.elapsed().as_secs_f64();
    written(&remote, before + accepted as f64).await;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "Usage/Report into Redis: {accepted} events over 4 streams (50,000 accounts) accepted in {accepted_in:.2} s, written in {seconds:.2} s = {:.0} events/s; lost {}; CPU: server {:.2} s, Redis {:.2} s",
        accepted as f64 / seconds,
        metric(&remote, "regionguard_usage_lost_events"),
        cpu_seconds(remote.child.id()) - server_cpu,
        redis_cpu_seconds(&redis) - redis_cpu,
    );

    // Where Redis spent its time, per command (usec_per_call, calls).
    if let Some(stats) = redis.command("INFO commandstats") {
        for line in stats.lines().filter(|l| l.starts_with("cmdstat_")) {
            println!("redis {line}");
        }
    }
    redis.command("FLUSHALL");
    let (one, dense) = if benching {
        (100_000, 1_000)
    } else {
        (500, 10)
    };
    let one_event = bytes_per_account(&redis, &remote, one, 1, 10_000_000).await;
    let dense_bytes = bytes_per_account(&redis, &remote, dense, 288, 20_000_000).await;
    println!(
        "Redis used_memory per account: one event {one_event:.0} B ({one} accounts, with their /24 and card keys); dense (288 events, every 5 min for 24 h) {dense_bytes:.0} B ({dense} accounts)"
    );
    assert_eq!(errors, 0);
}
