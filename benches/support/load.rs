//! What the over-the-wire benches share: the real server binary pinned to core 0 with a config
//! of the bench's choosing, the load generator re-run on core 1, closed-loop rounds of calls
//! with their latency percentiles, server CPU from /proc, and medians over rounds.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

/// `bin` under `taskset -c core` where taskset exists.
pub fn pinned(core: &str, bin: &str) -> Command {
    let taskset = Command::new("taskset")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
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

/// Under `cargo bench`, re-runs this bench pinned to core 1 (the servers get core 0) and exits
/// with its status; returns whether this is a bench run (not the `cargo test` smoke run).
pub fn pin_load_generator() -> bool {
    let benching = std::env::args().any(|a| a == "--bench");
    if benching && std::env::var_os("REGIONGUARD_LOADGEN_PINNED").is_none() {
        let status = pinned("1", std::env::current_exe().unwrap().to_str().unwrap())
            .args(std::env::args().skip(1))
            .env("REGIONGUARD_LOADGEN_PINNED", "1")
            .status()
            .unwrap();
        std::process::exit(status.code().unwrap_or(1));
    }
    benching
}

/// A server process, killed when dropped.
pub struct Server {
    pub child: Child,
    pub channel: Channel,
    pub port: u16,
    pub metrics_port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free at the time of asking, and never one handed out before in this run:
/// the kernel may give a closed probe's port again at once, and the gateways bench's smoke run
/// once failed so (its second nginx could not bind a port its first already listened on).
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// Starts `regionguard serve` on core 0 with the shipped policy and country database and
/// `config` (TOML, after its own `metrics_listen` and `cache_capacity = 0`), and connects.
pub async fn start(dir: &Path, name: &str, config: &str) -> Server {
    // Both probes held at once, so the two ports differ (the kernel may hand a closed probe's
    // port out again at once).
    let (port, metrics_port) = {
        let probes = [(); 2].map(|()| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        (
            probes[0].local_addr().unwrap().port(),
            probes[1].local_addr().unwrap().port(),
        )
    };
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(
        &file,
        format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\ncache_capacity = 0\n{config}\n"),
    )
    .unwrap();
    let mut child = pinned("0", env!("CARGO_BIN_EXE_regionguard"))
        .arg("serve")
        .arg("--config")
        .arg(&file)
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
            .tcp_nodelay(true)
            .connect()
            .await
        {
            return Server {
                child,
                channel,
                port,
                metrics_port,
            };
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("{name} did not start");
}

/// One metric's value from the server's ops port (0 when absent).
pub fn metric(server: &Server, name: &str) -> f64 {
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

/// User + system CPU seconds of a process, from /proc (0 where there is no /proc).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One closed-loop round: its rate, latency percentiles and failed calls.
#[derive(Clone, Copy, Debug)]
pub struct Round {
    pub calls: u64,
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

/// `in_flight` workers call `call(worker, i)` back to back for `duration` (`i` counts each
/// worker's calls); a call answers whether it succeeded.
pub async fn round<F, Fut>(in_flight: usize, duration: Duration, call: F) -> Round
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..in_flight)
        .map(|worker| {
            let call = call.clone();
            tokio::spawn(async move {
                let (mut latencies, mut errors, mut i) = (Vec::new(), 0u64, 0u64);
                while started.elapsed() < duration {
                    let t = Instant::now();
                    let ok = call(worker, i).await;
                    latencies.push(t.elapsed().as_nanos() as u64);
                    errors += u64::from(!ok);
                    i += 1;
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (latencies, e) = task.await.unwrap();
        all.extend(latencies);
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    Round {
        calls: all.len() as u64,
        rate: all.len() as f64 / seconds,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        errors,
    }
}
