//! Stored audit rows <-> the Review API's messages, and replay over the store.

use crate::audit::DecisionBody;
use crate::grpc::ApiError;
use crate::grpc::pb;
use crate::replay::{Recorded, Replayer};
use crate::store::{self, OverrideRecord, StoredDecision};

pub(super) fn record(stored: StoredDecision) -> Result<pb::DecisionRecord, ApiError> {
    let body: DecisionBody = serde_json::from_str(&stored.row.body).map_err(|e| {
        ApiError::Store(format!(
            "decision {}: unreadable body: {e}",
            stored.row.ref_id
        ))
    })?;
    let flow = match body.inputs.flow {
        crate::classify::Flow::ApiRequest => pb::Flow::ApiRequest,
        crate::classify::Flow::Signup => pb::Flow::Signup,
        crate::classify::Flow::Login => pb::Flow::Login,
    };
    let answer = answer(&body).map_err(|e| {
        ApiError::Store(format!(
            "decision {}: unreadable answer: {e}",
            stored.row.ref_id
        ))
    })?;
    Ok(pb::DecisionRecord {
        seq: stored.seq as u64,
        recorded_at_unix_ms: stored.row.recorded_at_ms,
        account_id: stored.row.account_id,
        ip: body.ip,
        flow: flow.into(),
        inputs_json: serde_json::to_string(&body.inputs).unwrap_or_default(),
        decision: Some(answer),
    })
}

/// The answer a decision row's body keeps, in the wire API's JSON form (`DecisionBody`).
pub fn encode_answer(
    outcome: crate::engine::Outcome,
) -> serde_json::Result<Box<serde_json::value::RawValue>> {
    let mut decision = pb::ClassifyResponse::from(outcome);
    // The answer's usage summary is `inputs.usage` again: kept once (about a sixth of a row),
    // and put back by `answer`.
    decision.usage = None;
    serde_json::value::to_raw_value(&decision)
}

/// The answer as the caller received it, usage summary included.
fn answer(body: &DecisionBody) -> serde_json::Result<pb::ClassifyResponse> {
    let mut answer: pb::ClassifyResponse = serde_json::from_str(body.decision.get())?;
    if answer.usage.is_none() {
        answer.usage = body
            .inputs
            .usage
            .as_ref()
            .map(crate::grpc::convert::usage_summary);
    }
    Ok(answer)
}

pub(super) fn queue_item(stored: StoredDecision) -> Result<pb::QueueItem, ApiError> {
    let queue = stored.queue.clone().unwrap_or(store::QueueState {
        status: String::new(),
        outcome: String::new(),
        note: String::new(),
        resolved_by: String::new(),
        resolved_at_ms: None,
    });
    Ok(pb::QueueItem {
        decision: Some(record(stored)?),
        status: queue.status,
        outcome: queue.outcome,
        note: queue.note,
        resolved_by: queue.resolved_by,
        resolved_at_unix_ms: queue.resolved_at_ms.unwrap_or(0),
    })
}

pub(super) fn override_pb(o: OverrideRecord) -> pb::Override {
    pb::Override {
        id: o.id,
        scope: o.scope,
        value: o.value,
        action: o.action,
        reviewer: o.reviewer,
        reason: o.reason,
        created_at_unix_ms: o.created_at_ms,
        expires_at_unix_ms: o.expires_at_ms.unwrap_or(0),
        removed_at_unix_ms: o.removed_at_ms.unwrap_or(0),
        removed_by: o.removed_by,
    }
}

/// Replays every decision recorded since `since_ms`, a page at a time: memory holds one page
/// and the report, whatever the store's size.
pub async fn replay_store(
    reads: &store::Reads,
    since_ms: i64,
    policy: &crate::policy::Policy,
    samples: usize,
) -> Result<crate::replay::ReplayReport, ApiError> {
    let mut replayer = Replayer::new(policy, samples);
    let mut after = 0;
    loop {
        let page = reads.decisions_since(since_ms, after, 1000).await?;
        if page.is_empty() {
            break;
        }
        for stored in page {
            after = stored.seq;
            let body: DecisionBody = serde_json::from_str(&stored.row.body)
                .map_err(|e| ApiError::Store(format!("decision {}: {e}", stored.row.ref_id)))?;
            replayer.add(&Recorded {
                decision_id: stored.row.ref_id,
                verdict: stored.row.verdict,
                reasons: stored.row.reasons,
                country: stored.row.country,
                inputs: body.inputs,
            });
        }
    }
    Ok(replayer.finish())
}

pub fn report_pb(report: crate::replay::ReplayReport) -> pb::ReplayReport {
    let counts = |m: std::collections::BTreeMap<String, u64>| {
        m.into_iter()
            .map(|(key, count)| pb::Count { key, count })
            .collect()
    };
    pb::ReplayReport {
        candidate_policy_version: report.candidate_policy_version,
        replayed: report.replayed,
        changed: report.changed,
        transitions: report
            .transitions
            .into_iter()
            .map(|((from, to), t)| pb::VerdictTransition {
                from,
                to,
                count: t.count,
                sample_decision_ids: t.samples,
            })
            .collect(),
        reasons_added: counts(report.reasons_added),
        reasons_removed: counts(report.reasons_removed),
        changed_by_country: counts(report.changed_by_country),
    }
}
