//! Prometheus metrics and the operator's HTTP port: `/metrics`, `/healthz` (live), `/readyz`
//! (ready once the data is loaded and the gRPC listener serves; not ready while draining).
//!
//! Counters for what happens per request (calls and latency per RPC, verdicts, reasons) are
//! updated as it happens; what is state (cache sizes, database build epochs and age, policy
//! version, usage and store counters, reloads) is read from the engine at scrape time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::audit::AuditTrail;
use crate::classify::{Decision, ReasonCode, Verdict};
use crate::connections::ConnectionStats;
use crate::engine::Engine;

type Labels = Vec<(&'static str, String)>;

/// Per-request metrics, shared by the services.
pub struct Metrics {
    registry: std::sync::Mutex<Registry>,
    /// Handles made once, so the request path only increments atomics: per known method, per
    /// verdict, per reason code (indexed as `ReasonCode as usize`).
    methods: Vec<(&'static str, Counter, Histogram)>,
    other_method: (Counter, Histogram),
    verdict_counters: [Counter; 3],
    reason_counters: Vec<Counter>,
    pub reloads: Counter,
    pub reload_failures: Counter,
    ready: AtomicBool,
    scrapes: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn latency_histogram() -> Histogram {
    // 10 µs to ~10 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_01, 2.0, 20,
    ))
}

impl crate::engine::DecisionObserver for Metrics {
    fn decision(&self, decision: &Decision) {
        self.verdict_counters[decision.verdict as usize].inc();
        for reason in &decision.reasons {
            if let Some(counter) = self.reason_counters.get(reason.code as usize) {
                counter.inc();
            }
        }
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let calls = Family::<Labels, Counter>::default();
        let latency = Family::<Labels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let verdicts = Family::<Labels, Counter>::default();
        let reasons = Family::<Labels, Counter>::default();
        let (reloads, reload_failures) = (Counter::default(), Counter::default());
        let mut registry = Registry::with_prefix("regionguard");
        registry.register(
            "grpc_calls",
            "Calls by gRPC method (and /check: HTTP forward-auth)",
            calls.clone(),
        );
        registry.register(
            "grpc_call_duration_seconds",
            "Call duration by gRPC method (and /check: HTTP forward-auth), to the response headers",
            latency.clone(),
        );
        registry.register("decisions", "Decisions by verdict", verdicts.clone());
        registry.register("reasons", "Reasons given, by code", reasons.clone());
        registry.register(
            "reloads",
            "Policy and database files reloaded",
            reloads.clone(),
        );
        registry.register(
            "reload_failures",
            "Replacement files refused (the loaded copy kept serving)",
            reload_failures.clone(),
        );
        let method = |name: &str| {
            let labels = vec![("method", name.to_owned())];
            (
                calls.get_or_create(&labels).clone(),
                latency.get_or_create(&labels).clone(),
            )
        };
        let methods = KNOWN_METHODS.iter().map(|m| {
            let (c, h) = method(m);
            (*m, c, h)
        });
        let methods = methods.collect();
        let other_method = method("other");
        let verdict_counters = Verdict::ALL.map(|v| {
            verdicts
                .get_or_create(&vec![("verdict", v.as_str().to_owned())])
                .clone()
        });
        let reason_counters = ReasonCode::ALL
            .iter()
            .map(|c| {
                reasons
                    .get_or_create(&vec![("code", c.as_str().to_owned())])
                    .clone()
            })
            .collect();
        Arc::new(Self {
            registry: std::sync::Mutex::new(registry),
            methods,
            other_method,
            verdict_counters,
            reason_counters,
            reloads,
            reload_failures,
            ready: AtomicBool::new(false),
            scrapes: AtomicU64::new(0),
        })
    }

    /// Adds the scrape-time collector over the engine's state.
    pub fn watch(&self, engine: Arc<Engine>, audit: Option<Arc<AuditTrail>>) {
        if let Ok(mut registry) = self.registry.lock() {
            registry.register_collector(Box::new(EngineCollector { engine, audit }));
        }
    }
    /// Adds the scrape-time collector over the ports' connections: the first is the gRPC
    /// port's (its series have no `port` label), the others are labelled with their port.
    pub fn watch_connections(&self, stats: Vec<Arc<ConnectionStats>>) {
        if let Ok(mut registry) = self.registry.lock() {
            registry.register_collector(Box::new(ConnectionCollector(stats)));
        }
    }

    /// Counts a call to `path` (a gRPC method path); unknown paths count as `other`.
    pub fn call(&self, path: &str, seconds: f64) {
        let (calls, latency) = self
            .methods
            .iter()
            .find(|(m, _, _)| *m == path)
            .map_or((&self.other_method.0, &self.other_method.1), |(_, c, h)| {
                (c, h)
            });
        calls.inc();
        latency.observe(seconds);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.scrapes.fetch_add(1, Ordering::Relaxed);
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock()
            && let Err(error) = prometheus_client::encoding::text::encode(&mut out, &registry)
        {
            tracing::error!(%error, "metrics encoding failed");
        }
        out
    }
}

struct EngineCollector {
    engine: Arc<Engine>,
    audit: Option<Arc<AuditTrail>>,
}

impl std::fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineCollector").finish_non_exhaustive()
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    labels: &[(&str, String)],
    value: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    let mut metric = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(metric.encode_family(&labels.to_vec())?)
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

/// One of a port's gauges.
type Field = fn(&ConnectionStats) -> &std::sync::atomic::AtomicU64;

/// The ports' connections (`connections::ConnectionStats`), read at scrape time: one family
/// per metric, the gRPC port's series unlabelled (as before the other ports were counted),
/// the others with `port`.
#[derive(Debug)]
struct ConnectionCollector(Vec<Arc<ConnectionStats>>);

impl ConnectionCollector {
    fn labels(
        stats: &ConnectionStats,
        first: bool,
        more: Option<(&str, &str)>,
    ) -> Vec<(String, String)> {
        let port = (!first).then(|| ("port".to_owned(), stats.port.to_lowercase()));
        port.into_iter()
            .chain(more.map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect()
    }
}

impl Collector for ConnectionCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let ports = || self.0.iter().enumerate().map(|(i, s)| (i == 0, s.as_ref()));
        let gauges: [(&str, &str, Field); 2] = [
            (
                "connections_open",
                "Connections being served, on the gRPC port (no label) and the others (port)",
                |s| &s.open,
            ),
            (
                "connections_pending",
                "Connections accepted that have not sent their opening (HTTP/2 preface, TLS ClientHello, HTTP request head) whole yet",
                |s| &s.pending,
            ),
        ];
        for (name, help, field) in gauges {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (first, stats) in ports() {
                ConstGauge::new(load(field(stats)) as f64)
                    .encode(family.encode_family(&Self::labels(stats, first, None))?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "connections_shed",
            "Connections closed for a limit, by reason (accept_error: accepts that failed; idle_timeout: served, then idle), on the gRPC port (no port label) and the others (port)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (first, stats) in ports() {
            let shed = [
                ("max_connections", load(&stats.shed_full)),
                ("handshake_timeout", load(&stats.shed_silent)),
                ("max_pending_connections", load(&stats.shed_evicted)),
                ("accept_error", load(&stats.accept_errors)),
                ("idle_timeout", load(&stats.closed_idle)),
            ];
            for (reason, value) in shed {
                ConstCounter::new(value).encode(family.encode_family(&Self::labels(
                    stats,
                    first,
                    Some(("reason", reason)),
                ))?)?;
            }
        }
        Ok(())
    }
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        let cache = self.engine.geo().cache_stats();
        counter(
            e,
            "geo_cache_hits",
            "Lookups answered by the prefix cache",
            cache.hits,
        )?;
        counter(
            e,
            "geo_cache_misses",
            "Lookups that read the databases",
            cache.misses,
        )?;
        gauge(
            e,
            "geo_cache_entries",
            "Entries in the prefix cache",
            &[],
            cache.entries as f64,
        )?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for db in self.engine.geo().databases().iter() {
            let labels = [
                ("role", db.role.as_str().to_owned()),
                ("database_type", db.database_type.to_string()),
            ];
            gauge(
                e,
                "geo_database_build_epoch_seconds",
                "Build time of each loaded database",
                &labels,
                db.build_epoch as f64,
            )?;
            gauge(
                e,
                "geo_database_age_seconds",
                "Age of each loaded database",
                &labels,
                now.saturating_sub(db.build_epoch) as f64,
            )?;
        }
        let version = self.engine.policy().version().to_string();
        gauge(
            e,
            "policy_info",
            "The active policy's version (always 1)",
            &[("version", version)],
            1.0,
        )?;
        let shadow = self.engine.shadow_stats();
        counter(
            e,
            "shadow_evaluated",
            "Decisions also evaluated under the shadow policy",
            shadow.evaluated,
        )?;
        counter(
            e,
            "shadow_differed",
            "Decisions the shadow policy would have decided differently",
            shadow.differed,
        )?;
        if let Some(usage) = self.engine.usage() {
            let stats = usage.stats();
            gauge(
                e,
                "usage_accounts",
                "Accounts with usage history held",
                &[],
                stats.accounts as f64,
            )?;
            gauge(
                e,
                "usage_bytes",
                "Estimated bytes held by usage history",
                &[],
                stats.bytes as f64,
            )?;
            counter(
                e,
                "usage_backend_errors",
                "Calls to the usage history's remote engine (Redis) that failed or timed out",
                stats.backend_errors,
            )?;
            counter(
                e,
                "usage_degraded_reads",
                "Decisions made without the remote usage history (UsageSummary.degraded)",
                stats.degraded_reads,
            )?;
            gauge(
                e,
                "usage_pending_events",
                "Usage events accepted but not yet written to the remote engine",
                &[],
                stats.pending_events as f64,
            )?;
            counter(
                e,
                "usage_lost_events",
                "Usage events that could not be kept: the queue to the remote engine was full, or it refused their account's key (WRONGTYPE, NOPERM)",
                stats.lost_events,
            )?;
            counter(
                e,
                "usage_backend_reconnects",
                "Connections to the usage history's remote engine replaced because they stopped answering",
                stats.reconnects,
            )?;
            counter(
                e,
                "usage_written_events",
                "Usage events written to the remote engine",
                stats.written_events,
            )?;
        }
        if let Some(audit) = &self.audit {
            let stats = audit.recorder().stats();
            counter(
                e,
                "audit_recorded",
                "Decisions committed to the audit log",
                stats.recorded,
            )?;
            counter(
                e,
                "audit_dropped",
                "ALLOW decisions left out of the audit log under overflow",
                stats.dropped,
            )?;
            counter(
                e,
                "audit_failed",
                "Decisions not recorded: their row failed to commit or to build",
                stats.failed,
            )?;
            counter(
                e,
                "audit_unrecorded",
                "Must-record decisions not given because their row could not be committed (Classify UNAVAILABLE, Check on_error)",
                stats.unrecorded,
            )?;
            counter(
                e,
                "audit_commits",
                "Transactions the audit writer committed (rows a commit serves: recorded / commits)",
                stats.commits,
            )?;
            counter(
                e,
                "audit_pruned",
                "Audit rows removed by retention (store.retain_days)",
                stats.pruned,
            )?;
            gauge(
                e,
                "audit_account_index_behind_rows",
                "Audit rows past the SQLite account index's mark, read from the log's tail by account lookups (under about 10,000 while the writer keeps up)",
                &[],
                stats.account_index_behind as f64,
            )?;
            gauge(
                e,
                "store_spool_depth",
                "Decisions waiting in the local spool for the PostgreSQL store to come back",
                &[],
                stats.spool_depth as f64,
            )?;
        }
        Ok(())
    }
}

/// The operator's HTTP port.
pub fn router(metrics: Arc<Metrics>) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    let for_metrics = metrics.clone();
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = for_metrics.render();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = metrics.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        )
}

/// The gRPC methods counted by name; anything else is counted as `other`, so a client cannot
/// grow the label set.
const KNOWN_METHODS: [&str; 20] = [
    "/regionguard.v1.Classifier/Classify",
    "/regionguard.v1.Classifier/ClassifyStream",
    "/regionguard.v1.Classifier/LookupIp",
    "/regionguard.v1.Usage/Report",
    "/regionguard.v1.Review/ListQueue",
    "/regionguard.v1.Review/GetAccount",
    "/regionguard.v1.Review/Explain",
    "/regionguard.v1.Review/SetOverride",
    "/regionguard.v1.Review/RemoveOverride",
    "/regionguard.v1.Review/Resolve",
    "/regionguard.v1.Review/ExportDecisions",
    "/regionguard.v1.Review/Replay",
    "/regionguard.v1.Review/GetFleet",
    "/envoy.service.auth.v3.Authorization/Check",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.health.v1.Health/List",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    // HTTP forward-auth: every path under it counts as one method.
    FORWARD_AUTH,
];

const FORWARD_AUTH: &str = "/check";

/// A tower layer that counts calls and their latency per gRPC method (and forward-auth's).
#[derive(Clone)]
pub struct CallMetricsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for CallMetricsLayer {
    type Service = CallMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallMetrics {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CallMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> tower::Service<axum::http::Request<B>> for CallMetrics<S>
where
    S: tower::Service<axum::http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let method = KNOWN_METHODS
            .iter()
            .copied()
            .find(|m| *m == path)
            .or_else(|| path.starts_with("/check/").then_some(FORWARD_AUTH))
            .unwrap_or("other");
        let started = std::time::Instant::now();
        let metrics = self.metrics.clone();
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            metrics.call(method, started.elapsed().as_secs_f64());
            response
        })
    }
}
