//! The HTTP/2 exchange with a backend (`protocol = "h2"` over TLS, `"h2c"`
//! over cleartext), with the `h2` crate: requests of one worker share one
//! connection per backend as streams, and the response body is read as its
//! frames come, trailers included (gRPC's `grpc-status` travels in them).
//!
//! The `h2` crate rather than hyper's client: hyper spawns a task for every
//! request's response and another for its body, about 6,000 instructions a
//! request (callgrind, gRPC unary over h2c). Here the request's own task sends
//! the head and a held body and reads the answer; a task is spawned only to
//! stream an HTTP/2 client's body while the answer flows (bidirectional
//! calls), and one per connection drives it.
//!
//! The head sent is the one the HTTP/1 encoder writes (one place decides what
//! is forwarded and what is added), read back into hyper's request: the host
//! becomes `:authority`, framing headers go, and a client's `te: trailers` is
//! kept, as gRPC requires.
//!
//! A stream the backend refused unprocessed — `REFUSED_STREAM`, or beyond the
//! last stream id of a graceful GOAWAY — is [`ExchangeError::Refused`]: RFC
//! 9113 §8.7 makes it safe to send again, whatever the method.

use super::connect::{ConnectError, Transport};
use super::h1::ResponseBodyError;
use super::{ExchangeError, Outgoing, UpstreamRequest};
use crate::backend::InFlight;
use crate::http::h1::ResponseHead;
use crate::http::{BodySource, DetachedBody, Framing};
use ::h2::client::SendRequest;
use ::h2::{Reason, RecvStream, SendStream};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body::{Frame, SizeHint};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

/// A worker's handle on one HTTP/2 connection to a backend.
pub type Sender = SendRequest<Bytes>;

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
    let (sender, mut connection) = ::h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // Fulcrum never accepts pushed streams.
        .enable_push(false)
        .handshake::<_, Bytes>(stream)
        .await
        .map_err(|e| ConnectError::Http2(addr, e.to_string()))?;
    let pings = connection.ping_pong();
    tokio::spawn(async move {
        let result = match pings {
            Some(pings) => drive_with_pings(&mut connection, pings).await,
            None => (&mut connection).await.map_err(|e| e.to_string()),
        };
        if let Err(error) = result {
            tracing::debug!(backend = %addr, %error, "HTTP/2 backend connection ended with an error");
        }
    });
    Ok(sender)
}

/// Drives a connection, pinging it when it has been quiet for
/// `KEEP_ALIVE_INTERVAL`: one whose ping is not answered within
/// `KEEP_ALIVE_TIMEOUT` is given up (a backend gone without a FIN).
async fn drive_with_pings<T>(
    connection: &mut ::h2::client::Connection<T, Bytes>,
    mut pings: ::h2::PingPong,
) -> Result<(), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        tokio::select! {
            result = &mut *connection => return result.map_err(|e| e.to_string()),
            () = tokio::time::sleep(KEEP_ALIVE_INTERVAL) => {}
        }
        let ping = async {
            pings.ping(::h2::Ping::opaque()).await.map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        };
        tokio::select! {
            result = &mut *connection => return result.map_err(|e| e.to_string()),
            answered = tokio::time::timeout(KEEP_ALIVE_TIMEOUT, ping) => match answered {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(error),
                Err(_) => return Err(format!("no answer to a ping within {KEEP_ALIVE_TIMEOUT:?}")),
            },
        }
    }
}

/// Whether a connection can still open streams (its task has not ended with
/// an error, and no GOAWAY has stopped new streams).
pub fn is_open(sender: &Sender) -> bool {
    let mut probe = sender.clone();
    let mut cx = Context::from_waker(std::task::Waker::noop());
    !matches!(probe.poll_ready(&mut cx), Poll::Ready(Err(_)))
}

/// A stream about to be opened on a shared connection.
pub struct Conn {
    pub(super) sender: Sender,
    /// Where the connection is shared from: forgotten there once it can open no stream.
    pub(super) shared: std::sync::Arc<super::IdleConns>,
    /// Its id there.
    pub(super) shared_id: u64,
    /// Over TLS (the `:scheme` is `https`).
    pub(super) secure: bool,
    /// Whether the connection carried earlier requests.
    pub reused: bool,
    pub(super) connected_in: Option<Duration>,
}

impl Conn {
    /// Sends the request and waits for the response head. A held body is
    /// sent at once; one streamed from an HTTP/2 client is handed to a task
    /// that copies it while the response flows; one from an HTTP/1 client is
    /// copied here until the response head arrives (the rest of it, if the
    /// backend answered early, is not sent).
    pub async fn exchange<B: BodySource>(
        self,
        mut request: UpstreamRequest<'_>,
        body: Outgoing<'_, B>,
        in_flight: InFlight,
        read_timeout: Duration,
    ) -> Result<(ResponseHead, super::ResponseBody), ExchangeError> {
        if request.head.upgrade {
            return Err(ExchangeError::Unsendable(
                "a protocol switch (Upgrade) cannot be carried to an HTTP/2 backend",
            ));
        }
        request.encode_once(false)?;
        let head_request = request.head.method == Method::HEAD;
        let trailers = request
            .head
            .header("te")
            .is_some_and(|te| te.eq_ignore_ascii_case(b"trailers"));
        let message = to_request(request.encoded, self.secure, trailers).map_err(ExchangeError::Unsendable)?;
        // Waits for a stream when the backend's concurrency limit is reached.
        let (shared, shared_id) = (self.shared, self.shared_id);
        let not_sent = |e: ::h2::Error| {
            // The next request makes a new connection.
            shared.forget_shared(shared_id);
            ExchangeError::NotSent(io_error(&e))
        };
        let mut sender = self.sender.ready().await.map_err(not_sent)?;
        let empty = matches!(&body, Outgoing::Held(bytes) if bytes.is_empty());
        let (responding, mut send) = sender.send_request(message, empty).map_err(not_sent)?;
        let mut responding = std::pin::pin!(responding);
        // Ends the task that copies a detached body, when the answer is over.
        let mut pump_stop = None;
        let response = match body {
            Outgoing::Held(bytes) => {
                if !bytes.is_empty() {
                    // Buffered by h2 until the backend's window lets it go: at
                    // most `retry_buffer` bytes.
                    send.send_data(bytes.clone(), true)
                        .map_err(|e| ExchangeError::Failed(format!("sending the request body failed: {e}")))?;
                }
                responding.await
            }
            Outgoing::Stream(source) => match source.detach() {
                Some(mut detached) => {
                    // A unary call's body has usually come whole with its
                    // head: then it is sent from here, with no task.
                    use futures_util::FutureExt;
                    use http_body_util::BodyExt;
                    let first = detached.frame().now_or_never().flatten();
                    match first {
                        Some(Ok(frame)) if frame.is_data() && http_body::Body::is_end_stream(&detached) => {
                            if let Ok(data) = frame.into_data() {
                                send.send_data(data, true).map_err(|e| {
                                    ExchangeError::Failed(format!("sending the request body failed: {e}"))
                                })?;
                            }
                        }
                        Some(Err(error)) => {
                            send.send_reset(Reason::CANCEL);
                            return Err(ExchangeError::Client(error));
                        }
                        first => {
                            let (stop, stopped) = tokio::sync::oneshot::channel();
                            pump_stop = Some(stop);
                            tokio::spawn(pump_detached(first.and_then(Result::ok), detached, send, stopped));
                        }
                    }
                    responding.await
                }
                None => {
                    // An HTTP/1 client's body, a piece at a time, all of it
                    // (as the HTTP/1 exchange sends it), while the answer's
                    // head may come first. A backend that stops taking the
                    // body (a reset, or no window for `read_timeout`) ends it.
                    let mut early = None;
                    loop {
                        let step = tokio::select! {
                            biased;
                            response = responding.as_mut(), if early.is_none() => Err(response),
                            piece = source.next_chunk() => Ok(piece),
                        };
                        match step {
                            Err(response) => {
                                let failed = response.is_err();
                                early = Some(response);
                                if failed {
                                    break;
                                }
                            }
                            Ok(Ok(Some(data))) => {
                                let sent =
                                    tokio::time::timeout(read_timeout, send_with_capacity(&mut send, data)).await;
                                if !matches!(sent, Ok(Ok(()))) {
                                    tracing::debug!("the backend stopped taking the request body");
                                    break;
                                }
                            }
                            Ok(Ok(None)) => {
                                let _ = send.send_data(Bytes::new(), true);
                                break;
                            }
                            Ok(Err(error)) => {
                                send.send_reset(Reason::CANCEL);
                                return Err(ExchangeError::Client(error));
                            }
                        }
                    }
                    match early {
                        Some(response) => response,
                        None => responding.await,
                    }
                }
            },
        };
        let response = response.map_err(|e| classify(&e))?;
        let (parts, recv) = response.into_parts();
        let status = parts.status;
        let framing = if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || recv.is_end_stream()
        {
            Framing::Empty
        } else {
            match parts
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
            {
                Some(0) => Framing::Empty,
                Some(n) => Framing::Length(n),
                None => Framing::Chunked,
            }
        };
        let head = ResponseHead::from_parts(status, &parts.headers, framing);
        let mut body = Http2Body {
            recv,
            in_flight: Some(in_flight),
            read_timeout,
            quiet: None,
            _pump: pump_stop,
            state: BodyState::Data,
        };
        if body.recv.is_end_stream() {
            body.finish();
        }
        Ok((head, super::ResponseBody::Http2(Box::new(body))))
    }
}

/// Sends `data` as the backend's window allows, so that a slow backend holds
/// back the client rather than filling Fulcrum's memory. Fails when the
/// backend resets the stream meanwhile (it wants no more).
async fn send_with_capacity(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), ::h2::Error> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = std::future::poll_fn(|cx| {
            if let Poll::Ready(reset) = send.poll_reset(cx) {
                return Poll::Ready(Some(Err(reset.map_or_else(|e| e, ::h2::Error::from))));
            }
            send.poll_capacity(cx)
        })
        .await;
        let granted = match granted {
            Some(granted) => granted?,
            None => return Err(::h2::Error::from(Reason::STREAM_CLOSED)),
        };
        if granted == 0 {
            continue;
        }
        let piece = data.split_to(granted.min(data.len()));
        send.send_data(piece, false)?;
    }
    Ok(())
}

/// Copies an HTTP/2 client's body (data and trailers) to the backend's
/// stream, for as long as both last: it stops when the backend resets the
/// stream, or when the answer is over (`stop` resolves: the response body
/// ended or was dropped), so a stream never outlives its exchange.
async fn pump_detached(
    mut first: Option<Frame<Bytes>>,
    mut body: DetachedBody,
    mut send: SendStream<Bytes>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    use http_body_util::BodyExt;
    let copy = async {
        loop {
            let frame = match first.take() {
                Some(frame) => Some(Ok(frame)),
                None => tokio::select! {
                    frame = body.frame() => frame,
                    // The backend reset the stream: nothing more to send.
                    _ = std::future::poll_fn(|cx| send.poll_reset(cx)) => return,
                },
            };
            match frame {
                None => {
                    let _ = send.send_data(Bytes::new(), true);
                    return;
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if send_with_capacity(&mut send, data).await.is_err() {
                            return;
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let _ = send.send_trailers(trailers);
                            return;
                        }
                    }
                },
                Some(Err(error)) => {
                    tracing::debug!(%error, "the client's body failed mid-way: the backend stream is reset");
                    send.send_reset(Reason::CANCEL);
                    return;
                }
            }
        }
    };
    tokio::select! {
        () = copy => {}
        // The exchange is over: whatever is left of the body goes nowhere.
        _ = &mut stop => {}
    }
}

/// Why a stream failed, as the pipeline acts on it.
fn classify(error: &::h2::Error) -> ExchangeError {
    let refused = error.reason() == Some(Reason::REFUSED_STREAM) && error.is_remote();
    // A graceful GOAWAY (NO_ERROR) fails only the streams past its last
    // stream id, which the backend never processed. After a GOAWAY with an
    // error, every open stream fails alike: nothing can be told.
    let beyond_goaway = error.is_go_away() && error.is_remote() && error.reason() == Some(Reason::NO_ERROR);
    if refused || beyond_goaway {
        return ExchangeError::Refused(error.to_string());
    }
    ExchangeError::Failed(format!("the HTTP/2 stream failed: {error}"))
}

fn io_error(error: &::h2::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, error.to_string())
}

/// The request head for h2, from the head as the HTTP/1 encoder wrote it.
fn to_request(encoded: &[u8], secure: bool, trailers: bool) -> Result<Request<()>, &'static str> {
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
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_2;
    *request.headers_mut() = headers;
    Ok(request)
}

/// Where a response body is: data frames, then trailers, then done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Data,
    Trailers,
    Done,
}

/// A backend's HTTP/2 response body on its way to the client, trailers
/// included. A backend quiet mid-body for longer than `read_timeout` is cut
/// off (the stream is reset when the body is dropped).
pub struct Http2Body {
    recv: RecvStream,
    in_flight: Option<InFlight>,
    read_timeout: Duration,
    quiet: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Stops the task copying an HTTP/2 client's body, when dropped.
    _pump: Option<tokio::sync::oneshot::Sender<()>>,
    state: BodyState,
}

impl Http2Body {
    /// Whether the whole body has been read.
    pub fn is_end(&self) -> bool {
        self.state == BodyState::Done
    }

    fn finish(&mut self) {
        self.state = BodyState::Done;
        self.quiet = None;
        self.in_flight = None;
        self._pump = None;
    }

    fn fail(&mut self, error: ResponseBodyError) -> ResponseBodyError {
        self.finish();
        error
    }

    /// Waits no longer than `read_timeout` for the backend.
    fn quiet_timeout(&mut self, cx: &mut Context<'_>) -> Poll<ResponseBodyError> {
        let timeout = self.read_timeout;
        let quiet = self.quiet.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(quiet.as_mut().poll(cx));
        Poll::Ready(self.fail(ResponseBodyError::Timeout(timeout)))
    }

    /// The next frame: data or trailers; `None` at the end.
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        loop {
            match self.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Data => match self.recv.poll_data(cx) {
                    Poll::Ready(Some(Ok(data))) => {
                        self.quiet = None;
                        // The window opens again as the client takes the data.
                        let _ = self.recv.flow_control().release_capacity(data.len());
                        if data.is_empty() {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Poll::Ready(Some(Err(error))) => {
                        return Poll::Ready(Some(Err(self.fail(ResponseBodyError::Stream(error.to_string())))));
                    }
                    Poll::Ready(None) => self.state = BodyState::Trailers,
                    Poll::Pending => return self.quiet_timeout(cx).map(|e| Some(Err(e))),
                },
                BodyState::Trailers => match self.recv.poll_trailers(cx) {
                    Poll::Ready(Ok(Some(trailers))) => {
                        self.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Poll::Ready(Ok(None)) => {
                        self.finish();
                        return Poll::Ready(None);
                    }
                    Poll::Ready(Err(error)) => {
                        return Poll::Ready(Some(Err(self.fail(ResponseBodyError::Stream(error.to_string())))));
                    }
                    Poll::Pending => return self.quiet_timeout(cx).map(|e| Some(Err(e))),
                },
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
        if self.state == BodyState::Done {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}
