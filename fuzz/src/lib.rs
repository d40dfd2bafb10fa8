//! The fuzz targets' bodies: the policy parser, request conversion with the decision behind it,
//! and the owner-graph evaluation. Shared by the cargo-fuzz binaries in `fuzz_targets/` and by
//! the service's `tests/fuzz_corpus.rs`, which replays `fuzz/corpus/` on every CI run.
//!
//! Each target checks an invariant beyond "does not panic"; a broken one panics, which both
//! libFuzzer and the replay test report with the input that broke it.

use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use prost::Message;
use regionguard::app::EMBEDDED_LOCATION_DB;
use regionguard::classify::{
    AccountFacts, Decision, Facts, Flow, HintFacts, IpFacts, ReasonCode, Verdict, classify,
};
use regionguard::engine::{ClassifyInput, Engine};
use regionguard::geo::{DbRole, Geo, GeoDatabase};
use regionguard::grpc::convert;
use regionguard::grpc::pb;
use regionguard::policy::{Attribute, embedded_policy, parse_policy};
use regionguard::region::CountryCode;

/// 2026-11-25, a fixed "now": the decision must not depend on when the fuzzer runs.
const NOW_UNIX: u64 = 1_795_564_800;

/// Risk score and verdict laws that hold for any decision with no overrides.
fn check_decision(decision: &Decision) {
    let sum: u32 = decision
        .reasons
        .iter()
        .map(|r| u32::from(r.contribution))
        .sum();
    assert_eq!(u32::from(decision.risk_score), sum.min(100), "{decision:?}");
    if decision.reasons.iter().any(|r| r.hard) {
        assert_eq!(decision.verdict, Verdict::Deny, "{decision:?}");
    }
}

/// Any text either is refused with a message, or is a policy whose compiled tables agree with
/// its own lists: an IP in a listed country is denied for it, one in an unlisted country is not.
pub fn policy_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy = match parse_policy(text, "fuzz") {
        Ok(policy) => policy,
        Err(error) => {
            assert!(!error.to_string().is_empty());
            return;
        }
    };
    let again = parse_policy(text, "fuzz").expect("the same text parses again");
    assert_eq!(
        policy.version(),
        again.version(),
        "versions are deterministic"
    );

    let listed = policy.listed_regions();
    let (account, hints) = (AccountFacts::default(), HintFacts::default());
    for code in ["US", "DE", "IR", "CU", "KP", "RU", "CN", "UA"] {
        let country = CountryCode::parse(code).expect("an assigned code");
        let ip = IpFacts {
            country: Some(country),
            ..IpFacts::default()
        };
        let facts = Facts {
            flow: Flow::ApiRequest,
            now_unix: NOW_UNIX as i64,
            ip: &ip,
            account: &account,
            hints: &hints,
            usage: None,
            overrides: &[],
        };
        let decision = classify(&facts, &policy);
        check_decision(&decision);
        let region_reason = decision.has(ReasonCode::RegionSanctioned)
            || decision.has(ReasonCode::RegionUnsupported);
        let is_listed = listed.iter().any(|(region, list)| {
            !region.is_subdivision()
                && region.country() == country
                && policy.applies(*list, Attribute::Ip)
        });
        assert_eq!(region_reason, is_listed, "{code}: {decision:?}");
    }
}

/// The decision service as a gateway calls it, on the shipped whole-Internet database.
fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let db = GeoDatabase::from_bytes(DbRole::Location, EMBEDDED_LOCATION_DB.to_vec(), "fuzz")
            .expect("the shipped database loads");
        let geo = Geo::new(Some(db), None, None, 1024);
        Engine::new(embedded_policy().expect("the shipped policy"), geo, None)
    })
}

/// Any bytes either fail to decode, are refused naming the field at fault with
/// INVALID_ARGUMENT, or are decided: lawfully, and into a response that encodes and decodes
/// back to itself.
pub fn classify_request(data: &[u8]) {
    let Ok(request) = pb::ClassifyRequest::decode(data) else {
        return;
    };
    let input = match ClassifyInput::try_from(&request) {
        Ok(input) => input,
        Err(error) => {
            assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error}");
            assert!(!error.field().is_empty(), "{error}");
            return;
        }
    };
    let now = UNIX_EPOCH + Duration::from_secs(NOW_UNIX);
    let outcome = engine()
        .classify_now(&input, now)
        .expect("every address resolves, if only to 'unknown'");
    check_decision(&outcome.decision);
    let again = engine().classify_now(&input, now).expect("resolves again");
    assert_eq!(
        outcome.decision, again.decision,
        "decisions are deterministic"
    );

    let response = pb::ClassifyResponse::from(outcome);
    let bytes = response.encode_to_vec();
    let decoded = pb::ClassifyResponse::decode(bytes.as_slice()).expect("our own encoding");
    assert_eq!(response, decoded);
}

/// Any organisation either is refused naming the field at fault, or evaluates to a restricted
/// share within 0..=100 that never shrinks when more regions count as restricted, and that
/// equals the direct owners' stakes when every region counts.
pub fn owner_graph(data: &[u8]) {
    let Ok(organization) = pb::Organization::decode(data) else {
        return;
    };
    let account = pb::Account {
        organization: Some(organization),
        ..Default::default()
    };
    let facts = match convert::account(&account) {
        Ok(facts) => facts,
        Err(error) => {
            assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error}");
            assert!(error.field().starts_with("account.organization"), "{error}");
            return;
        }
    };
    let organization = facts.organization.expect("an organisation was given");
    let none = organization.restricted_share(&|_| false);
    let some = organization.restricted_share(&|r| ["IR", "RU"].contains(&r.country().as_str()));
    let all = organization.restricted_share(&|_| true);
    for share in [&none, &some, &all] {
        assert!((0.0..=100.0).contains(&share.percent), "{share:?}");
    }
    assert_eq!(none.percent, 0.0);
    assert!(none.owners.is_empty());
    // Shares of one entity may sum to 100 % plus a rounding slack, compounded down the chain.
    let slack = 0.5;
    assert!(some.percent <= all.percent + slack, "{some:?} > {all:?}");
    // With every region restricted, direct owners that have a region count with their whole
    // stake; those without one pass on the share of their own owners, which is never more.
    let direct: f64 = organization.owners().iter().map(|o| o.share_percent).sum();
    assert!(
        all.percent <= direct.min(100.0) + slack,
        "{all:?} vs {direct}"
    );
    if organization.owners().iter().all(|o| o.region.is_some()) {
        assert!(
            (all.percent - direct.min(100.0)).abs() < 1e-6,
            "{all:?} vs {direct}"
        );
    }
}
