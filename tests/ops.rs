//! The operator's HTTP port: Prometheus metrics, liveness and readiness.

mod support;

use std::io::{Read, Write};

use support::{TestServer, scenarios};

/// A plain HTTP/1.1 GET over a fresh connection: (status, body).
fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_verdicts_reasons_and_show_state() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())
    })
    .await;
    let addr = server.ops_addr.unwrap();
    server.classify_ip(scenario.ips.sanctioned).await;
    server.classify_ip(scenario.ips.sanctioned).await;
    server.classify_ip(scenario.ips.allowed).await;

    let (status, body) = tokio::task::spawn_blocking(move || get(addr, "/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    for expected in [
        "regionguard_decisions_total{verdict=\"DENY\"} 2",
        "regionguard_decisions_total{verdict=\"ALLOW\"} 1",
        "regionguard_reasons_total{code=\"REGION_SANCTIONED\"} 2",
        "regionguard_grpc_calls_total{method=\"/regionguard.v1.Classifier/Classify\"} 3",
        "regionguard_grpc_call_duration_seconds_count{method=\"/regionguard.v1.Classifier/Classify\"} 3",
        "regionguard_geo_cache_misses_total",
        "regionguard_geo_database_age_seconds{role=\"location\"",
        "regionguard_policy_info{version=\"2026-11-25+",
        "regionguard_reload_failures_total 0",
        "regionguard_audit_recorded_total",
        "regionguard_audit_commits_total",
        "regionguard_audit_account_index_behind_rows",
    ] {
        assert!(body.contains(expected), "missing {expected:?} in\n{body}");
    }
    let (live, _) = tokio::task::spawn_blocking(move || get(addr, "/healthz"))
        .await
        .unwrap();
    let (ready, _) = tokio::task::spawn_blocking(move || get(addr, "/readyz"))
        .await
        .unwrap();
    assert_eq!((live, ready), (200, 200));
    server.shutdown().await;
}
