//! Listening: binds the listeners, runs the workers, accepts clients (and,
//! on a TLS listener, completes their handshake) and hands each connection to
//! [`crate::frontend::serve_connection`]; stops gracefully.
//!
//! In production Fulcrum runs one single-threaded runtime per worker thread,
//! each with its own `SO_REUSEPORT` listener (the kernel spreads connections
//! among them), as nginx runs one event loop per worker process: a request is
//! served start to end on one thread, with no work stealing, no cross-thread
//! wake-ups and thread-local plugin instances and connection pools.

use crate::app::App;
use crate::config::ListenerConfig;
use crate::frontend::TlsClient;
use crate::http::Edge;
use crate::shutdown::Shutdown;
use crate::tls::{Terminator, TlsError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
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

/// A listener as it runs: its settings and, over TLS, its terminator.
#[derive(Debug)]
pub struct Listener {
    pub config: ListenerConfig,
    pub tls: Option<Arc<Terminator>>,
    /// What the listener tells the pipeline about its clients: a plain
    /// listener's redirect (`None` when nothing, the common case); over TLS,
    /// shared by every client without a certificate.
    edge: Option<Arc<Edge>>,
}

impl Listener {
    /// The listener of `config`, its TLS files read.
    pub fn new(config: &ListenerConfig) -> Result<Listener, TlsError> {
        let tls = config
            .tls
            .as_ref()
            .map(|tls| Terminator::new(&config.key, &config.table, tls))
            .transpose()?;
        let edge = match &config.tls {
            Some(settings) => Some(Arc::new(Edge {
                secure: true,
                client_cert: None,
                hsts: settings.hsts.clone(),
                redirect_https: None,
                proxied_by: None,
                limits: config.limits,
            })),
            // A plain listener with defaults has no edge: nothing per connection.
            None if config.redirect_https.is_none() && config.limits == crate::http::HeadLimits::DEFAULT => None,
            None => Some(Arc::new(Edge {
                redirect_https: config.redirect_https,
                limits: config.limits,
                ..Edge::default()
            })),
        };
        Ok(Listener {
            config: config.clone(),
            tls,
            edge,
        })
    }
}

/// Starts one worker thread per entry of `sockets` (each a socket per
/// listener, in the order of `listeners`), each running its own
/// single-threaded runtime that serves until `stop` turns true. Each thread
/// returns whether its connections drained within the grace period.
pub fn spawn_workers(
    app: &Arc<App>,
    listeners: &[Arc<Listener>],
    sockets: Vec<Vec<std::net::TcpListener>>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<Vec<std::thread::JoinHandle<bool>>> {
    let workers = sockets.len();
    sockets
        .into_iter()
        .enumerate()
        .map(|(index, sockets)| {
            let (app, stop) = (app.clone(), stop.clone());
            let listeners = listeners.to_vec();
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
                        let mut bound = Vec::new();
                        for (socket, listener) in sockets.into_iter().zip(listeners) {
                            match TcpListener::from_std(socket) {
                                Ok(socket) => bound.push((socket, listener)),
                                Err(error) => {
                                    tracing::error!(worker = index, %error, "cannot use the listener");
                                    return false;
                                }
                            }
                        }
                        serve(app, bound, stop).await
                    })
                })
        })
        .collect()
}

/// Serves clients on every listener until `stop` turns true, then lets
/// in-flight requests finish for up to the config's `shutdown_grace`.
/// Returns whether every connection finished within the grace period.
pub async fn serve(app: Arc<App>, listeners: Vec<(TcpListener, Arc<Listener>)>, stop: watch::Receiver<bool>) -> bool {
    let grace = app.snapshot().config.server.shutdown_grace;
    let shutdown = Arc::new(Shutdown::default());
    crate::memory::watch(&shutdown);
    let accepting = listeners.into_iter().map(|(socket, listener)| {
        let (app, shutdown, mut stop) = (app.clone(), shutdown.clone(), stop.clone());
        async move {
            tokio::select! {
                () = accept(&app, &socket, &listener, &shutdown) => {}
                _ = stop.wait_for(|stop| *stop) => {}
            }
        }
    });
    futures_util::future::join_all(accepting).await;

    tracing::info!(grace = ?grace, "stopped accepting; finishing in-flight requests");
    shutdown.begin();
    tokio::time::timeout(grace, shutdown.drained()).await.is_ok()
}

/// Accepts clients on `socket` for ever.
async fn accept(app: &Arc<App>, socket: &TcpListener, listener: &Arc<Listener>, shutdown: &Arc<Shutdown>) {
    loop {
        let (stream, peer) = match socket.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if listener.tls.is_none() && !listener.config.proxy_protocol {
            // Plain HTTP: straight to the front end, as before listeners had settings.
            tokio::spawn(crate::frontend::serve_connection(
                app.clone(),
                stream,
                peer,
                listener.edge.clone(),
                shutdown.open(),
            ));
        } else {
            tokio::spawn(serve_edge(app.clone(), listener.clone(), stream, peer, shutdown.open()));
        }
    }
}

/// A connection that has more to go through before HTTP: its PROXY header
/// (read first, then required), then its TLS handshake, each within
/// `header_read_timeout`.
async fn serve_edge(
    app: Arc<App>,
    listener: Arc<Listener>,
    mut stream: TcpStream,
    socket_peer: SocketAddr,
    open: crate::shutdown::Open,
) {
    let deadline = app.snapshot().config.server.header_read_timeout;
    let mut edge = listener.edge.clone();
    let mut peer = socket_peer;
    if listener.config.proxy_protocol {
        match crate::proxy_protocol::read_header(&mut stream, deadline).await {
            // LOCAL (the balancer's own health check), or no address: the socket's peer.
            Ok(None) => {}
            Ok(Some(client)) => {
                peer = client;
                edge = Some(Arc::new(Edge {
                    proxied_by: Some(socket_peer),
                    ..edge.as_deref().cloned().unwrap_or_default()
                }));
            }
            Err(error) => {
                tracing::debug!(peer = %socket_peer, listener = %listener.config.key, %error, "PROXY header refused; connection closed");
                return;
            }
        }
    }
    match &listener.tls {
        None => crate::frontend::serve_connection(app, stream, peer, edge, open).await,
        Some(terminator) => serve_tls(app, &listener, terminator.acceptor(), stream, peer, edge, open).await,
    }
}

/// Completes a client's TLS handshake (within `header_read_timeout`), then
/// serves it.
async fn serve_tls(
    app: Arc<App>,
    listener: &Listener,
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    edge: Option<Arc<Edge>>,
    open: crate::shutdown::Open,
) {
    let deadline = app.snapshot().config.server.header_read_timeout;
    let stream = match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(client = %peer, listener = %listener.config.key, %error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(client = %peer, listener = %listener.config.key, "TLS handshake timed out");
            return;
        }
    };
    let client_cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(crate::tls::client_identity);
    let edge = match client_cert {
        None => edge,
        Some(client_cert) => Some(Arc::new(Edge {
            client_cert: Some(client_cert),
            ..edge.as_deref().cloned().unwrap_or_default()
        })),
    };
    crate::frontend::serve_connection(app, TlsClient(stream), peer, edge, open).await;
}
