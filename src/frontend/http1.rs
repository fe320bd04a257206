//! The HTTP/1.1 front end: one client connection, over any stream. Reads each
//! request head, hands the request to the pipeline ([`proxy::serve`]), writes
//! the answer back, and keeps the connection for the next request when both
//! sides allow it.
//!
//! Everything for one request happens in the connection's own task. An idle
//! connection holds no buffer (it waits for readability, then reads), so ten
//! thousand idle keep-alive clients cost little more than their sockets.

use super::ClientStream;
use crate::app::App;
use crate::buffers;
use crate::http::h1::{self, BodyDecoder, Decoded, ResponseHead};
use crate::http::{BodySource, ClientAddr, ClientBodyError, Edge, Framing, HeadLimits, RequestHead};
use crate::proxy::{self, Answer, Delivery, Forwarded, LocalReply, Termination, Trace};
use crate::shutdown::Shutdown;
use crate::snapshot::Snapshot;
use crate::upstream::{ResponseBody, Transport};
use bytes::{Bytes, BytesMut};
use http::{StatusCode, Version};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

/// Bytes read from a client at a time.
const READ_CHUNK: usize = 4 * 1024;
/// Response bytes gathered before a write.
const WRITE_BATCH: usize = 64 * 1024;

// Not boxed: a head is read per request, and a box would be an allocation each time.
#[allow(clippy::large_enum_variant)]
enum NextHead {
    Head(RequestHead),
    /// Closed by the client, or idle too long.
    Close,
    /// Refused with this status.
    Refuse(StatusCode, String),
}

/// Serves HTTP/1.1 requests on `stream` until either side closes it. `buf`
/// holds what was read while the protocol was chosen, and `timer` is set to
/// the first request head's deadline.
pub async fn serve<S: ClientStream>(
    app: &Arc<App>,
    mut stream: S,
    mut buf: BytesMut,
    mut timer: Pin<Box<Sleep>>,
    peer: SocketAddr,
    edge: Option<Arc<Edge>>,
    shutdown: &Shutdown,
) {
    let client = ClientAddr::with_edge(peer, edge);
    let mut deadline = timer.deadline();
    // Timers per connection, moved on rather than re-created: one for the
    // request head's deadline, one for the backend's response. Each deadline
    // only ever moves later, which tokio handles without touching its wheel.
    let mut response_timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(Duration::ZERO));
    // The head is taken out of the match before the request is served: a value
    // matched on lives to the match's end, so an await inside it would keep
    // room for a whole request head in every idle connection's state.
    let refusal = loop {
        timer.as_mut().reset(deadline);
        let limits = client.edge.as_deref().map_or(&HeadLimits::DEFAULT, |edge| &edge.limits);
        let head = match next_head(&mut stream, &mut buf, timer.as_mut(), limits).await {
            NextHead::Head(head) => head,
            NextHead::Close => {
                buffers::give(buf);
                return;
            }
            NextHead::Refuse(status, message) => {
                break LocalReply::new(status, Termination::BadRequest, message);
            }
        };
        let busy = shutdown.busy();
        let snapshot = app.snapshot();
        let header_read_timeout = snapshot.config.server.header_read_timeout;
        let request = Box::pin(serve_request(
            &snapshot,
            &mut stream,
            &mut buf,
            head,
            &client,
            response_timer.as_mut(),
        ));
        let (keep, unread) = request.await;
        drop(busy);
        if !keep || shutdown.is_stopping() {
            if unread {
                // Answered before the client finished sending (413, 408...).
                buffers::give(std::mem::take(&mut buf));
                // Boxed: a rare path, kept out of every idle connection's state.
                Box::pin(linger(&mut stream)).await;
            }
            buffers::give(buf);
            return;
        }
        if buf.is_empty() {
            // The connection holds no buffer while it waits.
            buffers::give(std::mem::take(&mut buf));
        }
        deadline = Instant::now() + header_read_timeout;
    };
    buffers::give(buf);
    // The trace is made after the write: held across it, it would take room in
    // every idle connection's state.
    let (status, cause) = (refusal.status, refusal.cause);
    let (_, delivery, bytes_out) =
        write_local(&mut stream, &refusal, false, false, false, client.edge.as_deref()).await;
    let trace = Trace::refused(status, cause, peer);
    proxy::finish(&app.snapshot(), &trace, None, delivery, bytes_out);
    // What follows a refused head (the rest of a huge header, a body) is
    // still coming: the answer must not be lost to a reset.
    Box::pin(linger(&mut stream)).await;
}

/// Reads until a whole request head is in `buf`, within the timer's deadline.
async fn next_head<S: ClientStream>(
    stream: &mut S,
    buf: &mut BytesMut,
    mut timer: Pin<&mut Sleep>,
    limits: &HeadLimits,
) -> NextHead {
    loop {
        if !buf.is_empty() {
            match h1::parse_request_within(buf, limits) {
                Ok(Some(head)) => return NextHead::Head(head),
                Ok(None) => {}
                Err(error) => return NextHead::Refuse(error.status(), error.to_string()),
            }
        } else if !super::client_spoke(stream, timer.as_mut()).await {
            return NextHead::Close;
        }
        if buf.capacity() == 0 {
            *buf = buffers::take();
        } else if buf.capacity() - buf.len() < 512 {
            buf.reserve(READ_CHUNK);
        }
        let read = tokio::select! {
            biased;
            read = stream.read_buf(buf) => read,
            () = timer.as_mut() => {
                return if buf.is_empty() {
                    NextHead::Close
                } else {
                    NextHead::Refuse(StatusCode::REQUEST_TIMEOUT, "the request head took too long".into())
                };
            }
        };
        match read {
            Ok(0) | Err(_) => return NextHead::Close,
            Ok(_) => {}
        }
    }
}

/// Serves one request; returns whether the connection can carry another, and
/// whether the client may still be sending a body no one read (then the
/// connection is closed lingering).
async fn serve_request<S: ClientStream>(
    snapshot: &Snapshot,
    stream: &mut S,
    buf: &mut BytesMut,
    head: RequestHead,
    client: &ClientAddr,
    timer: Pin<&mut Sleep>,
) -> (bool, bool) {
    let framing = head.body;
    let head_request = head.method == http::Method::HEAD;
    let keep_alive = head.keep_alive;
    let upgrade = head.upgrade;
    let http10 = head.version == Version::HTTP_10;
    let mut source = ClientBody {
        stream: &mut *stream,
        buf: &mut *buf,
        decoder: BodyDecoder::new(framing),
        framing,
        continue_due: head.expect_continue,
        read_timeout: snapshot.config.server.client_idle_timeout,
        received: 0,
        max: u64::MAX,
    };
    let mut trace = Trace::start(client.addr);
    let mut answer = proxy::serve(snapshot, client, &head, &mut source, timer, &mut trace).await;
    let unread = !source.decoder.is_done();
    let keep = keep_alive && !unread;
    // Written from where it lies: moving a backend's answer is a copy of it.
    let (keep, delivery, bytes_out) = match &mut answer {
        Answer::Local(reply) => write_local(stream, reply, keep, http10, head_request, client.edge.as_deref()).await,
        Answer::Backend(forwarded) if upgrade && forwarded.head.status == StatusCode::SWITCHING_PROTOCOLS => {
            tunnel(stream, buf, forwarded, snapshot.config.server.client_idle_timeout).await;
            (false, Delivery::Whole, 0)
        }
        Answer::Backend(forwarded) => {
            let written = write_response(
                stream,
                &forwarded.head,
                &mut forwarded.body,
                &mut forwarded.scratch,
                keep,
                http10,
                client.edge.as_deref(),
                &forwarded.edits,
            )
            .await;
            buffers::give_write(std::mem::take(&mut forwarded.scratch));
            written
        }
    };
    proxy::finish(snapshot, &trace, Some(&head), delivery, bytes_out);
    (keep, unread && !upgrade)
}

/// How long a client that is still sending gets to read an answer given
/// before its request was read whole, and the longest pause in its sending.
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_QUIET: Duration = Duration::from_secs(1);

/// Closes a connection whose client may still be sending, as nginx's
/// `lingering_close` does: the answer is followed by a FIN, then what the
/// client still sends is read and dropped (up to [`LINGER_TIME`], or until
/// it pauses [`LINGER_QUIET`] or closes). Closing at once with unread bytes
/// would make the kernel send a reset, which can destroy the answer before
/// the client reads it.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let _ = stream.shutdown().await;
    let mut sink = buffers::take();
    let until = Instant::now() + LINGER_TIME;
    loop {
        sink.clear();
        let quiet = LINGER_QUIET.min(until.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(quiet, stream.read_buf(&mut sink)).await {
            Ok(Ok(n)) if n > 0 && Instant::now() < until => {}
            _ => break,
        }
    }
    buffers::give(sink);
}

/// Writes the balancer's own answer; the one place an HTTP/1 local reply is
/// rendered. Returns whether the connection can carry another request, how
/// the writing went and the body bytes written.
async fn write_local<S: AsyncWrite + Unpin>(
    stream: &mut S,
    reply: &LocalReply,
    keep: bool,
    http10: bool,
    head_request: bool,
    edge: Option<&Edge>,
) -> (bool, Delivery, u64) {
    let mut out = Vec::with_capacity(256);
    // An HTTP/1.0 client keeps the connection only when told so.
    let connection = match (keep, http10) {
        (false, _) => Some("close"),
        (true, true) => Some("keep-alive"),
        (true, false) => None,
    };
    let mut extra = added_headers(edge);
    let added = extra.len();
    for (name, value) in &reply.headers {
        if h1::replaced_by(&extra[..added], name.as_bytes()) {
            continue;
        }
        extra.extend_from_slice(name.as_bytes());
        extra.extend_from_slice(b": ");
        extra.extend_from_slice(value.as_bytes());
        extra.extend_from_slice(b"\r\n");
    }
    let sent = match &reply.body {
        None => {
            h1::local_response(reply.status, &reply.message, connection, &extra, &mut out);
            if head_request {
                // The head says how long the body would be; a HEAD gets none.
                out.truncate(out.len() - reply.message.len() - 1);
                0
            } else {
                reply.message.len() as u64 + 1
            }
        }
        Some(body) => {
            h1::direct_response(reply.status, body, connection, &extra, head_request, &mut out);
            if head_request { 0 } else { body.len() as u64 }
        }
    };
    let written = stream.write_all(&out).await.is_ok();
    let delivery = if written { Delivery::Whole } else { Delivery::ClientGone };
    (written && keep, delivery, sent)
}

/// Header lines the listener adds to every answer (HSTS over TLS); none for
/// a plain listener.
fn added_headers(edge: Option<&Edge>) -> smallvec::SmallVec<[u8; 128]> {
    let mut lines = smallvec::SmallVec::new();
    if let Some(hsts) = edge.and_then(|e| e.hsts.as_deref()) {
        lines.extend_from_slice(b"strict-transport-security: ");
        lines.extend_from_slice(hsts.as_bytes());
        lines.extend_from_slice(b"\r\n");
    }
    lines
}

/// Writes `head` and `body` through `out`; returns whether the connection can
/// carry another request, how the writing went and the body bytes written.
#[allow(clippy::too_many_arguments)] // One call site; a struct would only rename them.
async fn write_response<S: AsyncWrite + Unpin>(
    stream: &mut S,
    head: &ResponseHead,
    body: &mut ResponseBody,
    out: &mut Vec<u8>,
    keep: bool,
    http10: bool,
    edge: Option<&Edge>,
    edits: &[crate::http::edit::HeaderEdit],
) -> (bool, Delivery, u64) {
    const GONE: Delivery = Delivery::ClientGone;
    let mut sent = 0u64;
    let unframed = matches!(head.body, Framing::Chunked | Framing::UntilClose);
    // A body without a length goes to an HTTP/1.1 client chunked; an HTTP/1.0
    // client learns its end from the connection closing.
    let chunked = unframed && !http10;
    let close = !keep || (unframed && http10);
    out.clear();
    match edge {
        None => head.write_for_client(out, chunked, close, http10 && !close, b"", edits),
        Some(edge) => head.write_for_client(out, chunked, close, http10 && !close, &added_headers(Some(edge)), edits),
    }
    loop {
        // Take what is already at hand without waiting; write before waiting.
        let polled = std::future::poll_fn(|cx| Poll::Ready(body.poll_chunk(cx))).await;
        let next = match polled {
            Poll::Ready(next) => next,
            Poll::Pending => {
                if !out.is_empty() && stream.write_all(out).await.is_err() {
                    return (false, GONE, sent);
                }
                out.clear();
                body.chunk().await
            }
        };
        match next {
            Ok(Some(data)) => {
                sent += data.len() as u64;
                if chunked {
                    h1::chunk_header(data.len(), out);
                }
                if data.len() >= WRITE_BATCH / 4 {
                    if stream.write_all(out).await.is_err() || stream.write_all(&data).await.is_err() {
                        return (false, GONE, sent);
                    }
                    out.clear();
                } else {
                    out.extend_from_slice(&data);
                }
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
                if out.len() >= WRITE_BATCH {
                    if stream.write_all(out).await.is_err() {
                        return (false, GONE, sent);
                    }
                    out.clear();
                }
            }
            Ok(None) => {
                if chunked {
                    out.extend_from_slice(h1::LAST_CHUNK);
                }
                return match stream.write_all(out).await {
                    Ok(()) => (!close, Delivery::Whole, sent),
                    Err(_) => (false, GONE, sent),
                };
            }
            Err(error) => {
                // Mid-body: the client can only learn of it by the connection closing
                // (a chunked body then lacks its last chunk).
                let _ = stream.write_all(out).await;
                return (false, Delivery::BackendFailed(error.what()), sent);
            }
        }
    }
}

/// After a `101 Switching Protocols`: passes the 101 on, then bytes both ways
/// until both sides close or neither sends anything for `idle` (WebSocket and
/// other upgrades).
async fn tunnel<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    forwarded: &mut Forwarded,
    idle: Duration,
) {
    let Forwarded {
        head,
        body,
        scratch: out,
        edits,
    } = forwarded;
    let Some(mut upgraded) = body.take_upgraded() else {
        return;
    };
    out.clear();
    head.write_for_client(out, false, false, false, b"", edits);
    out.extend_from_slice(&upgraded.early);
    if stream.write_all(out).await.is_err() {
        return;
    }
    // What the client sent after its request head belongs to the new protocol.
    if !buf.is_empty() && upgraded.stream.write_all(buf).await.is_err() {
        return;
    }
    buf.clear();
    buffers::give(std::mem::take(&mut upgraded.early));
    if let Err(error) = join(stream, &mut upgraded.stream, idle).await {
        tracing::debug!(%error, "upgraded connection ended");
    }
}

/// Copies bytes between `client` and `backend` until both have closed their
/// sending side (each close is passed on), or nothing moved for `idle`.
async fn join<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    backend: &mut Box<dyn Transport>,
    idle: Duration,
) -> std::io::Result<()> {
    let (mut from_client, mut from_backend) = (buffers::take(), buffers::take());
    let (mut client_open, mut backend_open) = (true, true);
    let deadline = tokio::time::sleep(idle);
    tokio::pin!(deadline);
    let result = loop {
        if !client_open && !backend_open {
            break Ok(());
        }
        let step = tokio::select! {
            read = client.read_buf(&mut from_client), if client_open => match read {
                Ok(0) => {
                    client_open = false;
                    backend.shutdown().await
                }
                Ok(_) => backend.write_all(&from_client).await,
                Err(error) => Err(error),
            },
            read = backend.read_buf(&mut from_backend), if backend_open => match read {
                Ok(0) => {
                    backend_open = false;
                    client.shutdown().await
                }
                Ok(_) => client.write_all(&from_backend).await,
                Err(error) => Err(error),
            },
            () = &mut deadline => break Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the tunnel was idle too long")),
        };
        if let Err(error) = step {
            break Err(error);
        }
        from_client.clear();
        from_backend.clear();
        deadline.as_mut().reset(Instant::now() + idle);
    };
    buffers::give(from_client);
    buffers::give(from_backend);
    result
}

/// An HTTP/1.1 client's request body, read from its connection.
struct ClientBody<'a, S> {
    stream: &'a mut S,
    buf: &'a mut BytesMut,
    decoder: BodyDecoder,
    framing: Framing,
    /// `Expect: 100-continue` not answered yet.
    continue_due: bool,
    read_timeout: Duration,
    /// Body bytes decoded so far.
    received: u64,
    /// The most body bytes taken (`u64::MAX`: no limit).
    max: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> BodySource for ClientBody<'_, S> {
    fn framing(&self) -> Framing {
        self.framing
    }

    fn received(&self) -> u64 {
        self.received
    }

    fn limit(&mut self, max: u64) {
        self.max = max;
    }

    async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClientBodyError> {
        if self.received > self.max {
            return Err(ClientBodyError::TooLarge(self.max));
        }
        if self.continue_due {
            self.continue_due = false;
            if self.buf.is_empty() {
                self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
            }
        }
        loop {
            match self.decoder.decode(self.buf)? {
                Decoded::Data(data) => {
                    self.received += data.len() as u64;
                    if self.received > self.max {
                        return Err(ClientBodyError::TooLarge(self.max));
                    }
                    return Ok(Some(data));
                }
                Decoded::End => return Ok(None),
                Decoded::NeedMore => {}
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(16 * 1024);
            }
            match tokio::time::timeout(self.read_timeout, self.stream.read_buf(self.buf)).await {
                Err(_) => return Err(ClientBodyError::Timeout(self.read_timeout)),
                Ok(Ok(0)) => self.decoder.at_eof()?,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
            }
        }
    }
}
