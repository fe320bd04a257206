//! Demo backends: small HTTP servers that say who they are, used by the
//! quickstart, the tests and the benchmarks.
//!
//! Every response carries `x-backend: NAME` and, by default, the body
//! `NAME\n`. The path picks other behaviour:
//! - `/slow/MS`: answers after MS milliseconds;
//! - `/bytes/N`: streams N bytes of body, 64 KiB at a time;
//! - `/healthz`: `ok`;
//! - `/headers`: the request head as received, one `name: value` a line;
//! - `/with-header/NAME=VALUE`: answers with that header added (a backend's
//!   own `Strict-Transport-Security`, say);
//! - any request with a body: reads it to the end and answers with its length.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;

/// What a demo backend has served, for tests to inspect.
#[derive(Debug, Default)]
pub struct DemoStats {
    pub requests: AtomicU64,
    /// Request body bytes received.
    pub body_bytes: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
}

type DemoBody = BoxBody<Bytes, Infallible>;

/// Serves requests on `listener` as backend `name`, each answer held back by
/// `delay`, until `killed` turns true: then the listener closes and every open
/// connection is dropped mid-flight, as when a process dies.
pub async fn serve(
    listener: TcpListener,
    name: String,
    stats: Arc<DemoStats>,
    delay: Duration,
    mut killed: tokio::sync::watch::Receiver<bool>,
) {
    let name: Arc<str> = name.into();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = killed.wait_for(|k| *k) => return,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let (name, stats) = (name.clone(), stats.clone());
        let mut killed = killed.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let (name, stats) = (name.clone(), stats.clone());
                async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    respond(request, name, stats).await
                }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = killed.wait_for(|k| *k) => {}
            }
        });
    }
}

async fn respond(
    request: Request<Incoming>,
    name: Arc<str>,
    stats: Arc<DemoStats>,
) -> Result<Response<DemoBody>, Infallible> {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let path = request.uri().path().to_owned();
    if path == "/headers" {
        let mut head = format!("{} {} {:?}\n", request.method(), request.uri(), request.version());
        for (name, value) in request.headers() {
            head.push_str(&format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes())));
        }
        return Ok(text(StatusCode::OK, &name, head));
    }
    let mut received = 0u64;
    let mut body = request.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    received += data.len() as u64;
                }
            }
            Err(_) => {
                return Ok(text(StatusCode::BAD_REQUEST, &name, "body read failed\n".into()));
            }
        }
    }
    stats.body_bytes.fetch_add(received, Ordering::Relaxed);
    if received > 0 {
        return Ok(text(StatusCode::OK, &name, format!("{received}\n")));
    }
    let number = |prefix: &str| path.strip_prefix(prefix).and_then(|n| n.parse::<u64>().ok());
    if path == "/healthz" {
        return Ok(text(StatusCode::OK, &name, "ok\n".into()));
    }
    if let Some(ms) = number("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(total) = number("/bytes/") {
        return Ok(stream_bytes(&name, total));
    }
    let mut response = text(StatusCode::OK, &name, format!("{name}\n"));
    let wanted = path.strip_prefix("/with-header/").and_then(|h| h.split_once('='));
    if let Some((header, value)) = wanted {
        let value = value.replace("%20", " ");
        if let (Ok(header), Ok(value)) = (
            http::HeaderName::from_bytes(header.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            response.headers_mut().append(header, value);
        }
    }
    Ok(response)
}

fn text(status: StatusCode, name: &str, body: String) -> Response<DemoBody> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(name) {
        response.headers_mut().insert("x-backend", value);
    }
    response
}

fn stream_bytes(name: &str, total: u64) -> Response<DemoBody> {
    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
    let frames = (0..total.div_ceil(CHUNK)).map(move |i| {
        let len = CHUNK.min(total - i * CHUNK) as usize;
        Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
    });
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let mut response = Response::new(BodyExt::boxed(body));
    if let Ok(value) = http::HeaderValue::from_str(name) {
        response.headers_mut().insert("x-backend", value);
    }
    response
}

/// A started demo backend.
#[derive(Debug, Clone)]
pub struct DemoBackend {
    pub addr: std::net::SocketAddr,
    pub name: String,
    pub stats: Arc<DemoStats>,
    pub delay: Duration,
    kill: Arc<tokio::sync::watch::Sender<bool>>,
}

impl DemoBackend {
    /// Stops the backend as if its process died: no more connections, and
    /// open ones are cut.
    pub fn kill(&self) {
        self.kill.send_replace(true);
    }

    /// Starts the backend again on the same address, with the same stats.
    pub async fn restart(&self) -> std::io::Result<DemoBackend> {
        let listener = TcpListener::bind(self.addr).await?;
        let (kill, killed) = tokio::sync::watch::channel(false);
        tokio::spawn(serve(
            listener,
            self.name.clone(),
            self.stats.clone(),
            self.delay,
            killed,
        ));
        Ok(DemoBackend {
            kill: Arc::new(kill),
            ..self.clone()
        })
    }
}

/// Starts one demo backend per entry of `delays` on 127.0.0.1 (`port` 0 lets
/// the OS pick), named `backend-1`, `backend-2`, ...
pub async fn start(ports: &[u16], delays: &[Duration]) -> std::io::Result<Vec<DemoBackend>> {
    let mut started = Vec::with_capacity(ports.len());
    for (i, port) in ports.iter().enumerate() {
        let listener = TcpListener::bind(("127.0.0.1", *port)).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(DemoStats::default());
        let name = format!("backend-{}", i + 1);
        let delay = delays.get(i).copied().unwrap_or_default();
        let (kill, killed) = tokio::sync::watch::channel(false);
        tokio::spawn(serve(listener, name.clone(), stats.clone(), delay, killed));
        started.push(DemoBackend {
            addr,
            name,
            stats,
            delay,
            kill: Arc::new(kill),
        });
    }
    Ok(started)
}
