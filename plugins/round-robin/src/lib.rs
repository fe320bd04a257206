//! Smooth weighted round robin, as nginx does it, made exact across all of
//! Fulcrum's worker threads.
//!
//! nginx's algorithm is deterministic and periodic: with weights 5,1,1 it yields
//! `a a b a c a a`, spreading each backend's turns instead of bunching them. The
//! plugin computes one period of that sequence (the schedule) whenever the
//! backend set changes, and maps the host's shared ticket counter onto it, so
//! every instance agrees on whose turn it is.

use fulcrum_plugin_sdk::{Backend, BackendId, Balancer, NoConfig, Plugin, shared};

/// Longest schedule kept; larger weight sums are scaled down to fit.
const MAX_SCHEDULE: u64 = 1 << 16;

/// One period of nginx's smooth weighted round robin over `(id, weight)` pairs.
pub fn smooth_schedule(peers: &[(BackendId, u32)]) -> Vec<BackendId> {
    let weights = fit_weights(peers.iter().map(|&(_, w)| u64::from(w.max(1))).collect());
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; peers.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..peers.len() {
            current[i] += weights[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(peers[best].0);
    }
    schedule
}

/// Divides weights by their common divisor, then scales them so their sum fits
/// `MAX_SCHEDULE` (keeping every weight at least 1).
fn fit_weights(mut weights: Vec<u64>) -> Vec<u64> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    weights.iter_mut().for_each(|w| *w /= divisor);
    let total: u64 = weights.iter().sum();
    if total > MAX_SCHEDULE {
        weights.iter_mut().for_each(|w| *w = (*w * MAX_SCHEDULE / total).max(1));
    }
    weights
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The policy: the schedule of the healthy backends, and the shared ticket.
pub struct RoundRobin {
    schedule: Vec<BackendId>,
}

impl Plugin for RoundRobin {
    type Config = NoConfig;

    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(RoundRobin { schedule: Vec::new() })
    }
}

impl Balancer for RoundRobin {
    fn set_backends(&mut self, backends: Vec<Backend>) {
        let healthy: Vec<(BackendId, u32)> = backends
            .iter()
            .filter(|b| b.healthy)
            .map(|b| (b.id, b.weight))
            .collect();
        self.schedule = smooth_schedule(&healthy);
    }

    fn select(&mut self) -> Option<BackendId> {
        if self.schedule.is_empty() {
            return None;
        }
        let ticket = shared::next_ticket(0);
        Some(self.schedule[(ticket % self.schedule.len() as u64) as usize])
    }

    fn reselect(&mut self, tried: &[BackendId]) -> Option<BackendId> {
        let n = self.schedule.len();
        let start = shared::next_ticket(0) as usize;
        (0..n)
            .map(|step| self.schedule[(start + step) % n])
            .find(|id| !tried.contains(id))
    }
}

fulcrum_plugin_sdk::export_balancer!(RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(schedule: &[BackendId], n: usize) -> Vec<usize> {
        (0..n)
            .map(|id| schedule.iter().filter(|&&s| s as usize == id).count())
            .collect()
    }

    #[test]
    fn nginx_sequence_for_5_1_1() {
        assert_eq!(smooth_schedule(&[(0, 5), (1, 1), (2, 1)]), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn shares_follow_weights() {
        let s = smooth_schedule(&[(0, 1), (1, 2), (2, 3)]);
        assert_eq!(counts(&s, 3), vec![1, 2, 3]);
    }

    #[test]
    fn huge_weights_are_scaled_to_fit() {
        let s = smooth_schedule(&[(0, u32::MAX), (1, u32::MAX / 2 + 7), (2, 1)]);
        assert!(s.len() as u64 <= MAX_SCHEDULE + 3);
        assert!(s.contains(&2), "a weight-1 backend keeps a turn");
    }
}
