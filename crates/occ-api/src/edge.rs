//! gRPC's own conventions for requests that never reach a handler. tonic answers a request
//! whose bytes are not the method's message with `INTERNAL`, and one over the size limit with
//! `OUT_OF_RANGE`; gRPC's status code guide says the first is the caller's fault
//! (`INVALID_ARGUMENT`) and the second a limit (`RESOURCE_EXHAUSTED`). Clients retry or give
//! up by these codes, so this layer, in front of every service, puts them right.

use std::task::{Context, Poll};

use futures_util::TryFutureExt;
use futures_util::future::MapOk;
use http::HeaderValue;

/// tonic's message when a request's bytes do not decode (prost's `DecodeError`).
const UNDECODABLE: &str = "failed to decode Protobuf message";
/// tonic's message when a request is over `max_decoding_message_size`.
const OVERSIZE: &str = "Error, decoded message length too large";

/// Maps tonic's answers to undecodable and oversize requests to gRPC's codes.
#[derive(Debug, Clone, Default)]
pub struct RequestStatusLayer;

impl<S> tower::Layer<S> for RequestStatusLayer {
    type Service = RequestStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestStatus { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RequestStatus<S> {
    inner: S,
}

type Correct<B> = fn(http::Response<B>) -> http::Response<B>;

impl<S, Req, B> tower::Service<Req> for RequestStatus<S>
where
    S: tower::Service<Req, Response = http::Response<B>>,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = MapOk<S::Future, Correct<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.inner.call(req).map_ok(correct as Correct<B>)
    }
}

/// An error found before the handler is a trailers-only response: status and message are
/// headers.
fn correct<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers();
    let code = headers.get("grpc-status").map(HeaderValue::as_bytes);
    let message = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    let corrected = match code {
        Some(b"13") if message.starts_with(UNDECODABLE) => Some((
            tonic::Code::InvalidArgument,
            format!("request: not a valid message for this method ({message})"),
        )),
        Some(b"11") if message.starts_with(OVERSIZE) => Some((
            tonic::Code::ResourceExhausted,
            format!("request: {}", &message["Error, ".len()..]),
        )),
        _ => None,
    };
    if let Some((code, message)) = corrected {
        let headers = response.headers_mut();
        headers.remove("grpc-message");
        // Written the way tonic writes every status it sends.
        if let Err(e) = tonic::Status::new(code, message).add_header(headers) {
            tracing::debug!(error = %e, "cannot correct a request status");
        }
    }
    response
}

fn percent_decode(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied(),
            bytes.get(i + 2).copied(),
        ) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push(
                    u8::try_from(hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)).unwrap_or(b'?'),
                );
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(
            percent_decode(b"Error,%20decoded%20message%20length%20too%20large: 5%"),
            "Error, decoded message length too large: 5%"
        );
    }
}
