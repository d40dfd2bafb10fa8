//! The decision audit trail: turns decisions into audit rows (inputs, location, reasons,
//! verdict, policy version, database build epochs, time) and hands them to the store's writer.
//! IP addresses are stored in full, truncated to their /24 or /48, or hashed, per the config.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::classify::{Flow, Verdict};
use crate::engine::{ClassifyInput, Outcome};
use crate::replay::StoredInputs;
use crate::store::writer::{Overflow, Recorder};
use crate::store::{self, AuditRow, Backend, ChainKey, OverrideRecord, Reads, StoreError};

/// How request IPs are kept in the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpStorage {
    Full,
    /// The /24 (IPv4) or /48 (IPv6) the address is in.
    Truncated,
    /// SHA-256 of a secret salt and the address: joinable, not readable.
    Hashed {
        salt: String,
    },
}

impl IpStorage {
    pub fn store(&self, ip: IpAddr) -> String {
        match self {
            IpStorage::Full => ip.to_string(),
            IpStorage::Truncated => match ip {
                IpAddr::V4(v4) => format!(
                    "{}/24",
                    std::net::Ipv4Addr::from(u32::from(v4) & 0xffff_ff00)
                ),
                IpAddr::V6(v6) => format!(
                    "{}/48",
                    std::net::Ipv6Addr::from(u128::from(v6) & (u128::MAX << 80))
                ),
            },
            IpStorage::Hashed { salt } => {
                let digest = Sha256::new()
                    .chain_update(salt.as_bytes())
                    .chain_update(ip.to_string().as_bytes())
                    .finalize();
                let hex = crate::hex(&digest[..16]);
                format!("sha256:{hex}")
            }
        }
    }
}

/// Which decisions are answered only once their audit row is committed (`[store]
/// must_record`): those of the listed flows, and those with the listed verdicts. The rest are
/// recorded without waiting and may be left out under overflow (counted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MustRecord {
    pub flows: Vec<Flow>,
    pub verdicts: Vec<Verdict>,
    /// How long a caller waits for its row's commit at most, before it is answered with an error.
    pub wait: Duration,
}

impl MustRecord {
    /// Signup and login decisions and every non-ALLOW decision.
    pub fn standard(wait: Duration) -> Self {
        Self {
            flows: vec![Flow::Signup, Flow::Login],
            verdicts: vec![Verdict::Review, Verdict::Deny],
            wait,
        }
    }

    pub fn applies(&self, flow: Flow, verdict: Verdict) -> bool {
        self.flows.contains(&flow) || self.verdicts.contains(&verdict)
    }
}

/// What the body of a decision row holds.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct DecisionBody {
    pub ip: String,
    pub inputs: StoredInputs,
    /// The answer as given, without its usage summary (that is `inputs.usage`), in the wire
    /// API's JSON form. The audit trail does not know that form: the API layer that gave the
    /// answer encodes it ([`EncodeAnswer`]) and decodes it again for reviewers.
    pub decision: Box<serde_json::value::RawValue>,
}

/// Encodes a decision as the answer the caller received (without its usage summary, which
/// the body keeps once, in `inputs.usage`). Supplied by the API layer when the trail starts,
/// so that the audit trail depends on the domain only.
pub type EncodeAnswer = fn(Outcome) -> serde_json::Result<Box<serde_json::value::RawValue>>;

pub struct AuditTrail {
    recorder: Recorder,
    must_record: MustRecord,
    reads: Reads,
    ip_storage: Arc<IpStorage>,
    encode: EncodeAnswer,
}

impl AuditTrail {
    /// Opens the store `backend` names (the one place the adapter is chosen) and starts its
    /// writer. Returns the trail and the overrides the store holds, for the engine.
    pub fn start(
        backend: &Backend,
        ip_storage: IpStorage,
        (capacity, overflow): (usize, Overflow),
        must_record: MustRecord,
        key: Option<ChainKey>,
        encode: EncodeAnswer,
    ) -> Result<(Self, Vec<OverrideRecord>), StoreError> {
        let opened = store::open(backend, capacity, overflow, key)?;
        Ok((
            Self {
                recorder: opened.recorder,
                must_record,
                reads: opened.reads,
                ip_storage: Arc::new(ip_storage),
                encode,
            },
            opened.overrides,
        ))
    }

    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// The store's read side (the Review API, export, replay).
    pub fn reads(&self) -> &Reads {
        &self.reads
    }

    /// Records a decision. One that must be recorded (`MustRecord`) returns once its row is
    /// committed, or with why it could not be: the caller must then not give the decision as
    /// if it were on record. Others are handed to the writer and follow the overflow policy.
    pub async fn record(&self, input: &ClassifyInput, outcome: &Outcome) -> Result<(), StoreError> {
        let must_record = self
            .must_record
            .applies(input.flow, outcome.decision.verdict)
            .then_some(self.must_record.wait);
        let (input, outcome, ip_storage, encode) = (
            input.clone(),
            outcome.clone(),
            self.ip_storage.clone(),
            self.encode,
        );
        self.recorder
            .decision(
                Box::new(move || decision_row(&input, outcome, &ip_storage, encode)),
                must_record,
            )
            .await
    }
}

fn decision_row(
    input: &ClassifyInput,
    outcome: Outcome,
    ip_storage: &IpStorage,
    encode: EncodeAnswer,
) -> AuditRow {
    let decision = &outcome.decision;
    let row_base = AuditRow {
        kind: "decision".into(),
        ref_id: outcome.decision_id.clone(),
        recorded_at_ms: outcome.decided_at_ms,
        actor: String::new(),
        account_id: input.account_id.clone().unwrap_or_default(),
        verdict: decision.verdict.as_str().into(),
        country: outcome
            .location
            .record
            .facts
            .country
            .map(|c| c.to_string())
            .unwrap_or_default(),
        reasons: decision
            .reasons
            .iter()
            .map(|r| r.code.as_str())
            .collect::<Vec<_>>()
            .join(","),
        body: String::new(),
    };
    let outcome_ip = outcome.location.ip;
    let inputs = StoredInputs {
        flow: input.flow,
        now_unix: outcome.decided_at_ms / 1000,
        ip: outcome.location.record.facts.clone(),
        account: input.account.clone(),
        hints: input.hints.clone(),
        usage: outcome.usage.clone(),
        overrides: outcome.overrides.clone(),
    };
    let ip = ip_storage.store(outcome_ip);
    let body = encode(outcome).and_then(|decision| {
        serde_json::to_string(&DecisionBody {
            ip,
            inputs,
            decision,
        })
    });
    AuditRow {
        body: body.unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string()),
        ..row_base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_storage_modes() {
        let ip: IpAddr = "198.51.100.77".parse().unwrap();
        assert_eq!(IpStorage::Full.store(ip), "198.51.100.77");
        assert_eq!(IpStorage::Truncated.store(ip), "198.51.100.0/24");
        assert_eq!(
            IpStorage::Truncated.store("2001:db8:1:2::9".parse().unwrap()),
            "2001:db8:1::/48"
        );
        let hashed = IpStorage::Hashed { salt: "s".into() }.store(ip);
        assert!(hashed.starts_with("sha256:") && !hashed.contains("198"));
        assert_ne!(
            hashed,
            IpStorage::Hashed { salt: "t".into() }.store(ip),
            "the salt matters"
        );
    }
}
