//! Outcome → CheckResponse: headers for upstream, dynamic metadata for access logs, and the
//! denied response a client sees.

use envoy_types::ext_authz::v3::pb::{
    CheckResponse, DeniedHttpResponse, HeaderAppendAction, HttpStatus, HttpStatusCode,
    OkHttpResponse,
};
use envoy_types::ext_authz::v3::{
    CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};

use super::config::{GatewayConfig, ReviewAction};
use crate::classify::Verdict;
use crate::engine::Outcome;

pub const VERDICT_HEADER: &str = "x-regionguard-verdict";
pub const DECISION_ID_HEADER: &str = "x-regionguard-decision-id";
pub const COUNTRY_HEADER: &str = "x-regionguard-country";
pub const POLICY_VERSION_HEADER: &str = "x-regionguard-policy-version";
pub const FAIL_OPEN_HEADER: &str = "x-regionguard-fail-open";
pub const ERROR_HEADER: &str = "x-regionguard-error";
/// Every header regionguard sets; those a response does not set are removed from the request,
/// so a client cannot forge them.
pub const ALL_HEADERS: [&str; 6] = [
    VERDICT_HEADER,
    DECISION_ID_HEADER,
    COUNTRY_HEADER,
    POLICY_VERSION_HEADER,
    FAIL_OPEN_HEADER,
    ERROR_HEADER,
];

fn string(s: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

fn ok_status() -> tonic::Status {
    tonic::Status::ok("")
}

/// Builds the allowed response: our headers overwrite any the client sent, the rest are removed.
fn allowed(headers: &[(&'static str, String)], metadata: Struct) -> CheckResponse {
    let mut ok = OkHttpResponseBuilder::new();
    for (name, value) in headers {
        ok.add_header(
            *name,
            value.clone(),
            Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
            true,
        );
    }
    for name in ALL_HEADERS
        .iter()
        .filter(|n| !headers.iter().any(|(h, _)| h == *n))
    {
        ok.remove_header(*name);
    }
    let mut response = CheckResponse::with_status(ok_status());
    response
        .set_http_response(ok.build())
        .set_dynamic_metadata(Some(metadata));
    response
}

fn denied(
    status: HttpStatusCode,
    headers: &[(&'static str, String)],
    body: serde_json::Value,
    metadata: Struct,
) -> CheckResponse {
    let mut deny = DeniedHttpResponseBuilder::new();
    deny.set_http_status(status);
    deny.add_header(
        "content-type",
        "application/json",
        Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
        false,
    );
    for (name, value) in headers {
        deny.add_header(
            *name,
            value.clone(),
            Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
            true,
        );
    }
    deny.set_body(body.to_string());
    let mut response =
        CheckResponse::with_status(tonic::Status::permission_denied("denied by regionguard"));
    response
        .set_http_response(deny.build())
        .set_dynamic_metadata(Some(metadata));
    response
}

/// The response for a decision.
pub fn decision(
    outcome: &Outcome,
    config: &GatewayConfig,
    deny_status: HttpStatusCode,
) -> CheckResponse {
    let decision = &outcome.decision;
    let country = outcome
        .location
        .record
        .facts
        .country
        .map(|c| c.to_string())
        .unwrap_or_default();
    let headers = [
        (VERDICT_HEADER, decision.verdict.as_str().to_owned()),
        (DECISION_ID_HEADER, outcome.decision_id.clone()),
        (COUNTRY_HEADER, country.clone()),
        (POLICY_VERSION_HEADER, decision.policy_version.to_string()),
    ];
    let codes: Vec<&str> = decision.reasons.iter().map(|r| r.code.as_str()).collect();
    let metadata = Struct {
        fields: [
            ("verdict", string(decision.verdict.as_str())),
            ("decision_id", string(outcome.decision_id.clone())),
            ("country", string(country)),
            (
                "policy_version",
                string(decision.policy_version.to_string()),
            ),
            (
                "risk_score",
                Value {
                    kind: Some(Kind::NumberValue(f64::from(decision.risk_score))),
                },
            ),
            (
                "reasons",
                Value {
                    kind: Some(Kind::ListValue(ListValue {
                        values: codes.iter().map(|c| string(*c)).collect(),
                    })),
                },
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
    };
    let deny = match decision.verdict {
        Verdict::Allow => false,
        Verdict::Review => config.review_action == ReviewAction::Deny,
        Verdict::Deny => true,
    };
    if deny {
        let error = if decision.verdict == Verdict::Deny {
            "region_restricted"
        } else {
            "review_required"
        };
        let body = serde_json::json!({ "error": error, "decision_id": outcome.decision_id, "reasons": codes });
        denied(deny_status, &headers, body, metadata)
    } else {
        allowed(&headers, metadata)
    }
}

/// The response when a request could not be classified, per `on_error`.
pub fn failure(message: &str, fail_open: bool, deny_status: HttpStatusCode) -> CheckResponse {
    // Header values must not carry line breaks or other control characters; and, as every
    // message a caller sees, it is bounded (the same bound as gRPC errors).
    let printable: String = message
        .chars()
        .filter(|c| !c.is_control())
        .take(crate::grpc::MAX_MESSAGE_BYTES)
        .collect();
    let detail = crate::grpc::bounded(&printable).into_owned();
    let metadata = Struct {
        fields: [
            ("error", string(detail.clone())),
            (
                "fail_open",
                Value {
                    kind: Some(Kind::BoolValue(fail_open)),
                },
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
    };
    if fail_open {
        allowed(
            &[
                (FAIL_OPEN_HEADER, "true".to_owned()),
                (ERROR_HEADER, detail),
            ],
            metadata,
        )
    } else {
        let body = serde_json::json!({ "error": "region_check_failed", "detail": detail });
        denied(deny_status, &[(ERROR_HEADER, detail)], body, metadata)
    }
}

/// The response for a bypassed path: allowed, unclassified, with forged headers removed.
pub fn bypass() -> CheckResponse {
    let mut ok = OkHttpResponseBuilder::new();
    for name in ALL_HEADERS {
        ok.remove_header(name);
    }
    let mut response = CheckResponse::with_status(ok_status());
    response.set_http_response(ok.build());
    response
}

/// What a denied response's HTTP status is, for tests and logs.
pub fn http_status(response: &CheckResponse) -> Option<i32> {
    use envoy_types::ext_authz::v3::pb::HttpResponse;
    match response.http_response.as_ref()? {
        HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code }),
            ..
        }) => Some(*code),
        HttpResponse::OkResponse(OkHttpResponse { .. }) => Some(200),
        _ => None,
    }
}
