//! The request path: route → policy → connect (retrying elsewhere when nothing
//! was sent) → forward → stream the response back.

use crate::app::{App, Pool};
use crate::health::{self, Outcome};
use crate::plugin::RequestSlot;
use crate::upstream::{BoxError, RequestBody, SendError, UpstreamBody};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use smallvec::SmallVec;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A response body: the backend's, streamed, or one the balancer wrote.
pub enum ProxyBody {
    Upstream(UpstreamBody),
    Local(Full<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
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

/// A response the balancer answers itself, with a one-line plain-text body.
pub fn local_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::Local(Full::new(Bytes::from(format!("{message}\n")))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Serves one client request.
pub async fn handle(app: &App, client: SocketAddr, request: Request<Incoming>) -> Response<ProxyBody> {
    let snapshot = app.snapshot();
    let route = snapshot
        .router
        .pool_for(request_host(request.uri(), request.headers()), request.uri().path());
    let Some(pool_index) = route else {
        return local_response(StatusCode::NOT_FOUND, "no route matches this request");
    };
    let pool = &snapshot.pools[pool_index];
    let (parts, body) = request.into_parts();
    forward(pool, client, parts, body).await
}

/// The host the client asked for: the URI's authority (HTTP/2, absolute form)
/// or the `Host` header.
fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
}

/// How the request body can be sent, and sent again.
enum BodyState {
    /// The client's body, streamed: it can be sent once.
    Stream(Incoming),
    /// Held in memory (empty, or small and idempotent): it can be sent again.
    Held(Bytes),
    /// Already streamed to a backend.
    Spent,
}

impl BodyState {
    /// The body for the next attempt, if there can be one.
    fn next(&mut self) -> Option<RequestBody> {
        match std::mem::replace(self, BodyState::Spent) {
            BodyState::Stream(body) => Some(RequestBody::Stream(body)),
            BodyState::Held(bytes) => {
                *self = BodyState::Held(bytes.clone());
                Some(RequestBody::Bytes(Full::new(bytes)))
            }
            BodyState::Spent => None,
        }
    }

    fn is_replayable(&self) -> bool {
        matches!(self, BodyState::Held(_))
    }
}

/// Methods a client expects may be repeated (RFC 9110 9.2.2).
fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Reads the body into memory when the request may be retried after reaching a
/// backend: an idempotent method and a declared length within `limit`.
async fn prepare_body(
    parts: &http::request::Parts,
    body: Incoming,
    limit: usize,
) -> Result<BodyState, Response<ProxyBody>> {
    if body.is_end_stream() {
        return Ok(BodyState::Held(Bytes::new()));
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    match declared {
        Some(length) if length <= limit && is_idempotent(&parts.method) => {
            match http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit)).await {
                Ok(collected) => Ok(BodyState::Held(collected.to_bytes())),
                Err(_) => Err(local_response(
                    StatusCode::BAD_REQUEST,
                    "the request body did not match its Content-Length",
                )),
            }
        }
        _ => Ok(BodyState::Stream(body)),
    }
}

async fn forward(pool: &Pool, client: SocketAddr, parts: http::request::Parts, body: Incoming) -> Response<ProxyBody> {
    let mut body = match prepare_body(&parts, body, pool.config.retry_buffer).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let may_replay = is_idempotent(&parts.method);
    let mut current = RequestSlot {
        parts: Some(parts),
        client: Some(client),
    };
    let mut rewritten = false;
    let mut tried: SmallVec<[usize; 4]> = SmallVec::new();
    let mut stale_connections = 0;
    let report = |backend: &std::sync::Arc<crate::backend::Backend>, outcome| {
        health::record(&pool.name, &pool.backends, backend, outcome, &pool.config.outlier)
    };

    loop {
        let choice = pool.policy.choose(&current, &pool.backends, &tried);
        let Some(index) = choice.backend else {
            return if tried.is_empty() {
                local_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("no backend of pool `{}` is available", pool.name),
                )
            } else {
                local_response(
                    StatusCode::BAD_GATEWAY,
                    &format!("no backend of pool `{}` could serve the request", pool.name),
                )
            };
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
                    return local_response(
                        StatusCode::BAD_GATEWAY,
                        &format!("backend {} is unreachable", backend.address),
                    );
                }
                continue;
            }
        };
        let reused = conn.reused;

        let Some(mut parts) = current.parts.take() else {
            return local_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request was lost before it could be sent",
            );
        };
        if !rewritten {
            if let Err(message) = rewrite_request_head(&mut parts, client) {
                return local_response(StatusCode::BAD_REQUEST, message);
            }
            rewritten = true;
        }
        let Some(request_body) = body.next() else {
            return local_response(
                StatusCode::BAD_GATEWAY,
                "the request body was already sent and cannot be sent again",
            );
        };
        // Only a request that can and may be sent again keeps a copy of its head.
        let replay_head = (may_replay && !out_of_tries && body.is_replayable()).then(|| parts.clone());
        let request = Request::from_parts(parts, request_body);

        let sent = conn.send(request, in_flight, pool.config.read_timeout);
        match tokio::time::timeout(pool.config.response_timeout, sent).await {
            Err(_) => {
                report(backend, Outcome::Failure);
                tracing::warn!(pool = %pool.name, backend = %backend.address, timeout = ?pool.config.response_timeout, "backend response timed out");
                return local_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("backend {} did not answer in time", backend.address),
                );
            }
            Ok(Ok(response)) => {
                let outcome = if response.status().is_server_error() {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                report(backend, outcome);
                return client_response(response);
            }
            Ok(Err(SendError::NotSent(request, error))) => {
                // Nothing reached the backend: the request can go elsewhere intact.
                let (parts, request_body) = request.into_parts();
                current.parts = Some(parts);
                if let RequestBody::Stream(stream) = request_body {
                    body = BodyState::Stream(stream);
                }
                if reused && stale_connections < MAX_STALE_RETRIES {
                    // A keep-alive connection the backend had closed: not the backend's fault.
                    stale_connections += 1;
                    tried.pop();
                    continue;
                }
                report(backend, Outcome::Failure);
                tracing::warn!(pool = %pool.name, backend = %backend.address, %error, "request not sent");
                if out_of_tries {
                    return local_response(
                        StatusCode::BAD_GATEWAY,
                        &format!("backend {} closed the connection", backend.address),
                    );
                }
            }
            Ok(Err(SendError::Failed(error))) => {
                report(backend, Outcome::Failure);
                match replay_head {
                    Some(head) if !out_of_tries => {
                        tracing::warn!(pool = %pool.name, backend = %backend.address, %error, "backend failed an idempotent request; retrying elsewhere");
                        current.parts = Some(head);
                    }
                    _ => {
                        tracing::warn!(pool = %pool.name, backend = %backend.address, %error, "backend failed during the request");
                        return local_response(
                            StatusCode::BAD_GATEWAY,
                            &format!("backend {} failed: {error}", backend.address),
                        );
                    }
                }
            }
        }
    }
}

/// Stale pooled connections tolerated per request before a backend counts as failing.
const MAX_STALE_RETRIES: u32 = 3;

/// Hop-by-hop headers (RFC 9110 7.6.1): they describe one connection and are
/// never forwarded.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (cheap comparisons of
    // standard headers) beats seven hashed removals.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    // Headers the Connection header names are hop-by-hop too.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Turns the client's request head into the one sent upstream: HTTP/1.1 in
/// origin form, hop-by-hop headers removed, `X-Forwarded-*` added, the
/// client's host kept (an HTTP/2 `:authority` becomes `Host`).
pub fn rewrite_request_head(parts: &mut http::request::Parts, client: SocketAddr) -> Result<(), &'static str> {
    remove_hop_by_hop(&mut parts.headers);
    // The request target's authority wins over a Host header (RFC 9112 3.2.2).
    let host = match parts.uri.authority() {
        Some(authority) => {
            let value = HeaderValue::from_str(authority.as_str()).map_err(|_| "the authority is not valid")?;
            parts.headers.insert(header::HOST, value.clone());
            Some(value)
        }
        None => parts.headers.get(header::HOST).cloned(),
    };
    if parts.uri.authority().is_some() || parts.uri.scheme().is_some() {
        let origin_form = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.uri = Uri::try_from(origin_form).map_err(|_| "the request target is not valid")?;
    }
    parts.version = Version::HTTP_11;
    if let Some(host) = host {
        parts.headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    let forwarded_for = match parts.headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(earlier) => HeaderValue::from_str(&format!("{earlier}, {}", client.ip())),
        None => HeaderValue::from_str(&client.ip().to_string()),
    };
    if let Ok(value) = forwarded_for {
        parts.headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    parts
        .headers
        .insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    Ok(())
}

fn client_response(response: Response<UpstreamBody>) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, ProxyBody::Upstream(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_head_is_rewritten_for_the_backend() {
        let request = Request::builder()
            .uri("http://example.com/a?b=1")
            .version(Version::HTTP_2)
            .header("connection", "x-secret, keep-alive")
            .header("x-secret", "1")
            .header("te", "trailers")
            .header("x-forwarded-for", "10.0.0.1")
            .header("accept", "*/*")
            .body(())
            .expect("valid request");
        let (mut parts, ()) = request.into_parts();
        let client: SocketAddr = "127.0.0.9:5555".parse().expect("addr");
        rewrite_request_head(&mut parts, client).expect("rewrites");
        assert_eq!(parts.uri, "/a?b=1");
        assert_eq!(parts.version, Version::HTTP_11);
        for gone in ["connection", "x-secret", "te", "keep-alive"] {
            assert!(!parts.headers.contains_key(gone), "{gone} must be removed");
        }
        assert_eq!(parts.headers["host"], "example.com");
        assert_eq!(parts.headers["x-forwarded-for"], "10.0.0.1, 127.0.0.9");
        assert_eq!(parts.headers["x-forwarded-host"], "example.com");
        assert_eq!(parts.headers["x-forwarded-proto"], "http");
        assert_eq!(parts.headers["accept"], "*/*");
    }
}
