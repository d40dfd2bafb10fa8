//! TLS and mTLS on the gRPC port (rustls), with certificates made for the test by rcgen.

mod support;

use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use regionguard::auth::{AuthConfig, CallerConfig, Role};
use regionguard::config::Config;
use regionguard::grpc::pb::classifier_client::ClassifierClient;
use regionguard::grpc::pb::review_client::ReviewClient;
use regionguard::grpc::pb::{self, usage_client::UsageClient};
use regionguard::server::{self, ServerSettings};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig};

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
    /// A second client certificate from the same CA, known to no caller.
    stranger: (String, String),
    /// SHA-256 of the DER of `client`'s certificate, as `client_cert_sha256` takes it.
    client_sha256: String,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let sha256: String = Sha256::digest(cert.der())
            .iter()
            .map(|b| format!("{b:02X}:"))
            .collect();
        (
            (cert.pem(), key.serialize_pem()),
            sha256.trim_end_matches(':').to_owned(),
        )
    };
    let (client, client_sha256) = leaf(vec!["gateway.example".into()]);
    Pki {
        ca: ca_cert.pem(),
        server: leaf(vec!["localhost".into()]).0,
        client,
        stranger: leaf(vec!["other.example".into()]).0,
        client_sha256,
    }
}

async fn start(pki: &Pki, mutual: bool) -> (String, tokio::sync::oneshot::Sender<()>) {
    start_with(pki, mutual, AuthConfig::default()).await
}

async fn start_with(
    pki: &Pki,
    mutual: bool,
    auth: AuthConfig,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    start_tuned(pki, mutual, auth, |_| {}).await
}

async fn start_tuned(
    pki: &Pki,
    mutual: bool,
    auth: AuthConfig,
    tune: impl FnOnce(&mut Config),
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().join("city.mmdb");
    std::fs::write(&location, support::fixtures::city_db()).unwrap();
    let mut config = Config {
        location_db: Some(location),
        metrics_listen: None,
        auth,
        ..Config::default()
    };
    tune(&mut config);
    let loaded = regionguard::app::load(&config).unwrap();
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(&pki.server.0, &pki.server.1));
    if mutual {
        tls = tls.client_ca_root(Certificate::from_pem(&pki.ca));
    }
    let settings = ServerSettings {
        tls: Some(tls),
        ..ServerSettings::from_config(&config)
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _dir = dir;
        server::run(
            listener,
            Arc::new(loaded.engine),
            None,
            Default::default(),
            settings,
            async {
                let _ = stopped.await;
            },
        )
        .await
        .unwrap();
    });
    (format!("https://localhost:{port}"), stop)
}

async fn classify(channel: Channel) -> Result<(), tonic::Status> {
    ClassifierClient::new(channel)
        .classify(support::request("216.160.83.57"))
        .await
        .map(|_| ())
}

async fn connect(
    addr: &str,
    tls: Option<ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let mut endpoint = Channel::from_shared(addr.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    endpoint.connect().await
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_server() {
    let pki = pki();
    let (addr, _stop) = start(&pki, false).await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    classify(connect(&addr, Some(tls)).await.unwrap())
        .await
        .expect("a TLS call succeeds");
    let plain = addr.replace("https://", "http://");
    let refused = match connect(&plain, None).await {
        Err(_) => true,
        Ok(channel) => classify(channel).await.is_err(),
    };
    assert!(refused, "a plaintext client gets nothing");
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let pki = pki();
    let (addr, _stop) = start(&pki, true).await;
    let base = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    let with_identity = base
        .clone()
        .identity(Identity::from_pem(&pki.client.0, &pki.client.1));
    classify(connect(&addr, Some(with_identity)).await.unwrap())
        .await
        .expect("a client with a CA-signed certificate is served");
    let refused = match connect(&addr, Some(base)).await {
        Err(_) => true,
        Ok(channel) => classify(channel).await.is_err(),
    };
    assert!(refused, "a client without a certificate is refused");
}

/// Over mTLS a caller can be known by its certificate alone: its SHA-256 (colon-separated, as
/// `openssl x509 -fingerprint -sha256` prints it) names the caller and its role.
#[tokio::test]
async fn a_registered_client_certificate_identifies_its_caller() {
    let pki = pki();
    let auth = AuthConfig {
        callers: vec![CallerConfig {
            name: "edge-envoy".into(),
            role: Role::Gateway,
            token_sha256: String::new(),
            client_cert_sha256: vec![pki.client_sha256.clone()],
        }],
    };
    auth.validate().unwrap();
    let (addr, _stop) = start_with(&pki, true, auth).await;
    let as_client = |(cert, key): &(String, String)| {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca))
            .domain_name("localhost")
            .identity(Identity::from_pem(cert, key))
    };
    let gateway = connect(&addr, Some(as_client(&pki.client))).await.unwrap();
    classify(gateway.clone())
        .await
        .expect("the registered certificate is the edge-envoy gateway");
    let reviewed = ReviewClient::new(gateway)
        .list_queue(regionguard::grpc::pb::ListQueueRequest::default())
        .await
        .unwrap_err();
    assert_eq!(reviewed.code(), tonic::Code::PermissionDenied);
    assert!(
        reviewed.message().contains("edge-envoy"),
        "{}",
        reviewed.message()
    );

    let stranger = connect(&addr, Some(as_client(&pki.stranger)))
        .await
        .unwrap();
    let refused = classify(stranger.clone()).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::Unauthenticated,
        "CA-signed but not registered: {refused:?}"
    );
    // The streams regionguard serves itself (they read past undecodable messages) are behind
    // the same gate.
    let streamed = match ClassifierClient::new(stranger.clone())
        .classify_stream(tokio_stream::iter(vec![support::request("216.160.83.57")]))
        .await
    {
        Err(status) => status,
        Ok(answers) => answers.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(
        streamed.code(),
        tonic::Code::Unauthenticated,
        "{streamed:?}"
    );
    let reported = UsageClient::new(stranger)
        .report(tokio_stream::iter(vec![pb::UsageEvent {
            account_id: "a".into(),
            ip: "216.160.83.57".into(),
            ..Default::default()
        }]))
        .await
        .unwrap_err();
    assert_eq!(
        reported.code(),
        tonic::Code::Unauthenticated,
        "{reported:?}"
    );
}

/// Under TLS too, a call in flight keeps its connection past the idle timeout (the calls are
/// counted through the connect info tonic inserts under TLS as well); the next call, once the
/// stream is gone, finds a working connection.
#[tokio::test]
async fn a_stream_in_flight_outlives_the_idle_timeout_under_tls() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let pki = pki();
    let (addr, _stop) = start_tuned(&pki, false, AuthConfig::default(), |config| {
        config.limits.idle_timeout_ms = 300;
    })
    .await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    let channel = connect(&addr, Some(tls)).await.unwrap();
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().expect("the first status");
    // Well past the idle timeout, the stream is still open: no error, no end.
    let waited = tokio::time::timeout(Duration::from_millis(1_200), watch.message()).await;
    assert!(waited.is_err(), "the stream in flight was cut: {waited:?}");
    drop(watch);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    health
        .check(HealthCheckRequest::default())
        .await
        .expect("the next call connects again");
}
