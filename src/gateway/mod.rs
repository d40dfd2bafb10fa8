//! The API-gateway adapter: Envoy's `ext_authz` v3 `Authorization/Check` on the same port as
//! the Classifier. It maps a CheckRequest to classifier input (client address, account, flow),
//! asks the engine, and maps the verdict to headers, dynamic metadata or a denied response.
//! `forward_auth` answers the same checks over HTTP for gateways that ask an HTTP endpoint.
//! It holds no policy logic: what is restricted is the policy's business.

pub mod config;
pub mod forward_auth;
mod path;
pub mod request;
pub mod response;
mod service;

pub use config::{GatewayConfig, OnError, ReviewAction};
pub use forward_auth::ForwardAuthConfig;
pub use service::GatewayService;

/// The encoded descriptor set of `envoy.service.auth.v3` (and its imports), for reflection.
pub const ENVOY_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_ext_authz_descriptor.bin"));

#[cfg(test)]
#[path = "../../tests/support/envoy.rs"]
pub(crate) mod test_envoy;
