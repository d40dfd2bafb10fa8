//! Test support: fixture worlds (scenarios) and a real server on an ephemeral loopback port.
#![allow(dead_code)]

pub mod envoy;
pub mod fixtures;
pub mod postgres;
pub mod redis;
pub mod replica;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use regionguard::config::Config;
use regionguard::grpc::pb::classifier_client::ClassifierClient;
use regionguard::grpc::pb::{self, Verdict};
use regionguard::policy::EMBEDDED_POLICY;
use regionguard::reload::Reloader;
use regionguard::server::{self, ServerSettings};
use tokio::sync::{oneshot, watch};
use tonic::transport::Channel;

/// Where MaxMind's official test databases are, when the suite should also run against them.
pub const MAXMIND_ENV: &str = "REGIONGUARD_MAXMIND_TEST_DATA";

/// Addresses that play each part in one fixture world.
#[derive(Clone, Debug)]
pub struct Ips {
    pub allowed: &'static str,
    pub sanctioned: &'static str,
    pub unsupported: &'static str,
    /// A restricted subdivision's address and its ISO 3166-2 code.
    pub subdivision: (&'static str, &'static str),
    pub vpn: &'static str,
    pub tor: &'static str,
    pub hosting: &'static str,
    pub unknown: &'static str,
}

/// One world of databases plus the policy the suite runs with.
#[derive(Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub location: Vec<u8>,
    pub anonymous: Option<Vec<u8>>,
    pub asn: Option<Vec<u8>>,
    pub ips: Ips,
    pub policy: String,
    /// Whether the VPN address is located (MaxMind's is not: it also gets IP_LOCATION_UNKNOWN).
    pub vpn_located: bool,
}

/// The repository's own fixtures, always; MaxMind's official test databases too when
/// `REGIONGUARD_MAXMIND_TEST_DATA` is set (and a failure if it is set but not there).
pub fn scenarios() -> Vec<Scenario> {
    let mut all = vec![Scenario {
        name: "fixtures",
        location: fixtures::city_db(),
        anonymous: Some(fixtures::anonymous_db()),
        asn: Some(fixtures::asn_db()),
        ips: Ips {
            allowed: "216.160.83.57",
            sanctioned: "5.1.2.3",
            unsupported: "175.16.199.10",
            subdivision: ("46.0.1.2", "UA-43"),
            vpn: "1.2.3.4",
            tor: "65.1.0.1",
            hosting: "71.160.223.9",
            unknown: "10.1.2.3",
        },
        policy: EMBEDDED_POLICY.to_owned(),
        vpn_located: true,
    }];
    if let Some(dir) = maxmind_dir() {
        let read =
            |name: &str| std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        all.push(Scenario {
            name: "maxmind",
            location: read("GeoIP2-City-Test.mmdb"),
            anonymous: Some(read("GeoIP2-Anonymous-IP-Test.mmdb")),
            asn: Some(read("GeoLite2-ASN-Test.mmdb")),
            ips: Ips {
                allowed: "216.160.83.57",
                sanctioned: "2a02:d2c0::1",
                unsupported: "175.16.199.10",
                subdivision: ("89.160.20.115", "SE-E"),
                vpn: "1.2.0.1",
                tor: "65.1.0.1",
                hosting: "71.160.223.9",
                unknown: "10.1.2.3",
            },
            // MaxMind's data has no occupied-oblast subdivision: restrict a Swedish county to
            // exercise the subdivision rule on their real City records.
            policy: with_extra_sanctioned("SE-E"),
            vpn_located: false,
        });
    }
    all
}

/// The MaxMind test data directory, if the environment names one; panics if it names a missing one.
pub fn maxmind_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os(MAXMIND_ENV)?);
    assert!(
        dir.join("GeoIP2-City-Test.mmdb").is_file(),
        "{MAXMIND_ENV}={} does not hold MaxMind's test databases",
        dir.display()
    );
    Some(dir)
}

/// The embedded policy with one more sanctioned region.
pub fn with_extra_sanctioned(region: &str) -> String {
    let text = EMBEDDED_POLICY.replacen("  \"CU\",", &format!("  \"{region}\",\n  \"CU\","), 1);
    assert_ne!(text, EMBEDDED_POLICY);
    text
}

/// Writes `bytes` to `path` as an atomic replacement (write aside, then rename).
pub fn replace_file(path: &Path, bytes: &[u8]) {
    let aside = path.with_extension("tmp");
    std::fs::write(&aside, bytes).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

/// A running server with its files in a temporary directory.
pub struct TestServer {
    /// The ops port (/metrics, /healthz, /readyz), when the config asked for one.
    pub ops_addr: Option<std::net::SocketAddr>,
    /// HTTP forward-auth, when the config asked for it (`[forward_auth] listen`).
    pub forward_auth_addr: Option<std::net::SocketAddr>,
    /// The review console, when the config asked for it (`[console] listen`).
    pub console_addr: Option<std::net::SocketAddr>,
    pub client: ClassifierClient<Channel>,
    pub channel: Channel,
    pub dir: tempfile::TempDir,
    pub policy_path: PathBuf,
    pub location_path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    stop_reload: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(scenario: &Scenario) -> Self {
        Self::start_with(scenario, |_| {}).await
    }

    pub async fn start_with(scenario: &Scenario, adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let policy_path = write("policy.toml", scenario.policy.as_bytes());
        let location_path = write("location.mmdb", &scenario.location);
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            policy: Some(policy_path.clone()),
            location_db: Some(location_path.clone()),
            anonymous_db: scenario
                .anonymous
                .as_ref()
                .map(|b| write("anonymous.mmdb", b)),
            asn_db: scenario.asn.as_ref().map(|b| write("asn.mmdb", b)),
            reload_interval_ms: 20,
            // Off unless a test asks for it (tests run in parallel; a fixed port would collide).
            metrics_listen: None,
            ..Config::default()
        };
        // Every test server records its decisions, so every suite exercises the audit writer.
        config.store.data_dir = Some(dir.path().join("store"));
        adjust(&mut config);
        let loaded = regionguard::app::load(&config).expect("scenario loads");
        let engine = Arc::new(loaded.engine);
        let audit = loaded.audit;
        let ops = match (config.metrics_listen, loaded.metrics) {
            (Some(address), Some(metrics)) => Some(server::OpsPort {
                listener: tokio::net::TcpListener::bind(address).await.unwrap(),
                metrics,
            }),
            _ => None,
        };
        let ops_addr = ops.as_ref().map(|o| o.listener.local_addr().unwrap());
        let forward_auth = match config.forward_auth.listen {
            Some(address) => Some(tokio::net::TcpListener::bind(address).await.unwrap()),
            None => None,
        };
        let forward_auth_addr = forward_auth.as_ref().map(|l| l.local_addr().unwrap());
        let console = match config.console.listen {
            Some(address) => Some(tokio::net::TcpListener::bind(address).await.unwrap()),
            None => None,
        };
        let console_addr = console.as_ref().map(|l| l.local_addr().unwrap());
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let (stop_reload, stop_reload_rx) = watch::channel(false);
        let reloader = Reloader::new(engine.clone(), loaded.targets, config.max_db_age());
        tokio::spawn(reloader.run(config.reload_interval(), stop_reload_rx));
        let settings = ServerSettings {
            shutdown_grace: Duration::from_secs(2),
            ..ServerSettings::from_config(&config)
        };
        let task = tokio::spawn(async move {
            server::run(
                listener,
                engine,
                audit,
                server::SidePorts {
                    ops,
                    forward_auth,
                    console,
                },
                settings,
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
        });
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        TestServer {
            ops_addr,
            forward_auth_addr,
            console_addr,
            client: ClassifierClient::new(channel.clone()),
            channel,
            dir,
            policy_path,
            location_path,
            stop: Some(stop),
            stop_reload,
            task: Some(task),
        }
    }
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub async fn classify(
        &self,
        request: pb::ClassifyRequest,
    ) -> Result<pb::ClassifyResponse, tonic::Status> {
        self.client
            .clone()
            .classify(request)
            .await
            .map(|r| r.into_inner())
    }

    pub async fn classify_ip(&self, ip: &str) -> pb::ClassifyResponse {
        self.classify(request(ip))
            .await
            .unwrap_or_else(|s| panic!("classify {ip}: {s}"))
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop_reload.send(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    // The kernel may hand the same ephemeral port out twice in a row once the probe is closed
    // (a replica was once given one port for gRPC and metrics both): never the same twice in
    // one test process.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// `regionguard audit verify --data-dir DIR` with the real binary: whether it passed, and what
/// it printed.
pub fn audit_verify(dir: &Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_regionguard"))
        .args(["audit", "verify", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Writes a measured figure straight to stderr, past the test harness's output capture, so it
/// shows in every test run's output (the harness only captures the print macros).
pub fn record(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

pub fn request(ip: &str) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        ip: ip.to_owned(),
        ..Default::default()
    }
}

pub fn codes(response: &pb::ClassifyResponse) -> Vec<&str> {
    response.reasons.iter().map(|r| r.code.as_str()).collect()
}

pub fn verdict(response: &pb::ClassifyResponse) -> Verdict {
    Verdict::try_from(response.verdict).unwrap()
}
