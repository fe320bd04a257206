//! The request path, whatever the client speaks: route → policy → connect
//! (retrying elsewhere when that is safe) → exchange with the backend → the
//! response head and body, handed back to the client's side to write.
//!
//! HTTP/1.1 clients come here from [`crate::connection`]; HTTP/2 clients
//! through hyper, by [`handle`].

use crate::app::{Pool, Snapshot};
use crate::health::{self, Outcome};
use crate::http1::{self, Framing, ResponseHead};
use crate::plugin::CurrentRequest;
use crate::request::RequestHead;
use crate::upstream::{BodySource, ClientBodyError, ExchangeError, Outgoing, ResponseBody, ResponseBodyError};
use bytes::{Bytes, BytesMut};
use http::header;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use smallvec::SmallVec;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

/// An answer the balancer gives itself, with a one-line plain-text body.
#[derive(Debug)]
pub struct LocalReply {
    pub status: StatusCode,
    pub message: String,
}

impl LocalReply {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        LocalReply {
            status,
            message: message.into(),
        }
    }
}

/// A backend's answer: its head, and its body still to be read.
pub struct Forwarded {
    pub head: ResponseHead,
    pub body: ResponseBody,
    /// A buffer done with (the request head sent upstream), to write the response head into.
    pub scratch: Vec<u8>,
}

/// Where a request came from, with the client's IP already written out for
/// `X-Forwarded-For` (once per connection rather than once per request).
#[derive(Clone, Copy)]
pub struct Client {
    pub addr: SocketAddr,
    ip_text: [u8; Client::IP_TEXT_MAX],
    ip_len: u8,
}

impl Client {
    /// The longest IP address text (an IPv4-mapped IPv6 address).
    const IP_TEXT_MAX: usize = 45;

    pub fn new(addr: SocketAddr) -> Client {
        let mut ip_text = [0; Client::IP_TEXT_MAX];
        let mut rest = &mut ip_text[..];
        // Fits: no IP address is written longer than IP_TEXT_MAX.
        let _ = std::io::Write::write_fmt(&mut rest, format_args!("{}", addr.ip()));
        let ip_len = (Client::IP_TEXT_MAX - rest.len()) as u8;
        Client { addr, ip_text, ip_len }
    }

    /// The client's IP address as text (`203.0.113.7`, `2001:db8::1`).
    pub fn ip_text(&self) -> &[u8] {
        &self.ip_text[..usize::from(self.ip_len)]
    }
}

/// The pool a request goes to, by its host and path.
pub fn route<'a>(snapshot: &'a Snapshot, head: &RequestHead) -> Option<&'a Pool> {
    let index = snapshot.router.pool_for(head.host(), head.path())?;
    snapshot.pools.get(index)
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
    match error {
        ClientBodyError::Timeout(_) => LocalReply::new(StatusCode::REQUEST_TIMEOUT, error.to_string()),
        _ => LocalReply::new(StatusCode::BAD_REQUEST, error.to_string()),
    }
}

/// Reads the body into memory when the request may be retried after reaching a
/// backend: an idempotent method and a declared length within `limit`.
async fn prepare_body<B: BodySource>(method: &Method, body: &mut B, limit: usize) -> Result<BodyState, LocalReply> {
    match body.framing() {
        Framing::Empty => Ok(BodyState::Held(Bytes::new())),
        Framing::Length(length) if length <= limit as u64 && is_idempotent(method) => {
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
/// safe, and returns the first backend answer or the balancer's own.
pub async fn forward<B: BodySource>(
    pool: &Pool,
    client: &Client,
    request: RequestHead,
    source: &mut B,
    upgrade: bool,
    mut timer: Pin<&mut tokio::time::Sleep>,
) -> Result<Forwarded, LocalReply> {
    let mut body = prepare_body(&request.method, source, pool.config.retry_buffer).await?;
    let may_replay = is_idempotent(&request.method);
    let head_request = request.method == Method::HEAD;
    let framing = source.framing();
    let current = CurrentRequest {
        head: request,
        client: client.addr,
    };
    // Encoded once, for whichever backend gets the request.
    let mut head = crate::buffers::take_write();
    let mut tried: SmallVec<[usize; 4]> = SmallVec::new();
    let mut stale_connections = 0;
    let report = |backend: &std::sync::Arc<crate::backend::Backend>, outcome| {
        health::record(&pool.name, &pool.backends, backend, outcome, &pool.config.outlier)
    };

    loop {
        let choice = pool.policy.choose(&current, &pool.backends, &tried);
        let Some(index) = choice.backend else {
            return Err(if tried.is_empty() {
                LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no backend of pool `{}` is available", pool.name),
                )
            } else {
                LocalReply::new(
                    StatusCode::BAD_GATEWAY,
                    format!("no backend of pool `{}` could serve the request", pool.name),
                )
            });
        };
        let backend = &pool.backends[index];
        tried.push(index);
        let out_of_tries = tried.len() > pool.config.retries as usize;
        let in_flight = backend.state.start_request();

        let conn = match backend
            .conns
            .checkout(backend.socket, pool.config.connect_timeout, pool.conn_limits)
            .await
        {
            Ok(conn) => conn,
            Err(error) => {
                report(backend, Outcome::Failure);
                tracing::warn!(pool = %pool.name, backend = %backend.address, %error, "backend unreachable");
                if out_of_tries {
                    return Err(LocalReply::new(
                        StatusCode::BAD_GATEWAY,
                        format!("backend {} is unreachable", backend.address),
                    ));
                }
                continue;
            }
        };
        let reused = conn.reused;

        if head.is_empty() {
            let request = &current.head;
            let out_framing = match &body {
                BodyState::Held(bytes) if !bytes.is_empty() => Framing::Length(bytes.len() as u64),
                _ => framing,
            };
            encode_request_head(request, client, out_framing, &backend.address, upgrade, &mut head)
                .map_err(|message| LocalReply::new(StatusCode::BAD_REQUEST, message))?;
        }
        let streamed = matches!(body, BodyState::Stream);
        let outgoing = match &body {
            BodyState::Held(bytes) => Outgoing::Held(bytes),
            BodyState::Stream => Outgoing::Stream(&mut *source),
            BodyState::Spent => {
                return Err(LocalReply::new(
                    StatusCode::BAD_GATEWAY,
                    "the request body was already sent and cannot be sent again",
                ));
            }
        };

        let exchanged = conn.exchange(&head, outgoing, head_request, upgrade);
        timer
            .as_mut()
            .reset(tokio::time::Instant::now() + pool.config.response_timeout);
        let exchanged = tokio::select! {
            biased;
            exchanged = exchanged => Ok(exchanged),
            () = timer.as_mut() => Err(()),
        };
        let error = match exchanged {
            Err(()) => {
                report(backend, Outcome::Failure);
                tracing::warn!(pool = %pool.name, backend = %backend.address, timeout = ?pool.config.response_timeout, "backend response timed out");
                return Err(LocalReply::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("backend {} did not answer in time", backend.address),
                ));
            }
            Ok(Ok((response, conn))) => {
                let outcome = if response.status.is_server_error() {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                report(backend, outcome);
                let body = conn.into_body(&response, in_flight, pool.config.read_timeout);
                return Ok(Forwarded {
                    head: response,
                    body,
                    scratch: head,
                });
            }
            Ok(Err(error)) => error,
        };
        if streamed && !matches!(error, ExchangeError::NotSent(_)) {
            body = BodyState::Spent;
        }
        let replayable = matches!(body, BodyState::Held(_));
        match error {
            ExchangeError::Client(error) => return Err(client_body_reply(&error)),
            // A keep-alive connection the backend had closed: not the backend's fault.
            ExchangeError::NotSent(_) if reused && stale_connections < MAX_STALE_RETRIES => {
                stale_connections += 1;
                tried.pop();
            }
            ExchangeError::Stale if may_replay && replayable && stale_connections < MAX_STALE_RETRIES => {
                stale_connections += 1;
                tried.pop();
            }
            ExchangeError::NotSent(error) => {
                report(backend, Outcome::Failure);
                tracing::warn!(pool = %pool.name, backend = %backend.address, %error, "request not sent");
                if out_of_tries {
                    return Err(LocalReply::new(
                        StatusCode::BAD_GATEWAY,
                        format!("backend {} closed the connection", backend.address),
                    ));
                }
            }
            error @ (ExchangeError::Failed(_) | ExchangeError::Stale) => {
                report(backend, Outcome::Failure);
                if may_replay && replayable && !out_of_tries {
                    tracing::warn!(pool = %pool.name, backend = %backend.address, %error, "backend failed an idempotent request; retrying elsewhere");
                } else {
                    tracing::warn!(pool = %pool.name, backend = %backend.address, %error, "backend failed during the request");
                    return Err(LocalReply::new(
                        StatusCode::BAD_GATEWAY,
                        format!("backend {} failed: {error}", backend.address),
                    ));
                }
            }
        }
    }
}

/// Stale pooled connections tolerated per request before a backend counts as failing.
const MAX_STALE_RETRIES: u32 = 3;

/// Headers of the client's request that are not copied upstream as they are:
/// hop-by-hop ones ([`http1::HOP_BY_HOP`]), framing (rewritten), `Host` and
/// the `X-Forwarded-*` family (rewritten), `Expect` (answered by the balancer).
fn rewritten_upstream(name: &[u8]) -> bool {
    const REWRITTEN: [&str; 6] = [
        "content-length",
        "host",
        "expect",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
    ];
    REWRITTEN.iter().any(|r| r.as_bytes().eq_ignore_ascii_case(name)) || http1::is_hop_by_hop(name)
}

/// Encodes the head sent upstream: HTTP/1.1 in origin form, hop-by-hop
/// headers (and those `Connection` names) removed, `X-Forwarded-*` added, the
/// client's host kept (an HTTP/2 `:authority` or absolute-form target becomes
/// `Host`; with none, `fallback_host`), framed by `framing`. `upgrade`: the
/// client asks to switch protocols, and its `Upgrade` is passed on.
pub fn encode_request_head(
    request: &RequestHead,
    client: &Client,
    framing: Framing,
    fallback_host: &str,
    upgrade: bool,
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    if request.method == Method::CONNECT {
        return Err("the request target cannot be forwarded");
    }
    out.extend_from_slice(request.method.as_str().as_bytes());
    out.push(b' ');
    request.write_origin_form(out);
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    // The request target's authority wins over a Host header (RFC 9112 3.2.2).
    let host = request.host().map_or(fallback_host.as_bytes(), str::as_bytes);
    if host.iter().any(|&b| b == b'\r' || b == b'\n') {
        return Err("the host is not valid");
    }
    out.extend_from_slice(host);
    out.extend_from_slice(b"\r\n");

    for (name, value) in request.headers() {
        if rewritten_upstream(name) || request.named_by_connection(name) {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }

    out.extend_from_slice(b"x-forwarded-for: ");
    for earlier in request.header_all("x-forwarded-for") {
        out.extend_from_slice(earlier);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client.ip_text());
    out.extend_from_slice(b"\r\nx-forwarded-host: ");
    out.extend_from_slice(host);
    out.extend_from_slice(b"\r\nx-forwarded-proto: http\r\n");
    if upgrade && let Some(protocol) = request.header("upgrade") {
        out.extend_from_slice(b"connection: upgrade\r\nupgrade: ");
        out.extend_from_slice(protocol);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked | Framing::UntilClose => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty if matches!(request.method, Method::POST | Method::PUT | Method::PATCH) => {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Framing::Empty => {}
    }
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// A response body for an HTTP/2 client: the backend's, streamed, or one the
/// balancer wrote.
pub enum ProxyBody {
    Upstream(ResponseBody),
    Local(Full<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        match self.get_mut() {
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Local(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Local(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Local(b) => b.size_hint(),
        }
    }
}

fn local_response(reply: LocalReply) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::Local(Full::new(Bytes::from(format!("{}\n", reply.message)))));
    *response.status_mut() = reply.status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// An HTTP/2 client's body, read through hyper.
struct IncomingSource(Incoming);

impl BodySource for IncomingSource {
    fn framing(&self) -> Framing {
        if self.0.is_end_stream() {
            return Framing::Empty;
        }
        match self.0.size_hint().exact() {
            Some(n) => Framing::Length(n),
            None => Framing::Chunked,
        }
    }

    async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClientBodyError> {
        while let Some(frame) = self.0.frame().await {
            let frame = frame.map_err(|e| ClientBodyError::Other(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                return Ok(Some(data));
            }
        }
        Ok(None)
    }
}

/// Serves one request of an HTTP/2 client.
pub async fn handle(snapshot: &Snapshot, client: &Client, request: Request<Incoming>) -> Response<ProxyBody> {
    let (parts, body) = request.into_parts();
    let mut source = IncomingSource(body);
    let head = match RequestHead::from_parts(&parts, source.framing()) {
        Ok(head) => head,
        Err(error) => return local_response(LocalReply::new(error.status(), error.to_string())),
    };
    let Some(pool) = route(snapshot, &head) else {
        return local_response(LocalReply::new(StatusCode::NOT_FOUND, "no route matches this request"));
    };
    let timer = tokio::time::sleep(pool.config.response_timeout);
    tokio::pin!(timer);
    match forward(pool, client, head, &mut source, false, timer).await {
        Ok(Forwarded { head, body, .. }) => {
            let mut response = Response::new(ProxyBody::Upstream(body));
            *response.status_mut() = head.status;
            *response.headers_mut() = head.header_map();
            response
        }
        Err(reply) => local_response(reply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_head_is_rewritten_for_the_backend() {
        let mut buf = bytes::BytesMut::from(
            "POST http://example.com/a?b=1 HTTP/1.1\r\nHost: ignored.example\r\n\
             Connection: x-secret, keep-alive\r\nX-Secret: 1\r\nTE: trailers\r\n\
             X-Forwarded-For: 10.0.0.1\r\nContent-Length: 3\r\nAccept: */*\r\n\r\nabc",
        );
        let request = http1::parse_request(&mut buf).expect("valid").expect("complete");
        let client = Client::new("127.0.0.9:5555".parse().expect("addr"));
        let mut out = Vec::new();
        encode_request_head(&request, &client, request.body, "backend:1", false, &mut out).expect("encodes");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "POST /a?b=1 HTTP/1.1\r\nhost: example.com\r\nAccept: */*\r\n\
             x-forwarded-for: 10.0.0.1, 127.0.0.9\r\nx-forwarded-host: example.com\r\n\
             x-forwarded-proto: http\r\ncontent-length: 3\r\n\r\n"
        );
    }

    #[test]
    fn a_request_without_host_gets_the_fallback_and_chunked_framing() {
        let (parts, ()) = Request::get("/x").body(()).expect("valid").into_parts();
        let request = RequestHead::from_parts(&parts, Framing::Chunked).expect("fits");
        let client = Client::new("[::1]:5555".parse().expect("addr"));
        let mut out = Vec::new();
        encode_request_head(&request, &client, Framing::Chunked, "10.0.0.2:80", false, &mut out).expect("encodes");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("GET /x HTTP/1.1\r\nhost: 10.0.0.2:80\r\n"), "{text}");
        assert!(text.contains("x-forwarded-for: ::1\r\n"), "{text}");
        assert!(text.ends_with("transfer-encoding: chunked\r\n\r\n"), "{text}");
    }
}
