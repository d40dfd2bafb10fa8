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
            ApiError::Geo(GeoError::NoLocationDatabase) => Code::Unavailable,
            ApiError::Geo(_) => Code::Internal,
        }
    }

    /// The canonical gRPC name of [`ApiError::code`], e.g. `INVALID_ARGUMENT`.
    pub fn code_name(&self) -> &'static str {
        match self.code() {
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::Unavailable => "UNAVAILABLE",
            _ => "INTERNAL",
        }
    }

    /// The request field at fault, where there is one.
    pub fn field(&self) -> &str {
        match self {
            ApiError::InvalidArgument { field, .. } => field,
            ApiError::TooLarge { .. } => "request",
            ApiError::Geo(_) => "",
        }
    }
}

/// At most the first 64 bytes of caller input (on a character boundary), for error messages:
/// enough to recognise the value, never a whole hostile payload echoed back.
pub fn excerpt(text: &str) -> &str {
    let mut end = text.len().min(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        if error.code() == Code::Internal {
            tracing::error!(%error, "request failed");
        }
        Status::new(error.code(), error.to_string())
    }
}
