//! The services the host gives plugins, by interface: `log`, `clock`,
//! `random`, `shared` and `backends` of 0.2.0, and the frozen 0.1.0 `host`.
//! (The current request and response are read in request_view.rs.)

use super::engine::StoreState;
use super::world::{v1, v2};
use crate::backend::{Backend, now_ns};
use std::sync::atomic::Ordering;
use std::time::Duration;
use v2::fulcrum::plugin::backends::Batch;
use v2::fulcrum::plugin::log::Level;

/// The signals the host measures, by name; a signal's id is its index here.
pub const SIGNALS: [&str; 7] = [
    "in-flight",
    "max-in-flight",
    "full",
    "latency-ewma-us",
    "error-rate-ppm",
    "requests",
    "weight",
];

/// The value of signal `signal` for `backend`, `None` when it has none.
/// `now` is [`now_ns`], read once per batch (only the latency needs it).
fn signal_value(signal: u32, backend: &Backend, view: super::PoolView, now: u64) -> Option<u32> {
    let live = &backend.state;
    let saturated = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    match signal {
        0 => Some(live.in_flight()),
        1 => Some(live.max_in_flight()),
        2 => Some(u32::from(live.is_full())),
        3 => live.latency_ewma_us(now).map(saturated),
        4 => live.error_rate_ppm().map(saturated),
        // Modulo 2^32: plugins take differences.
        5 => Some(live.requests.load(Ordering::Relaxed) as u32),
        6 => Some(super::balancer::weight_in_hundredths(
            backend,
            view,
            crate::backend::process_ms(),
        )),
        _ => None,
    }
}

/// The latency signal's id: the one that reads the clock.
const LATENCY_SIGNAL: u32 = 3;

impl v2::fulcrum::plugin::types::Host for StoreState {}

impl v2::fulcrum::plugin::log::Host for StoreState {
    fn log(&mut self, level: Level, message: String) {
        // The WIT enum, `repr(u8)` in its declared order: trace 0 … error 4.
        write_log(&self.plugin_name, level as u8, &message);
    }
}

/// A plugin's log line at `level` (0 trace … 4 error).
fn write_log(plugin: &str, level: u8, message: &str) {
    match level {
        0 => tracing::trace!(plugin, "{message}"),
        1 => tracing::debug!(plugin, "{message}"),
        2 => tracing::info!(plugin, "{message}"),
        3 => tracing::warn!(plugin, "{message}"),
        _ => tracing::error!(plugin, "{message}"),
    }
}

impl v2::fulcrum::plugin::clock::Host for StoreState {
    fn now(&mut self) -> u64 {
        now_ns()
    }
}

impl v2::fulcrum::plugin::random::Host for StoreState {
    fn next(&mut self) -> u64 {
        // splitmix64 over the instance's own state (seeded in `StoreState::new`).
        self.random = self.random.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.random;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl v2::fulcrum::plugin::shared::Host for StoreState {
    fn next_ticket(&mut self, slot: u32) -> u64 {
        self.tickets
            .get(slot as usize)
            .map_or(0, |counter| counter.fetch_add(1, Ordering::Relaxed))
    }

    fn count(&mut self, key: String, delta: u64, window_ms: u32) -> u64 {
        let window = (window_ms > 0).then(|| Duration::from_millis(u64::from(window_ms)));
        self.shared.count(&key, delta, window, now_ns())
    }

    fn take(&mut self, key: String, rate: f64, burst: u32) -> Result<(), u64> {
        self.shared
            .take(&key, rate, burst, now_ns())
            .map_err(|wait| u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX))
    }

    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        self.shared.get(&key, now_ns())
    }

    fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: u32) -> bool {
        let ttl = (ttl_ms > 0).then(|| Duration::from_millis(u64::from(ttl_ms)));
        self.shared.set(&key, value, ttl, now_ns())
    }

    fn remove(&mut self, key: String) -> bool {
        self.shared.remove(&key)
    }
}

impl StoreState {
    /// The values of `signal` for ids `first` to `first + 3` (`backends.read`).
    pub(super) fn batch(&self, signal: u32, first: u32) -> Batch {
        let mut values = [0u32; 4];
        let mut missing = 0u8;
        let now = if signal == LATENCY_SIGNAL { now_ns() } else { 0 };
        for (i, value) in values.iter_mut().enumerate() {
            let id = first.saturating_add(i as u32);
            if id as usize >= self.id_bound() {
                // No backend has this id or a higher one.
                missing |= (0x0f << i) & 0x0f;
                break;
            }
            match self
                .backend_by_id(id)
                .and_then(|b| signal_value(signal, b, self.view, now))
            {
                Some(v) => *value = v,
                None => missing |= 1 << i,
            }
        }
        let [a, b, c, d] = values;
        Batch {
            values: (a, b, c, d),
            missing,
        }
    }

    /// The `hint` for a decision: the prefetched signal's first batch, or
    /// every value missing.
    pub(super) fn hint(&self) -> Batch {
        match self.prefetch {
            Some(signal) => self.batch(signal, 0),
            None => Batch {
                values: (0, 0, 0, 0),
                missing: 0x0f,
            },
        }
    }
}

impl v2::fulcrum::plugin::backends::Host for StoreState {
    fn signal(&mut self, name: String) -> Option<u32> {
        SIGNALS.iter().position(|known| *known == name).map(|i| i as u32)
    }

    fn read(&mut self, signal: u32, first: u32) -> Batch {
        self.batch(signal, first)
    }

    fn prefetch(&mut self, signal: u32) {
        self.prefetch = Some(signal);
    }

    fn read_one(&mut self, signal: u32, id: u32) -> Option<u32> {
        let now = if signal == LATENCY_SIGNAL { now_ns() } else { 0 };
        self.backend_by_id(id)
            .and_then(|b| signal_value(signal, b, self.view, now))
    }
}

/// 0.1.0's one host interface: in-flight counts by list index, tickets, log.
impl v1::fulcrum::plugin::host::Host for StoreState {
    fn in_flight_all(&mut self) -> Vec<u32> {
        self.backends.iter().map(|b| b.state.in_flight()).collect()
    }

    fn in_flight_four(&mut self, first: u32) -> (u32, u32, u32, u32) {
        let backends = &self.backends;
        let count = |i: u32| {
            backends
                .get(first.saturating_add(i) as usize)
                .map_or(0, |b| b.state.in_flight())
        };
        (count(0), count(1), count(2), count(3))
    }

    fn in_flight(&mut self, id: u32) -> u32 {
        self.backends.get(id as usize).map_or(0, |b| b.state.in_flight())
    }

    fn next_ticket(&mut self, slot: u32) -> u64 {
        v2::fulcrum::plugin::shared::Host::next_ticket(self, slot)
    }

    fn log(&mut self, level: v1::fulcrum::plugin::host::Level, message: String) {
        // 0.1.0's enum has the same cases in the same order.
        write_log(&self.plugin_name, level as u8, &message);
    }
}
