//! HTTP/2 clients that abuse the protocol (CVE-2023-44487, rapid reset) are
//! cut off with GOAWAY and cost a bounded number of backend requests, while a
//! well-behaved client on another connection sees no error.

mod common;

use common::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Opens an HTTP/2 connection (prior knowledge) and sends up to `streams`
/// requests for `path` in batches of `batch`, resetting each batch (the
/// responses dropped) after `hold` (zero: at once, before the server can
/// accept them). Returns how many were sent before the server refused more,
/// and whether it closed the connection within 10 s.
async fn rapid_reset(
    addr: std::net::SocketAddr,
    path: &str,
    streams: usize,
    batch: usize,
    hold: Duration,
) -> (usize, bool) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let driver = tokio::spawn(connection);
    let mut sent = 0;
    'attack: while sent < streams {
        let mut open = Vec::new();
        for _ in 0..batch {
            let Ok(mut ready) = tokio::time::timeout(Duration::from_secs(5), client.clone().ready()).await else {
                break 'attack;
            };
            let Ok(client) = ready.as_mut() else { break 'attack };
            let request = http::Request::get(format!("http://{addr}{path}"))
                .body(())
                .expect("request");
            match client.send_request(request, true) {
                Ok((response, _)) => open.push(response),
                Err(_) => break 'attack,
            }
            sent += 1;
        }
        if !hold.is_zero() {
            tokio::time::sleep(hold).await;
        }
        // Dropped: RST_STREAM(CANCEL) for each.
        drop(open);
    }
    drop(client);
    let closed = tokio::time::timeout(Duration::from_secs(10), driver).await.is_ok();
    (sent, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_cut_off_and_a_parallel_client_is_unaffected() {
    // Slow backends: a reset stream has already been forwarded (the second form).
    let backends = start_backends(&[0, 0], &[]).await.expect("backends");
    // The abuser's requests go to a pool of their own, so they are counted apart.
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n\
         [pools.web]\nbackends = [\"{}\"]\n[pools.slow]\nbackends = [\"{}\"]\n\
         [[routes]]\npath_prefix = \"/slow\"\npool = \"slow\"\n[[routes]]\npath_prefix = \"/\"\npool = \"web\"\n",
        backends[0].addr, backends[1].addr
    );
    let fulcrum = Fulcrum::start(&config, &[]);
    let served = || backends[1].stats.requests.load(Ordering::Relaxed);

    // A well-behaved client meanwhile: every request answered.
    let addr = fulcrum.addr;
    let polite = tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(connection);
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut answered = 0;
        while Instant::now() < deadline {
            let mut client = client.clone().ready().await.expect("the polite connection stays open");
            let request = http::Request::get(format!("http://{addr}/")).body(()).expect("request");
            let (response, _) = client.send_request(request, true).expect("sent");
            let response = match response.await {
                Ok(response) => response,
                Err(error) => return Err(format!("after {answered} answers: {error}")),
            };
            assert_eq!(response.status(), 200);
            let mut body = response.into_body();
            while let Some(chunk) = body.data().await {
                chunk.expect("body");
            }
            answered += 1;
        }
        Ok(answered)
    });

    // Reset before accepted: thousands of HEADERS + RST_STREAM in a row.
    let (sent, closed) = rapid_reset(fulcrum.addr, "/slow/200", 20_000, 100, Duration::ZERO).await;
    // Which defence cuts it off depends on timing (the same resets can reach
    // h2 before or after hyper accepts the streams: h2's pending-accept
    // limit, or Fulcrum's count of streams reset after forwarding): the test
    // asks for the outcome.
    assert!(closed && sent < 20_000, "cut off: sent {sent}, closed {closed}");

    // Reset after forwarding: each batch reaches the backend (which takes
    // 200 ms) before it is reset, so each stream costs a backend request.
    let before = served();
    let (sent, closed) = rapid_reset(fulcrum.addr, "/slow/200", 5_000, 50, Duration::from_millis(30)).await;
    assert!(closed, "the abusive connection is closed");
    assert!(sent < 5_000, "the abuser is refused before 5,000 streams (sent {sent})");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reached = served() - before;
    assert!(
        reached <= 300,
        "backend requests are bounded: {reached} for {sent} streams"
    );

    let answered = polite
        .await
        .expect("polite client")
        .unwrap_or_else(|e| panic!("the polite client failed {e}\n{}", fulcrum.log()));
    assert!(
        answered > 10,
        "the polite client was served throughout ({answered} answers)"
    );
}

/// One HTTP/2 frame: 9-byte header, then `payload`.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n[pools.web]\nbackends = {}\n",
        backends_toml(&backends, &[])
    );
    let fulcrum = Fulcrum::start(&config, &[]);
    let mut stream = tokio::net::TcpStream::connect(fulcrum.addr).await.expect("connect");
    let (mut reader, mut writer) = stream.split();
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    // HEADERS without END_HEADERS: `:method: GET`, `:scheme: http`, `:path: /`.
    opening.extend(frame(0x1, 0x1, 1, &[0x82, 0x86, 0x84]));
    writer.write_all(&opening).await.expect("preface");
    // CONTINUATION frames, never ending the header block: each byte is one
    // more `:method: GET` in the header list.
    let block = frame(0x9, 0, 1, &[0x82; 16 * 1024]);
    let mut sent = 0usize;
    let flood = async {
        while sent < 10 << 20 {
            if writer.write_all(&block).await.is_err() {
                break;
            }
            sent += block.len();
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), flood).await;
    // The server ended the connection (GOAWAY, then close) long before 10 MB.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut rest)).await;
    assert!(
        sent < 10 << 20,
        "cut off before 10 MB of CONTINUATION ({sent} bytes sent)"
    );
    assert!(read.is_ok(), "the connection is closed");
    assert_eq!(
        backends[0].stats.requests.load(Ordering::Relaxed),
        0,
        "nothing forwarded"
    );
}
