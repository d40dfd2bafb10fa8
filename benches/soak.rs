//! Soak: minutes of mixed traffic (Classify, Envoy Check, Usage/Report) against the real server
//! binary while its policy and location database are replaced under it; reports calls, errors
//! (must be 0) and the server's resident memory growth.
//!
//! `cargo bench --bench soak -- --minutes 5 [--usage-mb 64]` (default 2 minutes, 64 MiB of usage
//! history). Under `cargo test` it runs 3 seconds. Every decision is audited: the store grows by
//! about 2.5 GB a minute at this rate, so mind the disk on long runs.

#[path = "../tests/support/envoy.rs"]
mod envoy;
#[path = "../tests/support/fixtures.rs"]
mod fixtures;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use regionguard::grpc::pb::{self, classifier_client::ClassifierClient, usage_client::UsageClient};
use tonic::transport::Channel;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn replace(path: &Path, bytes: &[u8]) {
    let aside = path.with_extension("next");
    std::fs::write(&aside, bytes).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let benching = args.iter().any(|a| a == "--bench");
    let flag = |name: &str, default: f64| -> f64 {
        args.windows(2)
            .find(|w| w[0] == name)
            .and_then(|w| w[1].parse().ok())
            .unwrap_or(default)
    };
    let minutes = flag("--minutes", 2.0);
    // The usage history's ceiling: a small one is reached within minutes, so a run shows the
    // plateau rather than the history filling.
    let usage_mb = flag("--usage-mb", 64.0) as u64;
    let duration = if benching {
        Duration::from_secs_f64(minutes * 60.0)
    } else {
        Duration::from_secs(3)
    };

    let dir = tempfile::tempdir().unwrap();
    let (policy, location) = (dir.path().join("policy.toml"), dir.path().join("city.mmdb"));
    std::fs::write(&policy, regionguard::policy::EMBEDDED_POLICY).unwrap();
    std::fs::write(&location, fixtures::city_db()).unwrap();
    let config = dir.path().join("soak.toml");
    std::fs::write(
        &config,
        format!(
            "metrics_listen = \"127.0.0.1:0\"\nreload_interval_ms = 200\n[usage]\nmax_memory_mb = {usage_mb}\n"
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_regionguard"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--config",
        ])
        .arg(&config)
        .arg("--policy")
        .arg(&policy)
        .arg("--location-db")
        .arg(&location)
        .arg("--data-dir")
        .arg(dir.path().join("store"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _server = Server(child);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (calls, errors, rss_start, rss_end, reloads) = runtime.block_on(async move {
        let addr = format!("http://127.0.0.1:{port}");
        let mut channel = None;
        for _ in 0..400 {
            if let Ok(c) = Channel::from_shared(addr.clone()).unwrap().connect().await {
                channel = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let channel = channel.expect("server up");
        let calls = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let ips = [
            "216.160.83.57",
            "5.1.2.3",
            "175.16.199.10",
            "1.2.3.4",
            "65.1.0.1",
            "71.160.223.9",
            "46.0.1.2",
            "10.0.0.1",
        ];
        let mut tasks = Vec::new();
        for worker in 0..16u64 {
            let (channel, calls, errors) = (channel.clone(), calls.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let mut classifier = ClassifierClient::new(channel.clone());
                let mut gateway = AuthorizationClient::new(channel.clone());
                let mut usage = UsageClient::new(channel);
                let mut i = worker as usize;
                while started.elapsed() < duration {
                    let ip = ips[i % ips.len()];
                    let account = format!("acct-{}", i % 5000);
                    let ok = match i % 10 {
                        0..=5 => {
                            let request = pb::ClassifyRequest {
                                ip: ip.into(),
                                flow: (i % 3) as i32 + 1,
                                account: Some(pb::Account {
                                    account_id: account,
                                    payment_fingerprint: format!("card-{}", i % 700),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            };
                            classifier.classify(request).await.is_ok()
                        }
                        6..=8 => gateway
                            .check(envoy::check_request(
                                ip,
                                "/v1/chat",
                                &[("x-account-id", account.as_str())],
                                &[],
                            ))
                            .await
                            .is_ok(),
                        _ => {
                            let now = SystemTime::now()
                                .duration_since(UNIX_EPOCH)
                                .unwrap()
                                .as_millis() as i64;
                            let events: Vec<pb::UsageEvent> = (0..20)
                                .map(|k| pb::UsageEvent {
                                    account_id: format!("acct-{}", (i + k) % 5000),
                                    ip: ips[(i + k) % ips.len()].into(),
                                    timestamp_unix_ms: now,
                                    request_count: 1,
                                    ..Default::default()
                                })
                                .collect();
                            usage
                                .report(tokio_stream::iter(events))
                                .await
                                .is_ok_and(|r| r.into_inner().rejected == 0)
                        }
                    };
                    calls.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 16;
                }
            }));
        }
        // Warm up, then take the baseline RSS; replace the files under the server while it runs.
        tokio::time::sleep(duration.min(Duration::from_secs(2)) / 2).await;
        let rss_start = rss_kib(pid);
        let mut reloads = 0;
        let without_cn = regionguard::policy::EMBEDDED_POLICY.replacen("  \"CN\",", "", 1);
        // One line a minute, so a long run shows whether resident memory levels off.
        let mut next_sample = started + Duration::from_secs(60);
        while started.elapsed() + Duration::from_millis(500) < duration {
            tokio::time::sleep(Duration::from_millis(700)).await;
            if Instant::now() >= next_sample {
                println!(
                    "soak: minute {:>3}: server RSS {} KiB, {} calls, {} errors",
                    (next_sample - started).as_secs() / 60,
                    rss_kib(pid),
                    calls.load(Ordering::Relaxed),
                    errors.load(Ordering::Relaxed)
                );
                next_sample += Duration::from_secs(60);
            }
            if reloads % 2 == 0 {
                replace(&policy, without_cn.as_bytes());
                replace(&location, &fixtures::city_db_moved());
            } else {
                replace(&policy, regionguard::policy::EMBEDDED_POLICY.as_bytes());
                replace(&location, &fixtures::city_db());
            }
            reloads += 1;
        }
        for task in tasks {
            task.await.unwrap();
        }
        (
            calls.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed),
            rss_start,
            rss_kib(pid),
            reloads,
        )
    });
    println!(
        "soak: {:.1} min, {calls} calls ({:.0}/s), {errors} errors, {reloads} policy+database swaps, server RSS {rss_start} KiB -> {rss_end} KiB ({:+} KiB)",
        duration.as_secs_f64() / 60.0,
        calls as f64 / duration.as_secs_f64(),
        rss_end as i64 - rss_start as i64
    );
    assert_eq!(errors, 0, "the soak must see no failed call");
}
