//! The admin listener's status page in a real browser (Debian's `chromium`,
//! driven by `chromedriver` over WebDriver), and the windowed figures behind
//! its charts (`GET /status/live`).
//!
//! `.ci/run` installs `chromium` and `chromium-driver`; elsewhere set
//! `FULCRUM_CHROMIUM` and `FULCRUM_CHROMEDRIVER` to other paths.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "status-page-token";

fn config(backends: &[DemoBackend]) -> String {
    format!(
        "[server]\nlisten = \"{{listen}}\"\nadmin = \"{{admin}}\"\nadmin_token = \"{TOKEN}\"\n\
         [pools.web]\npolicy = \"round-robin\"\nbackends = {}\n",
        backends_toml(backends, &[])
    )
}

/// An admin call with the token.
async fn admin(fulcrum: &Fulcrum, method: &str, path: &str) -> Value {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", fulcrum.admin.to_string())
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    let reply = send(fulcrum.admin, request).await.expect("admin answers");
    assert_eq!(reply.status, 200, "{method} {path}: {:?}", reply.body);
    serde_json::from_slice(&reply.body).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_figures_count_the_requests_of_each_second() {
    let backends = start_backends(&[0, 0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&config(&backends), &[]);
    // The page shell needs no token; the figures do.
    let page = get(fulcrum.admin, "/").await.expect("page");
    assert_eq!(page.status, 200);
    assert!(String::from_utf8_lossy(&page.body).contains("/status.js"));
    assert_eq!(get(fulcrum.admin, "/status.js").await.expect("script").status, 200);
    assert_eq!(get(fulcrum.admin, "/status/live").await.expect("live").status, 401);

    // 200 requests, then time for the sampler to pass them.
    for _ in 0..200 {
        assert_eq!(get(fulcrum.addr, "/").await.expect("request").status, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let (requests, per_backend) = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let live = admin(&fulcrum, "GET", "/status/live").await;
        assert_eq!(live["interval_seconds"], 1);
        let samples = live["samples"].as_array().cloned().unwrap_or_default();
        // Each sample is a rate over about one second: summed, the requests.
        let mut requests = 0.0;
        let mut per_backend = std::collections::BTreeMap::<String, f64>::new();
        for sample in &samples {
            let pool = &sample["pools"][0];
            assert_eq!(pool["name"], "web");
            requests += pool["requests_per_second"].as_f64().expect("rate");
            for backend in pool["backends"].as_array().expect("backends") {
                *per_backend
                    .entry(backend["address"].as_str().expect("address").to_string())
                    .or_default() += backend["requests_per_second"].as_f64().expect("rate");
            }
            if pool["requests_per_second"].as_f64() > Some(0.0) {
                let p50 = pool["p50_ms"].as_f64().expect("p50 with requests");
                let p99 = pool["p99_ms"].as_f64().expect("p99 with requests");
                assert!(p50 > 0.0 && p50 <= p99, "{pool}");
            }
        }
        if requests >= 190.0 || Instant::now() > deadline {
            break (requests, per_backend);
        }
    };
    // Rates are over the measured seconds, which the timer runs a little
    // late or early: within 5 %.
    assert!((190.0..=210.0).contains(&requests), "{requests} requests counted");
    for backend in &backends {
        let counted = per_backend.get(&backend.addr.to_string()).copied().unwrap_or(0.0);
        assert!((95.0..=105.0).contains(&counted), "{}: {counted}", backend.addr);
    }
}

/// A `chromedriver` process and one browser session, quit when dropped.
struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

fn tool(variable: &str, default: &str) -> String {
    let path = std::env::var(variable).unwrap_or_else(|_| default.to_string());
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: this test needs Debian's chromium and chromium-driver \
         (apt install chromium chromium-driver; .ci/run installs them), or {variable} set"
    );
    path
}

impl Browser {
    async fn start() -> Browser {
        let chromium = tool("FULCRUM_CHROMIUM", "/usr/bin/chromium");
        let chromedriver = tool("FULCRUM_CHROMEDRIVER", "/usr/bin/chromedriver");
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while browser.call("GET", "/status", Value::Null).await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not answer within 20 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The flags the machines' notes give for a closed network, as root.
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1280,1100".into(),
            format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let session = browser
            .call(
                "POST",
                "/session",
                json!({ "capabilities": { "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": { "binary": chromium, "args": args },
                }}}),
            )
            .await
            .expect("a browser session");
        browser.session = session["sessionId"].as_str().expect("session id").to_string();
        browser
    }

    /// One WebDriver command; its `value`, or the error it reported.
    async fn call(&self, method: &str, path: &str, body: Value) -> Result<Value, String> {
        let body = if body.is_null() {
            Bytes::new()
        } else {
            Bytes::from(body.to_string())
        };
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .body(Full::new(body))
            .expect("request");
        let reply = send(self.addr, request).await?;
        let value: Value = serde_json::from_slice(&reply.body).map_err(|e| format!("{e}"))?;
        if reply.status != 200 {
            return Err(format!("{method} {path}: {} {}", reply.status, value));
        }
        Ok(value["value"].clone())
    }

    async fn session(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.call(method, &path, body).await.unwrap_or_else(|e| panic!("{e}"))
    }

    async fn script(&self, script: &str) -> Value {
        self.session("POST", "/execute/sync", json!({ "script": script, "args": [] }))
            .await
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .session("POST", "/element", json!({ "using": "css selector", "value": css }))
            .await;
        found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .expect("an element reference")
            .to_string()
    }

    /// Waits up to 10 s for `script` to return true.
    async fn wait_until(&self, what: &str, script: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.script(script).await != Value::Bool(true) {
            assert!(Instant::now() < deadline, "{what} within 10 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn quit(mut self) {
        let path = format!("/session/{}", self.session);
        let _ = self.call("DELETE", &path, Value::Null).await;
        self.session.clear();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Every chart point in a DOM snapshot (the page's source): the coordinate
/// pairs of each polyline's `points`.
fn chart_points(source: &str) -> usize {
    source
        .split("points=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(|points| points.split_whitespace().count())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_draws_live_charts_and_drains_a_backend_in_chromium() {
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&config(&backends), &[]);
    // Paced traffic (100 requests a second): the browser needs the CPU more
    // than the charts need volume.
    let addr = fulcrum.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let load = tokio::spawn(async move {
        let (mut ok, mut failed) = (0, Vec::new());
        let mut ticks = tokio::time::interval(Duration::from_millis(10));
        for _ in 0..6_000 {
            if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            ticks.tick().await;
            match get(addr, "/").await {
                Ok(reply) if reply.status == 200 => ok += 1,
                other => failed.push(format!("{other:?}")),
            }
        }
        (ok, failed)
    });
    let browser = Browser::start().await;

    browser
        .session("POST", "/url", json!({ "url": format!("http://{}/", fulcrum.admin) }))
        .await;
    // The shell loads without the token, is refused data, and asks for it.
    browser
        .wait_until(
            "the token prompt",
            "return !document.getElementById('token-form').hidden",
        )
        .await;
    let input = browser.element("#token").await;
    browser
        .session("POST", &format!("/element/{input}/value"), json!({ "text": TOKEN }))
        .await;
    let submit = browser.element("#token-form button[type=submit]").await;
    browser
        .session("POST", &format!("/element/{submit}/click"), json!({}))
        .await;

    // Every backend is on the page, with its state.
    for backend in &backends {
        browser
            .wait_until(
                &format!("{} on the page", backend.addr),
                &format!(
                    "const row = document.querySelector('tr[data-backend=\"{}\"]'); \
                     return !!row && row.textContent.includes('up')",
                    backend.addr
                ),
            )
            .await;
    }
    // The charts grow: two DOM snapshots two seconds apart.
    browser
        .wait_until(
            "a first chart point",
            "return [...document.querySelectorAll('polyline')].some(l => l.getAttribute('points'))",
        )
        .await;
    let first = browser.session("GET", "/source", Value::Null).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = browser.session("GET", "/source", Value::Null).await;
    let (first, second) = (
        chart_points(first.as_str().expect("source")),
        chart_points(second.as_str().expect("source")),
    );
    assert!(first > 0 && second > first, "chart points: {first} then {second}");

    // Drain from the page: /status says so, the page shows it, and the
    // backend gets no more requests.
    let drained = backends[1].addr.to_string();
    let button = browser.element(&format!("button[data-address=\"{drained}\"]")).await;
    browser
        .session("POST", &format!("/element/{button}/click"), json!({}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = admin(&fulcrum, "GET", "/status").await;
        let state = status["pools"][0]["backends"]
            .as_array()
            .and_then(|all| all.iter().find(|b| b["address"] == drained.as_str()))
            .map(|b| b["state"].clone());
        if state == Some(json!("drained")) {
            break;
        }
        assert!(Instant::now() < deadline, "drained within 5 s: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    browser
        .wait_until(
            "the page shows the drained backend with an Enable button",
            &format!(
                "const row = document.querySelector('tr[data-backend=\"{drained}\"]'); \
                 return row.querySelector('td.state').textContent === 'drained' \
                   && row.querySelector('button').textContent === 'Enable'"
            ),
        )
        .await;

    // The screenshot, kept for a person to look at.
    let png = browser.session("GET", "/screenshot", Value::Null).await;
    let png = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        png.as_str().expect("base64 PNG"),
    )
    .expect("PNG bytes");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let artifacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let shot = artifacts.join("status-page.png");
    std::fs::write(&shot, &png).expect("write screenshot");
    println!("status page screenshot: {}", shot.display());

    browser.quit().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // What was answered while the page watched: nothing failed.
    let (ok, failed) = load.await.expect("load task");
    assert!(ok > 0 && failed.is_empty(), "{ok} ok, failed: {failed:?}");
}
