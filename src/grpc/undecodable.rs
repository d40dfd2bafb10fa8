//! Envoy's `Authorization/Check` is served by the server envoy-types ships, generated with
//! prost's own codec: there a request that does not decode is INTERNAL, as tonic words it
//! (`failed to decode Protobuf message: …`). It is the caller's error, as on our own services
//! (`codec.rs`): this wrapper turns that one answer into INVALID_ARGUMENT, bounded like every
//! message (`status.rs`), and leaves every other answer as it is.

use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;
use tonic::{Code, Status};
use tower::Service;
use tower::util::MapResponse;

use crate::grpc::bounded;

/// How tonic words a request it could not decode, as its `grpc-message` header carries it
/// (percent-encoded).
const TONIC_DECODE_ERROR: &str = "failed to decode Protobuf message";

/// What the answer goes through.
type Rewrite = fn(Response<Body>) -> Response<Body>;

/// `service`, with its undecodable requests answered INVALID_ARGUMENT.
#[derive(Clone)]
pub struct DecodeErrorsInvalid<S>(MapResponse<S, Rewrite>);

impl<S> DecodeErrorsInvalid<S> {
    pub fn new(service: S) -> Self {
        Self(MapResponse::new(service, rewrite))
    }
}

impl<S: NamedService> NamedService for DecodeErrorsInvalid<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for DecodeErrorsInvalid<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future =
        <MapResponse<S, fn(Response<Body>) -> Response<Body>> as Service<Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        self.0.call(request)
    }
}

/// An INTERNAL answer in tonic's words for an undecodable request, as INVALID_ARGUMENT.
fn rewrite(mut response: Response<Body>) -> Response<Body> {
    let headers = response.headers_mut();
    if headers.get("grpc-status").is_none_or(|s| s != "13") {
        return response;
    }
    let Some(message) = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(|m| {
            percent_encoding::percent_decode_str(m)
                .decode_utf8_lossy()
                .into_owned()
        })
    else {
        return response;
    };
    let Some(detail) = message.strip_prefix(TONIC_DECODE_ERROR) else {
        return response;
    };
    let detail = detail.trim_start_matches(':').trim();
    let status = Status::new(
        Code::InvalidArgument,
        bounded(&format!("message could not be decoded: {detail}")).into_owned(),
    );
    if status.add_header(headers).is_err() {
        tracing::debug!("an undecodable Check's status could not be rewritten");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: &Status) -> Response<Body> {
        status.clone().into_http()
    }

    fn status_of(response: &Response<Body>) -> (String, String) {
        let header = |name: &str| {
            let value = response.headers().get(name).unwrap().to_str().unwrap();
            percent_encoding::percent_decode_str(value)
                .decode_utf8_lossy()
                .into_owned()
        };
        (header("grpc-status"), header("grpc-message"))
    }

    #[test]
    fn only_tonics_decode_error_becomes_invalid_argument() {
        let undecodable =
            Status::internal("failed to decode Protobuf message: invalid wire type value: 7");
        assert_eq!(
            status_of(&rewrite(answered(&undecodable))),
            (
                "3".into(),
                "message could not be decoded: invalid wire type value: 7".into()
            )
        );
        for other in [
            Status::internal("the store failed"),
            Status::unavailable("failed to decode Protobuf message: not ours"),
        ] {
            let before = status_of(&answered(&other));
            assert_eq!(status_of(&rewrite(answered(&other))), before);
        }
    }
}
