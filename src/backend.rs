//! Backends and their live state: in-flight requests, health, counters.
//!
//! A [`Backend`] is immutable apart from its [`BackendState`], which is all
//! atomics so the request path never takes a lock. The state is kept across
//! config reloads for as long as the same pool lists the same address, so a
//! reload does not reset least-conn's view of the load (the pool keeps the
//! backend's idle connections the same way, in its upstream).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Bumped whenever any backend's health flips, so plugin instances know to
/// push a fresh backend list before their next decision.
static HEALTH_EPOCH: AtomicU64 = AtomicU64::new(0);

/// The current health epoch: it changes whenever any backend's health does.
pub fn health_epoch() -> u64 {
    HEALTH_EPOCH.load(Ordering::Acquire)
}

/// Makes every plugin instance push its backend list again before its next
/// decision: a backend's health changed. (A pool's own changes, panic mode
/// and a slow start's steps, bump that pool's push epoch instead.)
pub fn bump_health_epoch() {
    HEALTH_EPOCH.fetch_add(1, Ordering::AcqRel);
}

/// Milliseconds since the process started, on the monotonic clock.
pub fn process_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64 + 1
}

/// Nanoseconds since the process started, on a monotonic clock (the CPU's
/// calibrated counter: cheap enough for every request); never 0. What
/// plugins read as `clock.now`, and the signals' time base.
pub fn now_ns() -> u64 {
    static START: std::sync::OnceLock<quanta::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(quanta::Instant::now);
    quanta::Instant::now().duration_since(start).as_nanos() as u64 + 1
}

/// Live, shared state of one backend.
///
/// A backend is healthy (takes new requests) when active checks say it is up,
/// passive ejection has not taken it out and no operator drains it. `healthy` caches that conjunction so the request path
/// reads one atomic.
#[derive(Debug)]
pub struct BackendState {
    /// Unique for the process's life, never reused: the backend's key in the
    /// metrics shards, which outlive it by a scrape.
    pub id: u64,
    in_flight: AtomicU32,
    healthy: AtomicBool,
    /// Set by active health checks; true until a check says otherwise.
    up: AtomicBool,
    /// Set while passive ejection keeps the backend out.
    ejected: AtomicBool,
    /// Set while an operator drains the backend (admin API).
    drained: AtomicBool,
    /// Requests sent to this backend.
    pub requests: AtomicU64,
    /// Requests that failed at this backend (connect error, reset, timeout, 5xx).
    pub failures: AtomicU64,
    /// Failed requests in a row, for passive ejection.
    pub consecutive_failures: AtomicU32,
    /// The ejection count that sets how long the next ejection lasts (grows
    /// with each ejection, decays while the backend is readmitted).
    pub ejections: AtomicU32,
    /// When the last ejection ended, in ms on the process clock.
    pub readmitted_ms: AtomicU64,
    /// Changes with every ejection and readmission, so the timer of an old
    /// ejection cannot end a newer one.
    pub ejection_generation: AtomicU64,
    /// Active checks passed and failed in a row. Kept here, not in the check
    /// task, so a config reload (which restarts the tasks) forgets nothing.
    pub check_successes: AtomicU32,
    pub check_failures: AtomicU32,
    /// Active checks passed and failed, ever.
    pub checks_passed: AtomicU64,
    pub checks_failed: AtomicU64,
    /// Passive ejections, ever.
    pub ejections_total: AtomicU64,
    /// What went wrong last (a failed request or check), for `/status`.
    last_error: std::sync::Mutex<Option<Arc<str>>>,
    /// Requests it takes at once (`max_in_flight`); 0 for no limit.
    max_in_flight: AtomicU32,
    /// The pool's traffic state, told when a limited backend frees a slot.
    pool_traffic: arc_swap::ArcSwapOption<crate::traffic::PoolTraffic>,
    /// When it last became healthy ([`process_ms`]): a slow start ramps from
    /// there. 0 for a backend healthy since the process started.
    healthy_since_ms: AtomicU64,
    /// Peak EWMA of the time to the response head: nanoseconds as f64 bits,
    /// and when it was last updated ([`now_ns`]); 0 before
    /// the first answer.
    latency_ewma: AtomicU64,
    latency_stamp: AtomicU64,
    /// EWMA of failed outcomes (0.0–1.0, f64 bits); `u64::MAX` before the first.
    error_ewma: AtomicU64,
}

/// The time constant of the latency EWMA (Finagle's and Linkerd's default).
const LATENCY_DECAY_NS: f64 = 10e9;
/// Each outcome's weight in the error-rate EWMA: about the last 32 count.
const ERROR_WEIGHT: f64 = 1.0 / 32.0;

impl Default for BackendState {
    fn default() -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        BackendState {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            in_flight: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            up: AtomicBool::new(true),
            ejected: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            readmitted_ms: AtomicU64::new(0),
            ejection_generation: AtomicU64::new(0),
            check_successes: AtomicU32::new(0),
            check_failures: AtomicU32::new(0),
            checks_passed: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            ejections_total: AtomicU64::new(0),
            last_error: std::sync::Mutex::new(None),
            max_in_flight: AtomicU32::new(0),
            pool_traffic: arc_swap::ArcSwapOption::empty(),
            healthy_since_ms: AtomicU64::new(process_ms()),
            latency_ewma: AtomicU64::new(0),
            latency_stamp: AtomicU64::new(0),
            error_ewma: AtomicU64::new(u64::MAX),
        }
    }
}

impl BackendState {
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// What active health checks say.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Acquire)
    }

    /// Records the verdict of active health checks; true when it changed.
    pub fn set_up(&self, up: bool) -> bool {
        let changed = self.up.swap(up, Ordering::AcqRel) != up;
        self.refresh_health();
        changed
    }

    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }

    /// Drains the backend (no new requests) or puts it back in rotation;
    /// true when it changed.
    pub fn set_drained(&self, drained: bool) -> bool {
        let changed = self.drained.swap(drained, Ordering::AcqRel) != drained;
        self.refresh_health();
        if changed {
            // Panic mode counts the backends not drained, healthy or not.
            bump_health_epoch();
        }
        changed
    }

    /// The state an operator reads: `up`, `down` (by checks), `ejected` or `drained`.
    pub fn describe(&self) -> &'static str {
        if self.is_drained() {
            "drained"
        } else if !self.is_up() {
            "down"
        } else if self.is_ejected() {
            "ejected"
        } else {
            "up"
        }
    }

    /// Ejects or readmits the backend; true when it changed.
    pub fn set_ejected(&self, ejected: bool) -> bool {
        let changed = self.ejected.swap(ejected, Ordering::AcqRel) != ejected;
        self.refresh_health();
        changed
    }

    fn refresh_health(&self) {
        let healthy = self.is_up() && !self.is_ejected() && !self.is_drained();
        if self.healthy.swap(healthy, Ordering::AcqRel) != healthy {
            if healthy {
                self.healthy_since_ms.store(process_ms(), Ordering::Relaxed);
            }
            HEALTH_EPOCH.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Marks it healthy from the start: no slow start for a backend
    /// configured when the process started.
    pub fn healthy_from_start(&self) {
        self.healthy_since_ms.store(0, Ordering::Relaxed);
    }

    /// When it last became healthy (or was first configured), in [`process_ms`];
    /// 0 for one healthy from the start.
    pub fn healthy_since_ms(&self) -> u64 {
        self.healthy_since_ms.load(Ordering::Relaxed)
    }

    /// Sets `max_in_flight` (0: no limit) and the pool told when a slot frees.
    pub fn limit(&self, max_in_flight: u32, traffic: &Arc<crate::traffic::PoolTraffic>) {
        self.max_in_flight.store(max_in_flight, Ordering::Relaxed);
        self.pool_traffic.store((max_in_flight > 0).then(|| traffic.clone()));
    }

    /// Its `max_in_flight`; 0 for no limit.
    pub fn max_in_flight(&self) -> u32 {
        self.max_in_flight.load(Ordering::Relaxed)
    }

    /// Whether it may take requests: healthy, or (in panic mode) anything
    /// but drained by an operator.
    pub fn is_usable(&self, panic: bool) -> bool {
        self.is_healthy() || (panic && !self.is_drained())
    }

    /// Whether it is at its `max_in_flight`.
    pub fn is_full(&self) -> bool {
        let max = self.max_in_flight();
        max > 0 && self.in_flight() >= max
    }

    /// Counts a request in flight if the backend has room for it.
    pub fn try_start_request(self: &Arc<Self>) -> Option<InFlight> {
        let max = self.max_in_flight();
        if max == 0 {
            return Some(self.start_request());
        }
        self.in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1))
            .ok()?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        Some(InFlight(self.clone()))
    }

    /// Remembers `error` as the last thing that went wrong (failures only: off
    /// the path of a request that succeeds).
    pub fn note_error(&self, error: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.into());
    }

    /// The last thing that went wrong, if anything did.
    pub fn last_error(&self) -> Option<Arc<str>> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Feeds the latency EWMA with one time to a response head, at `now`
    /// (ns). Peak EWMA: a sample above the average replaces it; one below
    /// pulls it down by how long it has been since the last. Racing updates
    /// may lose one sample; a load and a store, no lock.
    pub fn observe_latency(&self, sample_ns: u64, now: u64) {
        let sample = sample_ns.max(1) as f64;
        let stamp = self.latency_stamp.load(Ordering::Relaxed);
        let old = f64::from_bits(self.latency_ewma.load(Ordering::Relaxed));
        let ewma = if stamp == 0 || sample > old {
            sample
        } else {
            let w = (-(now.saturating_sub(stamp) as f64) / LATENCY_DECAY_NS).exp();
            old * w + sample * (1.0 - w)
        };
        // The value before the stamp: a reader that sees the stamp sees a value.
        self.latency_ewma.store(ewma.to_bits(), Ordering::Relaxed);
        self.latency_stamp.store(now, Ordering::Release);
    }

    /// The latency EWMA in microseconds at `now`, decayed for the time since
    /// its last sample (an idle backend's cost falls, so it is tried again);
    /// `None` before the first answer.
    pub fn latency_ewma_us(&self, now: u64) -> Option<u64> {
        let stamp = self.latency_stamp.load(Ordering::Relaxed);
        if stamp == 0 {
            return None;
        }
        let ewma = f64::from_bits(self.latency_ewma.load(Ordering::Relaxed));
        let w = (-(now.saturating_sub(stamp) as f64) / LATENCY_DECAY_NS).exp();
        Some((ewma * w / 1e3) as u64)
    }

    /// Feeds the error-rate EWMA with one outcome.
    pub fn observe_outcome(&self, failed: bool) {
        let sample = if failed { 1.0 } else { 0.0 };
        let old = self.error_ewma.load(Ordering::Relaxed);
        let rate = if old == u64::MAX {
            sample
        } else {
            f64::from_bits(old) * (1.0 - ERROR_WEIGHT) + sample * ERROR_WEIGHT
        };
        self.error_ewma.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// Recent failed requests per million; `None` before the first outcome.
    pub fn error_rate_ppm(&self) -> Option<u64> {
        let rate = self.error_ewma.load(Ordering::Relaxed);
        (rate != u64::MAX).then(|| (f64::from_bits(rate) * 1e6).round() as u64)
    }

    /// Counts a request as in flight until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// A request in flight on a backend; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(Arc<BackendState>);

impl InFlight {
    /// The state of the backend serving the request.
    pub fn backend(&self) -> &BackendState {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        // Only a limited backend has someone to tell.
        if self.0.max_in_flight.load(Ordering::Relaxed) > 0
            && let Some(traffic) = &*self.0.pool_traffic.load()
        {
            traffic.slot_freed();
        }
    }
}

/// One backend of a pool.
#[derive(Debug)]
pub struct Backend {
    /// Its id as plugins see it: stable while the pool lists it (kept across
    /// reloads by address); a freed id may be given to a later backend.
    pub id: u32,
    /// The address as configured, e.g. `127.0.0.1:9001`; the backend's name.
    pub address: String,
    pub socket: SocketAddr,
    pub weight: u32,
    /// `labels` from the config, sorted by name: what plugins read.
    pub labels: Arc<[(String, String)]>,
    pub state: Arc<BackendState>,
}

/// A pool's backends in a fixed order. A backend's index here is not its
/// plugin id ([`Backend::id`]), which survives membership changes.
pub type BackendList = Arc<[Arc<Backend>]>;

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn the_latency_ewma_rises_at_once_falls_with_time_and_decays_idle() {
        let state = BackendState::default();
        assert_eq!(state.latency_ewma_us(1), None, "no answer yet");
        state.observe_latency(10 * MS, 1_000 * MS);
        assert_eq!(state.latency_ewma_us(1_000 * MS), Some(10_000));
        // A slower answer is taken whole (the peak).
        state.observe_latency(50 * MS, 1_001 * MS);
        assert_eq!(state.latency_ewma_us(1_001 * MS), Some(50_000));
        // Faster answers pull it down by how long it has been: 10 s is one time constant.
        state.observe_latency(10 * MS, 11_001 * MS);
        let after = state.latency_ewma_us(11_001 * MS).expect("value");
        let expected = 10_000.0 + 40_000.0 * (-1.0f64).exp();
        assert!((after as f64 - expected).abs() < 50.0, "{after} vs {expected}");
        // Idle, it decays: read 10 s later it is about a third.
        let idle = state.latency_ewma_us(21_001 * MS).expect("value");
        assert!((idle as f64 - after as f64 * (-1.0f64).exp()).abs() < 50.0, "{idle}");
    }

    #[test]
    fn the_error_rate_follows_recent_outcomes() {
        let state = BackendState::default();
        assert_eq!(state.error_rate_ppm(), None);
        state.observe_outcome(true);
        assert_eq!(state.error_rate_ppm(), Some(1_000_000));
        for _ in 0..200 {
            state.observe_outcome(false);
        }
        assert!(
            state.error_rate_ppm().expect("rate") < 2_000,
            "{:?}",
            state.error_rate_ppm()
        );
        for _ in 0..32 {
            state.observe_outcome(true);
        }
        let rate = state.error_rate_ppm().expect("rate");
        assert!((550_000..750_000).contains(&rate), "32 failures in a row: {rate}");
    }
}
