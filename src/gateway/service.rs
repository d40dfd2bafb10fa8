//! `envoy.service.auth.v3.Authorization/Check`: the gateway's entry point.
//!
//! Never answers a policy decision with a gRPC error: a request that cannot be classified gets
//! the operator's `on_error` answer as an ordinary CheckResponse, and so does a decision that
//! must be recorded but could not be.
//!
//! Identical checks within the decision-cache TTL reuse the decision (errors are never cached).
//! Identical means everything that can change the answer: the same address (not its database
//! network: an override or a usage count can single out one address), the same account fields,
//! and, checked on every hit, the same usage history and matching overrides as the cached
//! decision saw. A decision enters the cache only once it is recorded.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest, CheckResponse, HttpStatusCode};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::{Request, Response, Status};

use super::config::{GatewayConfig, OnError};
use super::request::{GatewayRequest, map_check, path};
use super::response;
use crate::audit::AuditTrail;
use crate::classify::Flow;
use crate::engine::{Engine, Outcome};
use crate::grpc::route::{self, Route};
use crate::policy::PolicyVersion;
use crate::region::CountryCode;
use crate::ttl_cache::TtlCache;

/// What makes two checks the same decision.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DecisionKey {
    generation: u64,
    policy: PolicyVersion,
    ip: IpAddr,
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
    cache: Option<Arc<TtlCache<DecisionKey, Arc<Outcome>>>>,
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
                Arc::new(TtlCache::new(
                    config.decision_cache_capacity,
                    Duration::from_millis(config.decision_cache_ttl_ms),
                ))
            });
        Ok(Self {
            engine,
            audit,
            config: Arc::new(config.normalized()),
            deny_status,
            cache,
        })
    }

    /// The decision for `request`: reused from the cache when nothing it depends on changed,
    /// else made now and recorded (a must-record decision that cannot be recorded is an error).
    async fn decide(&self, request: &GatewayRequest) -> Result<Arc<Outcome>, String> {
        let location = self
            .engine
            .geo()
            .lookup(request.input.ip)
            .map_err(|e| e.to_string())?;
        let circumstances = self
            .engine
            .circumstances(&request.input, &location, SystemTime::now())
            .await;
        let key = self.cache.as_ref().map(|_| {
            let account = &request.input.account;
            DecisionKey {
                generation: location.generation,
                policy: self.engine.policy().version().clone(),
                ip: request.input.ip,
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
            }
        });
        let now = Instant::now();
        if let (Some(cache), Some(key)) = (&self.cache, &key)
            && let Some(hit) = cache.get(key, now)
            && circumstances.match_outcome(&hit)
        {
            return Ok(hit);
        }
        let outcome = Arc::new(
            self.engine
                .decide_in(&request.input, location, circumstances),
        );
        if let Some(audit) = &self.audit {
            audit
                .record(&request.input, &outcome)
                .await
                .map_err(|error| format!("the decision could not be recorded: {error}"))?;
        }
        if let (Some(cache), Some(key)) = (&self.cache, key) {
            cache.insert(key, outcome.clone(), now);
        }
        Ok(outcome)
    }

    /// Answers one check; pure of transport concerns so tests and benches can call it directly.
    pub async fn answer(&self, check: &CheckRequest) -> CheckResponse {
        if self.bypassed(path(check)) {
            return response::bypass();
        }
        let request = match map_check(check, &self.config) {
            Ok(request) => request,
            Err(error) => return self.failure(error.to_string()),
        };
        match self.decide(&request).await {
            Ok(outcome) => response::decision(&outcome, &self.config, self.deny_status),
            Err(message) => self.failure(message),
        }
    }

    /// Whether `path` is one of the `bypass_paths` (matched as upstream resolves it).
    pub fn bypassed(&self, path: &str) -> bool {
        self.config.bypassed(path)
    }

    /// A denial whatever `on_error` says, for a request only a client could have made (forged
    /// forwarding headers): failing open on it would let the client choose to.
    pub fn refuse(&self, message: String) -> CheckResponse {
        tracing::warn!(%message, "gateway check refused");
        response::failure(&message, false, self.deny_status)
    }

    /// The `on_error` answer for a check that could not be classified, logged.
    pub fn failure(&self, message: String) -> CheckResponse {
        let fail_open = self.config.on_error == OnError::Allow;
        tracing::warn!(%message, fail_open, "gateway check could not be classified");
        response::failure(&message, fail_open, self.deny_status)
    }
}

#[tonic::async_trait]
impl Authorization for GatewayService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(self.answer(request.get_ref()).await))
    }
}

/// Check, decoded with this project's codec rather than the one envoy-types generates with, so
/// that a request that does not decode is INVALID_ARGUMENT naming what was wrong, not INTERNAL.
impl Route for GatewayService {
    const PATH: &'static str = "/envoy.service.auth.v3.Authorization/Check";

    fn serve(self, request: http::Request<Body>, max_decoding: usize) -> route::Served {
        route::wire_unary(request, max_decoding, move |call| {
            let service = self.clone();
            async move { service.check(call).await }
        })
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

    /// The answer's header `name`, allowed or denied.
    fn header(response: &CheckResponse, name: &str) -> Option<String> {
        let headers = match response.http_response.as_ref()? {
            HttpResponse::OkResponse(ok) => &ok.headers,
            HttpResponse::DeniedResponse(denied) => &denied.headers,
            _ => return None,
        };
        headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == name)
            .map(|h| h.value.clone())
    }

    fn decision_id(response: &CheckResponse) -> Option<String> {
        header(response, DECISION_ID_HEADER)
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
        assert_ne!(
            decision_id(&service.answer(&neighbour).await).unwrap(),
            first,
            "another address in the same database network: decided anew"
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

    fn verdict(response: &CheckResponse) -> Option<String> {
        header(response, crate::gateway::response::VERDICT_HEADER)
    }

    fn network_override(value: &str, action: &str) -> crate::store::OverrideRecord {
        crate::store::OverrideRecord {
            id: format!("o-{value}"),
            scope: "network".into(),
            value: value.into(),
            action: action.into(),
            reviewer: "r".into(),
            reason: "test".into(),
            created_at_ms: 0,
            expires_at_ms: None,
            removed_at_ms: None,
            removed_by: String::new(),
        }
    }

    /// #12, defect 1: a /32 network override is not bypassed by a decision cached for a
    /// neighbour in the same database network, nor by one cached before the override was set.
    #[tokio::test]
    async fn an_override_is_never_bypassed_by_the_cache() {
        let engine = engine(true);
        let service = GatewayService::new(engine.clone(), GatewayConfig::default(), None).unwrap();
        let at = |ip: &str| envoy::check_request(ip, "/", &[("x-account-id", "a")], &[]);
        engine.set_overrides(crate::overrides::OverrideIndex::new([network_override(
            "216.160.83.57/32",
            "DENY",
        )]));
        let neighbour = service.answer(&at("216.160.83.58")).await;
        assert_eq!(verdict(&neighbour).as_deref(), Some("ALLOW"));
        let denied = service.answer(&at("216.160.83.57")).await;
        assert_eq!(
            verdict(&denied).as_deref(),
            Some("DENY"),
            "the override holds"
        );
        assert_ne!(decision_id(&denied), decision_id(&neighbour));

        // Cached as ALLOW, then an override arrives: the next check sees it at once.
        let before = service.answer(&at("216.160.83.58")).await;
        assert_eq!(decision_id(&before), decision_id(&neighbour), "cached");
        engine.set_overrides(crate::overrides::OverrideIndex::new([network_override(
            "216.160.83.58/32",
            "DENY",
        )]));
        assert_eq!(
            verdict(&service.answer(&at("216.160.83.58")).await).as_deref(),
            Some("DENY"),
            "an override set after the decision was cached"
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
