//! One method of a generated server, served by this project with its own codecs instead.
//!
//! [`Routed`] wraps a generated server and sends the calls of one method ([`Route::PATH`]) to
//! the method's [`Route`]; every other method goes to the generated server unchanged. Two uses:
//!
//! - Request streams that go on past a message that does not decode (ClassifyStream,
//!   Usage/Report). The generated servers decode every message with the request type, so a
//!   stream reader sees an undecodable message only as the stream's error, after which tonic
//!   reads nothing more. Through [`ReadPastCodec`] the items are the message or why it could
//!   not be read, and the handler answers that one message with an error and reads on. A message
//!   over `max_request_bytes` still ends the stream: [`crate::grpc::MessageLimit`] refuses it as
//!   it arrives, before anything buffers it.
//! - Envoy's `Authorization/Check`, whose server envoy-types generates with prost's own codec
//!   (an undecodable request is INTERNAL there): through [`WireCodec`] it is INVALID_ARGUMENT
//!   naming what was wrong, as on every service of ours.
//!
//! The routes are served with [`read_past`]'s or [`wire`]'s settings, which are the generated
//! servers' own as this project configures them (no compression, one message at most
//! `max_decoding` bytes).

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::BoxFuture;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;
use tower::Service;

pub use super::codec::{ReadPastCodec, Readable, WireCodec};

/// A method this project serves itself, in place of the generated server.
pub trait Route: Clone + Send + 'static {
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

/// gRPC handling through [`ReadPastCodec`], for a stream that reads past undecodable messages.
pub fn read_past<T, U>(max_decoding: usize) -> tonic::server::Grpc<ReadPastCodec<T, U>>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    tonic::server::Grpc::new(ReadPastCodec::default())
        .apply_max_message_size_config(Some(max_decoding), None)
}

/// gRPC handling through [`WireCodec`], for a method a foreign generated server carries.
pub fn wire<T, U>(max_decoding: usize) -> tonic::server::Grpc<WireCodec<T, U>>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    tonic::server::Grpc::new(WireCodec::default())
        .apply_max_message_size_config(Some(max_decoding), None)
}

/// The generated server `S`, with the method `R` serves in its place.
#[derive(Clone)]
pub struct Routed<S, R> {
    inner: S,
    route: R,
    max_decoding: usize,
}

impl<S, R> Routed<S, R> {
    pub fn new(inner: S, route: R, max_decoding: usize) -> Self {
        Self {
            inner,
            route,
            max_decoding,
        }
    }
}

impl<S: NamedService, R> NamedService for Routed<S, R> {
    const NAME: &'static str = S::NAME;
}

impl<S, R> Service<Request<Body>> for Routed<S, R>
where
    S: Service<
            Request<Body>,
            Response = Response<Body>,
            Error = Infallible,
            Future = BoxFuture<Response<Body>, Infallible>,
        >,
    R: Route,
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
