//! The console through its router, in process: real engine (embedded defaults), real SQLite
//! store in a temporary directory, real Review service; requests as a browser sends them.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use tower::ServiceExt;

use super::*;
use crate::auth::{AuthConfig, CallerConfig, token_sha256};
use crate::grpc::ClassifierService;
use crate::grpc::pb::classifier_server::Classifier;

const ALICE: &str = "alice-review-token";
const GATEWAY: &str = "gateway-token";

struct Harness {
    app: Router,
    engine: Arc<Engine>,
    audit: Arc<AuditTrail>,
    _dir: tempfile::TempDir,
}

fn callers() -> AuthConfig {
    let caller = |name: &str, role, token: &str| CallerConfig {
        name: name.into(),
        role,
        token_sha256: token_sha256(token),
        client_cert_sha256: Vec::new(),
    };
    AuthConfig {
        callers: vec![
            caller("alice", Role::Reviewer, ALICE),
            caller("edge", Role::Gateway, GATEWAY),
        ],
    }
}

fn harness_with(console: ConsoleConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::config::Config::default();
    config.store.data_dir = Some(dir.path().to_path_buf());
    config.auth = callers();
    let loaded = crate::app::load(&config).unwrap();
    let engine = Arc::new(loaded.engine);
    let audit = loaded.audit.unwrap();
    let app = router(
        &console,
        ConsoleParts {
            engine: engine.clone(),
            audit: Some(audit.clone()),
            gate: Gate::new(&config.auth, Role::Reviewer),
            chain_key: None,
            max_form_bytes: 1 << 20,
        },
    )
    .unwrap();
    Harness {
        app,
        engine,
        audit,
        _dir: dir,
    }
}

fn harness() -> Harness {
    harness_with(ConsoleConfig::default())
}

/// A signup from a US address with a German card and a Persian locale: 20 + 25 ≥ 40, REVIEW.
fn review_request(account: &str) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        ip: "8.8.8.8".into(),
        flow: pb::Flow::Signup.into(),
        account: Some(pb::Account {
            account_id: account.into(),
            billing_country: "DE".into(),
            ..Default::default()
        }),
        hints: Some(pb::ClientHints {
            accept_language: "fa-IR".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Harness {
    async fn classify(&self, request: pb::ClassifyRequest) -> pb::ClassifyResponse {
        let service = ClassifierService::new(self.engine.clone(), Some(self.audit.clone()));
        let answer = service
            .classify(tonic::Request::new(request))
            .await
            .unwrap()
            .into_inner();
        self.audit.recorder().flush().await;
        answer
    }

    async fn send(&self, request: Request<Body>) -> (StatusCode, HeaderMap, String) {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), 1 << 24)
            .await
            .unwrap();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    async fn get(&self, path: &str, cookie: &str) -> (StatusCode, HeaderMap, String) {
        self.send(
            Request::get(path)
                .header(header::COOKIE, cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await
    }

    /// A same-origin form post as a browser sends it.
    async fn post(
        &self,
        path: &str,
        cookie: &str,
        form: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, String) {
        self.send(
            Request::post(path)
                .header(header::HOST, "console.test")
                .header(header::ORIGIN, "http://console.test")
                .header("sec-fetch-site", "same-origin")
                .header(header::COOKIE, cookie)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(serde_urlencoded::to_string(form).unwrap()))
                .unwrap(),
        )
        .await
    }

    /// Signs in as alice: the session cookie and the session's CSRF token.
    async fn sign_in(&self) -> (String, String) {
        let (status, headers, _) = self
            .post("/login", "", &[("token", ALICE), ("next", "/queue")])
            .await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert_eq!(headers[header::LOCATION], "/queue");
        let set = headers[header::SET_COOKIE].to_str().unwrap();
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict"),
            "{set}"
        );
        assert!(!set.contains("Secure"), "plain http: no Secure");
        let cookie = set.split(';').next().unwrap().to_owned();
        let (_, _, page) = self.get("/", &cookie).await;
        (cookie, csrf_of(&page))
    }
}

fn csrf_of(page: &str) -> String {
    let at = page.find(r#"name="csrf" value=""#).expect("a csrf field") + 19;
    page[at..at + 64].to_owned()
}

async fn overrides_in_store(h: &Harness) -> Vec<crate::store::OverrideRecord> {
    h.audit.reads().overrides().await.unwrap()
}

#[tokio::test]
async fn sign_in_takes_reviewer_tokens_only_and_pages_need_it() {
    let h = harness();
    let (status, headers, _) = h.get("/queue?country=IR", "").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(
        headers[header::LOCATION],
        "/login?next=%2Fqueue%3Fcountry%3DIR"
    );
    for (token, status) in [
        ("", StatusCode::BAD_REQUEST),
        ("wrong", StatusCode::UNAUTHORIZED),
        (GATEWAY, StatusCode::UNAUTHORIZED),
    ] {
        let (got, headers, page) = h.post("/login", "", &[("token", token)]).await;
        assert_eq!(got, status, "{token:?}: {page}");
        assert!(headers.get(header::SET_COOKIE).is_none());
        assert!(page.contains(r#"id="error""#));
    }
    // Only local paths are gone back to.
    let (_, headers, _) = h
        .post(
            "/login",
            "",
            &[("token", ALICE), ("next", "//evil.example/")],
        )
        .await;
    assert_eq!(headers[header::LOCATION], "/");
    let (cookie, csrf) = h.sign_in().await;
    let (status, headers, page) = h.get("/", &cookie).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("Signed in as") && page.contains("alice"));
    assert!(
        headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    // Sign-out ends the session on the server: the old cookie no longer works.
    let (status, _, _) = h.post("/logout", &cookie, &[("csrf", &csrf)]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, _, _) = h.get("/", &cookie).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, _, _) = h.post("/overrides", &cookie, &[("csrf", &csrf)]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_review_decision_is_queued_explained_overridden_and_resolved() {
    let h = harness();
    let review = h.classify(review_request("acct-<b>")).await;
    assert_eq!(review.verdict, pb::Verdict::Review as i32, "{review:?}");
    h.classify(pb::ClassifyRequest {
        ip: "8.8.4.4".into(),
        ..Default::default()
    })
    .await;
    let (cookie, csrf) = h.sign_in().await;

    let (status, _, page) = h.get("/queue", &cookie).await;
    assert_eq!(status, StatusCode::OK);
    let link = format!("/decisions/{}", review.decision_id);
    assert!(page.contains(&link), "{page}");
    assert!(page.contains("COUNTRY_MISMATCH"));
    // The account id is text, never markup.
    assert!(page.contains("acct-&lt;b&gt;") && !page.contains("acct-<b>"));
    let (_, _, filtered) = h.get("/queue?country=IR", &cookie).await;
    assert!(filtered.contains("No queue items match"));
    let (status, _, page) = h.get("/queue?since=yesterday", &cookie).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(page.contains("since: "), "{page}");

    let (status, _, page) = h.get(&link, &cookie).await;
    assert_eq!(status, StatusCode::OK);
    for part in [
        "COUNTRY_MISMATCH",
        "LOCALE_HINTS_RESTRICTED_REGION",
        r#"id="location""#,
        r#"id="inputs""#,
        "Open in the review queue",
        r#"name="outcome""#,
        r#"name="scope""#,
    ] {
        assert!(page.contains(part), "{part} missing");
    }
    let (status, _, page) = h.get("/decisions/no-such-decision", &cookie).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(page.contains("is not in the audit log"));

    // An override with a missing reason says so, and changes nothing.
    let base = [
        ("csrf", csrf.as_str()),
        ("scope", "account"),
        ("value", "acct-<b>"),
        ("action", "ALLOW"),
        ("expires_in_days", "7"),
    ];
    let (status, _, page) = h.post("/overrides", &cookie, &base).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(page.contains("reason: required"), "{page}");
    assert!(overrides_in_store(&h).await.is_empty());
    let mut form = base.to_vec();
    form.extend([("reason", "known customer"), ("return_to", link.as_str())]);
    let (status, headers, _) = h.post("/overrides", &cookie, &form).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers[header::LOCATION], link.as_str());
    let stored = overrides_in_store(&h).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(
        (stored[0].reviewer.as_str(), stored[0].action.as_str()),
        ("alice", "ALLOW")
    );
    assert!(stored[0].expires_at_ms.is_some());
    let (_, _, page) = h.get(&link, &cookie).await;
    assert!(
        page.contains("Override ") && page.contains(" set: account"),
        "the flash"
    );
    let again = h.classify(review_request("acct-<b>")).await;
    assert_eq!(again.verdict, pb::Verdict::Allow as i32);
    assert!(again.reasons.iter().any(|r| r.code == "OVERRIDE_ALLOW"));

    // Resolve: leaves the open queue; a second resolve is a conflict.
    let resolve = format!("{link}/resolve");
    let (status, _, _) = h
        .post(
            &resolve,
            &cookie,
            &[("csrf", &csrf), ("outcome", "cleared"), ("note", "ok")],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, _, page) = h.get("/queue", &cookie).await;
    assert!(!page.contains(&link));
    let (_, _, page) = h.get("/queue?status=resolved", &cookie).await;
    assert!(page.contains(&link) && page.contains("(cleared)"));
    let (status, _, page) = h
        .post(
            &resolve,
            &cookie,
            &[("csrf", &csrf), ("outcome", "cleared")],
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{page}");

    // Remove needs a reason; then the override is gone from the engine too.
    let remove = format!("/overrides/{}/remove", stored[0].id);
    let (status, _, _) = h.post(&remove, &cookie, &[("csrf", &csrf)]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = h
        .post(
            &remove,
            &cookie,
            &[("csrf", &csrf), ("reason", "customer left")],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let after = h.classify(review_request("acct-<b>")).await;
    assert_eq!(after.verdict, pb::Verdict::Review as i32);

    // Every page and action is in the audit log under alice's name, and the chain holds.
    let (status, _, page) = h.get("/audit", &cookie).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("The chain holds") && page.contains("ok: "),
        "{page}"
    );
    let rows = h.audit.reads().decisions_since(0, 0, 1000).await.unwrap();
    assert!(rows.len() >= 4);
    let conn = crate::store::open_for_reading(h._dir.path()).unwrap();
    let actions: Vec<String> = conn
        .prepare(
            "SELECT reasons FROM audit_log WHERE kind = 'review' AND actor = 'alice' ORDER BY seq",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for rpc in [
        "Dashboard",
        "ListQueue",
        "Explain",
        "GetAccount",
        "SetOverride",
        "Resolve",
        "RemoveOverride",
        "VerifyAudit",
    ] {
        assert!(
            actions.iter().any(|a| a == rpc),
            "{rpc} not logged: {actions:?}"
        );
    }
}

#[tokio::test]
async fn a_forged_or_cross_origin_post_changes_nothing() {
    let h = harness();
    let (cookie, csrf) = h.sign_in().await;
    let form = serde_urlencoded::to_string([
        ("csrf", csrf.as_str()),
        ("scope", "account"),
        ("value", "victim"),
        ("action", "ALLOW"),
        ("reason", "forged"),
    ])
    .unwrap();
    let post = |origin: Option<&str>, site: Option<&str>, body: String| {
        let mut request = Request::post("/overrides")
            .header(header::HOST, "console.test")
            .header(header::COOKIE, &cookie)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(origin) = origin {
            request = request.header(header::ORIGIN, origin);
        }
        if let Some(site) = site {
            request = request.header("sec-fetch-site", site);
        }
        request.body(Body::from(body)).unwrap()
    };
    for (origin, site, body, why) in [
        (Some("http://evil.example"), None, form.clone(), "Origin"),
        (None, Some("cross-site"), form.clone(), "Sec-Fetch-Site"),
        (
            Some("http://console.test"),
            Some("same-origin"),
            form.replace(&csrf, &"0".repeat(64)),
            "csrf",
        ),
        (
            Some("http://console.test"),
            Some("same-origin"),
            "scope=account&value=victim&action=ALLOW&reason=x".into(),
            "csrf",
        ),
    ] {
        let (status, _, page) = h.send(post(origin, site, body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{why}: {page}");
        assert!(page.contains(why), "{why}: {page}");
    }
    assert!(overrides_in_store(&h).await.is_empty());
    // The same post from the console itself goes through.
    let (status, _, _) = h
        .send(post(Some("http://console.test"), Some("same-origin"), form))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(overrides_in_store(&h).await.len(), 1);
}

#[tokio::test]
async fn the_dashboard_draws_counts_from_the_store() {
    let h = harness();
    h.classify(review_request("acct-1")).await;
    h.classify(pb::ClassifyRequest {
        ip: "8.8.4.4".into(),
        ..Default::default()
    })
    .await;
    let (cookie, _) = h.sign_in().await;
    for range in ["24h", "7d", "30d"] {
        let (status, _, page) = h.get(&format!("/?range={range}"), &cookie).await;
        assert_eq!(status, StatusCode::OK);
        assert!(page.contains(r#"<svg id="verdicts-chart""#), "{page}");
        assert!(
            page.contains(": ALLOW 1, REVIEW 1, DENY 0"),
            "{range}: {page}"
        );
        assert!(page.contains(r#"id="reasons-chart""#) && page.contains("COUNTRY_MISMATCH"));
        assert!(
            page.contains(r#"<span class="n" id="queue-open">1</span>"#),
            "{page}"
        );
    }
    let (status, _, page) = h.get("/?range=1y", &cookie).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(page.contains("range: "));
}

#[tokio::test]
async fn replay_reports_transitions_and_refuses_an_invalid_policy_on_the_form() {
    let h = harness();
    h.classify(review_request("acct-1")).await;
    let (cookie, csrf) = h.sign_in().await;
    let (status, _, page) = h
        .post(
            "/replay",
            &cookie,
            &[
                ("csrf", &csrf),
                ("policy_toml", "[weights]\nNOT_A_CODE = 5\n"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        page.contains("policy_toml") && page.contains("NOT_A_CODE"),
        "{page}"
    );
    assert!(
        page.contains(r#"id="replay-form""#),
        "the form again, to fix it"
    );
    let (status, _, _) = h.post("/replay", &cookie, &[("csrf", &csrf)]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // The shipped policy with COUNTRY_MISMATCH weighted to nothing: REVIEW → ALLOW.
    let candidate = include_str!("../../data/policy.toml")
        .replace("COUNTRY_MISMATCH = 20", "COUNTRY_MISMATCH = 0");
    let (status, _, page) = h
        .post(
            "/replay",
            &cookie,
            &[
                ("csrf", &csrf),
                ("policy_toml", &candidate),
                ("since", "1d"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains(r#"<strong id="changed">1</strong>"#),
        "{page}"
    );
    assert!(page.contains(r##"href="#samples-REVIEW-ALLOW""##));
    assert!(page.contains(r#"id="reasons-removed""#));
}

#[tokio::test]
async fn an_sso_proxy_names_the_reviewer_only_from_its_own_address() {
    let h = harness_with(ConsoleConfig {
        identity_header: Some("x-auth-request-email".into()),
        trusted_proxies: vec!["127.0.0.1/32".into()],
        ..ConsoleConfig::default()
    });
    let from = |peer: &str| {
        let mut request = Request::get("/overrides")
            .header("x-auth-request-email", "rita@example.com")
            .body(Body::empty())
            .unwrap();
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(Peer(Some(
                peer.parse().unwrap(),
            ))));
        request
    };
    let (status, headers, page) = h.send(from("127.0.0.1:5000")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("rita@example.com"));
    let first = headers[header::SET_COOKIE].to_str().unwrap().to_owned();
    assert!(first.contains("HttpOnly"));
    // A request without the cookie gets the same session back, not one more.
    let (_, headers, _) = h.send(from("127.0.0.1:5000")).await;
    assert_eq!(headers[header::SET_COOKIE].to_str().unwrap(), first);
    // Behind an IPv6 listener the proxy's IPv4 address is mapped; it is still the proxy.
    let (status, _, _) = h.send(from("[::ffff:127.0.0.1]:5000")).await;
    assert_eq!(status, StatusCode::OK);
    // Two identity headers (a proxy that appends): neither is believed.
    let mut two = from("127.0.0.1:5000");
    two.headers_mut().append(
        "x-auth-request-email",
        "mallory@example.com".parse().unwrap(),
    );
    let (status, _, _) = h.send(two).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, _, _) = h.send(from("10.1.2.3:5000")).await;
    assert_eq!(
        status,
        StatusCode::SEE_OTHER,
        "the header from anyone else is ignored"
    );
}

#[test]
fn config_is_checked_with_the_key_named() {
    let bad = |c: ConsoleConfig| c.validate().unwrap_err();
    assert!(
        bad(ConsoleConfig {
            listen: Some("0.0.0.0:9470".parse().unwrap()),
            ..Default::default()
        })
        .contains("console.allow_public")
    );
    assert!(
        bad(ConsoleConfig {
            identity_header: Some("x-email".into()),
            ..Default::default()
        })
        .contains("console.trusted_proxies")
    );
    assert!(
        bad(ConsoleConfig {
            trusted_proxies: vec!["nope".into()],
            ..Default::default()
        })
        .contains("console.trusted_proxies[0]")
    );
    assert!(
        bad(ConsoleConfig {
            origin: Some("review.example.com".into()),
            ..Default::default()
        })
        .contains("console.origin")
    );
    assert!(
        bad(ConsoleConfig {
            session_idle_minutes: 0,
            ..Default::default()
        })
        .contains("session_idle_minutes")
    );
    ConsoleConfig {
        listen: Some("127.0.0.1:9470".parse().unwrap()),
        origin: Some("https://review.example.com".into()),
        ..Default::default()
    }
    .validate()
    .unwrap();
}

#[test]
fn only_plain_local_paths_are_gone_back_to() {
    for good in [
        "/",
        "/queue?country=IR&since=7d",
        "/decisions/01a2-b3",
        "/accounts/acct%2F1",
    ] {
        assert_eq!(local_path(good), good);
    }
    for bad in [
        "//evil.example",
        "/\t/evil.example",
        "/\\evil.example",
        "https://evil.example",
        "/a\nb",
        "",
        "queue",
        "/ space",
    ] {
        assert_eq!(local_path(bad), "/", "{bad:?}");
    }
}

#[tokio::test]
async fn framework_errors_are_console_pages_and_a_sign_in_must_say_where_it_comes_from() {
    let h = harness();
    let (cookie, _) = h.sign_in().await;
    for (path, status) in [
        ("/queue?page_size=-1", StatusCode::BAD_REQUEST),
        ("/decisions/%FF", StatusCode::BAD_REQUEST),
        ("/logout", StatusCode::METHOD_NOT_ALLOWED),
        ("/nowhere", StatusCode::NOT_FOUND),
    ] {
        let (got, headers, page) = h.get(path, &cookie).await;
        assert_eq!(got, status, "{path}");
        assert!(
            headers[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html"),
            "{path}"
        );
        assert!(page.contains(r#"id="error""#), "{path}: {page}");
    }
    // A sign-in posted without Origin or Sec-Fetch-Site (no browser would) is refused.
    let (status, headers, _) = h
        .send(
            Request::post("/login")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(format!("token={ALICE}")))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(headers.get(header::SET_COOKIE).is_none());
}

#[tokio::test]
async fn input_no_request_could_match_is_refused_naming_the_field() {
    let h = harness();
    let (cookie, csrf) = h.sign_in().await;
    for (path, field) in [
        ("/queue?country=XX", "country"),
        ("/queue?reason=nope", "reason_code"),
        ("/queue?page_token=-1", "page_token"),
        ("/queue?account=%FF", "account"),
        ("/accounts/a%07b", "account_id"),
    ] {
        let (status, _, page) = h.get(path, &cookie).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {page}");
        assert!(page.contains(field), "{path}: {page}");
    }
    let form = |value: &str, extra: &[(&'static str, &'static str)]| {
        let mut f = vec![
            ("csrf", csrf.clone()),
            ("scope", "account".to_owned()),
            ("value", value.to_owned()),
            ("action", "DENY".to_owned()),
            ("reason", "x".to_owned()),
        ];
        f.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        f
    };
    for (fields, problem) in [
        (form("a\u{7}b", &[]), "control character"),
        (form(&"z".repeat(300), &[]), "more than 256"),
        (
            form(
                "acct-1",
                &[
                    ("expires_in_days", "7"),
                    ("expires_at_unix_ms", "99999999999999"),
                ],
            ),
            "not both",
        ),
    ] {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, _, page) = h.post("/overrides", &cookie, &fields).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}: {page}");
        assert!(page.contains(problem), "{problem}: {page}");
    }
    // Bytes that are not UTF-8 are refused, not replaced.
    let raw = format!("csrf={csrf}&scope=account&value=%FF%FE&action=ALLOW&reason=x");
    let request = |content_type: &str, body: String| {
        Request::post("/overrides")
            .header(header::HOST, "console.test")
            .header("sec-fetch-site", "same-origin")
            .header(header::COOKIE, &cookie)
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body))
            .unwrap()
    };
    let (status, _, page) = h
        .send(request("application/x-www-form-urlencoded", raw))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        page.contains(r#"the field &quot;value&quot; is not UTF-8"#),
        "{page}"
    );
    let good = format!("csrf={csrf}&scope=account&value=acct-1&action=ALLOW&reason=x");
    let (status, _, _) = h.send(request("text/plain", good)).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(overrides_in_store(&h).await.is_empty());
}

#[tokio::test]
async fn repeated_failed_sign_ins_are_held_back() {
    let h = harness();
    for _ in 0..session::MAX_FAILURES {
        let (status, _, _) = h.post("/login", "", &[("token", "guess")]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, _, page) = h.post("/login", "", &[("token", ALICE)]).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "even the right token, for a minute"
    );
    assert!(page.contains("too many failed sign-ins"));
}

#[tokio::test]
async fn the_ownership_chain_is_drawn_as_a_tree() {
    let h = harness();
    let owner = |name: &str, country: &str, share: f64, owners: Vec<pb::Owner>| pb::Owner {
        name: name.into(),
        country: country.into(),
        share_percent: share,
        owners,
    };
    let answer = h
        .classify(pb::ClassifyRequest {
            ip: "8.8.8.8".into(),
            flow: pb::Flow::Signup.into(),
            account: Some(pb::Account {
                account_id: "acct-org".into(),
                organization: Some(pb::Organization {
                    name: "Shell Ltd".into(),
                    domain: "shell.example".into(),
                    headquarters_country: "GB".into(),
                    owners: vec![owner(
                        "Holding A",
                        "CY",
                        60.0,
                        vec![owner("Parent <IR>", "IR", 80.0, vec![])],
                    )],
                }),
                verifications: vec![pb::Verification {
                    kind: "PHONE".into(),
                    country: "GB".into(),
                    verified_at_unix: 1_790_000_000,
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    let (cookie, _) = h.sign_in().await;
    let (status, _, page) = h
        .get(&format!("/decisions/{}", answer.decision_id), &cookie)
        .await;
    assert_eq!(status, StatusCode::OK);
    let shown = &page[page
        .find(r#"id="verifications""#)
        .expect("the verifications")..];
    assert!(
        shown.contains("PHONE") && shown.contains("GB") && shown.contains("2026-09-21"),
        "{shown}"
    );
    let tree = &page[page.find(r#"id="ownership""#).expect("the tree")..];
    let tree = &tree[..tree.find("</div>").unwrap()];
    for part in [
        "GB",
        "Holding A",
        "60 %",
        "CY",
        "Parent &lt;IR&gt;",
        "80 %",
        "IR",
    ] {
        assert!(tree.contains(part), "{part}: {tree}");
    }
    assert!(tree.find("Holding A").unwrap() < tree.find("Parent").unwrap());
    assert_eq!(tree.matches("<ul>").count(), 2, "two levels: {tree}");
}
