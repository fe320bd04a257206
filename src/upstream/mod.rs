//! The way from the pipeline to a backend, behind two seams: a [`Connector`]
//! makes connections (plain TCP today; TLS and the PROXY protocol later) and a
//! [`Conn`] carries one exchange in the pool's protocol (HTTP/1.1 today, in
//! [`h1`]; HTTP/2 later as a second variant). Each pool has one [`Upstream`]:
//! its connector, its limits and the idle connections of each backend.
//!
//! Connecting is a step of its own, so a request whose connection could not
//! be made still has its body and can go to another backend.

pub mod connect;
pub mod h1;
pub mod pool;

pub use connect::{ConnectError, Connector, TcpConnector, Transport};
pub use h1::{ResponseBody, ResponseBodyError, Upgraded};
pub use pool::{IdleConns, PoolLimits, set_worker_index};

use crate::backend::InFlight;
use crate::http::h1::ResponseHead;
use crate::http::{BodySource, ClientAddr, ClientBodyError, Framing, RequestHead};
use bytes::Bytes;
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
        }
    }

    /// Idle connections held for the backend at `index`.
    pub fn idle_count(&self, index: usize) -> usize {
        self.idle.get(index).map_or(0, |idle| idle.count())
    }

    /// A connection to the backend at `index` (reached at `addr`) ready to
    /// send: a warm idle one, else a new one.
    pub async fn checkout(&self, index: usize, addr: SocketAddr) -> Result<Conn, ConnectError> {
        let idle = self.idle.get(index).cloned().unwrap_or_default();
        if let Some(stream) = idle.take(self.limits) {
            return Ok(Conn::Http1(h1::Conn {
                stream,
                idle,
                limits: self.limits,
                reused: true,
            }));
        }
        let stream = self.connector.connect(addr, self.connect_timeout).await?;
        Ok(Conn::Http1(h1::Conn {
            stream,
            idle,
            limits: self.limits,
            reused: false,
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
    /// The head as written for the wire: encoded at the first try, reused by the others.
    pub encoded: &'a mut Vec<u8>,
}

/// A connection ready for one exchange, in the protocol its pool speaks.
pub enum Conn {
    Http1(h1::Conn),
}

impl Conn {
    /// Whether it served earlier requests (a stale keep-alive is retried at no cost).
    pub fn reused(&self) -> bool {
        match self {
            Conn::Http1(conn) => conn.reused,
        }
    }

    /// Sends `request` with `body` and reads the response head. The body that
    /// comes back counts the request `in_flight` until it is read or dropped,
    /// and gives up on a backend quiet for `read_timeout` mid-body.
    pub async fn exchange<B: BodySource>(
        self,
        request: UpstreamRequest<'_>,
        body: Outgoing<'_, B>,
        in_flight: InFlight,
        read_timeout: Duration,
    ) -> Result<(ResponseHead, ResponseBody), ExchangeError> {
        match self {
            Conn::Http1(conn) => conn.exchange(request, body, in_flight, read_timeout).await,
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
}
