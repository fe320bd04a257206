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

/// Runs `fulcrum plugin check` with `args`: exit success, stdout, stderr.
fn plugin_check(args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["plugin", "check"])
        .args(args)
        // Not the 5 ms default: tests run side by side on two cores, and a
        // stalled call would read as a deadline overrun.
        .args(["--call-timeout", "1s"])
        .env("RUST_LOG", "warn")
        .env("XDG_CACHE_HOME", std::env::temp_dir().join("fulcrum-cli-test-cache"))
        .output()
        .expect("run fulcrum plugin check");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn plugin_check_reports_worlds_init_and_timed_decisions_or_the_reason() {
    let header_hash = common::wasm("header_hash.wasm");
    let (ok, out, err) = plugin_check(&[
        header_hash.to_str().expect("path"),
        "--config",
        r#"{"header":"x-user"}"#,
    ]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("exports: fulcrum:plugin/lifecycle@0.2.0, fulcrum:plugin/policy@0.2.0"),
        "{out}"
    );
    assert!(out.contains("imports: fulcrum:plugin/request@0.2.0"), "{out}");
    assert!(out.contains("world: fulcrum:plugin@0.2.0 balancer "), "{out}");
    assert!(out.contains("init: ok"), "{out}");
    let decisions = out
        .lines()
        .find(|l| l.starts_with("decisions: 2000, p50 "))
        .expect("timed decisions");
    assert!(decisions.contains(" ns, p99 "), "{decisions}");
    let split = out.lines().find(|l| l.starts_with("split: ")).expect("split");
    assert!(
        split.contains("(weight 1, unhealthy) 0;"),
        "the unhealthy backend is never chosen: {split}"
    );
    let memory = out.lines().find(|l| l.starts_with("memory: ")).expect("memory line");
    let kib: usize = memory
        .trim_start_matches("memory: ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("KiB");
    assert!(
        (64..=16 * 1024).contains(&kib),
        "at least one Wasm page, within the limit: {memory}"
    );

    // A config its init refuses, a component of another world, a plugin
    // that traps: each refused with the step and the reason, exit 1.
    let wrong = common::wasm("wrong_world.wasm");
    let (ok, _, err) = plugin_check(&[wrong.to_str().expect("path")]);
    assert!(!ok);
    assert!(
        err.contains("link failed") && err.contains("fulcrum:plugin/lifecycle@0.2.0"),
        "{err}"
    );
    let misbehave = common::wasm("misbehave.wasm");
    let (ok, _, err) = plugin_check(&[misbehave.to_str().expect("path"), "--config", r#"{"mode":"trap"}"#]);
    assert!(!ok);
    assert!(err.contains("decide failed") && err.contains("unreachable"), "{err}");
    assert!(
        !err.contains("Trap(") && !err.contains("backtrace"),
        "in words, on one line: {err}"
    );
    let (ok, _, err) = plugin_check(&[misbehave.to_str().expect("path"), "--config", r#"{"mode":"bad-id"}"#]);
    assert!(!ok);
    assert!(
        err.contains("decide failed") && err.contains("it chose backend id 9999, which is unknown"),
        "{err}"
    );
    let (ok, _, err) = plugin_check(&[misbehave.to_str().expect("path"), "--config", r#"{"mode":"refuse"}"#]);
    assert!(!ok);
    assert!(
        err.contains("init failed") && err.contains("told to refuse its config"),
        "{err}"
    );
    let (ok, _, err) = plugin_check(&[header_hash.to_str().expect("path"), "--config", "not json"]);
    assert!(!ok);
    assert!(err.contains("config failed") && err.contains("not JSON"), "{err}");
    // The SDK's typed config: a misspelt key is refused with serde's reason.
    let (ok, _, err) = plugin_check(&[header_hash.to_str().expect("path"), "--config", r#"{"hedaer":"x"}"#]);
    assert!(!ok);
    assert!(
        err.contains("init failed") && err.contains("unknown field `hedaer`"),
        "{err}"
    );
}

#[test]
fn plugin_check_runs_a_filter_and_a_0_1_0_balancer() {
    let rate_limit = common::wasm("rate_limit.wasm");
    let (ok, out, err) = plugin_check(&[
        rate_limit.to_str().expect("path"),
        "--config",
        r#"{"rate": 10, "burst": 5}"#,
        "--calls",
        "50",
    ]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("world: fulcrum:plugin@0.2.0 filter "), "{out}");
    assert!(out.contains("filter calls: 50, p50 "), "{out}");
    // 50 calls from 50 client addresses spread over 200: each bucket has room.
    let verdicts = out.lines().find(|l| l.starts_with("verdicts: ")).expect("verdicts");
    assert_eq!(verdicts, "verdicts: proceed 50", "{out}");
    let (ok, _, err) = plugin_check(&[
        rate_limit.to_str().expect("path"),
        "--config",
        r#"{"rate": 0, "burst": 5}"#,
    ]);
    assert!(!ok && err.contains("rate must be a positive number"), "{err}");

    // A filter that overrides the pool: checked against the config's pool names.
    let canary = common::wasm("canary.wasm");
    let canary_config = r#"{"pool": "canary", "percent": 50}"#;
    let (ok, _, err) = plugin_check(&[canary.to_str().expect("path"), "--config", canary_config]);
    assert!(!ok && err.contains("pool `canary`, which does not exist"), "{err}");
    let (ok, out, err) = plugin_check(&[
        canary.to_str().expect("path"),
        "--config",
        canary_config,
        "--pools",
        "web,canary",
    ]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("proceed to pool canary"), "{out}");
    let (ok, _, err) = plugin_check(&[canary.to_str().expect("path"), "--calls", "0"]);
    assert!(!ok && err.contains("--calls"), "{err}");

    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/plugin-0.1.0/least_conn.wasm"
    );
    let (ok, out, err) = plugin_check(&[fixture]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("world: fulcrum:plugin@0.1.0 balancer "), "{out}");
    assert!(out.contains("imports: fulcrum:plugin/host@0.1.0"), "{out}");
}

/// The percentage on the `prefix` line of `plugin test`'s output.
fn percent_after(out: &str, prefix: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{out}"));
    let after = &line[line.find("): ").map_or(0, |i| i + 3)..];
    after
        .split('%')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no percentage in {line}"))
}

#[test]
fn plugin_test_gives_known_answers_for_a_modulo_and_a_consistent_hash() {
    let run = |file: &str, config: &str| {
        let path = common::wasm(file);
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
            .args(["plugin", "test"])
            .arg(&path)
            .args(["--config", config, "--backends", "4", "--keys", "8000"])
            .env("RUST_LOG", "warn")
            .env("XDG_CACHE_HOME", std::env::temp_dir().join("fulcrum-cli-test-cache"))
            .output()
            .expect("run fulcrum plugin test");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    // A hash modulo the pool's size: going from 4 to 3 backends moves ~75 % of keys.
    let modulo = run("misbehave.wasm", r#"{"mode":"modulo"}"#);
    let moved = percent_after(&modulo, "remove a backend (4 → 3)");
    assert!((70.0..80.0).contains(&moved), "modulo: {moved}%\n{modulo}");
    assert!(modulo.contains("deterministic: yes"), "{modulo}");
    // Jump consistent hashing (header-hash): only the removed backend's ~25 %.
    let jump = run("header_hash.wasm", r#"{"header":"x-user"}"#);
    let moved = percent_after(&jump, "remove a backend (4 → 3)");
    assert!((20.0..30.0).contains(&moved), "jump hash: {moved}%\n{jump}");
    assert!(jump.contains("of the other backends' keys 0.0%"), "{jump}");
    let split = jump
        .lines()
        .find_map(|l| l.strip_prefix("split max/mean (by weight): "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("split line");
    assert!(split < 1.1, "an even split: {split}\n{jump}");
    assert!(jump.contains("the unhealthy one chosen 0 times"), "{jump}");
    // Since it hashes over every backend by stable id, a backend going down
    // moves only its own keys.
    assert!(
        jump.contains("a backend unhealthy: 0.0% of the other backends' keys remapped"),
        "{jump}"
    );
    // Maglev: the removed backend's ~25 %, and very few others.
    let maglev = run("maglev.wasm", r#"{"header":"x-user"}"#);
    let moved = percent_after(&maglev, "remove a backend (4 → 3)");
    assert!((20.0..30.0).contains(&moved), "maglev: {moved}%\n{maglev}");
    let others = maglev
        .lines()
        .find(|l| l.starts_with("remove a backend"))
        .and_then(|l| l.split("of the other backends' keys ").nth(1))
        .and_then(|v| v.trim_end_matches('%').parse::<f64>().ok())
        .expect("others line");
    assert!(
        others <= 1.0,
        "maglev moves at most 1% of the others: {others}%\n{maglev}"
    );
    assert!(maglev.contains("deterministic: yes"), "{maglev}");

    // Arguments that would make the figures meaningless are refused.
    let path = common::wasm("header_hash.wasm");
    for args in [
        &["--weights", "0,1,1"][..],
        &["--keys", "0"],
        &["--backends", "3", "--weights", "1,1,1,1"],
        &["--backends", "1"],
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
            .args(["plugin", "test"])
            .arg(&path)
            .args(args)
            .output()
            .expect("run fulcrum plugin test");
        assert!(!output.status.success(), "{args:?} accepted");
    }
    // A heavy backend: the split is judged against each backend's share.
    let heavy = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["plugin", "test"])
        .arg(common::wasm("round_robin.wasm"))
        .args(["--weights", "4294967295,1,1,1", "--keys", "2000"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run fulcrum plugin test");
    let text = String::from_utf8_lossy(&heavy.stdout).into_owned();
    let split = text
        .lines()
        .find_map(|l| l.strip_prefix("split max/mean (by weight): "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("split line: {text}"));
    assert!(split < 2.0, "no overflow in the weights' sum: {split}\n{text}");
}

/// Where examples/build.sh installed the Python and JavaScript tools.
fn tools_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("FULCRUM_TOOLS") {
        return dir.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    cache.join("fulcrum/tools")
}

/// Runs `command`, asserting it succeeds; its stdout.
fn run_ok(command: &mut std::process::Command) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn plugin_new_makes_a_plugin_that_builds_and_passes_check_in_each_language() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fulcrum = env!("CARGO_BIN_EXE_fulcrum");
    let new = |lang: &str, name: &str| {
        run_ok(
            std::process::Command::new(fulcrum)
                .args(["plugin", "new", "--lang", lang, name, "--dir"])
                .arg(dir.path()),
        )
    };
    let check = |file: std::path::PathBuf| {
        let out = run_ok(
            std::process::Command::new(fulcrum)
                .args(["plugin", "check", "--calls", "50", "--call-timeout", "200ms"])
                .arg(&file)
                .env("RUST_LOG", "warn"),
        );
        assert!(out.contains("world: fulcrum:plugin@0.2.0 balancer "), "{out}");
        assert!(out.contains("none chosen: 0"), "{out}");
    };

    // Rust: the vendored SDK, built with this toolchain (a shared target dir
    // keeps the dependencies between runs).
    new("rust", "rusty");
    let target = std::env::temp_dir().join("fulcrum-plugin-new-target");
    run_ok(
        std::process::Command::new(env!("CARGO"))
            .args(["build", "--release", "--target", "wasm32-wasip2"])
            .current_dir(dir.path().join("rusty"))
            .env("CARGO_TARGET_DIR", &target)
            .env_remove("RUSTFLAGS"),
    );
    check(target.join("wasm32-wasip2/release/rusty.wasm"));
    // A second `new` of the same name refuses, and changes nothing.
    let again = std::process::Command::new(fulcrum)
        .args(["plugin", "new", "--lang", "rust", "rusty", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    // Python and JavaScript, with the tools examples/build.sh installed.
    let tools = tools_dir();
    new("python", "snake");
    run_ok(std::process::Command::new(dir.path().join("snake/build.sh")).env(
        "COMPONENTIZE_PY",
        tools.join(format!(
            "componentize-py-{}/bin/componentize-py",
            fulcrum::plugin::scaffold::tool_version("COMPONENTIZE_PY")
        )),
    ));
    check(dir.path().join("snake/snake.wasm"));
    new("js", "script");
    run_ok(std::process::Command::new(dir.path().join("script/build.sh")).env(
        "COMPONENTIZE_JS_DIR",
        tools.join(format!(
            "componentize-js-{}",
            fulcrum::plugin::scaffold::tool_version("COMPONENTIZE_JS")
        )),
    ));
    check(dir.path().join("script/script.wasm"));
}

#[test]
fn check_lists_the_pools_and_the_filters() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("plugins.d")).expect("plugin dir");
    std::fs::copy(common::wasm("rate_limit.wasm"), dir.path().join("plugins.d/limit.wasm")).expect("copy");
    let path = dir.path().join("fulcrum.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:18080\"\n[plugins]\ndir = \"plugins.d\"\n\
         [pools.web]\nbackends = [\"127.0.0.1:9001\"]\n\
         [filters.slow-down]\nplugin = \"limit\"\nconfig = { rate = 5, burst = 5 }\non_fault = \"deny\"\n\
         [[routes]]\npool = \"web\"\nfilters = [\"slow-down\"]\n",
    )
    .expect("write config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["check", "--config"])
        .arg(&path)
        .env("XDG_CACHE_HOME", std::env::temp_dir().join("fulcrum-cli-test-cache"))
        .output()
        .expect("run fulcrum check");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(out.contains("pool web: policy round-robin over 1 backends"), "{out}");
    assert!(
        out.contains("filter slow-down: plugin limit on 1 route(s), on_fault deny"),
        "{out}"
    );
}
