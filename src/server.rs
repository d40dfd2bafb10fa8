//! The gRPC server: Classifier, Envoy ext_authz Authorization, Usage, Review, grpc.health.v1
//! and server reflection (v1 and v1alpha), on a listener the caller binds, stopped by a future
//! the caller resolves; beside it, on listeners of their own, the ops port and HTTP
//! forward-auth.
//!
//! Shutdown order: health reports NOT_SERVING, the listener stops accepting, in-flight calls
//! drain for at most the grace period, then the server returns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;

use envoy_types::ext_authz::v3::pb::AuthorizationServer;

use crate::audit::AuditTrail;
use crate::auth::{AuthConfig, Gate, Role};
use crate::config::LimitsConfig;
use crate::connections::ConnectionStats;
use crate::engine::Engine;
use crate::gateway::{ENVOY_FILE_DESCRIPTOR_SET, ForwardAuthConfig, GatewayConfig, GatewayService};
use crate::grpc::deadline::UnaryDeadlineLayer;
use crate::grpc::pb::review_server::ReviewServer;
use crate::grpc::pb::usage_server::UsageServer;
use crate::grpc::pb::{self, classifier_server::ClassifierServer};
use crate::grpc::{ClassifierService, MessageLimit, ReviewService, Routed, UsageService};
use crate::metrics::{CallMetricsLayer, Metrics};
use tonic::service::interceptor::InterceptedService;

/// Limits, timings and the gateway adapter's settings.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub max_request_bytes: usize,
    pub shutdown_grace: Duration,
    pub gateway: GatewayConfig,
    pub forward_auth: ForwardAuthConfig,
    pub console: crate::console::ConsoleConfig,
    /// The audit chain's key, for the console's verify.
    pub chain_key: Option<crate::store::ChainKey>,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    /// None: plaintext.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

impl ServerSettings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            max_request_bytes: config.max_request_bytes,
            shutdown_grace: config.shutdown_grace(),
            gateway: config.gateway.clone(),
            forward_auth: config.forward_auth.clone(),
            console: config.console.clone(),
            chain_key: None,
            auth: config.auth.clone(),
            limits: config.limits,
            tls: None,
        }
    }
}

/// The operator's HTTP port (`/metrics`, `/healthz`, `/readyz`) and the metrics it serves.
pub struct OpsPort {
    pub listener: TcpListener,
    pub metrics: Arc<Metrics>,
}

/// The HTTP listeners beside the gRPC port, each off when `None`.
#[derive(Default)]
pub struct SidePorts {
    pub ops: Option<OpsPort>,
    /// HTTP forward-auth (`[forward_auth] listen`), answered like `Authorization/Check`.
    pub forward_auth: Option<TcpListener>,
    /// The reviewers' console (`[console] listen`).
    pub console: Option<TcpListener>,
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gateway config: {0}")]
    Gateway(String),
    #[error("console config: {0}")]
    Console(String),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// Every service's health by its full name (as `grpc_health_probe -service` asks), and the
/// server's own (`""`).
async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    for name in [
        "",
        <ClassifierServer<ClassifierService> as tonic::server::NamedService>::NAME,
        <AuthorizationServer<GatewayService> as tonic::server::NamedService>::NAME,
        <UsageServer<UsageService> as tonic::server::NamedService>::NAME,
        <ReviewServer<ReviewService> as tonic::server::NamedService>::NAME,
    ] {
        health.set_service_status(name, status).await;
    }
}

/// Serves until `shutdown` resolves, then drains.
pub async fn run(
    listener: TcpListener,
    engine: Arc<Engine>,
    audit: Option<Arc<AuditTrail>>,
    ports: SidePorts,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let SidePorts {
        ops,
        forward_auth,
        console,
    } = ports;
    let metrics = ops.as_ref().map(|ops| ops.metrics.clone());
    if let Some(audit) = &audit {
        // Overrides other replicas set reach this engine (PostgreSQL store; nothing on SQLite).
        let engine = engine.clone();
        audit
            .reads()
            .watch_overrides(std::sync::Arc::new(move |all| {
                engine.set_overrides(crate::overrides::OverrideIndex::new(all))
            }));
    }
    // Every port's connections, counted apart (the gRPC port's first).
    let mut watched = vec![Arc::new(ConnectionStats::for_port("gRPC"))];
    let (ops_stop, ops_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(ops) = ops {
        ops.metrics.watch(engine.clone(), audit.clone());
        let app = crate::metrics::router(ops.metrics.clone());
        // The gRPC port's connection limits here too: a flood of silent or idle connections
        // must not keep a load balancer's probe of /readyz out.
        let stats = Arc::new(ConnectionStats::for_port("ops"));
        watched.push(stats.clone());
        let listener =
            crate::connections::listener(ops.listener, settings.limits.connection_limits(), stats);
        tokio::spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = ops_stopped.await;
            });
            if let Err(error) = served.await {
                tracing::error!(%error, "metrics port failed");
            }
        });
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, true).await;
    // v1 and v1alpha: grpcurl before 1.9, grpcui, evans and many IDE clients speak only v1alpha.
    let descriptors = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(ENVOY_FILE_DESCRIPTOR_SET)
    };
    let reflection = descriptors()
        .build_v1()
        .expect("the descriptor sets are built by build.rs and valid");
    let reflection_v1alpha = descriptors()
        .build_v1alpha()
        .expect("the descriptor sets are built by build.rs and valid");

    // Every service but health and reflection sits behind the caller check for its role.
    // Classifier and Usage messages are held to max_request_bytes as received (MessageLimit,
    // RESOURCE_EXHAUSTED before decoding); Check and Review, whose messages the limit does not
    // describe, get 4x that as a backstop (Review's as received too).
    let limit = settings.max_request_bytes;
    let backstop = limit.saturating_mul(4);
    let gateway_gate = Gate::new(&settings.auth, Role::Gateway);
    let gateway = GatewayService::new(engine.clone(), settings.gateway.clone(), audit.clone())
        .map_err(ServeError::Gateway)?;
    let forward_auth = forward_auth.map(|listener| {
        let app = crate::gateway::forward_auth::router(
            gateway.clone(),
            settings.forward_auth.clone(),
            gateway_gate.clone(),
        )
        .layer(tower::util::option_layer(
            metrics.clone().map(CallMetricsLayer),
        ));
        (listener, app)
    });
    let console = console
        .map(|listener| {
            let parts = crate::console::ConsoleParts {
                engine: engine.clone(),
                audit: audit.clone(),
                gate: Gate::new(&settings.auth, Role::Reviewer),
                chain_key: settings.chain_key.clone(),
                max_form_bytes: backstop,
            };
            crate::console::router(&settings.console, parts).map(|app| (listener, app))
        })
        .transpose()
        .map_err(ServeError::Console)?;
    let authorization = InterceptedService::new(
        // Check through this project's codec (`route.rs`): an undecodable request is the
        // caller's error, INVALID_ARGUMENT.
        Routed::new(
            AuthorizationServer::new(gateway.clone()).max_decoding_message_size(backstop),
            gateway,
            backstop,
        ),
        gateway_gate.clone(),
    );
    // Report and ClassifyStream read past a message that does not decode (`route.rs`).
    // Routed methods are served with `route.rs`'s settings, not the generated server's:
    // compression turned on here would have to be turned on there too.
    let usage_service = UsageService::new(engine.clone(), settings.limits.max_stream_messages)
        .with_idle_timeout(Duration::from_millis(
            settings.limits.stream_idle_timeout_ms.max(1),
        ));
    let usage = MessageLimit::new(
        InterceptedService::new(
            Routed::new(
                UsageServer::new(usage_service.clone()).max_decoding_message_size(limit),
                usage_service,
                limit,
            ),
            gateway_gate.clone(),
        ),
        limit,
    );
    // As received, too: past the backstop a reviewer's message (a Replay's policy, say) gets
    // RESOURCE_EXHAUSTED like any other, not the generated server's OUT_OF_RANGE.
    let review = MessageLimit::new(
        InterceptedService::new(
            ReviewServer::new(ReviewService::new(engine.clone(), audit.clone()))
                .max_decoding_message_size(backstop),
            Gate::new(&settings.auth, Role::Reviewer),
        ),
        backstop,
    );
    let classifier_service = ClassifierService::new(engine, audit)
        .with_max_stream_messages(settings.limits.max_stream_messages);
    let classifier = MessageLimit::new(
        InterceptedService::new(
            Routed::new(
                ClassifierServer::new(classifier_service.clone()).max_decoding_message_size(limit),
                classifier_service,
                limit,
            ),
            gateway_gate,
        ),
        limit,
    );

    let (began, mut began_rx) = watch::channel(false);
    let ready = metrics.clone();
    let began_at = Arc::new(std::sync::OnceLock::new());
    let began_at_signal = began_at.clone();
    let signal = async move {
        shutdown.await;
        let _ = began_at_signal.set(std::time::Instant::now());
        if let Some(metrics) = &ready {
            metrics.set_ready(false);
        }
        tracing::info!("shutting down: health NOT_SERVING, draining in-flight requests");
        set_health(&health, false).await;
        let _ = began.send(true);
    };
    // Forward-auth and the console: the gRPC port's connection limits (counts of their own);
    // they stop accepting when shutdown begins and drain like the gRPC port.
    let side_tasks: Vec<_> = [
        forward_auth.map(|port| (port, "forward-auth")),
        console.map(|port| (port, "console")),
    ]
    .into_iter()
    .flatten()
    .map(|((listener, app), what)| {
        let mut began = began_rx.clone();
        let stats = Arc::new(ConnectionStats::for_port(what));
        watched.push(stats.clone());
        let listener =
            crate::connections::listener(listener, settings.limits.connection_limits(), stats);
        let app = app.into_make_service_with_connect_info::<crate::console::Peer>();
        tokio::spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = began.wait_for(|b| *b).await;
            });
            if let Err(error) = served.await {
                tracing::error!(%error, "{what} port failed");
            }
        })
    })
    .collect();
    let limits = settings.limits;
    let connections = watched[0].clone();
    if let Some(metrics) = &metrics {
        metrics.watch_connections(watched);
    }
    let incoming = crate::connections::incoming(
        listener,
        (
            limits.connection_limits(),
            crate::connections::Opening::Http2,
        ),
        connections,
    );
    let keepalive = (limits.keepalive_interval_ms > 0)
        .then(|| Duration::from_millis(limits.keepalive_interval_ms));
    let mut builder = Server::builder();
    if let Some(tls) = settings.tls.clone() {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        .layer(crate::connections::ActivityLayer)
        .concurrency_limit_per_connection(limits.concurrency_per_connection.max(1))
        .load_shed(true)
        .max_concurrent_streams(limits.max_concurrent_streams.max(1))
        .initial_stream_window_size(limits.stream_window_bytes)
        .initial_connection_window_size(limits.connection_window_bytes)
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(Some(Duration::from_millis(
            limits.keepalive_timeout_ms.max(1),
        )))
        .layer(tower::util::option_layer(
            metrics.clone().map(CallMetricsLayer),
        ))
        .layer(UnaryDeadlineLayer(Duration::from_millis(
            limits.request_timeout_ms.max(1),
        )))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(classifier)
        .add_service(authorization)
        .add_service(usage)
        .add_service(review)
        .serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    if let Some(metrics) = &metrics {
        metrics.set_ready(true);
    }
    // The ops port stops with the server (dropping the sender ends it).
    let _ops_stop = ops_stop;
    let outcome = tokio::select! {
        result = &mut server => result.map_err(ServeError::from),
        _ = async {
            if began_rx.wait_for(|b| *b).await.is_err() {
                // The signal future is gone only when the server already returned.
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(settings.shutdown_grace).await;
        } => {
            tracing::warn!(grace = ?settings.shutdown_grace, "grace period over; dropping unfinished requests");
            Ok(())
        }
    };
    // The side ports drained beside the gRPC port since shutdown began: what is left of the
    // same grace period, not a second one.
    for mut task in side_tasks {
        let left = began_at.get().map_or(settings.shutdown_grace, |at| {
            settings.shutdown_grace.saturating_sub(at.elapsed())
        });
        if tokio::time::timeout(left, &mut task).await.is_err() {
            task.abort();
        }
    }
    outcome
}
