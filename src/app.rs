//! Assembles a running [`Engine`] from a [`Config`]: loads the policy and databases (files or
//! the embedded defaults) and lists the files the [`Reloader`] should watch.

use std::path::Path;

use crate::audit::AuditTrail;
use crate::config::Config;
use crate::engine::Engine;
use crate::geo::{DbRole, Geo, GeoDatabase, GeoError, GeoOptions};
use crate::metrics::Metrics;
use crate::overrides::OverrideIndex;
use crate::policy::{EMBEDDED_POLICY, Policy, PolicyError, parse_policy};
use crate::reload::{Target, Watched};
use crate::store;
use crate::usage::redis::{RedisStartError, RedisUsage};
use crate::usage::{UsageAggregator, UsageHistory};
use std::sync::Arc;

/// The default location database, compiled in (see data/README.md for source and licence).
pub const EMBEDDED_LOCATION_DB: &[u8] = include_bytes!("../data/geo-whois-asn-country.mmdb");

/// Why the service cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("reading policy {path}: {error}")]
    ReadPolicy { path: String, error: std::io::Error },
    #[error(transparent)]
    Geo(#[from] GeoError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Redis(#[from] RedisStartError),
}

/// A loaded engine and the files to watch for it.
pub struct Loaded {
    pub engine: Engine,
    pub targets: Vec<Watched>,
    /// The audit trail, when a store is configured.
    pub audit: Option<Arc<AuditTrail>>,
    /// Metrics, when the ops port is configured.
    pub metrics: Option<Arc<Metrics>>,
}

pub fn load_policy(path: Option<&Path>) -> Result<Policy, StartError> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|error| StartError::ReadPolicy {
                path: path.display().to_string(),
                error,
            })?;
            Ok(parse_policy(&text, &path.display().to_string())?)
        }
        None => Ok(parse_policy(EMBEDDED_POLICY, "embedded data/policy.toml")?),
    }
}

/// The configured usage-history adapter: Redis when `[usage] redis_url` is set, else in-process.
/// The Redis adapter's tasks start on the current tokio runtime.
fn usage_history(config: &Config) -> Result<Option<Arc<dyn UsageHistory>>, StartError> {
    if !config.usage.enabled {
        return Ok(None);
    }
    Ok(Some(match config.usage.redis()? {
        Some(settings) => Arc::new(RedisUsage::start(&settings)?),
        None => Arc::new(UsageAggregator::new(
            config.usage.max_memory_mb.saturating_mul(1 << 20),
        )),
    }))
}

/// Loads everything the config names. Call it inside a tokio runtime (the Redis adapter spawns
/// its writer there).
pub fn load(config: &Config) -> Result<Loaded, StartError> {
    let mut targets = Vec::new();
    let policy_path = config.policy_path();
    if let Some(path) = &policy_path {
        targets.push(Watched::before_load(Target::Policy(path.clone())));
    }
    let policy = load_policy(policy_path.as_deref())?;
    let location = match config.location_db_path() {
        Some(path) => {
            targets.push(Watched::before_load(Target::Database(
                DbRole::Location,
                path.clone(),
            )));
            match GeoDatabase::open(DbRole::Location, &path) {
                Ok(db) => Some(db),
                Err(error) if config.start_without_location_db => {
                    tracing::error!(%error, "starting without a location database; waiting for a valid file");
                    None
                }
                Err(error) => return Err(error.into()),
            }
        }
        None => Some(GeoDatabase::from_bytes(
            DbRole::Location,
            EMBEDDED_LOCATION_DB.to_vec(),
            "embedded data/geo-whois-asn-country.mmdb",
        )?),
    };
    let mut optional = |role: DbRole,
                        path: &Option<std::path::PathBuf>|
     -> Result<Option<GeoDatabase>, StartError> {
        let Some(path) = path else { return Ok(None) };
        targets.push(Watched::before_load(Target::Database(role, path.clone())));
        Ok(Some(GeoDatabase::open(role, path)?))
    };
    let anonymous = optional(DbRole::Anonymous, &config.anonymous_db)?;
    let asn = optional(DbRole::Asn, &config.asn_db)?;
    let options = GeoOptions {
        compile: config.compile_databases,
        cache_capacity: config.cache_capacity,
    };
    let built = std::time::Instant::now();
    let geo = Geo::with_options(location, anonymous, asn, options);
    if let Some(stats) = geo.compiled_stats() {
        tracing::info!(
            ranges_v4 = stats.ranges_v4,
            ranges_v6 = stats.ranges_v6,
            records = stats.records,
            mib = stats.bytes >> 20,
            ms = built.elapsed().as_millis() as u64,
            "databases compiled for lookup"
        );
    }
    let engine = Engine::new(policy, geo, config.max_db_age());
    let engine = match usage_history(config)? {
        Some(history) => {
            tracing::info!(usage = %history.describe(), "usage history");
            engine.with_usage(history)
        }
        None => engine,
    };
    let metrics = config.metrics_listen.map(|_| Metrics::new());
    let engine = match &metrics {
        Some(metrics) => engine.with_observer(metrics.clone()),
        None => engine,
    };
    if let Some(path) = &config.shadow_policy {
        targets.push(Watched::before_load(Target::ShadowPolicy(path.clone())));
        engine.set_shadow_policy(Some(load_policy(Some(path))?));
    }
    let audit = match config.store.backend()? {
        None => None,
        Some(backend) => {
            let (trail, overrides) = AuditTrail::start(
                &backend,
                config.store.ip_storage()?,
                (config.store.queue_capacity, config.store.overflow()?),
                config.store.must_record()?,
                config.store.chain_key()?,
                crate::grpc::encode_answer,
            )?;
            engine.set_overrides(OverrideIndex::new(overrides));
            Some(Arc::new(trail))
        }
    };
    Ok(Loaded {
        engine,
        targets,
        audit,
        metrics,
    })
}
