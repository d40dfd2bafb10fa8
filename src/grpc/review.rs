//! `regionguard.v1.Review`: the compliance reviewers' API. Every call, reads included, is
//! written to the audit log with the reviewer's identity; changes (overrides, resolutions)
//! commit in the same transaction as that record.

use std::sync::Arc;

use ipnetwork::IpNetwork;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::audit::AuditTrail;
use crate::auth::Caller;
use crate::engine::Engine;
use crate::excerpt;
use crate::grpc::ApiError;
use crate::grpc::convert::{MAX_ID_BYTES, fleet_summary, identifier};
use crate::grpc::pb::{self, review_server::Review};
use crate::grpc::records::{override_pb, queue_item, record, replay_store, report_pb};
use crate::overrides::OverrideIndex;
use crate::store::writer::{Applied, Change};
use crate::store::{self, AuditRow, OverrideRecord, QueueFilter, now_ms};

pub struct ReviewService {
    engine: Arc<Engine>,
    audit: Option<Arc<AuditTrail>>,
}

fn reviewer<T>(request: &Request<T>) -> Result<String, Status> {
    request
        .extensions()
        .get::<Caller>()
        .map(|c| c.name.clone())
        .ok_or_else(|| Status::unauthenticated("no reviewer identity"))
}

impl ReviewService {
    pub fn new(engine: Arc<Engine>, audit: Option<Arc<AuditTrail>>) -> Self {
        Self { engine, audit }
    }

    fn audit(&self) -> Result<&Arc<AuditTrail>, ApiError> {
        self.audit.as_ref().ok_or_else(|| {
            ApiError::NotConfigured("no store is configured ([store] data_dir)".into())
        })
    }

    /// The store's read side.
    fn reads(&self) -> Result<&store::Reads, ApiError> {
        Ok(self.audit()?.reads())
    }

    /// Writes the reviewer's call to the audit log, with its change; answers once committed.
    async fn log(
        &self,
        reviewer: &str,
        rpc: &str,
        details: serde_json::Value,
        change: Change,
    ) -> Result<Applied, ApiError> {
        let row = AuditRow {
            kind: "review".into(),
            ref_id: uuid::Uuid::now_v7().to_string(),
            recorded_at_ms: now_ms(),
            actor: reviewer.to_owned(),
            account_id: details
                .get("account_id")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned(),
            verdict: String::new(),
            country: String::new(),
            reasons: rpc.to_owned(),
            body: serde_json::json!({ "rpc": rpc, "request": details }).to_string(),
        };
        Ok(self.audit()?.recorder().review(row, change).await?)
    }

    /// Writes a read that is not a Review call (the console's dashboard, override list, audit
    /// verify) to the audit log under the reviewer's name, as every Review call is.
    pub async fn log_read(
        &self,
        reviewer: &str,
        what: &str,
        details: serde_json::Value,
    ) -> Result<(), Status> {
        self.log(reviewer, what, details, Change::None).await?;
        Ok(())
    }

    /// Logs an override change with its audit row, then refreshes the engine's override index.
    async fn change_override(
        &self,
        reviewer: &str,
        rpc: &str,
        details: serde_json::Value,
        change: Change,
    ) -> Result<pb::Override, Status> {
        let Applied::Override(record) = self.log(reviewer, rpc, details, change).await? else {
            return Err(Status::internal(format!(
                "{rpc}: the store did not return the override"
            )));
        };
        self.reload_overrides().await?;
        Ok(override_pb(record))
    }

    async fn reload_overrides(&self) -> Result<(), ApiError> {
        let all = self.reads()?.overrides().await?;
        self.engine.set_overrides(OverrideIndex::new(all));
        Ok(())
    }
}

/// Free text a reviewer adds (notes, reasons): optional, bounded, because it goes into audit rows.
fn optional_text(field: &str, value: &str) -> Result<String, ApiError> {
    if value.len() > 1024 {
        return Err(ApiError::invalid(field, "more than 1024 bytes"));
    }
    Ok(value.trim().to_owned())
}

fn required(field: &str, value: &str) -> Result<String, ApiError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(ApiError::invalid(field, "required"));
    }
    if value.len() > 1024 {
        return Err(ApiError::invalid(field, "more than 1024 bytes"));
    }
    Ok(value.to_owned())
}

/// A fleet id as `usage::fleet::fleet_id` makes them (case folded), or why not, naming `field`.
fn fleet_id(field: &str, value: &str) -> Result<String, ApiError> {
    let value = value.trim().to_ascii_lowercase();
    if crate::usage::fleet::is_fleet_id(&value) {
        Ok(value)
    } else {
        Err(ApiError::invalid(
            field,
            format!(
                "{:?} is not a fleet id (fl_ and 16 hex digits)",
                excerpt(&value)
            ),
        ))
    }
}

#[tonic::async_trait]
impl Review for ReviewService {
    async fn list_queue(
        &self,
        request: Request<pb::ListQueueRequest>,
    ) -> Result<Response<pb::ListQueueResponse>, Status> {
        let reviewer = reviewer(&request)?;
        let r = request.into_inner();
        let after_seq = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse::<i64>()
                .ok()
                .filter(|seq| *seq >= 0)
                .ok_or_else(|| {
                    ApiError::invalid("page_token", "not a token from a previous page")
                })?
        };
        // Filters that could match nothing are mistakes, said as such.
        let country = r.country.trim().to_ascii_uppercase();
        if !country.is_empty() && crate::region::CountryCode::parse(&country).is_err() {
            return Err(ApiError::invalid(
                "country",
                format!("{:?} is not an ISO 3166-1 alpha-2 code", excerpt(&country)),
            )
            .into());
        }
        let reason_code = r.reason_code.trim().to_owned();
        if !reason_code.is_empty() && crate::classify::ReasonCode::parse(&reason_code).is_none() {
            return Err(ApiError::invalid(
                "reason_code",
                format!("{:?} is not a reason code", excerpt(&reason_code)),
            )
            .into());
        }
        let account_id = identifier("account_id", &r.account_id, MAX_ID_BYTES)?
            .unwrap_or("")
            .to_owned();
        let fleet = match r.fleet_id.trim() {
            "" => String::new(),
            text => fleet_id("fleet_id", text)?,
        };
        let limit = if r.page_size == 0 {
            50
        } else {
            r.page_size.min(1000)
        };
        let status = match r.status.as_str() {
            "" | "open" => "open",
            "resolved" => "resolved",
            "all" => "",
            other => {
                return Err(ApiError::invalid(
                    "status",
                    format!("{:?} is not open, resolved or all", excerpt(other)),
                )
                .into());
            }
        };
        let filter = QueueFilter {
            status: status.into(),
            country,
            reason: reason_code,
            account_id,
            fleet_id: fleet,
            since_ms: r.since_unix_ms,
            after_seq,
            limit: limit + 1,
        };
        self.log(&reviewer, "ListQueue", serde_json::json!({ "status": status, "country": r.country, "reason_code": r.reason_code, "account_id": r.account_id, "fleet_id": r.fleet_id, "page_token": r.page_token }), Change::None).await?;
        let mut rows = self.reads()?.queue(&filter).await?;
        let next_page_token = if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            rows.last().map(|s| s.seq.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        let items = rows.into_iter().map(queue_item).collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListQueueResponse {
            items,
            next_page_token,
        }))
    }

    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::AccountHistory>, Status> {
        let reviewer = reviewer(&request)?;
        let r = request.into_inner();
        let account_id = required("account_id", &r.account_id)?;
        identifier("account_id", &account_id, MAX_ID_BYTES)?;
        self.log(
            &reviewer,
            "GetAccount",
            serde_json::json!({ "account_id": account_id }),
            Change::None,
        )
        .await?;
        let limit = if r.limit == 0 { 100 } else { r.limit };
        let reads = self.reads()?;
        let decisions = reads.account_decisions(&account_id, limit).await?;
        let overrides = reads.overrides().await?;
        Ok(Response::new(pb::AccountHistory {
            decisions: decisions
                .into_iter()
                .map(record)
                .collect::<Result<_, _>>()?,
            overrides: overrides
                .into_iter()
                .filter(|o| o.scope == "account" && o.value == account_id)
                .map(override_pb)
                .collect(),
            account_id,
        }))
    }

    async fn get_fleet(
        &self,
        request: Request<pb::GetFleetRequest>,
    ) -> Result<Response<pb::Fleet>, Status> {
        let reviewer = reviewer(&request)?;
        let fleet_id = fleet_id(
            "fleet_id",
            &required("fleet_id", &request.get_ref().fleet_id)?,
        )?;
        self.log(
            &reviewer,
            "GetFleet",
            serde_json::json!({ "fleet_id": fleet_id }),
            Change::None,
        )
        .await?;
        let now = now_ms() / 1000;
        let history = self.engine.usage().ok_or_else(|| {
            ApiError::NotConfigured("usage history is turned off ([usage] enabled)".into())
        })?;
        let report = history
            .fleet(&fleet_id, now)
            .await
            .map_err(|e| ApiError::Unavailable(format!("usage history: {e}")))?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "fleet {:?} is not in the usage history (expired, or never seen)",
                    excerpt(&fleet_id)
                ))
            })?;
        Ok(Response::new(pb::Fleet {
            summary: Some(fleet_summary(&report.facts)),
            members: report
                .members
                .into_iter()
                .map(|m| pb::FleetMember {
                    account_id: m.account_id.to_string(),
                    requests_24h: m.requests_24h,
                    countries_7d: m.countries_7d.iter().map(ToString::to_string).collect(),
                })
                .collect(),
            links: report
                .links
                .into_iter()
                .map(|(kind, value, accounts)| pb::FleetLink {
                    kind: kind.as_str().into(),
                    value,
                    accounts,
                })
                .collect(),
            requests_24h: report.requests_24h,
            countries: report.countries.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::DecisionRecord>, Status> {
        let reviewer = reviewer(&request)?;
        let id = required("decision_id", &request.get_ref().decision_id)?;
        self.log(
            &reviewer,
            "Explain",
            serde_json::json!({ "decision_id": id }),
            Change::None,
        )
        .await?;
        let stored = self.reads()?.decision(&id).await?.ok_or_else(|| {
            ApiError::NotFound(format!(
                "decision {:?} is not in the audit log",
                excerpt(&id)
            ))
        })?;
        Ok(Response::new(record(stored)?))
    }

    async fn set_override(
        &self,
        request: Request<pb::SetOverrideRequest>,
    ) -> Result<Response<pb::Override>, Status> {
        let reviewer = reviewer(&request)?;
        let r = request.into_inner();
        let scope = required("scope", &r.scope)?;
        let mut value = required("value", &r.value)?;
        match scope.as_str() {
            // As Classify takes ids: an override no request could match is refused.
            "account" => {
                identifier("value", &value, MAX_ID_BYTES)?;
            }
            "domain" => {
                identifier("value", &value, MAX_ID_BYTES)?;
                let canonical = crate::overrides::canonical_domain(&value);
                if !value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b))
                    || canonical.is_empty()
                {
                    return Err(ApiError::invalid(
                        "value",
                        format!(
                            "{:?} is not a domain name (letters, digits, '.', '-')",
                            excerpt(&value)
                        ),
                    )
                    .into());
                }
                value = canonical
            }
            "network" => {
                let network = value.parse::<IpNetwork>().map_err(|e| {
                    ApiError::invalid(
                        "value",
                        format!("{:?} is not a CIDR network: {e}", excerpt(&value)),
                    )
                })?;
                value = crate::overrides::canonical_network(network).to_string()
            }
            "fleet" => {
                value = fleet_id("value", &value)?;
                // Fleets come from the usage history: without one, the override could never
                // match anything.
                if self.engine.usage().is_none() {
                    return Err(ApiError::NotConfigured(
                        "a fleet override needs the usage history, which is turned off ([usage] enabled)".into(),
                    )
                    .into());
                }
            }
            other => {
                return Err(ApiError::invalid(
                    "scope",
                    format!(
                        "{:?} is not account, domain, network or fleet",
                        excerpt(other)
                    ),
                )
                .into());
            }
        }
        let action = required("action", &r.action)?.to_ascii_uppercase();
        if action != "ALLOW" && action != "DENY" {
            return Err(ApiError::invalid(
                "action",
                format!("{:?} is not ALLOW or DENY", excerpt(&action)),
            )
            .into());
        }
        let reason = required("reason", &r.reason)?;
        let now = now_ms();
        if r.expires_at_unix_ms != 0 && r.expires_at_unix_ms <= now {
            return Err(ApiError::invalid("expires_at_unix_ms", "is in the past").into());
        }
        let record = OverrideRecord {
            id: uuid::Uuid::now_v7().to_string(),
            scope,
            value,
            action,
            reviewer: reviewer.clone(),
            reason,
            created_at_ms: now,
            expires_at_ms: (r.expires_at_unix_ms != 0).then_some(r.expires_at_unix_ms),
            removed_at_ms: None,
            removed_by: String::new(),
        };
        let details = serde_json::json!({ "override_id": record.id, "scope": record.scope, "value": record.value, "action": record.action, "reason": record.reason, "expires_at_unix_ms": r.expires_at_unix_ms, "account_id": if record.scope == "account" { record.value.as_str() } else { "" } });
        Ok(Response::new(
            self.change_override(
                &reviewer,
                "SetOverride",
                details,
                Change::SetOverride(record),
            )
            .await?,
        ))
    }

    async fn remove_override(
        &self,
        request: Request<pb::RemoveOverrideRequest>,
    ) -> Result<Response<pb::Override>, Status> {
        let reviewer = reviewer(&request)?;
        let r = request.into_inner();
        let id = required("id", &r.id)?;
        let change = Change::RemoveOverride {
            id: id.clone(),
            by: reviewer.clone(),
            at_ms: now_ms(),
        };
        let reason = optional_text("reason", &r.reason)?;
        let details = serde_json::json!({ "override_id": id, "reason": reason });
        Ok(Response::new(
            self.change_override(&reviewer, "RemoveOverride", details, change)
                .await?,
        ))
    }

    async fn resolve(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::QueueItem>, Status> {
        let reviewer = reviewer(&request)?;
        let r = request.into_inner();
        let decision_id = required("decision_id", &r.decision_id)?;
        let outcome = required("outcome", &r.outcome)?;
        let change = Change::Resolve {
            decision_id: decision_id.clone(),
            outcome: outcome.clone(),
            note: optional_text("note", &r.note)?,
            by: reviewer.clone(),
            at_ms: now_ms(),
        };
        self.log(
            &reviewer,
            "Resolve",
            serde_json::json!({ "decision_id": decision_id, "outcome": outcome, "note": r.note }),
            change,
        )
        .await?;
        let stored = self
            .reads()?
            .decision(&decision_id)
            .await?
            .ok_or_else(|| ApiError::NotFound("resolved decision vanished".into()))?;
        Ok(Response::new(queue_item(stored)?))
    }

    type ExportDecisionsStream = ReceiverStream<Result<pb::DecisionRecord, Status>>;

    async fn export_decisions(
        &self,
        request: Request<pb::ExportDecisionsRequest>,
    ) -> Result<Response<Self::ExportDecisionsStream>, Status> {
        let reviewer = reviewer(&request)?;
        let r = request.into_inner();
        self.log(&reviewer, "ExportDecisions", serde_json::json!({ "since_unix_ms": r.since_unix_ms, "until_unix_ms": r.until_unix_ms }), Change::None).await?;
        let reads = self.reads()?.clone();
        let until = if r.until_unix_ms == 0 {
            i64::MAX
        } else {
            r.until_unix_ms
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut after = 0;
            loop {
                let page = match reads.decisions_since(r.since_unix_ms, after, 500).await {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(ApiError::from(e)))).await;
                        return;
                    }
                };
                if page.is_empty() {
                    return;
                }
                for stored in page {
                    after = stored.seq;
                    // Rows are in chain order, and times may be slightly out of order: skip, don't stop.
                    if stored.row.recorded_at_ms > until {
                        continue;
                    }
                    if tx.send(record(stored).map_err(Status::from)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn replay(
        &self,
        request: Request<pb::ReplayRequest>,
    ) -> Result<Response<pb::ReplayReport>, Status> {
        let reviewer = reviewer(&request)?;
        let r = request.into_inner();
        let policy = crate::policy::parse_policy(&r.policy_toml, "candidate")
            .map_err(|e| ApiError::invalid("policy_toml", e.to_string()))?;
        self.log(&reviewer, "Replay", serde_json::json!({ "candidate_policy_version": policy.version().to_string(), "since_unix_ms": r.since_unix_ms }), Change::None).await?;
        let samples = if r.max_samples == 0 {
            5
        } else {
            r.max_samples.min(100)
        } as usize;
        let report = replay_store(self.reads()?, r.since_unix_ms, &policy, samples).await?;
        Ok(Response::new(report_pb(report)))
    }
}
