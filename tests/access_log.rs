//! The access log: one JSON line per request under concurrency, the request
//! ids the backends saw, the termination causes of a 503, a 504 and a client
//! abort, and rotation by `mv` and SIGUSR1.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use std::collections::BTreeSet;
use std::time::Duration;

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

/// Waits up to 5 s for the log at `path` to hold `n` lines.
async fn wait_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let found = lines(path);
        if found.len() >= n || tokio::time::Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn request(host: &str, path: &str, id: Option<&str>) -> http::Request<Full<Bytes>> {
    let mut request = http::Request::get(path).header("host", host);
    if let Some(id) = id {
        request = request.header("x-request-id", id);
    }
    request.body(Full::new(Bytes::new())).expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_line_per_request_with_ids_causes_and_rotation() {
    let backends = start_backends(&[0, 0, 0], &[Duration::ZERO, Duration::ZERO, Duration::from_secs(2)])
        .await
        .expect("backends");
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\nadmin = \"{{admin}}\"\n\
         [access_log]\npath = \"access.log\"\nformat = \"json\"\n\
         [pools.web]\nbackends = [\"{}\"]\n\
         [pools.down]\nbackends = [\"{}\"]\n\
         [pools.slow]\nbackends = [\"{}\"]\nresponse_timeout = \"200ms\"\n\
         [[routes]]\nhost = \"down.example\"\npool = \"down\"\n\
         [[routes]]\nhost = \"slow.example\"\npool = \"slow\"\n\
         [[routes]]\npath_prefix = \"/\"\npool = \"web\"\n",
        backends[0].addr, backends[1].addr, backends[2].addr
    );
    let fulcrum = Fulcrum::start(&config, &[]);
    let log = fulcrum.dir.path().join("access.log");

    // Concurrent clients; half send their own request id.
    let clients = 4;
    let per_client = 40;
    let mut tasks = Vec::new();
    for client in 0..clients {
        let addr = fulcrum.addr;
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..per_client {
                let own = (i % 2 == 0).then(|| format!("client-{client}-{i}"));
                let reply = send(addr, request("app.example", "/headers", own.as_deref()))
                    .await
                    .expect("answer");
                assert_eq!(reply.status, 200);
                let body = String::from_utf8_lossy(&reply.body).to_string();
                let at_backend = body
                    .lines()
                    .find_map(|l| l.strip_prefix("x-request-id: "))
                    .map(str::to_string)
                    .expect("the backend saw a request id");
                if let Some(own) = &own {
                    assert_eq!(&at_backend, own, "a client's id is passed on as it came");
                }
                seen.push(at_backend);
            }
            seen
        }));
    }
    let mut at_backends = BTreeSet::new();
    for task in tasks {
        at_backends.extend(task.await.expect("client"));
    }
    let total = clients * per_client;
    let logged = wait_lines(&log, total).await;
    assert_eq!(logged.len(), total, "one line per request");
    let logged_ids: BTreeSet<String> = logged
        .iter()
        .map(|l| l["request_id"].as_str().expect("every line has an id").to_string())
        .collect();
    assert_eq!(logged_ids, at_backends, "the ids logged are those the backends saw");
    assert_eq!(logged_ids.len(), total, "ids are unique");
    let line = &logged[0];
    for field in [
        "time",
        "client",
        "method",
        "path",
        "status",
        "bytes_in",
        "bytes_out",
        "duration",
        "pool",
        "backend",
        "policy",
        "decision",
        "retries",
        "termination",
    ] {
        assert!(!line[field].is_null(), "{field} in {line}");
    }
    assert_eq!(
        (
            line["pool"].as_str(),
            line["termination"].as_str(),
            line["method"].as_str()
        ),
        (Some("web"), Some("completed"), Some("GET"))
    );

    // 503: the pool's only backend drained.
    let drain = http::Request::post(format!("/pools/down/backends/{}/drain", backends[1].addr))
        .header("host", fulcrum.admin.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(send(fulcrum.admin, drain).await.expect("admin").status, 200);
    assert_eq!(
        send(fulcrum.addr, request("down.example", "/", Some("want-503")))
            .await
            .expect("answer")
            .status,
        503
    );
    // 504: a backend slower than the pool's response_timeout.
    assert_eq!(
        send(fulcrum.addr, request("slow.example", "/", Some("want-504")))
            .await
            .expect("answer")
            .status,
        504
    );
    // A client that goes away in the middle of a large answer.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(fulcrum.addr).await.expect("connect");
        stream
            .write_all(b"GET /bytes/50000000 HTTP/1.1\r\nHost: app.example\r\nX-Request-Id: want-abort\r\n\r\n")
            .await
            .expect("write");
        let mut first = [0u8; 4096];
        let read = stream.read(&mut first).await.expect("read");
        assert!(read > 0 && first.starts_with(b"HTTP/1.1 200"), "the answer began");
    }

    let logged = wait_lines(&log, total + 3).await;
    let cause = |id: &str| {
        logged.iter().find(|l| l["request_id"] == id).map(|l| {
            (
                l["status"].as_u64().unwrap_or(0),
                l["termination"].as_str().unwrap_or("").to_string(),
            )
        })
    };
    assert_eq!(cause("want-503"), Some((503, "no_backend".into())));
    assert_eq!(cause("want-504"), Some((504, "response_timeout".into())));
    assert_eq!(
        cause("want-abort"),
        Some((200, "client_closed".into())),
        "{:?}",
        logged.last()
    );

    // Rotation: move the file away, signal, and new lines go to a new file.
    let rotated = fulcrum.dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).expect("mv");
    unsafe {
        libc::kill(fulcrum.pid() as i32, libc::SIGUSR1);
    }
    assert!(
        fulcrum.wait_for_log("access log reopened", Duration::from_secs(3)),
        "{}",
        fulcrum.log()
    );
    for _ in 0..5 {
        assert_eq!(
            send(fulcrum.addr, request("app.example", "/", None))
                .await
                .expect("answer")
                .status,
            200
        );
    }
    assert_eq!(wait_lines(&log, 5).await.len(), 5, "new lines in the new file");
    assert_eq!(lines(&rotated).len(), total + 3, "the old file keeps what it had");
}
