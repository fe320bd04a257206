//! Listening: binds the listeners, runs the workers, accepts clients and hands
//! each connection to [`crate::frontend::serve_connection`]; stops gracefully.
//!
//! In production Fulcrum runs one single-threaded runtime per worker thread,
//! each with its own `SO_REUSEPORT` listener (the kernel spreads connections
//! among them), as nginx runs one event loop per worker process: a request is
//! served start to end on one thread, with no work stealing, no cross-thread
//! wake-ups and thread-local plugin instances and connection pools.

use crate::app::App;
use crate::shutdown::Shutdown;
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
        tokio::spawn(crate::frontend::serve_connection(
            app.clone(),
            stream,
            client,
            shutdown.open(),
        ));
    }

    drop(listener);
    tracing::info!(grace = ?grace, "stopped accepting; finishing in-flight requests");
    shutdown.begin();
    tokio::time::timeout(grace, shutdown.drained()).await.is_ok()
}
