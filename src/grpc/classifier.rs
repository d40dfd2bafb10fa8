//! `regionguard.v1.Classifier`: convert, call the engine, convert back.

use std::pin::Pin;
use std::sync::Arc;

use prost::Message;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{ClassifyInput, Engine};
use crate::grpc::convert::{self, rejected};
use crate::grpc::pb::classifier_server::Classifier;
use crate::grpc::{ApiError, pb};

#[derive(Clone)]
pub struct ClassifierService {
    engine: Arc<Engine>,
    max_request_bytes: usize,
}

impl ClassifierService {
    pub fn new(engine: Arc<Engine>, max_request_bytes: usize) -> Self {
        Self {
            engine,
            max_request_bytes,
        }
    }

    fn classify_one(
        &self,
        request: &pb::ClassifyRequest,
    ) -> Result<pb::ClassifyResponse, ApiError> {
        let size = request.encoded_len();
        if size > self.max_request_bytes {
            return Err(ApiError::TooLarge {
                size,
                limit: self.max_request_bytes,
            });
        }
        let input = ClassifyInput::try_from(request)?;
        let outcome = self.engine.classify(&input)?;
        Ok(pb::ClassifyResponse::from(outcome))
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::ClassifyResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Classifier for ClassifierService {
    async fn classify(
        &self,
        request: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        Ok(Response::new(self.classify_one(request.get_ref())?))
    }

    type ClassifyStreamStream = ResponseStream;

    async fn classify_stream(
        &self,
        request: Request<Streaming<pb::ClassifyRequest>>,
    ) -> Result<Response<Self::ClassifyStreamStream>, Status> {
        let service = self.clone();
        let responses = request.into_inner().map(move |item| {
            let request = item?;
            Ok(service
                .classify_one(&request)
                .unwrap_or_else(|error| rejected(&request.request_id, &error)))
        });
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
