//! Limits on requests, with the answers a client should get: head size (431),
//! target length (414), header count (431), body size per route (413, before
//! anything is forwarded when the length is declared, mid-stream for chunked
//! bodies). The backend never sees a refused request's head, and a client
//! still sending reads its answer whole (lingering close).

mod common;

use common::*;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(backends: &[DemoBackend]) -> String {
    format!(
        "[server]\nlisten = \"{{listen}}\"\nmax_head_size = \"4KiB\"\nmax_uri_length = \"1KiB\"\nmax_headers = 10\n\
         max_body_size = \"1KiB\"\n\
         [pools.web]\nbackends = {}\n\
         [[routes]]\npath_prefix = \"/uploads\"\npool = \"web\"\nmax_body_size = \"64KiB\"\n\
         [[routes]]\npath_prefix = \"/\"\npool = \"web\"\n",
        backends_toml(backends, &[])
    )
}

/// Sends `request` whole, then reads the answer to its end.
async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("send");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn status(answer: &str) -> &str {
    answer.get(9..12).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_gets_its_status_and_the_backend_never_sees_the_request() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&config(&backends), &[]);
    let seen = || backends[0].stats.requests.load(Ordering::Relaxed);

    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(5000)
    );
    let answer = exchange(fulcrum.addr, big_header.as_bytes()).await;
    assert_eq!(status(&answer), "431", "{answer}");

    let long_uri = format!(
        "GET /{} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "u".repeat(1100)
    );
    let answer = exchange(fulcrum.addr, long_uri.as_bytes()).await;
    assert_eq!(status(&answer), "414", "{answer}");

    let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n");
    for i in 0..12 {
        many.push_str(&format!("X-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let answer = exchange(fulcrum.addr, many.as_bytes()).await;
    assert_eq!(status(&answer), "431", "{answer}");

    // A declared length over the route's limit: 413 before any backend is asked.
    let declared = format!(
        "POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 2048\r\nConnection: close\r\n\r\n{}",
        "x".repeat(2048)
    );
    let answer = exchange(fulcrum.addr, declared.as_bytes()).await;
    assert_eq!(status(&answer), "413", "{answer}");
    assert_eq!(seen(), 0, "no refused request reached the backend");

    // Within limits: served; a route with a higher limit takes more.
    let small = "POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\nConnection: close\r\n\r\n".to_string()
        + &"x".repeat(100);
    assert_eq!(status(&exchange(fulcrum.addr, small.as_bytes()).await), "200");
    let upload = format!(
        "POST /uploads/a HTTP/1.1\r\nHost: a\r\nContent-Length: 8192\r\nConnection: close\r\n\r\n{}",
        "x".repeat(8192)
    );
    assert_eq!(status(&exchange(fulcrum.addr, upload.as_bytes()).await), "200");

    // Chunked past the limit: cut off mid-stream with 413.
    let mut chunked = String::from("POST /form HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..4 {
        chunked.push_str(&format!("400\r\n{}\r\n", "c".repeat(1024)));
    }
    chunked.push_str("0\r\n\r\n");
    let answer = exchange(fulcrum.addr, chunked.as_bytes()).await;
    assert_eq!(status(&answer), "413", "{answer}");

    // HTTP/2 (prior knowledge): the same limits on the decoded head.
    let output = std::process::Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["-H", &format!("X-Big: {}", "b".repeat(5000))])
        .arg(format!("http://{}/", fulcrum.addr))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "431");
    let output = std::process::Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://{}/{}", fulcrum.addr, "u".repeat(1100)))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "414");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_sending_a_huge_header_reads_its_431_whole() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n[pools.web]\nbackends = {}\n",
        backends_toml(&backends, &[])
    );
    let fulcrum = Fulcrum::start(&config, &[]);
    for attempt in 0..5 {
        let stream = tokio::net::TcpStream::connect(fulcrum.addr).await.expect("connect");
        let (mut reader, mut writer) = stream.into_split();
        // 256 KiB of header, written while the answer is read.
        let sending = tokio::spawn(async move {
            let _ = writer.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ").await;
            let chunk = vec![b'h'; 16 * 1024];
            for _ in 0..16 {
                if writer.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let _ = writer.write_all(b"\r\n\r\n").await;
        });
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut answer)).await;
        let _ = sending.await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            matches!(read, Ok(Ok(_))),
            "attempt {attempt}: the answer is read to its end, not reset: {read:?} after {answer:?}"
        );
        assert!(answer.starts_with("HTTP/1.1 431"), "attempt {attempt}: {answer}");
        assert!(
            answer.ends_with("bytes\n"),
            "attempt {attempt}: the whole body: {answer}"
        );
    }
    assert_eq!(backends[0].stats.requests.load(Ordering::Relaxed), 0);
}
