//! Real traffic over the wire (issue 16): the kinds of call a deployment sends, each alone and
//! mixed, against the health check of the same server as the transport ceiling, store off and
//! store on, with the server's CPU per call (from /proc, so a figure does not hang on the load
//! generator's speed). Then the same calls from h2load (Debian's `nghttp2-client`), an
//! independent client, with request bodies this bench writes.
//!
//! The kinds:
//! - (a) bare: an IP and nothing else;
//! - (b) api: an API request with account id, billing country and payment fingerprint, for
//!   accounts with usage history (12 events each over the last day);
//! - (c) signup: a full account (four countries, created now, card), an organisation with owners
//!   and client hints;
//! - (d) check: Envoy ext_authz `Check` with typical headers (account header, user agent,
//!   language, authorization, request id), the client in `X-Forwarded-For` behind one hop;
//! - (e) forward-auth: the same over HTTP/1.1 keep-alive to `[forward_auth]`, as nginx asks
//!   (`X-Forwarded-For` as nginx's `$proxy_add_x_forwarded_for` makes it);
//! - mix: (a)–(e) in turn.
//!
//! Clients come from 16,384 addresses over the IPv4 space and 2,048 accounts, so the gateway's
//! decision cache (1 s) hits about as often as with real clients. Servers on core 0, this
//! generator and h2load on core 1; 64 calls in flight; rounds alternate the order of the calls,
//! and each figure is the median over rounds (ratios: medians of per-round ratios).
//!
//! `cargo bench --bench mix`. Under `cargo test` it smoke-tests every kind once, briefly.

#[path = "../tests/support/envoy.rs"]
mod envoy;
#[path = "support/load.rs"]
mod load;
#[path = "support/requests.rs"]
mod requests;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use prost::Message;
use regionguard::grpc::pb::{self, classifier_client::ClassifierClient, usage_client::UsageClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use requests::{ACCOUNTS, LANGUAGE, USER_AGENT, address, api_request, signup_request};

const IN_FLIGHT: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Echo,
    Bare,
    Api,
    Signup,
    Check,
    ForwardAuth,
    Mix,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Echo,
        Kind::Bare,
        Kind::Api,
        Kind::Signup,
        Kind::Check,
        Kind::ForwardAuth,
        Kind::Mix,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Echo => "health check (ceiling)",
            Kind::Bare => "(a) bare IP",
            Kind::Api => "(b) API request, account with history",
            Kind::Signup => "(c) signup, full account",
            Kind::Check => "(d) Envoy Check with headers",
            Kind::ForwardAuth => "(e) forward-auth (HTTP/1.1)",
            Kind::Mix => "mix of (a)-(e)",
        }
    }
}

fn check_request(n: u32) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    let a = n % ACCOUNTS;
    let (client, account, request_id) = (address(n), format!("acct-{a:05}"), format!("req-{n}"));
    envoy::check_request(
        "10.0.0.2",
        "/v1/chat/completions",
        &[
            ("x-forwarded-for", client.as_str()),
            ("x-account-id", account.as_str()),
            ("user-agent", USER_AGENT),
            ("accept-language", LANGUAGE),
            (
                "authorization",
                "Bearer sk-live-0000000000000000000000000000",
            ),
            ("content-type", "application/json"),
            ("x-request-id", request_id.as_str()),
            ("x-forwarded-proto", "https"),
        ],
        &[],
    )
}

fn forward_auth_request(n: u32) -> String {
    let a = n % ACCOUNTS;
    format!(
        "GET /check HTTP/1.1\r\nHost: auth\r\nX-Forwarded-For: {}, 10.0.0.2\r\nX-Original-URI: /v1/chat/completions\r\nX-Original-Method: POST\r\nx-account-id: acct-{a:05}\r\nUser-Agent: {USER_AGENT}\r\nAccept-Language: {LANGUAGE}\r\n\r\n",
        address(n)
    )
}

/// One HTTP/1.1 keep-alive connection to the forward-auth listener.
struct Http {
    stream: tokio::net::TcpStream,
    buffer: Vec<u8>,
}

impl Http {
    async fn connect(port: u16) -> Self {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            buffer: Vec::with_capacity(4096),
        }
    }

    /// Sends `request` and reads the answer; its status.
    async fn call(&mut self, request: &str) -> Option<u16> {
        self.stream.write_all(request.as_bytes()).await.ok()?;
        self.buffer.clear();
        loop {
            if let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buffer[..end]).ok()?;
                let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while self.buffer.len() < end + 4 + length {
                    let mut chunk = [0u8; 4096];
                    let n = self.stream.read(&mut chunk).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    self.buffer.extend_from_slice(&chunk[..n]);
                }
                return Some(status);
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }
}

struct Target {
    server: load::Server,
    forward_auth: u16,
    store: bool,
}

async fn start(dir: &Path, store: bool) -> Target {
    let forward_auth = load::free_port();
    let name = if store { "store-on" } else { "store-off" };
    let mut config = format!(
        "[gateway]\ntrusted_hops = 1\n[forward_auth]\nlisten = \"127.0.0.1:{forward_auth}\"\n"
    );
    if store {
        let data = dir.join(name);
        std::fs::create_dir_all(&data).unwrap();
        config.push_str(&format!(
            "[store]\ndata_dir = {:?}\n",
            data.to_str().unwrap()
        ));
    }
    let server = load::start(dir, name, &config).await;
    // Usage history for every account: 12 events over the last day.
    let events = requests::history(requests::now_secs() * 1000);
    let expected = events.len() as u64;
    let summary = UsageClient::new(server.channel.clone())
        .report(tokio_stream::iter(events))
        .await
        .expect("usage seeded")
        .into_inner();
    assert_eq!(summary.accepted, expected, "{summary:?}");
    Target {
        server,
        forward_auth,
        store,
    }
}

/// One round of `kind` at [`IN_FLIGHT`], with the server's CPU over it.
async fn round(target: &Target, kind: Kind, duration: Duration, offset: u32) -> (load::Round, f64) {
    let channel = target.server.channel.clone();
    let port = target.forward_auth;
    let connections: Arc<Vec<tokio::sync::Mutex<Option<Http>>>> = Arc::new(
        (0..IN_FLIGHT)
            .map(|_| tokio::sync::Mutex::new(None))
            .collect(),
    );
    let pid = target.server.child.id();
    let cpu = load::cpu_seconds(pid);
    let result = load::round(IN_FLIGHT, duration, move |worker, i| {
        let channel = channel.clone();
        let connections = connections.clone();
        async move {
            let n = offset
                .wrapping_add(worker as u32)
                .wrapping_add((i as u32).wrapping_mul(IN_FLIGHT as u32));
            let kind = match kind {
                Kind::Mix => [
                    Kind::Bare,
                    Kind::Api,
                    Kind::Signup,
                    Kind::Check,
                    Kind::ForwardAuth,
                ][(n as usize) % 5],
                other => other,
            };
            call(kind, n, channel, port, &connections[worker]).await
        }
    })
    .await;
    let cpu = load::cpu_seconds(pid) - cpu;
    let per_call_us = if result.calls > 0 {
        cpu / result.calls as f64 * 1e6
    } else {
        0.0
    };
    (result, per_call_us)
}

async fn call(
    kind: Kind,
    n: u32,
    channel: tonic::transport::Channel,
    port: u16,
    connection: &tokio::sync::Mutex<Option<Http>>,
) -> bool {
    match kind {
        Kind::Echo => HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok(),
        Kind::Bare => ClassifierClient::new(channel)
            .classify(pb::ClassifyRequest {
                ip: address(n),
                ..Default::default()
            })
            .await
            .is_ok(),
        Kind::Api => ClassifierClient::new(channel)
            .classify(api_request(n))
            .await
            .is_ok(),
        Kind::Signup => ClassifierClient::new(channel)
            .classify(signup_request(n))
            .await
            .is_ok(),
        Kind::Check => AuthorizationClient::new(channel)
            .check(check_request(n))
            .await
            .is_ok(),
        Kind::ForwardAuth => {
            let mut slot = connection.lock().await;
            if slot.is_none() {
                *slot = Some(Http::connect(port).await);
            }
            let status = slot.as_mut().unwrap().call(&forward_auth_request(n)).await;
            if status.is_none() {
                *slot = None;
            }
            // 200 allowed, 403 denied: both are answers.
            matches!(status, Some(200 | 403))
        }
        Kind::Mix => unreachable!("a mix is made of the other kinds"),
    }
}

/// A gRPC request body as it goes on the wire: the 5-byte frame prefix, then the message.
fn grpc_body(message: &impl Message) -> Vec<u8> {
    let bytes = message.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    body.extend_from_slice(&bytes);
    body
}

fn h2load_installed() -> bool {
    Command::new("h2load")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// h2load's answer for one call: requests/s, p50 and p99 µs (from its per-request log), and
/// requests that did not get a 2xx.
struct H2load {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    failed: u64,
}

fn h2load(
    dir: &Path,
    name: &str,
    url: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
    seconds: u32,
) -> H2load {
    let log = dir.join(format!("{name}.log"));
    let mut command = load::pinned("1", "h2load");
    command
        .args(["-c", "4", "-m", "16", "-t", "1"])
        .arg(format!("--duration={seconds}"))
        .arg("--warm-up-time=1")
        .arg(format!("--log-file={}", log.display()));
    if let Some(body) = body {
        let file = dir.join(format!("{name}.bin"));
        std::fs::write(&file, body).unwrap();
        command.arg(format!("--data={}", file.display())).args([
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
        ]);
    }
    for (k, v) in headers {
        command.args(["-H", &format!("{k}: {v}")]);
    }
    let output = command.arg(url).output().expect("h2load runs");
    let text = String::from_utf8_lossy(&output.stdout);
    let rate = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    let succeeded_2xx: u64 = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(0);
    let done: u64 = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| {
            l.split(", ")
                .find(|p| p.ends_with(" done"))?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let mut latencies: Vec<f64> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    if rate == 0.0 {
        eprintln!(
            "h2load {name}: {text}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    H2load {
        rate,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        failed: done.saturating_sub(succeeded_2xx),
    }
}

/// Per round: rates, p99s, server CPU per call, and the ratios of throughput and of p99 to the
/// health check's in the same round.
type Figures = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

/// An h2load case: its name, URL, gRPC body (none: plain HTTP) and headers.
type H2Case = (
    &'static str,
    String,
    Option<Vec<u8>>,
    Vec<(&'static str, String)>,
);

fn range(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(0.0, f64::max),
    )
}

/// `REGIONGUARD_MIX_PROFILE=<kind>[,store]` (kind: health, bare, api, signup, check,
/// forward-auth, mix): one kind for 30 s against one server, its pid printed first, for a
/// profiler to attach to (`perf record -p PID`); then calls/s and server CPU per call.
async fn profile(dir: &Path, which: &str) {
    let (name, store) = match which.split_once(',') {
        Some((name, "store")) => (name, true),
        _ => (which, false),
    };
    let kind = match name {
        "health" => Kind::Echo,
        "bare" => Kind::Bare,
        "api" => Kind::Api,
        "signup" => Kind::Signup,
        "check" => Kind::Check,
        "forward-auth" => Kind::ForwardAuth,
        "mix" => Kind::Mix,
        other => panic!("REGIONGUARD_MIX_PROFILE: no kind {other:?}"),
    };
    let target = start(dir, store).await;
    let _ = round(&target, kind, Duration::from_secs(1), 0).await;
    println!("server pid {}", target.server.child.id());
    let (got, cpu_us) = round(&target, kind, Duration::from_secs(30), 7).await;
    println!(
        "{}: {:.0} calls/s, p99 {:.0} µs, server CPU {cpu_us:.1} µs/call, {} errors",
        kind.name(),
        got.rate,
        got.p99_us,
        got.errors
    );
}

fn main() {
    let benching = load::pin_load_generator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let (rounds, duration) = if benching {
            (5, Duration::from_secs(2))
        } else {
            println!("(smoke run under cargo test: debug build, short runs; the figures are not measurements)");
            (1, Duration::from_millis(150))
        };
        if let Ok(which) = std::env::var("REGIONGUARD_MIX_PROFILE") {
            return profile(dir.path(), &which).await;
        }
        for store in [false, true] {
            let target = start(dir.path(), store).await;
            let label = if target.store { "store on (SQLite)" } else { "store off" };
            // Per kind: rates, p99s, CPU per call; ratios to the health check of the same round.
            let mut figures: Vec<Figures> = vec![Default::default(); Kind::ALL.len()];
            let _ = round(&target, Kind::Mix, Duration::from_millis(300), 0).await; // warm-up
            for r in 0..rounds {
                let mut order: Vec<usize> = (0..Kind::ALL.len()).collect();
                order.rotate_left(r % Kind::ALL.len());
                if r % 2 == 1 {
                    order.reverse();
                }
                let mut this = vec![None; Kind::ALL.len()];
                for k in order {
                    let kind = Kind::ALL[k];
                    let (got, cpu_us) =
                        round(&target, kind, duration, (r as u32) * 1_000_003).await;
                    assert_eq!(got.errors, 0, "{label}: {} failed calls of {}", got.errors, kind.name());
                    assert!(got.calls > 0, "{label}: no call of {} answered", kind.name());
                    this[k] = Some((got, cpu_us));
                }
                let (echo, _) = this[0].unwrap();
                for (k, got) in this.iter().enumerate() {
                    let (got, cpu_us) = got.unwrap();
                    let f = &mut figures[k];
                    f.0.push(got.rate);
                    f.1.push(got.p99_us);
                    f.2.push(cpu_us);
                    f.3.push(got.rate / echo.rate);
                    f.4.push(got.p99_us / echo.p99_us);
                }
            }
            println!(
                "\n{label}, {IN_FLIGHT} in flight, medians of {rounds} rounds of {:.1} s (this generator):",
                duration.as_secs_f64()
            );
            println!("| call | calls/s | p99 µs | server CPU µs/call | throughput / health check (rounds) | p99 / health check |");
            println!("| --- | --- | --- | --- | --- | --- |");
            for (k, kind) in Kind::ALL.iter().enumerate() {
                let f = &figures[k];
                let (lo, hi) = range(&f.3);
                println!(
                    "| {} | {:.0} | {:.0} | {:.1} | {:.2} ({lo:.2}-{hi:.2}) | {:.2} |",
                    kind.name(),
                    load::median(f.0.clone()),
                    load::median(f.1.clone()),
                    load::median(f.2.clone()),
                    load::median(f.3.clone()),
                    load::median(f.4.clone()),
                );
            }

            if !h2load_installed() {
                println!("h2load is not installed (Debian: nghttp2-client): its rows are skipped");
                continue;
            }
            let port = target.server.port;
            let grpc = |method: &str| format!("http://127.0.0.1:{port}/{method}");
            let h2_seconds = if benching { 3 } else { 1 };
            let cases: Vec<H2Case> = vec![
                ("health check (ceiling)", grpc("grpc.health.v1.Health/Check"), Some(grpc_body(&HealthCheckRequest { service: String::new() })), vec![]),
                ("(a) bare IP", grpc("regionguard.v1.Classifier/Classify"), Some(grpc_body(&pb::ClassifyRequest { ip: address(77), ..Default::default() })), vec![]),
                ("(b) API request, account with history", grpc("regionguard.v1.Classifier/Classify"), Some(grpc_body(&api_request(77))), vec![]),
                ("(c) signup, full account", grpc("regionguard.v1.Classifier/Classify"), Some(grpc_body(&signup_request(77))), vec![]),
                ("(d) Envoy Check with headers", grpc("envoy.service.auth.v3.Authorization/Check"), Some(grpc_body(&check_request(77))), vec![]),
                (
                    "(e) forward-auth (h2c)",
                    format!("http://127.0.0.1:{}/check", target.forward_auth),
                    None,
                    vec![
                        ("x-forwarded-for", format!("{}, 10.0.0.2", address(77))),
                        ("x-original-uri", "/v1/chat/completions".into()),
                        ("x-original-method", "POST".into()),
                        ("x-account-id", "acct-00077".into()),
                        ("user-agent", USER_AGENT.into()),
                        ("accept-language", LANGUAGE.into()),
                    ],
                ),
            ];
            // The same requests answered OK through this generator first: h2load only sees HTTP
            // statuses, not gRPC's.
            for n in [77u32] {
                for kind in [Kind::Bare, Kind::Api, Kind::Signup, Kind::Check, Kind::ForwardAuth] {
                    let slot = tokio::sync::Mutex::new(None);
                    assert!(call(kind, n, target.server.channel.clone(), target.forward_auth, &slot).await, "{kind:?}");
                }
            }
            println!("\n{label}, h2load (4 connections x 16 streams, {h2_seconds} s after 1 s warm-up; one fixed request per call):");
            println!("| call | requests/s | p50 µs | p99 µs | throughput / health check | p99 / health check | not 2xx |");
            println!("| --- | --- | --- | --- | --- | --- | --- |");
            let mut ceiling: Option<(f64, f64)> = None;
            for (i, (name, url, body, headers)) in cases.iter().enumerate() {
                let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let got = h2load(dir.path(), &format!("{}-{i}", if target.store { "on" } else { "off" }), url, body.as_deref(), &headers, h2_seconds);
                let (rate, p99) = *ceiling.get_or_insert((got.rate, got.p99_us));
                println!(
                    "| {name} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {} |",
                    got.rate, got.p50_us, got.p99_us, got.rate / rate, got.p99_us / p99, got.failed
                );
            }
        }
    });
}
