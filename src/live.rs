//! The status page's live figures: once a second the metrics' cumulative
//! counts are read ([`crate::metrics::totals`]), and what changed since the
//! second before is kept as one sample, for the last [`WINDOW`] samples.
//!
//! A sample holds, per pool, requests and errors (5xx answers) per second and
//! the p50 and p99 request duration over that second; per backend, requests
//! and errors per second. `GET /status/live` on the admin listener serves the
//! window as JSON, so the page draws charts without parsing `/metrics`.
//! Nothing here runs on the request path: the sampler only folds the
//! workers' shards, as a scrape does.

use crate::app::App;
use crate::metrics::{DURATION_BUCKETS, PoolTotals};
use crate::snapshot::Snapshot;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How many one-second samples the window keeps: two minutes.
pub const WINDOW: usize = 120;

/// Time between samples.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The window of samples, newest last.
#[derive(Debug, Default)]
pub struct Live {
    samples: Mutex<VecDeque<Sample>>,
}

/// One second of traffic.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sample {
    /// When the second ended, in Unix milliseconds.
    pub time_ms: u64,
    pub pools: Vec<PoolSample>,
}

/// One pool's second.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PoolSample {
    pub name: String,
    pub requests_per_second: f64,
    pub errors_per_second: f64,
    /// Median request duration in milliseconds; `None` with no request.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub backends: Vec<BackendSample>,
}

/// One backend's second.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BackendSample {
    pub address: String,
    pub requests_per_second: f64,
    pub errors_per_second: f64,
}

impl Live {
    /// Samples `app` every [`INTERVAL`], forever (until dropped).
    pub async fn sample(self: Arc<Self>, app: Arc<App>) {
        let mut ticks = tokio::time::interval(INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut previous: Option<(Instant, HashMap<u64, PoolTotals>)> = None;
        loop {
            ticks.tick().await;
            let snapshot = app.snapshot();
            let now = Instant::now();
            let totals = crate::metrics::totals(&snapshot);
            if let Some((then, before)) = &previous {
                let seconds = now.duration_since(*then).as_secs_f64();
                let time_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                self.push(sample(&snapshot, before, &totals, seconds, time_ms));
            }
            previous = Some((now, totals));
        }
    }

    fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() == WINDOW {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The window as `GET /status/live` answers it.
    pub fn to_json(&self) -> serde_json::Value {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::json!({
            "interval_seconds": INTERVAL.as_secs(),
            "window_seconds": WINDOW as u64 * INTERVAL.as_secs(),
            "samples": *samples,
        })
    }
}

/// The sample for the `seconds` between `before` and `after`, named by
/// `snapshot`. A pool or backend without `before` counts (new) is counted
/// from zero.
fn sample(
    snapshot: &Snapshot,
    before: &HashMap<u64, PoolTotals>,
    after: &HashMap<u64, PoolTotals>,
    seconds: f64,
    time_ms: u64,
) -> Sample {
    let empty = PoolTotals::default();
    let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / seconds.max(1e-3);
    let pools = snapshot
        .pools
        .iter()
        .map(|pool| {
            let after = after.get(&pool.id).unwrap_or(&empty);
            let before = before.get(&pool.id).unwrap_or(&empty);
            let mut durations = [0u64; 15];
            for (d, (a, b)) in durations.iter_mut().zip(after.durations.iter().zip(before.durations)) {
                *d = a.saturating_sub(b);
            }
            let backends = pool
                .backends
                .iter()
                .map(|backend| {
                    let (requests, errors) = after.backends.get(&backend.state.id).copied().unwrap_or_default();
                    let (requests_before, errors_before) =
                        before.backends.get(&backend.state.id).copied().unwrap_or_default();
                    BackendSample {
                        address: backend.address.clone(),
                        requests_per_second: rate(requests, requests_before),
                        errors_per_second: rate(errors, errors_before),
                    }
                })
                .collect();
            PoolSample {
                name: pool.name.clone(),
                requests_per_second: rate(after.requests, before.requests),
                errors_per_second: rate(after.errors, before.errors),
                p50_ms: quantile(&durations, 0.5).map(|s| s * 1e3),
                p99_ms: quantile(&durations, 0.99).map(|s| s * 1e3),
                backends,
            }
        })
        .collect();
    Sample { time_ms, pools }
}

/// The `q` quantile, in seconds, of durations counted per bucket of
/// [`DURATION_BUCKETS`] (the last count above every bound), interpolated
/// linearly inside its bucket as Prometheus's `histogram_quantile` does; a
/// quantile above every bound is the highest bound. `None` with no counts.
pub fn quantile(counts: &[u64; 15], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &count) in counts.iter().enumerate() {
        if count > 0 && (below + count) as f64 >= rank {
            let Some(&upper) = DURATION_BUCKETS.get(i) else {
                return DURATION_BUCKETS.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { DURATION_BUCKETS[i - 1] };
            let within = (rank - below as f64) / count as f64;
            return Some(lower + (upper - lower) * within);
        }
        below += count;
    }
    DURATION_BUCKETS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let mut counts = [0u64; 15];
        assert_eq!(quantile(&counts, 0.5), None);
        // 100 requests between 1 ms and 2.5 ms: the median is half way.
        counts[2] = 100;
        let p50 = quantile(&counts, 0.5).expect("p50");
        assert!((p50 - 0.00175).abs() < 1e-9, "{p50}");
        // One slow request in 100 (0.5 s to 1 s) is the p99 and not the p50.
        counts[2] = 99;
        counts[10] = 1;
        let p99 = quantile(&counts, 0.99).expect("p99");
        assert!(p99 <= 0.0025, "the 99th of 100 is still a fast one: {p99}");
        let p995 = quantile(&counts, 0.995).expect("p99.5");
        assert!((0.5..=1.0).contains(&p995), "{p995}");
        // Above every bound: the highest bound.
        let mut over = [0u64; 15];
        over[14] = 3;
        assert_eq!(quantile(&over, 0.5), Some(10.0));
    }

    #[test]
    fn the_window_keeps_the_newest_samples() {
        let live = Live::default();
        for time_ms in 0..(WINDOW as u64 + 5) {
            live.push(Sample {
                time_ms,
                pools: Vec::new(),
            });
        }
        let json = live.to_json();
        let samples = json["samples"].as_array().expect("samples");
        assert_eq!(samples.len(), WINDOW);
        assert_eq!(samples[0]["time_ms"], 5);
        assert_eq!(samples[WINDOW - 1]["time_ms"], WINDOW as u64 + 4);
    }
}
