//! The command line: help, JSON logs, and a clean stop on SIGINT.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn help_explains_the_commands() {
    let output = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for word in ["run", "check", "--log-format", "RUST_LOG", "README.md"] {
        assert!(help.contains(word), "--help mentions {word}:\n{help}");
    }
}

#[test]
fn json_logs_and_a_clean_stop_on_sigint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let path = dir.path().join("fulcrum.toml");
    std::fs::write(
        &path,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\n[pools.web]\nbackends = [\"127.0.0.1:9\"]\n"),
    )
    .expect("write config");
    let child = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fulcrum");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "fulcrum did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let output = child.wait_with_output().expect("wait for fulcrum");
    assert!(output.status.success(), "exit status {}", output.status);
    let logs = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = logs.lines().collect();
    assert!(lines.len() >= 2, "{logs}");
    for line in lines {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            entry["level"].is_string() && entry["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(logs.contains("SIGINT received"), "{logs}");
}
