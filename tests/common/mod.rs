//! Shared helpers for the black-box tests: run the real `fulcrum` binary on a
//! config, start demo backends on 127.0.0.1, and send real HTTP.
#![allow(dead_code, unused_imports)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use fulcrum::demo::{DemoBackend, start as start_backends};

/// Where build.rs put the plugin components.
pub const WASM_DIR: &str = env!("FULCRUM_PLUGIN_WASM_DIR");

/// The path of a plugin component built from `plugins/` or `tests/plugins/`.
pub fn wasm(file: &str) -> PathBuf {
    Path::new(WASM_DIR).join(file)
}

/// A loopback port free at the time of asking, never handed out twice in this
/// test process.
///
/// Why the memory: the kernel may hand the same free port to two tests running
/// in parallel, and Fulcrum binds its listener with `SO_REUSEPORT`, so two test
/// balancers would then both bind it and split each other's traffic (seen in CI:
/// a metrics test counting 114 of its 200 requests).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = listener.local_addr().expect("local addr").port();
        let mut given = GIVEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A running `fulcrum run` process, killed when dropped.
pub struct Fulcrum {
    child: Child,
    pub addr: SocketAddr,
    /// The admin listener, when the config has `admin = "{admin}"`.
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    log: PathBuf,
}

impl Fulcrum {
    /// Writes `config` (with `{listen}` replaced by a free address) to
    /// `fulcrum.toml` in a new temp dir, creates `plugins.d` there, copies the
    /// given plugin files in, and starts the balancer.
    pub fn start(config: &str, plugins: &[(&str, &Path)]) -> Fulcrum {
        let mut dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("plugins.d")).expect("plugins.d");
        for (name, source) in plugins {
            std::fs::copy(source, dir.path().join("plugins.d").join(name)).expect("copy plugin");
        }
        let path = dir.path().join("fulcrum.toml");
        let log = dir.path().join("fulcrum.log");
        // A port found free can be taken by another test before the balancer
        // binds it: then it starts again on other ports.
        for attempt in 1.. {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
            let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
            let text = config
                .replace("{listen}", &addr.to_string())
                .replace("{admin}", &admin.to_string());
            std::fs::write(&path, text).expect("write config");
            let _ = std::fs::remove_file(&log);
            let child = spawn(&path, &log);
            let mut fulcrum = Fulcrum {
                child,
                addr,
                admin,
                dir,
                log: log.clone(),
            };
            match fulcrum.wait_listening(1) {
                Ok(()) => return fulcrum,
                Err(log_text) if attempt < 3 && log_text.contains("Address already in use") => {
                    dir = std::mem::replace(&mut fulcrum.dir, tempfile::tempdir().expect("temp dir"));
                }
                Err(log_text) => panic!("fulcrum did not start:\n{log_text}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Waits for the listener, and for the log to say "fulcrum is serving"
    /// for the `times`th time; on failure, the log.
    fn wait_listening(&mut self, times: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "fulcrum exited with {status} before listening:\n{}",
                    self.log()
                ));
            }
            // Its own word that it serves, not only a port that answers: a
            // backend of another test may have taken the port between
            // Fulcrum's bind and its listen (then Fulcrum stops, and the
            // start is tried again on other ports).
            if std::net::TcpStream::connect(self.addr).is_ok()
                && self.log().matches("fulcrum is serving").count() >= times
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "fulcrum did not listen on {} within 30 s:\n{}",
            self.addr,
            self.log()
        ))
    }

    /// `GET /status` of the admin API, parsed.
    pub async fn status(&self) -> serde_json::Value {
        let reply = get(self.admin, "/status").await.expect("admin status");
        serde_json::from_slice(&reply.body).expect("status is JSON")
    }

    /// The status entry of backend `address` in pool `pool`.
    pub async fn backend_status(&self, pool: &str, address: &str) -> serde_json::Value {
        let status = self.status().await;
        let pools = status["pools"].as_array().cloned().unwrap_or_default();
        let pool = pools.into_iter().find(|p| p["name"] == pool).expect("pool in status");
        let backends = pool["backends"].as_array().cloned().unwrap_or_default();
        backends
            .into_iter()
            .find(|b| b["address"] == address)
            .expect("backend in status")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn plugin_dir(&self) -> PathBuf {
        self.dir.path().join("plugins.d")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("fulcrum.toml")
    }

    /// Everything the balancer has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `within` for the log to contain `text`.
    pub fn wait_for_log(&self, text: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.log().contains(text) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Resident memory of the balancer process, in bytes.
    pub fn rss(&self) -> u64 {
        rss_of(self.pid())
    }

    /// Stops the balancer (SIGTERM) and starts it again on the same config
    /// file, appending to the same log.
    pub fn restart(&mut self) {
        assert!(
            self.signal_and_wait(libc::SIGTERM, Duration::from_secs(10)).is_some(),
            "fulcrum did not stop:\n{}",
            self.log()
        );
        let served = self.log().matches("fulcrum is serving").count();
        self.child = spawn(&self.config_path(), &self.log);
        if let Err(log) = self.wait_listening(served + 1) {
            panic!("{log}");
        }
    }

    /// Sends a signal and waits (bounded) for the exit status.
    pub fn signal_and_wait(&mut self, signal: i32, within: Duration) -> Option<std::process::ExitStatus> {
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// Runs `fulcrum run` on the config at `path`, its log appended to `log`.
fn spawn(path: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["run", "--config"])
        .arg(path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start fulcrum")
}

impl Drop for Fulcrum {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid`, in bytes (0 once it is gone).
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Writes `bytes` to `path` the way an operator's deploy tool should: to a
/// temp file beside it, then an atomic rename.
pub fn install_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-upload");
    std::fs::write(&tmp, bytes).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename into place");
}

/// Runs `fulcrum check` on config text; returns (success, stderr).
pub fn check(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("fulcrum.toml");
    std::fs::write(&path, config).expect("write config");
    check_file(&path)
}

pub fn check_file(path: &Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["check", "--config"])
        .arg(path)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run fulcrum check");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// One answer, as a test needs it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub backend: Option<String>,
    pub body: Bytes,
}

/// Sends one request on a fresh connection, bounded by 10 s.
pub async fn send(addr: SocketAddr, request: http::Request<Full<Bytes>>) -> Result<Reply, String> {
    tokio::time::timeout(Duration::from_secs(10), async move {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(connection);
        let response = sender.send_request(request).await.map_err(|e| format!("send: {e}"))?;
        let status = response.status().as_u16();
        let backend = response
            .headers()
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Reply { status, backend, body })
    })
    .await
    .map_err(|_| "timed out after 10 s".to_string())?
}

/// A fresh HTTP/1.1 client connection to `addr`, its driver spawned.
pub async fn http1_sender<B>(addr: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<B>, String>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// A bare TCP "backend" on 127.0.0.1 that runs `handle` on every connection it
/// accepts, for behaviour no HTTP server would show (hanging, resetting,
/// stalling). It stops when dropped.
pub struct RawBackend {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    pub async fn start<F, Fut>(handle: F) -> RawBackend
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(handle(stream));
            }
        });
        RawBackend { addr, task }
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// GET `path` on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Reply, String> {
    let request = http::Request::get(path)
        .header("host", "test.local")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    send(addr, request).await
}

/// Counts replies per backend name.
pub fn tally(replies: &[Reply]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for reply in replies {
        *counts
            .entry(
                reply
                    .backend
                    .clone()
                    .unwrap_or_else(|| format!("status {}", reply.status)),
            )
            .or_insert(0) += 1;
    }
    counts
}

/// A pool's `backends = [...]` TOML value for demo backends, with weights.
pub fn backends_toml(backends: &[DemoBackend], weights: &[u32]) -> String {
    let items: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| match weights.get(i) {
            Some(w) => format!("{{ address = \"{}\", weight = {w} }}", b.addr),
            None => format!("\"{}\"", b.addr),
        })
        .collect();
    format!("[{}]", items.join(", "))
}

/// Clients that send requests until stopped, counting answers and failures.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    pub fn start(addr: SocketAddr, clients: usize, path: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut errors = Vec::new();
                    // Bounded: stops when told, or after 20,000 requests.
                    for _ in 0..20_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match get(addr, path).await {
                            Ok(reply) if reply.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                            Ok(reply) => {
                                errors.push(format!("status {}: {:?}", reply.status, reply.body));
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(e) => {
                                errors.push(e);
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                    errors
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    /// Stops the clients; returns (answers, failures, the failures' reasons).
    pub async fn finish(self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for task in self.tasks {
            errors.extend(task.await.expect("load task"));
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}
