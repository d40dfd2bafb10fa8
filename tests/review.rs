//! Compliance reviewers end to end over real gRPC: the queue, explanations, overrides with
//! accountability and expiry, caller separation, the tamper-evident audit log (checked with the
//! real `regionguard audit verify`), replay, and a kill -9 of the real binary while it writes.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use regionguard::auth::{CallerConfig, Role, token_sha256};
use regionguard::grpc::pb::{
    self, Verdict, classifier_client::ClassifierClient, review_client::ReviewClient,
};
use support::{TestServer, codes, request, scenarios, verdict};
use tonic::Code;
use tonic::transport::Channel;

/// Must-record decisions wait this long for their commit at most.
const MUST: Option<std::time::Duration> = Some(std::time::Duration::from_secs(10));

const ALICE: &str = "alice-reviewer-token";
const EDGE: &str = "edge-gateway-token";
const BIN: &str = env!("CARGO_BIN_EXE_regionguard");

fn reviewers(config: &mut regionguard::config::Config) {
    config.auth.callers = vec![CallerConfig {
        name: "alice@compliance".into(),
        role: Role::Reviewer,
        token_sha256: token_sha256(ALICE),
        client_cert_sha256: Vec::new(),
    }];
}

fn as_caller<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn review(server: &TestServer) -> ReviewClient<Channel> {
    ReviewClient::new(server.channel.clone())
}

/// A decision's record, as Alice asks for it.
async fn explain(server: &TestServer, decision_id: &str) -> pb::DecisionRecord {
    review(server)
        .explain(as_caller(
            pb::ExplainRequest {
                decision_id: decision_id.to_owned(),
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner()
}

/// An account's decisions and overrides, as Alice asks for them.
async fn account_history(server: &TestServer, account_id: &str) -> pb::AccountHistory {
    review(server)
        .get_account(as_caller(
            pb::GetAccountRequest {
                account_id: account_id.to_owned(),
                limit: 0,
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner()
}

fn account(ip: &str, account_id: &str) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        account: Some(pb::Account {
            account_id: account_id.into(),
            ..Default::default()
        }),
        ..request(ip)
    }
}

/// Waits until the writer has committed what was handed to it.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

#[tokio::test]
async fn review_decisions_queue_explain_and_resolve() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, reviewers).await;
    let tor = server
        .classify(account(scenario.ips.tor, "acct-tor"))
        .await
        .unwrap();
    assert_eq!(verdict(&tor), Verdict::Review);
    server.classify_ip(scenario.ips.allowed).await;
    settle().await;

    let queue = review(&server)
        .list_queue(as_caller(pb::ListQueueRequest::default(), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(queue.items.len(), 1, "only the REVIEW decision is queued");
    let item = &queue.items[0];
    assert_eq!(item.status, "open");
    let record = item.decision.as_ref().unwrap();
    assert_eq!(
        record.decision.as_ref().unwrap().decision_id,
        tor.decision_id
    );
    assert_eq!(record.account_id, "acct-tor");
    assert!(
        record.inputs_json.contains("\"tor\":true"),
        "{}",
        record.inputs_json
    );

    let explained = explain(&server, &tor.decision_id).await;
    assert_eq!(
        codes(explained.decision.as_ref().unwrap()),
        ["ANONYMIZER_TOR"]
    );
    assert_eq!(explained.ip, scenario.ips.tor);

    let resolve = || pb::ResolveRequest {
        decision_id: tor.decision_id.clone(),
        outcome: "cleared".into(),
        note: "known researcher".into(),
    };
    let resolved = review(&server)
        .resolve(as_caller(resolve(), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (resolved.status.as_str(), resolved.resolved_by.as_str()),
        ("resolved", "alice@compliance")
    );
    assert_eq!(
        review(&server)
            .resolve(as_caller(resolve(), ALICE))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    let open = review(&server)
        .list_queue(as_caller(pb::ListQueueRequest::default(), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert!(open.items.is_empty());
    let missing = review(&server)
        .explain(as_caller(
            pb::ExplainRequest {
                decision_id: "no-such".into(),
            },
            ALICE,
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let mut export = review(&server)
        .export_decisions(as_caller(pb::ExportDecisionsRequest::default(), ALICE))
        .await
        .unwrap()
        .into_inner();
    let mut exported = Vec::new();
    while let Some(record) = export.message().await.unwrap() {
        exported.push(record.decision.unwrap().decision_id);
    }
    assert_eq!(exported.len(), 2, "both decisions, not the review actions");
    assert_eq!(exported[0], tor.decision_id, "oldest first");
    server.shutdown().await;
}

#[tokio::test]
async fn overrides_change_the_next_decision_and_expire() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, reviewers).await;
    let cn = || account(scenario.ips.unsupported, "acct-cn");
    assert_eq!(
        verdict(&server.classify(cn()).await.unwrap()),
        Verdict::Deny
    );

    let grant = pb::SetOverrideRequest {
        scope: "account".into(),
        value: "acct-cn".into(),
        action: "ALLOW".into(),
        reason: "enterprise contract, legal sign-off".into(),
        ..Default::default()
    };
    let granted = review(&server)
        .set_override(as_caller(grant, ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(granted.reviewer, "alice@compliance");
    let allowed = server.classify(cn()).await.unwrap();
    assert_eq!(verdict(&allowed), Verdict::Allow);
    let reason = allowed
        .reasons
        .iter()
        .find(|r| r.code == "OVERRIDE_ALLOW")
        .unwrap();
    assert_eq!(reason.evidence["reviewer"], "alice@compliance");
    assert_eq!(reason.evidence["override_id"], granted.id);

    review(&server)
        .remove_override(as_caller(
            pb::RemoveOverrideRequest {
                id: granted.id.clone(),
                reason: "contract ended".into(),
            },
            ALICE,
        ))
        .await
        .unwrap();
    assert_eq!(
        verdict(&server.classify(cn()).await.unwrap()),
        Verdict::Deny,
        "withdrawn"
    );

    let now = regionguard::store::now_ms();
    let short = pb::SetOverrideRequest {
        scope: "network".into(),
        value: "175.16.199.0/24".into(),
        action: "ALLOW".into(),
        reason: "trial".into(),
        expires_at_unix_ms: now + 1500,
    };
    review(&server)
        .set_override(as_caller(short, ALICE))
        .await
        .unwrap();
    assert_eq!(
        verdict(&server.classify(cn()).await.unwrap()),
        Verdict::Allow
    );
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        verdict(&server.classify(cn()).await.unwrap()),
        Verdict::Deny,
        "expired"
    );

    let history = account_history(&server, "acct-cn").await;
    assert_eq!(history.overrides.len(), 1);
    assert!(history.overrides[0].removed_at_unix_ms > 0);
    server.shutdown().await;
}

/// An override written into the store's table behind the Review API is not enforced, and one
/// deleted there is not lifted: the server enforces the overrides the audit log records.
#[tokio::test]
async fn overrides_written_around_the_review_api_change_no_decision() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, reviewers).await;
    let set = |value: &str, action: &str| pb::SetOverrideRequest {
        scope: "account".into(),
        value: value.into(),
        action: action.into(),
        reason: "test".into(),
        ..Default::default()
    };
    let kept = review(&server)
        .set_override(as_caller(set("acct-shell", "DENY"), ALICE))
        .await
        .unwrap()
        .into_inner();
    let db = rusqlite::Connection::open(regionguard::store::db_path(&server.data_dir())).unwrap();
    db.execute_batch(&format!(
        "INSERT INTO overrides (id, scope, value, action, reviewer, reason, created_at_ms) \
           VALUES ('planted', 'account', 'acct-cn', 'ALLOW', 'alice@compliance', 'x', 1);
         DELETE FROM overrides WHERE id = '{}';",
        kept.id
    ))
    .unwrap();
    // The next change reloads the overrides.
    review(&server)
        .set_override(as_caller(set("acct-other", "DENY"), ALICE))
        .await
        .unwrap();
    let cn = server
        .classify(account(scenario.ips.unsupported, "acct-cn"))
        .await
        .unwrap();
    assert_eq!(
        verdict(&cn),
        Verdict::Deny,
        "the planted ALLOW is not enforced"
    );
    assert!(!codes(&cn).contains(&"OVERRIDE_ALLOW"));
    let shell = server
        .classify(account(scenario.ips.allowed, "acct-shell"))
        .await
        .unwrap();
    assert!(
        codes(&shell).contains(&"OVERRIDE_DENY"),
        "the deleted DENY still holds: {:?}",
        codes(&shell)
    );
    let history = account_history(&server, "acct-cn").await;
    assert!(
        history.overrides.is_empty(),
        "reviewers see what is enforced"
    );
    // The DENY deleted from the table is lifted the way it was set, and put back as removed.
    review(&server)
        .remove_override(as_caller(
            pb::RemoveOverrideRequest {
                id: kept.id.clone(),
                reason: "done".into(),
            },
            ALICE,
        ))
        .await
        .unwrap();
    let shell = server
        .classify(account(scenario.ips.allowed, "acct-shell"))
        .await
        .unwrap();
    assert!(
        !codes(&shell).contains(&"OVERRIDE_DENY"),
        "{:?}",
        codes(&shell)
    );
    let removed_at: Option<i64> = db
        .query_row(
            "SELECT removed_at_ms FROM overrides WHERE id = ?1",
            [&kept.id],
            |r| r.get(0),
        )
        .unwrap();
    assert!(removed_at.is_some());
    server.shutdown().await;
}

/// Overrides written as a fully qualified domain (`Trail.COM.`) or an IPv4-mapped network
/// (`::ffff:A.B.C.0/120`) are kept in the form requests are matched in, and apply (both were
/// accepted and never matched anything).
#[tokio::test]
async fn a_fully_qualified_domain_and_an_ipv4_mapped_network_are_matched_as_written() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, reviewers).await;
    let ip: std::net::Ipv4Addr = scenario.ips.allowed.parse().expect("an IPv4 address");
    let [a, b, c, _] = ip.octets();
    let set = |scope: &str, value: String| pb::SetOverrideRequest {
        scope: scope.into(),
        value,
        action: "DENY".into(),
        reason: "hostile pass".into(),
        ..Default::default()
    };
    let domain = review(&server)
        .set_override(as_caller(set("domain", "Trail.COM.".into()), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(domain.value, "trail.com");
    // A root with nothing before it names no domain (it would match requests without one).
    let root = review(&server)
        .set_override(as_caller(set("domain", ".".into()), ALICE))
        .await
        .unwrap_err();
    assert_eq!(root.code(), tonic::Code::InvalidArgument, "{root:?}");
    assert!(root.message().starts_with("value: "), "{root:?}");
    for written in ["trail.com", "TRAIL.com."] {
        let mut asked = account(scenario.ips.allowed, "acct-trail");
        asked.account.as_mut().unwrap().organization = Some(pb::Organization {
            domain: written.into(),
            ..Default::default()
        });
        let denied = server.classify(asked).await.unwrap();
        assert_eq!(verdict(&denied), Verdict::Deny, "{written}");
    }
    // Without a domain the address is allowed, until the network override.
    assert_eq!(
        verdict(
            &server
                .classify(request(scenario.ips.allowed))
                .await
                .unwrap()
        ),
        Verdict::Allow
    );
    let network = review(&server)
        .set_override(as_caller(
            set("network", format!("::ffff:{a}.{b}.{c}.0/120")),
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(network.value, format!("{a}.{b}.{c}.0/24"));
    for client in [ip.to_string(), format!("::ffff:{ip}")] {
        let denied = server.classify(request(&client)).await.unwrap();
        assert_eq!(verdict(&denied), Verdict::Deny, "{client}");
        assert!(denied.reasons.iter().any(|r| r.code == "OVERRIDE_DENY"));
    }
    server.shutdown().await;
}

/// A reviewer's message past the Review service's limit (4 × `max_request_bytes`) is refused
/// as received with RESOURCE_EXHAUSTED, as every other service's is (hostile pass: a 2 MB
/// Replay got the generated server's OUT_OF_RANGE).
#[tokio::test]
async fn a_review_message_past_its_limit_is_resource_exhausted() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, reviewers).await;
    let huge = pb::ReplayRequest {
        policy_toml: format!("{}\n#{}", scenario.policy, "x".repeat(4 * 262_144)),
        ..Default::default()
    };
    let refused = review(&server)
        .replay(as_caller(huge, ALICE))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("max_request_bytes"),
        "{refused:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn an_override_cannot_lift_a_sanctions_deny_by_default() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, reviewers).await;
    let grant = pb::SetOverrideRequest {
        scope: "account".into(),
        value: "acct-ir".into(),
        action: "ALLOW".into(),
        reason: "asked nicely".into(),
        ..Default::default()
    };
    review(&server)
        .set_override(as_caller(grant, ALICE))
        .await
        .unwrap();
    let denied = server
        .classify(account(scenario.ips.sanctioned, "acct-ir"))
        .await
        .unwrap();
    assert_eq!(verdict(&denied), Verdict::Deny);
    let reason = denied
        .reasons
        .iter()
        .find(|r| r.code == "OVERRIDE_ALLOW")
        .unwrap();
    assert_eq!(reason.evidence["applied"], "false");
    let bad = pb::SetOverrideRequest {
        scope: "planet".into(),
        value: "x".into(),
        action: "ALLOW".into(),
        reason: "r".into(),
        ..Default::default()
    };
    let status = review(&server)
        .set_override(as_caller(bad, ALICE))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("scope: "),
        "{}",
        status.message()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn callers_are_separated_by_role() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, |c| {
        reviewers(c);
        c.auth.callers.push(CallerConfig {
            name: "edge".into(),
            role: Role::Gateway,
            token_sha256: token_sha256(EDGE),
            client_cert_sha256: Vec::new(),
        });
    })
    .await;
    let list = || pb::ListQueueRequest::default();
    assert_eq!(
        review(&server).list_queue(list()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        review(&server)
            .list_queue(as_caller(list(), "guess"))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        review(&server)
            .list_queue(as_caller(list(), EDGE))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let mut classifier = ClassifierClient::new(server.channel.clone());
    assert_eq!(
        classifier
            .classify(request(scenario.ips.allowed))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        classifier
            .classify(as_caller(request(scenario.ips.allowed), ALICE))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert!(
        classifier
            .classify(as_caller(request(scenario.ips.allowed), EDGE))
            .await
            .is_ok()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn audit_verify_passes_then_names_an_edited_row() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, reviewers).await;
    for ip in [
        scenario.ips.allowed,
        scenario.ips.sanctioned,
        scenario.ips.tor,
    ] {
        server.classify_ip(ip).await;
    }
    review(&server)
        .list_queue(as_caller(pb::ListQueueRequest::default(), ALICE))
        .await
        .unwrap();
    settle().await;
    let (ok, out) = support::audit_verify(&server.data_dir());
    assert!(ok, "{out}");
    assert!(
        out.starts_with("ok: 4 audit rows verified"),
        "three decisions and one review call: {out}"
    );

    let head = out
        .lines()
        .next()
        .unwrap()
        .rsplit("head ")
        .next()
        .unwrap()
        .to_owned();
    let db = rusqlite::Connection::open(regionguard::store::db_path(&server.data_dir())).unwrap();

    // Cutting rows from the end leaves a valid shorter chain; the head kept outside catches it.
    db.execute("DELETE FROM audit_log WHERE seq = 4", [])
        .unwrap();
    assert!(
        support::audit_verify(&server.data_dir()).0,
        "a truncated chain alone still links"
    );
    let anchored = Command::new(BIN)
        .args(["audit", "verify", "--expect-head", &head, "--data-dir"])
        .arg(server.data_dir())
        .output()
        .unwrap();
    assert!(!anchored.status.success());
    assert!(
        String::from_utf8_lossy(&anchored.stdout)
            .starts_with("BROKEN: row seq 4 recorded as the head is gone")
    );

    db.execute("UPDATE audit_log SET verdict = 'ALLOW' WHERE seq = 2", [])
        .unwrap();
    let (ok, out) = support::audit_verify(&server.data_dir());
    assert!(!ok);
    assert!(out.starts_with("BROKEN: row seq 2 (decision "), "{out}");
    support::record(format_args!("audit verify after an edit: {}", out.trim()));
    server.shutdown().await;
}

/// The audit row keeps the usage a decision saw once (in its inputs); Explain still answers
/// with the usage summary the caller received.
#[tokio::test]
async fn explain_returns_the_answer_as_given_usage_included() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, reviewers).await;
    let usage = pb::UsageSummary {
        requests_1h: 5000,
        baseline_requests_per_hour: 20.0,
        accounts_sharing_payment: 9,
        regions_7d: vec!["FR".into()],
        ..Default::default()
    };
    let given = server
        .classify(pb::ClassifyRequest {
            usage: Some(usage),
            ..account(scenario.ips.allowed, "acct-busy")
        })
        .await
        .unwrap();
    assert!(given.usage.is_some());
    settle().await;
    let explained = explain(&server, &given.decision_id).await;
    assert_eq!(explained.decision.as_ref(), Some(&given));
    let db = rusqlite::Connection::open(regionguard::store::db_path(&server.data_dir())).unwrap();
    let stored: Option<String> = db
        .query_row(
            "SELECT json_extract(body, '$.decision.usage') FROM audit_log WHERE ref_id = ?1",
            [&given.decision_id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, None, "kept once, in inputs.usage");
    server.shutdown().await;
}

/// The overrides and the queue are mutable tables; `verify` checks them against the chain, so
/// writing them around the Review API is caught like an edited audit row.
#[tokio::test]
async fn audit_verify_checks_overrides_and_the_queue_against_the_chain() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, reviewers).await;
    let tor = server
        .classify(account(scenario.ips.tor, "acct-tor"))
        .await
        .unwrap();
    let second = server
        .classify(account(scenario.ips.tor, "acct-tor-2"))
        .await
        .unwrap();
    settle().await;
    review(&server)
        .resolve(as_caller(
            pb::ResolveRequest {
                decision_id: tor.decision_id.clone(),
                outcome: "cleared".into(),
                note: " known researcher ".into(),
            },
            ALICE,
        ))
        .await
        .unwrap();
    let set = |value: &str| pb::SetOverrideRequest {
        scope: "account".into(),
        value: value.into(),
        action: "DENY".into(),
        reason: "shell company".into(),
        ..Default::default()
    };
    let kept = review(&server)
        .set_override(as_caller(set("acct-shell"), ALICE))
        .await
        .unwrap()
        .into_inner();
    let removed = review(&server)
        .set_override(as_caller(set("acct-other"), ALICE))
        .await
        .unwrap()
        .into_inner();
    review(&server)
        .remove_override(as_caller(
            pb::RemoveOverrideRequest {
                id: removed.id.clone(),
                reason: "mistake".into(),
            },
            ALICE,
        ))
        .await
        .unwrap();
    settle().await;
    let dir = server.data_dir();
    let (ok, out) = support::audit_verify(&dir);
    assert!(ok, "{out}");
    assert!(out.starts_with("ok: 6 audit rows verified"), "{out}");

    let db = rusqlite::Connection::open(regionguard::store::db_path(&dir)).unwrap();
    let broken_by = |sql: &str, undo: &str| {
        db.execute_batch(sql).unwrap();
        let (ok, out) = support::audit_verify(&dir);
        db.execute_batch(undo).unwrap();
        assert!(support::audit_verify(&dir).0, "undone: {sql}");
        assert!(!ok, "{sql}: {out}");
        out
    };
    let out = broken_by(
        &format!(
            "UPDATE overrides SET action = 'ALLOW' WHERE id = '{}'",
            kept.id
        ),
        &format!(
            "UPDATE overrides SET action = 'DENY' WHERE id = '{}'",
            kept.id
        ),
    );
    assert_eq!(
        out.trim(),
        format!(
            "BROKEN: overrides: {}: action is \"ALLOW\" in the table but \"DENY\" in the audit log",
            kept.id
        )
    );
    support::record(format_args!(
        "audit verify after an override edit: {}",
        out.trim()
    ));
    let out = broken_by(
        "INSERT INTO overrides (id, scope, value, action, reviewer, reason, created_at_ms) \
         VALUES ('planted', 'account', 'acct-x', 'ALLOW', 'alice@compliance', 'x', 1)",
        "DELETE FROM overrides WHERE id = 'planted'",
    );
    assert!(
        out.starts_with("BROKEN: overrides: planted: no reviewer row"),
        "{out}"
    );
    let out = broken_by(
        &format!(
            "UPDATE overrides SET removed_at_ms = NULL, removed_by = '' WHERE id = '{}'",
            removed.id
        ),
        &format!(
            "UPDATE overrides SET removed_at_ms = (SELECT json_extract(body, '$.applied.override.removed_at_ms') \
             FROM audit_log WHERE json_extract(body, '$.applied.override.removed_by') = 'alice@compliance'), \
             removed_by = 'alice@compliance' WHERE id = '{}'",
            removed.id
        ),
    );
    assert!(out.contains("removed_at_ms is null in the table"), "{out}");
    let out = broken_by(
        &format!(
            "UPDATE review_queue SET status = 'open' WHERE decision_id = '{}'",
            tor.decision_id
        ),
        &format!(
            "UPDATE review_queue SET status = 'resolved' WHERE decision_id = '{}'",
            tor.decision_id
        ),
    );
    assert!(out.contains("(resolution undone)"), "{out}");
    // Deletes a queue item (kept aside, and put back after the check).
    let without_item = |id: &str| {
        broken_by(
            &format!(
                "CREATE TEMP TABLE saved AS SELECT * FROM review_queue WHERE decision_id = '{id}'; \
                 DELETE FROM review_queue WHERE decision_id = '{id}'"
            ),
            "INSERT INTO review_queue SELECT * FROM saved; DROP TABLE saved",
        )
    };
    let out = without_item(&second.decision_id);
    assert_eq!(
        out.trim(),
        format!(
            "BROKEN: review_queue: {}: a REVIEW decision in the audit log but missing from the queue (deleted)",
            second.decision_id
        )
    );
    let out = broken_by(
        &format!(
            "UPDATE review_queue SET resolved_by = 'mallory' WHERE decision_id = '{}'",
            second.decision_id
        ),
        &format!(
            "UPDATE review_queue SET resolved_by = '' WHERE decision_id = '{}'",
            second.decision_id
        ),
    );
    assert!(
        out.contains("open, but resolved_by is \"mallory\""),
        "{out}"
    );
    let out = without_item(&tor.decision_id);
    assert!(
        out.contains("resolved in the audit log but missing from the queue (deleted)"),
        "{out}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn replay_of_a_tightened_policy_reports_the_transitions() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, reviewers).await;
    for _ in 0..3 {
        server.classify_ip(scenario.ips.allowed).await;
    }
    server.classify_ip(scenario.ips.sanctioned).await;
    settle().await;
    let tightened = support::with_extra_sanctioned("US");
    let report = review(&server)
        .replay(as_caller(
            pb::ReplayRequest {
                policy_toml: tightened.clone(),
                since_unix_ms: 0,
                max_samples: 2,
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((report.replayed, report.changed), (4, 3));
    let to_deny = report
        .transitions
        .iter()
        .find(|t| t.from == "ALLOW" && t.to == "DENY")
        .unwrap();
    assert_eq!((to_deny.count, to_deny.sample_decision_ids.len()), (3, 2));
    assert_eq!(
        report.changed_by_country,
        [pb::Count {
            key: "US".into(),
            count: 3
        }]
    );

    let policy_file = server.dir.path().join("candidate.toml");
    std::fs::write(&policy_file, tightened).unwrap();
    let out = Command::new(BIN)
        .args(["replay", "--since", "1d", "--policy"])
        .arg(&policy_file)
        .arg("--data-dir")
        .arg(server.data_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("4 decisions replayed, 3 would change"),
        "{text}"
    );
    support::record(format_args!("replay report:\n{}", text.trim_end()));
    server.shutdown().await;
}

/// The real binary, killed with SIGKILL while it records decisions: the store reopens, the chain
/// verifies, and a restarted server continues the same chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_writing_keeps_the_chain_intact() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let location = dir.path().join("city.mmdb");
    std::fs::write(&location, support::fixtures::city_db()).unwrap();
    let start = || {
        let port = support::free_port();
        let child = Command::new(BIN)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--policy",
                "data/policy.toml",
                "--data-dir",
            ])
            .arg(&data)
            .arg("--location-db")
            .arg(&location)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        (child, format!("http://127.0.0.1:{port}"))
    };
    async fn connect(addr: &str) -> ClassifierClient<Channel> {
        for _ in 0..200 {
            if let Ok(channel) = Channel::from_shared(addr.to_owned())
                .unwrap()
                .connect()
                .await
            {
                return ClassifierClient::new(channel);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("server at {addr} did not start");
    }

    let (mut child, addr) = start();
    let client = connect(&addr).await;
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut answered = 0u32;
            for i in 0..2000 {
                let ip = if (worker + i) % 3 == 0 {
                    "5.1.2.3"
                } else {
                    "216.160.83.57"
                };
                let signup = pb::ClassifyRequest {
                    flow: pb::Flow::Signup.into(),
                    ..request(ip)
                };
                if client.classify(signup).await.is_err() {
                    break;
                }
                answered += 1;
            }
            answered
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    child.kill().unwrap(); // SIGKILL, mid-write
    child.wait().unwrap();
    let mut answered = 0;
    for task in tasks {
        answered += task.await.unwrap();
    }
    let (ok, out) = support::audit_verify(&data);
    assert!(ok, "after kill -9: {out}");
    let rows_after_kill: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    support::record(format_args!(
        "kill -9: {answered} decisions answered, {rows_after_kill} committed rows, chain intact"
    ));
    assert!(rows_after_kill > 0);

    let (mut child, addr) = start();
    let mut client = connect(&addr).await;
    for _ in 0..10 {
        client
            .classify(pb::ClassifyRequest {
                flow: pb::Flow::Login.into(),
                ..request("216.160.83.57")
            })
            .await
            .unwrap();
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    let (ok, out) = support::audit_verify(&data);
    assert!(ok, "{out}");
    let rows_after_restart: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(
        rows_after_restart,
        rows_after_kill + 10,
        "nothing committed was lost; the chain continued"
    );
}

/// `[store] retain_days` in the real binary: rows older than the window (written here through
/// the store's own writer, with old times) are removed soon after start, and the store verifies.
#[tokio::test]
async fn the_server_applies_retention_and_the_store_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let recorder = regionguard::store::writer::Recorder::start(
        &data,
        64,
        regionguard::store::writer::Overflow::Sample,
    )
    .unwrap();
    let long_ago = regionguard::store::now_ms() - 30 * 86_400_000;
    for (i, at) in [long_ago, long_ago + 1, regionguard::store::now_ms()]
        .into_iter()
        .enumerate()
    {
        let row = regionguard::store::AuditRow {
            kind: "decision".into(),
            ref_id: format!("d{i}"),
            recorded_at_ms: at,
            verdict: "ALLOW".into(),
            body: "{}".into(),
            ..Default::default()
        };
        recorder
            .decision(Box::new(move || row), MUST)
            .await
            .unwrap();
    }
    recorder.flush().await;
    drop(recorder);
    // The server keys what it writes from now on; the plain rows before stay verifiable.
    let key = dir.path().join("audit.key");
    std::fs::write(&key, [42u8; 32]).unwrap();
    let config = dir.path().join("regionguard.toml");
    std::fs::write(
        &config,
        format!(
            "metrics_listen = \"127.0.0.1:0\"\n[store]\nretain_days = 7\nchain_key_file = {:?}\n",
            key.display().to_string()
        ),
    )
    .unwrap();
    // Keying the existing plain store is an explicit, one-time step.
    let adopted = Command::new(BIN)
        .args(["audit", "adopt-key", "--key-file"])
        .arg(&key)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(adopted.status.success(), "{adopted:?}");
    let verify_with = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["audit", "verify", "--key-file"])
            .arg(&key)
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let port = support::free_port();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(&data)
        .env("REGIONGUARD_CONFIG", &config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = String::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        out = verify_with(&[]).1;
        if out.contains("removed by retention") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        out.starts_with("ok: 3 audit rows verified"),
        "the new row, the keying row and the checkpoint: {out}"
    );
    assert!(
        out.contains("rows keyed with the chain key from seq 4"),
        "{out}"
    );
    assert!(
        out.contains("rows through seq 2 removed by retention"),
        "{out}"
    );
    // The checkpoint is keyed: without the key it cannot be checked.
    let (ok, unkeyed) = support::audit_verify(&data);
    assert!(!ok);
    assert!(
        unkeyed.starts_with("BROKEN: row seq 4 is keyed: pass the chain key"),
        "{unkeyed}"
    );
    // The auditor's promise: 7 days holds, 8 does not.
    assert!(verify_with(&["--min-retain-days", "7"]).0);
    let (ok, short) = verify_with(&["--min-retain-days", "8"]);
    assert!(!ok);
    assert!(
        short.starts_with(
            "BROKEN: a retention checkpoint kept only 7.0 days, fewer than --min-retain-days 8"
        ),
        "{short}"
    );
    // The dashboard's counts went with the rows: only the new decision is counted.
    let db = rusqlite::Connection::open(regionguard::store::db_path(&data)).unwrap();
    let counted: Vec<(i64, i64)> = db
        .prepare("SELECT hour_ms, n FROM decision_counts WHERE reason = ''")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(counted.len(), 1, "{counted:?}");
    assert_eq!(counted[0].1, 1);
    assert!(counted[0].0 > long_ago + 86_400_000, "{counted:?}");
    support::record(format_args!(
        "audit verify after retention: {}",
        out.trim().replace('\n', " |")
    ));
}

/// A fleet found by a decision is there for reviewers by its id: members with their volume and
/// countries, the values linking them; an unknown id is NOT_FOUND, a missing one names the field.
#[tokio::test]
async fn a_fleet_is_listed_queued_and_overridden_by_its_id() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, reviewers).await;
    let now = regionguard::store::now_ms();
    // a and b share a card, b and c a device: one fleet of three.
    let event = |account: &str, card: &str, device: &str, requests: u64| pb::UsageEvent {
        account_id: account.into(),
        ip: scenario.ips.allowed.into(),
        timestamp_unix_ms: now - 1000,
        request_count: requests,
        payment_fingerprint: card.into(),
        device_id: device.into(),
        ..Default::default()
    };
    let events = vec![
        event("fleet-a", "card-1", "", 2),
        event("fleet-b", "card-1", "device-1", 3),
        event("fleet-c", "", "device-1", 4),
    ];
    let summary = pb::usage_client::UsageClient::new(server.channel.clone())
        .report(tokio_stream::iter(events))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.accepted, 3);
    let response = server
        .classify(account(scenario.ips.allowed, "fleet-a"))
        .await
        .unwrap();
    let fleet_id = response.usage.unwrap().fleet.unwrap().fleet_id;
    let fleet = review(&server)
        .get_fleet(as_caller(
            pb::GetFleetRequest {
                fleet_id: fleet_id.clone(),
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    let summary = fleet.summary.clone().unwrap();
    assert_eq!(
        (summary.fleet_id.as_str(), summary.size),
        (fleet_id.as_str(), 3)
    );
    let members: Vec<_> = fleet
        .members
        .iter()
        .map(|m| m.account_id.as_str())
        .collect();
    assert_eq!(members, ["fleet-a", "fleet-b", "fleet-c"]);
    assert_eq!(fleet.requests_24h, 9);
    assert_eq!(fleet.countries, ["US"], "{fleet:?}");
    let links: Vec<_> = fleet
        .links
        .iter()
        .map(|l| (l.kind.as_str(), l.value.as_str(), l.accounts))
        .collect();
    assert!(
        links.contains(&("PAYMENT_FINGERPRINT", "card-1", 2)),
        "{links:?}"
    );
    assert!(links.contains(&("DEVICE", "device-1", 2)), "{links:?}");
    // The three share a /24 too, but networks link only from 20 accounts.
    assert_eq!(links.len(), 2, "{links:?}");

    let unknown = review(&server)
        .get_fleet(as_caller(
            pb::GetFleetRequest {
                fleet_id: "fl_0000000000000000".into(),
            },
            ALICE,
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let missing = review(&server)
        .get_fleet(as_caller(pb::GetFleetRequest::default(), ALICE))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert!(missing.message().contains("fleet_id"), "{missing:?}");

    // The queue, searched by fleet: a member's REVIEW decision is found, a loner's is not.
    let queued = server
        .classify(account(scenario.ips.tor, "fleet-b"))
        .await
        .unwrap();
    assert_eq!(verdict(&queued), Verdict::Review);
    let loner = server
        .classify(account(scenario.ips.tor, "loner"))
        .await
        .unwrap();
    assert_eq!(verdict(&loner), Verdict::Review);
    settle().await;
    let by_fleet = |fleet_id: &str| {
        as_caller(
            pb::ListQueueRequest {
                fleet_id: fleet_id.into(),
                ..Default::default()
            },
            ALICE,
        )
    };
    let found = review(&server)
        .list_queue(by_fleet(&fleet_id.to_ascii_uppercase()))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = found
        .items
        .iter()
        .map(|i| i.decision.as_ref().unwrap().account_id.as_str())
        .collect();
    assert_eq!(ids, ["fleet-b"], "{found:?}");
    let everything = review(&server)
        .list_queue(as_caller(pb::ListQueueRequest::default(), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(everything.items.len(), 2, "both queued");
    let bad = review(&server)
        .list_queue(by_fleet("fleet-b"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("fleet_id"), "{bad:?}");

    // A fleet override holds for every member, and for no one else.
    let set = |value: &str| {
        as_caller(
            pb::SetOverrideRequest {
                scope: "fleet".into(),
                value: value.into(),
                action: "DENY".into(),
                reason: "one operator behind these accounts".into(),
                ..Default::default()
            },
            ALICE,
        )
    };
    let refused = review(&server)
        .set_override(set("fl_xyz"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("value"), "{refused:?}");
    let set_override = review(&server)
        .set_override(set(&fleet_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (set_override.scope.as_str(), set_override.value.as_str()),
        ("fleet", fleet_id.as_str())
    );
    for member in ["fleet-a", "fleet-c"] {
        let denied = server
            .classify(account(scenario.ips.allowed, member))
            .await
            .unwrap();
        assert_eq!(verdict(&denied), Verdict::Deny, "{member}");
        let reason = denied
            .reasons
            .iter()
            .find(|r| r.code == "OVERRIDE_DENY")
            .unwrap();
        assert_eq!(reason.evidence["override_id"], set_override.id);
        assert_eq!(reason.evidence["scope"], format!("fleet:{fleet_id}"));
    }
    let outsider = server
        .classify(account(scenario.ips.allowed, "loner"))
        .await
        .unwrap();
    assert_eq!(verdict(&outsider), Verdict::Allow);
    assert_eq!(set_override.reviewer, "alice@compliance");
    server.shutdown().await;
}

/// A fleet ALLOW (a reviewer's word that the fleet is legitimate: a company's staff) clears the
/// reasons that fleet raised, for every member, and nothing else: the members' other reasons
/// stand, and a DENY on one member still denies it.
#[tokio::test]
async fn a_fleet_allow_clears_what_the_fleet_raised_and_nothing_else() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, reviewers).await;
    let now = regionguard::store::now_ms();
    // Twelve accounts on one company card: a fleet past the policy's 10.
    let events: Vec<_> = (0..12)
        .map(|i| pb::UsageEvent {
            account_id: format!("staff-{i}"),
            ip: scenario.ips.allowed.into(),
            timestamp_unix_ms: now - 1000,
            request_count: 1,
            payment_fingerprint: "card-company".into(),
            ..Default::default()
        })
        .collect();
    pb::usage_client::UsageClient::new(server.channel.clone())
        .report(tokio_stream::iter(events))
        .await
        .unwrap();
    let signup = |ip: &str, member: &str| pb::ClassifyRequest {
        flow: pb::Flow::Signup.into(),
        ..account(ip, member)
    };
    let before = server
        .classify(signup(scenario.ips.allowed, "staff-1"))
        .await
        .unwrap();
    assert_eq!(verdict(&before), Verdict::Review, "{before:?}");
    let fleet_id = before.usage.unwrap().fleet.unwrap().fleet_id;
    let allowed = review(&server)
        .set_override(as_caller(
            pb::SetOverrideRequest {
                scope: "fleet".into(),
                value: fleet_id.clone(),
                action: "ALLOW".into(),
                reason: "Acme's engineers, contract 12".into(),
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allowed.action, "ALLOW");
    for member in ["staff-1", "staff-7"] {
        let after = server
            .classify(signup(scenario.ips.allowed, member))
            .await
            .unwrap();
        assert_eq!(verdict(&after), Verdict::Allow, "{member}: {after:?}");
        let fleet = after
            .reasons
            .iter()
            .find(|r| r.code == "USAGE_FLEET")
            .expect("the cleared reason stays in the answer");
        assert_eq!(fleet.contribution, 0);
        assert_eq!(
            fleet.evidence["cleared_by"],
            format!("override:{}", allowed.id)
        );
        let note = after
            .reasons
            .iter()
            .find(|r| r.code == "OVERRIDE_ALLOW")
            .unwrap();
        assert_eq!(note.evidence["scope"], format!("fleet:{fleet_id}"));
    }
    // A member's other reasons stand: from a Tor exit it is reviewed as before.
    let tor = server
        .classify(signup(scenario.ips.tor, "staff-2"))
        .await
        .unwrap();
    assert_eq!(verdict(&tor), Verdict::Review, "{tor:?}");
    // A DENY on one member beats the fleet's ALLOW.
    review(&server)
        .set_override(as_caller(
            pb::SetOverrideRequest {
                scope: "account".into(),
                value: "staff-3".into(),
                action: "DENY".into(),
                reason: "left the company".into(),
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap();
    let denied = server
        .classify(signup(scenario.ips.allowed, "staff-3"))
        .await
        .unwrap();
    assert_eq!(verdict(&denied), Verdict::Deny);
    server.shutdown().await;
}

/// A denied fleet cannot shed its DENY by linking to an older account: the merged fleet takes
/// the older founder's id, and keeps the denied one among its former ids, which the override
/// still matches. (Before, the override matched only the current id, and the fleet was let in.)
#[tokio::test]
async fn a_denied_fleet_stays_denied_when_it_merges_into_an_older_one() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, reviewers).await;
    let now = regionguard::store::now_ms();
    let event = |account: &str, ago_ms: i64, card: &str, device: &str| pb::UsageEvent {
        account_id: account.into(),
        ip: scenario.ips.allowed.into(),
        timestamp_unix_ms: now - ago_ms,
        request_count: 1,
        payment_fingerprint: card.into(),
        device_id: device.into(),
        ..Default::default()
    };
    let report = |events: Vec<pb::UsageEvent>| {
        let mut usage = pb::usage_client::UsageClient::new(server.channel.clone());
        async move {
            usage.report(tokio_stream::iter(events)).await.unwrap();
        }
    };
    // An older pair on a card, and the fleet to deny on a device.
    report(vec![
        event("veteran-1", 3_600_000, "card-veteran", ""),
        event("veteran-2", 3_599_000, "card-veteran", ""),
        event("operator-1", 60_000, "", "device-op"),
        event("operator-2", 59_000, "", "device-op"),
    ])
    .await;
    let fleet = |member: &str| {
        let request = account(scenario.ips.allowed, member);
        let server = &server;
        async move { server.classify(request).await.unwrap() }
    };
    let operators = fleet("operator-1").await.usage.unwrap().fleet.unwrap();
    let denied = review(&server)
        .set_override(as_caller(
            pb::SetOverrideRequest {
                scope: "fleet".into(),
                value: operators.fleet_id.clone(),
                action: "DENY".into(),
                reason: "one operator behind these accounts".into(),
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(verdict(&fleet("operator-1").await), Verdict::Deny);

    // One operator account pays with the veterans' card: one fleet, the veterans' id.
    report(vec![event("operator-2", 30_000, "card-veteran", "")]).await;
    for member in ["operator-1", "operator-2", "veteran-1"] {
        let answer = fleet(member).await;
        let summary = answer.usage.clone().unwrap().fleet.unwrap();
        assert_ne!(summary.fleet_id, operators.fleet_id, "{member}: merged");
        assert_eq!(summary.size, 4);
        assert_eq!(
            summary.former_fleet_ids,
            std::slice::from_ref(&operators.fleet_id)
        );
        assert_eq!(verdict(&answer), Verdict::Deny, "{member}: {answer:?}");
        let reason = answer
            .reasons
            .iter()
            .find(|r| r.code == "OVERRIDE_DENY")
            .unwrap();
        assert_eq!(reason.evidence["override_id"], denied.id);
    }

    // A reviewer following the denied decision's fleet id finds the fleet it is part of now.
    let now_fleet = review(&server)
        .get_fleet(as_caller(
            pb::GetFleetRequest {
                fleet_id: operators.fleet_id.clone(),
            },
            ALICE,
        ))
        .await
        .expect("a former id finds the fleet that absorbed it")
        .into_inner()
        .summary
        .unwrap();
    assert_ne!(now_fleet.fleet_id, operators.fleet_id);
    assert_eq!(now_fleet.size, 4);
    assert_eq!(
        now_fleet.former_fleet_ids,
        std::slice::from_ref(&operators.fleet_id)
    );
    server.shutdown().await;
}

/// Without a usage history no fleet is ever found, so a fleet override could match nothing: it
/// is refused (FAILED_PRECONDITION) instead of being kept to no effect.
#[tokio::test]
async fn a_fleet_override_needs_the_usage_history() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, |config| {
        reviewers(config);
        config.usage.enabled = false;
    })
    .await;
    let refused = review(&server)
        .set_override(as_caller(
            pb::SetOverrideRequest {
                scope: "fleet".into(),
                value: "fl_00112233445566ff".into(),
                action: "DENY".into(),
                reason: "one operator".into(),
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("usage history"), "{refused:?}");
}
