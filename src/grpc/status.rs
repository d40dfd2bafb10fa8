//! The one place errors become gRPC statuses.

use tonic::{Code, Status};

use crate::geo::GeoError;

/// Everything a handler can fail with, each a cause the caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; `field` is its path in the request ("account.billing_country").
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// A message, as received, is larger than `max_request_bytes`.
    #[error("message is {size} bytes, above the limit of {limit} bytes (max_request_bytes)")]
    TooLarge { size: usize, limit: usize },
    /// The bytes are not the message they should be (garbage, too deeply nested, a string that
    /// is not UTF-8): the sender's error. prost's text names the field where it can.
    #[error("message could not be decoded: {}", decode_problem(.0))]
    Undecodable(prost::DecodeError),
    #[error(transparent)]
    Geo(#[from] GeoError),
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (already resolved, already removed).
    #[error("{0}")]
    Conflict(String),
    /// A feature the configuration leaves off.
    #[error("{0}")]
    NotConfigured(String),
    #[error("store: {0}")]
    Store(String),
    /// A dependency (the PostgreSQL store) cannot be reached now; retrying later may work.
    #[error("{0}")]
    Unavailable(String),
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match error {
            StoreError::NotFound(message) => ApiError::NotFound(message),
            StoreError::Conflict(message) => ApiError::Conflict(message),
            StoreError::Unavailable(message) => ApiError::Unavailable(message),
            other => ApiError::Store(other.to_string()),
        }
    }
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument { .. } | ApiError::Undecodable(_) => Code::InvalidArgument,
            ApiError::TooLarge { .. } => Code::ResourceExhausted,
            ApiError::Geo(GeoError::NoLocationDatabase) | ApiError::Unavailable(_) => {
                Code::Unavailable
            }
            ApiError::Geo(_) | ApiError::Store(_) => Code::Internal,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::Conflict(_) | ApiError::NotConfigured(_) => Code::FailedPrecondition,
        }
    }

    /// The canonical gRPC name of [`ApiError::code`], e.g. `INVALID_ARGUMENT`.
    pub fn code_name(&self) -> &'static str {
        code_name(self.code())
    }

    /// What the caller is told: the error's text, bounded (see [`MAX_MESSAGE_BYTES`]). Every
    /// message a caller sees comes from here.
    pub fn message(&self) -> String {
        bounded(&self.to_string()).into_owned()
    }

    /// The request field at fault, where there is one.
    pub fn field(&self) -> &str {
        match self {
            ApiError::InvalidArgument { field, .. } => field,
            ApiError::TooLarge { .. } | ApiError::Undecodable(_) => "request",
            _ => "",
        }
    }
}

pub use crate::excerpt;

/// The canonical gRPC name of the codes regionguard answers with, e.g. `INVALID_ARGUMENT`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::Unavailable => "UNAVAILABLE",
        Code::NotFound => "NOT_FOUND",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Unauthenticated => "UNAUTHENTICATED",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::Cancelled => "CANCELLED",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

/// prost's decode error as a caller reads it: what was wrong, then where, outermost field first
/// (prost lists the innermost first), a run of one field (a recursive chain) written once with
/// its count: `recursion limit reached (at ClassifyRequest.account > … > Owner.owners ×97)`.
fn decode_problem(error: &prost::DecodeError) -> String {
    fn is_field(text: &str) -> bool {
        let name = |part: &str| {
            !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        text.split_once('.')
            .is_some_and(|(m, f)| name(m) && name(f))
    }
    let text = error.to_string();
    let mut rest = text
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&text);
    let mut inner_first = Vec::new();
    while let Some((head, tail)) = rest.split_once(": ")
        && is_field(head)
    {
        inner_first.push(head);
        rest = tail;
    }
    let mut path: Vec<(&str, usize)> = Vec::new();
    for field in inner_first.into_iter().rev() {
        match path.last_mut() {
            Some((last, count)) if *last == field => *count += 1,
            _ => path.push((field, 1)),
        }
    }
    if path.is_empty() {
        return rest.to_owned();
    }
    let at: Vec<String> = path
        .into_iter()
        .map(|(field, count)| match count {
            1 => field.to_owned(),
            n => format!("{field} ×{n}"),
        })
        .collect();
    format!("{rest} (at {})", at.join(" > "))
}

/// The longest message a caller is sent, in bytes: `grpc-message` travels in a header, and a
/// client with a 16 KiB header limit must see the real error, not RESOURCE_EXHAUSTED. Values
/// quoted in messages are [`excerpt`]s already; this bounds whatever else a message carries.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// `text` cut to at most [`MAX_MESSAGE_BYTES`] (on a character boundary, ending in `…` when cut).
pub fn bounded(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_MESSAGE_BYTES {
        return text.into();
    }
    const MARK: &str = "…";
    let mut end = MAX_MESSAGE_BYTES - MARK.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &text[..end]).into()
}

impl From<crate::store::StoreError> for Status {
    fn from(error: crate::store::StoreError) -> Self {
        ApiError::from(error).into()
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        if error.code() == Code::Internal {
            tracing::error!(%error, "request failed");
        }
        Status::new(error.code(), error.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_bounded_whatever_it_carries() {
        let huge = "é".repeat(100_000);
        let error = ApiError::invalid("account.organization.name", huge.clone());
        let message = error.message();
        assert!(message.len() <= MAX_MESSAGE_BYTES, "{}", message.len());
        assert!(message.starts_with("account.organization.name: é"));
        assert!(message.ends_with('…'));
        let status = Status::from(ApiError::NotFound(huge));
        assert!(status.message().len() <= MAX_MESSAGE_BYTES);
        assert_eq!(
            ApiError::invalid("ip", "required").message(),
            "ip: required"
        );
    }

    #[test]
    fn a_decode_error_says_what_then_where_outermost_first() {
        use crate::grpc::pb;
        use prost::Message;
        let not_utf8 = [0x0a, 0x02, 0xff, 0xfe];
        let error = pb::ClassifyRequest::decode(&not_utf8[..]).unwrap_err();
        assert_eq!(
            ApiError::Undecodable(error).to_string(),
            "message could not be decoded: invalid string value: data is not UTF-8 encoded (at ClassifyRequest.ip)"
        );
        let mut owner = pb::Owner::default();
        for _ in 0..120 {
            owner = pb::Owner {
                owners: vec![owner],
                ..Default::default()
            };
        }
        let deep = pb::ClassifyRequest {
            account: Some(pb::Account {
                organization: Some(pb::Organization {
                    owners: vec![owner],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let error = pb::ClassifyRequest::decode(deep.encode_to_vec().as_slice()).unwrap_err();
        let message = ApiError::Undecodable(error).message();
        assert!(
            message.starts_with("message could not be decoded: recursion limit reached (at ClassifyRequest.account > Account.organization > Organization.owners > Owner.owners ×"),
            "{message}"
        );
        let garbage = pb::ClassifyRequest::decode(&[0x0f, 0xff][..]).unwrap_err();
        assert_eq!(
            ApiError::Undecodable(garbage).to_string(),
            "message could not be decoded: invalid wire type value: 7"
        );
    }
}
