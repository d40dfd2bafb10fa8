//! Reviewer overrides: the last word on a verdict, within what the policy lets them say.
//!
//! A DENY override denies. An ALLOW override allows, unless a hard reason from the sanctioned
//! list stands (billing, IP or ownership in a sanctioned region…) and the policy does not let
//! overrides lift sanctions: then it is reported, not applied.
//!
//! An ALLOW on a fleet is narrower: a fleet is whoever shares one value with a member, so an
//! ALLOW that lifted every reason would pass to any account that copied one member's card or
//! device. It says "this fleet is known and legitimate" (a company's staff, a school's lab):
//! the reasons raised because of that fleet (those whose evidence names it) are cleared, and
//! every other reason stands, scored as usual.

use super::{FleetFacts, OverrideAction, OverrideFact, Reason, ReasonCode, Verdict};
use crate::policy::{ListKind, Policy};

fn evidence(o: &OverrideFact, applied: bool) -> Vec<(&'static str, String)> {
    let mut evidence = vec![
        ("override_id", o.id.clone()),
        ("scope", o.scope.clone()),
        ("reviewer", o.reviewer.clone()),
        ("reason", o.reason.clone()),
        ("applied", applied.to_string()),
    ];
    if let Some(expires) = o.expires_at_ms {
        evidence.push(("expires_at_unix_ms", expires.to_string()));
    }
    evidence
}

/// Whether a hard reason may be lifted without `may_lift_sanctions`: unsupported-list rules and
/// an unknown location only.
fn liftable(reason: &Reason) -> bool {
    reason.code == ReasonCode::IpLocationUnknown
        || reason
            .evidence
            .iter()
            .any(|(k, v)| *k == "list" && v == ListKind::Unsupported.as_str())
}

/// The `cleared_by` evidence of a reason an override cleared.
fn cleared_by(o: &OverrideFact) -> String {
    format!("override:{}", o.id)
}

/// The fleet an override is on, if that is its scope.
fn fleet_of(o: &OverrideFact) -> Option<&str> {
    o.scope.strip_prefix("fleet:")
}

/// The reasons a fleet ALLOW clears: those the fleet raised. Not USAGE_TEMPLATE_REPETITION,
/// which counts accounts within or outside the fleet.
const CLEARED_BY_FLEET_ALLOW: [ReasonCode; 2] =
    [ReasonCode::UsageFleet, ReasonCode::UsageCoordinatedActivity];

/// Clears, before scoring, the reasons a fleet raised when an ALLOW override is on its current
/// id (never on an id it had before: a fleet that linked into an allowed one must not take its
/// ALLOW along): they stay in the answer, contributing nothing, with `cleared_by` naming the
/// override.
pub(super) fn clear_allowed_fleets(
    overrides: &[OverrideFact],
    fleet: Option<&FleetFacts>,
    reasons: &mut [Reason],
) {
    let Some(fleet) = fleet else { return };
    for o in overrides
        .iter()
        .filter(|o| o.action == OverrideAction::Allow)
    {
        if fleet_of(o) != Some(fleet.id.as_str()) {
            continue;
        }
        for reason in reasons
            .iter_mut()
            .filter(|r| !r.hard && CLEARED_BY_FLEET_ALLOW.contains(&r.code))
        {
            if reason
                .evidence
                .iter()
                .any(|(k, v)| *k == "fleet_id" && *v == fleet.id)
            {
                reason.contribution = 0;
                reason.evidence.push(("cleared_by", cleared_by(o)));
            }
        }
    }
}

/// Whether a reviewer's override cleared `reason` (nothing is then asked to verify for it).
pub(super) fn cleared(reason: &Reason) -> bool {
    reason
        .evidence
        .iter()
        .any(|(k, v)| *k == "cleared_by" && v.starts_with("override:"))
}

/// Applies the matching overrides to `verdict`, adding their reasons; returns the new verdict.
/// A fleet ALLOW has done its work in [`clear_allowed_fleets`]; it is reported here.
pub(super) fn apply(
    overrides: &[OverrideFact],
    policy: &Policy,
    reasons: &mut Vec<Reason>,
    verdict: Verdict,
) -> Verdict {
    if let Some(deny) = overrides.iter().find(|o| o.action == OverrideAction::Deny) {
        reasons.push(Reason {
            code: ReasonCode::OverrideDeny,
            message: format!("denied by {}'s override: {}", deny.reviewer, deny.reason),
            contribution: 100,
            hard: true,
            evidence: evidence(deny, true),
        });
        return Verdict::Deny;
    }
    for fleet_allow in overrides
        .iter()
        .filter(|o| o.action == OverrideAction::Allow && fleet_of(o).is_some())
    {
        let cleared = cleared_by(fleet_allow);
        let applied = reasons.iter().any(|r| {
            r.evidence
                .iter()
                .any(|(k, v)| *k == "cleared_by" && *v == cleared)
        });
        reasons.push(Reason {
            code: ReasonCode::OverrideAllow,
            message: format!(
                "{}'s override on the fleet clears the reasons it raised (the others stand): {}",
                fleet_allow.reviewer, fleet_allow.reason
            ),
            contribution: 0,
            hard: false,
            evidence: evidence(fleet_allow, applied),
        });
    }
    let Some(allow) = overrides
        .iter()
        .find(|o| o.action == OverrideAction::Allow && fleet_of(o).is_none())
    else {
        return verdict;
    };
    let applies =
        policy.overrides_may_lift_sanctions() || reasons.iter().filter(|r| r.hard).all(liftable);
    let message = if applies {
        format!("allowed by {}'s override: {}", allow.reviewer, allow.reason)
    } else {
        format!(
            "{}'s override is not applied: it cannot lift a sanctions DENY",
            allow.reviewer
        )
    };
    reasons.push(Reason {
        code: ReasonCode::OverrideAllow,
        message,
        contribution: 0,
        hard: false,
        evidence: evidence(allow, applies),
    });
    if applies { Verdict::Allow } else { verdict }
}
