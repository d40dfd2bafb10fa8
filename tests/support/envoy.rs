//! CheckRequests shaped as Envoy's ext_authz filter sends them, built from envoy-types.
#![allow(dead_code)]

use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context,
};

/// A CheckRequest from `source` (an address as Envoy reports the downstream peer) for `path`.
pub fn check_request(
    source: &str,
    path: &str,
    headers: &[(&str, &str)],
    context: &[(&str, &str)],
) -> CheckRequest {
    let peer = attribute_context::Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: source.to_owned(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(54321)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    let http = attribute_context::HttpRequest {
        id: "req-1".into(),
        method: "POST".into(),
        path: path.into(),
        host: "api.example.com".into(),
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer),
            request: Some(attribute_context::Request {
                time: None,
                http: Some(http),
            }),
            context_extensions: context
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }),
    }
}
