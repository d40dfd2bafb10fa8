//! The gateway adapter's settings: how a CheckRequest maps to facts and how verdicts map to HTTP.

use envoy_types::ext_authz::v3::pb::HttpStatusCode;
use serde::Deserialize;

/// What the gateway answers when a request cannot be classified (no geo data, bad address…).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Fail closed: deny with `deny_status`.
    Deny,
    /// Fail open: allow, with `x-regionguard-fail-open: true`.
    Allow,
}

/// What a REVIEW verdict does at the gateway.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReviewAction {
    /// Let the request through, with the verdict in the headers for upstream to act on.
    Allow,
    Deny,
}

/// Request headers (set by an upstream auth filter) that carry account attributes.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AccountHeaders {
    pub billing_country: Option<String>,
    pub phone_country: Option<String>,
    pub payment_country: Option<String>,
    pub declared_country: Option<String>,
    /// Seconds since the Unix epoch.
    pub created_at_unix: Option<String>,
    /// The account's verifications: comma-separated `KIND:COUNTRY:UNIX` (country may be empty),
    /// e.g. `PHONE:US:1790000000, ID_DOCUMENT::1791000000`.
    pub verifications: Option<String>,
}

/// A string field in `metadata_context.filter_metadata` (e.g. a decoded JWT's `sub`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetadataField {
    /// Filter namespace, e.g. `envoy.filters.http.jwt_authn`.
    pub namespace: String,
    /// Dotted path inside it, e.g. `jwt_payload.sub`.
    pub path: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Proxies in front of Envoy whose `x-forwarded-for` entries are trusted. 0 (the default):
    /// the client is the connection's source address and `x-forwarded-for` is ignored.
    pub trusted_hops: u32,
    /// Request header carrying the account id.
    pub account_header: Option<String>,
    /// Route `context_extensions` key carrying the account id (checked after the header).
    pub account_context_key: String,
    /// `metadata_context` field carrying the account id (checked last).
    pub account_metadata: Option<MetadataField>,
    pub account_headers: AccountHeaders,
    /// HTTP status for DENY; one of Envoy's `type.v3.StatusCode` values.
    pub deny_status: u16,
    pub review_action: ReviewAction,
    pub on_error: OnError,
    /// Paths never classified: exact, or a prefix when ending in `*`. The query is ignored; the
    /// path is matched normalised (dot segments resolved, unreserved escapes decoded, `//`
    /// collapsed), and one that cannot be normalised is classified.
    pub bypass_paths: Vec<String>,
    /// How long a decision is reused for an identical check (same address, account and
    /// attributes, same policy and database generation, and the same usage history and matching
    /// overrides as the decision saw); 0 turns the cache off.
    pub decision_cache_ttl_ms: u64,
    pub decision_cache_capacity: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            trusted_hops: 0,
            account_header: Some("x-account-id".into()),
            account_context_key: "regionguard.account_id".into(),
            account_metadata: None,
            account_headers: AccountHeaders::default(),
            deny_status: 403,
            review_action: ReviewAction::Allow,
            on_error: OnError::Deny,
            bypass_paths: Vec::new(),
            decision_cache_ttl_ms: 1000,
            decision_cache_capacity: 100_000,
        }
    }
}

impl GatewayConfig {
    /// Checks values a TOML type cannot; returns the problem as a sentence naming the key.
    pub fn validate(&self) -> Result<(), String> {
        self.deny_http_status()?;
        if self.trusted_hops > 16 {
            return Err(format!(
                "gateway.trusted_hops = {} is more hops than any real deployment",
                self.trusted_hops
            ));
        }
        Ok(())
    }

    /// `deny_status` as Envoy's enum. Envoy validates `defined_only`, so a code its enum lacks
    /// (451 among them) would make Envoy reject the whole response.
    pub fn deny_http_status(&self) -> Result<HttpStatusCode, String> {
        i32::from(self.deny_status)
            .try_into()
            .ok()
            .filter(|code| *code != HttpStatusCode::Empty)
            .ok_or_else(|| format!("gateway.deny_status = {} is not in Envoy's type.v3.StatusCode enum (e.g. 403, 401, 429)", self.deny_status))
    }

    /// Header names as Envoy presents them (lower case).
    pub(crate) fn normalized(mut self) -> Self {
        let lower = |h: &mut Option<String>| {
            if let Some(h) = h {
                *h = h.to_ascii_lowercase();
            }
        };
        lower(&mut self.account_header);
        let headers = &mut self.account_headers;
        for h in [
            &mut headers.billing_country,
            &mut headers.phone_country,
            &mut headers.payment_country,
            &mut headers.declared_country,
            &mut headers.created_at_unix,
        ] {
            lower(h);
        }
        self
    }

    /// Whether `path` is never classified: matched as the upstream will resolve it (see
    /// [`super::path`]); a path that cannot be normalised is never bypassed.
    pub fn bypassed(&self, path: &str) -> bool {
        if self.bypass_paths.is_empty() {
            return false;
        }
        let Some(path) = super::path::normalize(path) else {
            return false;
        };
        self.bypass_paths
            .iter()
            .any(|pattern| super::path::matches(pattern, &path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_status_must_be_in_envoys_enum() {
        let config = |deny_status| GatewayConfig {
            deny_status,
            ..Default::default()
        };
        assert!(config(403).validate().is_ok());
        assert!(config(429).validate().is_ok());
        let err = config(451).validate().unwrap_err();
        assert!(err.contains("451"), "{err}");
        assert!(config(0).validate().is_err());
    }

    #[test]
    fn bypass_matches_exact_paths_and_prefixes() {
        let config = GatewayConfig {
            bypass_paths: vec!["/healthz".into(), "/static/*".into()],
            ..Default::default()
        };
        assert!(config.bypassed("/healthz"));
        assert!(config.bypassed("/healthz?probe=1"));
        assert!(!config.bypassed("/healthz/deep"));
        assert!(config.bypassed("/static/app.js"));
        assert!(!config.bypassed("/v1/chat"));
        // Matched as the upstream resolves the path, never on the raw text.
        assert!(config.bypassed("/static/js/../app.js"));
        assert!(config.bypassed("/%68ealthz"));
        assert!(!config.bypassed("/static/../signup"));
        assert!(!config.bypassed("/static/%2e%2e/signup"));
        assert!(!config.bypassed("/static//..//signup"));
        assert!(!config.bypassed("/healthz/../signup"));
        assert!(!config.bypassed("/static/%2e%2e%2fsignup"));
    }
}
