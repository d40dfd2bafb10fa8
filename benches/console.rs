//! The review console over a large store: p50/p99 of the dashboard and queue pages (and a
//! decision page) rendered through the console's router, over a SQLite store of 1M decisions.
//!
//! The store is filled through the real writer with decision bodies the real engine produced
//! (a REVIEW signup, an ALLOW and a DENY), each copy with its own id, spread over 30 days and
//! over 20 countries: 80 % ALLOW, 12 % REVIEW (all left open in the queue), 8 % DENY. Each page
//! is asked for as a signed-in browser would, the audit row it writes included.
//!
//! `cargo bench --bench console` (1M decisions, 200 requests a page). Under `cargo test` it runs
//! a smoke round over 2,000 decisions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use regionguard::auth::{CallerConfig, Gate, Role, token_sha256};
use regionguard::grpc::ClassifierService;
use regionguard::grpc::pb::{self, classifier_server::Classifier};
use regionguard::store::{self, AuditRow};
use tower::ServiceExt;

const TOKEN: &str = "bench-reviewer-token";
const DAY_MS: i64 = 86_400_000;
const COUNTRIES: [&str; 20] = [
    "US", "DE", "GB", "FR", "IN", "BR", "JP", "CN", "RU", "IR", "NL", "CA", "AU", "KR", "ES", "IT",
    "MX", "PL", "TR", "UA",
];

async fn template(service: &ClassifierService, request: pb::ClassifyRequest) -> String {
    service
        .classify(tonic::Request::new(request))
        .await
        .unwrap()
        .into_inner()
        .decision_id
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let (decisions, requests) = if benching {
        (1_000_000, 200)
    } else {
        (2_000, 5)
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = regionguard::config::Config::default();
    config.store.data_dir = Some(dir.path().to_path_buf());
    config.store.queue_capacity = 65_536;
    config.auth.callers = vec![CallerConfig {
        name: "bench@compliance".into(),
        role: Role::Reviewer,
        token_sha256: token_sha256(TOKEN),
        client_cert_sha256: Vec::new(),
    }];
    let loaded = regionguard::app::load(&config).unwrap();
    let engine = Arc::new(loaded.engine);
    let audit = loaded.audit.unwrap();

    // Three real decisions to copy.
    let service = ClassifierService::new(engine.clone(), Some(audit.clone()));
    let review = template(
        &service,
        pb::ClassifyRequest {
            ip: "8.8.8.8".into(),
            flow: pb::Flow::Signup.into(),
            account: Some(pb::Account {
                account_id: "acct-template".into(),
                billing_country: "DE".into(),
                created_at_unix: 1_790_000_000,
                ..Default::default()
            }),
            hints: Some(pb::ClientHints {
                accept_language: "fa-IR,fa;q=0.9,en;q=0.5".into(),
                timezone: "Asia/Tehran".into(),
                user_agent: "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0".into(),
            }),
            ..Default::default()
        },
    )
    .await;
    let allow = template(
        &service,
        pb::ClassifyRequest {
            ip: "8.8.4.4".into(),
            account: Some(pb::Account {
                account_id: "acct-template".into(),
                billing_country: "US".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let deny = template(
        &service,
        pb::ClassifyRequest {
            ip: "8.8.8.8".into(),
            account: Some(pb::Account {
                account_id: "acct-template".into(),
                billing_country: "IR".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    audit.recorder().flush().await;
    let reads = audit.reads().clone();
    let row_of = |id: String| {
        let reads = reads.clone();
        async move { reads.decision(&id).await.unwrap().unwrap().row }
    };
    let templates: [(AuditRow, String); 3] = [
        (row_of(allow.clone()).await, allow),
        (row_of(review.clone()).await, review),
        (row_of(deny.clone()).await, deny),
    ];
    for (row, _) in &templates {
        eprintln!("template {}: {} B body", row.verdict, row.body.len());
    }

    // The store: through the real writer, in chain order, times spread over 30 days.
    let now = store::now_ms();
    let start = now - 30 * DAY_MS;
    let fill = Instant::now();
    for i in 0..decisions {
        let pick = match i % 25 {
            0..=19 => 0,  // 80 % ALLOW
            20..=22 => 1, // 12 % REVIEW
            _ => 2,       // 8 % DENY
        };
        let (template, template_id) = &templates[pick];
        let id = uuid::Uuid::now_v7().to_string();
        let row = AuditRow {
            ref_id: id.clone(),
            recorded_at_ms: start + (30 * DAY_MS) * i as i64 / decisions as i64,
            account_id: format!("acct-{}", i % 50_000),
            country: COUNTRIES[(i / 3) % COUNTRIES.len()].into(),
            body: template.body.replace(template_id.as_str(), &id),
            ..template.clone()
        };
        audit
            .recorder()
            .decision(Box::new(move || row), None)
            .await
            .unwrap();
    }
    audit.recorder().flush().await;
    let db_bytes = std::fs::metadata(store::db_path(dir.path())).map_or(0, |m| m.len());
    println!(
        "console: store of {decisions} decisions written in {:.1} s ({:.0} MB)",
        fill.elapsed().as_secs_f64(),
        db_bytes as f64 / 1e6
    );

    let app = regionguard::console::router(
        &config.console,
        regionguard::console::ConsoleParts {
            engine,
            audit: Some(audit.clone()),
            gate: Gate::new(&config.auth, Role::Reviewer),
            chain_key: None,
            max_form_bytes: 1 << 20,
        },
    )
    .unwrap();
    let login = app
        .clone()
        .oneshot(
            Request::post("/login")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header("sec-fetch-site", "same-origin")
                .body(Body::from(format!("token={TOKEN}")))
                .unwrap(),
        )
        .await
        .unwrap();
    let cookie = login.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let first_open = reads
        .queue(&store::QueueFilter {
            status: "open".into(),
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let decision_page = format!("/decisions/{}", first_open[0].row.ref_id);
    let pages = [
        ("dashboard 24h", "/?range=24h".to_owned()),
        ("dashboard 7d", "/?range=7d".to_owned()),
        ("dashboard 30d", "/?range=30d".to_owned()),
        ("queue (open, oldest first)", "/queue".to_owned()),
        ("queue, country IR", "/queue?country=IR".to_owned()),
        (
            "queue, reason and since 7d",
            "/queue?reason=COUNTRY_MISMATCH&since=7d".to_owned(),
        ),
        ("decision", decision_page),
    ];
    if !benching {
        println!(
            "(smoke run under cargo test: debug build, {decisions} decisions; not measurements)"
        );
    }
    for (name, path) in pages {
        let mut took = Vec::with_capacity(requests);
        let mut bytes = 0;
        for round in 0..=requests {
            let began = Instant::now();
            let response = app
                .clone()
                .oneshot(
                    Request::get(&path)
                        .header(header::COOKIE, &cookie)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), 1 << 26)
                .await
                .unwrap();
            assert_eq!(
                status,
                StatusCode::OK,
                "{path}: {}",
                String::from_utf8_lossy(&body)
            );
            // The first request warms the page cache and statement caches.
            if round > 0 {
                took.push(began.elapsed());
            }
            bytes = body.len();
            if round == 0 && name.starts_with("queue") {
                let text = String::from_utf8_lossy(&body);
                let rows = text.matches("class=\"decision\"").count();
                println!("console: {name}: {rows} queue rows on the page");
            }
        }
        took.sort();
        let (p50, p99) = (percentile(&took, 0.5), percentile(&took, 0.99));
        let target = if name.starts_with("dashboard") || name.starts_with("queue (open") {
            " (target p99 <= 200 ms)"
        } else {
            ""
        };
        println!(
            "console: {name} over {decisions} decisions: p50 {:.1} ms, p99 {:.1} ms{target}, {} KB",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            bytes / 1024
        );
    }
}
