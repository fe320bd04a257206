//! Connections to backends: a pool of keep-alive HTTP/1.1 connections per
//! backend, and the bodies that carry data through them.
//!
//! Connecting is a separate step from sending, so a request whose connection
//! could not be made still has its body and can go to another backend. A
//! connection returns to its pool only once its response body has been read to
//! the end; one abandoned mid-body is closed instead.

use crate::backend::InFlight;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a request sent to a backend: the client's, streamed, or bytes
/// held by the balancer.
pub enum RequestBody {
    Stream(Incoming),
    Bytes(Full<Bytes>),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Stream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            RequestBody::Bytes(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Stream(b) => b.is_end_stream(),
            RequestBody::Bytes(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Stream(b) => b.size_hint(),
            RequestBody::Bytes(b) => b.size_hint(),
        }
    }
}

type Sender = http1::SendRequest<RequestBody>;

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connect to {0} failed: {1}")]
    Io(SocketAddr, std::io::Error),
    #[error("HTTP handshake with {0} failed: {1}")]
    Handshake(SocketAddr, hyper::Error),
}

struct IdleConn {
    sender: Sender,
    since: Instant,
}

/// Shards of a pool: one per worker thread (modulo), so a worker reuses the
/// connections its own runtime drives and never contends for another's lock.
const SHARDS: usize = 16;

thread_local! {
    static WORKER_INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Tells the pools which shard this thread uses (worker threads call it once).
pub fn set_worker_index(index: usize) {
    WORKER_INDEX.with(|w| w.set(index % SHARDS));
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
        loop {
            let idle = self.lock().pop();
            let Some(mut idle) = idle else { break };
            if idle.since.elapsed() > limits.idle_timeout || idle.sender.is_closed() {
                continue;
            }
            // Ready at once unless the previous response's end is still being processed.
            if idle.sender.ready().await.is_ok() {
                return Ok(Conn {
                    sender: idle.sender,
                    pool: self.clone(),
                    limits,
                    reused: true,
                });
            }
        }
        let sender = connect(addr, connect_timeout).await?;
        Ok(Conn {
            sender,
            pool: self.clone(),
            limits,
            reused: false,
        })
    }

    fn put(&self, sender: Sender, limits: PoolLimits) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < limits.max_idle {
            idle.push(IdleConn {
                sender,
                since: Instant::now(),
            });
        }
    }
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Sender, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err(ConnectError::Timeout(addr)),
        Ok(Err(e)) => return Err(ConnectError::Io(addr, e)),
        Ok(Ok(stream)) => stream,
    };
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ConnectError::Handshake(addr, e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(backend = %addr, error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// A connection checked out of a pool, ready for one request.
pub struct Conn {
    sender: Sender,
    pool: Arc<ConnPool>,
    limits: PoolLimits,
    /// Whether it served earlier requests (a stale keep-alive is retried at no cost).
    pub reused: bool,
}

/// Why a request did not get a response head.
pub enum SendError {
    /// Nothing was written: the request is handed back, safe to send elsewhere.
    NotSent(http::Request<RequestBody>, hyper::Error),
    /// The request may have reached the backend.
    Failed(hyper::Error),
}

impl Conn {
    /// Sends `request`; on success the response body gives the connection back
    /// to its pool when read to the end, and ends `in_flight` when dropped.
    pub async fn send(
        mut self,
        request: http::Request<RequestBody>,
        in_flight: InFlight,
        read_timeout: Duration,
    ) -> Result<http::Response<UpstreamBody>, SendError> {
        match self.sender.try_send_request(request).await {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                let done = body.is_end_stream();
                let mut upstream = UpstreamBody {
                    body,
                    release: Some((self.sender, self.pool, self.limits)),
                    _in_flight: in_flight,
                    read_timeout,
                    quiet_since: None,
                };
                if done {
                    upstream.release();
                }
                Ok(http::Response::from_parts(parts, upstream))
            }
            Err(mut e) => match e.take_message() {
                Some(request) => Err(SendError::NotSent(request, e.into_error())),
                None => Err(SendError::Failed(e.into_error())),
            },
        }
    }
}

/// A backend's response body on its way to the client. A backend that goes
/// quiet mid-body for longer than the pool's `read_timeout` is cut off.
pub struct UpstreamBody {
    body: Incoming,
    release: Option<(Sender, Arc<ConnPool>, PoolLimits)>,
    _in_flight: InFlight,
    read_timeout: Duration,
    /// Armed only while the backend keeps the client waiting, so a body that
    /// is already at hand costs no timer.
    quiet_since: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The backend sent nothing for longer than `read_timeout` mid-body.
#[derive(Debug, thiserror::Error)]
#[error("the backend sent nothing for {0:?} in the middle of a response body")]
pub struct ReadTimeout(pub Duration);

impl UpstreamBody {
    fn release(&mut self) {
        if let Some((sender, pool, limits)) = self.release.take() {
            pool.put(sender, limits);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.release = None,
            Poll::Ready(Some(Ok(_))) => {}
            Poll::Pending => {
                let timeout = self.read_timeout;
                let quiet = self
                    .quiet_since
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if quiet.as_mut().poll(cx).is_ready() {
                    // The connection is mid-response: it cannot be reused.
                    self.release = None;
                    self._in_flight
                        .backend()
                        .failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(timeout = ?timeout, "backend went quiet mid-body; response cut off");
                    return Poll::Ready(Some(Err(Box::new(ReadTimeout(timeout)))));
                }
                return Poll::Pending;
            }
        }
        self.quiet_since = None;
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
