//! Backend health, off the request path: active checks (HTTP GET, gRPC
//! `grpc.health.v1` or a connection, per pool, made the way the pool's
//! requests are: over TLS and HTTP/2 when the pool speaks them) and passive
//! ejection of backends that fail requests.
//!
//! Active checks run as one task per backend, started staggered across the
//! interval so a pool's backends are not all probed at the same instant. A
//! backend goes down after `fall` failed checks in a row and comes back after
//! `rise` good ones; the streaks live in the backend's state, so restarting
//! the tasks (a config reload) forgets nothing.
//!
//! Passive ejection counts failed requests in a row as the proxy reports them.
//! An ejection lasts `base_ejection_time` times the backend's ejection count,
//! which grows by one with each ejection and falls by one for each base time
//! the backend then spends readmitted (Envoy's rule), up to
//! `max_ejection_time`; never more than `max_ejected_percent` of a pool is out.
//! With active checks on, `rise` passing checks in a row end an ejection early
//! (unless `readmit_on_check = false`). Every ejection and readmission changes
//! the backend's ejection generation, so an old ejection's timer never ends a
//! newer one.

use crate::backend::{Backend, BackendList};
use crate::config::{CheckType, HealthConfig, OutlierConfig, UpstreamProtocol};
use crate::snapshot::Snapshot;
use crate::upstream::Connector;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Starts active checks for every backend of `backends`; dropping the
/// returned handles' tasks (abort) stops them.
pub fn spawn_checks(
    runtime: &tokio::runtime::Handle,
    pool: &str,
    backends: &BackendList,
    health: &HealthConfig,
    outlier: &OutlierConfig,
    way: &CheckWay,
) -> Vec<JoinHandle<()>> {
    let n = backends.len().max(1) as u32;
    backends
        .iter()
        .enumerate()
        .map(|(i, backend)| {
            let offset = health.interval * i as u32 / n;
            let task = check_loop(
                pool.to_string(),
                backend.clone(),
                health.clone(),
                outlier.clone(),
                way.clone(),
                offset,
            );
            runtime.spawn(task)
        })
        .collect()
}

/// The running check tasks and the runtime they run on.
#[derive(Default)]
pub struct Checks {
    pub runtime: Option<tokio::runtime::Handle>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Checks {
    /// Replaces the running checks with those `snapshot` asks for.
    pub fn restart(&mut self, snapshot: &Snapshot) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        let Some(runtime) = &self.runtime else { return };
        for pool in &snapshot.pools {
            if let Some(config) = &pool.config.health {
                let way = CheckWay {
                    connector: pool.upstream.connector().clone(),
                    protocol: pool.config.protocol,
                    secure: pool.config.tls.is_some(),
                };
                self.tasks.extend(spawn_checks(
                    runtime,
                    &pool.name,
                    &pool.backends,
                    config,
                    &pool.config.outlier,
                    &way,
                ));
            }
        }
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

async fn check_loop(
    pool: String,
    backend: Arc<Backend>,
    health: HealthConfig,
    outlier: OutlierConfig,
    way: CheckWay,
    offset: Duration,
) {
    tokio::time::sleep(offset).await;
    let mut ticker = tokio::time::interval(health.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = probe(&backend, &health, &way).await;
        record_check(&pool, &backend, &result, &health, &outlier);
    }
}

/// Applies one active check's verdict to `backend`: its streaks, whether it
/// is up, and (with `readmit_on_check`) the end of a passive ejection.
pub fn record_check(
    pool: &str,
    backend: &Backend,
    result: &Result<(), String>,
    health: &HealthConfig,
    outlier: &OutlierConfig,
) {
    let state = &backend.state;
    match result {
        Ok(()) => {
            state.checks_passed.fetch_add(1, Ordering::Relaxed);
            state.check_failures.store(0, Ordering::Relaxed);
            let good = state.check_successes.fetch_add(1, Ordering::Relaxed).saturating_add(1);
            if good < health.rise {
                return;
            }
            if !state.is_up() && state.set_up(true) {
                tracing::info!(%pool, backend = %backend.address, checks = good, "backend is up");
            }
            if outlier.readmit_on_check && state.is_ejected() {
                let generation = state.ejection_generation.load(Ordering::Acquire);
                readmit(pool, backend, generation, "its active checks pass");
            }
        }
        Err(reason) => {
            state.checks_failed.fetch_add(1, Ordering::Relaxed);
            state.note_error(&format!("health check: {reason}"));
            state.check_successes.store(0, Ordering::Relaxed);
            let bad = state.check_failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
            if bad >= health.fall && state.is_up() && state.set_up(false) {
                tracing::warn!(%pool, backend = %backend.address, %reason, checks = bad, "backend is down");
            }
        }
    }
}

/// How a pool's checks reach its backends: as its requests do.
#[derive(Clone)]
pub struct CheckWay {
    pub connector: std::sync::Arc<dyn Connector>,
    pub protocol: UpstreamProtocol,
    /// Over TLS (`https` as the HTTP/2 `:scheme`).
    pub secure: bool,
}

/// One check: a connection (with its TLS handshake), an HTTP GET answered
/// with an expected status, or a gRPC health check answered `SERVING`.
pub async fn probe(backend: &Backend, config: &HealthConfig, way: &CheckWay) -> Result<(), String> {
    let attempt = async {
        let stream = way
            .connector
            .connect(backend.socket, &backend.address, config.timeout)
            .await
            .map_err(|e| e.to_string())?;
        let host = config.host.as_deref().unwrap_or(&backend.address);
        let (path, grpc) = match &config.check {
            CheckType::Tcp => return Ok(()),
            CheckType::Http { path } => (path.as_str(), None),
            CheckType::Grpc { service } => (crate::grpc::HEALTH_CHECK_PATH, Some(service.as_str())),
        };
        let mut request = http::Request::builder().header(http::header::USER_AGENT, "fulcrum-health-check");
        let body = match grpc {
            None => Full::new(Bytes::new()),
            Some(service) => {
                request = request
                    .method(http::Method::POST)
                    .header(http::header::CONTENT_TYPE, "application/grpc")
                    .header(http::header::TE, "trailers");
                Full::new(Bytes::from(crate::grpc::health_check_request(service)))
            }
        };
        let response = if way.protocol.is_http2() {
            let scheme = if way.secure { "https" } else { "http" };
            let request = request
                .uri(format!("{scheme}://{host}{path}"))
                .version(http::Version::HTTP_2)
                .body(body)
                .map_err(|e| format!("request: {e}"))?;
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
            let connection = tokio::spawn(connection);
            let response = read_response(sender.send_request(request)).await;
            connection.abort();
            response?
        } else {
            let request = request
                .uri(path)
                .header(http::header::HOST, host)
                .header(http::header::CONNECTION, "close")
                .body(body)
                .map_err(|e| format!("request: {e}"))?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            let connection = tokio::spawn(connection);
            let response = read_response(sender.send_request(request)).await;
            connection.abort();
            response?
        };
        let (status, headers, body, trailers) = response;
        if grpc.is_some() {
            return grpc_verdict(status, &headers, &body, trailers.as_ref());
        }
        let (low, high) = config.expect_status;
        if (low..=high).contains(&status) {
            Ok(())
        } else {
            Err(format!("status {status}, expected {low}-{high}"))
        }
    };
    tokio::time::timeout(config.timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", config.timeout)))
}

/// A check's response: status, headers, body and trailers.
type CheckResponse = (u16, http::HeaderMap, Bytes, Option<http::HeaderMap>);

async fn read_response(
    sent: impl std::future::Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>>,
) -> Result<CheckResponse, String> {
    let response = sent.await.map_err(|e| format!("request: {e}"))?;
    let (parts, body) = response.into_parts();
    // A check's answer is small; a large one is cut at 64 KiB.
    let collected = http_body_util::Limited::new(body, 64 * 1024)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    let trailers = collected.trailers().cloned();
    Ok((parts.status.as_u16(), parts.headers, collected.to_bytes(), trailers))
}

/// A gRPC health check passes with `grpc-status: 0` (in the trailers, or the
/// headers of a trailers-only answer) and a `SERVING` status.
fn grpc_verdict(
    status: u16,
    headers: &http::HeaderMap,
    body: &Bytes,
    trailers: Option<&http::HeaderMap>,
) -> Result<(), String> {
    if status != 200 {
        return Err(format!("status {status} to a gRPC health check"));
    }
    let grpc_status = trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .ok_or("no grpc-status in the answer")?;
    if grpc_status != "0" {
        let message = trailers
            .and_then(|t| t.get("grpc-message"))
            .or_else(|| headers.get("grpc-message"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        return Err(format!("grpc-status {grpc_status} {message}").trim_end().to_string());
    }
    match crate::grpc::health_check_status(body) {
        Some(crate::grpc::SERVING) => Ok(()),
        Some(other) => Err(format!(
            "the backend says {} (not SERVING)",
            match other {
                0 => "UNKNOWN",
                2 => "NOT_SERVING",
                3 => "SERVICE_UNKNOWN",
                _ => "an unknown status",
            }
        )),
        None => Err("the health check answer is not a HealthCheckResponse".into()),
    }
}

/// Milliseconds on a process-wide monotonic clock (tokio's, so tests with a
/// paused clock control it).
fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    Instant::now().saturating_duration_since(start).as_millis() as u64
}

/// What the proxy tells passive ejection about one request to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// Records a request's outcome; ejects `backend` when it failed too often in a
/// row and the pool can spare it. Call from inside the runtime (the end of an
/// ejection is a timer).
pub fn record(pool: &str, backends: &BackendList, backend: &Arc<Backend>, outcome: Outcome, config: &OutlierConfig) {
    let state = &backend.state;
    state.observe_outcome(outcome == Outcome::Failure);
    if outcome == Outcome::Success {
        if state.consecutive_failures.load(Ordering::Relaxed) != 0 {
            state.consecutive_failures.store(0, Ordering::Relaxed);
        }
        return;
    }
    state.failures.fetch_add(1, Ordering::Relaxed);
    let failures = state.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
    if config.consecutive_failures == 0 || failures < config.consecutive_failures || state.is_ejected() {
        return;
    }
    let ejected = backends.iter().filter(|b| b.state.is_ejected()).count();
    let allowed = (backends.len() * config.max_ejected_percent as usize / 100).max(1);
    if ejected + 1 > allowed {
        tracing::warn!(%pool, backend = %backend.address, ejected, allowed, "backend keeps failing, but the pool's ejection limit is reached");
        return;
    }
    if !state.set_ejected(true) {
        return;
    }
    state.ejections_total.fetch_add(1, Ordering::Relaxed);
    let generation = state.ejection_generation.fetch_add(1, Ordering::AcqRel) + 1;
    // Checks count afresh: `rise` passes after the ejection end it.
    state.check_successes.store(0, Ordering::Relaxed);
    let count = next_ejection_count(state, config.base_ejection_time, now_ms());
    let time = config
        .base_ejection_time
        .saturating_mul(count)
        .min(config.max_ejection_time);
    tracing::warn!(%pool, backend = %backend.address, failures, ejection = count, duration = ?time, "backend ejected after failing requests in a row");
    let (backend, pool) = (backend.clone(), pool.to_string());
    tokio::spawn(async move {
        tokio::time::sleep(time).await;
        readmit(&pool, &backend, generation, "its ejection time is over");
    });
}

/// The ejection count for an ejection starting at `now`: one more than the
/// last, less one for each `base` the backend spent readmitted since.
fn next_ejection_count(state: &crate::backend::BackendState, base: Duration, now: u64) -> u32 {
    let last = state.ejections.load(Ordering::Relaxed);
    let healthy_for = now.saturating_sub(state.readmitted_ms.load(Ordering::Relaxed));
    let decay = match base.as_millis() as u64 {
        0 => u64::from(last),
        base => healthy_for / base,
    };
    let count = last
        .saturating_sub(u32::try_from(decay).unwrap_or(u32::MAX))
        .saturating_add(1);
    state.ejections.store(count, Ordering::Relaxed);
    count
}

/// Ends the ejection `generation` of `backend`, unless a newer ejection (or
/// an earlier readmission) has replaced it.
fn readmit(pool: &str, backend: &Backend, generation: u64, why: &str) {
    let state = &backend.state;
    let ours = state
        .ejection_generation
        .compare_exchange(generation, generation + 1, Ordering::AcqRel, Ordering::Acquire)
        .is_ok();
    if !ours {
        return;
    }
    state.consecutive_failures.store(0, Ordering::Relaxed);
    state.readmitted_ms.store(now_ms(), Ordering::Relaxed);
    if state.set_ejected(false) {
        tracing::info!(%pool, backend = %backend.address, reason = why, "backend readmitted after ejection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendState;

    fn pool(n: usize) -> BackendList {
        (0..n)
            .map(|i| {
                Arc::new(Backend {
                    id: i as u32,
                    labels: Arc::from(Vec::new()),
                    address: format!("127.0.0.1:{}", 1000 + i),
                    socket: format!("127.0.0.1:{}", 1000 + i).parse().expect("addr"),
                    weight: 1,
                    state: Arc::new(BackendState::default()),
                })
            })
            .collect::<Vec<_>>()
            .into()
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_after_consecutive_failures_then_readmission() {
        let backends = pool(3);
        let config = OutlierConfig {
            consecutive_failures: 3,
            base_ejection_time: Duration::from_secs(10),
            ..OutlierConfig::default()
        };
        for _ in 0..2 {
            record("p", &backends, &backends[0], Outcome::Failure, &config);
        }
        record("p", &backends, &backends[0], Outcome::Success, &config);
        for _ in 0..2 {
            record("p", &backends, &backends[0], Outcome::Failure, &config);
        }
        assert!(!backends[0].state.is_ejected(), "a success resets the count");
        record("p", &backends, &backends[0], Outcome::Failure, &config);
        assert!(backends[0].state.is_ejected());
        assert!(!backends[0].state.is_healthy());
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(backends[0].state.is_healthy(), "readmitted after the ejection time");
    }

    #[tokio::test(start_paused = true)]
    async fn never_ejects_more_than_the_allowed_share() {
        let backends = pool(3);
        let config = OutlierConfig {
            consecutive_failures: 1,
            max_ejected_percent: 50,
            ..OutlierConfig::default()
        };
        for backend in backends.iter() {
            record("p", &backends, backend, Outcome::Failure, &config);
        }
        assert_eq!(
            backends.iter().filter(|b| b.state.is_ejected()).count(),
            1,
            "50% of 3 allows one"
        );
    }

    fn checks(rise: u32, fall: u32) -> HealthConfig {
        HealthConfig {
            check: CheckType::Tcp,
            host: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(100),
            rise,
            fall,
            expect_status: (200, 399),
        }
    }

    fn quick_ejection(readmit_on_check: bool) -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 1,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(300),
            max_ejected_percent: 100,
            readmit_on_check,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn passing_checks_end_an_ejection_and_its_old_timer_never_ends_a_newer_one() {
        let backends = pool(3);
        let (outlier, health) = (quick_ejection(true), checks(2, 2));
        let backend = &backends[0];
        record("p", &backends, backend, Outcome::Failure, &outlier);
        assert!(backend.state.is_ejected());
        record_check("p", backend, &Ok(()), &health, &outlier);
        assert!(backend.state.is_ejected(), "one passing check is not `rise`");
        record_check("p", backend, &Ok(()), &health, &outlier);
        assert!(!backend.state.is_ejected(), "`rise` passing checks end the ejection");
        assert!(backend.state.is_healthy());

        tokio::time::sleep(Duration::from_secs(1)).await;
        record("p", &backends, backend, Outcome::Failure, &outlier);
        assert!(backend.state.is_ejected(), "ejected again (20 s: the second time)");
        // The first ejection's timer fires at 10 s: it must not end the second.
        tokio::time::sleep(Duration::from_millis(9_500)).await;
        assert!(backend.state.is_ejected(), "an old timer ended a newer ejection");
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(!backend.state.is_ejected(), "the second ejection's own timer ends it");
    }

    #[tokio::test(start_paused = true)]
    async fn checks_do_not_end_an_ejection_when_told_not_to() {
        let backends = pool(2);
        let (outlier, health) = (quick_ejection(false), checks(1, 1));
        record("p", &backends, &backends[0], Outcome::Failure, &outlier);
        for _ in 0..5 {
            record_check("p", &backends[0], &Ok(()), &health, &outlier);
        }
        assert!(backends[0].state.is_ejected());
        tokio::time::sleep(Duration::from_millis(10_500)).await;
        assert!(!backends[0].state.is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn repeat_ejections_grow_by_the_base_time_and_decay_while_healthy() {
        let backends = pool(2);
        let outlier = quick_ejection(false);
        let backend = &backends[0];
        let step = Duration::from_millis(500);
        for (nth, lasts) in [(1, 10), (2, 20), (3, 30)] {
            record("p", &backends, backend, Outcome::Failure, &outlier);
            tokio::time::sleep(Duration::from_secs(lasts) - step).await;
            assert!(backend.state.is_ejected(), "ejection {nth} lasts {lasts} s");
            tokio::time::sleep(2 * step).await;
            assert!(!backend.state.is_ejected(), "ejection {nth} ends after {lasts} s");
        }
        // 25 s healthy: two base times, so the count falls from 3 to 1 and the next is the 2nd.
        tokio::time::sleep(Duration::from_secs(25) - step).await;
        record("p", &backends, backend, Outcome::Failure, &outlier);
        tokio::time::sleep(Duration::from_secs(20) - step).await;
        assert!(backend.state.is_ejected());
        tokio::time::sleep(2 * step).await;
        assert!(!backend.state.is_ejected(), "decayed to the second ejection's 20 s");
        // Long healthy: back to the base time.
        tokio::time::sleep(Duration::from_secs(600)).await;
        record("p", &backends, backend, Outcome::Failure, &outlier);
        tokio::time::sleep(Duration::from_secs(10) + step).await;
        assert!(!backend.state.is_ejected(), "fully decayed: the base time again");
    }

    #[tokio::test(start_paused = true)]
    async fn check_streaks_live_with_the_backend_across_a_restart_of_the_checks() {
        // A port nobody listens on: every check fails.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = closed.local_addr().expect("addr");
        drop(closed);
        let backends: BackendList = vec![Arc::new(Backend {
            id: 0,
            labels: Arc::from(Vec::new()),
            address: address.to_string(),
            socket: address,
            weight: 1,
            state: Arc::new(BackendState::default()),
        })]
        .into();
        let (health, outlier) = (checks(2, 3), OutlierConfig::default());
        let runtime = tokio::runtime::Handle::current();
        let way = CheckWay {
            connector: Arc::new(crate::upstream::TcpConnector),
            protocol: UpstreamProtocol::Http1,
            secure: false,
        };
        let first = spawn_checks(&runtime, "p", &backends, &health, &outlier, &way);
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert!(backends[0].state.is_up(), "two failed checks of three");
        // A config reload restarts every check task.
        first.iter().for_each(JoinHandle::abort);
        let _second = spawn_checks(&runtime, "p", &backends, &health, &outlier, &way);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !backends[0].state.is_up(),
            "the third failure counts with the two before the restart"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_ejections_last_longer() {
        let backends = pool(2);
        let config = OutlierConfig {
            consecutive_failures: 1,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(300),
            max_ejected_percent: 100,
            readmit_on_check: true,
        };
        record("p", &backends, &backends[0], Outcome::Failure, &config);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(!backends[0].state.is_ejected());
        record("p", &backends, &backends[0], Outcome::Failure, &config);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(backends[0].state.is_ejected(), "second ejection lasts 20 s");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!backends[0].state.is_ejected());
    }
}
