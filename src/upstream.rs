//! Connections to backends: a pool of keep-alive HTTP/1.1 connections per
//! backend, one request/response exchange on a connection, and the response
//! body read back from it.
//!
//! The exchange runs in the task of the client's request itself (no
//! per-connection task, no channel between the two): the request head is one
//! write, the response head one read, as nginx does it. Connecting is a step
//! of its own, so a request whose connection could not be made still has its
//! body and can go to another backend. A connection returns to its pool only
//! once its response body has been read to the end; one abandoned mid-body is
//! closed instead.

use crate::backend::InFlight;
use crate::buffers;
use crate::http1::{self, BodyDecoder, BodyError, Decoded, Framing, HeadError, ResponseHead};
use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Shards of a pool: one per worker thread (modulo), so a worker reuses the
/// connections its own runtime drives and never contends for another's lock.
const SHARDS: usize = 16;

/// Bytes read from a backend at a time.
const READ_CHUNK: usize = 16 * 1024;

thread_local! {
    static WORKER_INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Worker threads sharing the pools: `max_idle_per_backend` is split among them.
static WORKERS: AtomicUsize = AtomicUsize::new(1);

/// Tells the pools which shard this thread uses and how many workers share
/// them (worker threads call it once).
pub fn set_worker_index(index: usize, workers: usize) {
    WORKER_INDEX.with(|w| w.set(index % SHARDS));
    WORKERS.store(workers.clamp(1, SHARDS), Ordering::Relaxed);
}

/// Idle connections one shard may keep, so that all shards together keep at
/// most `max_idle` per backend for the whole process.
fn shard_idle_max(max_idle: usize) -> usize {
    match max_idle {
        0 => 0,
        n => (n / WORKERS.load(Ordering::Relaxed)).max(1),
    }
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connect to {0} failed: {1}")]
    Io(SocketAddr, std::io::Error),
}

struct IdleConn {
    stream: TcpStream,
    /// When it went idle, in [`coarse_now_ms`] milliseconds.
    since_ms: u64,
}

/// Milliseconds on the kernel's coarse monotonic clock: a few milliseconds of
/// resolution, but read for a fraction of what a precise clock read costs.
/// Idle connections are timed in seconds, twice per request.
fn coarse_now_ms() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec to write; CLOCK_MONOTONIC_COARSE exists on every Linux since 2.6.32.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    (now.tv_sec as u64) * 1000 + (now.tv_nsec as u64) / 1_000_000
}

/// Idle keep-alive connections to one backend.
#[derive(Default)]
pub struct ConnPool {
    idle: [Mutex<Vec<IdleConn>>; SHARDS],
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool").field("idle", &self.idle_count()).finish()
    }
}

/// How a pool keeps connections.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    pub max_idle: usize,
    pub idle_timeout: Duration,
}

impl ConnPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<IdleConn>> {
        let shard = &self.idle[WORKER_INDEX.with(std::cell::Cell::get)];
        shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Idle connections held now, over all workers.
    pub fn idle_count(&self) -> usize {
        self.idle
            .iter()
            .map(|shard| shard.lock().map_or(0, |idle| idle.len()))
            .sum()
    }

    /// A connection ready to send: a warm idle one, else a new one.
    pub async fn checkout(
        self: &Arc<Self>,
        addr: SocketAddr,
        connect_timeout: Duration,
        limits: PoolLimits,
    ) -> Result<Conn, ConnectError> {
        let now_ms = coarse_now_ms();
        loop {
            let idle = self.lock().pop();
            let Some(idle) = idle else { break };
            if now_ms.saturating_sub(idle.since_ms) > limits.idle_timeout.as_millis() as u64 || !is_quiet(&idle.stream)
            {
                continue;
            }
            return Ok(Conn {
                stream: idle.stream,
                pool: self.clone(),
                limits,
                reused: true,
            });
        }
        // Boxed: the connect future is large, and most requests find a warm connection.
        let stream = Box::pin(connect(addr, connect_timeout)).await?;
        Ok(Conn {
            stream,
            pool: self.clone(),
            limits,
            reused: false,
        })
    }

    fn put(&self, stream: TcpStream, limits: PoolLimits) {
        let mut idle = self.lock();
        if idle.len() < shard_idle_max(limits.max_idle) {
            idle.push(IdleConn {
                stream,
                since_ms: coarse_now_ms(),
            });
        }
    }
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err(ConnectError::Timeout(addr)),
        Ok(Err(e)) => return Err(ConnectError::Io(addr, e)),
        Ok(Ok(stream)) => stream,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Whether an idle connection has nothing to say: a backend that closed it
/// (or sent bytes nobody asked for) makes it readable. Uses the readiness the
/// reactor already holds, so a quiet connection costs no system call.
fn is_quiet(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        // Readiness can be stale: only a read tells.
        Poll::Ready(Ok(())) => {
            matches!(stream.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}

/// Where a request's body comes from: the client's connection (HTTP/1 or
/// HTTP/2), read a piece at a time.
pub trait BodySource: Send {
    /// The body's framing as the client declared it.
    fn framing(&self) -> Framing;
    /// The next piece of the body; `None` at its end.
    fn next_chunk(&mut self) -> impl Future<Output = Result<Option<Bytes>, ClientBodyError>> + Send;
}

/// The client's body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("the client's body was malformed: {0}")]
    Malformed(#[from] BodyError),
    #[error("the client sent nothing for {0:?} in the middle of its body")]
    Timeout(Duration),
    #[error("reading the client's body failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("reading the client's body failed: {0}")]
    Other(String),
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
}

/// A connection checked out of a pool, ready for one request.
pub struct Conn {
    stream: TcpStream,
    pool: Arc<ConnPool>,
    limits: PoolLimits,
    /// Whether it served earlier requests (a stale keep-alive is retried at no cost).
    pub reused: bool,
}

impl Conn {
    /// Sends the request (`head` already encoded for the backend, with its
    /// framing) and reads the response head. `upgrade`: the request asked to
    /// switch protocols, so a `101` answer is accepted.
    pub async fn exchange<B: BodySource>(
        mut self,
        head: &[u8],
        body: Outgoing<'_, B>,
        head_request: bool,
        upgrade: bool,
    ) -> Result<(ResponseHead, ExchangedConn), ExchangeError> {
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
                match http1::parse_response(&mut buf, head_request) {
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
                    Ok(Some(head)) => return Ok((head, ExchangedConn { conn: self, buf })),
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
                None if chunked => self.stream.write_all(http1::LAST_CHUNK).await,
                None => Ok(()),
                Some(data) if chunked => {
                    marker.clear();
                    http1::chunk_header(data.len(), &mut marker);
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
async fn write_all_vectored(stream: &mut TcpStream, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
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
pub struct ExchangedConn {
    conn: Conn,
    buf: BytesMut,
}

impl ExchangedConn {
    /// The response body, which gives the connection back to its pool when read
    /// to the end and ends `in_flight` then (or when dropped).
    pub fn into_body(self, head: &ResponseHead, in_flight: InFlight, read_timeout: Duration) -> ResponseBody {
        let mut body = ResponseBody {
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
pub struct ResponseBody {
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
}

/// A backend connection that switched protocols, for the client to tunnel to.
pub struct Upgraded {
    pub stream: TcpStream,
    /// Bytes the backend sent after its 101 head.
    pub early: BytesMut,
    /// The request counts as in flight while the tunnel lasts.
    pub in_flight: Option<InFlight>,
}

impl ResponseBody {
    /// The connection behind a `101 Switching Protocols` answer.
    pub fn into_upgraded(mut self) -> Option<Upgraded> {
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
                    if let Some(in_flight) = &self.in_flight {
                        in_flight
                            .backend()
                            .failures
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    tracing::warn!(timeout = ?timeout, "backend went quiet mid-body; response cut off");
                    return Poll::Ready(Err(self.fail(ResponseBodyError::Timeout(timeout))));
                }
            }
        }
    }

    /// The body has ended: the connection goes back to its pool if it can carry
    /// another request, and the request stops counting as in flight.
    fn finish(&mut self) {
        self.quiet = None;
        self.in_flight = None;
        if let Some(ExchangedConn { conn, buf }) = self.conn.take() {
            if self.reusable && buf.is_empty() {
                conn.pool.put(conn.stream, conn.limits);
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

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            buffers::give(conn.buf);
        }
    }
}

impl http_body::Body for ResponseBody {
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
