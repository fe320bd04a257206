//! Listening and connection handling: accepts clients, serves HTTP/1.1 and
//! HTTP/2 on each connection, and stops gracefully.
//!
//! In production Fulcrum runs one single-threaded runtime per worker thread,
//! each with its own `SO_REUSEPORT` listener (the kernel spreads connections
//! among them), as nginx runs one event loop per worker process: a request is
//! served start to end on one thread, with no work stealing, no cross-thread
//! wake-ups and thread-local plugin instances and connection pools.

use crate::app::App;
use crate::proxy;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
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
    listeners
        .into_iter()
        .enumerate()
        .map(|(index, listener)| {
            let (app, mut stop) = (app.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("fulcrum-worker-{index}"))
                .spawn(move || {
                    crate::upstream::set_worker_index(index);
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
    let server = app.snapshot().config.server.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(server.client_idle_timeout / 2))
        .keep_alive_timeout(server.client_idle_timeout / 2);
    let graceful = GracefulShutdown::new();
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
        let app = app.clone();
        let service = service_fn(move |request| {
            let app = app.clone();
            // Boxed: hyper keeps room for the service's future for the whole life
            // of a connection, so an unboxed multi-kilobyte future would cost that
            // much memory on every idle keep-alive connection.
            Box::pin(async move { Ok::<_, Infallible>(proxy::handle(&app, client, request).await) })
                as std::pin::Pin<Box<dyn Future<Output = Result<_, Infallible>> + Send>>
        });
        // No upgrades: the proxy strips `Upgrade` (WebSocket passthrough belongs to the HTTP-edge work).
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%client, %error, "client connection ended with an error");
            }
        });
    }

    drop(listener);
    tracing::info!(grace = ?server.shutdown_grace, "stopped accepting; finishing in-flight requests");
    tokio::time::timeout(server.shutdown_grace, graceful.shutdown())
        .await
        .is_ok()
}
