//! Request filters through the real balancer: answers in place of the
//! backend, header edits both ways, a pool override, metadata read by the
//! balancer, the body prefix, faults by `on_fault`, and the sample filters
//! (rate-limit, canary). The `probe` test plugin (tests/plugins/probe) is a
//! filter and a balancer whose every act is triggered by the request.

mod common;

use bytes::Bytes;
use common::{Fulcrum, Reply, start_backends, wasm};
use http_body_util::{BodyExt, Full};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A request to `path` with `headers`, and its answer's headers kept.
async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (Reply, http::HeaderMap) {
    let mut builder = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "test.local");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(Bytes::copy_from_slice(body))).expect("request");
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("answered in time")
        .expect("answered");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let backend = headers
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.into_body().collect().await.expect("body").to_bytes();
    (Reply { status, backend, body }, headers)
}

fn probe_config(backends: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "{{listen}}"

[plugins]
dir = "plugins.d"
call_timeout = "200ms"

[pools.web]
backends = {backends}

[filters.probe]
plugin = "probe"
config = {{ label = "from-config" }}

[[routes]]
pool = "web"
filters = ["probe"]
body_prefix = "16KiB"
{extra}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_answers_in_place_of_the_backend() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let config = probe_config(&format!("[\"{}\"]", backends[0].addr), "");
    let fulcrum = Fulcrum::start(&config, &[("probe.wasm", &wasm("probe.wasm"))]);

    let (denied, _) = request(fulcrum.addr, "GET", "/deny/this", &[], b"").await;
    assert_eq!(denied.status, 403);
    assert_eq!(&denied.body[..], b"denied by the probe filter\n");
    let (limited, headers) = request(fulcrum.addr, "GET", "/limited", &[], b"").await;
    assert_eq!(limited.status, 429);
    assert_eq!(headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("2"));
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("text/plain; charset=utf-8")
    );
    let (redirected, headers) = request(fulcrum.addr, "GET", "/redirect", &[], b"").await;
    assert_eq!(redirected.status, 302);
    assert_eq!(
        headers.get("location").and_then(|v| v.to_str().ok()),
        Some("/elsewhere")
    );
    assert_eq!(
        backends[0].stats.requests.load(Ordering::Relaxed),
        0,
        "the backend never saw a request a filter answered"
    );
    let (passed, _) = request(fulcrum.addr, "GET", "/", &[], b"").await;
    assert_eq!(passed.status, 200);
    assert_eq!(backends[0].stats.requests.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_edits_reach_the_backend_and_the_client() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let config = probe_config(&format!("[\"{}\"]", backends[0].addr), "");
    let fulcrum = Fulcrum::start(&config, &[("probe.wasm", &wasm("probe.wasm"))]);
    let (reply, headers) = request(
        fulcrum.addr,
        "GET",
        "/headers",
        &[("x-remove-me", "secret"), ("x-added", "by-client")],
        b"",
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = String::from_utf8_lossy(&reply.body).to_string();
    assert!(seen.contains("x-probe: seen\n"), "{seen}");
    assert!(
        seen.contains("x-probe-label: from-config\n"),
        "the filter's config: {seen}"
    );
    assert!(!seen.contains("x-remove-me"), "removed: {seen}");
    assert!(
        seen.contains("x-added: by-client\n") && seen.contains("x-added: by-probe\n"),
        "appended: {seen}"
    );
    // The response edits, made in on-response, which read the response.
    assert_eq!(headers.get("x-probe-status").and_then(|v| v.to_str().ok()), Some("200"));
    assert_eq!(
        headers.get("x-probe-saw").and_then(|v| v.to_str().ok()),
        Some("backend-1")
    );

    // The same edits for an HTTP/2 client (prior knowledge), whose response
    // head is a header map rather than written bytes.
    let output = std::process::Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "-D", "-", "--max-time", "10"])
        .args(["-H", "host: test.local", "-H", "x-remove-me: secret"])
        .arg(format!("http://{}/headers", fulcrum.addr))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&output.stdout).to_ascii_lowercase();
    assert!(text.starts_with("http/2 200"), "{text}");
    assert!(text.contains("x-probe-status: 200\r\n"), "{text}");
    assert!(text.contains("x-probe-saw: backend-1\r\n"), "{text}");
    assert!(
        text.contains("x-probe: seen\n") && !text.contains("x-remove-me"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_overrides_the_pool_and_its_metadata_reaches_the_balancer() {
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let extra = format!(
        r#"
[pools.other]
backends = ["{}"]

[pools.steered]
policy = "probe"
backends = ["{}", "{}"]
"#,
        backends[0].addr, backends[1].addr, backends[2].addr
    );
    let config =
        probe_config(&format!("[\"{}\"]", backends[0].addr), "").replace("[[routes]]", &format!("{extra}\n[[routes]]"));
    let fulcrum = Fulcrum::start(&config, &[("probe.wasm", &wasm("probe.wasm"))]);

    let (plain, _) = request(fulcrum.addr, "GET", "/", &[], b"").await;
    assert_eq!(plain.backend.as_deref(), Some("backend-1"));
    let (overridden, _) = request(fulcrum.addr, "GET", "/", &[("x-pool", "steered")], b"").await;
    assert_eq!(overridden.status, 200);
    assert_eq!(
        overridden.backend.as_deref(),
        Some("backend-2"),
        "the steered pool's first backend"
    );
    // The filter's metadata `backend = 1` chooses the steered pool's second backend (id 1).
    for _ in 0..5 {
        let (steered, _) = request(
            fulcrum.addr,
            "GET",
            "/",
            &[("x-pool", "steered"), ("x-to-backend", "1")],
            b"",
        )
        .await;
        assert_eq!(steered.backend.as_deref(), Some("backend-3"));
    }
    // A pool that does not exist: a fault, and on_fault = "allow" lets the request on.
    let (unknown, _) = request(fulcrum.addr, "GET", "/", &[("x-pool", "nowhere")], b"").await;
    assert_eq!(unknown.status, 200);
    assert!(fulcrum.wait_for_log("pool `nowhere`, which does not exist", Duration::from_secs(5)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_prefix_is_read_and_the_body_still_arrives_whole() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let config = probe_config(&format!("[\"{}\"]", backends[0].addr), "");
    let fulcrum = Fulcrum::start(&config, &[("probe.wasm", &wasm("probe.wasm"))]);

    let json = br#"{"model": "llama-3", "prompt": "hello"}"#;
    let (reply, _) = request(
        fulcrum.addr,
        "POST",
        "/headers",
        &[("content-type", "application/json")],
        json,
    )
    .await;
    let seen = String::from_utf8_lossy(&reply.body).to_string();
    assert!(seen.contains("x-model: llama-3\n"), "{seen}");

    // A body longer than the prefix, whole at the backend: its length comes back.
    let mut big = br#"{"model": "big", "pad": ""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', 100_000));
    big.extend_from_slice(b"\"}");
    let (reply, _) = request(fulcrum.addr, "POST", "/upload", &[], &big).await;
    assert_eq!(reply.status, 200);
    assert_eq!(String::from_utf8_lossy(&reply.body), format!("{}\n", big.len()));
    assert_eq!(backends[0].stats.body_bytes.load(Ordering::Relaxed), big.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulting_filter_passes_or_refuses_by_on_fault() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let config = format!(
        r#"
[server]
listen = "{{listen}}"
admin = "{{admin}}"

[plugins]
dir = "plugins.d"
call_timeout = "200ms"

[pools.web]
backends = ["{addr}"]

[filters.open]
plugin = "probe"

[filters.closed]
plugin = "probe"
on_fault = "deny"

[[routes]]
path_prefix = "/trap/open"
pool = "web"
filters = ["open"]

[[routes]]
path_prefix = "/trap/closed"
pool = "web"
filters = ["closed"]
"#,
        addr = backends[0].addr
    );
    let fulcrum = Fulcrum::start(&config, &[("probe.wasm", &wasm("probe.wasm"))]);
    let (open, _) = request(fulcrum.addr, "GET", "/trap/open", &[], b"").await;
    assert_eq!(open.status, 200, "on_fault = allow: the request goes on");
    let (closed, _) = request(fulcrum.addr, "GET", "/trap/closed", &[], b"").await;
    assert_eq!(closed.status, 503, "on_fault = deny");
    let body = String::from_utf8_lossy(&closed.body).to_string();
    assert!(body.contains("filter `closed`") && body.contains("trap"), "{body}");
    assert!(!fulcrum.log().contains("panicked"), "{}", fulcrum.log());

    // Faults in a row (of every use of the plugin) quarantine it, for a while.
    for _ in 2..fulcrum::plugin::QUARANTINE_AFTER {
        request(fulcrum.addr, "GET", "/trap/closed", &[], b"").await;
    }
    let (closed, _) = request(fulcrum.addr, "GET", "/trap/closed", &[], b"").await;
    let body = String::from_utf8_lossy(&closed.body).to_string();
    assert!(closed.status == 503 && body.contains("quarantined"), "{body}");
    let status = fulcrum.status().await;
    let probe = status["plugins"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["name"] == "probe"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(probe["quarantined"], true, "{status}");
    let left = probe["quarantine_left_ms"].as_u64().unwrap_or(0);
    assert!(left > 0 && left <= 10_000, "{probe}");

    // An operator lifts it: the plugin runs again (and traps again here).
    let reset = |name: &str| {
        http::Request::post(format!("/plugins/{name}/reset"))
            .header("host", fulcrum.admin.to_string())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    let lifted = common::send(fulcrum.admin, reset("probe")).await.expect("reset");
    let text = String::from_utf8_lossy(&lifted.body).to_string();
    assert!(
        lifted.status == 200 && text.contains("\"was_quarantined\":true"),
        "{text}"
    );
    let (closed, _) = request(fulcrum.addr, "GET", "/trap/closed", &[], b"").await;
    let body = String::from_utf8_lossy(&closed.body).to_string();
    assert!(closed.status == 503 && body.contains("trap"), "{body}");
    let unknown = common::send(fulcrum.admin, reset("nope")).await.expect("answer");
    assert_eq!(unknown.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_filter_sends_those_who_ask_to_the_canary_pool() {
    let backends = start_backends(&[0, 0], &[]).await.expect("backends");
    let config = format!(
        r#"
[server]
listen = "{{listen}}"

[plugins]
dir = "plugins.d"
call_timeout = "200ms"

[pools.stable]
backends = ["{}"]

[pools.canary]
backends = ["{}"]

[filters.canary]
plugin = "canary"
config = {{ pool = "canary", percent = 0, header = "x-canary", cookie = "canary" }}

[[routes]]
pool = "stable"
filters = ["canary"]
"#,
        backends[0].addr, backends[1].addr
    );
    let fulcrum = Fulcrum::start(&config, &[("canary.wasm", &wasm("canary.wasm"))]);
    let (plain, _) = request(fulcrum.addr, "GET", "/", &[], b"").await;
    assert_eq!(plain.backend.as_deref(), Some("backend-1"));
    let (by_header, _) = request(fulcrum.addr, "GET", "/", &[("x-canary", "always")], b"").await;
    assert_eq!(by_header.backend.as_deref(), Some("backend-2"));
    let (by_cookie, _) = request(fulcrum.addr, "GET", "/", &[("cookie", "a=b; canary=1")], b"").await;
    assert_eq!(by_cookie.backend.as_deref(), Some("backend-2"));
    let (refused, _) = request(fulcrum.addr, "GET", "/", &[("x-canary", "never")], b"").await;
    assert_eq!(refused.backend.as_deref(), Some("backend-1"));
}

/// One pool with `backend`, behind one filter `limit` of `plugin` with
/// `config` (inline TOML) on every request; `server` adds to `[server]`.
fn one_filter_config(backend: std::net::SocketAddr, plugin: &str, config: &str, server: &str) -> String {
    format!(
        r#"
[server]
listen = "{{listen}}"
{server}

[plugins]
dir = "plugins.d"
call_timeout = "200ms"

[pools.web]
backends = ["{backend}"]

[filters.limit]
plugin = "{plugin}"
config = {config}

[[routes]]
pool = "web"
filters = ["limit"]
"#
    )
}

/// Sends `count` GETs from each of `clients` concurrent clients (a new
/// connection each, so they land on every worker); the statuses seen, in
/// the order they came back.
async fn burst(addr: std::net::SocketAddr, clients: usize, count: usize) -> Vec<u16> {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let mut statuses = Vec::with_capacity(count);
                for _ in 0..count {
                    statuses.push(common::get(addr, "/").await.map_or(0, |r| r.status));
                }
                statuses
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("client task"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rate_limit_admits_the_burst_then_the_rate_across_workers() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let config = one_filter_config(
        backends[0].addr,
        "rate-limit",
        "{ rate = 100, burst = 20 }",
        "workers = 4",
    );
    let fulcrum = Fulcrum::start(&config, &[("rate-limit.wasm", &wasm("rate_limit.wasm"))]);
    // After an idle period the bucket is full: a burst of 80 at once gets
    // exactly the burst, plus what refilled while it was sent (100 a second).
    let started = Instant::now();
    let statuses = burst(fulcrum.addr, 8, 10).await;
    let took = started.elapsed();
    let admitted = statuses.iter().filter(|&&s| s == 200).count();
    let refilled = (took.as_secs_f64() * 100.0).floor() as usize;
    assert!(
        admitted >= 20 && admitted <= 20 + refilled,
        "admitted {admitted} of 80 in {took:?} (burst 20 + at most {refilled} refilled)"
    );
    assert!(statuses.iter().all(|&s| s == 200 || s == 429), "{statuses:?}");

    // Then the rate: 8 clients for 10 s, each paced to ~250 requests a second.
    let limit_for = Duration::from_secs(10);
    let started = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let addr = fulcrum.addr;
            tokio::spawn(async move {
                let mut admitted = 0usize;
                let mut sent = 0usize;
                while started.elapsed() < limit_for {
                    if common::get(addr, "/").await.is_ok_and(|r| r.status == 200) {
                        admitted += 1;
                    }
                    sent += 1;
                    tokio::time::sleep(Duration::from_millis(4)).await;
                }
                (admitted, sent)
            })
        })
        .collect();
    let (mut admitted, mut sent) = (0, 0);
    for task in tasks {
        let (a, s) = task.await.expect("client");
        admitted += a;
        sent += s;
    }
    let seconds = started.elapsed().as_secs_f64();
    let rate = admitted as f64 / seconds;
    assert!(
        sent as f64 > 3.0 * 100.0 * seconds,
        "the clients sent too little to test the limit: {sent}"
    );
    assert!(
        (90.0..=110.0).contains(&rate),
        "{admitted} admitted in {seconds:.1} s: {rate:.1}/s"
    );
}

/// `bytes` with a custom section appended: the same component, another
/// version (another digest) for the plugin directory.
fn another_version(bytes: &[u8]) -> Vec<u8> {
    let name = b"fulcrum-test-version";
    let payload = b"2";
    let mut out = bytes.to_vec();
    out.push(0); // custom section
    out.push((1 + name.len() + payload.len()) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(payload);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_state_survives_a_hot_swap_of_its_plugin() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let config = one_filter_config(backends[0].addr, "limit", "{ rate = 0.01, burst = 3 }", "");
    let original = std::fs::read(wasm("rate_limit.wasm")).expect("rate_limit.wasm");
    let fulcrum = Fulcrum::start(&config, &[("limit.wasm", &wasm("rate_limit.wasm"))]);
    let statuses = burst(fulcrum.addr, 1, 5).await;
    assert_eq!(statuses, vec![200, 200, 200, 429, 429]);
    // A new version of the plugin: the bucket is the plugin's, not the version's.
    common::install_file(&fulcrum.plugin_dir().join("limit.wasm"), &another_version(&original));
    // Loaded at start, then again: wait for the second time.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fulcrum.log().matches("plugin loaded plugin=\"limit\"").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the new version never loaded:\n{}",
            fulcrum.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let statuses = burst(fulcrum.addr, 1, 3).await;
    assert_eq!(statuses, vec![429, 429, 429], "the empty bucket was kept");
}

/// Two filter tables of one rate-limit plugin, with different limits, draw
/// from buckets of their own; a reload that tightens a limit applies at once
/// to a client already seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_of_other_tables_and_a_reloaded_limit_have_their_own_buckets() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let config = |api: &str| {
        format!(
            r#"
[server]
listen = "{{listen}}"

[plugins]
dir = "plugins.d"

[pools.web]
backends = ["{}"]

[filters.login]
plugin = "rate-limit"
config = {{ rate = 0.01, burst = 1, header = "x-k" }}

[filters.api]
plugin = "rate-limit"
config = {api}

[[routes]]
path_prefix = "/login"
pool = "web"
filters = ["login"]

[[routes]]
path_prefix = "/api"
pool = "web"
filters = ["api"]
"#,
            backends[0].addr
        )
    };
    let fulcrum = Fulcrum::start(
        &config(r#"{ rate = 100, burst = 50, header = "x-k" }"#),
        &[("rate-limit.wasm", &wasm("rate_limit.wasm"))],
    );
    let statuses = |path: &'static str, n: usize| {
        let addr = fulcrum.addr;
        async move {
            let mut all = Vec::new();
            for _ in 0..n {
                all.push(request(addr, "GET", path, &[("x-k", "k1")], b"").await.0.status);
            }
            all
        }
    };
    assert_eq!(statuses("/login", 1).await, [200]);
    assert_eq!(statuses("/api", 5).await, [200; 5], "the api's own bucket");
    assert_eq!(statuses("/login", 1).await, [429], "the login's bucket is spent");

    // The api's limit tightened by a reload: k1 gets the new burst, at once.
    let text = std::fs::read_to_string(fulcrum.config_path()).expect("config");
    let tightened = text.replace(
        r#"{ rate = 100, burst = 50, header = "x-k" }"#,
        r#"{ rate = 0.01, burst = 2, header = "x-k" }"#,
    );
    assert_ne!(text, tightened);
    std::fs::write(fulcrum.config_path(), tightened).expect("write config");
    assert!(
        fulcrum.wait_for_log("config reloaded", Duration::from_secs(10)),
        "{}",
        fulcrum.log()
    );
    assert_eq!(statuses("/api", 3).await, [200, 200, 429]);
}
