//! Backends added, drained, enabled, reweighted and removed through the admin
//! API under load: no request fails, a drained backend gets nothing, and the
//! changes survive a restart through the state file.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A change to the admin API, as a tool sends it.
async fn change(fulcrum: &Fulcrum, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", fulcrum.admin.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let reply = send(fulcrum.admin, request).await.expect("admin answers");
    let value = serde_json::from_slice(&reply.body).unwrap_or(serde_json::Value::Null);
    (reply.status, value)
}

fn served(backend: &DemoBackend) -> u64 {
    backend.stats.requests.load(Ordering::Relaxed)
}

/// Waits up to 3 s for `check` to hold.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "{what} within 3 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backends_change_under_load_without_a_failed_request_and_survive_a_restart() {
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let (a, b, c) = (&backends[0], &backends[1], &backends[2]);
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\nadmin = \"{{admin}}\"\nshutdown_grace = \"5s\"\n\
         [admin]\nstate_file = \"state.json\"\n\
         [pools.web]\npolicy = \"round-robin\"\nbackends = [\"{}\", \"{}\"]\n",
        a.addr, b.addr
    );
    let mut fulcrum = Fulcrum::start(&config, &[]);
    let load = Load::start(fulcrum.addr, 4, "/");
    let c_address = c.addr.to_string();

    // Add: it takes traffic at once (no checks configured).
    let (status, answer) = change(
        &fulcrum,
        "POST",
        "/pools/web/backends",
        &format!("{{\"address\": \"{c_address}\"}}"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["state"], "up");
    eventually("the added backend serves", || served(c) > 20).await;

    // Drain: in-flight requests finish, then nothing more reaches it.
    let (status, answer) = change(
        &fulcrum,
        "POST",
        &format!("/pools/web/backends/{c_address}/drain"),
        "{}",
    )
    .await;
    assert_eq!(
        (status, &answer["state"]),
        (200, &serde_json::json!("drained")),
        "{answer}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let while_drained = served(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(served(c), while_drained, "a drained backend gets no request");
    assert_eq!(fulcrum.backend_status("web", &c_address).await["idle_connections"], 0);

    // Enable: back in rotation.
    let (status, _) = change(
        &fulcrum,
        "POST",
        &format!("/pools/web/backends/{c_address}/enable"),
        "{}",
    )
    .await;
    assert_eq!(status, 200);
    eventually("the enabled backend serves again", || served(c) > while_drained + 20).await;

    // Drain and delete: gone from the pool.
    assert_eq!(
        change(
            &fulcrum,
            "POST",
            &format!("/pools/web/backends/{c_address}/drain"),
            "{}"
        )
        .await
        .0,
        200
    );
    let (status, answer) = change(&fulcrum, "DELETE", &format!("/pools/web/backends/{c_address}"), "{}").await;
    assert_eq!(status, 200, "{answer}");
    let status = fulcrum.status().await;
    assert!(!status.to_string().contains(&c_address), "removed: {status}");

    // Weight: the split follows within a second.
    let a_address = a.addr.to_string();
    let (status, answer) = change(
        &fulcrum,
        "PUT",
        &format!("/pools/web/backends/{a_address}"),
        "{\"weight\": 3}",
    )
    .await;
    assert_eq!((status, &answer["weight"]), (200, &serde_json::json!(3)), "{answer}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (a0, b0) = (served(a), served(b));
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (da, db) = ((served(a) - a0) as f64, (served(b) - b0) as f64);
    assert!(
        db > 20.0 && (2.5..3.5).contains(&(da / db)),
        "3:1 after the weight change: {da} vs {db}"
    );

    let (ok, failed, errors) = load.finish().await;
    assert!(ok > 200, "load ran: {ok}");
    assert_eq!(failed, 0, "no request fails because of a runtime change: {errors:?}");

    // Bad input: 4xx naming the field.
    let (status, answer) = change(
        &fulcrum,
        "POST",
        "/pools/nope/backends",
        "{\"address\": \"127.0.0.1:1\"}",
    )
    .await;
    assert_eq!(
        (status, &answer["field"]),
        (404, &serde_json::json!("pool")),
        "{answer}"
    );
    let (status, answer) = change(
        &fulcrum,
        "POST",
        "/pools/web/backends",
        "{\"address\": \"not an address\"}",
    )
    .await;
    assert_eq!(
        (status, &answer["field"]),
        (400, &serde_json::json!("address")),
        "{answer}"
    );
    let (status, answer) = change(&fulcrum, "POST", "/pools/web/backends", "{\"adress\": 1}").await;
    assert_eq!(
        (status, &answer["field"]),
        (400, &serde_json::json!("body")),
        "{answer}"
    );
    let (status, answer) = change(&fulcrum, "POST", "/pools/web/backends/127.0.0.1:9/drain", "{}").await;
    assert_eq!(
        (status, &answer["field"]),
        (404, &serde_json::json!("address")),
        "{answer}"
    );
    let (status, answer) = change(
        &fulcrum,
        "PUT",
        &format!("/pools/web/backends/{a_address}"),
        "{\"weight\": 0}",
    )
    .await;
    assert_eq!(
        (status, &answer["field"]),
        (400, &serde_json::json!("weight")),
        "{answer}"
    );

    // A restart keeps a drained backend drained, and the weight.
    let b_address = b.addr.to_string();
    assert_eq!(
        change(
            &fulcrum,
            "POST",
            &format!("/pools/web/backends/{b_address}/drain"),
            "{}"
        )
        .await
        .0,
        200
    );
    fulcrum.restart();
    let b_after = fulcrum.backend_status("web", &b_address).await;
    assert_eq!(b_after["state"], "drained", "{b_after}");
    assert_eq!(fulcrum.backend_status("web", &a_address).await["weight"], 3);
    let before = served(b);
    for _ in 0..20 {
        assert_eq!(get(fulcrum.addr, "/").await.expect("answer").status, 200);
    }
    assert_eq!(served(b), before, "still drained after the restart");
}
