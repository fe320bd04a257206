//! The request pipeline, whatever the client speaks: every front end hands a
//! parsed request head to [`serve`], which routes it, (later: runs the route's
//! filters,) lets the pool's policy select a backend, forwards with retries
//! where that is safe, and answers with the backend's response or a
//! [`LocalReply`]. Once the answer is written the front end calls [`finish`],
//! which builds the one end-of-request [`RequestRecord`].
//!
//! Routing happens in [`route`] and nowhere else. A local reply is one shape,
//! [`LocalReply`], always with its [`Termination`]: made here, or by a front
//! end for a request it refuses before the pipeline (a malformed head); each
//! front end renders it in one function of its own.

use crate::backend::Backend;
use crate::config::RetryOn;
use crate::health::{self, Outcome};
use crate::http::h1::ResponseHead;
use crate::http::{BodySource, ClientAddr, ClientBodyError, Framing, RequestHead};
use crate::plugin::{CurrentRequest, FilterVerdict, OnFault, RequestChanges};
pub use crate::record::{RequestRecord, Termination};
use crate::snapshot::{Pool, Snapshot};
use crate::traffic::{Breaker, QueueError};
use crate::upstream::{ExchangeError, Outgoing, ResponseBody, UpstreamRequest};
use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode};
use smallvec::SmallVec;
use std::pin::Pin;
use std::time::Duration;
// The record's clock: the CPU's time-stamp counter, calibrated, read in a
// fraction of what the OS clock costs (five reads per request).
use quanta::Instant;

/// An answer the balancer gives itself: a one-line plain-text body, or a
/// filter's own headers and body.
#[derive(Debug)]
pub struct LocalReply {
    pub status: StatusCode,
    pub cause: Termination,
    pub message: String,
    /// Headers to add (a redirect's `Location`, a filter's `Retry-After`).
    pub headers: Vec<(String, String)>,
    /// A filter's body, sent as it is instead of `message` (its content type,
    /// if any, is among `headers`).
    pub body: Option<Bytes>,
}

impl LocalReply {
    /// The balancer's own answer, with the cause it ends the request with.
    pub fn new(status: StatusCode, cause: Termination, message: impl Into<String>) -> Self {
        LocalReply {
            status,
            cause,
            message: message.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    /// A route's filter's answer.
    fn from_filter(answer: crate::plugin::DirectResponse, filter: &str) -> LocalReply {
        LocalReply {
            status: answer.status,
            cause: Termination::FilterAnswered,
            message: format!("answered by filter `{filter}`"),
            headers: answer.headers,
            body: Some(answer.body),
        }
    }

    /// The redirect of a plain listener with `redirect_https`: the same host
    /// (its port replaced) and target over HTTPS. 301 for GET and HEAD (which
    /// browsers follow as they are), 308 for the rest, which must keep their
    /// method and body.
    fn to_https(head: &RequestHead, port: u16) -> LocalReply {
        let host = head.host().unwrap_or_default();
        // The host without its port; an IPv6 literal keeps its brackets.
        let name = match host.rfind(':') {
            Some(colon) if !host[colon..].contains(']') => &host[..colon],
            _ => host,
        };
        let mut location = format!("https://{name}");
        if port != 443 {
            location.push_str(&format!(":{port}"));
        }
        let mut target = Vec::new();
        head.write_origin_form(&mut target);
        location.push_str(&String::from_utf8_lossy(&target));
        let status = if matches!(head.method, Method::GET | Method::HEAD) {
            StatusCode::MOVED_PERMANENTLY
        } else {
            StatusCode::PERMANENT_REDIRECT
        };
        LocalReply {
            status,
            cause: Termination::RedirectedToHttps,
            message: format!("this site is served over HTTPS: {location}"),
            headers: vec![("location".into(), location)],
            body: None,
        }
    }
}

/// A backend's answer: its head, and its body still to be read.
pub struct Forwarded {
    pub head: ResponseHead,
    pub body: ResponseBody,
    /// A buffer done with (the request head sent upstream), to write the response head into.
    pub scratch: Vec<u8>,
    /// Filters' edits to the response's headers.
    pub edits: Vec<crate::http::edit::HeaderEdit>,
}

/// What [`serve`] answers.
// Not boxed: one answer per request, and a box would be an allocation each time.
#[allow(clippy::large_enum_variant)]
pub enum Answer {
    Backend(Forwarded),
    Local(LocalReply),
}

/// What the pipeline learned about one request, kept by the front end until
/// the answer is written and [`finish`] turns it into a [`RequestRecord`].
#[derive(Debug)]
pub struct Trace {
    started: Instant,
    client: std::net::SocketAddr,
    /// The request id Fulcrum made, when the access log is on and the client sent none.
    made_id: Option<RequestId>,
    /// How long making a new backend connection took.
    connect: Option<Duration>,
    /// Index of the routed pool in the snapshot.
    pool: Option<usize>,
    /// Index of the backend that answered (or the last one tried).
    backend: Option<usize>,
    status: StatusCode,
    termination: Termination,
    /// Time spent in the policy's decisions.
    decision: Duration,
    /// From the start to the backend's response head.
    to_response_head: Option<Duration>,
    /// Tries after the first.
    retries: u32,
    /// Why the request went to another backend, by [`Retry`].
    retry_reasons: [u16; Retry::NAMES.len()],
    /// Request body bytes read from the client.
    bytes_in: u64,
}

impl Trace {
    /// The trace of a request from `client` whose head just arrived: the
    /// front end keeps it, [`serve`] fills it in, [`finish`] reads it.
    pub fn start(client: std::net::SocketAddr) -> Trace {
        Trace {
            started: Instant::now(),
            client,
            made_id: None,
            connect: None,
            pool: None,
            backend: None,
            status: StatusCode::OK,
            termination: Termination::Completed,
            decision: Duration::ZERO,
            to_response_head: None,
            retries: 0,
            retry_reasons: [0; Retry::NAMES.len()],
            bytes_in: 0,
        }
    }

    /// The trace of a request from `client` refused before it could be
    /// routed, with `status` for `cause`.
    pub fn refused(status: StatusCode, cause: Termination, client: std::net::SocketAddr) -> Trace {
        let mut trace = Trace::start(client);
        trace.status = status;
        trace.termination = cause;
        trace
    }

    fn answered_locally(&mut self, reply: &LocalReply) {
        self.status = reply.status;
        self.termination = reply.cause;
    }

    /// The status the client is answered with.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

/// How the answer's delivery ended, as the front end saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written whole.
    Whole,
    /// The client went away (or stopped reading) first.
    ClientGone,
    /// The backend's body failed mid-way, as [`crate::upstream::ResponseBodyError::what`] says.
    BackendFailed(&'static str),
}

/// Ends a request: builds its record from `trace` and what the front end
/// delivered, reports a backend that failed mid-body to passive health, and
/// hands the record on.
pub fn finish(snapshot: &Snapshot, trace: &Trace, head: Option<&RequestHead>, delivery: Delivery, bytes_out: u64) {
    let pool = trace.pool.and_then(|index| snapshot.pools.get(index));
    let backend = pool
        .zip(trace.backend)
        .and_then(|(pool, index)| pool.backends.get(index));
    let termination = match (trace.termination, delivery) {
        (Termination::Completed, Delivery::ClientGone) => Termination::ClientClosed,
        (Termination::Completed, Delivery::BackendFailed(_)) => Termination::BackendBodyFailed,
        (termination, _) => termination,
    };
    if let (Delivery::BackendFailed(what), Some(pool), Some(backend)) = (delivery, pool, backend) {
        tracing::warn!(pool = %pool.name, backend = %backend.address, "backend {what}; response cut off");
        backend.state.note_error(&format!("backend {what}"));
        health::record(
            &pool.name,
            &pool.backends,
            backend,
            Outcome::Failure,
            &pool.config.outlier,
        );
    }
    let record = RequestRecord {
        status: trace.status,
        termination,
        pool,
        backend: backend.map(|b| &**b),
        policy: pool.map(|p| p.policy.plugin_name()),
        decision: trace.decision,
        retries: trace.retries,
        retry_reasons: trace.retry_reasons,
        bytes_in: trace.bytes_in,
        bytes_out,
        to_response_head: trace.to_response_head,
        duration: trace.started.elapsed(),
        head,
        client: trace.client,
        // Only the access log reads it: no header scan per request without one.
        request_id: match &trace.made_id {
            Some(id) => Some(id.as_str()),
            None if snapshot.access_log.is_some() => head.and_then(request_id_of),
            None => None,
        },
        connect: trace.connect,
    };
    observe(snapshot, &record);
}

/// Where records go. For now a debug line; metrics and the access log will
/// read them here.
fn observe(snapshot: &Snapshot, record: &RequestRecord<'_>) {
    if let Some(log) = &snapshot.access_log {
        log.log(record);
    }
    tracing::debug!(
        status = record.status.as_u16(),
        termination = record.termination.as_str(),
        pool = record.pool.map(|p| p.name.as_str()),
        backend = record.backend.map(|b| b.address.as_str()),
        policy = record.policy,
        decision = ?record.decision,
        retries = record.retries,
        bytes_in = record.bytes_in,
        bytes_out = record.bytes_out,
        duration = ?record.duration,
        "request"
    );
    crate::metrics::record(record);
    #[cfg(test)]
    tests::capture(record);
}

/// Serves one request: route, select, forward; what it learns goes in
/// `trace` (from [`Trace::start`]). `timer` bounds the wait for the backend's
/// response head (a front end moves one timer along rather than creating one
/// per request).
///
/// The trace is the caller's and the answer is built where it is returned:
/// a backend's answer is over 500 bytes, and every move of it through the
/// layers of futures is a copy (measured with callgrind: a tuple return and a
/// `Result` turned into an `Answer` cost about 200 instructions a request).
pub async fn serve<B: BodySource>(
    snapshot: &Snapshot,
    client: &ClientAddr,
    head: &RequestHead,
    source: &mut B,
    timer: Pin<&mut tokio::time::Sleep>,
    trace: &mut Trace,
) -> Answer {
    if snapshot.access_log.is_some() && request_id_of(head).is_none() {
        trace.made_id = Some(RequestId::new());
    }
    // The client as trusted proxies name it: in the record, to the plugin.
    let trusted = &snapshot.config.server.trusted_proxies;
    let (resolved, peer_trusted) = if trusted.is_empty() {
        (client.addr, false)
    } else {
        crate::http::forwarded::resolve(head, client.addr, trusted)
    };
    trace.client = resolved;
    let hop = Hop {
        peer_trusted,
        via: snapshot.config.server.via,
        forwarded: snapshot.config.server.forwarded,
    };
    let redirect = client.edge.as_deref().and_then(|edge| edge.redirect_https);
    let answer = if let Some(port) = redirect {
        Answer::Local(LocalReply::to_https(head, port))
    } else {
        match snapshot.router.route_for(head.host(), head.path()) {
            None => Answer::Local(LocalReply::new(
                StatusCode::NOT_FOUND,
                Termination::NoRoute,
                "no route matches this request",
            )),
            Some(matched) => {
                let filters = snapshot.route_filters.get(matched.route).map_or(&[][..], Vec::as_slice);
                // A declared length over the limit: refused before anything is sent.
                let max_body = matched.max_body_size;
                let refused = max_body.filter(|&max| matches!(source.framing(), Framing::Length(n) if n > max));
                if let Some(max) = refused {
                    trace.pool = Some(matched.pool);
                    Answer::Local(body_too_large(max))
                } else {
                    if let Some(max) = max_body {
                        source.limit(max);
                    }
                    let mut source = Prefixed { held: None, source };
                    if filters.is_empty() && matched.body_prefix == 0 {
                        trace.pool = Some(matched.pool);
                        let pool = &snapshot.pools[matched.pool];
                        let current = CurrentRequest {
                            head,
                            client: resolved,
                            connection: client,
                            body_prefix: &[],
                            changes: RequestChanges::none(),
                            pool: &pool.name,
                        };
                        // One call site: two would each keep room in the request's future.
                        forward(pool, client, hop, &current, &mut source, timer, trace).await
                    } else {
                        // Boxed: its state (the filters' changes, the body's
                        // prefix) stays out of the plain request's future.
                        let route = FilteredRoute {
                            pool: matched.pool,
                            body_prefix: matched.body_prefix,
                            filters,
                        };
                        Box::pin(filter_then_forward(
                            snapshot,
                            route,
                            client,
                            hop,
                            head,
                            resolved,
                            &mut source,
                            timer,
                            trace,
                        ))
                        .await
                    }
                }
            }
        }
    };
    if let Answer::Local(reply) = &answer {
        trace.answered_locally(reply);
    }
    trace.bytes_in = source.received();
    answer
}

/// A route with filters or a body prefix, as the pipeline needs it.
struct FilteredRoute<'a> {
    pool: usize,
    body_prefix: usize,
    filters: &'a [std::sync::Arc<crate::plugin::Filter>],
}

/// Reads the body's prefix if the route wants one, runs the route's filters
/// in order (the first that answers ends the request; a fault is passed or
/// refused by the filter's `on_fault`), then forwards to the pool they chose
/// with their header edits, and asks the filters that want it about the
/// response head.
#[allow(clippy::too_many_arguments)]
async fn filter_then_forward<B: BodySource>(
    snapshot: &Snapshot,
    route: FilteredRoute<'_>,
    client: &ClientAddr,
    hop: Hop,
    head: &RequestHead,
    resolved: std::net::SocketAddr,
    source: &mut Prefixed<'_, B>,
    timer: Pin<&mut tokio::time::Sleep>,
    trace: &mut Trace,
) -> Answer {
    let mut pool_index = route.pool;
    trace.pool = Some(pool_index);
    // The prefix is held for the backend too: at most the pool's retry_buffer.
    // Not for gRPC: a stream's first message may be all there is for a while.
    let want = if head.is_grpc() {
        0
    } else {
        route.body_prefix.min(snapshot.pools[pool_index].config.retry_buffer)
    };
    let prefix = if want > 0 {
        match read_prefix(source.source, want).await {
            Ok(prefix) => prefix,
            Err(reply) => return Answer::Local(reply),
        }
    } else {
        Bytes::new()
    };
    let visible = &prefix[..prefix.len().min(want)];
    let mut changes = RequestChanges::default();
    let mut responders: SmallVec<[&crate::plugin::Filter; 2]> = SmallVec::new();
    for filter in route.filters {
        let current = CurrentRequest {
            head,
            client: resolved,
            connection: client,
            body_prefix: visible,
            changes: &changes,
            pool: &snapshot.pools[pool_index].name,
        };
        let pool_exists = |name: &str| snapshot.pools.iter().any(|p| p.name == name);
        match filter.on_request(&current, pool_exists) {
            Ok(FilterVerdict::Proceed {
                headers,
                pool,
                metadata,
                wants_response,
            }) => {
                changes.headers.extend(headers);
                changes.metadata.extend(metadata);
                if let Some(index) = pool.and_then(|name| snapshot.pools.iter().position(|p| p.name == name)) {
                    pool_index = index;
                    trace.pool = Some(index);
                }
                if wants_response {
                    responders.push(filter);
                }
            }
            Ok(FilterVerdict::Respond(answer)) => return Answer::Local(LocalReply::from_filter(answer, &filter.name)),
            Err(_) if filter.on_fault == OnFault::Allow => {}
            Err(fault) => {
                return Answer::Local(LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Termination::FilterFault,
                    format!(
                        "filter `{}` could not decide ({}), and its on_fault is \"deny\"",
                        filter.name,
                        fault.kind()
                    ),
                ));
            }
        }
    }
    let pool = &snapshot.pools[pool_index];
    let current = CurrentRequest {
        head,
        client: resolved,
        connection: client,
        body_prefix: visible,
        changes: &changes,
        pool: &pool.name,
    };
    if !prefix.is_empty() {
        source.held = Some(prefix.clone());
    }
    let mut answer = forward(pool, client, hop, &current, source, timer, trace).await;
    if let Answer::Backend(forwarded) = &mut answer {
        for filter in responders {
            let edits = filter.on_response(&current, &forwarded.head);
            forwarded.edits.extend(edits);
        }
    }
    answer
}

/// Reads at least `want` bytes of the body (or all of it, if shorter): what
/// plugins read as `request.body-prefix`, then sent on first.
async fn read_prefix<B: BodySource>(source: &mut B, want: usize) -> Result<Bytes, LocalReply> {
    if matches!(source.framing(), Framing::Empty) {
        return Ok(Bytes::new());
    }
    let mut held = BytesMut::with_capacity(want);
    while held.len() < want {
        match source.next_chunk().await.map_err(|e| client_body_reply(&e))? {
            Some(chunk) => held.extend_from_slice(&chunk),
            None => break,
        }
    }
    Ok(held.freeze())
}

/// The client's body with the bytes already read for the filters (the body
/// prefix) put back in front.
pub struct Prefixed<'a, B> {
    held: Option<Bytes>,
    source: &'a mut B,
}

impl<B: BodySource> BodySource for Prefixed<'_, B> {
    fn framing(&self) -> Framing {
        self.source.framing()
    }

    async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClientBodyError> {
        match self.held.take() {
            Some(held) => Ok(Some(held)),
            None => self.source.next_chunk().await,
        }
    }

    fn received(&self) -> u64 {
        self.source.received()
    }

    fn limit(&mut self, max: u64) {
        self.source.limit(max);
    }

    fn detach(&mut self) -> Option<crate::http::DetachedBody> {
        let rest = self.source.detach()?;
        Some(match self.held.take() {
            None => rest,
            // The held bytes first, then the rest as it comes.
            Some(held) => {
                use http_body_util::BodyExt;
                let first = http_body_util::Full::new(held).map_err(|never| match never {});
                let chained = futures_util::stream::StreamExt::chain(
                    http_body_util::BodyStream::new(first),
                    http_body_util::BodyStream::new(rest),
                );
                http_body_util::StreamBody::new(chained).boxed_unsync()
            }
        })
    }
}

/// The client's `X-Request-Id`, if it is one a log line can carry.
fn request_id_of(head: &RequestHead) -> Option<&str> {
    head.header("x-request-id")
        .filter(|id| !id.is_empty() && id.len() <= 200)
        .and_then(crate::http::request::visible_text)
}

/// A request id Fulcrum makes: 128 random bits as 32 hex digits, as nginx's
/// `$request_id`.
#[derive(Debug, Clone, Copy)]
pub struct RequestId([u8; 32]);

impl RequestId {
    fn new() -> RequestId {
        thread_local! {
            static STATE: std::cell::Cell<u64> = std::cell::Cell::new(seed());
        }
        /// Different per thread and per process start.
        fn seed() -> u64 {
            use std::hash::{BuildHasher, Hasher};
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64),
            );
            hasher.finish() | 1
        }
        // splitmix64: cheap, and unique enough for ids (not a secret).
        let next = || {
            STATE.with(|state| {
                let mut z = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
                state.set(z);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            })
        };
        let value = (u128::from(next()) << 64) | u128::from(next());
        let mut text = [0u8; 32];
        for (i, digit) in text.iter_mut().enumerate() {
            *digit = b"0123456789abcdef"[((value >> (124 - 4 * i)) & 0xf) as usize];
        }
        RequestId(text)
    }

    pub fn as_str(&self) -> &str {
        // Hex digits only.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// What the request sent upstream says of the hop it took.
#[derive(Debug, Clone, Copy)]
struct Hop {
    /// The connection's client is a trusted proxy.
    peer_trusted: bool,
    /// `server.via`.
    via: bool,
    /// `server.forwarded`.
    forwarded: bool,
}

/// How the request body can be sent, and sent again.
enum BodyState {
    /// The client's body, streamed: it can be sent once.
    Stream,
    /// Held in memory (empty, or small and idempotent): it can be sent again.
    Held(Bytes),
    /// Already streamed to a backend.
    Spent,
}

/// Methods a client expects may be repeated (RFC 9110 9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn client_body_reply(error: &ClientBodyError) -> LocalReply {
    let status = match error {
        ClientBodyError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
        ClientBodyError::TooLarge(max) => return body_too_large(*max),
        _ => StatusCode::BAD_REQUEST,
    };
    LocalReply::new(status, Termination::ClientBodyFailed, error.to_string())
}

/// 413 for a body over the route's `max_body_size`.
fn body_too_large(max: u64) -> LocalReply {
    LocalReply::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        Termination::BodyTooLarge,
        format!("the request body is larger than this route takes ({max} bytes)"),
    )
}

/// Reads the body into memory when the request may be sent again: a declared
/// length within `limit`, and an idempotent method (one that may be retried
/// after reaching a backend) or `refusable` (an HTTP/2 pool, whose backends
/// may refuse a stream unprocessed, and then any request may go elsewhere).
async fn prepare_body<B: BodySource>(
    method: &Method,
    body: &mut B,
    limit: usize,
    refusable: bool,
) -> Result<BodyState, LocalReply> {
    match body.framing() {
        Framing::Empty => Ok(BodyState::Held(Bytes::new())),
        Framing::Length(length) if length <= limit as u64 && (refusable || is_idempotent(method)) => {
            let mut held = BytesMut::with_capacity(length as usize);
            while let Some(chunk) = body.next_chunk().await.map_err(|e| client_body_reply(&e))? {
                held.extend_from_slice(&chunk);
            }
            Ok(BodyState::Held(held.freeze()))
        }
        _ => Ok(BodyState::Stream),
    }
}

/// Sends the request to a backend of `pool`, retrying on another when that is
/// safe, and answers with the first backend answer or the balancer's own.
async fn forward<B: BodySource>(
    pool: &Pool,
    client: &ClientAddr,
    hop: Hop,
    current: &CurrentRequest<'_>,
    source: &mut B,
    mut timer: Pin<&mut tokio::time::Sleep>,
    trace: &mut Trace,
) -> Answer {
    let http2 = pool.config.protocol.is_http2();
    // gRPC: trailers need HTTP/2 to the backend; the call's own deadline caps
    // the wait; a stream may rightly stay quiet longer than `read_timeout`.
    let grpc = current.head.is_grpc();
    if grpc && !http2 {
        return Answer::Local(LocalReply::new(
            StatusCode::BAD_GATEWAY,
            Termination::GrpcNeedsHttp2,
            format!(
                "pool `{}` speaks HTTP/1.1 to its backends; a gRPC call needs protocol = \"h2\" or \"h2c\"",
                pool.name
            ),
        ));
    }
    let (response_timeout, read_timeout) = if grpc {
        let deadline = current.head.header("grpc-timeout").and_then(crate::grpc::timeout);
        (
            deadline.map_or(pool.config.response_timeout, |d| d.min(pool.config.response_timeout)),
            pool.config.stream_idle_timeout,
        )
    } else {
        (pool.config.response_timeout, pool.config.read_timeout)
    };
    let mut body = match prepare_body(&current.head.method, source, pool.config.retry_buffer, http2).await {
        Ok(body) => body,
        Err(reply) => return Answer::Local(reply),
    };
    let may_replay = is_idempotent(&current.head.method);
    let framing = source.framing();
    let made_id = trace.made_id;
    let config = &pool.config;
    let traffic = &*pool.traffic;
    // Counted active until the answer's head (the retry budget is a share of
    // these); refused at once over `max_requests`.
    let Some(_active) = traffic.start(&pool.name, &config.circuit_breaker) else {
        return Answer::Local(circuit_open(pool, Breaker::Requests));
    };
    let panic = traffic.check_panic(&pool.name, &pool.backends, config.panic_threshold);
    if let Some(ramp) = config.slow_start {
        traffic.slow_start_tick(&pool.backends, ramp);
    }
    let view = crate::plugin::PoolView {
        panic,
        slow_start: config.slow_start,
        push_epoch: traffic.push_epoch(),
    };
    // Encoded at the first try, for whichever backend gets the request.
    let mut encoded = crate::buffers::take_write();
    let mut tried: SmallVec<[usize; 4]> = SmallVec::new();
    let mut stale_connections = 0;
    let report = |backend: &std::sync::Arc<Backend>, outcome| {
        health::record(&pool.name, &pool.backends, backend, outcome, &config.outlier)
    };
    // The whole wait for a response head, over every try.
    let deadline = later(response_timeout);
    let mut queued_until = None;
    let mut retrying = None;
    let mut backoff = config.retry_backoff;

    loop {
        let deciding = Instant::now();
        let choice = pool.policy.choose(current, &pool.backends, &tried, view);
        trace.decision += deciding.elapsed();
        let Some(chosen) = choice.backend else {
            return Answer::Local(if tried.is_empty() {
                LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Termination::NoBackend,
                    format!("no backend of pool `{}` is available", pool.name),
                )
            } else {
                LocalReply::new(
                    StatusCode::BAD_GATEWAY,
                    Termination::NoBackend,
                    format!("no backend of pool `{}` could serve the request", pool.name),
                )
            });
        };
        // The policy's choice if it has room (`max_in_flight`), else another
        // backend with room, else a wait in the pool's queue for a freed slot
        // and a new decision.
        let found = match with_room(&pool.backends, chosen, &tried, panic) {
            Some(found) => Some(found),
            // Boxed: rare, and its state (a timer) would otherwise widen
            // every request's future (callgrind: copies per request).
            None => match Box::pin(queue_for_slot(pool, current, &tried, view, &mut queued_until, deadline)).await {
                Ok(found) => found,
                Err(reply) => return Answer::Local(reply),
            },
        };
        let Some((index, in_flight)) = found else {
            return Answer::Local(LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Termination::QueueTimeout,
                format!(
                    "every backend of pool `{}` is at its max_in_flight, and none had room within queue_timeout ({:?})",
                    pool.name, config.queue_timeout
                ),
            ));
        };
        let backend = &pool.backends[index];
        trace.retries = tried.len() as u32;
        trace.backend = Some(index);
        tried.push(index);
        let out_of_tries = tried.len() > config.retries as usize;
        // Whether another try may follow this one, for `reason`: allowed by
        // `retry_on`, the tries left, `max_retries` and the retry budget.
        let mut may_retry = |reason: Option<RetryOn>| {
            if out_of_tries || reason.is_some_and(|r| !config.retry_on.contains(&r)) {
                return false;
            }
            // The previous retry's count ends as this one starts.
            retrying = None;
            retrying = traffic.start_retry(
                &pool.name,
                &config.circuit_breaker,
                config.retry_budget,
                config.retry_budget_min,
            );
            retrying.is_some()
        };

        // Past the whole wait (queued, or after retries): nothing is sent,
        // and the backend is not blamed.
        if tokio::time::Instant::now() >= deadline {
            return Answer::Local(LocalReply::new(
                StatusCode::GATEWAY_TIMEOUT,
                Termination::ResponseTimeout,
                format!("no backend of pool `{}` answered in time", pool.name),
            ));
        }
        let conn = match pool
            .upstream
            .checkout(index, backend.socket, &backend.address, current.client)
            .await
        {
            Ok(conn) => conn,
            Err(error) => {
                report(backend, Outcome::Failure);
                backend.state.note_error(&error.to_string());
                tracing::warn!(pool = %pool.name, backend = %backend.address, %error, "backend unreachable");
                if !may_retry(Some(RetryOn::ConnectFailure)) {
                    return Answer::Local(LocalReply::new(
                        StatusCode::BAD_GATEWAY,
                        Termination::ConnectFailed,
                        format!("backend {} is unreachable", backend.address),
                    ));
                }
                trace.retry_reasons[Retry::ConnectFailure as usize] += 1;
                backoff = Box::pin(pause(backoff, config.retry_backoff)).await;
                continue;
            }
        };
        let reused = conn.reused();
        trace.connect = conn.connect_time();
        // When this try's request went out (the connection made): its time to
        // a response head feeds the backend's latency EWMA.
        let try_started = crate::backend::now_ns();

        let streamed = matches!(body, BodyState::Stream);
        let (outgoing, out_framing) = match &body {
            BodyState::Held(bytes) if !bytes.is_empty() => (Outgoing::Held(bytes), Framing::Length(bytes.len() as u64)),
            BodyState::Held(bytes) => (Outgoing::Held(bytes), framing),
            BodyState::Stream => (Outgoing::Stream(&mut *source), framing),
            BodyState::Spent => {
                return Answer::Local(LocalReply::new(
                    StatusCode::BAD_GATEWAY,
                    Termination::BackendFailed,
                    "the request body was already sent and cannot be sent again",
                ));
            }
        };
        let upstream_request = UpstreamRequest {
            head: current.head,
            client,
            framing: out_framing,
            fallback_host: &backend.address,
            request_id: made_id.as_ref().map(RequestId::as_str),
            peer_trusted: hop.peer_trusted,
            via: hop.via,
            forwarded: hop.forwarded,
            edits: &current.changes.headers,
            encoded: &mut encoded,
        };

        let exchanged = conn.exchange(upstream_request, outgoing, in_flight, read_timeout);
        // This try's deadline: `per_try_timeout`, within the whole wait.
        let try_deadline = config
            .per_try_timeout
            .map_or(deadline, |per_try| deadline.min(later(per_try)));
        timer.as_mut().reset(try_deadline);
        let exchanged = tokio::select! {
            biased;
            exchanged = exchanged => Ok(exchanged),
            () = timer.as_mut() => Err(()),
        };
        let replayable_now = matches!(body, BodyState::Held(_));
        let error = match exchanged {
            Err(()) => {
                report(backend, Outcome::Failure);
                // As long as it was waited for, at least: a peak EWMA takes it at
                // once. Not when the client's own upload was part of the wait.
                if !streamed {
                    let now = crate::backend::now_ns();
                    backend.state.observe_latency(now.saturating_sub(try_started), now);
                }
                let per_try = try_deadline < deadline;
                let which = if per_try { "per_try_timeout" } else { "response_timeout" };
                backend.state.note_error(&format!("no response within {which}"));
                tracing::warn!(pool = %pool.name, backend = %backend.address, timeout = which, "backend response timed out");
                if streamed {
                    body = BodyState::Spent;
                }
                // A try cut off by per_try_timeout is retried as a reset is.
                if per_try && may_replay && replayable_now && may_retry(Some(RetryOn::Reset)) {
                    trace.retry_reasons[Retry::Reset as usize] += 1;
                    backoff = Box::pin(pause(backoff, config.retry_backoff)).await;
                    continue;
                }
                return Answer::Local(LocalReply::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    Termination::ResponseTimeout,
                    format!("backend {} did not answer in time", backend.address),
                ));
            }
            Ok(Ok((response, body_in))) => {
                // A streamed body's upload is in the wait: not the backend's latency.
                if !streamed {
                    let now = crate::backend::now_ns();
                    backend.state.observe_latency(now.saturating_sub(try_started), now);
                }
                let status = response.status.as_u16();
                let outcome = if response.status.is_server_error() {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                report(backend, outcome);
                // An answer `retry_on` names: tried elsewhere when the request
                // may be sent again (the backend has read it).
                let retry_status = config.retry_on.iter().any(|r| r.matches_status(status));
                if retry_status && may_replay && replayable_now && may_retry(None) {
                    drop(body_in);
                    backend.state.note_error(&format!("answered {status}"));
                    tracing::info!(pool = %pool.name, backend = %backend.address, status, "retry_on: trying another backend");
                    trace.retry_reasons[Retry::Status as usize] += 1;
                    backoff = Box::pin(pause(backoff, config.retry_backoff)).await;
                    continue;
                }
                trace.to_response_head = Some(trace.started.elapsed());
                trace.status = response.status;
                return Answer::Backend(Forwarded {
                    head: response,
                    body: body_in,
                    scratch: encoded,
                    edits: Vec::new(),
                });
            }
            Ok(Err(error)) => error,
        };
        if streamed && !matches!(error, ExchangeError::NotSent(_) | ExchangeError::Unsendable(_)) {
            body = BodyState::Spent;
        }
        let replayable = matches!(body, BodyState::Held(_));
        match error {
            ExchangeError::Client(error) => return Answer::Local(client_body_reply(&error)),
            ExchangeError::Unsendable(message) => {
                return Answer::Local(LocalReply::new(
                    StatusCode::BAD_REQUEST,
                    Termination::BadRequest,
                    message,
                ));
            }
            // A keep-alive connection the backend had closed: not the backend's fault.
            ExchangeError::NotSent(_) if reused && stale_connections < MAX_STALE_RETRIES => {
                stale_connections += 1;
                tried.pop();
            }
            ExchangeError::Stale if may_replay && replayable && stale_connections < MAX_STALE_RETRIES => {
                stale_connections += 1;
                tried.pop();
            }
            // Refused unprocessed: safe to send elsewhere, whatever the method,
            // if the body can be sent again. Not a failure of the backend
            // (it is busy, or going away).
            ExchangeError::Refused(reason) => {
                tracing::info!(pool = %pool.name, backend = %backend.address, %reason, "backend refused the request unprocessed");
                // A streamed body went to the refused stream and is not whole any more.
                if !replayable || !may_retry(None) {
                    return Answer::Local(LocalReply::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Termination::BackendFailed,
                        format!("backend {} refused the request: {reason}", backend.address),
                    ));
                }
                trace.retry_reasons[Retry::Refused as usize] += 1;
            }
            ExchangeError::NotSent(error) => {
                report(backend, Outcome::Failure);
                backend.state.note_error(&format!("request not sent: {error}"));
                tracing::warn!(pool = %pool.name, backend = %backend.address, %error, "request not sent");
                if !may_retry(Some(RetryOn::ConnectFailure)) {
                    return Answer::Local(LocalReply::new(
                        StatusCode::BAD_GATEWAY,
                        Termination::BackendFailed,
                        format!("backend {} closed the connection", backend.address),
                    ));
                }
                trace.retry_reasons[Retry::NotSent as usize] += 1;
                backoff = Box::pin(pause(backoff, config.retry_backoff)).await;
            }
            error @ (ExchangeError::Failed(_) | ExchangeError::Stale) => {
                report(backend, Outcome::Failure);
                backend.state.note_error(&error.to_string());
                if may_replay && replayable && may_retry(Some(RetryOn::Reset)) {
                    trace.retry_reasons[Retry::Reset as usize] += 1;
                    tracing::warn!(pool = %pool.name, backend = %backend.address, %error, "backend failed an idempotent request; retrying elsewhere");
                    backoff = Box::pin(pause(backoff, config.retry_backoff)).await;
                } else {
                    tracing::warn!(pool = %pool.name, backend = %backend.address, %error, "backend failed during the request");
                    return Answer::Local(LocalReply::new(
                        StatusCode::BAD_GATEWAY,
                        Termination::BackendFailed,
                        format!("backend {} failed: {error}", backend.address),
                    ));
                }
            }
        }
    }
}

/// Waits in the pool's queue for a backend with room, the policy choosing
/// again on each freed slot: the slot taken, `None` past `queue_timeout`
/// (or the whole wait), or the refusal when the queue cannot take it.
async fn queue_for_slot(
    pool: &Pool,
    current: &CurrentRequest<'_>,
    tried: &[usize],
    view: crate::plugin::PoolView,
    queued_until: &mut Option<tokio::time::Instant>,
    deadline: tokio::time::Instant,
) -> Result<Option<(usize, crate::backend::InFlight)>, LocalReply> {
    let config = &pool.config;
    // Within the whole wait for an answer, too.
    let until = *queued_until.get_or_insert_with(|| later(config.queue_timeout).min(deadline));
    let take = || {
        let choice = pool.policy.choose(current, &pool.backends, tried, view);
        choice
            .backend
            .and_then(|chosen| with_room(&pool.backends, chosen, tried, view.panic))
    };
    match pool
        .traffic
        .wait_for_slot(&pool.name, config.max_queue, &config.circuit_breaker, until, take)
        .await
    {
        Ok(found) => Ok(found),
        Err(QueueError::Full) => Err(LocalReply::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Termination::QueueFull,
            format!(
                "every backend of pool `{}` is at its max_in_flight, and its queue is full ({} waiting)",
                pool.name, config.max_queue
            ),
        )),
        Err(QueueError::Breaker) => Err(circuit_open(pool, Breaker::Pending)),
    }
}

/// The chosen backend with a slot taken for the request: `chosen` if it has
/// room, else the first other backend (healthy, or any in panic mode, not yet
/// tried) that has; `None` when every one is at its `max_in_flight`.
fn with_room(
    backends: &crate::backend::BackendList,
    chosen: usize,
    tried: &[usize],
    panic: bool,
) -> Option<(usize, crate::backend::InFlight)> {
    let backend = backends.get(chosen)?;
    if let Some(in_flight) = backend.state.try_start_request() {
        return Some((chosen, in_flight));
    }
    backends.iter().enumerate().find_map(|(i, b)| {
        if i == chosen || tried.contains(&i) || !b.state.is_usable(panic) {
            return None;
        }
        b.state.try_start_request().map(|in_flight| (i, in_flight))
    })
}

/// 503 for a request over a circuit breaker's threshold.
fn circuit_open(pool: &Pool, breaker: Breaker) -> LocalReply {
    LocalReply::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Termination::CircuitOpen,
        format!(
            "pool `{}` is over its circuit breaker's {} threshold",
            pool.name,
            breaker.as_str()
        ),
    )
}

/// Waits before a retry: a random part of `backoff` ("full jitter"), and
/// returns the next backoff, doubled up to ten times `base`.
async fn pause(backoff: Duration, base: Duration) -> Duration {
    if !backoff.is_zero() {
        let jittered = backoff.mul_f64(jitter());
        tokio::time::sleep(jittered).await;
    }
    backoff.saturating_mul(2).min(base.saturating_mul(10))
}

/// The instant `after` from now; far in the future for a duration too long
/// to add (a config may say "1000000h").
fn later(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// A number in [0, 1) from a cheap per-thread generator (splitmix64): for
/// spreading retries, not for secrets.
fn jitter() -> f64 {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
        );
    }
    let mut z = STATE.with(|state| {
        let z = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(z);
        z
    });
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Why a request was tried again on another backend (the `reason` of
/// `fulcrum_retries_total`).
#[derive(Debug, Clone, Copy)]
pub enum Retry {
    /// No connection could be made.
    ConnectFailure = 0,
    /// The connection closed before the request was written.
    NotSent = 1,
    /// The backend failed an idempotent request (reset, closed, malformed answer).
    Reset = 2,
    /// An HTTP/2 backend refused the stream unprocessed (`REFUSED_STREAM`, GOAWAY).
    Refused = 3,
    /// The backend answered with a status `retry_on` names.
    Status = 4,
}

impl Retry {
    pub const NAMES: [&'static str; 5] = ["connect_failure", "not_sent", "reset", "refused", "status"];
}

/// Stale pooled connections tolerated per request before a backend counts as failing.
const MAX_STALE_RETRIES: u32 = 3;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;

    /// What a test learns of a record: its status, cause, pool and backend.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Seen {
        pub status: u16,
        pub termination: Termination,
        pub pool: Option<String>,
        pub backend: Option<String>,
        pub bytes_out: u64,
    }

    thread_local! {
        static SEEN: RefCell<Vec<Seen>> = const { RefCell::new(Vec::new()) };
    }

    pub fn capture(record: &RequestRecord<'_>) {
        SEEN.with(|seen| {
            seen.borrow_mut().push(Seen {
                status: record.status.as_u16(),
                termination: record.termination,
                pool: record.pool.map(|p| p.name.clone()),
                backend: record.backend.map(|b| b.address.clone()),
                bytes_out: record.bytes_out,
            })
        });
    }

    /// The records finished on this thread since the last call.
    pub fn records() -> Vec<Seen> {
        SEEN.with(|seen| std::mem::take(&mut *seen.borrow_mut()))
    }
}
