//! A pool's use of a balancer plugin: [`Policy`], whose [`Policy::choose`]
//! is the one call the request path makes. It pushes the backend list when
//! it changed, asks the plugin (0.2.0 by stable backend id, 0.1.0 by list
//! index), checks the answer, and when the plugin cannot answer, the fallback
//! (round robin over healthy backends) does.

use super::engine::{CurrentRequest, StoreState, deadline_ticks};
use super::instances::{Binding, Fault, Live, PluginSlot};
use super::world::{PluginInstance, PluginWorld, Pushed, v1, v2};
use super::{Limits, Tickets};
use crate::backend::{BackendList, health_epoch};
use smallvec::SmallVec;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// The pool's push epoch: when it changes, instances get the list again.
    pub push_epoch: u64,
}

/// Counters of one pool that outlive config reloads.
#[derive(Default, Clone)]
pub struct PolicyCounters {
    pub tickets: Tickets,
    pub fallback_ticket: Arc<AtomicU64>,
}

/// A pool's use of a balancer plugin.
pub struct Policy {
    binding: Binding<PluginWorld>,
    fallback_ticket: Arc<AtomicU64>,
}

impl Policy {
    pub fn new(slot: Arc<PluginSlot<PluginWorld>>, config: &str, limits: Limits, counters: PolicyCounters) -> Policy {
        Policy {
            binding: Binding::new(slot, config, limits, counters.tickets),
            fallback_ticket: counters.fallback_ticket,
        }
    }

    /// The most linear memory this thread's instance reached, in bytes.
    pub fn peak_memory(&self) -> Option<usize> {
        self.binding.peak_memory()
    }

    /// Waits for this pool's instances started in the background.
    pub fn wait_ready(&self, within: std::time::Duration) {
        self.binding.wait_ready(within);
    }

    pub fn plugin_name(&self) -> &str {
        &self.binding.slot().name
    }

    pub fn slot(&self) -> &Arc<PluginSlot<PluginWorld>> {
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
                Decision::None => Ok(()),
                Decision::Index(index) => {
                    if backends.get(index).is_some_and(|b| b.state.is_usable(view.panic)) && !tried.contains(&index) {
                        Ok(())
                    } else {
                        let id = backends.get(index).map_or(u32::MAX, |b| b.id);
                        tracing::warn!(plugin = %self.plugin_name(), backend = id, "plugin chose a backend that is unhealthy or already tried; using the fallback");
                        Err(Fault::BadChoice(id))
                    }
                }
                Decision::Unknown(id) => {
                    tracing::warn!(plugin = %self.plugin_name(), backend = id, "plugin chose a backend id the pool does not have; using the fallback");
                    Err(Fault::BadChoice(id))
                }
            },
        );
        match answer {
            Ok(Decision::Index(index)) => Choice {
                backend: Some(index),
                fault: None,
            },
            Ok(_) => Choice {
                backend: None,
                fault: None,
            },
            Err(fault) => Choice {
                backend: fallback(backends, tried, &self.fallback_ticket, view.panic),
                fault: Some(fault),
            },
        }
    }
}

/// A plugin's answer, turned from its ids into the list's indices.
#[derive(Debug, Clone, Copy)]
enum Decision {
    /// No backend: answer 503.
    None,
    Index(usize),
    /// An id that is in no pushed list.
    Unknown(u32),
}

/// A balancer export of either version, as one decision uses it.
enum Exported<'a> {
    Current(&'a v2::exports::fulcrum::plugin::policy::Guest),
    /// 0.1.0: ids are the list's indices, weights as 0.1.0 had them.
    Legacy(&'a v1::exports::fulcrum::plugin::policy::Guest),
}

impl Exported<'_> {
    /// `set-backends` with `backends` in the version's own shape.
    fn set_backends(
        &self,
        store: &mut wasmtime::Store<StoreState>,
        backends: &BackendList,
        view: PoolView,
    ) -> wasmtime::Result<()> {
        let now_ms = crate::backend::process_ms();
        match self {
            Exported::Current(policy) => {
                let wit: Vec<v2::fulcrum::plugin::backends::Backend> = backends
                    .iter()
                    .map(|b| v2::fulcrum::plugin::backends::Backend {
                        id: b.id,
                        address: b.address.clone(),
                        weight: weight_in_hundredths(b, view, now_ms),
                        healthy: b.state.is_usable(view.panic),
                        max_in_flight: b.state.max_in_flight(),
                        labels: b.labels.to_vec(),
                    })
                    .collect();
                policy.call_set_backends(store, &wit)
            }
            Exported::Legacy(policy) => {
                let wit: Vec<v1::exports::fulcrum::plugin::policy::Backend> = backends
                    .iter()
                    .enumerate()
                    .map(|(i, b)| v1::exports::fulcrum::plugin::policy::Backend {
                        id: i as u32,
                        address: b.address.clone(),
                        weight: crate::traffic::effective_weight(b, view.slow_start, now_ms),
                        healthy: b.state.is_usable(view.panic),
                    })
                    .collect();
                policy.call_set_backends(store, &wit)
            }
        }
    }

    /// The backend's id in this version.
    fn id_of(&self, backends: &BackendList, index: usize) -> u32 {
        match self {
            Exported::Current(_) => backends[index].id,
            Exported::Legacy(_) => index as u32,
        }
    }

    /// `select`, or `reselect` with the tried ids.
    fn choose(&self, store: &mut wasmtime::Store<StoreState>, tried: &[u32]) -> wasmtime::Result<Option<u32>> {
        match (self, tried.is_empty()) {
            (Exported::Current(policy), true) => {
                let hint = store.data().hint();
                policy.call_select(store, hint)
            }
            (Exported::Current(policy), false) => {
                let hint = store.data().hint();
                policy.call_reselect(store, tried, hint)
            }
            (Exported::Legacy(policy), true) => policy.call_select(store),
            (Exported::Legacy(policy), false) => policy.call_reselect(store, tried),
        }
    }

    /// The list index of the chosen id.
    fn index_of(&self, state: &StoreState, backends: &BackendList, id: u32) -> Option<usize> {
        match self {
            Exported::Current(_) => state.index_of(id),
            Exported::Legacy(_) => ((id as usize) < backends.len()).then_some(id as usize),
        }
    }
}

/// One decision on a cached instance: pushes the backend list first when it
/// (or any backend's health, or the pool's push epoch) changed since the last
/// push.
fn decide(
    live: &mut Live<PluginWorld>,
    request: &CurrentRequest<'_>,
    backends: &BackendList,
    tried: &[usize],
    limits: &Limits,
    view: PoolView,
) -> wasmtime::Result<Decision> {
    let exported = match &live.instance {
        PluginInstance::Current {
            balancer: Some(balancer),
            ..
        } => Exported::Current(balancer),
        PluginInstance::Legacy(legacy) => Exported::Legacy(legacy.fulcrum_plugin_policy()),
        PluginInstance::Current { balancer: None, .. } => {
            return Err(wasmtime::Error::msg(
                "the plugin exports no balancer (`fulcrum:plugin/policy@0.2.0`)",
            ));
        }
    };
    let list_id = Arc::as_ptr(backends) as *const ();
    let epoch = health_epoch();
    let local = &live.local;
    if local.list != list_id || local.epoch != epoch || local.pool_epoch != view.push_epoch {
        let state = live.store.data_mut();
        state.push_backends(backends);
        state.view = view;
        live.store.set_epoch_deadline(deadline_ticks(limits.setup_timeout()));
        exported.set_backends(&mut live.store, backends, view)?;
        live.local = Pushed {
            list: list_id,
            epoch,
            pool_epoch: view.push_epoch,
        };
    }
    live.store.set_epoch_deadline(deadline_ticks(limits.call_timeout));
    let tried: SmallVec<[u32; 4]> = tried.iter().map(|&i| exported.id_of(backends, i)).collect();
    let chosen = StoreState::with_request(&mut live.store, request, None, |store| exported.choose(store, &tried))?;
    Ok(match chosen {
        None => Decision::None,
        Some(id) => exported
            .index_of(live.store.data(), backends, id)
            .map_or(Decision::Unknown(id), Decision::Index),
    })
}

/// A backend's effective weight as 0.2.0 plugins see it: in hundredths of
/// the configured weight (a slow start ramps it; otherwise 100 × weight).
pub fn weight_in_hundredths(backend: &crate::backend::Backend, view: PoolView, now_ms: u64) -> u32 {
    let weight = crate::traffic::effective_weight(backend, view.slow_start, now_ms);
    // effective_weight is in hundredths exactly when a (non-zero) slow start is set.
    if view.slow_start.is_some_and(|ramp| !ramp.is_zero()) {
        weight
    } else {
        weight.saturating_mul(100)
    }
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
