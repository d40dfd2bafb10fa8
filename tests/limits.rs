//! Transport limits: per-connection load shedding, client deadlines, stream length.

mod support;

use std::time::Duration;

use regionguard::grpc::pb::{self, usage_client::UsageClient};
use support::{TestServer, request, scenarios};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// Opens a Usage/Report stream and keeps it open (its call stays in flight) until the sender drops.
async fn open_report(
    server: &TestServer,
    timeout: Option<Duration>,
) -> (
    tokio::sync::mpsc::Sender<pb::UsageEvent>,
    tokio::task::JoinHandle<Result<pb::ReportSummary, tonic::Status>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut client = UsageClient::new(server.channel.clone());
    let mut call = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(timeout) = timeout {
        call.set_timeout(timeout);
    }
    let task = tokio::spawn(async move { client.report(call).await.map(|r| r.into_inner()) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    (tx, task)
}

#[tokio::test]
async fn calls_past_the_connection_limit_are_shed_not_queued() {
    let scenario = &scenarios()[0];
    let server =
        TestServer::start_with(scenario, |c| c.limits.concurrency_per_connection = 1).await;
    let (held, report) = open_report(&server, None).await;
    let shed = server
        .classify(request(scenario.ips.allowed))
        .await
        .unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    drop(held);
    assert!(report.await.unwrap().is_ok());
    server
        .classify(request(scenario.ips.allowed))
        .await
        .expect("served once the slot is free");
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_deadline_is_honoured() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    let started = std::time::Instant::now();
    let (held, report) = open_report(&server, Some(Duration::from_millis(150))).await;
    let result = tokio::time::timeout(Duration::from_secs(5), report)
        .await
        .expect("the server ends the call")
        .unwrap();
    // A report is answered just before the client's deadline, saying it stopped there.
    let summary = result.expect("answered in time");
    assert!(started.elapsed() < Duration::from_millis(150));
    assert!(summary.stopped.contains("deadline"), "{summary:?}");
    drop(held);
    server.shutdown().await;
}

#[tokio::test]
async fn a_stream_is_bounded_in_length() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, |c| c.limits.max_stream_messages = 3).await;
    let requests: Vec<pb::ClassifyRequest> =
        (0..5).map(|_| request(scenario.ips.allowed)).collect();
    let mut stream = server
        .client
        .clone()
        .classify_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut answered = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => answered += 1,
            Ok(None) => panic!("the stream should end with an error"),
            Err(status) => break status,
        }
    };
    assert_eq!((answered, status.code()), (3, Code::ResourceExhausted));
    server.shutdown().await;
}

/// A report past `max_stream_messages` stops there, and its summary's resume point
/// (`accepted + rejected`) is the first event it did not apply.
#[tokio::test]
async fn a_report_past_its_length_bound_says_where_to_resume() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, |c| c.limits.max_stream_messages = 3).await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let events: Vec<pb::UsageEvent> = (0..5)
        .map(|i| pb::UsageEvent {
            account_id: format!("acct-{i}"),
            ip: scenario.ips.allowed.into(),
            timestamp_unix_ms: now_ms,
            request_count: 1,
            ..Default::default()
        })
        .collect();
    let summary = UsageClient::new(server.channel.clone())
        .report(tokio_stream::iter(events))
        .await
        .expect("a summary")
        .into_inner();
    assert_eq!(
        (summary.accepted, summary.rejected),
        (3, 0),
        "the fourth event is not applied, so it is not counted: {summary:?}"
    );
    assert!(
        summary.stopped.contains("max_stream_messages")
            && summary.stopped.contains("after 3 events"),
        "{summary:?}"
    );
    server.shutdown().await;
}
