//! The one typed configuration: defaults, then a TOML file, then environment and flags.
//!
//! `main` fills [`Config`] from the file and overlays what flags and `REGIONGUARD_*` variables
//! set; everything else takes a `Config`. Paths left unset fall back to the repository's
//! `data/` files when present, else to the copies compiled into the binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::audit::IpStorage;
use crate::audit::MustRecord;
use crate::auth::AuthConfig;
use crate::classify::{Flow, Verdict};
use crate::gateway::{ForwardAuthConfig, GatewayConfig};
use crate::store::writer::Overflow;
use crate::store::{Backend, ChainKey};

/// Where the default policy and database live in a checkout.
pub const DEFAULT_POLICY_PATH: &str = "data/policy.toml";
pub const DEFAULT_LOCATION_DB_PATH: &str = "data/geo-whois-asn-country.mmdb";

/// A plaintext HTTP listener of section `section` off loopback is refused unless its
/// `allow_public` says so; the message names both keys.
pub fn plaintext_listen(
    section: &str,
    listen: Option<SocketAddr>,
    allow_public: bool,
    advice: &str,
) -> Result<(), String> {
    match listen {
        Some(listen) if !listen.ip().is_loopback() && !allow_public => Err(format!(
            "{section}.listen = {listen}: plaintext HTTP off loopback needs {section}.allow_public = true{advice}"
        )),
        _ => Ok(()),
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// The operator's HTTP port: /metrics (Prometheus), /healthz, /readyz. None: off. Plaintext
    /// and unauthenticated, so allowed only on a loopback address unless `metrics_allow_public`.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve `metrics_listen` off loopback (e.g. for a scraper on another host).
    pub metrics_allow_public: bool,
    pub policy: Option<PathBuf>,
    /// A candidate policy evaluated beside the active one: differences are counted and logged,
    /// never returned to callers. Watched and reloaded like the policy.
    pub shadow_policy: Option<PathBuf>,
    pub location_db: Option<PathBuf>,
    pub anonymous_db: Option<PathBuf>,
    pub asn_db: Option<PathBuf>,
    /// How often watched files are checked for replacement.
    pub reload_interval_ms: u64,
    /// Databases older than this are reported stale (0 disables the check).
    pub max_db_age_days: u64,
    /// Networks the lookup cache holds at most; 0 turns the cache off. With compiled databases
    /// it serves only the addresses the tables leave to the readers (such as `::/96`).
    pub cache_capacity: u64,
    /// Compile the databases into flat lookup tables at load and at every reload (on by
    /// default): a lookup then costs a few cache misses whatever the database, for about
    /// 8 bytes per IPv4 and 20 per IPv6 network. Off, lookups walk the readers' trees through
    /// the cache.
    pub compile_databases: bool,
    /// Largest request message accepted; larger ones get RESOURCE_EXHAUSTED.
    pub max_request_bytes: usize,
    /// How long in-flight requests may run after shutdown begins.
    pub shutdown_grace_ms: u64,
    /// Start even when the location database cannot be loaded: Classify answers UNAVAILABLE and
    /// gateway checks answer per `gateway.on_error` until a valid file appears at the path.
    pub start_without_location_db: bool,
    /// Envoy ext_authz settings (`[gateway]` table).
    pub gateway: GatewayConfig,
    /// HTTP forward-auth for nginx, Caddy, Traefik, Envoy's HTTP mode (`[forward_auth]`).
    pub forward_auth: ForwardAuthConfig,
    /// The reviewers' console in the browser (`[console]`).
    pub console: crate::console::ConsoleConfig,
    /// Usage history settings (`[usage]` table).
    pub usage: UsageConfig,
    /// The embedded store: audit log, review queue, overrides (`[store]` table).
    pub store: StoreConfig,
    /// Callers and their roles (`[auth]` table).
    pub auth: AuthConfig,
    /// Transport limits (`[limits]` table).
    pub limits: LimitsConfig,
    /// TLS for gRPC (`[tls]` table).
    pub tls: TlsConfig,
}

/// `[tls]`: TLS (rustls) for the gRPC port, mTLS with `client_ca`. Without a certificate the port
/// is plaintext, which is allowed only on a loopback address unless `allow_plaintext = true`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert: Option<PathBuf>,
    /// PEM private key of the server.
    pub key: Option<PathBuf>,
    /// PEM CA certificate(s): when set, clients must present a certificate it signed (mTLS).
    pub client_ca: Option<PathBuf>,
    pub allow_plaintext: bool,
}

impl TlsConfig {
    /// Reads the files into tonic's server TLS settings; `None` for plaintext.
    pub fn server_config(&self) -> Result<Option<tonic::transport::ServerTlsConfig>, ConfigError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|error| ConfigError::Read {
                path: path.display().to_string(),
                error,
            })
        };
        match (&self.cert, &self.key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => {
                let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
                let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
                if let Some(ca) = &self.client_ca {
                    tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
                }
                Ok(Some(tls))
            }
            _ => Err(ConfigError::Invalid(
                "tls.cert and tls.key go together".into(),
            )),
        }
    }
}

/// `[limits]`: what one client can take. Past the per-connection concurrency, calls are shed at
/// once with RESOURCE_EXHAUSTED (no queue grows); deadlines sent by clients (`grpc-timeout`) are
/// honoured, capped by `request_timeout_ms`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub concurrency_per_connection: usize,
    pub max_concurrent_streams: u32,
    pub request_timeout_ms: u64,
    /// Messages one ClassifyStream or Usage/Report stream may carry.
    pub max_stream_messages: u64,
    /// A Usage/Report stream with no event for this long is answered with its summary.
    /// Streams are not cut by `request_timeout_ms`, which caps unary calls.
    pub stream_idle_timeout_ms: u64,
    /// Connections served at once on the gRPC port; one more is closed at once (counted).
    pub max_connections: usize,
    /// Connections accepted that have sent nothing yet; past it, the oldest is closed.
    pub max_pending_connections: usize,
    /// A connection that has not sent its opening whole (the HTTP/2 preface, a TLS hello, an
    /// HTTP request head) this long after its accept is closed.
    pub handshake_timeout_ms: u64,
    /// HTTP/2 flow-control windows: how much a stream, and a connection in all, may send ahead
    /// of the server reading it. h2 ends a connection (GOAWAY ENHANCE_YOUR_CALM) when small
    /// DATA frames left unread cost more than half the connection window, so the connection
    /// window is kept many times the stream window (see docs/operations.md, Reliability).
    pub stream_window_bytes: u32,
    pub connection_window_bytes: u32,
    /// HTTP/2 pings on a served connection this often; 0: none.
    pub keepalive_interval_ms: u64,
    /// A connection whose peer does not answer a ping within this is closed.
    pub keepalive_timeout_ms: u64,
    /// A served connection with nothing to do for this long is closed: on the gRPC port no
    /// call in flight (pings do not count), on the HTTP ports nothing read or written. 0: never.
    pub idle_timeout_ms: u64,
}

impl LimitsConfig {
    /// The accept loop's limits, as the gRPC and forward-auth ports both apply them.
    pub fn connection_limits(&self) -> crate::connections::ConnectionLimits {
        crate::connections::ConnectionLimits {
            max_connections: self.max_connections,
            max_pending: self.max_pending_connections,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms.max(1)),
            idle_timeout: (self.idle_timeout_ms > 0)
                .then(|| Duration::from_millis(self.idle_timeout_ms)),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        const MAX_WINDOW: u32 = (1 << 31) - 1;
        let (stream, connection) = (self.stream_window_bytes, self.connection_window_bytes);
        if !(65_535..=MAX_WINDOW).contains(&stream) || !(65_535..=MAX_WINDOW).contains(&connection)
        {
            return Err(ConfigError::Invalid(format!(
                "limits.stream_window_bytes and limits.connection_window_bytes must be between 65535 and {MAX_WINDOW} (HTTP/2)"
            )));
        }
        if connection < stream {
            return Err(ConfigError::Invalid(
                "limits.connection_window_bytes must be at least limits.stream_window_bytes".into(),
            ));
        }
        Ok(())
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            concurrency_per_connection: 256,
            max_concurrent_streams: 1024,
            request_timeout_ms: 30_000,
            max_stream_messages: 10_000_000,
            stream_idle_timeout_ms: 30_000,
            max_connections: 10_000,
            max_pending_connections: 1_024,
            handshake_timeout_ms: 10_000,
            stream_window_bytes: 512 << 10,
            connection_window_bytes: 32 << 20,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
        }
    }
}

/// `[store]`: where and how decisions are recorded. No `data_dir`: nothing is recorded and the
/// Review service answers FAILED_PRECONDITION.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The SQLite store's directory; with `postgres_url`, only the local spool (then required).
    pub data_dir: Option<PathBuf>,
    /// `postgres://USER[:PASSWORD]@HOST:PORT/DATABASE`: the store is PostgreSQL, shared by every
    /// replica (the database must exist; its tables are created). Never logged with its password.
    pub postgres_url: Option<String>,
    /// "full", "truncated" (/24, /48) or "hashed" (salted SHA-256).
    pub ip_storage: String,
    /// Secret salt for `ip_storage = "hashed"`.
    pub ip_hash_salt: String,
    /// Decisions waiting for the writer at most.
    pub queue_capacity: usize,
    /// What an ALLOW api_request decision does when the writer is behind: "block" (wait up to
    /// `block_ms`, then leave it out) or "sample" (leave it out at once). Either way it is
    /// counted; other decisions always wait.
    pub overflow: String,
    pub block_ms: u64,
    /// Decisions answered only once their audit row is committed: flows (`api_request`,
    /// `signup`, `login`) and verdicts (`allow`, `review`, `deny`). When the row cannot be
    /// committed, Classify answers UNAVAILABLE and Check gives its `on_error` answer.
    pub must_record: Vec<String>,
    /// How long a must-record decision waits for its commit at most.
    pub must_record_timeout_ms: u64,
    /// Audit rows older than this many days are removed (after a chained checkpoint; never an
    /// open queue item's decision). None: kept for ever.
    pub retain_days: Option<u32>,
    /// A file of at least 32 secret bytes: audit rows are then HMAC-keyed with it, so that
    /// nobody without it can append or rewrite rows that verify. None: plain SHA-256.
    pub chain_key_file: Option<PathBuf>,
    /// PostgreSQL store: whether a replica that has no copy of the overrides in `data_dir`
    /// (one that never reached the database) may start while the database is unreachable, and
    /// then serve with no overrides until it answers. False: such a start is refused.
    pub start_without_overrides: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            data_dir: None,
            postgres_url: None,
            ip_storage: "full".into(),
            ip_hash_salt: String::new(),
            queue_capacity: 10_000,
            overflow: "block".into(),
            block_ms: 5,
            must_record: ["signup", "login", "review", "deny"]
                .map(String::from)
                .into(),
            must_record_timeout_ms: 2_000,
            retain_days: None,
            chain_key_file: None,
            start_without_overrides: false,
        }
    }
}

/// The salt is a secret: the config is logged at start, the salt never.
impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("data_dir", &self.data_dir)
            .field(
                "postgres_url",
                &self
                    .postgres_url
                    .as_deref()
                    .map(crate::store::postgres::redact),
            )
            .field("ip_storage", &self.ip_storage)
            .field(
                "ip_hash_salt",
                &if self.ip_hash_salt.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("queue_capacity", &self.queue_capacity)
            .field("overflow", &self.overflow)
            .field("block_ms", &self.block_ms)
            .field("must_record", &self.must_record)
            .field("must_record_timeout_ms", &self.must_record_timeout_ms)
            .field("retain_days", &self.retain_days)
            .field("chain_key_file", &self.chain_key_file)
            .field("start_without_overrides", &self.start_without_overrides)
            .finish()
    }
}

impl StoreConfig {
    /// Which store to open, if any: the one place the adapter is chosen.
    pub fn backend(&self) -> Result<Option<Backend>, ConfigError> {
        match (&self.postgres_url, &self.data_dir) {
            (None, None) => Ok(None),
            (None, Some(dir)) => Ok(Some(Backend::Sqlite { dir: dir.clone() })),
            (Some(_), None) => Err(ConfigError::Invalid(
                "store.data_dir is required with store.postgres_url: it holds the local spool for decisions recorded while PostgreSQL is unreachable".into(),
            )),
            (Some(url), Some(dir)) => {
                crate::store::postgres::parse_url(url)
                    .map_err(|e| ConfigError::Invalid(e.to_string()))?;
                if self.retain_days.is_some() {
                    return Err(ConfigError::Invalid(
                        "store.retain_days is not available with store.postgres_url (retention runs on the SQLite store only)".into(),
                    ));
                }
                Ok(Some(Backend::Postgres {
                    url: url.clone(),
                    spool_dir: dir.clone(),
                    start_without_overrides: self.start_without_overrides,
                }))
            }
        }
    }

    pub fn ip_storage(&self) -> Result<IpStorage, ConfigError> {
        match self.ip_storage.as_str() {
            "full" => Ok(IpStorage::Full),
            "truncated" => Ok(IpStorage::Truncated),
            "hashed" if self.ip_hash_salt.len() >= 16 => Ok(IpStorage::Hashed {
                salt: self.ip_hash_salt.clone(),
            }),
            "hashed" => Err(ConfigError::Invalid(
                "store.ip_hash_salt must be at least 16 characters with ip_storage = \"hashed\""
                    .into(),
            )),
            other => Err(ConfigError::Invalid(format!(
                "store.ip_storage = {other:?}: expected \"full\", \"truncated\" or \"hashed\""
            ))),
        }
    }

    /// The chain key, read from `chain_key_file`.
    pub fn chain_key(&self) -> Result<Option<ChainKey>, ConfigError> {
        self.chain_key_file
            .as_deref()
            .map(|path| {
                ChainKey::from_file(path)
                    .map_err(|e| ConfigError::Invalid(format!("store.chain_key_file: {e}")))
            })
            .transpose()
    }

    /// How long audit rows are kept, if not for ever.
    pub fn retention(&self) -> Result<Option<Duration>, ConfigError> {
        match self.retain_days {
            None => Ok(None),
            Some(0) => Err(ConfigError::Invalid(
                "store.retain_days must be at least 1 (leave it out to keep every row)".into(),
            )),
            Some(days) => Ok(Some(Duration::from_secs(u64::from(days) * 86_400))),
        }
    }

    /// Which decisions wait for their commit (`must_record`, `must_record_timeout_ms`).
    pub fn must_record(&self) -> Result<MustRecord, ConfigError> {
        if self.must_record_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "store.must_record_timeout_ms must be above 0".into(),
            ));
        }
        let mut must = MustRecord {
            flows: Vec::new(),
            verdicts: Vec::new(),
            wait: Duration::from_millis(self.must_record_timeout_ms),
        };
        for entry in &self.must_record {
            let flow = Flow::ALL.into_iter().find(|f| f.as_str() == entry);
            let verdict = Verdict::ALL
                .into_iter()
                .find(|v| v.as_str().eq_ignore_ascii_case(entry));
            match (flow, verdict) {
                (Some(flow), _) => must.flows.push(flow),
                (None, Some(verdict)) => must.verdicts.push(verdict),
                (None, None) => {
                    return Err(ConfigError::Invalid(format!(
                        "store.must_record: {entry:?} is not a flow (api_request, signup, login) or a verdict (allow, review, deny)"
                    )));
                }
            }
        }
        Ok(must)
    }

    pub fn overflow(&self) -> Result<Overflow, ConfigError> {
        match self.overflow.as_str() {
            "block" => Ok(Overflow::Block(Duration::from_millis(self.block_ms))),
            "sample" => Ok(Overflow::Sample),
            other => Err(ConfigError::Invalid(format!(
                "store.overflow = {other:?}: expected \"block\" or \"sample\""
            ))),
        }
    }
}

/// Usage history (`Usage/Report` and the USAGE_* reasons).
#[derive(Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UsageConfig {
    pub enabled: bool,
    /// Ceiling for the in-process aggregator's estimated memory; accounts are evicted beyond it.
    pub max_memory_mb: u64,
    /// Keep usage history in Redis, shared by every replica (`redis://host:port/db`). Unset:
    /// in-process, one history per replica.
    pub redis_url: Option<String>,
    /// Prefix of every key regionguard writes in Redis.
    pub redis_prefix: String,
    /// Longest a decision waits for Redis before deciding without it (`degraded`).
    pub redis_timeout_ms: u64,
    /// How long a read from Redis answers later decisions for the same account.
    pub redis_cache_ms: u64,
    /// Events accepted but not yet written to Redis, at most; more are lost (counted).
    pub redis_max_pending_events: usize,
    /// Accounts the fleet graph in Redis holds at most (link values: twice as many); more are
    /// refused, counted in Redis under `{f}refused`.
    pub redis_fleet_max_accounts: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_memory_mb: 512,
            redis_url: None,
            redis_prefix: "regionguard:".into(),
            redis_timeout_ms: 5,
            redis_cache_ms: 1000,
            redis_max_pending_events: 1_000_000,
            redis_fleet_max_accounts: 1_000_000,
        }
    }
}

/// The Redis URL may carry a password: the config is logged at start, the password never.
impl std::fmt::Debug for UsageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageConfig")
            .field("enabled", &self.enabled)
            .field("max_memory_mb", &self.max_memory_mb)
            .field(
                "redis_url",
                &self.redis_url.as_deref().map(crate::usage::redis::redacted),
            )
            .field("redis_prefix", &self.redis_prefix)
            .field("redis_timeout_ms", &self.redis_timeout_ms)
            .field("redis_cache_ms", &self.redis_cache_ms)
            .field("redis_max_pending_events", &self.redis_max_pending_events)
            .field("redis_fleet_max_accounts", &self.redis_fleet_max_accounts)
            .finish()
    }
}

impl UsageConfig {
    /// The Redis adapter's settings, when `redis_url` is set.
    pub fn redis(&self) -> Result<Option<crate::usage::redis::RedisSettings>, ConfigError> {
        let Some(url) = &self.redis_url else {
            return Ok(None);
        };
        if !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("unix://")
            || url.starts_with("redis+unix://"))
        {
            return Err(ConfigError::Invalid(
                "usage.redis_url: expected redis://host:port (or rediss://, unix://)".into(),
            ));
        }
        if self.redis_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "usage.redis_timeout_ms: must be at least 1".into(),
            ));
        }
        if self.redis_max_pending_events == 0 {
            return Err(ConfigError::Invalid(
                "usage.redis_max_pending_events: must be at least 1".into(),
            ));
        }
        if self.redis_prefix.contains(['{', '}']) {
            // The keys' own hash tags ({account}, {f}) must stay the first braces in each key.
            return Err(ConfigError::Invalid(
                "usage.redis_prefix: must not contain { or } (they would change the keys' Redis Cluster hash tags)".into(),
            ));
        }
        Ok(Some(crate::usage::redis::RedisSettings {
            url: url.clone(),
            prefix: self.redis_prefix.clone(),
            timeout: Duration::from_millis(self.redis_timeout_ms),
            cache_ttl: Duration::from_millis(self.redis_cache_ms),
            max_pending_events: self.redis_max_pending_events,
            fleet_max_accounts: self.redis_fleet_max_accounts,
        }))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            metrics_allow_public: false,
            policy: None,
            shadow_policy: None,
            location_db: None,
            anonymous_db: None,
            asn_db: None,
            reload_interval_ms: 1000,
            max_db_age_days: 60,
            cache_capacity: 100_000,
            compile_databases: true,
            max_request_bytes: 256 * 1024,
            shutdown_grace_ms: 5000,
            start_without_location_db: false,
            gateway: GatewayConfig::default(),
            forward_auth: ForwardAuthConfig::default(),
            console: crate::console::ConsoleConfig::default(),
            usage: UsageConfig::default(),
            store: StoreConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            tls: TlsConfig::default(),
        }
    }
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("config {path}: {error}")]
    Parse {
        path: String,
        error: toml::de::Error,
    },
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: source_name.to_owned(),
            error,
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.reload_interval_ms == 0 {
            return Err(ConfigError::Invalid(
                "reload_interval_ms must be above 0".into(),
            ));
        }
        self.gateway.validate().map_err(ConfigError::Invalid)?;
        self.forward_auth.validate().map_err(ConfigError::Invalid)?;
        self.console.validate().map_err(ConfigError::Invalid)?;
        self.auth.validate().map_err(ConfigError::Invalid)?;
        self.store.ip_storage()?;
        self.limits.validate()?;
        self.store.overflow()?;
        self.store.must_record()?;
        self.store.retention()?;
        self.store.chain_key()?;
        self.usage.redis()?;
        self.store.backend()?;
        if self.tls.cert.is_none() && !self.listen.ip().is_loopback() && !self.tls.allow_plaintext {
            return Err(ConfigError::Invalid(format!(
                "listen = {}: plaintext gRPC off loopback needs [tls] cert and key, or [tls] allow_plaintext = true",
                self.listen
            )));
        }
        if let Some(metrics) = self.metrics_listen
            && !metrics.ip().is_loopback()
            && !self.metrics_allow_public
        {
            return Err(ConfigError::Invalid(format!(
                "metrics_listen = {metrics}: the ops port (/metrics, /healthz, /readyz) is unauthenticated plaintext HTTP; off loopback it needs metrics_allow_public = true"
            )));
        }
        if self.max_request_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "max_request_bytes must be at least 1024".into(),
            ));
        }
        Ok(())
    }

    pub fn reload_interval(&self) -> Duration {
        Duration::from_millis(self.reload_interval_ms)
    }

    pub fn max_db_age(&self) -> Option<Duration> {
        (self.max_db_age_days > 0)
            .then(|| Duration::from_secs(self.max_db_age_days.saturating_mul(86_400)))
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// The policy file to read and watch: the configured one, else `data/policy.toml` if it
    /// exists here; `None` means the embedded copy.
    pub fn policy_path(&self) -> Option<PathBuf> {
        self.policy
            .clone()
            .or_else(|| existing(DEFAULT_POLICY_PATH))
    }

    /// As [`Config::policy_path`], for the location database.
    pub fn location_db_path(&self) -> Option<PathBuf> {
        self.location_db
            .clone()
            .or_else(|| existing(DEFAULT_LOCATION_DB_PATH))
    }
}

fn existing(path: &str) -> Option<PathBuf> {
    let path = PathBuf::from(path);
    path.is_file().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_settings_are_checked_with_the_field_named() {
        let usage = |extra: &str| {
            Config::from_toml(
                &format!("[usage]\nredis_url = \"redis://127.0.0.1:6379\"\n{extra}"),
                "c.toml",
            )
            .map_err(|e| e.to_string())
            .and_then(|c| c.usage.redis().map_err(|e| e.to_string()))
            .map(|s| s.map(|s| s.prefix))
        };
        assert_eq!(usage("").unwrap().as_deref(), Some("regionguard:"));
        let err = usage("redis_prefix = \"a{b}:\"").unwrap_err();
        assert!(err.contains("usage.redis_prefix"), "{err}");
        let err = usage("redis_timeout_ms = 0").unwrap_err();
        assert!(err.contains("usage.redis_timeout_ms"), "{err}");
    }

    #[test]
    fn file_overrides_defaults_and_typos_are_errors() {
        let config = Config::from_toml(
            "listen = \"127.0.0.2:9000\"\nanonymous_db = \"/x/anon.mmdb\"\n",
            "c.toml",
        )
        .unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.anonymous_db, Some(PathBuf::from("/x/anon.mmdb")));
        assert_eq!(
            config.reload_interval_ms,
            Config::default().reload_interval_ms
        );
        let err = Config::from_toml("lisen = \"0.0.0.0:9000\"", "c.toml").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        assert!(Config::from_toml("reload_interval_ms = 0", "c.toml").is_err());
        let open = Config::from_toml("listen = \"0.0.0.0:50051\"", "c.toml").unwrap_err();
        assert!(open.to_string().contains("plaintext"), "{open}");
        assert!(
            Config::from_toml(
                "listen = \"0.0.0.0:50051\"\n[tls]\nallow_plaintext = true\n",
                "c.toml"
            )
            .is_ok()
        );
        let ops = Config::from_toml("metrics_listen = \"0.0.0.0:9464\"", "c.toml").unwrap_err();
        assert!(
            ops.to_string().contains("metrics_listen = 0.0.0.0:9464")
                && ops.to_string().contains("metrics_allow_public = true"),
            "{ops}"
        );
        assert!(Config::from_toml("metrics_listen = \"[::1]:9464\"", "c.toml").is_ok());
        assert!(
            Config::from_toml(
                "metrics_listen = \"10.0.0.5:9464\"\nmetrics_allow_public = true\n",
                "c.toml"
            )
            .is_ok()
        );
        let gateway = Config::from_toml(
            "[gateway]\ntrusted_hops = 1\non_error = \"allow\"\n",
            "c.toml",
        )
        .unwrap();
        assert_eq!(gateway.gateway.trusted_hops, 1);
        let err = Config::from_toml("[gateway]\ndeny_status = 451\n", "c.toml").unwrap_err();
        assert!(err.to_string().contains("deny_status"), "{err}");
        let err = Config::from_toml(
            "[store]\npostgres_url = \"postgres://rg:s3cret@127.0.0.1:5432/rg\"\n",
            "c.toml",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("store.data_dir is required"),
            "{err}"
        );
        let pg = Config::from_toml(
            "[store]\npostgres_url = \"postgres://rg:s3cret@127.0.0.1:5432/rg\"\ndata_dir = \"spool\"\n",
            "c.toml",
        )
        .unwrap();
        assert!(matches!(
            pg.store.backend().unwrap(),
            Some(Backend::Postgres { .. })
        ));
        let logged = format!("{pg:?}");
        assert!(
            !logged.contains("s3cret") && logged.contains("rg:***@127.0.0.1"),
            "{logged}"
        );
        let keep = Config::from_toml("[store]\nretain_days = 400\n", "c.toml").unwrap();
        assert_eq!(
            keep.store.retention().unwrap(),
            Some(Duration::from_secs(400 * 86_400))
        );
        let err = Config::from_toml("[store]\nretain_days = 0\n", "c.toml").unwrap_err();
        assert!(err.to_string().contains("store.retain_days"), "{err}");
        let short_key = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(short_key.path(), b"too short").unwrap();
        let text = format!(
            "[store]\nchain_key_file = {:?}\n",
            short_key.path().display().to_string()
        );
        let err = Config::from_toml(&text, "c.toml").unwrap_err();
        assert!(
            err.to_string().contains("store.chain_key_file")
                && err.to_string().contains("32 bytes"),
            "{err}"
        );
    }
}
