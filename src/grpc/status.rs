//! The one place errors become gRPC statuses.

use tonic::{Code, Status};

use crate::geo::GeoError;

/// Everything a handler can fail with, each a cause the caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; `field` is its path in the request ("account.billing_country").
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("request is {size} bytes, above the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
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
            ApiError::InvalidArgument { .. } => Code::InvalidArgument,
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
        match self.code() {
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::Unavailable => "UNAVAILABLE",
            Code::NotFound => "NOT_FOUND",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            _ => "INTERNAL",
        }
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
            ApiError::TooLarge { .. } => "request",
            _ => "",
        }
    }
}

pub use crate::excerpt;

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
}
