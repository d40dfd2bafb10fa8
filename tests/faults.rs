//! Faults against the real binary (#12): what a compliance service must not lose or let through
//! when it is killed, when its store refuses a row, and when a reviewer's override meets the
//! gateway's decision cache.

mod support;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{CheckResponse, check_response::HttpResponse};
use regionguard::grpc::pb;
use support::replica::Replica;

const BIN: &str = env!("CARGO_BIN_EXE_regionguard");
const REVIEWER: &str = "rita-reviewer-token";
const ALLOWED: &str = "216.160.83.57";
const SANCTIONED: &str = "5.1.2.3";

fn store_config(data: &Path) -> String {
    format!(
        "[store]\ndata_dir = {:?}\n[[auth.callers]]\nname = \"rita\"\nrole = \"reviewer\"\ntoken_sha256 = {:?}\n",
        data.display().to_string(),
        regionguard::auth::token_sha256(REVIEWER)
    )
}

fn classify(ip: &str, flow: pb::Flow, account: &str) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        flow: flow.into(),
        account: Some(pb::Account {
            account_id: account.into(),
            ..Default::default()
        }),
        ..support::request(ip)
    }
}

/// A random number below `below`, from the standard library's per-process random keys.
fn random(below: u64) -> u64 {
    RandomState::new().hash_one(std::time::SystemTime::now()) % below
}

/// The test: the real binary under concurrent load, `kill -9` at a random moment, five
/// rounds on one store. Every must-record decision (signup, login, every non-ALLOW) a client got
/// an answer for is in the store; the chain verifies after each kill and continues after the
/// restart. Before must-record waits, the last milliseconds' answers were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_must_record_decisions_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let (mut must_total, mut optional_total) = (0usize, 0usize);
    let mut rows_before = 0u64;
    for round in 0..5 {
        let mut replica = Replica::start(dir.path(), "rg", &store_config(&data)).await;
        let client = replica.classifier().await;
        let mut workers = Vec::new();
        for worker in 0..8u32 {
            let mut client = client.clone();
            workers.push(tokio::spawn(async move {
                let mut must = Vec::new();
                let mut optional = 0usize;
                for i in 0u32.. {
                    let account = format!("r{round}-w{worker}-{i}");
                    let request = match i % 4 {
                        0 => classify(ALLOWED, pb::Flow::Signup, &account),
                        1 => classify(SANCTIONED, pb::Flow::ApiRequest, &account),
                        2 => classify(ALLOWED, pb::Flow::Login, &account),
                        _ => classify(ALLOWED, pb::Flow::ApiRequest, &account),
                    };
                    let Ok(answer) = client.classify(request).await else {
                        break; // killed
                    };
                    let answer = answer.into_inner();
                    if i % 4 == 3 {
                        assert_eq!(answer.verdict(), pb::Verdict::Allow);
                        optional += 1;
                    } else {
                        must.push(answer.decision_id);
                    }
                }
                (must, optional)
            }));
        }
        tokio::time::sleep(Duration::from_millis(150 + random(600))).await;
        replica.child.kill().unwrap(); // SIGKILL
        replica.child.wait().unwrap();
        let mut must = Vec::new();
        for worker in workers {
            let (ids, optional) = worker.await.unwrap();
            must.extend(ids);
            optional_total += optional;
        }
        assert!(!must.is_empty(), "round {round}: the load ran");
        let conn = regionguard::store::open_for_reading(&data).unwrap();
        let missing: Vec<&String> = must
            .iter()
            .filter(|id| regionguard::store::decision(&conn, id).unwrap().is_none())
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} of {} answered must-record decisions are not in the store, e.g. {:?}",
            missing.len(),
            must.len(),
            missing.first()
        );
        drop(conn);
        let (ok, out) = support::audit_verify(&data);
        assert!(ok, "round {round}, after kill -9: {out}");
        let rows: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(
            rows >= rows_before + must.len() as u64,
            "round {round}: {out}"
        );
        rows_before = rows;
        must_total += must.len();
    }
    // After the last kill, a restart continues the same chain.
    let replica = Replica::start(dir.path(), "rg", &store_config(&data)).await;
    let mut client = replica.classifier().await;
    for i in 0..10 {
        client
            .classify(classify(ALLOWED, pb::Flow::Signup, &format!("after-{i}")))
            .await
            .unwrap();
    }
    drop(replica);
    let (ok, out) = support::audit_verify(&data);
    assert!(ok, "{out}");
    let rows: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(rows, rows_before + 10, "the chain continued: {out}");
    support::record(format_args!(
        "kill -9, 5 rounds, 8 clients: {must_total} must-record decisions answered, 0 missing ({optional_total} ALLOW api_request answered besides); chain verifies, {rows} rows"
    ));
}

/// A row the store refuses (a trigger here, as a full disk or a broken database would): the
/// must-record Classify answers UNAVAILABLE rather than a decision not on record, Check follows
/// `on_error` (deny), both counted; an ALLOW api_request, not waited for, is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_must_record_decision_the_store_refuses_is_not_given() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    drop(regionguard::store::open_for_writing(&data).unwrap());
    rusqlite::Connection::open(regionguard::store::db_path(&data))
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON audit_log WHEN NEW.account_id = 'refused' \
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
        )
        .unwrap();
    let replica = Replica::start(dir.path(), "rg", &store_config(&data)).await;
    let mut client = replica.classifier().await;

    let status = client
        .classify(classify(ALLOWED, pb::Flow::Signup, "refused"))
        .await
        .expect_err("a signup decision the store refused");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("could not be recorded"),
        "{}",
        status.message()
    );
    let status = client
        .classify(classify(SANCTIONED, pb::Flow::ApiRequest, "refused"))
        .await
        .expect_err("a DENY the store refused");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    client
        .classify(classify(ALLOWED, pb::Flow::ApiRequest, "refused"))
        .await
        .expect("an ALLOW api_request is not waited for");
    client
        .classify(classify(ALLOWED, pb::Flow::Signup, "fine"))
        .await
        .expect("other accounts are recorded");

    let mut gateway = AuthorizationClient::new(replica.channel().await);
    let check =
        support::envoy::check_request(SANCTIONED, "/v1/chat", &[("x-account-id", "refused")], &[]);
    let answer = gateway.check(check).await.unwrap().into_inner();
    let Some(HttpResponse::DeniedResponse(denied)) = answer.http_response else {
        panic!("on_error = deny: {answer:?}");
    };
    assert!(
        denied.body.contains("could not be recorded"),
        "{}",
        denied.body
    );
    assert_eq!(replica.metric("regionguard_audit_unrecorded_total"), 3.0);
}

fn verdict(answer: &CheckResponse) -> String {
    let headers = match answer.http_response.as_ref() {
        Some(HttpResponse::OkResponse(ok)) => &ok.headers,
        Some(HttpResponse::DeniedResponse(denied)) => &denied.headers,
        other => panic!("no decision: {other:?}"),
    };
    headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == "x-regionguard-verdict")
        .map(|h| h.value.clone())
        .unwrap_or_default()
}

/// #12 defect 1, as reproduced: a `network` DENY override on one address, a Check from its
/// neighbour in the same database network, then from the address itself within the cache TTL
/// (same account): denied, by a decision of its own, which is on record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_override_is_not_bypassed_by_the_gateway_cache() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let config = format!(
        "{}[gateway]\ndecision_cache_ttl_ms = 60000\n",
        store_config(&data)
    );
    let replica = Replica::start(dir.path(), "rg", &config).await;
    let mut review = replica.review().await;
    let mut request = tonic::Request::new(pb::SetOverrideRequest {
        scope: "network".into(),
        value: format!("{ALLOWED}/32"),
        action: "DENY".into(),
        reason: "abuse from this address".into(),
        expires_at_unix_ms: 0,
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {REVIEWER}").parse().unwrap(),
    );
    review.set_override(request).await.unwrap();

    let mut gateway = AuthorizationClient::new(replica.channel().await);
    let neighbour = "216.160.83.58";
    let at = |ip: &str| {
        support::envoy::check_request(ip, "/v1/chat", &[("x-account-id", "acct-1")], &[])
    };
    let first = gateway.check(at(neighbour)).await.unwrap().into_inner();
    assert_eq!(verdict(&first), "ALLOW");
    let second = gateway.check(at(ALLOWED)).await.unwrap().into_inner();
    assert_eq!(verdict(&second), "DENY", "the override holds: {second:?}");
}

/// A replica with `limits` under `[limits]` and the forward-auth port on, and that port.
async fn with_forward_auth(dir: &Path, limits: &str) -> (Replica, String) {
    let forward_auth = format!("127.0.0.1:{}", support::free_port());
    let config = format!("[limits]\n{limits}\n[forward_auth]\nlisten = \"{forward_auth}\"\n");
    let replica = Replica::start_under(dir, "rg", &config, &[], None).await;
    (replica, forward_auth)
}

/// #12 defect 3, the slow kind: connections that send the start of their opening and then
/// stall (a byte of the HTTP/2 preface; an HTTP request line without its headers' end) held
/// a served slot each until the HTTP/2 keepalive gave up (40 s), so `max_connections` of them
/// locked every client out. They are closed after `handshake_timeout_ms`, on the gRPC, the
/// forward-auth and the ops port alike, counted per port, and the health check answers
/// throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_stall_in_their_opening_are_closed_and_lock_nobody_out() {
    use std::io::{Read, Write};
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let dir = tempfile::tempdir().unwrap();
    let (replica, forward_auth) = with_forward_auth(
        dir.path(),
        "max_connections = 8\nhandshake_timeout_ms = 1000",
    )
    .await;
    let grpc = replica.addr.trim_start_matches("http://").to_owned();
    let open_stalled = |addr: &str, opening: &[u8], n: usize| -> Vec<std::net::TcpStream> {
        (0..n)
            .map(|_| {
                let mut stream = std::net::TcpStream::connect(addr).unwrap();
                stream.write_all(opening).unwrap();
                stream
            })
            .collect()
    };
    let mut stalled = open_stalled(&grpc, b"PRI * HTTP", 16);
    stalled.extend(open_stalled(&forward_auth, b"GET /check HTTP/1.1\r\n", 16));
    stalled.extend(open_stalled(
        &replica.metrics,
        b"GET /readyz HTTP/1.1\r\n",
        4,
    ));
    // Past the handshake timeout, with the stalled connections still open on the client side.
    let started = std::time::Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_millis(2_500) {
        let channel = tonic::transport::Channel::from_shared(replica.addr.clone())
            .unwrap()
            .connect()
            .await
            .expect("a new connection is served");
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .expect("the health check answers while stalled connections are open");
        answered += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The forward-auth port serves a whole request on a new connection too.
    let mut client = std::net::TcpStream::connect(&forward_auth).unwrap();
    client
        .write_all(b"GET /check HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 216.160.83.57\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
    // Each stalled connection was closed by the server.
    for mut stream in stalled {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8; 1];
        assert!(
            matches!(stream.read(&mut byte), Ok(0) | Err(_)),
            "a stalled connection is closed"
        );
    }
    assert_eq!(
        replica.metric("regionguard_connections_shed_total{reason=\"handshake_timeout\"}"),
        16.0
    );
    assert_eq!(
        replica.metric(
            "regionguard_connections_shed_total{port=\"forward-auth\",reason=\"handshake_timeout\"}"
        ),
        16.0
    );
    assert_eq!(
        replica.metric(
            "regionguard_connections_shed_total{port=\"ops\",reason=\"handshake_timeout\"}"
        ),
        4.0
    );
    assert!(answered >= 10, "{answered} health checks");
    assert!(
        replica.log().contains("forward-auth port"),
        "the shedding is logged"
    );
}

/// #12 defect 3, idle connections: a served connection with nothing to do for
/// `idle_timeout_ms` is closed, on the gRPC port whatever pings pass (they kept it open for
/// ever before), and on the forward-auth port after its keep-alive request; a client's next
/// call simply connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_the_next_call_connects_again() {
    use std::io::{Read, Write};
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let dir = tempfile::tempdir().unwrap();
    let (replica, forward_auth) = with_forward_auth(
        dir.path(),
        "idle_timeout_ms = 600\nkeepalive_interval_ms = 100",
    )
    .await;
    let mut health = HealthClient::new(replica.channel().await);
    health
        .check(HealthCheckRequest::default())
        .await
        .expect("a first call");
    let mut client = std::net::TcpStream::connect(&forward_auth).unwrap();
    client
        .write_all(b"GET /check HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 216.160.83.57\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 4_096];
    let n = client.read(&mut answer).unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );
    // Idle (the server pings the gRPC client every 100 ms, and it answers): both are closed.
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let started = std::time::Instant::now();
    assert!(matches!(client.read(&mut answer), Ok(0) | Err(_)));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed after the idle timeout"
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        replica.metric("regionguard_connections_shed_total{reason=\"idle_timeout\"}"),
        1.0
    );
    assert_eq!(
        replica.metric(
            "regionguard_connections_shed_total{port=\"forward-auth\",reason=\"idle_timeout\"}"
        ),
        1.0
    );
    // The same client calls again: its channel connects anew.
    health
        .check(HealthCheckRequest::default())
        .await
        .expect("the next call connects again");
}

/// #12 defect 3, as reproduced (scaled to a server allowed 1,024 file descriptors): thousands
/// of TCP connections that send nothing. The health check answers throughout, on new
/// connections; the silent ones are closed (oldest first past `max_pending_connections`, the
/// rest after `handshake_timeout_ms`), counted and logged; memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_do_not_take_the_service_down() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let dir = tempfile::tempdir().unwrap();
    let config = "[limits]\nmax_pending_connections = 256\nhandshake_timeout_ms = 2000\n";
    let replica = Replica::start_under(
        dir.path(),
        "rg",
        config,
        &["prlimit", "--nofile=1024:1024"],
        None,
    )
    .await;
    let addr = replica.addr.trim_start_matches("http://").to_owned();
    let rss_before = replica.rss_bytes();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (addr, stop) = (addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let addr: std::net::SocketAddr = addr.parse().unwrap();
            let mut held = Vec::new();
            for _ in 0..3_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                    Ok(stream) => held.push(stream),
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            held
        })
    };
    let (mut checks, mut retried, mut failures) = (0, 0, Vec::new());
    let started = std::time::Instant::now();
    while (!flood.is_finished() || started.elapsed() < Duration::from_secs(3)) && failures.len() < 5
    {
        // A probe as a load balancer's health check makes it: a new connection, up to three
        // attempts within 3 s. (A silent flood may close a new connection that is slow to
        // send its preface, when a loaded machine delays it: the retry gets through.)
        let mut answer = Err("no attempt".to_owned());
        for _ in 0..3 {
            answer = match tokio::time::timeout(Duration::from_secs(1), async {
                let channel = tonic::transport::Channel::from_shared(replica.addr.clone())
                    .unwrap()
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
                HealthClient::new(channel)
                    .check(HealthCheckRequest::default())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await
            {
                Ok(result) => result,
                Err(_) => Err("no answer within 1 s".to_owned()),
            };
            if answer.is_ok() {
                break;
            }
            retried += 1;
        }
        checks += 1;
        if let Err(why) = answer {
            failures.push(format!("{:?}: {why}", started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let held = flood.join().unwrap();
    let rss_during = replica.rss_bytes();
    assert!(
        failures.is_empty(),
        "{} of {checks} health checks failed during the flood: {failures:?}",
        failures.len()
    );
    let evicted =
        replica.metric("regionguard_connections_shed_total{reason=\"max_pending_connections\"}");
    assert!(evicted > 0.0, "silent connections evicted: {evicted}");
    assert!(replica.metric("regionguard_connections_pending") <= 300.0);
    assert!(
        rss_during < rss_before + 64 * 1024 * 1024,
        "RSS {rss_before} -> {rss_during}"
    );
    let log = std::fs::read_to_string(dir.path().join("rg.log")).unwrap();
    assert!(log.contains("shedding connections"), "{log}");
    // Those still held time out.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(replica.metric("regionguard_connections_pending"), 0.0);
    assert!(
        replica.metric("regionguard_connections_shed_total{reason=\"handshake_timeout\"}") > 0.0
    );
    support::record(format_args!(
        "{} silent connections against a server with 1,024 descriptors: {checks} health probes on new connections, all answered ({retried} attempts retried); {evicted} evicted, RSS {} -> {} MB",
        held.len(),
        rss_before / 1_048_576,
        rss_during / 1_048_576
    ));
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn usage_event(account: &str, i: u64) -> pb::UsageEvent {
    pb::UsageEvent {
        account_id: account.into(),
        ip: format!("216.160.83.{}", 1 + i % 200),
        timestamp_unix_ms: now_ms() - 1_000,
        api_key_id: format!("key-{}", i % 7),
        request_count: 1,
        input_tokens: 900,
        output_tokens: 300,
        model: "model-large".into(),
        payment_fingerprint: "card-1".into(),
        user_agent: "sdk/1.0".into(),
        ..Default::default()
    }
}

/// `count` events for `account`, one every `every`.
fn paced(
    account: &'static str,
    count: u64,
    every: Duration,
) -> impl tokio_stream::Stream<Item = pb::UsageEvent> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for i in 0..count {
            if tx.send(usage_event(account, i)).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Requests the server holds for `account` (its usage history, through Classify).
async fn requests_seen(replica: &Replica, account: &str) -> u64 {
    let mut client = replica.classifier().await;
    let answer = client
        .classify(classify(ALLOWED, pb::Flow::ApiRequest, account))
        .await
        .unwrap()
        .into_inner();
    answer.usage.map_or(0, |u| u.requests_24h)
}

/// #12 defect 2: a report stream longer than `request_timeout_ms` is not cut by it; one that
/// runs into the client's own deadline, or goes idle, is answered with what was applied and
/// why it stopped, so a client resending the rest counts nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_usage_reports_end_with_a_summary_of_what_was_applied() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[limits]\nrequest_timeout_ms = 500\nstream_idle_timeout_ms = 700\n[usage]\nenabled = true\n";
    let replica = Replica::start(dir.path(), "rg", config).await;
    let mut usage = replica.usage().await;

    // 1.5 s of events against a 500 ms unary cap: all read, nothing stopped.
    let summary = usage
        .report(paced("long", 150, Duration::from_millis(10)))
        .await
        .expect("a report longer than request_timeout_ms")
        .into_inner();
    assert_eq!((summary.accepted, summary.stopped.as_str()), (150, ""));

    // The client's deadline (1 s) comes before its 3 s of events end: answered in time.
    let mut request = tonic::Request::new(paced("deadline", 300, Duration::from_millis(10)));
    request.set_timeout(Duration::from_millis(1_000));
    let started = std::time::Instant::now();
    let summary = usage
        .report(request)
        .await
        .expect("answered before the deadline")
        .into_inner();
    assert!(started.elapsed() < Duration::from_millis(1_000));
    assert!(summary.stopped.contains("deadline"), "{summary:?}");
    assert!(
        summary.accepted > 0 && summary.accepted < 300,
        "{summary:?}"
    );
    assert_eq!(
        requests_seen(&replica, "deadline").await,
        summary.accepted,
        "the summary says exactly what was applied"
    );

    // Three events, then silence past stream_idle_timeout_ms.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    for i in 0..3 {
        tx.send(usage_event("idle", i)).await.unwrap();
    }
    let summary = usage
        .report(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("an idle report is answered")
        .into_inner();
    drop(tx);
    assert_eq!(summary.accepted, 3);
    assert!(
        summary.stopped.contains("stream_idle_timeout_ms"),
        "{summary:?}"
    );
}

/// #12 defect 6, as reproduced: streams that send one small event per HTTP/2 DATA frame (a
/// client writing events as they happen), eight at once on one connection with a bulk report
/// beside them, the server the slower side. h2 ends a connection whose unread small frames cost
/// more than half its window (GOAWAY `ENHANCE_YOUR_CALM`, `too_many_data_frames`); with the
/// default windows this lost every summary within half a second. Every stream gets its summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_usage_reports_are_reliable() {
    const STREAMS: u64 = 8;
    const EACH: u64 = 25_000;
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::start(dir.path(), "rg", "[usage]\nenabled = true\n").await;
    let channel = replica.channel().await;
    let mut tasks = Vec::new();
    for stream in 0..STREAMS {
        let mut usage = regionguard::grpc::pb::usage_client::UsageClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            // One event in flight at a time, and a yield: each event leaves in its own frame.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(async move {
                for i in 0..EACH {
                    let event = usage_event("large", stream * 1_000_000 + i);
                    if tx.send(event).await.is_err() {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            });
            usage
                .report(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        }));
    }
    let mut usage = regionguard::grpc::pb::usage_client::UsageClient::new(channel.clone());
    tasks.push(tokio::spawn(async move {
        let bulk = (0..4 * EACH).map(|i| usage_event("bulk", i));
        usage.report(tokio_stream::iter(bulk)).await
    }));
    let mut accepted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(summary) => accepted += summary.into_inner().accepted,
            Err(status) => panic!("a stream lost its summary: {status:?}\n{}", replica.log()),
        }
    }
    assert_eq!(accepted, STREAMS * EACH + 4 * EACH);
}

/// #12 defect 5, as reproduced: the policy truncated in place at a table boundary (before
/// `[timezones]`) used to load as a valid, weaker policy, and LOCALE_HINTS_RESTRICTED_REGION
/// silently stopped. Now `policy check` says the file is cut short, the running server refuses
/// the reload, and the old policy keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_cut_short_never_loads_and_the_old_one_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let whole = std::fs::read_to_string("data/policy.toml").unwrap();
    std::fs::write(&policy, &whole).unwrap();
    let config = "reload_interval_ms = 100\n";
    let replica = Replica::start_under(dir.path(), "rg", config, &[], Some(&policy)).await;
    let mut client = replica.classifier().await;
    let hinted = || pb::ClassifyRequest {
        hints: Some(pb::ClientHints {
            timezone: "Asia/Pyongyang".into(),
            ..Default::default()
        }),
        ..support::request(ALLOWED)
    };
    let reasons = |answer: &pb::ClassifyResponse| -> Vec<String> {
        answer.reasons.iter().map(|r| r.code.clone()).collect()
    };
    let before = client.classify(hinted()).await.unwrap().into_inner();
    assert!(
        reasons(&before).contains(&"LOCALE_HINTS_RESTRICTED_REGION".to_owned()),
        "{:?}",
        reasons(&before)
    );

    // Truncated in place (same inode) at the [timezones] table.
    let cut = whole.find("\n[timezones]").unwrap() + 1;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&policy)
        .unwrap()
        .set_len(cut as u64)
        .unwrap();
    let check = Command::new(BIN)
        .args(["policy", "check"])
        .arg(&policy)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(!check.status.success(), "{said}");
    assert!(said.contains("cut short"), "{said}");

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while replica.metric("regionguard_reload_failures_total") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the reload was not tried"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = client.classify(hinted()).await.unwrap().into_inner();
    assert_eq!(
        after.policy_version, before.policy_version,
        "the old policy serves"
    );
    assert_eq!(reasons(&after), reasons(&before));
    assert!(replica.log().contains("cut short"), "{}", replica.log());
}
