//! `fulcrum plugin check FILE.wasm`: what a plugin author runs before
//! dropping a component into the plugin directory. It compiles the file,
//! lists what it imports and exports, links it against the balancer world,
//! runs `init` with the given config, then makes smoke decisions against
//! sample pools and requests (healthy and unhealthy backends, retries) and
//! times them. Every step that fails says why, and the check stops there.

use super::{CurrentRequest, Limits, Plugin, PluginSlot, PluginSource, Policy, PolicyCounters, PoolView};
use crate::backend::{Backend, BackendList, BackendState};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the check found: lines for the author, in order.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
}

impl Report {
    fn say(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }
}

/// Why a plugin failed its check: the step, the reason, and what was
/// found before it.
#[derive(Debug)]
pub struct Failed {
    pub report: Report,
    pub step: &'static str,
    pub reason: String,
}

/// Checks `file` with `config` (the pool's `policy_config` as JSON), making
/// `calls` smoke decisions.
pub fn check(file: &Path, config: &str, calls: usize, limits: Limits) -> Result<Report, Box<Failed>> {
    let mut report = Report::default();
    let fail = |report: Report, step, reason: String| Box::new(Failed { report, step, reason });
    let bytes = match std::fs::read(file) {
        Ok(bytes) => bytes,
        Err(e) => return Err(fail(report, "read", format!("{}: {e}", file.display()))),
    };
    report.say(format!("file: {} ({} bytes)", file.display(), bytes.len()));
    let name = super::registry::plugin_name(file).unwrap_or("plugin");
    if let Err(reason) = serde_json::from_str::<serde_json::Value>(config) {
        return Err(fail(report, "config", format!("--config is not JSON: {reason}")));
    }

    let runtime = super::engine::Runtime::get();
    let started = Instant::now();
    let component = match runtime.compile(name, &bytes) {
        Ok(component) => component,
        Err(e) => return Err(fail(report, "compile", super::engine::one_line(&e))),
    };
    report.say(format!("compiled in {:.0?}", started.elapsed()));
    let ty = component.component_type();
    let imports: Vec<String> = ty.imports(&runtime.engine).map(|(name, _)| name.to_string()).collect();
    let exports: Vec<String> = ty.exports(&runtime.engine).map(|(name, _)| name.to_string()).collect();
    report.say(format!("imports: {}", list_or_none(&imports)));
    report.say(format!("exports: {}", list_or_none(&exports)));

    let plugin: Arc<Plugin> = match Plugin::load(name, &bytes, PluginSource::File(file.to_path_buf())) {
        Ok(plugin) => plugin,
        Err(e) => return Err(fail(report, "link", e.to_string())),
    };
    report.say(format!(
        "world: {} (digest {})",
        <super::BalancerWorld as super::instances::World>::NAME,
        plugin.digest
    ));
    if let Err(e) = plugin.check(config, &limits) {
        return Err(fail(report, "init", e.to_string()));
    }
    report.say(format!("init: ok with {config}"));

    let policy = Policy::new(PluginSlot::new(plugin), config, limits, PolicyCounters::default());
    let pool = sample_pool();
    let heads = sample_requests();
    let mut times = Vec::with_capacity(calls);
    let mut chosen = vec![0usize; pool.len()];
    let mut none = 0;
    for i in 0..calls {
        let head = &heads[i % heads.len()];
        let current = CurrentRequest {
            head,
            client: format!("192.0.2.{}:{}", 1 + i % 200, 40000 + i % 20000)
                .parse()
                .unwrap_or_else(|_| std::net::SocketAddr::from(([192, 0, 2, 1], 40000))),
        };
        // Every tenth a retry, after the first backend failed.
        let tried: &[usize] = if i % 10 == 9 { &[0] } else { &[] };
        let started = Instant::now();
        let choice = policy.choose(&current, &pool, tried, PoolView::default());
        times.push(started.elapsed());
        if let Some(fault) = choice.fault {
            return Err(fail(
                report,
                "decide",
                format!(
                    "decision {} of {calls} failed: {fault:?} (the balancer would use its fallback)",
                    i + 1
                ),
            ));
        }
        match choice.backend {
            Some(index) => chosen[index] += 1,
            None => none += 1,
        }
    }
    times.sort();
    let at = |q: f64| {
        times
            .get(((times.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    report.say(format!(
        "decisions: {calls}, p50 {} ns, p99 {} ns (the first ones start the instance)",
        at(0.5).as_nanos(),
        at(0.99).as_nanos()
    ));
    let split: Vec<String> = pool
        .iter()
        .zip(&chosen)
        .map(|(b, n)| {
            format!(
                "{} (weight {}{}) {n}",
                b.address,
                b.weight,
                if b.state.is_healthy() { "" } else { ", unhealthy" }
            )
        })
        .collect();
    report.say(format!("split: {}; none chosen: {none}", split.join(", ")));
    if chosen[3] > 0 {
        return Err(fail(
            report,
            "decide",
            "the plugin chose the unhealthy backend (the host would have refused it)".into(),
        ));
    }
    Ok(report)
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// Four backends: weights 1, 2, 1, 1, the last one unhealthy.
fn sample_pool() -> BackendList {
    let backends: Vec<Arc<Backend>> = (0..4)
        .map(|i| {
            let address = format!("10.0.0.{}:8080", i + 1);
            let state = Arc::new(BackendState::default());
            if i == 3 {
                state.set_up(false);
            }
            Arc::new(Backend {
                socket: std::net::SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)),
                address,
                weight: if i == 1 { 2 } else { 1 },
                state,
            })
        })
        .collect();
    backends.into()
}

/// A few requests of different shapes.
fn sample_requests() -> Vec<crate::http::RequestHead> {
    [
        "GET / HTTP/1.1\r\nhost: shop.example\r\n\r\n",
        "GET /api/users/42?page=2 HTTP/1.1\r\nhost: shop.example\r\nx-user: alice\r\ncookie: session=abc\r\n\r\n",
        "POST /api/orders HTTP/1.1\r\nhost: api.example\r\ncontent-type: application/json\r\ncontent-length: 2\r\nx-user: bob\r\n\r\n",
        "GET /static/app.js HTTP/1.1\r\nhost: cdn.example\r\naccept: */*\r\n\r\n",
    ]
    .iter()
    .filter_map(|text| crate::http::h1::parse_request(&mut bytes::BytesMut::from(*text)).ok().flatten())
    .collect()
}

/// Limits the check runs with: the defaults of `[plugins]`.
pub const DEFAULT_LIMITS: Limits = Limits {
    call_timeout: Duration::from_millis(5),
    memory_limit: 16 << 20,
};
