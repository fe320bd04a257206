//! The HTTP/1.1 edge through the real binary: keep-alive and pipelining,
//! bodies in every framing both ways, HTTP/1.0 and HEAD, `Expect:
//! 100-continue`, the request head as the backend gets it, and requests whose
//! framing could smuggle a second request.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(backends: &str) -> String {
    format!("[server]\nlisten = \"{{listen}}\"\n[pools.web]\nbackends = {backends}\n")
}

/// Writes `request` and reads until the balancer closes the connection (5 s at most).
async fn exchange_raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    read_to_close(&mut stream).await
}

async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the balancer closed the connection in time")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&config(&backends_toml(&backends, &[])), &[]);
    let answer = exchange_raw(
        fulcrum.addr,
        b"GET /headers HTTP/1.1\r\nHost: a\r\n\r\nGET /slow/50 HTTP/1.1\r\nHost: a\r\n\r\n\
          GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answer.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{answer}");
    let headers_at = answer.find("GET /headers HTTP/1.1").expect("the first answer");
    let last_at = answer
        .rfind("connection: close\r\n")
        .expect("the last answer says it closes");
    assert!(headers_at < last_at, "{answer}");
    assert_eq!(backends[0].stats.requests.load(Ordering::Relaxed), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_reaches_the_backend_rewritten_and_otherwise_whole() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&config(&backends_toml(&backends, &[])), &[]);
    // More fields than the head keeps inline, an absolute-form target with a
    // fragment, a header the Connection header names, and a claimed earlier proxy.
    let mut request = String::from(
        "GET http://shop.example:8080/headers?page=2#top HTTP/1.1\r\nHost: other.example\r\n\
         Connection: close, X-Hop\r\nX-Hop: secret\r\nX-Forwarded-For: 203.0.113.9\r\n",
    );
    for i in 0..24 {
        request.push_str(&format!("X-Field-{i}: value {i}\r\n"));
    }
    request.push_str("\r\n");
    let answer = exchange_raw(fulcrum.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    let seen = &answer[answer.find("\r\n\r\n").expect("a head") + 4..];
    assert!(seen.starts_with("GET /headers?page=2 HTTP/1.1\n"), "{seen}");
    assert!(
        seen.contains("host: shop.example:8080\n"),
        "the target's authority wins: {seen}"
    );
    assert!(!seen.to_lowercase().contains("x-hop"), "named by Connection: {seen}");
    // No trusted proxies by default: the client's own X-Forwarded-For is
    // replaced, not appended to (tests/client_address.rs has the trusted case).
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(!seen.contains("203.0.113.9"), "{seen}");
    assert!(seen.contains("x-forwarded-host: shop.example:8080\n"), "{seen}");
    let fields: Vec<&str> = seen.lines().filter(|l| l.starts_with("x-field-")).collect();
    let expected: Vec<String> = (0..24).map(|i| format!("x-field-{i}: value {i}")).collect();
    assert_eq!(fields, expected, "every field, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_of_every_framing_pass_both_ways() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    // A backend that answers without a length and closes, and one that answers chunked with a trailer.
    let unframed = RawBackend::start(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nX-Backend: unframed\r\n\r\nthe body runs until the connection closes")
            .await;
    })
    .await;
    let chunked = RawBackend::start(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Backend: chunked\r\n\r\n\
                  4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: 1\r\n\r\n",
            )
            .await;
        // Keep the connection open: the body's end is in its framing.
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let text = format!(
        "[server]\nlisten = \"{{listen}}\"\n[pools.web]\nbackends = {}\n\
         [pools.unframed]\nbackends = [\"{}\"]\n[pools.chunked]\nbackends = [\"{}\"]\n\
         [[routes]]\npath_prefix = \"/unframed\"\npool = \"unframed\"\n\
         [[routes]]\npath_prefix = \"/chunked\"\npool = \"chunked\"\n\
         [[routes]]\npath_prefix = \"/\"\npool = \"web\"\n",
        backends_toml(&backends, &[]),
        unframed.addr,
        chunked.addr
    );
    let fulcrum = Fulcrum::start(&text, &[]);

    // A chunked upload reaches the backend whole.
    let answer = exchange_raw(
        fulcrum.addr,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n11\n"), "{answer}");
    assert_eq!(backends[0].stats.body_bytes.load(Ordering::Relaxed), 11);

    // A body delimited by the backend closing reaches an HTTP/1.1 client chunked, and intact.
    let reply = get(fulcrum.addr, "/unframed").await.expect("unframed");
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], b"the body runs until the connection closes");
    // An HTTP/1.0 client gets it as it came, ended by the close.
    let answer = exchange_raw(fulcrum.addr, b"GET /unframed HTTP/1.0\r\n\r\n").await;
    assert!(!answer.to_ascii_lowercase().contains("transfer-encoding"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\nthe body runs until the connection closes"),
        "{answer}"
    );

    // A chunked body is decoded and re-framed, its trailer dropped.
    let reply = get(fulcrum.addr, "/chunked").await.expect("chunked");
    assert_eq!(&reply.body[..], b"wikipedia");
}

/// Reads a request head from a raw backend's connection.
async fn read_head(stream: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_and_head_requests_are_framed_right() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&config(&backends_toml(&backends, &[])), &[]);

    // HTTP/1.0 without Host: answered, then closed.
    let answer = exchange_raw(fulcrum.addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("backend-1\n"), "{answer}");

    // HTTP/1.0 asking for keep-alive gets it, and a second request on the same connection.
    let mut stream = TcpStream::connect(fulcrum.addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .expect("write");
    let mut first = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut first))
        .await
        .expect("in time")
        .expect("read");
    let first = String::from_utf8_lossy(&first[..n]).into_owned();
    assert!(first.contains("connection: keep-alive\r\n"), "{first}");
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("write");
    let second = read_to_close(&mut stream).await;
    assert!(second.starts_with("HTTP/1.1 200 OK\r\n"), "{second}");

    // HEAD: the length a GET would have, no body, and the connection stays usable.
    let answer = exchange_raw(
        fulcrum.addr,
        b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head_answer, get_answer) = answer.split_at(answer.rfind("HTTP/1.1 200").expect("two answers"));
    assert!(head_answer.contains("content-length: 10\r\n"), "{head_answer}");
    assert!(
        head_answer.ends_with("\r\n\r\n"),
        "no body after a HEAD answer: {head_answer}"
    );
    assert!(get_answer.ends_with("\r\n\r\nbackend-1\n"), "{get_answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_before_the_body() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&config(&backends_toml(&backends, &[])), &[]);
    let mut stream = TcpStream::connect(fulcrum.addr).await.expect("connect");
    stream
        .write_all(
            b"PUT /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("write head");
    let mut interim = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut interim))
        .await
        .expect("an interim answer before the body is sent")
        .expect("read");
    assert_eq!(&interim[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(&vec![b'b'; 100_000]).await.expect("write body");
    let answer = read_to_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("100000\n"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_that_could_smuggle_a_request_is_refused() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&config(&backends_toml(&backends, &[])), &[]);
    let attempts: [(&[u8], &str); 5] = [
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
            "HTTP/1.1 400",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 501",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc",
            "HTTP/1.1 400",
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "HTTP/1.1 400"),
    ];
    for (request, expected) in attempts {
        let answer = exchange_raw(fulcrum.addr, request).await;
        assert!(
            answer.starts_with(expected),
            "{:?} → {answer:?}",
            String::from_utf8_lossy(request)
        );
        assert!(answer.contains("connection: close\r\n"), "{answer}");
    }
    // A malformed chunked body after a valid head: the backend never sees a second request.
    let answer = exchange_raw(
        fulcrum.addr,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        backends[0].stats.requests.load(Ordering::Relaxed) <= 1,
        "nothing smuggled reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_are_tunnelled_both_ways() {
    // A backend that switches to an echo protocol when, and only when, asked to.
    let echo = RawBackend::start(|mut stream| async move {
        let head = String::from_utf8_lossy(&read_head(&mut stream).await).to_ascii_lowercase();
        if !(head.contains("\r\nconnection: upgrade\r\n") && head.contains("\r\nupgrade: websocket\r\n")) {
            let _ = stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 9\r\n\r\nno switch")
                .await;
            return;
        }
        let _ = stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .await;
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            if stream.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    })
    .await;
    let fulcrum = Fulcrum::start(&config(&format!("[\"{}\"]", echo.addr)), &[]);

    let mut stream = TcpStream::connect(fulcrum.addr).await.expect("connect");
    // The first frame rides in the same packet as the request head.
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\n\r\nearly",
        )
        .await
        .expect("write");
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"\r\n\r\nearly") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("the switch and the echo in time")
            .expect("read");
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101 switching protocols\r\n"), "{head}");
    assert!(
        head.contains("\r\nupgrade: websocket\r\n") && head.contains("\r\nconnection: upgrade\r\n"),
        "{head}"
    );
    for message in [&b"ping"[..], b"a longer message, both ways"] {
        stream.write_all(message).await.expect("write");
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(echoed, message);
    }

    // A tunnel where nothing moves for client_idle_timeout is closed.
    let idle_text = format!(
        "[server]\nlisten = \"{{listen}}\"\nclient_idle_timeout = \"500ms\"\n[pools.web]\nbackends = [\"{}\"]\n",
        echo.addr
    );
    let short = Fulcrum::start(&idle_text, &[]);
    let mut quiet = TcpStream::connect(short.addr).await.expect("connect");
    quiet
        .write_all(b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let answer = read_to_close(&mut quiet).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed before the idle timeout: {:?}",
        started.elapsed()
    );

    // `Upgrade` without `Connection: upgrade` is not a request to switch: it is stripped.
    let answer = exchange_raw(
        fulcrum.addr,
        b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.ends_with("no switch"),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_status_line_without_a_reason_phrase_is_passed_on() {
    // `HTTP/1.1 200` with no reason phrase is valid (RFC 9112 4: the reason may be empty).
    let terse = RawBackend::start(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200\r\nContent-Length: 5\r\nX-Backend: terse\r\n\r\nterse")
            .await;
    })
    .await;
    let fulcrum = Fulcrum::start(&config(&format!("[\"{}\"]", terse.addr)), &[]);
    for _ in 0..3 {
        let reply = get(fulcrum.addr, "/").await.expect("answered");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.backend.as_deref(), Some("terse"));
        assert_eq!(&reply.body[..], b"terse");
    }
    let answer = exchange_raw(fulcrum.addr, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(!fulcrum.log().contains("panicked"), "{}", fulcrum.log());
}
