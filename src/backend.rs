//! Backends and their live state: in-flight requests, health, counters.
//!
//! A [`Backend`] is immutable apart from its [`BackendState`], which is all
//! atomics so the request path never takes a lock. The state (and the backend's
//! upstream connection pool) is kept across config reloads for as long as the
//! same pool lists the same address, so a reload neither resets least-conn's
//! view of the load nor drops warm connections.

use crate::upstream::ConnPool;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Bumped whenever any backend's health flips, so plugin instances know to
/// push a fresh backend list before their next decision.
static HEALTH_EPOCH: AtomicU64 = AtomicU64::new(0);

/// The current health epoch (see [`BackendState::set_healthy`]).
pub fn health_epoch() -> u64 {
    HEALTH_EPOCH.load(Ordering::Acquire)
}

/// Live, shared state of one backend.
#[derive(Debug)]
pub struct BackendState {
    in_flight: AtomicU32,
    healthy: AtomicBool,
    /// Requests sent to this backend.
    pub requests: AtomicU64,
    /// Requests that failed at this backend (connect error, reset, timeout, 5xx from a failure).
    pub failures: AtomicU64,
}

impl Default for BackendState {
    fn default() -> Self {
        BackendState {
            in_flight: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
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

    /// Sets health; returns true when it changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        let changed = self.healthy.swap(healthy, Ordering::AcqRel) != healthy;
        if changed {
            HEALTH_EPOCH.fetch_add(1, Ordering::AcqRel);
        }
        changed
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

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One backend of a pool.
#[derive(Debug)]
pub struct Backend {
    /// The address as configured, e.g. `127.0.0.1:9001`; the backend's name.
    pub address: String,
    pub socket: SocketAddr,
    pub weight: u32,
    pub state: Arc<BackendState>,
    pub conns: Arc<ConnPool>,
}

/// A pool's backends in a fixed order: a backend's index is its id in the WIT.
pub type BackendList = Arc<[Arc<Backend>]>;
