//! The pure core: `classify(facts, policy) -> Decision`.
//!
//! No IO, no clock, no globals, no tokio/tonic/maxminddb: everything it needs (the time "now"
//! included) arrives as arguments, so the same input always gives the same output. Hard reasons
//! (compliance rules) deny whatever the score; soft reasons add weighted contributions, and the
//! per-flow thresholds turn the score into a verdict.

mod decision;
mod facts;
pub mod hints;
mod overrides;
pub mod ownership;
mod reason;
mod usage;

pub use decision::{Decision, Reason, Verdict};
pub use facts::{
    AccountFacts, AnonymizerFlags, Facts, FleetFacts, Flow, HintFacts, IpFacts, LinkKind,
    OverrideAction, OverrideFact, UsageFacts, Verification, VerificationKind,
};
pub use reason::ReasonCode;

use crate::policy::{Attribute, ListKind, Policy, UnknownLocation};
use crate::region::{CountryCode, RegionCode};

/// Contribution a hard reason reports: it alone takes the score to the top.
const HARD_CONTRIBUTION: u8 = 100;

/// Decides one request.
pub fn classify(facts: &Facts<'_>, policy: &Policy) -> Decision {
    let mut reasons = Vec::new();
    ip_region(facts.ip, policy, &mut reasons);
    account_countries(facts.account, policy, &mut reasons);
    verified_countries(facts.account, policy, &mut reasons);
    ownership(facts.account, policy, &mut reasons);
    anonymizers(facts.ip, policy, &mut reasons);
    country_mismatch(facts, policy, &mut reasons);
    locale_hints(facts.hints, policy, &mut reasons);
    new_account(facts, policy, &mut reasons);
    if let Some(usage) = facts.usage {
        usage::usage_reasons(usage, policy, &mut reasons);
    }
    let unknown = unknown_location(facts.ip, policy, &mut reasons);
    cleared_by_verifications(facts, policy, &mut reasons);
    overrides::clear_allowed_fleets(
        facts.overrides,
        facts.usage.and_then(|u| u.fleet.as_ref()),
        &mut reasons,
    );

    let score: u32 = reasons.iter().map(|r| u32::from(r.contribution)).sum();
    let risk_score = score.min(100) as u8;
    let hard = reasons.iter().any(|r| r.hard);
    let thresholds = policy.thresholds(facts.flow);
    let mut verdict = if hard || risk_score >= thresholds.deny {
        Verdict::Deny
    } else if risk_score >= thresholds.review {
        Verdict::Review
    } else {
        Verdict::Allow
    };
    if unknown == Some(UnknownLocation::Review) {
        verdict = verdict.max(Verdict::Review);
    }
    let verdict = overrides::apply(facts.overrides, policy, &mut reasons, verdict);
    let hard = reasons.iter().any(|r| r.hard);

    // What is still missing for the soft reasons (a cleared one has nothing missing).
    let mut required_verifications: Vec<String> = Vec::new();
    if facts.flow == Flow::Signup && !hard {
        for reason in reasons.iter().filter(|r| !r.hard && !overrides::cleared(r)) {
            for &kind in policy.verifications(reason.code) {
                let name = kind.as_str();
                if !fresh(facts, policy, kind) && !required_verifications.iter().any(|v| v == name)
                {
                    required_verifications.push(name.to_owned());
                }
            }
        }
    }

    Decision {
        verdict,
        risk_score,
        reasons,
        required_verifications,
        policy_version: policy.version().clone(),
    }
}

fn hard(code: ReasonCode, message: String, evidence: Vec<(&'static str, String)>) -> Reason {
    Reason {
        code,
        message,
        contribution: HARD_CONTRIBUTION,
        hard: true,
        evidence,
    }
}

fn soft(
    code: ReasonCode,
    policy: &Policy,
    message: String,
    evidence: Vec<(&'static str, String)>,
) -> Reason {
    Reason {
        code,
        message,
        contribution: policy.weight(code),
        hard: false,
        evidence,
    }
}

/// REGION_SANCTIONED / REGION_UNSUPPORTED from the IP's country or any of its subdivisions.
fn ip_region(ip: &IpFacts, policy: &Policy, out: &mut Vec<Reason>) {
    let Some(country) = ip.country else { return };
    let regions =
        std::iter::once(RegionCode::country_only(country)).chain(ip.subdivisions.iter().copied());
    let mut found: Option<(ListKind, RegionCode)> = None;
    for region in regions {
        if let Some(list) = policy.restriction(region, Attribute::Ip) {
            // Sanctions outrank unsupported; among equals keep the first (the widest region).
            if found.is_none_or(|(kind, _)| {
                kind == ListKind::Unsupported && list == ListKind::Sanctioned
            }) {
                found = Some((list, region));
            }
        }
    }
    if let Some((list, region)) = found {
        let code = match list {
            ListKind::Sanctioned => ReasonCode::RegionSanctioned,
            ListKind::Unsupported => ReasonCode::RegionUnsupported,
        };
        out.push(hard(
            code,
            format!("IP located in {region}, on the {} list", list.as_str()),
            vec![
                ("region", region.to_string()),
                ("list", list.as_str().to_owned()),
            ],
        ));
    }
}

fn account_countries(account: &AccountFacts, policy: &Policy, out: &mut Vec<Reason>) {
    let checks = [
        (
            account.billing_country,
            Attribute::Billing,
            ReasonCode::BillingCountryRestricted,
            "billing_country",
        ),
        (
            account.payment_country,
            Attribute::Payment,
            ReasonCode::PaymentCountryRestricted,
            "payment_country",
        ),
        (
            account.phone_country,
            Attribute::Phone,
            ReasonCode::PhoneCountryRestricted,
            "phone_country",
        ),
        (
            account.declared_country,
            Attribute::Declared,
            ReasonCode::DeclaredCountryRestricted,
            "declared_country",
        ),
    ];
    for (country, attribute, code, field) in checks {
        let Some(country) = country else { continue };
        if let Some(list) = policy.country_restriction(country, attribute) {
            out.push(hard(
                code,
                format!("account {field} {country} is on the {} list", list.as_str()),
                vec![
                    (field, country.to_string()),
                    ("list", list.as_str().to_owned()),
                ],
            ));
        }
    }
}

/// VERIFIED_COUNTRY_RESTRICTED: a verification's country (a phone number's, a document's) on a
/// restricted list, checked as the phone country (PHONE) or the declared country (the others).
fn verified_countries(account: &AccountFacts, policy: &Policy, out: &mut Vec<Reason>) {
    for v in &account.verifications {
        let Some(country) = v.country else { continue };
        let attribute = match v.kind {
            VerificationKind::Phone => Attribute::Phone,
            _ => Attribute::Declared,
        };
        if let Some(list) = policy.country_restriction(country, attribute) {
            out.push(hard(
                ReasonCode::VerifiedCountryRestricted,
                format!(
                    "the account's {} verification is from {country}, on the {} list",
                    v.kind.as_str(),
                    list.as_str()
                ),
                vec![
                    ("kind", v.kind.as_str().to_owned()),
                    ("country", country.to_string()),
                    ("list", list.as_str().to_owned()),
                ],
            ));
            return;
        }
    }
}

/// Whether the account holds a verification of `kind` young enough for the policy (and not
/// dated more than five minutes ahead of now).
fn fresh(facts: &Facts<'_>, policy: &Policy, kind: VerificationKind) -> bool {
    let max_age = policy.verification_max_age_secs(kind);
    facts.account.verifications.iter().any(|v| {
        v.kind == kind
            && v.verified_at_unix <= facts.now_unix + 300
            && facts.now_unix - v.verified_at_unix <= max_age
    })
}

/// A soft reason whose verifications (policy `[verifications]`) are all present and fresh is
/// cleared: it stays in the answer, contributing nothing, with `cleared_by` naming them. Hard
/// reasons are never cleared.
fn cleared_by_verifications(facts: &Facts<'_>, policy: &Policy, reasons: &mut [Reason]) {
    if facts.account.verifications.is_empty() {
        return;
    }
    for reason in reasons.iter_mut().filter(|r| !r.hard) {
        let kinds = policy.verifications(reason.code);
        if !kinds.is_empty() && kinds.iter().all(|&k| fresh(facts, policy, k)) {
            reason.contribution = 0;
            let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
            reason.evidence.push(("cleared_by", names.join(",")));
        }
    }
}

fn ownership(account: &AccountFacts, policy: &Policy, out: &mut Vec<Reason>) {
    let Some(org) = &account.organization else {
        return;
    };
    let hq_list = org
        .headquarters()
        .and_then(|hq| Some((hq, policy.restriction(hq, Attribute::Ownership)?)));
    if let Some((hq, list)) = hq_list {
        out.push(hard(
            ReasonCode::OwnershipRestricted,
            format!(
                "organisation headquartered in {hq}, on the {} list",
                list.as_str()
            ),
            vec![
                ("headquarters_country", hq.to_string()),
                ("list", list.as_str().to_owned()),
            ],
        ));
        return;
    }
    let share =
        org.restricted_share(&|region| policy.restriction(region, Attribute::Ownership).is_some());
    let threshold = policy.ownership_threshold_percent();
    if share.percent > threshold {
        let percent = ownership::share_text(share.percent, threshold);
        out.push(hard(
            ReasonCode::OwnershipRestricted,
            format!(
                "entities in restricted regions effectively own {percent}% (threshold {threshold}%)"
            ),
            vec![
                ("restricted_share_percent", percent),
                ("threshold_percent", threshold.to_string()),
                ("owners", share.owners.join(", ")),
            ],
        ));
    }
}

fn anonymizers(ip: &IpFacts, policy: &Policy, out: &mut Vec<Reason>) {
    let flags = ip.anonymizer;
    let checks = [
        (flags.tor, ReasonCode::AnonymizerTor, "Tor exit node"),
        (flags.vpn, ReasonCode::AnonymizerVpn, "anonymous VPN"),
        (
            flags.public_proxy,
            ReasonCode::AnonymizerPublicProxy,
            "public proxy",
        ),
        (
            flags.residential_proxy,
            ReasonCode::AnonymizerResidentialProxy,
            "residential proxy",
        ),
        (
            flags.hosting,
            ReasonCode::HostingProvider,
            "hosting provider",
        ),
    ];
    for (set, code, what) in checks {
        if set {
            out.push(soft(
                code,
                policy,
                format!("IP is a {what}"),
                vec![("source", "anonymous-ip database".to_owned())],
            ));
        }
    }
}

fn country_mismatch(facts: &Facts<'_>, policy: &Policy, out: &mut Vec<Reason>) {
    let Some(ip_country) = facts.ip.country else {
        return;
    };
    let account = facts.account;
    let fields: [(&'static str, Option<CountryCode>); 4] = [
        ("billing_country", account.billing_country),
        ("payment_country", account.payment_country),
        ("phone_country", account.phone_country),
        ("declared_country", account.declared_country),
    ];
    // Built in place: this reason is raised on a large share of real requests (a traveller, a
    // company paying from its home country), so it is worth sparing the intermediate vectors.
    let mut mismatched = fields
        .into_iter()
        .filter_map(|(field, c)| c.filter(|c| *c != ip_country).map(|c| (field, c)));
    let Some(first) = mismatched.next() else {
        return;
    };
    let mut message = String::with_capacity(80);
    message.push_str("IP country ");
    message.push_str(ip_country.as_str());
    message.push_str(" differs from the account's ");
    let mut evidence = Vec::with_capacity(1 + fields.len());
    evidence.push(("ip_country", ip_country.as_str().to_owned()));
    for (field, country) in std::iter::once(first).chain(mismatched) {
        if evidence.len() > 1 {
            message.push_str(", ");
        }
        message.push_str(field);
        evidence.push((field, country.as_str().to_owned()));
    }
    out.push(soft(ReasonCode::CountryMismatch, policy, message, evidence));
}

fn locale_hints(hints: &HintFacts, policy: &Policy, out: &mut Vec<Reason>) {
    let mut evidence = Vec::new();
    if let Some(country) = hints
        .language_regions
        .iter()
        .find(|c| policy.country_restriction(**c, Attribute::Hints).is_some())
    {
        evidence.push(("accept_language_region", country.to_string()));
    }
    let tz_region = hints.timezone.as_ref().and_then(|tz| {
        let region = policy.timezone_region(tz)?;
        policy
            .restriction(region, Attribute::Hints)
            .map(|_| (tz, region))
    });
    if let Some((tz, region)) = tz_region {
        evidence.push(("timezone", tz.clone()));
        evidence.push(("timezone_region", region.to_string()));
    }
    if !evidence.is_empty() {
        out.push(soft(
            ReasonCode::LocaleHintsRestrictedRegion,
            policy,
            "client language or time zone points to a restricted region".to_owned(),
            evidence,
        ));
    }
}

fn new_account(facts: &Facts<'_>, policy: &Policy, out: &mut Vec<Reason>) {
    let Some(created) = facts.account.created_at_unix else {
        return;
    };
    let age = facts.now_unix.saturating_sub(created);
    // A creation time in the future is bad data, not a new account.
    if (0..policy.new_account_max_age_secs()).contains(&age) {
        let days = age / 86_400;
        out.push(soft(
            ReasonCode::NewAccount,
            policy,
            format!("account is {days} day(s) old"),
            vec![("account_age_seconds", age.to_string())],
        ));
    }
}

fn unknown_location(
    ip: &IpFacts,
    policy: &Policy,
    out: &mut Vec<Reason>,
) -> Option<UnknownLocation> {
    if ip.country.is_some() {
        return None;
    }
    let action = policy.unknown_location();
    let evidence = vec![(
        "unknown_location_action",
        format!("{action:?}").to_lowercase(),
    )];
    let message = "no database knows where this IP is".to_owned();
    out.push(match action {
        UnknownLocation::Deny => hard(ReasonCode::IpLocationUnknown, message, evidence),
        UnknownLocation::Score | UnknownLocation::Review => {
            soft(ReasonCode::IpLocationUnknown, policy, message, evidence)
        }
    });
    Some(action)
}

#[cfg(test)]
mod tests;
