//! The `regionguard` command: parses arguments, builds the config, calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use regionguard::config::Config;
use regionguard::engine::ClassifyInput;
use regionguard::grpc::{convert, pb};
use regionguard::reload::Reloader;
use regionguard::server::{self, ServerSettings};
use regionguard::{app, policy};

/// mimalloc rather than glibc's malloc: a call allocates and frees many small buffers across
/// h2, prost and the response, and glibc's consolidation showed in the server's profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod reviewer_cli;

#[derive(Parser)]
#[command(
    name = "regionguard",
    version,
    about = "Decides whether an account may use a product from where it is."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API (Classifier, health, reflection).
    Serve(ServeArgs),
    /// Decide one request locally, without a server, and print the decision as JSON.
    Classify(ClassifyArgs),
    /// Print what the databases say of one IP, as JSON.
    Lookup {
        ip: String,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Validate a policy file and print its version and lists.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Reviewers' commands, over a running server's Review API.
    Review {
        /// Server address.
        #[arg(
            long,
            env = "REGIONGUARD_ADDR",
            default_value = "http://127.0.0.1:50051"
        )]
        addr: String,
        /// The reviewer's bearer token.
        #[arg(long, env = "REGIONGUARD_TOKEN", hide_env_values = true)]
        token: String,
        #[command(subcommand)]
        command: reviewer_cli::ReviewCommand,
    },
    /// Audit log checks.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Re-run recorded decisions under a candidate policy and report what would change.
    Replay {
        /// The candidate policy file.
        #[arg(long)]
        policy: PathBuf,
        /// How far back: 24h, 30d, or Unix milliseconds.
        #[arg(long, default_value = "30d")]
        since: String,
        /// Sample decision ids per transition.
        #[arg(long, default_value_t = 5)]
        samples: usize,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Walk the hash chain; exit 1 naming the first edited or deleted row.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        /// SEQ:HASH of the head printed by an earlier verify and kept outside the store: also
        /// detects rows cut from the end of the chain.
        #[arg(long)]
        expect_head: Option<String>,
        /// Fail if a retention checkpoint in the chain kept fewer days than this (the
        /// retention you promised).
        #[arg(long)]
        min_retain_days: Option<u32>,
        /// The server's `[store] chain_key_file`: keyed rows are checked with it, and with it
        /// the chain must be keyed.
        #[arg(long, env = "REGIONGUARD_CHAIN_KEY_FILE")]
        key_file: Option<PathBuf>,
    },
    /// Key an existing plain store (once, with the server stopped): appends a keyed row from
    /// which every row must be keyed; then start the server with the same chain_key_file.
    AdoptKey {
        #[arg(long, env = "REGIONGUARD_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long, env = "REGIONGUARD_CHAIN_KEY_FILE")]
        key_file: PathBuf,
    },
}

/// The store a command reads: a SQLite directory or PostgreSQL.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct StoreArgs {
    /// The SQLite store's directory.
    #[arg(long, env = "REGIONGUARD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The PostgreSQL store: postgres://USER[:PASSWORD]@HOST:PORT/DATABASE.
    #[arg(long, env = "REGIONGUARD_POSTGRES_URL", hide_env_values = true)]
    postgres_url: Option<String>,
}

impl StoreArgs {
    fn source(self) -> reviewer_cli::StoreSource {
        match (self.postgres_url, self.data_dir) {
            (Some(url), _) => reviewer_cli::StoreSource::Postgres(url),
            (None, Some(dir)) => reviewer_cli::StoreSource::Sqlite(dir),
            // clap's group requires one of them.
            (None, None) => reviewer_cli::StoreSource::Sqlite(PathBuf::new()),
        }
    }
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Exit 0 if FILE is a valid policy; else print the error (file:line: field: problem).
    Check { file: PathBuf },
}

/// Where the data comes from; each overrides the config file.
#[derive(Args, Clone, Default)]
struct DataArgs {
    /// TOML config file (see docs/operations.md: Configuration).
    #[arg(long, env = "REGIONGUARD_CONFIG")]
    config: Option<PathBuf>,
    /// Policy file [default: data/policy.toml, else the embedded copy].
    #[arg(long, env = "REGIONGUARD_POLICY")]
    policy: Option<PathBuf>,
    /// Location database (GeoIP2/GeoLite2 City or Country, or a flat country_code database).
    #[arg(long, env = "REGIONGUARD_LOCATION_DB")]
    location_db: Option<PathBuf>,
    /// Anonymous-IP (or Anonymous Plus) database.
    #[arg(long, env = "REGIONGUARD_ANONYMOUS_DB")]
    anonymous_db: Option<PathBuf>,
    /// ASN database.
    #[arg(long, env = "REGIONGUARD_ASN_DB")]
    asn_db: Option<PathBuf>,
    /// A candidate policy evaluated beside the active one (counted and logged, never returned).
    #[arg(long, env = "REGIONGUARD_SHADOW_POLICY")]
    shadow_policy: Option<PathBuf>,
    /// Store directory (audit log, review queue, overrides); none: decisions are not recorded.
    /// With --postgres-url, it holds only the local spool.
    #[arg(long, env = "REGIONGUARD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The store in PostgreSQL, shared by replicas: postgres://USER[:PASSWORD]@HOST:PORT/DATABASE.
    #[arg(long, env = "REGIONGUARD_POSTGRES_URL", hide_env_values = true)]
    postgres_url: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    /// Listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "REGIONGUARD_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args)]
struct ClassifyArgs {
    /// The whole request as JSON (ClassifyRequest field names; flow as "FLOW_SIGNUP" or a number).
    #[arg(long, conflicts_with_all = ["ip", "flow", "billing_country", "declared_country"])]
    json: Option<String>,
    #[arg(long)]
    ip: Option<String>,
    /// api_request, signup or login.
    #[arg(long)]
    flow: Option<String>,
    #[arg(long)]
    billing_country: Option<String>,
    #[arg(long)]
    declared_country: Option<String>,
    #[command(flatten)]
    data: DataArgs,
}

impl DataArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        let overlay = |slot: &mut Option<PathBuf>, value: &Option<PathBuf>| {
            if value.is_some() {
                slot.clone_from(value);
            }
        };
        overlay(&mut config.policy, &self.policy);
        overlay(&mut config.location_db, &self.location_db);
        overlay(&mut config.anonymous_db, &self.anonymous_db);
        overlay(&mut config.asn_db, &self.asn_db);
        overlay(&mut config.store.data_dir, &self.data_dir);
        overlay(&mut config.shadow_policy, &self.shadow_policy);
        if self.postgres_url.is_some() {
            config.store.postgres_url.clone_from(&self.postgres_url);
        }
        Ok(config)
    }
}

fn main() -> ExitCode {
    // Logs: RUST_LOG filters (default info); REGIONGUARD_LOG_FORMAT=json gives one JSON object a
    // line. Decisions are logged by id only (no raw IPs or account data at info).
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("REGIONGUARD_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.init();
    }
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        // The reader of the output went away (`| head`): nothing is left to say to anyone.
        Err(error)
            if error.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("regionguard: {error:#}");
            // 78 = EX_CONFIG: the operator must fix something before a retry helps.
            ExitCode::from(78)
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => serve(args),
        Command::Classify(args) => classify(args),
        Command::Lookup { ip, data } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let _inside = runtime.enter();
            let loaded = app::load(&data.config()?)?;
            let ip = convert::parse_ip("ip", &ip)?;
            let (lookup, databases) = loaded.engine.lookup(ip)?;
            let location = convert::location(&lookup, &databases);
            reviewer_cli::print_line(&serde_json::to_string_pretty(&location_json(
                &lookup.ip.to_string(),
                lookup.record.found,
                &location,
            ))?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Review {
            addr,
            token,
            command,
        } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(reviewer_cli::review(&addr, &token, command))
        }
        Command::Audit(AuditCommand::Verify {
            store,
            expect_head,
            min_retain_days,
            key_file,
        }) => reviewer_cli::audit_verify(
            store.source(),
            expect_head.as_deref(),
            min_retain_days,
            key_file.as_deref(),
        ),
        Command::Audit(AuditCommand::AdoptKey { data_dir, key_file }) => {
            reviewer_cli::adopt_key(&data_dir, &key_file)
        }
        Command::Replay {
            policy,
            since,
            samples,
            store,
        } => reviewer_cli::replay(store.source(), &policy, &since, samples),
        Command::Policy(PolicyCommand::Check { file }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            match policy::parse_policy(&text, &file.display().to_string()) {
                Ok(policy) => {
                    let version = policy.version();
                    reviewer_cli::print_line(&format!("ok: {} version {version}", file.display()))?;
                    for (region, list) in policy.listed_regions() {
                        reviewer_cli::print_line(&format!("  {:<12} {region}", list.as_str()))?;
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => {
                    eprintln!("invalid policy: {error}");
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = args.data.config()?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    config.validate()?;
    tracing::info!(?config, "starting");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let inside = runtime.enter();
    let loaded = app::load(&config)?;
    drop(inside);
    let engine = Arc::new(loaded.engine);
    tracing::info!(policy_version = %engine.policy().version(), databases = ?engine.geo().databases(), watching = ?loaded.targets, "loaded");

    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
        tracing::info!(address = %listener.local_addr()?, "serving regionguard.v1.Classifier, grpc.health.v1, reflection");
        let (stop_reload, stop_reload_rx) = tokio::sync::watch::channel(false);
        let mut reloader = Reloader::new(engine.clone(), loaded.targets, config.max_db_age());
        let ops = match (config.metrics_listen, loaded.metrics) {
            (Some(address), Some(metrics)) => {
                let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("binding metrics port {address}"))?;
                tracing::info!(address = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
                reloader = reloader.with_metrics(metrics.clone());
                Some(server::OpsPort { listener, metrics })
            }
            _ => None,
        };
        let reload_task = tokio::spawn(reloader.run(config.reload_interval(), stop_reload_rx));
        let settings = ServerSettings { tls: config.tls.server_config()?, chain_key: config.store.chain_key()?, ..ServerSettings::from_config(&config) };
        let audit = loaded.audit;
        if let (Some(audit), Some(keep)) = (&audit, config.store.retention()?) {
            tokio::spawn(retention(audit.clone(), keep));
        }
        let forward_auth = match config.forward_auth.listen {
            Some(address) => {
                let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("binding forward-auth port {address}"))?;
                tracing::info!(address = %listener.local_addr()?, "serving HTTP forward-auth under /check");
                Some(listener)
            }
            None => None,
        };
        let console = match config.console.listen {
            Some(address) => {
                let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("binding console port {address}"))?;
                tracing::info!(address = %listener.local_addr()?, "serving the review console");
                Some(listener)
            }
            None => None,
        };
        let ports = server::SidePorts { ops, forward_auth, console };
        server::run(listener, engine.clone(), audit.clone(), ports, settings, shutdown_signal()).await?;
        // Usage events still queued for Redis are written before the process ends (within the
        // grace period); what cannot be is said, not dropped silently.
        if let Some(usage) = engine.usage() {
            match tokio::time::timeout(config.shutdown_grace(), usage.flush()).await {
                Ok(()) => tracing::info!(stats = ?usage.stats(), "usage history flushed"),
                Err(_) => tracing::warn!(stats = ?usage.stats(), "usage history not flushed within shutdown_grace_ms: pending events are lost"),
            }
        }
        if let Some(audit) = audit {
            audit.recorder().flush().await;
            tracing::info!(stats = ?audit.recorder().stats(), "audit trail flushed");
        }
        let _ = stop_reload.send(true);
        let _ = reload_task.await;
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// Applies `[store] retain_days` once a minute (and at start); the writer does the work, with
/// at most one checkpoint a day, so rows stay up to a day past the window.
async fn retention(
    audit: std::sync::Arc<regionguard::audit::AuditTrail>,
    keep: std::time::Duration,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tick.tick().await;
        let cutoff_ms = regionguard::store::now_ms().saturating_sub(keep.as_millis() as i64);
        let daily = std::time::Duration::from_secs(86_400);
        match audit.recorder().retain(cutoff_ms, daily).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, cutoff_ms, "audit retention removed rows"),
            Err(_) => {} // the writer has logged it
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

fn classify(args: ClassifyArgs) -> anyhow::Result<ExitCode> {
    let request = match &args.json {
        Some(json) => request_from_json(json)?,
        None => pb::ClassifyRequest {
            ip: args.ip.clone().unwrap_or_default(),
            flow: match args.flow.as_deref() {
                None => 0,
                Some(name) => pb::Flow::from_str_name(&format!("FLOW_{}", name.to_uppercase()))
                    .with_context(|| {
                        format!("--flow {name:?}: expected api_request, signup or login")
                    })? as i32,
            },
            account: Some(pb::Account {
                billing_country: args.billing_country.clone().unwrap_or_default(),
                declared_country: args.declared_country.clone().unwrap_or_default(),
                ..Default::default()
            }),
            ..Default::default()
        },
    };
    let input = match ClassifyInput::try_from(&request) {
        Ok(input) => input,
        Err(error) => {
            eprintln!("regionguard: invalid request: {error}");
            // 65 = EX_DATAERR: the request, not the configuration, is at fault.
            return Ok(ExitCode::from(65));
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _inside = runtime.enter();
    let loaded = app::load(&args.data.config()?)?;
    let outcome = runtime.block_on(loaded.engine.classify(&input))?;
    let response = pb::ClassifyResponse::from(outcome);
    reviewer_cli::print_line(&serde_json::to_string_pretty(&response_json(&response))?)?;
    Ok(ExitCode::SUCCESS)
}

/// Reads a ClassifyRequest from JSON; `flow` may be a name ("FLOW_SIGNUP", "signup") or a number.
fn request_from_json(json: &str) -> anyhow::Result<pb::ClassifyRequest> {
    let mut value: serde_json::Value =
        serde_json::from_str(json).context("--json is not valid JSON")?;
    if let Some(name) = value
        .get("flow")
        .and_then(|f| f.as_str())
        .map(str::to_owned)
    {
        let upper = name.to_uppercase();
        let full = if upper.starts_with("FLOW_") {
            upper
        } else {
            format!("FLOW_{upper}")
        };
        let flow = pb::Flow::from_str_name(&full)
            .with_context(|| format!("flow: unknown value {name:?}"))?;
        value["flow"] = serde_json::Value::from(flow as i32);
    }
    serde_json::from_value(value).context("--json does not match ClassifyRequest")
}

fn response_json(response: &pb::ClassifyResponse) -> serde_json::Value {
    let mut value = serde_json::to_value(response).unwrap_or_default();
    let name =
        pb::Verdict::try_from(response.verdict).map_or("VERDICT_UNSPECIFIED", |v| v.as_str_name());
    value["verdict"] = serde_json::Value::from(name);
    value
}

fn location_json(ip: &str, found: bool, location: &pb::Location) -> serde_json::Value {
    serde_json::json!({ "ip": ip, "found": found, "location": location })
}
