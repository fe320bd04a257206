//! Traffic management through the real binary: per-backend limits and the
//! pool's queue, circuit breakers, the retry policy and its budget, slow
//! start and panic mode. Backends are hyper servers in the test that count
//! what reaches them (requests, and the most in flight at once).

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a test backend does, changeable while it runs.
struct Behaviour {
    /// The status of every answer (but `/health`).
    status: AtomicU16,
    /// The status of `/health`.
    health: AtomicU16,
    /// How long it waits before answering, in ms.
    delay_ms: AtomicU64,
}

/// A backend that counts what reaches it.
struct Backend {
    addr: SocketAddr,
    name: String,
    behaviour: Arc<Behaviour>,
    requests: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    async fn start(name: &str) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let behaviour = Arc::new(Behaviour {
            status: AtomicU16::new(200),
            health: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
        });
        let (requests, in_flight, most) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let name_owned = name.to_string();
        let (b, r, f, m) = (behaviour.clone(), requests.clone(), in_flight.clone(), most.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (b, r, f, m, name) = (b.clone(), r.clone(), f.clone(), m.clone(), name_owned.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                        let (b, r, f, m, name) = (b.clone(), r.clone(), f.clone(), m.clone(), name.clone());
                        async move {
                            if request.uri().path() == "/health" {
                                let status = b.health.load(Ordering::Relaxed);
                                return Ok::<_, Infallible>(
                                    http::Response::builder()
                                        .status(status)
                                        .body(Full::new(Bytes::new()))
                                        .expect("response"),
                                );
                            }
                            r.fetch_add(1, Ordering::Relaxed);
                            let now = f.fetch_add(1, Ordering::Relaxed) + 1;
                            m.fetch_max(now, Ordering::Relaxed);
                            let delay = b.delay_ms.load(Ordering::Relaxed);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            f.fetch_sub(1, Ordering::Relaxed);
                            Ok(http::Response::builder()
                                .status(b.status.load(Ordering::Relaxed))
                                .header("x-backend", name)
                                .body(Full::new(Bytes::from_static(b"ok\n")))
                                .expect("response"))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Backend {
            addr,
            name: name.to_string(),
            behaviour,
            requests,
            in_flight,
            most_in_flight: most,
            task,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

fn pool(backends: &[&Backend], settings: &str) -> String {
    let list = backends
        .iter()
        .map(|b| format!("\"{}\"", b.addr))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[server]\nlisten = \"{{listen}}\"\nadmin = \"{{admin}}\"\n[access_log]\npath = \"access.log\"\n\
         [pools.web]\nbackends = [{list}]\n{settings}\n"
    )
}

/// Terminations of the access log's lines, counted.
fn terminations(fulcrum: &Fulcrum) -> std::collections::BTreeMap<String, usize> {
    let text = std::fs::read_to_string(fulcrum.dir.path().join("access.log")).unwrap_or_default();
    let mut counts = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Ok(line) = serde_json::from_str::<serde_json::Value>(line) {
            *counts
                .entry(line["termination"].as_str().unwrap_or_default().to_string())
                .or_insert(0) += 1;
        }
    }
    counts
}

/// `n` GETs at once; their replies.
async fn burst(addr: SocketAddr, n: usize) -> Vec<Reply> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { get(addr, "/").await }))
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.expect("task").expect("reply"));
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_queues_the_rest_and_refuses_past_the_queue() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    for backend in [&a, &b] {
        backend.behaviour.delay_ms.store(500, Ordering::Relaxed);
    }
    let fulcrum = Fulcrum::start(
        &pool(&[&a, &b], "max_in_flight = 2\nmax_queue = 20\nqueue_timeout = \"5s\""),
        &[],
    );
    // 10 clients at once, room for 4: the rest wait, and all are served.
    let started = Instant::now();
    let replies = burst(fulcrum.addr, 10).await;
    assert!(replies.iter().all(|r| r.status == 200), "{replies:?}");
    assert!(
        a.most_in_flight.load(Ordering::Relaxed) <= 2,
        "backend a: never more than 2 at once"
    );
    assert!(
        b.most_in_flight.load(Ordering::Relaxed) <= 2,
        "backend b: never more than 2 at once"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "10 requests in slots of 4 × 500 ms take three rounds: {:?}",
        started.elapsed()
    );
    drop(fulcrum);

    // A queue of 2: of 10 at once, 4 are served at once, 2 wait, 4 are refused.
    let fulcrum = Fulcrum::start(
        &pool(&[&a, &b], "max_in_flight = 2\nmax_queue = 2\nqueue_timeout = \"5s\""),
        &[],
    );
    let replies = burst(fulcrum.addr, 10).await;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let refused: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    assert_eq!((ok, refused.len()), (6, 4), "{replies:?}");
    assert!(String::from_utf8_lossy(&refused[0].body).contains("queue is full"));
    let counted = wait_for_terminations(&fulcrum, "queue_full", 4).await;
    assert_eq!(counted, 4, "{:?}", terminations(&fulcrum));
    drop(fulcrum);

    // A queue_timeout shorter than a request: those that wait give up with 503.
    let fulcrum = Fulcrum::start(
        &pool(
            &[&a, &b],
            "max_in_flight = 2\nmax_queue = 20\nqueue_timeout = \"200ms\"",
        ),
        &[],
    );
    let replies = burst(fulcrum.addr, 8).await;
    let timed_out = replies.iter().filter(|r| r.status == 503).count();
    assert_eq!(timed_out, 4, "4 served, 4 waited too long: {replies:?}");
    assert_eq!(wait_for_terminations(&fulcrum, "queue_timeout", 4).await, 4);
}

async fn wait_for_terminations(fulcrum: &Fulcrum, which: &str, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = terminations(fulcrum).get(which).copied().unwrap_or(0);
        if seen >= want || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_circuit_breaker_trips_under_a_burst_and_resets() {
    let a = Backend::start("a").await;
    a.behaviour.delay_ms.store(300, Ordering::Relaxed);
    let fulcrum = Fulcrum::start(
        &pool(
            &[&a],
            "max_in_flight = 1\nmax_queue = 100\n[pools.web.circuit_breaker]\nmax_pending = 3",
        ),
        &[],
    );
    let replies = burst(fulcrum.addr, 12).await;
    let refused = replies.iter().filter(|r| r.status == 503).count();
    assert!(
        refused >= 5,
        "over 1 in flight and 3 pending, the rest are refused: {replies:?}"
    );
    assert!(
        replies
            .iter()
            .filter(|r| r.status == 503)
            .all(|r| String::from_utf8_lossy(&r.body).contains("max_pending")),
        "{replies:?}"
    );
    // Reset: once the burst is over, requests pass again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        assert_eq!(get(fulcrum.addr, "/").await.expect("reply").status, 200);
    }
    // A second burst trips it again.
    let replies = burst(fulcrum.addr, 12).await;
    assert!(replies.iter().any(|r| r.status == 503));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get(fulcrum.addr, "/").await.expect("reply").status, 200);
    let log = fulcrum.log();
    assert_eq!(
        log.matches("circuit breaker open").count(),
        2,
        "logged once per trip, not per request:\n{log}"
    );
    assert!(log.matches("circuit breaker closed").count() >= 1, "{log}");
    let metrics = get(fulcrum.admin, "/metrics").await.expect("metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("fulcrum_circuit_breaker_trips_total{pool=\"web\",threshold=\"max_pending\"} 2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_5xx_goes_elsewhere_within_the_budget_and_per_try_timeout_moves_on() {
    let bad = Backend::start("bad").await;
    let good = Backend::start("good").await;
    bad.behaviour.status.store(503, Ordering::Relaxed);
    let fulcrum = Fulcrum::start(
        &pool(
            &[&bad, &good],
            "retry_on = [\"5xx\"]\nretries = 1\nretry_backoff = \"1ms\"\n[pools.web.outlier]\nconsecutive_failures = 0",
        ),
        &[],
    );
    for _ in 0..10 {
        let reply = get(fulcrum.addr, "/").await.expect("reply");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.backend.as_deref(), Some("good"));
    }
    assert!(bad.requests() >= 3, "the failing backend was tried");
    drop(fulcrum);

    // Every backend failing, 40 clients at once: retries at most the budget
    // (20 % of active requests, at least 3 at once), counted at the backends.
    good.behaviour.status.store(503, Ordering::Relaxed);
    for backend in [&bad, &good] {
        backend.behaviour.delay_ms.store(100, Ordering::Relaxed);
    }
    let before = bad.requests() + good.requests();
    let fulcrum = Fulcrum::start(
        &pool(
            &[&bad, &good],
            "retry_on = [\"5xx\"]\nretries = 1\nretry_backoff = \"1ms\"\nretry_budget = 20\nretry_budget_min = 3\n\
             [pools.web.outlier]\nconsecutive_failures = 0",
        ),
        &[],
    );
    let replies = burst(fulcrum.addr, 40).await;
    assert!(replies.iter().all(|r| r.status == 503));
    let tries = bad.requests() + good.requests() - before;
    let retries = tries - 40;
    assert!(
        retries <= 40 * 20 / 100 + 3,
        "{retries} retries for 40 requests: the budget bounds them"
    );
    let metrics = get(fulcrum.admin, "/metrics").await.expect("metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    let exhausted = text
        .lines()
        .find_map(|l| l.strip_prefix("fulcrum_retry_budget_exhausted_total{pool=\"web\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(exhausted > 0, "retries refused by the budget are counted:\n{text}");
    drop(fulcrum);

    // A hanging backend: per_try_timeout (200 ms) moves the request on long
    // before response_timeout (10 s).
    bad.behaviour.status.store(200, Ordering::Relaxed);
    bad.behaviour.delay_ms.store(10_000, Ordering::Relaxed);
    good.behaviour.status.store(200, Ordering::Relaxed);
    good.behaviour.delay_ms.store(0, Ordering::Relaxed);
    let fulcrum = Fulcrum::start(
        &pool(
            &[&bad, &good],
            "policy = \"round-robin\"\nretries = 1\nresponse_timeout = \"10s\"\nper_try_timeout = \"200ms\"\n\
             retry_backoff = \"1ms\"\n[pools.web.outlier]\nconsecutive_failures = 0",
        ),
        &[],
    );
    for _ in 0..4 {
        let started = Instant::now();
        let reply = get(fulcrum.addr, "/").await.expect("reply");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.backend.as_deref(), Some("good"));
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }
    assert!(
        bad.in_flight.load(Ordering::Relaxed) >= 1,
        "the hanging backend got its share"
    );
}

/// Share of `backend` among `n` sequential requests.
async fn share_of(addr: SocketAddr, backend: &str, n: usize) -> f64 {
    let mut hits = 0;
    for _ in 0..n {
        let reply = get(addr, "/").await.expect("reply");
        hits += usize::from(reply.backend.as_deref() == Some(backend));
    }
    hits as f64 / n as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readmitted_backend_ramps_up_over_its_slow_start() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let fulcrum = Fulcrum::start(
        &pool(
            &[&a, &b],
            "policy = \"round-robin\"\nslow_start = \"4s\"\n\
             [pools.web.health]\npath = \"/health\"\ninterval = \"100ms\"\nrise = 1\nfall = 1",
        ),
        &[],
    );
    // b goes down, then comes back: it is readmitted with a slow start.
    b.behaviour.health.store(503, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(5);
    while fulcrum.backend_status("web", &b.addr.to_string()).await["healthy"] != false {
        assert!(Instant::now() < deadline, "b never went down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.behaviour.health.store(200, Ordering::Relaxed);
    while fulcrum.backend_status("web", &b.addr.to_string()).await["healthy"] != true {
        assert!(Instant::now() < deadline, "b never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let readmitted = Instant::now();
    // Windows over the ramp: b's share grows (round-robin, a plugin, follows
    // the weights it is given: the ramped ones).
    let mut shares = Vec::new();
    let mut weights = Vec::new();
    for window in 1..=5 {
        let until = readmitted + Duration::from_millis(1000 * window);
        weights.push(fulcrum.backend_status("web", &b.addr.to_string()).await["effective_weight"].as_u64());
        shares.push(share_of(fulcrum.addr, &b.name, 40).await);
        if let Some(wait) = until.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
    assert!(
        shares[0] < 0.3,
        "early in the ramp b gets little: {shares:?} (weights {weights:?})"
    );
    assert!(shares[4] > 0.4, "after the ramp b gets its half: {shares:?}");
    assert!(
        shares[0] < shares[2] && shares[2] <= shares[4] + 0.05,
        "rising: {shares:?}"
    );
    let weights: Vec<u64> = weights.into_iter().flatten().collect();
    assert!(weights.windows(2).all(|w| w[0] <= w[1]), "{weights:?}");
    assert!(weights[0] < 50 && *weights.last().unwrap_or(&0) >= 90, "{weights:?}");
    let _ = &a;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_spreads_over_all_backends_when_too_few_are_healthy() {
    let backends = [
        Backend::start("b0").await,
        Backend::start("b1").await,
        Backend::start("b2").await,
        Backend::start("b3").await,
    ];
    for b in &backends[1..] {
        b.behaviour.health.store(503, Ordering::Relaxed);
    }
    let refs: Vec<&Backend> = backends.iter().collect();
    let checks = "[pools.web.health]\npath = \"/health\"\ninterval = \"100ms\"\nrise = 1\nfall = 1";
    for (threshold, want_all) in [(50, true), (0, false)] {
        let fulcrum = Fulcrum::start(
            &pool(
                &refs,
                &format!("policy = \"round-robin\"\npanic_threshold = {threshold}\n{checks}"),
            ),
            &[],
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = fulcrum.status().await;
            let healthy = status["pools"][0]["backends"]
                .as_array()
                .map_or(0, |list| list.iter().filter(|b| b["healthy"] == true).count());
            if healthy == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "three backends should be down: {status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let reply = get(fulcrum.addr, "/").await.expect("reply");
            assert_eq!(reply.status, 200);
            seen.insert(reply.backend.unwrap_or_default());
        }
        let status = fulcrum.status().await;
        if want_all {
            assert_eq!(seen.len(), 4, "panic: all four serve: {seen:?}");
            assert_eq!(status["pools"][0]["panic"], true, "{status}");
            assert!(fulcrum.log().contains("panic mode"), "logged");
        } else {
            assert_eq!(seen.len(), 1, "no panic mode: only the healthy one: {seen:?}");
            assert_eq!(status["pools"][0]["panic"], false, "{status}");
        }
    }
    let _ = Mutex::new(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_see_each_backends_limit_and_whether_it_is_full() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    a.behaviour.delay_ms.store(1500, Ordering::Relaxed);
    let config = pool(&[&a, &b], "policy = \"probe\"\nmax_in_flight = 1")
        .replace(
            &format!("backends = [\"{}\", \"{}\"]", a.addr, b.addr),
            &format!(
                "backends = [\"{}\", {{ address = \"{}\", max_in_flight = 3 }}]",
                a.addr, b.addr
            ),
        )
        .replace(
            "[pools.web]",
            "[plugins]\ndir = \"plugins.d\"\ncall_timeout = \"200ms\"\n[pools.web]",
        );
    let fulcrum = Fulcrum::start(&config, &[("probe.wasm", &wasm("probe.wasm"))]);
    // The probe balancer sends everything to the first backend (id 0): one
    // slow request fills it.
    let addr = fulcrum.addr;
    let slow = tokio::spawn(async move { get(addr, "/").await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.in_flight.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let request = http::Request::get("/")
        .header("host", "test.local")
        .header("x-report", "1")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let reply = send(fulcrum.addr, request).await.expect("answered");
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.backend.as_deref(),
        Some("b"),
        "the full backend's request went to the one with room"
    );
    assert!(
        fulcrum.wait_for_log(
            "backend 0: weight 100, max-in-flight 1 (pushed 1), full 1, in-flight 1 (read 1)",
            Duration::from_secs(5)
        ),
        "{}",
        fulcrum.log()
    );
    assert!(
        fulcrum.wait_for_log(
            "backend 1: weight 100, max-in-flight 3 (pushed 3), full 0, in-flight 0 (read 0)",
            Duration::from_secs(5)
        ),
        "{}",
        fulcrum.log()
    );
    assert_eq!(slow.await.expect("task").expect("reply").status, 200);
}
