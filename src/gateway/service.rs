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
use crate::classify::Flow;
use crate::engine::{Engine, Outcome};
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
}

impl GatewayService {
    pub fn new(engine: Arc<Engine>, config: GatewayConfig) -> Result<Self, String> {
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
            config: Arc::new(config.normalized()),
            deny_status,
            cache,
        })
    }

    fn decide(&self, request: &GatewayRequest) -> Result<Arc<Outcome>, crate::geo::GeoError> {
        let location = self.engine.geo().lookup(request.input.ip)?;
        let Some(cache) = &self.cache else {
            return Ok(Arc::new(self.engine.decide(&request.input, location)));
        };
        let account = &request.input.account;
        let key = DecisionKey {
            generation: location.generation,
            policy: self.engine.policy().version().clone(),
            network: location.record.network,
            flow: request.input.flow,
            account_id: request.account_id.clone(),
            countries: [
                account.billing_country,
                account.phone_country,
                account.payment_country,
                account.declared_country,
            ],
            created_at_unix: account.created_at_unix,
            language_regions: request.input.hints.language_regions.clone(),
        };
        Ok(cache.get_with(key, || {
            Arc::new(self.engine.decide(&request.input, location))
        }))
    }

    /// Answers one check; pure of transport concerns so tests and benches can call it directly.
    pub fn answer(&self, check: &CheckRequest) -> CheckResponse {
        if self.config.bypassed(path(check)) {
            return response::bypass();
        }
        let failure = |message: String| {
            let fail_open = self.config.on_error == OnError::Allow;
            tracing::warn!(%message, fail_open, "gateway check could not be classified");
            response::failure(&message, fail_open, self.deny_status)
        };
        let request = match map_check(check, &self.config) {
            Ok(request) => request,
            Err(error) => return failure(error.to_string()),
        };
        match self.decide(&request) {
            Ok(outcome) => response::decision(&outcome, &self.config, self.deny_status),
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
        Ok(Response::new(self.answer(request.get_ref())))
    }
}
