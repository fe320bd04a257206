//! Balancers: the [`Balancer`] trait and [`Signal`], the cheap way to read
//! live backend state per decision.

use crate::BackendId;
pub use crate::bindings::fulcrum::plugin::backends;
pub use backends::Backend;

/// A load-balancing policy. `set-backends` comes before the first decision
/// and again on every change of membership, weight or health.
pub trait Balancer: crate::Plugin {
    /// Takes the pool's backends: exactly those that exist now (ids need not
    /// be contiguous).
    fn set_backends(&mut self, backends: Vec<Backend>);

    /// The backend for the current request, or none to answer 503.
    fn select(&mut self) -> Option<BackendId>;

    /// Another backend after `tried` failed (a retry); never one in `tried`.
    /// By default `select`, unless it returns a tried one: then none.
    fn reselect(&mut self, tried: &[BackendId]) -> Option<BackendId> {
        self.select().filter(|id| !tried.contains(id))
    }
}

/// A named per-backend signal, resolved once (in `Plugin::new`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal(backends::SignalId);

impl Signal {
    /// The signal called `name` (`in-flight`, `latency-ewma-us`, ...: see
    /// backends.wit); an error naming it when the host does not know it.
    pub fn resolve(name: &str) -> Result<Signal, String> {
        backends::signal(name)
            .map(Signal)
            .ok_or_else(|| format!("the host has no signal called `{name}`"))
    }

    /// Calls `f(id, value)` for every id from 0 to `last` (inclusive), reading
    /// four backends per host call. `None` where the value is missing.
    pub fn for_each(&self, last: BackendId, mut f: impl FnMut(BackendId, Option<u32>)) {
        let mut first = 0u32;
        loop {
            let batch = backends::read(self.0, first);
            let (a, b, c, d) = batch.values;
            for (k, value) in [a, b, c, d].into_iter().enumerate() {
                let id = first + k as u32;
                if id > last {
                    return;
                }
                f(id, (batch.missing & (1 << k) == 0).then_some(value));
            }
            first += 4;
        }
    }

    /// The value for one backend (for sampling a few of a large pool).
    pub fn read(&self, id: BackendId) -> Option<u32> {
        backends::read_one(self.0, id)
    }
}
