//! Front ends: how a client's connection is spoken to. [`serve_connection`]
//! chooses the protocol (the HTTP/2 preface now, ALPN with TLS later) and runs
//! the front end for it; each front end parses requests, hands them to the
//! pipeline ([`crate::proxy::serve`]) and writes the answers. Both are generic
//! over the client's stream, so a TLS stream slots in where a TCP one is today.

pub mod http1;
pub mod http2;

use crate::app::App;
use crate::buffers;
use crate::http::ClientAddr;
use crate::shutdown::Shutdown;
use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// The HTTP/2 connection preface (RFC 9113 3.4): a client that opens with it
/// speaks HTTP/2 with prior knowledge.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client's connection, whatever carries it.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Waits until the client has sent something (or closed), holding no
    /// buffer meanwhile: ten thousand idle keep-alive clients then cost little
    /// more than their sockets.
    fn wait_readable(&self) -> impl Future<Output = std::io::Result<()>> + Send;
}

impl ClientStream for TcpStream {
    fn wait_readable(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        self.readable()
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
/// that front end.
pub async fn serve_connection<S: ClientStream>(app: &Arc<App>, mut stream: S, client: ClientAddr, shutdown: &Shutdown) {
    let deadline = Instant::now() + app.snapshot().config.server.header_read_timeout;
    // The first request head's deadline: HTTP/1 goes on with this timer.
    let mut timer = Box::pin(tokio::time::sleep_until(deadline));
    match choose_protocol(&mut stream, timer.as_mut()).await {
        Protocol::Http1(buf) => http1::serve(app, stream, buf, timer, client, shutdown).await,
        Protocol::Http2(buf) => {
            // Boxed: an HTTP/2 connection's state is large, and most connections never need it.
            let io = Rewind::new(buf.freeze(), stream);
            Box::pin(http2::serve(app.clone(), io, client, shutdown)).await;
        }
        Protocol::Closed => {}
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
            // Nothing yet: wait without a buffer.
            tokio::select! {
                biased;
                ready = stream.wait_readable() => {
                    if ready.is_err() {
                        return Protocol::Closed;
                    }
                }
                () = timer.as_mut() => return Protocol::Closed,
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
