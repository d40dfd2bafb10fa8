//! Hostile and malformed input against the real server (issue #12, "Nothing lost, nothing
//! bypassed"): every bad input gets the right status and a short message naming what was wrong;
//! nothing a caller sends comes back unbounded, slips past the gateway, or is stored raw.
//!
//! Raw bytes go through [`RawCodec`], so the server sees exactly what a broken or hostile client
//! would send; everything else uses the generated clients, as a reader's own code would.

mod support;

use std::collections::HashMap;
use std::marker::PhantomData;
use std::process::{Command, Stdio};
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use prost::Message;
use prost::bytes::BufMut;
use regionguard::auth::{CallerConfig, Role, token_sha256};
use regionguard::config::Config;
use regionguard::gateway::config::AccountHeaders;
use regionguard::grpc::pb;
use regionguard::grpc::pb::usage_client::UsageClient;
use support::envoy::check_request;
use support::replica::Replica;
use support::{TestServer, request, scenarios};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_regionguard");
const CLASSIFY: &str = "/regionguard.v1.Classifier/Classify";
const CLASSIFY_STREAM: &str = "/regionguard.v1.Classifier/ClassifyStream";
const REPORT: &str = "/regionguard.v1.Usage/Report";

/// The most a message may carry back (`grpc::MAX_MESSAGE_BYTES`).
const MAX_MESSAGE: usize = 1024;

/// Sends request bodies as the bytes given; decodes answers as `R`.
struct RawCodec<R>(PhantomData<R>);

impl<R> Default for RawCodec<R> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

struct AnswerDecoder<R>(PhantomData<R>);

impl<R: Message + Default> Decoder for AnswerDecoder<R> {
    type Item = R;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<R>, tonic::Status> {
        R::decode(buf)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl<R: Message + Default + Send + 'static> Codec for RawCodec<R> {
    type Encode = Vec<u8>;
    type Decode = R;
    type Encoder = RawEncoder;
    type Decoder = AnswerDecoder<R>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> AnswerDecoder<R> {
        AnswerDecoder(PhantomData)
    }
}

async fn raw_unary<R: Message + Default + Send + 'static>(
    channel: &Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<R, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static(path),
        RawCodec::<R>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Sends `bodies` on one stream; the answers in order, then how the stream ended.
async fn raw_stream<R: Message + Default + Send + 'static>(
    channel: &Channel,
    path: &'static str,
    bodies: Vec<Vec<u8>>,
) -> (Vec<R>, Result<(), tonic::Status>) {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let call = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(bodies)),
            PathAndQuery::from_static(path),
            RawCodec::<R>::default(),
        )
        .await;
    let mut stream = match call {
        Ok(response) => response.into_inner(),
        Err(status) => return (Vec::new(), Err(status)),
    };
    let mut answers = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(answer)) => answers.push(answer),
            Ok(None) => return (answers, Ok(())),
            Err(status) => return (answers, Err(status)),
        }
    }
}

/// Bytes that are not a protobuf message: a field tag with wire type 7, which does not exist.
const GARBAGE: [u8; 8] = [0x0f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];

/// A ClassifyRequest whose `ip` (field 1) holds bytes that are not UTF-8.
fn not_utf8() -> Vec<u8> {
    vec![0x0a, 0x03, 0xff, 0xfe, 0x80]
}

fn classify_bytes(ip: &str) -> Vec<u8> {
    request(ip).encode_to_vec()
}

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
    // A scope of 1000 control characters: quoted whole, each would be escaped to six.
    let mut call = tonic::Request::new(pb::SetOverrideRequest {
        scope: "\u{1}".repeat(1000),
        value: "acct-1".into(),
        ..Default::default()
    });
    call.metadata_mut()
        .insert("authorization", format!("Bearer {ALICE}").parse().unwrap());
    let status = client.set_override(call).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_bounded(&status);
    assert!(
        status.message().starts_with("scope: ")
            && status
                .message()
                .ends_with("is not account, domain, network or fleet"),
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

// ---- 7a. Malformed protobuf is the caller's error ----

#[tokio::test]
async fn malformed_protobuf_is_invalid_argument_naming_the_problem() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;

    let garbage = raw_unary::<pb::ClassifyResponse>(&server.channel, CLASSIFY, GARBAGE.to_vec())
        .await
        .unwrap_err();
    assert_eq!(garbage.code(), Code::InvalidArgument, "{garbage:?}");
    assert!(
        garbage.message().contains("could not be decoded")
            && garbage.message().contains("wire type"),
        "{}",
        garbage.message()
    );

    // Envoy's Check too, though its server is envoy-types' own (prost's codec said INTERNAL).
    let check = raw_unary::<CheckResponse>(
        &server.channel,
        "/envoy.service.auth.v3.Authorization/Check",
        GARBAGE.to_vec(),
    )
    .await
    .unwrap_err();
    assert_eq!(check.code(), Code::InvalidArgument, "{check:?}");
    assert!(
        check.message().contains("could not be decoded") && check.message().contains("wire type"),
        "{}",
        check.message()
    );

    let text = raw_unary::<pb::ClassifyResponse>(&server.channel, CLASSIFY, not_utf8())
        .await
        .unwrap_err();
    assert_eq!(text.code(), Code::InvalidArgument, "{text:?}");
    assert!(
        text.message().contains("ClassifyRequest.ip") && text.message().contains("UTF-8"),
        "{}",
        text.message()
    );

    // An ownership chain nested past protobuf's recursion limit (100).
    let mut owner = pb::Owner {
        name: "leaf".into(),
        ..Default::default()
    };
    for i in 0..150 {
        owner = pb::Owner {
            name: format!("o{i}"),
            share_percent: 100.0,
            owners: vec![owner],
            ..Default::default()
        };
    }
    let mut deep = request(scenario.ips.allowed);
    deep.account = Some(pb::Account {
        organization: Some(pb::Organization {
            owners: vec![owner],
            ..Default::default()
        }),
        ..Default::default()
    });
    let nested = raw_unary::<pb::ClassifyResponse>(&server.channel, CLASSIFY, deep.encode_to_vec())
        .await
        .unwrap_err();
    assert_eq!(nested.code(), Code::InvalidArgument, "{nested:?}");
    assert!(
        nested.message().contains("recursion limit"),
        "{}",
        nested.message()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn an_undecodable_stream_message_is_answered_and_the_stream_goes_on() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    let allowed = || classify_bytes(scenario.ips.allowed);
    let bodies = vec![
        allowed(),
        not_utf8(),
        allowed(),
        GARBAGE.to_vec(),
        allowed(),
    ];
    let (answers, end) =
        raw_stream::<pb::ClassifyResponse>(&server.channel, CLASSIFY_STREAM, bodies).await;
    end.expect("the stream ends as the client ended it");
    assert_eq!(answers.len(), 5, "one answer per request: {answers:?}");
    for (i, bad, detail) in [(1, &answers[1], "UTF-8"), (3, &answers[3], "wire type")] {
        let error = bad.error.as_ref().expect("an error answer");
        assert_eq!(error.code, "INVALID_ARGUMENT");
        assert!(
            error.message.starts_with(&format!("request {i}:"))
                && error.message.contains("could not be decoded")
                && error.message.contains(detail),
            "{}",
            error.message
        );
    }
    for good in [&answers[0], &answers[2], &answers[4]] {
        assert!(good.error.is_none(), "{good:?}");
        assert!(!good.decision_id.is_empty(), "decided: {good:?}");
    }
    server.shutdown().await;
}

// ---- 7b. max_request_bytes counts the bytes as received ----

#[tokio::test]
async fn unknown_fields_count_toward_max_request_bytes() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    // 600 KB in field 1000 (unknown to the server: dropped by decoding, so a check on the
    // re-encoded message sees only the ip).
    let mut body = classify_bytes(scenario.ips.allowed);
    let padding = vec![b'x'; 600_000];
    prost::encoding::bytes::encode(1000, &padding, &mut body);
    let status = raw_unary::<pb::ClassifyResponse>(&server.channel, CLASSIFY, body.clone())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("262144"),
        "names the limit: {}",
        status.message()
    );

    // On a stream: the requests before it are answered, then the stream ends saying why.
    let bodies = vec![classify_bytes(scenario.ips.allowed), body];
    let (answers, end) =
        raw_stream::<pb::ClassifyResponse>(&server.channel, CLASSIFY_STREAM, bodies).await;
    assert!(answers[0].error.is_none());
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("262144"), "{}", status.message());

    // Just under the limit is served.
    let mut fits = classify_bytes(scenario.ips.allowed);
    prost::encoding::bytes::encode(1000, &vec![b'x'; 200_000], &mut fits);
    raw_unary::<pb::ClassifyResponse>(&server.channel, CLASSIFY, fits)
        .await
        .expect("under max_request_bytes");
    server.shutdown().await;
}

// ---- 7c. An undecodable usage event is never dropped in silence ----

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn usage_event(account: &str) -> pb::UsageEvent {
    pb::UsageEvent {
        account_id: account.into(),
        ip: "216.160.83.57".into(),
        timestamp_unix_ms: now_ms(),
        request_count: 1,
        ..Default::default()
    }
}

#[tokio::test]
async fn an_undecodable_usage_event_is_rejected_by_index_and_the_report_goes_on() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    let bodies = vec![
        usage_event("a").encode_to_vec(),
        GARBAGE.to_vec(),
        usage_event("b").encode_to_vec(),
    ];
    let (summaries, end) = raw_stream::<pb::ReportSummary>(&server.channel, REPORT, bodies).await;
    end.expect("the report is summed up");
    let [summary] = summaries.as_slice() else {
        panic!("one summary: {summaries:?}")
    };
    assert_eq!((summary.accepted, summary.rejected), (2, 1), "{summary:?}");
    let rejection = &summary.rejections[0];
    assert_eq!((rejection.index, rejection.field.as_str()), (1, "event"));
    assert!(
        rejection.message.contains("could not be decoded")
            && rejection.message.contains("wire type"),
        "{}",
        rejection.message
    );

    // An event over max_request_bytes is refused as it arrives: the call fails saying what was kept.
    let mut big = usage_event("c").encode_to_vec();
    prost::encoding::bytes::encode(1000, &vec![0u8; 300_000], &mut big);
    let bodies = vec![usage_event("d").encode_to_vec(), big];
    let (_, end) = raw_stream::<pb::ReportSummary>(&server.channel, REPORT, bodies).await;
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().starts_with("event 1:") && status.message().contains("262144"),
        "{}",
        status.message()
    );
    server.shutdown().await;
}

// ---- 7j. The gateway reads a creation time as Classify does ----

#[tokio::test]
async fn a_negative_creation_time_header_is_an_error_naming_the_header() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, |c| {
        c.gateway.account_headers = AccountHeaders {
            created_at_unix: Some("x-account-created".into()),
            ..Default::default()
        }
    })
    .await;
    let headers = [("x-account-id", "acct-1"), ("x-account-created", "-5")];
    let answer = check(
        &server,
        check_request(scenario.ips.allowed, "/v1/chat", &headers, &[]),
    )
    .await;
    assert_eq!(answer.http, 403, "on_error = deny");
    let error = &answer.headers["x-regionguard-error"];
    assert!(
        error.starts_with("headers[x-account-created]") && error.contains("before 1970"),
        "{error}"
    );
    assert!(
        answer.body.contains("region_check_failed"),
        "{}",
        answer.body
    );

    // Classify says the same of the same value.
    let mut classify = request(scenario.ips.allowed);
    classify.account = Some(pb::Account {
        created_at_unix: -5,
        ..Default::default()
    });
    let status = server.classify(classify).await.unwrap_err();
    assert!(status.message().contains("before 1970"), "{status:?}");
    server.shutdown().await;
}

// ---- 7k. Control characters in ids ----

#[tokio::test]
async fn control_characters_in_ids_are_refused_naming_the_field() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    let ip = scenario.ips.allowed;
    let cases: [(&str, pb::Account); 3] = [
        (
            "account.account_id",
            pb::Account {
                account_id: "acct\u{7}1".into(),
                ..Default::default()
            },
        ),
        (
            "account.payment_fingerprint",
            pb::Account {
                payment_fingerprint: "card\r\nX-Injected: 1".into(),
                ..Default::default()
            },
        ),
        (
            "account.organization.domain",
            pb::Account {
                organization: Some(pb::Organization {
                    domain: "example.com\u{0}".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
    ];
    for (field, account) in cases {
        let mut bad = request(ip);
        bad.account = Some(account);
        let status = server.classify(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{field}: "))
                && status.message().contains("control character"),
            "{}",
            status.message()
        );
    }

    // Usage events: the account and the API key.
    let mut usage = UsageClient::new(server.channel.clone());
    let events = vec![
        pb::UsageEvent {
            account_id: "a\u{1b}[31m".into(),
            ..usage_event("x")
        },
        pb::UsageEvent {
            api_key_id: "key\n2".into(),
            ..usage_event("y")
        },
        usage_event("z"),
    ];
    let summary = usage
        .report(tokio_stream::iter(events))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((summary.accepted, summary.rejected), (1, 2), "{summary:?}");
    let fields: Vec<&str> = summary
        .rejections
        .iter()
        .map(|r| r.field.as_str())
        .collect();
    assert_eq!(fields, ["account_id", "api_key_id"]);
    assert!(summary.rejections[0].message.contains("control character"));

    // The gateway, through the same conversion.
    let headers = [("x-account-id", "acct\u{7f}1")];
    let answer = check(&server, check_request(ip, "/v1/chat", &headers, &[])).await;
    assert_eq!(answer.http, 403);
    let error = &answer.headers["x-regionguard-error"];
    assert!(
        error.starts_with("headers[x-account-id]") && error.contains("control character"),
        "{error}"
    );
    server.shutdown().await;
}

// ---- 7d. bypass_paths are matched on the normalised path ----

#[tokio::test]
async fn bypass_paths_match_the_normalised_path_only() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, |c| {
        c.gateway.bypass_paths = vec!["/public/*".into(), "/healthz".into()]
    })
    .await;
    // From a sanctioned address: bypassed answers 200 unclassified, classified ones are denied.
    let from_sanctioned = |path: &str| check_request(scenario.ips.sanctioned, path, &[], &[]);
    for path in [
        "/public/app.js",
        "/public/./a/../app.js",
        "/healthz?probe=1",
        "/%68ealthz",
        "/public/my%20file.js",
    ] {
        let answer = check(&server, from_sanctioned(path)).await;
        assert_eq!(answer.http, 200, "{path} is bypassed");
        assert!(!answer.headers.contains_key("x-regionguard-verdict"));
    }
    for path in [
        "/public/../signup",
        "/public/%2e%2e/signup",
        "/public/%2E%2E/signup",
        "/public/.%2e/signup",
        "/public//..//signup",
        "/public/a/../../signup",
        "/public%2f..%2fsignup",
        "/public/..%2fsignup",
        "/public/..;/signup",
        "/public/%zz/../../signup",
        "/public\\..\\signup",
        "/healthz/../signup",
        "/%68ealthz/../signup",
    ] {
        let answer = check(&server, from_sanctioned(path)).await;
        assert_eq!(answer.http, 403, "{path} must be classified");
        assert_eq!(
            answer
                .headers
                .get("x-regionguard-verdict")
                .map(String::as_str),
            Some("DENY"),
            "{path}"
        );
    }
    server.shutdown().await;
}

// ---- 7e. The bearer scheme is case-insensitive ----

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    const EDGE: &str = "edge-token";
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, |c| {
        c.auth.callers = vec![CallerConfig {
            name: "edge".into(),
            role: Role::Gateway,
            token_sha256: token_sha256(EDGE),
            client_cert_sha256: Vec::new(),
        }]
    })
    .await;
    for header in [
        format!("Bearer {EDGE}"),
        format!("bearer {EDGE}"),
        format!("BEARER {EDGE}"),
        format!("BeArEr {EDGE}"),
        format!("Bearer   {EDGE}"),
    ] {
        let mut call = tonic::Request::new(request(scenario.ips.allowed));
        call.metadata_mut()
            .insert("authorization", header.parse().unwrap());
        server
            .client
            .clone()
            .classify(call)
            .await
            .unwrap_or_else(|s| panic!("{header:?}: {s:?}"));
    }
    for header in [format!("Bearer{EDGE}"), format!("Basic {EDGE}")] {
        let mut call = tonic::Request::new(request(scenario.ips.allowed));
        call.metadata_mut()
            .insert("authorization", header.parse().unwrap());
        let status = server.client.clone().classify(call).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{header:?}");
    }
    server.shutdown().await;
}

// ---- 7f. The start log keeps token hashes out ----

#[tokio::test]
async fn the_start_log_does_not_print_token_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let hash = token_sha256("reviewer-secret");
    let replica = Replica::start(
        dir.path(),
        "logged",
        &format!(
            "[[auth.callers]]\nname = \"rita@compliance\"\nrole = \"reviewer\"\ntoken_sha256 = {hash:?}\n"
        ),
    )
    .await;
    let log = replica.log();
    assert!(log.contains("starting"), "{log}");
    assert!(
        log.contains("rita@compliance"),
        "callers are still named: {log}"
    );
    assert!(!log.contains(&hash), "{log}");
}

// ---- 7g. metrics_listen off loopback needs an explicit opt-in ----

/// Runs `regionguard serve` with `config`; its exit status and stderr, or None if it kept serving.
fn serve_exits(config: &str) -> Option<(std::process::ExitStatus, String)> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regionguard.toml");
    std::fs::write(&file, config).unwrap();
    let db = dir.path().join("city.mmdb");
    std::fs::write(&db, support::fixtures::city_db()).unwrap();
    let log = dir.path().join("log");
    let mut child = Command::new(BIN)
        .args(["serve", "--policy", "data/policy.toml", "--location-db"])
        .arg(&db)
        .env("REGIONGUARD_CONFIG", &file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            return Some((status, std::fs::read_to_string(&log).unwrap()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn a_public_metrics_port_is_refused_without_the_opt_in() {
    let (grpc, metrics) = (support::free_port(), support::free_port());
    let public = format!("listen = \"127.0.0.1:{grpc}\"\nmetrics_listen = \"0.0.0.0:{metrics}\"\n");
    let (status, log) = serve_exits(&public).expect("refused at start, not served");
    assert!(!status.success());
    assert!(
        log.contains("metrics_listen") && log.contains("metrics_allow_public"),
        "{log}"
    );
    Config::from_toml(&format!("{public}metrics_allow_public = true\n"), "c.toml")
        .expect("accepted with the opt-in");
}

// ---- Organisations ----

fn with_organization(ip: &str, organization: pb::Organization) -> pb::ClassifyRequest {
    let mut request = request(ip);
    request.account = Some(pb::Account {
        organization: Some(organization),
        ..Default::default()
    });
    request
}

fn owner(name: &str, country: &str, share: f64, owners: Vec<pb::Owner>) -> pb::Owner {
    pb::Owner {
        name: name.into(),
        country: country.into(),
        share_percent: share,
        owners,
    }
}

// ---- 7h. Owner names compare normalised ----

#[tokio::test]
async fn ownership_cycles_are_found_whatever_the_case_and_spacing() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    for again in ["b", "B ", " b", "Bolt  Holding", "bolt holding"] {
        let first = if again.to_lowercase().contains("bolt") {
            "Bolt Holding"
        } else {
            "B"
        };
        let organization = pb::Organization {
            owners: vec![owner(
                "A",
                "AE",
                50.0,
                vec![owner(
                    first,
                    "AE",
                    50.0,
                    vec![owner(
                        "C",
                        "AE",
                        50.0,
                        vec![owner(again, "AE", 10.0, vec![])],
                    )],
                )],
            )],
            ..Default::default()
        };
        let status = server
            .classify(with_organization(scenario.ips.allowed, organization))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{again:?}");
        assert!(
            status.message().contains("ownership cycle"),
            "{again:?}: {}",
            status.message()
        );
    }
    server.shutdown().await;
}

// ---- 7l. Shares print on the side of the threshold they are on ----

#[tokio::test]
async fn a_share_above_the_threshold_never_prints_as_the_threshold() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    let organization = pb::Organization {
        owners: vec![owner("P", "IR", 50.001, vec![])],
        ..Default::default()
    };
    let answer = server
        .classify(with_organization(scenario.ips.allowed, organization))
        .await
        .unwrap();
    let reason = answer
        .reasons
        .iter()
        .find(|r| r.code == "OWNERSHIP_RESTRICTED")
        .expect("50.001 % is above the 50 % threshold");
    assert_eq!(reason.evidence["restricted_share_percent"], "50.001");
    assert!(reason.message.contains("50.001%"), "{}", reason.message);
    server.shutdown().await;
}

// ---- 7i. Subdivisions must be assigned ----

#[tokio::test]
async fn unassigned_subdivisions_are_refused() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    let headquartered = |code: &str| {
        with_organization(
            scenario.ips.allowed,
            pb::Organization {
                headquarters_country: code.into(),
                ..Default::default()
            },
        )
    };
    let status = server.classify(headquartered("UA-99")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("account.organization.headquarters_country: \"UA-99\""),
        "{}",
        status.message()
    );
    server
        .classify(headquartered("UA-43"))
        .await
        .expect("an assigned subdivision");
    let mut usage = request(scenario.ips.allowed);
    usage.usage = Some(pb::UsageSummary {
        regions_7d: vec!["DE".into(), "GB-ZZZ".into()],
        ..Default::default()
    });
    let status = server.classify(usage).await.unwrap_err();
    assert!(
        status.message().starts_with("usage.regions_7d[1]"),
        "{status:?}"
    );
    server.shutdown().await;
}

// ---- the CLI's reader goes away ----

/// `regionguard … | head` closes the pipe before the output is written: the command ends
/// quietly (hostile pass: it panicked with a backtrace, "failed printing to stdout").
#[test]
fn the_cli_ends_quietly_when_its_reader_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("city.mmdb");
    std::fs::write(&db, support::fixtures::city_db()).unwrap();
    // Closed before the databases are even loaded: the one write fails.
    let out = closed_at_once(piped(
        Command::new(BIN)
            .args(["lookup", "81.2.69.142", "--location-db"])
            .arg(&db),
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);

    // `policy check` lists many lines: `| head -1` closes the pipe part-way.
    let out = closed_early(piped(Command::new(BIN).args([
        "policy",
        "check",
        "data/policy.toml",
    ])));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && out.status.success(),
        "{stderr}"
    );

    // A verdict is its exit code whoever reads the report: BROKEN stays 1.
    let store = tempfile::tempdir().unwrap();
    drop(
        regionguard::store::writer::Recorder::start(
            store.path(),
            1,
            regionguard::store::writer::Overflow::Sample,
        )
        .unwrap(),
    );
    let out = closed_at_once(piped(
        Command::new(BIN)
            .args(["audit", "verify", "--expect-head", "5:abc", "--data-dir"])
            .arg(store.path()),
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
}

/// `command` started with its output and errors piped to this test.
fn piped(command: &mut Command) -> std::process::Child {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Closes `child`'s output pipe at once, and waits for it.
fn closed_at_once(mut child: std::process::Child) -> std::process::Output {
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

/// Reads the first line of `child`'s output, closes the pipe, and waits for it.
fn closed_early(mut child: std::process::Child) -> std::process::Output {
    use std::io::BufRead;
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(!first.is_empty());
    child.wait_with_output().unwrap()
}
