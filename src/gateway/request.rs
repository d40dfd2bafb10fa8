//! CheckRequest → classifier input: client address, account, flow; nothing else.
//!
//! The client address is the connection's source unless `trusted_hops` says how many proxies in
//! front of Envoy append to `x-forwarded-for`: then it is the right-most address those proxies
//! did not add. A spoofed `x-forwarded-for` is ignored by default.

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3::address;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context,
};
use envoy_types::pb::google::protobuf::{Struct, value::Kind};

use super::config::GatewayConfig;
use crate::classify::hints::accept_language_regions;
use crate::classify::{AccountFacts, Flow, HintFacts};
use crate::engine::ClassifyInput;
use crate::excerpt;
use crate::grpc::ApiError;
use crate::grpc::convert::{MAX_ID_BYTES, created_at, identifier, verifications};
use crate::region::CountryCode;

/// The route `context_extensions` key naming the flow (`signup`, `login`, `api_request`).
pub const FLOW_KEY: &str = "regionguard.flow";
const XFF: &str = "x-forwarded-for";

/// Why a CheckRequest could not be mapped; `field` is where in the CheckRequest.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct MappingError {
    pub field: String,
    pub message: String,
}

/// A field refused by the conversion Classify uses (ids, creation time): same rule, same words.
impl From<ApiError> for MappingError {
    fn from(refused: ApiError) -> Self {
        match refused {
            ApiError::InvalidArgument { field, message } => MappingError { field, message },
            other => error(other.field(), other.message()),
        }
    }
}

fn error(field: impl Into<String>, message: impl Into<String>) -> MappingError {
    MappingError {
        field: field.into(),
        message: message.into(),
    }
}

/// A check to classify.
#[derive(Clone, Debug)]
pub struct GatewayRequest {
    pub input: ClassifyInput,
}

/// The request path, for the bypass list.
pub fn path(check: &CheckRequest) -> &str {
    http(check).map_or("", |http| http.path.as_str())
}

fn http(check: &CheckRequest) -> Option<&attribute_context::HttpRequest> {
    check.attributes.as_ref()?.request.as_ref()?.http.as_ref()
}

/// A request header by lower-case name, from `headers` or, when Envoy sends raw headers,
/// `header_map`.
fn header<'a>(check: &'a CheckRequest, name: &str) -> Option<&'a str> {
    let http = http(check)?;
    if let Some(value) = http.headers.get(name) {
        return Some(value);
    }
    let map = http.header_map.as_ref()?;
    map.headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .and_then(|h| {
            if h.value.is_empty() {
                std::str::from_utf8(&h.raw_value).ok()
            } else {
                Some(h.value.as_str())
            }
        })
}

pub fn map_check(
    check: &CheckRequest,
    config: &GatewayConfig,
) -> Result<GatewayRequest, MappingError> {
    let attributes = check
        .attributes
        .as_ref()
        .ok_or_else(|| error("attributes", "missing"))?;
    let ip = client_ip(check, attributes, config.trusted_hops)?;
    let flow = match attributes
        .context_extensions
        .get(FLOW_KEY)
        .map(String::as_str)
    {
        None | Some("" | "api_request") => Flow::ApiRequest,
        Some("signup") => Flow::Signup,
        Some("login") => Flow::Login,
        Some(other) => {
            return Err(error(
                format!("context_extensions[{FLOW_KEY}]"),
                format!("{:?} is not signup, login or api_request", excerpt(other)),
            ));
        }
    };
    let account_id = account_id(check, attributes, config)?;
    let account = account(check, config)?;
    let hints = HintFacts {
        language_regions: header(check, "accept-language")
            .map(accept_language_regions)
            .unwrap_or_default(),
        timezone: None,
    };
    Ok(GatewayRequest {
        input: ClassifyInput {
            ip,
            flow,
            account,
            hints,
            usage: None,
            account_id,
            organization_domain: None,
            payment_fingerprint: None,
            request_id: http(check).map(|h| h.id.clone()).unwrap_or_default(),
        },
    })
}

fn parse_address(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    text.parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

fn client_ip(
    check: &CheckRequest,
    attributes: &AttributeContext,
    trusted_hops: u32,
) -> Result<IpAddr, MappingError> {
    const SOURCE: &str = "attributes.source.address.socket_address.address";
    let source = match attributes
        .source
        .as_ref()
        .and_then(|p| p.address.as_ref())
        .and_then(|a| a.address.as_ref())
    {
        Some(address::Address::SocketAddress(socket)) => socket.address.as_str(),
        Some(_) => {
            return Err(error(
                SOURCE,
                "source is not a socket address (pipe or internal)",
            ));
        }
        None => return Err(error(SOURCE, "missing")),
    };
    let source_ip = parse_address(source).ok_or_else(|| {
        error(
            SOURCE,
            format!("{:?} is not an IP address", excerpt(source)),
        )
    })?;
    if trusted_hops == 0 {
        return Ok(source_ip);
    }
    // The chain as the last trusted proxy saw it: x-forwarded-for entries, then the source.
    let Some(xff) = header(check, XFF) else {
        return Ok(source_ip);
    };
    let entries: Vec<&str> = xff
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let hops = trusted_hops as usize;
    // The source is hop 1; entry len-1 is hop 2, and so on. Fewer entries than trusted hops:
    // the request did not pass every trusted proxy, so only the source is known (as Envoy does).
    let Some(index) = entries.len().checked_sub(hops) else {
        return Ok(source_ip);
    };
    let entry = entries[index];
    parse_address(entry).ok_or_else(|| {
        error(
            format!("headers[{XFF}]"),
            format!("entry {index} {:?} is not an IP address", excerpt(entry)),
        )
    })
}

fn account_id(
    check: &CheckRequest,
    attributes: &AttributeContext,
    config: &GatewayConfig,
) -> Result<Option<String>, MappingError> {
    let from_header = config
        .account_header
        .as_deref()
        .and_then(|h| header(check, h))
        .map(|v| {
            (
                format!(
                    "headers[{}]",
                    config.account_header.as_deref().unwrap_or("")
                ),
                v,
            )
        });
    let from_context = attributes
        .context_extensions
        .get(&config.account_context_key)
        .map(|v| {
            (
                format!("context_extensions[{}]", config.account_context_key),
                v.as_str(),
            )
        });
    let from_metadata = config.account_metadata.as_ref().and_then(|m| {
        let namespace = attributes
            .metadata_context
            .as_ref()?
            .filter_metadata
            .get(&m.namespace)?;
        metadata_string(namespace, &m.path)
            .map(|v| (format!("metadata_context[{}].{}", m.namespace, m.path), v))
    });
    match from_header.or(from_context).or(from_metadata) {
        None => Ok(None),
        Some((field, value)) => Ok(identifier(&field, value, MAX_ID_BYTES)?.map(str::to_owned)),
    }
}

/// A string at a dotted path inside a protobuf Struct.
fn metadata_string<'a>(root: &'a Struct, path: &str) -> Option<&'a str> {
    let mut current = root;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let kind = current.fields.get(part)?.kind.as_ref()?;
        match (kind, parts.peek()) {
            (Kind::StringValue(s), None) => return Some(s),
            (Kind::StructValue(inner), Some(_)) => current = inner,
            _ => return None,
        }
    }
    None
}

fn account(check: &CheckRequest, config: &GatewayConfig) -> Result<AccountFacts, MappingError> {
    let names = &config.account_headers;
    let country = |name: &Option<String>| -> Result<Option<CountryCode>, MappingError> {
        let Some(name) = name else { return Ok(None) };
        match header(check, name).map(str::trim) {
            None | Some("") => Ok(None),
            Some(value) => CountryCode::parse(value)
                .map(Some)
                .map_err(|e| error(format!("headers[{name}]"), e.to_string())),
        }
    };
    let created_at_unix = match names
        .created_at_unix
        .as_deref()
        .and_then(|name| header(check, name).map(|v| (name, v.trim())))
    {
        None | Some((_, "")) => None,
        Some((name, value)) => {
            let field = format!("headers[{name}]");
            let t: i64 = value.parse().map_err(|_| {
                error(
                    &field,
                    format!("{:?} is not seconds since the Unix epoch", excerpt(value)),
                )
            })?;
            created_at(&field, t)?
        }
    };
    let verified = match names
        .verifications
        .as_deref()
        .and_then(|name| header(check, name).map(|v| (name, v.trim())))
    {
        None | Some((_, "")) => Vec::new(),
        Some((name, value)) => verifications_header(name, value)?,
    };
    Ok(AccountFacts {
        billing_country: country(&names.billing_country)?,
        phone_country: country(&names.phone_country)?,
        payment_country: country(&names.payment_country)?,
        declared_country: country(&names.declared_country)?,
        created_at_unix,
        organization: None,
        verifications: verified,
    })
}

/// `KIND:COUNTRY:UNIX, …` → checked verifications, by the rules Classify applies to
/// `account.verifications` (errors name `headers[NAME][i]`).
fn verifications_header(
    name: &str,
    value: &str,
) -> Result<Vec<crate::classify::Verification>, MappingError> {
    let mut list = Vec::new();
    for (i, entry) in value.split(',').map(str::trim).enumerate() {
        let field = format!("headers[{name}][{i}]");
        let mut parts = entry.split(':').map(str::trim);
        let (Some(kind), Some(country), Some(at), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(error(
                field,
                format!("{:?} is not KIND:COUNTRY:UNIX", excerpt(entry)),
            ));
        };
        let verified_at_unix = at.parse().map_err(|_| {
            error(
                format!("{field}.verified_at_unix"),
                format!("{:?} is not seconds since the Unix epoch", excerpt(at)),
            )
        })?;
        list.push(crate::grpc::pb::Verification {
            kind: kind.to_owned(),
            country: country.to_owned(),
            verified_at_unix,
        });
    }
    Ok(verifications(&list, |i| format!("headers[{name}][{i}]"))?)
}

#[cfg(test)]
mod tests;
