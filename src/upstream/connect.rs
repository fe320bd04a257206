//! Making a connection to a backend: the [`Connector`] seam and the plain TCP
//! connector (TLS is [`super::tls`]); everything above sees only a
//! [`Transport`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A byte stream to a backend.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Whether an idle connection has nothing to say. A backend that closed
    /// it, or sent bytes nobody asked for, makes it unfit for reuse.
    fn is_quiet(&self) -> bool;

    /// Whether TLS negotiated HTTP/2 (ALPN `h2`).
    fn alpn_h2(&self) -> bool {
        false
    }
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connect to {0} failed: {1}")]
    Io(SocketAddr, std::io::Error),
    #[error("TLS handshake with {0} failed: {1}")]
    Tls(SocketAddr, String),
    #[error("HTTP/2 handshake with {0} failed: {1}")]
    Http2(SocketAddr, String),
}

/// A connection being made.
pub type Connecting<'a> = Pin<Box<dyn Future<Output = Result<Box<dyn Transport>, ConnectError>> + Send + 'a>>;

/// Makes connections to backends. Called only when no idle connection can be
/// reused, so the box around its future costs little.
pub trait Connector: Send + Sync + 'static {
    /// A connection to the backend at `addr`, configured as `address`
    /// (`host:port`: TLS takes its name from it).
    fn connect(&self, addr: SocketAddr, address: &str, timeout: Duration) -> Connecting<'_>;
}

/// Plain TCP, `TCP_NODELAY` set.
#[derive(Debug, Default)]
pub struct TcpConnector;

impl TcpConnector {
    /// A TCP connection to `addr` within `timeout`, `TCP_NODELAY` set.
    pub async fn tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(ConnectError::Timeout(addr)),
            Ok(Err(e)) => return Err(ConnectError::Io(addr, e)),
            Ok(Ok(stream)) => stream,
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

impl Connector for TcpConnector {
    fn connect(&self, addr: SocketAddr, _address: &str, timeout: Duration) -> Connecting<'_> {
        Box::pin(async move { Ok(Box::new(TcpConnector::tcp(addr, timeout).await?) as Box<dyn Transport>) })
    }
}

impl Transport for TcpStream {
    /// Uses the readiness the reactor already holds, so a quiet connection
    /// costs no system call.
    fn is_quiet(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readiness can be stale: only a read tells.
            Poll::Ready(Ok(())) => {
                matches!(self.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }
}
