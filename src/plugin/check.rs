//! `fulcrum plugin check FILE.wasm`: what a plugin author runs before
//! dropping a component into the plugin directory. It compiles the file,
//! lists what it imports and exports, links it against the plugin world,
//! runs `init` with the given config, then makes smoke calls and times them:
//! a balancer decides against a sample pool and requests (healthy and
//! unhealthy backends, retries), a filter judges sample requests. Every step
//! that fails says why, and the check stops there.

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

/// How `plugin check` exercises a plugin.
pub struct Smoke {
    /// Smoke calls to make (at least 1).
    pub calls: usize,
    pub limits: Limits,
    /// The pools a filter may send a request to (`--pools`).
    pub pools: Vec<String>,
}

/// Checks `file` with `config` (the pool's `policy_config` as JSON), making
/// `smoke.calls` smoke calls.
pub fn check(file: &Path, config: &str, smoke: &Smoke) -> Result<Report, Box<Failed>> {
    let (calls, limits) = (smoke.calls.max(1), smoke.limits);
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
    report.say(format!("world: {} (digest {})", plugin.pre.describe(), plugin.digest));
    if let Err(e) = plugin.check(config, &limits) {
        return Err(fail(report, "init", e.to_string()));
    }
    report.say(format!("init: ok with {config}"));
    if plugin.pre.is_balancer() {
        report = check_balancer(report, plugin.clone(), config, calls, limits)?;
    }
    if plugin.pre.is_filter() {
        report = check_filter(report, plugin, config, calls, limits, &smoke.pools)?;
    }
    Ok(report)
}

/// Smoke calls of a filter: `on-request` on the sample requests in turn.
fn check_filter(
    mut report: Report,
    plugin: Arc<Plugin>,
    config: &str,
    calls: usize,
    limits: Limits,
    pools: &[String],
) -> Result<Report, Box<Failed>> {
    let fail = |report: Report, step, reason: String| Box::new(Failed { report, step, reason });
    let filter = super::Filter::new(
        "check",
        PluginSlot::new(plugin),
        config,
        limits,
        super::OnFault::Allow,
        super::Tickets::default(),
    );
    let heads = sample_requests();
    let mut times = Vec::with_capacity(calls);
    let mut verdicts: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for i in 0..calls {
        let head = &heads[i % heads.len()];
        let client = crate::http::ClientAddr::new(std::net::SocketAddr::from((
            [192, 0, 2, 1 + (i % 200) as u8],
            40000 + (i % 20000) as u16,
        )));
        let current = sample_request(head, &client);
        let started = Instant::now();
        let verdict = filter.on_request(&current, |pool| pools.iter().any(|p| p == pool));
        times.push(started.elapsed());
        let verdict = match verdict {
            Ok(verdict) => verdict,
            Err(fault) => {
                return Err(fail(
                    report,
                    "filter",
                    format!(
                        "call {} of {calls} failed: {fault} (the balancer would apply the filter's on_fault)",
                        i + 1
                    ),
                ));
            }
        };
        let kind = match verdict {
            super::FilterVerdict::Proceed { pool: Some(pool), .. } => format!("proceed to pool {pool}"),
            super::FilterVerdict::Proceed { .. } => "proceed".to_string(),
            super::FilterVerdict::Respond(answer) => format!("respond {}", answer.status.as_u16()),
        };
        *verdicts.entry(kind).or_default() += 1;
    }
    let (p50, p99) = p50_p99(&mut times);
    report.say(format!(
        "filter calls: {calls}, p50 {} ns, p99 {} ns (the first ones start the instance)",
        p50.as_nanos(),
        p99.as_nanos()
    ));
    let verdicts: Vec<String> = verdicts.iter().map(|(kind, n)| format!("{kind} {n}")).collect();
    report.say(format!("verdicts: {}", verdicts.join(", ")));
    Ok(report)
}

/// Smoke decisions of a balancer against the sample pool.
fn check_balancer(
    mut report: Report,
    plugin: Arc<Plugin>,
    config: &str,
    calls: usize,
    limits: Limits,
) -> Result<Report, Box<Failed>> {
    let fail = |report: Report, step, reason: String| Box::new(Failed { report, step, reason });

    let policy = Policy::new(PluginSlot::new(plugin), config, limits, PolicyCounters::default());
    let pool = sample_pool();
    let heads = sample_requests();
    let mut times = Vec::with_capacity(calls);
    let mut chosen = vec![0usize; pool.len()];
    let mut none = 0;
    for i in 0..calls {
        let head = &heads[i % heads.len()];
        let client = crate::http::ClientAddr::new(std::net::SocketAddr::from((
            [192, 0, 2, 1 + (i % 200) as u8],
            40000 + (i % 20000) as u16,
        )));
        let current = sample_request(head, &client);
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
                    "decision {} of {calls} failed: {fault} (the balancer would use its fallback)",
                    i + 1
                ),
            ));
        }
        match choice.backend {
            Some(index) => chosen[index] += 1,
            None => none += 1,
        }
    }
    let (p50, p99) = p50_p99(&mut times);
    report.say(format!(
        "decisions: {calls}, p50 {} ns, p99 {} ns (the first ones start the instance)",
        p50.as_nanos(),
        p99.as_nanos()
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
    if let Some(peak) = policy.peak_memory() {
        report.say(format!(
            "memory: {} KiB of linear memory at most, of the {} KiB memory_limit",
            peak / 1024,
            limits.memory_limit / 1024
        ));
    }
    if chosen[3] > 0 {
        return Err(fail(
            report,
            "decide",
            "the plugin chose the unhealthy backend (the host would have refused it)".into(),
        ));
    }
    Ok(report)
}

/// The median and the 99th percentile of `times` (sorted in place).
fn p50_p99(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    let at = |q: f64| {
        times
            .get(((times.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    (at(0.5), at(0.99))
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
                id: i,
                labels: Arc::from(Vec::new()),
                socket: std::net::SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)),
                address,
                weight: if i == 1 { 2 } else { 1 },
                state,
            })
        })
        .collect();
    backends.into()
}

/// `head` from `client` as a plugin reads it: no filters, no body prefix.
fn sample_request<'a>(head: &'a crate::http::RequestHead, client: &'a crate::http::ClientAddr) -> CurrentRequest<'a> {
    CurrentRequest {
        head,
        client: client.addr,
        connection: client,
        body_prefix: &[],
        changes: super::RequestChanges::none(),
        pool: "sample",
    }
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

/// How `fulcrum plugin test` exercises a policy.
#[derive(Debug, Clone)]
pub struct TestPlan {
    /// The pool's `policy_config`, as JSON.
    pub config: String,
    /// Weights of the pool's backends (their count is the pool's size).
    pub weights: Vec<u32>,
    /// Distinct requests (keys), each decided once per pool shape.
    pub keys: usize,
    /// The seed of the plugin's `random` (the same seed, the same draws).
    pub seed: u64,
}

/// Runs `plan` on `file`: the split over the pool, determinism, the share
/// of keys remapped when a backend is removed, added or goes unhealthy, and
/// the cost per decision. Keys are requests with their own `x-user` header,
/// path and client address.
pub fn test(file: &Path, plan: &TestPlan, limits: Limits) -> Result<Report, Box<Failed>> {
    let mut report = Report::default();
    let fail = |report: Report, step, reason: String| Box::new(Failed { report, step, reason });
    if plan.weights.len() < 2 {
        return Err(fail(report, "plan", "a pool of at least 2 backends is needed".into()));
    }
    let bytes = std::fs::read(file).map_err(|e| fail(Report::default(), "read", format!("{}: {e}", file.display())))?;
    let name = super::registry::plugin_name(file).unwrap_or("plugin");
    let plugin: Arc<Plugin> = Plugin::load(name, &bytes, PluginSource::File(file.to_path_buf()))
        .map_err(|e| fail(Report::default(), "load", e.to_string()))?;
    if !plugin.pre.is_balancer() {
        return Err(fail(
            Report::default(),
            "load",
            "this component is a filter: `plugin test` runs balancers (try `fulcrum plugin check`)".into(),
        ));
    }
    super::seed_random(plan.seed.max(1));
    plugin
        .check(&plan.config, &limits)
        .map_err(|e| fail(Report::default(), "init", e.to_string()))?;
    let slot = PluginSlot::new(plugin);
    let heads: Vec<crate::http::RequestHead> = (0..plan.keys)
        .filter_map(|i| {
            let text = format!("GET /item/{i} HTTP/1.1\r\nhost: shop.example\r\nx-user: user-{i}\r\n\r\n");
            crate::http::h1::parse_request(&mut bytes::BytesMut::from(text.as_str()))
                .ok()
                .flatten()
        })
        .collect();
    // Decides every key against `pool` on a fresh instance: the address chosen for each.
    let mut times = Vec::new();
    let mut decide_all = |pool: &BackendList, timed: bool| -> Result<Vec<Option<String>>, String> {
        let policy = Policy::new(slot.clone(), &plan.config, limits, PolicyCounters::default());
        let mut chosen = Vec::with_capacity(heads.len());
        for (i, head) in heads.iter().enumerate() {
            let client = crate::http::ClientAddr::new(std::net::SocketAddr::from((
                [198, 51, (i / 250 % 250) as u8, (i % 250) as u8 + 1],
                40000,
            )));
            let current = sample_request(head, &client);
            let started = Instant::now();
            let choice = policy.choose(&current, pool, &[], PoolView::default());
            if timed {
                times.push(started.elapsed());
            }
            if let Some(fault) = choice.fault {
                return Err(format!("decision {} failed: {fault}", i + 1));
            }
            chosen.push(choice.backend.map(|b| pool[b].address.clone()));
        }
        Ok(chosen)
    };
    let n = plan.weights.len();
    let base = pool_of(&plan.weights, None);
    let first = decide_all(&base, true).map_err(|e| fail(Report::default(), "decide", e))?;
    report.say(format!(
        "plugin: {} ({} keys, {n} backends, weights {:?})",
        file.display(),
        plan.keys,
        plan.weights
    ));

    // The split: each backend's count against its share (by weight) of the
    // keys that got a backend; the most loaded one's ratio is max/mean
    // (with equal weights, exactly the largest count over the mean count).
    let total_weight: u64 = plan.weights.iter().map(|&w| u64::from(w)).sum();
    let counts: Vec<usize> = base
        .iter()
        .map(|backend| {
            first
                .iter()
                .filter(|c| c.as_deref() == Some(backend.address.as_str()))
                .count()
        })
        .collect();
    let decided: usize = counts.iter().sum();
    let max = counts
        .iter()
        .zip(&plan.weights)
        .map(|(&count, &weight)| {
            let expected = decided as f64 * f64::from(weight) / total_weight as f64;
            if expected > 0.0 { count as f64 / expected } else { 0.0 }
        })
        .fold(0.0, f64::max);
    let split: Vec<String> = base
        .iter()
        .zip(&counts)
        .map(|(backend, count)| format!("{} {count}", backend.address))
        .collect();
    report.say(format!("split: {}", split.join(", ")));
    report.say(format!("split max/mean (by weight): {max:.2}"));

    let again = decide_all(&base, false).map_err(|e| fail(Report::default(), "decide", e))?;
    let differ = first.iter().zip(&again).filter(|(a, b)| a != b).count();
    report.say(if differ == 0 {
        "deterministic: yes (the same key, the same backend, on a fresh instance)".to_string()
    } else {
        format!(
            "deterministic: no ({differ} of {} keys went elsewhere on a fresh instance)",
            plan.keys
        )
    });

    let percent = |part: usize, whole: usize| {
        if whole == 0 {
            0.0
        } else {
            100.0 * part as f64 / whole as f64
        }
    };
    // One backend fewer (the last): which keys moved.
    let removed_address = base[n - 1].address.clone();
    let fewer =
        decide_all(&pool_of(&plan.weights[..n - 1], None), false).map_err(|e| fail(Report::default(), "decide", e))?;
    let moved = first.iter().zip(&fewer).filter(|(a, b)| a != b).count();
    let on_removed = first
        .iter()
        .filter(|c| c.as_deref() == Some(removed_address.as_str()))
        .count();
    let others_moved = first
        .iter()
        .zip(&fewer)
        .filter(|(a, b)| a.as_deref() != Some(removed_address.as_str()) && a != b)
        .count();
    report.say(format!(
        "remove a backend ({n} → {}): {:.1}% of keys remapped; of the other backends' keys {:.1}%",
        n - 1,
        percent(moved, plan.keys),
        percent(others_moved, plan.keys - on_removed)
    ));
    // One backend more.
    let mut more_weights = plan.weights.clone();
    more_weights.push(1);
    let more = decide_all(&pool_of(&more_weights, None), false).map_err(|e| fail(Report::default(), "decide", e))?;
    let moved = first.iter().zip(&more).filter(|(a, b)| a != b).count();
    report.say(format!(
        "add a backend ({n} → {}): {:.1}% of keys remapped",
        n + 1,
        percent(moved, plan.keys)
    ));
    // The first backend unhealthy: keys elsewhere should stay.
    let flipped =
        decide_all(&pool_of(&plan.weights, Some(0)), false).map_err(|e| fail(Report::default(), "decide", e))?;
    let first_address = base[0].address.clone();
    let on_first = first
        .iter()
        .filter(|c| c.as_deref() == Some(first_address.as_str()))
        .count();
    let others_moved = first
        .iter()
        .zip(&flipped)
        .filter(|(a, b)| a.as_deref() != Some(first_address.as_str()) && a != b)
        .count();
    let chose_unhealthy = flipped
        .iter()
        .filter(|c| c.as_deref() == Some(first_address.as_str()))
        .count();
    report.say(format!(
        "a backend unhealthy: {:.1}% of the other backends' keys remapped; the unhealthy one chosen {chose_unhealthy} times",
        percent(others_moved, plan.keys - on_first)
    ));
    let (p50, p99) = p50_p99(&mut times);
    report.say(format!(
        "cost: p50 {} ns, p99 {} ns per decision",
        p50.as_nanos(),
        p99.as_nanos()
    ));
    Ok(report)
}

/// A pool with `weights`, backend `unhealthy` (if any) down.
fn pool_of(weights: &[u32], unhealthy: Option<usize>) -> BackendList {
    let backends: Vec<Arc<Backend>> = weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| {
            let state = Arc::new(BackendState::default());
            if unhealthy == Some(i) {
                state.set_up(false);
            }
            Arc::new(Backend {
                // Ids by position: removing the last backend keeps the others' ids.
                id: i as u32,
                labels: Arc::from(Vec::new()),
                address: format!("10.1.{}.{}:8080", i / 250, i % 250 + 1),
                socket: std::net::SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8 + 1], 8080)),
                weight: weight.max(1),
                state,
            })
        })
        .collect();
    backends.into()
}
