//! Balancing through the real binary: the sample policies' shares, and the
//! proxy's basic contract (headers, error codes).

mod common;

use common::*;
use std::time::Duration;

fn config(policy: &str, backends: &str) -> String {
    format!("[server]\nlisten = \"{{listen}}\"\n[pools.web]\npolicy = \"{policy}\"\nbackends = {backends}\n")
}

async fn sequential(addr: std::net::SocketAddr, n: usize) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(n);
    for _ in 0..n {
        replies.push(get(addr, "/").await.expect("request through the balancer"));
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_splits_300_requests_exactly() {
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&config("round-robin", &backends_toml(&backends, &[])), &[]);
    let counts = tally(&sequential(fulcrum.addr, 300).await);
    let expected: std::collections::BTreeMap<String, usize> = ["backend-1", "backend-2", "backend-3"]
        .iter()
        .map(|b| (b.to_string(), 100))
        .collect();
    assert_eq!(counts, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_follows_weights() {
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&config("round-robin", &backends_toml(&backends, &[1, 2, 3])), &[]);
    let counts = tally(&sequential(fulcrum.addr, 300).await);
    assert_eq!(counts.get("backend-1"), Some(&50), "{counts:?}");
    assert_eq!(counts.get("backend-2"), Some(&100), "{counts:?}");
    assert_eq!(counts.get("backend-3"), Some(&150), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_rotates_when_idle_and_spares_a_slow_backend() {
    let slow = Duration::from_millis(150);
    let backends = start_backends(&[0, 0, 0], &[Duration::ZERO, Duration::ZERO, slow])
        .await
        .expect("backends");
    let fulcrum = Fulcrum::start(&config("least-conn", &backends_toml(&backends, &[])), &[]);

    // Idle pool: every backend ties at 0 in flight, and ties take turns.
    let counts = tally(&sequential(fulcrum.addr, 30).await);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{counts:?}"
    );

    assert_slow_backends_spared(fulcrum.addr, &["backend-3"], &["backend-1", "backend-2"]).await;
}

/// The in-flight counts of ids 0 to 3 come with each decision (prefetched);
/// those of ids 4 and up are read. A slow backend on each side must be spared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_spares_slow_backends_within_and_past_the_prefetched_four() {
    let slow = Duration::from_millis(150);
    let delays = [
        Duration::ZERO,
        slow,
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
        slow,
    ];
    let backends = start_backends(&[0; 6], &delays).await.expect("backends");
    let fulcrum = Fulcrum::start(&config("least-conn", &backends_toml(&backends, &[])), &[]);
    assert_slow_backends_spared(
        fulcrum.addr,
        &["backend-2", "backend-6"],
        &["backend-1", "backend-3", "backend-4", "backend-5"],
    )
    .await;
}

/// 12 clients, 25 requests each: a slow backend holds its requests longer
/// and must get clearly fewer of them than any fast one.
async fn assert_slow_backends_spared(addr: std::net::SocketAddr, slow: &[&str], fast: &[&str]) {
    let mut clients = Vec::new();
    for _ in 0..12 {
        clients.push(tokio::spawn(async move { sequential(addr, 25).await }));
    }
    let mut replies = Vec::new();
    for client in clients {
        replies.extend(client.await.expect("client task"));
    }
    assert_eq!(replies.len(), 300);
    let counts = tally(&replies);
    let share = |name: &&str| counts.get(*name).copied().unwrap_or(0);
    let fast_share = fast.iter().map(share).min().unwrap_or(0);
    for name in slow {
        let slow_share = share(name);
        assert!(
            slow_share * 3 < fast_share,
            "slow {name} got {slow_share}, fast ones at least {fast_share}: {counts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_added_and_hop_by_hop_removed() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&config("round-robin", &backends_toml(&backends, &[])), &[]);
    let request = http::Request::get("/headers?x=1")
        .header("host", "shop.example")
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "secret")
        .header("x-keep-me", "yes")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let reply = send(fulcrum.addr, request).await.expect("reply");
    let head = String::from_utf8_lossy(&reply.body);
    assert!(head.starts_with("GET /headers?x=1 HTTP/1.1"), "{head}");
    assert!(head.contains("host: shop.example\n"), "{head}");
    assert!(head.contains("x-forwarded-for: 127.0.0.1\n"), "{head}");
    assert!(head.contains("x-forwarded-proto: http\n"), "{head}");
    assert!(head.contains("x-forwarded-host: shop.example\n"), "{head}");
    assert!(head.contains("x-keep-me: yes\n"), "{head}");
    assert!(!head.contains("x-drop-me"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_backends_give_502_and_unmatched_routes_404() {
    let dead = format!("[\"127.0.0.1:{}\"]", free_port());
    let text = format!(
        "[server]\nlisten = \"{{listen}}\"\n[pools.dead]\nbackends = {dead}\nretries = 0\n[[routes]]\nhost = \"dead.example\"\npool = \"dead\"\n"
    );
    let fulcrum = Fulcrum::start(&text, &[]);
    let request = |host: &str| {
        http::Request::get("/")
            .header("host", host)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request")
    };
    let reply = send(fulcrum.addr, request("dead.example")).await.expect("reply");
    assert_eq!(reply.status, 502, "{:?}", reply.body);
    let reply = send(fulcrum.addr, request("other.example")).await.expect("reply");
    assert_eq!(reply.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_pick_pools_by_host_and_path() {
    let backends = start_backends(&[0, 0], &[]).await.expect("backends");
    let text = format!(
        "[server]\nlisten = \"{{listen}}\"\n\
         [pools.site]\nbackends = [\"{}\"]\n\
         [pools.api]\nbackends = [\"{}\"]\n\
         [[routes]]\npool = \"site\"\n\
         [[routes]]\nhost = \"api.example.com\"\npath_prefix = \"/api\"\npool = \"api\"\n",
        backends[0].addr, backends[1].addr
    );
    let fulcrum = Fulcrum::start(&text, &[]);
    let request = |host: &str, path: &str| {
        http::Request::get(path)
            .header("host", host)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request")
    };
    let to = |reply: Reply| reply.backend.unwrap_or_default();
    assert_eq!(
        to(send(fulcrum.addr, request("api.example.com", "/api/v1"))
            .await
            .expect("reply")),
        "backend-2"
    );
    assert_eq!(
        to(send(fulcrum.addr, request("api.example.com:80", "/index"))
            .await
            .expect("reply")),
        "backend-1"
    );
    assert_eq!(
        to(send(fulcrum.addr, request("www.example.com", "/api/v1"))
            .await
            .expect("reply")),
        "backend-1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_served() {
    let backends = start_backends(&[0, 0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&config("round-robin", &backends_toml(&backends, &[])), &[]);
    let stream = tokio::net::TcpStream::connect(fulcrum.addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake (prior knowledge)");
    tokio::spawn(connection);
    let mut seen = Vec::new();
    for _ in 0..4 {
        let request = http::Request::get("http://h2.example/headers")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.version(), http::Version::HTTP_2);
        let backend = response.headers()["x-backend"].to_str().expect("ascii").to_owned();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .expect("body")
            .to_bytes();
        let head = String::from_utf8_lossy(&body).into_owned();
        assert!(
            head.starts_with("GET /headers HTTP/1.1"),
            "sent upstream as HTTP/1.1 in origin form: {head}"
        );
        assert!(
            head.contains("host: h2.example\n"),
            "the :authority becomes Host: {head}"
        );
        seen.push(backend);
    }
    assert_eq!(seen, ["backend-1", "backend-2", "backend-1", "backend-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_a_4xx_and_the_balancer_stays_up() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&config("round-robin", &backends_toml(&backends, &[])), &[]);
    let garbage: [&[u8]; 4] = [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nHost: a\r\nBad Header Name: x\r\n\r\n",
        b"GET /\x01\x02 HTTP/1.1\r\nHost: a\r\n\r\n",
    ];
    for request in garbage {
        let mut stream = tokio::net::TcpStream::connect(fulcrum.addr).await.expect("connect");
        stream.write_all(request).await.expect("write");
        let mut answer = vec![0u8; 1024];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut answer))
            .await
            .expect("answered in time")
            .expect("read");
        let status = String::from_utf8_lossy(&answer[..n]);
        assert!(
            status.starts_with("HTTP/1.1 4"),
            "{:?} → {status:?}",
            String::from_utf8_lossy(request)
        );
    }
    assert_eq!(
        backends[0].stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "nothing malformed was forwarded"
    );
    assert_eq!(get(fulcrum.addr, "/").await.expect("still serving").status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_are_bounded_per_backend_for_the_whole_process() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let text = format!(
        "[server]\nlisten = \"{{listen}}\"\nadmin = \"{{admin}}\"\nworkers = 2\n\
         [pools.web]\nbackends = {}\nmax_idle_per_backend = 4\n",
        backends_toml(&backends, &[])
    );
    let fulcrum = Fulcrum::start(&text, &[]);
    // 40 requests at once: 40 backend connections, spread over both workers.
    let addr = fulcrum.addr;
    let replies = futures_util::future::join_all((0..40).map(|_| get(addr, "/slow/200"))).await;
    assert!(
        replies.iter().all(|r| r.as_ref().is_ok_and(|r| r.status == 200)),
        "{replies:?}"
    );
    let address = backends[0].addr.to_string();
    let idle = fulcrum.backend_status("web", &address).await["idle_connections"].as_u64();
    assert!(
        idle.is_some_and(|n| (1..=4).contains(&n)),
        "idle kept: {idle:?} (at most 4 for the process)"
    );
}
