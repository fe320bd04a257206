//! Plugins written in Python (componentize-py) and JavaScript
//! (componentize-js), built by examples/build.sh into examples/out/ (the
//! README's test command runs it first), loaded from the plugin directory and
//! routing real requests: a Python balancer, a JavaScript balancer, and a
//! Python filter.

mod common;

use bytes::Bytes;
use common::{Fulcrum, send, start_backends, tally};
use http_body_util::Full;
use std::path::PathBuf;

/// A component examples/build.sh made; the message says how to make it.
fn built(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/out")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run examples/build.sh (the README's test command does)",
        path.display()
    );
    path
}

fn config(backends: &str, pool: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "{{listen}}"

[plugins]
dir = "plugins.d"
call_timeout = "200ms"

[plugins.limits.py-policy]
memory_limit = "64MiB"

[plugins.limits.py-filter]
memory_limit = "64MiB"

[pools.web]
backends = {backends}
{pool}
{extra}
"#
    )
}

async fn sequential(addr: std::net::SocketAddr, n: usize) -> Vec<common::Reply> {
    let mut replies = Vec::with_capacity(n);
    for _ in 0..n {
        replies.push(common::get(addr, "/").await.expect("answered"));
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_policy_routes_requests() {
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let list = common::backends_toml(&backends, &[]);
    let fulcrum = Fulcrum::start(
        &config(&list, "policy = \"py-policy\"", ""),
        &[("py-policy.wasm", &built("python-policy"))],
    );
    // Least loaded: on an idle pool every backend ties, and ties take turns.
    let replies = sequential(fulcrum.addr, 30).await;
    assert!(replies.iter().all(|r| r.status == 200), "{replies:?}");
    let counts = tally(&replies);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{counts:?}"
    );
    assert!(
        !fulcrum.log().contains("fallback"),
        "the plugin decided every request:\n{}",
        fulcrum.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_policy_routes_requests_by_weight() {
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let list = common::backends_toml(&backends, &[1, 2, 1]);
    let fulcrum = Fulcrum::start(
        &config(&list, "policy = \"js-policy\"", ""),
        &[("js-policy.wasm", &built("js-policy"))],
    );
    let replies = sequential(fulcrum.addr, 40).await;
    let counts = tally(&replies);
    assert_eq!(counts.get("backend-1"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("backend-2"), Some(&20), "{counts:?}");
    assert_eq!(counts.get("backend-3"), Some(&10), "{counts:?}");
    assert!(!fulcrum.log().contains("fallback"), "{}", fulcrum.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_filter_answers_and_edits() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let list = common::backends_toml(&backends, &[]);
    let extra = r#"
[filters.screen]
plugin = "py-filter"
config = { deny = ["bot"] }

[[routes]]
pool = "web"
filters = ["screen"]
"#;
    let fulcrum = Fulcrum::start(
        &config(&list, "", extra),
        &[("py-filter.wasm", &built("python-filter"))],
    );
    let request = |agent: &str| {
        http::Request::get("/headers")
            .header("host", "test.local")
            .header("user-agent", agent)
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    let denied = send(fulcrum.addr, request("SomeBot/2.1")).await.expect("answered");
    assert_eq!(denied.status, 403);
    assert_eq!(
        String::from_utf8_lossy(&denied.body),
        "user agents with 'bot' are not served here\n"
    );
    let passed = send(fulcrum.addr, request("curl/8.0")).await.expect("answered");
    assert_eq!(passed.status, 200);
    let seen = String::from_utf8_lossy(&passed.body).to_string();
    assert!(seen.contains("x-screened-by: python\n"), "{seen}");
    assert_eq!(backends[0].stats.requests.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// `fulcrum_plugin_instances_started_total{plugin, on}` from /metrics.
async fn started(admin: std::net::SocketAddr, plugin: &str, on: &str) -> f64 {
    let reply = common::get(admin, "/metrics").await.expect("scrape");
    let text = String::from_utf8(reply.body.to_vec()).expect("text");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("metrics parse");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "fulcrum_plugin_instances_started_total")
        .filter(|s| s.labels.get("plugin") == Some(plugin) && s.labels.get("on") == Some(on))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_components_start_off_the_workers_at_start_and_on_a_hot_swap() {
    let backends = start_backends(&[0, 0], &[]).await.expect("backends");
    let list = common::backends_toml(&backends, &[]);
    let text = config(&list, "policy = \"py-policy\"", "").replace(
        "listen = \"{listen}\"",
        "listen = \"{listen}\"\nadmin = \"{admin}\"\nworkers = 2",
    );
    let fulcrum = Fulcrum::start(&text, &[("py-policy.wasm", &built("python-policy"))]);
    for _ in 0..20 {
        assert_eq!(common::get(fulcrum.addr, "/").await.expect("answered").status, 200);
    }
    assert_eq!(
        started(fulcrum.admin, "py-policy", "worker").await,
        0.0,
        "no worker started one"
    );
    let before = started(fulcrum.admin, "py-policy", "background").await;
    assert!(before >= 2.0, "one per worker, in the background: {before}");

    // A new version (here the JavaScript policy under the same name): its
    // instances start in the background too, before the workers need them.
    common::install_file(
        &fulcrum.plugin_dir().join("py-policy.wasm"),
        &std::fs::read(built("js-policy")).expect("js-policy"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while started(fulcrum.admin, "py-policy", "background").await < before + 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new version's instances never started:\n{}",
            fulcrum.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for _ in 0..20 {
        assert_eq!(common::get(fulcrum.addr, "/").await.expect("answered").status, 200);
    }
    assert_eq!(
        started(fulcrum.admin, "py-policy", "worker").await,
        0.0,
        "{}",
        fulcrum.log()
    );
}
