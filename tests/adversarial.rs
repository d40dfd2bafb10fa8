//! Hostile and malformed input against the real server (issue #12, "Nothing lost, nothing
//! bypassed"): every bad input gets the right status and a short message naming what was wrong;
//! nothing a caller sends comes back unbounded, slips past the gateway, or is stored raw.
//!
//! Raw bytes go through [`RawCodec`], so the server sees exactly what a broken or hostile client
//! would send; everything else uses the generated clients, as a reader's own code would.

mod support;

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use regionguard::auth::{CallerConfig, Role, token_sha256};
use regionguard::gateway::config::AccountHeaders;
use regionguard::grpc::pb;
use support::envoy::check_request;
use support::{TestServer, request, scenarios};
use tokio_stream::StreamExt;
use tonic::Code;

/// The most a message may carry back (`grpc::MAX_MESSAGE_BYTES`).
const MAX_MESSAGE: usize = 1024;

fn assert_bounded(status: &tonic::Status) {
    assert!(
        status.message().len() <= MAX_MESSAGE,
        "{:?}: a {}-byte message",
        status.code(),
        status.message().len()
    );
}

/// A Check answer as a client sees it.
struct Answer {
    http: i32,
    headers: HashMap<String, String>,
    body: String,
}

async fn check(server: &TestServer, request: CheckRequest) -> Answer {
    let response: CheckResponse = AuthorizationClient::new(server.channel.clone())
        .check(request)
        .await
        .expect("Check never fails at the gRPC level")
        .into_inner();
    let pairs = |options: &[envoy_types::ext_authz::v3::pb::HeaderValueOption]| {
        options
            .iter()
            .filter_map(|o| o.header.as_ref())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect::<HashMap<_, _>>()
    };
    match response.http_response.expect("an http response") {
        HttpResponse::OkResponse(ok) => Answer {
            http: 200,
            headers: pairs(&ok.headers),
            body: String::new(),
        },
        HttpResponse::DeniedResponse(denied) => Answer {
            http: denied.status.map_or(0, |s| s.code),
            headers: pairs(&denied.headers),
            body: denied.body,
        },
        other => panic!("unexpected {other:?}"),
    }
}

// ---- 4. Unbounded error messages ----

#[tokio::test]
async fn a_huge_value_is_never_echoed_whole() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    let huge = "A".repeat(200_000);
    let mut bad = request(scenario.ips.allowed);
    bad.account = Some(pb::Account {
        billing_country: huge.clone(),
        ..Default::default()
    });
    let status = server.classify(bad.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_bounded(&status);
    assert!(
        status
            .message()
            .starts_with("account.billing_country: \"AAAA")
            && status.message().contains("is not an ISO 3166-1"),
        "{}",
        status.message()
    );

    // A stream's error answer is bounded the same way, and the stream goes on.
    let answers: Vec<pb::ClassifyResponse> = server
        .client
        .clone()
        .classify_stream(tokio_stream::iter(vec![bad, request(scenario.ips.allowed)]))
        .await
        .unwrap()
        .into_inner()
        .map(Result::unwrap)
        .collect()
        .await;
    let error = answers[0].error.as_ref().expect("an error answer");
    assert!(
        error.message.len() <= MAX_MESSAGE,
        "{}",
        error.message.len()
    );
    assert!(error.message.contains("is not an ISO 3166-1"));
    assert!(answers[1].error.is_none());

    // Every region code a request carries: a subdivision, an owner's country.
    let mut owner = request(scenario.ips.allowed);
    owner.account = Some(pb::Account {
        organization: Some(pb::Organization {
            owners: vec![pb::Owner {
                name: "H".into(),
                country: format!("UA-{huge}"),
                share_percent: 10.0,
                owners: vec![],
            }],
            ..Default::default()
        }),
        ..Default::default()
    });
    let status = server.classify(owner).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_bounded(&status);
    assert!(status.message().contains("owners[0].country"));
    server.shutdown().await;
}

#[tokio::test]
async fn a_reviewer_call_never_echoes_a_huge_value_whole() {
    const ALICE: &str = "alice-token";
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, |c| {
        c.auth.callers = vec![CallerConfig {
            name: "alice".into(),
            role: Role::Reviewer,
            token_sha256: token_sha256(ALICE),
            client_cert_sha256: Vec::new(),
        }]
    })
    .await;
    let mut client = pb::review_client::ReviewClient::new(server.channel.clone());
    // A candidate policy whose one line is 200 KB: the TOML error quotes the line it fails on.
    let mut call = tonic::Request::new(pb::ReplayRequest {
        policy_toml: format!("version = \"{}", "x".repeat(200_000)),
        ..Default::default()
    });
    call.metadata_mut()
        .insert("authorization", format!("Bearer {ALICE}").parse().unwrap());
    let status = client.replay(call).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_bounded(&status);
    assert!(
        status.message().starts_with("policy_toml: "),
        "{}",
        status.message()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_gateway_names_the_problem_of_a_huge_header_in_a_bounded_answer() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, |c| {
        c.gateway.account_headers = AccountHeaders {
            billing_country: Some("x-billing-country".into()),
            ..Default::default()
        }
    })
    .await;
    let huge = "A".repeat(200_000);
    let answer = check(
        &server,
        check_request(
            scenario.ips.allowed,
            "/v1/chat",
            &[("x-billing-country", &huge)],
            &[],
        ),
    )
    .await;
    assert_eq!(answer.http, 403);
    let error = &answer.headers["x-regionguard-error"];
    assert!(error.len() <= MAX_MESSAGE, "{}", error.len());
    assert!(
        error.starts_with("headers[x-billing-country]") && error.contains("is not an ISO 3166-1"),
        "{error}"
    );
    assert!(
        answer.body.len() <= 2 * MAX_MESSAGE,
        "{}",
        answer.body.len()
    );
    server.shutdown().await;
}
