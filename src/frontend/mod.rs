//! Front ends: how a client's connection is spoken to. [`serve_connection`]
//! chooses the protocol (ALPN over TLS, else the HTTP/2 preface) and runs the
//! front end for it; each front end parses requests, hands them to the
//! pipeline ([`crate::proxy::serve`]) and writes the answers. Both are generic
//! over the client's stream: plain TCP, or TLS ([`TlsClient`]).

pub mod http1;
pub mod http2;

use crate::app::App;
use crate::buffers;
use crate::http::{ClientAddr, Edge};
use crate::shutdown::Open;
use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// The HTTP/2 connection preface (RFC 9113 3.4): a client that opens with it
/// speaks HTTP/2 with prior knowledge.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client's connection, whatever carries it.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Waits until the client has sent something (or closed), holding no
    /// buffer meanwhile: ten thousand idle keep-alive clients then cost little
    /// more than their sockets.
    fn wait_readable(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;

    /// Whether the client chose HTTP/2 by ALPN (in its TLS handshake).
    fn alpn_h2(&self) -> bool {
        false
    }
}

impl ClientStream for TcpStream {
    fn wait_readable(&mut self) -> impl Future<Output = std::io::Result<()>> + Send {
        self.readable()
    }
}

/// A client's TLS connection, its handshake done.
pub struct TlsClient(pub tokio_rustls::server::TlsStream<TcpStream>);

impl ClientStream for TlsClient {
    async fn wait_readable(&mut self) -> std::io::Result<()> {
        let (tcp, tls) = self.0.get_mut();
        // Records already received may hold a request that no socket
        // readiness would announce again (it came with the handshake's last
        // flight): then it is readable now. A broken record is left for the
        // read that follows to report.
        match tls.process_new_packets() {
            Ok(state) if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => tcp.readable().await,
            _ => Ok(()),
        }
    }

    fn alpn_h2(&self) -> bool {
        self.0.get_ref().1.alpn_protocol() == Some(b"h2")
    }
}

impl AsyncRead for TlsClient {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsClient {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// What the first bytes of a connection say it speaks.
enum Protocol {
    /// HTTP/1.x, with the bytes read so far.
    Http1(BytesMut),
    /// HTTP/2 with prior knowledge, with the bytes read so far (the preface and more).
    Http2(BytesMut),
    /// Closed, or silent past the deadline, before saying anything.
    Closed,
}

/// Serves one client connection to its end: chooses the protocol, then runs
/// that front end. `edge` says how the client reached Fulcrum (TLS, its
/// listener's redirect); `open` counts the connection while it lives.
///
/// Every argument stays in the connection's future for its whole life, idle
/// or not (rustc keeps an async fn's arguments apart from its later states),
/// so they are kept few and small: the peer's address as 32 bytes, its text
/// form made by the front end, and the edge as one pointer.
pub async fn serve_connection<S: ClientStream>(
    app: Arc<App>,
    mut stream: S,
    peer: SocketAddr,
    edge: Option<Arc<Edge>>,
    open: Open,
) {
    // The first request head's deadline: HTTP/1 goes on with this timer.
    let mut timer = Box::pin(tokio::time::sleep(app.snapshot().config.server.header_read_timeout));
    if stream.alpn_h2() {
        // Chosen in the TLS handshake: no preface to look for.
        drop(timer);
        let client = ClientAddr::with_edge(peer, edge);
        Box::pin(http2::serve(app.clone(), stream, client, open.shutdown())).await;
        return;
    }
    // Taken out of the match before the front end runs: a value matched on
    // would live (and take room) for the connection's whole life.
    let (buf, http2) = match choose_protocol(&mut stream, timer.as_mut()).await {
        Protocol::Http1(buf) => (buf, false),
        Protocol::Http2(buf) => (buf, true),
        Protocol::Closed => return,
    };
    if http2 {
        // Boxed: an HTTP/2 connection's state is large, and most connections never need it.
        let io = Rewind::new(buf.freeze(), stream);
        Box::pin(http2::serve(
            app.clone(),
            io,
            ClientAddr::with_edge(peer, edge),
            open.shutdown(),
        ))
        .await;
    } else {
        http1::serve(&app, stream, buf, timer, peer, edge, open.shutdown()).await;
    }
}

/// Reads until the first bytes tell HTTP/2's preface from anything else. An
/// HTTP/1 request differs from the preface in its first bytes, so this is one
/// read for nearly every connection.
async fn choose_protocol<S: ClientStream>(stream: &mut S, mut timer: Pin<&mut Sleep>) -> Protocol {
    let mut buf = BytesMut::new();
    loop {
        if !buf.is_empty() {
            let seen = buf.len().min(H2_PREFACE.len());
            if !H2_PREFACE.starts_with(&buf[..seen]) {
                return Protocol::Http1(buf);
            }
            if seen == H2_PREFACE.len() {
                return Protocol::Http2(buf);
            }
        } else {
            if !client_spoke(stream, timer.as_mut()).await {
                return Protocol::Closed;
            }
            buf = buffers::take();
        }
        let read = tokio::select! {
            biased;
            read = stream.read_buf(&mut buf) => read,
            // Part of a preface and then silence: HTTP/1 answers it with 408.
            () = timer.as_mut() => return Protocol::Http1(buf),
        };
        match read {
            Ok(0) | Err(_) => {
                buffers::give(buf);
                return Protocol::Closed;
            }
            Ok(_) => {}
        }
    }
}

/// Waits for the client to send something, holding no buffer (an idle
/// connection's whole cost is its socket and task); false when it closed or
/// `timer` fired first.
async fn client_spoke<S: ClientStream>(stream: &mut S, timer: Pin<&mut Sleep>) -> bool {
    tokio::select! {
        biased;
        ready = stream.wait_readable() => ready.is_ok(),
        () = timer => false,
    }
}

/// A stream whose first bytes were already read: they are read again first.
pub struct Rewind<S> {
    read: Bytes,
    stream: S,
}

impl<S> Rewind<S> {
    pub fn new(read: Bytes, stream: S) -> Self {
        Rewind { read, stream }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    //! Each front end driven over an in-memory stream instead of a socket,
    //! through the real pipeline to a real backend on 127.0.0.1.

    use super::*;
    use crate::config::Config;
    use crate::proxy::Termination;
    use crate::proxy::tests::{Seen, records};
    use http_body_util::{BodyExt, Empty};
    use std::time::Duration;
    use tokio::io::{AsyncWriteExt, DuplexStream};

    impl ClientStream for DuplexStream {
        fn wait_readable(&mut self) -> impl Future<Output = std::io::Result<()>> + Send {
            // No readiness without a read here: the read that follows waits instead.
            std::future::ready(Ok(()))
        }
    }

    const CLIENT: &str = "192.0.2.9:40000";

    /// A balancer with one pool, `web`, routed at `/`, over one demo backend
    /// for paths under `/h` (`/missing` routes nowhere).
    async fn balancer() -> (Arc<App>, Vec<crate::demo::DemoBackend>) {
        let backends = crate::demo::start(&[0], &[]).await.expect("demo backend");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:1\"\n[pools.web]\nbackends = [\"{}\"]\n\
             [[routes]]\npath_prefix = \"/h\"\npool = \"web\"\n",
            backends[0].addr
        );
        let config = Config::parse(&text, std::path::Path::new("test.toml")).expect("config");
        (App::new(config).expect("app"), backends)
    }

    /// Serves the server end of a fresh duplex pipe; returns the client end.
    fn connect(app: &Arc<App>) -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let app = app.clone();
        let shutdown = Arc::new(crate::shutdown::Shutdown::default());
        let task = tokio::spawn(serve_connection(
            app,
            server,
            CLIENT.parse().expect("addr"),
            None,
            shutdown.open(),
        ));
        (client, task)
    }

    fn seen(status: u16, termination: Termination, backend: Option<&str>, bytes_out: u64) -> Seen {
        Seen {
            status,
            termination,
            pool: backend.map(|_| "web".to_string()),
            backend: backend.map(str::to_string),
            bytes_out,
        }
    }

    #[tokio::test]
    async fn http1_front_end_serves_over_any_stream() {
        let (app, backends) = balancer().await;
        let backend = backends[0].addr.to_string();
        let (mut client, task) = connect(&app);
        client
            .write_all(b"GET /headers HTTP/1.1\r\nHost: shop.example\r\n\r\nGET /missing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_string(&mut answer))
            .await
            .expect("answered in time")
            .expect("read");
        task.await.expect("front end ends cleanly");
        let (first, second) = answer.split_at(answer.find("HTTP/1.1 404").expect("second answer: {answer}"));
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(
            first.contains("x-forwarded-for: 192.0.2.9"),
            "the backend saw the client's address: {first}"
        );
        assert!(second.contains("no route matches this request"), "{second}");
        let body_len = first.split_once("\r\n\r\n").map_or(0, |(_, body)| body.len() as u64);
        assert_eq!(
            records(),
            [
                seen(200, Termination::Completed, Some(&backend), body_len),
                seen(
                    404,
                    Termination::NoRoute,
                    None,
                    "no route matches this request\n".len() as u64
                ),
            ]
        );
    }

    #[tokio::test]
    async fn http1_front_end_refuses_a_malformed_head_with_a_record() {
        let (app, _backends) = balancer().await;
        let (mut client, task) = connect(&app);
        client
            .write_all(b"GET /h HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.expect("read");
        task.await.expect("front end ends cleanly");
        assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
        let records = records();
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(
            (records[0].status, records[0].termination),
            (400, Termination::BadRequest)
        );
    }

    #[tokio::test]
    async fn http2_front_end_serves_over_any_stream() {
        let (app, backends) = balancer().await;
        let backend = backends[0].addr.to_string();
        let (client, _task) = connect(&app);
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(client),
        )
        .await
        .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        let request = http::Request::get("http://shop.example/hello")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers().get("x-backend").map(|v| v.as_bytes()),
            Some(&b"backend-1"[..])
        );
        let body = response.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"backend-1\n");
        let request = http::Request::get("http://shop.example/missing")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), 404);
        let _ = response.into_body().collect().await;
        assert_eq!(
            records(),
            [
                seen(200, Termination::Completed, Some(&backend), body.len() as u64),
                seen(
                    404,
                    Termination::NoRoute,
                    None,
                    "no route matches this request\n".len() as u64
                ),
            ]
        );
    }
}
#[cfg(test)]
mod size_probe {
    /// An idle connection costs its socket, its task and this future: it is
    /// kept under 1 KiB (888 bytes when written; 768 before TLS, PROXY
    /// protocol and limits). Past that, look for values held across an
    /// await, or a rare path's future that should be boxed (as `linger`).
    #[tokio::test]
    async fn a_connection_future_stays_under_a_kilobyte() {
        let app = {
            let text = "[server]\nlisten = \"127.0.0.1:1\"\n[pools.web]\nbackends = [\"127.0.0.1:2\"]\n";
            let config = crate::config::Config::parse(text, std::path::Path::new("t.toml")).expect("config");
            crate::app::App::new(config).expect("app")
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let stream = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let shutdown = std::sync::Arc::new(crate::shutdown::Shutdown::default());
        let future = super::serve_connection(app, stream, "127.0.0.1:1".parse().expect("addr"), None, shutdown.open());
        let size = std::mem::size_of_val(&future);
        assert!(size <= 1024, "the connection future grew to {size} bytes");
    }
}
