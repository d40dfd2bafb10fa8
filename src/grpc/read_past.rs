//! Request streams that go on past a message that does not decode.
//!
//! The generated servers decode every message with the service's request type, so a stream
//! reader sees an undecodable message only as the stream's error, after which tonic reads
//! nothing more. [`ReadPast`] serves one streaming method of a generated server itself, through
//! [`ReadPastCodec`], whose items are the message or why it could not be read; the method's
//! handler ([`StreamRoute`]) answers that one message with an error and reads on. Every other
//! method goes to the generated server unchanged.
//!
//! A message over `max_request_bytes` still ends the stream: [`crate::grpc::MessageLimit`]
//! refuses it as it arrives, before anything buffers it.

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::BoxFuture;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;
use tower::Service;

pub use super::codec::{ReadPastCodec, Readable};

/// A streaming method served through [`ReadPastCodec`].
pub trait StreamRoute: Clone + Send + 'static {
    /// The method's path, `/package.Service/Method`.
    const PATH: &'static str;

    /// Serves one call of the method; `max_decoding` bounds one message, as on the generated
    /// server.
    fn serve(
        self,
        request: Request<Body>,
        max_decoding: usize,
    ) -> BoxFuture<Response<Body>, Infallible>;
}

/// The gRPC handling a [`StreamRoute`] serves its method with: the generated servers' own (no
/// compression, one message at most `max_decoding` bytes), through [`ReadPastCodec`].
pub fn grpc<T, U>(max_decoding: usize) -> tonic::server::Grpc<ReadPastCodec<T, U>>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    tonic::server::Grpc::new(ReadPastCodec::default())
        .apply_max_message_size_config(Some(max_decoding), None)
}

/// The generated server `S`, with the method `R` serves read past undecodable messages.
#[derive(Clone)]
pub struct ReadPast<S, R> {
    inner: S,
    route: R,
    max_decoding: usize,
}

impl<S, R> ReadPast<S, R> {
    pub fn new(inner: S, route: R, max_decoding: usize) -> Self {
        Self {
            inner,
            route,
            max_decoding,
        }
    }
}

impl<S: NamedService, R> NamedService for ReadPast<S, R> {
    const NAME: &'static str = S::NAME;
}

impl<S, R> Service<Request<Body>> for ReadPast<S, R>
where
    S: Service<
            Request<Body>,
            Response = Response<Body>,
            Error = Infallible,
            Future = BoxFuture<Response<Body>, Infallible>,
        >,
    R: StreamRoute,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Response<Body>, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if request.uri().path() == R::PATH {
            self.route.clone().serve(request, self.max_decoding)
        } else {
            self.inner.call(request)
        }
    }
}
