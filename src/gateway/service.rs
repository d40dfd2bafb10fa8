//! `envoy.service.auth.v3.Authorization/Check`: the gateway's entry point.
//!
//! Never answers a policy decision with a gRPC error: a request that cannot be classified gets
//! the operator's `on_error` answer as an ordinary CheckResponse. Identical checks within the
//! decision-cache TTL reuse the decision (errors are never cached).

use std::sync::Arc;
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest, CheckResponse, HttpStatusCode};
use ipnetwork::IpNetwork;
use moka::sync::Cache;
use tonic::{Request, Response, Status};

use super::config::{GatewayConfig, OnError};
use super::request::{GatewayRequest, map_check, path};
use super::response;
use crate::audit::AuditTrail;
use crate::classify::Flow;
use crate::engine::{ClassifyInput, Engine, Outcome};
use crate::policy::PolicyVersion;
use crate::region::CountryCode;

/// What makes two checks the same decision.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DecisionKey {
    generation: u64,
    policy: PolicyVersion,
    network: IpNetwork,
    flow: Flow,
    account_id: Option<String>,
    countries: [Option<CountryCode>; 4],
    created_at_unix: Option<i64>,
    language_regions: Vec<CountryCode>,
}

#[derive(Clone)]
pub struct GatewayService {
    engine: Arc<Engine>,
    config: Arc<GatewayConfig>,
    deny_status: HttpStatusCode,
    cache: Option<Cache<DecisionKey, Arc<Outcome>>>,
    audit: Option<Arc<AuditTrail>>,
}

impl GatewayService {
    pub fn new(
        engine: Arc<Engine>,
        config: GatewayConfig,
        audit: Option<Arc<AuditTrail>>,
    ) -> Result<Self, String> {
        config.validate()?;
        let deny_status = config.deny_http_status()?;
        let cache =
            (config.decision_cache_ttl_ms > 0 && config.decision_cache_capacity > 0).then(|| {
                Cache::builder()
                    .max_capacity(config.decision_cache_capacity)
                    .time_to_live(Duration::from_millis(config.decision_cache_ttl_ms))
                    .build()
            });
        Ok(Self {
            engine,
            audit,
            config: Arc::new(config.normalized()),
            deny_status,
            cache,
        })
    }

    /// The decision for `request`, and whether it was made now (not reused from the cache).
    async fn decide(
        &self,
        request: &GatewayRequest,
    ) -> Result<(Arc<Outcome>, bool), crate::geo::GeoError> {
        let location = self.engine.geo().lookup(request.input.ip)?;
        let Some(cache) = &self.cache else {
            return Ok((
                Arc::new(self.engine.decide(&request.input, location).await),
                true,
            ));
        };
        let account = &request.input.account;
        let key = DecisionKey {
            generation: location.generation,
            policy: self.engine.policy().version().clone(),
            network: location.record.network,
            flow: request.input.flow,
            account_id: request.input.account_id.clone(),
            countries: [
                account.billing_country,
                account.phone_country,
                account.payment_country,
                account.declared_country,
            ],
            created_at_unix: account.created_at_unix,
            language_regions: request.input.hints.language_regions.clone(),
        };
        if let Some(hit) = cache.get(&key) {
            return Ok((hit, false));
        }
        // Decided outside the cache's lock (a usage read may wait); a request that raced this
        // one to the same key keeps the first answer, as the cache promises.
        let outcome = Arc::new(self.engine.decide(&request.input, location).await);
        let entry = cache.entry(key).or_insert(outcome);
        let fresh = entry.is_fresh();
        Ok((entry.into_value(), fresh))
    }

    /// Answers one check; pure of transport concerns so tests and benches can call it directly.
    pub async fn answer(&self, check: &CheckRequest) -> CheckResponse {
        self.evaluate(check).await.0
    }

    /// The answer, and the decision to record when one was made now.
    async fn evaluate(
        &self,
        check: &CheckRequest,
    ) -> (CheckResponse, Option<(ClassifyInput, Arc<Outcome>)>) {
        if self.config.bypassed(path(check)) {
            return (response::bypass(), None);
        }
        let failure = |message: String| {
            let fail_open = self.config.on_error == OnError::Allow;
            tracing::warn!(%message, fail_open, "gateway check could not be classified");
            (
                response::failure(&message, fail_open, self.deny_status),
                None,
            )
        };
        let request = match map_check(check, &self.config) {
            Ok(request) => request,
            Err(error) => return failure(error.to_string()),
        };
        match self.decide(&request).await {
            Ok((outcome, fresh)) => {
                let answer = response::decision(&outcome, &self.config, self.deny_status);
                (answer, fresh.then_some((request.input, outcome)))
            }
            Err(error) => failure(error.to_string()),
        }
    }
}

#[tonic::async_trait]
impl Authorization for GatewayService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let (answer, made) = self.evaluate(request.get_ref()).await;
        if let (Some(audit), Some((input, outcome))) = (&self.audit, made) {
            audit.record(&input, &outcome).await;
        }
        Ok(Response::new(answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::response::DECISION_ID_HEADER;
    use crate::geo::{DbRole, Geo, GeoDatabase, fixtures};
    use crate::policy::{EMBEDDED_POLICY, parse_policy};
    use envoy_types::ext_authz::v3::pb::HttpResponse;

    use crate::gateway::test_envoy as envoy;

    fn engine(with_location: bool) -> Arc<Engine> {
        let location = with_location.then(|| {
            GeoDatabase::from_bytes(DbRole::Location, fixtures::city_db(), "city").unwrap()
        });
        Arc::new(Engine::new(
            parse_policy(EMBEDDED_POLICY, "p").unwrap(),
            Geo::new(location, None, None, 100),
            None,
        ))
    }

    fn decision_id(response: &CheckResponse) -> Option<String> {
        let headers = match response.http_response.as_ref()? {
            HttpResponse::OkResponse(ok) => &ok.headers,
            HttpResponse::DeniedResponse(denied) => &denied.headers,
            _ => return None,
        };
        headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == DECISION_ID_HEADER)
            .map(|h| h.value.clone())
    }

    fn check(account: &str) -> CheckRequest {
        envoy::check_request("216.160.83.57", "/", &[("x-account-id", account)], &[])
    }

    #[tokio::test]
    async fn identical_checks_reuse_the_decision_until_something_changes() {
        let engine = engine(true);
        let service = GatewayService::new(engine.clone(), GatewayConfig::default(), None).unwrap();
        let first = decision_id(&service.answer(&check("a")).await).unwrap();
        assert_eq!(
            decision_id(&service.answer(&check("a")).await).unwrap(),
            first,
            "same check, same decision"
        );
        let neighbour = envoy::check_request("216.160.83.58", "/", &[("x-account-id", "a")], &[]);
        assert_eq!(
            decision_id(&service.answer(&neighbour).await).unwrap(),
            first,
            "same network, same decision"
        );
        assert_ne!(
            decision_id(&service.answer(&check("b")).await).unwrap(),
            first,
            "another account"
        );
        engine.set_policy(
            parse_policy(&format!("{EMBEDDED_POLICY}\n# new version\n"), "p2").unwrap(),
        );
        assert_ne!(
            decision_id(&service.answer(&check("a")).await).unwrap(),
            first,
            "a new policy decides anew"
        );
    }

    #[tokio::test]
    async fn without_a_ttl_every_check_is_decided() {
        let config = GatewayConfig {
            decision_cache_ttl_ms: 0,
            ..Default::default()
        };
        let service = GatewayService::new(engine(true), config, None).unwrap();
        assert_ne!(
            decision_id(&service.answer(&check("a")).await),
            decision_id(&service.answer(&check("a")).await)
        );
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let engine = engine(false);
        let service = GatewayService::new(engine.clone(), GatewayConfig::default(), None).unwrap();
        assert_eq!(
            decision_id(&service.answer(&check("a")).await),
            None,
            "no database: an error answer"
        );
        engine.geo().replace(
            DbRole::Location,
            Some(GeoDatabase::from_bytes(DbRole::Location, fixtures::city_db(), "city").unwrap()),
        );
        assert!(
            decision_id(&service.answer(&check("a")).await).is_some(),
            "decided as soon as the database is there"
        );
    }
}
