//! Envoy ext_authz v3 `Authorization/Check` end to end: a client built from Envoy's own generated
//! types (envoy-types) against the real server on loopback.

mod support;

use std::collections::HashMap;
use std::time::Instant;

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::google::protobuf::value::Kind;
use regionguard::gateway::{OnError, ReviewAction};
use support::envoy::check_request;
use support::{TestServer, fixtures, replace_file, scenarios};
use tonic::transport::Channel;

const OK: i32 = 0;
const PERMISSION_DENIED: i32 = 7;

async fn check(server: &TestServer, request: CheckRequest) -> CheckResponse {
    AuthorizationClient::new(server.channel.clone())
        .check(request)
        .await
        .expect("Check never fails at the gRPC level")
        .into_inner()
}

/// The rpc status code, the HTTP status, the headers (request headers when allowed, response
/// headers when denied), the headers removed, and the body.
struct Answer {
    code: i32,
    http: i32,
    headers: HashMap<String, String>,
    removed: Vec<String>,
    body: String,
    metadata: HashMap<String, String>,
}

fn answer(response: &CheckResponse) -> Answer {
    let code = response.status.as_ref().map_or(-1, |s| s.code);
    let pairs = |options: &[envoy_types::ext_authz::v3::pb::HeaderValueOption]| {
        options
            .iter()
            .filter_map(|o| o.header.as_ref())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect::<HashMap<_, _>>()
    };
    let (http, headers, removed, body) =
        match response.http_response.as_ref().expect("an http response") {
            HttpResponse::OkResponse(ok) => (
                200,
                pairs(&ok.headers),
                ok.headers_to_remove.clone(),
                String::new(),
            ),
            HttpResponse::DeniedResponse(denied) => (
                denied.status.as_ref().map_or(0, |s| s.code),
                pairs(&denied.headers),
                vec![],
                denied.body.clone(),
            ),
            other => panic!("unexpected {other:?}"),
        };
    let metadata = response
        .dynamic_metadata
        .as_ref()
        .map(|m| {
            m.fields
                .iter()
                .map(|(k, v)| {
                    let text = match &v.kind {
                        Some(Kind::StringValue(s)) => s.clone(),
                        Some(Kind::BoolValue(b)) => b.to_string(),
                        Some(Kind::NumberValue(n)) => n.to_string(),
                        Some(Kind::ListValue(l)) => l
                            .values
                            .iter()
                            .filter_map(|v| {
                                if let Some(Kind::StringValue(s)) = &v.kind {
                                    Some(s.as_str())
                                } else {
                                    None
                                }
                            })
                            .collect::<Vec<_>>()
                            .join(","),
                        _ => String::new(),
                    };
                    (k.clone(), text)
                })
                .collect()
        })
        .unwrap_or_default();
    Answer {
        code,
        http,
        headers,
        removed,
        body,
        metadata,
    }
}

#[tokio::test]
async fn allowed_request_gets_decision_headers_and_metadata() {
    for scenario in scenarios() {
        let server = TestServer::start(&scenario).await;
        let forged = [
            ("x-regionguard-verdict", "ALLOW"),
            ("x-regionguard-fail-open", "true"),
            ("x-account-id", "acct-42"),
        ];
        let a = answer(
            &check(
                &server,
                check_request(scenario.ips.allowed, "/v1/chat", &forged, &[]),
            )
            .await,
        );
        assert_eq!((a.code, a.http), (OK, 200), "{}", scenario.name);
        assert_eq!(a.headers["x-regionguard-verdict"], "ALLOW");
        assert_eq!(a.headers["x-regionguard-country"], "US");
        assert!(a.headers["x-regionguard-policy-version"].starts_with("2026-11-25+"));
        assert_eq!(a.headers["x-regionguard-decision-id"].len(), 36);
        assert!(
            a.removed.contains(&"x-regionguard-fail-open".to_owned()),
            "a forged fail-open header is stripped"
        );
        assert_eq!(a.metadata["verdict"], "ALLOW");
        assert_eq!(
            a.metadata["decision_id"],
            a.headers["x-regionguard-decision-id"]
        );
        server.shutdown().await;
    }
}

#[tokio::test]
async fn denied_request_gets_403_json_body_and_headers() {
    for scenario in scenarios() {
        let server = TestServer::start(&scenario).await;
        let a = answer(
            &check(
                &server,
                check_request(scenario.ips.sanctioned, "/v1/chat", &[], &[]),
            )
            .await,
        );
        assert_eq!(
            (a.code, a.http),
            (PERMISSION_DENIED, 403),
            "{}",
            scenario.name
        );
        let body: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(body["error"], "region_restricted");
        assert_eq!(body["reasons"], serde_json::json!(["REGION_SANCTIONED"]));
        assert_eq!(
            body["decision_id"],
            a.headers["x-regionguard-decision-id"].as_str()
        );
        assert_eq!(a.headers["x-regionguard-verdict"], "DENY");
        assert_eq!(a.headers["x-regionguard-country"], "IR");
        assert_eq!(a.headers["content-type"], "application/json");
        assert_eq!(a.metadata["reasons"], "REGION_SANCTIONED");
        server.shutdown().await;
    }
}

#[tokio::test]
async fn spoofed_forwarded_for_is_ignored_without_trusted_hops() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    let xff = [("x-forwarded-for", scenario.ips.allowed)];
    let a = answer(
        &check(
            &server,
            check_request(scenario.ips.sanctioned, "/", &xff, &[]),
        )
        .await,
    );
    assert_eq!(
        a.http, 403,
        "the connection's source decides, not the header"
    );
    let xff = [("x-forwarded-for", scenario.ips.sanctioned)];
    let a = answer(&check(&server, check_request(scenario.ips.allowed, "/", &xff, &[])).await);
    assert_eq!(a.http, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn trusted_hops_use_the_right_most_untrusted_forwarded_address() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, |c| c.gateway.trusted_hops = 1).await;
    let proxy = "10.0.0.5";
    // The client put the allowed address first to spoof; the trusted proxy appended the real one.
    let xff = format!("{}, {}", scenario.ips.allowed, scenario.ips.sanctioned);
    let a = answer(
        &check(
            &server,
            check_request(proxy, "/", &[("x-forwarded-for", &xff)], &[]),
        )
        .await,
    );
    assert_eq!(
        (a.http, a.headers["x-regionguard-country"].as_str()),
        (403, "IR")
    );
    let xff = format!("{}, {}", scenario.ips.sanctioned, scenario.ips.allowed);
    let a = answer(
        &check(
            &server,
            check_request(proxy, "/", &[("x-forwarded-for", &xff)], &[]),
        )
        .await,
    );
    assert_eq!(a.http, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn account_headers_and_missing_account() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, |c| {
        c.gateway.account_headers.billing_country = Some("x-billing-country".into())
    })
    .await;
    let a = answer(&check(&server, check_request(scenario.ips.allowed, "/", &[], &[])).await);
    assert_eq!(
        a.headers["x-regionguard-verdict"], "ALLOW",
        "no account header: decided on the address alone"
    );
    let headers = [("x-account-id", "acct-7"), ("x-billing-country", "CU")];
    let a = answer(
        &check(
            &server,
            check_request(scenario.ips.allowed, "/", &headers, &[]),
        )
        .await,
    );
    assert_eq!(a.http, 403);
    assert!(a.body.contains("BILLING_COUNTRY_RESTRICTED"), "{}", a.body);
    let signup = answer(
        &check(
            &server,
            check_request(
                scenario.ips.tor,
                "/signup",
                &[("x-account-id", "acct-8")],
                &[("regionguard.flow", "signup")],
            ),
        )
        .await,
    );
    assert_eq!(
        signup.headers["x-regionguard-verdict"], "REVIEW",
        "REVIEW is allowed through by default"
    );
    assert_eq!(signup.http, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn review_can_deny_and_deny_status_is_configurable() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, |c| {
        c.gateway.review_action = ReviewAction::Deny;
        c.gateway.deny_status = 429;
    })
    .await;
    let a = answer(&check(&server, check_request(scenario.ips.tor, "/", &[], &[])).await);
    assert_eq!((a.code, a.http), (PERMISSION_DENIED, 429));
    assert!(a.body.contains("review_required"));
    server.shutdown().await;
}

#[tokio::test]
async fn bypass_paths_are_never_classified() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, |c| {
        c.gateway.bypass_paths = vec!["/healthz".into(), "/public/*".into()]
    })
    .await;
    for path in ["/healthz", "/healthz?full=1", "/public/logo.png"] {
        let a = answer(
            &check(
                &server,
                check_request(
                    scenario.ips.sanctioned,
                    path,
                    &[("x-regionguard-verdict", "ALLOW")],
                    &[],
                ),
            )
            .await,
        );
        assert_eq!((a.code, a.http), (OK, 200), "{path}");
        assert!(!a.headers.contains_key("x-regionguard-verdict"));
        assert!(
            a.removed.contains(&"x-regionguard-verdict".to_owned()),
            "forged header stripped on {path}"
        );
    }
    let a = answer(
        &check(
            &server,
            check_request(scenario.ips.sanctioned, "/healthz/deep", &[], &[]),
        )
        .await,
    );
    assert_eq!(a.http, 403);
    server.shutdown().await;
}

#[tokio::test]
async fn on_error_decides_when_the_database_is_missing() {
    let scenario = &scenarios()[0];
    for on_error in [OnError::Deny, OnError::Allow] {
        let server = TestServer::start_with(scenario, |c| {
            c.start_without_location_db = true;
            c.location_db = Some(
                c.location_db
                    .as_ref()
                    .unwrap()
                    .with_file_name("not-yet-there.mmdb"),
            );
            c.gateway.on_error = on_error;
        })
        .await;
        let a = answer(&check(&server, check_request(scenario.ips.allowed, "/", &[], &[])).await);
        match on_error {
            OnError::Deny => {
                assert_eq!((a.code, a.http), (PERMISSION_DENIED, 403));
                assert!(a.body.contains("region_check_failed"), "{}", a.body);
            }
            OnError::Allow => {
                assert_eq!((a.code, a.http), (OK, 200));
                assert_eq!(a.headers["x-regionguard-fail-open"], "true");
                assert!(!a.headers.contains_key("x-regionguard-verdict"));
            }
        }
        assert!(
            a.headers["x-regionguard-error"].contains("no location database"),
            "{:?}",
            a.headers
        );
        let status = server
            .classify(support::request(scenario.ips.allowed))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);

        // The database arrives: the reloader picks it up and decisions resume.
        replace_file(
            &server.dir.path().join("not-yet-there.mmdb"),
            &fixtures::city_db(),
        );
        let mut decided = false;
        for _ in 0..250 {
            let a = answer(
                &check(
                    &server,
                    check_request(scenario.ips.sanctioned, "/", &[], &[]),
                )
                .await,
            );
            if a.headers.get("x-regionguard-verdict").map(String::as_str) == Some("DENY") {
                decided = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(decided, "decisions resume once the database appears");
        server.shutdown().await;
    }
}

#[tokio::test]
async fn malformed_addresses_follow_on_error() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, |c| c.gateway.trusted_hops = 1).await;
    for (source, xff) in [("not-an-address", ""), ("10.0.0.1", "1.2.3.4.5"), ("", "")] {
        let headers: Vec<(&str, &str)> = if xff.is_empty() {
            vec![]
        } else {
            vec![("x-forwarded-for", xff)]
        };
        let a = answer(&check(&server, check_request(source, "/", &headers, &[])).await);
        assert_eq!(
            a.http, 403,
            "fail closed by default for {source:?} / {xff:?}"
        );
        assert!(a.headers.contains_key("x-regionguard-error"));
    }
    let a = answer(&check(&server, CheckRequest::default()).await);
    assert_eq!(a.http, 403);
    server.shutdown().await;
}

#[tokio::test]
async fn reflection_lists_and_describes_the_authorization_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = TestServer::start(&scenarios()[0]).await;
    let ask = |m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let requests = [
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "envoy.service.auth.v3.Authorization".into(),
        )),
    ];
    let mut answers = ServerReflectionClient::new(server.channel.clone())
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a list")
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "envoy.service.auth.v3.Authorization")
    );
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected descriptors")
    };
    assert!(!files.file_descriptor_proto.is_empty());
    server.shutdown().await;
}

/// A gateway-sized burst: 10,000 Check calls over 64 concurrent streams, zero errors. The
/// throughput is printed for the record (debug build, shared 2-core machine); not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_burst_completes_without_errors() {
    const CALLS: usize = 10_000;
    const STREAMS: usize = 64;
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    let ips = [
        scenario.ips.allowed,
        scenario.ips.sanctioned,
        scenario.ips.unsupported,
        scenario.ips.vpn,
        scenario.ips.tor,
    ];
    let client: AuthorizationClient<Channel> = AuthorizationClient::new(server.channel.clone());
    let started = Instant::now();
    let tasks: Vec<_> = (0..STREAMS)
        .map(|worker| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let (mut allowed, mut denied, mut errors) = (0usize, 0usize, 0usize);
                for i in (worker..CALLS).step_by(STREAMS) {
                    let account = format!("acct-{}", i % 500);
                    let request = check_request(
                        ips[i % ips.len()],
                        "/v1/chat",
                        &[("x-account-id", &account)],
                        &[],
                    );
                    match client.check(request).await {
                        Ok(r) if r.get_ref().status.as_ref().is_some_and(|s| s.code == OK) => {
                            allowed += 1
                        }
                        Ok(_) => denied += 1,
                        Err(_) => errors += 1,
                    }
                }
                (allowed, denied, errors)
            })
        })
        .collect();
    let (mut allowed, mut denied, mut errors) = (0, 0, 0);
    for task in tasks {
        let (a, d, e) = task.await.unwrap();
        (allowed, denied, errors) = (allowed + a, denied + d, errors + e);
    }
    let elapsed = started.elapsed();
    support::record(format_args!(
        "gateway burst: {CALLS} Check calls over {STREAMS} concurrent streams in {:.2}s = {:.0} checks/s ({allowed} allowed, {denied} denied, {errors} errors)",
        elapsed.as_secs_f64(),
        CALLS as f64 / elapsed.as_secs_f64()
    ));
    assert_eq!(errors, 0);
    assert_eq!(allowed + denied, CALLS);
    assert_eq!(
        denied,
        CALLS / ips.len() * 2,
        "sanctioned and unsupported addresses are denied, the rest allowed"
    );
    server.shutdown().await;
}
