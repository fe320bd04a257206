//! Traffic management of one pool, on the request path: the queue of requests
//! waiting for a backend with room (`max_in_flight`), the circuit breakers
//! (`[pools.NAME.circuit_breaker]`), the retry budget, and panic mode. The
//! state is kept per pool name across reloads, so a reload neither empties
//! the queue's count nor resets a tripped breaker.

use crate::backend::{Backend, BackendList};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// A pool's thresholds (`[pools.NAME.circuit_breaker]`), Envoy's names: over
/// one, a request is answered 503 at once (or, for retries, not retried).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Thresholds {
    /// Requests waiting in the queue.
    pub max_pending: Option<usize>,
    /// Requests being served by the pool's backends.
    pub max_requests: Option<usize>,
    /// Retries in flight.
    pub max_retries: Option<usize>,
}

/// Which threshold a request met (the `threshold` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    Pending = 0,
    Requests = 1,
    Retries = 2,
}

impl Breaker {
    pub const ALL: [Breaker; 3] = [Breaker::Pending, Breaker::Requests, Breaker::Retries];

    pub fn as_str(self) -> &'static str {
        match self {
            Breaker::Pending => "max_pending",
            Breaker::Requests => "max_requests",
            Breaker::Retries => "max_retries",
        }
    }
}

/// Live traffic state of one pool.
#[derive(Debug, Default)]
pub struct PoolTraffic {
    /// Requests waiting for a backend with room.
    queued: AtomicUsize,
    /// Woken when a limited backend frees a slot.
    freed: tokio::sync::Notify,
    /// Requests between routing and their answer's head (Envoy's active
    /// requests), counted per worker so that workers do not contend for one
    /// cache line on every request; summed when a threshold is checked.
    active: [PerWorker; crate::upstream::pool::WORKER_SHARDS],
    /// Retries in flight.
    retrying: AtomicUsize,
    /// Per threshold: open now (logged once when it opens and once when it closes).
    open: [AtomicBool; 3],
    /// Per threshold: times it opened, and requests it refused.
    pub trips: [AtomicU64; 3],
    pub refused: [AtomicU64; 3],
    /// Retries the budget refused.
    pub budget_refused: AtomicU64,
    /// Panic mode is on (logged when it changes).
    panic: AtomicBool,
    /// What `panic` was worked out for (the health epoch, the backend list,
    /// the threshold): it is worked out again only when one changed, not per
    /// request.
    panic_epoch: AtomicU64,
    panic_list: AtomicUsize,
    panic_threshold: std::sync::atomic::AtomicU32,
    /// When the weights of a slow start are next pushed to the plugins.
    next_ramp_push_ms: AtomicU64,
    /// Bumped when this pool's plugins must be given the backend list again
    /// (a slow start's step, panic mode on or off): the pool's own, so that
    /// other pools' plugins (a Maglev table) are not rebuilt for it.
    push_epoch: AtomicU64,
}

impl PoolTraffic {
    /// This pool's push epoch (see the field).
    pub fn push_epoch(&self) -> u64 {
        self.push_epoch.load(Ordering::Relaxed)
    }

    /// Requests waiting now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Whether panic mode is on.
    pub fn in_panic(&self) -> bool {
        self.panic.load(Ordering::Relaxed)
    }

    /// A slot was freed at one of the pool's limited backends: every waiter
    /// looks again (the queue is bounded by `max_queue`); one that finds no
    /// room for itself waits on, and no wakeup is lost to it.
    pub fn slot_freed(&self) {
        self.freed.notify_waiters();
    }

    /// Checks `breaker`'s threshold for one more (`now` is the count with it):
    /// refused (and counted, and logged when the breaker opens) when over.
    fn admit(&self, pool: &str, breaker: Breaker, now: usize, max: Option<usize>) -> bool {
        let i = breaker as usize;
        let Some(max) = max else { return true };
        if now <= max {
            self.close(pool, breaker);
            return true;
        }
        self.refused[i].fetch_add(1, Ordering::Relaxed);
        if !self.open[i].swap(true, Ordering::Relaxed) {
            self.trips[i].fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%pool, threshold = breaker.as_str(), max, "circuit breaker open: requests over the threshold get 503");
        }
        false
    }

    /// Counts a request active for as long as the guard lives, if
    /// `max_requests` allows it.
    pub fn start(&self, pool: &str, thresholds: &Thresholds) -> Option<Active<'_>> {
        let mine = &self.active[crate::upstream::pool::worker_shard()].0;
        mine.fetch_add(1, Ordering::Relaxed);
        let active = Active(mine);
        match thresholds.max_requests {
            None => Some(active),
            Some(max) => self
                .admit(pool, Breaker::Requests, self.active_now(), Some(max))
                .then_some(active),
        }
    }

    /// Requests active now, over all workers.
    pub fn active_now(&self) -> usize {
        self.active.iter().map(|a| a.0.load(Ordering::Relaxed)).sum()
    }

    /// Whether a retry may go now: within `max_retries` and within the retry
    /// budget (`budget_percent` of the active requests, and at least
    /// `min_concurrency` retries at once). The guard counts it until dropped.
    pub fn start_retry(
        &self,
        pool: &str,
        thresholds: &Thresholds,
        budget_percent: u32,
        min_concurrency: usize,
    ) -> Option<Active<'_>> {
        let now = self.retrying.fetch_add(1, Ordering::Relaxed) + 1;
        let retry = Active(&self.retrying);
        if !self.admit(pool, Breaker::Retries, now, thresholds.max_retries) {
            return None;
        }
        let active = self.active_now();
        let budget = (active * budget_percent as usize / 100).max(min_concurrency);
        if now > budget {
            self.budget_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(retry)
    }

    /// Waits in the queue until `take` finds a slot (it is tried again each
    /// time a slot frees), until `timeout` at most: `Ok(None)` then; `Err`
    /// when the queue is full (`max_queue`, or the `max_pending` breaker).
    pub async fn wait_for_slot<T>(
        &self,
        pool: &str,
        max_queue: usize,
        thresholds: &Thresholds,
        timeout: tokio::time::Instant,
        mut take: impl FnMut() -> Option<T>,
    ) -> Result<Option<T>, QueueError> {
        let now = self.queued.fetch_add(1, Ordering::Relaxed) + 1;
        let _queued = Active(&self.queued);
        if now > max_queue {
            return Err(QueueError::Full);
        }
        if !self.admit(pool, Breaker::Pending, now, thresholds.max_pending) {
            return Err(QueueError::Breaker);
        }
        let found = loop {
            // Registered before looking, so a slot freed in between wakes it.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(found) = take() {
                break Some(found);
            }
            if tokio::time::timeout_at(timeout, freed).await.is_err() {
                break None;
            }
        };
        // Leaving the queue: the breaker closes once the queue is back under
        // its threshold (requests that need no queue never look at it).
        let left = self.queued.load(Ordering::Relaxed).saturating_sub(1);
        if thresholds.max_pending.is_some_and(|max| left < max) {
            self.close(pool, Breaker::Pending);
        }
        Ok(found)
    }

    /// Closes `breaker` if it is open (logged once).
    fn close(&self, pool: &str, breaker: Breaker) {
        let i = breaker as usize;
        if self.open[i].load(Ordering::Relaxed) && self.open[i].swap(false, Ordering::Relaxed) {
            tracing::info!(%pool, threshold = breaker.as_str(), "circuit breaker closed");
        }
    }

    /// During a slow start, has the plugins given fresh weights about twenty
    /// times over the ramp (at most every 100 ms), not per request.
    pub fn slow_start_tick(&self, backends: &BackendList, ramp: Duration) {
        let now = crate::backend::process_ms();
        if now < self.next_ramp_push_ms.load(Ordering::Relaxed) {
            return;
        }
        let ramp_ms = ramp.as_millis() as u64;
        let step = (ramp_ms / 20).max(100);
        self.next_ramp_push_ms.store(now + step, Ordering::Relaxed);
        let ramping = backends.iter().any(|b| {
            let since = b.state.healthy_since_ms();
            since != 0 && now.saturating_sub(since) < ramp_ms + step
        });
        if ramping {
            self.push_epoch.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the pool is in panic mode: some but fewer than
    /// `threshold_percent` of its backends healthy (0 = never). Backends an operator drained are
    /// left out of the count, and out of the spread. Logged when it changes.
    pub fn check_panic(&self, pool: &str, backends: &BackendList, threshold_percent: u32) -> bool {
        if threshold_percent == 0 {
            return false;
        }
        // The epoch changes with every health change and every drain; the
        // list with a reload; plus one, so that a fresh state never matches.
        let key = (
            crate::backend::health_epoch().wrapping_add(1),
            std::sync::Arc::as_ptr(backends) as *const () as usize,
            threshold_percent,
        );
        // Three loads, no lock: a torn read costs one more walk, or one
        // request decided by the state of an instant before.
        if self.panic_epoch.load(Ordering::Relaxed) == key.0
            && self.panic_list.load(Ordering::Relaxed) == key.1
            && self.panic_threshold.load(Ordering::Relaxed) == key.2
        {
            return self.panic.load(Ordering::Relaxed);
        }
        let mut healthy = 0;
        let mut serving = 0;
        for backend in backends.iter() {
            if !backend.state.is_drained() {
                serving += 1;
                healthy += usize::from(backend.state.is_healthy());
            }
        }
        // With none healthy there are no few left to spare: requests get a
        // fast 503 (Envoy would try them all; its checks may be wrong, but so
        // may the backends, and each try costs a connect timeout).
        let panic = healthy > 0 && healthy * 100 < serving * threshold_percent as usize;
        if self.panic.load(Ordering::Relaxed) != panic && self.panic.swap(panic, Ordering::Relaxed) != panic {
            if panic {
                tracing::warn!(%pool, healthy, backends = serving, threshold_percent, "panic mode: too few backends are healthy; requests go to all of them");
            } else {
                tracing::info!(%pool, healthy, backends = serving, "panic mode over");
            }
            self.push_epoch.fetch_add(1, Ordering::Relaxed);
        }
        // A change since has it worked out once more.
        self.panic_list.store(key.1, Ordering::Relaxed);
        self.panic_threshold.store(key.2, Ordering::Relaxed);
        self.panic_epoch.store(key.0, Ordering::Relaxed);
        panic
    }
}

/// One worker's count, alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct PerWorker(AtomicUsize);

/// Why a request could not wait in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// `max_queue` requests wait already.
    Full,
    /// The `max_pending` circuit breaker is open.
    Breaker,
}

/// A count held while a request is active, queued or retrying.
#[derive(Debug)]
pub struct Active<'a>(&'a AtomicUsize);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The weight a plugin is given for a backend. Without a slow start, its
/// configured weight. With one, in hundredths of it (so a ramp is fine even
/// for weight 1; weights are relative, so all scaled alike mean the same):
/// 100 × weight, or during the ramp after it became healthy a share growing
/// linearly from 10 % to 100 %.
pub fn effective_weight(backend: &Backend, slow_start: Option<Duration>, now_ms: u64) -> u32 {
    let Some(ramp) = slow_start.filter(|r| !r.is_zero()) else {
        return backend.weight;
    };
    let full = backend.weight.saturating_mul(100);
    let since = backend.state.healthy_since_ms();
    let elapsed = now_ms.saturating_sub(since);
    let ramp_ms = ramp.as_millis() as u64;
    // 0: healthy from the start (configured when the process started).
    if since == 0 || elapsed >= ramp_ms {
        return full;
    }
    let share = 0.1 + 0.9 * (elapsed as f64 / ramp_ms as f64);
    ((f64::from(full) * share).round() as u32).clamp(1, full)
}
