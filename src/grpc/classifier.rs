//! `regionguard.v1.Classifier`: convert, call the engine, convert back.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::audit::AuditTrail;
use crate::engine::{ClassifyInput, Engine, Outcome};
use crate::grpc::convert::{self, rejected, unreadable};
use crate::grpc::pb::classifier_server::Classifier;
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
        let service = self.clone();
        let mut requests = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut seen = 0u64;
            while let Some(item) = requests.next().await {
                seen += 1;
                if seen > service.max_stream_messages {
                    let limit = service.max_stream_messages;
                    let _ = tx
                        .send(Err(Status::resource_exhausted(format!(
                            "stream: more than {limit} requests on one stream"
                        ))))
                        .await;
                    break;
                }
                let answer = match item {
                    Ok(request) => Ok(service
                        .decide(&request)
                        .await
                        .unwrap_or_else(|error| rejected(&request.request_id, &error))),
                    // A message that does not decode or is over max_request_bytes: tonic cannot
                    // read a stream past it (it has lost the message boundaries), so it gets an
                    // error answer of its own and the stream ends saying which request and why.
                    Err(status) => {
                        let index = seen - 1;
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
        let responses = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(responses)))
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
