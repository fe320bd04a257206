//! Bad configs: `fulcrum check` and `fulcrum run` exit non-zero with one line
//! that names the file, the key and the reason.

mod common;

use common::*;

const GOOD: &str =
    "[server]\nlisten = \"127.0.0.1:18080\"\n[pools.web]\npolicy = \"least-conn\"\nbackends = [\"127.0.0.1:9001\"]\n";

fn assert_refused(config: &str, key: &str, reason: &str) {
    let (ok, stderr) = check(config);
    assert!(!ok, "config should be refused:\n{config}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("fulcrum: "))
        .unwrap_or_else(|| panic!("no error line in:\n{stderr}"));
    assert!(line.contains("fulcrum.toml"), "names the file: {line}");
    assert!(line.contains(key), "names the key {key}: {line}");
    assert!(line.contains(reason), "says {reason}: {line}");
}

#[test]
fn a_good_config_checks_ok() {
    let (ok, stderr) = check(GOOD);
    assert!(ok, "{stderr}");
}

#[test]
fn unreadable_file() {
    let (ok, stderr) = check_file(std::path::Path::new("/nonexistent/fulcrum.toml"));
    assert!(!ok);
    assert!(
        stderr.contains("/nonexistent/fulcrum.toml") && stderr.contains("cannot read"),
        "{stderr}"
    );
}

#[test]
fn toml_syntax_error() {
    assert_refused(&GOOD.replace("[pools.web]", "[pools.web"), "(syntax)", "line 3");
}

#[test]
fn unknown_key() {
    assert_refused(
        &GOOD.replace("policy =", "polcy ="),
        "pools.web",
        "unknown field `polcy`",
    );
}

#[test]
fn unknown_pool_in_route() {
    assert_refused(
        &format!("{GOOD}[[routes]]\npool = \"api\"\n"),
        "routes[0].pool",
        "unknown pool `api`",
    );
}

#[test]
fn unknown_policy() {
    assert_refused(
        &GOOD.replace("least-conn", "fastest"),
        "pools.web.policy",
        "unknown policy `fastest`",
    );
    let with_dir = GOOD
        .replace("least-conn", "fastest")
        .replace("[pools.web]", "[plugins]\ndir = \".\"\n[pools.web]");
    assert_refused(&with_dir, "pools.web.policy", "no fastest.wasm in");
}

#[test]
fn bad_address() {
    assert_refused(
        &GOOD.replace("127.0.0.1:9001", "127.0.0.1:http"),
        "pools.web.backends[0]",
        "not an address",
    );
    assert_refused(
        &GOOD.replace("127.0.0.1:18080", "nowhere"),
        "server.listen",
        "not an address",
    );
}

#[test]
fn bad_duration_and_size() {
    assert_refused(
        &format!("{GOOD}response_timeout = \"soon\"\n"),
        "pools.web.response_timeout",
        "not a duration",
    );
    assert_refused(
        &GOOD.replace("[pools.web]", "[plugins]\ncall_timeout = \"5 parsecs\"\n[pools.web]"),
        "plugins.call_timeout",
        "not a duration",
    );
    assert_refused(
        &GOOD.replace("[pools.web]", "[plugins]\nmemory_limit = \"16 bananas\"\n[pools.web]"),
        "plugins.memory_limit",
        "not a size",
    );
}

#[test]
fn plugin_refusing_its_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::copy(wasm("misbehave.wasm"), dir.path().join("picky.wasm")).expect("copy plugin");
    // Two pools use the plugin; the second one's config is the bad one.
    let text = GOOD
        .replace("least-conn\"", "picky\"")
        .replace("[pools.web]", "[plugins]\ndir = \".\"\n[pools.api]\npolicy = \"picky\"\nbackends = [\"127.0.0.1:9002\"]\npolicy_config = { mode = \"refuse\" }\n[pools.web]")
        + "[[routes]]\npool = \"web\"\n";
    let path = dir.path().join("fulcrum.toml");
    std::fs::write(&path, text).expect("write");
    let (ok, stderr) = check_file(&path);
    assert!(!ok);
    assert!(
        stderr.contains("pools.api.policy_config:") && stderr.contains("refused its config"),
        "the pool with the bad config is named: {stderr}"
    );
    // A filter table naming a balancer-only plugin: the world is named, not the config.
    let text = GOOD.replace("least-conn\"", "picky\"").replace(
        "[pools.web]",
        "[plugins]\ndir = \".\"\n[filters.f]\nplugin = \"picky\"\n[pools.web]",
    );
    std::fs::write(&path, text).expect("write");
    let (ok, stderr) = check_file(&path);
    assert!(!ok);
    assert!(
        stderr.contains("filters.f.plugin:") && stderr.contains("must export a filter"),
        "{stderr}"
    );
}

#[test]
fn run_exits_non_zero_on_a_bad_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("fulcrum.toml");
    std::fs::write(&path, GOOD.replace("least-conn", "fastest")).expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("run fulcrum");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("pools.web.policy"), "{stderr}");
}

#[test]
fn missing_plugin_directory() {
    assert_refused(
        &GOOD.replace("[pools.web]", "[plugins]\ndir = \"no-such-dir\"\n[pools.web]"),
        "plugins.dir",
        "cannot read the plugin directory",
    );
}

#[test]
fn bad_listener_settings() {
    let pools = "[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n";
    let cases = [
        (
            "[server]\n[[server.listeners]]\nproxy_protocol = true\n",
            "server.listeners[0].listen",
            "required",
        ),
        ("[server]\nproxy_protocol = true\n", "server.listen", "not set"),
        ("[server]\n", "server.listen", "required"),
        (
            "[server]\nlisten = \"127.0.0.1:18080\"\n[[server.listeners]]\nlisten = \"127.0.0.1:18080\"\n",
            "server.listeners[0].listen",
            "is also server.listen",
        ),
        (
            "[server]\nlisten = \"127.0.0.1:18080\"\nmax_headers = 500\n",
            "server.max_headers",
            "from 1 to 100",
        ),
        (
            "[server]\nlisten = \"127.0.0.1:18080\"\nmax_head_size = \"10MiB\"\n",
            "server.max_head_size",
            "1MiB",
        ),
        (
            "[server]\nlisten = \"127.0.0.1:18080\"\ntrusted_proxies = [\"10.0.0.0/40\"]\n",
            "server.trusted_proxies",
            "not an address or a CIDR",
        ),
        (
            "[server]\nlisten = \"127.0.0.1:18080\"\ntls = { cert = \"a.pem\", key = \"a.key\" }\nredirect_https = 443\n",
            "server.redirect_https",
            "plain listener",
        ),
        (
            "[server]\nlisten = \"127.0.0.1:18080\"\ntls = { cert = \"a.pem\", key = \"a.key\", client_auth = \"optional\" }\n",
            "server.tls.client_auth",
            "needs client_ca",
        ),
    ];
    for (server, key, reason) in cases {
        assert_refused(&format!("{server}{pools}"), key, reason);
    }
}

#[test]
fn bad_backend_protocol_and_tls_settings() {
    let server = "[server]\nlisten = \"127.0.0.1:18080\"\n";
    let pool = |settings: &str| format!("{server}[pools.api]\nbackends = [\"127.0.0.1:9001\"]\n{settings}");
    let cases = [
        ("protocol = \"http2\"\n", "pools.api.protocol", "\"h2c\""),
        (
            "protocol = \"h2\"\ntls = false\n",
            "pools.api.tls",
            "for cleartext HTTP/2 use protocol = \"h2c\"",
        ),
        (
            "protocol = \"h2c\"\ntls = true\n",
            "pools.api.tls",
            "over TLS use protocol = \"h2\"",
        ),
        (
            "tls = { cert = \"client.pem\" }\n",
            "pools.api.tls.key",
            "needs its key",
        ),
        (
            "tls = { sni = \"not a name!\" }\n",
            "pools.api.tls.sni",
            "not a DNS name",
        ),
        (
            "protocol = \"h2c\"\nsend_proxy_protocol = \"v2\"\n",
            "pools.api.send_proxy_protocol",
            "multiplexes",
        ),
        (
            "[pools.api.health]\ntype = \"grpc\"\n",
            "pools.api.health.type",
            "needs HTTP/2",
        ),
        (
            "protocol = \"h2c\"\n[pools.api.health]\ntype = \"grpc\"\npath = \"/\"\n",
            "pools.api.health.path",
            "name a `service`",
        ),
        (
            "[pools.api.health]\nservice = \"api\"\n",
            "pools.api.health.service",
            "only a grpc check",
        ),
    ];
    for (settings, key, reason) in cases {
        assert_refused(&pool(settings), key, reason);
    }
    // Files are read when the pool is built: a missing CA file is named with its key.
    assert_refused(
        &pool("tls = { ca = \"/nonexistent/ca.pem\" }\n"),
        "pools.api.tls.ca",
        "/nonexistent/ca.pem",
    );
}

#[test]
fn bad_traffic_management_settings() {
    let server = "[server]\nlisten = \"127.0.0.1:18080\"\n";
    let pool = |settings: &str| format!("{server}[pools.api]\nbackends = [\"127.0.0.1:9001\"]\n{settings}");
    let cases = [
        ("max_in_flight = 0\n", "pools.api.max_in_flight", "at least 1"),
        (
            "retry_on = [\"5xx\", \"sometimes\"]\n",
            "pools.api.retry_on[1]",
            "`sometimes` is not",
        ),
        ("retry_on = [700]\n", "pools.api.retry_on[0]", "not an HTTP status"),
        ("retry_budget = 150\n", "pools.api.retry_budget", "0 to 100"),
        ("panic_threshold = 101\n", "pools.api.panic_threshold", "0 (off) to 100"),
        ("per_try_timeout = \"soon\"\n", "pools.api.per_try_timeout", "soon"),
        (
            "[pools.api.circuit_breaker]\nmax_pendings = 3\n",
            "pools.api.circuit_breaker",
            "max_pendings",
        ),
    ];
    for (settings, key, reason) in cases {
        assert_refused(&pool(settings), key, reason);
    }
    assert_refused(
        &format!("{server}[pools.api]\nbackends = [{{ address = \"127.0.0.1:9001\", max_in_flight = 0 }}]\n"),
        "pools.api.backends[0].max_in_flight",
        "at least 1",
    );
}

#[test]
fn bad_filters_and_plugin_limits() {
    let base = "[server]\nlisten = \"127.0.0.1:18080\"\n[pools.api]\nbackends = [\"127.0.0.1:9001\"]\n";
    let cases = [
        (
            "[[routes]]\npool = \"api\"\nfilters = [\"nope\"]\n",
            "routes[0].filters[0]",
            "unknown filter `nope`",
        ),
        (
            "[filters.f]\nplugin = \"round-robin\"\non_fault = \"maybe\"\n",
            "filters.f.on_fault",
            "not \"allow\" or \"deny\"",
        ),
        (
            "[filters.f]\nplugin = \"round-robin\"\n",
            "filters.f.plugin",
            "is not a filter",
        ),
        (
            "[filters.f]\nplugin = \"absent\"\n",
            "filters.f.plugin",
            "unknown plugin `absent`",
        ),
        (
            "[[routes]]\npool = \"api\"\nbody_prefix = \"2MiB\"\n",
            "routes[0].body_prefix",
            "at most 1024 KiB",
        ),
        (
            "[[routes]]\npool = \"api\"\nbody_prefix = \"128KiB\"\n",
            "routes[0].body_prefix",
            "more than pool `api`'s retry_buffer",
        ),
        (
            "[plugins.limits.round-robin]\ncall_timeout = \"0s\"\n",
            "plugins.limits.round-robin.call_timeout",
            "more than 0",
        ),
        (
            "[plugins.limits.round-robin]\nmemory_limit = \"lots\"\n",
            "plugins.limits.round-robin.memory_limit",
            "",
        ),
        (
            "[plugins]\nshared_entries = 0\n",
            "plugins.shared_entries",
            "at least 1",
        ),
        (
            "[filters.f]\nplugin = \"../elsewhere/canary\"\n",
            "filters.f.plugin",
            "is not a plugin name",
        ),
        (
            "[plugins.limits.round-robin]\ncall_timeout = \"1h\"\n",
            "plugins.limits.round-robin.call_timeout",
            "at most 10s",
        ),
        (
            "[plugins]\ncall_timeout = \"11s\"\n",
            "plugins.call_timeout",
            "at most 10s",
        ),
        (
            "[plugins.limits.round-robin]\nmemory_limit = \"0B\"\n",
            "plugins.limits.round-robin.memory_limit",
            "at least 64KiB",
        ),
        (
            "[plugins.limits.round-robin]\nmemory_limit = \"8GiB\"\n",
            "plugins.limits.round-robin.memory_limit",
            "at most 4GiB",
        ),
        (
            "[filters.f]\nplugin = \"round-robin\"\n[[routes]]\npool = \"api\"\nfilters = [\"f\", \"f\"]\n",
            "routes[0].filters[1]",
            "listed twice",
        ),
    ];
    for (settings, key, reason) in cases {
        let config = if settings.starts_with("[plugins]") {
            format!("{settings}{base}")
        } else {
            format!("{base}{settings}")
        };
        assert_refused(&config, key, reason);
    }
    // Limits for a plugin nothing uses: accepted, with a warning naming them.
    let (ok, stderr) = check(&format!("{base}[plugins.limits.round_robin]\ncall_timeout = \"1ms\"\n"));
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("plugins.limits.round_robin")
            && stderr.contains("no pool or filter uses a plugin called `round_robin`"),
        "{stderr}"
    );
    // A plugin's own memory_limit below what it needs: its init cannot run.
    let tight = format!("{base}[plugins.limits.least-conn]\nmemory_limit = \"64KiB\"\n");
    let tight = tight.replace("[pools.api]\n", "[pools.api]\npolicy = \"least-conn\"\n");
    assert_refused(&tight, "pools.api.policy_config", "least-conn");
}
