//! A test-only plugin that is both a filter and a balancer, each of its
//! acts triggered by the request, so one component shows every part of the
//! filter world through the balancer:
//!
//! - path `/deny…`: 403 with a body; `/limited…`: 429 with `Retry-After: 2`;
//!   `/redirect…`: 302 to `/elsewhere`; `/trap…`: a trap (a fault).
//! - every other request goes on with `x-probe: seen` set, `x-remove-me`
//!   removed, `x-added` appended, and `on-response` asked for, which adds
//!   `x-probe-status: STATUS` and `x-probe-saw: VALUE` (the response's
//!   `x-backend` header) to the response;
//! - header `x-pool: NAME` sends the request to pool NAME;
//! - header `x-to-backend: N` becomes the metadata `backend = N`, which the
//!   balancer side follows (any other request goes to the first healthy
//!   backend);
//! - a body prefix with `"model":"NAME"` sets `x-model: NAME` upstream;
//! - as a balancer, a request with `x-report: 1` logs, for every backend,
//!   what the host says of it: `backend ID: weight W, max-in-flight M, full
//!   F, in-flight I (read R)` (the `weight`, `max-in-flight`, `full` and
//!   `in-flight` signals). `in-flight` is prefetched, so I comes from the
//!   decision's hint and R from a `read-one` call: they must agree.
//!
//! `config = { "label": "..." }` is echoed in `x-probe-label` when given.
// Only a Wasm component: there is nothing to build or test on the host.
#![cfg(target_arch = "wasm32")]

use fulcrum_plugin_sdk::{
    Backend, BackendId, Balancer, EditOp, Filter, HeaderEdit, Plugin, Proceed, Respond, Signal, Verdict, log, request,
    response,
};

#[derive(Default, serde::Deserialize)]
#[serde(default)]
struct Config {
    label: Option<String>,
}

struct Probe {
    label: Option<String>,
    healthy: Vec<BackendId>,
    /// Every backend's id and its `max-in-flight` as pushed.
    pushed: Vec<(BackendId, u32)>,
    /// `weight`, `max-in-flight`, `full`, `in-flight`.
    signals: [Signal; 4],
}

impl Plugin for Probe {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        Ok(Probe {
            label: config.label,
            healthy: Vec::new(),
            pushed: Vec::new(),
            signals: [
                Signal::resolve("weight")?,
                Signal::resolve("max-in-flight")?,
                Signal::resolve("full")?,
                Signal::resolve("in-flight")?.prefetch(),
            ],
        })
    }
}

/// The value of `"model":"…"` in a JSON text, if any.
fn model_in(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let rest = text.split("\"model\"").nth(1)?;
    let rest = rest.trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
    Some(rest.split('"').next()?.to_string())
}

impl Filter for Probe {
    fn on_request(&mut self) -> Verdict {
        let path = request::path();
        if path.starts_with("/deny") {
            return Respond::status(403).text("denied by the probe filter\n").into();
        }
        if path.starts_with("/limited") {
            return Respond::status(429)
                .header("retry-after", "2")
                .text("slow down\n")
                .into();
        }
        if path.starts_with("/trap") {
            core::arch::wasm32::unreachable();
        }
        if path.starts_with("/redirect") {
            return Respond::status(302).header("location", "/elsewhere").into();
        }
        let mut proceed = Proceed::new()
            .set_header("x-probe", "seen")
            .remove_header("x-remove-me")
            .append_header("x-added", "by-probe")
            .wants_response();
        if let Some(label) = &self.label {
            proceed = proceed.set_header("x-probe-label", label);
        }
        if let Some(pool) = request::header("x-pool") {
            proceed = proceed.pool(&pool);
        }
        if let Some(backend) = request::header("x-to-backend") {
            proceed = proceed.metadata("backend", &backend);
        }
        if let Some(model) = model_in(&request::body_prefix()) {
            proceed = proceed.set_header("x-model", &model);
        }
        proceed.into()
    }

    fn on_response(&mut self) -> Vec<HeaderEdit> {
        vec![
            HeaderEdit {
                op: EditOp::Set,
                name: "x-probe-status".into(),
                value: response::status().to_string(),
            },
            HeaderEdit {
                op: EditOp::Set,
                name: "x-probe-saw".into(),
                value: response::header("x-backend").unwrap_or_default(),
            },
        ]
    }
}

impl Balancer for Probe {
    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.healthy = backends.iter().filter(|b| b.healthy).map(|b| b.id).collect();
        self.pushed = backends.iter().map(|b| (b.id, b.max_in_flight)).collect();
    }

    fn select(&mut self) -> Option<BackendId> {
        if request::header("x-report").is_some() {
            for &(id, pushed_max) in &self.pushed {
                let [weight, max, full, in_flight] = self.signals.map(|s| s.read(id).map_or(-1, i64::from));
                let read = fulcrum_plugin_sdk::backends::signal("in-flight")
                    .and_then(|signal| fulcrum_plugin_sdk::backends::read_one(signal, id))
                    .map_or(-1, i64::from);
                fulcrum_plugin_sdk::log(
                    log::Level::Info,
                    &format!(
                        "backend {id}: weight {weight}, max-in-flight {max} (pushed {pushed_max}), full {full}, in-flight {in_flight} (read {read})"
                    ),
                );
            }
        }
        match request::metadata("backend").and_then(|b| b.parse().ok()) {
            Some(id) => Some(id),
            None => self.healthy.first().copied(),
        }
    }
}

fulcrum_plugin_sdk::export_balancer_and_filter!(Probe);
