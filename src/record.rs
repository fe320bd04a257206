//! The end-of-request record: what one request did, start to end, as the
//! pipeline ([`crate::proxy::finish`]) builds it once its answer is written,
//! for metrics ([`crate::metrics`]) and, next, the access log.

use crate::backend::Backend;
use crate::http::RequestHead;
use crate::snapshot::Pool;
use http::StatusCode;
use std::net::SocketAddr;
use std::time::Duration;

/// Why a request ended the way it did: the cause behind its status, for the
/// log and (with the observability work) a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Termination {
    /// The backend's whole response reached the client.
    Completed,
    /// The client's request was refused before routing (malformed, too large, too slow).
    BadRequest,
    /// No route matches the request.
    NoRoute,
    /// No backend of the pool was available.
    NoBackend,
    /// No connection could be made to the chosen backend.
    ConnectFailed,
    /// The backend did not answer within `response_timeout`.
    ResponseTimeout,
    /// The backend failed before or while sending its response head.
    BackendFailed,
    /// The backend failed in the middle of its response body.
    BackendBodyFailed,
    /// The client's request body could not be read.
    ClientBodyFailed,
    /// The client went away before its answer was written.
    ClientClosed,
    /// Answered with a redirect to HTTPS by a listener with `redirect_https`.
    RedirectedToHttps,
    /// The request body was larger than the route's `max_body_size` (413).
    BodyTooLarge,
    /// A gRPC call routed to a pool that speaks HTTP/1.1 to its backends.
    GrpcNeedsHttp2,
    /// Every backend was at its `max_in_flight` and the pool's queue was full.
    QueueFull,
    /// No backend had room within `queue_timeout`.
    QueueTimeout,
    /// Over a circuit breaker's threshold.
    CircuitOpen,
    /// A route's filter answered the request itself (a 403, a 429, a redirect).
    FilterAnswered,
    /// A route's filter faulted and its `on_fault = "deny"` refused the request (503).
    FilterFault,
}

impl Termination {
    /// Every cause, in declaration order: `ALL[cause as usize] == cause`.
    pub const ALL: [Termination; 18] = [
        Termination::Completed,
        Termination::BadRequest,
        Termination::NoRoute,
        Termination::NoBackend,
        Termination::ConnectFailed,
        Termination::ResponseTimeout,
        Termination::BackendFailed,
        Termination::BackendBodyFailed,
        Termination::ClientBodyFailed,
        Termination::ClientClosed,
        Termination::RedirectedToHttps,
        Termination::BodyTooLarge,
        Termination::GrpcNeedsHttp2,
        Termination::QueueFull,
        Termination::QueueTimeout,
        Termination::CircuitOpen,
        Termination::FilterAnswered,
        Termination::FilterFault,
    ];

    /// The name in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Termination::Completed => "completed",
            Termination::BadRequest => "bad_request",
            Termination::NoRoute => "no_route",
            Termination::NoBackend => "no_backend",
            Termination::ConnectFailed => "connect_failed",
            Termination::ResponseTimeout => "response_timeout",
            Termination::BackendFailed => "backend_failed",
            Termination::BackendBodyFailed => "backend_body_failed",
            Termination::ClientBodyFailed => "client_body_failed",
            Termination::ClientClosed => "client_closed",
            Termination::RedirectedToHttps => "redirected_to_https",
            Termination::BodyTooLarge => "body_too_large",
            Termination::GrpcNeedsHttp2 => "grpc_needs_http2",
            Termination::QueueFull => "queue_full",
            Termination::QueueTimeout => "queue_timeout",
            Termination::CircuitOpen => "circuit_open",
            Termination::FilterAnswered => "filter_answered",
            Termination::FilterFault => "filter_fault",
        }
    }
}

/// One request, start to end: what the observability work feeds to metrics
/// and the access log. Built only by [`crate::proxy::finish`].
pub struct RequestRecord<'a> {
    pub status: StatusCode,
    pub termination: Termination,
    pub pool: Option<&'a Pool>,
    pub backend: Option<&'a Backend>,
    /// The name of the pool's policy.
    pub policy: Option<&'a str>,
    pub decision: Duration,
    pub retries: u32,
    /// Retries by reason, in `proxy::Retry::NAMES` order.
    pub retry_reasons: [u16; crate::proxy::Retry::NAMES.len()],
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub to_response_head: Option<Duration>,
    pub duration: Duration,
    /// The request's head; `None` for one refused before it parsed.
    pub head: Option<&'a RequestHead>,
    /// Where the request came from: the client as the PROXY protocol and
    /// trusted proxies name it (`crate::http::forwarded`).
    pub client: SocketAddr,
    /// `X-Request-Id` as the client sent it or as Fulcrum made it; read only
    /// while the access log is on (`None` otherwise).
    pub request_id: Option<&'a str>,
    /// How long making a new connection to the backend took (`None`: a pooled one).
    pub connect: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_is_listed_at_its_own_index() {
        for (index, cause) in Termination::ALL.iter().enumerate() {
            assert_eq!(*cause as usize, index, "{cause:?}");
        }
    }
}
