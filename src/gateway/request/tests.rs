use super::*;
use crate::gateway::config::{AccountHeaders, MetadataField};
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::google::protobuf::Value;

use crate::gateway::test_envoy::check_request;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn hops(n: u32) -> GatewayConfig {
    GatewayConfig {
        trusted_hops: n,
        ..Default::default()
    }
    .normalized()
}

#[test]
fn source_address_is_the_client_by_default_and_xff_is_ignored() {
    let check = check_request("203.0.113.7", "/v1", &[("x-forwarded-for", "1.1.1.1")], &[]);
    assert_eq!(
        map_check(&check, &hops(0)).unwrap().input.ip,
        ip("203.0.113.7")
    );
}

#[test]
fn trusted_hops_pick_the_right_most_untrusted_address() {
    // client 5.1.2.3 -> spoofed 9.9.9.9 prepended; proxy A (10.0.0.1) adds 5.1.2.3; Envoy sees source 10.0.0.1.
    let check = check_request(
        "10.0.0.1",
        "/v1",
        &[("x-forwarded-for", "9.9.9.9, 5.1.2.3")],
        &[],
    );
    assert_eq!(map_check(&check, &hops(1)).unwrap().input.ip, ip("5.1.2.3"));
    assert_eq!(map_check(&check, &hops(2)).unwrap().input.ip, ip("9.9.9.9"));
    assert_eq!(
        map_check(&check, &hops(3)).unwrap().input.ip,
        ip("10.0.0.1"),
        "fewer entries than hops: the source"
    );
    let no_xff = check_request("10.0.0.1", "/v1", &[], &[]);
    assert_eq!(
        map_check(&no_xff, &hops(1)).unwrap().input.ip,
        ip("10.0.0.1")
    );
    let ported = check_request(
        "10.0.0.1",
        "/v1",
        &[("x-forwarded-for", "[2001:db8::1]:443")],
        &[],
    );
    assert_eq!(
        map_check(&ported, &hops(1)).unwrap().input.ip,
        ip("2001:db8::1")
    );
}

#[test]
fn malformed_addresses_are_mapping_errors() {
    let err = map_check(&check_request("not-an-ip", "/", &[], &[]), &hops(0)).unwrap_err();
    assert_eq!(
        err.field,
        "attributes.source.address.socket_address.address"
    );
    let err = map_check(
        &check_request("10.0.0.1", "/", &[("x-forwarded-for", "bogus")], &[]),
        &hops(1),
    )
    .unwrap_err();
    assert_eq!(err.field, "headers[x-forwarded-for]");
    let err = map_check(&CheckRequest::default(), &hops(0)).unwrap_err();
    assert_eq!(err.field, "attributes");
}

#[test]
fn account_from_header_context_or_metadata() {
    let config = GatewayConfig {
        account_metadata: Some(MetadataField {
            namespace: "envoy.filters.http.jwt_authn".into(),
            path: "jwt_payload.sub".into(),
        }),
        ..Default::default()
    }
    .normalized();
    let check = check_request(
        "8.8.8.8",
        "/",
        &[("x-account-id", "acct-1")],
        &[("regionguard.account_id", "acct-2")],
    );
    assert_eq!(
        map_check(&check, &config)
            .unwrap()
            .input
            .account_id
            .as_deref(),
        Some("acct-1")
    );
    let check = check_request("8.8.8.8", "/", &[], &[("regionguard.account_id", "acct-2")]);
    assert_eq!(
        map_check(&check, &config)
            .unwrap()
            .input
            .account_id
            .as_deref(),
        Some("acct-2")
    );

    let mut check = check_request("8.8.8.8", "/", &[], &[]);
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    let payload = Struct {
        fields: [("sub".to_owned(), string("acct-3"))].into(),
    };
    let jwt = Struct {
        fields: [(
            "jwt_payload".to_owned(),
            Value {
                kind: Some(Kind::StructValue(payload)),
            },
        )]
        .into(),
    };
    check.attributes.as_mut().unwrap().metadata_context = Some(Metadata {
        filter_metadata: [("envoy.filters.http.jwt_authn".to_owned(), jwt)].into(),
        ..Default::default()
    });
    assert_eq!(
        map_check(&check, &config)
            .unwrap()
            .input
            .account_id
            .as_deref(),
        Some("acct-3")
    );

    let none = check_request("8.8.8.8", "/", &[], &[]);
    assert_eq!(map_check(&none, &config).unwrap().input.account_id, None);
}

#[test]
fn flow_and_account_headers() {
    let config = GatewayConfig {
        account_headers: AccountHeaders {
            billing_country: Some("X-Billing-Country".into()),
            created_at_unix: Some("x-account-created".into()),
            ..Default::default()
        },
        ..Default::default()
    }
    .normalized();
    let check = check_request(
        "8.8.8.8",
        "/",
        &[
            ("x-billing-country", "ir"),
            ("x-account-created", "1700000000"),
            ("accept-language", "fa-IR"),
        ],
        &[(FLOW_KEY, "signup")],
    );
    let mapped = map_check(&check, &config).unwrap();
    assert_eq!(mapped.input.flow, Flow::Signup);
    assert_eq!(mapped.input.account.billing_country.unwrap().as_str(), "IR");
    assert_eq!(mapped.input.account.created_at_unix, Some(1_700_000_000));
    assert_eq!(mapped.input.hints.language_regions[0].as_str(), "IR");

    let bad = check_request("8.8.8.8", "/", &[("x-billing-country", "Iran")], &[]);
    assert_eq!(
        map_check(&bad, &config).unwrap_err().field,
        "headers[x-billing-country]"
    );
    let bad_flow = check_request("8.8.8.8", "/", &[], &[(FLOW_KEY, "checkout")]);
    assert_eq!(
        map_check(&bad_flow, &config).unwrap_err().field,
        "context_extensions[regionguard.flow]"
    );
}

#[test]
fn a_creation_time_before_1970_is_refused_as_classify_refuses_it() {
    let config = GatewayConfig {
        account_headers: AccountHeaders {
            created_at_unix: Some("x-account-created".into()),
            ..Default::default()
        },
        ..Default::default()
    }
    .normalized();
    let created = |value: &str| {
        map_check(
            &check_request("8.8.8.8", "/", &[("x-account-created", value)], &[]),
            &config,
        )
    };
    let error = created("-5").unwrap_err();
    assert_eq!(
        (error.field.as_str(), error.message.as_str()),
        ("headers[x-account-created]", "-5 is before 1970")
    );
    assert_eq!(created("0").unwrap().input.account.created_at_unix, None);
    assert!(created("soon").is_err());
}

#[test]
fn an_account_id_with_a_control_character_is_refused() {
    let config = GatewayConfig::default().normalized();
    for id in ["a\u{7}b", "a\r\nb", "a\u{7f}", "a\u{85}b"] {
        let check = check_request("8.8.8.8", "/", &[("x-account-id", id)], &[]);
        let error = map_check(&check, &config).unwrap_err();
        assert_eq!(error.field, "headers[x-account-id]", "{id:?}");
        assert!(error.message.contains("control character"), "{error}");
    }
    let padded = check_request("8.8.8.8", "/", &[("x-account-id", " acct-1 ")], &[]);
    assert_eq!(
        map_check(&padded, &config)
            .unwrap()
            .input
            .account_id
            .as_deref(),
        Some("acct-1")
    );
}

#[test]
fn verifications_come_from_a_header_checked_as_classify_checks_them() {
    let config = GatewayConfig {
        account_headers: AccountHeaders {
            verifications: Some("x-account-verifications".into()),
            ..Default::default()
        },
        ..Default::default()
    }
    .normalized();
    let mapped = |value: &str| {
        map_check(
            &check_request("8.8.8.8", "/", &[("x-account-verifications", value)], &[]),
            &config,
        )
    };
    let ok = mapped("PHONE:US:1790000000, ID_DOCUMENT::1791000000").unwrap();
    let list = &ok.input.account.verifications;
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].kind.as_str(), "PHONE");
    assert_eq!(list[0].country.unwrap().as_str(), "US");
    assert_eq!(
        (list[1].country, list[1].verified_at_unix),
        (None, 1_791_000_000)
    );
    for (value, field) in [
        (
            "SELFIE:US:1790000000",
            "headers[x-account-verifications][0].kind",
        ),
        (
            "PHONE:US:1790000000,PHONE:US",
            "headers[x-account-verifications][1]",
        ),
        (
            "PHONE:Iran:1790000000",
            "headers[x-account-verifications][0].country",
        ),
        (
            "PHONE:US:soon",
            "headers[x-account-verifications][0].verified_at_unix",
        ),
    ] {
        assert_eq!(mapped(value).unwrap_err().field, field, "{value}");
    }
}
