//! Peak EWMA with the power of two choices (Finagle's and Linkerd's default):
//! two healthy backends drawn at random, the one with the lower cost wins,
//! where cost = latency EWMA × (requests in flight + 1). A backend that slows
//! down loses traffic at once; one that recovers wins it back as its average
//! decays. Backends with no answer yet cost the least, so they get tried.
//!
//! Reads the host's `latency-ewma-us` and `in-flight` signals of two
//! backends per decision (a `read-one` call per signal and backend): O(1) in
//! the pool's size. The latency is prefetched, so for ids 0 to 3 it comes
//! with the decision and only `in-flight` is read.
//! `policy_config`: `{"default_latency_us": N}`, the latency assumed for a
//! backend with no sample (default 1, so new backends are tried first).

use fulcrum_plugin_sdk::{Backend, BackendId, Balancer, Plugin, Signal, random};

/// The policy's config.
#[derive(Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub default_latency_us: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config { default_latency_us: 1 }
    }
}

/// A backend's cost: its latency (or the default) times its load plus one,
/// divided by its weight.
pub fn cost(latency_us: Option<u64>, in_flight: u64, weight: u32, default_latency_us: u64) -> f64 {
    let latency = latency_us.unwrap_or(default_latency_us).max(1) as f64;
    latency * (in_flight + 1) as f64 / f64::from(weight.max(1))
}

/// Two distinct draws from `0..n` (the same one twice when n is 1).
pub fn two_draws(n: usize, mut random: impl FnMut() -> u64) -> (usize, usize) {
    let a = (random() % n as u64) as usize;
    if n == 1 {
        return (a, a);
    }
    let b = (a + 1 + (random() % (n as u64 - 1)) as usize) % n;
    (a, b)
}

/// The policy: the healthy backends with weights, and its two signals.
pub struct PeakEwma {
    healthy: Vec<(BackendId, u32)>,
    latency: Signal,
    in_flight: Signal,
    default_latency_us: u64,
}

impl PeakEwma {
    fn cost_of(&self, (id, weight): (BackendId, u32)) -> f64 {
        let in_flight = u64::from(self.in_flight.read(id).unwrap_or(0));
        cost(
            self.latency.read(id).map(u64::from),
            in_flight,
            weight,
            self.default_latency_us,
        )
    }

    fn pick(&self, candidates: &[(BackendId, u32)]) -> Option<BackendId> {
        if candidates.is_empty() {
            return None;
        }
        let (a, b) = two_draws(candidates.len(), random::next);
        let (a, b) = (candidates[a], candidates[b]);
        Some(if self.cost_of(b) < self.cost_of(a) { b.0 } else { a.0 })
    }
}

impl Plugin for PeakEwma {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        Ok(PeakEwma {
            healthy: Vec::new(),
            latency: Signal::resolve("latency-ewma-us")?.prefetch(),
            in_flight: Signal::resolve("in-flight")?,
            default_latency_us: config.default_latency_us,
        })
    }
}

impl Balancer for PeakEwma {
    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.healthy = backends
            .iter()
            .filter(|b| b.healthy)
            .map(|b| (b.id, b.weight))
            .collect();
    }

    fn select(&mut self) -> Option<BackendId> {
        self.pick(&self.healthy)
    }

    fn reselect(&mut self, tried: &[BackendId]) -> Option<BackendId> {
        let rest: Vec<(BackendId, u32)> = self
            .healthy
            .iter()
            .copied()
            .filter(|(id, _)| !tried.contains(id))
            .collect();
        self.pick(&rest)
    }
}

fulcrum_plugin_sdk::export_balancer!(PeakEwma);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_or_busy_backend_costs_more() {
        assert!(cost(Some(50_000), 0, 100, 1) > cost(Some(1_000), 0, 100, 1));
        assert!(cost(Some(1_000), 9, 100, 1) > cost(Some(1_000), 0, 100, 1));
        assert!(
            cost(None, 0, 100, 1) < cost(Some(10), 0, 100, 1),
            "untried backends go first"
        );
        assert!(
            cost(Some(1_000), 0, 200, 1) < cost(Some(1_000), 0, 100, 1),
            "weight divides"
        );
    }

    #[test]
    fn the_two_draws_differ() {
        let mut n = 0u64;
        for _ in 0..100 {
            let (a, b) = two_draws(3, || {
                n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                n >> 33
            });
            assert_ne!(a, b);
            assert!(a < 3 && b < 3);
        }
        assert_eq!(two_draws(1, || 7), (0, 0));
    }
}
