//! The admin listener (`server.admin`): read-only status for now.
//!
//! `GET /status` answers JSON: per pool, its policy, the plugin's fault count,
//! and each backend's health and counters. (Metrics and runtime changes to
//! backends come with the observability work.)

use crate::app::App;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::net::TcpListener;

/// Serves the admin API on `listener` until the task is dropped.
pub async fn serve(app: Arc<App>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(route(&app, request.method(), request.uri().path())) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(app: &App, method: &http::Method, path: &str) -> Response<Full<Bytes>> {
    match (method.as_str(), path) {
        ("GET", "/status") => json(StatusCode::OK, status(app)),
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": format!("no admin endpoint {method} {path}") }),
        ),
    }
}

/// The status document.
pub fn status(app: &App) -> serde_json::Value {
    let snapshot = app.snapshot();
    let pools: Vec<serde_json::Value> = snapshot
        .pools
        .iter()
        .map(|pool| {
            let slot = pool.policy.slot();
            let plugin = slot.current();
            let backends: Vec<serde_json::Value> = pool
                .backends
                .iter()
                .enumerate()
                .map(|(index, b)| {
                    serde_json::json!({
                        "address": b.address,
                        "weight": b.weight,
                        "healthy": b.state.is_healthy(),
                        "up": b.state.is_up(),
                        "ejected": b.state.is_ejected(),
                        "in_flight": b.state.in_flight(),
                        "requests": b.state.requests.load(Ordering::Relaxed),
                        "failures": b.state.failures.load(Ordering::Relaxed),
                        "idle_connections": pool.upstream.idle_count(index),
                    })
                })
                .collect();
            serde_json::json!({
                "name": pool.name,
                "policy": pool.policy.plugin_name(),
                "plugin_digest": plugin.digest,
                "plugin_quarantined": plugin.is_quarantined(),
                "plugin_faults": slot.faults.load(Ordering::Relaxed),
                "backends": backends,
            })
        })
        .collect();
    serde_json::json!({ "pools": pools })
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
