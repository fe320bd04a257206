//! The way from the pipeline to a backend, behind two seams: a [`Connector`]
//! makes connections (plain TCP, or [`tls`]) and a [`Conn`] carries one
//! exchange in the pool's protocol (HTTP/1.1 in [`h1`], HTTP/2 in [`h2`]).
//! Each pool has one [`Upstream`]: its connector, protocol and limits, and the
//! connections of each backend (idle HTTP/1 ones, shared HTTP/2 ones).
//!
//! Connecting is a step of its own, so a request whose connection could not
//! be made still has its body and can go to another backend.

pub mod connect;
pub mod h1;
pub mod h2;
pub mod pool;
pub mod tls;

pub use connect::{ConnectError, Connector, TcpConnector, Transport};
pub use h1::{Http1Body, ResponseBodyError, Upgraded};
pub use h2::Http2Body;
pub use pool::{IdleConns, PoolLimits, set_worker_index};

use crate::backend::InFlight;
use crate::config::UpstreamProtocol;
use crate::http::h1::ResponseHead;
use crate::http::{BodySource, ClientAddr, ClientBodyError, Framing, RequestHead};
use bytes::Bytes;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A pool's way to its backends.
pub struct Upstream {
    /// Idle connections of each backend, by the backend's index in the pool.
    idle: Box<[Arc<IdleConns>]>,
    connector: Arc<dyn Connector>,
    limits: PoolLimits,
    connect_timeout: Duration,
    /// A PROXY protocol header opens each new connection.
    send_proxy: Option<crate::proxy_protocol::Version>,
    protocol: UpstreamProtocol,
    /// The connector makes TLS connections.
    secure: bool,
}

impl Upstream {
    /// `idle` holds one entry per backend of the pool, in the pool's order.
    pub fn new(
        idle: Vec<Arc<IdleConns>>,
        connector: Arc<dyn Connector>,
        limits: PoolLimits,
        connect_timeout: Duration,
    ) -> Upstream {
        Upstream {
            idle: idle.into(),
            connector,
            limits,
            connect_timeout,
            send_proxy: None,
            protocol: UpstreamProtocol::Http1,
            secure: false,
        }
    }

    /// Speaks `protocol` to the backends, over TLS when `secure` (the
    /// connector's job). Connections kept from a pool that spoke otherwise
    /// (before a reload) are closed: `transport` names the way they were made.
    pub fn speaking(mut self, protocol: UpstreamProtocol, secure: bool, transport: u64) -> Upstream {
        self.protocol = protocol;
        self.secure = secure;
        for idle in self.idle.iter() {
            idle.made_for(transport);
        }
        self
    }

    /// The pool's connector (the active checks connect as requests do).
    pub fn connector(&self) -> &Arc<dyn Connector> {
        &self.connector
    }

    /// What the pool speaks to its backends.
    pub fn protocol(&self) -> UpstreamProtocol {
        self.protocol
    }

    /// Opens each new connection with a PROXY protocol header of `version`
    /// (with `max_idle` 0, so that a connection carries one client only).
    pub fn sending_proxy_protocol(mut self, version: Option<crate::proxy_protocol::Version>) -> Upstream {
        self.send_proxy = version;
        self
    }

    /// Idle connections held for the backend at `index`.
    pub fn idle_count(&self, index: usize) -> usize {
        self.idle.get(index).map_or(0, |idle| idle.count())
    }

    /// Connections opened to the backend at `index`.
    pub fn opened_count(&self, index: usize) -> u64 {
        self.idle.get(index).map_or(0, |idle| idle.opened())
    }

    /// Closes the idle connections held for the backend at `index`.
    pub fn close_idle(&self, index: usize) {
        if let Some(idle) = self.idle.get(index) {
            idle.clear();
        }
    }

    /// A connection to the backend at `index` (reached at `addr`, configured
    /// as `address`) ready to send: a warm idle one, else a new one (opened
    /// with a PROXY header naming `client` when the pool sends one). For
    /// HTTP/2, this worker's connection to the backend, made when it has none.
    pub async fn checkout(
        &self,
        index: usize,
        addr: SocketAddr,
        address: &str,
        client: SocketAddr,
    ) -> Result<Conn, ConnectError> {
        let idle = self.idle.get(index).cloned().unwrap_or_default();
        if self.protocol.is_http2() {
            // Boxed: its state would otherwise make every HTTP/1 request's future larger.
            return Box::pin(self.checkout_http2(&idle, addr, address)).await;
        }
        if let Some(stream) = idle.take(self.limits) {
            return Ok(Conn::Http1(h1::Conn {
                stream,
                idle,
                limits: self.limits,
                reused: true,
                connected_in: None,
            }));
        }
        let connecting = quanta::Instant::now();
        let mut stream = self.connector.connect(addr, address, self.connect_timeout).await?;
        idle.count_opened();
        if let Some(version) = self.send_proxy {
            use tokio::io::AsyncWriteExt;
            // The destination is the backend's address: the address each client
            // reached is not kept per connection.
            let header = crate::proxy_protocol::encode(version, client, addr);
            stream.write_all(&header).await.map_err(|e| ConnectError::Io(addr, e))?;
        }
        Ok(Conn::Http1(h1::Conn {
            stream,
            idle,
            limits: self.limits,
            reused: false,
            connected_in: Some(connecting.elapsed()),
        }))
    }

    async fn checkout_http2(
        &self,
        idle: &Arc<IdleConns>,
        addr: SocketAddr,
        address: &str,
    ) -> Result<Conn, ConnectError> {
        let reuse = |(id, sender)| {
            Conn::Http2(h2::Conn {
                sender,
                shared: idle.clone(),
                shared_id: id,
                secure: self.secure,
                reused: true,
                connected_in: None,
            })
        };
        if let Some(shared) = idle.shared() {
            return Ok(reuse(shared));
        }
        // One connect at a time per worker: the others wait for it and share it.
        let _connecting = idle.connecting().lock().await;
        if let Some(shared) = idle.shared() {
            return Ok(reuse(shared));
        }
        let connecting = quanta::Instant::now();
        let stream = self.connector.connect(addr, address, self.connect_timeout).await?;
        if self.protocol == UpstreamProtocol::H2 && !stream.alpn_h2() {
            return Err(ConnectError::Http2(
                addr,
                "the backend did not agree to HTTP/2 (ALPN h2) in the TLS handshake".into(),
            ));
        }
        let handshake = h2::handshake(stream, addr);
        let sender = match tokio::time::timeout(self.connect_timeout, handshake).await {
            Err(_) => return Err(ConnectError::Timeout(addr)),
            Ok(result) => result?,
        };
        idle.count_opened();
        let id = idle.share(sender.clone());
        Ok(Conn::Http2(h2::Conn {
            sender,
            shared: idle.clone(),
            shared_id: id,
            secure: self.secure,
            reused: false,
            connected_in: Some(connecting.elapsed()),
        }))
    }
}

/// One request as it goes to a backend.
pub struct UpstreamRequest<'a> {
    pub head: &'a RequestHead,
    pub client: &'a ClientAddr,
    /// How the body sent upstream is framed.
    pub framing: Framing,
    /// The `Host` to send when the request names none (the backend's address).
    pub fallback_host: &'a str,
    /// An `X-Request-Id` to add (one Fulcrum made).
    pub request_id: Option<&'a str>,
    /// The client's connection comes from a trusted proxy (`server.trusted_proxies`).
    pub peer_trusted: bool,
    /// Add `Via` (`server.via`).
    pub via: bool,
    /// Add this hop's `Forwarded` element (`server.forwarded`).
    pub forwarded: bool,
    /// The route's filters' header edits.
    pub edits: &'a [crate::http::edit::HeaderEdit],
    /// The head as written for the wire: encoded at the first try, reused by the others.
    pub encoded: &'a mut Vec<u8>,
}

impl UpstreamRequest<'_> {
    /// Encodes the head for the wire at the first try (the HTTP/1 encoder
    /// decides what is forwarded for both protocols); later tries reuse it.
    /// `upgrade`: the client's `Upgrade` is passed on.
    pub fn encode_once(&mut self, upgrade: bool) -> Result<(), ExchangeError> {
        if !self.encoded.is_empty() {
            return Ok(());
        }
        let forwarding = crate::http::h1::Forwarding {
            client: self.client,
            peer_trusted: self.peer_trusted,
            via: self.via,
            forwarded: self.forwarded,
            request_id: self.request_id,
            edits: self.edits,
        };
        crate::http::h1::encode_request_head(
            self.head,
            &forwarding,
            self.framing,
            self.fallback_host,
            upgrade,
            self.encoded,
        )
        .map_err(ExchangeError::Unsendable)
    }
}

/// A connection ready for one exchange, in the protocol its pool speaks.
pub enum Conn {
    Http1(h1::Conn),
    Http2(h2::Conn),
}

impl Conn {
    /// Whether it served earlier requests (a stale keep-alive is retried at no cost).
    pub fn reused(&self) -> bool {
        match self {
            Conn::Http1(conn) => conn.reused,
            Conn::Http2(conn) => conn.reused,
        }
    }

    /// How long making this connection took; `None` for a pooled one.
    pub fn connect_time(&self) -> Option<Duration> {
        match self {
            Conn::Http1(conn) => conn.connected_in,
            Conn::Http2(conn) => conn.connected_in,
        }
    }

    /// Sends `request` with `body` and reads the response head. The body that
    /// comes back counts the request `in_flight` until it is read or dropped,
    /// and gives up on a backend quiet for `read_timeout` mid-body.
    ///
    /// Not an `async fn`: one would move the HTTP/1 exchange's future into
    /// its own state, a copy of a few hundred bytes per request (callgrind).
    pub fn exchange<'a, B: BodySource>(
        self,
        request: UpstreamRequest<'a>,
        body: Outgoing<'a, B>,
        in_flight: InFlight,
        read_timeout: Duration,
    ) -> impl Future<Output = Result<(ResponseHead, ResponseBody), ExchangeError>> + Send + 'a {
        use futures_util::future::Either;
        match self {
            Conn::Http1(conn) => Either::Left(conn.exchange(request, body, in_flight, read_timeout)),
            // Boxed: its state would otherwise make every HTTP/1 request's future larger.
            Conn::Http2(conn) => Either::Right(Box::pin(conn.exchange(request, body, in_flight, read_timeout))),
        }
    }
}

/// A backend's response body on its way to the client, whichever protocol
/// brought it.
pub enum ResponseBody {
    Http1(Http1Body),
    /// Boxed: an answer is moved through the pipeline's layers, and every
    /// byte of the enum is copied each time, HTTP/1 or not.
    Http2(Box<Http2Body>),
}

impl ResponseBody {
    /// The connection behind a `101 Switching Protocols` answer, taken out
    /// (the body is left with none).
    pub fn take_upgraded(&mut self) -> Option<Upgraded> {
        match self {
            ResponseBody::Http1(body) => body.take_upgraded(),
            ResponseBody::Http2(_) => None,
        }
    }

    /// Whether the whole body has been read.
    pub fn is_end(&self) -> bool {
        match self {
            ResponseBody::Http1(body) => body.is_end(),
            ResponseBody::Http2(body) => body.is_end(),
        }
    }

    /// The next piece of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ResponseBodyError> {
        // Matched once, outside the poll: polling through the enum copied each
        // result once more (callgrind: +150 instructions per request).
        match self {
            ResponseBody::Http1(body) => body.chunk().await,
            ResponseBody::Http2(body) => std::future::poll_fn(|cx| body.poll_chunk(cx)).await,
        }
    }

    /// The next piece of the body's data (an HTTP/2 backend's trailers are
    /// skipped: an HTTP/1 client gets none).
    pub fn poll_chunk(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Option<Bytes>, ResponseBodyError>> {
        match self {
            ResponseBody::Http1(body) => body.poll_chunk(cx),
            ResponseBody::Http2(body) => body.poll_chunk(cx),
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, ResponseBodyError>>> {
        match self.get_mut() {
            ResponseBody::Http1(body) => std::pin::Pin::new(body).poll_frame(cx),
            ResponseBody::Http2(body) => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.is_end()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            ResponseBody::Http1(body) => http_body::Body::size_hint(body),
            ResponseBody::Http2(body) => body.size_hint(),
        }
    }
}

/// What goes upstream as the request body.
pub enum Outgoing<'a, B> {
    /// Held in memory: can be sent again.
    Held(&'a Bytes),
    /// Streamed from the client: once.
    Stream(&'a mut B),
}

/// How an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The head could not be written: nothing reached the backend and the
    /// body was not touched, so the request can go elsewhere.
    #[error("request not sent: {0}")]
    NotSent(std::io::Error),
    /// A reused connection ended before any byte of a response: the backend
    /// had closed it while it sat idle.
    #[error("the pooled connection had been closed by the backend")]
    Stale,
    /// The request may have reached the backend.
    #[error("{0}")]
    Failed(String),
    /// The client's body failed: not the backend's fault.
    #[error(transparent)]
    Client(ClientBodyError),
    /// The request cannot be written for a backend (nothing was sent).
    #[error("{0}")]
    Unsendable(&'static str),
    /// An HTTP/2 backend refused the stream before processing it
    /// (`REFUSED_STREAM`, or past a GOAWAY's last stream id): safe to send
    /// elsewhere, whatever the method (RFC 9113 §8.7).
    #[error("the backend refused the request unprocessed: {0}")]
    Refused(String),
}

#[cfg(test)]
mod tests {
    //! The seam with a second connector: in-memory streams to a backend that
    //! is a task, not a socket.

    use super::*;
    use crate::backend::BackendState;
    use crate::http::h1::parse_request;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    impl Transport for DuplexStream {
        fn is_quiet(&self) -> bool {
            true
        }
    }

    /// Connects to a backend task over an in-memory pipe; remembers how many
    /// connections it made and each request head the backend read.
    #[derive(Default)]
    struct PipeConnector {
        connections: AtomicUsize,
        heads: Arc<Mutex<Vec<String>>>,
    }

    impl Connector for PipeConnector {
        fn connect(&self, _addr: SocketAddr, _address: &str, _timeout: Duration) -> connect::Connecting<'_> {
            self.connections.fetch_add(1, Ordering::Relaxed);
            let (near, mut far) = tokio::io::duplex(16 * 1024);
            let heads = self.heads.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    match far.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        heads
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(String::from_utf8_lossy(&head).into_owned());
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
                        if far.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Box::pin(async move { Ok(Box::new(near) as Box<dyn Transport>) })
        }
    }

    /// No request body.
    struct NoBody;

    impl BodySource for NoBody {
        fn limit(&mut self, _max: u64) {}

        fn framing(&self) -> Framing {
            Framing::Empty
        }

        async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClientBodyError> {
            Ok(None)
        }

        fn received(&self) -> u64 {
            0
        }
    }

    #[tokio::test]
    async fn any_connector_carries_the_exchange_and_the_pool_reuses_its_connections() {
        let connector = Arc::new(PipeConnector::default());
        let limits = PoolLimits {
            max_idle: 4,
            idle_timeout: Duration::from_secs(60),
        };
        let upstream = Upstream::new(vec![Arc::default()], connector.clone(), limits, Duration::from_secs(1));
        let state = Arc::new(BackendState::default());
        let mut raw = bytes::BytesMut::from("GET /a?b=1 HTTP/1.1\r\nHost: shop.example\r\n\r\n");
        let head = parse_request(&mut raw).expect("valid").expect("complete");
        let client = ClientAddr::new("192.0.2.1:5000".parse().expect("addr"));
        let addr: SocketAddr = "192.0.2.80:80".parse().expect("addr");
        for round in 0..3 {
            let conn = upstream.checkout(0, addr, "backend", addr).await.expect("connected");
            assert_eq!(conn.reused(), round > 0, "round {round}");
            let mut encoded = Vec::new();
            let request = UpstreamRequest {
                head: &head,
                client: &client,
                framing: Framing::Empty,
                fallback_host: "unused",
                request_id: None,
                peer_trusted: false,
                via: false,
                forwarded: false,
                edits: &[],
                encoded: &mut encoded,
            };
            let (response, mut body) = conn
                .exchange(
                    request,
                    Outgoing::<NoBody>::Held(&Bytes::new()),
                    state.start_request(),
                    Duration::from_secs(1),
                )
                .await
                .expect("exchanged");
            assert_eq!(response.status, http::StatusCode::OK);
            assert_eq!(body.chunk().await.expect("body").as_deref(), Some(&b"hello"[..]));
            assert_eq!(body.chunk().await.expect("end"), None);
            assert_eq!(state.in_flight(), 0, "the request ends with its body");
            assert_eq!(
                upstream.idle_count(0),
                1,
                "read to the end, the connection is idle again"
            );
        }
        assert_eq!(
            connector.connections.load(Ordering::Relaxed),
            1,
            "one connection served all three"
        );
        let heads = connector.heads.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(heads.len(), 3);
        assert!(
            heads[0].starts_with("GET /a?b=1 HTTP/1.1\r\nhost: shop.example\r\n"),
            "{}",
            heads[0]
        );
        assert!(heads[0].contains("x-forwarded-for: 192.0.2.1\r\n"), "{}", heads[0]);
    }
}
