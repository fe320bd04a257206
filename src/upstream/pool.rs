//! Idle keep-alive connections to one backend, sharded per worker thread so a
//! worker reuses the connections its own runtime drives and never contends
//! for another's lock. Owned by the pool's [`super::Upstream`], one per
//! backend, and kept across reloads for as long as the backend stays.

use super::connect::Transport;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Shards of a pool: one per worker thread (modulo).
const SHARDS: usize = 16;

thread_local! {
    static WORKER_INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Worker threads sharing the pools: `max_idle_per_backend` is split among them.
static WORKERS: AtomicUsize = AtomicUsize::new(1);

/// The shard of this worker thread (0 for any other thread).
pub fn worker_shard() -> usize {
    WORKER_INDEX.with(std::cell::Cell::get)
}

/// Shards of per-worker state: one per worker thread (modulo).
pub const WORKER_SHARDS: usize = SHARDS;

/// Tells the pools which shard this thread uses and how many workers share
/// them (worker threads call it once).
pub fn set_worker_index(index: usize, workers: usize) {
    WORKER_INDEX.with(|w| w.set(index % SHARDS));
    WORKERS.store(workers.clamp(1, SHARDS), Ordering::Relaxed);
}

/// Idle connections one shard may keep, so that all shards together keep at
/// most `max_idle` per backend for the whole process.
fn shard_idle_max(max_idle: usize) -> usize {
    match max_idle {
        0 => 0,
        n => (n / WORKERS.load(Ordering::Relaxed)).max(1),
    }
}

/// How a pool keeps connections.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    pub max_idle: usize,
    pub idle_timeout: Duration,
}

struct IdleConn {
    stream: Box<dyn Transport>,
    /// When it went idle, in [`coarse_now_ms`] milliseconds.
    since_ms: u64,
}

/// Milliseconds on the kernel's coarse monotonic clock: a few milliseconds of
/// resolution, but read for a fraction of what a precise clock read costs.
/// Idle connections are timed in seconds, twice per request.
fn coarse_now_ms() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec to write; CLOCK_MONOTONIC_COARSE exists on every Linux since 2.6.32.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    (now.tv_sec as u64) * 1000 + (now.tv_nsec as u64) / 1_000_000
}

/// Connections kept to one backend (idle HTTP/1 ones, each worker's shared
/// HTTP/2 one), and how many were made.
#[derive(Default)]
pub struct IdleConns {
    idle: [Mutex<Vec<IdleConn>>; SHARDS],
    /// Each worker's HTTP/2 connection to the backend, shared by its
    /// requests, with an id (so that only that connection is forgotten when
    /// it fails, not a newer one).
    multiplexed: [Mutex<Option<(u64, super::h2::Sender)>>; SHARDS],
    /// Held while a worker connects, so that a burst of requests makes one
    /// HTTP/2 connection, not one each.
    connecting: [tokio::sync::Mutex<()>; SHARDS],
    /// Connections opened to the backend (an atomic shared by the workers:
    /// touched once per new connection, not per request).
    opened: AtomicU64,
    /// The way the kept connections were made (protocol and TLS settings).
    transport: AtomicU64,
}

impl std::fmt::Debug for IdleConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleConns").field("idle", &self.count()).finish()
    }
}

impl IdleConns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<IdleConn>> {
        let shard = &self.idle[WORKER_INDEX.with(std::cell::Cell::get)];
        shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Idle connections held now, over all workers.
    pub fn count(&self) -> usize {
        self.idle
            .iter()
            .map(|shard| shard.lock().map_or(0, |idle| idle.len()))
            .sum()
    }

    /// Connections opened to the backend since it was first configured.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Counts a connection just opened.
    pub fn count_opened(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    /// The most recently idled connection that is still fresh and quiet;
    /// stale ones met on the way are closed.
    pub fn take(&self, limits: PoolLimits) -> Option<Box<dyn Transport>> {
        let now_ms = coarse_now_ms();
        loop {
            let idle = self.lock().pop()?;
            if now_ms.saturating_sub(idle.since_ms) <= limits.idle_timeout.as_millis() as u64 && idle.stream.is_quiet()
            {
                return Some(idle.stream);
            }
        }
    }

    /// Closes every idle connection and lets go of the shared ones (a
    /// drained backend keeps none; their streams in flight finish).
    pub fn clear(&self) {
        for shard in &self.idle {
            shard.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
        for shard in &self.multiplexed {
            shard.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }

    /// Keeps only connections made the way `transport` names; others (made
    /// before a reload changed the pool's protocol or TLS) are closed.
    pub fn made_for(&self, transport: u64) {
        if self.transport.swap(transport, Ordering::Relaxed) != transport {
            self.clear();
        }
    }

    /// This worker's HTTP/2 connection to the backend, if it is still open,
    /// with its id.
    pub fn shared(&self) -> Option<(u64, super::h2::Sender)> {
        let shard = &self.multiplexed[WORKER_INDEX.with(std::cell::Cell::get)];
        let mut shared = shard.lock().unwrap_or_else(|p| p.into_inner());
        match shared.as_ref() {
            Some((id, sender)) if super::h2::is_open(sender) => Some((*id, sender.clone())),
            Some(_) => {
                *shared = None;
                None
            }
            None => None,
        }
    }

    /// Forgets this worker's HTTP/2 connection `id` (it can open no more
    /// streams), if it is still the one shared.
    pub fn forget_shared(&self, id: u64) {
        let shard = &self.multiplexed[WORKER_INDEX.with(std::cell::Cell::get)];
        let mut shared = shard.lock().unwrap_or_else(|p| p.into_inner());
        if shared.as_ref().is_some_and(|(current, _)| *current == id) {
            *shared = None;
        }
    }

    /// Shares `sender`'s connection with this worker's later requests; its id.
    pub fn share(&self, sender: super::h2::Sender) -> u64 {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let shard = &self.multiplexed[WORKER_INDEX.with(std::cell::Cell::get)];
        *shard.lock().unwrap_or_else(|p| p.into_inner()) = Some((id, sender));
        id
    }

    /// Held by the one request of this worker that is connecting.
    pub fn connecting(&self) -> &tokio::sync::Mutex<()> {
        &self.connecting[WORKER_INDEX.with(std::cell::Cell::get)]
    }

    /// Keeps `stream` for a later request, if this worker's share has room.
    pub fn put(&self, stream: Box<dyn Transport>, limits: PoolLimits) {
        let mut idle = self.lock();
        if idle.len() < shard_idle_max(limits.max_idle) {
            idle.push(IdleConn {
                stream,
                since_ms: coarse_now_ms(),
            });
        }
    }
}
