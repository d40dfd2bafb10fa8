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
//! The routes are served with the settings of [`read_past_streaming`] and its siblings, which are the generated
//! servers' own as this project configures them (no compression, one message at most
//! `max_decoding` bytes).

use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Poll};

use tokio_stream::Stream;
use tonic::Status;
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
    fn serve(self, request: Request<Body>, max_decoding: usize) -> Served;
}

/// The answer to a routed call, as [`Route::serve`] returns it.
pub type Served = BoxFuture<Response<Body>, Infallible>;

/// The generated servers' settings as this project configures them, with `codec`.
fn grpc<C: tonic::codec::Codec + Default>(max_decoding: usize) -> tonic::server::Grpc<C> {
    tonic::server::Grpc::new(C::default()).apply_max_message_size_config(Some(max_decoding), None)
}

/// A bidirectional stream read through [`ReadPastCodec`]: `handle` answers each call.
pub fn read_past_streaming<T, U, F, Fut, S>(
    request: Request<Body>,
    max_decoding: usize,
    handle: F,
) -> Served
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
    F: FnMut(tonic::Request<tonic::Streaming<Readable<U>>>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<tonic::Response<S>, Status>> + Send + 'static,
    S: Stream<Item = Result<T, Status>> + Send + 'static,
{
    Box::pin(async move {
        let mut grpc = grpc::<ReadPastCodec<T, U>>(max_decoding);
        Ok(grpc.streaming(tower::service_fn(handle), request).await)
    })
}

/// A client stream read through [`ReadPastCodec`]: `handle` answers each call.
pub fn read_past_client_streaming<T, U, F, Fut>(
    request: Request<Body>,
    max_decoding: usize,
    handle: F,
) -> Served
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
    F: FnMut(tonic::Request<tonic::Streaming<Readable<U>>>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<tonic::Response<T>, Status>> + Send + 'static,
{
    Box::pin(async move {
        let mut grpc = grpc::<ReadPastCodec<T, U>>(max_decoding);
        Ok(grpc
            .client_streaming(tower::service_fn(handle), request)
            .await)
    })
}

/// A unary call decoded with [`WireCodec`]: `handle` answers it.
pub fn wire_unary<T, U, F, Fut>(request: Request<Body>, max_decoding: usize, handle: F) -> Served
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
    F: FnMut(tonic::Request<U>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<tonic::Response<T>, Status>> + Send + 'static,
{
    Box::pin(async move {
        let mut grpc = grpc::<WireCodec<T, U>>(max_decoding);
        Ok(grpc.unary(tower::service_fn(handle), request).await)
    })
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
