//! HTTP forward-auth: nginx `auth_request`, Caddy `forward_auth`, Traefik ForwardAuth, Envoy's
//! HTTP ext_authz mode. An HTTP/1.1 (or h2c) request under `/check` is translated into the
//! CheckRequest Envoy's gRPC filter would have sent, answered by the same
//! [`GatewayService::answer`] as `Authorization/Check`, and the CheckResponse is translated
//! back: allowed is 200 with the `x-regionguard-*` headers, denied is the deny status with the
//! JSON body. Only translation lives here.
//!
//! The gateway calls from its own address, so the client is the right-most `X-Forwarded-For`
//! entry (the one the gateway appended), or `X-Real-IP` when configured; that address becomes
//! the CheckRequest's source and the entries before it stay in `x-forwarded-for`, so
//! `[gateway] trusted_hops` skips proxies in front of the gateway exactly as Check does. No
//! forwarded address is an `on_error` answer, never the gateway's own address.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};
use serde::Deserialize;

use super::request::FLOW_KEY;
use super::response::ALL_HEADERS;
use super::service::GatewayService;
use crate::auth::Gate;
use crate::classify::Flow;
use crate::excerpt;

/// Every path under this prefix is a check (Envoy's HTTP mode appends the original path).
pub const CHECK_PREFIX: &str = "/check";

/// Where the client address comes from.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum ClientAddress {
    /// The right-most `X-Forwarded-For` entry: the address the gateway appended.
    #[default]
    #[serde(rename = "x-forwarded-for")]
    ForwardedFor,
    /// `X-Real-IP`, set by the gateway (`proxy_set_header X-Real-IP $remote_addr`).
    #[serde(rename = "x-real-ip")]
    RealIp,
}

/// `[forward_auth]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardAuthConfig {
    /// Address of the HTTP listener; off when unset.
    pub listen: Option<std::net::SocketAddr>,
    /// Serve `listen` off loopback (plaintext HTTP; put the gateway beside it).
    pub allow_public: bool,
    pub client_address: ClientAddress,
    /// A request header naming the flow (`signup`, `login`, `api_request`), checked first.
    pub flow_header: Option<String>,
    /// Original-path patterns → flow: exact, or a prefix when ending in `*`; the longest
    /// matching pattern wins; a path that matches none is `api_request`.
    pub flow_paths: BTreeMap<String, String>,
    /// Status of a denied answer. Unset: `[gateway] deny_status`. Any 4xx or 5xx (nginx's
    /// `auth_request` passes only 401 and 403 on; Caddy and Traefik pass any status, 451 too).
    pub deny_status: Option<u16>,
    /// The header carrying a gateway caller's token when `[[auth.callers]]` has gateway callers
    /// (`Authorization` is the client's own and is passed through by the gateway).
    pub token_header: String,
}

impl Default for ForwardAuthConfig {
    fn default() -> Self {
        Self {
            listen: None,
            allow_public: false,
            client_address: ClientAddress::default(),
            flow_header: None,
            flow_paths: [("/signup*", "signup"), ("/login*", "login")]
                .into_iter()
                .map(|(p, f)| (p.to_owned(), f.to_owned()))
                .collect(),
            deny_status: None,
            token_header: "x-regionguard-token".into(),
        }
    }
}

impl ForwardAuthConfig {
    /// Checks values a TOML type cannot; returns the problem as a sentence naming the key.
    pub fn validate(&self) -> Result<(), String> {
        crate::config::plaintext_listen("forward_auth", self.listen, self.allow_public, "")?;
        if let Some(status) = self.deny_status
            && !(400..=599).contains(&status)
        {
            return Err(format!(
                "forward_auth.deny_status = {status}: must be a 4xx or 5xx status"
            ));
        }
        for (pattern, flow) in &self.flow_paths {
            if !pattern.starts_with('/') {
                return Err(format!(
                    "forward_auth.flow_paths: {:?} must start with /",
                    excerpt(pattern)
                ));
            }
            if flow_named(flow).is_none() {
                return Err(format!(
                    "forward_auth.flow_paths[{:?}] = {:?} is not signup, login or api_request",
                    excerpt(pattern),
                    excerpt(flow)
                ));
            }
        }
        for (key, name) in [
            ("flow_header", self.flow_header.as_deref()),
            ("token_header", Some(self.token_header.as_str())),
        ] {
            if let Some(name) = name
                && HeaderName::from_bytes(name.as_bytes()).is_err()
            {
                return Err(format!(
                    "forward_auth.{key} = {:?} is not a header name",
                    excerpt(name)
                ));
            }
        }
        Ok(())
    }

    /// The flow the original `path` maps to, if a pattern matches it. Matched on every reading
    /// a server could make of the path ([`super::path::lenient`]: escapes decoded, dot segments
    /// resolved, case folded), so that no spelling of `/signup` escapes the signup flow.
    /// Patterns are compared case-folded, so they are stored that way ([`Self::normalized`]).
    fn flow_for(&self, path: &str) -> Option<Flow> {
        if self.flow_paths.is_empty() {
            return None;
        }
        let path = super::path::lenient(path);
        self.flow_paths
            .iter()
            .filter(|(pattern, _)| super::path::matches(pattern, &path))
            .max_by_key(|(pattern, _)| pattern.len())
            .and_then(|(_, flow)| flow_named(flow))
    }

    /// Patterns case-folded once, as [`Self::flow_for`] matches them.
    fn normalized(mut self) -> Self {
        self.flow_paths = std::mem::take(&mut self.flow_paths)
            .into_iter()
            .map(|(pattern, flow)| (pattern.to_ascii_lowercase(), flow))
            .collect();
        self
    }
}

fn flow_named(name: &str) -> Option<Flow> {
    Flow::ALL.into_iter().find(|f| f.as_str() == name)
}

struct ForwardAuth {
    service: GatewayService,
    config: ForwardAuthConfig,
    gate: Gate,
}

/// The forward-auth router: every method on every path under [`CHECK_PREFIX`].
pub fn router(service: GatewayService, config: ForwardAuthConfig, gate: Gate) -> Router {
    Router::new()
        .fallback(check)
        .with_state(Arc::new(ForwardAuth {
            service,
            config: config.normalized(),
            gate,
        }))
}

async fn check(State(state): State<Arc<ForwardAuth>>, request: Request) -> Response {
    let path = request.uri().path();
    let Some(suffix) = path.strip_prefix(CHECK_PREFIX) else {
        return not_found();
    };
    if !(suffix.is_empty() || suffix.starts_with('/')) {
        return not_found();
    }
    let suffix = (!suffix.is_empty()).then(|| match request.uri().query() {
        Some(query) => format!("{suffix}?{query}"),
        None => suffix.to_owned(),
    });
    let headers = request.headers();
    let token = headers
        .get(state.config.token_header.as_str())
        .and_then(|v| v.to_str().ok());
    if let Err(message) = state.gate.admits_token(token) {
        return plain(
            StatusCode::UNAUTHORIZED,
            &format!("{}: {message}", state.config.token_header),
        );
    }
    let answer = match translate(
        request.method().as_str(),
        suffix.as_deref(),
        headers,
        &state.config,
    ) {
        Ok(check) => state.service.answer(&check).await,
        Err(Refused::Forged(message)) => state.service.refuse(message),
        Err(Refused::Unclassifiable { path, message }) => {
            if state.service.bypassed(&path) {
                super::response::bypass()
            } else {
                state.service.failure(message)
            }
        }
    };
    respond(answer, state.config.deny_status)
}

fn not_found() -> Response {
    plain(
        StatusCode::NOT_FOUND,
        "forward-auth answers under /check (any method, any path below it)",
    )
}

fn plain(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": crate::grpc::bounded(message) });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Why a request is not turned into a check.
#[derive(Debug)]
enum Refused {
    /// Something only a client can have sent (two original URIs that disagree, a flow that is
    /// none): denied whatever `on_error` says, so that a client cannot choose to fail open.
    Forged(String),
    /// Nothing to classify (no client address): `on_error`, unless `path` is bypassed.
    Unclassifiable { path: String, message: String },
}

#[cfg(test)]
impl Refused {
    fn message(&self) -> &str {
        match self {
            Refused::Forged(message) | Refused::Unclassifiable { message, .. } => message,
        }
    }
}

/// One header's values as one string (repeated headers joined with `, `, as HTTP allows for
/// lists); `None` when absent.
fn joined(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut values = headers.get_all(name).iter();
    let mut text = String::from_utf8_lossy(values.next()?.as_bytes()).into_owned();
    for more in values {
        text.push_str(", ");
        text.push_str(&String::from_utf8_lossy(more.as_bytes()));
    }
    Some(text)
}

/// The one value a set of sources agrees on: the original URI may come from several headers
/// (nginx, Caddy/Traefik conventions) and the check path; a client can add the header its
/// gateway does not set, so sources that disagree are refused rather than one picked.
fn agreed(
    what: &str,
    sources: impl IntoIterator<Item = (&'static str, Option<String>)>,
) -> Result<Option<String>, Refused> {
    let mut found: Option<(&'static str, String)> = None;
    for (name, value) in sources {
        let Some(value) = value.filter(|v| !v.is_empty()) else {
            continue;
        };
        match &found {
            Some((first, seen)) if *seen != value => {
                return Err(Refused::Forged(format!(
                    "{first} and {name} disagree about the original {what}"
                )));
            }
            Some(_) => {}
            None => found = Some((name, value)),
        }
    }
    Ok(found.map(|(_, v)| v))
}

/// The forward-auth request as the CheckRequest Envoy's gRPC filter would send.
fn translate(
    method: &str,
    suffix: Option<&str>,
    headers: &HeaderMap,
    config: &ForwardAuthConfig,
) -> Result<CheckRequest, Refused> {
    let uri = agreed(
        "URI",
        [
            ("the path under /check", suffix.map(str::to_owned)),
            ("x-original-uri", joined(headers, "x-original-uri")),
            ("x-forwarded-uri", joined(headers, "x-forwarded-uri")),
        ],
    )?
    .unwrap_or_else(|| "/".to_owned());
    // The method decides nothing (it is kept for the record): the first the gateway names.
    let method = joined(headers, "x-original-method")
        .or_else(|| joined(headers, "x-forwarded-method"))
        .unwrap_or_else(|| method.to_owned());
    let unclassifiable = |message: String| Refused::Unclassifiable {
        path: uri.clone(),
        message,
    };

    let forwarded = joined(headers, "x-forwarded-for");
    let (client, rest) = match config.client_address {
        ClientAddress::ForwardedFor => {
            let mut entries: Vec<&str> = forwarded
                .as_deref()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .collect();
            let Some(last) = entries.pop() else {
                return Err(unclassifiable(
                    "x-forwarded-for: missing (the gateway appends the client's address)"
                        .to_owned(),
                ));
            };
            let client = address("x-forwarded-for", last).map_err(unclassifiable)?;
            (client, (!entries.is_empty()).then(|| entries.join(", ")))
        }
        ClientAddress::RealIp => {
            let Some(real) = joined(headers, "x-real-ip") else {
                return Err(unclassifiable(
                    "x-real-ip: missing (the gateway sets the client's address)".to_owned(),
                ));
            };
            let client = address("x-real-ip", &real).map_err(unclassifiable)?;
            (client, forwarded)
        }
    };

    let owned = |name: &str| {
        name == "x-forwarded-for"
            || ALL_HEADERS.contains(&name)
            || name.eq_ignore_ascii_case(&config.token_header)
    };
    let mut map = std::collections::HashMap::with_capacity(headers.len());
    for name in headers.keys() {
        if !owned(name.as_str())
            && let Some(value) = joined(headers, name.as_str())
        {
            map.insert(name.as_str().to_owned(), value);
        }
    }
    if let Some(rest) = rest {
        map.insert("x-forwarded-for".to_owned(), rest);
    }

    // The operator's path map first (a client cannot change the path it asked for), then the
    // header (which the gateway must set on every route, as it does X-Forwarded-For).
    let flow = match config.flow_for(&uri) {
        Some(flow) => Some(flow),
        None => match config
            .flow_header
            .as_deref()
            .and_then(|h| {
                map.iter()
                    .find_map(|(name, value)| name.eq_ignore_ascii_case(h).then_some(value))
            })
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
        {
            None => None,
            Some(value) => Some(flow_named(value).ok_or_else(|| {
                Refused::Forged(format!(
                    "{}: {:?} is not signup, login or api_request",
                    config.flow_header.as_deref().unwrap_or_default(),
                    excerpt(value)
                ))
            })?),
        },
    };
    let context_extensions = flow
        .map(|flow| (FLOW_KEY.to_owned(), flow.as_str().to_owned()))
        .into_iter()
        .collect();

    let http = attribute_context::HttpRequest {
        id: map.get("x-request-id").cloned().unwrap_or_default(),
        method,
        host: map
            .get("x-forwarded-host")
            .or_else(|| map.get("host"))
            .cloned()
            .unwrap_or_default(),
        path: uri,
        headers: map,
        ..Default::default()
    };
    Ok(CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: client.to_string(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                time: None,
                http: Some(http),
            }),
            context_extensions,
            ..Default::default()
        }),
    })
}

/// An address as gateways write it: `ip`, `v4:port` or `[v6]:port` (or `[v6]`).
fn address(header: &str, text: &str) -> Result<IpAddr, String> {
    let text = text.trim();
    text.parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            text.strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<std::net::Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })
        .ok_or_else(|| format!("{header}: {:?} is not an IP address", excerpt(text)))
}

/// The CheckResponse as an HTTP answer.
fn respond(answer: CheckResponse, deny_status: Option<u16>) -> Response {
    let (status, options, removed, body) = match answer.http_response {
        Some(HttpResponse::OkResponse(ok)) => (
            StatusCode::OK,
            ok.headers,
            ok.headers_to_remove,
            String::new(),
        ),
        Some(HttpResponse::DeniedResponse(denied)) => {
            let code = deny_status
                .or_else(|| denied.status.and_then(|s| u16::try_from(s.code).ok()))
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::FORBIDDEN);
            (code, denied.headers, Vec::new(), denied.body)
        }
        // The gateway adapter always answers Ok or Denied; anything else fails closed.
        Some(HttpResponse::ErrorResponse(_)) | None => {
            (StatusCode::FORBIDDEN, Vec::new(), Vec::new(), String::new())
        }
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let out = response.headers_mut();
    for option in options {
        let Some(h) = option.header else { continue };
        if removed.contains(&h.key) {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.key.as_bytes()),
            HeaderValue::from_str(&h.value),
        ) {
            out.insert(name, value);
        }
    }
    // A header Envoy would remove from the request is sent empty: gateways copy what the answer
    // has, and an empty value is how they drop the client's own copy (nginx's proxy_set_header
    // drops empty headers; Caddy 2.6 would otherwise copy its unresolved placeholder).
    for name in removed {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            out.entry(name).or_insert(HeaderValue::from_static(""));
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn source(check: &CheckRequest) -> String {
        match check
            .attributes
            .as_ref()
            .unwrap()
            .source
            .as_ref()
            .unwrap()
            .address
            .as_ref()
            .unwrap()
            .address
            .as_ref()
            .unwrap()
        {
            address::Address::SocketAddress(s) => s.address.clone(),
            _ => unreachable!(),
        }
    }

    fn http(check: &CheckRequest) -> &attribute_context::HttpRequest {
        check
            .attributes
            .as_ref()
            .unwrap()
            .request
            .as_ref()
            .unwrap()
            .http
            .as_ref()
            .unwrap()
    }

    #[test]
    fn the_client_is_the_right_most_forwarded_entry_and_the_rest_stays() {
        let config = ForwardAuthConfig::default();
        let check = translate(
            "GET",
            None,
            &headers(&[
                ("x-forwarded-for", "203.0.113.9, 198.51.100.7"),
                ("x-forwarded-for", "192.0.2.1"),
                ("x-original-uri", "/v1/chat?q=1"),
            ]),
            &config,
        )
        .unwrap();
        assert_eq!(source(&check), "192.0.2.1");
        assert_eq!(
            http(&check).headers["x-forwarded-for"],
            "203.0.113.9, 198.51.100.7"
        );
        assert_eq!(http(&check).path, "/v1/chat?q=1");
    }

    #[test]
    fn no_forwarded_address_is_refused_never_guessed() {
        let config = ForwardAuthConfig::default();
        let refused = |pairs: &[(&str, &str)], config: &ForwardAuthConfig| {
            let refused = translate("GET", None, &headers(pairs), config).unwrap_err();
            assert!(
                matches!(refused, Refused::Unclassifiable { .. }),
                "{refused:?}"
            );
            refused.message().to_owned()
        };
        assert!(refused(&[], &config).starts_with("x-forwarded-for: missing"));
        assert!(refused(&[("x-forwarded-for", " , ")], &config).contains("missing"));
        assert!(
            refused(&[("x-forwarded-for", "not-an-ip")], &config).contains("is not an IP address")
        );
        assert!(
            refused(&[("x-forwarded-for", "[2a02:6b8::1]junk")], &config)
                .contains("is not an IP address")
        );
        // Empty entries are no entries, as for Check.
        let check = translate(
            "GET",
            None,
            &headers(&[("x-forwarded-for", "198.51.100.7,192.0.2.1,")]),
            &config,
        )
        .unwrap();
        assert_eq!(source(&check), "192.0.2.1");
        assert_eq!(http(&check).headers["x-forwarded-for"], "198.51.100.7");
        let real_ip = ForwardAuthConfig {
            client_address: ClientAddress::RealIp,
            ..Default::default()
        };
        assert!(
            refused(&[("x-forwarded-for", "1.2.3.4")], &real_ip).starts_with("x-real-ip: missing")
        );
        for (written, ip) in [
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::2]", "2001:db8::2"),
            ("192.0.2.9:80", "192.0.2.9"),
        ] {
            let check = translate(
                "GET",
                None,
                &headers(&[("x-real-ip", written), ("x-forwarded-for", "1.2.3.4")]),
                &real_ip,
            )
            .unwrap();
            assert_eq!(source(&check), ip);
            assert_eq!(http(&check).headers["x-forwarded-for"], "1.2.3.4");
        }
    }

    #[test]
    fn the_original_uri_sources_must_agree() {
        let config = ForwardAuthConfig::default();
        let with = |suffix: Option<&str>, pairs: &[(&str, &str)]| {
            let mut all = vec![("x-forwarded-for", "192.0.2.1")];
            all.extend_from_slice(pairs);
            translate("POST", suffix, &headers(&all), &config)
        };
        assert_eq!(http(&with(Some("/v1/x"), &[]).unwrap()).path, "/v1/x");
        assert_eq!(
            http(&with(None, &[("x-forwarded-uri", "/a")]).unwrap()).path,
            "/a"
        );
        assert_eq!(
            http(&with(None, &[("x-forwarded-uri", "/a"), ("x-original-uri", "/a")]).unwrap()).path,
            "/a"
        );
        let forged = with(
            None,
            &[
                ("x-forwarded-uri", "/signup"),
                ("x-original-uri", "/healthz"),
            ],
        )
        .unwrap_err();
        assert!(
            matches!(&forged, Refused::Forged(m) if m.contains("disagree")),
            "denied whatever on_error says: {forged:?}"
        );
        // The method decides nothing: the gateway's, else the request's; never refused.
        let method = with(
            None,
            &[
                ("x-forwarded-method", "DELETE"),
                ("x-original-method", "GET"),
            ],
        )
        .unwrap();
        assert_eq!(http(&method).method, "GET");
        assert_eq!(http(&with(None, &[]).unwrap()).method, "POST");
    }

    #[test]
    fn the_flow_comes_from_the_path_then_the_header() {
        let config = ForwardAuthConfig {
            flow_header: Some("X-Flow".into()),
            ..Default::default()
        };
        let flow = |pairs: &[(&str, &str)]| {
            let mut all = vec![("x-forwarded-for", "192.0.2.1")];
            all.extend_from_slice(pairs);
            translate("GET", None, &headers(&all), &config).map(|check| {
                check
                    .attributes
                    .unwrap()
                    .context_extensions
                    .get(FLOW_KEY)
                    .cloned()
            })
        };
        let of = |uri: &str| flow(&[("x-original-uri", uri)]).unwrap();
        assert_eq!(of("/signup/start").as_deref(), Some("signup"));
        assert_eq!(of("/login?next=/").as_deref(), Some("login"));
        assert_eq!(of("/v1/chat"), None);
        // Every spelling a server could read as /signup is a signup.
        for spelling in [
            "/public/../signup",
            "/x/..%2fsignup",
            "/signup/%2f",
            "/signup\\",
            "/SIGNUP",
            "/%73ignup",
        ] {
            assert_eq!(of(spelling).as_deref(), Some("signup"), "{spelling}");
        }
        assert_eq!(
            flow(&[("x-original-uri", "/v1/chat"), ("x-flow", "login")])
                .unwrap()
                .as_deref(),
            Some("login")
        );
        // The path map wins: a client cannot talk its way out of the signup flow.
        assert_eq!(
            flow(&[("x-original-uri", "/signup"), ("x-flow", "api_request")])
                .unwrap()
                .as_deref(),
            Some("signup")
        );
        let bogus = flow(&[("x-original-uri", "/v1"), ("x-flow", "bogus")]).unwrap_err();
        assert!(
            matches!(&bogus, Refused::Forged(m) if m.starts_with("X-Flow: \"bogus\"")),
            "{bogus:?}"
        );
    }

    #[test]
    fn owned_headers_are_not_passed_as_request_headers() {
        let config = ForwardAuthConfig::default();
        let check = translate(
            "GET",
            None,
            &headers(&[
                ("x-forwarded-for", "192.0.2.1"),
                ("x-regionguard-verdict", "ALLOW"),
                ("x-regionguard-token", "secret"),
                ("x-account-id", "acct-1"),
            ]),
            &config,
        )
        .unwrap();
        let map = &http(&check).headers;
        assert!(!map.contains_key("x-regionguard-verdict"));
        assert!(!map.contains_key("x-regionguard-token"));
        assert_eq!(map["x-account-id"], "acct-1");
        assert!(
            !map.contains_key("x-forwarded-for"),
            "nothing before the client"
        );
    }

    #[test]
    fn config_is_validated_naming_the_key() {
        let bad = |config: ForwardAuthConfig| config.validate().unwrap_err();
        assert!(
            bad(ForwardAuthConfig {
                listen: Some("0.0.0.0:9191".parse().unwrap()),
                ..Default::default()
            })
            .contains("forward_auth.allow_public")
        );
        assert!(
            bad(ForwardAuthConfig {
                deny_status: Some(200),
                ..Default::default()
            })
            .contains("forward_auth.deny_status = 200")
        );
        let mut paths = BTreeMap::new();
        paths.insert("/x".to_owned(), "signin".to_owned());
        assert!(
            bad(ForwardAuthConfig {
                flow_paths: paths,
                ..Default::default()
            })
            .contains("\"signin\" is not signup")
        );
        assert!(ForwardAuthConfig::default().validate().is_ok());
    }
}
