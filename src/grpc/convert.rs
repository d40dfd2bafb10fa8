//! Proto <-> domain translation. Input is parsed once here into checked domain types; any
//! problem names the request field it came from.

use crate::classify::hints::accept_language_regions;
use crate::classify::ownership::{
    MAX_OWNERS, MAX_OWNERSHIP_DEPTH, Organization, Owner, owner_field,
};
use crate::classify::{
    AccountFacts, FleetFacts, Flow, HintFacts, LinkKind, UsageFacts, Verdict, Verification,
    VerificationKind,
};
use crate::engine::{ClassifyInput, DatabaseStatus, Outcome};
use crate::excerpt;
use crate::geo::GeoLookup;
use crate::grpc::status::{bounded, code_name};
use crate::grpc::{ApiError, pb};
use crate::region::{CountryCode, RegionCode};

/// The longest id (account, API key, fingerprint, domain, owner name) accepted, in bytes.
pub const MAX_ID_BYTES: usize = 256;
const MAX_REQUEST_ID_BYTES: usize = 128;
const MAX_HINT_BYTES: usize = 1024;
/// Former ids a caller may name in inline usage (`usage.fleet.former_fleet_ids`).
const MAX_FORMER_FLEET_IDS: usize = 256;
/// Former ids an answer (and so its audit row) lists: the overrides match them all.
const MAX_FORMER_FLEET_IDS_LISTED: usize = 32;

fn check_len(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.len() > max {
        return Err(ApiError::invalid(
            field,
            format!("{} bytes, more than {max}", value.len()),
        ));
    }
    Ok(())
}

/// An id-like string (account, API key, payment fingerprint, organisation domain): trimmed, at
/// most `max` bytes, no control characters (the id is stored, logged and put in headers as it
/// is). `None` when empty. Classify, Usage and the gateway all take ids through here.
pub fn identifier<'a>(
    field: &str,
    value: &'a str,
    max: usize,
) -> Result<Option<&'a str>, ApiError> {
    let value = value.trim();
    check_len(field, value, max)?;
    printable(field, value)?;
    Ok((!value.is_empty()).then_some(value))
}

/// Refuses text with a control character in it, naming the first.
fn printable(field: &str, value: &str) -> Result<(), ApiError> {
    match value.char_indices().find(|(_, c)| c.is_control()) {
        None => Ok(()),
        Some((at, c)) => Err(ApiError::invalid(
            field,
            format!("contains a control character ({c:?} at byte {at})"),
        )),
    }
}

/// An account's creation time in seconds since the Unix epoch: 0 is unknown, and a time before
/// 1970 is refused. Classify and the gateway's header both take it through here.
pub fn created_at(field: &str, seconds: i64) -> Result<Option<i64>, ApiError> {
    match seconds {
        0 => Ok(None),
        t if t < 0 => Err(ApiError::invalid(field, format!("{t} is before 1970"))),
        t => Ok(Some(t)),
    }
}

pub fn parse_ip(field: &str, text: &str) -> Result<std::net::IpAddr, ApiError> {
    if text.is_empty() {
        return Err(ApiError::invalid(field, "required"));
    }
    text.trim().parse().map_err(|_| {
        ApiError::invalid(
            field,
            format!("{:?} is not an IPv4 or IPv6 address", excerpt(text)),
        )
    })
}

fn country(field: &str, text: &str) -> Result<Option<CountryCode>, ApiError> {
    if text.is_empty() {
        return Ok(None);
    }
    CountryCode::parse(text)
        .map(Some)
        .map_err(|e| ApiError::invalid(field, e.to_string()))
}

fn region(field: &str, text: &str) -> Result<Option<RegionCode>, ApiError> {
    if text.is_empty() {
        return Ok(None);
    }
    RegionCode::parse(text)
        .map(Some)
        .map_err(|e| ApiError::invalid(field, e.to_string()))
}

pub fn flow(value: i32) -> Result<Flow, ApiError> {
    match pb::Flow::try_from(value) {
        Ok(pb::Flow::Unspecified | pb::Flow::ApiRequest) => Ok(Flow::ApiRequest),
        Ok(pb::Flow::Signup) => Ok(Flow::Signup),
        Ok(pb::Flow::Login) => Ok(Flow::Login),
        Err(_) => Err(ApiError::invalid("flow", format!("unknown value {value}"))),
    }
}

/// Converts an owner tree, refusing it as soon as it passes the depth or size bounds (before
/// doing the work a huge tree would cost). Field paths are built only for errors.
fn owners(
    owners: &[pb::Owner],
    path: &mut Vec<usize>,
    count: &mut usize,
) -> Result<Vec<Owner>, ApiError> {
    const PATH: &str = "account.organization";
    let field = |path: &[usize], leaf: &str| format!("{PATH}.{}", owner_field(path, leaf));
    if owners.is_empty() {
        return Ok(Vec::new());
    }
    if path.len() >= MAX_OWNERSHIP_DEPTH {
        return Err(ApiError::invalid(
            field(path, "owners"),
            format!("ownership chain deeper than {MAX_OWNERSHIP_DEPTH} levels"),
        ));
    }
    *count += owners.len();
    if *count > MAX_OWNERS {
        return Err(ApiError::invalid(
            field(path, "owners"),
            format!("more than {MAX_OWNERS} owners in one graph"),
        ));
    }
    let mut converted = Vec::with_capacity(owners.len());
    for (i, owner) in owners.iter().enumerate() {
        path.push(i);
        if owner.name.len() > MAX_ID_BYTES {
            return Err(ApiError::invalid(
                field(path, "name"),
                format!("{} bytes, more than {MAX_ID_BYTES}", owner.name.len()),
            ));
        }
        let region = match owner.country.as_str() {
            "" => None,
            text => Some(
                RegionCode::parse(text)
                    .map_err(|e| ApiError::invalid(field(path, "country"), e.to_string()))?,
            ),
        };
        let children = self::owners(&owner.owners, path, count)?;
        path.pop();
        converted.push(Owner {
            name: owner.name.clone(),
            region,
            share_percent: owner.share_percent,
            owners: children,
        });
    }
    Ok(converted)
}

fn organization(org: &pb::Organization) -> Result<Organization, ApiError> {
    const PATH: &str = "account.organization";
    check_len(&format!("{PATH}.name"), &org.name, MAX_ID_BYTES)?;
    let headquarters = region(
        &format!("{PATH}.headquarters_country"),
        &org.headquarters_country,
    )?;
    let owners = owners(&org.owners, &mut Vec::new(), &mut 0)?;
    Organization::new(headquarters, owners)
        .map_err(|e| ApiError::invalid(format!("{PATH}.{}", e.field), e.problem))
}

/// The account's facts. Its ids (account, payment fingerprint, organisation domain) are not
/// facts: `ClassifyInput::try_from` takes them, through [`identifier`].
pub fn account(account: &pb::Account) -> Result<AccountFacts, ApiError> {
    let created_at_unix = created_at("account.created_at_unix", account.created_at_unix)?;
    Ok(AccountFacts {
        billing_country: country("account.billing_country", &account.billing_country)?,
        phone_country: country("account.phone_country", &account.phone_country)?,
        payment_country: country("account.payment_country", &account.payment_country)?,
        declared_country: country("account.declared_country", &account.declared_country)?,
        created_at_unix,
        organization: account
            .organization
            .as_ref()
            .map(organization)
            .transpose()?,
        verifications: verifications(&account.verifications, |i| {
            format!("account.verifications[{i}]")
        })?,
    })
}

/// Verifications an account carries at most.
pub const MAX_VERIFICATIONS: usize = 32;

/// Checked verifications; `path(i)` names the i-th in errors (a proto field, a header).
pub fn verifications(
    list: &[pb::Verification],
    path: impl Fn(usize) -> String,
) -> Result<Vec<Verification>, ApiError> {
    if list.len() > MAX_VERIFICATIONS {
        return Err(ApiError::invalid(
            path(MAX_VERIFICATIONS),
            format!(
                "{} verifications, more than {MAX_VERIFICATIONS}",
                list.len()
            ),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            let kind = VerificationKind::parse(v.kind.trim()).ok_or_else(|| {
                ApiError::invalid(
                    format!("{}.kind", path(i)),
                    format!(
                        "{:?} is not a verification kind ({})",
                        excerpt(&v.kind),
                        VerificationKind::names()
                    ),
                )
            })?;
            let at = format!("{}.verified_at_unix", path(i));
            let verified_at_unix = created_at(&at, v.verified_at_unix)?
                .ok_or_else(|| ApiError::invalid(&at, "required (seconds since the Unix epoch)"))?;
            Ok(Verification {
                kind,
                country: country(&format!("{}.country", path(i)), &v.country)?,
                verified_at_unix,
            })
        })
        .collect()
}

pub fn hints(hints: &pb::ClientHints) -> Result<HintFacts, ApiError> {
    check_len(
        "hints.accept_language",
        &hints.accept_language,
        MAX_HINT_BYTES,
    )?;
    check_len("hints.user_agent", &hints.user_agent, MAX_HINT_BYTES)?;
    let tz = hints.timezone.trim();
    let valid_tz = tz.len() <= 64
        && tz
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b));
    if !valid_tz {
        return Err(ApiError::invalid(
            "hints.timezone",
            format!("{:?} is not an IANA time zone name", excerpt(tz)),
        ));
    }
    Ok(HintFacts {
        language_regions: accept_language_regions(&hints.accept_language),
        timezone: (!tz.is_empty()).then(|| tz.to_owned()),
    })
}

impl TryFrom<&pb::ClassifyRequest> for ClassifyInput {
    type Error = ApiError;

    fn try_from(request: &pb::ClassifyRequest) -> Result<Self, ApiError> {
        check_len("request_id", &request.request_id, MAX_REQUEST_ID_BYTES)?;
        printable("request_id", &request.request_id)?;
        let given = request.account.as_ref();
        let id = |field: &str, value: Option<&String>| -> Result<Option<String>, ApiError> {
            let value = value.map_or("", String::as_str);
            Ok(identifier(field, value, MAX_ID_BYTES)?.map(str::to_owned))
        };
        let account_id = id("account.account_id", given.map(|a| &a.account_id))?;
        let payment_fingerprint = id(
            "account.payment_fingerprint",
            given.map(|a| &a.payment_fingerprint),
        )?;
        let organization_domain = id(
            "account.organization.domain",
            given
                .and_then(|a| a.organization.as_ref())
                .map(|o| &o.domain),
        )?
        .map(|d| d.to_ascii_lowercase());
        Ok(ClassifyInput {
            ip: parse_ip("ip", &request.ip)?,
            flow: flow(request.flow)?,
            account: request
                .account
                .as_ref()
                .map(account)
                .transpose()?
                .unwrap_or_default(),
            hints: request
                .hints
                .as_ref()
                .map(hints)
                .transpose()?
                .unwrap_or_default(),
            usage: request.usage.as_ref().map(usage_facts).transpose()?,
            account_id,
            organization_domain,
            payment_fingerprint,
            request_id: request.request_id.clone(),
        })
    }
}

fn verdict(verdict: Verdict) -> pb::Verdict {
    match verdict {
        Verdict::Allow => pb::Verdict::Allow,
        Verdict::Review => pb::Verdict::Review,
        Verdict::Deny => pb::Verdict::Deny,
    }
}

/// `a.b.c.d/len` written directly (IPv4 is nearly every answer); IPv6 through `Display`.
fn network_text(network: &ipnetwork::IpNetwork) -> String {
    fn push_number(text: &mut String, n: u8) {
        if n >= 100 {
            text.push(char::from(b'0' + n / 100));
        }
        if n >= 10 {
            text.push(char::from(b'0' + n / 10 % 10));
        }
        text.push(char::from(b'0' + n % 10));
    }
    let ipnetwork::IpNetwork::V4(v4) = network else {
        return network.to_string();
    };
    let mut text = String::with_capacity(18);
    for (i, octet) in v4.ip().octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        push_number(&mut text, octet);
    }
    text.push('/');
    push_number(&mut text, v4.prefix());
    text
}

pub fn location(lookup: &GeoLookup, databases: &[DatabaseStatus]) -> pb::Location {
    let record = &lookup.record;
    let text = |c: Option<CountryCode>| c.map(|c| c.as_str().to_owned()).unwrap_or_default();
    let subdivisions: Vec<String> = record
        .facts
        .subdivisions
        .iter()
        .map(ToString::to_string)
        .collect();
    let flags = record.facts.anonymizer;
    pb::Location {
        country: text(record.facts.country),
        subdivision: subdivisions.last().cloned().unwrap_or_default(),
        registered_country: text(record.registered_country),
        asn: record.asn.unwrap_or(0),
        as_org: record.as_org.clone().unwrap_or_default(),
        network: network_text(&lookup.network),
        anonymizer: Some(pb::Anonymizer {
            vpn: flags.vpn,
            tor: flags.tor,
            public_proxy: flags.public_proxy,
            residential_proxy: flags.residential_proxy,
            hosting: flags.hosting,
        }),
        accuracy_radius_km: record.accuracy_radius_km.map_or(0, u32::from),
        subdivisions,
        databases: databases
            .iter()
            .map(|db| pb::DatabaseInfo {
                role: db.meta.role.as_str().to_owned(),
                // Not `to_string`: that goes through the formatter, on every answer.
                database_type: String::from(&*db.meta.database_type),
                build_epoch: db.meta.build_epoch,
                stale: db.stale,
            })
            .collect(),
    }
}

impl From<Outcome> for pb::ClassifyResponse {
    fn from(outcome: Outcome) -> Self {
        let location = location(&outcome.location, &outcome.databases);
        let decision = outcome.decision;
        pb::ClassifyResponse {
            verdict: verdict(decision.verdict).into(),
            risk_score: u32::from(decision.risk_score),
            reasons: decision
                .reasons
                .into_iter()
                .map(|r| pb::Reason {
                    code: r.code.as_str().to_owned(),
                    message: r.message,
                    contribution: i32::from(r.contribution),
                    hard: r.hard,
                    evidence: r
                        .evidence
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                })
                .collect(),
            location: Some(location),
            policy_version: decision.policy_version.as_str().to_owned(),
            decision_id: outcome.decision_id,
            required_verifications: decision.required_verifications,
            request_id: outcome.request_id,
            error: None,
            usage: outcome.usage.as_ref().map(usage_summary),
        }
    }
}

/// Inline usage from a caller, checked.
pub fn usage_facts(usage: &pb::UsageSummary) -> Result<UsageFacts, ApiError> {
    const MAX_REGIONS: usize = 64;
    let baseline = usage.baseline_requests_per_hour;
    if !baseline.is_finite() || baseline < 0.0 {
        return Err(ApiError::invalid(
            "usage.baseline_requests_per_hour",
            format!("{baseline} is not a count"),
        ));
    }
    if usage.regions_7d.len() > MAX_REGIONS {
        return Err(ApiError::invalid(
            "usage.regions_7d",
            format!(
                "{} regions, more than {MAX_REGIONS}",
                usage.regions_7d.len()
            ),
        ));
    }
    let regions_7d = usage
        .regions_7d
        .iter()
        .enumerate()
        .map(|(i, r)| {
            RegionCode::parse(r)
                .map_err(|e| ApiError::invalid(format!("usage.regions_7d[{i}]"), e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    Ok(UsageFacts {
        requests_1h: usage.requests_1h,
        baseline_requests_per_hour: baseline,
        requests_24h: usage.requests_24h,
        anonymized_requests_24h: usage.anonymized_requests_24h,
        distinct_countries_24h: usage.distinct_countries_24h,
        distinct_ips_24h: usage.distinct_ips_24h,
        distinct_networks_24h: usage.distinct_networks_24h,
        distinct_asns_24h: usage.distinct_asns_24h,
        country_switches_24h: usage.country_switches_24h,
        fastest_country_switch_secs: (usage.fastest_country_switch_seconds > 0)
            .then_some(usage.fastest_country_switch_seconds),
        api_keys_24h: usage.api_keys_24h,
        accounts_sharing_payment: usage.accounts_sharing_payment,
        accounts_sharing_network: usage.accounts_sharing_network,
        regions_7d,
        degraded: usage.degraded,
        fleet: usage.fleet.as_ref().map(fleet_facts).transpose()?,
        accounts_sharing_template: usage.accounts_sharing_template,
    })
}

/// An inline `usage.fleet`, checked.
fn fleet_facts(fleet: &pb::FleetSummary) -> Result<FleetFacts, ApiError> {
    let id = identifier("usage.fleet.fleet_id", &fleet.fleet_id, MAX_ID_BYTES)?
        .ok_or_else(|| ApiError::invalid("usage.fleet.fleet_id", "required"))?;
    if fleet.links.len() > LinkKind::ALL.len() {
        return Err(ApiError::invalid(
            "usage.fleet.links",
            format!(
                "{} links, more than the {} kinds",
                fleet.links.len(),
                LinkKind::ALL.len()
            ),
        ));
    }
    let mut links = fleet
        .links
        .iter()
        .enumerate()
        .map(|(i, text)| {
            LinkKind::parse(text).ok_or_else(|| {
                ApiError::invalid(
                    format!("usage.fleet.links[{i}]"),
                    format!("not a link kind ({})", LinkKind::names()),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    links.sort_unstable();
    links.dedup();
    let expected = fleet.expected_coactive_pairs_1h;
    if !expected.is_finite() || expected < 0.0 {
        return Err(ApiError::invalid(
            "usage.fleet.expected_coactive_pairs_1h",
            format!("{expected} is not a count"),
        ));
    }
    if fleet.former_fleet_ids.len() > MAX_FORMER_FLEET_IDS {
        return Err(ApiError::invalid(
            "usage.fleet.former_fleet_ids",
            format!(
                "{} ids, more than {MAX_FORMER_FLEET_IDS}",
                fleet.former_fleet_ids.len()
            ),
        ));
    }
    let mut formerly = Vec::with_capacity(fleet.former_fleet_ids.len());
    for (i, former) in fleet.former_fleet_ids.iter().enumerate() {
        let field = format!("usage.fleet.former_fleet_ids[{i}]");
        let former = identifier(&field, former, MAX_ID_BYTES)?
            .ok_or_else(|| ApiError::invalid(field, "empty"))?;
        formerly.push(former.to_owned());
    }
    formerly.sort_unstable();
    formerly.dedup();
    Ok(FleetFacts {
        id: id.to_owned(),
        formerly,
        size: fleet.size,
        links,
        active_members_1h: fleet.active_members_1h,
        coactive_pairs_1h: fleet.coactive_pairs_1h,
        expected_coactive_pairs_1h: expected,
    })
}

pub fn fleet_summary(fleet: &FleetFacts) -> pb::FleetSummary {
    pb::FleetSummary {
        fleet_id: fleet.id.clone(),
        size: fleet.size,
        links: fleet.links.iter().map(|k| k.as_str().to_owned()).collect(),
        active_members_1h: fleet.active_members_1h,
        coactive_pairs_1h: fleet.coactive_pairs_1h,
        expected_coactive_pairs_1h: fleet.expected_coactive_pairs_1h,
        former_fleet_ids: fleet
            .formerly
            .iter()
            .take(MAX_FORMER_FLEET_IDS_LISTED)
            .cloned()
            .collect(),
    }
}

pub fn usage_summary(usage: &UsageFacts) -> pb::UsageSummary {
    pb::UsageSummary {
        requests_1h: usage.requests_1h,
        baseline_requests_per_hour: usage.baseline_requests_per_hour,
        requests_24h: usage.requests_24h,
        anonymized_requests_24h: usage.anonymized_requests_24h,
        distinct_countries_24h: usage.distinct_countries_24h,
        country_switches_24h: usage.country_switches_24h,
        fastest_country_switch_seconds: usage.fastest_country_switch_secs.unwrap_or(0),
        accounts_sharing_payment: usage.accounts_sharing_payment,
        accounts_sharing_network: usage.accounts_sharing_network,
        regions_7d: usage.regions_7d.iter().map(ToString::to_string).collect(),
        distinct_ips_24h: usage.distinct_ips_24h,
        distinct_networks_24h: usage.distinct_networks_24h,
        distinct_asns_24h: usage.distinct_asns_24h,
        api_keys_24h: usage.api_keys_24h,
        degraded: usage.degraded,
        fleet: usage.fleet.as_ref().map(fleet_summary),
        accounts_sharing_template: usage.accounts_sharing_template,
    }
}

/// A stream response for a request that was rejected: no verdict, the error named.
pub fn rejected(request_id: &str, error: &ApiError) -> pb::ClassifyResponse {
    pb::ClassifyResponse {
        request_id: request_id.to_owned(),
        error: Some(pb::RequestError {
            code: error.code_name().to_owned(),
            field: error.field().to_owned(),
            message: error.message(),
        }),
        ..Default::default()
    }
}

/// A stream response for a request that could not be read (see `ClassifyStream`).
pub fn unreadable(status: &tonic::Status) -> pb::ClassifyResponse {
    pb::ClassifyResponse {
        error: Some(pb::RequestError {
            code: code_name(status.code()).to_owned(),
            field: "request".to_owned(),
            message: bounded(status.message()).into_owned(),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn network_text_is_display(addr in any::<u32>(), prefix in 0u8..=32) {
            let v4 = ipnetwork::Ipv4Network::new(std::net::Ipv4Addr::from(addr), prefix).unwrap();
            let network = ipnetwork::IpNetwork::V4(v4);
            prop_assert_eq!(super::network_text(&network), network.to_string());
        }
    }

    #[test]
    fn ids_with_control_characters_are_refused_naming_the_field() {
        let with = |account: pb::Account, request_id: &str| pb::ClassifyRequest {
            ip: "1.2.3.4".into(),
            account: Some(account),
            request_id: request_id.into(),
            ..Default::default()
        };
        let refused = |request: pb::ClassifyRequest| {
            let error = ClassifyInput::try_from(&request).unwrap_err();
            assert!(error.message().contains("control character"), "{error}");
            error.field().to_owned()
        };
        let id = |account_id: &str| pb::Account {
            account_id: account_id.into(),
            ..Default::default()
        };
        assert_eq!(refused(with(id("a\u{0}b"), "")), "account.account_id");
        assert_eq!(refused(with(id("a"), "r\n1")), "request_id");
        let domain = pb::Account {
            organization: Some(pb::Organization {
                domain: "ex\tample.com".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(refused(with(domain, "")), "account.organization.domain");
        // Surrounding whitespace is trimmed, not refused; the domain is lower-cased.
        let fine = pb::Account {
            account_id: " acct-1\n".into(),
            organization: Some(pb::Organization {
                domain: "Example.COM".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let input = ClassifyInput::try_from(&with(fine, "r-1")).unwrap();
        assert_eq!(input.account_id.as_deref(), Some("acct-1"));
        assert_eq!(input.organization_domain.as_deref(), Some("example.com"));
        assert_eq!(
            created_at("account.created_at_unix", -5)
                .unwrap_err()
                .message(),
            "account.created_at_unix: -5 is before 1970"
        );
    }

    fn arb_text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[A-Za-z]{2}",
            "[A-Za-z]{2}-[0-9A-Z]{1,4}",
            "\\PC{0,40}"
        ]
    }

    fn arb_owner() -> impl Strategy<Value = pb::Owner> {
        let leaf =
            (arb_text(), arb_text(), any::<f64>()).prop_map(|(name, country, share_percent)| {
                pb::Owner {
                    name,
                    country,
                    share_percent,
                    owners: vec![],
                }
            });
        leaf.prop_recursive(20, 200, 4, |inner| {
            (
                arb_text(),
                arb_text(),
                -10.0..110.0f64,
                prop::collection::vec(inner, 0..4),
            )
                .prop_map(|(name, country, share_percent, owners)| pb::Owner {
                    name,
                    country,
                    share_percent,
                    owners,
                })
        })
    }

    prop_compose! {
        fn arb_request()(ip in prop_oneof!["\\PC{0,45}", "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}", "::ffff:[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}"],
                         flow in -2..6i32,
                         billing in arb_text(), phone in arb_text(), declared in arb_text(),
                         created in any::<i64>(),
                         owners in prop::collection::vec(arb_owner(), 0..4),
                         accept_language in "\\PC{0,60}", timezone in "\\PC{0,30}",
                         regions in prop::collection::vec(arb_text(), 0..4),
                         baseline in any::<f64>()) -> pb::ClassifyRequest {
            pb::ClassifyRequest {
                ip,
                flow,
                account: Some(pb::Account {
                    billing_country: billing,
                    phone_country: phone,
                    declared_country: declared,
                    created_at_unix: created,
                    organization: Some(pb::Organization { owners, ..Default::default() }),
                    ..Default::default()
                }),
                hints: Some(pb::ClientHints { accept_language, timezone, ..Default::default() }),
                usage: Some(pb::UsageSummary { regions_7d: regions, baseline_requests_per_hour: baseline, ..Default::default() }),
                ..Default::default()
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        /// Request conversion is total: any request converts or is refused naming a field, and
        /// an accepted owner graph evaluates to a share within 0..=100.
        #[test]
        fn any_request_converts_or_names_a_field(request in arb_request()) {
            match ClassifyInput::try_from(&request) {
                Ok(input) => {
                    if let Some(org) = &input.account.organization {
                        let share = org.restricted_share(&|r| r.country().as_str() == "IR").percent;
                        prop_assert!((0.0..=100.0).contains(&share));
                    }
                }
                Err(error) => {
                    prop_assert_eq!(error.code(), tonic::Code::InvalidArgument);
                    prop_assert!(!error.field().is_empty(), "{}", error);
                }
            }
        }
    }
}
