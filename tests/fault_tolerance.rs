//! Backends that die, hang and reset, plugins that misbehave, and a stop
//! signal mid-request: no request lost that could be saved, no crash.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

async fn wait_until(limit: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A pool `web` of `backends` with fast HTTP checks (every 200 ms, rise 2,
/// fall 2) and two retries, then `extra` TOML.
fn checked_pool(backends: &[DemoBackend], extra: &str) -> String {
    format!(
        "[server]\nlisten = \"{{listen}}\"\nadmin = \"{{admin}}\"\n\
         [pools.web]\nbackends = {}\nretries = 2\n\
         [pools.web.health]\npath = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 2\n{extra}",
        backends_toml(backends, &[])
    )
}

/// Requests the balancer has sent to `address` (the backend's own count includes health checks).
async fn sent_to(fulcrum: &Fulcrum, address: &str) -> u64 {
    fulcrum.backend_status("web", address).await["requests"]
        .as_u64()
        .unwrap_or(0)
}

/// Waits up to 5 s for the balancer to send `address` more than 10 requests beyond what it had.
async fn gets_traffic_again(fulcrum: &Fulcrum, address: &str) -> bool {
    let before = sent_to(fulcrum, address).await;
    wait_until(Duration::from_secs(5), async || {
        sent_to(fulcrum, address).await > before + 10
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_under_load_loses_no_request_and_rejoins() {
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    let fulcrum = Fulcrum::start(&checked_pool(&backends, ""), &[]);
    let victim = backends[2].addr.to_string();
    let load = Load::start(fulcrum.addr, 4, "/slow/10");
    tokio::time::sleep(Duration::from_millis(500)).await;

    backends[2].kill();
    let marked_down = wait_until(Duration::from_secs(5), async || {
        fulcrum.backend_status("web", &victim).await["up"] == false
    })
    .await;
    assert!(marked_down, "down after `fall` failed checks: {}", fulcrum.log());
    let sent_when_down = fulcrum.backend_status("web", &victim).await["requests"].as_u64();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let sent_later = fulcrum.backend_status("web", &victim).await["requests"].as_u64();
    assert_eq!(sent_when_down, sent_later, "a down backend gets no traffic");

    let _revived = backends[2].restart().await.expect("restart the backend");
    let rejoined = gets_traffic_again(&fulcrum, &victim).await;
    assert!(rejoined, "back in rotation after `rise` good checks: {}", fulcrum.log());

    let (ok, failed, failures) = load.finish().await;
    assert_eq!(failed, 0, "failed requests: {:?}", &failures[..failures.len().min(5)]);
    assert!(ok > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_backend_rejoins_as_soon_as_its_active_checks_pass() {
    let backends = start_backends(&[0, 0, 0], &[]).await.expect("backends");
    // A long ejection: without checks ending it, the backend would stay out 30 s.
    let outlier = "[pools.web.outlier]
consecutive_failures = 1
base_ejection_time = \"30s\"
";
    let fulcrum = Fulcrum::start(&checked_pool(&backends, outlier), &[]);
    let victim = backends[1].addr.to_string();
    let load = Load::start(fulcrum.addr, 4, "/slow/5");
    tokio::time::sleep(Duration::from_millis(300)).await;
    backends[1].kill();
    let ejected = wait_until(Duration::from_secs(5), async || {
        fulcrum.backend_status("web", &victim).await["ejected"] == true
    })
    .await;
    assert!(ejected, "passive ejection took it out: {}", fulcrum.log());

    let _revived = backends[1].restart().await.expect("restart the backend");
    let back_at = Instant::now();
    let rejoined = gets_traffic_again(&fulcrum, &victim).await;
    assert!(
        rejoined,
        "back in rotation once its checks pass, not after the 30 s ejection: {}",
        fulcrum.log()
    );
    assert!(
        back_at.elapsed() < Duration::from_secs(3),
        "rejoined in {:?}",
        back_at.elapsed()
    );
    assert_eq!(fulcrum.backend_status("web", &victim).await["ejected"], false);
    let (ok, failed, failures) = load.finish().await;
    assert_eq!(failed, 0, "failed requests: {:?}", &failures[..failures.len().min(5)]);
    assert!(ok > 50);
}

/// A backend that accepts connections and reads, but never answers.
async fn hanging_backend() -> RawBackend {
    RawBackend::start(|mut stream| async move {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buffer).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_backend_gives_504_in_time_and_is_ejected() {
    let good = start_backends(&[0], &[]).await.expect("backend");
    let hanging = hanging_backend().await;
    let hang = hanging.addr;
    let text = format!(
        "[server]\nlisten = \"{{listen}}\"\nadmin = \"{{admin}}\"\n\
         [pools.web]\nbackends = [\"{hang}\", \"{}\"]\nresponse_timeout = \"300ms\"\n\
         [pools.web.outlier]\nconsecutive_failures = 2\nbase_ejection_time = \"30s\"\n",
        good[0].addr
    );
    let fulcrum = Fulcrum::start(&text, &[]);
    let mut timeouts = 0;
    for _ in 0..6 {
        let started = Instant::now();
        let reply = get(fulcrum.addr, "/").await.expect("reply");
        if reply.status == 504 {
            timeouts += 1;
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "504 came after {:?}",
                started.elapsed()
            );
        } else {
            assert_eq!(reply.status, 200);
        }
    }
    assert_eq!(timeouts, 2, "two timeouts, then the backend is ejected");
    assert_eq!(fulcrum.backend_status("web", &hang.to_string()).await["ejected"], true);
    for _ in 0..10 {
        let reply = get(fulcrum.addr, "/").await.expect("reply");
        assert_eq!((reply.status, reply.backend.as_deref()), (200, Some("backend-1")));
    }
    assert!(fulcrum.log().contains("backend ejected"), "{}", fulcrum.log());
}

/// A backend that reads the first piece of a request (its head and perhaps
/// some body), then resets the connection.
async fn resetting_backend() -> RawBackend {
    RawBackend::start(|mut stream| async move {
        let mut buffer = vec![0u8; 16 << 10];
        let _ = stream.read(&mut buffer).await;
        // SO_LINGER 0 turns the close into a reset; on a socket with
        // nothing left to send, the close does not block.
        #[allow(deprecated)]
        let _ = stream.set_linger(Some(Duration::ZERO));
        drop(stream);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_cut_off_mid_body_gets_502_and_is_not_sent_twice() {
    let witness = start_backends(&[0], &[]).await.expect("backend");
    let resetting = resetting_backend().await;
    let resetter = resetting.addr;
    let text = format!(
        "[server]\nlisten = \"{{listen}}\"\n[plugins]\ndir = \"plugins.d\"\n\
         [pools.web]\npolicy = \"first\"\npolicy_config = {{ mode = \"first\" }}\n\
         backends = [\"{resetter}\", \"{}\"]\nretries = 2\n[pools.web.outlier]\nconsecutive_failures = 0\n",
        witness[0].addr
    );
    let fulcrum = Fulcrum::start(&text, &[("first.wasm", &wasm("misbehave.wasm"))]);
    for body_size in [1 << 20, 1000] {
        let request = http::Request::post("/orders")
            .header("host", "shop.example")
            .body(Full::new(Bytes::from(vec![b'p'; body_size])))
            .expect("request");
        let reply = send(fulcrum.addr, request).await.expect("reply");
        assert_eq!(reply.status, 502, "{}", String::from_utf8_lossy(&reply.body));
    }
    assert_eq!(
        witness[0].stats.requests.load(Ordering::Relaxed),
        0,
        "the POST never reached a second backend"
    );

    // A GET is idempotent and bodyless: the same failure is retried elsewhere.
    let reply = get(fulcrum.addr, "/").await.expect("reply");
    assert_eq!((reply.status, reply.backend.as_deref()), (200, Some("backend-1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_plugins_never_cost_a_request() {
    let backends = start_backends(&[0, 0], &[]).await.expect("backends");
    let list = backends_toml(&backends, &[]);
    let modes = ["loop", "trap", "grow", "bad-id"];
    let mut text = String::from(
        "[server]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\n[plugins]\ndir = \"plugins.d\"\ncall_timeout = \"5ms\"\nmemory_limit = \"16MiB\"\n",
    );
    // A plugin name per mode: faults quarantine the plugin, and each mode's
    // fault must be seen for itself.
    for mode in modes {
        text += &format!(
            "[pools.{mode}]\npolicy = \"misbehave-{mode}\"\npolicy_config = {{ mode = \"{mode}\" }}\nbackends = {list}\n\
             [[routes]]\nhost = \"{mode}.test\"\npool = \"{mode}\"\n"
        );
    }
    // The cap, not the deadline, must stop the growing one.
    text += "[plugins.limits.misbehave-grow]\nmemory_limit = \"4MiB\"\ncall_timeout = \"1s\"\n";
    let files: Vec<String> = modes.iter().map(|mode| format!("misbehave-{mode}.wasm")).collect();
    let component = wasm("misbehave.wasm");
    let plugins: Vec<(&str, &std::path::Path)> = files.iter().map(|f| (f.as_str(), component.as_path())).collect();
    let fulcrum = Fulcrum::start(&text, &plugins);
    for mode in modes {
        let mut replies = Vec::new();
        for _ in 0..20 {
            let request = http::Request::get("/")
                .header("host", format!("{mode}.test"))
                .body(Full::new(Bytes::new()))
                .expect("request");
            replies.push(send(fulcrum.addr, request).await.expect("answered"));
        }
        assert!(replies.iter().all(|r| r.status == 200), "{mode}: {:?}", tally(&replies));
        let counts = tally(&replies);
        assert_eq!(
            counts.values().copied().collect::<Vec<_>>(),
            vec![10, 10],
            "{mode}: the fallback rotates: {counts:?}"
        );
    }
    let status = fulcrum.status().await;
    for pool in status["pools"].as_array().expect("pools") {
        assert!(pool["plugin_faults"].as_u64() >= Some(20), "faults counted: {pool}");
    }
    assert_eq!(status["pools"].as_array().map(Vec::len), Some(4));
    let log = fulcrum.log();
    assert!(
        log.contains("plugin=misbehave-trap") || log.contains("plugin=\"misbehave-trap\""),
        "faults logged with the plugin's name: {log}"
    );
    assert!(log.contains("quarantined"), "{log}");
    assert!(
        log.contains("wasm trap: interrupt (the call ran past its call_timeout)"),
        "the loop was cut by its deadline, named in the config's words: {log}"
    );
    assert!(
        log.contains("(it needs more than its memory_limit)"),
        "the memory cap named in the config's words: {log}"
    );
    assert!(!log.contains("wasm backtrace"), "no backtrace in a log line: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_request_finish_then_exits_zero() {
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let text = format!(
        "[server]\nlisten = \"{{listen}}\"\nshutdown_grace = \"10s\"\n[pools.web]\nbackends = {}\n",
        backends_toml(&backends, &[])
    );
    let mut fulcrum = Fulcrum::start(&text, &[]);
    let addr = fulcrum.addr;
    let slow = tokio::spawn(async move { get(addr, "/slow/2000").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = fulcrum.signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
        (status, fulcrum)
    });
    let reply = slow.await.expect("client task").expect("the slow request completes");
    assert_eq!((reply.status, reply.body.as_ref()), (200, b"backend-1\n".as_ref()));
    let (status, fulcrum) = status.await.expect("waiter");
    let status = status.unwrap_or_else(|| panic!("fulcrum did not exit: {}", fulcrum.log()));
    assert!(status.success(), "exit status {status}: {}", fulcrum.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_backend_down_requests_get_a_fast_503() {
    let dead = [free_port(), free_port()]
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .join(", ");
    let text = format!(
        "[server]\nlisten = \"{{listen}}\"\nadmin = \"{{admin}}\"\n[pools.web]\nbackends = [{dead}]\n\
         [pools.web.health]\ntype = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 1\n"
    );
    let fulcrum = Fulcrum::start(&text, &[]);
    let all_down = wait_until(Duration::from_secs(5), async || {
        let status = fulcrum.status().await;
        status["pools"][0]["backends"]
            .as_array()
            .is_some_and(|b| b.iter().all(|b| b["healthy"] == false))
    })
    .await;
    assert!(all_down, "{}", fulcrum.log());
    let started = Instant::now();
    let reply = get(fulcrum.addr, "/").await.expect("reply");
    assert_eq!(reply.status, 503);
    assert!(String::from_utf8_lossy(&reply.body).contains("no backend of pool `web` is available"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let backends = start_backends(&[0], &[]).await.expect("backends");
    let text = format!(
        "[server]\nlisten = \"{{listen}}\"\nheader_read_timeout = \"1s\"\n[pools.web]\nbackends = {}\n",
        backends_toml(&backends, &[])
    );
    let fulcrum = Fulcrum::start(&text, &[]);

    // Slowloris: a request head dribbled one byte every 100 ms never completes.
    let mut slow = tokio::net::TcpStream::connect(fulcrum.addr).await.expect("connect");
    let started = Instant::now();
    let head = b"GET / HTTP/1.1\r\nHost: test.local\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let mut cut_off = false;
    for byte in head.iter() {
        if slow.write_all(&[*byte]).await.is_err() {
            cut_off = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut probe = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), slow.read(&mut probe)).await {
            // The balancer answered (408) or closed (0 bytes): either way, it let go.
            cut_off = true;
            let _ = n;
            break;
        }
    }
    assert!(cut_off, "a slow head was still accepted after {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "cut off after {:?}",
        started.elapsed()
    );

    // An idle keep-alive connection is closed too.
    let mut idle = tokio::net::TcpStream::connect(fulcrum.addr).await.expect("connect");
    idle.write_all(b"GET / HTTP/1.1\r\nHost: test.local\r\n\r\n")
        .await
        .expect("request");
    let mut buffer = vec![0u8; 4096];
    let n = idle.read(&mut buffer).await.expect("response");
    assert!(String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 200"));
    let closed = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            match idle.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle keep-alive connection stayed open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_backend_is_never_used_even_when_the_plugin_picks_it() {
    let backends = start_backends(&[0, 0], &[]).await.expect("backends");
    let text = format!(
        "[server]\nlisten = \"{{listen}}\"\nadmin = \"{{admin}}\"\n[plugins]\ndir = \"plugins.d\"\n\
         [pools.web]\npolicy = \"stubborn\"\npolicy_config = {{ mode = \"zero\" }}\nbackends = {}\n\
         [pools.web.health]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 1\n",
        backends_toml(&backends, &[])
    );
    let fulcrum = Fulcrum::start(&text, &[("stubborn.wasm", &wasm("misbehave.wasm"))]);
    assert_eq!(
        get(fulcrum.addr, "/").await.expect("reply").backend.as_deref(),
        Some("backend-1")
    );
    backends[0].kill();
    let down = backends[0].addr.to_string();
    let marked = wait_until(Duration::from_secs(5), async || {
        fulcrum.backend_status("web", &down).await["healthy"] == false
    })
    .await;
    assert!(marked, "{}", fulcrum.log());
    let faults_before = fulcrum.status().await["pools"][0]["plugin_faults"]
        .as_u64()
        .unwrap_or(0);
    for _ in 0..5 {
        let reply = get(fulcrum.addr, "/").await.expect("reply");
        assert_eq!((reply.status, reply.backend.as_deref()), (200, Some("backend-2")));
    }
    let faults_after = fulcrum.status().await["pools"][0]["plugin_faults"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        faults_after >= faults_before + 5,
        "each overruled choice is counted ({faults_before} -> {faults_after})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stalls_mid_body_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let backend = RawBackend::start(|mut stream| async move {
        let mut buffer = [0u8; 4096];
        let _ = stream.read(&mut buffer).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..")
            .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let stalling = backend.addr;
    let text = format!(
        "[server]\nlisten = \"{{listen}}\"\n[pools.web]\nbackends = [\"{stalling}\"]\nread_timeout = \"300ms\"\n"
    );
    let fulcrum = Fulcrum::start(&text, &[]);
    let started = Instant::now();
    let result = get(fulcrum.addr, "/").await;
    assert!(result.is_err(), "a truncated body must not look complete: {result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut off after {:?}",
        started.elapsed()
    );
    assert!(
        fulcrum.wait_for_log("went quiet mid-body", Duration::from_secs(2)),
        "{}",
        fulcrum.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_output_reaches_the_log_from_init_and_from_the_request_path() {
    let backends = start_backends(&[0, 0], &[]).await.expect("backends");
    let text = format!(
        "[server]\nlisten = \"{{listen}}\"\n[plugins]\ndir = \"plugins.d\"\n\
         [pools.web]\npolicy = \"chatty\"\npolicy_config = {{ mode = \"chatty\" }}\nbackends = {}\n",
        backends_toml(&backends, &[])
    );
    let fulcrum = Fulcrum::start(&text, &[("chatty.wasm", &wasm("misbehave.wasm"))]);
    for _ in 0..12 {
        assert_eq!(get(fulcrum.addr, "/").await.expect("answered").status, 200);
    }
    let log = fulcrum.log();
    let init_line = log
        .lines()
        .find(|l| l.contains("hello from init"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        init_line.contains("chatty") && init_line.contains("stdout"),
        "{init_line}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("complaint from init") && l.contains("stderr")),
        "{log}"
    );
    // Printing while choosing a backend is no fault: every line reaches the log.
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("hello from select") && l.contains("chatty"))
            .count(),
        12,
        "{log}"
    );
    assert!(!log.contains("did it write to stdout or stderr"), "{log}");
    assert!(!log.contains("plugin call failed"), "{log}");
}

const ESCAPES: [&str; 7] = ["sleep", "tcp", "udp", "dns", "file", "env", "stdin"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_cannot_block_or_reach_files_env_or_sockets_and_the_host_never_panics() {
    let backends = start_backends(&[0, 0], &[]).await.expect("backends");
    let list = backends_toml(&backends, &[]);
    let mut text = String::from("[server]\nlisten = \"{listen}\"\n[plugins]\ndir = \"plugins.d\"\n");
    for mode in ESCAPES {
        text += &format!(
            "[pools.{mode}]\npolicy = \"misbehave\"\npolicy_config = {{ mode = \"{mode}\" }}\nbackends = {list}\n\
             [[routes]]\nhost = \"{mode}.test\"\npool = \"{mode}\"\n"
        );
    }
    let fulcrum = Fulcrum::start(&text, &[("misbehave.wasm", &wasm("misbehave.wasm"))]);
    for mode in ESCAPES {
        for _ in 0..4 {
            let request = http::Request::get("/")
                .header("host", format!("{mode}.test"))
                .body(Full::new(Bytes::new()))
                .expect("request");
            let reply = send(fulcrum.addr, request).await.expect("answered");
            assert_eq!(
                reply.status, 200,
                "{mode}: the request is served whatever the plugin tried"
            );
        }
    }
    let log = fulcrum.log();
    assert!(!log.contains("SUCCEEDED"), "nothing escaped the sandbox: {log}");
    assert!(!log.contains("panicked"), "no host panic: {log}");
    assert!(!log.contains("within a runtime"), "no nested runtime: {log}");
    // Each attempt either failed inside the guest or was stopped as a fault.
    for mode in ESCAPES {
        let denied = log.contains(&format!("escape {mode}: denied"));
        let stopped = log
            .lines()
            .any(|l| l.contains("plugin call failed") && l.contains("may not block"));
        assert!(denied || stopped, "{mode}: {log}");
    }
    assert!(
        log.lines()
            .any(|l| l.contains("plugin call failed") && l.contains("may not block")),
        "a blocking call is a fault with a reason: {log}"
    );
}

#[test]
fn a_plugin_that_blocks_in_init_is_refused_alike_by_check_and_run() {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{}\"\n[plugins]\ndir = \"plugins.d\"\n\
         [pools.web]\npolicy = \"misbehave\"\npolicy_config = {{ mode = \"sleep\", at = \"init\" }}\n\
         backends = [\"127.0.0.1:9\"]\n",
        free_port()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("plugins.d")).expect("plugins.d");
    std::fs::copy(wasm("misbehave.wasm"), dir.path().join("plugins.d/misbehave.wasm")).expect("copy");
    let path = dir.path().join("fulcrum.toml");
    std::fs::write(&path, &text).expect("write config");
    let (ok, checked) = check_file(&path);
    assert!(!ok, "check refuses a plugin that blocks in init: {checked}");
    // `run` must refuse it before listening and exit by itself; bounded, in case it serves.
    let log = dir.path().join("run.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["run", "--config"])
        .arg(&path)
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("run fulcrum");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let ran = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.is_some_and(|s| !s.success()), "run refuses it too: {ran}");
    let reason = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("fulcrum: "))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no error line in {text}"))
    };
    assert!(reason(&checked).contains("may not block"), "{checked}");
    assert_eq!(reason(&checked), reason(&ran), "the same reason from check and run");
    assert!(!ran.contains("panicked") && !checked.contains("panicked"), "{ran}");
}
