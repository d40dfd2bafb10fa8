//! The review console: server-rendered HTML for compliance reviewers on a port of its own
//! (`[console] listen`). It only translates: every page and action is a call on the same
//! [`ReviewService`] the gRPC Review API runs (so the same validation, store, audit rows and
//! override reloads, under the signed-in reviewer's name), or a read it logs the same way.
//!
//! - **Sign-in**: a reviewer token (`[[auth.callers]]`, role reviewer) posted as `token` gives a
//!   server-side session ([`session`]) in an HttpOnly, SameSite=Strict cookie (Secure when
//!   `origin` is https) with an idle timeout; or, from `trusted_proxies` only, an identity header
//!   an SSO proxy sets (`identity_header`, e.g. oauth2-proxy's `X-Auth-Request-Email`).
//! - **CSRF**: every state change is a POST; a POST is refused unless its `Origin` (when sent)
//!   is the console's own, `Sec-Fetch-Site` (when sent) is `same-origin`, and its `csrf` field
//!   is the session's token; a sign-in (no session yet) must carry one of the two headers.
//! - **Pages** ([`pages`]): dashboard `/`, `/queue`, `/decisions/{id}`, `/accounts/{id}`,
//!   `/overrides`, `/replay`, `/audit`; charts are SVG drawn here ([`charts`]).

mod charts;
mod pages;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use ipnetwork::IpNetwork;
use serde::Deserialize;
use tonic::Code;

use crate::audit::AuditTrail;
use crate::auth::{Caller, Gate, Role};
use crate::connections::Limited;
use crate::engine::Engine;
use crate::excerpt;
use crate::grpc::ReviewService;
use crate::grpc::pb::{self, review_server::Review};
use crate::store::{ChainKey, now_ms};

pub use session::Session;

/// `[console]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Address of the console's HTTP listener; off when unset.
    pub listen: Option<SocketAddr>,
    /// Serve `listen` off loopback (plaintext: put a TLS proxy in front and set `origin`).
    pub allow_public: bool,
    /// The origin browsers reach the console at (`https://review.example.com`), when a proxy
    /// in front changes scheme or host; posts must come from it. Unset: `http://` and the
    /// request's `Host`. An https origin marks the session cookie Secure.
    pub origin: Option<String>,
    /// A session unused this long ends.
    pub session_idle_minutes: u64,
    /// A header naming the reviewer, set by an SSO proxy in front (`X-Auth-Request-Email`);
    /// believed only from `trusted_proxies`.
    pub identity_header: Option<String>,
    /// Addresses (CIDR) of the proxies whose `identity_header` is believed.
    pub trusted_proxies: Vec<String>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            listen: None,
            allow_public: false,
            origin: None,
            session_idle_minutes: 30,
            identity_header: None,
            trusted_proxies: Vec::new(),
        }
    }
}

impl ConsoleConfig {
    /// Checks values a TOML type cannot; the problem as a sentence naming the key.
    pub fn validate(&self) -> Result<(), String> {
        crate::config::plaintext_listen(
            "console",
            self.listen,
            self.allow_public,
            " (and a TLS proxy in front)",
        )?;
        if self.session_idle_minutes == 0 {
            return Err("console.session_idle_minutes must be at least 1".into());
        }
        if let Some(origin) = &self.origin {
            let rest = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            if rest.is_none_or(|host| host.is_empty() || host.contains('/')) {
                return Err(format!(
                    "console.origin = {:?}: must be a scheme and host, e.g. https://review.example.com",
                    excerpt(origin)
                ));
            }
        }
        self.proxies()?;
        if let Some(name) = &self.identity_header {
            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(format!(
                    "console.identity_header = {:?}: not a header name",
                    excerpt(name)
                ));
            }
            if self.trusted_proxies.is_empty() {
                return Err("console.identity_header needs console.trusted_proxies (the SSO proxy's addresses): from anyone else the header is forged".into());
            }
        }
        Ok(())
    }

    fn proxies(&self) -> Result<Vec<IpNetwork>, String> {
        self.trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, text)| {
                text.parse::<IpNetwork>()
                    .map_err(|e| format!("console.trusted_proxies[{i}] = {:?}: {e}", excerpt(text)))
            })
            .collect()
    }
}

/// What the console needs beyond its config.
pub struct ConsoleParts {
    pub engine: Arc<Engine>,
    pub audit: Option<Arc<AuditTrail>>,
    /// The reviewers' gate (tokens).
    pub gate: Gate,
    /// The chain key, for the audit page's verify.
    pub chain_key: Option<ChainKey>,
    /// The largest form accepted (a candidate policy is posted whole): the Review API's
    /// message limit, so neither door takes what the other refuses.
    pub max_form_bytes: usize,
}

struct Inner {
    review: ReviewService,
    audit: Option<Arc<AuditTrail>>,
    gate: Gate,
    chain_key: Option<ChainKey>,
    sessions: session::Sessions,
    origin: Option<String>,
    secure_cookie: bool,
    identity_header: Option<axum::http::HeaderName>,
    proxies: Vec<IpNetwork>,
    max_form_bytes: usize,
    /// Failed sign-ins by address.
    failures: session::Failures,
    /// The last verify and when it ran: one walk at a time, reused for `VERIFY_REUSE`.
    verified: tokio::sync::Mutex<Option<(Instant, crate::store::VerifyReport)>>,
}

/// A verify younger than this is shown again rather than walking the chain once more.
const VERIFY_REUSE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Console(Arc<Inner>);

/// The peer's address (for `trusted_proxies`), from listeners that know it.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub Option<SocketAddr>);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Limited>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Limited>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// The console's routes. Serve with `into_make_service_with_connect_info::<Peer>()`.
pub fn router(config: &ConsoleConfig, parts: ConsoleParts) -> Result<Router, String> {
    config.validate()?;
    let console = Console(Arc::new(Inner {
        review: ReviewService::new(parts.engine, parts.audit.clone()),
        audit: parts.audit,
        gate: parts.gate,
        chain_key: parts.chain_key,
        sessions: session::Sessions::new(Duration::from_secs(
            config.session_idle_minutes.saturating_mul(60),
        )),
        secure_cookie: config
            .origin
            .as_deref()
            .is_some_and(|o| o.starts_with("https://")),
        origin: config.origin.clone(),
        identity_header: config
            .identity_header
            .as_deref()
            .and_then(|h| axum::http::HeaderName::from_bytes(h.as_bytes()).ok()),
        proxies: config.proxies()?,
        max_form_bytes: parts.max_form_bytes,
        failures: session::Failures::default(),
        verified: tokio::sync::Mutex::new(None),
    }));
    let signed_in = Router::new()
        .route("/", get(dashboard))
        .route("/queue", get(queue))
        .route("/decisions/{id}", get(decision))
        .route("/decisions/{id}/resolve", post(resolve))
        .route("/accounts/{id}", get(account))
        .route("/fleets/{id}", get(fleet))
        .route("/overrides", get(overrides).post(set_override))
        .route("/overrides/{id}/remove", post(remove_override))
        .route("/replay", get(replay_form).post(replay))
        .route("/audit", get(audit))
        .route("/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(
            console.clone(),
            require_session,
        ));
    Ok(Router::new()
        .route("/login", get(login_form).post(login))
        .route("/static/console.css", get(stylesheet))
        .route("/static/console.js", get(script))
        .merge(signed_in)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console))
}

/// Why a page could not be shown: an HTTP status and a sentence, rendered as a page.
#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    message: String,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

/// The Review API's error as the console shows it: the same message, the matching status.
impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        let code = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            // FailedPrecondition: a conflict with the record's state, or no store configured.
            Code::FailedPrecondition if status.message().contains("no store") => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Code::FailedPrecondition => StatusCode::CONFLICT,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(code, status.message().to_owned())
    }
}

impl From<crate::store::StoreError> for Failure {
    fn from(error: crate::store::StoreError) -> Self {
        tonic::Status::from(crate::grpc::ApiError::from(error)).into()
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            // The details (a database's message, a path) are for the operator, not the page.
            let id = uuid::Uuid::now_v7();
            tracing::error!(error = %self.message, %id, "console: internal error");
            let message = format!("internal error {id}: the service log has the details");
            return (self.status, pages::error_page(self.status, &message)).into_response();
        }
        (self.status, pages::error_page(self.status, &self.message)).into_response()
    }
}

type Page = Result<Response, Failure>;

/// Headers every response carries: nothing framed, sniffed, cached or loaded from elsewhere.
async fn guard(State(console): State<Console>, request: Request, next: Next) -> Response {
    if request.method() == axum::http::Method::POST {
        let headers = request.headers();
        let vouched =
            headers.contains_key(header::ORIGIN) || headers.contains_key("sec-fetch-site");
        // Signing in has no session token yet to check: the browser must say where it posts from.
        let checked = if request.uri().path() == "/login" && !vouched {
            Err(Failure::new(
                StatusCode::FORBIDDEN,
                "cross-origin request refused: a sign-in must carry Origin or Sec-Fetch-Site",
            ))
        } else {
            console.same_origin(headers)
        };
        if let Err(failure) = checked {
            return with_security_headers(failure.into_response());
        }
    }
    if let Some(query) = request.uri().query()
        && let Err(failure) = utf8_fields("query", query.as_bytes())
    {
        return with_security_headers(failure.into_response());
    }
    let response = next.run(request).await;
    with_security_headers(as_page(response).await)
}

/// A bare error from the framework (a path or query that does not parse, a method a route does
/// not take) becomes a console page with the same status and what the framework said.
async fn as_page(response: Response) -> Response {
    let status = response.status();
    let is_html = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"text/html"));
    if is_html || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let body = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let message = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        excerpt(text.trim()).to_owned()
    };
    Failure::new(status, message).into_response()
}

fn with_security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

impl Console {
    /// A POST from another site changes nothing: `Sec-Fetch-Site` and `Origin`, when the browser
    /// sends them, must say this console (the `csrf` field is checked as well, per form).
    fn same_origin(&self, headers: &HeaderMap) -> Result<(), Failure> {
        let refused = |why: String| {
            Failure::new(
                StatusCode::FORBIDDEN,
                format!("cross-origin request refused: {why}"),
            )
        };
        if let Some(site) = headers.get("sec-fetch-site") {
            let site = site.to_str().unwrap_or("");
            if site != "same-origin" {
                return Err(refused(format!("Sec-Fetch-Site is {:?}", excerpt(site))));
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let expected = match &self.0.origin {
                Some(origin) => origin.clone(),
                None => match headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .filter(|h| !h.is_empty())
                {
                    Some(host) => format!("http://{host}"),
                    None => return Err(refused("no Host to compare Origin with".into())),
                },
            };
            if !origin.eq_ignore_ascii_case(&expected) {
                return Err(refused(format!(
                    "Origin {:?} is not {:?}",
                    excerpt(origin),
                    excerpt(&expected)
                )));
            }
        }
        Ok(())
    }

    fn session_cookie(&self, id: &str) -> HeaderValue {
        let secure = if self.0.secure_cookie { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{}={id}; Path=/; HttpOnly; SameSite=Strict{secure}",
            session::COOKIE
        ))
        .expect("hex id")
    }

    /// The reviewer an SSO proxy names, if the peer is one of `trusted_proxies`.
    fn proxied_identity(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<String> {
        let name = self.0.identity_header.as_ref()?;
        let peer = peer?.ip().to_canonical();
        if !self.0.proxies.iter().any(|net| net.contains(peer)) {
            return None;
        }
        // Exactly one: a proxy that appends rather than replaces would leave the client's first.
        let mut values = headers.get_all(name).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return None;
        };
        let value = value.to_str().ok()?.trim();
        (!value.is_empty() && value.len() <= 256 && !value.chars().any(char::is_control))
            .then(|| value.to_owned())
    }

    /// A review request carrying the reviewer's identity, as the gRPC interceptor would set it.
    fn call<T>(session: &Session, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.extensions_mut().insert(Caller {
            name: session.reviewer.clone(),
            role: Role::Reviewer,
        });
        request
    }

    fn audit(&self) -> Result<&Arc<AuditTrail>, Failure> {
        self.0.audit.as_ref().ok_or_else(|| {
            Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no store is configured ([store] data_dir or postgres_url): the console has nothing to show",
            )
        })
    }
}

/// Signed-in pages: the session from the cookie, or from a trusted SSO proxy's header (a
/// session is made for it, so its forms carry a CSRF token too). Anyone else is sent to sign in
/// (GET) or refused (anything else).
async fn require_session(
    State(console): State<Console>,
    mut request: Request,
    next: Next,
) -> Response {
    let now = Instant::now();
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<Peer>>()
        .and_then(|info| info.0.0);
    let headers = request.headers();
    let from_cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|h| session::cookie(h, session::COOKIE))
        .and_then(|id| console.0.sessions.get(id, now));
    let proxied = console.proxied_identity(headers, peer);
    let (session, new_cookie) = match (from_cookie, proxied) {
        (Some(s), Some(name)) if s.reviewer != name => {
            console.0.sessions.remove(&s.id);
            (console.0.sessions.create(&name, now), true)
        }
        (Some(s), _) => (Some(s), false),
        (None, Some(name)) => match console.0.sessions.for_identity(&name, now) {
            Some(s) => (Some(s), true),
            None => (console.0.sessions.create(&name, now), true),
        },
        (None, None) => (None, false),
    };
    let Some(session) = session else {
        if request.method() == axum::http::Method::GET && !new_cookie {
            let next_path = request
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            let target = format!("/login?next={}", pages::url_encode(&next_path));
            return Redirect::to(&target).into_response();
        }
        let status = if new_cookie {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::UNAUTHORIZED
        };
        return Failure::new(status, "sign in first (your session may have ended)").into_response();
    };
    request.extensions_mut().insert(session.clone());
    let mut response = next.run(request).await;
    if new_cookie {
        response
            .headers_mut()
            .append(header::SET_COOKIE, console.session_cookie(&session.id));
    }
    response
}

/// A posted form: its `csrf` field checked against the session's, then the rest as `T`.
pub struct Posted<T>(pub T);

impl<T: serde::de::DeserializeOwned> FromRequest<Console> for Posted<T> {
    type Rejection = Failure;

    async fn from_request(request: Request, console: &Console) -> Result<Self, Failure> {
        let session = request
            .extensions()
            .get::<Session>()
            .cloned()
            .ok_or_else(|| Failure::new(StatusCode::UNAUTHORIZED, "sign in first"))?;
        form_content_type(request.headers())?;
        let limit = console.0.max_form_bytes;
        let body = axum::body::to_bytes(request.into_body(), limit)
            .await
            .map_err(|_| {
                Failure::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("form: more than {} KiB", limit / 1024),
                )
            })?;
        utf8_fields("form", &body)?;
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&body)
            .map_err(|e| Failure::bad_request(format!("form: {e}")))?;
        let csrf = fields.iter().find(|(k, _)| k == "csrf").map(|(_, v)| v);
        if !csrf.is_some_and(|token| session::same_secret(token, &session.csrf)) {
            return Err(Failure::new(
                StatusCode::FORBIDDEN,
                "form: the csrf field is missing or not this session's (reload the page and try again)",
            ));
        }
        serde_urlencoded::from_bytes(&body)
            .map(Posted)
            .map_err(|e| Failure::bad_request(format!("form: {e}")))
    }
}

/// Forms come as `application/x-www-form-urlencoded`, what every browser sends for them.
fn form_content_type(headers: &HeaderMap) -> Result<(), Failure> {
    let ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|t| t.to_str().ok())
        .and_then(|t| t.split(';').next())
        .is_some_and(|t| {
            t.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if ok {
        Ok(())
    } else {
        Err(Failure::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "form: Content-Type must be application/x-www-form-urlencoded",
        ))
    }
}

/// Refuses urlencoded text (a form or a query) whose decoded bytes are not UTF-8, naming the
/// field, rather than let a decoder replace them (an override for a value no request carries).
fn utf8_fields(what: &str, encoded: &[u8]) -> Result<(), Failure> {
    use percent_encoding::percent_decode;
    for pair in encoded.split(|&b| b == b'&') {
        let mut halves = pair.splitn(2, |&b| b == b'=');
        let key = percent_decode(halves.next().unwrap_or_default());
        let value = percent_decode(halves.next().unwrap_or_default());
        // `+` is a space in forms: ASCII either way, so it cannot change the answer.
        if key.clone().decode_utf8().is_err() || value.decode_utf8().is_err() {
            let name = key.decode_utf8_lossy();
            return Err(Failure::bad_request(format!(
                "{what}: the field {:?} is not UTF-8",
                excerpt(&name)
            )));
        }
    }
    Ok(())
}

/// A local path to go back to after an action; anything else goes to the dashboard.
fn local_path(path: &str) -> &str {
    // Browsers drop tabs and newlines from a Location before reading it, and read `\` as `/`:
    // only plain URL characters pass, so no path can turn into `//elsewhere`.
    let plain = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/_.~%?&=+-:@,".contains(&b));
    let second = path.as_bytes().get(1).copied();
    if plain && path.starts_with('/') && second != Some(b'/') && path.len() <= 2048 {
        path
    } else {
        "/"
    }
}

async fn not_found() -> Failure {
    Failure::new(StatusCode::NOT_FOUND, "no such page")
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("static/console.css"),
    )
        .into_response()
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("static/console.js"),
    )
        .into_response()
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LoginQuery {
    next: String,
}

async fn login_form(Query(q): Query<LoginQuery>) -> Response {
    pages::login(local_path(&q.next), None).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

async fn login(State(console): State<Console>, request: Request) -> Response {
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<Peer>>()
        .and_then(|info| info.0.0);
    let address = peer.map(|p| p.ip().to_canonical());
    if let Err(failure) = form_content_type(request.headers()) {
        return failure.into_response();
    }
    let now = Instant::now();
    if console.0.failures.refused(address, now) {
        tracing::warn!(client = ?address, "console: sign-in refused after repeated failures");
        return Failure::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many failed sign-ins from this address; try again in {} s",
                session::FAILURE_WINDOW.as_secs()
            ),
        )
        .into_response();
    }
    let Ok(body) = axum::body::to_bytes(request.into_body(), 64 * 1024).await else {
        return Failure::new(StatusCode::PAYLOAD_TOO_LARGE, "form: more than 64 KiB")
            .into_response();
    };
    if let Err(failure) = utf8_fields("form", &body) {
        return failure.into_response();
    }
    let Ok(form) = serde_urlencoded::from_bytes::<LoginForm>(&body) else {
        return Failure::bad_request("form: not a sign-in form").into_response();
    };
    let next = local_path(&form.next).to_owned();
    if form.token.trim().is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            pages::login(&next, Some("token: required")),
        )
            .into_response();
    }
    let Some(caller) = console.0.gate.caller_for_token(&form.token) else {
        console.0.failures.failed(address, now);
        tracing::warn!(client = ?address, "console: a sign-in with an unknown or non-reviewer token");
        return (
            StatusCode::UNAUTHORIZED,
            pages::login(&next, Some("token: not a reviewer token")),
        )
            .into_response();
    };
    let Some(session) = console.0.sessions.create(&caller.name, Instant::now()) else {
        return Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many open sessions; try again later",
        )
        .into_response();
    };
    tracing::info!(reviewer = %caller.name, "console: signed in");
    let mut response = Redirect::to(&next).into_response();
    response
        .headers_mut()
        .append(header::SET_COOKIE, console.session_cookie(&session.id));
    response
}

#[derive(Deserialize)]
struct Nothing {}

async fn logout(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Posted(Nothing {}): Posted<Nothing>,
) -> Response {
    console.0.sessions.remove(&session.id);
    let mut response = Redirect::to("/login").into_response();
    let secure = if console.0.secure_cookie {
        "; Secure"
    } else {
        ""
    };
    let cleared = format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}",
        session::COOKIE
    );
    if let Ok(value) = HeaderValue::from_str(&cleared) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RangeQuery {
    range: String,
}

/// The dashboard's ranges: name, bucket length, buckets.
const RANGES: [(&str, i64, usize); 3] = [
    ("24h", 3_600_000, 24),
    ("7d", 6 * 3_600_000, 28),
    ("30d", 24 * 3_600_000, 30),
];

async fn dashboard(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Query(q): Query<RangeQuery>,
) -> Page {
    let range = if q.range.is_empty() { "24h" } else { &q.range };
    let Some(&(name, bucket_ms, buckets)) = RANGES.iter().find(|(n, _, _)| *n == range) else {
        return Err(Failure::bad_request(format!(
            "range: {:?} is not 24h, 7d or 30d",
            excerpt(range)
        )));
    };
    let audit = console.audit()?;
    console
        .0
        .review
        .log_read(
            &session.reviewer,
            "Dashboard",
            serde_json::json!({ "range": name }),
        )
        .await?;
    let now = now_ms();
    let first = (now / bucket_ms - buckets as i64 + 1) * bucket_ms;
    let stats = audit.reads().dashboard(first).await?;
    let overrides = audit.reads().overrides().await?;
    Ok(pages::dashboard(&pages::DashboardView {
        session: &session,
        range: name,
        first_ms: first,
        bucket_ms,
        buckets,
        now_ms: now,
        stats: &stats,
        overrides: &overrides,
    })
    .into_response())
}

/// The queue's filters, as `ListQueue` takes them (`reason` and `account` are the short names
/// of `reason_code`, `account_id` and `fleet_id`; `since` takes `24h`, `7d` or Unix milliseconds).
#[derive(Deserialize, Default, Clone)]
#[serde(default)]
pub struct QueueQuery {
    pub status: String,
    pub country: String,
    #[serde(alias = "reason_code")]
    pub reason: String,
    #[serde(alias = "account_id")]
    pub account: String,
    #[serde(alias = "fleet_id")]
    pub fleet: String,
    #[serde(alias = "since_unix_ms")]
    pub since: String,
    pub page_size: Option<u32>,
    pub page_token: String,
}

async fn queue(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Query(q): Query<QueueQuery>,
) -> Page {
    let since_unix_ms = if q.since.trim().is_empty() {
        0
    } else {
        crate::store::parse_since(q.since.trim(), now_ms())
            .map_err(|e| Failure::bad_request(format!("since: {e}")))?
    };
    let request = pb::ListQueueRequest {
        status: q.status.clone(),
        country: q.country.trim().to_owned(),
        reason_code: q.reason.trim().to_owned(),
        account_id: q.account.trim().to_owned(),
        fleet_id: q.fleet.trim().to_owned(),
        since_unix_ms,
        page_size: q.page_size.unwrap_or(50),
        page_token: q.page_token.clone(),
    };
    let page = console
        .0
        .review
        .list_queue(Console::call(&session, request))
        .await?
        .into_inner();
    Ok(pages::queue(&session, &q, &page, now_ms()).into_response())
}

async fn decision(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
) -> Page {
    let record = console
        .0
        .review
        .explain(Console::call(
            &session,
            pb::ExplainRequest {
                decision_id: id.clone(),
            },
        ))
        .await?
        .into_inner();
    let history = if record.account_id.is_empty() {
        None
    } else {
        Some(
            console
                .0
                .review
                .get_account(Console::call(
                    &session,
                    pb::GetAccountRequest {
                        account_id: record.account_id.clone(),
                        limit: 20,
                    },
                ))
                .await?
                .into_inner(),
        )
    };
    let queue = console
        .audit()?
        .reads()
        .decision(id.trim())
        .await?
        .and_then(|d| d.queue);
    Ok(pages::decision(
        &session,
        &record,
        queue.as_ref(),
        history.as_ref(),
        now_ms(),
    )
    .into_response())
}

#[derive(Deserialize)]
struct ResolveForm {
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    note: String,
}

async fn resolve(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    Posted(form): Posted<ResolveForm>,
) -> Page {
    let item = console
        .0
        .review
        .resolve(Console::call(
            &session,
            pb::ResolveRequest {
                decision_id: id.clone(),
                outcome: form.outcome,
                note: form.note,
            },
        ))
        .await?
        .into_inner();
    console.0.sessions.flash(
        &session.id,
        format!("Resolved as {:?} by {}.", item.outcome, item.resolved_by),
    );
    Ok(Redirect::to(&format!("/decisions/{}", pages::url_encode(&id))).into_response())
}

async fn account(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
) -> Page {
    let history = console
        .0
        .review
        .get_account(Console::call(
            &session,
            pb::GetAccountRequest {
                account_id: id,
                limit: 100,
            },
        ))
        .await?
        .into_inner();
    Ok(pages::account(&session, &history, now_ms()).into_response())
}

async fn fleet(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
) -> Page {
    let fleet = console
        .0
        .review
        .get_fleet(Console::call(
            &session,
            pb::GetFleetRequest { fleet_id: id },
        ))
        .await?
        .into_inner();
    let fleet_id = fleet.summary.as_ref().map_or("", |s| s.fleet_id.as_str());
    let former: &[String] = fleet
        .summary
        .as_ref()
        .map_or(&[], |s| s.former_fleet_ids.as_slice());
    let now = now_ms();
    let audit = console.audit()?;
    console
        .0
        .review
        .log_read(
            &session.reviewer,
            "ListOverrides",
            serde_json::json!({ "show": "active", "fleet_id": fleet_id }),
        )
        .await?;
    let mut overrides = audit.reads().overrides().await?;
    // An override on an id the fleet had before holds for it too.
    overrides.retain(|o| {
        o.scope == "fleet" && (o.value == fleet_id || former.contains(&o.value)) && o.active_at(now)
    });
    let queue = format!("/queue?status=all&fleet={}", pages::url_encode(fleet_id));
    Ok(pages::fleet(&session, &fleet, &overrides, &queue, now).into_response())
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct OverridesQuery {
    /// `active` (the default) or `all`.
    show: String,
}

async fn overrides(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Query(q): Query<OverridesQuery>,
) -> Page {
    let all = match q.show.as_str() {
        "" | "active" => false,
        "all" => true,
        other => {
            return Err(Failure::bad_request(format!(
                "show: {:?} is not active or all",
                excerpt(other)
            )));
        }
    };
    let audit = console.audit()?;
    console
        .0
        .review
        .log_read(
            &session.reviewer,
            "ListOverrides",
            serde_json::json!({ "show": if all { "all" } else { "active" } }),
        )
        .await?;
    let now = now_ms();
    let mut list = audit.reads().overrides().await?;
    list.retain(|o| all || o.active_at(now));
    list.sort_by_key(|o| std::cmp::Reverse(o.created_at_ms));
    Ok(pages::overrides(&session, &list, all, now).into_response())
}

/// The override form: the Review API's fields; the expiry as `expires_at_unix_ms` or, easier
/// in a form, `expires_in_days` (empty or 0: never).
#[derive(Deserialize)]
struct OverrideForm {
    #[serde(default)]
    scope: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    expires_at_unix_ms: String,
    #[serde(default)]
    expires_in_days: String,
    #[serde(default)]
    return_to: String,
}

/// A whole number from a form field, empty meaning 0; the error names the field.
fn form_number(field: &str, text: &str) -> Result<i64, Failure> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(0);
    }
    text.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
        Failure::bad_request(format!(
            "{field}: {:?} is not a whole number",
            excerpt(text)
        ))
    })
}

async fn set_override(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Posted(form): Posted<OverrideForm>,
) -> Page {
    let at = form_number("expires_at_unix_ms", &form.expires_at_unix_ms)?;
    let days = form_number("expires_in_days", &form.expires_in_days)?;
    if at != 0 && days != 0 {
        return Err(Failure::bad_request(
            "expires_in_days: give it or expires_at_unix_ms, not both",
        ));
    }
    if days > 3650 {
        return Err(Failure::bad_request("expires_in_days: at most 3650"));
    }
    let expires_at_unix_ms = if at != 0 {
        at
    } else if days != 0 {
        now_ms() + days * 86_400_000
    } else {
        0
    };
    let created = console
        .0
        .review
        .set_override(Console::call(
            &session,
            pb::SetOverrideRequest {
                scope: form.scope,
                value: form.value,
                action: form.action,
                reason: form.reason,
                expires_at_unix_ms,
            },
        ))
        .await?
        .into_inner();
    console.0.sessions.flash(
        &session.id,
        format!(
            "Override {} set: {} {} → {}.",
            created.id, created.scope, created.value, created.action
        ),
    );
    let back = if form.return_to.is_empty() {
        "/overrides"
    } else {
        local_path(&form.return_to)
    };
    Ok(Redirect::to(back).into_response())
}

#[derive(Deserialize)]
struct RemoveForm {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    return_to: String,
}

async fn remove_override(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    Posted(form): Posted<RemoveForm>,
) -> Page {
    // The API takes an optional reason; a reviewer removing one by hand in the console says why.
    if form.reason.trim().is_empty() {
        return Err(Failure::bad_request(
            "reason: required (say why the override goes)",
        ));
    }
    let removed = console
        .0
        .review
        .remove_override(Console::call(
            &session,
            pb::RemoveOverrideRequest {
                id,
                reason: form.reason,
            },
        ))
        .await?
        .into_inner();
    console.0.sessions.flash(
        &session.id,
        format!(
            "Override {} removed ({} {}).",
            removed.id, removed.scope, removed.value
        ),
    );
    let back = if form.return_to.is_empty() {
        "/overrides"
    } else {
        local_path(&form.return_to)
    };
    Ok(Redirect::to(back).into_response())
}

async fn replay_form(Extension(session): Extension<Session>) -> Response {
    pages::replay(&session, &pages::ReplayInput::default(), None).into_response()
}

async fn replay(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Posted(input): Posted<pages::ReplayInput>,
) -> Page {
    let since_unix_ms = crate::store::parse_since(
        if input.since.trim().is_empty() {
            "30d"
        } else {
            input.since.trim()
        },
        now_ms(),
    )
    .map_err(|e| Failure::bad_request(format!("since: {e}")))?;
    let max_samples = u32::try_from(form_number("max_samples", &input.max_samples)?)
        .map_err(|_| Failure::bad_request("max_samples: too large"))?;
    if input.policy_toml.trim().is_empty() {
        return Err(Failure::bad_request(
            "policy_toml: required (paste or upload a candidate policy)",
        ));
    }
    let report = console
        .0
        .review
        .replay(Console::call(
            &session,
            pb::ReplayRequest {
                policy_toml: input.policy_toml.clone(),
                since_unix_ms,
                max_samples,
            },
        ))
        .await;
    match report {
        Ok(report) => {
            Ok(pages::replay(&session, &input, Some(&report.into_inner())).into_response())
        }
        // An invalid policy: the form again, with the problem, so the reviewer can fix it.
        Err(status) if status.code() == Code::InvalidArgument => Ok((
            StatusCode::BAD_REQUEST,
            pages::replay_error(&session, &input, status.message()),
        )
            .into_response()),
        Err(status) => Err(status.into()),
    }
}

async fn audit(State(console): State<Console>, Extension(session): Extension<Session>) -> Page {
    let audit = console.audit()?;
    console
        .0
        .review
        .log_read(&session.reviewer, "VerifyAudit", serde_json::json!({}))
        .await?;
    // One walk at a time; a fresh one is shown to everyone who asked meanwhile.
    let mut last = console.0.verified.lock().await;
    let report = match last.as_ref() {
        Some((at, report)) if at.elapsed() < VERIFY_REUSE => report.clone(),
        _ => {
            let report = audit.reads().verify(console.0.chain_key.clone()).await?;
            *last = Some((Instant::now(), report.clone()));
            report
        }
    };
    let age = last.as_ref().map_or(Duration::ZERO, |(at, _)| at.elapsed());
    drop(last);
    let location = match audit.reads() {
        crate::store::Reads::Sqlite { .. } => "the SQLite store",
        crate::store::Reads::Postgres(_) => "the PostgreSQL store",
    };
    let (ok, lines) = report.lines(location, None);
    Ok(pages::audit(&session, ok, &lines, &report.head_text(), age).into_response())
}

#[cfg(test)]
mod tests;
