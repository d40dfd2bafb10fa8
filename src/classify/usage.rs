//! Usage-history reasons: what an account's recent use shows beyond one request's address.
//!
//! Pure like the rest of the core: the aggregates arrive in [`UsageFacts`], the thresholds in
//! the policy's `[usage]` table.

use super::{Reason, ReasonCode, UsageFacts, soft};
use crate::policy::{Attribute, Policy};

pub(super) fn usage_reasons(usage: &UsageFacts, policy: &Policy, out: &mut Vec<Reason>) {
    let rules = policy.usage();
    let mut push = |code, message: String, evidence: Vec<(&'static str, String)>| {
        out.push(soft(code, policy, message, evidence))
    };

    if usage.distinct_countries_24h >= rules.country_hopping_min_countries {
        push(
            ReasonCode::UsageCountryHopping,
            format!(
                "used from {} countries in 24 hours",
                usage.distinct_countries_24h
            ),
            vec![
                (
                    "distinct_countries_24h",
                    usage.distinct_countries_24h.to_string(),
                ),
                (
                    "country_switches_24h",
                    usage.country_switches_24h.to_string(),
                ),
            ],
        );
    }
    if let Some(gap) = usage
        .fastest_country_switch_secs
        .filter(|gap| *gap < rules.impossible_travel_max_secs)
    {
        push(
            ReasonCode::UsageImpossibleTravel,
            format!("switched countries within {} minutes", gap / 60),
            vec![
                ("fastest_country_switch_seconds", gap.to_string()),
                ("max_seconds", rules.impossible_travel_max_secs.to_string()),
            ],
        );
    }
    if usage.requests_24h >= rules.anonymizer_share_min_requests && usage.requests_24h > 0 {
        let share = usage.anonymized_requests_24h.min(usage.requests_24h) as f64
            / usage.requests_24h as f64;
        if share >= rules.anonymizer_share_min {
            push(
                ReasonCode::UsageAnonymizerShare,
                format!(
                    "{:.0}% of 24-hour requests via anonymizers or hosting",
                    share * 100.0
                ),
                vec![
                    (
                        "anonymized_requests_24h",
                        usage.anonymized_requests_24h.to_string(),
                    ),
                    ("requests_24h", usage.requests_24h.to_string()),
                ],
            );
        }
    }
    // A new account's baseline is taken as at least one request an hour.
    let baseline = usage.baseline_requests_per_hour.max(1.0);
    if usage.requests_1h >= rules.volume_spike_min_requests
        && usage.requests_1h as f64 >= rules.volume_spike_factor * baseline
    {
        push(
            ReasonCode::UsageVolumeSpike,
            format!(
                "{} requests in the last hour against a baseline of {baseline:.1} an hour",
                usage.requests_1h
            ),
            vec![
                ("requests_1h", usage.requests_1h.to_string()),
                ("baseline_requests_per_hour", format!("{baseline:.1}")),
            ],
        );
    }
    if usage.accounts_sharing_payment >= rules.shared_payment_min_accounts {
        push(
            ReasonCode::UsageSharedPayment,
            format!(
                "payment fingerprint used by {} accounts",
                usage.accounts_sharing_payment
            ),
            vec![(
                "accounts_sharing_payment",
                usage.accounts_sharing_payment.to_string(),
            )],
        );
    }
    if usage.accounts_sharing_network >= rules.shared_network_min_accounts {
        push(
            ReasonCode::UsageSharedNetwork,
            format!(
                "{} accounts on this network in 24 hours",
                usage.accounts_sharing_network
            ),
            vec![(
                "accounts_sharing_network",
                usage.accounts_sharing_network.to_string(),
            )],
        );
    }
    let restricted: Vec<String> = usage
        .regions_7d
        .iter()
        .filter(|r| policy.restriction(**r, Attribute::Ip).is_some())
        .map(ToString::to_string)
        .collect();
    if !restricted.is_empty() {
        push(
            ReasonCode::UsageRestrictedRegionHistory,
            format!("used from {} in the last 7 days", restricted.join(", ")),
            vec![("regions_7d", restricted.join(","))],
        );
    }
    fleet_reasons(usage, policy, out);
}

/// Chance gives this many standard deviations above its expectation rarely enough (about one
/// fleet-hour in a thousand under Poisson) for USAGE_COORDINATED_ACTIVITY.
const COORDINATION_MIN_Z: f64 = 3.0;

fn fleet_reasons(usage: &UsageFacts, policy: &Policy, out: &mut Vec<Reason>) {
    let rules = policy.fleets();
    if let Some(fleet) = &usage.fleet {
        let links = fleet
            .links
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let evidence = |extra: Vec<(&'static str, String)>| {
            let mut evidence = vec![
                ("fleet_id", fleet.id.clone()),
                ("size", fleet.size.to_string()),
                ("links", links.clone()),
            ];
            evidence.extend(extra);
            evidence
        };
        if fleet.size >= rules.min_accounts {
            out.push(soft(
                ReasonCode::UsageFleet,
                policy,
                format!(
                    "one of a fleet of {} accounts linked by {}",
                    fleet.size,
                    links.to_lowercase().replace('_', " ")
                ),
                evidence(vec![]),
            ));
        }
        let (observed, expected) = (
            fleet.coactive_pairs_1h as f64,
            fleet.expected_coactive_pairs_1h,
        );
        if fleet.active_members_1h >= rules.coordinated_min_members
            && expected > 0.0
            && observed >= rules.coordinated_min_ratio * expected
            && observed - expected >= COORDINATION_MIN_Z * expected.sqrt()
        {
            out.push(soft(
                ReasonCode::UsageCoordinatedActivity,
                policy,
                format!(
                    "{} fleet members active in the same minutes {:.1} times as often as chance gives",
                    fleet.active_members_1h,
                    observed / expected
                ),
                evidence(vec![
                    ("active_members_1h", fleet.active_members_1h.to_string()),
                    ("coactive_pairs_1h", fleet.coactive_pairs_1h.to_string()),
                    ("expected_coactive_pairs_1h", format!("{expected:.2}")),
                ]),
            ));
        }
    }
    if usage.accounts_sharing_template >= rules.template_min_accounts {
        let mut evidence = vec![(
            "accounts_sharing_template",
            usage.accounts_sharing_template.to_string(),
        )];
        if let Some(fleet) = &usage.fleet {
            evidence.push(("fleet_id", fleet.id.clone()));
            evidence.push(("size", fleet.size.to_string()));
        }
        out.push(soft(
            ReasonCode::UsageTemplateRepetition,
            policy,
            format!(
                "a prompt template of this account's was sent by {} accounts in 7 days",
                usage.accounts_sharing_template
            ),
            evidence,
        ));
    }
}
