//! Listening and connection handling: accepts clients, serves HTTP/1.1 and
//! HTTP/2 on each connection, and stops gracefully.

use crate::app::App;
use crate::proxy;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

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
            async move { Ok::<_, Infallible>(proxy::handle(&app, client, request).await) }
        });
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
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
