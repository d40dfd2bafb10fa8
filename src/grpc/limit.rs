//! `max_request_bytes` on the bytes as received: a tower layer around a gRPC service that reads
//! each message's length from its gRPC frame header (a flag byte and a 4-byte big-endian length)
//! as the request body streams in, and fails the body with RESOURCE_EXHAUSTED at the first message
//! over the limit, before tonic buffers or decodes it.
//!
//! Checking the decoded message instead would miss what decoding drops: a message of 1 MiB of
//! unknown fields decodes to a few bytes. The body's error reaches the handler (or, for a unary
//! call, the caller) as the `Status` it is, through the one [`ApiError`] mapping.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Bytes;
use tonic::codegen::http::Request;
use tonic::server::NamedService;
use tower::Service;

use crate::grpc::ApiError;

/// `service` with every request message over `limit` bytes refused.
#[derive(Clone, Debug)]
pub struct MessageLimit<S> {
    inner: S,
    limit: usize,
}

impl<S> MessageLimit<S> {
    pub fn new(inner: S, limit: usize) -> Self {
        Self { inner, limit }
    }
}

impl<S: NamedService> NamedService for MessageLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S: Service<Request<Body>>> Service<Request<Body>> for MessageLimit<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let limit = self.limit;
        self.inner
            .call(request.map(|body| Body::new(Limited::new(body, limit))))
    }
}

/// Where the body is in its stream of length-prefixed messages.
#[derive(Debug)]
struct Frames {
    limit: usize,
    header: [u8; 5],
    /// Bytes of the current header seen so far.
    have: usize,
    /// Bytes of the current message still to come.
    left: usize,
}

impl Frames {
    /// Follows `data` through the frames. At the first message over the limit: its size, and
    /// where in `data` its header starts (0 when it started in an earlier chunk), so that the
    /// messages before it still reach the service.
    fn scan(&mut self, data: &[u8]) -> Result<(), (usize, usize)> {
        let mut at = 0;
        while at < data.len() {
            if self.left > 0 {
                let n = self.left.min(data.len() - at);
                self.left -= n;
                at += n;
                continue;
            }
            let start = if self.have == 0 { at } else { 0 };
            let n = (self.header.len() - self.have).min(data.len() - at);
            self.header[self.have..self.have + n].copy_from_slice(&data[at..at + n]);
            self.have += n;
            at += n;
            if self.have == self.header.len() {
                self.have = 0;
                let [_, a, b, c, d] = self.header;
                let len = u32::from_be_bytes([a, b, c, d]) as usize;
                if len > self.limit {
                    return Err((len, start));
                }
                self.left = len;
            }
        }
        Ok(())
    }
}

struct Limited {
    inner: Body,
    frames: Frames,
    /// The refusal to give once the bytes before the oversize message are through.
    pending: Option<Status>,
    failed: bool,
}

impl Limited {
    fn new(inner: Body, limit: usize) -> Self {
        Self {
            inner,
            frames: Frames {
                limit,
                header: [0; 5],
                have: 0,
                left: 0,
            },
            pending: None,
            failed: false,
        }
    }
}

impl http_body::Body for Limited {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(refusal) = this.pending.take() {
            this.failed = true;
            return Poll::Ready(Some(Err(refusal)));
        }
        if this.failed {
            return Poll::Ready(None);
        }
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
        };
        match this.frames.scan(&data) {
            Ok(()) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Err((size, start)) => {
                let limit = this.frames.limit;
                let refusal = ApiError::TooLarge { size, limit }.into();
                if start == 0 {
                    this.failed = true;
                    return Poll::Ready(Some(Err(refusal)));
                }
                this.pending = Some(refusal);
                Poll::Ready(Some(Ok(Frame::data(data.slice(..start)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && (self.failed || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.resize(5 + len as usize, b'x');
        bytes
    }

    fn frames(limit: usize) -> Frames {
        Frames {
            limit,
            header: [0; 5],
            have: 0,
            left: 0,
        }
    }

    #[test]
    fn finds_the_first_message_over_the_limit_however_the_bytes_are_split() {
        let before = [frame(10), frame(0), frame(100)].concat();
        let stream: Vec<u8> = [before.clone(), frame(101), frame(3)].concat();
        for chunk in 1..=stream.len() {
            let mut scan = frames(100);
            let mut passed = Vec::new();
            let mut found = None;
            for piece in stream.chunks(chunk) {
                match scan.scan(piece) {
                    Ok(()) => passed.extend_from_slice(piece),
                    Err((size, start)) => {
                        passed.extend_from_slice(&piece[..start]);
                        found = Some(size);
                        break;
                    }
                }
            }
            assert_eq!(found, Some(101), "chunks of {chunk}");
            // Everything before the oversize message went through, and at most the start of its
            // header besides (tonic then holds an incomplete header, which it never reads past).
            assert!(passed.starts_with(&before), "chunks of {chunk}");
            assert!(passed.len() < before.len() + 5, "chunks of {chunk}");
        }
        let mut scan = frames(101);
        assert_eq!(scan.scan(&stream), Ok(()));
    }
}
