//! Hot reload: watches the policy and database files and swaps in valid replacements.
//!
//! Polls each file's identity (inode, size, modification time) every interval, so an atomic
//! rename, an in-place rewrite and a `touch` are all noticed without OS-specific watchers. A new
//! file is read and fully validated off the request path (a blocking task); only a valid one is
//! swapped in. An invalid or missing file is logged once and the old snapshot keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::engine::{Engine, is_stale};
use crate::geo::{DbRole, GeoDatabase};
use crate::metrics::Metrics;
use crate::policy::parse_policy;

/// A watched file and what it feeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Policy(PathBuf),
    ShadowPolicy(PathBuf),
    Database(DbRole, PathBuf),
}

impl Target {
    fn path(&self) -> &Path {
        match self {
            Target::Policy(path) | Target::ShadowPolicy(path) | Target::Database(_, path) => path,
        }
    }
}

/// What one poll did, for logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadEvent {
    Reloaded { path: PathBuf, detail: String },
    Refused { path: PathBuf, error: String },
    Missing { path: PathBuf },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Fingerprint {
        len: meta.len(),
        modified: meta.modified().ok(),
        inode,
    })
}

/// A target with the identity its file had when it was last read.
#[derive(Clone, Debug)]
pub struct Watched {
    target: Target,
    seen: Option<Fingerprint>,
}

impl Watched {
    /// Call just before the initial load reads the file: a replacement written while it loads
    /// then differs from this stamp and is picked up by the first poll.
    pub fn before_load(target: Target) -> Self {
        Self {
            seen: fingerprint(target.path()),
            target,
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }
}

/// Polls the targets and applies changes to the engine.
pub struct Reloader {
    engine: Arc<Engine>,
    watched: Vec<Watched>,
    max_db_age: Option<Duration>,
    warned_stale: Vec<(String, u64)>,
    metrics: Option<Arc<Metrics>>,
}

impl Reloader {
    /// Starts from the stamps taken when the files were loaded.
    pub fn new(engine: Arc<Engine>, watched: Vec<Watched>, max_db_age: Option<Duration>) -> Self {
        Self {
            engine,
            watched,
            max_db_age,
            warned_stale: Vec::new(),
            metrics: None,
        }
    }

    /// Counts reloads and refusals in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Checks every target once; blocking (reads and validates files).
    pub fn poll_once(&mut self) -> Vec<ReloadEvent> {
        let mut events = Vec::new();
        for watched in &mut self.watched {
            let path = watched.target.path().to_path_buf();
            let now = fingerprint(&path);
            if now == watched.seen {
                continue;
            }
            watched.seen = now;
            let event = if now.is_none() {
                tracing::warn!(path = %path.display(), "watched file is missing; still serving the loaded copy");
                ReloadEvent::Missing { path }
            } else {
                let result = apply(&self.engine, &watched.target);
                if fingerprint(&path) != now {
                    // Written to while being read: read it again on the next poll.
                    watched.seen = None;
                }
                match result {
                    Ok(detail) => {
                        if let Some(m) = &self.metrics {
                            m.reloads.inc();
                        }
                        tracing::info!(path = %path.display(), %detail, "reloaded");
                        ReloadEvent::Reloaded { path, detail }
                    }
                    Err(error) => {
                        if let Some(m) = &self.metrics {
                            m.reload_failures.inc();
                        }
                        tracing::error!(path = %path.display(), %error, "refused replacement; still serving the loaded copy");
                        ReloadEvent::Refused { path, error }
                    }
                }
            };
            events.push(event);
        }
        self.warn_stale();
        events
    }

    /// Logs each stale database once per build.
    fn warn_stale(&mut self) {
        for meta in self.engine.geo().databases().iter() {
            let key = (meta.source.to_string(), meta.build_epoch);
            if is_stale(meta.build_epoch, self.max_db_age, SystemTime::now())
                && !self.warned_stale.contains(&key)
            {
                tracing::warn!(source = %meta.source, build_epoch = meta.build_epoch, "database is older than max_db_age_days");
                self.warned_stale.push(key);
            }
        }
    }

    /// Polls every `interval` until `shutdown` turns true.
    pub async fn run(mut self, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        self.warn_stale();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            match tokio::task::spawn_blocking(move || {
                self.poll_once();
                self
            })
            .await
            {
                Ok(me) => self = me,
                Err(error) => {
                    tracing::error!(%error, "reload task failed; hot reload stopped");
                    return;
                }
            }
        }
    }
}

fn apply(engine: &Engine, target: &Target) -> Result<String, String> {
    match target {
        Target::Policy(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            let policy =
                parse_policy(&text, &path.display().to_string()).map_err(|e| e.to_string())?;
            let version = policy.version().to_string();
            engine.set_policy(policy);
            Ok(format!("policy version {version}"))
        }
        Target::ShadowPolicy(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            let policy =
                parse_policy(&text, &path.display().to_string()).map_err(|e| e.to_string())?;
            let version = policy.version().to_string();
            engine.set_shadow_policy(Some(policy));
            Ok(format!("shadow policy version {version}"))
        }
        Target::Database(role, path) => {
            let db = GeoDatabase::open(*role, path).map_err(|e| e.to_string())?;
            let mut detail = format!(
                "{} database {} built {}",
                role.as_str(),
                db.database_type(),
                db.build_epoch()
            );
            let started = std::time::Instant::now();
            engine.geo().replace(*role, Some(db));
            if let Some(stats) = engine.geo().compiled_stats() {
                detail += &format!(
                    ", compiled into {} ranges ({} MiB) in {} ms",
                    stats.ranges_v4 + stats.ranges_v6,
                    stats.bytes >> 20,
                    started.elapsed().as_millis()
                );
            }
            Ok(detail)
        }
    }
}
