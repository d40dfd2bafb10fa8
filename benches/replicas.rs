//! Usage history in Redis against the in-process default, over the wire (real binaries):
//! - Classify for accounts with usage history, 64 in flight, the two servers in alternating
//!   rounds of the same run: throughput ratio and p99;
//! - `Usage/Report` into Redis from one replica: events/s until Redis holds them all;
//! - Redis memory per tracked account (`INFO memory`), one-event and dense.
//!
//! `cargo bench --bench replicas` (release; a throwaway redis-server on a free port). Servers on
//! core 0, the load generator on core 1 when `taskset` exists. Under `cargo test` it runs a few
//! hundred calls as a smoke test.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use regionguard::grpc::pb::{self, classifier_client::ClassifierClient, usage_client::UsageClient};
use support::redis::RedisServer;
use tonic::transport::Channel;

struct Server {
    child: Child,
    channel: Channel,
    metrics_port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pinned(core: &str, bin: &str) -> Command {
    let taskset = Command::new("taskset")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if taskset {
        let mut c = Command::new("taskset");
        c.args(["-c", core, bin]);
        c
    } else {
        Command::new(bin)
    }
}

async fn start(dir: &Path, name: &str, usage: &str) -> Server {
    let (port, metrics_port) = (support::free_port(), support::free_port());
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "metrics_listen = \"127.0.0.1:{metrics_port}\"\ncache_capacity = 0\n[usage]\n{usage}\n"
        ),
    )
    .unwrap();
    let mut child = pinned("0", env!("CARGO_BIN_EXE_regionguard"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--policy", "data/policy.toml"])
        .args(["--location-db", "data/geo-whois-asn-country.mmdb"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    for _ in 0..400 {
        if let Ok(channel) = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
        {
            return Server {
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

fn metric(server: &Server, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", server.metrics_port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
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

struct Round {
    rate: f64,
    p99_us: f64,
    errors: u64,
}

/// Classify for accounts with history (API requests with billing country), `in_flight` at once.
async fn classify_round(
    server: &Server,
    accounts: u32,
    in_flight: usize,
    duration: Duration,
) -> Round {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..in_flight {
        let mut client = ClassifierClient::new(server.channel.clone());
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors, mut a) = (Vec::new(), 0u64, worker as u32);
            while started.elapsed() < duration {
                let request = pb::ClassifyRequest {
                    ip: address(a % accounts),
                    account: Some(pb::Account {
                        account_id: format!("acct-{:07}", a % accounts),
                        billing_country: "DE".into(),
                        payment_fingerprint: format!("card-{}", (a % accounts) / 2),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let t = Instant::now();
                errors += u64::from(client.classify(request).await.is_err());
                latencies.push(t.elapsed().as_nanos() as u64);
                a = a.wrapping_add(7919);
            }
            (latencies, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (l, e) = task.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    all.sort_unstable();
    Round {
        rate: all.len() as f64 / seconds,
        p99_us: all[(all.len() * 99 / 100).min(all.len() - 1)] as f64 / 1000.0,
        errors,
    }
}

/// User + system CPU seconds of a process, from /proc (0 where there is no /proc).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|f| f.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0);
    ticks / 100.0
}

fn redis_cpu_seconds(redis: &RedisServer) -> f64 {
    redis.info("used_cpu_user").unwrap_or(0.0) + redis.info("used_cpu_sys").unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
    let benching = std::env::args().any(|a| a == "--bench");
    if benching && std::env::var_os("REGIONGUARD_LOADGEN_PINNED").is_none() {
        let status = pinned("1", std::env::current_exe().unwrap().to_str().unwrap())
            .args(std::env::args().skip(1))
            .env("REGIONGUARD_LOADGEN_PINNED", "1")
            .status()
            .unwrap();
        std::process::exit(status.code().unwrap_or(1));
    }
    let (accounts, rounds, round, report_events) = if benching {
        (10_000u32, 5, Duration::from_secs(2), 1_000_000usize)
    } else {
        (200, 1, Duration::from_millis(200), 2_000)
    };
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let memory = start(dir.path(), "memory", "enabled = true").await;
    let remote = start(
        dir.path(),
        "redis",
        &format!("redis_url = \"{}\"", redis.url()),
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

    let (mut ratio, mut rates, mut p99s) = (
        Vec::new(),
        [Vec::new(), Vec::new()],
        [Vec::new(), Vec::new()],
    );
    let mut errors = 0;
    for r in 0..rounds {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut this = [0.0; 2];
        for i in order {
            let server = if i == 0 { &memory } else { &remote };
            let got = classify_round(server, accounts, 64, round).await;
            errors += got.errors;
            this[i] = got.rate;
            rates[i].push(got.rate);
            p99s[i].push(got.p99_us);
        }
        ratio.push(this[1] / this[0]);
    }
    let (lo, hi) = (
        ratio.iter().copied().fold(f64::MAX, f64::min),
        ratio.iter().copied().fold(0.0, f64::max),
    );
    println!("\n| Classify, account with history, 64 in flight | calls/s | p99 |");
    println!("| --- | --- | --- |");
    println!(
        "| in-process usage | {:.0} | {:.0} µs |",
        median(rates[0].clone()),
        median(p99s[0].clone())
    );
    println!(
        "| Redis usage | {:.0} | {:.0} µs |",
        median(rates[1].clone()),
        median(p99s[1].clone())
    );
    println!(
        "Redis / in-process throughput: {:.2} (median of per-round ratios; rounds {lo:.2}-{hi:.2}); errors {errors}; degraded reads {}",
        median(ratio),
        metric(&remote, "regionguard_usage_degraded_reads")
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
