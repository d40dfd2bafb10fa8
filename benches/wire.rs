//! Over the wire: the real server binary against an independent load generator process, with
//! the transport ceiling measured in the same run and settings: `grpc.health.v1.Health/Check`
//! on the same server (an empty unary call of the same stack) beside `Classifier/Classify`.
//! Ping-pong (1 in flight) and 64 in flight; throughput, p50 and p99 as medians over short
//! rounds in which the two calls alternate, so drift on a shared machine hits both alike.
//!
//! `cargo bench --bench wire` (release). The server is pinned to core 0 and the load generator
//! to core 1 with `taskset` when it exists. Under `cargo test` it only smoke-tests both calls.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use regionguard::grpc::pb::{self, classifier_client::ClassifierClient};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn taskset() -> bool {
    Command::new("taskset")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn start_server(port: u16) -> Server {
    let bin = env!("CARGO_BIN_EXE_regionguard");
    let args = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--policy",
        "data/policy.toml",
        "--location-db",
        "data/geo-whois-asn-country.mmdb",
    ];
    let mut command = if taskset() {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", bin]);
        c
    } else {
        Command::new(bin)
    };
    // No metrics port, no store: the bare decision path.
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .env("REGIONGUARD_CONFIG", "benches/wire.toml")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    Server(command.spawn().expect("server starts"))
}

/// 1024 addresses spread over real address space (a fixed LCG).
fn addresses() -> Vec<String> {
    let mut x: u32 = 0x2545_f491;
    (0..1024)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            std::net::Ipv4Addr::from(x | 0x0100_0000).to_string()
        })
        .collect()
}

#[derive(Clone, Copy)]
enum Call {
    Echo,
    Classify,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Echo => "Health/Check (echo)",
            Call::Classify => "Classifier/Classify",
        }
    }
}

#[path = "support/load.rs"]
mod load;

use load::Round as Run;

/// The median of each figure over rounds (each figure on its own), and all errors.
struct Median {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

impl Median {
    fn of(runs: &[Run]) -> Self {
        let median = |f: fn(&Run) -> f64| load::median(runs.iter().map(f).collect());
        Median {
            rate: median(|r| r.rate),
            p50_us: median(|r| r.p50_us),
            p99_us: median(|r| r.p99_us),
            errors: runs.iter().map(|r| r.errors).sum(),
        }
    }
}

async fn run(channel: Channel, call: Call, in_flight: usize, duration: Duration) -> Run {
    let ips = std::sync::Arc::new(addresses());
    let health = HealthClient::new(channel.clone());
    let classifier = ClassifierClient::new(channel);
    load::round(in_flight, duration, move |worker, i| {
        let (mut health, mut classifier, ips) = (health.clone(), classifier.clone(), ips.clone());
        async move {
            match call {
                Call::Echo => health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .is_ok(),
                Call::Classify => {
                    let request = pb::ClassifyRequest {
                        ip: ips[(worker + i as usize * in_flight) % ips.len()].clone(),
                        ..Default::default()
                    };
                    classifier.classify(request).await.is_ok()
                }
            }
        }
    })
    .await
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    // The load generator on core 1, the server on core 0.
    if benching && taskset() && std::env::var_os("REGIONGUARD_LOADGEN_PINNED").is_none() {
        let status = Command::new("taskset")
            .args(["-c", "1"])
            .arg(std::env::current_exe().unwrap())
            .args(std::env::args().skip(1))
            .env("REGIONGUARD_LOADGEN_PINNED", "1")
            .status()
            .unwrap();
        std::process::exit(status.code().unwrap_or(1));
    }
    // REGIONGUARD_BENCH_PORT: load a server that is already running (e.g. under a profiler).
    let (port, _server) = match std::env::var("REGIONGUARD_BENCH_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        Some(port) => (port, None),
        None => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            (port, Some(start_server(port)))
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let addr = format!("http://127.0.0.1:{port}");
        let mut channel = None;
        for _ in 0..400 {
            if let Ok(c) = Channel::from_shared(addr.clone()).unwrap().tcp_nodelay(true).connect().await {
                channel = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let channel = channel.expect("server up");
        // Short rounds, echo and Classify alternating which goes first, and the median of each
        // figure over the rounds: drift on a shared machine (frequency, neighbours) hits both
        // calls alike instead of whichever happened to run second.
        let (rounds, duration) = if benching { (5, Duration::from_secs(2)) } else { (1, Duration::from_millis(200)) };
        let _ = run(channel.clone(), Call::Classify, 8, Duration::from_millis(500)).await; // warm-up
        if !benching {
            println!("(smoke run under cargo test: debug build, short runs; the figures are not measurements)");
        }
        let mut table = Vec::new();
        for in_flight in [1usize, 64] {
            let (mut echo, mut classify, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..rounds {
                let order = if round % 2 == 0 { [Call::Echo, Call::Classify] } else { [Call::Classify, Call::Echo] };
                for call in order {
                    let r = run(channel.clone(), call, in_flight, duration).await;
                    assert_eq!(r.errors, 0, "{} failed calls", call.name());
                    println!(
                        "round {round}: {} at {in_flight} in flight: {:.0} calls/s, p50 {:.1} µs, p99 {:.1} µs",
                        call.name(), r.rate, r.p50_us, r.p99_us
                    );
                    match call {
                        Call::Echo => echo.push(r),
                        Call::Classify => classify.push(r),
                    }
                }
                let (e, c) = (&echo[round], &classify[round]);
                ratios.push((c.rate / e.rate, c.p99_us / e.p99_us));
            }
            table.push((in_flight, Median::of(&echo), Median::of(&classify), ratios));
        }
        println!("medians of {rounds} rounds of {} s each:", duration.as_secs_f64());
        println!("| call | in flight | calls/s | p50 µs | p99 µs | errors |");
        println!("| --- | --- | --- | --- | --- | --- |");
        for (in_flight, echo, classify, _) in &table {
            for (call, m) in [(Call::Echo, echo), (Call::Classify, classify)] {
                println!("| {} | {in_flight} | {:.0} | {:.1} | {:.1} | {} |", call.name(), m.rate, m.p50_us, m.p99_us, m.errors);
            }
        }
        for (in_flight, echo, classify, ratios) in &table {
            let range = |f: fn(&(f64, f64)) -> f64| {
                let v: Vec<f64> = ratios.iter().map(f).collect();
                (v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(0.0, f64::max))
            };
            let (t_lo, t_hi) = range(|r| r.0);
            let (p_lo, p_hi) = range(|r| r.1);
            println!(
                "ratios at {in_flight} in flight: throughput classify/echo {:.2}, p99 classify/echo {:.2} \
                 (per round: throughput {t_lo:.2}-{t_hi:.2}, p99 {p_lo:.2}-{p_hi:.2})",
                classify.rate / echo.rate,
                classify.p99_us / echo.p99_us
            );
        }
    });
}
