//! Reviewer overrides: the last word on a verdict, within what the policy lets them say.
//!
//! A DENY override denies. An ALLOW override allows, unless a hard reason from the sanctioned
//! list stands (billing, IP or ownership in a sanctioned region…) and the policy does not let
//! overrides lift sanctions: then it is reported, not applied.

use super::{OverrideAction, OverrideFact, Reason, ReasonCode, Verdict};
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

/// Applies the matching overrides to `verdict`, adding their reasons; returns the new verdict.
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
    let Some(allow) = overrides.iter().find(|o| o.action == OverrideAction::Allow) else {
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
