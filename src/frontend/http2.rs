//! The HTTP/2 front end, through hyper, over any stream: each request's head
//! and body are handed to the pipeline ([`proxy::serve`]) and the answer goes
//! back as hyper's response, its body streamed from the backend.

use crate::app::App;
use crate::http::{BodySource, ClientAddr, ClientBodyError, Framing, HeadLimits, RequestHead};
use crate::proxy::{self, Answer, Delivery, LocalReply, Trace};
use crate::shutdown::Shutdown;
use crate::snapshot::Snapshot;
use crate::upstream::{ResponseBody, ResponseBodyError};
use bytes::Bytes;
use http::{Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};

/// Serves an HTTP/2 (prior knowledge) client through hyper until it closes,
/// or the worker stops (then gracefully, with GOAWAY).
pub async fn serve<S>(app: Arc<App>, io: S, client: ClientAddr, shutdown: &Shutdown)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _busy = shutdown.busy();
    let idle = app.snapshot().config.server.client_idle_timeout;
    let limits = client.edge.as_deref().map_or(HeadLimits::DEFAULT, |edge| edge.limits);
    let client = Arc::new(client);
    let peer = client.addr;
    let cancels = Arc::new(Cancels::default());
    let counted = cancels.clone();
    let service = service_fn(move |request| {
        let (app, client, cancels) = (app.clone(), client.clone(), counted.clone());
        Box::pin(async move {
            // Dropped before it answers: the client reset the stream.
            let mut pending = Pending {
                cancels,
                answered: false,
            };
            let response = handle(app.snapshot(), &client, request).await;
            pending.answered = true;
            Ok::<_, Infallible>(response)
        }) as Pin<Box<dyn Future<Output = Result<_, Infallible>> + Send>>
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(idle / 2))
        .keep_alive_timeout(idle / 2)
        // The decoded header list, as the listener's head limit counts it.
        .max_header_list_size(limits.max_head as u32)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        // What a client may send ahead of what is read: 64 KiB a stream and
        // 256 KiB a connection (hyper's default is 1 MiB each), so an idle
        // client cannot park megabytes in Fulcrum.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buf_size(SEND_BUFFER)
        // Rapid reset, first form: streams reset before they are accepted.
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.stopped() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        // Rapid reset, second form: streams reset after they were forwarded,
        // each costing a backend request.
        () = cancels.abusive.notified() => {
            tracing::warn!(client = %peer, cancelled = cancels.cancelled.load(Ordering::Relaxed), "HTTP/2 client resets its streams faster than it lets them finish: GOAWAY");
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(client = %peer, %error, "HTTP/2 client connection ended with an error");
    }
}

/// Streams a connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 128;
/// Flow-control windows Fulcrum grants a client, per stream and per connection.
const STREAM_WINDOW: u32 = 64 * 1024;
const CONNECTION_WINDOW: u32 = 256 * 1024;
/// Response bytes buffered per stream before the backend is read further.
const SEND_BUFFER: usize = 128 * 1024;
/// Streams reset before they were accepted, at once, before GOAWAY.
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams Fulcrum itself reset (protocol errors), before GOAWAY.
const MAX_LOCAL_ERROR_RESETS: usize = 128;
/// Streams a client may reset before they were answered before the
/// connection is closed, when they are also more than half of its requests.
const MAX_CANCELLED_STREAMS: u32 = 100;

/// A connection's streams reset by the client before their answer.
#[derive(Default)]
struct Cancels {
    cancelled: AtomicU32,
    answered: AtomicU32,
    abusive: tokio::sync::Notify,
}

/// A request being served; counted as cancelled when dropped unanswered.
struct Pending {
    cancels: Arc<Cancels>,
    answered: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.answered {
            self.cancels.answered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let cancelled = self.cancels.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
        let answered = self.cancels.answered.load(Ordering::Relaxed);
        if cancelled > MAX_CANCELLED_STREAMS && cancelled > answered {
            self.cancels.abusive.notify_one();
        }
    }
}

/// Serves one request of an HTTP/2 client.
async fn handle(snapshot: Arc<Snapshot>, client: &ClientAddr, request: Request<Incoming>) -> Response<ProxyBody> {
    let (parts, body) = request.into_parts();
    let mut source = IncomingSource {
        body: Some(body),
        received: 0,
        detached: None,
        max: u64::MAX,
    };
    let limits = client.edge.as_deref().map_or(&HeadLimits::DEFAULT, |edge| &edge.limits);
    let head = match RequestHead::from_parts_within(&parts, source.framing(), limits) {
        Ok(head) => head,
        Err(error) => {
            let reply = LocalReply::new(error.status(), proxy::Termination::BadRequest, error.to_string());
            return local_response(
                &snapshot,
                Trace::refused(reply.status, reply.cause, client.addr),
                None,
                reply,
                client,
            );
        }
    };
    // Sized by the pool's response_timeout inside the pipeline.
    let timer = tokio::time::sleep(std::time::Duration::ZERO);
    tokio::pin!(timer);
    let mut trace = Trace::start(client.addr);
    let answer = proxy::serve(&snapshot, client, &head, &mut source, timer, &mut trace).await;
    match answer {
        Answer::Backend(forwarded) => {
            let mut response = Response::new(ProxyBody::Upstream(Upstream {
                body: forwarded.body,
                trace,
                head,
                snapshot,
                sent: 0,
                finished: false,
            }));
            *response.status_mut() = forwarded.head.status;
            *response.headers_mut() = forwarded.head.header_map();
            if !forwarded.edits.is_empty() {
                apply_edits(response.headers_mut(), &forwarded.edits);
            }
            add_hsts(&mut response, client);
            response
        }
        Answer::Local(reply) => local_response(&snapshot, trace, Some(&head), reply, client),
    }
}

/// Applies filters' response header edits to an HTTP/2 response's headers.
fn apply_edits(headers: &mut http::HeaderMap, edits: &[crate::http::edit::HeaderEdit]) {
    // The fields of every edited name as the edits leave them (names and
    // values checked valid when the filter answered).
    let mut edited: Vec<(http::HeaderName, http::HeaderValue)> = Vec::new();
    crate::http::edit::each_edited(
        edits,
        |name| headers.get_all(name).iter().map(http::HeaderValue::as_bytes).collect(),
        |name, value| {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_bytes(value),
            ) {
                edited.push((name, value));
            }
        },
    );
    for name in crate::http::edit::edited_names(edits) {
        headers.remove(name);
    }
    for (name, value) in edited {
        headers.append(name, value);
    }
}

/// The one place an HTTP/2 local reply is rendered. Its record is finished
/// at once: hyper writes the few bytes on its own.
fn local_response(
    snapshot: &Snapshot,
    trace: Trace,
    head: Option<&RequestHead>,
    reply: LocalReply,
    client: &ClientAddr,
) -> Response<ProxyBody> {
    if head.is_some_and(RequestHead::is_grpc) {
        return grpc_response(snapshot, trace, head, reply, client);
    }
    let plain = reply.body.is_none();
    let body = reply
        .body
        .unwrap_or_else(|| Bytes::from(format!("{}\n", reply.message)));
    proxy::finish(snapshot, &trace, head, Delivery::Whole, body.len() as u64);
    let mut response = Response::new(ProxyBody::Local(Full::new(body)));
    *response.status_mut() = reply.status;
    if plain {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    for (name, value) in reply.headers {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    add_hsts(&mut response, client);
    response
}

/// A local reply to a gRPC client: trailers-only (one HEADERS frame that
/// ends the stream), HTTP 200 with the gRPC status the reply maps to, as gRPC
/// clients read errors. The record keeps the reply's own status and cause.
fn grpc_response(
    snapshot: &Snapshot,
    trace: Trace,
    head: Option<&RequestHead>,
    reply: LocalReply,
    client: &ClientAddr,
) -> Response<ProxyBody> {
    proxy::finish(snapshot, &trace, head, Delivery::Whole, 0);
    let mut response = Response::new(ProxyBody::Local(Full::new(Bytes::new())));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    headers.insert(
        "grpc-status",
        http::HeaderValue::from(crate::grpc::status_of(reply.status, reply.cause)),
    );
    if let Ok(message) = http::HeaderValue::from_str(&crate::grpc::encode_message(&reply.message)) {
        headers.insert("grpc-message", message);
    }
    add_hsts(&mut response, client);
    response
}

/// The listener's `Strict-Transport-Security`, over TLS when it has one.
fn add_hsts<B>(response: &mut Response<B>, client: &ClientAddr) {
    if let Some(hsts) = client
        .edge
        .as_deref()
        .and_then(|e| e.hsts.as_deref())
        .and_then(|v| http::HeaderValue::from_str(v).ok())
    {
        response.headers_mut().insert(header::STRICT_TRANSPORT_SECURITY, hsts);
    }
}

/// A response body for an HTTP/2 client: the backend's, streamed, or one the
/// balancer wrote.
// Not boxed: hyper holds one body per stream, and a box would be an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum ProxyBody {
    Upstream(Upstream),
    Local(Full<Bytes>),
}

/// A backend's body on its way to an HTTP/2 client; the request's record is
/// finished when it ends, fails or is dropped (the client reset the stream).
pub struct Upstream {
    body: ResponseBody,
    trace: Trace,
    head: RequestHead,
    snapshot: Arc<Snapshot>,
    sent: u64,
    finished: bool,
}

impl Upstream {
    fn finish(&mut self, delivery: Delivery) {
        if !std::mem::replace(&mut self.finished, true) {
            proxy::finish(&self.snapshot, &self.trace, Some(&self.head), delivery, self.sent);
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // hyper does not poll a body that is empty from the start.
        let delivery = if self.body.is_end() {
            Delivery::Whole
        } else {
            Delivery::ClientGone
        };
        self.finish(delivery);
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        match self.get_mut() {
            ProxyBody::Upstream(upstream) => {
                let polled = Pin::new(&mut upstream.body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        upstream.sent += frame.data_ref().map_or(0, |data| data.len() as u64);
                    }
                    Poll::Ready(Some(Err(error))) => upstream.finish(Delivery::BackendFailed(error.what())),
                    Poll::Ready(None) => upstream.finish(Delivery::Whole),
                    Poll::Pending => {}
                }
                polled
            }
            ProxyBody::Local(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(upstream) => upstream.body.is_end_stream(),
            ProxyBody::Local(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(upstream) => upstream.body.size_hint(),
            ProxyBody::Local(b) => b.size_hint(),
        }
    }
}

/// An HTTP/2 client's body, read through hyper.
struct IncomingSource {
    /// `None` once handed to an HTTP/2 backend's stream ([`BodySource::detach`]).
    body: Option<Incoming>,
    received: u64,
    /// What went through the detached body, counted by it.
    detached: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// The most body bytes taken (`u64::MAX`: no limit).
    max: u64,
}

impl BodySource for IncomingSource {
    fn framing(&self) -> Framing {
        let Some(body) = &self.body else {
            return Framing::Empty;
        };
        if body.is_end_stream() {
            return Framing::Empty;
        }
        match body.size_hint().exact() {
            Some(n) => Framing::Length(n),
            None => Framing::Chunked,
        }
    }

    fn received(&self) -> u64 {
        self.received + self.detached.as_ref().map_or(0, |n| n.load(Ordering::Relaxed))
    }

    fn limit(&mut self, max: u64) {
        self.max = max;
    }

    async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClientBodyError> {
        let Some(body) = &mut self.body else {
            return Ok(None);
        };
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientBodyError::Other(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                self.received += data.len() as u64;
                if self.received > self.max {
                    return Err(ClientBodyError::TooLarge(self.max));
                }
                return Ok(Some(data));
            }
        }
        Ok(None)
    }

    fn detach(&mut self) -> Option<crate::http::DetachedBody> {
        let body = self.body.take()?;
        let counted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        self.detached = Some(counted.clone());
        let limited = Limited {
            body,
            left: self.max.saturating_sub(self.received),
            max: self.max,
            counted,
        };
        Some(http_body_util::BodyExt::boxed_unsync(limited))
    }
}

/// A client's body handed to a backend stream, still held to the route's
/// `max_body_size`. Its trailers pass on too (gRPC clients send none, but
/// HTTP/2 allows them).
struct Limited {
    body: Incoming,
    left: u64,
    max: u64,
    /// Bytes passed on (the request's `bytes_in`).
    counted: Arc<std::sync::atomic::AtomicU64>,
}

impl Body for Limited {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.left {
                        return Poll::Ready(Some(Err(ClientBodyError::TooLarge(this.max))));
                    }
                    this.left -= n;
                    this.counted.fetch_add(n, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(ClientBodyError::Other(error.to_string())))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
