//! Unit and property tests of the classifier's laws, on the embedded default policy.

use super::ownership::{Organization, Owner};
use super::*;
use crate::policy::{Policy, embedded_policy};
use proptest::prelude::*;

const NOW: i64 = 1_790_000_000;

fn policy() -> Policy {
    embedded_policy().unwrap()
}

fn country(s: &str) -> CountryCode {
    CountryCode::parse(s).unwrap()
}

fn ip_in(code: &str) -> IpFacts {
    let region = RegionCode::parse(code).unwrap();
    IpFacts {
        country: Some(region.country()),
        subdivisions: if region.is_subdivision() {
            vec![region]
        } else {
            vec![]
        },
        anonymizer: AnonymizerFlags::default(),
    }
}

fn decide(ip: &IpFacts, account: &AccountFacts, hints: &HintFacts, flow: Flow) -> Decision {
    classify(
        &Facts {
            flow,
            now_unix: NOW,
            ip,
            account,
            hints,
            usage: None,
            overrides: &[],
        },
        &policy(),
    )
}

fn codes(d: &Decision) -> Vec<&'static str> {
    d.reasons.iter().map(|r| r.code.as_str()).collect()
}

#[test]
fn ordinary_request_is_allowed_with_no_reasons() {
    let d = decide(
        &ip_in("DE"),
        &AccountFacts::default(),
        &HintFacts::default(),
        Flow::ApiRequest,
    );
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(d.risk_score, 0);
    assert!(d.reasons.is_empty());
}

#[test]
fn sanctioned_and_unsupported_ips_deny() {
    let d = decide(
        &ip_in("IR"),
        &AccountFacts::default(),
        &HintFacts::default(),
        Flow::ApiRequest,
    );
    assert_eq!(
        (d.verdict, codes(&d)),
        (Verdict::Deny, vec!["REGION_SANCTIONED"])
    );
    let d = decide(
        &ip_in("CN"),
        &AccountFacts::default(),
        &HintFacts::default(),
        Flow::ApiRequest,
    );
    assert_eq!(
        (d.verdict, codes(&d)),
        (Verdict::Deny, vec!["REGION_UNSUPPORTED"])
    );
}

#[test]
fn subdivision_rules_apply_only_to_the_subdivision() {
    let d = decide(
        &ip_in("UA-43"),
        &AccountFacts::default(),
        &HintFacts::default(),
        Flow::ApiRequest,
    );
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.reasons[0].evidence[0], ("region", "UA-43".to_owned()));
    let d = decide(
        &ip_in("UA-30"),
        &AccountFacts::default(),
        &HintFacts::default(),
        Flow::ApiRequest,
    );
    assert_eq!(d.verdict, Verdict::Allow);
}

#[test]
fn account_countries_are_hard_rules() {
    let account = AccountFacts {
        billing_country: Some(country("CU")),
        phone_country: Some(country("KP")),
        ..Default::default()
    };
    let d = decide(
        &ip_in("DE"),
        &account,
        &HintFacts::default(),
        Flow::ApiRequest,
    );
    assert_eq!(d.verdict, Verdict::Deny);
    assert!(
        d.has(ReasonCode::BillingCountryRestricted) && d.has(ReasonCode::PhoneCountryRestricted)
    );
    assert!(d.has(ReasonCode::CountryMismatch));
    // Phone is not on the unsupported list's attributes.
    let account = AccountFacts {
        phone_country: Some(country("CN")),
        ..Default::default()
    };
    let d = decide(
        &ip_in("CN"),
        &account,
        &HintFacts::default(),
        Flow::ApiRequest,
    );
    assert!(!d.has(ReasonCode::PhoneCountryRestricted));
}

#[test]
fn tor_alone_reviews_vpn_or_hosting_alone_do_not() {
    for flow in Flow::ALL {
        let mut ip = ip_in("DE");
        ip.anonymizer.tor = true;
        assert_eq!(
            decide(&ip, &AccountFacts::default(), &HintFacts::default(), flow).verdict,
            Verdict::Review,
            "{flow:?}"
        );
        let mut ip = ip_in("DE");
        ip.anonymizer.vpn = true;
        assert_eq!(
            decide(&ip, &AccountFacts::default(), &HintFacts::default(), flow).verdict,
            Verdict::Allow,
            "{flow:?}"
        );
        let mut ip = ip_in("DE");
        ip.anonymizer.hosting = true;
        assert_eq!(
            decide(&ip, &AccountFacts::default(), &HintFacts::default(), flow).verdict,
            Verdict::Allow,
            "{flow:?}"
        );
    }
}

#[test]
fn ownership_above_threshold_denies() {
    let owners = vec![Owner {
        name: "Holding".into(),
        region: Some(RegionCode::parse("AE").unwrap()),
        share_percent: 80.0,
        owners: vec![Owner {
            name: "Parent".into(),
            region: Some(RegionCode::parse("IR").unwrap()),
            share_percent: 70.0,
            owners: vec![],
        }],
    }];
    let account = AccountFacts {
        organization: Some(Organization::new(None, owners.clone()).unwrap()),
        ..Default::default()
    };
    let d = decide(
        &ip_in("DE"),
        &account,
        &HintFacts::default(),
        Flow::ApiRequest,
    );
    assert_eq!(d.verdict, Verdict::Deny, "56% > 50%");
    let reason = d
        .reasons
        .iter()
        .find(|r| r.code == ReasonCode::OwnershipRestricted)
        .unwrap();
    assert!(
        reason
            .evidence
            .contains(&("restricted_share_percent", "56.00".into()))
    );

    let mut half = owners;
    half[0].share_percent = 50.0; // 35%
    let account = AccountFacts {
        organization: Some(Organization::new(None, half).unwrap()),
        ..Default::default()
    };
    assert_eq!(
        decide(
            &ip_in("DE"),
            &account,
            &HintFacts::default(),
            Flow::ApiRequest
        )
        .verdict,
        Verdict::Allow
    );

    let hq = Organization::new(Some(RegionCode::parse("UA-43").unwrap()), vec![]).unwrap();
    let account = AccountFacts {
        organization: Some(hq),
        ..Default::default()
    };
    assert!(
        decide(
            &ip_in("DE"),
            &account,
            &HintFacts::default(),
            Flow::ApiRequest
        )
        .has(ReasonCode::OwnershipRestricted)
    );
}

#[test]
fn signup_gets_verifications_unless_hard_denied() {
    let mut ip = ip_in("DE");
    ip.anonymizer.vpn = true;
    let account = AccountFacts {
        billing_country: Some(country("FR")),
        ..Default::default()
    };
    let d = decide(&ip, &account, &HintFacts::default(), Flow::Signup);
    assert_eq!(
        d.verdict,
        Verdict::Review,
        "VPN 20 + mismatch 20 = 40 reaches signup review"
    );
    assert_eq!(
        d.required_verifications,
        vec!["PHONE".to_owned(), "ID_DOCUMENT".to_owned()]
    );
    assert!(
        decide(&ip, &account, &HintFacts::default(), Flow::ApiRequest)
            .required_verifications
            .is_empty()
    );

    let mut ip = ip_in("IR");
    ip.anonymizer.vpn = true;
    let d = decide(
        &ip,
        &AccountFacts::default(),
        &HintFacts::default(),
        Flow::Signup,
    );
    assert_eq!(d.verdict, Verdict::Deny);
    assert!(d.required_verifications.is_empty());
}

#[test]
fn locale_hints_and_new_accounts_are_soft() {
    let hints = HintFacts {
        language_regions: vec![country("IR")],
        timezone: Some("Asia/Tehran".into()),
    };
    let d = decide(
        &ip_in("DE"),
        &AccountFacts::default(),
        &hints,
        Flow::ApiRequest,
    );
    assert_eq!(codes(&d), vec!["LOCALE_HINTS_RESTRICTED_REGION"]);
    assert_eq!(d.verdict, Verdict::Allow);
    let account = AccountFacts {
        created_at_unix: Some(NOW - 3600),
        ..Default::default()
    };
    let d = decide(
        &ip_in("DE"),
        &account,
        &HintFacts::default(),
        Flow::ApiRequest,
    );
    assert_eq!(codes(&d), vec!["NEW_ACCOUNT"]);
    let account = AccountFacts {
        created_at_unix: Some(NOW - 30 * 86_400),
        ..Default::default()
    };
    assert!(
        decide(
            &ip_in("DE"),
            &account,
            &HintFacts::default(),
            Flow::ApiRequest
        )
        .reasons
        .is_empty()
    );
}

#[test]
fn unknown_location_follows_the_policy() {
    let d = decide(
        &IpFacts::default(),
        &AccountFacts::default(),
        &HintFacts::default(),
        Flow::ApiRequest,
    );
    assert_eq!(codes(&d), vec!["IP_LOCATION_UNKNOWN"]);
    assert_eq!(d.verdict, Verdict::Allow);
    for (action, verdict) in [("review", Verdict::Review), ("deny", Verdict::Deny)] {
        let text = crate::policy::EMBEDDED_POLICY
            .replace("action = \"score\"", &format!("action = \"{action}\""));
        let policy = crate::policy::parse_policy(&text, "t").unwrap();
        let facts = Facts {
            flow: Flow::ApiRequest,
            now_unix: NOW,
            ip: &IpFacts::default(),
            account: &AccountFacts::default(),
            hints: &HintFacts::default(),
            usage: None,
            overrides: &[],
        };
        assert_eq!(classify(&facts, &policy).verdict, verdict, "{action}");
    }
}

fn arb_country() -> impl Strategy<Value = Option<CountryCode>> {
    prop::option::of(
        prop::sample::select(vec!["DE", "US", "FR", "IR", "CU", "CN", "RU", "UA", "GB"])
            .prop_map(country),
    )
}

prop_compose! {
    fn arb_ip()(country in arb_country(), sub in prop::option::of(prop::sample::select(vec!["43", "30", "14"])),
                flags in prop::array::uniform5(any::<bool>())) -> IpFacts {
        let subdivisions = match (country, sub) {
            (Some(c), Some(s)) => vec![RegionCode::subdivision(c, s).unwrap()],
            _ => vec![],
        };
        let [vpn, tor, public_proxy, residential_proxy, hosting] = flags;
        IpFacts { country, subdivisions, anonymizer: AnonymizerFlags { vpn, tor, public_proxy, residential_proxy, hosting } }
    }
}

prop_compose! {
    fn arb_account()(billing in arb_country(), phone in arb_country(), payment in arb_country(), declared in arb_country(),
                     created in prop::option::of(NOW - 60 * 86_400..NOW + 86_400)) -> AccountFacts {
        AccountFacts { billing_country: billing, phone_country: phone, payment_country: payment, declared_country: declared, created_at_unix: created, organization: None, verifications: Vec::new() }
    }
}

fn arb_flow() -> impl Strategy<Value = Flow> {
    prop::sample::select(Flow::ALL.to_vec())
}

proptest! {
    #[test]
    fn hard_reasons_deny_and_the_verdict_follows_the_score(ip in arb_ip(), account in arb_account(), flow in arb_flow()) {
        let d = decide(&ip, &account, &HintFacts::default(), flow);
        let t = policy().thresholds(flow);
        let sum: u32 = d.reasons.iter().map(|r| u32::from(r.contribution)).sum();
        prop_assert_eq!(u32::from(d.risk_score), sum.min(100));
        if d.reasons.iter().any(|r| r.hard) {
            prop_assert_eq!(d.verdict, Verdict::Deny);
        } else {
            // Default policy: unknown location only scores, so the thresholds alone decide.
            let expected = if d.risk_score >= t.deny { Verdict::Deny } else if d.risk_score >= t.review { Verdict::Review } else { Verdict::Allow };
            prop_assert_eq!(d.verdict, expected);
        }
    }

    #[test]
    fn knowing_less_about_the_account_never_adds_a_reason(ip in arb_ip(), account in arb_account(), flow in arb_flow()) {
        let hints = HintFacts::default();
        let full = decide(&ip, &account, &hints, flow);
        let bare = decide(&ip, &AccountFacts::default(), &hints, flow);
        for reason in &bare.reasons {
            prop_assert!(full.has(reason.code), "{} appeared without account facts", reason.code);
        }
        prop_assert!(bare.risk_score <= full.risk_score);
        prop_assert_eq!(decide(&ip, &account, &hints, flow), full, "same input, same output");
    }

    #[test]
    fn adding_a_hard_reason_never_lowers_the_verdict(ip in arb_ip(), account in arb_account(), flow in arb_flow()) {
        let hints = HintFacts::default();
        let before = decide(&ip, &account, &hints, flow);
        let with_billing = AccountFacts { billing_country: Some(country("IR")), ..account.clone() };
        let after = decide(&ip, &with_billing, &hints, flow);
        prop_assert!(after.verdict >= before.verdict);
        prop_assert_eq!(after.verdict, Verdict::Deny);
    }

    #[test]
    fn adding_an_anonymizer_never_lowers_verdict_or_score(ip in arb_ip(), account in arb_account(), flow in arb_flow()) {
        let hints = HintFacts::default();
        let before = decide(&ip, &account, &hints, flow);
        let mut more = ip.clone();
        more.anonymizer.tor = true;
        let after = decide(&more, &account, &hints, flow);
        prop_assert!(after.verdict >= before.verdict);
        prop_assert!(after.risk_score >= before.risk_score);
    }
}

fn an_override(action: OverrideAction) -> OverrideFact {
    OverrideFact {
        id: "ovr-1".into(),
        action,
        scope: "account:a".into(),
        reviewer: "alice".into(),
        reason: "KYC passed".into(),
        expires_at_ms: None,
    }
}

fn decide_with(
    ip: &IpFacts,
    account: &AccountFacts,
    overrides: &[OverrideFact],
    policy: &Policy,
) -> Decision {
    let hints = HintFacts::default();
    classify(
        &Facts {
            flow: Flow::ApiRequest,
            now_unix: NOW,
            ip,
            account,
            hints: &hints,
            usage: None,
            overrides,
        },
        policy,
    )
}

#[test]
fn overrides_deny_and_allow_within_the_policy() {
    let p = policy();
    let deny = decide_with(
        &ip_in("DE"),
        &AccountFacts::default(),
        &[an_override(OverrideAction::Deny)],
        &p,
    );
    assert_eq!(
        (deny.verdict, codes(&deny)),
        (Verdict::Deny, vec!["OVERRIDE_DENY"])
    );

    let allow = [an_override(OverrideAction::Allow)];
    let unsupported = decide_with(&ip_in("CN"), &AccountFacts::default(), &allow, &p);
    assert_eq!(
        unsupported.verdict,
        Verdict::Allow,
        "an unsupported region is lifted"
    );
    assert!(
        unsupported
            .reasons
            .iter()
            .any(|r| r.code == ReasonCode::OverrideAllow
                && r.evidence.contains(&("applied", "true".into())))
    );

    let mut tor = ip_in("DE");
    tor.anonymizer.tor = true;
    assert_eq!(
        decide_with(&tor, &AccountFacts::default(), &allow, &p).verdict,
        Verdict::Allow,
        "a score-based REVIEW is lifted"
    );

    let sanctioned = decide_with(&ip_in("IR"), &AccountFacts::default(), &allow, &p);
    assert_eq!(
        sanctioned.verdict,
        Verdict::Deny,
        "sanctions are not lifted by default"
    );
    assert!(
        sanctioned
            .reasons
            .iter()
            .any(|r| r.code == ReasonCode::OverrideAllow
                && r.evidence.contains(&("applied", "false".into())))
    );
    let billing = AccountFacts {
        billing_country: Some(country("CU")),
        ..Default::default()
    };
    assert_eq!(
        decide_with(&ip_in("DE"), &billing, &allow, &p).verdict,
        Verdict::Deny
    );

    let lenient = crate::policy::parse_policy(
        &crate::policy::EMBEDDED_POLICY
            .replace("may_lift_sanctions = false", "may_lift_sanctions = true"),
        "t",
    )
    .unwrap();
    assert_eq!(
        decide_with(&ip_in("IR"), &AccountFacts::default(), &allow, &lenient).verdict,
        Verdict::Allow
    );
}

#[test]
fn a_fleet_allow_clears_the_fleets_reasons_and_nothing_else() {
    let p = policy();
    let usage = UsageFacts {
        fleet: Some(FleetFacts {
            id: "fl_00112233445566ff".into(),
            formerly: vec!["fl_0000000000000001".into()],
            size: 40,
            links: vec![LinkKind::PaymentFingerprint],
            active_members_1h: 0,
            coactive_pairs_1h: 0,
            expected_coactive_pairs_1h: 0.0,
        }),
        ..Default::default()
    };
    let fleet_override = |action, fleet: &str| OverrideFact {
        scope: format!("fleet:{fleet}"),
        ..an_override(action)
    };
    let decide = |ip: &IpFacts, overrides: &[OverrideFact]| {
        let (account, hints) = (AccountFacts::default(), HintFacts::default());
        classify(
            &Facts {
                flow: Flow::Signup,
                now_unix: NOW,
                ip,
                account: &account,
                hints: &hints,
                usage: Some(&usage),
                overrides,
            },
            &p,
        )
    };
    let plain = decide(&ip_in("DE"), &[]);
    assert_eq!(plain.verdict, Verdict::Review, "{plain:?}");

    let allowed = decide(
        &ip_in("DE"),
        &[fleet_override(OverrideAction::Allow, "fl_00112233445566ff")],
    );
    assert_eq!(allowed.verdict, Verdict::Allow, "{allowed:?}");
    assert_eq!(allowed.risk_score, 0);
    let fleet = allowed
        .reasons
        .iter()
        .find(|r| r.code == ReasonCode::UsageFleet)
        .expect("the cleared reason stays in the answer");
    assert_eq!(fleet.contribution, 0);
    assert!(
        fleet
            .evidence
            .contains(&("cleared_by", "override:ovr-1".into()))
    );
    assert!(allowed.reasons.iter().any(|r| {
        r.code == ReasonCode::OverrideAllow
            && r.evidence.contains(&("applied", "true".into()))
            && r.evidence
                .contains(&("scope", "fleet:fl_00112233445566ff".into()))
    }));
    assert!(allowed.required_verifications.is_empty(), "{allowed:?}");

    // The other reasons stand, scored as usual: a fleet ALLOW is not an account ALLOW.
    let mut tor = ip_in("DE");
    tor.anonymizer.tor = true;
    let anonymous = decide(
        &tor,
        &[fleet_override(OverrideAction::Allow, "fl_00112233445566ff")],
    );
    assert_ne!(anonymous.verdict, Verdict::Allow, "{anonymous:?}");
    assert_eq!(
        decide(
            &ip_in("IR"),
            &[fleet_override(OverrideAction::Allow, "fl_00112233445566ff")]
        )
        .verdict,
        Verdict::Deny
    );
    // An ALLOW on an id the fleet had before does not hold: another fleet that linked into
    // the allowed one would take its ALLOW along.
    let former = decide(
        &ip_in("DE"),
        &[fleet_override(OverrideAction::Allow, "fl_0000000000000001")],
    );
    assert_eq!(former.verdict, Verdict::Review, "{former:?}");
    // Another fleet's ALLOW clears nothing; a DENY wins over an ALLOW.
    let other = decide(
        &ip_in("DE"),
        &[fleet_override(OverrideAction::Allow, "fl_ffffffffffffffff")],
    );
    assert_eq!(other.verdict, Verdict::Review);
    assert!(
        other
            .reasons
            .iter()
            .any(|r| r.code == ReasonCode::OverrideAllow
                && r.evidence.contains(&("applied", "false".into())))
    );
    let both = decide(
        &ip_in("DE"),
        &[
            fleet_override(OverrideAction::Allow, "fl_00112233445566ff"),
            an_override(OverrideAction::Deny),
        ],
    );
    assert_eq!(both.verdict, Verdict::Deny);
}

fn verified(kind: VerificationKind, country_code: Option<&str>, days_ago: i64) -> Verification {
    Verification {
        kind,
        country: country_code.map(country),
        verified_at_unix: NOW - days_ago * 86_400,
    }
}

/// A Tor signup: ANONYMIZER_TOR (50) asks for PHONE and ID_DOCUMENT.
fn tor_signup(verifications: Vec<Verification>) -> Decision {
    let mut ip = ip_in("DE");
    ip.anonymizer.tor = true;
    let account = AccountFacts {
        verifications,
        ..AccountFacts::default()
    };
    decide(&ip, &account, &HintFacts::default(), Flow::Signup)
}

#[test]
fn a_reason_is_cleared_only_by_all_its_verifications_fresh() {
    use VerificationKind::{Email, IdDocument, Phone};
    let asked = tor_signup(vec![]);
    assert_eq!(asked.verdict, Verdict::Review);
    assert_eq!(asked.required_verifications, ["PHONE", "ID_DOCUMENT"]);
    // One of two: still asked for the other, still counted.
    let half = tor_signup(vec![verified(Phone, Some("DE"), 3)]);
    assert_eq!(half.verdict, Verdict::Review);
    assert_eq!(half.required_verifications, ["ID_DOCUMENT"]);
    assert_eq!(half.reasons[0].contribution, 50);
    // Both, fresh: cleared, kept in the answer with what cleared it; nothing more to ask.
    let both = tor_signup(vec![
        verified(Email, None, 1),
        verified(Phone, Some("DE"), 3),
        verified(IdDocument, Some("DE"), 300),
    ]);
    assert_eq!((both.verdict, both.risk_score), (Verdict::Allow, 0));
    assert_eq!(codes(&both), ["ANONYMIZER_TOR"]);
    assert_eq!(both.reasons[0].contribution, 0);
    assert!(
        both.reasons[0]
            .evidence
            .contains(&("cleared_by", "PHONE,ID_DOCUMENT".into()))
    );
    assert!(both.required_verifications.is_empty());
    // Expired (over the default 365 days) or from the future: asked again.
    let old = tor_signup(vec![
        verified(Phone, None, 3),
        verified(IdDocument, None, 400),
    ]);
    assert_eq!(old.verdict, Verdict::Review);
    assert_eq!(old.required_verifications, ["ID_DOCUMENT"]);
    let ahead = tor_signup(vec![
        verified(Phone, None, 3),
        verified(IdDocument, None, -1),
    ]);
    assert_eq!(ahead.required_verifications, ["ID_DOCUMENT"]);
}

#[test]
fn a_verification_from_a_restricted_country_denies_and_hard_rules_are_never_cleared() {
    use VerificationKind::{IdDocument, Phone};
    let d = tor_signup(vec![
        verified(Phone, Some("DE"), 3),
        verified(IdDocument, Some("IR"), 3),
    ]);
    assert_eq!(d.verdict, Verdict::Deny);
    let restricted = d
        .reasons
        .iter()
        .find(|r| r.code == ReasonCode::VerifiedCountryRestricted)
        .expect("its own reason code");
    assert!(restricted.hard);
    assert!(
        restricted
            .evidence
            .contains(&("kind", "ID_DOCUMENT".into()))
    );
    assert!(
        d.required_verifications.is_empty(),
        "nothing to ask once denied"
    );
    // A sanctioned IP is not cleared by any verification.
    let account = AccountFacts {
        verifications: vec![
            verified(Phone, Some("DE"), 1),
            verified(IdDocument, Some("DE"), 1),
        ],
        ..AccountFacts::default()
    };
    let d = decide(&ip_in("IR"), &account, &HintFacts::default(), Flow::Signup);
    assert_eq!(d.verdict, Verdict::Deny);
    assert!(d.reasons.iter().all(|r| r.contribution == 100));
}

#[test]
fn a_payment_verification_expires_sooner_by_policy() {
    assert_eq!(
        policy().verification_max_age_secs(VerificationKind::PaymentVerification),
        180 * 86_400
    );
    assert_eq!(
        policy().verification_max_age_secs(VerificationKind::Phone),
        365 * 86_400
    );
}
