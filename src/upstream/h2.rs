//! The HTTP/2 exchange with a backend (`protocol = "h2"` over TLS, `"h2c"`
//! over cleartext), through hyper's client connection: requests of one worker
//! share one connection per backend as streams, and the response body is
//! read as hyper delivers its frames, trailers included (gRPC's
//! `grpc-status` travels in them).
//!
//! The head sent is the one the HTTP/1 encoder writes (one place decides what
//! is forwarded and what is added), read back into hyper's request: the host
//! becomes `:authority`, framing headers go, and a client's `te: trailers` is
//! kept, as gRPC requires.
//!
//! A stream the backend refused unprocessed — `REFUSED_STREAM`, or beyond the
//! last stream id of a graceful GOAWAY — is [`ExchangeError::Refused`]: RFC
//! 9113 §8.7 makes it safe to send again, whatever the method.

use super::{ExchangeError, Outgoing, UpstreamRequest};
use crate::backend::InFlight;
use crate::http::h1::{self, ResponseHead};
use crate::http::{BodySource, ClientBodyError, DetachedBody, Framing};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::sync::mpsc;

use super::connect::{ConnectError, Transport};
use super::h1::ResponseBodyError;

/// A worker's handle on one HTTP/2 connection to a backend.
pub type Sender = SendRequest<UpstreamBody>;

/// What a backend may send ahead per stream and per connection: enough for a
/// fast backend to keep a client busy, bounded so that slow clients do not
/// park megabytes in Fulcrum.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;
/// A quiet connection is pinged, and closed when the ping is not answered.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the HTTP/2 handshake over `stream` (to `addr`) and spawns the
/// connection's task on this worker; the returned sender opens its streams.
pub async fn handshake(stream: Box<dyn Transport>, addr: SocketAddr) -> Result<Sender, ConnectError> {
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ConnectError::Http2(addr, e.to_string()))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(backend = %addr, %error, "HTTP/2 backend connection ended with an error");
        }
    });
    Ok(sender)
}

/// A stream about to be opened on a shared connection.
pub struct Conn {
    pub(super) sender: Sender,
    /// Over TLS (the `:scheme` is `https`).
    pub(super) secure: bool,
    /// Whether the connection carried earlier requests.
    pub reused: bool,
    pub(super) connected_in: Option<Duration>,
}

impl Conn {
    /// Sends the request and waits for the response head. A body streamed
    /// from an HTTP/2 client is handed to the stream whole and flows while
    /// the response does; one from an HTTP/1 client is pumped here until the
    /// response head arrives.
    pub async fn exchange<B: BodySource>(
        mut self,
        request: UpstreamRequest<'_>,
        body: Outgoing<'_, B>,
        in_flight: InFlight,
        read_timeout: Duration,
    ) -> Result<(ResponseHead, super::ResponseBody), ExchangeError> {
        if request.head.upgrade {
            return Err(ExchangeError::Unsendable(
                "a protocol switch (Upgrade) cannot be carried to an HTTP/2 backend",
            ));
        }
        if request.encoded.is_empty() {
            let forwarding = h1::Forwarding {
                client: request.client,
                peer_trusted: request.peer_trusted,
                via: request.via,
                request_id: request.request_id,
            };
            h1::encode_request_head(
                request.head,
                &forwarding,
                request.framing,
                request.fallback_host,
                false,
                request.encoded,
            )
            .map_err(ExchangeError::Unsendable)?;
        }
        let head_request = request.head.method == Method::HEAD;
        let trailers = request
            .head
            .header("te")
            .is_some_and(|te| te.eq_ignore_ascii_case(b"trailers"));
        let mut pump = None;
        let outgoing = match body {
            Outgoing::Held(bytes) => UpstreamBody::Held(Some(bytes.clone())),
            Outgoing::Stream(source) => match source.detach() {
                Some(detached) => UpstreamBody::Detached(detached),
                None => {
                    let (tx, rx) = mpsc::channel(1);
                    pump = Some((source, tx));
                    UpstreamBody::Channel(rx, request.framing)
                }
            },
        };
        let message =
            to_request(request.encoded, self.secure, trailers, outgoing).map_err(ExchangeError::Unsendable)?;
        self.sender
            .ready()
            .await
            .map_err(|e| ExchangeError::NotSent(io_error(e)))?;
        let responding = self.sender.try_send_request(message);
        tokio::pin!(responding);
        // The request body from an HTTP/1 client, a piece at a time, until
        // the answer comes (a backend may answer before it has read it all).
        let mut body_sender = None;
        let response = match pump {
            None => responding.await,
            Some((source, tx)) => {
                let mut tx = Some(tx);
                let response = loop {
                    if tx.is_none() {
                        break responding.as_mut().await;
                    }
                    let body_done = {
                        let step = tokio::select! {
                            biased;
                            response = responding.as_mut() => Err(response),
                            step = next_piece(&tx, source) => Ok(step),
                        };
                        match step {
                            Err(response) => break response,
                            // The stream is gone: its error comes as the response.
                            Ok(None) => true,
                            Ok(Some((permit, Ok(Some(data))))) => {
                                permit.send(data);
                                false
                            }
                            // The whole body is sent: the stream's request side ends.
                            Ok(Some((_, Ok(None)))) => true,
                            Ok(Some((_, Err(error)))) => return Err(ExchangeError::Client(error)),
                        }
                    };
                    if body_done {
                        tx = None;
                    }
                };
                // Kept open while the answer streams: dropping it would end
                // the request body early, as if it were whole.
                body_sender = tx;
                response
            }
        };
        let response = match response {
            Ok(response) => response,
            Err(mut error) => {
                if error.take_message().is_some() {
                    // Never left Fulcrum: the connection had closed.
                    return Err(ExchangeError::NotSent(io_error(error.into_error())));
                }
                return Err(classify(&error.into_error()));
            }
        };
        let (parts, incoming) = response.into_parts();
        let status = parts.status;
        let framing = if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || incoming.is_end_stream()
        {
            Framing::Empty
        } else {
            match incoming.size_hint().exact() {
                Some(0) if parts.headers.contains_key(http::header::CONTENT_LENGTH) => Framing::Empty,
                Some(n) if parts.headers.contains_key(http::header::CONTENT_LENGTH) => Framing::Length(n),
                _ => Framing::Chunked,
            }
        };
        let head = ResponseHead::from_parts(status, &parts.headers, framing);
        let mut body = Http2Body {
            body: incoming,
            in_flight: Some(in_flight),
            read_timeout,
            quiet: None,
            _request_body: body_sender,
            ended: false,
        };
        if framing == Framing::Empty && body.body.is_end_stream() {
            body.finish();
        }
        Ok((head, super::ResponseBody::Http2(Box::new(body))))
    }
}

/// Room for one piece of the client's body, and that piece; `None` once the
/// stream stopped taking it.
async fn next_piece<'a, B: BodySource>(
    tx: &'a Option<mpsc::Sender<Bytes>>,
    source: &mut B,
) -> Option<(mpsc::Permit<'a, Bytes>, Result<Option<Bytes>, ClientBodyError>)> {
    let permit = tx.as_ref()?.reserve().await.ok()?;
    Some((permit, source.next_chunk().await))
}

/// Why a stream failed, as the pipeline acts on it.
fn classify(error: &hyper::Error) -> ExchangeError {
    use std::error::Error as _;
    let mut cause = error.source();
    while let Some(inner) = cause {
        if let Some(h2) = inner.downcast_ref::<::h2::Error>() {
            let refused = h2.reason() == Some(::h2::Reason::REFUSED_STREAM) && h2.is_remote();
            // A graceful GOAWAY (NO_ERROR) fails only the streams past its last
            // stream id, which the backend never processed. After a GOAWAY with
            // an error, every open stream fails alike: nothing can be told.
            let beyond_goaway = h2.is_go_away() && h2.is_remote() && h2.reason() == Some(::h2::Reason::NO_ERROR);
            if refused || beyond_goaway {
                return ExchangeError::Refused(h2.to_string());
            }
            break;
        }
        cause = inner.source();
    }
    ExchangeError::Failed(format!("the HTTP/2 stream failed: {error}"))
}

fn io_error(error: hyper::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, error.to_string())
}

/// The request for hyper, from the head as the HTTP/1 encoder wrote it.
fn to_request(
    encoded: &[u8],
    secure: bool,
    trailers: bool,
    body: UpstreamBody,
) -> Result<Request<UpstreamBody>, &'static str> {
    const INVALID: &str = "the request head cannot be sent over HTTP/2";
    let mut fields = [httparse::EMPTY_HEADER; crate::http::MAX_HEADERS + 16];
    let mut parsed = httparse::Request::new(&mut fields);
    if !matches!(parsed.parse(encoded), Ok(httparse::Status::Complete(_))) {
        return Err(INVALID);
    }
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes()).map_err(|_| INVALID)?;
    let path = parsed.path.unwrap_or("/");
    let mut headers = HeaderMap::with_capacity(parsed.headers.len() + 1);
    let mut authority = None;
    for field in parsed.headers.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case("host") {
            authority = Some(field.value);
            continue;
        }
        // HTTP/2 frames the body itself; connection-specific fields are not allowed.
        if name.eq_ignore_ascii_case("transfer-encoding") || name.eq_ignore_ascii_case("connection") {
            continue;
        }
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| INVALID)?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| INVALID)?;
        headers.append(name, value);
    }
    if trailers {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
    let authority = std::str::from_utf8(authority.ok_or(INVALID)?).map_err(|_| INVALID)?;
    let uri = Uri::builder()
        .scheme(if secure { "https" } else { "http" })
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|_| INVALID)?;
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_2;
    *request.headers_mut() = headers;
    Ok(request)
}

/// A request body on its way to an HTTP/2 backend.
pub enum UpstreamBody {
    /// Held in memory (sent again on a retry).
    Held(Option<Bytes>),
    /// Pumped from an HTTP/1 client by the request's task, with its framing.
    Channel(mpsc::Receiver<Bytes>, Framing),
    /// An HTTP/2 client's own body stream.
    Detached(DetachedBody),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match self.get_mut() {
            UpstreamBody::Held(bytes) => {
                Poll::Ready(bytes.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))))
            }
            UpstreamBody::Channel(rx, _) => rx.poll_recv(cx).map(|data| data.map(|d| Ok(Frame::data(d)))),
            UpstreamBody::Detached(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Held(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            UpstreamBody::Channel(_, framing) => *framing == Framing::Empty,
            UpstreamBody::Detached(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Held(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            UpstreamBody::Channel(_, Framing::Length(n)) => SizeHint::with_exact(*n),
            UpstreamBody::Channel(..) => SizeHint::default(),
            UpstreamBody::Detached(body) => body.size_hint(),
        }
    }
}

/// A backend's HTTP/2 response body on its way to the client, trailers
/// included. A backend quiet mid-body for longer than `read_timeout` is cut
/// off (the stream is reset when the body is dropped).
pub struct Http2Body {
    body: Incoming,
    in_flight: Option<InFlight>,
    read_timeout: Duration,
    quiet: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The rest of an HTTP/1 client's request body would go here; kept so
    /// that the request does not look whole to the backend.
    _request_body: Option<mpsc::Sender<Bytes>>,
    ended: bool,
}

impl Http2Body {
    /// Whether the whole body has been read.
    pub fn is_end(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn finish(&mut self) {
        self.ended = true;
        self.quiet = None;
        self.in_flight = None;
        self._request_body = None;
    }

    fn fail(&mut self, error: ResponseBodyError) -> ResponseBodyError {
        self.finish();
        error
    }

    /// The next frame: data or trailers; `None` at the end.
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.quiet = None;
                if self.body.is_end_stream() {
                    self.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                Poll::Ready(Some(Err(self.fail(ResponseBodyError::Stream(error.to_string())))))
            }
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let timeout = self.read_timeout;
                let quiet = self.quiet.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                ready!(quiet.as_mut().poll(cx));
                Poll::Ready(Some(Err(self.fail(ResponseBodyError::Timeout(timeout)))))
            }
        }
    }

    /// The next piece of data (trailers are skipped: an HTTP/1 client gets none).
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, ResponseBodyError>> {
        loop {
            match ready!(self.poll_frame(cx)) {
                None => return Poll::Ready(Ok(None)),
                Some(Err(error)) => return Poll::Ready(Err(error)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Poll::Ready(Ok(Some(data)));
                    }
                }
            }
        }
    }

    pub fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
