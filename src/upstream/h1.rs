//! The HTTP/1.1 exchange with a backend: the request written on a connection,
//! the response head read back, then the response body.
//!
//! The exchange runs in the task of the client's request itself (no
//! per-connection task, no channel between the two): the request head is one
//! write, the response head one read, as nginx does it. Connecting is a step
//! of its own, so a request whose connection could not be made still has its
//! body and can go to another backend. A connection returns to its pool only
//! once its response body has been read to the end; one abandoned mid-body is
//! closed instead.

use super::{ExchangeError, IdleConns, Outgoing, PoolLimits, Transport, UpstreamRequest};
use crate::backend::InFlight;
use crate::buffers;
use crate::http::h1::{self, BodyDecoder, Decoded, ResponseHead};
use crate::http::{BodyError, BodySource, Framing, HeadError};
use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Bytes read from a backend at a time.
const READ_CHUNK: usize = 16 * 1024;

/// A connection checked out of a pool, ready for one request.
pub struct Conn {
    pub(super) stream: Box<dyn Transport>,
    pub(super) idle: Arc<IdleConns>,
    pub(super) limits: PoolLimits,
    /// Whether it served earlier requests (a stale keep-alive is retried at no cost).
    pub reused: bool,
    /// How long making it took, when it was made for this request.
    pub(super) connected_in: Option<Duration>,
}

impl Conn {
    /// Sends the request (its head encoded at the first try, kept for the
    /// others) and reads the response head; the body is read as the client
    /// takes it. A request that asked to switch protocols accepts a `101`.
    pub async fn exchange<B: BodySource>(
        mut self,
        mut request: UpstreamRequest<'_>,
        body: Outgoing<'_, B>,
        in_flight: InFlight,
        read_timeout: Duration,
    ) -> Result<(ResponseHead, super::ResponseBody), ExchangeError> {
        let upgrade = request.head.upgrade;
        let head_request = request.head.method == http::Method::HEAD;
        request.encode_once(upgrade)?;
        let head: &[u8] = request.encoded;
        match body {
            // A plain send when there is no body: cheaper in the kernel than writev.
            Outgoing::Held(bytes) if bytes.is_empty() => {
                self.stream.write_all(head).await.map_err(ExchangeError::NotSent)?;
            }
            Outgoing::Held(bytes) => {
                let mut slices = [IoSlice::new(head), IoSlice::new(bytes)];
                write_all_vectored(&mut self.stream, &mut slices)
                    .await
                    .map_err(ExchangeError::NotSent)?;
            }
            Outgoing::Stream(source) => {
                self.stream.write_all(head).await.map_err(ExchangeError::NotSent)?;
                self.send_stream(source).await?;
            }
        }
        let mut buf = buffers::take();
        loop {
            let read = tokio::io::AsyncReadExt::read_buf(&mut self.stream, &mut buf).await;
            match read {
                Ok(0) | Err(_) if buf.is_empty() && self.reused => return Err(ExchangeError::Stale),
                Ok(0) => {
                    return Err(ExchangeError::Failed(
                        "the backend closed the connection before answering".into(),
                    ));
                }
                Err(e) => return Err(ExchangeError::Failed(format!("reading the response failed: {e}"))),
                Ok(_) => {}
            }
            loop {
                match h1::parse_response(&mut buf, head_request) {
                    Ok(None) => break,
                    Ok(Some(head)) if head.status == http::StatusCode::SWITCHING_PROTOCOLS && !upgrade => {
                        return Err(ExchangeError::Failed("the backend switched protocols unasked".into()));
                    }
                    // 1xx interim responses (100 Continue, 103 Early Hints) are not passed on.
                    Ok(Some(head))
                        if head.status.is_informational() && head.status != http::StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        continue;
                    }
                    Ok(Some(head)) => {
                        let body = ExchangedConn { conn: self, buf }.into_body(&head, in_flight, read_timeout);
                        return Ok((head, super::ResponseBody::Http1(body)));
                    }
                    Err(e) => return Err(ExchangeError::Failed(malformed(e))),
                }
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(READ_CHUNK);
            }
        }
    }

    async fn send_stream<B: BodySource>(&mut self, source: &mut B) -> Result<(), ExchangeError> {
        let chunked = source.framing() == Framing::Chunked;
        let mut marker = Vec::with_capacity(24);
        loop {
            let chunk = source.next_chunk().await.map_err(ExchangeError::Client)?;
            let written = match &chunk {
                None if chunked => self.stream.write_all(h1::LAST_CHUNK).await,
                None => Ok(()),
                Some(data) if chunked => {
                    marker.clear();
                    h1::chunk_header(data.len(), &mut marker);
                    let mut slices = [IoSlice::new(&marker), IoSlice::new(data), IoSlice::new(b"\r\n")];
                    write_all_vectored(&mut self.stream, &mut slices).await
                }
                Some(data) => self.stream.write_all(data).await,
            };
            written.map_err(|e| ExchangeError::Failed(format!("sending the request body failed: {e}")))?;
            if chunk.is_none() {
                return Ok(());
            }
        }
    }
}

fn malformed(error: HeadError) -> String {
    format!("the backend's response was malformed: {error}")
}

/// Writes every byte of `slices`, in as few system calls as the socket allows.
async fn write_all_vectored<W: AsyncWrite + Unpin + ?Sized>(
    stream: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        let n = stream.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// A connection whose response head has been read; the body is next.
struct ExchangedConn {
    conn: Conn,
    buf: BytesMut,
}

impl ExchangedConn {
    /// The response body, which gives the connection back to its pool when read
    /// to the end and ends `in_flight` then (or when dropped).
    fn into_body(self, head: &ResponseHead, in_flight: InFlight, read_timeout: Duration) -> Http1Body {
        let mut body = Http1Body {
            decoder: BodyDecoder::new(head.body),
            reusable: head.reusable,
            conn: Some(self),
            in_flight: Some(in_flight),
            read_timeout,
            quiet: None,
        };
        // After a 101 the connection is kept for the tunnel, never pooled.
        if body.decoder.is_done() && head.status != http::StatusCode::SWITCHING_PROTOCOLS {
            body.finish();
        }
        body
    }
}

/// A backend's response body on its way to the client. A backend that goes
/// quiet mid-body for longer than the pool's `read_timeout` is cut off.
pub struct Http1Body {
    decoder: BodyDecoder,
    reusable: bool,
    conn: Option<ExchangedConn>,
    in_flight: Option<InFlight>,
    read_timeout: Duration,
    /// Armed only while the backend keeps the client waiting, so a body that
    /// is already at hand costs no timer.
    quiet: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Why a response body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    #[error("the backend sent nothing for {0:?} in the middle of a response body")]
    Timeout(Duration),
    #[error("the backend's response body was malformed: {0}")]
    Malformed(#[from] BodyError),
    #[error("reading the response body failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the backend's HTTP/2 stream failed mid-body: {0}")]
    Stream(String),
}

impl ResponseBodyError {
    /// What the backend did, in a few words for the log.
    pub fn what(&self) -> &'static str {
        match self {
            ResponseBodyError::Timeout(_) => "went quiet mid-body",
            ResponseBodyError::Malformed(_) => "sent a malformed body",
            ResponseBodyError::Io(_) => "broke the connection mid-body",
            ResponseBodyError::Stream(_) => "reset the stream mid-body",
        }
    }
}

/// A backend connection that switched protocols, for the client to tunnel to.
pub struct Upgraded {
    pub stream: Box<dyn Transport>,
    /// Bytes the backend sent after its 101 head.
    pub early: BytesMut,
    /// The request counts as in flight while the tunnel lasts.
    pub in_flight: Option<InFlight>,
}

impl Http1Body {
    /// The connection behind a `101 Switching Protocols` answer, taken out
    /// (the body is left with none).
    pub fn take_upgraded(&mut self) -> Option<Upgraded> {
        let ExchangedConn { conn, buf } = self.conn.take()?;
        Some(Upgraded {
            stream: conn.stream,
            early: buf,
            in_flight: self.in_flight.take(),
        })
    }

    /// Whether the whole body has been read.
    pub fn is_end(&self) -> bool {
        self.decoder.is_done()
    }

    /// The next piece of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ResponseBodyError> {
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, ResponseBodyError>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(Ok(None));
            };
            match self.decoder.decode(&mut conn.buf) {
                Err(e) => return Poll::Ready(Err(self.fail(e.into()))),
                Ok(Decoded::Data(data)) => {
                    if self.decoder.is_done() {
                        self.finish();
                    }
                    return Poll::Ready(Ok(Some(data)));
                }
                Ok(Decoded::End) => {
                    self.finish();
                    return Poll::Ready(Ok(None));
                }
                Ok(Decoded::NeedMore) => {}
            }
            if conn.buf.capacity() - conn.buf.len() < 1024 {
                conn.buf.reserve(READ_CHUNK);
            }
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut conn.conn.stream), cx, &mut conn.buf);
            match read {
                Poll::Ready(Ok(0)) => {
                    self.reusable = false;
                    if let Err(e) = self.decoder.at_eof() {
                        return Poll::Ready(Err(self.fail(e.into())));
                    }
                }
                Poll::Ready(Ok(_)) => self.quiet = None,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(self.fail(e.into()))),
                Poll::Pending => {
                    let timeout = self.read_timeout;
                    let quiet = self.quiet.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    ready!(quiet.as_mut().poll(cx));
                    return Poll::Ready(Err(self.fail(ResponseBodyError::Timeout(timeout))));
                }
            }
        }
    }

    /// The body has ended: the connection goes back to its pool if it can carry
    /// another request (and its backend is not drained), and the request stops
    /// counting as in flight.
    fn finish(&mut self) {
        self.quiet = None;
        // A drained backend keeps no idle connection.
        let drained = self.in_flight.take().is_some_and(|f| f.backend().is_drained());
        if let Some(ExchangedConn { conn, buf }) = self.conn.take() {
            if self.reusable && buf.is_empty() && !drained {
                conn.idle.put(conn.stream, conn.limits);
            }
            buffers::give(buf);
        }
    }

    fn fail(&mut self, error: ResponseBodyError) -> ResponseBodyError {
        // Closed, never reused: it is in the middle of a message.
        if let Some(conn) = self.conn.take() {
            buffers::give(conn.buf);
        }
        self.in_flight = None;
        self.quiet = None;
        error
    }
}

impl Drop for Http1Body {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            buffers::give(conn.buf);
        }
    }
}

impl http_body::Body for Http1Body {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, ResponseBodyError>>> {
        self.get_mut()
            .poll_chunk(cx)
            .map(|chunk| chunk.transpose().map(|data| data.map(http_body::Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.decoder {
            BodyDecoder::Length(n) => http_body::SizeHint::with_exact(n),
            BodyDecoder::Done => http_body::SizeHint::with_exact(0),
            _ => http_body::SizeHint::default(),
        }
    }
}
