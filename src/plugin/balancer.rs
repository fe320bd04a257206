//! The balancer world: its bindings, the `host` functions it imports, and
//! [`Policy`], a pool's use of a balancer plugin, whose [`Policy::choose`] is
//! the one call the request path makes. When the plugin cannot answer, the
//! fallback (round robin over healthy backends) does.

use super::engine::{CurrentRequest, Runtime, StoreState, deadline_ticks};
use super::instances::{Binding, Cache, Fault, Live, PluginSlot, World};
use super::{Limits, Tickets};
use crate::backend::{BackendList, health_epoch};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::LocalKey;
use wasmtime::Store;
use wasmtime::component::{HasSelf, InstancePre, Linker};

wasmtime::component::bindgen!({
    path: "wit",
    world: "balancer",
});

use self::exports::fulcrum::plugin::policy::Backend as WitBackend;
use self::fulcrum::plugin::host::Level;

/// The balancer world as the instance cache sees it.
pub struct BalancerWorld;

/// What a balancer instance remembers: which backend list it was given.
pub struct Pushed {
    /// Identity of the backend list last pushed (pointer of its allocation).
    list: *const (),
    epoch: u64,
}

impl Default for Pushed {
    fn default() -> Self {
        Pushed {
            list: std::ptr::null(),
            epoch: u64::MAX,
        }
    }
}

thread_local! {
    static BALANCERS: Cache<BalancerWorld> = const { RefCell::new(Vec::new()) };
}

impl World for BalancerWorld {
    const NAME: &'static str = "fulcrum:plugin/balancer";
    type Pre = BalancerPre<StoreState>;
    type Instance = Balancer;
    type Local = Pushed;

    fn linker() -> &'static Linker<StoreState> {
        static LINKER: OnceLock<Linker<StoreState>> = OnceLock::new();
        LINKER.get_or_init(|| {
            Runtime::get()
                .linker(|linker| Balancer::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s))
                .unwrap_or_else(|e| panic!("the balancer world's imports cannot be linked: {e:#}"))
        })
    }

    fn bind(pre: InstancePre<StoreState>) -> wasmtime::Result<Self::Pre> {
        BalancerPre::new(pre)
    }

    fn instantiate(pre: &Self::Pre, store: &mut Store<StoreState>) -> wasmtime::Result<Balancer> {
        pre.instantiate(store)
    }

    fn init(instance: &Balancer, store: &mut Store<StoreState>, config: &str) -> wasmtime::Result<Result<(), String>> {
        instance.fulcrum_plugin_policy().call_init(store, config)
    }

    fn cache() -> &'static LocalKey<Cache<Self>> {
        &BALANCERS
    }
}

/// The outcome of [`Policy::choose`].
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// Index into the pool's backend list; `None` when no backend can serve.
    pub backend: Option<usize>,
    /// Set when the fallback chose instead of the plugin.
    pub fault: Option<Fault>,
}

/// What a decision needs to know of its pool beyond the backend list.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolView {
    /// Panic mode: every backend counts as healthy.
    pub panic: bool,
    /// The pool's slow start: weights pushed are effective weights, in
    /// hundredths of the configured ones (so a ramp can be fine).
    pub slow_start: Option<std::time::Duration>,
}

/// Counters of one pool that outlive config reloads.
#[derive(Default, Clone)]
pub struct PolicyCounters {
    pub tickets: Tickets,
    pub fallback_ticket: Arc<AtomicU64>,
}

/// A pool's use of a balancer plugin.
pub struct Policy {
    binding: Binding<BalancerWorld>,
    fallback_ticket: Arc<AtomicU64>,
}

impl Policy {
    pub fn new(slot: Arc<PluginSlot<BalancerWorld>>, config: &str, limits: Limits, counters: PolicyCounters) -> Policy {
        Policy {
            binding: Binding::new(slot, config, limits, counters.tickets),
            fallback_ticket: counters.fallback_ticket,
        }
    }

    /// The most linear memory this thread's instance reached, in bytes.
    pub fn peak_memory(&self) -> Option<usize> {
        self.binding.peak_memory()
    }

    pub fn plugin_name(&self) -> &str {
        &self.binding.slot().name
    }

    pub fn slot(&self) -> &Arc<PluginSlot<BalancerWorld>> {
        self.binding.slot()
    }

    /// Chooses a backend for `request` among `backends`, never one in `tried`
    /// and never an unhealthy one (unless the pool is in panic mode). The
    /// plugin reads `request` during the call.
    pub fn choose(
        &self,
        request: &CurrentRequest<'_>,
        backends: &BackendList,
        tried: &[usize],
        view: PoolView,
    ) -> Choice {
        let limits = self.binding.limits;
        let answer = self.binding.call(
            |live| decide(live, request, backends, tried, &limits, view),
            |choice| match *choice {
                None => Ok(()),
                Some(id) => {
                    let index = id as usize;
                    if backends.get(index).is_some_and(|b| b.state.is_usable(view.panic)) && !tried.contains(&index) {
                        Ok(())
                    } else {
                        tracing::warn!(plugin = %self.plugin_name(), backend = id, "plugin chose a backend that is unknown, unhealthy or already tried; using the fallback");
                        Err(Fault::BadChoice(id))
                    }
                }
            },
        );
        match answer {
            Ok(choice) => Choice {
                backend: choice.map(|id| id as usize),
                fault: None,
            },
            Err(fault) => Choice {
                backend: fallback(backends, tried, &self.fallback_ticket, view.panic),
                fault: Some(fault),
            },
        }
    }
}

/// One decision on a cached instance: pushes the backend list first when it
/// (or any backend's health) changed since the last push.
fn decide(
    live: &mut Live<BalancerWorld>,
    request: &CurrentRequest<'_>,
    backends: &BackendList,
    tried: &[usize],
    limits: &Limits,
    view: PoolView,
) -> wasmtime::Result<Option<u32>> {
    let policy = live.instance.fulcrum_plugin_policy();
    let list_id = Arc::as_ptr(backends) as *const ();
    let epoch = health_epoch();
    if live.local.list != list_id || live.local.epoch != epoch {
        let now_ms = crate::backend::process_ms();
        let wit: Vec<WitBackend> = backends
            .iter()
            .enumerate()
            .map(|(i, b)| WitBackend {
                id: i as u32,
                address: b.address.clone(),
                weight: crate::traffic::effective_weight(b, view.slow_start, now_ms),
                healthy: b.state.is_usable(view.panic),
            })
            .collect();
        live.store.data_mut().backends = backends.clone();
        live.store.set_epoch_deadline(deadline_ticks(limits.setup_timeout()));
        policy.call_set_backends(&mut live.store, &wit)?;
        live.local = Pushed { list: list_id, epoch };
    }
    live.store.set_epoch_deadline(deadline_ticks(limits.call_timeout));
    StoreState::with_request(&mut live.store, request, |store| {
        if tried.is_empty() {
            policy.call_select(store)
        } else {
            let tried: Vec<u32> = tried.iter().map(|&i| i as u32).collect();
            policy.call_reselect(store, &tried)
        }
    })
}

/// Round robin over healthy backends (any not drained, in panic mode) not yet tried: what
/// serves a request when the plugin cannot.
pub fn fallback(backends: &BackendList, tried: &[usize], ticket: &AtomicU64, panic: bool) -> Option<usize> {
    let n = backends.len();
    if n == 0 {
        return None;
    }
    let start = ticket.fetch_add(1, Ordering::Relaxed) as usize;
    (0..n)
        .map(|step| (start + step) % n)
        .find(|&i| backends[i].state.is_usable(panic) && !tried.contains(&i))
}

impl self::fulcrum::plugin::host::Host for StoreState {
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
        self.tickets
            .get(slot as usize)
            .map_or(0, |counter| counter.fetch_add(1, Ordering::Relaxed))
    }

    fn log(&mut self, level: Level, message: String) {
        let plugin = &*self.plugin_name;
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}
