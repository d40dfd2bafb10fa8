//! Caller separation: gateways may call the Classifier, Check and Usage; reviewers call Review.
//!
//! Callers present `authorization: Bearer <token>`; the config holds only SHA-256 hashes of the
//! tokens, with a name and a role per caller. A tonic interceptor per service checks the role
//! and puts the caller's identity in the request for handlers (reviewer identity on overrides
//! and in the audit log). With no gateway callers configured the gateway services are open (a
//! single-machine default); the Review service is never open.

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

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CallerConfig {
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of the bearer token (`printf %s TOKEN | sha256sum`).
    pub token_sha256: String,
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
            if earlier
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
            let hex = &caller.token_sha256;
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "auth.callers[{i}].token_sha256 must be 64 hex digits (SHA-256 of the token)"
                ));
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
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The interceptor guarding one service for one role.
#[derive(Clone)]
pub struct Gate {
    callers: Arc<Vec<CallerConfig>>,
    role: Role,
}

impl Gate {
    pub fn new(config: &AuthConfig, role: Role) -> Self {
        let callers = config
            .callers
            .iter()
            .map(|c| CallerConfig {
                token_sha256: c.token_sha256.to_ascii_lowercase(),
                ..c.clone()
            })
            .collect();
        Self {
            callers: Arc::new(callers),
            role,
        }
    }
}

impl Interceptor for Gate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let token = header.and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        });
        let open =
            self.role == Role::Gateway && !self.callers.iter().any(|c| c.role == Role::Gateway);
        let Some(token) = token else {
            return if open {
                Ok(request)
            } else {
                Err(Status::unauthenticated(
                    "authorization: a bearer token is required",
                ))
            };
        };
        let hash = token_sha256(token.trim());
        let Some(caller) = self.callers.iter().find(|c| c.token_sha256 == hash) else {
            return if open {
                Ok(request)
            } else {
                Err(Status::unauthenticated("authorization: unknown token"))
            };
        };
        if caller.role != self.role {
            return Err(Status::permission_denied(format!(
                "{} ({:?}) may not call this service",
                caller.name, caller.role
            )));
        }
        request.extensions_mut().insert(Caller {
            name: caller.name.clone(),
            role: caller.role,
        });
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
                },
                CallerConfig {
                    name: "alice".into(),
                    role: Role::Reviewer,
                    token_sha256: token_sha256("r-secret"),
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
                    token_sha256: "abc".into()
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
                    ..config().callers[0].clone()
                },
            ],
        };
        assert!(same_name.validate().unwrap_err().contains("twice"));
    }
}
