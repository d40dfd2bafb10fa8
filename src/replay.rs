//! Replay: re-run recorded decision inputs under a candidate policy and say what would change.
//!
//! Pure over its arguments: the stored inputs come from the audit log, the policy from the
//! caller; the original verdicts are what the decisions were when they were made.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::classify::{
    AccountFacts, Facts, Flow, HintFacts, IpFacts, OverrideFact, UsageFacts, classify,
};
use crate::policy::Policy;

/// A decision's inputs as the audit log keeps them: everything `classify` was handed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StoredInputs {
    pub flow: Flow,
    pub now_unix: i64,
    pub ip: IpFacts,
    pub account: AccountFacts,
    pub hints: HintFacts,
    pub usage: Option<UsageFacts>,
    pub overrides: Vec<OverrideFact>,
}

/// One recorded decision to replay.
pub struct Recorded {
    pub decision_id: String,
    pub verdict: String,
    pub reasons: String,
    pub country: String,
    pub inputs: StoredInputs,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transition {
    pub count: u64,
    pub samples: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub candidate_policy_version: String,
    pub replayed: u64,
    pub changed: u64,
    /// (from, to) verdict names.
    pub transitions: BTreeMap<(String, String), Transition>,
    pub reasons_added: BTreeMap<String, u64>,
    pub reasons_removed: BTreeMap<String, u64>,
    pub changed_by_country: BTreeMap<String, u64>,
}

pub fn replay(
    records: impl IntoIterator<Item = Recorded>,
    policy: &Policy,
    max_samples: usize,
) -> ReplayReport {
    let mut replayer = Replayer::new(policy, max_samples);
    for record in records {
        replayer.add(&record);
    }
    replayer.finish()
}

/// Replays records one at a time into a report, so a replay over any number of stored
/// decisions holds only the report.
pub struct Replayer<'p> {
    policy: &'p Policy,
    max_samples: usize,
    report: ReplayReport,
}

impl<'p> Replayer<'p> {
    pub fn new(policy: &'p Policy, max_samples: usize) -> Self {
        Self {
            policy,
            max_samples,
            report: ReplayReport {
                candidate_policy_version: policy.version().to_string(),
                ..Default::default()
            },
        }
    }

    pub fn add(&mut self, record: &Recorded) {
        let (policy, max_samples, report) = (self.policy, self.max_samples, &mut self.report);
        let inputs = &record.inputs;
        let facts = Facts {
            flow: inputs.flow,
            now_unix: inputs.now_unix,
            ip: &inputs.ip,
            account: &inputs.account,
            hints: &inputs.hints,
            usage: inputs.usage.as_ref(),
            overrides: &inputs.overrides,
        };
        let candidate = classify(&facts, policy);
        report.replayed += 1;
        let to = candidate.verdict.as_str().to_owned();
        let before: BTreeSet<&str> = record
            .reasons
            .split(',')
            .filter(|c| !c.is_empty())
            .collect();
        let after: BTreeSet<&str> = candidate.reasons.iter().map(|r| r.code.as_str()).collect();
        for added in after.difference(&before) {
            *report.reasons_added.entry((*added).to_owned()).or_default() += 1;
        }
        for removed in before.difference(&after) {
            *report
                .reasons_removed
                .entry((*removed).to_owned())
                .or_default() += 1;
        }
        let transition = report
            .transitions
            .entry((record.verdict.clone(), to.clone()))
            .or_default();
        transition.count += 1;
        if record.verdict != to {
            report.changed += 1;
            if transition.samples.len() < max_samples {
                transition.samples.push(record.decision_id.clone());
            }
            let country = if record.country.is_empty() {
                "unknown".to_owned()
            } else {
                record.country.clone()
            };
            *report.changed_by_country.entry(country).or_default() += 1;
        }
    }

    pub fn finish(self) -> ReplayReport {
        self.report
    }
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "candidate policy {}: {} decisions replayed, {} would change",
            self.candidate_policy_version, self.replayed, self.changed
        )?;
        for ((from, to), t) in &self.transitions {
            let samples = if t.samples.is_empty() {
                String::new()
            } else {
                format!("  e.g. {}", t.samples.join(", "))
            };
            writeln!(f, "  {from:>6} -> {to:<6} {:>8}{samples}", t.count)?;
        }
        for (label, counts) in [
            ("reasons added", &self.reasons_added),
            ("reasons removed", &self.reasons_removed),
            ("changed by country", &self.changed_by_country),
        ] {
            if !counts.is_empty() {
                let list: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
                writeln!(f, "  {label}: {}", list.join(", "))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{EMBEDDED_POLICY, parse_policy};
    use crate::region::CountryCode;

    fn recorded(id: &str, country: &str, verdict: &str, reasons: &str) -> Recorded {
        Recorded {
            decision_id: id.into(),
            verdict: verdict.into(),
            reasons: reasons.into(),
            country: country.into(),
            inputs: StoredInputs {
                ip: IpFacts {
                    country: CountryCode::parse(country).ok(),
                    ..Default::default()
                },
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_tightened_policy_reports_its_transitions() {
        let tightened = parse_policy(
            &EMBEDDED_POLICY.replacen("  \"CU\",", "  \"BR\",\n  \"CU\",", 1),
            "candidate",
        )
        .unwrap();
        let report = replay(
            [
                recorded("d1", "BR", "ALLOW", ""),
                recorded("d2", "BR", "ALLOW", ""),
                recorded("d3", "DE", "ALLOW", ""),
                recorded("d4", "IR", "DENY", "REGION_SANCTIONED"),
            ],
            &tightened,
            1,
        );
        assert_eq!((report.replayed, report.changed), (4, 2));
        let to_deny = &report.transitions[&("ALLOW".to_owned(), "DENY".to_owned())];
        assert_eq!(
            (to_deny.count, to_deny.samples.clone()),
            (2, vec!["d1".to_owned()])
        );
        assert_eq!(
            report.transitions[&("ALLOW".to_owned(), "ALLOW".to_owned())].count,
            1
        );
        assert_eq!(report.reasons_added["REGION_SANCTIONED"], 2);
        assert_eq!(report.changed_by_country["BR"], 2);
        assert!(report.to_string().contains("ALLOW -> DENY"), "{report}");
    }

    #[test]
    fn stored_inputs_round_trip_through_json() {
        let inputs = StoredInputs {
            ip: IpFacts {
                country: CountryCode::parse("UA").ok(),
                subdivisions: vec![crate::region::RegionCode::parse("UA-43").unwrap()],
                ..Default::default()
            },
            ..Default::default()
        };
        let json = serde_json::to_string(&inputs).unwrap();
        assert!(json.contains("\"UA-43\""), "{json}");
        assert_eq!(serde_json::from_str::<StoredInputs>(&json).unwrap(), inputs);
    }

    /// Replay re-decides with the verifications the decision saw, and rows recorded before
    /// accounts had them still read.
    #[test]
    fn verifications_are_kept_and_old_rows_still_read() {
        use crate::classify::{Verification, VerificationKind};
        let inputs = StoredInputs {
            account: AccountFacts {
                verifications: vec![Verification {
                    kind: VerificationKind::IdDocument,
                    country: CountryCode::parse("DE").ok(),
                    verified_at_unix: 1_790_000_000,
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        let json = serde_json::to_string(&inputs).unwrap();
        assert!(json.contains(r#""kind":"ID_DOCUMENT""#), "{json}");
        assert_eq!(serde_json::from_str::<StoredInputs>(&json).unwrap(), inputs);
        let old: StoredInputs =
            serde_json::from_str(r#"{"account":{"billing_country":"DE"}}"#).unwrap();
        assert!(old.account.verifications.is_empty());
    }
}
