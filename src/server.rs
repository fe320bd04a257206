//! Listening: accepts clients, serves each connection as HTTP/1.1
//! ([`crate::connection`]) or, when it opens with the HTTP/2 preface, as
//! HTTP/2 through hyper; stops gracefully.
//!
//! In production Fulcrum runs one single-threaded runtime per worker thread,
//! each with its own `SO_REUSEPORT` listener (the kernel spreads connections
//! among them), as nginx runs one event loop per worker process: a request is
//! served start to end on one thread, with no work stealing, no cross-thread
//! wake-ups and thread-local plugin instances and connection pools.

use crate::app::App;
use crate::connection::{self, Handoff};
use crate::proxy;
use crate::shutdown::Shutdown;
use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A socket bound to `addr` that shares its port with the other workers'.
/// It accepts no connection until [`listen`] is called, so an address already
/// taken is reported at once, while clients see the port open only when
/// everything behind it is ready.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Starts accepting connections on a socket from [`bind_reuseport`].
pub fn listen(socket: socket2::Socket) -> std::io::Result<std::net::TcpListener> {
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Starts one worker thread per listener, each running its own single-threaded
/// runtime that serves its listener until `stop` turns true. Each thread
/// returns whether its connections drained within the grace period.
pub fn spawn_workers(
    app: &Arc<App>,
    listeners: Vec<std::net::TcpListener>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<Vec<std::thread::JoinHandle<bool>>> {
    let workers = listeners.len();
    listeners
        .into_iter()
        .enumerate()
        .map(|(index, listener)| {
            let (app, mut stop) = (app.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("fulcrum-worker-{index}"))
                .spawn(move || {
                    crate::upstream::set_worker_index(index, workers);
                    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime,
                        Err(error) => {
                            tracing::error!(worker = index, %error, "cannot start a worker runtime");
                            return false;
                        }
                    };
                    runtime.block_on(async move {
                        let listener = match TcpListener::from_std(listener) {
                            Ok(listener) => listener,
                            Err(error) => {
                                tracing::error!(worker = index, %error, "cannot use the listener");
                                return false;
                            }
                        };
                        let stopped = async move {
                            let _ = stop.wait_for(|stop| *stop).await;
                        };
                        serve(app, listener, stopped).await
                    })
                })
        })
        .collect()
}

/// Serves clients on `listener` until `stop` completes, then lets in-flight
/// requests finish for up to the config's `shutdown_grace`. Returns whether
/// every connection finished within the grace period.
pub async fn serve(app: Arc<App>, listener: TcpListener, stop: impl Future<Output = ()>) -> bool {
    let grace = app.snapshot().config.server.shutdown_grace;
    let shutdown = Arc::new(Shutdown::default());
    crate::memory::watch(&shutdown);
    tokio::pin!(stop);

    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let (app, shutdown) = (app.clone(), shutdown.clone());
        let open = shutdown.open();
        tokio::spawn(async move {
            let _open = open;
            if let Some(Handoff::Http2(stream, read)) = connection::serve(&app, stream, client, &shutdown).await {
                // Boxed: an HTTP/2 connection's state is large, and most connections never need it.
                Box::pin(serve_http2(app, Rewind::new(read.freeze(), stream), client, shutdown)).await;
            }
        });
    }

    drop(listener);
    tracing::info!(grace = ?grace, "stopped accepting; finishing in-flight requests");
    shutdown.begin();
    tokio::time::timeout(grace, shutdown.drained()).await.is_ok()
}

/// Serves an HTTP/2 (prior knowledge) client through hyper.
async fn serve_http2(app: Arc<App>, io: Rewind, client: SocketAddr, shutdown: Arc<Shutdown>) {
    let _busy = shutdown.busy();
    let idle = app.snapshot().config.server.client_idle_timeout;
    let client = proxy::Client::new(client);
    let service = service_fn(move |request| {
        let app = app.clone();
        Box::pin(async move {
            let snapshot = app.snapshot();
            Ok::<_, Infallible>(proxy::handle(&snapshot, &client, request).await)
        }) as Pin<Box<dyn Future<Output = Result<_, Infallible>> + Send>>
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(idle / 2))
        .keep_alive_timeout(idle / 2)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.stopped() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(client = %client.addr, %error, "HTTP/2 client connection ended with an error");
    }
}

/// A stream whose first bytes were already read: they are read again first.
struct Rewind {
    read: Bytes,
    stream: TcpStream,
}

impl Rewind {
    fn new(read: Bytes, stream: TcpStream) -> Self {
        Rewind { read, stream }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
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
