//! Caller separation: gateways may call the Classifier, Check and Usage; reviewers call Review.
//!
//! Callers present `authorization: Bearer <token>`, or, over mTLS, a client certificate the
//! config names; the config holds only SHA-256 hashes (of each token, and of each certificate's
//! DER, as Envoy's `verify_certificate_hash` does), with a name and a role per caller. A token,
//! when sent, decides; without one, a registered client certificate does. A tonic interceptor
//! per service checks the role and puts the caller's identity in the request for handlers
//! (reviewer identity on overrides and in the audit log). With no gateway callers configured
//! the gateway services are open (a single-machine default); the Review service is never open.

use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::service::Interceptor;
use tonic::{Request, Status};

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Gateway,
    Reviewer,
}

#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CallerConfig {
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of the bearer token (`printf %s TOKEN | sha256sum`); empty for a caller
    /// known only by its client certificate.
    #[serde(default)]
    pub token_sha256: String,
    /// Hex SHA-256 of the DER of each client certificate this caller may present over mTLS
    /// (`openssl x509 -in cert.pem -outform DER | sha256sum`); colons allowed. Several, so a
    /// certificate can be rotated without a gap.
    #[serde(default)]
    pub client_cert_sha256: Vec<String>,
}

/// The config is logged at start: a token's hash never (a weak token falls to a dictionary
/// against it). Certificate fingerprints are of public certificates and stay.
impl std::fmt::Debug for CallerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerConfig")
            .field("name", &self.name)
            .field("role", &self.role)
            .field(
                "token_sha256",
                &if self.token_sha256.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("client_cert_sha256", &self.client_cert_sha256)
            .finish()
    }
}

/// The token of an `authorization` header with the Bearer scheme: the scheme is
/// case-insensitive (RFC 7235 §2.1) and followed by one or more spaces.
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_matches(' '))
}

/// A hex SHA-256 as configured, lower case without colons, if it is one.
fn fingerprint(hex: &str) -> Option<String> {
    let hex: String = hex.chars().filter(|&c| c != ':').collect();
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

/// `[auth]` in the config file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub callers: Vec<CallerConfig>,
}

impl AuthConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (i, caller) in self.callers.iter().enumerate() {
            let earlier = &self.callers[..i];
            if !caller.token_sha256.is_empty()
                && earlier
                    .iter()
                    .any(|c| c.token_sha256.eq_ignore_ascii_case(&caller.token_sha256))
            {
                return Err(format!(
                    "auth.callers[{i}]: the same token is configured twice"
                ));
            }
            if earlier.iter().any(|c| c.name == caller.name) {
                return Err(format!(
                    "auth.callers[{i}]: the name {:?} is configured twice (identities must be unique)",
                    caller.name
                ));
            }
            if caller.token_sha256.is_empty() && caller.client_cert_sha256.is_empty() {
                return Err(format!(
                    "auth.callers[{i}]: token_sha256 or client_cert_sha256 is required"
                ));
            }
            if !caller.token_sha256.is_empty() && fingerprint(&caller.token_sha256).is_none() {
                return Err(format!(
                    "auth.callers[{i}].token_sha256 must be 64 hex digits (SHA-256 of the token)"
                ));
            }
            for (j, cert) in caller.client_cert_sha256.iter().enumerate() {
                let Some(cert) = fingerprint(cert) else {
                    return Err(format!(
                        "auth.callers[{i}].client_cert_sha256[{j}] must be 64 hex digits (SHA-256 of the certificate's DER)"
                    ));
                };
                let seen = self.callers[..=i]
                    .iter()
                    .flat_map(|c| &c.client_cert_sha256);
                if seen
                    .filter(|c| fingerprint(c).as_deref() == Some(&cert))
                    .count()
                    > 1
                {
                    return Err(format!(
                        "auth.callers[{i}].client_cert_sha256[{j}]: the same certificate is configured twice"
                    ));
                }
            }
            if caller.name.trim().is_empty() {
                return Err(format!("auth.callers[{i}].name is required"));
            }
        }
        Ok(())
    }
}

/// Who is calling, as the interceptor established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

pub fn token_sha256(token: &str) -> String {
    crate::hex(&Sha256::digest(token.as_bytes()))
}

/// A caller as the gate matches it: digests decoded once, compared as bytes per request.
struct Known {
    name: String,
    role: Role,
    token: Option<[u8; 32]>,
    certs: Vec<[u8; 32]>,
}

/// 32 bytes from a configured hex SHA-256 (colons allowed), if it is one.
fn digest_bytes(hex: &str) -> Option<[u8; 32]> {
    let hex = fingerprint(hex)?;
    let mut bytes = [0u8; 32];
    for (byte, pair) in bytes.iter_mut().zip(hex.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(bytes)
}

/// The interceptor guarding one service for one role.
#[derive(Clone)]
pub struct Gate {
    callers: Arc<Vec<Known>>,
    role: Role,
    /// Whether any caller is known by a certificate: if none is, no certificate is hashed.
    by_certificate: bool,
}

impl Gate {
    pub fn new(config: &AuthConfig, role: Role) -> Self {
        let callers: Vec<Known> = config
            .callers
            .iter()
            .map(|c| Known {
                name: c.name.clone(),
                role: c.role,
                token: digest_bytes(&c.token_sha256),
                certs: c
                    .client_cert_sha256
                    .iter()
                    .filter_map(|h| digest_bytes(h))
                    .collect(),
            })
            .collect();
        Self {
            by_certificate: callers.iter().any(|c| !c.certs.is_empty()),
            callers: Arc::new(callers),
            role,
        }
    }

    /// The caller a request identifies: by its bearer token when it sends one (`Err` for an
    /// unknown token), else by its mTLS client certificate; `Ok(None)` when neither names one.
    fn identify(&self, request: &Request<()>) -> Result<Option<&Known>, &'static str> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let token = header.and_then(bearer_token);
        if let Some(token) = token {
            return self
                .by_token(token)
                .map(Some)
                .ok_or("authorization: unknown token");
        }
        if !self.by_certificate {
            return Ok(None);
        }
        let Some(certs) = crate::connections::peer_certs(request.extensions()) else {
            return Ok(None);
        };
        let Some(leaf) = certs.first() else {
            return Ok(None);
        };
        let hash: [u8; 32] = Sha256::digest(leaf.as_ref()).into();
        Ok(self.callers.iter().find(|c| c.certs.contains(&hash)))
    }
}

impl Gate {
    /// The caller whose token this is (compared as SHA-256 digests).
    fn by_token(&self, token: &str) -> Option<&Known> {
        let hash: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        self.callers.iter().find(|c| c.token == Some(hash))
    }

    /// The caller of this gate's role a token names (the console's sign-in).
    pub fn caller_for_token(&self, token: &str) -> Option<Caller> {
        if token.trim().is_empty() {
            return None;
        }
        self.by_token(token)
            .filter(|c| c.role == self.role)
            .map(|c| Caller {
                name: c.name.clone(),
                role: c.role,
            })
    }

    /// Whether this gate lets anyone in without a token (the gateway role with no gateway
    /// callers configured).
    fn is_open(&self) -> bool {
        self.role == Role::Gateway && !self.callers.iter().any(|c| c.role == Role::Gateway)
    }

    /// Whether a token lets a caller through, for transports without gRPC metadata (HTTP
    /// forward-auth), with the same rule as the interceptor: an open gate takes anyone, else
    /// the token must be this role's; the error says what is wrong.
    pub fn admits_token(&self, token: Option<&str>) -> Result<(), String> {
        match token
            .filter(|t| !t.trim().is_empty())
            .map(|t| self.by_token(t))
        {
            _ if self.is_open() => Ok(()),
            Some(Some(caller)) if caller.role == self.role => Ok(()),
            Some(Some(_)) => Err(format!("not a {:?} token", self.role).to_lowercase()),
            Some(None) => Err("unknown token".to_owned()),
            None => Err("a token is required".to_owned()),
        }
    }
}

impl Interceptor for Gate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let open = self.is_open();
        let caller = match self.identify(&request) {
            Ok(Some(caller)) => caller,
            _ if open => return Ok(request),
            Ok(None) => {
                return Err(Status::unauthenticated(
                    "authorization: a bearer token (or a registered client certificate) is required",
                ));
            }
            Err(message) => return Err(Status::unauthenticated(message)),
        };
        if caller.role != self.role {
            return Err(Status::permission_denied(format!(
                "{} ({:?}) may not call this service",
                caller.name, caller.role
            )));
        }
        let identity = Caller {
            name: caller.name.clone(),
            role: caller.role,
        };
        request.extensions_mut().insert(identity);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AuthConfig {
        AuthConfig {
            callers: vec![
                CallerConfig {
                    name: "edge".into(),
                    role: Role::Gateway,
                    token_sha256: token_sha256("g-secret"),
                    client_cert_sha256: Vec::new(),
                },
                CallerConfig {
                    name: "alice".into(),
                    role: Role::Reviewer,
                    token_sha256: token_sha256("r-secret"),
                    client_cert_sha256: Vec::new(),
                },
            ],
        }
    }

    fn call(gate: &mut Gate, token: Option<&str>) -> Result<Request<()>, Status> {
        let mut request = Request::new(());
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        gate.call(request)
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER abc"), Some("abc"));
        assert_eq!(bearer_token("bEaReR   abc "), Some("abc"));
        assert_eq!(bearer_token("Bearerabc"), None);
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }

    #[test]
    fn the_config_never_shows_a_token_hash() {
        let shown = format!("{:?}", config());
        assert!(
            shown.contains("alice") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(!shown.contains(&token_sha256("r-secret")), "{shown}");
    }

    #[test]
    fn roles_are_separated() {
        let mut review = Gate::new(&config(), Role::Reviewer);
        let ok = call(&mut review, Some("r-secret")).unwrap();
        assert_eq!(ok.extensions().get::<Caller>().unwrap().name, "alice");
        assert_eq!(
            call(&mut review, Some("g-secret")).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            call(&mut review, Some("nope")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            call(&mut review, None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut gateway = Gate::new(&config(), Role::Gateway);
        assert!(call(&mut gateway, Some("g-secret")).is_ok());
        assert_eq!(
            call(&mut gateway, None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            call(&mut gateway, Some("r-secret")).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn without_gateway_callers_the_gateway_services_are_open_and_review_is_closed() {
        let mut gateway = Gate::new(&AuthConfig::default(), Role::Gateway);
        assert!(call(&mut gateway, None).is_ok());
        let mut review = Gate::new(&AuthConfig::default(), Role::Reviewer);
        assert_eq!(
            call(&mut review, Some("anything")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(
            AuthConfig {
                callers: vec![CallerConfig {
                    name: "x".into(),
                    role: Role::Reviewer,
                    token_sha256: "abc".into(),
                    client_cert_sha256: Vec::new(),
                }]
            }
            .validate()
            .is_err()
        );
        let twice = AuthConfig {
            callers: vec![
                config().callers[0].clone(),
                CallerConfig {
                    name: "other".into(),
                    ..config().callers[0].clone()
                },
            ],
        };
        assert!(twice.validate().unwrap_err().contains("same token"));
        let same_name = AuthConfig {
            callers: vec![
                config().callers[0].clone(),
                CallerConfig {
                    token_sha256: token_sha256("x"),
                    client_cert_sha256: Vec::new(),
                    ..config().callers[0].clone()
                },
            ],
        };
        assert!(same_name.validate().unwrap_err().contains("twice"));
    }

    #[test]
    fn a_caller_may_be_known_by_its_client_certificate_alone() {
        let cert = |hashes: Vec<String>| AuthConfig {
            callers: vec![CallerConfig {
                name: "edge".into(),
                role: Role::Gateway,
                token_sha256: String::new(),
                client_cert_sha256: hashes,
            }],
        };
        let colons: String = token_sha256("der")
            .as_bytes()
            .chunks(2)
            .map(|pair| std::str::from_utf8(pair).unwrap().to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(cert(vec![colons.clone()]).validate(), Ok(()));
        assert_eq!(
            cert(vec![]).validate().unwrap_err(),
            "auth.callers[0]: token_sha256 or client_cert_sha256 is required"
        );
        assert!(
            cert(vec!["abc".into()])
                .validate()
                .unwrap_err()
                .starts_with("auth.callers[0].client_cert_sha256[0] must be 64 hex digits")
        );
        let mut twice = cert(vec![colons.clone()]);
        twice.callers.push(CallerConfig {
            name: "other".into(),
            client_cert_sha256: vec![token_sha256("der")],
            ..twice.callers[0].clone()
        });
        assert!(
            twice
                .validate()
                .unwrap_err()
                .contains("same certificate is configured twice")
        );
        // Without a token and without TLS, a cert-only caller is not identified.
        let mut gate = Gate::new(&cert(vec![colons]), Role::Gateway);
        assert_eq!(
            call(&mut gate, None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
