//! `regionguard.v1.Classifier`: convert, call the engine, convert back.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::{Request, Response, Status, Streaming};

use crate::audit::AuditTrail;
use crate::engine::{ClassifyInput, Engine, Outcome};
use crate::grpc::convert::{self, rejected, unreadable};
use crate::grpc::pb::classifier_server::Classifier;
use crate::grpc::route::{self, Readable, Route};
use crate::grpc::status::bounded;
use crate::grpc::{ApiError, pb};

#[derive(Clone)]
pub struct ClassifierService {
    engine: Arc<Engine>,
    audit: Option<Arc<AuditTrail>>,
    max_stream_messages: u64,
}

impl ClassifierService {
    /// `max_request_bytes` is not the handler's business: [`crate::grpc::MessageLimit`] holds
    /// every message to it as received, before decoding.
    pub fn new(engine: Arc<Engine>, audit: Option<Arc<AuditTrail>>) -> Self {
        Self {
            engine,
            audit,
            max_stream_messages: u64::MAX,
        }
    }

    /// Ends a ClassifyStream with RESOURCE_EXHAUSTED after this many requests.
    pub fn with_max_stream_messages(mut self, max: u64) -> Self {
        self.max_stream_messages = max;
        self
    }

    /// Decides, records the decision in the audit trail and answers. A decision that must be
    /// recorded is answered only once its row is committed; when it cannot be, the caller gets
    /// UNAVAILABLE rather than a decision that is not on record.
    async fn decide(
        &self,
        request: &pb::ClassifyRequest,
    ) -> Result<pb::ClassifyResponse, ApiError> {
        let (input, outcome) = self.classify_one(request).await?;
        if let Some(audit) = &self.audit {
            audit.record(&input, &outcome).await.map_err(|error| {
                ApiError::Unavailable(format!(
                    "the decision could not be recorded in the audit trail, so it is not given: {error}"
                ))
            })?;
        }
        Ok(pb::ClassifyResponse::from(outcome))
    }

    async fn classify_one(
        &self,
        request: &pb::ClassifyRequest,
    ) -> Result<(ClassifyInput, Outcome), ApiError> {
        let input = ClassifyInput::try_from(request)?;
        let outcome = self.engine.classify(&input).await?;
        Ok((input, outcome))
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::ClassifyResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Classifier for ClassifierService {
    async fn classify(
        &self,
        request: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        Ok(Response::new(self.decide(request.get_ref()).await?))
    }

    type ClassifyStreamStream = ResponseStream;

    async fn classify_stream(
        &self,
        request: Request<Streaming<pb::ClassifyRequest>>,
    ) -> Result<Response<Self::ClassifyStreamStream>, Status> {
        // Served by `Route::serve` below, which reads past an undecodable request; this
        // path (the generated server's own) ends the stream at one.
        let requests = request.into_inner().map(|item| item.map(Ok));
        Ok(Response::new(self.clone().answer_stream(requests)))
    }

    async fn lookup_ip(
        &self,
        request: Request<pb::LookupIpRequest>,
    ) -> Result<Response<pb::IpInfo>, Status> {
        let ip = convert::parse_ip("ip", &request.get_ref().ip)?;
        let (lookup, databases) = self.engine.lookup(ip).map_err(ApiError::from)?;
        Ok(Response::new(pb::IpInfo {
            ip: lookup.ip.to_string(),
            found: lookup.record.found,
            location: Some(convert::location(&lookup, &databases)),
        }))
    }
}

/// The method path the generated server routes ClassifyStream by.
const CLASSIFY_STREAM: &str = "/regionguard.v1.Classifier/ClassifyStream";

impl ClassifierService {
    /// ClassifyStream's answers, in order, one for each request: a decision, or an error answer
    /// (`error` set) for a request that is invalid or could not be read at all; either way the
    /// stream goes on. It ends with an error after `max_stream_messages` requests, or when the
    /// stream itself fails (a message over `max_request_bytes`, a broken connection).
    fn answer_stream<S>(self, mut requests: S) -> ResponseStream
    where
        S: Stream<Item = Result<Readable<pb::ClassifyRequest>, Status>> + Send + Unpin + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut seen = 0u64;
            while let Some(item) = requests.next().await {
                seen += 1;
                let index = seen - 1;
                if seen > self.max_stream_messages {
                    let limit = self.max_stream_messages;
                    let _ = tx
                        .send(Err(Status::resource_exhausted(format!(
                            "stream: more than {limit} requests on one stream"
                        ))))
                        .await;
                    break;
                }
                let answer = match item {
                    Ok(Ok(request)) => Ok(self
                        .decide(&request)
                        .await
                        .unwrap_or_else(|error| rejected(&request.request_id, &error))),
                    // A request that does not decode: its own error answer, and on.
                    Ok(Err(status)) => Ok(unreadable(&Status::new(
                        status.code(),
                        format!("request {index}: {}", status.message()),
                    ))),
                    // The stream itself failed (over max_request_bytes, say): nothing more can
                    // be read, so the stream ends saying which request and why.
                    Err(status) => {
                        let _ = tx.send(Ok(unreadable(&status))).await;
                        Err(Status::new(
                            status.code(),
                            bounded(&format!(
                                "request {index}: {}; the stream cannot be read past it",
                                status.message()
                            )),
                        ))
                    }
                };
                let last = answer.is_err();
                if tx.send(answer).await.is_err() || last {
                    break;
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

impl Route for ClassifierService {
    const PATH: &'static str = CLASSIFY_STREAM;

    fn serve(self, request: http::Request<Body>, max_decoding: usize) -> route::Served {
        route::read_past_streaming(request, max_decoding, move |call: Request<Streaming<_>>| {
            let service = self.clone();
            async move { Ok(Response::new(service.answer_stream(call.into_inner()))) }
        })
    }
}
