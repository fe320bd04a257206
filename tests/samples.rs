//! The sample balancers through the real balancer, loaded from the plugin
//! directory: Maglev's stickiness and minimal disruption when a backend is
//! removed by a config reload (stable backend ids), peak EWMA sparing a slow
//! backend, and `fulcrum:plugin@0.1.0` components (committed fixtures, built
//! before 0.2.0) still routing.

mod common;

use bytes::Bytes;
use common::{Fulcrum, send, start_backends, tally, wasm};
use http_body_util::Full;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

fn config(policy: &str, policy_config: &str, backends: &[String]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        r#"
[server]
listen = "{{listen}}"
workers = 2

[plugins]
dir = "plugins.d"
call_timeout = "2s"

[pools.web]
policy = "{policy}"
policy_config = {policy_config}
backends = [{}]
"#,
        list.join(", ")
    )
}

/// GET / with `x-user: KEY`; the backend that answered.
async fn served(addr: std::net::SocketAddr, key: &str) -> String {
    let request = http::Request::get("/")
        .header("host", "test.local")
        .header("x-user", key)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let reply = send(addr, request).await.expect("answered");
    assert_eq!(reply.status, 200);
    reply.backend.expect("x-backend")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_keeps_keys_and_moves_only_the_removed_backends_keys() {
    let backends = start_backends(&[0, 0, 0, 0], &[]).await.expect("backends");
    let addrs: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    let fulcrum = Fulcrum::start(
        &config("maglev", r#"{ header = "x-user" }"#, &addrs),
        &[("maglev.wasm", &wasm("maglev.wasm"))],
    );

    // The same key keeps its backend, over 1,000 requests.
    let first = served(fulcrum.addr, "sticky-user").await;
    for _ in 0..999 {
        assert_eq!(served(fulcrum.addr, "sticky-user").await, first);
    }

    let keys: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
    let mut before = BTreeMap::new();
    for key in &keys {
        before.insert(key.clone(), served(fulcrum.addr, key).await);
    }
    // Remove the last backend by a config reload: the others keep their ids.
    let text = config("maglev", r#"{ header = "x-user" }"#, &addrs[..3]).replace("{listen}", &fulcrum.addr.to_string());
    std::fs::write(fulcrum.config_path(), text).expect("rewrite config");
    assert!(fulcrum.wait_for_log("config reloaded", Duration::from_secs(10)));

    let removed = backends[3].name.clone();
    let (mut moved, mut others, mut others_moved) = (0, 0, 0);
    for key in &keys {
        let now = served(fulcrum.addr, key).await;
        assert_ne!(now, removed, "no key goes to the removed backend");
        let was = &before[key];
        if *was != now {
            moved += 1;
        }
        if *was != removed {
            others += 1;
            if *was != now {
                others_moved += 1;
            }
        }
    }
    assert!((200..=300).contains(&moved), "25% ± 5% of keys move: {moved} of 1000");
    assert!(
        others_moved * 100 <= others,
        "at most 1% of the other backends' keys move: {others_moved} of {others}\n{}",
        fulcrum.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_spares_a_slow_backend() {
    let backends = start_backends(&[0, 0, 0], &[Duration::ZERO, Duration::ZERO, Duration::from_millis(80)])
        .await
        .expect("backends");
    let addrs: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    let fulcrum = Fulcrum::start(
        &config("peak-ewma", "{}", &addrs),
        &[("peak-ewma.wasm", &wasm("peak_ewma.wasm"))],
    );
    // 6 clients, 40 requests each: once measured, the slow backend's cost
    // keeps it out of most draws.
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let addr = fulcrum.addr;
            tokio::spawn(async move {
                let mut replies = Vec::new();
                for _ in 0..40 {
                    replies.push(common::get(addr, "/").await.expect("answered"));
                }
                replies
            })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.extend(task.await.expect("client"));
    }
    let counts = tally(&replies);
    let slow = counts.get("backend-3").copied().unwrap_or(0);
    assert!(
        slow * 10 < replies.len(),
        "the slow backend got {slow} of {}: {counts:?}",
        replies.len()
    );
    assert!(
        counts.contains_key("backend-1") && counts.contains_key("backend-2"),
        "{counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_built_for_0_1_0_keep_routing() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plugin-0.1.0");
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let addrs: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    let text = config("old-least-conn", "{}", &addrs).replace(
        "[pools.web]",
        &format!(
            "[pools.sticky]\npolicy = \"old-header-hash\"\npolicy_config = {{ header = \"x-user\" }}\nbackends = [\"{}\", \"{}\"]\n\n[[routes]]\npath_prefix = \"/sticky\"\npool = \"sticky\"\n\n[[routes]]\npool = \"web\"\n\n[pools.web]",
            addrs[0], addrs[1]
        ),
    );
    let fulcrum = Fulcrum::start(
        &text,
        &[
            ("old-least-conn.wasm", &fixtures.join("least_conn.wasm")),
            ("old-header-hash.wasm", &fixtures.join("header_hash.wasm")),
        ],
    );
    // least-conn 0.1.0 on an idle pool takes turns.
    let mut replies = Vec::new();
    for _ in 0..30 {
        replies.push(common::get(fulcrum.addr, "/").await.expect("answered"));
    }
    let counts = tally(&replies);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{counts:?}"
    );
    // header-hash 0.1.0 reads the request: the same user, the same backend.
    let sticky = |user: &'static str| {
        let addr = fulcrum.addr;
        async move {
            let request = http::Request::get("/sticky")
                .header("host", "test.local")
                .header("x-user", user)
                .body(Full::new(Bytes::new()))
                .expect("request");
            send(addr, request).await.expect("answered").backend.expect("x-backend")
        }
    };
    let first = sticky("alice").await;
    for _ in 0..20 {
        assert_eq!(sticky("alice").await, first);
    }
    assert!(!fulcrum.log().contains("fault"), "{}", fulcrum.log());
}
