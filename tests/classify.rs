//! The Classifier API end to end: a real server on loopback, called through the generated
//! tonic client. Every test runs against each scenario (the repository's fixtures, and MaxMind's
//! official test databases when REGIONGUARD_MAXMIND_TEST_DATA is set).

mod support;

use regionguard::grpc::pb::{self, Verdict};
use support::{TestServer, codes, request, scenarios, verdict};
use tonic::Code;

fn reason<'a>(response: &'a pb::ClassifyResponse, code: &str) -> &'a pb::Reason {
    response
        .reasons
        .iter()
        .find(|r| r.code == code)
        .unwrap_or_else(|| panic!("no {code} in {:?}", codes(response)))
}

#[tokio::test]
async fn sanctioned_ip_is_denied_with_an_explained_hard_reason() {
    for scenario in scenarios() {
        let server = TestServer::start(&scenario).await;
        let response = server.classify_ip(scenario.ips.sanctioned).await;
        assert_eq!(verdict(&response), Verdict::Deny, "{}", scenario.name);
        let sanctioned = reason(&response, "REGION_SANCTIONED");
        assert!(sanctioned.hard);
        assert_eq!(sanctioned.evidence["region"], "IR");
        assert_eq!(response.risk_score, 100);
        let location = response.location.as_ref().unwrap();
        assert_eq!(location.country, "IR");
        assert!(!location.network.is_empty());
        assert!(
            location
                .databases
                .iter()
                .any(|db| db.role == "location" && db.build_epoch > 0)
        );
        assert!(
            response.policy_version.starts_with("2026-11-25+"),
            "{}",
            response.policy_version
        );

        let again = server.classify_ip(scenario.ips.sanctioned).await;
        assert_ne!(
            again.decision_id, response.decision_id,
            "decision ids are unique"
        );
        server.shutdown().await;
    }
}

#[tokio::test]
async fn allowed_ip_is_allowed_with_no_reasons() {
    for scenario in scenarios() {
        let server = TestServer::start(&scenario).await;
        let response = server.classify_ip(scenario.ips.allowed).await;
        assert_eq!(
            (verdict(&response), response.risk_score),
            (Verdict::Allow, 0),
            "{}: {:?}",
            scenario.name,
            codes(&response)
        );
        let location = response.location.unwrap();
        assert_eq!(location.country, "US");
        assert_eq!(location.subdivision, "US-WA");
        server.shutdown().await;
    }
}

#[tokio::test]
async fn unsupported_ip_and_its_ipv4_mapped_form_answer_the_same() {
    for scenario in scenarios() {
        let server = TestServer::start(&scenario).await;
        let plain = server.classify_ip(scenario.ips.unsupported).await;
        assert_eq!(verdict(&plain), Verdict::Deny);
        assert_eq!(codes(&plain), ["REGION_UNSUPPORTED"]);
        let mapped = server
            .classify_ip(&format!("::ffff:{}", scenario.ips.unsupported))
            .await;
        assert_eq!(mapped.location, plain.location, "{}", scenario.name);
        assert_eq!(codes(&mapped), codes(&plain));
        assert_eq!(mapped.location.unwrap().network, "175.16.199.0/24");
        server.shutdown().await;
    }
}

#[tokio::test]
async fn subdivision_rule_uses_iso_3166_2_codes() {
    for scenario in scenarios() {
        let server = TestServer::start(&scenario).await;
        let (ip, code) = scenario.ips.subdivision;
        let response = server.classify_ip(ip).await;
        assert_eq!(
            response.location.as_ref().unwrap().subdivision,
            code,
            "{}",
            scenario.name
        );
        assert_eq!(verdict(&response), Verdict::Deny);
        assert_eq!(
            reason(&response, "REGION_SANCTIONED").evidence["region"],
            code
        );
        server.shutdown().await;
    }
}

#[tokio::test]
async fn anonymizers_add_soft_reasons() {
    for scenario in scenarios() {
        let server = TestServer::start(&scenario).await;
        let vpn = server.classify_ip(scenario.ips.vpn).await;
        assert!(vpn.location.as_ref().unwrap().anonymizer.unwrap().vpn);
        let vpn_reason = reason(&vpn, "ANONYMIZER_VPN");
        assert!(!vpn_reason.hard && vpn_reason.contribution > 0);
        if scenario.vpn_located {
            assert_eq!(
                verdict(&vpn),
                Verdict::Allow,
                "a VPN alone does not reach REVIEW"
            );
        }

        let tor = server.classify_ip(scenario.ips.tor).await;
        reason(&tor, "ANONYMIZER_TOR");
        assert!(
            verdict(&tor) >= Verdict::Review,
            "a Tor exit alone reaches REVIEW"
        );

        let hosting = server.classify_ip(scenario.ips.hosting).await;
        reason(&hosting, "HOSTING_PROVIDER");
        assert_eq!(
            verdict(&hosting),
            Verdict::Allow,
            "a hosting IP alone does not reach REVIEW"
        );
        server.shutdown().await;
    }
}

#[tokio::test]
async fn unknown_location_follows_the_policy() {
    for scenario in scenarios() {
        let server = TestServer::start(&scenario).await;
        let response = server.classify_ip(scenario.ips.unknown).await;
        assert_eq!(codes(&response), ["IP_LOCATION_UNKNOWN"]);
        assert_eq!(
            verdict(&response),
            Verdict::Allow,
            "default action is score"
        );
        assert_eq!(response.location.unwrap().country, "");
        server.shutdown().await;
    }
}

fn owner(name: &str, country: &str, share: f64, owners: Vec<pb::Owner>) -> pb::Owner {
    pb::Owner {
        name: name.into(),
        country: country.into(),
        share_percent: share,
        owners,
    }
}

fn with_org(ip: &str, owners: Vec<pb::Owner>) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        account: Some(pb::Account {
            organization: Some(pb::Organization {
                name: "Acme".into(),
                headquarters_country: "DE".into(),
                owners,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..request(ip)
    }
}

#[tokio::test]
async fn ownership_chain_through_a_holding_denies() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    // 60% of a holding that owns 90%: 54% effective, above the 50% threshold.
    let chain = vec![owner(
        "Gulf Holding",
        "AE",
        90.0,
        vec![owner("Tehran Parent", "IR", 60.0, vec![])],
    )];
    let response = server
        .classify(with_org(scenario.ips.allowed, chain))
        .await
        .unwrap();
    assert_eq!(verdict(&response), Verdict::Deny);
    let ownership = reason(&response, "OWNERSHIP_RESTRICTED");
    assert_eq!(ownership.evidence["restricted_share_percent"], "54.00");
    assert_eq!(ownership.evidence["owners"], "Tehran Parent");

    let minority = vec![owner(
        "Gulf Holding",
        "AE",
        90.0,
        vec![owner("Tehran Parent", "IR", 50.0, vec![])],
    )];
    let response = server
        .classify(with_org(scenario.ips.allowed, minority))
        .await
        .unwrap();
    assert_eq!(verdict(&response), Verdict::Allow, "45% is not a majority");
    server.shutdown().await;
}

#[tokio::test]
async fn signup_asks_for_verifications_that_clear_soft_reasons() {
    for scenario in scenarios() {
        let server = TestServer::start(&scenario).await;
        let signup = pb::ClassifyRequest {
            flow: pb::Flow::Signup.into(),
            account: Some(pb::Account {
                billing_country: "FR".into(),
                ..Default::default()
            }),
            ..request(scenario.ips.tor)
        };
        let response = server.classify(signup).await.unwrap();
        assert_eq!(
            verdict(&response),
            Verdict::Review,
            "{}: {:?}",
            scenario.name,
            codes(&response)
        );
        assert!(
            response
                .required_verifications
                .contains(&"PHONE".to_owned())
        );
        assert!(
            response
                .required_verifications
                .contains(&"ID_DOCUMENT".to_owned())
        );

        let denied = pb::ClassifyRequest {
            flow: pb::Flow::Signup.into(),
            ..request(scenario.ips.sanctioned)
        };
        assert!(
            server
                .classify(denied)
                .await
                .unwrap()
                .required_verifications
                .is_empty(),
            "hard deny asks for nothing"
        );
        server.shutdown().await;
    }
}

async fn rejected(server: &TestServer, request: pb::ClassifyRequest) -> tonic::Status {
    server
        .classify(request)
        .await
        .expect_err("request should be rejected")
}

#[tokio::test]
async fn bad_input_is_rejected_naming_the_field() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    let ip = scenario.ips.allowed;
    let account = |account: pb::Account| pb::ClassifyRequest {
        account: Some(account),
        ..request(ip)
    };

    let cases: Vec<(pb::ClassifyRequest, &str)> = vec![
        (request(""), "ip: required"),
        (request("300.1.2.3"), "ip: "),
        (request("not an ip"), "ip: "),
        (
            pb::ClassifyRequest {
                flow: 99,
                ..request(ip)
            },
            "flow: unknown value 99",
        ),
        (
            account(pb::Account {
                billing_country: "XX".into(),
                ..Default::default()
            }),
            "account.billing_country: ",
        ),
        (
            account(pb::Account {
                phone_country: "USA".into(),
                ..Default::default()
            }),
            "account.phone_country: ",
        ),
        (
            account(pb::Account {
                created_at_unix: -5,
                ..Default::default()
            }),
            "account.created_at_unix: ",
        ),
        (
            with_org(ip, vec![owner("A", "IR", -1.0, vec![])]),
            "account.organization.owners[0].share_percent: ",
        ),
        (
            with_org(ip, vec![owner("A", "IR", 100.5, vec![])]),
            "account.organization.owners[0].share_percent: ",
        ),
        (
            with_org(ip, vec![owner("A", "IR", f64::NAN, vec![])]),
            "account.organization.owners[0].share_percent: ",
        ),
        (
            with_org(ip, vec![owner("A", "QQ", 10.0, vec![])]),
            "account.organization.owners[0].country: ",
        ),
        (
            with_org(
                ip,
                vec![owner(
                    "A",
                    "AE",
                    50.0,
                    vec![owner("B", "AE", 50.0, vec![owner("A", "IR", 50.0, vec![])])],
                )],
            ),
            "account.organization.owners[0].owners[0].owners[0].name: ownership cycle",
        ),
        (
            pb::ClassifyRequest {
                hints: Some(pb::ClientHints {
                    timezone: "Asia/Tehran; DROP".into(),
                    ..Default::default()
                }),
                ..request(ip)
            },
            "hints.timezone: ",
        ),
    ];
    for (request, expected) in cases {
        let status = rejected(&server, request).await;
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{expected}: {status:?}"
        );
        assert!(
            status.message().starts_with(expected),
            "{:?} should start with {expected:?}",
            status.message()
        );
    }

    let mut deep = owner("leaf", "IR", 100.0, vec![]);
    for i in 0..20 {
        deep = owner(&format!("level{i}"), "AE", 100.0, vec![deep]);
    }
    let status = rejected(&server, with_org(ip, vec![deep])).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("deeper than"),
        "{}",
        status.message()
    );

    let wide = (0..2000)
        .map(|i| owner(&format!("o{i}"), "DE", 0.01, vec![]))
        .collect();
    let status = rejected(&server, with_org(ip, wide)).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("account.organization.owners: more than 1024 owners"),
        "{}",
        status.message()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn oversize_messages_are_resource_exhausted() {
    let scenario = &scenarios()[0];
    let server = TestServer::start_with(scenario, |c| c.max_request_bytes = 4096).await;
    let big = pb::ClassifyRequest {
        hints: Some(pb::ClientHints {
            user_agent: "x".repeat(1000),
            accept_language: "y".repeat(1000),
            ..Default::default()
        }),
        account: Some(pb::Account {
            account_id: "a".repeat(250),
            payment_fingerprint: "p".repeat(250),
            ..Default::default()
        }),
        ..request(scenario.ips.allowed)
    };
    let mut org_heavy = big.clone();
    org_heavy.account.as_mut().unwrap().organization = Some(pb::Organization {
        owners: (0..200)
            .map(|i| owner(&format!("owner-{i:03}"), "DE", 0.5, vec![]))
            .collect(),
        ..Default::default()
    });
    let status = rejected(&server, org_heavy).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("limit of 4096 bytes"),
        "{}",
        status.message()
    );

    let mut huge = big;
    huge.request_id = "r".repeat(64 * 1024);
    let status = rejected(&server, huge).await;
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "far over the limit, the same answer, before decoding: {status:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn classify_stream_answers_in_order_and_survives_a_bad_request() {
    for scenario in scenarios() {
        let server = TestServer::start(&scenario).await;
        let ips = [
            scenario.ips.allowed,
            "bogus",
            scenario.ips.sanctioned,
            scenario.ips.unsupported,
        ];
        let requests: Vec<pb::ClassifyRequest> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| pb::ClassifyRequest {
                request_id: format!("r{i}"),
                ..request(ip)
            })
            .collect();
        let mut stream = server
            .client
            .clone()
            .classify_stream(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let mut responses = Vec::new();
        while let Some(response) = stream.message().await.unwrap() {
            responses.push(response);
        }
        let ids: Vec<&str> = responses.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(ids, ["r0", "r1", "r2", "r3"]);
        assert_eq!(verdict(&responses[0]), Verdict::Allow);
        let error = responses[1]
            .error
            .as_ref()
            .expect("the bad request carries an error");
        assert_eq!(
            (error.code.as_str(), error.field.as_str()),
            ("INVALID_ARGUMENT", "ip")
        );
        assert_eq!(verdict(&responses[1]), Verdict::Unspecified);
        assert_eq!(verdict(&responses[2]), Verdict::Deny);
        assert_eq!(verdict(&responses[3]), Verdict::Deny);
        server.shutdown().await;
    }
}

#[tokio::test]
async fn lookup_ip_reports_location_asn_and_network() {
    for scenario in scenarios() {
        let server = TestServer::start(&scenario).await;
        let info = server
            .client
            .clone()
            .lookup_ip(pb::LookupIpRequest {
                ip: format!("::ffff:{}", scenario.ips.allowed),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.ip, scenario.ips.allowed);
        assert!(info.found);
        let location = info.location.unwrap();
        assert_eq!(
            (location.country.as_str(), location.network.as_str()),
            ("US", "216.160.83.56/29")
        );
        assert!(
            location.accuracy_radius_km > 0,
            "{}: radius is read",
            scenario.name
        );
        let bad = server
            .client
            .clone()
            .lookup_ip(pb::LookupIpRequest { ip: "1.2.3".into() })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument);
        server.shutdown().await;
    }
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = TestServer::start(&scenarios()[0]).await;
    let mut health = HealthClient::new(server.channel.clone());
    for service in ["", "regionguard.v1.Classifier"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.status(), ServingStatus::Serving, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(server.channel.clone());
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([ask]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"regionguard.v1.Classifier".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    server.shutdown().await;
}

fn verification(kind: &str, country: &str, days_ago: i64) -> pb::Verification {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    pb::Verification {
        kind: kind.into(),
        country: country.into(),
        verified_at_unix: now - days_ago * 86_400,
    }
}

/// A signup from a VPN with the given verifications (ANONYMIZER_VPN asks for PHONE).
fn vpn_signup(ip: &str, verifications: Vec<pb::Verification>) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        flow: pb::Flow::Signup.into(),
        account: Some(pb::Account {
            account_id: "acct-verified".into(),
            verifications,
            ..Default::default()
        }),
        ..request(ip)
    }
}

#[tokio::test]
async fn a_verification_changes_the_answer_once_passed_and_not_when_stale_or_foreign() {
    let scenario = &scenarios()[0];
    let server = TestServer::start(scenario).await;
    let vpn = scenario.ips.vpn;
    let asked = server.classify(vpn_signup(vpn, vec![])).await.unwrap();
    assert!(
        asked.required_verifications.contains(&"PHONE".to_owned()),
        "{asked:?}"
    );
    assert!(reason(&asked, "ANONYMIZER_VPN").contribution > 0);

    let passed = server
        .classify(vpn_signup(vpn, vec![verification("PHONE", "DE", 2)]))
        .await
        .unwrap();
    assert_eq!(verdict(&passed), Verdict::Allow, "{passed:?}");
    assert!(passed.required_verifications.is_empty(), "{passed:?}");
    let cleared = reason(&passed, "ANONYMIZER_VPN");
    assert_eq!(cleared.contribution, 0);
    assert_eq!(cleared.evidence["cleared_by"], "PHONE");

    let stale = server
        .classify(vpn_signup(vpn, vec![verification("PHONE", "DE", 400)]))
        .await
        .unwrap();
    assert!(
        stale.required_verifications.contains(&"PHONE".to_owned()),
        "asked again: {stale:?}"
    );
    assert!(reason(&stale, "ANONYMIZER_VPN").contribution > 0);

    let iranian = server
        .classify(vpn_signup(vpn, vec![verification("ID_DOCUMENT", "IR", 2)]))
        .await
        .unwrap();
    assert_eq!(verdict(&iranian), Verdict::Deny);
    assert_eq!(
        reason(&iranian, "VERIFIED_COUNTRY_RESTRICTED").evidence["country"],
        "IR"
    );

    for (bad, field) in [
        (
            verification("FINGERPRINT", "", 1),
            "account.verifications[0].kind",
        ),
        (
            verification("PHONE", "XX", 1),
            "account.verifications[0].country",
        ),
        (
            pb::Verification {
                kind: "PHONE".into(),
                ..Default::default()
            },
            "account.verifications[0].verified_at_unix",
        ),
    ] {
        let refused = server
            .classify(vpn_signup(vpn, vec![bad]))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(
            refused.message().contains(field),
            "{field}: {}",
            refused.message()
        );
    }
}
