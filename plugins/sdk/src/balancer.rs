//! Balancers: the [`Balancer`] trait and [`Signal`], the cheap way to read
//! live backend state per decision.

use crate::BackendId;
pub use crate::bindings::fulcrum::plugin::backends;
pub use backends::{Backend, Batch};
use std::cell::Cell;

std::thread_local! {
    /// The signal named with [`Signal::prefetch`], if any.
    static PREFETCHED: Cell<Option<backends::SignalId>> = const { Cell::new(None) };
    /// The host's `hint` while a decision runs: the values for ids 0 to 3 of
    /// the signal prefetched when the decision began, read just before it.
    static HINT: Cell<Option<(backends::SignalId, Batch)>> = const { Cell::new(None) };
}

/// Runs one decision with the host's `hint` at hand (the export glue).
#[doc(hidden)]
pub fn with_hint<R>(hint: Batch, decide: impl FnOnce() -> R) -> R {
    HINT.set(PREFETCHED.get().map(|signal| (signal, hint)));
    let answer = decide();
    HINT.set(None);
    answer
}

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

/// A named per-backend signal, resolved once (in `Plugin::new`). The one a
/// decision reads most should be [prefetched](Signal::prefetch): its values
/// for ids 0 to 3 then come with the decision, and [`Signal::for_each`] and
/// [`Signal::read`] take them from there instead of calling the host.
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

    /// Makes this the signal whose values for ids 0 to 3 come with every
    /// decision, so that reading them costs no host call: a pool of up to
    /// four backends is read for free. One signal at a time; the last wins.
    pub fn prefetch(self) -> Signal {
        backends::prefetch(self.0);
        PREFETCHED.set(Some(self.0));
        self
    }

    /// The decision's hint, when a decision is under way and its hint is
    /// this signal's.
    fn hint(&self) -> Option<Batch> {
        HINT.get()
            .filter(|(signal, _)| *signal == self.0)
            .map(|(_, batch)| batch)
    }

    /// The batch from id `first`: the decision's hint when it holds it.
    fn batch(&self, first: BackendId) -> Batch {
        if first == 0
            && let Some(hint) = self.hint()
        {
            return hint;
        }
        backends::read(self.0, first)
    }

    /// Calls `f(id, value)` for every id from 0 to `last` (inclusive), reading
    /// four backends per host call (none for ids 0 to 3 of a prefetched
    /// signal). `None` where the value is missing.
    pub fn for_each(&self, last: BackendId, mut f: impl FnMut(BackendId, Option<u32>)) {
        let mut first = 0u32;
        loop {
            let batch = self.batch(first);
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
        if id < 4
            && let Some(hint) = self.hint()
        {
            let (a, b, c, d) = hint.values;
            return (hint.missing & (1 << id) == 0).then_some([a, b, c, d][id as usize]);
        }
        backends::read_one(self.0, id)
    }
}
