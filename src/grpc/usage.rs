//! `regionguard.v1.Usage/Report`: usage events in, one summary out.
//!
//! Each event is checked on its own: a bad one is counted and named (index, field, problem) and
//! the stream goes on, so good events are never lost because a neighbour was bad. An event that
//! does not decode is rejected the same way (field `event`; served through `route.rs`). An
//! event over `max_request_bytes` fails the call, saying how many events before it were kept:
//! it is refused as it arrives, nothing after it is read, and a summary would hide that.
//!
//! A report is not cut by the unary `request_timeout_ms`. It ends when the client ends it, at
//! `max_stream_messages`, after `stream_idle_timeout_ms` without an event, or shortly before the
//! client's own deadline (`grpc-timeout`): in each case with a summary of what was applied and,
//! when the server stopped reading first, `stopped` saying why. The client resends from event
//! `accepted + rejected`; nothing is counted twice.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_stream::{Stream, StreamExt};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::Engine;
use crate::grpc::ApiError;
use crate::grpc::convert::{MAX_ID_BYTES, identifier, parse_ip};
use crate::grpc::pb::{self, usage_server::Usage};
use crate::grpc::route::{self, Readable, Route};
use crate::grpc::status::bounded;
use crate::usage::UsageEvent;
use crate::usage::window::HISTORY_SECS;

/// Rejections listed by name in one summary; the rest are only counted.
const MAX_LISTED: usize = 100;
/// How far ahead of the server's clock an event may be (clock skew).
const MAX_FUTURE_SECS: i64 = 300;
const MAX_REQUESTS: u64 = 1_000_000;
const MAX_TOKENS: u64 = 1_000_000_000;

#[derive(Clone)]
pub struct UsageService {
    engine: Arc<Engine>,
    max_stream_messages: u64,
    idle_timeout: Duration,
}

impl UsageService {
    pub fn new(engine: Arc<Engine>, max_stream_messages: u64) -> Self {
        Self {
            engine,
            max_stream_messages,
            idle_timeout: Duration::from_secs(30),
        }
    }

    /// Ends a report that sends no event for this long (with its summary).
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }
}

/// When to stop reading so that the summary still reaches a client whose deadline is
/// `deadline` from now: a tenth of it before, between 50 ms and 1 s.
fn answer_by(deadline: Duration) -> Duration {
    let margin = (deadline / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    deadline.saturating_sub(margin)
}

fn id(field: &str, value: &str, required: bool) -> Result<Option<Arc<str>>, ApiError> {
    match identifier(field, value, MAX_ID_BYTES)? {
        None if required => Err(ApiError::invalid(field, "required")),
        id => Ok(id.map(Arc::from)),
    }
}

/// Checks one event against the server's clock `now` (seconds).
pub fn usage_event(event: &pb::UsageEvent, now: i64) -> Result<UsageEvent, ApiError> {
    let account_id = id("account_id", &event.account_id, true)?.unwrap_or_else(|| "".into());
    let ip: IpAddr = parse_ip("ip", &event.ip)?;
    let ms = event.timestamp_unix_ms;
    if ms <= 0 {
        return Err(ApiError::invalid(
            "timestamp_unix_ms",
            "required (milliseconds since the Unix epoch)",
        ));
    }
    let timestamp = ms / 1000;
    if timestamp > now + MAX_FUTURE_SECS {
        return Err(ApiError::invalid(
            "timestamp_unix_ms",
            format!("{ms} is more than {MAX_FUTURE_SECS} s ahead of the server's clock"),
        ));
    }
    if timestamp <= now - HISTORY_SECS {
        return Err(ApiError::invalid(
            "timestamp_unix_ms",
            format!("{ms} is older than the 7-day history"),
        ));
    }
    if event.request_count > MAX_REQUESTS {
        return Err(ApiError::invalid(
            "request_count",
            format!(
                "{} is more than {MAX_REQUESTS} in one event",
                event.request_count
            ),
        ));
    }
    for (field, tokens) in [
        ("input_tokens", event.input_tokens),
        ("output_tokens", event.output_tokens),
    ] {
        if tokens > MAX_TOKENS {
            return Err(ApiError::invalid(
                field,
                format!("{tokens} is more than {MAX_TOKENS} in one event"),
            ));
        }
    }
    for (field, text) in [("model", &event.model), ("user_agent", &event.user_agent)] {
        if text.len() > 1024 {
            return Err(ApiError::invalid(
                field,
                format!("{} bytes, more than 1024", text.len()),
            ));
        }
    }
    Ok(UsageEvent {
        account_id,
        ip,
        timestamp,
        api_key_id: id("api_key_id", &event.api_key_id, false)?,
        requests: event.request_count.max(1),
        input_tokens: event.input_tokens,
        output_tokens: event.output_tokens,
        payment_fingerprint: id("payment_fingerprint", &event.payment_fingerprint, false)?,
        device_id: id("device_id", &event.device_id, false)?,
        prompt_fingerprint: id("prompt_fingerprint", &event.prompt_fingerprint, false)?,
        organization_domain: id("organization_domain", &event.organization_domain, false)?
            .and_then(|d| {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                (!d.is_empty()).then(|| Arc::from(d))
            }),
    })
}

fn reject(summary: &mut pb::ReportSummary, index: u64, field: String, message: String) {
    summary.rejected += 1;
    if summary.rejections.len() < MAX_LISTED {
        summary.rejections.push(pb::RejectedEvent {
            index,
            field,
            message,
        });
    } else {
        summary.rejections_truncated = true;
    }
}

#[tonic::async_trait]
impl Usage for UsageService {
    async fn report(
        &self,
        request: Request<Streaming<pb::UsageEvent>>,
    ) -> Result<Response<pb::ReportSummary>, Status> {
        // Served by `Route::serve` below, which reads past an undecodable event; this
        // path (the generated server's own) fails the call at one.
        self.report_events(request.map(|events| events.map(|item| item.map(Ok))))
            .await
    }
}

/// The method path the generated server routes Report by.
const REPORT: &str = "/regionguard.v1.Usage/Report";

impl Route for UsageService {
    const PATH: &'static str = REPORT;

    fn serve(self, request: http::Request<Body>, max_decoding: usize) -> route::Served {
        route::read_past_client_streaming(request, max_decoding, move |call| {
            let service = self.clone();
            async move { service.report_events(call).await }
        })
    }
}

impl UsageService {
    /// Applies a report's events and sums them up. An event that is invalid or does not decode
    /// is rejected by index and the stream goes on; a stream that fails (an event over
    /// `max_request_bytes`, a broken connection) fails the call, saying what was kept.
    async fn report_events<S>(
        &self,
        request: Request<S>,
    ) -> Result<Response<pb::ReportSummary>, Status>
    where
        S: Stream<Item = Result<Readable<pb::UsageEvent>, Status>> + Unpin,
    {
        if self.engine.usage().is_none() {
            return Err(Status::failed_precondition(
                "usage history is turned off ([usage] enabled = false)",
            ));
        }
        let stop_at = super::deadline::grpc_timeout(request.metadata().as_ref())
            .map(|deadline| Instant::now() + answer_by(deadline));
        let mut stream = request.into_inner();
        let mut summary = pb::ReportSummary::default();
        let mut index: u64 = 0;
        loop {
            let wait = stop_at.map_or(self.idle_timeout, |at| {
                at.saturating_duration_since(Instant::now())
                    .min(self.idle_timeout)
            });
            let next = match tokio::time::timeout(wait, stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    let near_deadline = stop_at.is_some_and(|at| Instant::now() >= at);
                    summary.stopped = if near_deadline {
                        format!(
                            "the call's deadline was near: stopped reading after {index} events; send the rest on a new stream"
                        )
                    } else {
                        format!(
                            "no event for {} ms (stream_idle_timeout_ms): stopped reading after {index} events; send the rest on a new stream",
                            self.idle_timeout.as_millis()
                        )
                    };
                    break;
                }
            };
            let event = match next {
                Some(Ok(event)) => event,
                None => break,
                Some(Err(status)) => {
                    // An event over max_request_bytes, a broken stream: nothing after it can be
                    // read, so the call fails saying what was kept, rather than answer a
                    // summary that silently leaves out the rest.
                    return Err(Status::new(
                        status.code(),
                        bounded(&format!(
                            "event {index}: {}; read before it: {} accepted, {} rejected; nothing after it was read",
                            status.message(),
                            summary.accepted,
                            summary.rejected
                        )),
                    ));
                }
            };
            if index >= self.max_stream_messages {
                // Stopped, not rejected: this event is not applied, and a client resending from
                // `accepted + rejected` must resend it too.
                summary.stopped = format!(
                    "more than {} events on one stream (max_stream_messages): stopped reading after {index} events; send the rest on a new stream",
                    self.max_stream_messages
                );
                break;
            }
            let event = match event {
                Ok(event) => event,
                // An event that does not decode: rejected like an invalid one, and on.
                Err(status) => {
                    reject(
                        &mut summary,
                        index,
                        "event".into(),
                        status.message().to_owned(),
                    );
                    index += 1;
                    continue;
                }
            };
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            match usage_event(&event, now) {
                Ok(event) => {
                    if self.engine.record_usage(&event) {
                        summary.accepted += 1;
                    } else {
                        reject(
                            &mut summary,
                            index,
                            "stream".into(),
                            "usage history is behind (the queue to Redis is full): event not kept; retry it later".into(),
                        );
                    }
                }
                Err(error) => reject(
                    &mut summary,
                    index,
                    error.field().to_owned(),
                    error.message(),
                ),
            }
            index += 1;
        }
        Ok(Response::new(summary))
    }
}
