//! The classifier's output: verdict, score and the reasons behind them.

use crate::classify::ReasonCode;
use crate::policy::PolicyVersion;

/// Ordered: a "higher" verdict is stricter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Allow,
    Review,
    Deny,
}

impl Verdict {
    pub const ALL: [Verdict; 3] = [Verdict::Allow, Verdict::Review, Verdict::Deny];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "ALLOW",
            Verdict::Review => "REVIEW",
            Verdict::Deny => "DENY",
        }
    }
}

/// One reason, with what it added to the score and the facts it rests on.
#[derive(Clone, Debug, PartialEq)]
pub struct Reason {
    pub code: ReasonCode,
    pub message: String,
    pub contribution: u8,
    pub hard: bool,
    pub evidence: Vec<(&'static str, String)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub verdict: Verdict,
    /// 0 to 100.
    pub risk_score: u8,
    pub reasons: Vec<Reason>,
    /// For signups: what to ask for to clear the soft reasons, in order, without repeats.
    pub required_verifications: Vec<String>,
    pub policy_version: PolicyVersion,
}

impl Decision {
    pub fn has(&self, code: ReasonCode) -> bool {
        self.reasons.iter().any(|r| r.code == code)
    }
}
