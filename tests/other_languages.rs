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
