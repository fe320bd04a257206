//! What "the client's address" is: `X-Forwarded-For` believed from trusted
//! proxies only, the PROXY protocol (v1, v2, v2 LOCAL) on a listener, and a
//! PROXY header sent to backends. Checked where it shows: the backend's
//! headers, the access log, and a plugin's choice (header-hash falls back to
//! the client's IP).

mod common;

use common::*;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `prefix` (a PROXY header, or nothing) and one request with `headers`
/// on a fresh connection; the response as text, or `None` when the
/// connection was closed without one.
async fn raw_request(addr: SocketAddr, prefix: &[u8], headers: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut bytes = prefix.to_vec();
    bytes.extend_from_slice(
        format!("GET /headers HTTP/1.1\r\nHost: app.example\r\n{headers}Connection: close\r\n\r\n").as_bytes(),
    );
    stream.write_all(&bytes).await.expect("send");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("answered or closed within 10 s")
        .ok()?;
    (!answer.is_empty()).then(|| String::from_utf8_lossy(&answer).into_owned())
}

/// The value of header `name` the backend saw (the demo backend's `/headers`).
fn seen_header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    answer.lines().find_map(|line| line.strip_prefix(&format!("{name}: ")))
}

/// The backend that answered (`x-backend`).
fn answered_by(answer: &str) -> String {
    answer
        .lines()
        .find_map(|line| line.strip_prefix("x-backend: "))
        .expect("x-backend")
        .trim()
        .to_string()
}

fn config(backends: &[DemoBackend], server_extra: &str) -> String {
    format!(
        "[server]\nlisten = \"{{listen}}\"\n{server_extra}\n\
         [access_log]\npath = \"access.log\"\n\
         [plugins]\ndir = \"plugins.d\"\n\
         [pools.web]\npolicy = \"header-hash\"\nbackends = {}\n",
        backends_toml(backends, &[])
    )
}

fn logged_clients(fulcrum: &Fulcrum, lines: usize) -> Vec<String> {
    let path = fulcrum.dir.path().join("access.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let clients: Vec<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|l| l["client"].as_str().unwrap_or_default().to_string())
            .collect();
        if clients.len() >= lines || std::time::Instant::now() > deadline {
            return clients;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_believed_from_trusted_proxies_only() {
    let backends = start_backends(&[0, 0, 0, 0], &[]).await.expect("backends");
    let plugin = [("header-hash.wasm", wasm("header_hash.wasm"))];
    let plugins: Vec<(&str, &std::path::Path)> = plugin.iter().map(|(n, p)| (*n, p.as_path())).collect();

    // The test connects from 127.0.0.1: trusted here.
    let trusting = Fulcrum::start(
        &config(&backends, "trusted_proxies = [\"127.0.0.0/8\"]\nforwarded = true"),
        &plugins,
    );
    let answer = raw_request(
        trusting.addr,
        b"",
        "X-Forwarded-For: 198.51.100.66, 203.0.113.9\r\nX-Forwarded-Proto: https\r\nForwarded: for=203.0.113.9\r\n",
    )
    .await
    .expect("answer");
    let forwarded: Vec<&str> = answer.lines().filter_map(|l| l.strip_prefix("forwarded: ")).collect();
    assert_eq!(
        forwarded,
        ["for=203.0.113.9", "for=127.0.0.1;host=\"app.example\";proto=http"],
        "the Forwarded chain goes on with this hop: {answer}"
    );
    assert_eq!(
        seen_header(&answer, "x-forwarded-for"),
        Some("198.51.100.66, 203.0.113.9, 127.0.0.1"),
        "the chain goes on: {answer}"
    );
    assert_eq!(seen_header(&answer, "x-forwarded-proto"), Some("https"), "{answer}");
    assert_eq!(
        logged_clients(&trusting, 1),
        ["203.0.113.9"],
        "the log has the real client"
    );
    // The plugin hashes the real client: the spoofed part changes nothing,
    // and different real clients spread over the backends (the TCP peer is
    // always 127.0.0.1, which would send them all to one).
    let mut chosen = BTreeSet::new();
    for spoofed in 0..5 {
        let answer = raw_request(
            trusting.addr,
            b"",
            &format!("X-Forwarded-For: 10.0.0.{spoofed}, 203.0.113.9\r\n"),
        )
        .await
        .expect("answer");
        chosen.insert(answered_by(&answer));
    }
    assert_eq!(chosen.len(), 1, "one real client, one backend: {chosen:?}");
    let mut spread = BTreeSet::new();
    for real in 1..=24 {
        let answer = raw_request(trusting.addr, b"", &format!("X-Forwarded-For: 203.0.113.{real}\r\n"))
            .await
            .expect("answer");
        spread.insert(answered_by(&answer));
    }
    assert!(spread.len() >= 3, "real clients spread over the backends: {spread:?}");

    // Trusting someone else: the client's headers are replaced.
    let wary = Fulcrum::start(&config(&backends, "trusted_proxies = [\"10.0.0.0/8\"]"), &plugins);
    let answer = raw_request(
        wary.addr,
        b"",
        "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nForwarded: for=203.0.113.9\r\n",
    )
    .await
    .expect("answer");
    assert_eq!(seen_header(&answer, "x-forwarded-for"), Some("127.0.0.1"), "{answer}");
    assert_eq!(seen_header(&answer, "x-forwarded-proto"), Some("http"), "{answer}");
    assert_eq!(seen_header(&answer, "forwarded"), None, "{answer}");
    assert_eq!(logged_clients(&wary, 1), ["127.0.0.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_protocol_names_the_client_on_a_listener() {
    let backends = start_backends(&[0, 0, 0, 0], &[]).await.expect("backends");
    let plugin = [("header-hash.wasm", wasm("header_hash.wasm"))];
    let plugins: Vec<(&str, &std::path::Path)> = plugin.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let fulcrum = Fulcrum::start(&config(&backends, "proxy_protocol = true"), &plugins);
    let local: SocketAddr = "192.0.2.1:80".parse().expect("addr");

    let client: SocketAddr = "203.0.113.7:40000".parse().expect("addr");
    let v1 = fulcrum::proxy_protocol::encode(fulcrum::proxy_protocol::Version::V1, client, local);
    let answer = raw_request(fulcrum.addr, &v1, "").await.expect("answer");
    assert_eq!(seen_header(&answer, "x-forwarded-for"), Some("203.0.113.7"), "{answer}");

    let client6: SocketAddr = "[2001:db8::7]:40000".parse().expect("addr");
    let local6: SocketAddr = "[2001:db8::1]:80".parse().expect("addr");
    let v2 = fulcrum::proxy_protocol::encode(fulcrum::proxy_protocol::Version::V2, client6, local6);
    let answer = raw_request(fulcrum.addr, &v2, "").await.expect("answer");
    assert_eq!(seen_header(&answer, "x-forwarded-for"), Some("2001:db8::7"), "{answer}");

    // v2 LOCAL (the balancer's own health check): the socket's address.
    let mut local_header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local_header.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    let answer = raw_request(fulcrum.addr, &local_header, "").await.expect("answer");
    assert_eq!(seen_header(&answer, "x-forwarded-for"), Some("127.0.0.1"), "{answer}");

    // No header at all: the connection is closed, nothing reaches a backend.
    let served_before: u64 = backends
        .iter()
        .map(|b| b.stats.requests.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert_eq!(raw_request(fulcrum.addr, b"", "").await, None);
    let served_after: u64 = backends
        .iter()
        .map(|b| b.stats.requests.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert_eq!(served_before, served_after);

    assert_eq!(
        logged_clients(&fulcrum, 3),
        ["203.0.113.7", "2001:db8::7", "127.0.0.1"],
        "the log has the clients the headers named"
    );
    // The plugin sees them too: different named clients spread.
    let mut spread = BTreeSet::new();
    for n in 1..=24 {
        let client: SocketAddr = format!("203.0.113.{n}:40000").parse().expect("addr");
        let header = fulcrum::proxy_protocol::encode(fulcrum::proxy_protocol::Version::V1, client, local);
        spread.insert(answered_by(
            &raw_request(fulcrum.addr, &header, "").await.expect("answer"),
        ));
    }
    assert!(spread.len() >= 3, "{spread:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_sends_each_backend_connection_the_client_it_carries() {
    // A backend that reads the PROXY header and answers every request on the
    // connection, keep-alive, with the client the header named: a connection
    // reused for another client would answer with the wrong one.
    let backend = RawBackend::start(|mut stream: tokio::net::TcpStream| async move {
        let mut buf = vec![0u8; 4096];
        let mut got: Vec<u8> = Vec::new();
        let mut named: Option<String> = None;
        loop {
            if named.is_none() && got.len() >= 16 {
                if !got.starts_with(b"\r\n\r\n\0\r\nQUIT\n") || got[13] != 0x11 {
                    return;
                }
                let length = 16 + usize::from(u16::from_be_bytes([got[14], got[15]]));
                if got.len() < length {
                    continue;
                }
                named = Some(format!("{}.{}.{}.{}", got[16], got[17], got[18], got[19]));
                got.drain(..length);
            }
            if let (Some(client), Some(end)) = (&named, got.windows(4).position(|w| w == b"\r\n\r\n")) {
                got.drain(..end + 4);
                let body = format!("{client}\n");
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\ntrusted_proxies = [\"127.0.0.1\"]\n\
         [pools.web]\nbackends = [\"{}\"]\nsend_proxy_protocol = \"v2\"\n",
        backend.addr
    );
    let fulcrum = Fulcrum::start(&config, &[]);
    // Two clients on one keep-alive connection each, taking turns: every
    // request reaches the backend on a connection naming its own client.
    let mut senders = Vec::new();
    for _ in 0..2 {
        senders.push(
            http1_sender::<http_body_util::Full<bytes::Bytes>>(fulcrum.addr)
                .await
                .expect("connect"),
        );
    }
    for round in 0..3 {
        for (i, sender) in senders.iter_mut().enumerate() {
            let request = http::Request::get("/")
                .header("host", "app.example")
                .header("x-forwarded-for", format!("203.0.113.{}", 10 + i))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("request");
            sender.ready().await.expect("ready");
            let response = sender.send_request(request).await.expect("answer");
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .expect("body")
                .to_bytes();
            assert_eq!(
                String::from_utf8_lossy(&body).trim(),
                format!("203.0.113.{}", 10 + i),
                "round {round}, client {i}"
            );
        }
    }
}
