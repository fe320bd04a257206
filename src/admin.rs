//! The admin listener (`server.admin`): status, metrics, readiness and
//! reload, for operators and their tools.
//!
//! - `GET /`: the status page (its files embedded; [`crate::live`] feeds its
//!   charts through `GET /status/live`).
//! - `GET /status`: JSON, every pool with its policy and backends.
//! - `GET /metrics`: the Prometheus text exposition ([`crate::metrics`]).
//! - `GET /ready`: 200 while Fulcrum takes traffic, 503 once `POST /ready/fail`
//!   says to drain it out of an outer load balancer; `POST /ready/ok` undoes it.
//! - `POST /reload`: reads the config file again; the answer says applied,
//!   unchanged, or refused with the file, key and reason.
//!
//! With `server.admin_token` set, every endpoint but `GET /ready` answers 401
//! without `Authorization: Bearer <token>` (a token is required when the
//! listener is not on a loopback address). A change (`POST`) must also carry a
//! JSON `Content-Type` and a `Host` naming the admin listener, so that a page
//! in an operator's browser cannot make one (no form posts, no DNS rebinding).

use crate::app::App;
use crate::config::ConfigError;
use crate::live::Live;
use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::net::TcpListener;

/// Serves the admin API on `listener`, and samples the status page's live
/// figures, until the task is dropped.
pub async fn serve(app: Arc<App>, listener: TcpListener) {
    let live = Arc::new(Live::default());
    let sampler = live.clone().sample(app.clone());
    let accept = accept(app, live, listener);
    tokio::join!(sampler, accept);
}

async fn accept(app: Arc<App>, live: Arc<Live>, listener: TcpListener) {
    let local = listener.local_addr().ok();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let app = app.clone();
        let live = live.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let app = app.clone();
                let live = live.clone();
                async move {
                    let (parts, body) = request.into_parts();
                    // Bodies are small JSON documents; more is refused unread.
                    let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
                        Ok(collected) => collected.to_bytes(),
                        Err(_) => Bytes::new(),
                    };
                    Ok::<_, Infallible>(
                        handle(
                            &app,
                            &live,
                            local,
                            &parts.method,
                            parts.uri.path(),
                            &parts.headers,
                            &body,
                        )
                        .await,
                    )
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The largest admin request body read.
const MAX_BODY: usize = 64 * 1024;

/// Answers one admin request.
async fn handle(
    app: &Arc<App>,
    live: &Live,
    local: Option<SocketAddr>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response<Full<Bytes>> {
    if *method == Method::GET {
        if path == "/ready" {
            return if app.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
            };
        }
        // The status page's shell carries no data: it loads without a token
        // and asks for one when its first call is refused.
        if let Some(asset) = status_page_asset(path) {
            return asset;
        }
    }
    let snapshot = app.snapshot();
    if let Some(token) = &snapshot.config.server.admin_token
        && !bearer_matches(headers, token)
    {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "authorization",
            "a valid `Authorization: Bearer <token>` is required",
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
        return response;
    }
    if matches!(*method, Method::POST | Method::PUT | Method::DELETE)
        && let Some(refusal) = refuse_change(headers, local)
    {
        return refusal;
    }
    if let Some(rest) = path.strip_prefix("/pools/") {
        return backends(app, method, rest, body).await;
    }
    if let Some(name) = path.strip_prefix("/plugins/").and_then(|p| p.strip_suffix("/reset")) {
        return reset_plugin(app, method, &percent_decode(name));
    }
    match (method.as_str(), path) {
        ("GET", "/status") => json(StatusCode::OK, status(app)),
        ("GET", "/status/live") => json(StatusCode::OK, live.to_json()),
        ("GET", "/metrics") => {
            let mut response = Response::new(Full::new(Bytes::from(crate::metrics::render(&snapshot))));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            response
        }
        ("POST", "/ready/fail") => {
            app.set_ready(false);
            json(StatusCode::OK, serde_json::json!({ "ready": false }))
        }
        ("POST", "/ready/ok") => {
            app.set_ready(true);
            json(StatusCode::OK, serde_json::json!({ "ready": true }))
        }
        ("POST", "/reload") => {
            // A reload runs plugins' init: off the runtime's thread.
            let app = app.clone();
            tokio::task::spawn_blocking(move || reload(&app))
                .await
                .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "reload", "the reload panicked"))
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "path",
            &format!("no admin endpoint {method} {path}"),
        ),
    }
}

/// `POST /plugins/{name}/reset`: lifts the plugin's quarantine and forgets
/// its faults in a row (after a fix elsewhere, say a backend the plugin
/// trapped on), without waiting for the quarantine to end.
fn reset_plugin(app: &App, method: &Method, name: &str) -> Response<Full<Bytes>> {
    if method != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
            &format!("use POST /plugins/{name}/reset"),
        );
    }
    let Some(slot) = app.registry().slots().into_iter().find(|slot| slot.name == name) else {
        return error(StatusCode::NOT_FOUND, "plugin", &format!("no plugin called `{name}`"));
    };
    let was = slot.current().reset_faults();
    tracing::warn!(
        plugin = name,
        was_quarantined = was,
        "plugin faults reset by the admin API"
    );
    json(
        StatusCode::OK,
        serde_json::json!({ "plugin": name, "was_quarantined": was }),
    )
}

/// `/pools/{pool}/backends...`: runtime changes to a pool's backends.
async fn backends(app: &Arc<App>, method: &Method, rest: &str, body: &Bytes) -> Response<Full<Bytes>> {
    let segments: Vec<String> = rest.split('/').map(percent_decode).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let result = match (method.as_str(), segments.as_slice()) {
        ("POST", [pool, "backends"]) => match serde_json::from_slice::<NewBackend>(body) {
            Ok(new) => app
                .add_backend(pool, &new.address, new.weight.unwrap_or(1))
                .map(|()| (pool.to_string(), new.address)),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "body",
                    &format!("expected {{\"address\": \"host:port\", \"weight\": N}}: {e}"),
                );
            }
        },
        ("POST", [pool, "backends", address, "drain"]) => app
            .set_drained(pool, address, true)
            .map(|()| (pool.to_string(), address.to_string())),
        ("POST", [pool, "backends", address, "enable"]) => app
            .set_drained(pool, address, false)
            .map(|()| (pool.to_string(), address.to_string())),
        ("PUT", [pool, "backends", address]) => match serde_json::from_slice::<Weight>(body) {
            Ok(weight) => app
                .set_weight(pool, address, weight.weight)
                .map(|()| (pool.to_string(), address.to_string())),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "body",
                    &format!("expected {{\"weight\": N}}: {e}"),
                );
            }
        },
        ("DELETE", [pool, "backends", address]) => {
            let wait = app.snapshot().config.server.shutdown_grace;
            match app.remove_backend(pool, address, wait).await {
                Ok(()) => {
                    return json(
                        StatusCode::OK,
                        serde_json::json!({ "pool": pool, "address": address, "state": "removed" }),
                    );
                }
                Err(e) => Err(e),
            }
        }
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "path",
                &format!("no admin endpoint {method} /pools/{rest}"),
            );
        }
    };
    match result {
        Ok((pool, address)) => json(StatusCode::OK, backend_view(app, &pool, &address)),
        Err(refused) => error(
            StatusCode::from_u16(refused.status).unwrap_or(StatusCode::BAD_REQUEST),
            refused.field,
            &refused.reason,
        ),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBackend {
    address: String,
    weight: Option<u32>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Weight {
    weight: u32,
}

/// A backend after a change, as `/status` shows it, with its pool's name.
fn backend_view(app: &App, pool: &str, address: &str) -> serde_json::Value {
    let snapshot = app.snapshot();
    let found = snapshot
        .backend(pool, address)
        .map(|(p, index)| backend_json(p, index, &p.backends[index]));
    let mut view = found.unwrap_or_else(|| serde_json::json!({ "address": address }));
    view["pool"] = serde_json::json!(pool);
    view
}

/// One backend of `pool` (at `index`) as the admin API shows it.
fn backend_json(pool: &crate::snapshot::Pool, index: usize, b: &crate::backend::Backend) -> serde_json::Value {
    serde_json::json!({
        "address": b.address,
        "weight": b.weight,
        "state": b.state.describe(),
        "healthy": b.state.is_healthy(),
        "up": b.state.is_up(),
        "ejected": b.state.is_ejected(),
        "in_flight": b.state.in_flight(),
        "max_in_flight": (b.state.max_in_flight() > 0).then(|| b.state.max_in_flight()),
        "full": b.state.is_full(),
        "effective_weight": crate::traffic::effective_weight(b, pool.config.slow_start, crate::backend::process_ms()),
        "requests": b.state.requests.load(Ordering::Relaxed),
        "failures": b.state.failures.load(Ordering::Relaxed),
        "idle_connections": pool.upstream.idle_count(index),
        "last_error": b.state.last_error().as_deref(),
    })
}

/// `%XX` escapes in a path segment decoded (an IPv6 address's brackets).
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `POST /reload`: the config file read and applied, or the reason it was not.
fn reload(app: &App) -> Response<Full<Bytes>> {
    match app.reload_file() {
        Ok(true) => json(StatusCode::OK, serde_json::json!({ "result": "applied" })),
        Ok(false) => json(StatusCode::OK, serde_json::json!({ "result": "unchanged" })),
        Err(refusal) => {
            let (file, key, reason) = match &refusal {
                ConfigError::Read { file, reason } => (file, "", reason.as_str()),
                ConfigError::Invalid { file, key, reason } => (file, key.as_str(), reason.as_str()),
            };
            json(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({
                    "result": "refused",
                    "file": file.display().to_string(),
                    "key": key,
                    "reason": reason,
                    "error": refusal.to_string(),
                }),
            )
        }
    }
}

/// Whether the request carries `Authorization: Bearer <token>`, compared in
/// time that does not depend on where the first difference is.
fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (given, token) = (given.trim().as_bytes(), token.as_bytes());
    given.len() == token.len() && given.iter().zip(token).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}

/// The refusal of a change that does not say it is JSON (a browser form
/// cannot) or does not name the admin listener as its host (a rebinding DNS
/// name cannot); `None` for a change that may go on.
fn refuse_change(headers: &HeaderMap, local: Option<SocketAddr>) -> Option<Response<Full<Bytes>>> {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json_type {
        return Some(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content-type",
            "a change needs `Content-Type: application/json`",
        ));
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !local.is_some_and(|local| names_listener(host, local)) {
        return Some(error(
            StatusCode::FORBIDDEN,
            "host",
            "a change needs a `Host` naming the admin listener",
        ));
    }
    None
}

/// Whether `host` (a `Host` header) names `local`: its address and port, or
/// `localhost` with its port when it is a loopback address.
fn names_listener(host: &str, local: SocketAddr) -> bool {
    let Some((name, port)) = host.rsplit_once(':') else {
        return false;
    };
    if port.parse::<u16>().ok() != Some(local.port()) {
        return false;
    }
    let name = name.trim_start_matches('[').trim_end_matches(']');
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip == local.ip() || (local.ip().is_unspecified() && !ip.is_unspecified()),
        Err(_) => name.eq_ignore_ascii_case("localhost") && local.ip().is_loopback(),
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
                .map(|(index, b)| backend_json(pool, index, b))
                .collect();
            serde_json::json!({
                "name": pool.name,
                "policy": pool.policy.plugin_name(),
                "plugin_digest": plugin.digest,
                "plugin_quarantined": plugin.is_quarantined(),
                "plugin_faults": slot.faults.load(Ordering::Relaxed),
                "policy_loaded_at": plugin
                    .loaded_at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                "panic": pool.traffic.in_panic(),
                "queued": pool.traffic.queued(),
                "active": pool.traffic.active_now(),
                "circuit_breaker_trips": crate::traffic::Breaker::ALL
                    .iter()
                    .map(|b| (b.as_str(), pool.traffic.trips[*b as usize].load(Ordering::Relaxed)))
                    .collect::<std::collections::BTreeMap<_, _>>(),
                "backends": backends,
            })
        })
        .collect();
    let plugins: Vec<serde_json::Value> = app
        .registry()
        .slots()
        .iter()
        .map(|slot| {
            let plugin = slot.current();
            serde_json::json!({
                "name": slot.name,
                "digest": plugin.digest,
                "quarantined": plugin.is_quarantined(),
                "quarantine_left_ms": plugin.quarantine_left().as_millis() as u64,
                "faults": slot.faults.load(Ordering::Relaxed),
            })
        })
        .collect();
    serde_json::json!({ "pools": pools, "plugins": plugins, "ready": app.is_ready() })
}

/// The status page's files, embedded in the binary: `GET /` and what it loads.
fn status_page_asset(path: &str) -> Option<Response<Full<Bytes>>> {
    let (body, content_type): (&'static str, &'static str) = match path {
        "/" => (include_str!("../assets/status/index.html"), "text/html; charset=utf-8"),
        "/status.js" => (
            include_str!("../assets/status/status.js"),
            "text/javascript; charset=utf-8",
        ),
        "/status.css" => (include_str!("../assets/status/status.css"), "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    // Only the page's own files run, and no other site may frame it (its
    // buttons change the balancer).
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    headers.insert(header::X_FRAME_OPTIONS, http::HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    Some(response)
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

/// A JSON error naming what was wrong (`field`) and why.
fn error(status: StatusCode, field: &str, reason: &str) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": reason, "field": field }))
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
